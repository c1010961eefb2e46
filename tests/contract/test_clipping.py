"""Contract tests of gradient clipping (``clip_gradients_norm`` / ``clip_gradients_value``) on every backend.

One SGD step with learning rate 1 moves the weights by minus the applied gradients, so the applied gradients are
read off the weights. The reference is the unclipped step of the same precision on the same batch, clipped here
with the rule of ``torch.nn.utils.clip_grad_norm_`` / ``tf.clip_by_global_norm`` (scale by ``c / ||g||`` when
the global norm ``||g||`` of the optimizer's gradients exceeds ``c``) or by value.
"""

import numpy as np
import pytest


def skip_float16_on_jax(harness, options):
    if harness.name.startswith("jax") and options.get("autocast_dtype") == "float16":
        pytest.skip("the JAX backend refuses autocast_dtype='float16' (a ValueError: it has no loss scaling)")


def applied_gradients(harness, seed=0, **trainer_options):
    problem = harness.make_problem(seed=seed, num_batches=1, batch_size=12)
    trainer = harness.sgd_trainer(problem, learning_rate=1.0, **trainer_options)
    before = harness.weights(problem)
    result = trainer.train_on(next(iter(problem.training_batches)))
    assert not bool(harness.to_numpy(result.optimizer_step_skipped))
    return [b - a for b, a in zip(before, harness.weights(problem))]


def global_norm(gradients):
    return float(np.sqrt(sum(float(np.sum(np.square(g.astype(np.float64)))) for g in gradients)))


# float32 step against float32 arithmetic here: rounding only; float16 / bfloat16: the rounding of their 11 / 8 bits
PRECISIONS = {
    "float32": ({}, 1e-5),
    "float16": ({"use_mixed_precision": True, "autocast_dtype": "float16"}, 2e-3),
    "bfloat16": ({"use_mixed_precision": True, "autocast_dtype": "bfloat16"}, 1e-2),  # 8 bits
}


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("batch_chunk_size", [None, 5])
def test_clipping_by_norm_scales_the_gradients_to_the_norm(harness, precision, batch_chunk_size):
    """Half the unclipped norm: every gradient is scaled by exactly 1/2 of itself. Under float16 loss scaling the
    gradients are unscaled before clipping: clipping the scaled ones (65536 x larger) would move the weights by a
    tiny fraction of that."""
    options, tolerance = PRECISIONS[precision]
    skip_float16_on_jax(harness, options)
    unclipped = applied_gradients(harness, **options)
    norm = global_norm(unclipped)
    clipped = applied_gradients(harness, clip_gradients_norm=norm / 2, batch_chunk_size=batch_chunk_size, **options)
    for actual, reference in zip(clipped, unclipped):
        np.testing.assert_allclose(actual, reference / 2, rtol=tolerance, atol=tolerance * np.abs(reference).max())
    assert global_norm(clipped) == pytest.approx(norm / 2, rel=max(tolerance, 1e-5))


def test_a_norm_above_the_gradients_norm_changes_nothing(harness):
    unclipped = applied_gradients(harness)
    kept = applied_gradients(harness, clip_gradients_norm=2 * global_norm(unclipped))
    for actual, reference in zip(kept, unclipped):
        np.testing.assert_allclose(actual, reference, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_clipping_by_value_clips_every_element(harness, precision):
    options, tolerance = PRECISIONS[precision]
    skip_float16_on_jax(harness, options)
    unclipped = applied_gradients(harness, **options)
    limit = 0.5 * max(float(np.abs(g).max()) for g in unclipped)
    clipped = applied_gradients(harness, clip_gradients_value=limit, batch_chunk_size=5, **options)
    for actual, reference in zip(clipped, unclipped):
        np.testing.assert_allclose(actual, np.clip(reference, -limit, limit), rtol=tolerance, atol=tolerance * limit)
    assert max(float(np.abs(g).max()) for g in clipped) == pytest.approx(limit, rel=tolerance)


def test_bad_clipping_options_are_errors_at_construction(harness):
    problem = harness.make_problem(num_batches=1)
    for bad in (0, -1.0, True, "1"):
        with pytest.raises(ValueError, match="clip_gradients_norm must be a number > 0 or None"):
            harness.sgd_trainer(problem, 1.0, clip_gradients_norm=bad)
    with pytest.raises(ValueError, match="give clip_gradients_norm or clip_gradients_value, not both"):
        harness.sgd_trainer(problem, 1.0, clip_gradients_norm=1.0, clip_gradients_value=1.0)


@pytest.mark.parametrize("clipping", [{"clip_gradients_norm": 0.1}, {"clip_gradients_value": 0.01}])
def test_under_float16_an_overflowing_batch_is_still_skipped_and_the_next_one_trains(harness, clipping):
    """An inf feature makes the gradients non-finite: clipping must not make them finite (clip_by_value would turn
    inf into +-v), so the loss scaler skips the step and the weights stay; the next batch steps normally (PyTorch:
    unscale_ only before a step; also with non_finite_loss="skip_step", which decides before clipping)."""
    skip_float16_on_jax(harness, {"autocast_dtype": "float16"})
    problem = harness.make_problem(num_batches=2, batch_size=12)
    features, labels = (np.asarray(harness.to_numpy(part)).copy() for part in next(iter(problem.training_batches)))
    bad_features = features.copy()
    bad_features[0, 0] = np.inf
    bad = next(iter(harness.batches(bad_features, labels, len(labels))))
    good = next(iter(harness.batches(features, labels, len(labels))))
    trainer = harness.sgd_trainer(problem, 1.0, use_mixed_precision=True, autocast_dtype="float16", **clipping)
    problem.train_model = harness.nan_propagating_model(problem)
    trainer.set_training_model(problem.train_model)
    before = harness.weights(problem)
    assert bool(harness.to_numpy(trainer.train_on(bad).optimizer_step_skipped))
    assert all(np.array_equal(a, b) for a, b in zip(before, harness.weights(problem)))
    trainer.skip_non_finite_steps = True
    assert bool(harness.to_numpy(trainer.train_on(bad).optimizer_step_skipped))
    assert not bool(harness.to_numpy(trainer.train_on(good).optimizer_step_skipped))
    assert not all(np.array_equal(a, b) for a, b in zip(before, harness.weights(problem)))
