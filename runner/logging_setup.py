"""structlog, configured once: JSON lines for machines, readable lines on a terminal."""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

_configured = False


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
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    _configured = True


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
