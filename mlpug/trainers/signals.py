"""SIGINT / SIGTERM during training: a flag, never an exception in the middle of a step.

The handlers only record the signal; the ``TrainingManager`` ends at the next batch boundary and runs its end
phases. A second SIGINT while the first is pending raises ``KeyboardInterrupt`` at once (Ctrl-C twice aborts).
Handlers are installed only in the main thread (Python allows no others).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from typing import Optional

_log = logging.getLogger("mlpug.TrainingManager")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def install_stop_handlers(received: Callable[[], Optional[int]], receive: Callable[[int], None]) -> dict:
    """Install handlers of :data:`STOP_SIGNALS` that call ``receive(signum)``; return the previous handlers.

    Args:
        received: The signal received so far, or None.
        receive: Records a signal.

    Returns:
        ``{signum: previous handler}`` for :func:`restore_handlers` (``{}`` outside the main thread).
    """
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, frame):
        if received() is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C aborts at once
        receive(signum)
        _log.warning(f"Received {signal.Signals(signum).name}; training ends at the next batch boundary.")

    return {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}


def restore_handlers(previous: dict) -> None:
    """Put back the handlers :func:`install_stop_handlers` replaced."""
    for signum, handler in previous.items():
        signal.signal(signum, handler)
