"""Several optimisation steps per compiled call on TensorFlow: ``DefaultTrainer(steps_per_execution=K)``.

K batches are stacked and trained in a ``tf.while_loop`` inside one ``tf.function``; the manager then runs the
batch hooks of every batch. What must hold: the same weights and per-batch logged losses as one step per call,
bit for bit on CPU (with dropout, a short last batch, gradient accumulation, mixed precision and the non-finite
policies), an exact resume from a checkpoint inside a call, one trace for calls of any length, and dataset
evaluation in stacked calls with the same values. Strategies: ``tests/tensorflow/test_distributed.py`` (variant
``steps_per_execution``).
"""

import warnings

import numpy as np
import pytest
import tensorflow as tf

import mlpug.tensorflow as mlp
import mlpug.tensorflow.trainers.trainer as trainer_module
from mlpug.tensorflow.trainers.compilation import run_stacked
from mlpug.trainers.non_finite import NonFiniteLossError

NUM_SAMPLES, BATCH_SIZE = 11 * 8 + 3, 8  # 12 batches per epoch, the last of 3 samples


def make_data(num_samples=NUM_SAMPLES, seed=0, nan_at=None):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(num_samples, 6)).astype(np.float32)
    labels = (features @ rng.normal(size=(6, 3))).argmax(axis=1).astype(np.int64)
    if nan_at is not None:
        features[nan_at] = np.nan
    return features, labels


class TrainModel(tf.keras.Model):
    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier
        self.loss_function = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def call(self, batch_data, evaluate_settings=None, inference_mode=None):
        features, labels = batch_data
        logits = tf.cast(self.classifier(features, training=not inference_mode), tf.float32)
        loss = self.loss_function(labels, logits) + 0.0 * tf.cast(
            tf.reduce_mean(features), tf.float32
        )  # NaN in, NaN out
        return {"loss": loss, "auxiliary_results": logits}


class Record(mlp.callbacks.Callback):
    def __init__(self, stop_at=None):
        super().__init__("Record")
        self.losses, self.skipped, self.stop_at = [], [], stop_at

    def on_batch_training_completed(self, training_batch, logs):
        result = self.training_manager.step_result
        self.losses.append(float(result.loss))
        self.skipped.append(bool(result.optimizer_step_skipped))
        if self.stop_at == logs["current"]["global_iter"]:
            self.training_manager.stop_training()
        return True


def make_trainer(steps, seed=0, optimizer="adam", **options):
    tf.keras.utils.set_random_seed(seed)
    classifier = tf.keras.Sequential(
        [tf.keras.Input((6,)), tf.keras.layers.Dense(16, activation="relu"), tf.keras.layers.Dropout(0.25),
         tf.keras.layers.Dense(3)]
    )  # fmt: skip
    keras_optimizer = tf.keras.optimizers.Adam(0.01) if optimizer == "adam" else tf.keras.optimizers.SGD(0.1)
    trainer = mlp.trainers.DefaultTrainer(keras_optimizer, classifier, steps_per_execution=steps, **options)
    trainer.set_training_model(TrainModel(classifier))
    return trainer, classifier


def batches(kind, **data_options):
    features, labels = make_data(**data_options)
    if kind == "tf_data":
        return tf.data.Dataset.from_tensor_slices((features, labels)).batch(BATCH_SIZE)
    return mlp.data.ResumableArrayBatches((features, labels), BATCH_SIZE, shuffle=True, seed=1)


def train(steps, data="arrays", num_epochs=2, callbacks=(), manager_options=None, data_options=None, **options):
    trainer, classifier = make_trainer(steps, **options)
    record = Record()
    evaluator = mlp.evaluation.MetricEvaluator(trainer=trainer)
    manager = mlp.trainers.TrainingManager(
        trainer, batches(data, **(data_options or {})), num_epochs=num_epochs,
        callbacks=[mlp.callbacks.TrainingMetricsLogger(evaluator), record, *callbacks], **(manager_options or {}),
    )  # fmt: skip
    manager.start_training()
    return trainer, classifier, record, manager


def assert_same_run(expected, actual):
    (_, expected_model, expected_record, _), (_, actual_model, actual_record, _) = expected, actual
    np.testing.assert_array_equal(actual_record.losses, expected_record.losses)  # NaN where NaN, else bit for bit
    assert actual_record.skipped == expected_record.skipped
    for expected_weights, actual_weights in zip(expected_model.get_weights(), actual_model.get_weights()):
        np.testing.assert_array_equal(actual_weights, expected_weights)


@pytest.mark.parametrize("data", ["arrays", "tf_data"])
def test_four_steps_per_call_train_exactly_as_one_with_dropout_and_a_short_last_batch(data):
    single = train(1, data)
    several = train(4, data)
    assert len(several[2].losses) == 2 * 12
    assert_same_run(single, several)
    assert several[0]._train_steps.num_traces == 1  # calls of 4 batches, the last with the short last batch
    assert several[0]._train_step.num_traces == 0  # which is stacked alone through the same trace


@pytest.mark.parametrize(
    "options",
    [
        {"batch_chunk_size": 3},
        {"use_mixed_precision": True, "autocast_dtype": "bfloat16"},
        {"use_mixed_precision": True, "autocast_dtype": "float16"},
        {"clip_gradients_norm": 0.1},
        {"batch_data_signature": (tf.TensorSpec((None, 6), tf.float32), tf.TensorSpec((None,), tf.int64))},
        {"eager_mode": True},
    ],
    ids=["accumulation", "bfloat16", "float16_loss_scaling", "clipping", "signature", "eager"],
)
def test_several_steps_per_call_compose_with_the_step_parts(options):
    assert_same_run(train(1, num_epochs=1, **options), train(5, num_epochs=1, **options))


def test_one_trace_serves_calls_of_every_length_with_a_signature():
    signature = (tf.TensorSpec((None, 6), tf.float32), tf.TensorSpec((None,), tf.int64))
    trainer, *_ = train(5, batch_data_signature=signature)  # calls of 5, 5, 1 (+ 1 short) batches, 2 epochs
    assert trainer._train_steps.num_traces == 1


def test_the_non_finite_policies_act_per_batch_inside_a_call():
    def options(policy):
        return dict(
            num_epochs=1, data_options={"nan_at": 3 * BATCH_SIZE + 1}, manager_options={"non_finite_loss": policy}
        )

    single, several = train(1, **options("skip_step")), train(4, **options("skip_step"))
    assert sum(several[2].skipped) == 1  # the batch of the NaN sample (shuffled), its step skipped inside a call
    assert_same_run(single, several)
    nan_batch = several[2].skipped.index(True)
    with pytest.raises(NonFiniteLossError, match=f"global iteration {nan_batch}\\b"):
        train(4, **options("raise"))


def checkpointed_run(directory, steps, stop_at=None, resume_from=None, seed=0):
    trainer, classifier = make_trainer(steps, seed=seed)
    record = Record(stop_at)
    checkpoints = mlp.callbacks.CheckpointManager(
        checkpoints_path=str(directory), metric_to_monitor=None, batch_level=True, create_checkpoint_every=3
    )
    manager = mlp.trainers.TrainingManager(
        trainer, batches("arrays"), num_epochs=2, callbacks=[record, checkpoints], resume_from=resume_from
    )
    manager.start_training()
    return classifier, record, manager


def test_a_resume_from_a_checkpoint_inside_a_call_is_exact(tmp_path):
    """Calls of up to 5 batches, checkpoints every 3: the calls end at the checkpoints (3, 6, ...); stopped during the
    call of global iterations 6-8, resumed from that stop in a trainer with other initial weights."""
    straight_model, straight, _ = checkpointed_run(tmp_path / "straight", 1)
    _, first, manager = checkpointed_run(tmp_path / "run", 5, stop_at=7)
    assert manager.global_iter == 9  # the stop took effect at the end of the call
    resumed_model, second, manager = checkpointed_run(tmp_path / "run", 5, resume_from="latest", seed=7)
    assert manager.global_iter == 24
    assert first.losses + second.losses == straight.losses
    for expected, actual in zip(straight_model.get_weights(), resumed_model.get_weights()):
        np.testing.assert_array_equal(actual, expected)


def test_dataset_evaluation_in_stacked_calls_gives_the_values_of_single_batches():
    trainer, _ = make_trainer(1)
    several, _ = make_trainer(1, evaluation_steps_per_execution=4)
    several.set_state(trainer.get_state())  # both unbuilt: applied when built
    accuracy = {"accuracy": mlp.metrics.accuracy} if hasattr(mlp, "metrics") else {}
    values = []
    for each in (trainer, several):
        evaluator = mlp.evaluation.MetricEvaluator(
            trainer=each, batch_metric_funcs={"loss": lambda i: i.loss, **accuracy}
        )
        result = evaluator.evaluate_dataset(batches("tf_data"))  # 12 batches: calls of 4, 4, 3 and the short one
        values.append({name: float(value) for name, value in result.items()})
    assert values[0] == values[1]
    assert several._evaluate_steps[(True, True)].num_traces == 1  # the short batch, stacked alone, too
    assert (True, False) not in several._evaluate_steps  # no single-batch evaluation step was made


def test_a_legacy_random_op_in_the_step_draws_anew_for_every_stacked_batch():
    """The step runs from one call site in the loop (no batch before it), so a stateful random op is one op: eight
    batches in two calls of four draw eight different values, the second call going on from the first."""
    tf.random.set_seed(1)

    @tf.function
    def four_steps(batches):
        return run_stacked(lambda batch: tf.random.uniform([]) + 0.0 * tf.reduce_sum(batch), batches)

    draws = np.concatenate([four_steps(tf.zeros([4, 2])).numpy(), four_steps(tf.zeros([4, 2])).numpy()])
    assert len(set(draws.tolist())) == 8


def test_bad_steps_per_execution_is_refused_at_construction():
    for bad in (0, -1, 2.0, True, "4"):
        with pytest.raises(ValueError, match=f"steps_per_execution must be an int >= 1, got {bad!r}"):
            make_trainer(bad)
    with pytest.raises(ValueError, match="evaluation_steps_per_execution must be an int >= 1, got 0"):
        make_trainer(2, evaluation_steps_per_execution=0)


def test_evaluation_batches_per_call_is_a_deprecated_name_of_evaluation_steps_per_execution(monkeypatch):
    monkeypatch.setattr(trainer_module, "_warned_deprecated_arguments", set())
    assert make_trainer(3)[0].evaluation_steps_per_execution == 3  # default: steps_per_execution
    assert make_trainer(3, evaluation_steps_per_execution=5)[0].evaluation_steps_per_execution == 5
    with pytest.warns(DeprecationWarning, match="use evaluation_steps_per_execution"):
        trainer, _ = make_trainer(3, evaluation_batches_per_call=4)
    assert trainer.evaluation_steps_per_execution == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per process
        assert make_trainer(3, evaluation_batches_per_call=2)[0].evaluation_steps_per_execution == 2
    with pytest.raises(ValueError, match="evaluation_batches_per_call must be an int >= 1, got 0"):
        make_trainer(2, evaluation_batches_per_call=0)
    with pytest.raises(TypeError, match="give evaluation_steps_per_execution only"):
        make_trainer(2, evaluation_steps_per_execution=2, evaluation_batches_per_call=2)


def test_a_batch_that_does_not_match_the_signature_inside_a_call_is_named():
    signature = (tf.TensorSpec((None, 6), tf.float32), tf.TensorSpec((None,), tf.int64))
    trainer, _ = make_trainer(3, batch_data_signature=signature)
    features, labels = make_data(24)
    good = (features[:8], labels[:8])
    bad = (features[8:16, :5], labels[8:16])
    trainer.train_on_batches([good, good], None)
    with pytest.raises(ValueError, match="item \\[0\\] is float32 with shape \\[8, 5\\], the signature expects float32 "
                       "with shape \\[None, 6\\]"):  # fmt: skip
        trainer.train_on_batches([good, bad, bad], None)  # the two bad batches are stacked: the message names one
