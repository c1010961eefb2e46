"""Shared by the benchmark scripts: timed runs side by side in one process, with and without the garbage collector
as users run it, and the report of their ratios.

Garbage collection: a full collection traverses every object that exists (~170,000 after importing torch or
tensorflow, ~0.15 s on our 2-CPU machines), so whether one lands in a timed run is the largest source of noise.
How much a variant allocates decides how often that happens, so it belongs to what users pay: the headline is
the garbage collector **as users run it** (untouched). Beside it, every run is also measured **frozen**:
``gc.collect(); gc.freeze()`` first, which moves the existing objects out of the collector's reach (objects
the run allocates are still collected), the less noisy figure of the loop's own work.
"""

import contextlib
import gc
import io
import statistics
import time

GC_MODES = ("gc as users run it", "gc frozen")


def clock():
    """The start of a measurement: (wall, CPU) clocks."""
    return time.perf_counter(), time.process_time()


def elapsed(start):
    """(wall seconds, CPU seconds of this process) since ``start`` (from :func:`clock`)."""
    return time.perf_counter() - start[0], time.process_time() - start[1]


def timed_run(func, batches, gc_mode):
    """``func(batches)`` (which returns its ``(wall, CPU)`` seconds) with its printing discarded."""
    frozen = gc_mode == "gc frozen"
    if frozen:
        gc.collect()
        gc.freeze()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return func(batches)
    finally:
        if frozen:
            gc.unfreeze()


def interleaved(variants, batches, repetitions):
    """Every variant in both GC modes, in rotating order within every repetition (so load hits all alike).

    Returns:
        ``{(variant, gc_mode): [(wall, cpu), ...]}`` with one entry per repetition.
    """
    runs = [(name, mode) for mode in GC_MODES for name in variants]
    times = {run: [] for run in runs}
    for repetition in range(repetitions):
        shift = repetition % len(runs)
        for name, mode in runs[shift:] + runs[:shift]:
            times[(name, mode)].append(timed_run(variants[name], batches, mode))
    return times


def report(times, ratios):
    """Print a table of every run's min / median and, per ``(numerator, denominator)``, the ratios: of the mins,
    of the medians, and the median and range of the ratios within each repetition (the runs of one repetition
    are close in time, so their ratio is the least affected by slow drifts of the machine)."""
    print("| variant | GC | wall min (s) | wall median (s) | CPU median (s) |")
    print("|---|---|---|---|---|")
    for (name, mode), values in times.items():
        wall, cpu = [v[0] for v in values], [v[1] for v in values]
        print(f"| {name} | {mode} | {min(wall):.3f} | {statistics.median(wall):.3f} | {statistics.median(cpu):.3f} |")
    print()
    print("| ratio | GC | of mins | of medians | per repetition: median [min - max] |")
    print("|---|---|---|---|---|")
    for numerator, denominator in ratios:
        for mode in GC_MODES:
            top = [v[0] for v in times[(numerator, mode)]]
            bottom = [v[0] for v in times[(denominator, mode)]]
            paired = [t / b for t, b in zip(top, bottom)]
            print(
                f"| {numerator}/{denominator} | {mode} | {min(top) / min(bottom):.3f} | "
                f"{statistics.median(top) / statistics.median(bottom):.3f} | "
                f"{statistics.median(paired):.3f} [{min(paired):.3f} - {max(paired):.3f}] |"
            )
