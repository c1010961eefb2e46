"""Time to write a training checkpoint vs the backend's plain save of the same state (~10 M parameters + Adam).

Variants, interleaved in every repetition (so load from other processes affects all alike); min and median:

* ``plain``: PyTorch ``torch.save(trainer.get_state(), path)`` / TensorFlow ``tf.train.Checkpoint.write`` of the
  model and optimizer: no fsync, no atomic rename (what a user would write by hand).
* ``plain+fsync``: the same, followed by ``os.fsync`` of the file (PyTorch only; the fair durable baseline).
* ``mlpug sync``: one checkpoint period of the ``CheckpointManager`` itself, through its own hooks
  (``on_epoch_completed`` decides "best", ``on_epoch_checkpoint`` writes), with ``write_in_background=False``:
  every period improves the monitored metric, so it writes all the files of a real period: the best model
  checkpoint, the latest model checkpoint and the training checkpoint (``manager.get_state()``: trainer,
  counters, callbacks, RNG states, data order), each with temporary file, fsync, atomic rename, dir fsync.
* ``mlpug blocked``: the same period with ``write_in_background=True`` (default): the time the training loop is
  blocked in ``on_epoch_checkpoint`` (``get_state`` + snapshot copy to host memory + starting the writer).
* ``mlpug background total``: blocked time + the background writes until the files are durable (the shortest
  checkpoint period that never blocks on the previous write).
* ``load``: ``saver.load(path)`` of the training checkpoint just written (memory-mapped safetensors read, header
  check, CRC-32 verification of every byte, structure decoding); the file is in the page cache. No ratio: it
  is not a save.

mlpug writes safetensors files (checkpoint format version 2); the ``plain`` baselines are unchanged.

    python benchmarks/checkpoint.py --backend pytorch --repetitions 7
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

NUM_INPUTS, NUM_HIDDEN = 1000, 5000  # 1000*5000 + 5000 + 5000*1000 + 1000 = 10,006,000 parameters


def build_pytorch():
    import torch

    import mlpug.pytorch as mlp

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(NUM_INPUTS, NUM_HIDDEN), torch.nn.Linear(NUM_HIDDEN, NUM_INPUTS))
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, NUM_INPUTS)).sum().backward()
    optimizer.step()  # creates the Adam moments: state = 3 x parameters
    trainer = mlp.trainers.DefaultTrainer(optimizers=optimizer, model_components=model)

    def plain(path, fsync=False):
        with open(path, "wb") as file:
            torch.save(trainer.get_state(), file)
            if fsync:
                file.flush()
                os.fsync(file.fileno())

    return mlp, trainer, sum(p.numel() for p in model.parameters()), plain


def build_tensorflow():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    import mlpug.tensorflow as mlp

    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential(
        [tf.keras.Input(shape=(NUM_INPUTS,)), tf.keras.layers.Dense(NUM_HIDDEN), tf.keras.layers.Dense(NUM_INPUTS)]
    )
    optimizer = tf.keras.optimizers.Adam()
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(tf.random.normal([2, NUM_INPUTS])))
    optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
    trainer = mlp.trainers.DefaultTrainer(optimizers=optimizer, model_components=model, eager_mode=True)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)

    def plain(path, fsync=False):
        checkpoint.write(path)

    return mlp, trainer, model.count_params(), plain


def period_runner(mlp, trainer, directory: str, write_in_background: bool):
    """A function running one checkpoint period of a real ``CheckpointManager`` (see the module docstring)."""
    from mlpug.logs import MetricValues, new_current

    class ScriptedValidation(mlp.callbacks.Callback):
        produces = frozenset({"validation"})  # writes logs.current.validation.dataset.loss

    checkpoint_manager = mlp.callbacks.CheckpointManager(
        checkpoints_path=directory, metric_to_monitor="validation.dataset.loss", write_in_background=write_in_background
    )
    manager = mlp.trainers.TrainingManager(
        trainer, [None], num_epochs=1, callbacks=[ScriptedValidation(), checkpoint_manager], handle_signals=False
    )
    periods = iter(range(1_000_000))

    def period():
        epoch = next(periods)
        logs = manager.logs
        logs["current"] = new_current(epoch, 1, epoch + 1)
        logs["current"]["validation"] = {"dataset": MetricValues(loss=1.0 / (epoch + 1))}  # always an improvement
        checkpoint_manager.on_epoch_completed(logs)  # decides "best"
        start = time.perf_counter()
        checkpoint_manager.on_epoch_checkpoint(logs)  # writes (or snapshots and starts the writer)
        blocked = time.perf_counter() - start
        checkpoint_manager.wait_for_writes()
        return blocked, time.perf_counter() - start

    return period, checkpoint_manager


def measure(backend: str, repetitions: int, directory: str) -> dict:
    mlp, trainer, num_parameters, plain = build_pytorch() if backend == "pytorch" else build_tensorflow()
    sync_period, checkpoint_manager = period_runner(mlp, trainer, os.path.join(directory, "sync"), False)
    background_period, _ = period_runner(mlp, trainer, os.path.join(directory, "background"), True)
    saver, path = checkpoint_manager.saver, checkpoint_manager.file_names.training

    variants = {"plain": lambda: plain(os.path.join(directory, "plain"))}
    if backend == "pytorch":
        variants["plain+fsync"] = lambda: plain(os.path.join(directory, "plain-fsync"), fsync=True)
    variants["mlpug sync"] = sync_period
    variants["load"] = lambda: saver.load(path)
    names = [name for name in variants if name != "load"] + ["mlpug blocked", "mlpug background total", "load"]
    times: dict = {name: [] for name in names}  # the order of the table
    background_period()  # warm up every path once
    for function in variants.values():
        function()
    for _ in range(repetitions):
        for name, function in variants.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
        blocked, total = background_period()
        times["mlpug blocked"].append(blocked)
        times["mlpug background total"].append(total)
    size = os.path.getsize(path)
    return {"num_parameters": num_parameters, "file_bytes": size, "file": os.path.basename(path), "times": times}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["pytorch", "tensorflow"], default="pytorch")
    parser.add_argument("--repetitions", type=int, default=7)
    parser.add_argument("--dir", default=None, help="directory to write into (default: a temporary one)")
    args = parser.parse_args(argv)
    import mlpug  # the copy measured (run from another checkout: PYTHONPATH=. python benchmarks/checkpoint.py)

    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        result = measure(args.backend, args.repetitions, directory)
    times = result["times"]
    baseline = statistics.median(times["plain"])
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"mlpug: {os.path.dirname(mlpug.__file__)}, checkpoint file {result['file']}")
    print(f"backend: {args.backend}, {result['num_parameters']:,} parameters, training checkpoint "
          f"{result['file_bytes'] / 1e6:.1f} MB, {args.repetitions} repetitions")  # fmt: skip
    print(f"{'variant':<24} {'min s':>8} {'median s':>9} {'median / plain':>15}")
    for name, values in times.items():
        median = statistics.median(values)
        ratio = "-" if name == "load" else f"{median / baseline:.2f}"
        print(f"{name:<24} {min(values):>8.3f} {median:>9.3f} {ratio:>15}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
