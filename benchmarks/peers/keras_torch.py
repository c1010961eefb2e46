"""Process (b) of the peer benchmark: Keras 3 ``model.fit`` with the torch backend, against the raw PyTorch loop
of the same process (Keras fixes its backend at import, so this needs a process of its own; see ``run.py``).

Job, data pipeline and rounds: see ``common.py`` and ``torch_job.py``; Keras trains on the same torch DataLoader
as the floor. The Keras model is the same MLP (``keras.Sequential`` of ``Dense`` layers, seeded with
``keras.utils.set_random_seed(0)``; Keras' own initialisation, so its losses differ a little from the PyTorch
models'), compiled with ``keras.optimizers.Adam(learning_rate=1e-3)`` and
``SparseCategoricalCrossentropy(from_logits=True)`` (``jit_compile="auto"`` is eager on the torch backend); timed
is ``model.fit(loader, epochs=1)``, lean with ``verbose=0``, default with Keras' default ``verbose="auto"`` (the
progress bar).

    .venv-peers/bin/python benchmarks/peers/keras_torch.py --rounds 8 --out /tmp/keras_torch.json
"""

import os

os.environ["KERAS_BACKEND"] = "torch"

import common  # noqa: E402
import keras  # noqa: E402
import torch  # noqa: E402
import torch_job  # noqa: E402
from common import LEARNING_RATE, Run, Variant  # noqa: E402


def make_keras_model():
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
    )
    return model


def keras_variants(data):
    def make(fit_kwargs):
        def setup():
            model = make_keras_model()
            loader = data.loader()
            return Run(
                lambda: model.fit(loader, epochs=1, **fit_kwargs),
                lambda: data.evaluate(lambda images: model(images, training=False)),
            )

        return setup

    return [
        Variant("Keras (torch)", "lean", "model.fit(verbose=0)", make({"verbose": 0})),
        Variant("Keras (torch)", "default", 'model.fit() (verbose="auto": progress bar)', make({})),
    ]


def main():
    args = common.parse_args(__doc__)
    if keras.backend.backend() != "torch":
        raise RuntimeError(f"Keras runs on {keras.backend.backend()!r}, not torch: KERAS_BACKEND was set too late")
    torch_job.set_one_thread()
    data = torch_job.TorchData(args.max_batches)
    floor = torch_job.raw_floor(data)
    variants = [floor] + keras_variants(data)
    common.progress(
        f"process (b) Keras, torch backend: {len(variants)} variants, {len(data.batches)} batches, "
        f"1 + {args.rounds} rounds"
    )
    common.run_rounds(variants, args.rounds, check=torch_job.check_one_thread)
    common.write_results(
        args,
        "Keras (torch backend)",
        floor,
        variants,
        {"torch_threads": torch.get_num_threads(), "keras_backend": keras.backend.backend()},
    )


if __name__ == "__main__":
    main()
