"""structlog is configured once: JSON lines for machines, readable lines on a terminal."""

from __future__ import annotations

import io
import json

from runner.logging_setup import ConditionLog, configure_logging, get_logger


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


def test_a_recurring_condition_is_logged_when_it_starts_now_and_then_and_when_it_ends() -> None:
    stream, now = io.StringIO(), [0.0]
    configure_logging(stream=stream, force_json=True)
    conditions = ConditionLog(get_logger("test"), every=60, clock=lambda: now[0])
    for _ in range(400):
        conditions.occurred("EMFILE", "cannot accept", error="Too many open files")
        now[0] += 0.25          # 100 s in all: one reminder, at the 241st, 60 s after the first
    conditions.occurred("ENFILE", "cannot accept")
    conditions.ended("EMFILE", "accepts again")
    conditions.ended("EMFILE", "accepts again")  # no longer active: nothing to say
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(r["event"], r["condition"], r.get("occurrences")) for r in records] == [
        ("cannot accept", "EMFILE", None), ("cannot accept", "EMFILE", 241),
        ("cannot accept", "ENFILE", None), ("accepts again", "EMFILE", 400)]
    assert records[0]["error"] == "Too many open files"
    assert conditions.active() == ["ENFILE"]


def test_a_flickering_condition_ends_only_after_it_stayed_away_for_a_while() -> None:
    stream, now = io.StringIO(), [0.0]
    configure_logging(stream=stream, force_json=True)
    conditions = ConditionLog(get_logger("test"), clock=lambda: now[0])
    for _ in range(20):
        conditions.occurred("EMFILE", "cannot accept")
        now[0] += 0.25
        conditions.ended("EMFILE", "accepts again", quiet=1.0)
    now[0] += 1.0
    conditions.ended("EMFILE", "accepts again", quiet=1.0)
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(r["event"], r.get("occurrences")) for r in records] == [
        ("cannot accept", None), ("accepts again", 20)]
