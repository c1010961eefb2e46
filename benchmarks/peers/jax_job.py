"""The JAX side of the peer benchmark: one XLA CPU thread, data, the Flax NNX model, the raw ``jax.jit`` floor
(used by ``jax_peers.py`` and ``keras_jax.py``; see ``common.py`` for the job and ``run.py`` for how to run).

Import this module before anything imports JAX: it sets ``XLA_FLAGS`` so that XLA's CPU client runs every
operation in the calling thread (``--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``, the one
thread of the other processes) and JAX on the CPU.

Data, the same for every JAX framework: the training set in a fixed permutation (``np.random.default_rng(0)``, as
``tensorflow_peers.TFData``), images float32 ``[N, 784]`` in [0, 1], labels int32 ``[N]``, cut into NumPy batches of
64 (938 batches, the last of 32 samples) built once (``JaxData.batches``); Keras ``fit`` slices the same arrays in
the same order itself (``shuffle=False``).

Model (``make_model``): the MLP 784-256-256-10 as ``flax.nnx.Linear`` layers from ``nnx.Rngs(0)``, so the floor and
mlpug start from the same weights; optimizer ``optax.adam(1e-3)``; loss
``optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()``.

The floor (``raw_floor``): what a JAX user writes by hand, the functional Flax NNX pattern: ``nnx.split`` of the model
into its graph definition and its parameters once, then one ``jax.jit`` step that merges them
(``nnx.merge``), takes ``jax.value_and_grad`` of the loss, applies optax's update and returns the new parameters
and optimizer state, their input buffers donated (``donate_argnums``); the loop sums the losses as a device array
and prints the mean every 200 batches (one host transfer each). Every timed ``train()`` of this process ends with
``jax.block_until_ready`` on the trained weights (JAX dispatches asynchronously).

Compilation: every run builds a new model and new functions, so every variant traces, lowers and compiles its
step(s) inside its timed epoch. JAX's persistent compilation cache is on (``use_compilation_cache``), so from round 1
on XLA's compilation is a cache hit for every variant alike (tracing and lowering stay timed);
``MLPUG_PEERS_JAX_COMPILATION_CACHE=0`` turns it off (each epoch then includes XLA compilations of about a second
each on the 2-core machine: two for a one-step loop, the full and the short last batch).
"""

import atexit
import os
import shutil
import sys
import tempfile

_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
if "jax" not in sys.modules:
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAGS}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from common import BATCH_SIZE, LEARNING_RATE, LOG_PERIOD, Run, Variant  # noqa: E402
from flax import nnx  # noqa: E402

from mlpug.datasets.fashion_mnist import load_fashion_mnist  # noqa: E402

COMPILATION_CACHE = os.environ.get("MLPUG_PEERS_JAX_COMPILATION_CACHE", "1") != "0"
"""Whether JAX's compilation cache is on (the default; ``MLPUG_PEERS_JAX_COMPILATION_CACHE=0``: off)."""


def use_compilation_cache():
    """Turn on JAX's persistent compilation cache in a new temporary directory of this process (removed at exit):
    round 0 (cold, left out) compiles every variant's functions and stores them; in the later rounds every variant
    still traces and lowers its functions, and XLA's compilation of an unchanged computation is a cache hit. Without
    it an epoch of this job is about half compilation, and the figures compare compilers more than loops."""
    directory = tempfile.mkdtemp(prefix="mlpug-peers-jax-cache-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


if COMPILATION_CACHE:
    use_compilation_cache()


def check_one_thread():
    """Raise when this process's XLA flags do not ask for one CPU thread (this module was imported after JAX)."""
    if _FLAGS not in os.environ.get("XLA_FLAGS", ""):
        raise RuntimeError(f"XLA_FLAGS {os.environ.get('XLA_FLAGS')!r} lacks {_FLAGS!r}: import jax_job first")


class MLP(nnx.Module):
    """784-256-256-10, ReLU: images float32 [B, 784] to logits [B, 10]."""

    def __init__(self, rngs: nnx.Rngs):
        self.hidden_1 = nnx.Linear(784, 256, rngs=rngs)
        self.hidden_2 = nnx.Linear(256, 256, rngs=rngs)
        self.output = nnx.Linear(256, 10, rngs=rngs)

    def __call__(self, images):
        return self.output(nnx.relu(self.hidden_2(nnx.relu(self.hidden_1(images)))))


def loss_of(logits, labels):
    """The mean cross entropy of logits [B, 10] and int labels [B]: a 0-d array."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_model():
    """(the MLP from ``nnx.Rngs(0)``, ``optax.adam(1e-3)``): the same weights in every run."""
    return MLP(nnx.Rngs(0)), optax.adam(LEARNING_RATE)


class JaxData:
    def __init__(self, max_batches=None):
        data = load_fashion_mnist()
        images = (data.train_images.astype(np.float32) / 255.0).reshape(-1, 784)
        labels = data.train_labels.astype(np.int32)
        order = np.random.default_rng(0).permutation(len(labels))
        if max_batches is not None:
            order = order[: max_batches * BATCH_SIZE]
        self.train_images, self.train_labels = images[order], labels[order]
        self.batches = [
            (self.train_images[i : i + BATCH_SIZE], self.train_labels[i : i + BATCH_SIZE])
            for i in range(0, len(self.train_labels), BATCH_SIZE)
        ]
        self.test_images = (data.test_images.astype(np.float32) / 255.0).reshape(-1, 784)
        self.test_labels = data.test_labels.astype(np.int32)

    def evaluate(self, predict):
        """(training-set loss, test accuracy) of ``predict(images) -> logits``."""
        loss = float(loss_of(jnp.asarray(predict(self.train_images)), self.train_labels))
        predictions = np.argmax(np.asarray(predict(self.test_images)), axis=1)
        return loss, float(np.mean(predictions == self.test_labels))


def raw_train_step(graphdef, optimizer):
    """The hand-written step: ``(params, opt_state, images, labels) -> (params, opt_state, loss)``, compiled with
    the buffers of ``params`` and ``opt_state`` donated."""

    def step(params, opt_state, images, labels):
        def loss_fn(params):
            return loss_of(nnx.merge(graphdef, params)(images), labels)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def raw_floor(data):
    def setup():
        model, optimizer = make_model()
        graphdef, params = nnx.split(model)
        params = jax.tree_util.tree_map(jnp.array, params)  # own buffers: donation must not delete the model's
        opt_state = optimizer.init(params)
        step = raw_train_step(graphdef, optimizer)
        state = {}

        def train():
            nonlocal params, opt_state
            running_loss, count = jnp.zeros(()), 0
            for index, (images, labels) in enumerate(data.batches, start=1):
                params, opt_state, loss = step(params, opt_state, images, labels)
                running_loss += loss
                count += 1
                if index % LOG_PERIOD == 0:
                    print(f"batch {index}: mean loss {float(running_loss) / count:.3f}")
                    running_loss, count = jnp.zeros(()), 0
            jax.block_until_ready(params)
            state["model"] = nnx.merge(graphdef, params)

        return Run(train, lambda: data.evaluate(state["model"]))

    return Variant(
        "raw jax.jit",
        "floor",
        "nnx.split once, jax.jit step (nnx.merge, value_and_grad, optax) with donated buffers, mean loss printed "
        "every 200 batches (one host transfer each)",
        setup,
    )
