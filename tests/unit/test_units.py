"""Durations, memory sizes and bind specifications as people and Slurm write them."""

from __future__ import annotations

import pytest

from runner.binds import Bind, check_absolute_path, parse_bind
from runner.units import (
    MAX_SECONDS,
    human_duration,
    parse_duration,
    parse_memory,
    slurm_memory,
    slurm_time,
)


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90),
    ("30m", 1800),
    ("4h", 4 * 3600),
    ("2d", 2 * 86400),
    ("1h30m", 5400),
    (" 30m ", 1800),
    ("45", 45 * 60),              # a bare number is minutes, as for sbatch --time
    ("10:30", 10 * 60 + 30),      # MM:SS
    ("01:02:03", 3723),           # HH:MM:SS
    ("1-00:00:00", 86400),        # D-HH:MM:SS
    ("2-12:30:15", 2 * 86400 + 12 * 3600 + 30 * 60 + 15),
    ("1-12", 86400 + 12 * 3600),  # D-HH
    ("1-2:30", 86400 + 2 * 3600 + 30 * 60),  # D-HH:MM
])
def test_parse_duration_accepts_human_and_slurm_forms(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


def test_parse_duration_takes_an_integer_as_minutes() -> None:
    assert parse_duration(30) == 1800


@pytest.mark.parametrize(("value", "message"), [
    ("", "is not a duration"),
    ("abc", "is not a duration"),
    ("30M", "is not a duration"),         # M is memory, minutes are m
    ("1.5h", "is not a duration"),
    ("-5m", "is not a duration"),
    ("10:60", "is not a duration"),       # seconds out of range
    ("1:60:00", "is not a duration"),
    ("1-00:60:00", "is not a duration"),
    ("1-00:00:60", "is not a duration"),
    ("1:2:3:4", "is not a duration"),
    ("0m", "must be longer than zero"),
    ("00:00", "must be longer than zero"),
    (0, "must be longer than zero"),
    ("367d", "is longer than a year"),
    ("9" * 5000 + "m", "too long for a duration"),
])
def test_parse_duration_rejects_nonsense_naming_the_problem(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_duration(value)


@pytest.mark.parametrize("value", [1.5, True, None, ["30m"], {"m": 30}])
def test_parse_duration_rejects_values_that_are_not_text_or_integers(value: object) -> None:
    with pytest.raises(ValueError, match="must be a duration such as"):
        parse_duration(value)


def test_parse_duration_accepts_exactly_a_year_and_not_a_second_more() -> None:
    assert parse_duration(f"{MAX_SECONDS}s") == MAX_SECONDS
    with pytest.raises(ValueError, match="longer than a year"):
        parse_duration(f"{MAX_SECONDS + 1}s")


@pytest.mark.parametrize(("text", "megabytes"), [
    ("512M", 512),
    ("16G", 16 * 1024),
    ("16g", 16 * 1024),
    ("16GB", 16 * 1024),
    ("16GiB", 16 * 1024),
    ("1T", 1024 * 1024),
    ("2048K", 2),
    (" 8G ", 8 * 1024),
])
def test_parse_memory_reads_binary_units_as_slurm_does(text: str, megabytes: int) -> None:
    assert parse_memory(text) == megabytes


def test_parse_memory_rounds_kilobytes_up_so_a_job_never_gets_less() -> None:
    assert parse_memory("1536K") == 2


@pytest.mark.parametrize(("value", "message"), [
    ("16", "is not a memory size"),
    ("16X", "is not a memory size"),
    ("1.5G", "is not a memory size"),
    ("-1G", "is not a memory size"),
    ("0G", "less than 1M"),
    ("512K", "less than 1M"),
    ("2000T", "larger than 1P"),
    ("9" * 400 + "K", "is not a memory size"),
    (16, "must be a size such as"),
    (True, "must be a size such as"),
])
def test_parse_memory_rejects_nonsense_naming_the_problem(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_memory(value)


@pytest.mark.parametrize(("seconds", "text"), [
    (1800, "0-00:30:00"),
    (90, "0-00:02:00"),           # rounded up to whole minutes
    (86400 + 3600, "1-01:00:00"),
])
def test_slurm_time_renders_days_hours_minutes(seconds: int, text: str) -> None:
    assert slurm_time(seconds) == text


@pytest.mark.parametrize(("megabytes", "text"), [(16384, "16G"), (1536, "1536M"), (1, "1M")])
def test_slurm_memory_uses_gigabytes_when_whole(megabytes: int, text: str) -> None:
    assert slurm_memory(megabytes) == text


@pytest.mark.parametrize(("seconds", "text"), [(0, "0s"), (90, "1m30s"), (2 * 86400 + 3600, "2d1h")])
def test_human_duration(seconds: int, text: str) -> None:
    assert human_duration(seconds) == text


@pytest.mark.parametrize(("text", "bind"), [
    ("/data", Bind("/data", "/data", "rw")),
    ("/data:/in", Bind("/data", "/in", "rw")),
    ("/data:/in:ro", Bind("/data", "/in", "ro")),
    ("/data::ro", Bind("/data", "/data", "ro")),
    ("/data/./x/:/in//y", Bind("/data/x", "/in/y", "rw")),
])
def test_parse_bind_reads_apptainer_syntax_and_normalises(text: str, bind: Bind) -> None:
    assert parse_bind(text) == bind


@pytest.mark.parametrize(("text", "message"), [
    ("", "is not a bind"),
    ("/a:/b:ro:x", "is not a bind"),
    ("data:/data", "must be an absolute path"),
    ("/data:in", "must be an absolute path"),
    ("/data/../etc:/x", "must not contain '..'"),
    ("/a:/b/..", "must not contain '..'"),
    ("/a:/b:rx", "mode must be 'ro' or 'rw'"),
    ("/:/host", "the source must not be '/'"),
    ("//:/host", "the source must not be '/'"),
    ("/data:/", "the target must not be '/'"),
    ("/proc:/p", "the source must not be /proc"),
    ("/proc/1/root:/p", "the source must not be /proc"),
    ("//proc:/p", "the source must not be /proc"),
    ("/./sys:/s", "the source must not be /sys"),
    ("/dev:/d", "the source must not be /dev"),
    ("/data:/dev/shm", "the target must not be /dev"),
    ("/data:/sys/fs", "the target must not be /sys"),
    ("/data:/work", "the target /work is reserved"),
    ("/data:/work/sub", "the target /work is reserved"),
    ("/data://work", "the target /work is reserved"),
    ("/data:/.singularity.d/env", "the target /.singularity.d is reserved"),
    ("/a,/b:/c", "must not contain ':', ','"),
    ("/a\nb:/c", "control characters"),
    ("/a\tb:/c", "control characters"),
    ("/a\x1bb:/c", "control characters"),
])
def test_parse_bind_rejects_dangerous_or_malformed_binds(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_bind(text)


def test_parse_bind_allows_paths_that_only_share_a_prefix_with_forbidden_roots() -> None:
    assert parse_bind("/procedures:/devices:ro") == Bind("/procedures", "/devices", "ro")
    assert parse_bind("/data:/workspace") == Bind("/data", "/workspace", "rw")


@pytest.mark.parametrize(("requested", "granted", "covered"), [
    ("/d:/x:ro", "/d:/x:ro", True),
    ("/d:/x:ro", "/d:/x:rw", True),
    ("/d:/x:rw", "/d:/x:ro", False),
    ("/d:/y:ro", "/d:/x:ro", False),
    ("/d/sub:/x:ro", "/d:/x:ro", False),
])
def test_bind_is_covered_only_by_the_same_paths_with_a_mode_at_least_as_wide(
        requested: str, granted: str, covered: bool) -> None:
    assert parse_bind(requested).covered_by(parse_bind(granted)) is covered


def test_check_absolute_path_collapses_a_double_leading_slash() -> None:
    assert check_absolute_path("//groups/esm", "path") == "/groups/esm"
