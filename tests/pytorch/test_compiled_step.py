"""``DefaultTrainer(compile_step=...)``: the step and evaluation through ``torch.compile``, against the eager step.

Compilations are counted with ``torch._dynamo.testing.CompileCounterWithBackend``, a backend that counts every graph
handed to it (one per compiled frame and recompilation) and then compiles it with the real backend; the caches are
cleared before every test (``torch.compiler.reset()``), so counts start at 0. The inductor tests compile C++ (a
cold cache on a 2-core machine: about 45 s for the first graph, then about 5 s per trainer); the composition tests
use the ``aot_eager`` backend (the same Dynamo graphs and AOTAutograd backward, no code generation), which is what
``compile_step`` changes in the step's structure.

Tolerance against the eager step: weights within ``atol=1e-5, rtol=1e-5`` after 6 Adam steps (lr 0.01) in float32
(and the bfloat16 / float16 autocast cases: their graphs round the same operations). Compiled kernels sum in
another order and the AOTAutograd decompositions compute some operations differently; measured differences are
about 5e-7 (float32) and 2e-6 (float16 with clipping).
"""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import mlpug.pytorch as mlp
import mlpug.pytorch.trainers.compilation as compilation
from tests.contract.backends import make_numpy_data
from tests.resume_matrix import Setup, check_cell

NUM_SAMPLES, BATCH_SIZE = 40, 16  # batches of 16, 16 and a short last one of 8
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(autouse=True)
def fresh_compile_caches():
    """Every test compiles anew: torch keeps compiled code per function across trainers (and limits how many)."""
    torch.compiler.reset()
    yield
    torch.compiler.reset()


class TrainModel(torch.nn.Module):
    def __init__(self, classifier, dropout=0.0):
        super().__init__()
        self.classifier = classifier
        self.dropout = torch.nn.Dropout(dropout)

    def forward(self, batch_data, evaluate_settings, inference_mode=None):
        features, labels = batch_data
        logits = self.classifier(self.dropout(features))
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "auxiliary_results": logits}


def make_classifier(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def make_data(seed=0):
    features, labels = make_numpy_data(NUM_SAMPLES, seed=seed)
    return torch.from_numpy(features), torch.from_numpy(labels)


class CountGraphs(mlp.callbacks.Callback):
    """The counter's graphs after every training batch and after every validation."""

    def __init__(self, counter):
        super().__init__("CountGraphs")
        self.counter = counter
        self.after_batch, self.after_epoch = [], []

    def on_batch_training_completed(self, training_batch, logs):
        self.after_batch.append(self.counter.frame_count)
        return True

    def on_epoch_completed(self, logs):
        self.after_epoch.append(self.counter.frame_count)
        return True


def train(compile_step, num_epochs=2, lr_schedule=False, optimizer_options=None, **trainer_options):
    """``num_epochs`` epochs of 3 batches, validated at every epoch end (batches of 16, 16, 8); the trainer, the
    manager, the batch losses, the graph counts (with a counter backend) and the weights."""
    classifier = make_classifier()
    optimizer = torch.optim.Adam(classifier.parameters(), lr=0.01, **(optimizer_options or {}))
    trainer = mlp.trainers.DefaultTrainer(optimizer, classifier, compile_step=compile_step, **trainer_options)
    evaluator = mlp.evaluation.MetricEvaluator(trainer=trainer)
    counter = compile_step.get("backend") if isinstance(compile_step, dict) else None
    if not isinstance(counter, CompileCounterWithBackend):
        counter = CompileCounterWithBackend("eager")  # counts nothing: nothing is compiled with it
    counts = CountGraphs(counter)
    losses = []

    class Record(mlp.callbacks.Callback):
        def on_batch_training_completed(self, training_batch, logs):
            losses.append(logs["current"]["training"]["batch"]["loss"])
            return True

    validation = mlp.data.ResumableArrayBatches(make_data(seed=1), BATCH_SIZE, shuffle=False)
    callbacks = [
        mlp.callbacks.TrainingMetricsLogger(evaluator),
        mlp.callbacks.TestMetricsLogger(validation, "validation", evaluator),
        Record("Record"),
        counts,
    ]
    if lr_schedule:
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
        callbacks.append(mlp.callbacks.LRSchedulerWrapper(schedule))
    training = mlp.data.ResumableArrayBatches(make_data(), BATCH_SIZE, shuffle=True, seed=3)
    manager = mlp.trainers.TrainingManager(trainer, training, num_epochs=num_epochs, callbacks=callbacks)
    trainer.set_training_model(TrainModel(classifier))
    manager.start_training()
    weights = [p.detach().clone() for p in classifier.parameters()]
    return trainer, manager, losses, counts, weights


def assert_weights_close(compiled, eager):
    for mine, reference in zip(compiled, eager):
        torch.testing.assert_close(mine, reference, **TOLERANCE)


@pytest.mark.timeout(300)
def test_the_compiled_step_trains_like_the_eager_step_and_the_short_last_batch_does_not_recompile():
    """Inductor (``compile_step=True``'s backend): 2 epochs of batches 16, 16, 8 and validations of 16, 16, 8; every
    graph is compiled in the first step (training forward and its backward, the optimizer step) and the first
    validation (its forward); the short batches, the second epoch and the second validation compile nothing. The
    weights, losses and validation loss are the eager ones within the tolerance, and the eager trainer compiles
    nothing."""
    _, eager_manager, eager_losses, eager_counts, eager_weights = train(False)
    counter = CompileCounterWithBackend("inductor")
    _, manager, losses, counts, weights = train({"backend": counter})
    assert eager_counts.after_batch == [0] * 6
    first_step = counts.after_batch[0]
    assert first_step >= 2  # the training forward and the optimizer step, at least
    assert counts.after_batch[:3] == [first_step] * 3  # the short third batch (8 samples) did not recompile
    assert counts.after_epoch[0] == first_step + 1  # one evaluation graph, for the batches of 16 and of 8
    assert counts.after_batch[3:] == [first_step + 1] * 3 and counts.after_epoch[1] == first_step + 1
    assert_weights_close(weights, eager_weights)
    assert losses == pytest.approx(eager_losses, rel=1e-5, abs=1e-6)
    validation = manager.logs["current"]["validation"]["dataset"]["loss"]
    assert validation == pytest.approx(eager_manager.logs["current"]["validation"]["dataset"]["loss"], rel=1e-5)


def test_without_the_dynamic_batch_dimension_the_short_batch_recompiles(monkeypatch):
    """The counting sees recompilations: with the marking switched off, the short last batch (8 of 16) compiles the
    training forward again, and the 8-sample validation batch the evaluation forward."""
    counter = CompileCounterWithBackend("aot_eager")
    _, _, _, marked, _ = train({"backend": counter}, num_epochs=1)
    torch.compiler.reset()
    monkeypatch.setattr(compilation, "mark_batch_dynamic", lambda batch: None)
    counter = CompileCounterWithBackend("aot_eager")
    _, _, _, unmarked, _ = train({"backend": counter}, num_epochs=1)
    assert marked.after_batch[2] == marked.after_batch[0]
    assert unmarked.after_batch[2] == unmarked.after_batch[0] + 1
    assert unmarked.after_epoch[0] == marked.after_epoch[0] + 2


COMPOSITIONS = {
    "chunks of 5 and clipping by norm": dict(batch_chunk_size=5, clip_gradients_norm=0.1),
    "bfloat16 autocast, clipping by value": dict(use_mixed_precision=True, clip_gradients_value=0.01),
    "float16 with loss scaling and clipping": dict(
        use_mixed_precision=True, autocast_dtype="float16", clip_gradients_norm=0.1
    ),
    "fused Adam": dict(optimizer_options={"fused": True}),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("options", list(COMPOSITIONS.values()), ids=list(COMPOSITIONS))
def test_the_compiled_step_composes_with_the_step_parts(options):
    """Gradient accumulation (chunks 5, 5, 5, 1 and 5, 3: the 1-sample chunk is torch's one specialised size, one more
    graph), mixed precision, clipping and fused Adam: the eager weights within the tolerance."""
    _, _, eager_losses, _, eager_weights = train(False, **options)
    _, _, losses, _, weights = train({"backend": CompileCounterWithBackend("aot_eager")}, **options)
    assert_weights_close(weights, eager_weights)
    assert losses == pytest.approx(eager_losses, rel=1e-4, abs=1e-5)


def test_a_non_finite_loss_skips_the_same_step_compiled():
    """``skip_non_finite_steps``: the check of the loss runs between the compiled forward and the compiled update;
    a NaN batch is skipped as in the eager step, and the following steps match it."""

    def run(compile_step):
        classifier = make_classifier()
        trainer = mlp.trainers.DefaultTrainer(
            torch.optim.Adam(classifier.parameters(), lr=0.01), classifier, compile_step=compile_step
        )
        trainer.set_training_model(TrainModel(classifier))
        trainer.skip_non_finite_steps = True
        features, labels = make_data()
        skipped = []
        for step, (start, stop) in enumerate([(0, 16), (16, 32), (32, 40), (0, 16)]):
            batch_features = features[start:stop].clone()
            if step == 1:
                batch_features[0, 0] = float("nan")
            skipped.append(bool(trainer.train_on((batch_features, labels[start:stop])).optimizer_step_skipped))
        return skipped, [p.detach().clone() for p in classifier.parameters()]

    eager_skipped, eager_weights = run(False)
    skipped, weights = run({"backend": "aot_eager"})
    assert skipped == eager_skipped == [False, True, False, False]
    assert_weights_close(weights, eager_weights)


def test_a_learning_rate_schedule_recompiles_once():
    """A float learning rate that changes every step (LambdaLR): one more graph at its first change (the optimizer
    step's guard on the value), then the rate is a graph input; the weights are the eager ones."""
    _, _, _, _, eager_weights = train(False, lr_schedule=True)
    _, _, _, constant, _ = train({"backend": CompileCounterWithBackend("aot_eager")})
    torch.compiler.reset()
    _, _, _, scheduled, weights = train({"backend": CompileCounterWithBackend("aot_eager")}, lr_schedule=True)
    assert scheduled.after_batch[0] == constant.after_batch[0]  # the rate changes after the first step
    assert scheduled.after_batch[1:] == [count + 1 for count in constant.after_batch[1:]]
    assert_weights_close(weights, eager_weights)


@pytest.mark.timeout(300)
def test_state_keys_are_those_of_the_eager_trainer_and_a_compiled_run_resumes_exactly(tmp_path, caplog):
    """The model components and optimizers are not wrapped: the trainer state has the eager trainer's keys (no
    ``_orig_mod.`` prefix), so checkpoints of compiled and eager runs are interchangeable. The resume matrix's cell
    (dropout, batch-level validation, a checkpoint every batch) with the inductor-compiled step: stopped mid-epoch
    and resumed in a fresh compiled trainer, the losses and weights equal an uninterrupted compiled run's bit for
    bit (the compiled dropout draws its seeds from torch's generator, which the checkpoint restores)."""
    eager_trainer, *_ = train(False, num_epochs=1)
    compiled_trainer, *_ = train({"backend": "aot_eager"}, num_epochs=1)

    def keys(state):
        return {kind: {name: sorted(value) for name, value in state[kind].items()} for kind in state}

    assert keys(compiled_trainer.get_state()) == keys(eager_trainer.get_state())
    assert all(not key.startswith("_orig_mod") for key in compiled_trainer.get_state()["model_components"]["model"])

    def build(seed):
        classifier = make_classifier(seed)
        trainer = mlp.trainers.DefaultTrainer(
            torch.optim.Adam(classifier.parameters(), lr=0.01), classifier, compile_step=True
        )
        trainer.set_training_model(TrainModel(classifier, dropout=0.2))
        features, labels = (torch.from_numpy(a) for a in make_numpy_data(32, seed=0))
        return Setup(
            mlp=mlp,
            trainer=trainer,
            training_data=mlp.data.ResumableArrayBatches((features, labels), 8, seed=3),
            validation_data=mlp.data.ResumableArrayBatches((features[:12], labels[:12]), 8, shuffle=False),
            weights=lambda: [p.detach().numpy().copy() for p in classifier.parameters()],
        )

    check_cell(build, tmp_path, "mid_epoch", "exact", caplog)


@pytest.mark.parametrize(
    "value, error, message",
    [
        ("yes", TypeError, r"compile_step must be True, False or a dict .* got str: 'yes'"),
        (1, TypeError, "compile_step must be True, False or a dict .* got int: 1"),
        (None, TypeError, "compile_step must be True, False or a dict .* got NoneType"),
        ({"fullgraph": True}, ValueError, r"compile_step cannot set 'fullgraph': .*loss.backward\(\)"),
        ({"model": None}, ValueError, "compile_step cannot set 'model'"),
        ({"modes": "max-autotune"}, ValueError, r"'modes' is not a torch.compile keyword argument; valid keys: \["),
        ({1: "inductor"}, TypeError, "compile_step: keys must be str"),
    ],
)
def test_bad_compile_step_values_raise_at_construction(value, error, message):
    classifier = make_classifier()
    with pytest.raises(error, match=message):
        mlp.trainers.DefaultTrainer(torch.optim.SGD(classifier.parameters(), lr=0.1), classifier, compile_step=value)
