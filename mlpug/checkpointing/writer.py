"""Background writing of checkpoint files (:class:`BackgroundWriter`)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Optional


class BackgroundWriter:
    """Runs one write job at a time in a background thread; errors surface at the next :meth:`wait`.

    The caller snapshots the state before submitting, so training may go on while the file is written.
    """

    def __init__(self, name: str = "mlpug-checkpoint-writer"):
        self.name = name
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def submit(self, job: Callable[[], None]) -> None:
        """Wait for the previous job (raising its error), then start ``job`` in a new thread."""
        self.wait()

        def run() -> None:
            try:
                job()
            except BaseException as error:  # re-raised in the training thread by wait()
                self._error = error

        self._thread = threading.Thread(target=run, name=self.name, daemon=False)
        self._thread.start()

    def wait(self) -> None:
        """Block until the running job is done.

        Raises:
            Exception: The error the last job raised (once).
        """
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
