"""The exact-resume matrix on JAX (see tests/resume_matrix.py), compiled steps, with an ``nnx.Dropout`` drawing from
its ``nnx.Rngs`` stream and batch-level validation over an iterable that shuffles from NumPy's global generator:
``ResumableArrayBatches`` without and with a seeded shuffle, a list of NumPy batches, a list of JAX arrays, an
iterable that draws its order from NumPy's global generator when iterated (as PyTorch's ``DataLoader(shuffle=True)``)
and an infinite generator resume bit-exactly mid-epoch and at an epoch end; so does the seeded ``ResumableArrayBatches``
with ``steps_per_execution=4`` (calls of 2 stacked steps between batch-level checkpoints, validation at epoch ends).
No cell is warned about at the start: the TensorFlow matrix's warned cell (an unseeded tf.data shuffle) has no
JAX source here whose order mlpug could know to be unrepeatable.

Deliberate breaks seen failing (monkeypatched, not edited): the ``nnx.Rngs`` streams left out of the trainer's random
state providers (all 14 cells fail: the resumed trainer's dropout stream starts from its own seed); the random states
of the original run not set before a mid-epoch resume creates the epoch's data iterator (the iterable shuffled from
NumPy's global generator fails mid-epoch).
"""

from collections.abc import Iterator

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mlpug.jax as mlp
from tests.contract.backends import make_numpy_data
from tests.jax.test_trainer import MLP, ClassificationLoss, weights
from tests.resume_matrix import NUM_BATCHES, NUM_EPOCHS, STOP_AT, Setup, check_cell

BATCH_SIZE = 8


def arrays(num_batches: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Features float32 [num_batches * BATCH_SIZE, 6] and int32 labels (JAX's default integer width)."""
    features, labels = make_numpy_data(num_batches * BATCH_SIZE, seed)
    return features, labels.astype(np.int32)


def numpy_batches(num_batches: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    features, labels = arrays(num_batches, seed)
    return [(features[i : i + BATCH_SIZE], labels[i : i + BATCH_SIZE]) for i in range(0, len(labels), BATCH_SIZE)]


class GloballyShuffled:
    """Batches in an order drawn from NumPy's global generator each time it is iterated (as a
    ``DataLoader(shuffle=True)`` draws its order from torch's): exact only when the manager creates every epoch's
    iterator with the random states of the original run, and evaluation does not move them."""

    def __init__(self, batches: list[tuple[np.ndarray, np.ndarray]]):
        self.batches = batches

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for index in np.random.permutation(len(self.batches)):
            yield self.batches[index]


def endless(batches: list[tuple[np.ndarray, np.ndarray]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """An infinite generator: one iterator for the run, each epoch continuing where the last one ended; 6 batches
    per pass, so the epochs of 4 batches start at different batches."""
    while True:
        yield from batches


SOURCES = {
    "ResumableArrayBatches": lambda: mlp.data.ResumableArrayBatches(arrays(NUM_BATCHES, 5), BATCH_SIZE, seed=3),
    "ResumableArrayBatches(shuffle=False)": lambda: mlp.data.ResumableArrayBatches(
        arrays(NUM_BATCHES, 5), BATCH_SIZE, shuffle=False
    ),
    "list of NumPy batches": lambda: numpy_batches(NUM_BATCHES, 5),
    "list of JAX arrays": lambda: [
        tuple(jnp.asarray(part) for part in batch) for batch in numpy_batches(NUM_BATCHES, 5)
    ],
    "iterable shuffled from NumPy's global generator": lambda: GloballyShuffled(numpy_batches(NUM_BATCHES, 5)),
    "infinite generator": lambda: endless(numpy_batches(6, 5)),
}


def builder(source: str, steps_per_execution: int = 1, call_sizes: list[int] | None = None):
    def build(init_seed: int) -> Setup:
        np.random.seed(init_seed)  # the global generator that the globally shuffled iterables draw from
        classifier = MLP(init_seed, dropout=0.3)  # the params and dropout streams seeded from init_seed
        trainer = mlp.trainers.DefaultTrainer(optax.adam(0.01), classifier, steps_per_execution=steps_per_execution)
        trainer.set_training_model(ClassificationLoss(classifier))
        if call_sizes is not None:
            train_on_batches = trainer.train_on_batches

            def recorded(batches, *args, **kwargs):
                call_sizes.append(len(batches))
                return train_on_batches(batches, *args, **kwargs)

            trainer.train_on_batches = recorded  # type: ignore[method-assign]  # recorded, then the method
        validation = GloballyShuffled(numpy_batches(3, 9))  # evaluation must not move the training's NumPy state
        return Setup(
            mlp, trainer, SOURCES[source](), validation,
            lambda: list(weights(classifier).values()),
        )  # fmt: skip

    return build


@pytest.mark.parametrize("resume_point", sorted(STOP_AT))
@pytest.mark.parametrize("source", sorted(SOURCES))
def test_resume_is_exact(source, resume_point, tmp_path, caplog):
    check_cell(builder(source), tmp_path, resume_point, "exact", caplog)


@pytest.mark.parametrize("resume_point", sorted(STOP_AT))
def test_resume_with_several_steps_per_call_is_exact(resume_point, tmp_path, caplog):
    """``steps_per_execution=4``, a batch-level training checkpoint every 2 batches: calls of 2 stacked steps; a
    stop takes effect at the end of its call (mid-epoch: after global iteration 5, the 2nd of epoch 1)."""
    call_sizes: list[int] = []
    build = builder("ResumableArrayBatches", steps_per_execution=4, call_sizes=call_sizes)
    check_cell(build, tmp_path, resume_point, "exact", caplog, batch_level_validation=False, checkpoint_every=2)
    assert call_sizes[: NUM_EPOCHS * NUM_BATCHES // 2] == [2] * (NUM_EPOCHS * NUM_BATCHES // 2)  # the straight run
