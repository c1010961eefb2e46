"""JAX ``LRSchedulerWrapper``: optax schedules and Python functions of the step give the logged and applied learning
rates, a resumed run continues the schedule exactly (learning rates and weights), a skipped optimizer step does not
count, and bad schedules or optimizers are named early."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mlpug.jax as mlp

NUM_BATCHES = 3


class Regression(nnx.Module):
    def __init__(self, model):
        self.model = model

    def __call__(self, batch_data, evaluate_settings, inference_mode=None):
        inputs, targets = batch_data
        return jnp.mean(jnp.square(self.model(inputs) - targets))


def make_problem(nan_at_batch=None, optimizer=None, seed=0):
    model = nnx.Linear(4, 1, rngs=nnx.Rngs(seed))
    generator = np.random.default_rng(1)
    batches = [
        (generator.standard_normal((8, 4)).astype("float32"), generator.standard_normal((8, 1)).astype("float32"))
        for _ in range(NUM_BATCHES)
    ]
    if nan_at_batch is not None:
        batches[nan_at_batch][0][0, 0] = np.nan
    optimizer = optimizer or optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
    trainer = mlp.trainers.DefaultTrainer(optimizer, model)
    trainer.set_training_model(Regression(model))
    return trainer, model, batches


class RecordLR(mlp.callbacks.Callback):
    """The logged learning rate of every batch, and the one the optimizer state holds when the step runs."""

    def __init__(self):
        super().__init__("RecordLR")
        self.rates, self.applied = [], []

    def on_batch_training_start(self, training_batch, logs):
        self.applied.append(self.training_manager.trainer.get_learning_rate())
        return True

    def on_batch_training_completed(self, training_batch, logs):
        self.rates.append(float(logs["current"]["training_params"]["batch"]["lr"]))
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
    trainer, model, batches = make_problem(**problem)
    recorder = RecordLR()
    callbacks = [mlp.callbacks.LRSchedulerWrapper(schedule, batch_level=batch_level), recorder, StopAfter(stop_after)]
    if directory is not None:
        callbacks.append(mlp.callbacks.CheckpointManager(checkpoints_path=str(directory), metric_to_monitor=None))
    manager = mlp.trainers.TrainingManager(
        trainer, batches, num_epochs=num_epochs, callbacks=callbacks, resume_from="latest" if resume else None,
        non_finite_loss="skip_step", handle_signals=False,
    )  # fmt: skip
    manager.start_training()
    assert recorder.rates == pytest.approx(recorder.applied, rel=1e-6)  # logged = what the optimizer stepped with
    return recorder.rates, np.array(model.kernel[...])


def halving(step):
    return 0.1 * 0.5 ** (step // 2)


EXPECTED = [0.1, 0.1, 0.05, 0.05, 0.025, 0.025]


def test_a_function_and_an_optax_schedule_give_their_learning_rates():
    assert run(halving)[0] == pytest.approx(EXPECTED)
    optax_schedule = optax.exponential_decay(0.1, transition_steps=2, decay_rate=0.5, staircase=True)
    assert run(optax_schedule)[0] == pytest.approx(EXPECTED, rel=1e-6)
    assert run(halving, batch_level=False)[0] == pytest.approx([0.1] * 6)  # epochs 0 and 1: 0.1
    assert run(halving, num_epochs=3, batch_level=False)[0][-3:] == pytest.approx([0.05] * 3)


def test_the_weights_are_those_of_sgd_with_the_scheduled_learning_rates():
    """One linear layer, plain SGD: the weights after training equal a hand-written loop with the schedule's rates."""
    _, kernel = run(halving, num_epochs=1)
    _, model, batches = make_problem()
    weights = {"kernel": jnp.array(model.kernel[...]), "bias": jnp.array(model.bias[...])}

    def loss(weights, inputs, targets):
        return jnp.mean(jnp.square(inputs @ weights["kernel"] + weights["bias"] - targets))

    import jax

    for step, (inputs, targets) in enumerate(batches):
        gradients = jax.grad(loss)(weights, inputs, targets)
        weights = {name: weights[name] - jnp.float32(halving(step)) * gradients[name] for name in weights}
    np.testing.assert_allclose(kernel, np.asarray(weights["kernel"]), rtol=1e-6, atol=1e-7)


def test_a_resumed_run_continues_the_schedule_exactly(tmp_path):
    """Broken on purpose (the step count not in the checkpoint), the resumed run starts the schedule at 0.1 again."""
    straight_rates, straight_kernel = run(halving)
    first, _ = run(halving, directory=tmp_path, stop_after=0)
    resumed, kernel = run(halving, directory=tmp_path, resume=True, seed=7)  # other initial weights: all restored
    assert first + resumed == pytest.approx(EXPECTED) and first + resumed == straight_rates
    np.testing.assert_array_equal(kernel, straight_kernel)


def test_a_skipped_optimizer_step_does_not_count():
    assert run(halving, nan_at_batch=1)[0] == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05, 0.05])  # batch 1, each epoch


def test_bad_schedules_and_optimizers_are_errors_before_training():
    with pytest.raises(TypeError, match="must be an optax schedule or a callable of the step"):
        mlp.callbacks.LRSchedulerWrapper(0.1)
    with pytest.raises(TypeError, match="one schedule or a dict optimizer name -> schedule"):
        mlp.callbacks.LRSchedulerWrapper([halving])
    with pytest.raises(ValueError, match="takes no metric"):
        mlp.callbacks.LRSchedulerWrapper(halving, batch_level=False, metric_to_monitor="validation.dataset.loss")
    trainer, _, batches = make_problem()
    with pytest.raises(
        ValueError, match=r"no optimizer named 'generator'; the trainer's optimizers are \['optimizer'\]"
    ):
        mlp.trainers.TrainingManager(
            trainer, batches, callbacks=[mlp.callbacks.LRSchedulerWrapper({"generator": halving})]
        )
    trainer, _, batches = make_problem(optimizer=optax.sgd(0.1))
    with pytest.raises(TypeError, match="make it with optax.inject_hyperparams"):
        mlp.trainers.TrainingManager(trainer, batches, callbacks=[mlp.callbacks.LRSchedulerWrapper(halving)])
    scheduled = optax.inject_hyperparams(optax.sgd)(learning_rate=optax.exponential_decay(0.1, 2, 0.5))
    trainer, _, batches = make_problem(optimizer=scheduled)
    with pytest.raises(TypeError, match="has a learning rate schedule"):
        mlp.trainers.TrainingManager(trainer, batches, callbacks=[mlp.callbacks.LRSchedulerWrapper(halving)])
