"""Shared by the benchmark scripts: one timed run, isolated from full garbage collections and console output."""

import contextlib
import gc
import io


def isolated_run(func, *args):
    """``func(*args)`` with its printing discarded, after ``gc.collect(); gc.freeze()``.

    Freezing moves the objects that exist already (~170,000 after importing torch or tensorflow) out of the
    garbage collector's reach for the duration of the run: otherwise a full collection, which traverses all of
    them (~0.15 s on our 2-CPU machines), lands in a random run and dominates the noise. Objects the run
    allocates itself are still collected, and that cost is measured.
    """
    gc.collect()
    gc.freeze()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return func(*args)
    finally:
        gc.unfreeze()
