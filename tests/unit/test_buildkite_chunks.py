"""Log chunks: timestamped lines, gzip bodies placed by offset, cut timing, and the size limit."""

from __future__ import annotations

import gzip
import random
import re
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.sources.buildkite.chunks import DEFAULT_LOG_MAX_BYTES, Chunk, Chunker, timestamp_prefix

T0 = 1_700_000_000.0
BIG = 1 << 20
NOTICE = re.compile(rb"\x1b_bk;t=\d+\x07hpc-runner: the job log reached its maximum size of \d+ bytes")


def stamp(epoch_s: float) -> bytes:
    return b"\x1b_bk;t=" + str(int(epoch_s * 1000)).encode() + b"\x07"


def prefixed(data: bytes, epoch_s: float = T0) -> bytes:
    """Reference: the whole log at once, with a stamp before each line that has any bytes."""
    lines = re.split(rb"(?<=\n)|(?<=\x1b\[K)|(?<=\x1b\[[012]K)", data)
    return b"".join(stamp(epoch_s) + line for line in lines if line)


def reassemble(chunks: Sequence[Chunk], max_chunk: int) -> bytes:
    """The log as the server rebuilds it, checking every chunk on the way."""
    assert sorted(c.sequence for c in chunks) == list(range(1, len(chunks) + 1))
    log = bytearray()
    for chunk in sorted(chunks, key=lambda c: c.offset):
        assert chunk.data[:2] == b"\x1f\x8b"
        body = gzip.decompress(chunk.data)
        assert chunk.offset == len(log)
        assert 0 < chunk.size == len(body) <= max_chunk
        log += body
    return bytes(log)


def fixed_clock() -> float:
    return T0


class Ticking:
    """A clock the test moves by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_timestamp_prefix_is_the_agents_apc_sequence() -> None:
    assert timestamp_prefix(1_700_000_000.123) == b"\x1b_bk;t=1700000000123\x07"


def test_each_line_gets_one_prefix_with_the_time_it_started() -> None:
    clock = Ticking()
    chunker = Chunker(BIG, BIG, clock)
    for seconds, data in [(1, b"hel"), (2, b"lo\nwor"), (3, b"ld\n"), (4, b"\n"), (5, b"x")]:
        clock.now = T0 + seconds
        chunker.feed(data)
    log = reassemble(chunker.close(), BIG)
    assert log == (stamp(T0 + 1) + b"hello\n" + stamp(T0 + 2) + b"world\n" + stamp(T0 + 4) + b"\n"
                   + stamp(T0 + 5) + b"x")


def test_erase_in_line_starts_a_line_even_split_across_feeds() -> None:
    chunker = Chunker(BIG, BIG, fixed_clock)
    for data in [b"10%\x1b[2", b"K20%\x1b", b"[K30%\x1b[1K", b"done\n"]:
        chunker.feed(data)
    s = stamp(T0)
    expected = s + b"10%\x1b[2K" + s + b"20%\x1b[K" + s + b"30%\x1b[1K" + s + b"done\n"
    assert reassemble(chunker.close(), BIG) == expected


def test_chunks_carry_sequence_offset_size_and_gzip() -> None:
    chunker = Chunker(10, BIG, fixed_clock)
    chunker.feed(b"abcdefghij" * 3)
    chunks = chunker.close()
    log = prefixed(b"abcdefghij" * 3)
    assert [(c.sequence, c.offset, c.size) for c in chunks] == [(1, 0, 10), (2, 10, 10), (3, 20, 10),
                                                                (4, 30, 10), (5, 40, 10), (6, 50, 1)]
    assert [gzip.decompress(c.data) for c in chunks] == [log[i:i + 10] for i in range(0, len(log), 10)]


def test_cut_waits_for_the_interval_but_sends_full_chunks_at_once() -> None:
    chunker = Chunker(32, BIG, fixed_clock, interval_s=1.0)
    chunker.feed(b"first\n")
    first = chunker.cut(100.0)  # the first cut does not wait
    assert [c.size for c in first] == [len(prefixed(b"first\n"))]
    chunker.feed(b"second\n")
    assert chunker.cut(100.5) == []
    chunker.feed(b"x" * 60)
    # Not yet due: only whole chunks leave, the rest waits.
    buffered = len(prefixed(b"second\n" + b"x" * 60))
    full = chunker.cut(100.6)
    assert [c.size for c in full] == [32] * (buffered // 32)
    rest = chunker.cut(101.0)
    assert [c.size for c in rest] == [buffered % 32]
    assert chunker.cut(105.0) == []
    assert chunker.close() == []
    log = reassemble([*first, *full, *rest], 32)
    assert log == prefixed(b"first\nsecond\n" + b"x" * 60)


def test_idle_time_does_not_delay_the_next_output() -> None:
    chunker = Chunker(BIG, BIG, fixed_clock, interval_s=1.0)
    chunker.feed(b"a\n")
    assert len(chunker.cut(10.0)) == 1
    assert chunker.cut(20.0) == []
    chunker.feed(b"b\n")
    assert len(chunker.cut(20.1)) == 1


def test_zero_settings_mean_the_agents_defaults() -> None:
    chunker = Chunker(BIG, 0, fixed_clock, interval_s=0)
    chunker.feed(b"a\n")
    assert len(chunker.cut(1.0)) == 1
    chunker.feed(b"b\n")
    assert chunker.cut(1.9) == []
    assert len(chunker.cut(2.0)) == 1
    assert DEFAULT_LOG_MAX_BYTES == 1024 ** 3


def test_invalid_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="max_chunk_bytes"):
        Chunker(0, BIG, fixed_clock)
    with pytest.raises(ValueError, match="max_log_bytes"):
        Chunker(BIG, 100, fixed_clock)


def test_feed_after_close_is_refused() -> None:
    chunker = Chunker(BIG, BIG, fixed_clock)
    chunker.close()
    with pytest.raises(ValueError, match="closed"):
        chunker.feed(b"late\n")


def test_truncation_leaves_one_notice_and_nothing_more() -> None:
    max_log = 400
    chunker = Chunker(64, max_log, fixed_clock)
    chunks = []
    for i in range(100):
        chunker.feed(b"line %d\n" % i)
        chunks += chunker.cut(T0 + i)
    assert chunker.truncated
    chunks += chunker.close()
    log = reassemble(chunks, 64)
    assert len(log) <= max_log
    assert len(NOTICE.findall(log)) == 1
    at = NOTICE.search(log)
    assert at is not None
    assert prefixed(b"".join(b"line %d\n" % i for i in range(100))).startswith(log[:at.start()])
    assert log[at.start():] == stamp(T0) + (b"hpc-runner: the job log reached its maximum size of 400 bytes "
                                            b"(log_max_size_bytes); further output is not shown\n")


def test_truncation_mid_line_ends_the_line_first() -> None:
    chunker = Chunker(BIG, 300, fixed_clock)
    chunker.feed(b"y" * 1000)
    log = reassemble(chunker.close(), BIG)
    assert log.startswith(stamp(T0) + b"yyy")
    at = NOTICE.search(log)
    assert at is not None and log[at.start() - 2:at.start()] == b"y\n"


def content_limit(max_log: int) -> int:
    """How much of the log fits before the notice, found by overfilling one line."""
    probe = Chunker(BIG, max_log, fixed_clock)
    probe.feed(b"z" * max_log)
    return len(reassemble(probe.close(), BIG).split(b"\n")[0])


def test_log_exactly_at_the_limit_is_not_truncated() -> None:
    data = b"z" * (content_limit(500) - len(stamp(T0)))
    chunker = Chunker(BIG, 500, fixed_clock)
    chunker.feed(data)
    assert not chunker.truncated
    assert reassemble(chunker.close(), BIG) == prefixed(data)
    chunker = Chunker(BIG, 500, fixed_clock)
    chunker.feed(data + b"z")
    assert chunker.truncated


def test_no_prefix_is_left_without_its_line() -> None:
    # The first line leaves room for exactly one more prefix, and no byte after it.
    first = b"x" * (content_limit(500) - 2 * len(stamp(T0)) - 1) + b"\n"
    chunker = Chunker(BIG, 500, fixed_clock)
    chunker.feed(first + b"y\n")
    log = reassemble(chunker.close(), BIG)
    at = NOTICE.search(log)
    assert at is not None and log[:at.start()] == stamp(T0) + first


FEEDS = st.lists(st.binary(max_size=40).map(lambda b: bytes(b"ab\n\x1b[2K"[x % 7] for x in b)), max_size=25)


@settings(max_examples=300, deadline=None)
@given(feeds=FEEDS, max_chunk=st.integers(1, 50), times=st.lists(st.floats(0, 3), max_size=25),
       order=st.randoms(use_true_random=False))
def test_chunks_reassemble_to_the_prefixed_log(feeds: list[bytes], max_chunk: int, times: list[float],
                                               order: random.Random) -> None:
    chunker = Chunker(max_chunk, BIG, fixed_clock)
    chunks: list[Chunk] = []
    now = 0.0
    for i, data in enumerate(feeds):
        chunker.feed(data)
        now += times[i] if i < len(times) else 0.5
        chunks += chunker.cut(now)
    chunks += chunker.close()
    order.shuffle(chunks)
    assert reassemble(chunks, max_chunk) == prefixed(b"".join(feeds))


@settings(max_examples=300, deadline=None)
@given(feeds=st.lists(st.binary(max_size=120).map(lambda b: bytes(b"ab \n"[x % 4] for x in b)), max_size=30),
       max_chunk=st.integers(1, 80), max_log=st.integers(200, 900))
def test_size_limit_is_never_exceeded(feeds: list[bytes], max_chunk: int, max_log: int) -> None:
    chunker = Chunker(max_chunk, max_log, fixed_clock)
    chunks: list[Chunk] = []
    for i, data in enumerate(feeds):
        chunker.feed(data)
        chunks += chunker.cut(float(i))
    chunks += chunker.close()
    log = reassemble(chunks, max_chunk)
    full = prefixed(b"".join(feeds))
    assert len(log) <= max_log
    notices = list(NOTICE.finditer(log))
    if not chunker.truncated:
        assert notices == [] and log == full
        return
    assert len(notices) == 1
    content = log[:notices[0].start()]
    # Before the notice: the start of the log, ending a line (with a newline of its own if the
    # log was cut mid-line), with no prefix cut in two.
    assert content.endswith(b"\n") and full.startswith(content[:-1]) and len(content) - 1 < len(full)
    assert content.count(b"\x1b") == content.count(b"\x07")
    assert log.endswith(b"further output is not shown\n")
