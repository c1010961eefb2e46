"""Quickstart: Fashion-MNIST in one call, with validation, a progress bar and checkpoints (TensorFlow)."""

import tensorflow as tf

import mlpug.tensorflow as mlp
from mlpug.datasets.fashion_mnist import load_fashion_mnist

mlp.set_random_seed(0)
data = load_fashion_mnist()  # NumPy arrays: images uint8 [N, 28, 28], labels [N]
train_set = (data.train_images.astype("float32") / 255, data.train_labels.astype("int64"))
validation_set = (data.test_images.astype("float32") / 255, data.test_labels.astype("int64"))

model = tf.keras.Sequential([
    tf.keras.Input(shape=(28, 28)), tf.keras.layers.Flatten(), tf.keras.layers.Dense(256, activation="relu"),
    tf.keras.layers.Dense(256, activation="relu"), tf.keras.layers.Dense(10),
])  # fmt: skip
loss_func = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
trainer = mlp.Trainer(model, loss_func, tf.keras.optimizers.Adam(), metrics={"accuracy": mlp.metrics.accuracy})
history = trainer.train(train_set, validation_set, num_epochs=3, batch_size=64, checkpoints_path="checkpoints")
print(history.table())
