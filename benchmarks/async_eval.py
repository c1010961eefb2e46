"""How much of the validation time asynchronous evaluation hides: Fashion-MNIST, a small CNN, 5 epochs.

Each epoch trains on the first ``--train-samples`` training images (batch 64, Adam 1e-3) and validates on all
10,000 test images (batch 500), so that the validation costs a real share of an epoch. Three modes, interleaved
in rounds in one process (this machine is noisy: separate runs minutes apart are not comparable):

* ``T0``: no validation;
* ``Ts``: synchronous validation at every epoch end (``TestMetricsLogger(..., run_async=False)``);
* ``Ta``: asynchronous validation (``run_async=True``, ``num_threads=1``): the snapshot of epoch k is evaluated
  on a worker thread while epoch k+1 trains; the last epoch's result is waited for.

Every mode uses the same cores: the training with 1 intra-op thread (PyTorch ``torch.set_num_threads(1)``;
TensorFlow 1 intra-op and 2 inter-op threads, set before TensorFlow starts), the evaluation worker with 1, on a
2-core machine. The hidden share is ``1 - (Ta - T0) / (Ts - T0)``, per round; the target is
``(Ta - T0) / (Ts - T0) <= 0.15``. The final validation accuracy of both validated modes is printed as a check
(they must be equal: the same weights are evaluated).

    .venv/bin/python benchmarks/async_eval.py --backend pytorch --rounds 4
    .venv/bin/python benchmarks/async_eval.py --backend tensorflow --rounds 4
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np

from mlpug.datasets.fashion_mnist import load_fashion_mnist

NUM_EPOCHS = 5


def pytorch_run(data, mode: str) -> tuple[float, float]:
    import torch

    import mlpug.pytorch as mlp

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(32 * 7 * 7, 10),
    )  # fmt: skip

    class TrainModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, batch, evaluate_settings, inference_mode=None):
            images, labels = batch
            logits = self.model(images)
            return {"loss": torch.nn.functional.cross_entropy(logits, labels), "auxiliary_results": logits}

    train_x, train_y, test_x, test_y = (torch.from_numpy(array) for array in data)
    training = mlp.data.ResumableArrayBatches((train_x, train_y), 64, shuffle=True, seed=0)
    validation = mlp.data.ResumableArrayBatches((test_x, test_y), 500, shuffle=False)
    trainer = mlp.trainers.DefaultTrainer(torch.optim.Adam(model.parameters(), lr=1e-3), model)
    trainer.set_training_model(TrainModel())
    return _train(mlp, trainer, training, validation, mode)


def tensorflow_run(data, mode: str) -> tuple[float, float]:
    import tensorflow as tf

    import mlpug.tensorflow as mlp

    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential(
        [
            tf.keras.Input(shape=(28, 28, 1)),
            tf.keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            tf.keras.layers.MaxPooling2D(2),
            tf.keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            tf.keras.layers.MaxPooling2D(2),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(10),
        ]
    )
    loss_function = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    class TrainModel(tf.keras.Model):
        def call(self, batch, evaluate_settings=None, inference_mode=None):
            images, labels = batch
            logits = model(images, training=not inference_mode)
            return {"loss": loss_function(labels, logits), "auxiliary_results": logits}

    train_x, train_y, test_x, test_y = data
    training = mlp.data.ResumableArrayBatches((train_x[..., None], train_y), 64, shuffle=True, seed=0)
    validation = mlp.data.ResumableArrayBatches((test_x[..., None], test_y), 500, shuffle=False)
    trainer = mlp.trainers.DefaultTrainer(tf.keras.optimizers.Adam(1e-3), model)
    trainer.set_training_model(TrainModel())
    return _train(mlp, trainer, training, validation, mode)


def _train(mlp, trainer, training, validation, mode: str) -> tuple[float, float]:
    """Seconds of ``start_training`` for 5 epochs, and the final validation accuracy (NaN without validation)."""
    evaluator = mlp.evaluation.MetricEvaluator(trainer=trainer, batch_metric_funcs={"accuracy": mlp.metrics.accuracy})
    callbacks = [mlp.callbacks.TrainingMetricsLogger(evaluator)]
    if mode != "T0":
        callbacks.append(
            mlp.callbacks.TestMetricsLogger(
                validation, "validation", evaluator, run_async=mode == "Ta", num_threads=1 if mode == "Ta" else None
            )
        )
    manager = mlp.trainers.TrainingManager(trainer, training, num_epochs=NUM_EPOCHS, callbacks=callbacks)
    start = time.perf_counter()
    manager.start_training()
    seconds = time.perf_counter() - start
    validation_logs = manager.logs["current"].get("validation", {}).get("dataset")
    return seconds, float(validation_logs["accuracy"]) if validation_logs else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["pytorch", "tensorflow"], required=True)
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds; round 0 is a warm-up")
    parser.add_argument("--train-samples", type=int, default=12_000)
    args = parser.parse_args()
    if args.backend == "pytorch":
        import torch

        torch.set_num_threads(1)
        run = pytorch_run
    else:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(2)
        run = tensorflow_run
    fashion = load_fashion_mnist()
    n = args.train_samples
    data = (
        (fashion.train_images[:n].astype(np.float32) / 255.0)[:, None] if args.backend == "pytorch" else
        fashion.train_images[:n].astype(np.float32) / 255.0,
        fashion.train_labels[:n].astype(np.int64),
        (fashion.test_images.astype(np.float32) / 255.0)[:, None] if args.backend == "pytorch" else
        fashion.test_images.astype(np.float32) / 255.0,
        fashion.test_labels.astype(np.int64),
    )  # fmt: skip
    times: dict[str, list] = {"T0": [], "Ts": [], "Ta": []}
    accuracy: dict[str, float] = {}
    for round_index in range(args.rounds):
        for mode in times:
            seconds, accuracy[mode] = run(data, mode)
            if round_index > 0:  # round 0: cold (imports, first traces, page faults)
                times[mode].append(seconds)
            print(f"round {round_index} {mode}: {seconds:.2f} s", flush=True)
    ratios = [(ta - t0) / (ts - t0) for t0, ts, ta in zip(times["T0"], times["Ts"], times["Ta"])]
    print(
        f"\n{args.backend}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores; small CNN, "
        f"{NUM_EPOCHS} epochs of {n} training images (batch 64), validation on 10,000 test images every epoch; "
        f"{len(ratios)} rounds after a warm-up"
    )
    for mode, label in (("T0", "no validation"), ("Ts", "synchronous"), ("Ta", "asynchronous")):
        values = times[mode]
        print(f"{mode} {label:<14} median {statistics.median(values):6.2f} s  [{min(values):.2f}-{max(values):.2f}]")
    print(
        f"(Ta - T0) / (Ts - T0): median {statistics.median(ratios):.3f} [{min(ratios):.3f}-{max(ratios):.3f}] "
        f"(target <= 0.15); validation share of the epoch hidden: {1 - statistics.median(ratios):.0%}"
    )
    print(f"final validation accuracy: synchronous {accuracy['Ts']:.4f}, asynchronous {accuracy['Ta']:.4f}")


if __name__ == "__main__":
    main()
