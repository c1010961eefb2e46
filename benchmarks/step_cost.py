"""mlpug's own work per training step, measured where the step itself costs almost nothing.

Model: ``Linear(4, 2)``, batch 2, SGD, 3000 steps from a pre-built list of batches, 1 torch thread. ``raw`` is
the hand-written step (``zero_grad; loss; backward; step``); ``mlpug`` is ``DefaultTrainer`` + ``TrainingManager``
with the standard callbacks (``TrainingMetricsLogger``, ``LogProgress(log_period=1000)``). The difference of the
two, per step, is what mlpug adds to every step (in microseconds). Side by side in one process, both garbage
collector modes (``timing.py``).

    .venv/bin/python benchmarks/step_cost.py --repetitions 9
"""

import argparse
import statistics

import torch
from timing import GC_MODES, clock, elapsed, interleaved

import mlpug.pytorch as mlp

NUM_STEPS = 3000


class TrainModel(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch_data, evaluate_settings, inference_mode=None):
        features, labels = batch_data
        return torch.nn.functional.cross_entropy(self.model(features), labels)


def make():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.01)


def run_raw(batches):
    model, optimizer = make()
    train_model = TrainModel(model)
    start = clock()
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        train_model(batch, None).backward()
        optimizer.step()
    return elapsed(start)


def run_mlpug(batches):
    model, optimizer = make()
    trainer = mlp.trainers.DefaultTrainer(optimizers=optimizer, model_components=model)
    trainer.set_training_model(TrainModel(model))
    callbacks = [
        mlp.callbacks.TrainingMetricsLogger(mlp.evaluation.MetricEvaluator(trainer=trainer)),
        mlp.callbacks.LogProgress(log_period=1000, set_names=["training"]),
    ]
    manager = mlp.trainers.TrainingManager(trainer, batches, callbacks=callbacks)
    start = clock()
    manager.start_training()
    return elapsed(start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repetitions", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    mlp.logging.set_level("WARNING")
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(2, 4, generator=generator), torch.randint(0, 2, (2,), generator=generator))] * NUM_STEPS
    run_raw(batches[:100]), run_mlpug(batches[:100])  # warm-up
    times = interleaved({"raw": run_raw, "mlpug": run_mlpug}, batches, args.repetitions)
    print(f"torch {torch.__version__}, 1 thread, {NUM_STEPS} steps of Linear(4, 2), {args.repetitions} repetitions")
    print(
        "| GC | raw step, median (us) | mlpug step, median (us) | mlpug's own work per step, median [min - max] (us) |"
    )
    print("|---|---|---|---|")
    for mode in GC_MODES:
        raw = [wall for wall, _ in times[("raw", mode)]]
        mine = [wall for wall, _ in times[("mlpug", mode)]]
        extra = [(m - r) / NUM_STEPS * 1e6 for m, r in zip(mine, raw)]  # the runs of one repetition, paired
        print(
            f"| {mode} | {statistics.median(raw) / NUM_STEPS * 1e6:.1f} | "
            f"{statistics.median(mine) / NUM_STEPS * 1e6:.1f} "
            f"| {statistics.median(extra):.1f} [{min(extra):.1f} - {max(extra):.1f}] |"
        )


if __name__ == "__main__":
    main()
