"""Non-finite weights under a ``MirroredStrategy`` (2 logical CPU devices): ``DefaultTrainer.non_finite_weights``
reads the mirrored variables, and a NaN input hidden from the loss ends the run with ``NonFiniteWeightsError``
(issue 25, item 3). In a subprocess: the logical devices must be set before TensorFlow creates a tensor."""

import os
import subprocess
import sys

SCRIPT = r"""
import numpy as np
import tensorflow as tf
import mlpug.tensorflow as mlp
from mlpug.trainers.non_finite import NonFiniteWeightsError

strategy = mlp.distributed.mirrored_cpu_strategy(2)
with strategy.scope():
    model = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(3, activation="relu"),
                                 tf.keras.layers.Dense(1)])
    optimizer = tf.keras.optimizers.SGD(0.1)


class MaskedModel(tf.keras.Model):  # hides non-finite hidden rows from the loss: finite loss, NaN kernel gradient
    def call(self, batch_data, evaluate_settings, inference_mode=None):
        inputs, targets = batch_data
        hidden = model.layers[0](inputs)
        hidden = tf.where(tf.math.is_finite(hidden), hidden, tf.zeros_like(hidden))
        return tf.reduce_mean(tf.square(model.layers[1](hidden) - targets))


with strategy.scope():
    training_model = MaskedModel()
trainer = mlp.trainers.DefaultTrainer(optimizer, model, strategy=strategy)
trainer.set_training_model(training_model)
inputs = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
inputs[37, 0] = np.nan  # batch 2 of 16 rows
dataset = tf.data.Dataset.from_tensor_slices((inputs, np.zeros((64, 1), "float32"))).batch(16)
assert trainer.non_finite_weights() == []
losses = []


class Losses(mlp.callbacks.Callback):
    def on_batch_training_completed(self, batch, logs):
        losses.append(float(self.training_manager.step_result.loss))


manager = mlp.trainers.TrainingManager(trainer, dataset, num_epochs=1, callbacks=[Losses()])
try:
    manager.start_training()
    raise SystemExit("no error")
except NonFiniteWeightsError as error:
    assert all(np.isfinite(losses)) and len(losses) == 4, losses
    assert (error.global_iter, error.epoch, error.batch_step) == (3, 0, 3), str(error)
    assert len(error.names) == 1 and error.names[0].startswith("model.") and error.names[0].endswith("kernel"), error
    assert isinstance(model.layers[0].kernel.value, tf.distribute.DistributedValues)  # mirrored
    assert trainer.non_finite_weights() == error.names
print("OK")
"""


def test_non_finite_mirrored_weights_end_the_run_under_a_strategy(tmp_path):
    script = tmp_path / "nan_weights_under_strategy.py"
    script.write_text(SCRIPT)
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=environment, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stdout[-3000:]
