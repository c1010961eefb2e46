"""Background writing of checkpoint files (:class:`BackgroundWriter`)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Optional


class BackgroundWriter:
    """Runs one write job at a time in a background thread; errors surface at the next :meth:`wait`.

    The caller snapshots the state before submitting, so training may go on while the file is written. A job that
    raises calls its ``on_error`` at once (in the writer thread, e.g. to log it), then sets :attr:`failed`, which
    the training thread reads at every batch boundary (a plain attribute: no lock, no call) to raise the error
    there with :meth:`wait`.

    Attributes:
        failed: True from the moment a job raised until :meth:`wait` raised its error.
    """

    def __init__(self, name: str = "mlpug-checkpoint-writer"):
        self.name = name
        self.failed = False
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def submit(self, job: Callable[[], None], on_error: Optional[Callable[[BaseException], None]] = None) -> None:
        """Wait for the previous job (raising its error), then start ``job`` in a new thread.

        Args:
            job: Writes the files.
            on_error: Called with the error in the writer thread as soon as ``job`` raised (before :attr:`failed`
                is set); what it raises is ignored.
        """
        self.wait()

        def run() -> None:
            try:
                job()
            except BaseException as error:  # re-raised in the training thread by wait()
                self._error = error
                try:
                    if on_error is not None:
                        on_error(error)
                except Exception:  # reporting must not hide the error itself
                    pass
                self.failed = True

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
            error, self._error, self.failed = self._error, None, False
            raise error
