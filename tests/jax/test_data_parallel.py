"""Data-parallel training on JAX over a 4-device CPU mesh (``JAX_NUM_CPU_DEVICES=4``, set by the root conftest):
the mesh trains as one device on the global batch (also with accumulation, clipping and dropout), evaluates alike,
keeps the state replicated, resumes from checkpoints, and refuses a batch it cannot split."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import mlpug.jax as mlp
from tests.contract.backends import make_numpy_data
from tests.jax.test_trainer import MLP, ClassificationLoss, batches, weights

NUM_DEVICES = 4

pytestmark = pytest.mark.skipif(
    jax.device_count() < NUM_DEVICES, reason=f"needs {NUM_DEVICES} JAX devices (JAX_NUM_CPU_DEVICES, root conftest)"
)


def make(strategy=None, seed=0, dropout=0.0, **kwargs):
    classifier = MLP(seed, dropout)
    trainer = mlp.trainers.DefaultTrainer(optax.adam(0.01), classifier, strategy=strategy, **kwargs)
    trainer.set_training_model(ClassificationLoss(classifier))
    return classifier, trainer


def mesh():
    return mlp.strategies.DataParallelStrategy(jax.devices()[:NUM_DEVICES])


def max_difference(first, second):
    return max(float(np.max(np.abs(first[name] - second[name]))) for name in first)


@pytest.mark.parametrize(
    "options",
    [{}, {"batch_chunk_size": 4, "clip_gradients_norm": 0.05}, {"batch_chunk_size": 8, "clip_gradients_value": 0.01}],
    ids=["plain", "accumulation+clip_norm", "accumulation+clip_value"],
)
def test_the_mesh_trains_as_one_device_on_the_global_batch(options):
    """8 steps of batches of 16 (4 samples per device), dropout on: the weights after every step agree with one
    device's to 1e-6 (the sums of the all-reduce add in another order than one device's)."""
    data = batches(num_batches=8, batch_size=16)
    one_classifier, one_device = make(dropout=0.2, **options)
    mesh_classifier, on_mesh = make(mesh(), dropout=0.2, **options)
    differences = []
    for batch in data:
        one_loss = float(one_device.train_on(batch).loss)
        mesh_loss = float(on_mesh.train_on(batch).loss)
        assert mesh_loss == pytest.approx(one_loss, abs=1e-6)
        differences.append(max_difference(weights(one_classifier), weights(mesh_classifier)))
    assert max(differences) <= 1e-6, differences
    assert max_difference(weights(one_classifier), weights(MLP(0))) > 1e-2  # it trained
    print(f"largest weight difference mesh vs one device over 8 steps ({options}): {max(differences):.3g}")


def test_the_state_lives_replicated_on_every_device_of_the_mesh_after_training():
    classifier, trainer = make(mesh(), dropout=0.2)
    for batch in batches(num_batches=3, batch_size=8):
        trainer.train_on(batch)
    strategy = trainer.strategy
    values = [variable.get_raw_value() for variable in trainer._live.variables]
    values += jax.tree_util.tree_leaves(trainer.optimizer_states.state_tuple())
    for value in values:
        assert value.sharding.is_equivalent_to(strategy.replicated, value.ndim), value.sharding
        assert {shard.device for shard in value.addressable_shards} == set(jax.devices()[:NUM_DEVICES])
        if jax.numpy.issubdtype(value.dtype, jax.dtypes.prng_key):
            value = jax.random.key_data(value)
        copies = [np.asarray(shard.data) for shard in value.addressable_shards]
        for copy in copies[1:]:
            np.testing.assert_array_equal(copy, copies[0])
    kernel = classifier.hidden.kernel.get_raw_value()
    assert [shard.data.shape for shard in kernel.addressable_shards] == [kernel.shape] * NUM_DEVICES


def test_a_batch_is_split_over_the_devices_along_its_sample_axis():
    strategy = mesh()
    features, labels = batches(num_batches=1, batch_size=8)[0]
    placed = strategy.place_batch({"x": features, "y": labels, "n": np.float32(2.0), "tag": "a"})
    assert placed["tag"] == "a"
    assert [shard.data.shape for shard in placed["x"].addressable_shards] == [(2, 6)] * NUM_DEVICES
    assert placed["n"].sharding.is_fully_replicated
    stacked = strategy.place_batch(np.zeros((3, 8, 6), np.float32), batch_axis=1)
    assert [shard.data.shape for shard in stacked.addressable_shards] == [(3, 2, 6)] * NUM_DEVICES


def test_a_batch_that_does_not_divide_by_the_device_count_runs_replicated_with_one_warning(caplog):
    """Batches of 8, then 6 and 10 (which 4 devices cannot split): those run on every device whole, equal to one
    device's steps, with one warning per size; a batch of 8 after them is split again (no state decides it)."""
    features, labels = batches(num_batches=1, batch_size=40)[0]
    data = [(features[:8], labels[:8]), (features[8:14], labels[8:14]), (features[14:24], labels[14:24])]
    data += [(features[24:30], labels[24:30]), (features[30:38], labels[30:38])]
    one_classifier, one_device = make()
    mesh_classifier, on_mesh = make(mesh())
    with caplog.at_level("WARNING", logger="mlpug.jax.strategies"):
        for batch in data:
            one_device.train_on(batch)
            on_mesh.train_on(batch)
    assert max_difference(weights(one_classifier), weights(mesh_classifier)) <= 1e-6
    warnings = [record.getMessage() for record in caplog.records if "runs replicated" in record.getMessage()]
    assert len(warnings) == 2 and "a batch of 6 samples" in warnings[0] and "a batch of 10 samples" in warnings[1]
    assert on_mesh.strategy.place_batch(data[1])[0].sharding.is_fully_replicated
    assert not on_mesh.strategy.place_batch(data[4])[0].sharding.is_fully_replicated
    outputs = on_mesh.evaluate_loss(data[1])
    assert outputs.num_samples == 6
    assert float(outputs.loss) == pytest.approx(float(one_device.evaluate_loss(data[1]).loss), abs=1e-6)


def test_a_per_batch_constant_is_replicated_in_one_process_and_refused_across_processes():
    """A batch ``{"x": [8, 6], "y": [8], "class_weights": [3]}``: in one process the [3] vector (not of the batch's
    sample count) is replicated, not split; with several processes it would be joined into [6], so it is refused,
    naming it; so is a batch that this process's devices cannot split."""
    strategy = mesh()
    features, labels = batches(num_batches=1, batch_size=8)[0]
    batch = {"x": features, "y": labels, "class_weights": np.ones(3, np.float32), "scale": np.float32(2.0)}
    placed = strategy.place_batch(batch)
    assert placed["class_weights"].sharding.is_fully_replicated and placed["class_weights"].shape == (3,)
    assert [shard.data.shape for shard in placed["x"].addressable_shards] == [(2, 6)] * NUM_DEVICES
    several = mesh()
    several.num_processes = 2  # what place_batch checks before it joins anything (as process 0 of 2)
    with pytest.raises(ValueError, match=r"batch\['class_weights'\] has shape \(3,\), 3 along the sample axis 0"):
        several.place_batch(batch)
    with pytest.raises(ValueError, match=r"this process's batch has 6 samples .* this process's 4 devices"):
        several.place_batch((features[:6], labels[:6]))
    for number in (np.float32(2.0), 2.0):  # a 0-d value, or a Python number (traced as a 0-d array): unchecked
        with pytest.raises(ValueError, match=r"batch\[2\] is a value without a sample axis \(shape \(\)"):
            several.place_batch((features, labels, np.asarray(number)))


class TwoProcesses(mlp.distributed.JaxProcessContext):
    """Process ``rank`` of 2, as the strategy's dataset and sample-count hooks see it (no collective is used)."""

    def __init__(self, rank=0):
        self.rank, self.world_size = rank, 2


def as_process_of_two(strategy, rank=0):
    """``strategy`` (a mesh of 4 devices) as process ``rank`` of 2 with 2 devices each."""
    strategy.num_processes, strategy.num_local_devices, strategy._context = 2, 2, TwoProcesses(rank)
    return strategy


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("num_samples", [3, 8, 42, 44, 45, 48])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_the_batch_sizes_of_a_process_are_those_its_sampler_yields(num_samples, world_size, drop_last):
    """The sizes the strategy checks before training (:func:`_batch_sizes`) are those a sharded sampler yields, the
    padded last global batch included (``ceil(rest / world_size)`` rows per process)."""
    from mlpug.jax.strategies.data_parallel import _batch_sizes

    if drop_last and num_samples < 4 * world_size:
        return  # drop_last leaves no batch
    sampler = mlp.data.ResumableArrayBatches((np.zeros(num_samples),), 4, drop_last=drop_last).batch_sampler
    sampler.set_shard(world_size - 1, world_size)
    yielded = [len(indices) for indices in sampler]
    assert _batch_sizes(sampler, world_size) == list(dict.fromkeys(yielded))


def test_across_processes_batch_sizes_the_devices_cannot_split_are_refused_before_training():
    """2 processes x 2 devices, 4 samples per process per batch. Training on 42 samples: the padded last global
    batch of 2 gives each process 1 row, which 2 devices cannot split: refused when the dataset is given (not at the
    end of the first epoch); 44 samples or drop_last=True are fine. Evaluating 46 samples: 23 per process, a last
    batch of 3: refused when the manager shards it."""

    def data(num_samples, **options):
        return mlp.data.ResumableArrayBatches(make_numpy_data(num_samples, 1), 4, **options)

    with pytest.raises(
        ValueError,
        match=r"training batches would have \[4, 1\] samples \(from 42 samples, batch_size "
        r"4 per process, drop_last=False\), but \[1\] cannot be split evenly over this process's 2 dev",
    ):
        as_process_of_two(mesh()).training_dataset(data(42))
    assert as_process_of_two(mesh()).training_dataset(data(44)).batch_sampler.world_size == 2
    as_process_of_two(mesh()).training_dataset(data(42, drop_last=True))
    with pytest.raises(ValueError, match=r"evaluation batches would have \[4, 3\] samples \(from 23 samples of this "):
        as_process_of_two(mesh()).evaluation_dataset(data(46))
    mesh().training_dataset(data(42))  # one process: the short batch runs replicated


def test_across_processes_an_evaluation_shard_without_len_is_refused():
    """The processes' shard lengths are compared (a process with an extra batch would hang the run): a shard without
    len() cannot be, so it is refused, naming its type."""

    class Shards:
        def shard(self, rank, world_size):
            return iter([])

    with pytest.raises(
        TypeError,
        match=r"the shard of the evaluation dataset \(list_iterator, from .*Shards.shard\) "
        r"has no len\(\)",
    ):
        as_process_of_two(mesh()).evaluation_dataset(Shards())


def test_across_processes_evaluation_takes_an_unpadded_copy_and_refuses_a_count_that_does_not_divide():
    """Evaluation shards a copy (the user's dataset keeps its samples and order) over ``rank::2``, every sample once;
    43 samples cannot be shared by 2 processes without counting one twice: a ValueError names the counts."""
    features, labels = make_numpy_data(44, 1)
    dataset = mlp.data.ResumableArrayBatches((features, labels), 4, shuffle=False)
    parts = [as_process_of_two(mesh(), rank).evaluation_dataset(dataset) for rank in (0, 1)]
    assert parts[0] is not dataset and len(dataset) == 11 and dataset.batch_sampler.world_size == 1
    rows = np.concatenate([batch[0] for part in parts for batch in part])
    assert rows.shape == (44, 6) and len({row.tobytes() for row in rows}) == 44
    assert [len(batch[0]) for batch in parts[1]] == [4, 4, 4, 4, 4, 2]
    odd = mlp.data.ResumableArrayBatches((features[:43], labels[:43]), 4, shuffle=False)
    with pytest.raises(ValueError, match="has 43 samples, which 2 JAX processes cannot share evenly.*first 42"):
        as_process_of_two(mesh()).evaluation_dataset(odd)
    with pytest.raises(TypeError, match=r"has no shard\(rank, world_size\)"):
        as_process_of_two(mesh()).evaluation_dataset([(features, labels)])


def test_across_processes_the_sample_count_is_this_processes_and_a_model_count_is_refused():
    """The compiled step counts the global batch (16 rows of 2 processes x 8); each process's outputs carry its 8.
    A count the model returned (an array, or an int that is not the rows) cannot be split: refused, naming it."""
    strategy = as_process_of_two(mesh())
    batch = batches(num_batches=1, batch_size=8)[0]
    assert strategy.local_num_samples(16, batch) == 8
    with pytest.raises(ValueError, match=r"returned num_samples=Array\(5.*2 JAX processes.*\(value, weight\)"):
        strategy.local_num_samples(jax.numpy.asarray(5), batch)
    with pytest.raises(ValueError, match="returned num_samples=12 while 2 JAX processes"):
        strategy.local_num_samples(12, batch)
    assert int(mesh().local_num_samples(jax.numpy.asarray(5), batch)) == 5  # one process: as it is


def test_across_processes_asynchronous_evaluation_is_refused_when_a_snapshot_is_asked_for():
    _, trainer = make(mesh())
    trainer.evaluation_snapshot()  # one process: allowed
    as_process_of_two(trainer.strategy)
    with pytest.raises(RuntimeError, match=r"asynchronous evaluation \(TestMetricsLogger\(run_async=True\)\) cannot"):
        trainer.evaluation_snapshot()


def test_evaluation_on_the_mesh_equals_one_device():
    data = batches(num_batches=2, batch_size=8)
    _, one_device = make(dropout=0.2)
    _, on_mesh = make(mesh(), dropout=0.2)
    for batch in data:
        one_device.train_on(batch)
        on_mesh.train_on(batch)
    for inference_mode in (True, False):
        first = one_device.evaluate_loss(data[0], inference_mode=inference_mode)
        second = on_mesh.evaluate_loss(data[0], inference_mode=inference_mode)
        assert float(second.loss) == pytest.approx(float(first.loss), abs=1e-6)
        np.testing.assert_allclose(np.asarray(second.auxiliary_results), np.asarray(first.auxiliary_results), atol=1e-6)
    evaluations = []
    for trainer in (one_device, on_mesh):
        evaluator = mlp.evaluation.MetricEvaluator(trainer=trainer, batch_metric_funcs={"loss": lambda i: i.loss})
        evaluations.append(evaluator.evaluate_dataset(data))
    assert evaluations[1]["loss"] == pytest.approx(evaluations[0]["loss"], abs=1e-6)


def test_data_parallel_by_name_uses_every_device():
    _, trainer = make("data_parallel")
    assert isinstance(trainer.strategy, mlp.strategies.DataParallelStrategy)
    assert trainer.strategy.num_devices == jax.device_count()
    assert trainer.strategy.mesh.axis_names == ("data",)
    _, single = make()
    assert isinstance(single.strategy, mlp.strategies.SingleDevice)


def test_bad_devices_raise_clear_errors():
    with pytest.raises(TypeError, match="devices must be jax.Device objects"):
        mlp.strategies.DataParallelStrategy([0, 1])
    with pytest.raises(TypeError, match="sequence of jax.Device"):
        mlp.strategies.DataParallelStrategy(jax.devices()[0])
    with pytest.raises(ValueError, match="devices is empty"):
        mlp.strategies.DataParallelStrategy([])
    with pytest.raises(ValueError, match="names a device twice"):
        mlp.strategies.DataParallelStrategy([jax.devices()[0]] * 2)
    with pytest.raises(ValueError, match="'fsdp' is not a JAX strategy name.*data_parallel"):
        mlp.trainers.DefaultTrainer(optax.adam(0.1), MLP(0), strategy="fsdp")
    with pytest.raises(TypeError, match="pass an object"):
        mlp.trainers.DefaultTrainer(optax.adam(0.1), MLP(0), strategy=mlp.strategies.DataParallelStrategy)


def _train(directory, strategy, stop_at=None, resume_from=None, seed=0, num_samples=40):
    """Two epochs of batches of 8 (5 of them for 40 samples) with dropout and batch-level checkpoints; the batch
    losses and final weights."""
    classifier, trainer = make(strategy, seed=seed, dropout=0.3)
    features, labels = make_numpy_data(num_samples, 1)
    losses = []

    class Record(mlp.callbacks.Callback):
        def on_batch_training_completed(self, training_batch, logs):
            losses.append(logs["current"]["training"]["batch"]["loss"])
            if logs["current"]["global_iter"] == stop_at:
                self.training_manager.stop_training()

    callbacks = [
        mlp.callbacks.TrainingMetricsLogger(mlp.evaluation.MetricEvaluator(trainer=trainer)),
        Record("Record"),
        mlp.callbacks.CheckpointManager(checkpoints_path=str(directory), metric_to_monitor=None, batch_level=True),
    ]
    data = mlp.data.ResumableArrayBatches((features, labels.astype(np.int32)), 8, seed=3)
    manager = mlp.trainers.TrainingManager(
        trainer, data, num_epochs=2, callbacks=callbacks, resume_from=resume_from, handle_signals=False
    )
    manager.start_training()
    return weights(classifier), losses


def test_a_mesh_checkpoint_resumes_mid_epoch_exactly_and_on_one_device(tmp_path):
    """Stopped inside epoch 0 on the mesh: resumed on the mesh it continues bit-exactly; the same checkpoint resumed
    on one device continues within 1e-6 (the files hold one copy of the replicated state)."""
    straight_weights, straight_losses = _train(tmp_path / "straight", mesh())
    _train(tmp_path / "resumed", mesh(), stop_at=3)
    weights_after, losses = _train(tmp_path / "resumed", mesh(), resume_from="latest", seed=7)
    assert losses == straight_losses[4:]
    assert max_difference(weights_after, straight_weights) == 0.0
    _train(tmp_path / "single", mesh(), stop_at=3)
    single_weights, single_losses = _train(tmp_path / "single", None, resume_from="latest", seed=7)
    np.testing.assert_allclose(single_losses, straight_losses[4:], atol=1e-6)
    assert max_difference(single_weights, straight_weights) <= 1e-6


def test_a_run_resumed_at_a_short_batch_that_the_devices_cannot_split_continues_exactly(tmp_path):
    """38 samples in batches of 8: every epoch ends with a batch of 6, which 4 devices cannot split. Stopped after
    batch 3, the resumed run starts at that batch (the first it places), runs it replicated and continues exactly."""
    straight_weights, straight_losses = _train(tmp_path / "straight", mesh(), num_samples=38)
    _train(tmp_path / "resumed", mesh(), stop_at=3, num_samples=38)
    weights_after, losses = _train(tmp_path / "resumed", mesh(), resume_from="latest", seed=7, num_samples=38)
    assert len(straight_losses) == 10 and losses == straight_losses[4:]
    assert max_difference(weights_after, straight_weights) == 0.0


def test_a_one_device_checkpoint_resumes_on_the_mesh_with_the_state_replicated(tmp_path):
    straight_weights, straight_losses = _train(tmp_path / "straight", None)
    _train(tmp_path / "resumed", None, stop_at=3)
    classifier_weights, losses = _train(tmp_path / "resumed", mesh(), resume_from="latest", seed=7)
    np.testing.assert_allclose(losses, straight_losses[4:], atol=1e-6)
    assert max_difference(classifier_weights, straight_weights) <= 1e-6


def test_set_state_places_the_loaded_state_on_the_mesh():
    classifier, trainer = make(mesh())
    _, other = make(seed=5)
    other.train_on(batches(num_batches=1)[0])
    trainer.set_state(other.get_state())
    for value in [
        classifier.hidden.kernel.get_raw_value(),
        *jax.tree_util.tree_leaves(trainer.optimizer_states.state_tuple()),
    ]:
        assert value.sharding.is_equivalent_to(trainer.strategy.replicated, value.ndim)
    trainer.train_on(batches(num_batches=1, batch_size=8, seed=2)[0])
    assert nnx.state(classifier, nnx.Param)  # still a live module after the step
