"""Console logging set-up for mlpug, built on Python's ``logging``.

mlpug logs through loggers named ``mlpug.<Component>``. On first import a handler is attached to the
``mlpug`` logger that prints ``LEVEL   : Component::function : message``; configure the ``mlpug``
logger yourself to change that.

In data-parallel training (:func:`set_rank`, called when a backend joins its process group) the handler prints
info and debug lines on the primary rank only, and warnings and errors on every rank, prefixed ``[rank r]``.
"""

from __future__ import annotations

import logging as _logging
import sys

_FORMAT = "%(levelname)-8s: %(component)s::%(funcName)s : %(message)s"
_COLORS = {"DEBUG": "\033[36m", "INFO": "\033[32m", "WARNING": "\033[33m", "ERROR": "\033[31m", "CRITICAL": "\033[41m"}
_RESET = "\033[0m"


_rank = {"rank": 0, "world_size": 1}


class _Formatter(_logging.Formatter):
    def __init__(self, colors: bool = False):
        super().__init__(_FORMAT)
        self.colors = colors

    def format(self, record: _logging.LogRecord) -> str:
        record.component = record.name.rsplit(".", 1)[-1]
        text = super().format(record)
        if _rank["world_size"] > 1:
            text = f"[rank {_rank['rank']}] {text}"
        if self.colors and record.levelname in _COLORS:
            text = f"{_COLORS[record.levelname]}{text}{_RESET}"
        return text


class _StdoutHandler(_logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at the time of each record (so redirection and capture work)."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def _primary_or_warning(record: _logging.LogRecord) -> bool:
    return _rank["rank"] == 0 or record.levelno >= _logging.WARNING


_handler = _StdoutHandler()
_handler.setFormatter(_Formatter())
_handler.addFilter(_primary_or_warning)


def set_rank(rank: int, world_size: int) -> None:
    """Tell the console handler this process's rank (see the module docstring)."""
    _rank.update(rank=int(rank), world_size=int(world_size))


def _install_default_handler() -> None:
    logger = _logging.getLogger("mlpug")
    if not logger.handlers:
        logger.addHandler(_handler)
        logger.setLevel(_logging.INFO)
        logger.propagate = False


def get_logger(component: str) -> _logging.Logger:
    """Logger ``mlpug.<component>`` (e.g. ``get_logger("Training")``)."""
    return _logging.getLogger(f"mlpug.{component}")


def set_level(level: int | str) -> None:
    """Set the level of all mlpug loggers, e.g. ``set_level("DEBUG")``."""
    _logging.getLogger("mlpug").setLevel(level)


def use_fancy_colors(enabled: bool = True) -> None:
    """Colour mlpug's console log lines by level (ANSI escape codes)."""
    _handler.setFormatter(_Formatter(colors=enabled))


_install_default_handler()
