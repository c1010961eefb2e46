"""Contract tests: ``mlp.metrics`` (the same metric line on every backend) and ``mlp.set_random_seed``."""

import random

import numpy as np
import pytest

LOGITS = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 5.0], [0.0, 1.0, 0.5]], dtype=np.float32)
LABELS = np.array([0, 2, 2, 1], dtype=np.int64)  # sample 1 is predicted 1 (wrong), its label is 2nd best


def inputs(harness, logits=LOGITS, labels=LABELS, as_dicts=False):
    from mlpug.evaluation import MetricInputs

    logits, labels = next(iter(harness.batches(logits, labels, len(logits))))  # the backend's tensors (or arrays)
    if as_dicts:
        return MetricInputs({"features": None, "labels": labels}, None, len(LABELS), {"logits": logits})
    return MetricInputs((None, labels), None, len(LABELS), logits)


def value(harness, tensor):
    return float(np.asarray(harness.to_numpy(tensor)))


def test_accuracy_and_top_k_accuracy_on_known_logits(harness):
    mlp = harness.mlp
    assert value(harness, mlp.metrics.accuracy(inputs(harness))) == pytest.approx(0.75)
    assert value(harness, mlp.metrics.accuracy(inputs(harness, as_dicts=True))) == pytest.approx(0.75)
    one_hot = np.eye(3, dtype=np.float32)[LABELS]
    assert value(harness, mlp.metrics.accuracy(inputs(harness, labels=one_hot))) == pytest.approx(0.75)
    assert value(harness, mlp.metrics.top_k_accuracy(1)(inputs(harness))) == pytest.approx(0.75)
    assert value(harness, mlp.metrics.top_k_accuracy(2)(inputs(harness))) == pytest.approx(1.0)
    assert mlp.metrics.top_k_accuracy(2).__name__ == "top_2_accuracy"


def test_metric_errors_name_the_layout_and_the_bad_value(harness):
    from mlpug.evaluation import MetricInputs

    mlp = harness.mlp
    with pytest.raises(TypeError, match=r"accuracy needs auxiliary_results = logits \[B, C\].*NoneType"):
        mlp.metrics.accuracy(MetricInputs((None, None), None, 1, None))
    with pytest.raises(TypeError, match="the batch is a str without such labels"):
        mlp.metrics.accuracy(inputs(harness)._replace(batch="x"))
    with pytest.raises(ValueError, match="k must be an int >= 1, got 0"):
        mlp.metrics.top_k_accuracy(0)
    with pytest.raises(ValueError, match="k=4 exceeds the 3 classes"):
        mlp.metrics.top_k_accuracy(4)(inputs(harness))


def test_the_standard_accuracy_logs_what_a_hand_written_one_logs(harness):
    """The harness problem's own accuracy function against ``mlp.metrics.accuracy`` in a real training run."""
    problem = harness.make_problem(num_batches=3)
    mlp = problem.mlp
    evaluator = mlp.evaluation.MetricEvaluator(
        trainer=problem.trainer, batch_metric_funcs={"own": problem.accuracy, "standard": mlp.metrics.accuracy}
    )
    callbacks = [
        mlp.callbacks.TrainingMetricsLogger(metric_evaluator=evaluator),
        mlp.callbacks.TestMetricsLogger(problem.validation_batches, "validation", metric_evaluator=evaluator),
    ]
    manager = mlp.trainers.TrainingManager(problem.trainer, problem.training_batches, num_epochs=2, callbacks=callbacks)
    manager.start_training()
    dataset = manager.logs["current"]["validation"]["dataset"]
    assert dataset["standard"] == dataset["own"]
    assert 0.0 <= dataset["standard"] <= 1.0


def _draws(harness):
    """Python, NumPy and backend draws (a Keras initializer on TensorFlow; the global tf.random.Generator; none on
    JAX, which has no global generator: its random numbers come from explicit keys)."""
    draws = [random.random(), float(np.random.rand())]
    if harness.name.startswith("jax"):
        return draws
    if harness.name == "pytorch":
        import torch

        draws.append(float(torch.rand(())))
        draws.append(float(torch.nn.Linear(2, 1).weight.detach().sum()))
    else:
        import tensorflow as tf

        draws.append(float(tf.random.get_global_generator().uniform(())))
        draws.append(float(tf.reduce_sum(tf.keras.initializers.GlorotUniform()((2, 1)))))
    return draws


def test_set_random_seed_repeats_every_stream(harness):
    mlp = harness.mlp
    mlp.set_random_seed(3)
    first = _draws(harness)
    mlp.set_random_seed(3)
    assert _draws(harness) == first
    mlp.set_random_seed(4)
    assert all(a != b for a, b in zip(_draws(harness), first))
    for bad in (-1, 2**32, 1.5, "3", True):
        with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*32\)"):
            mlp.set_random_seed(bad)


def test_labels_as_a_column_are_class_indices_and_other_shapes_are_refused(harness):
    mlp = harness.mlp
    column = LABELS.reshape(-1, 1)
    assert value(harness, mlp.metrics.accuracy(inputs(harness, labels=column))) == pytest.approx(0.75)
    assert value(harness, mlp.metrics.top_k_accuracy(2)(inputs(harness, labels=column))) == pytest.approx(1.0)
    with pytest.raises(TypeError, match=r"labels of shape \[4, 2\] are neither class indices .* 3 classes"):
        mlp.metrics.accuracy(inputs(harness, labels=np.zeros((4, 2), dtype=np.float32)))
