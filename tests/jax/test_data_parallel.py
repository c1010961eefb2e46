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


def test_a_batch_that_does_not_divide_by_the_device_count_raises_at_the_first_batch():
    classifier, trainer = make(mesh())
    before = weights(classifier)
    features, labels = batches(num_batches=1, batch_size=10)[0]
    with pytest.raises(ValueError, match=r"batch\[0\] has 10 samples .*shape \(10, 6\).* over the 4 devices"):
        trainer.train_on((features, labels))
    with pytest.raises(ValueError, match="has 10 samples"):
        trainer.evaluate_loss((features, labels))
    assert max_difference(weights(classifier), before) == 0.0


def test_a_short_last_batch_after_full_batches_runs_replicated_and_equals_one_device():
    """Batches of 8 then one of 6 (which 4 devices cannot split): the short one runs on every device whole; a batch
    of 10 after it is refused (larger than before: a batch size that does not fit the mesh)."""
    features, labels = batches(num_batches=1, batch_size=30)[0]
    data = [(features[:8], labels[:8]), (features[8:16], labels[8:16]), (features[16:22], labels[16:22])]
    one_classifier, one_device = make()
    mesh_classifier, on_mesh = make(mesh())
    for batch in data:
        one_device.train_on(batch)
        on_mesh.train_on(batch)
    assert max_difference(weights(one_classifier), weights(mesh_classifier)) <= 1e-6
    placed = on_mesh.strategy.place_batch(data[2])
    assert placed[0].sharding.is_fully_replicated
    with pytest.raises(ValueError, match="has 10 samples"):
        on_mesh.train_on((features[:10], labels[:10]))


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


def _train(directory, strategy, stop_at=None, resume_from=None, seed=0):
    """Two epochs of 5 batches of 8 with dropout and batch-level checkpoints; the batch losses and final weights."""
    classifier, trainer = make(strategy, seed=seed, dropout=0.3)
    features, labels = make_numpy_data(40, 1)
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
