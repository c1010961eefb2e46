"""JAX checkpoints: bfloat16 parameters and optimizer states are saved and loaded bit for bit; the nnx.Rngs streams are
captured on the device; variables that checkpoints would not save are refused."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mlpug.jax as mlp
from tests.jax.test_trainer import MLP, ClassificationLoss, assert_weights_close, batches, weights


def _bfloat16_trainer(seed):
    classifier = MLP(seed, param_dtype=jnp.bfloat16)
    trainer = mlp.trainers.DefaultTrainer(optax.adam(0.01, mu_dtype=jnp.bfloat16), classifier)
    trainer.set_training_model(ClassificationLoss(classifier))
    return classifier, trainer


def test_bfloat16_parameters_and_optimizer_states_round_trip_through_checkpoint_files(tmp_path):
    classifier, trainer = _bfloat16_trainer(0)
    data = batches(num_batches=3)
    checkpoints = mlp.callbacks.CheckpointManager(
        checkpoints_path=str(tmp_path), metric_to_monitor=None, batch_level=True
    )
    manager = mlp.trainers.TrainingManager(trainer, data, num_epochs=1, callbacks=[checkpoints], handle_signals=False)
    manager.start_training()
    trained = weights(classifier)
    assert trained["hidden.kernel"].dtype == jnp.bfloat16

    path = next(tmp_path.glob("*-training-checkpoint.safetensors"))
    state = mlp.load_training_checkpoint(str(path))["trainer"]
    loaded = state["model_components"]["model"]
    assert loaded["hidden"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(loaded["hidden"]["kernel"].view(np.uint16), trained["hidden.kernel"].view(np.uint16))
    optimizer_state = trainer.get_state()["optimizers"]["optimizer"]
    assert {str(value.dtype) for value in optimizer_state.values()} == {"bfloat16", "int32"}
    for key, value in state["optimizers"]["optimizer"].items():
        assert value.dtype == optimizer_state[key].dtype, key
        assert value.tobytes() == optimizer_state[key].tobytes(), key  # bit for bit
    model_path = next(tmp_path.glob("*-latest-model-checkpoint.safetensors"))
    model_checkpoint = mlp.load_model_checkpoint(str(model_path))
    assert model_checkpoint["model_components"]["model"]["output"]["bias"].dtype == jnp.bfloat16

    other_classifier, other = _bfloat16_trainer(5)
    other.set_state(state)
    assert_weights_close(weights(other_classifier), trained, atol=0)
    np.testing.assert_array_equal(np.asarray(other.train_on(data[0]).loss), np.asarray(trainer.train_on(data[0]).loss))
    assert_weights_close(weights(other_classifier), weights(classifier), atol=0)


def test_capturing_and_restoring_the_rng_streams_stays_on_the_device(monkeypatch):
    """A batch-level TestMetricsLogger captures and restores the random states around every evaluation: the
    nnx.Rngs streams must not wait for the device there, only when a checkpoint reads them."""
    classifier = MLP(0, dropout=0.5)
    trainer = mlp.trainers.DefaultTrainer(optax.adam(0.01), classifier)
    trainer.set_training_model(ClassificationLoss(classifier))
    (streams,) = [p for p in trainer.random_state_providers() if p.name == "flax_nnx_rngs"]
    data = batches(num_batches=2)
    trainer.train_on(data[0])  # compiled
    before = streams.get_state()
    device_get = jax.device_get

    def no_host_transfer(tree):  # (transfer guards do not see device-to-host copies on CPU)
        raise AssertionError("a host transfer")

    monkeypatch.setattr(jax, "device_get", no_host_transfer)
    trainer.train_on(data[1])  # new stream values
    captured = streams.capture()
    trainer.train_on(data[1])  # draws a dropout mask and donates the variables' buffers
    streams.restore(captured)
    trainer.train_on(data[1])
    streams.restore(captured)  # captured stays valid after donating steps
    monkeypatch.setattr(jax, "device_get", device_get)
    state = streams.to_state(captured)
    assert streams.get_state() == state
    assert state["classifier.dropout.rngs.count"]["data"] == [before["classifier.dropout.rngs.count"]["data"][0] + 1]


def test_variables_outside_the_model_components_that_training_changes_are_refused():
    class NormalisedLoss(ClassificationLoss):
        def __init__(self, classifier):
            super().__init__(classifier)
            self.normalisation = nnx.BatchNorm(6, rngs=nnx.Rngs(0))

        def __call__(self, batch_data, evaluate_settings, inference_mode=None):
            features, labels = batch_data
            return super().__call__((self.normalisation(features), labels), evaluate_settings, inference_mode)

    classifier = MLP(0)
    trainer = mlp.trainers.DefaultTrainer(optax.adam(0.01), classifier)
    training_model = NormalisedLoss(classifier)
    with pytest.raises(ValueError, match=r"variables \['normalisation.mean', 'normalisation.var'\] outside every"):
        trainer.set_training_model(training_model)
    components = {"classifier": classifier, "normalisation": training_model.normalisation}
    trainer = mlp.trainers.DefaultTrainer(optax.adam(0.01), components)
    trainer.set_training_model(training_model)
    trainer.train_on(batches(num_batches=1)[0])
    saved = trainer.get_state()["model_components"]["normalisation"]
    assert set(saved) == {"mean", "var", "scale", "bias"}
    np.testing.assert_array_equal(saved["mean"], np.asarray(training_model.normalisation.mean[...]))
    assert np.any(saved["mean"] != 0)  # the running statistics moved, and are saved
