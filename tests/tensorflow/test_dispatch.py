"""CompiledStep's direct dispatch to the kept ConcreteFunction: which batches take it, and that the graph that
runs (hence every number) is the one ``tf.function`` itself would have chosen."""

import numpy as np
import pytest
import tensorflow as tf

import mlpug.tensorflow as mlp
from mlpug.tensorflow.trainers import compilation
from tests.tensorflow.test_trainer import SIGNATURE, ScaledLoss, batch, make


class CountingFunction:
    """Stands in for the ``tf.function`` of a CompiledStep: counts the calls that go through it."""

    def __init__(self, function):
        self.function, self.calls = function, 0

    def __call__(self, *args):
        self.calls += 1
        return self.function(*args)

    def __getattr__(self, name):
        return getattr(self.function, name)


def counted(trainer):
    step = trainer._train_step
    step._function = CountingFunction(step._function)
    return step


def kept_batch_spec(step):
    """The batch part of the kept concrete function's input signature (traced as ``f((batch, settings))``)."""
    ((batch_spec, _settings),) = step._concrete.structured_input_signature[0]
    return batch_spec


def kept_shape(step):
    """The shape of the first tensor of a kept ``(x, y)`` batch."""
    return kept_batch_spec(step)[0].shape.as_list()


def test_full_batches_skip_the_tf_function_and_run_the_full_batch_trace():
    trainer, _ = make()
    step = counted(trainer)
    for size in (8, 8, 8, 3, 8, 8, 3, 8):
        trainer.train_on(batch(size, seed=size))
    # through tf.function: the first batch (traces) and both short ones (do not fit the kept trace)
    assert step._function.calls == 3
    assert step.num_traces == 2  # the full-batch trace and the relaxed one for the short batch
    assert kept_shape(step) == [8, 3]  # full batches keep running the trace tf.function picks for them


def test_direct_dispatch_gives_the_same_weights_and_losses_as_tf_function(monkeypatch):
    sizes = (8, 8, 3, 8, 3, 5, 8, 8)

    def run():
        trainer, model = make()
        losses = [float(trainer.train_on(batch(size, seed=i)).loss) for i, size in enumerate(sizes)]
        return losses, [w.copy() for w in model.linear.get_weights()], trainer._train_step

    direct_losses, direct_weights, direct_step = run()
    monkeypatch.setattr(compilation, "_MAX_CONCRETE_MISSES", 0)  # never keep one: every call via tf.function
    plain_losses, plain_weights, plain_step = run()
    assert direct_step._concrete is not None and plain_step._concrete is None
    assert direct_losses == plain_losses
    assert all(np.array_equal(a, b) for a, b in zip(direct_weights, plain_weights))


def test_batches_that_keep_changing_shape_go_back_to_tf_function():
    trainer, _ = make()
    step = counted(trainer)
    trainer.train_on(batch(8))
    sizes = list(range(9, 9 + compilation._MAX_CONCRETE_MISSES))
    for size in sizes:
        trainer.train_on(batch(size))
    assert step._concrete is None  # given up: no failed bind per batch from now on
    calls = step._function.calls
    trainer.train_on(batch(8))
    assert step._function.calls == calls + 1
    assert step.num_traces == 2  # reduce_retracing: the relaxed trace serves every size


def test_with_a_signature_every_batch_size_takes_the_one_trace_directly():
    trainer, _ = make(batch_data_signature=SIGNATURE)  # settings without a signature: one trace per value
    for size in (8, 3, 5, 8):
        trainer.train_on(batch(size))
    step = trainer._train_step
    assert step.num_traces == 1
    assert isinstance(step._for_settings(None), tf.types.experimental.ConcreteFunction)

    settings_signature = {"scale": tf.TensorSpec((), tf.float32)}
    trainer, _ = make(batch_data_signature=SIGNATURE, training_settings_signature=settings_signature)
    step = counted(trainer)
    for size in (8, 3, 5, 8):
        trainer.train_on(batch(size), {"scale": tf.constant(float(size))})
    assert step._function.calls == 1 and step.num_traces == 1
    assert kept_shape(step) == [None, 3]


def test_settings_of_another_value_leave_the_kept_trace_for_their_own():
    """Settings are trace constants: a batch with other settings does not bind to the kept trace."""

    model = tf.keras.Sequential([tf.keras.Input(shape=(3,)), tf.keras.layers.Dense(1, kernel_initializer="ones")])
    trainer = mlp.trainers.DefaultTrainer(tf.keras.optimizers.SGD(0.0), model)
    trainer.set_training_model(ScaledLoss(model))
    step = counted(trainer)
    ones = (np.ones((4, 3), np.float32), np.zeros(4, np.float32))
    losses = [float(trainer.train_on(ones, {"scale": scale}).loss) for scale in (1.0, 1.0, 10.0, 10.0, 1.0)]
    assert losses == pytest.approx([9.0, 9.0, 90.0, 90.0, 9.0])
    assert step._function.calls == 3  # the first call and every change of the settings' value
    assert step.num_traces == 2


def test_evaluation_step_dispatches_directly_too():
    trainer, _ = make()
    for size in (8, 8, 8):
        trainer.evaluate_loss(batch(size, seed=size))
    (evaluate_step,) = trainer._evaluate_steps.values()
    assert evaluate_step._concrete is not None and evaluate_step.num_traces == 1


def per_sample_sum(batch, settings):
    """Uses the static batch size where the trace has one: a graph traced for another size gives another number."""
    samples = batch.shape[0] or tf.cast(tf.shape(batch)[0], tf.float32)
    return tf.reduce_sum(batch) / samples * settings


def test_a_single_tensor_of_another_shape_is_not_run_through_the_kept_trace():
    """A concrete function whose arguments do not bind retries them as flat tensors, unchecked: the step's
    arguments are packed in one tuple so that this retry never applies."""
    step = compilation.CompiledStep(per_sample_sum, "test step")
    one = tf.constant(1.0)
    values = [float(step(tf.ones(shape), one)) for shape in ([8, 3], [8, 3], [3, 3], [8, 3], [3, 3])]
    assert values == [3.0] * 5  # sum / samples: 3 for every size
    assert step.num_traces == 2 and kept_batch_spec(step).shape.as_list() == [8, 3]


@pytest.mark.parametrize("settings_signature", [None, tf.TensorSpec((), tf.float32)])
def test_with_a_signature_a_tensor_of_another_shape_or_dtype_is_a_clear_error(settings_signature):
    signature = tf.TensorSpec((None, 3), tf.float32)
    step = compilation.CompiledStep(per_sample_sum, "test step", signature, settings_signature)
    settings = tf.constant(1.0) if settings_signature is not None else 1.0
    assert float(step(tf.ones([4, 3]), settings)) == 3.0
    for bad in (tf.ones([4, 5]), tf.ones([4, 3], tf.float64)):
        with pytest.raises(ValueError, match="does not match batch_data_signature"):
            step(bad, settings)
    assert step.num_traces == 1


def test_numpy_batches_of_another_dtype_get_their_own_trace_as_with_tf_function():
    step = compilation.CompiledStep(lambda batch, settings: tf.reduce_sum(batch[0]), "test step")
    first = step((np.ones((4, 3), np.float32),), None)
    second = step((np.ones((4, 3), np.float32),), None)  # through the kept trace
    wider = step((np.ones((4, 3), np.float64),), None)  # binding would cast it to float32
    assert (first.dtype, second.dtype, wider.dtype) == (tf.float32, tf.float32, tf.float64)
    assert step.num_traces == 2


def test_numpy_strings_in_the_settings_stay_python_constants_as_with_tf_function():
    seen = []

    def step(batch, settings):
        seen.append(type(settings["mode"]))
        return tf.reduce_sum(batch) * (2.0 if settings["mode"] == "double" else 1.0)

    compiled = compilation.CompiledStep(step, "test step")
    ones = np.ones((2, 2), np.float32)
    values = [float(compiled(ones, {"mode": np.str_(mode)})) for mode in ("double", "double", "single")]
    assert values == [8.0, 8.0, 4.0]
    assert seen == [np.str_, np.str_]  # one trace per value, the step seeing the constant
