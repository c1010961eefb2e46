"""The JAX DefaultTrainer: training, parity with a hand-written optax loop, accumulation, clipping, the skipped step,
state and checkpoints, the learning rate, bfloat16, donated buffers, numbers in batches, variables created in the
forward pass and bad arguments."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mlpug.jax as mlp
from mlpug.random_state import get_random_states, set_random_states
from tests.contract.backends import make_numpy_data


class MLP(nnx.Module):
    """6 features -> 16 hidden (ReLU, optional dropout) -> 3 logits."""

    def __init__(self, seed=0, dropout=0.0, param_dtype=jnp.float32):
        rngs = nnx.Rngs(params=seed, dropout=seed + 1)
        self.hidden = nnx.Linear(6, 16, param_dtype=param_dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.output = nnx.Linear(16, 3, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, features):
        return self.output(self.dropout(nnx.relu(self.hidden(features))))


class ClassificationLoss(nnx.Module):
    def __init__(self, classifier):
        self.classifier = classifier

    def __call__(self, batch_data, evaluate_settings, inference_mode=None):
        features, labels = batch_data
        logits = self.classifier(features)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return {"loss": loss, "auxiliary_results": logits}


def cross_entropy(classifier, batch):
    features, labels = batch
    return optax.softmax_cross_entropy_with_integer_labels(classifier(features), labels).mean()


def batches(num_batches=4, batch_size=8, seed=0):
    features, labels = make_numpy_data(num_batches * batch_size, seed)
    labels = labels.astype(np.int32)
    return [
        (features[i : i + batch_size], labels[i : i + batch_size])
        for i in range(0, num_batches * batch_size, batch_size)
    ]


def make(optimizer=None, seed=0, dropout=0.0, **kwargs):
    classifier = MLP(seed, dropout)
    trainer = mlp.trainers.DefaultTrainer(optimizer or optax.adam(0.01), classifier, **kwargs)
    trainer.set_training_model(ClassificationLoss(classifier))
    return classifier, trainer


def weights(classifier):
    """The classifier's parameters as NumPy copies, by path."""
    return {
        ".".join(map(str, path)): np.array(variable[...])
        for path, variable in nnx.to_flat_state(nnx.state(classifier, nnx.Param))
    }


def assert_weights_close(first, second, atol):
    assert first.keys() == second.keys()
    for name in first:
        np.testing.assert_allclose(first[name], second[name], rtol=0, atol=atol, err_msg=name)


def test_a_classifier_trains_and_its_loss_falls():
    classifier, trainer = make()
    data = batches(num_batches=4)
    first = [float(trainer.train_on(batch).loss) for batch in data]
    for _ in range(10):
        last = [float(trainer.train_on(batch).loss) for batch in data]
    assert np.mean(last) < 0.5 * np.mean(first)
    result = trainer.train_on(data[0])
    assert isinstance(result.loss, jax.Array) and result.loss.shape == ()
    assert result.num_samples == 8 and isinstance(result.num_samples, int)
    assert result.auxiliary_results.shape == (8, 3) and result.optimizer_step_skipped is False
    assert result.learning_rate is None  # optax.adam, not made with optax.inject_hyperparams


def test_the_classifier_predicts_with_the_trained_weights():
    classifier, trainer = make()
    before = weights(classifier)
    data = batches()
    manager = mlp.trainers.TrainingManager(trainer, data, num_epochs=2, callbacks=[], handle_signals=False)
    manager.start_training()
    trained = weights(classifier)
    assert not np.allclose(trained["hidden.kernel"], before["hidden.kernel"])
    features = data[0][0]
    hidden = np.maximum(features @ trained["hidden.kernel"] + trained["hidden.bias"], 0.0)
    expected = hidden @ trained["output.kernel"] + trained["output.bias"]
    np.testing.assert_allclose(np.asarray(classifier(jnp.asarray(features))), expected, rtol=1e-5, atol=1e-5)
    state = trainer.get_state()["model_components"]["model"]
    assert np.array_equal(state["hidden"]["kernel"], trained["hidden.kernel"])
    outputs = trainer.evaluate_loss(data[0])
    np.testing.assert_allclose(np.asarray(outputs.auxiliary_results), expected, rtol=1e-5, atol=1e-5)


def test_each_step_is_bit_identical_to_a_hand_written_jit_loop():
    transformation = optax.adam(0.01)
    classifier, trainer = make(transformation)
    reference = MLP(0)
    graphdef, params, rest = nnx.split(reference, nnx.Param, ...)
    opt_state = transformation.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        def loss_function(params):
            return cross_entropy(nnx.merge(graphdef, params, rest), batch)

        loss, gradients = jax.value_and_grad(loss_function)(params)
        updates, opt_state = transformation.update(gradients, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    for batch in batches(num_batches=4) * 2:
        params, opt_state, expected_loss = step(params, opt_state, batch)
        loss = trainer.train_on(batch).loss
        assert float(loss) == float(expected_loss)  # bit-identical: the same computation, compiled the same way
        nnx.update(reference, params)
        assert_weights_close(weights(classifier), weights(reference), atol=0)


def test_chunked_accumulation_equals_the_whole_batch():
    whole_classifier, whole = make(optax.sgd(0.5))
    chunked_classifier, chunked = make(optax.sgd(0.5), batch_chunk_size=4)
    assert chunked.batch_chunk_size == 4
    (batch,) = batches(num_batches=1, batch_size=10)  # chunks of 4, 4 and 2 samples
    for _ in range(3):
        expected, result = whole.train_on(batch), chunked.train_on(batch)
        np.testing.assert_allclose(float(result.loss), float(expected.loss), rtol=0, atol=1e-5)
        assert result.num_samples == 10 and result.auxiliary_results.shape == (10, 3)
        np.testing.assert_allclose(result.auxiliary_results, expected.auxiliary_results, rtol=0, atol=1e-5)
    assert_weights_close(weights(chunked_classifier), weights(whole_classifier), atol=1e-5)


def _chunked_with_traces(unrolled):
    """A dropout classifier trained with batch_chunk_size=4, counting the traces of its training forward pass;
    ``unrolled``: the chunks one after the other while tracing (the neutral rule), the reference of the scan."""
    classifier = MLP(0, dropout=0.3)
    traces = {"train": 0}

    class Counting(ClassificationLoss):
        def __call__(self, batch_data, evaluate_settings, inference_mode=None):
            traces["train"] += 1
            return super().__call__(batch_data, evaluate_settings, inference_mode)

    trainer = mlp.trainers.DefaultTrainer(optax.adam(0.05), classifier, batch_chunk_size=4)
    trainer.set_training_model(Counting(classifier))
    if unrolled:
        chunking = trainer.chunking
        chunking.run_carrying = lambda step, batch, carry, like: chunking._run_unrolled(step, batch, carry)
    return classifier, trainer, traces


@pytest.mark.parametrize("batch_size", [10, 8, 3], ids=["4+4+2", "4+4", "3"])
def test_accumulation_scans_the_chunks_and_gives_the_numbers_of_chunk_after_chunk(batch_size):
    """The equal chunks are one lax.scan (traced once, whatever their number), the remainder chunk another pass; the
    dropout streams advance chunk after chunk as when the chunks are unrolled; the results agree with the unrolled
    chunks to the last bits (XLA may fuse a multiply-add of the loss sum into one rounding in one of them)."""
    runs = []
    for unrolled in (False, True):
        classifier, trainer, traces = _chunked_with_traces(unrolled)
        results = [trainer.train_on(batch) for batch in batches(num_batches=3, batch_size=batch_size) * 2]
        random_state = get_random_states(trainer.random_state_providers())["flax_nnx_rngs"]
        runs.append((results, weights(classifier), random_state, traces["train"]))
    (scanned, scanned_weights, scanned_random, scanned_traces), (unrolled, unrolled_weights, unrolled_random, _) = runs
    assert scanned_traces == {10: 2, 8: 1, 3: 1}[batch_size]  # the scan body (and the remainder chunk)
    assert scanned_random == unrolled_random  # one dropout draw per chunk, in order
    for result, expected in zip(scanned, unrolled):
        assert result.num_samples == batch_size and result.auxiliary_results.shape == (batch_size, 3)
        np.testing.assert_allclose(np.asarray(result.loss), np.asarray(expected.loss), rtol=3e-7, atol=0)
        np.testing.assert_allclose(result.auxiliary_results, expected.auxiliary_results, rtol=0, atol=1e-6)
    assert_weights_close(scanned_weights, unrolled_weights, atol=1e-6)


def test_accumulated_auxiliary_results_are_merged_by_the_neutral_rule():
    """Arrays along the samples are concatenated over the chunks, 0-d arrays stacked (one entry per chunk), other
    values kept once; a value that is not an array and differs between chunks is refused by name."""
    classifier = MLP(0)

    class WithAuxiliaries(nnx.Module):
        def __init__(self):
            self.classifier = classifier

        def __call__(self, batch_data, evaluate_settings, inference_mode=None):
            features, labels = batch_data
            logits = self.classifier(features)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            tag = f"rows={features.shape[0]}" if evaluate_settings == "by rows" else "same"
            return {"loss": loss, "auxiliary_results": {"logits": logits, "first": features[0, 0], "tag": tag}}

    trainer = mlp.trainers.DefaultTrainer(optax.sgd(0.0), classifier, batch_chunk_size=4)
    trainer.set_training_model(WithAuxiliaries())
    (batch,) = batches(num_batches=1, batch_size=10)  # chunks of 4, 4 and 2 samples
    result = trainer.train_on(batch)
    features = batch[0]
    assert result.auxiliary_results["tag"] == "same" and result.num_samples == 10
    np.testing.assert_array_equal(np.asarray(result.auxiliary_results["first"]), features[[0, 4, 8], 0])
    expected_logits = trainer.evaluate_loss(batch, inference_mode=False).auxiliary_results["logits"]
    np.testing.assert_allclose(np.asarray(result.auxiliary_results["logits"]), expected_logits, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="different auxiliary_results.*rows=4.*rows=2"):
        trainer.train_on(batch, "by rows")


def _update(before, after):
    return {name: after[name] - before[name] for name in before}


def test_clipping_by_norm_and_by_value_is_applied():
    (batch,) = batches(num_batches=1)
    plain_classifier, plain = make(optax.sgd(1.0))
    before = weights(plain_classifier)
    plain.train_on(batch)
    unclipped = _update(before, weights(plain_classifier))
    norm = np.sqrt(sum(np.sum(update**2) for update in unclipped.values()))
    assert norm > 0.1

    clipped_classifier, clipped = make(optax.sgd(1.0), clip_gradients_norm=0.05)
    clipped.train_on(batch)
    update = _update(before, weights(clipped_classifier))
    assert np.sqrt(sum(np.sum(u**2) for u in update.values())) == pytest.approx(0.05, rel=1e-4)
    for name in update:  # the same direction, scaled
        np.testing.assert_allclose(update[name], unclipped[name] * 0.05 / norm, rtol=0, atol=1e-6)

    value_classifier, by_value = make(optax.sgd(1.0), clip_gradients_value=0.01)
    by_value.train_on(batch)
    update = _update(before, weights(value_classifier))
    assert max(np.abs(u).max() for u in update.values()) == pytest.approx(0.01, rel=1e-5)
    assert max(np.abs(u).max() for u in unclipped.values()) > 0.02


def test_skip_step_keeps_the_weights_and_optimizer_state_on_a_nan_batch():
    classifier, trainer = make()
    data = batches()
    trainer.train_on(data[0])
    trainer.skip_non_finite_steps = True
    before, optimizer_before = weights(classifier), trainer.get_state()["optimizers"]
    nan_batch = (np.full_like(data[1][0], np.nan), data[1][1])
    result = trainer.train_on(nan_batch)
    assert not np.isfinite(float(result.loss))
    assert isinstance(result.optimizer_step_skipped, jax.Array) and bool(result.optimizer_step_skipped)
    assert_weights_close(weights(classifier), before, atol=0)
    after = trainer.get_state()["optimizers"]["optimizer"]
    assert all(np.array_equal(after[key], optimizer_before["optimizer"][key]) for key in after)
    assert trainer.non_finite_weights() == []
    result = trainer.train_on(data[1])
    assert not bool(result.optimizer_step_skipped)
    assert not np.array_equal(weights(classifier)["hidden.kernel"], before["hidden.kernel"])


def test_without_skip_step_a_nan_batch_makes_the_weights_non_finite():
    classifier, trainer = make()
    data = batches()
    trainer.train_on((np.full_like(data[0][0], np.nan), data[0][1]))
    assert trainer.non_finite_indices([trainer.train_on(data[1]).loss, 1.0]) == [0]
    # relu passes no gradient at NaN: the hidden bias stays finite, the kernel (NaN features times 0) does not
    assert trainer.non_finite_weights() == [
        "model.hidden.kernel",
        "model.output.bias",
        "model.output.kernel",
    ]


def test_get_state_and_set_state_round_trip():
    classifier, trainer = make()
    data = batches()
    trainer.train_on(data[0])
    state = trainer.get_state()
    assert set(state) == {"model_components", "optimizers"}
    assert set(state["model_components"]["model"]) == {"hidden", "output"}  # no nnx.Rngs keys or counts
    assert all(isinstance(leaf, np.ndarray) for leaf in state["optimizers"]["optimizer"].values())
    expected_weights = weights(classifier)
    for batch in data:
        trainer.train_on(batch)
    trainer.set_state(state)
    assert_weights_close(weights(classifier), expected_weights, atol=0)
    again = trainer.get_state()
    for key, value in state["optimizers"]["optimizer"].items():
        assert np.array_equal(again["optimizers"]["optimizer"][key], value), key
    # the restored state continues like the original one
    continued = trainer.train_on(data[1]).loss
    loaded = weights(classifier)
    other_classifier, other = make(seed=5)
    other.set_state(state)
    np.testing.assert_array_equal(np.asarray(other.train_on(data[1]).loss), np.asarray(continued))

    with pytest.raises(ValueError, match=r"model_components in state \['other'\] do not match"):
        trainer.set_state({**state, "model_components": {"other": state["model_components"]["model"]}})
    bad = {"hidden": {"kernel": np.zeros((6, 4), np.float32), "bias": np.zeros(16, np.float32)}}
    bad["output"] = state["model_components"]["model"]["output"]
    with pytest.raises(ValueError, match=r"hidden.kernel has shape \(6, 4\), the variable \(6, 16\)"):
        trainer.set_state({**state, "model_components": {"model": bad}})
    missing = {key: value for key, value in state["optimizers"]["optimizer"].items() if "nu" not in key}
    with pytest.raises(ValueError, match="state of optimizer 'optimizer'"):
        trainer.set_state({**state, "optimizers": {"optimizer": missing}})
    assert_weights_close(weights(classifier), loaded, atol=0)  # nothing loaded by the failed calls


def _train_with_checkpoints(directory, stop_at=None, resume_from=None, seed=0):
    classifier, trainer = make(seed=seed, dropout=0.3)
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


def test_a_training_checkpoint_resumes_mid_epoch_bit_exactly(tmp_path):
    """Dropout draws from the model's nnx.Rngs: their keys and counts are in the checkpoint's random states."""
    straight_weights, straight_losses = _train_with_checkpoints(tmp_path / "straight")
    _train_with_checkpoints(tmp_path / "resumed", stop_at=3)  # 5 batches per epoch: stopped inside epoch 0
    weights_after, losses = _train_with_checkpoints(tmp_path / "resumed", resume_from="latest", seed=7)
    assert losses == straight_losses[4:]
    assert_weights_close(weights_after, straight_weights, atol=0)
    path = next((tmp_path / "resumed").glob("*-training-checkpoint.safetensors"))
    checkpoint = mlp.load_training_checkpoint(str(path))
    assert checkpoint["mlpug"]["backend"] == "jax"
    assert set(checkpoint["random"]) == {"python", "numpy", "flax_nnx_rngs"}
    assert set(checkpoint["random"]["flax_nnx_rngs"]) == {
        "classifier.dropout.rngs.count",
        "classifier.dropout.rngs.key",
    }


def test_the_rng_streams_are_a_random_state_provider():
    classifier, trainer = make(dropout=0.5)
    (batch,) = batches(num_batches=1)
    providers = trainer.random_state_providers()
    state = get_random_states(providers)
    first = trainer.evaluate_loss(batch, inference_mode=False).auxiliary_results  # train() mode: dropout
    trainer.train_on(batch)  # draws a mask: the count moves
    assert get_random_states(providers)["flax_nnx_rngs"] != state["flax_nnx_rngs"]
    set_random_states(providers, state)
    assert get_random_states(providers)["flax_nnx_rngs"] == state["flax_nnx_rngs"]
    assert first.shape == (8, 3)


def test_evaluation_runs_in_eval_mode_and_leaves_the_modules_as_they_are():
    classifier, trainer = make(dropout=0.5)
    (batch,) = batches(num_batches=1)
    providers = trainer.random_state_providers()
    random_state = get_random_states(providers)
    first = trainer.evaluate_loss(batch).auxiliary_results
    second = trainer.evaluate_loss(batch).auxiliary_results
    assert np.array_equal(first, second)  # no dropout in inference mode
    classifier.eval()
    np.testing.assert_allclose(first, classifier(jnp.asarray(batch[0])), rtol=1e-6, atol=1e-6)
    classifier.train()
    training_mode = trainer.evaluate_loss(batch, inference_mode=False).auxiliary_results
    assert not np.allclose(training_mode, first)  # dropout in train() mode
    assert get_random_states(providers) == random_state  # evaluation draws but changes no stream
    trainer.train_on(batch)
    assert classifier.dropout.deterministic is False  # the live module's mode is the user's


def test_the_learning_rate_of_inject_hyperparams_is_read_set_and_used():
    classifier, trainer = make(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1))
    assert trainer.get_learning_rate() == pytest.approx(0.1)
    trainer.set_learning_rate(0.5)
    assert trainer.get_learning_rate("optimizer") == pytest.approx(0.5)
    (batch,) = batches(num_batches=1)
    gradients = nnx.grad(lambda model: cross_entropy(model, batch))(classifier)
    before = weights(classifier)
    result = trainer.train_on(batch)
    assert float(result.learning_rate) == pytest.approx(0.5)
    expected = before["hidden.kernel"] - 0.5 * np.asarray(gradients["hidden"]["kernel"][...])
    np.testing.assert_allclose(weights(classifier)["hidden.kernel"], expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="optimizer_name 'other' unknown"):
        trainer.set_learning_rate(0.1, "other")


def test_without_inject_hyperparams_there_is_no_learning_rate_to_set():
    _, trainer = make(optax.adam(0.01))
    assert trainer.get_learning_rate() is None
    with pytest.raises(TypeError, match=r"make it with optax.inject_hyperparams"):
        trainer.set_learning_rate(0.1)
    _, scheduled = make(optax.inject_hyperparams(optax.sgd)(learning_rate=optax.linear_schedule(0.1, 0.0, 10)))
    with pytest.raises(TypeError, match="learning rate schedule"):
        scheduled.set_learning_rate(0.1)


def test_bfloat16_runs_the_forward_pass_in_bfloat16_and_keeps_float32_weights():
    classifier, trainer = make(use_mixed_precision=True)
    assert trainer.precision.autocast_dtype == "bfloat16"
    data = batches()
    first = [float(trainer.train_on(batch).loss) for batch in data]
    for _ in range(10):
        result = [trainer.train_on(batch) for batch in data]
    assert result[0].auxiliary_results.dtype == jnp.bfloat16
    assert np.mean([float(r.loss) for r in result]) < 0.6 * np.mean(first)
    assert all(value.dtype == np.float32 for value in weights(classifier).values())
    state = trainer.get_state()["optimizers"]["optimizer"]
    assert all(value.dtype in (np.float32, np.int32) for value in state.values())


def test_several_optimizers_train_the_model_component_of_their_name():
    first, second = MLP(0), MLP(1)

    class TwoModels(nnx.Module):
        def __init__(self):
            self.first, self.second = first, second

        def __call__(self, batch_data, evaluate_settings, inference_mode=None):
            return cross_entropy(self.first, batch_data) + cross_entropy(self.second, batch_data)

    trainer = mlp.trainers.DefaultTrainer(
        {"first": optax.sgd(0.1), "second": optax.sgd(0.0)}, {"first": first, "second": second}
    )
    trainer.set_training_model(TwoModels())
    before_first, before_second = weights(first), weights(second)
    trainer.train_on(batches(num_batches=1)[0])
    assert not np.array_equal(weights(first)["hidden.kernel"], before_first["hidden.kernel"])
    assert_weights_close(weights(second), before_second, atol=0)  # learning rate 0
    assert set(trainer.get_state()["optimizers"]) == {"first", "second"}


class VectorLoss(nnx.Module):
    def __init__(self, classifier):
        self.classifier = classifier

    def __call__(self, batch_data, evaluate_settings, inference_mode=None):
        features, labels = batch_data
        return optax.softmax_cross_entropy_with_integer_labels(self.classifier(features), labels)


def test_bad_arguments_raise_clear_errors():
    classifier = MLP(0)
    with pytest.raises(TypeError, match="optax.*GradientTransformation"):
        mlp.trainers.DefaultTrainer(object(), classifier)
    with pytest.raises(TypeError, match="flax.nnx.*Module"):
        mlp.trainers.DefaultTrainer(optax.adam(0.1), object())
    with pytest.raises(ValueError, match="float16.*loss scaling"):
        mlp.trainers.DefaultTrainer(optax.adam(0.1), classifier, use_mixed_precision=True, autocast_dtype="float16")
    with pytest.raises(ValueError, match="no effect without use_mixed_precision"):
        mlp.trainers.DefaultTrainer(optax.adam(0.1), classifier, autocast_dtype="bfloat16")
    with pytest.raises(ValueError, match="data parallel training on JAX"):
        mlp.trainers.DefaultTrainer(optax.adam(0.1), classifier, strategy="ddp")
    with pytest.raises(ValueError, match="not both"):
        mlp.trainers.DefaultTrainer(optax.adam(0.1), classifier, clip_gradients_norm=1.0, clip_gradients_value=1.0)
    with pytest.raises(ValueError, match="batch_chunk_size must be None"):
        mlp.trainers.DefaultTrainer(optax.adam(0.1), classifier, batch_chunk_size=0)
    with pytest.raises(ValueError, match="named like|each updates the model component of its name"):
        mlp.trainers.DefaultTrainer([optax.adam(0.1), optax.adam(0.1)], classifier)
    trainer = mlp.trainers.DefaultTrainer(optax.adam(0.1), classifier)
    with pytest.raises(RuntimeError, match="no training model"):
        trainer.train_on(batches(num_batches=1)[0])
    with pytest.raises(TypeError, match="training_model must be a flax.nnx.Module"):
        trainer.set_training_model(lambda batch, settings: 0.0)
    with pytest.raises(ValueError, match="not part of the training model"):
        trainer.set_training_model(ClassificationLoss(MLP(1)))
    trainer.set_training_model(VectorLoss(classifier))
    with pytest.raises(TypeError, match="must be reduced to its mean over the batch"):
        trainer.train_on(batches(num_batches=1)[0])
    with pytest.raises(TypeError, match=r"the batch\[2\] is a builtins.set, which is neither an array nor hashable"):
        trainer.train_on((*batches(num_batches=1)[0], {1, 2}))


def test_values_that_are_no_arrays_travel_as_constants():
    classifier = MLP(0)

    class Tagged(nnx.Module):
        def __init__(self):
            self.classifier = classifier

        def __call__(self, batch_data, evaluate_settings, inference_mode=None):
            features, labels = batch_data
            loss = cross_entropy(self.classifier, (features, labels)) * evaluate_settings["scale"]
            return loss, 8, {"tag": evaluate_settings["tag"], "logits": self.classifier(features)}

    trainer = mlp.trainers.DefaultTrainer(optax.adam(0.1), classifier)
    trainer.set_training_model(Tagged())
    result = trainer.train_on(batches(num_batches=1)[0], {"scale": 2.0, "tag": "x"})
    assert result.num_samples == 8 and result.auxiliary_results["tag"] == "x"
    outputs = trainer.evaluate_loss(batches(num_batches=1)[0], {"scale": 0.0, "tag": "y"})
    assert float(outputs.loss) == 0.0 and outputs.auxiliary_results["tag"] == "y"


def test_one_process_training_is_refused_while_several_jax_processes_run(monkeypatch):
    classifier = MLP(0)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match=r"one process, but jax.process_count\(\) is 2: .*leave strategy out"):
        mlp.trainers.DefaultTrainer(optax.adam(0.1), classifier, strategy="single_process")


def test_arrays_the_user_holds_stay_valid_and_unchanged_after_donating_steps():
    pretrained = jnp.arange(3, dtype=jnp.float32)

    class WithOffset(nnx.Module):
        def __init__(self):
            self.classifier = MLP(0)
            self.offset = nnx.Param(pretrained)  # an array the user still holds

        def __call__(self, features):
            return self.classifier(features) + self.offset[...]

    model = WithOffset()
    held_kernel = model.classifier.hidden.kernel[...]
    initial = nnx.clone(model)  # shares the arrays
    state_before = nnx.to_pure_dict(nnx.state(model, nnx.Param))  # the arrays themselves
    before = weights(model)
    trainer = mlp.trainers.DefaultTrainer(optax.adam(0.05), model)
    trainer.set_training_model(ClassificationLoss(model))
    for batch in batches():
        trainer.train_on(batch)
    trained = weights(model)
    assert not np.allclose(trained["classifier.hidden.kernel"], before["classifier.hidden.kernel"])
    assert not np.allclose(trained["offset"], before["offset"])
    np.testing.assert_array_equal(np.asarray(held_kernel), before["classifier.hidden.kernel"])
    np.testing.assert_array_equal(np.asarray(pretrained), np.arange(3, dtype=np.float32))
    assert_weights_close(weights(initial), before, atol=0)
    held_state = {
        "classifier.hidden.kernel": state_before["classifier"]["hidden"]["kernel"],
        "offset": state_before["offset"],
    }
    assert_weights_close(held_state, {name: before[name] for name in held_state}, atol=0)


def test_python_numbers_in_a_batch_are_traced_so_the_step_compiles_once():
    classifier = MLP(0)
    traces = {"train": 0, "evaluate": 0}

    class WithLengths(nnx.Module):
        def __init__(self):
            self.classifier = classifier

        def __call__(self, batch_data, evaluate_settings, inference_mode=None):
            traces["evaluate" if inference_mode else "train"] += 1  # runs only while a step is traced
            loss = cross_entropy(self.classifier, (batch_data["features"], batch_data["labels"]))
            total = sum(batch_data["lengths"]) * batch_data["scale"] * jnp.where(batch_data["positive"], 1.0, -1.0)
            return {"loss": loss, "auxiliary_results": {"total": total, "name": batch_data["name"]}}

    trainer = mlp.trainers.DefaultTrainer(optax.adam(0.1), classifier)
    trainer.set_training_model(WithLengths())
    first, second = batches(num_batches=2)  # ("features", the first key as written, counts the samples)
    numbers = [([3, 5, 2], 0.5, True), ([1, 1, 4], 2.0, False)]
    for (features, labels), (lengths, factor, flag) in zip([first, second], numbers):
        batch = {"features": features, "labels": labels, "lengths": lengths, "scale": factor, "positive": flag}
        result = trainer.train_on({**batch, "name": "a"})
        expected = sum(lengths) * factor * (1.0 if flag else -1.0)
        assert float(result.auxiliary_results["total"]) == pytest.approx(expected)
        assert result.auxiliary_results["name"] == "a"  # a string stays a constant
        evaluated = trainer.evaluate_loss({**batch, "name": "a"})
        assert float(evaluated.auxiliary_results["total"]) == pytest.approx(expected)
    assert traces == {"train": 1, "evaluate": 1}
    trainer.train_on({**batch, "name": "b"})  # another constant: traced again
    assert traces == {"train": 2, "evaluate": 1}


def test_a_forward_pass_that_creates_a_variable_is_refused_by_name():
    classifier = MLP(0)

    class CreatesAVariable(nnx.Module):
        def __init__(self):
            self.classifier = classifier

        def __call__(self, batch_data, evaluate_settings, inference_mode=None):
            self.calls = nnx.BatchStat(jnp.zeros(()))  # should be created in __init__
            return cross_entropy(self.classifier, batch_data)

    trainer = mlp.trainers.DefaultTrainer(optax.adam(0.1), classifier)
    trainer.set_training_model(CreatesAVariable())
    before = weights(classifier)
    with pytest.raises(ValueError, match=r"forward pass created the variables \['calls'\].*Create every variable in "):
        trainer.train_on(batches(num_batches=1)[0])
    assert_weights_close(weights(classifier), before, atol=0)


def test_metrics_use_jax_numpy():
    logits = jnp.asarray([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.3, 0.3, 0.4]])
    labels = np.asarray([1, 2, 2])
    inputs = mlp.evaluation.MetricInputs((None, labels), 0.0, 3, logits)
    assert float(mlp.metrics.accuracy(inputs)) == pytest.approx(2 / 3)
    assert float(mlp.metrics.top_k_accuracy(2)(inputs)) == pytest.approx(1.0)


def test_import_mlpug_jax_imports_neither_torch_nor_tensorflow():
    code = "import sys, mlpug.jax\nprint(sorted(m for m in ('torch', 'tensorflow', 'keras') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# ----- review fixes of the core: precision, lazy optimizer states, modes, dict order -----


class Regression(nnx.Module):
    """6 features -> 1 prediction, weights zero (the prediction is 0, the loss the mean of the squared targets)."""

    def __init__(self):
        self.linear = nnx.Linear(6, 1, kernel_init=nnx.initializers.zeros, rngs=nnx.Rngs(0))


class SquaredError(nnx.Module):
    """Records the dtypes the model sees (while the step is traced)."""

    def __init__(self, model, seen):
        self.model, self.seen = model, seen

    def __call__(self, batch_data, evaluate_settings, inference_mode=None):
        features, targets = batch_data["features"], batch_data["targets"]
        self.seen.append((features.dtype, targets.dtype))
        predictions = self.model.linear(features)[:, 0].astype(jnp.float32)
        return jnp.mean((predictions - targets) ** 2)


def test_bfloat16_casts_the_inputs_but_not_the_targets_and_returns_a_float32_loss():
    targets = (1000.0 + 0.37 * np.arange(8)).astype(np.float32)  # bfloat16 rounds these to multiples of 4
    features = make_numpy_data(8, 0)[0]
    expected = float(np.mean(targets.astype(np.float64) ** 2))
    for batch, autocast_inputs in [
        ({"features": features, "targets": targets}, None),  # the first part, as written
        ({"targets": targets, "features": features}, ["['features']"]),
    ]:
        seen = []
        model = Regression()
        trainer = mlp.trainers.DefaultTrainer(
            optax.sgd(0.0), model, use_mixed_precision=True, autocast_inputs=autocast_inputs
        )
        trainer.set_training_model(SquaredError(model, seen))
        result, evaluated = trainer.train_on(batch), trainer.evaluate_loss(batch)
        assert seen == [(jnp.bfloat16, jnp.float32)] * 2  # the forward pass in bfloat16, the targets float32
        for loss in (result.loss, evaluated.loss):
            assert loss.dtype == jnp.float32
            assert float(loss) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match=r"autocast_inputs names \"\['image'\]\", which is no part of the batch"):
        trainer = mlp.trainers.DefaultTrainer(
            optax.sgd(0.0), model, use_mixed_precision=True, autocast_inputs=["['image']"]
        )
        trainer.set_training_model(SquaredError(model, []))
        trainer.train_on({"features": features, "targets": targets})
    with pytest.raises(ValueError, match="has no effect without use_mixed_precision"):
        mlp.trainers.DefaultTrainer(optax.sgd(0.0), model, autocast_inputs=["[0]"])
    with pytest.raises(ValueError, match="'features', which is not a key path of the batch"):
        mlp.trainers.DefaultTrainer(optax.sgd(0.0), model, use_mixed_precision=True, autocast_inputs=["features"])


def test_the_bfloat16_loss_of_a_bfloat16_model_comes_back_as_float32():
    classifier, trainer = make(use_mixed_precision=True)
    batch = batches(num_batches=1)[0]
    result, evaluated = trainer.train_on(batch), trainer.evaluate_loss(batch)
    assert result.loss.dtype == jnp.float32 and evaluated.loss.dtype == jnp.float32
    assert result.auxiliary_results.dtype == jnp.bfloat16  # what the model returned


@pytest.mark.parametrize("loaded", ["before set_training_model", "after set_training_model"])
def test_the_optimizer_state_is_made_from_weights_loaded_after_the_trainer(loaded):
    """schedule_free_sgd keeps a copy of the parameters in its state: made at construction, it would hold the
    weights the modules had then."""
    transformation = optax.contrib.schedule_free_sgd(0.1)
    classifier, pretrained = MLP(0), MLP(3)
    trainer = mlp.trainers.DefaultTrainer(transformation, classifier)
    assert trainer.get_state()["optimizers"]["optimizer"]  # get_state before the first step
    if loaded == "after set_training_model":
        trainer.set_training_model(ClassificationLoss(classifier))
    nnx.update(classifier, nnx.state(pretrained))
    if loaded == "before set_training_model":
        trainer.set_training_model(ClassificationLoss(classifier))

    graphdef, params, rest = nnx.split(pretrained, nnx.Param, ...)
    opt_state = transformation.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        loss, gradients = jax.value_and_grad(lambda p: cross_entropy(nnx.merge(graphdef, p, rest), batch))(params)
        updates, opt_state = transformation.update(gradients, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    for batch in batches(num_batches=3):
        params, opt_state, expected_loss = step(params, opt_state, batch)
        np.testing.assert_allclose(float(trainer.train_on(batch).loss), float(expected_loss), rtol=0, atol=1e-6)
    nnx.update(pretrained, params)
    assert_weights_close(weights(classifier), weights(pretrained), atol=1e-6)
    nnx.update(classifier, nnx.state(MLP(4)))  # after the first step the state is the trainer's: not made again
    z = trainer.get_state()["optimizers"]["optimizer"][".z[0]"]  # hidden.bias, the first parameter
    np.testing.assert_allclose(z, np.asarray(opt_state.z["hidden"]["bias"][...]), rtol=0, atol=1e-6)


def test_the_modes_are_the_trainers_and_static_attributes_are_read_at_set_training_model():
    classifier, trainer = make(dropout=0.5)
    (batch,) = batches(num_batches=1)
    classifier.eval()  # e.g. to predict between epochs: training still runs in train() mode
    inference = np.asarray(trainer.evaluate_loss(batch).auxiliary_results)
    assert not np.allclose(trainer.evaluate_loss(batch, inference_mode=False).auxiliary_results, inference)
    classifier.train()
    assert np.array_equal(trainer.evaluate_loss(batch).auxiliary_results, inference)  # eval() mode
    assert classifier.dropout.deterministic is False  # the live modes are the user's

    classifier.dropout.rate = 0.0  # a static attribute: seen once set_training_model is called again
    assert not np.allclose(trainer.evaluate_loss(batch, inference_mode=False).auxiliary_results, inference)
    state = trainer.get_state()
    trainer.set_training_model(ClassificationLoss(classifier))
    np.testing.assert_allclose(trainer.evaluate_loss(batch, inference_mode=False).auxiliary_results, inference)
    again = trainer.get_state()
    saved = state["optimizers"]["optimizer"]
    assert all(np.array_equal(again["optimizers"]["optimizer"][key], value) for key, value in saved.items())


def test_a_training_model_that_overrides_train_keeps_a_module_in_eval_mode():
    class Normalised(nnx.Module):
        def __init__(self):
            self.norm = nnx.BatchNorm(6, rngs=nnx.Rngs(0))
            self.classifier = MLP(0)

        def __call__(self, features):
            return self.classifier(self.norm(features))

    class FrozenNormalisation(ClassificationLoss):
        def train(self, **attributes):
            super().train(**attributes)
            self.classifier.norm.eval()

    for training_model, changes in [(ClassificationLoss, True), (FrozenNormalisation, False)]:
        model = Normalised()
        trainer = mlp.trainers.DefaultTrainer(optax.sgd(0.1), model)
        trainer.set_training_model(training_model(model))
        before = np.array(model.norm.mean[...])
        trainer.train_on(batches(num_batches=1)[0])
        assert (not np.array_equal(model.norm.mean[...], before)) is changes


def test_a_dict_batch_counts_its_samples_by_its_first_key_as_written():
    classifier = MLP(0)

    class WithClassWeights(nnx.Module):
        def __init__(self):
            self.classifier = classifier

        def __call__(self, batch_data, evaluate_settings, inference_mode=None):
            assert list(batch_data) == ["features", "labels", "class_weights"]  # the order as written
            logits = self.classifier(batch_data["features"])
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch_data["labels"])
            return jnp.mean(losses * batch_data["class_weights"][batch_data["labels"]])

    trainer = mlp.trainers.DefaultTrainer(optax.sgd(0.1), classifier)
    trainer.set_training_model(WithClassWeights())
    features, labels = batches(num_batches=1)[0]
    # "class_weights" (3 rows) comes first alphabetically, "features" (8 rows) first as written
    batch = {"features": features, "labels": labels, "class_weights": np.ones(3, np.float32)}
    assert trainer.train_on(batch).num_samples == 8
    assert trainer.evaluate_loss(batch).num_samples == 8


class KeyOrderRegression(nnx.Module):
    """A regression on ``{"x": ..., "target": ...}`` (keys not in alphabetical order) that records, while it is
    traced, the keys and dtypes of every batch or chunk it sees, and returns auxiliary results whose keys are not in
    alphabetical order either."""

    def __init__(self, model, seen):
        self.model, self.seen = model, seen

    def __call__(self, batch_data, evaluate_settings, inference_mode=None):
        x, target = batch_data["x"], batch_data["target"]
        self.seen.append((tuple(batch_data), x.dtype, target.dtype))
        predictions = self.model.linear(x)[:, 0].astype(jnp.float32)
        return {
            "loss": jnp.mean((predictions - target) ** 2),
            "auxiliary_results": {"target": target, "prediction": predictions},
        }


FOUR_DEVICES = pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 JAX devices (JAX_NUM_CPU_DEVICES)")


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"batch_chunk_size": 3},
        pytest.param({"strategy": "data_parallel"}, marks=FOUR_DEVICES),
        {"steps_per_execution": 3},
        pytest.param(
            {"steps_per_execution": 3, "batch_chunk_size": 3, "strategy": "data_parallel"}, marks=FOUR_DEVICES
        ),
    ],
    ids=["one step", "accumulation", "data parallel", "steps per execution", "all three"],
)
def test_dict_batches_reach_the_model_in_their_written_order_and_bfloat16_casts_their_first_value(options):
    """``{"x": ..., "target": ...}`` under bfloat16: every chunk, every batch placed on a mesh, every stacked batch
    reaches the model with its keys as written, so the default ``autocast_inputs`` (the first value) casts ``x`` and
    the float32 targets are not rounded (``jax.tree_util`` rebuilds plain dicts with sorted keys, which would put
    ``target`` first and cast it). Training, evaluation of one batch and of several; the auxiliary results keep
    the model's key order too."""
    features = make_numpy_data(8, 0)[0]
    data = [{"x": features, "target": (1000.0 + 0.37 * np.arange(8) + i).astype(np.float32)} for i in range(3)]
    seen = []
    model = Regression()
    trainer = mlp.trainers.DefaultTrainer(optax.sgd(0.0), model, use_mixed_precision=True, **options)
    trainer.set_training_model(KeyOrderRegression(model, seen))
    trained = trainer.train_on_batches(data)
    evaluated = trainer.evaluate_losses(data)
    alone = trainer.evaluate_loss(data[0])
    assert seen and set(seen) == {(("x", "target"), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))}
    for batch, outputs in [*zip(data, trained), *zip(data, evaluated), (data[0], alone)]:
        expected = float(np.mean(batch["target"].astype(np.float64) ** 2))  # the prediction is 0
        assert outputs.loss.dtype == jnp.float32 and float(outputs.loss) == pytest.approx(expected, rel=1e-6)
        assert list(outputs.auxiliary_results) == ["target", "prediction"]
        np.testing.assert_array_equal(np.asarray(outputs.auxiliary_results["target"]), batch["target"])
