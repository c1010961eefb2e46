"""Process (e) of the peer benchmark: Keras 3 ``model.fit`` on the JAX backend, against the raw ``jax.jit`` loop of
the same process (Keras fixes its backend at import, so it runs in a process of its own with ``KERAS_BACKEND=jax``;
see ``run.py``).

Job and rounds: see ``common.py``; the job (``--job mlp``, the default, or ``--job tiny``), data, the one XLA CPU
thread and the floor: see ``jax_job.py``. Keras trains on the same arrays in the same order (``fit(images, labels,
batch_size=64, shuffle=False, epochs=1)`` for ``mlp``: Keras slices them into the same 938 batches itself). The
Keras model is the same MLP (``keras.Sequential`` of ``Dense`` layers, seeded with
``keras.utils.set_random_seed(0)``: Keras' own initialisation, so its losses differ a little from the NNX models'),
compiled with ``keras.optimizers.Adam(learning_rate=1e-3)`` and ``SparseCategoricalCrossentropy(from_logits=True)``
(``jit_compile="auto"``: XLA on the JAX backend). Timed: ``model.fit`` and ``jax.block_until_ready`` on the trained
weights, the first compilation included, as for every variant of ``jax_peers.py``.

* lean: ``model.fit(..., verbose=0)``; default: the default ``verbose="auto"`` (the progress bar);
* default, K=32: ``model.compile(steps_per_execution=32)``, ``verbose="auto"``: the peer of mlpug's
  ``DefaultTrainer(steps_per_execution=32)`` with the standard callbacks in ``jax_peers.py``.

    KERAS_BACKEND=jax .venv/bin/python benchmarks/peers/keras_jax.py --rounds 6 --out /tmp/keras_jax.json
    KERAS_BACKEND=jax .venv/bin/python benchmarks/peers/keras_jax.py --job tiny --rounds 6 --out /tmp/keras_tiny.json
"""

import os

import jax_job  # noqa: I001  (first: it sets XLA_FLAGS before JAX is imported)

os.environ["KERAS_BACKEND"] = "jax"

import common  # noqa: E402
import jax  # noqa: E402
import keras  # noqa: E402
from common import JAX_JOBS, LEARNING_RATE, Run, Variant  # noqa: E402


def make_keras_model(job, steps_per_execution=1):
    """The MLP of ``job`` (a ``JAX_JOBS`` entry) as a compiled ``keras.Sequential``, seeded with 0."""
    keras.utils.set_random_seed(0)
    layers = job["layers"]
    model = keras.Sequential(
        [keras.Input(shape=(layers[0],))]
        + [keras.layers.Dense(size, activation="relu") for size in layers[1:-1]]
        + [keras.layers.Dense(layers[-1])]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=LEARNING_RATE),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        steps_per_execution=steps_per_execution,
    )
    return model


def keras_variants(data):
    def make(fit_kwargs, steps_per_execution=1):
        def setup():
            model = make_keras_model(data.job, steps_per_execution)

            def train():
                model.fit(
                    data.train_images,
                    data.train_labels,
                    batch_size=data.batch_size,
                    shuffle=False,
                    epochs=data.epochs,
                    **fit_kwargs,
                )
                jax.block_until_ready([variable.value for variable in model.trainable_variables])

            return Run(train, lambda: data.evaluate(lambda images: model(images, training=False)))

        return setup

    return [
        Variant("Keras (JAX)", "lean", "model.fit(verbose=0)", make({"verbose": 0})),
        Variant("Keras (JAX)", "default", 'model.fit() (verbose="auto": progress bar)', make({})),
        Variant(
            "Keras (JAX)",
            "default, K=32",
            'model.compile(steps_per_execution=32); model.fit() (verbose="auto")',
            make({}, steps_per_execution=32),
        ),
    ]


def main():
    args = common.parse_args(__doc__, jobs=JAX_JOBS)
    if keras.backend.backend() != "jax":
        raise RuntimeError(f"Keras runs on {keras.backend.backend()!r}, not jax: KERAS_BACKEND was set too late")
    jax_job.check_one_thread()
    data = jax_job.JaxData(args.job, args.max_batches)
    floor = jax_job.raw_floor(data)
    variants = [floor] + common.select(keras_variants(data), args.only)
    common.progress(
        f"process (e) Keras, JAX backend, job {args.job}: {len(variants)} variants, "
        f"{data.epochs} x {len(data.batches)} batches, "
        f"1 + {args.rounds} rounds"
    )
    common.run_rounds(variants, args.rounds)
    common.write_results(
        args,
        "Keras (JAX backend)",
        floor,
        variants,
        {
            "job": args.job,
            "xla_flags": os.environ.get("XLA_FLAGS"),
            "compilation_cache": jax_job.COMPILATION_CACHE,
            "keras_backend": keras.backend.backend(),
        },
    )


if __name__ == "__main__":
    main()
