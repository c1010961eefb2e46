import numpy as np
import tensorflow as tf

import mlpug.tensorflow as mlp

mlp.set_random_seed(0)

# 48 samples with 8 features; the label says whether the first feature is positive
features = np.random.default_rng(0).normal(size=(48, 8)).astype("float32")
labels = (features[:, 0] > 0).astype("int64")
training_data = tf.data.Dataset.from_tensor_slices((features[:32], labels[:32])).batch(8)  # 4 batches per epoch
validation_data = tf.data.Dataset.from_tensor_slices((features[32:], labels[32:])).batch(8)


class TrainModel(tf.keras.Model):
    """Turns a batch into the loss; the logits go to the metric functions as auxiliary results."""

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier
        self.loss_func = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def call(self, batch_data, evaluate_settings, inference_mode=None):
        inputs, targets = batch_data
        logits = self.classifier(inputs, training=not inference_mode)
        return {"loss": self.loss_func(targets, logits), "auxiliary_results": logits}


def make_trainer(**trainer_options):
    """A DefaultTrainer of a fresh 2-layer MLP with Adam, its training model set."""
    classifier = tf.keras.Sequential(
        [tf.keras.Input(shape=(8,)), tf.keras.layers.Dense(16, activation="relu"), tf.keras.layers.Dense(2)]
    )
    optimizer = tf.keras.optimizers.Adam(1e-2)
    trainer = mlp.trainers.DefaultTrainer(optimizers=optimizer, model_components=classifier, **trainer_options)
    trainer.set_training_model(TrainModel(classifier))
    return trainer
