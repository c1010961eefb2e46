"""Trains the classifier of ``tests/jax/test_distributed.py`` in one JAX process, or in several joined by
``mlpug.jax.distributed.launch`` (data parallel over the devices of every process), and writes process 0's results.

Run as ``python -m tests.jax.distributed_worker OUT_DIR NUM_PROCESSES [TIMEOUT_S]``; ``JAX_NUM_CPU_DEVICES`` sets the
CPU devices of each process. ``OUT_DIR/results.npz`` gets the final weights, the batch losses and accuracies
and the validation accuracy, ``OUT_DIR/checkpoints`` the training checkpoints (written by process 0 only) and
``OUT_DIR/context_<rank>.txt`` each process's rank, world size, whether it is the primary one and the mesh's
device count.
"""

from __future__ import annotations

import os
import sys

import numpy as np

GLOBAL_BATCH_SIZE = 8
NUM_SAMPLES = 40
NUM_EPOCHS = 2


def data(seed):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(NUM_SAMPLES, 6)).astype(np.float32)
    labels = (features[:, 0] + features[:, 1] > 0).astype(np.int32) + (features[:, 2] > 1).astype(np.int32)
    return features, labels


def train(out_dir: str) -> None:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import mlpug.jax as mlp

    class Classifier(nnx.Module):
        def __init__(self, seed):
            rngs = nnx.Rngs(seed)
            self.hidden = nnx.Linear(6, 16, rngs=rngs)
            self.output = nnx.Linear(16, 3, rngs=rngs)

        def __call__(self, features):
            return self.output(nnx.relu(self.hidden(features)))

    class TrainModel(nnx.Module):
        def __init__(self, classifier):
            self.classifier = classifier

        def __call__(self, batch_data, evaluate_settings, inference_mode=None):
            features, labels = batch_data
            logits = self.classifier(features)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return {"loss": loss, "auxiliary_results": logits}

    def accuracy(inputs):
        predictions = jnp.argmax(inputs.auxiliary_results, axis=1)
        return jnp.mean((predictions == jnp.asarray(inputs.batch[1])).astype(jnp.float32))

    rank, world_size = jax.process_index(), jax.process_count()
    # a different seed on every process but 0: the strategy broadcasts process 0's weights
    classifier = Classifier(seed=0 if rank == 0 else 100 + rank)
    trainer = mlp.trainers.DefaultTrainer(optax.adam(0.01), classifier)  # several processes: data parallel
    trainer.set_training_model(TrainModel(classifier))
    losses, accuracies = [], []

    class Record(mlp.callbacks.Callback):
        def batches_until_values_read(self, batch_step):
            return 0  # reads reduced values at every batch

        def on_batch_training_completed(self, training_batch, logs):
            losses.append(logs["current"]["training"]["batch"]["loss"])
            accuracies.append(logs["current"]["training"]["batch"]["accuracy"])

    evaluator = mlp.evaluation.MetricEvaluator(
        trainer=trainer, batch_metric_funcs={"loss": lambda inputs: inputs.loss, "accuracy": accuracy}
    )
    validation = mlp.data.ResumableArrayBatches(data(1), GLOBAL_BATCH_SIZE // world_size, shuffle=False)
    checkpoints = os.path.join(out_dir, "checkpoints")
    callbacks = [
        mlp.callbacks.TrainingMetricsLogger(evaluator),
        mlp.callbacks.TestMetricsLogger(validation, "validation", metric_evaluator=evaluator),
        Record("Record"),
        mlp.callbacks.CheckpointManager(checkpoints_path=checkpoints, metric_to_monitor=None),
    ]
    training = mlp.data.ResumableArrayBatches(data(0), GLOBAL_BATCH_SIZE // world_size, seed=3)
    manager = mlp.trainers.TrainingManager(
        trainer, training, num_epochs=NUM_EPOCHS, callbacks=callbacks, handle_signals=False
    )
    manager.start_training()
    validation_accuracy = manager.logs["current"]["validation"]["dataset"]["accuracy"]
    state = trainer.get_state()["model_components"]["model"]
    context = trainer.distributed_context()
    with open(os.path.join(out_dir, f"context_{rank}.txt"), "w") as file:
        file.write(
            f"{context.rank} {context.world_size} {context.is_primary} {getattr(trainer.strategy, 'num_devices', 1)}"
        )
    if rank == 0:
        np.savez(
            os.path.join(out_dir, "results.npz"),
            losses=np.asarray(losses, np.float64),
            accuracies=np.asarray(accuracies, np.float64),
            validation_accuracy=np.float64(validation_accuracy),
            world_size=np.int64(world_size),
            **{f"weight.{name}": np.asarray(value) for name, value in _flat(state).items()},
        )


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): tree}


if __name__ == "__main__":
    from mlpug.jax.distributed import launch

    out, processes = sys.argv[1], int(sys.argv[2])
    timeout = float(sys.argv[3]) if len(sys.argv) > 3 else None
    os.makedirs(out, exist_ok=True)
    launch(train, out, num_processes=processes, timeout_s=timeout)
