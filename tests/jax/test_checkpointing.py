"""JAX checkpoint files: bfloat16 parameters and optimizer states are saved and loaded bit for bit."""

import jax.numpy as jnp
import numpy as np
import optax

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
