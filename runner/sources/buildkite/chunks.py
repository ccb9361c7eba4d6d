"""Cutting a job's (already redacted) output into the gzip chunks the Buildkite agent uploads.

Each chunk goes to `POST /jobs/{id}/chunks?sequence=&offset=&size=`: `sequence` counts from 1,
`offset` and `size` are in bytes of the uncompressed log, and the body is the gzip of those
bytes. Uploads may run concurrently and arrive out of order, so the server places chunks by
offset. The log carries the agent's timestamp prefix at the start of every line, and stops
with one notice line when it reaches the job's `log_max_size_bytes`.

The chunker does no I/O and reads no clock of its own: output time comes from `clock`, and the
caller says when it is asking for chunks.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["DEFAULT_INTERVAL_S", "DEFAULT_LOG_MAX_BYTES", "Chunk", "Chunker", "timestamp_prefix"]

# What the agent uses when the job leaves chunks_interval_seconds or log_max_size_bytes at 0.
DEFAULT_INTERVAL_S = 1.0
DEFAULT_LOG_MAX_BYTES = 1024 * 1024 * 1024
# The level of Go's gzip.DefaultCompression, which buildkite-agent uploads with: twice as fast
# as Python's default (9) for a few percent more bytes.
GZIP_LEVEL = 6

# A line ends at a newline or at an erase-in-line sequence (ESC[K, ESC[0K, ESC[1K, ESC[2K), so
# that progress bars redrawn in place get a timestamp per redraw, as the agent gives them.
_LINE_BREAK = re.compile(rb"\n|\x1b\[[012]?K")
# The tail of a write that may be the start of an erase-in-line sequence finished by the next.
_PARTIAL_BREAK = re.compile(rb"\x1b(?:\[[012]?)?\Z")
_LONGEST_PARTIAL_BREAK = 3


def timestamp_prefix(epoch_s: float) -> bytes:
    """The agent's line timestamp: an APC sequence holding Unix time in milliseconds."""
    return _stamp(int(epoch_s * 1000))


def _stamp(epoch_ms: int) -> bytes:
    return b"\x1b_bk;t=%d\x07" % epoch_ms


def _notice_text(max_log_bytes: int) -> bytes:
    return (b"hpc-runner: the job log reached its maximum size of %d bytes (log_max_size_bytes); "
            b"further output is not shown\n" % max_log_bytes)


@dataclass(frozen=True, slots=True)
class Chunk:
    """One upload: `size` bytes of the log from `offset`, gzip-compressed in `data`."""

    sequence: int
    offset: int
    size: int
    data: bytes


class Chunker:
    """Buffers log output and cuts it into chunks of at most `max_chunk_bytes` (uncompressed).

    `clock()` gives the time, in seconds since the epoch, of the timestamps put in the log.
    The whole log, truncation notice included, never exceeds `max_log_bytes`; the notice takes
    the place of the output that would not fit.
    """

    def __init__(self, max_chunk_bytes: int, max_log_bytes: int, clock: Callable[[], float], *,
                 interval_s: float = DEFAULT_INTERVAL_S) -> None:
        if max_chunk_bytes <= 0:
            raise ValueError("max_chunk_bytes must be positive, or the log cannot be sent")
        if max_log_bytes <= 0:
            max_log_bytes = DEFAULT_LOG_MAX_BYTES
        # Room for the notice is kept whatever the clock says, so it is sized for the widest
        # timestamp and a newline to end a partial line first.
        reserve = 1 + len(_stamp(2**63 - 1)) + len(_notice_text(max_log_bytes))
        if max_log_bytes <= reserve:
            raise ValueError(f"max_log_bytes must be more than {reserve}, to leave room for the log")
        self._max_chunk = max_chunk_bytes
        self._max_log = max_log_bytes
        self._content_limit = max_log_bytes - reserve
        self._clock = clock
        self._interval = interval_s if interval_s > 0 else DEFAULT_INTERVAL_S
        self._buffer = bytearray()
        self._written = 0  # bytes of log produced, cut or not
        self._offset = 0  # bytes of log already cut into chunks
        self._sequence = 0
        self._last_cut: float | None = None
        self._at_line_start = True
        self._carry = b""
        self._last_byte = b""
        self._truncated = False
        self._closed = False

    @property
    def truncated(self) -> bool:
        """Whether the log reached `max_log_bytes` and later output is being dropped."""
        return self._truncated

    def feed(self, data: bytes) -> None:
        """Add output from the job; it is timestamped now and buffered until the next cut."""
        if self._closed:
            raise ValueError("the chunker is closed")
        if self._truncated or not data:
            return
        stamp = timestamp_prefix(self._clock())
        # Prefix pieces are kept apart from output so that truncation never splits a prefix.
        pieces: list[tuple[bytes, bool]] = []
        scan = self._carry + data
        start = 0
        for match in _LINE_BREAK.finditer(scan):
            stop = match.end() - len(self._carry)
            self._add_line_part(pieces, data[start:stop], stamp)
            self._at_line_start = True
            start = stop
        if start < len(data):
            self._add_line_part(pieces, data[start:], stamp)
        partial = _PARTIAL_BREAK.search(scan[-_LONGEST_PARTIAL_BREAK:])
        self._carry = partial.group() if partial else b""
        self._take(pieces, stamp)

    def cut(self, now: float) -> list[Chunk]:
        """The chunks due at `now`: all that is buffered once `interval_s` has passed since the
        last such cut (or on the first one), otherwise only as many full-size chunks as are ready.
        """
        if self._buffer and (self._last_cut is None or now - self._last_cut >= self._interval):
            self._last_cut = now
            return self._chunks(len(self._buffer))
        return self._chunks(len(self._buffer) - len(self._buffer) % self._max_chunk)

    def close(self) -> list[Chunk]:
        """Everything still buffered, at the end of the job; later feeds are refused."""
        self._closed = True
        return self._chunks(len(self._buffer))

    def _add_line_part(self, pieces: list[tuple[bytes, bool]], part: bytes, stamp: bytes) -> None:
        # The stamp is written when a line's first byte arrives, not when the previous line ends,
        # so a line written over several feeds has the time it started and only one stamp.
        if self._at_line_start:
            pieces.append((stamp, True))
            self._at_line_start = False
        pieces.append((part, False))

    def _take(self, pieces: list[tuple[bytes, bool]], stamp: bytes) -> None:
        for piece, is_stamp in pieces:
            room = self._content_limit - self._written
            # A prefix goes in only with at least one byte of its line, never dangling at the end.
            if len(piece) < room or (len(piece) == room and not is_stamp):
                self._append(piece)
                continue
            if not is_stamp:
                self._append(piece[:room])
            self._truncate(stamp)
            return

    def _truncate(self, stamp: bytes) -> None:
        ends_line = not self._written or self._last_byte == b"\n"
        self._append((b"" if ends_line else b"\n") + stamp + _notice_text(self._max_log))
        self._truncated = True

    def _append(self, data: bytes) -> None:
        if data:
            self._buffer += data
            self._written += len(data)
            self._last_byte = data[-1:]

    def _chunks(self, length: int) -> list[Chunk]:
        chunks = []
        for start in range(0, length, self._max_chunk):
            piece = bytes(self._buffer[start:min(start + self._max_chunk, length)])
            self._sequence += 1
            # mtime=0 keeps the gzip bytes a function of the log alone.
            data = gzip.compress(piece, compresslevel=GZIP_LEVEL, mtime=0)
            chunks.append(Chunk(self._sequence, self._offset, len(piece), data))
            self._offset += len(piece)
        del self._buffer[:length]
        return chunks
