"""The JAX side of the peer benchmark: one XLA CPU thread, data, the Flax NNX model, the raw ``jax.jit`` floor
(used by ``jax_peers.py`` and ``keras_jax.py``; see ``common.py`` for the job and ``run.py`` for how to run).

Import this module before anything imports JAX: it sets ``XLA_FLAGS`` so that XLA's CPU client runs every
operation in the calling thread (``--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``, the one
thread of the other processes) and JAX on the CPU.

The job (``--job``, ``common.JAX_JOBS``): ``mlp`` (the default, the job of every other process: MLP
784-256-256-10, batch 64, one epoch; compute bound) or ``tiny`` (MLP 196-32-10 on 2x2-pooled images, batch 32, two
epochs; dispatch bound).

Data, the same for every JAX framework: the training set in a fixed permutation (``np.random.default_rng(0)``, as
``tensorflow_peers.TFData``), images float32 ``[N, 784]`` in [0, 1] (``tiny``: 2x2 averages, ``[N, 196]``), labels
int32 ``[N]``, cut into NumPy batches of the job's size (``mlp``: 938 batches of 64, the last of 32 samples;
``tiny``: 1875 of 32) built once (``JaxData.batches``) and trained in the same order every epoch; Keras ``fit``
slices the same arrays in the same order itself (``shuffle=False``).

Model (``make_model``): the job's MLP as ``flax.nnx.Linear`` layers from ``nnx.Rngs(0)``, so the floor and mlpug start
from the same weights; optimizer ``optax.adam(1e-3)``; loss
``optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()``.

The floor (``raw_floor``): what a JAX user writes by hand, the functional Flax NNX pattern: ``nnx.split`` of the model
into its graph definition and its parameters once, then one ``jax.jit`` step that merges them
(``nnx.merge``), takes ``jax.value_and_grad`` of the loss, applies optax's update and returns the new parameters
and optimizer state, their input buffers donated (``donate_argnums``); the loop (over the job's epochs) sums the
losses as a device array and prints the mean every 200 batches (one host transfer each). Every timed ``train()``
of this process ends with ``jax.block_until_ready`` on the trained weights (JAX dispatches asynchronously).

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
from common import JAX_JOBS, LEARNING_RATE, LOG_PERIOD, Run, Variant  # noqa: E402
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
    """The MLP of ``layers`` (e.g. ``(784, 256, 256, 10)``: layers ``hidden_1``, ``hidden_2``, ``output``), ReLU
    between them: images float32 [B, layers[0]] to logits [B, layers[-1]]."""

    def __init__(self, layers, rngs: nnx.Rngs):
        self.num_hidden = len(layers) - 2
        for index in range(self.num_hidden):
            setattr(self, f"hidden_{index + 1}", nnx.Linear(layers[index], layers[index + 1], rngs=rngs))
        self.output = nnx.Linear(layers[-2], layers[-1], rngs=rngs)

    def __call__(self, images):
        for index in range(self.num_hidden):
            images = nnx.relu(getattr(self, f"hidden_{index + 1}")(images))
        return self.output(images)


def loss_of(logits, labels):
    """The mean cross entropy of logits [B, 10] and int labels [B]: a 0-d array."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_model(job):
    """(the MLP of ``job`` (a ``JAX_JOBS`` entry) from ``nnx.Rngs(0)``, ``optax.adam(1e-3)``): the same weights in
    every run."""
    return MLP(job["layers"], nnx.Rngs(0)), optax.adam(LEARNING_RATE)


def pixels(images, pool):
    """uint8 images [N, 28, 28] as float32 [N, (28 / pool)**2] in [0, 1]: the averages of ``pool`` x ``pool``
    squares (``pool`` 1: the pixels)."""
    images = images.astype(np.float32) / 255.0
    if pool == 1:
        return images.reshape(-1, 28 * 28)
    side = 28 // pool
    return images.reshape(-1, side, pool, side, pool).mean(axis=(2, 4)).reshape(-1, side * side)


class JaxData:
    """The training batches and the test set of a job (module docstring)."""

    def __init__(self, job_name="mlp", max_batches=None):
        self.job_name = job_name
        self.job = JAX_JOBS[job_name]
        self.batch_size, self.epochs = self.job["batch_size"], self.job["epochs"]
        data = load_fashion_mnist()
        images = pixels(data.train_images, self.job["pool"])
        labels = data.train_labels.astype(np.int32)
        order = np.random.default_rng(0).permutation(len(labels))
        if max_batches is not None:
            order = order[: max_batches * self.batch_size]
        self.train_images, self.train_labels = images[order], labels[order]
        self.batches = [
            (self.train_images[i : i + self.batch_size], self.train_labels[i : i + self.batch_size])
            for i in range(0, len(self.train_labels), self.batch_size)
        ]
        self.test_images = pixels(data.test_images, self.job["pool"])
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
        model, optimizer = make_model(data.job)
        graphdef, params = nnx.split(model)
        params = jax.tree_util.tree_map(jnp.array, params)  # own buffers: donation must not delete the model's
        opt_state = optimizer.init(params)
        step = raw_train_step(graphdef, optimizer)
        state = {}

        def train():
            nonlocal params, opt_state
            for _ in range(data.epochs):
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
