"""Process (e) of the peer benchmark: Keras 3 ``model.fit`` on the JAX backend, against the raw ``jax.jit`` loop of
the same process (Keras fixes its backend at import, so it runs in a process of its own with ``KERAS_BACKEND=jax``;
see ``run.py``).

Job and rounds: see ``common.py``; data, the one XLA CPU thread and the floor: see ``jax_job.py``. Keras trains on
the same arrays in the same order (``fit(images, labels, batch_size=64, shuffle=False)``: Keras slices them into
the same 938 batches itself). The Keras model is the same MLP (``keras.Sequential`` of ``Dense`` layers, seeded with
``keras.utils.set_random_seed(0)``: Keras' own initialisation, so its losses differ a little from the NNX models'),
compiled with ``keras.optimizers.Adam(learning_rate=1e-3)`` and ``SparseCategoricalCrossentropy(from_logits=True)``
(``jit_compile="auto"``: XLA on the JAX backend). Timed: ``model.fit`` and ``jax.block_until_ready`` on the trained
weights, the first compilation included, as for every variant of ``jax_peers.py``.

* lean: ``model.fit(..., verbose=0)``; default: the default ``verbose="auto"`` (the progress bar);
* default, K=32: ``model.compile(steps_per_execution=32)``, ``verbose="auto"``: the peer of mlpug's
  ``DefaultTrainer(steps_per_execution=32)`` with the standard callbacks in ``jax_peers.py``.

    KERAS_BACKEND=jax .venv/bin/python benchmarks/peers/keras_jax.py --rounds 6 --out /tmp/keras_jax.json
"""

import os

import jax_job  # noqa: I001  (first: it sets XLA_FLAGS before JAX is imported)

os.environ["KERAS_BACKEND"] = "jax"

import common  # noqa: E402
import jax  # noqa: E402
import keras  # noqa: E402
from common import BATCH_SIZE, LEARNING_RATE, Run, Variant  # noqa: E402


def make_keras_model(steps_per_execution=1):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input(shape=(784,)),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(10),
        ]
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
            model = make_keras_model(steps_per_execution)

            def train():
                model.fit(
                    data.train_images, data.train_labels, batch_size=BATCH_SIZE, shuffle=False, epochs=1, **fit_kwargs
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
    args = common.parse_args(__doc__)
    if keras.backend.backend() != "jax":
        raise RuntimeError(f"Keras runs on {keras.backend.backend()!r}, not jax: KERAS_BACKEND was set too late")
    jax_job.check_one_thread()
    data = jax_job.JaxData(args.max_batches)
    floor = jax_job.raw_floor(data)
    variants = [floor] + common.select(keras_variants(data), args.only)
    common.progress(
        f"process (e) Keras, JAX backend: {len(variants)} variants, {len(data.batches)} batches, "
        f"1 + {args.rounds} rounds"
    )
    common.run_rounds(variants, args.rounds)
    common.write_results(
        args,
        "Keras (JAX backend)",
        floor,
        variants,
        {
            "xla_flags": os.environ.get("XLA_FLAGS"),
            "compilation_cache": jax_job.COMPILATION_CACHE,
            "keras_backend": keras.backend.backend(),
        },
    )


if __name__ == "__main__":
    main()
