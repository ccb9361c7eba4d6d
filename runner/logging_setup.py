"""structlog, configured once: JSON lines for machines, readable lines on a terminal."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass
class _Condition:
    since: float
    logged_at: float
    last_seen: float
    occurrences: int = 1


class ConditionLog:
    """Logs a condition that may recur thousands of times a second (a full file table refusing
    every accept, a user over their connection cap) when it starts, at most every `every`
    seconds while it lasts, and when it ends, each time with how often it occurred: the log
    says what happened without growing with it. A condition that flickers (an accept that
    fails, one that works, one that fails...) ends only once it has not occurred for `quiet`
    seconds."""

    def __init__(self, logger: Any, *, every: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self._every = every
        self._clock = clock
        self._active: dict[str, _Condition] = {}

    def occurred(self, condition: str, event: str, **fields: Any) -> None:
        now = self._clock()
        state = self._active.get(condition)
        if state is None:
            self._active[condition] = _Condition(since=now, logged_at=now, last_seen=now)
            self._logger.warning(event, condition=condition, **fields)
            return
        state.occurrences += 1
        state.last_seen = now
        if now - state.logged_at >= self._every:
            state.logged_at = now
            self._logger.warning(event, condition=condition, occurrences=state.occurrences,
                                 seconds=round(now - state.since, 1), **fields)

    def ended(self, condition: str, event: str, *, quiet: float = 0.0, **fields: Any) -> None:
        state = self._active.get(condition)
        now = self._clock()
        if state is not None and now - state.last_seen >= quiet:
            del self._active[condition]
            self._logger.info(event, condition=condition, occurrences=state.occurrences,
                              seconds=round(now - state.since, 1), **fields)

    def active(self) -> list[str]:
        return list(self._active)
