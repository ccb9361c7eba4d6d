"""structlog, configured once: JSON lines for machines, readable lines on a terminal."""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any, TextIO

import structlog

_configured = False


class _SturdyPrintLogger(structlog.PrintLogger):
    """A log stream that went away (a closed pipe, a restarted journal) must not stop the agent
    in the middle of, say, draining its jobs: a line that cannot be written is dropped."""

    def msg(self, message: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            super().msg(message)

    log = debug = info = warn = warning = err = error = critical = exception = fatal = failure = msg


class _SturdyPrintLoggerFactory:
    def __init__(self, file: TextIO) -> None:
        self._file = file

    def __call__(self, *args: Any) -> _SturdyPrintLogger:
        return _SturdyPrintLogger(self._file)


def configure_logging(*, level: str = "info", stream: TextIO | None = None,
                      force_json: bool | None = None, reconfigure: bool = False) -> None:
    """Configure structlog for the process, once.

    Later calls are ignored unless they choose a format (`force_json`) or ask to
    `reconfigure`: a library call deep inside must not undo what the entry point chose.
    """
    global _configured
    if _configured and force_json is None and not reconfigure:
        return
    stream = stream or sys.stderr
    as_json = force_json if force_json is not None else not stream.isatty()
    renderer: Any = (structlog.processors.JSONRenderer(sort_keys=True) if as_json
                     else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=_SturdyPrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    _configured = True


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
