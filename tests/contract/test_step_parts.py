"""Contract tests of the step parts and the checkpoint phase: the same assertions on every backend harness."""

import os

import numpy as np
import pytest

from mlpug.chunking import BatchChunk, BatchChunking
from mlpug.trainers.gradient_sync import GradientSync
from mlpug.trainers.precision import PrecisionPolicy
from tests.recording import CountBatches


def first_batch(problem):
    return next(iter(problem.training_batches))


def test_null_step_parts_are_identities(harness):
    problem = harness.make_problem()
    trainer = problem.trainer
    precision, chunking, sync = trainer.precision, trainer.chunking, trainer.gradient_sync
    assert isinstance(precision, PrecisionPolicy) and precision.autocast_dtype is None
    assert not precision.uses_loss_scaling
    assert type(chunking) is BatchChunking and chunking.batch_chunk_size is None
    assert type(sync) is GradientSync
    loss, gradients = object(), [object()]
    assert precision.scale_loss(loss) is loss and chunking.weigh_loss(loss, BatchChunk(None, None, 1.0, True)) is loss
    assert sync.reduce(gradients) is gradients
    assert all(
        a is b for a, b in zip(precision.prepare_optimizers(trainer.optimizers).values(), trainer.optimizers.values())
    )
    result = trainer.train_on(first_batch(problem))
    assert result.optimizer_step_skipped is False  # the Python constant: nothing computed, nothing to wait for


def test_one_chunk_as_big_as_the_batch_is_bit_identical_to_no_chunking(harness):
    plain, chunked = harness.make_problem(seed=3), harness.make_problem(seed=3)
    chunked_trainer = harness.new_trainer(chunked, batch_chunk_size=8)  # the harness's batch size
    plain_losses = [harness.to_numpy(plain.trainer.train_on(batch).loss) for batch in plain.training_batches]
    chunked_losses = [harness.to_numpy(chunked_trainer.train_on(batch).loss) for batch in chunked.training_batches]
    assert np.array_equal(np.asarray(plain_losses), np.asarray(chunked_losses))
    for a, b in zip(harness.weights(plain), harness.weights(chunked)):
        assert np.array_equal(a, b)


def test_chunk_merge_rule_gives_the_same_structure_on_every_backend(harness):
    problem = harness.make_problem(batch_size=8)
    trainer = harness.new_trainer(problem, batch_chunk_size=3)  # chunks of 3, 3 and 2 samples
    trainer.set_training_model(harness.structured_model(problem))
    features, labels = (harness.to_numpy(part) for part in first_batch(problem))
    result = trainer.train_on(first_batch(problem))
    auxiliary = result.auxiliary_results
    assert sorted(auxiliary) == ["count", "logits", "mean", "pair", "tag"]
    logits = harness.to_numpy(auxiliary["logits"])
    assert logits.shape == (8, 3)  # arrays of rank >= 1: concatenated along dimension 0
    mean = harness.to_numpy(auxiliary["mean"])
    assert mean.shape == (3,)  # 0-d tensors: one entry per chunk
    np.testing.assert_allclose(mean, [logits[0:3].mean(), logits[3:6].mean(), logits[6:8].mean()], rtol=1e-5)
    assert auxiliary["count"] == 7 and auxiliary["tag"] == "x"  # the same in every chunk: kept once
    assert isinstance(auxiliary["pair"], tuple) and auxiliary["pair"][1] is None
    assert np.array_equal(harness.to_numpy(auxiliary["pair"][0]), labels)
    assert int(harness.to_numpy(result.num_samples)) == 8 and features.shape[0] == 8


def test_callbacks_anywhere_in_the_list_are_checkpointed_at_the_same_step_and_see_is_best(harness, tmp_path):
    problem = harness.make_problem(num_batches=4)
    mlp = problem.mlp
    before, after = CountBatches("before"), CountBatches("after")
    checkpoint_manager = mlp.callbacks.CheckpointManager(
        checkpoints_path=str(tmp_path), metric_to_monitor="training.batch.loss", batch_level=True,
        write_in_background=False,
    )  # fmt: skip
    saved = []

    class ReadCheckpoint(mlp.callbacks.Callback):
        def on_batch_checkpoint(self, logs):
            state = mlp.load_training_checkpoint(checkpoint_manager.training_checkpoint_path)
            saved.append((int(state["global_iter"]), state["callbacks"]["before"], state["callbacks"]["after"]))

    evaluator = mlp.evaluation.MetricEvaluator(trainer=problem.trainer)
    callbacks = [before, checkpoint_manager, after, mlp.callbacks.TrainingMetricsLogger(evaluator), ReadCheckpoint()]
    mlp.trainers.TrainingManager(
        problem.trainer, problem.training_batches, num_epochs=2, callbacks=callbacks
    ).start_training()
    assert [(i, {"count": c["count"]}, {"count": d["count"]}) for i, c, d in saved] == [
        (i, {"count": i}, {"count": i}) for i in range(1, 9)
    ]
    improvements = before.improvements()
    assert before.saw_best == after.saw_best == improvements and len(improvements) > 1
    assert os.path.exists(checkpoint_manager.file_names.best_model)
    best = mlp.load_model_checkpoint(checkpoint_manager.file_names.best_model)
    assert best["progress"]["global_iter"] == improvements[-1] and best["logs"]["is_best"] is True


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_batch_chunk_size_is_refused_at_construction(harness, bad):
    problem = harness.make_problem()
    with pytest.raises(ValueError, match=f"batch_chunk_size must be None .* got {bad!r}"):
        harness.new_trainer(problem, batch_chunk_size=bad)
