"""TensorFlow ``LRSchedulerWrapper``: schedules of the step (Keras ``LearningRateSchedule`` s and callables) give
the logged and applied learning rates, a resume continues them, and a skipped optimizer step does not count."""

import numpy as np
import pytest
import tensorflow as tf

import mlpug.tensorflow as mlp

NUM_BATCHES = 3


def make_problem(nan_at_batch=None, optimizer=None):
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(1)])
    generator = np.random.default_rng(1)
    batches = [
        (generator.standard_normal((8, 4)).astype("float32"), generator.standard_normal((8, 1)).astype("float32"))
        for _ in range(NUM_BATCHES)
    ]
    if nan_at_batch is not None:
        batches[nan_at_batch][0][0, 0] = np.nan

    class TrainModel(tf.keras.Model):
        def __init__(self):
            super().__init__()
            self.model = model

        def call(self, batch_data, evaluate_settings, inference_mode=None):
            inputs, targets = batch_data
            return tf.reduce_mean(tf.square(self.model(inputs) - targets))

    trainer = mlp.trainers.DefaultTrainer(optimizer or tf.keras.optimizers.SGD(learning_rate=0.1), model)
    trainer.set_training_model(TrainModel())
    return trainer, batches


class RecordLR(mlp.callbacks.Callback):
    """The logged learning rate of every batch, and the one the optimizer holds when the step ran."""

    def __init__(self):
        super().__init__("RecordLR")
        self.rates, self.applied = [], []

    def on_batch_training_start(self, training_batch, logs):
        self.applied.append(float(self.training_manager.trainer.optimizers["optimizer"].learning_rate))
        return True

    def on_batch_training_completed(self, training_batch, logs):
        self.rates.append(logs["current"]["training_params"]["batch"]["lr"])
        return True


class StopAfter(mlp.callbacks.Callback):
    def __init__(self, epoch=None):
        super().__init__("StopAfter")
        self.epoch = epoch

    def on_epoch_completed(self, logs):
        if logs["current"]["epoch"] == self.epoch:
            self.training_manager.stop_training()
        return True


def run(schedule, num_epochs=2, directory=None, resume=False, stop_after=None, batch_level=True, **problem):
    trainer, batches = make_problem(**problem)
    recorder = RecordLR()
    callbacks = [mlp.callbacks.LRSchedulerWrapper(schedule, batch_level=batch_level), recorder, StopAfter(stop_after)]
    if directory is not None:
        callbacks.append(mlp.callbacks.CheckpointManager(checkpoints_path=str(directory), metric_to_monitor=None))
    manager = mlp.trainers.TrainingManager(
        trainer, batches, num_epochs=num_epochs, callbacks=callbacks, resume_from="latest" if resume else None,
        non_finite_loss="skip_step", handle_signals=False,
    )  # fmt: skip
    manager.start_training()
    assert recorder.rates == pytest.approx(recorder.applied)  # logged = what the optimizer stepped with
    return recorder.rates


def halving(step):
    return 0.1 * 0.5 ** (step // 2)


EXPECTED = [0.1, 0.1, 0.05, 0.05, 0.025, 0.025]


def test_a_callable_and_a_keras_schedule_give_their_learning_rates():
    assert run(halving) == pytest.approx(EXPECTED)
    keras_schedule = tf.keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=2, decay_rate=0.5, staircase=True)
    assert run(keras_schedule) == pytest.approx(EXPECTED)
    assert run(halving, batch_level=False) == pytest.approx([0.1] * 3 + [0.1] * 3)  # epochs 0 and 1: 0.1
    assert run(halving, num_epochs=3, batch_level=False)[-3:] == pytest.approx([0.05] * 3)


def test_a_resumed_run_continues_the_schedule(tmp_path):
    first = run(halving, directory=tmp_path, stop_after=0)
    resumed = run(halving, directory=tmp_path, resume=True)
    assert first + resumed == pytest.approx(EXPECTED)


def test_a_skipped_optimizer_step_does_not_count():
    assert run(halving, nan_at_batch=1) == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05, 0.05])  # batch 1 of each epoch


def test_bad_schedules_are_errors_at_construction():
    with pytest.raises(TypeError, match="must be a tf.keras.optimizers.schedules.LearningRateSchedule or a callable"):
        mlp.callbacks.LRSchedulerWrapper(0.1)
    with pytest.raises(TypeError, match="one schedule or a dict optimizer name -> schedule"):
        mlp.callbacks.LRSchedulerWrapper([halving])
    with pytest.raises(ValueError, match="takes no metric"):
        mlp.callbacks.LRSchedulerWrapper(halving, batch_level=False, metric_to_monitor="validation.dataset.loss")
    trainer, batches = make_problem()
    with pytest.raises(
        ValueError, match=r"no optimizer named 'generator'; the trainer's optimizers are \['optimizer'\]"
    ):
        mlp.trainers.TrainingManager(
            trainer, batches, callbacks=[mlp.callbacks.LRSchedulerWrapper({"generator": halving})]
        )
    scheduled = tf.keras.optimizers.SGD(learning_rate=tf.keras.optimizers.schedules.ExponentialDecay(0.1, 2, 0.5))
    trainer, batches = make_problem(optimizer=scheduled)
    with pytest.raises(ValueError, match="was created with a learning rate schedule of its own"):
        mlp.trainers.TrainingManager(trainer, batches, callbacks=[mlp.callbacks.LRSchedulerWrapper(halving)])
