"""Follow a growing log file byte for byte, through late creation, truncation and rotation.

The follower never decodes: a job's log is whatever bytes it wrote, and a multi-byte character or
a line may be split across chunks. `LineAssembler` is for consumers that want whole lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from pathlib import Path

__all__ = ["DEFAULT_MAX_LINE", "RESTART", "LineAssembler", "LogSink", "follow", "pump"]

# Yielded when the file was truncated or replaced: what follows starts again at offset 0. It is
# the only empty chunk `follow` ever yields, so a consumer that just concatenates is unaffected.
RESTART: tuple[int, bytes] = (0, b"")
DEFAULT_MAX_LINE = 1 << 20

# Where `pump` delivers a log: (offset, data) of each new piece; `RESTART` says the file restarted.
LogSink = Callable[[int, bytes], Awaitable[None]]


async def follow(path: Path, *, offset: int = 0, done: Callable[[], bool], poll_interval: float = 0.1,
                 chunk_size: int = 65536) -> AsyncGenerator[tuple[int, bytes], None]:
    """Yield (offset, bytes) of the data appended to `path`, until `done()` and the end of the file.

    `done()` is sampled before each pass over the file, so everything written before it turned
    true is read in the pass that ends the iteration. A file that does not exist yet is waited
    for. When the file shrinks below what was read (truncation), or another file takes its place
    (rotation: the old file is first read to its end), `RESTART` is yielded and reading starts
    again at offset 0 of the current file. A truncation that is followed by enough new data
    before the next poll cannot be told apart from growth; only a rotation is always seen.
    """
    if offset < 0 or chunk_size < 1:
        raise ValueError("offset must not be negative and chunk_size must be positive")
    reader = _Reader(Path(path), offset, chunk_size)
    try:
        while True:
            finished = done()
            for chunk in reader.drain():
                yield chunk
            if finished:
                return
            await asyncio.sleep(poll_interval)
    finally:
        reader.close()


async def pump(path: Path, *, offset: int, done: Callable[[], bool], sink: LogSink) -> None:
    """Feed the log from `offset` to `sink` until `done()` and everything written is read."""
    async for chunk_offset, data in follow(path, offset=offset, done=done):
        await sink(chunk_offset, data)


class _Reader:
    """The open file being followed and the offset reached in it."""

    def __init__(self, path: Path, offset: int, chunk_size: int) -> None:
        self.path = path
        self.offset = offset
        self.chunk_size = chunk_size
        self.fd: int | None = None
        self.restart_due = False

    def drain(self) -> Iterator[tuple[int, bytes]]:
        """Everything up to the current end of the file at `path`, across rotations."""
        if self.fd is None and not self._open():
            return
        while True:
            if self.restart_due or self._truncated():
                self.restart_due = False
                self.offset = 0
                yield RESTART
            yield from self._read_to_end()
            if not self._rotated():
                return
            # The writer may still have been writing to the old file as it was renamed.
            yield from self._read_to_end()
            self.close()
            self.restart_due = True
            if not self._open():
                return

    def _open(self) -> bool:
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        return True

    def _read_to_end(self) -> Iterator[tuple[int, bytes]]:
        # Reads of a regular file never wait for data, so they need no thread; each is bounded
        # by chunk_size, and the consumer runs between chunks.
        assert self.fd is not None
        while data := os.pread(self.fd, self.chunk_size, self.offset):
            chunk = (self.offset, data)
            self.offset += len(data)
            yield chunk

    def _truncated(self) -> bool:
        assert self.fd is not None
        return os.fstat(self.fd).st_size < self.offset

    def _rotated(self) -> bool:
        """Whether the path now names another file (a missing path is not a rotation yet)."""
        assert self.fd is not None
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(self.fd)
        return (current.st_dev, current.st_ino) != (mine.st_dev, mine.st_ino)

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None


class LineAssembler:
    """Turns byte chunks into complete lines (each keeping its b"\\n").

    A partial last line is held until the rest arrives or `flush()`. A line longer than
    `max_line` bytes is passed on in pieces of that size, so a job that never writes a newline
    cannot make the agent hold its whole output.
    """

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        if max_line < 1:
            raise ValueError("max_line must be positive")
        self.max_line = max_line
        self._pending = bytearray()

    @property
    def pending(self) -> bytes:
        """The partial line held back so far."""
        return bytes(self._pending)

    def feed(self, data: bytes) -> list[bytes]:
        """The lines completed by `data`, in order."""
        self._pending += data
        lines = []
        start = 0
        while (end := self._pending.find(b"\n", start)) != -1:
            lines.extend(self._split(bytes(self._pending[start:end + 1])))
            start = end + 1
        del self._pending[:start]
        while len(self._pending) >= self.max_line:
            lines.append(bytes(self._pending[:self.max_line]))
            del self._pending[:self.max_line]
        return lines

    def flush(self) -> list[bytes]:
        """The held partial line, if any (without a newline, as it was written), and forget it."""
        rest = bytes(self._pending)
        self._pending.clear()
        return [rest] if rest else []

    def _split(self, line: bytes) -> list[bytes]:
        return [line[i:i + self.max_line] for i in range(0, len(line), self.max_line)]
