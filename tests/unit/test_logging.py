"""structlog is configured once: JSON lines for machines, readable lines on a terminal."""

from __future__ import annotations

import io
import json

from runner.logging_setup import configure_logging, get_logger


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_logs_are_json_lines_when_not_on_a_terminal() -> None:
    stream = io.StringIO()
    configure_logging(stream=stream, reconfigure=True)
    get_logger("test").info("job admitted", job="abc", grant="g1")
    record = json.loads(stream.getvalue().strip().splitlines()[-1])
    assert record["event"] == "job admitted"
    assert record["job"] == "abc"
    assert record["level"] == "info"
    assert "timestamp" in record


def test_logs_are_readable_text_on_a_terminal() -> None:
    stream = _Terminal()
    configure_logging(stream=stream, force_json=False)
    get_logger("test").warning("policy reload refused", error="bad line")
    line = stream.getvalue().strip().splitlines()[-1]
    assert "policy reload refused" in line
    assert "error=" in line and "bad line" in line
    assert not line.startswith("{")


def test_the_format_follows_the_stream_when_not_forced() -> None:
    terminal = _Terminal()
    configure_logging(stream=terminal, force_json=None, reconfigure=True)
    get_logger("test").info("hello", n=1)
    assert not terminal.getvalue().lstrip().startswith("{")
    pipe = io.StringIO()
    configure_logging(stream=pipe, force_json=None, reconfigure=True)
    get_logger("test").info("hello", n=1)
    assert json.loads(pipe.getvalue())["n"] == 1


def test_configuring_twice_keeps_the_first_configuration() -> None:
    first = io.StringIO()
    configure_logging(stream=first, force_json=None, reconfigure=True)
    second = io.StringIO()
    configure_logging(stream=second)
    get_logger("test").info("once")
    assert "once" in first.getvalue()
    assert second.getvalue() == ""


class _BrokenPipe(io.StringIO):
    def write(self, text: str) -> int:
        raise BrokenPipeError("the reader went away")


def test_a_log_stream_that_went_away_does_not_raise() -> None:
    configure_logging(stream=_BrokenPipe(), force_json=True)
    get_logger("test").info("draining", running=1)  # must not raise: the agent goes on
