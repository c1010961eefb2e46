"""Several optimisation steps per compiled call on JAX: ``DefaultTrainer(steps_per_execution=K)``.

K batches are stacked and trained in a ``lax.scan`` of the one-batch step inside one ``jax.jit`` call; the manager
then runs the batch hooks of every batch. What must hold: the same per-batch losses, skipped flags, learning rates,
weights, optimizer states and random streams as one step per call, bit for bit on CPU (with dropout, a short call, a
short last batch, gradient accumulation, bfloat16, clipping and a skipped non-finite step), one compiled call per
call length and batch shape, an exact resume from a checkpoint that ends a call, and dataset evaluation in stacked
calls with the values of single batches.
"""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import mlpug.jax as mlp
from mlpug.random_state import get_random_states
from mlpug.trainers.non_finite import NonFiniteLossError
from tests.contract.backends import make_numpy_data
from tests.jax.test_trainer import MLP, ClassificationLoss, batches, weights

NUM_SAMPLES, BATCH_SIZE = 9 * 8 + 3, 8  # 10 batches per epoch, the last of 3 samples


class CountingLoss(ClassificationLoss):
    """The classification loss, counting how often each mode is traced (its body runs only while tracing)."""

    def __init__(self, classifier, traces):
        super().__init__(classifier)
        self.traces = traces

    def __call__(self, batch_data, evaluate_settings, inference_mode=None):
        self.traces["evaluate" if inference_mode else "train"] += 1
        return super().__call__(batch_data, evaluate_settings, inference_mode)


class Record(mlp.callbacks.Callback):
    """Each batch's loss, skipped flag and learning rate, as the manager hands them to the batch hooks."""

    def __init__(self, stop_at=None):
        super().__init__("Record")
        self.losses, self.skipped, self.learning_rates, self.stop_at = [], [], [], stop_at

    def on_batch_training_completed(self, training_batch, logs):
        result = self.training_manager.step_result
        self.losses.append(np.asarray(result.loss))
        self.skipped.append(bool(result.optimizer_step_skipped))
        self.learning_rates.append(None if result.learning_rate is None else np.asarray(result.learning_rate))
        if self.stop_at == logs["current"]["global_iter"]:
            self.training_manager.stop_training()
        return True


def make_trainer(steps, seed=0, traces=None, learning_rate=0.01, **options):
    classifier = MLP(seed, dropout=0.3)
    optimizer = optax.inject_hyperparams(optax.adam)(learning_rate=optax.linear_schedule(learning_rate, 0.0, 40))
    trainer = mlp.trainers.DefaultTrainer(optimizer, classifier, steps_per_execution=steps, **options)
    traces = {"train": 0, "evaluate": 0} if traces is None else traces
    trainer.set_training_model(CountingLoss(classifier, traces))
    return trainer, classifier


def data(nan_at=None, num_samples=NUM_SAMPLES):
    features, labels = make_numpy_data(num_samples, 1)
    if nan_at is not None:
        features[nan_at] = np.nan
    return mlp.data.ResumableArrayBatches((features, labels.astype(np.int32)), BATCH_SIZE, seed=3)


def train(steps, num_epochs=2, nan_at=None, manager_options=None, **options):
    traces = {"train": 0, "evaluate": 0}
    trainer, classifier = make_trainer(steps, traces=traces, **options)
    record = Record()
    manager = mlp.trainers.TrainingManager(
        trainer, data(nan_at), num_epochs=num_epochs, callbacks=[record], handle_signals=False,
        **(manager_options or {}),
    )  # fmt: skip
    manager.start_training()
    return trainer, classifier, record, traces


def assert_same_run(expected, actual):
    (expected_trainer, expected_model, expected_record, _) = expected
    (actual_trainer, actual_model, actual_record, _) = actual
    assert len(actual_record.losses) == len(expected_record.losses)
    for index, (loss, other) in enumerate(zip(expected_record.losses, actual_record.losses)):
        assert loss.tobytes() == other.tobytes(), (index, loss, other)  # NaN where NaN, else bit for bit
    assert actual_record.skipped == expected_record.skipped
    for rate, other in zip(expected_record.learning_rates, actual_record.learning_rates):
        assert (rate is None and other is None) or rate.tobytes() == other.tobytes()
    expected_weights, actual_weights = weights(expected_model), weights(actual_model)
    for name in expected_weights:
        np.testing.assert_array_equal(actual_weights[name], expected_weights[name], err_msg=name)
    expected_state = expected_trainer.get_state()["optimizers"]["optimizer"]
    actual_state = actual_trainer.get_state()["optimizers"]["optimizer"]
    assert expected_state.keys() == actual_state.keys()
    for key in expected_state:
        np.testing.assert_array_equal(actual_state[key], expected_state[key], err_msg=key)
    expected_random = get_random_states(expected_trainer.random_state_providers())["flax_nnx_rngs"]
    assert get_random_states(actual_trainer.random_state_providers())["flax_nnx_rngs"] == expected_random


@pytest.fixture(scope="module")
def one_step_per_call():
    return train(1)


@pytest.mark.parametrize("steps", [4, 3])
def test_several_steps_per_call_train_exactly_as_one_with_dropout_a_short_call_and_a_short_last_batch(
    steps, one_step_per_call
):
    """10 batches per epoch, the last of 3 samples. K=4: calls of 4, 4 and 2 (a full batch and the short one, of two
    shapes: one call each). K=3: calls of 3, 3, 3 and the short batch alone."""
    several = train(steps)
    assert len(several[2].losses) == 2 * 10
    assert several[0].steps_per_execution == steps and several[0].evaluation_steps_per_execution == steps
    assert_same_run(one_step_per_call, several)
    assert not np.array_equal(several[2].learning_rates[0], several[2].learning_rates[1])  # each batch's own rate
    # one trace per call length and batch shape: the stacked call, the short batch alone (and K=4: a full one)
    assert several[3]["train"] == (3 if steps == 4 else 2)
    assert one_step_per_call[3]["train"] == 2  # full batches and the short one


@pytest.mark.parametrize(
    "options",
    [{"batch_chunk_size": 3}, {"use_mixed_precision": True, "clip_gradients_norm": 0.05}],
    ids=["accumulation", "bfloat16_and_clipping"],
)
def test_several_steps_per_call_compose_with_the_step_parts(options):
    assert_same_run(train(1, num_epochs=1, **options), train(4, num_epochs=1, **options))


def test_a_non_finite_batch_inside_a_call_is_skipped_and_the_others_applied():
    options = {"num_epochs": 1, "nan_at": 10, "manager_options": {"non_finite_loss": "skip_step"}}
    single, several = train(1, **options), train(4, **options)
    nan_batch = 6  # sample 10 is in batch 6 (shuffled), the third of the call of batches 4-7
    assert several[2].skipped == [index == nan_batch for index in range(10)]  # skipped inside the scan
    losses = several[2].losses
    assert not np.isfinite(losses[nan_batch]) and all(np.isfinite(np.delete(losses, nan_batch)))
    assert_same_run(single, several)
    assert several[0].non_finite_weights() == []
    with pytest.raises(NonFiniteLossError, match=f"global iteration {nan_batch}\\b"):
        train(4, **{**options, "manager_options": {"non_finite_loss": "raise"}})


def test_a_call_of_stacked_batches_compiles_once_per_length_and_shape():
    traces = {"train": 0, "evaluate": 0}
    trainer, _ = make_trainer(4, traces=traces)
    full = batches(num_batches=9, batch_size=BATCH_SIZE)
    short = batches(num_batches=1, batch_size=3)[0]
    for _ in range(3):
        results = trainer.train_on_batches(full[:4])
        assert len(results) == 4
    assert traces["train"] == 1  # three calls of 4 batches, one trace
    results = trainer.train_on_batches(full[4:9] + [short])  # 4 + 1 full batches, then the short one: 3 calls
    assert len(results) == 6 and results[-1].num_samples == 3 and results[0].num_samples == BATCH_SIZE
    assert traces["train"] == 3  # the single full batch and the single short batch: a trace each
    trainer.train_on_batches(full[:2])
    assert traces["train"] == 4  # a call of 2 batches: another length


def test_values_that_are_not_arrays_split_calls_and_numbers_are_stacked():
    """Batches with other constants are not stacked together; Python numbers in batches are stacked, traced arrays,
    so their values are each batch's own."""
    classifier = MLP(0)
    traces = {"train": 0}

    class WithNumbers(nnx.Module):
        def __init__(self):
            self.classifier = classifier

        def __call__(self, batch_data, evaluate_settings, inference_mode=None):
            traces["train"] += 1
            loss = optax.softmax_cross_entropy_with_integer_labels(
                self.classifier(batch_data["features"]), batch_data["labels"]
            ).mean()
            return {"loss": loss, "auxiliary_results": {"scaled": batch_data["scale"] * 2, "tag": batch_data["tag"]}}

    trainer = mlp.trainers.DefaultTrainer(optax.sgd(0.1), classifier, steps_per_execution=4)
    trainer.set_training_model(WithNumbers())
    tags = ["a", "a", "b", "b"]
    made = [
        {"features": features, "labels": labels, "scale": float(index), "tag": tag}
        for index, ((features, labels), tag) in enumerate(zip(batches(num_batches=4), tags))
    ]
    results = trainer.train_on_batches(made)
    assert [float(result.auxiliary_results["scaled"]) for result in results] == [0.0, 2.0, 4.0, 6.0]
    assert [result.auxiliary_results["tag"] for result in results] == tags
    assert traces["train"] == 2  # two calls of two batches: one per tag


def test_stacked_evaluation_gives_the_values_of_single_batches():
    trainer, _ = make_trainer(1)
    several, _ = make_trainer(1, evaluation_steps_per_execution=4)
    several.set_state(trainer.get_state())
    dataset = list(data())  # 10 batches: calls of 4, 4, then the full and the short batch alone
    for inference_mode in (True, False):  # False: train() mode, dropout draws, no stream advances
        expected = trainer.evaluate_losses(dataset, inference_mode=inference_mode)
        actual = several.evaluate_losses(dataset, inference_mode=inference_mode)
        assert len(actual) == len(expected) == 10
        for index, (one, other) in enumerate(zip(expected, actual)):
            assert np.asarray(one.loss).tobytes() == np.asarray(other.loss).tobytes(), index
            assert one.num_samples == other.num_samples
            np.testing.assert_array_equal(np.asarray(other.auxiliary_results), np.asarray(one.auxiliary_results))
    values = []
    for each in (trainer, several):
        evaluator = mlp.evaluation.MetricEvaluator(trainer=each, batch_metric_funcs={"loss": lambda i: i.loss})
        values.append({name: float(value) for name, value in evaluator.evaluate_dataset(data()).items()})
    assert values[0] == values[1]
    random = [get_random_states(each.random_state_providers())["flax_nnx_rngs"] for each in (trainer, several)]
    assert random[0] == random[1]  # evaluation advanced no stream


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 JAX devices (JAX_NUM_CPU_DEVICES, root conftest)")
def test_several_steps_per_call_on_a_data_parallel_mesh_equal_one_step_per_call():
    """4 CPU devices: a stacked call's batches are split along their sample axis (1) over the mesh; the state stays
    replicated, and the run is that of one step per call on the mesh (the short batch of 3 runs replicated)."""
    single = train(1, num_epochs=1, strategy="data_parallel")
    several = train(3, num_epochs=1, strategy="data_parallel")  # calls of 3: split along axis 1, not 0
    assert_same_run(single, several)
    kernel = several[1].hidden.kernel.get_raw_value()
    assert kernel.sharding.is_fully_replicated and len(kernel.addressable_shards) == 4
    stacked = several[0].strategy.place_batch(np.zeros((4, BATCH_SIZE, 6), np.float32), batch_axis=1)
    assert [shard.data.shape for shard in stacked.addressable_shards] == [(4, 2, 6)] * 4


def checkpointed_run(directory, steps, stop_at=None, resume_from=None, seed=0):
    trainer, classifier = make_trainer(steps, seed=seed)
    record = Record(stop_at)
    checkpoints = mlp.callbacks.CheckpointManager(
        checkpoints_path=str(directory), metric_to_monitor=None, batch_level=True, create_checkpoint_every=3
    )
    manager = mlp.trainers.TrainingManager(
        trainer, data(), num_epochs=2, callbacks=[record, checkpoints], resume_from=resume_from, handle_signals=False
    )
    manager.start_training()
    return classifier, record, manager


def test_a_resume_from_a_checkpoint_that_ends_a_call_is_exact(tmp_path):
    """Calls of up to 5 batches, checkpoints every 3: the calls end at the checkpoints; stopped during the call of
    global iterations 6-8, resumed from that stop in a trainer with other initial weights."""
    straight_model, straight, _ = checkpointed_run(tmp_path / "straight", 1)
    _, first, manager = checkpointed_run(tmp_path / "run", 5, stop_at=7)
    assert manager.global_iter == 9  # the stop took effect at the end of the call
    resumed_model, second, manager = checkpointed_run(tmp_path / "run", 5, resume_from="latest", seed=7)
    assert manager.global_iter == 20
    assert [loss.tobytes() for loss in first.losses + second.losses] == [loss.tobytes() for loss in straight.losses]
    expected, actual = weights(straight_model), weights(resumed_model)
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)


def test_bad_steps_per_execution_is_refused_at_construction():
    for bad in (0, -1, 2.0, True, "4"):
        with pytest.raises(ValueError, match=f"steps_per_execution must be an int >= 1, got {bad!r}"):
            make_trainer(bad)
    with pytest.raises(ValueError, match="evaluation_steps_per_execution must be an int >= 1, got 0"):
        make_trainer(2, evaluation_steps_per_execution=0)
    assert make_trainer(3, evaluation_steps_per_execution=5)[0].evaluation_steps_per_execution == 5
    assert make_trainer(1)[0].evaluation_steps_per_execution == 1
