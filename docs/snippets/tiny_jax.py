import numpy as np
import optax
from flax import nnx

import mlpug.jax as mlp

mlp.set_random_seed(0)

# 48 samples with 8 features; the label says whether the first feature is positive
features = np.random.default_rng(0).normal(size=(48, 8)).astype("float32")
labels = (features[:, 0] > 0).astype("int32")
training_data = [(features[i : i + 8], labels[i : i + 8]) for i in range(0, 32, 8)]  # 4 batches per epoch
validation_data = [(features[i : i + 8], labels[i : i + 8]) for i in range(32, 48, 8)]


class Classifier(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(8, 16, rngs=rngs)
        self.output = nnx.Linear(16, 2, rngs=rngs)

    def __call__(self, inputs):
        return self.output(nnx.relu(self.hidden(inputs)))


class TrainModel(nnx.Module):
    """Turns a batch into the loss; the logits go to the metric functions as auxiliary results."""

    def __init__(self, classifier):
        self.classifier = classifier

    def __call__(self, batch_data, evaluate_settings, inference_mode=None):
        inputs, targets = batch_data
        logits = self.classifier(inputs)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
        return {"loss": loss, "auxiliary_results": logits}


def make_trainer(**trainer_options):
    """A DefaultTrainer of a fresh 2-layer MLP with Adam, its training model set."""
    classifier = Classifier(nnx.Rngs(0))
    optimizer = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)
    trainer = mlp.trainers.DefaultTrainer(optimizers=optimizer, model_components=classifier, **trainer_options)
    trainer.set_training_model(TrainModel(classifier))
    return trainer
