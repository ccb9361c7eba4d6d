"""Following a growing log: byte-exact, through late creation, truncation, rotation and the final race."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import threading
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path

import pytest
from conftest import wait_until

from runner.logs.tail import RESTART, LineAssembler, follow

DEADLINE_S = 10.0
FAST = 0.002


async def next_chunk(chunks: AsyncIterator[tuple[int, bytes]]) -> tuple[int, bytes]:
    return await asyncio.wait_for(chunks.__anext__(), DEADLINE_S)


async def collect(chunks: AsyncIterator[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    return [chunk async for chunk in chunks]


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as handle:
        handle.write(data)


class Flag:
    """A `done` callback that the test turns true."""

    def __init__(self) -> None:
        self.value = False
        self.calls = 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.value


# --- byte exactness ------------------------------------------------------------------------------

class ConcurrentWriter(threading.Thread):
    """Writes random bytes in random pieces; now and then waits for the reader to catch up, so
    that reads really interleave with writes instead of all happening at the end."""

    def __init__(self, path: Path, seed: int, total: int) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.rng = random.Random(seed)
        self.total = total
        self.digest = hashlib.sha256()
        self.finished = threading.Event()
        self.read_up_to = 0
        self.progress = threading.Condition()
        self.error: BaseException | None = None

    def reader_reached(self, offset: int) -> None:
        with self.progress:
            self.read_up_to = offset
            self.progress.notify_all()

    def run(self) -> None:
        try:
            self._write_all()
        except BaseException as exc:
            self.error = exc
        finally:
            self.finished.set()

    def _write_all(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        written = 0
        try:
            while written < self.total:
                piece = self.rng.randbytes(min(self.rng.randint(1, 5000), self.total - written))
                os.write(fd, piece)
                self.digest.update(piece)
                written += len(piece)
                if self.rng.random() < 0.1:
                    self._wait_for_reader(written)
        finally:
            os.close(fd)

    def _wait_for_reader(self, offset: int) -> None:
        with self.progress:
            if not self.progress.wait_for(lambda: self.read_up_to >= offset, DEADLINE_S):
                raise TimeoutError(f"reader did not reach offset {offset}")


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_binary_data_is_reassembled_byte_for_byte(tmp_path: Path, seed: int) -> None:
    path = tmp_path / "job.log"
    writer = ConcurrentWriter(path, seed, total=600_000)
    received = hashlib.sha256()
    expected_offset = 0
    writer.start()
    async for offset, data in follow(path, done=writer.finished.is_set, poll_interval=FAST,
                                     chunk_size=4096):
        assert offset == expected_offset
        assert data
        received.update(data)
        expected_offset += len(data)
        writer.reader_reached(expected_offset)
    writer.join(DEADLINE_S)
    assert writer.error is None
    assert expected_offset == 600_000
    assert received.hexdigest() == writer.digest.hexdigest()


async def test_chunks_are_bounded_by_chunk_size_and_carry_their_offsets(tmp_path: Path) -> None:
    path = tmp_path / "job.log"
    path.write_bytes(bytes(range(256)) * 10)
    chunks = await collect(follow(path, done=lambda: True, chunk_size=1000))
    assert [(offset, len(data)) for offset, data in chunks] == [(0, 1000), (1000, 1000), (2000, 560)]
    assert b"".join(data for _, data in chunks) == bytes(range(256)) * 10


async def test_partial_lines_are_passed_on_as_written(tmp_path: Path) -> None:
    path = tmp_path / "job.log"
    path.write_bytes(b"")
    flag = Flag()
    chunks = follow(path, done=flag, poll_interval=FAST)
    append(path, b"progress: 10%")
    assert await next_chunk(chunks) == (0, b"progress: 10%")
    append(path, b"\rprogress: 20%\n\xff\xfe")
    assert await next_chunk(chunks) == (13, b"\rprogress: 20%\n\xff\xfe")
    flag.value = True
    assert await collect(chunks) == []


async def test_following_starts_at_the_given_offset(tmp_path: Path) -> None:
    path = tmp_path / "job.log"
    path.write_bytes(b"already shipped\nnew\n")
    assert await collect(follow(path, offset=16, done=lambda: True)) == [(16, b"new\n")]


# --- the end of the job --------------------------------------------------------------------------

async def test_a_write_just_before_done_turns_true_is_not_lost(tmp_path: Path) -> None:
    path = tmp_path / "job.log"
    path.write_bytes(b"start\n")
    state = {"done": False}

    def done() -> bool:
        # The job's last words arrive while the follower is asking whether the job is over.
        if not state["done"]:
            append(path, b"last words\n")
            state["done"] = True
        return True

    chunks = await collect(follow(path, done=done, poll_interval=FAST))
    assert b"".join(data for _, data in chunks) == b"start\nlast words\n"


@pytest.mark.parametrize("round_", range(20))
async def test_done_racing_with_a_final_write_from_another_thread(tmp_path: Path, round_: int) -> None:
    path = tmp_path / "job.log"
    path.write_bytes(b"")
    finished = threading.Event()

    def job() -> None:
        for index in range(50):
            append(path, f"line {index}\n".encode())
        finished.set()

    thread = threading.Thread(target=job, daemon=True)
    thread.start()
    received = bytearray()
    async for _, data in follow(path, done=finished.is_set, poll_interval=0.0005 * round_):
        received += data
    thread.join(DEADLINE_S)
    if not finished.is_set():
        pytest.fail("the writer did not finish")
    assert bytes(received) == b"".join(f"line {index}\n".encode() for index in range(50))


async def test_the_file_appearing_late_is_waited_for(tmp_path: Path) -> None:
    path = tmp_path / "late.log"
    flag = Flag()
    pending = asyncio.ensure_future(next_chunk(follow(path, done=flag, poll_interval=FAST)))
    await wait_until(lambda: flag.calls >= 3, "the follower to poll for the missing file")
    assert not pending.done()
    path.write_bytes(b"hello\n")
    assert await pending == (0, b"hello\n")


async def test_a_file_that_never_appears_ends_when_done(tmp_path: Path) -> None:
    assert await collect(follow(tmp_path / "never.log", done=lambda: True)) == []


async def test_breaking_off_closes_the_file(tmp_path: Path) -> None:
    path = tmp_path / "job.log"
    path.write_bytes(b"x" * 100)
    before = len(os.listdir("/proc/self/fd"))
    chunks: AsyncGenerator[tuple[int, bytes], None] = follow(path, done=lambda: False, chunk_size=10)
    assert await next_chunk(chunks) == (0, b"x" * 10)
    assert len(os.listdir("/proc/self/fd")) == before + 1
    await chunks.aclose()
    assert len(os.listdir("/proc/self/fd")) == before


# --- truncation and rotation ---------------------------------------------------------------------

async def test_truncation_restarts_at_zero_with_a_marker(tmp_path: Path) -> None:
    path = tmp_path / "job.log"
    path.write_bytes(b"hello world\n")
    flag = Flag()
    chunks = follow(path, done=flag, poll_interval=FAST)
    assert await next_chunk(chunks) == (0, b"hello world\n")
    with open(path, "r+b") as handle:
        handle.truncate(0)
        handle.write(b"new\n")
    assert await next_chunk(chunks) == RESTART
    assert await next_chunk(chunks) == (0, b"new\n")
    append(path, b"more\n")
    assert await next_chunk(chunks) == (4, b"more\n")
    flag.value = True
    assert await collect(chunks) == []


async def test_an_offset_beyond_the_end_counts_as_truncation(tmp_path: Path) -> None:
    path = tmp_path / "job.log"
    path.write_bytes(b"short\n")
    assert await collect(follow(path, offset=1000, done=lambda: True)) == [RESTART, (0, b"short\n")]


async def test_rotation_finishes_the_old_file_then_reads_the_new_one(tmp_path: Path) -> None:
    path = tmp_path / "job.log"
    rotated = tmp_path / "job.log.1"
    writer = open(path, "ab", buffering=0)  # noqa: SIM115 -- kept open across the rename
    try:
        writer.write(b"old 1\n")
        flag = Flag()
        chunks = follow(path, done=flag, poll_interval=FAST)
        assert await next_chunk(chunks) == (0, b"old 1\n")
        os.rename(path, rotated)
        # Written to the old file after the rename, as a writer does until it reopens.
        writer.write(b"old 2\n")
        path.write_bytes(b"new 1\n")
        assert await next_chunk(chunks) == (6, b"old 2\n")
        assert await next_chunk(chunks) == RESTART
        assert await next_chunk(chunks) == (0, b"new 1\n")
        flag.value = True
        assert await collect(chunks) == []
    finally:
        writer.close()


async def test_rotation_waits_while_the_new_file_is_missing(tmp_path: Path) -> None:
    path = tmp_path / "job.log"
    path.write_bytes(b"old\n")
    flag = Flag()
    chunks = follow(path, done=flag, poll_interval=FAST)
    assert await next_chunk(chunks) == (0, b"old\n")
    os.rename(path, tmp_path / "job.log.1")
    append(tmp_path / "job.log.1", b"tail of old\n")
    assert await next_chunk(chunks) == (4, b"tail of old\n")
    calls = flag.calls
    pending = asyncio.ensure_future(next_chunk(chunks))
    await wait_until(lambda: flag.calls >= calls + 3, "the follower to poll the missing path")
    assert not pending.done()
    path.write_bytes(b"new\n")
    assert await pending == RESTART
    assert await next_chunk(chunks) == (0, b"new\n")
    flag.value = True
    assert await collect(chunks) == []


async def test_a_rotation_just_before_done_delivers_both_files(tmp_path: Path) -> None:
    path = tmp_path / "job.log"
    path.write_bytes(b"a1\n")
    flag = Flag()
    chunks = follow(path, done=flag, poll_interval=FAST)
    assert await next_chunk(chunks) == (0, b"a1\n")
    append(path, b"a2\n")
    os.rename(path, tmp_path / "job.log.1")
    path.write_bytes(b"b1\n")
    flag.value = True
    assert await collect(chunks) == [(3, b"a2\n"), RESTART, (0, b"b1\n")]


# --- lines ---------------------------------------------------------------------------------------

def test_line_assembler_holds_partial_lines_until_completed() -> None:
    lines = LineAssembler()
    assert lines.feed(b"one\ntw") == [b"one\n"]
    assert lines.pending == b"tw"
    assert lines.feed(b"o") == []
    assert lines.feed(b"\nthree\nfour\n") == [b"two\n", b"three\n", b"four\n"]
    assert lines.pending == b""
    assert lines.flush() == []


def test_line_assembler_flush_returns_the_unfinished_line() -> None:
    lines = LineAssembler()
    assert lines.feed(b"no newline at the end") == []
    assert lines.flush() == [b"no newline at the end"]
    assert lines.flush() == []


def test_line_assembler_keeps_bytes_as_they_are() -> None:
    lines = LineAssembler()
    assert lines.feed(b"\xff\xfe\r\n\n\x00") == [b"\xff\xfe\r\n", b"\n"]
    assert lines.flush() == [b"\x00"]


def test_line_assembler_splits_a_line_longer_than_the_limit() -> None:
    lines = LineAssembler(max_line=4)
    assert lines.feed(b"abcdefghij") == [b"abcd", b"efgh"]
    assert lines.feed(b"\n") == [b"ij\n"]
    assert lines.feed(b"0123456789\n") == [b"0123", b"4567", b"89\n"]


def test_line_assembler_reassembles_random_chunking() -> None:
    rng = random.Random(7)
    text = b"".join(rng.randbytes(rng.randint(0, 50)).replace(b"\n", b"") + b"\n" for _ in range(500))
    lines = LineAssembler()
    out: list[bytes] = []
    position = 0
    while position < len(text):
        step = rng.randint(1, 80)
        out += lines.feed(text[position:position + step])
        position += step
    out += lines.flush()
    assert b"".join(out) == text
    assert all(line.endswith(b"\n") and line.count(b"\n") == 1 for line in out)


async def test_nonsense_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        await collect(follow(tmp_path / "x", done=lambda: True, chunk_size=0))
    with pytest.raises(ValueError, match="offset"):
        await collect(follow(tmp_path / "x", done=lambda: True, offset=-1))
