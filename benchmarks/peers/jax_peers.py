"""Process (d) of the peer benchmark: mlpug's JAX backend against a hand-written ``jax.jit`` loop over the same
Flax NNX model, optax optimizer and batches, in one process.

Job and rounds: see ``common.py``; data, model, the one XLA CPU thread and the floor: see ``jax_job.py`` (every
variant gets the same list of NumPy batches, starts from the same weights, and its timed ``train()`` ends with
``jax.block_until_ready`` on the weights; the first call compiles in every run, so compilation is timed).

* raw (floor): ``jax_job.raw_floor``: ``nnx.split`` once, one ``jax.jit`` step with donated buffers.
* mlpug lean: ``DefaultTrainer(optimizers=optax.adam(1e-3), model_components=model)`` + ``TrainingManager``, no
  callbacks (the training model returns the loss); default: the standard callbacks (``TrainingMetricsLogger`` +
  ``LogProgress(log_period=200)``), as ``tensorflow_peers.py``.
* mlpug default, K=32: the standard callbacks and ``DefaultTrainer(steps_per_execution=32)`` (32 batches per
  compiled call, ``lax.scan``; every batch hook still runs for every batch). Compared (through the floor of each
  process) with Keras 3 ``fit`` on the JAX backend with ``steps_per_execution=32`` in ``keras_jax.py``.

``--job mlp`` (default) or ``--job tiny`` (``common.JAX_JOBS``; see ``jax_job.py``).

    .venv/bin/python benchmarks/peers/jax_peers.py --rounds 6 --out /tmp/jax_peers.json
    .venv/bin/python benchmarks/peers/jax_peers.py --job tiny --rounds 6 --out /tmp/jax_peers_tiny.json
"""

import jax_job  # noqa: I001  (first: it sets XLA_FLAGS before JAX is imported)

import common  # noqa: E402
import jax  # noqa: E402
from common import JAX_JOBS, LOG_PERIOD, Run, Variant  # noqa: E402
from flax import nnx  # noqa: E402

import mlpug.jax as mlp  # noqa: E402


class TrainModel(nnx.Module):
    """mlpug's training model: the classifier's mean cross entropy on a batch ``(images, labels)``."""

    def __init__(self, classifier):
        self.classifier = classifier

    def __call__(self, batch_data, evaluate_settings, inference_mode=None):
        images, labels = batch_data
        return jax_job.loss_of(self.classifier(images), labels)


def mlpug_variants(data):
    def make(standard_callbacks, steps_per_execution=1):
        def setup():
            model, optimizer = jax_job.make_model(data.job)
            options = {} if steps_per_execution == 1 else {"steps_per_execution": steps_per_execution}
            trainer = mlp.trainers.DefaultTrainer(optimizers=optimizer, model_components=model, **options)
            callbacks = []
            if standard_callbacks:
                evaluator = mlp.evaluation.MetricEvaluator(trainer=trainer)
                callbacks = [
                    mlp.callbacks.TrainingMetricsLogger(metric_evaluator=evaluator),
                    mlp.callbacks.LogProgress(log_period=LOG_PERIOD, set_names=["training"]),
                ]
            manager = mlp.trainers.TrainingManager(trainer, data.batches, num_epochs=data.epochs, callbacks=callbacks)
            trainer.set_training_model(TrainModel(model))

            def train():
                manager.start_training()
                jax.block_until_ready(nnx.state(model))

            return Run(train, lambda: data.evaluate(model))

        return setup

    return [
        Variant(
            "mlpug (JAX)",
            "lean",
            "DefaultTrainer (jax.jit, donated buffers) + TrainingManager, no callbacks",
            make(False),
        ),
        Variant(
            "mlpug (JAX)",
            "default",
            "standard callbacks: TrainingMetricsLogger + LogProgress(log_period=200)",
            make(True),
        ),
        Variant(
            "mlpug (JAX)",
            "default, K=32",
            "standard callbacks, DefaultTrainer(steps_per_execution=32)",
            make(True, steps_per_execution=32),
        ),
    ]


def main():
    args = common.parse_args(__doc__, jobs=JAX_JOBS)
    jax_job.check_one_thread()
    mlp.logging.set_level("WARNING")
    data = jax_job.JaxData(args.job, args.max_batches)
    floor = jax_job.raw_floor(data)
    variants = [floor] + common.select(mlpug_variants(data), args.only)
    common.progress(
        f"process (d) JAX, job {args.job}: {len(variants)} variants, {data.epochs} x {len(data.batches)} batches, "
        f"1 + {args.rounds} rounds"
    )
    common.run_rounds(variants, args.rounds)
    common.write_results(
        args,
        "JAX",
        floor,
        variants,
        {
            "job": args.job,
            "xla_flags": jax_job.os.environ.get("XLA_FLAGS"),
            "compilation_cache": jax_job.COMPILATION_CACHE,
            "devices": [str(d) for d in jax.devices()],
        },
    )


if __name__ == "__main__":
    main()
