"""The Hello World of mlpug with TensorFlow, in eager mode, as in the
mlpug README; only the data loading differs (Fashion-MNIST from local IDX files instead of tf.keras.datasets)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

import mlpug.tensorflow as mlp  # noqa: E402
from mlpug.datasets.fashion_mnist import load_fashion_mnist  # noqa: E402

num_epochs = 10
batch_size = 64
progress_log_period = 500

tf.keras.utils.set_random_seed(0)

# ############# SETUP DATA ##############
data = load_fashion_mnist()
# images float64 [N, 28, 28] in [0, 1], labels uint8 [N]
training_data = (data.train_images / 255.0, data.train_labels)
test_data = (data.test_images / 255.0, data.test_labels)

training_dataset = tf.data.Dataset.from_tensor_slices(training_data).batch(batch_size)

# Using the test set as a validation set, just for demonstration purposes
validation_dataset = tf.data.Dataset.from_tensor_slices(test_data).batch(batch_size)
# #######################################

classifier = tf.keras.Sequential(
    [
        tf.keras.Input(shape=(28, 28)),
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(128, activation="relu"),
        tf.keras.layers.Dense(10),
    ]
)


class TrainModel(tf.keras.Model):
    def __init__(self, classifier):
        super(TrainModel, self).__init__()

        self.classifier = classifier
        self.loss_func = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def call(self, batch_data, evaluate_settings, inference_mode=None):
        images, true_labels = batch_data

        logits = self.classifier(images, training=not inference_mode)
        return self.loss_func(true_labels, logits)


train_model = TrainModel(classifier)

optimizer = tf.keras.optimizers.Adam()

trainer = mlp.trainers.DefaultTrainer(
    optimizers=optimizer,
    model_components=classifier,
    eager_mode=True,
)

# At minimum you want to log the loss in the training progress
# By default the batch loss and the moving average of the loss are calculated and logged
loss_evaluator = mlp.evaluation.MetricEvaluator(trainer=trainer)
callbacks = [
    mlp.callbacks.TrainingMetricsLogger(metric_evaluator=loss_evaluator),
    # Calculate validation loss only once per epoch over the whole dataset
    mlp.callbacks.TestMetricsLogger(
        validation_dataset, "validation", metric_evaluator=loss_evaluator, batch_level=False
    ),
    mlp.callbacks.LogProgress(log_period=progress_log_period, set_names=["training", "validation"]),
]

manager = mlp.trainers.TrainingManager(trainer, training_dataset, num_epochs=num_epochs, callbacks=callbacks)

trainer.set_training_model(train_model)

manager.start_training()

print("\nUsing the classifier ...")
image, real_label = test_data[0][0], test_data[1][0]
logits = classifier(image[None, ...], training=False)
print(f"real label = {real_label}, predicted label = {int(tf.argmax(logits, axis=1)[0])}")
