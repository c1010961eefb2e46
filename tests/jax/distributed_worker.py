"""Trains the classifier of ``tests/jax/test_distributed.py`` in one JAX process, or in several joined by
``mlpug.jax.distributed.launch`` (data parallel over the devices of every process), and writes process 0's results.

Run as ``python -m tests.jax.distributed_worker OUT_DIR NUM_PROCESSES [TIMEOUT_S [STEPS_PER_EXECUTION]]``;
``JAX_NUM_CPU_DEVICES`` sets the CPU devices of each process; ``STEPS_PER_EXECUTION`` (default 1) is the trainer's
``steps_per_execution`` (and so its ``evaluation_steps_per_execution``). ``OUT_DIR/results.npz`` gets the final weights,
the batch losses and accuracies, the validation accuracy and the keys of the auxiliary results as the metric saw them
(the model returns them not in alphabetical order) and the device counts of the loss it saw, ``OUT_DIR/checkpoints`` the
training checkpoints (written by process 0 only) and ``OUT_DIR/context_<rank>.txt`` each process's rank, world size,
whether it is the primary one and the mesh's device count.
"""

from __future__ import annotations

import os
import sys

import numpy as np

GLOBAL_BATCH_SIZE = 8
NUM_SAMPLES = 44  # 5 global batches of 8 and a short last one of 4 (2 per process) per epoch
NUM_EPOCHS = 2


def data(seed):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(NUM_SAMPLES, 6)).astype(np.float32)
    labels = (features[:, 0] + features[:, 1] > 0).astype(np.int32) + (features[:, 2] > 1).astype(np.int32)
    return features, labels


def train(out_dir: str, steps_per_execution: int = 1) -> None:
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
            return {"loss": loss, "auxiliary_results": {"probabilities": nnx.softmax(logits), "logits": logits}}

    auxiliary_keys = set()
    loss_devices = set()  # the devices of the loss a metric sees: 1 (this process's copy), never the mesh's

    def accuracy(inputs):
        auxiliary_keys.add(tuple(inputs.auxiliary_results))
        loss_devices.add(len(inputs.loss.devices()))
        predictions = jnp.argmax(inputs.auxiliary_results["logits"], axis=1)
        return jnp.mean((predictions == jnp.asarray(inputs.batch[1])).astype(jnp.float32))

    def correct(inputs):
        return jnp.argmax(inputs.auxiliary_results["logits"], axis=1) == jnp.asarray(inputs.batch[1])

    def accuracy_by_count(inputs):  # the right accuracy only when num_samples counts the batch the metric sees
        return jnp.sum(correct(inputs).astype(jnp.float32)) / inputs.num_samples

    def accuracy_of_labels_above_0(inputs):  # weighted by a count that differs between the processes' parts
        counted = jnp.asarray(inputs.batch[1]) > 0
        count = jnp.sum(counted.astype(jnp.float32))
        return jnp.sum((correct(inputs) & counted).astype(jnp.float32)) / jnp.maximum(count, 1.0), count

    rank, world_size = jax.process_index(), jax.process_count()
    # a different seed on every process but 0: the strategy broadcasts process 0's weights
    classifier = Classifier(seed=0 if rank == 0 else 100 + rank)
    # several processes: data parallel
    trainer = mlp.trainers.DefaultTrainer(optax.adam(0.01), classifier, steps_per_execution=steps_per_execution)
    trainer.set_training_model(TrainModel(classifier))
    losses, accuracies, batch_sizes, weighted = [], [], [], []

    class Record(mlp.callbacks.Callback):
        def batches_until_values_read(self, batch_step):
            return 0  # reads reduced values at every batch

        def on_batch_training_completed(self, training_batch, logs):
            losses.append(logs["current"]["training"]["batch"]["loss"])
            accuracies.append(logs["current"]["training"]["batch"]["accuracy"])
            weighted.append(
                [logs["current"]["training"]["batch"][name] for name in ("accuracy_by_count", "accuracy_above_0")]
            )
            batch_sizes.append(int(logs["current"]["training_params"]["batch"]["batch_size"]))

    evaluator = mlp.evaluation.MetricEvaluator(
        trainer=trainer,
        batch_metric_funcs={
            "loss": lambda inputs: inputs.loss,
            "accuracy": accuracy,
            "accuracy_by_count": accuracy_by_count,
            "accuracy_above_0": accuracy_of_labels_above_0,
        },
    )
    validation = mlp.data.ResumableArrayBatches(data(1), GLOBAL_BATCH_SIZE // world_size, shuffle=False)
    # process 1 gets a path of its own: it must write nothing there (only the primary process writes)
    checkpoints = os.path.join(out_dir, "checkpoints" if rank == 0 else f"checkpoints_of_{rank}")
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
    validation_weighted = [
        manager.logs["current"]["validation"]["dataset"][name] for name in ("accuracy_by_count", "accuracy_above_0")
    ]
    state = trainer.get_state()["model_components"]["model"]
    context = trainer.distributed_context()
    with open(os.path.join(out_dir, f"context_{rank}.txt"), "w") as file:
        file.write(
            f"{context.rank} {context.world_size} {context.is_primary} {getattr(trainer.strategy, 'num_devices', 1)}"
        )
    with open(os.path.join(out_dir, f"batch_sizes_{rank}.txt"), "w") as file:
        file.write(" ".join(map(str, batch_sizes)))
    with open(os.path.join(out_dir, f"refused_{rank}.txt"), "w") as file:
        refused = _refusals(mlp, classifier, TrainModel, next(iter(training)))
        file.write(refused)
    if rank == 0:
        np.savez(
            os.path.join(out_dir, "results.npz"),
            losses=np.asarray(losses, np.float64),
            accuracies=np.asarray(accuracies, np.float64),
            weighted=np.asarray(weighted, np.float64),
            validation_weighted=np.asarray(validation_weighted, np.float64),
            batch_sizes=np.asarray(batch_sizes, np.int64),
            refused=np.asarray(refused),
            validation_accuracy=np.float64(validation_accuracy),
            world_size=np.int64(world_size),
            auxiliary_keys=np.asarray(sorted(auxiliary_keys)),
            loss_devices=np.asarray(sorted(loss_devices)),
            **{f"weight.{name}": np.asarray(value) for name, value in _flat(state).items()},
        )


def _refusals(mlp, classifier, train_model_class, batch) -> str:
    """What several processes refuse, one line each (``name: ErrorType: message``), every process at the same point;
    ``allowed`` where it ran (one process):

    * ``num_samples``: a model that returns its own num_samples (at its first evaluation);
    * ``run_async``: an asynchronous evaluation's snapshot; ``run_async_logger``: a manager with
      ``TestMetricsLogger(run_async=True)`` (when it is made, before training);
    * ``auxiliary_sum``: a model whose auxiliary results hold a sum over the batch (0-d: the global batch's);
    * ``batch_number``: a batch with a Python number (a 0-d value no process can check);
    * ``training_sizes``: a training dataset whose padded last batch (1 sample per process) its 2 devices cannot
      split; ``evaluation_sizes``: an evaluation dataset whose last batch per process (3 samples) they cannot split;
    * ``uneven_shards``: an evaluation dataset whose shards have 2 and 3 batches; ``shard_without_len``: one whose
      shard has no len().
    """
    import jax.numpy as jnp
    import optax

    class CountingModel(train_model_class):
        def __call__(self, batch_data, evaluate_settings, inference_mode=None):
            outputs = super().__call__(batch_data, evaluate_settings, inference_mode)
            return {**outputs, "num_samples": jnp.sum(batch_data[1] > 0)}

    class SumModel(train_model_class):  # sum(pred == y) / inputs.num_samples: the global count / the local samples
        def __call__(self, batch_data, evaluate_settings, inference_mode=None):
            outputs = super().__call__(batch_data, evaluate_settings, inference_mode)
            correct = jnp.sum(jnp.argmax(outputs["auxiliary_results"]["logits"], axis=1) == batch_data[1])
            return {
                "loss": outputs["loss"],
                "auxiliary_results": {"logits": outputs["auxiliary_results"]["logits"], "correct": correct},
            }

    class NumberModel(train_model_class):  # batches (features, labels, scale)
        def __call__(self, batch_data, evaluate_settings, inference_mode=None):
            outputs = super().__call__(batch_data[:2], evaluate_settings, inference_mode)
            return {**outputs, "loss": outputs["loss"] * batch_data[2]}

    class Shards:  # shard(rank, world_size) of rank + 2 batches: 2 on process 0, 3 on process 1
        def __init__(self, with_len=True):
            self.with_len = with_len

        def shard(self, rank, world_size):
            batches = [batch] * (rank + 2)
            return batches if self.with_len else iter(batches)

    def manager_with_async_logger():
        validation = mlp.data.ResumableArrayBatches(data(1), 4, shuffle=False)
        logger = mlp.callbacks.TestMetricsLogger(
            validation, "validation", metric_evaluator=mlp.evaluation.MetricEvaluator(trainer=trainer), run_async=True
        )
        training = mlp.data.ResumableArrayBatches(data(0), 4)
        mlp.trainers.TrainingManager(trainer, training, num_epochs=1, callbacks=[logger], handle_signals=False)

    def arrays(num_samples):
        return np.zeros((num_samples, 6), np.float32), np.zeros(num_samples, np.int32)

    lines = []
    trainer = mlp.trainers.DefaultTrainer(optax.adam(0.01), classifier)
    for name, attempt in (
        ("num_samples", lambda: (trainer.set_training_model(CountingModel(classifier)), trainer.evaluate_loss(batch))),
        ("run_async", trainer.evaluation_snapshot),
        ("run_async_logger", manager_with_async_logger),
        ("auxiliary_sum", lambda: (trainer.set_training_model(SumModel(classifier)), trainer.evaluate_loss(batch))),
        (
            "batch_number",
            lambda: (trainer.set_training_model(NumberModel(classifier)), trainer.evaluate_loss((*batch, 1.0))),
        ),
        # 42 samples, 4 per process: 5 global batches of 8, the last of 2 padded to 1 per process
        ("training_sizes", lambda: trainer.strategy.training_dataset(mlp.data.ResumableArrayBatches(arrays(42), 4))),
        # 46 samples: 23 per process, batches of 4 and a last one of 3
        ("evaluation_sizes", lambda: trainer.evaluation_dataset(mlp.data.ResumableArrayBatches(arrays(46), 4))),
        ("uneven_shards", lambda: trainer.evaluation_dataset(Shards())),
        ("shard_without_len", lambda: trainer.evaluation_dataset(Shards(with_len=False))),
    ):
        try:
            attempt()
            lines.append(f"{name}: allowed")
        except (ValueError, RuntimeError, TypeError) as error:
            lines.append(f"{name}: {type(error).__name__}: {error}")
    return "\n".join(lines)


def fail_in_process_1(out_dir: str) -> None:
    """For the launcher's failure report: process 1 raises, process 0 returns."""
    import jax

    if jax.process_index() == 1:
        raise ValueError(f"process 1 fails on purpose ({out_dir})")


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): tree}


if __name__ == "__main__":
    from mlpug.jax.distributed import launch

    out, processes = sys.argv[1], int(sys.argv[2])
    timeout = float(sys.argv[3]) if len(sys.argv) > 3 else None
    steps = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    os.makedirs(out, exist_ok=True)
    launch(train, out, steps, num_processes=processes, timeout_s=timeout)
