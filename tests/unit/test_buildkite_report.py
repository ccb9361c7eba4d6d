"""The Buildkite log stream when an upload fails in a way no retry rule knows (a bug, a header
aiohttp refuses): the stream ends, every chunk it could not send is counted, and `close()` returns.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import cast

import pytest
from structlog.testing import capture_logs

from runner.sources.buildkite.chunks import Chunk
from runner.sources.buildkite.client import AgentSession, Answer
from runner.sources.buildkite.protocol import ApiRequest
from runner.sources.buildkite.report import UPLOAD_WORKERS, LogSettings, LogStreamer, StreamCheckpoint

# aiohttp's refusal of a header value holding a newline, raised before anything is sent.
REFUSED = ValueError("Forbidden control character detected in headers. Potential header injection attack.")


class FakeSession:
    """Answers chunk uploads, except those whose sequence is in `broken` (None: all), which raise."""

    def __init__(self, broken: set[int] | None) -> None:
        self._broken = broken
        self.events: list[tuple[str, int]] = []

    async def call(self, request: ApiRequest, *, job_token: str | None = None) -> Answer:
        sequence = int(request.query["sequence"])
        self.events.append(("call", sequence))
        await asyncio.sleep(0)   # the other upload workers get their turn, as over a network
        if self._broken is None or sequence in self._broken:
            self.events.append(("raised", sequence))
            raise REFUSED
        self.events.append(("sent", sequence))
        return Answer(201, {}, 1)


class RecordingOutbox:
    """The stream's durable side: which chunks were staged, and how each one's delivery ended."""

    def __init__(self) -> None:
        self.staged: list[int] = []
        self.outcomes: dict[int, bool] = {}   # sequence -> failed

    def stage(self, chunks: Sequence[Chunk], checkpoint: StreamCheckpoint) -> None:
        self.staged.extend(chunk.sequence for chunk in chunks)

    def delivered(self, chunk: Chunk, failed: bool) -> None:
        assert chunk.sequence not in self.outcomes, f"chunk {chunk.sequence} delivered twice"
        self.outcomes[chunk.sequence] = failed

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("broken", [{2}, None], ids=["one chunk", "every chunk"])
async def test_an_upload_that_raises_ends_the_stream_counting_every_unsent_chunk_and_close_returns(
        broken: set[int] | None) -> None:
    session = FakeSession(broken)
    box = RecordingOutbox()
    settings = LogSettings(chunks_max_size_bytes=64, chunks_interval_seconds=3600, log_max_size_bytes=10**6)
    streamer = LogStreamer(cast(AgentSession, session), "job-1", "token", settings, secrets=[], outbox=box)
    streamer.start()
    with capture_logs() as logs:
        for i in range(40):
            await streamer.write(b"line %d of the job's output\n" % i)
        failed = await asyncio.wait_for(streamer.close(), 10)

    assert len(box.staged) > UPLOAD_WORKERS + 1     # more chunks than uploaders: none may be stranded
    sent = {sequence for kind, sequence in session.events if kind == "sent"}
    # Every staged chunk is accounted for once: sent, or counted as failed (and so never sent again).
    assert sorted(box.outcomes) == sorted(box.staged)
    assert {sequence for sequence, was_failed in box.outcomes.items() if not was_failed} == sent
    assert failed == streamer.chunks_failed == len(box.staged) - len(sent) >= 1
    # The stream ended at the failure: no upload started after it.
    first_raise = next(i for i, event in enumerate(session.events) if event[0] == "raised")
    assert [event for event in session.events[first_raise:] if event[0] == "call"] == []
    # Logged once, with the traceback, naming the job and the chunk.
    tracebacks = [entry for entry in logs if entry.get("exc_info")]
    assert len(tracebacks) == 1, logs
    assert tracebacks[0]["job"] == "job-1" and tracebacks[0]["sequence"] == session.events[first_raise][1]
