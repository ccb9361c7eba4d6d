"""A job's log on its way to Buildkite: redact, timestamp and chunk, then upload, resumably.

Output bytes (from the job's output file, at known offsets) go through the secret redactor,
then the chunker; every `chunks_interval_seconds` (or sooner, when much is buffered) all that is
buffered is cut into chunks. Each cut is *staged* before any of its chunks is sent: the chunks and
the stream's checkpoint (where to read the file again, the Buildkite offset and sequence, the
chunker's line state) are stored in one transaction. Up to three uploads run at once; a chunk
is retried on 429/5xx/network errors and given up after a 4xx (counted in
`chunks_failed_count`, as the agent does). An upload that fails in a way no retry rule knows (a
bug, a request aiohttp refuses to send) ends the stream: it is logged once, that chunk and every
later one are counted as failed and never sent, and `close()` returns as usual, so the job is
still finished. A restarted agent sends the staged chunks again, byte for byte, and reads on
from the checkpoint: nothing is lost and no offset carries two different texts.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from runner.logging_setup import get_logger
from runner.logs.redact import Redactor
from runner.sources.buildkite import protocol
from runner.sources.buildkite.chunks import Chunk, Chunker, timestamp_prefix
from runner.sources.buildkite.client import AgentSession, ApiError

log = get_logger("runner.sources.buildkite")

UPLOAD_WORKERS = 3
_WIDEST_STAMP = len(timestamp_prefix(2**63 / 1000))
# Flush before the interval is up once this many chunks' worth is buffered.
FLUSH_CHUNKS = 8
# The reader waits while this much is cut but not yet uploaded, so memory stays bounded.
MAX_BACKLOG_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class LogSettings:
    """The job's log settings from its accept answer (0 means the agent's default)."""

    chunks_max_size_bytes: int
    chunks_interval_seconds: float
    log_max_size_bytes: int

    @classmethod
    def from_job(cls, job: Any) -> LogSettings:
        def number(key: str, default: int) -> int:
            value = job.get(key) if hasattr(job, "get") else None
            return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default
        return cls(number("chunks_max_size_bytes", 100 * 1024),
                   number("chunks_interval_seconds", protocol.DEFAULT_CHUNK_INTERVAL_S),
                   number("log_max_size_bytes", protocol.DEFAULT_LOG_MAX_BYTES))


@dataclass(frozen=True)
class StreamCheckpoint:
    """Everything needed to carry on a log stream after a restart."""

    file_offset: int = 0       # where to read the job's output file again
    stream_offset: int = 0     # bytes of log Buildkite has been (or is being) sent
    sequence: int = 0          # the last chunk sequence number used
    at_line_start: bool = True
    carry: str = ""            # a partial erase-line sequence at the end, latin-1
    last_byte: str = ""
    truncated: bool = False
    chunks_failed: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> StreamCheckpoint:
        if not isinstance(data, dict):
            return cls()
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


class LogOutbox(Protocol):
    """Durable storage of staged chunks and of the checkpoint that follows them."""

    def stage(self, chunks: Sequence[Chunk], checkpoint: StreamCheckpoint) -> None: ...

    def delivered(self, chunk: Chunk, failed: bool) -> None: ...

    def flush(self) -> None:
        """Record the deliveries not yet recorded."""


class _Chunker(Chunker):
    """The chunker, able to cut everything at once and to start from a checkpoint.

    `feed` takes a fast path for the common case (no escape sequences, far from the size limit):
    a stamp after every newline, one bytes.replace instead of work per line, with exactly the
    base class's output (a test compares the two).
    """

    def feed(self, data: bytes) -> None:
        if self._closed or self._truncated or not data or self._carry or b"\x1b" in data:
            super().feed(data)
            return
        # Near the size limit the base class places the truncation notice.
        if self._written + len(data) + (data.count(b"\n") + 1) * _WIDEST_STAMP >= self._content_limit:
            super().feed(data)
            return
        stamp = timestamp_prefix(self._clock())
        body = data.replace(b"\n", b"\n" + stamp)
        ends_line = data.endswith(b"\n")
        if ends_line:
            body = body[:-len(stamp)]
        if self._at_line_start:
            body = stamp + body
        self._append(body)
        self._at_line_start = ends_line

    def cut_all(self) -> list[Chunk]:
        return self._chunks(len(self._buffer))

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def state(self) -> dict[str, Any]:
        return {"stream_offset": self._offset, "sequence": self._sequence,
                "at_line_start": self._at_line_start,
                "carry": self._carry.decode("latin-1"), "last_byte": self._last_byte.decode("latin-1"),
                "truncated": self._truncated}

    def restore(self, checkpoint: StreamCheckpoint) -> None:
        self._offset = self._written = checkpoint.stream_offset
        self._sequence = checkpoint.sequence
        self._at_line_start = checkpoint.at_line_start
        self._carry = checkpoint.carry.encode("latin-1")
        self._last_byte = checkpoint.last_byte.encode("latin-1")
        self._truncated = checkpoint.truncated


class _Redactor(Redactor):
    def unsettled(self) -> tuple[int, int]:
        """(bytes of input held back, how many of them were already replaced)."""
        return len(self._pending), self._covered


class LogStreamer:
    """Streams one job's log to Buildkite. `sink(offset, data)` is fed from the output file."""

    def __init__(self, session: AgentSession, job_id: str, job_token: str, settings: LogSettings, *,
                 secrets: Sequence[str], outbox: LogOutbox | None = None,
                 checkpoint: StreamCheckpoint | None = None, staged: Sequence[Chunk] = (),
                 clock: Callable[[], float] = time.time) -> None:
        self._session = session
        self._job_id = job_id
        self._token = job_token
        self._settings = settings
        self._outbox = outbox
        start = checkpoint or StreamCheckpoint()
        self._chunker = _Chunker(settings.chunks_max_size_bytes, settings.log_max_size_bytes, clock,
                                 interval_s=settings.chunks_interval_seconds)
        self._chunker.restore(start)
        self._redactor = _Redactor(secrets)
        self._consumed = start.file_offset
        self._failed = start.chunks_failed
        self._queue: asyncio.Queue[Chunk] = asyncio.Queue()
        self._backlog = 0
        self._drained = asyncio.Event()
        self._drained.set()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        # An upload raised what no retry rule knows: nothing more of this stream is sent.
        self._broken = False
        self._outbox_failed = False
        self._warned_truncated = start.truncated
        for piece in staged:
            self._enqueue(piece)

    @property
    def checkpoint(self) -> StreamCheckpoint:
        held, covered = self._redactor.unsettled()
        return StreamCheckpoint(file_offset=max(0, self._consumed - held + covered),
                                chunks_failed=self._failed, **self._chunker.state())

    @property
    def chunks_failed(self) -> int:
        return self._failed

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._upload()) for _ in range(UPLOAD_WORKERS)]
        self._tasks.append(asyncio.create_task(self._tick()))

    async def sink(self, offset: int, data: bytes) -> None:
        """Output of the job's file from `offset`; (0, b"") means the file started again."""
        if not data:
            self._consumed = 0
            return
        self._consumed = offset + len(data)
        await self.write(data)

    async def write(self, data: bytes) -> None:
        """Output that is not read from the file (lines of the agent for a job that never ran)."""
        self._chunker.feed(self._redactor.feed(data))
        if self._chunker.buffered >= FLUSH_CHUNKS * self._settings.chunks_max_size_bytes:
            self._flush()
        while self._backlog > MAX_BACKLOG_BYTES:
            self._drained.clear()
            await self._drained.wait()

    async def close(self) -> int:
        """Send the rest and wait for every upload; the number of chunks given up on."""
        if not self._closed:
            self._closed = True
            self._chunker.feed(self._redactor.flush())
            pieces = self._chunker.close()
            self._stage(pieces)
        if self._chunker.truncated and not self._warned_truncated:
            log.warning("job log reached log_max_size_bytes; later output was dropped", job=self._job_id)
        await self._queue.join()
        if self._outbox is not None:
            self._outbox.flush()
        await self.abandon()   # everything is sent: only idle workers and the ticker are left
        return self._failed

    async def abandon(self) -> None:
        """Stop without sending more (the agent is going away; staged chunks stay for the next one)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    def _flush(self) -> None:
        if self._chunker.buffered:
            self._stage(self._chunker.cut_all())

    def _stage(self, pieces: list[Chunk]) -> None:
        if self._outbox is not None:
            # Durable before the first byte leaves: a restart sends these again, identical.
            self._outbox.stage(pieces, self.checkpoint)
        for piece in pieces:
            self._enqueue(piece)

    def _enqueue(self, piece: Chunk) -> None:
        self._backlog += len(piece.data)
        self._queue.put_nowait(piece)

    async def _tick(self) -> None:
        interval = self._settings.chunks_interval_seconds
        due = time.monotonic()
        while True:
            # A fixed rate: the time a flush takes does not push the next one back.
            due += interval
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            if not self._closed:
                self._flush()

    async def _upload(self) -> None:
        # An upload worker ends only when cancelled: `close()` waits for the queue to be worked
        # off, which needs the workers, so nothing a chunk does may end one.
        while True:
            piece = await self._queue.get()
            try:
                if self._broken:
                    self._record(piece, failed=True)
                else:
                    await self._send(piece)
            finally:
                self._backlog -= len(piece.data)
                if self._backlog <= MAX_BACKLOG_BYTES // 2:
                    self._drained.set()
                self._queue.task_done()

    async def _send(self, piece: Chunk) -> None:
        try:
            await self._session.call(protocol.chunk(self._job_id, piece), job_token=self._token)
        except ApiError as exc:
            log.warning("giving up on uploading a log chunk; the Buildkite log will be partial",
                        job=self._job_id, sequence=piece.sequence, error=str(exc))
            self._record(piece, failed=True)
        except Exception:
            # Not a failure the retry rules know (a bug, a header aiohttp refuses to send): it
            # would recur with every chunk, so the stream ends here. What is not sent is counted,
            # and the job is finished as usual. Uploads under way at the time may fail alike:
            # the first one tells.
            if not self._broken:
                self._broken = True
                log.exception("a log chunk could not be uploaded; the rest of this job's log is not sent",
                              job=self._job_id, sequence=piece.sequence)
            self._record(piece, failed=True)
        else:
            self._record(piece, failed=False)

    def _record(self, piece: Chunk, *, failed: bool) -> None:
        """Count a chunk given up on, and record every chunk's end so a restart does not send it again."""
        if failed:
            self._failed += 1
        if self._outbox is None:
            return
        try:
            self._outbox.delivered(piece, failed)
        except Exception:
            # The count still reaches Buildkite with the finish; a restart would only send an
            # identical chunk again. Once is enough to say so.
            if not self._outbox_failed:
                self._outbox_failed = True
                log.exception("the end of a log chunk's upload could not be recorded", job=self._job_id,
                              sequence=piece.sequence)
