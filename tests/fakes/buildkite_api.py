"""An in-process emulator of Buildkite's agent REST API (``/v3``), for tests of the agent.

It speaks the protocol the open-source ``buildkite-agent`` speaks (its ``api`` client: the
requests, the answers, the job JSON, the error bodies), and is deliberately strict where the
real service is strict, so that a client bug shows up as a failing request here rather than as a
lost job in production:

* token kinds: the registration token only opens ``register``; the session (access) token returned
  by ``register`` is what ``connect``/``heartbeat``/``ping``/``accept``/``acquire``/``disconnect``
  accept; the per-job token from the accept/acquire JSON is what ``start``/``chunks``/job
  state/``finish`` accept. Anything else is answered ``401 {"message": ...}``.
* the job state machine ``scheduled → assigned → accepted → running → finished`` (plus
  ``canceling``/``canceled`` and ``timing_out``/``timed_out``), with ``422 {"message": ...}`` on a
  call in the wrong state.
* log chunks: gzip bodies, ``sequence``/``offset``/``size`` in the query string, stored by offset,
  so out-of-order and retried uploads reassemble byte-exactly, and gaps are detected.
* artifacts: a batch create (``POST /jobs/{id}/artifacts``) whose every field is checked, answered
  with ids and form upload instructions that point at a storage endpoint served here (no
  credentials taken, the form's fields as instructed, the file last, its size and digests as
  declared), and the batch state update (``PUT /jobs/{id}/artifacts``), where ``finished`` is
  refused for an artifact whose content never arrived.

Tests drive it through methods (``queue_job``, ``cancel_job``, ``fail``, ``delay``, ``drop`` ...)
and inspect what the client did through ``log``, ``finishes``, ``requests`` and the agent/job
records. Everything runs on the test's event loop on 127.0.0.1 with an ephemeral port.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import gzip
import hashlib
import json
import re
import secrets
import time
import uuid
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal

from aiohttp import web

TokenKind = Literal["registration", "session", "job", "unknown", "none"]

# Endpoint names used for fault injection and for filtering recorded requests.
ENDPOINTS: frozenset[str] = frozenset(
    {
        "root",
        "register",
        "connect",
        "disconnect",
        "heartbeat",
        "ping",
        "accept",
        "acquire",
        "start",
        "chunks",
        "job_state",
        "finish",
        "artifacts_create",
        "artifact_upload",
        "artifacts_update",
    }
)

# The agent's own vocabulary for why a job ended abnormally; the server (a Rails enum) rejects
# anything else, so a typo in the client must fail here too.
SIGNAL_REASONS: frozenset[str] = frozenset(
    {"agent_refused", "agent_stop", "cancel", "signature_rejected", "process_run_error", "stack_error"}
)

# States in which the job's process may still be running on the agent, so chunks, job-state polls
# and the finish call are legitimate (a cancel does not stop the log stream).
_LIVE_STATES = frozenset({"running", "canceling", "timing_out"})
# What a live state becomes once the agent has finished the job.
_FINAL_STATE = {"running": "finished", "canceling": "canceled", "timing_out": "timed_out"}
_TERMINAL_STATES = frozenset({"finished", "canceled", "timed_out"})

EDGE_PREFIX = "/edge"
# Where the emulated artifact storage takes form uploads (Buildkite's is an S3 bucket).
STORAGE_PATH = "/_artifact-storage/uploads"
_HEX = frozenset("0123456789abcdef")
DEFAULT_REGISTRATION_TOKEN = "bkct_emulator-registration-token"


class LogGapError(AssertionError):
    """The chunks received for a job do not tile ``[0, end)``: a byte range is missing or two
    chunks overlap with different content."""


@dataclass
class Fault:
    """One injected misbehaviour for one endpoint, consumed ``remaining`` times.

    ``processed`` says whether the emulator applies the request's effect before misbehaving: a
    timed-out ``finish`` that Buildkite did record is the case a client's retry logic must survive,
    and it differs from a proxy error that never reached the application.
    """

    kind: Literal["status", "non_json", "delay", "drop"]
    remaining: int = 1
    status: int = 500
    retry_after: str | None = None
    message: str | None = None
    seconds: float = 0.0
    processed: bool = False


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    endpoint: str | None
    token_kind: TokenKind
    agent_id: str | None = None
    job_id: str | None = None
    status: int | None = None
    fault: str | None = None
    # Server-specified ``Buildkite-*`` headers the client should have sent but did not, and ones it
    # sent although the server never asked (or asked for a header without the prefix).
    missing_headers: dict[str, str] = field(default_factory=dict)
    unexpected_headers: dict[str, str] = field(default_factory=dict)


@dataclass
class ChunkRecord:
    sequence: int
    offset: int
    size: int
    compressed_size: int
    data: bytes
    # time.monotonic() when the chunk arrived, for latency measurements.
    received_at: float = 0.0


@dataclass
class EmulatedAgent:
    id: str
    name: str
    access_token: str
    meta_data: list[str]
    register_body: dict[str, Any]
    connected: bool = False
    disconnected: bool = False
    heartbeats: list[dict[str, Any]] = field(default_factory=list)
    pings: int = 0
    assigned_job: str | None = None
    # What the next pings answer; "idle" and "" both mean "carry on" to the agent.
    action: str = "idle"
    message: str | None = None
    # The Buildkite-* headers the client was last told to send (register, then each ping that
    # carried ``request_headers``).
    expected_headers: dict[str, str] = field(default_factory=dict)
    rejected_headers: dict[str, str] = field(default_factory=dict)

    @property
    def tags(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for item in self.meta_data:
            key, _, value = item.partition("=")
            out[key] = value
        return out


@dataclass
class EmulatedJob:
    id: str
    data: dict[str, Any]
    token: str
    state: str = "scheduled"
    agent_query_rules: list[str] = field(default_factory=list)
    locked: bool = False
    lock_retry_after: int | None = None
    agent_id: str | None = None
    start_body: dict[str, Any] | None = None
    # time.monotonic() when the start was taken: what Buildkite counts the step's timeout from.
    started_at: float | None = None
    finish_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_body: dict[str, Any] | None = None
    chunks_by_offset: dict[int, ChunkRecord] = field(default_factory=dict)
    chunk_sequences: dict[int, int] = field(default_factory=dict)  # sequence -> offset
    duplicate_chunks: int = 0
    chunk_conflicts: list[str] = field(default_factory=list)


@dataclass
class EmulatedArtifact:
    """An artifact as Buildkite keeps it: what the batch create declared, what the storage
    received (``content``, None until then) and the state the agent last set."""

    id: str
    job_id: str
    batch_id: str
    path: str
    absolute_path: str
    glob_path: str
    file_size: int
    sha1sum: str
    sha256sum: str
    content_type: str
    # The form fields the storage expects for this artifact, in the order the instructions list them.
    fields: list[tuple[str, str]] = field(default_factory=list)
    state: str = "new"
    content: bytes | None = None
    uploads: int = 0


def make_job(
    command: str = "echo hello",
    *,
    job_id: str | None = None,
    repo: str = "https://example.invalid/org/repo.git",
    commit: str = "0123456789abcdef0123456789abcdef01234567",
    env: Mapping[str, str] | None = None,
    step: Mapping[str, Any] | None = None,
    signature: Mapping[str, Any] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """Job JSON shaped like ``api.Job``, with the env Buildkite always sends.

    ``signature`` (``{"algorithm", "signed_fields", "value"}``) is placed on the step, where the
    backend stores it; ``fields`` override any top-level key (``chunks_max_size_bytes`` ...).
    """
    jid = job_id or str(uuid.uuid4())
    build_id = str(uuid.uuid4())
    job_env: dict[str, str] = {
        "BUILDKITE": "true",
        "CI": "true",
        "BUILDKITE_JOB_ID": jid,
        "BUILDKITE_BUILD_ID": build_id,
        "BUILDKITE_BUILD_NUMBER": "1",
        "BUILDKITE_BUILD_URL": "https://buildkite.com/example/pipeline/builds/1",
        "BUILDKITE_PIPELINE_SLUG": "pipeline",
        "BUILDKITE_ORGANIZATION_SLUG": "example",
        "BUILDKITE_REPO": repo,
        "BUILDKITE_COMMIT": commit,
        "BUILDKITE_BRANCH": "main",
        "BUILDKITE_COMMAND": command,
        "BUILDKITE_LABEL": "test step",
        "BUILDKITE_PLUGINS": "",
        "BUILDKITE_RETRY_COUNT": "0",
        "BUILDKITE_COMPUTE_TYPE": "self-hosted",
    }
    if env:
        job_env.update(env)
    job_step: dict[str, Any] = dict(step) if step is not None else {"command": command}
    if signature is not None:
        job_step["signature"] = dict(signature)
    job: dict[str, Any] = {
        "id": jid,
        "endpoint": "",
        "state": "scheduled",
        "env": job_env,
        "step": job_step,
        "matrix_permutation": {},
        # Positive values: the agent refuses to stream with a zero chunk size.
        "chunks_max_size_bytes": 100 * 1024,
        "chunks_interval_seconds": 1,
        "log_max_size_bytes": 1024 * 1024 * 1024,
        "token": "bkaj_" + secrets.token_hex(32),
        "exit_status": "",
        "signal": "",
        "signal_reason": "",
        "started_at": "",
        "finished_at": "",
        "runnable_at": "",
        "chunks_failed_count": 0,
        "traceparent": "",
        "tracestate": "",
        "priority": 0,
    }
    job.update(fields)
    return job


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _error(status: int, message: str, *, headers: Mapping[str, str] | None = None) -> web.Response:
    # Buildkite's error bodies are ``{"message": ...}``.
    return web.json_response({"message": message}, status=status, headers=headers)


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.json_response(payload, status=status)


class _Reject(Exception):
    """Raised inside a handler to answer with a ``{"message"}`` error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


Handler = Callable[[web.Request, RecordedRequest], Awaitable[web.StreamResponse]]


class BuildkiteEmulator:
    """``async with BuildkiteEmulator() as bk:`` — the agent API at ``bk.url`` (``.../v3``)."""

    def __init__(
        self,
        *,
        registration_tokens: Iterable[str] = (DEFAULT_REGISTRATION_TOKEN,),
        ping_interval: int = 1,
        job_status_interval: int = 1,
        heartbeat_interval: int = 5,
        request_headers: Mapping[str, str] | None = None,
        job_token_expires_on_finish: bool = False,
    ) -> None:
        # The agent feeds these straight into Go tickers, which panic on 0.
        for name, value in (
            ("ping_interval", ping_interval),
            ("job_status_interval", job_status_interval),
            ("heartbeat_interval", heartbeat_interval),
        ):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.registration_tokens: set[str] = set(registration_tokens)
        self.registration_token: str = next(iter(self.registration_tokens), DEFAULT_REGISTRATION_TOKEN)
        self.ping_interval = ping_interval
        self.job_status_interval = job_status_interval
        self.heartbeat_interval = heartbeat_interval
        self.request_headers: dict[str, str] = dict(request_headers or {})
        # What ping responses carry as ``request_headers``: None omits the key (the client keeps
        # its set), a dict (even empty) replaces the client's set.
        self.ping_request_headers: dict[str, str] | None = None
        # What ping responses carry as ``endpoint`` (the client test-pings it, then
        # moves there); None omits it. ``edge_url`` serves the same API under another path.
        self.ping_endpoint: str | None = None
        # Buildkite has been seen answering late calls either as "already finished" (422/400) or as
        # "invalid access token" (401) once the job token died; tests pick which one to face.
        self.job_token_expires_on_finish = job_token_expires_on_finish

        self.agents: dict[str, EmulatedAgent] = {}
        self.jobs: dict[str, EmulatedJob] = {}
        self.recorded: list[RecordedRequest] = []
        self._sessions: dict[str, str] = {}  # session token -> agent id
        self._revoked_sessions: dict[str, str] = {}
        self._job_tokens: dict[str, str] = {}  # job token -> job id
        self._faults: dict[str, deque[Fault]] = {}
        self.artifacts: dict[str, EmulatedArtifact] = {}
        self._artifact_batches: dict[tuple[str, str], tuple[list[dict[str, Any]], dict[str, Any]]] = {}
        # Instructions per artifact (``per_artifact_instructions``) instead of one template per batch.
        self.per_artifact_instructions = False
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._closing = asyncio.Event()

    # ---------------------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> BuildkiteEmulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        app = web.Application()
        routes: list[tuple[str, str, str, Handler]] = [
            ("GET", "/", "root", self._h_root),
            ("GET", "/v3", "root", self._h_root),
            ("POST", "/v3/register", "register", self._h_register),
            ("POST", "/v3/connect", "connect", self._h_connect),
            ("POST", "/v3/disconnect", "disconnect", self._h_disconnect),
            ("POST", "/v3/heartbeat", "heartbeat", self._h_heartbeat),
            ("GET", "/v3/ping", "ping", self._h_ping),
            ("PUT", "/v3/jobs/{job_id}/accept", "accept", self._h_accept),
            ("PUT", "/v3/jobs/{job_id}/acquire", "acquire", self._h_acquire),
            ("PUT", "/v3/jobs/{job_id}/start", "start", self._h_start),
            ("POST", "/v3/jobs/{job_id}/chunks", "chunks", self._h_chunks),
            ("GET", "/v3/jobs/{job_id}", "job_state", self._h_job_state),
            ("PUT", "/v3/jobs/{job_id}/finish", "finish", self._h_finish),
            ("POST", "/v3/jobs/{job_id}/artifacts", "artifacts_create", self._h_artifacts_create),
            ("PUT", "/v3/jobs/{job_id}/artifacts", "artifacts_update", self._h_artifacts_update),
            ("POST", STORAGE_PATH, "artifact_upload", self._h_artifact_upload),
        ]
        for method, path, name, handler in routes:
            app.router.add_route(method, path, self._wrap(name, handler))
            if path.startswith("/v3"):
                app.router.add_route(method, EDGE_PREFIX + path, self._wrap(name, handler))
        # Unknown paths still get recorded, and answered the way Rails answers them.
        app.router.add_route("*", "/{tail:.*}", self._wrap(None, self._h_not_found))
        # Chunk bodies must reach the handler still gzipped, to check they really are gzip.
        self._runner = web.AppRunner(app, auto_decompress=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = int(self._runner.addresses[0][1])

    async def close(self) -> None:
        # Cut injected delays short, or shutting down would wait for every sleeping handler.
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def root_url(self) -> str:
        if self._port is None:
            raise RuntimeError("the emulator is not running")
        return f"http://127.0.0.1:{self._port}"

    @property
    def url(self) -> str:
        """The agent endpoint, as ``--endpoint`` would be given (``.../v3``)."""
        return self.root_url + "/v3"

    @property
    def edge_url(self) -> str:
        """The same API under another path: an endpoint a ping answer may move the agent to."""
        return self.root_url + EDGE_PREFIX + "/v3"

    # ---------------------------------------------------------------------------- test API: jobs

    def queue_job(
        self,
        job: Mapping[str, Any],
        *,
        agent_query_rules: Iterable[str] = (),
        locked: bool = False,
        lock_retry_after: int | None = None,
    ) -> str:
        """Schedule a job (job JSON shaped like ``api.Job``; see ``make_job``); returns its id.

        ``agent_query_rules`` (``["queue=hpc", "gpu=true"]``, ``*`` globs allowed) decide which
        agents' pings receive it; without a ``queue`` rule it targets the default queue, like an
        agent without a ``queue`` tag. ``locked`` makes ``acquire`` answer ``423`` (dependencies
        not finished) until ``unlock_job``.
        """
        data = json.loads(json.dumps(dict(job)))  # a private deep copy, JSON-clean
        job_id = str(data.get("id") or uuid.uuid4())
        if job_id in self.jobs:
            raise ValueError(f"job {job_id} is already queued")
        data["id"] = job_id
        token = str(data.get("token") or "bkaj_" + secrets.token_hex(32))
        data["token"] = token
        data["state"] = "scheduled"
        self.jobs[job_id] = EmulatedJob(
            id=job_id,
            data=data,
            token=token,
            agent_query_rules=list(agent_query_rules),
            locked=locked,
            lock_retry_after=lock_retry_after,
        )
        self._job_tokens[token] = job_id
        return job_id

    def unlock_job(self, job_id: str) -> None:
        self._job(job_id).locked = False

    def cancel_job(self, job_id: str) -> None:
        """Cancel from the UI: a job on an agent goes ``canceling`` (the agent learns it from the
        job-state poll and finishes it), one no agent has accepted goes straight to ``canceled``."""
        job = self._job(job_id)
        if job.state in {"scheduled", "assigned"}:
            self._release(job)
            job.state = "canceled"
        elif job.state in {"accepted", "running", "timing_out"}:
            job.state = "canceling"

    def time_out_job(self, job_id: str) -> None:
        """The step's ``timeout_in_minutes`` expired: a running job goes ``timing_out``."""
        job = self._job(job_id)
        if job.state in {"accepted", "running"}:
            job.state = "timing_out"
        elif job.state in {"scheduled", "assigned"}:
            self._release(job)
            job.state = "timed_out"

    def set_job_state(self, job_id: str, state: str) -> None:
        """Force any state string (what ``GET /jobs/{id}`` reports)."""
        self._job(job_id).state = state

    def job_state(self, job_id: str) -> str:
        return self._job(job_id).state

    def started_at(self, job_id: str) -> float | None:
        """When (time.monotonic()) the job was started; None while it was not."""
        return self._job(job_id).started_at

    # ---------------------------------------------------------------------------- test API: agents

    def set_action(self, action: str, *, message: str | None = None, agent_id: str | None = None) -> None:
        """What ping answers from now on: ``idle`` (or ``""``), ``pause`` or ``disconnect``; for one
        agent, or every registered agent (and ones registering later keep the default)."""
        targets = [self.agents[agent_id]] if agent_id else list(self.agents.values())
        for agent in targets:
            agent.action = action
            agent.message = message

    def agent_by_name(self, name: str) -> EmulatedAgent:
        matches = [a for a in self.agents.values() if a.name == name]
        if len(matches) != 1:
            raise KeyError(f"{len(matches)} agents named {name!r}")
        return matches[0]

    # ---------------------------------------------------------------------------- test API: faults

    def fail(
        self,
        endpoint: str,
        status: int = 500,
        *,
        times: int = 1,
        retry_after: int | str | None = None,
        message: str | None = None,
    ) -> None:
        """The next ``times`` calls to ``endpoint`` get ``status`` (with ``Retry-After`` if given)
        and have no effect, as when an overloaded or rate-limiting front end answers."""
        self._add_fault(
            endpoint,
            Fault(
                kind="status",
                remaining=times,
                status=status,
                retry_after=None if retry_after is None else str(retry_after),
                message=message,
            ),
        )

    def non_json(self, endpoint: str, *, times: int = 1, status: int = 200, processed: bool = False,
                 body: str | None = None) -> None:
        """A 2xx HTML page instead of JSON (a proxy or CDN answering), which the agent must treat
        as retryable; or `body`, any other text no JSON reader can take."""
        self._add_fault(endpoint, Fault(kind="non_json", remaining=times, status=status, processed=processed,
                                        message=body))

    def delay(self, endpoint: str, seconds: float, *, times: int = 1, processed: bool = True) -> None:
        """Answer only after ``seconds``. With ``processed`` the effect is applied first, so a client
        that timed out and retries meets the consequences (e.g. ``422`` on a second finish)."""
        self._add_fault(endpoint, Fault(kind="delay", remaining=times, seconds=seconds, processed=processed))

    def drop(self, endpoint: str, *, times: int = 1, processed: bool = False) -> None:
        """Close the connection without answering (optionally after applying the effect)."""
        self._add_fault(endpoint, Fault(kind="drop", remaining=times, processed=processed))

    def clear_faults(self) -> None:
        self._faults.clear()

    def pending_faults(self, endpoint: str | None = None) -> int:
        queues = [self._faults.get(endpoint, deque())] if endpoint else list(self._faults.values())
        return sum(f.remaining for q in queues for f in q)

    # ---------------------------------------------------------------------------- test API: inspection

    def requests(self, endpoint: str | None = None) -> list[RecordedRequest]:
        return [r for r in self.recorded if endpoint is None or r.endpoint == endpoint]

    def header_violations(self) -> list[RecordedRequest]:
        """Requests that did not carry exactly the ``Buildkite-*`` headers the server asked for."""
        return [r for r in self.recorded if r.missing_headers or r.unexpected_headers]

    def finishes(self, job_id: str) -> list[dict[str, Any]]:
        """The body of every finish call that reached the job with its job token, in arrival
        order, whether accepted or answered ``422`` — so ``len(...) == 1`` means exactly once."""
        return [dict(b) for b in self._job(job_id).finish_calls]

    def chunks(self, job_id: str) -> list[ChunkRecord]:
        job = self._job(job_id)
        return [job.chunks_by_offset[o] for o in sorted(job.chunks_by_offset)]

    def job_artifacts(self, job_id: str) -> list[EmulatedArtifact]:
        """The job's artifacts in the order they were created."""
        self._job(job_id)
        return [a for a in self.artifacts.values() if a.job_id == job_id]

    def log(self, job_id: str) -> bytes:
        """The job's log as Buildkite would show it: chunks in offset order, decompressed.

        Raises ``LogGapError`` if the received chunks leave a hole or overlap inconsistently.
        """
        job = self._job(job_id)
        out = bytearray()
        for offset in sorted(job.chunks_by_offset):
            chunk = job.chunks_by_offset[offset]
            if offset > len(out):
                raise LogGapError(f"job {job_id}: bytes [{len(out)}, {offset}) were never uploaded")
            if offset < len(out):
                overlap = bytes(out[offset : offset + chunk.size])
                if chunk.data[: len(overlap)] != overlap:
                    raise LogGapError(f"job {job_id}: chunk at offset {offset} overlaps different bytes")
                out += chunk.data[len(overlap) :]
                continue
            out += chunk.data
        return bytes(out)

    # ---------------------------------------------------------------------------- internals

    def _job(self, job_id: str) -> EmulatedJob:
        try:
            return self.jobs[job_id]
        except KeyError:
            raise KeyError(f"no job {job_id!r} was queued") from None

    def _release(self, job: EmulatedJob) -> None:
        if job.agent_id and self.agents[job.agent_id].assigned_job == job.id:
            self.agents[job.agent_id].assigned_job = None

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)

    def _add_fault(self, endpoint: str, fault: Fault) -> None:
        if endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {endpoint!r}; known: {sorted(ENDPOINTS)}")
        if fault.remaining < 1:
            raise ValueError("times must be at least 1")
        self._faults.setdefault(endpoint, deque()).append(fault)

    def _take_fault(self, endpoint: str | None) -> Fault | None:
        if endpoint is None:
            return None
        queue = self._faults.get(endpoint)
        if not queue:
            return None
        fault = queue[0]
        fault.remaining -= 1
        if fault.remaining <= 0:
            queue.popleft()
        return fault

    def _classify(self, request: web.Request) -> tuple[TokenKind, str | None]:
        header = request.headers.get("Authorization")
        if not header:
            return "none", None
        scheme, _, token = header.partition(" ")
        # The agent API authenticates with ``Token``; ``Bearer`` is for user tokens on the REST and
        # GraphQL APIs.
        if scheme != "Token" or not token:
            return "unknown", None
        if token in self.registration_tokens:
            return "registration", token
        if token in self._sessions or token in self._revoked_sessions:
            return "session", token
        if token in self._job_tokens:
            return "job", token
        return "unknown", token

    def _check_headers(self, record: RecordedRequest, agent: EmulatedAgent | None) -> None:
        if agent is None:
            return
        sent = {k: v for k, v in record.headers.items() if k.lower().startswith("buildkite-")}
        sent_lower = {k.lower(): v for k, v in sent.items()}
        for key, value in agent.expected_headers.items():
            if sent_lower.get(key.lower()) != value:
                record.missing_headers[key] = value
        expected_lower = {k.lower() for k in agent.expected_headers}
        for key, value in sent.items():
            # The client adds this one itself from its request deadline.
            if key.lower() == "buildkite-timeout-milliseconds":
                continue
            if key.lower() not in expected_lower:
                record.unexpected_headers[key] = value
        lowered = {k.lower() for k in record.headers}
        for key, value in agent.rejected_headers.items():
            if key.lower() in lowered:
                record.unexpected_headers[key] = value

    def _wrap(
        self, endpoint: str | None, handler: Handler
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            kind, _ = self._classify(request)
            record = RecordedRequest(
                method=request.method,
                path=request.path,
                query=dict(request.query),
                headers=dict(request.headers),
                body=body,
                endpoint=endpoint,
                token_kind=kind,
                job_id=request.match_info.get("job_id"),
            )
            self.recorded.append(record)
            fault = self._take_fault(endpoint)
            if fault is not None:
                record.fault = fault.kind
            response: web.StreamResponse | None = None
            if fault is None or fault.processed or fault.kind == "delay":
                if fault is not None and fault.kind == "delay" and not fault.processed:
                    await self._sleep(fault.seconds)
                if fault is None or fault.kind != "status":
                    response = await self._run(handler, request, record)
            if fault is not None:
                if fault.kind == "delay" and fault.processed:
                    await self._sleep(fault.seconds)
                elif fault.kind == "status":
                    headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else None
                    response = _error(
                        fault.status, fault.message or f"injected {fault.status}", headers=headers
                    )
                elif fault.kind == "non_json":
                    response = web.Response(
                        status=fault.status,
                        text=fault.message or "<html><body><h1>502 Bad Gateway</h1></body></html>",
                        content_type="text/html",
                    )
                elif fault.kind == "drop":
                    record.status = None
                    transport = request.transport
                    if transport is not None:
                        transport.abort()
                    # Nothing can be written any more; aiohttp drops the response quietly.
                    return web.Response(status=200)
            assert response is not None
            record.status = response.status
            return response

        return wrapped

    async def _run(
        self, handler: Handler, request: web.Request, record: RecordedRequest
    ) -> web.StreamResponse:
        try:
            return await handler(request, record)
        except _Reject as reject:
            return _error(reject.status, reject.message)

    def _session_agent(self, record: RecordedRequest, request: web.Request) -> EmulatedAgent:
        _, token = self._classify(request)
        if record.token_kind != "session" or token is None:
            raise _Reject(401, "Invalid access token")
        if token in self._revoked_sessions:
            # The session token dies with the disconnect.
            record.agent_id = self._revoked_sessions[token]
            raise _Reject(401, "Invalid access token")
        agent = self.agents[self._sessions[token]]
        record.agent_id = agent.id
        self._check_headers(record, agent)
        return agent

    def _job_for_token(self, record: RecordedRequest, request: web.Request) -> EmulatedJob:
        _, token = self._classify(request)
        if record.token_kind != "job" or token is None:
            raise _Reject(401, "Invalid access token")
        job = self.jobs[self._job_tokens[token]]
        record.agent_id = job.agent_id
        if job.agent_id is not None:
            self._check_headers(record, self.agents[job.agent_id])
        path_id = request.match_info["job_id"]
        if path_id != job.id:
            raise _Reject(404, f"No job found with id {path_id!r} for this token")
        if job.state in _TERMINAL_STATES and self.job_token_expires_on_finish:
            raise _Reject(401, "Invalid access token")
        return job

    def _job_from_path(self, request: web.Request) -> EmulatedJob:
        job_id = request.match_info["job_id"]
        job = self.jobs.get(job_id)
        if job is None:
            raise _Reject(404, f"No job found with id {job_id!r}")
        return job

    @staticmethod
    def _json_body(record: RecordedRequest, *, required: bool) -> dict[str, Any]:
        if not record.body.strip():
            if required:
                raise _Reject(400, "Missing JSON body")
            return {}
        try:
            parsed = json.loads(record.body)
        except ValueError:
            raise _Reject(400, "Body is not valid JSON") from None
        if not isinstance(parsed, dict):
            raise _Reject(400, "Body must be a JSON object")
        return parsed

    def _job_json(self, job: EmulatedJob, agent: EmulatedAgent) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(json.dumps(job.data))
        data["state"] = job.state
        data["endpoint"] = self.url
        env = data.setdefault("env", {})
        if not isinstance(env, dict):
            return data  # a malformed job, as a test queued it: the agent must cope with it as sent
        # Accepting applies the agent to the job's environment (its tags among them).
        env["BUILDKITE_AGENT_ID"] = agent.id
        env["BUILDKITE_AGENT_NAME"] = agent.name
        for key, value in agent.tags.items():
            env["BUILDKITE_AGENT_META_DATA_" + key.upper().replace("-", "_")] = value
        return data

    @staticmethod
    def _matches(job: EmulatedJob, agent: EmulatedAgent) -> bool:
        tags = agent.tags
        tags.setdefault("queue", "default")
        rules = list(job.agent_query_rules)
        if not any(r.partition("=")[0] == "queue" for r in rules):
            rules.append("queue=default")
        for rule in rules:
            key, _, pattern = rule.partition("=")
            if key not in tags or not fnmatch.fnmatchcase(tags[key], pattern):
                return False
        return True

    # ---------------------------------------------------------------------------- handlers

    async def _h_not_found(self, request: web.Request, record: RecordedRequest) -> web.StreamResponse:
        return _error(404, "Not Found")

    async def _h_root(self, request: web.Request, record: RecordedRequest) -> web.StreamResponse:
        return _json({"message": "👋", "timestamp": int(datetime.now(UTC).timestamp())})

    async def _h_register(self, request: web.Request, record: RecordedRequest) -> web.StreamResponse:
        if record.token_kind != "registration":
            raise _Reject(401, "Invalid registration token")
        body = self._json_body(record, required=True)
        meta = body.get("meta_data", [])
        if not isinstance(meta, list) or not all(isinstance(m, str) and "=" in m for m in meta):
            raise _Reject(422, "meta_data must be a list of key=value strings")
        name = str(body.get("name") or f"agent-{len(self.agents) + 1}")
        agent = EmulatedAgent(
            id=str(uuid.uuid4()),
            name=name,
            access_token="bkaa_" + secrets.token_hex(24),
            meta_data=list(meta),
            register_body=body,
        )
        self._apply_server_headers(agent, self.request_headers)
        self.agents[agent.id] = agent
        self._sessions[agent.access_token] = agent.id
        record.agent_id = agent.id
        return _json(
            {
                "id": agent.id,
                "name": agent.name,
                "access_token": agent.access_token,
                "endpoint": self.url,
                "request_headers": dict(self.request_headers),
                "ping_interval": self.ping_interval,
                "job_status_interval": self.job_status_interval,
                "heartbeat_interval": self.heartbeat_interval,
                "meta_data": list(agent.meta_data),
            }
        )

    @staticmethod
    def _apply_server_headers(agent: EmulatedAgent, headers: Mapping[str, str]) -> None:
        # The agent keeps only ``Buildkite-``-prefixed keys and replaces its whole set each time.
        agent.expected_headers = {k: v for k, v in headers.items() if k.startswith("Buildkite-")}
        agent.rejected_headers = {k: v for k, v in headers.items() if not k.startswith("Buildkite-")}

    async def _h_connect(self, request: web.Request, record: RecordedRequest) -> web.StreamResponse:
        agent = self._session_agent(record, request)
        agent.connected = True
        return _json({"id": agent.id, "connection_state": "connected"})

    async def _h_disconnect(self, request: web.Request, record: RecordedRequest) -> web.StreamResponse:
        agent = self._session_agent(record, request)
        agent.connected = False
        agent.disconnected = True
        self._revoked_sessions[agent.access_token] = agent.id
        del self._sessions[agent.access_token]
        return _json({"id": agent.id, "connection_state": "disconnected"})

    async def _h_heartbeat(self, request: web.Request, record: RecordedRequest) -> web.StreamResponse:
        agent = self._session_agent(record, request)
        body = self._json_body(record, required=True)
        sent_at = body.get("sent_at")
        if not isinstance(sent_at, str) or not sent_at:
            raise _Reject(422, "sent_at is required")
        agent.heartbeats.append(body)
        return _json({"sent_at": sent_at, "received_at": _now()})

    async def _h_ping(self, request: web.Request, record: RecordedRequest) -> web.StreamResponse:
        agent = self._session_agent(record, request)
        if not agent.connected:
            raise _Reject(422, "Agent is not connected")
        agent.pings += 1
        # Ping carries no intervals: those come from register only.
        payload: dict[str, Any] = {}
        if agent.action:
            payload["action"] = agent.action
        if agent.message:
            payload["message"] = agent.message
        if self.ping_request_headers is not None:
            payload["request_headers"] = dict(self.ping_request_headers)
        if self.ping_endpoint is not None:
            payload["endpoint"] = self.ping_endpoint
        if agent.action not in {"pause", "disconnect"}:
            job = self._dispatch(agent)
            if job is not None:
                record.job_id = job.id
                payload["job"] = self._job_json(job, agent)
        response = _json(payload)
        # The client adopts the new set once it has this response, i.e. from its next request on.
        if self.ping_request_headers is not None:
            self._apply_server_headers(agent, self.ping_request_headers)
        return response

    def _dispatch(self, agent: EmulatedAgent) -> EmulatedJob | None:
        if agent.assigned_job is not None:
            job = self.jobs[agent.assigned_job]
            # Until accepted, the assignment is repeated on every ping (the agent may have missed it).
            return job if job.state == "assigned" else None
        for job in self.jobs.values():
            if job.state == "scheduled" and self._matches(job, agent):
                job.state = "assigned"
                job.agent_id = agent.id
                agent.assigned_job = job.id
                return job
        return None

    async def _h_accept(self, request: web.Request, record: RecordedRequest) -> web.StreamResponse:
        agent = self._session_agent(record, request)
        job = self._job_from_path(request)
        if job.state != "assigned" or job.agent_id != agent.id:
            raise _Reject(422, f"This job can't be accepted while it is in a '{job.state}' state")
        job.state = "accepted"
        return _json(self._job_json(job, agent))

    async def _h_acquire(self, request: web.Request, record: RecordedRequest) -> web.StreamResponse:
        agent = self._session_agent(record, request)
        job = self._job_from_path(request)
        if request.headers.get("X-Buildkite-Lock-Acquire-Job") != "1":
            raise _Reject(422, "Expected X-Buildkite-Lock-Acquire-Job to be set to 1")
        if job.state != "scheduled":
            raise _Reject(422, f"Job {job.id} is no longer eligible to be assigned an agent")
        if job.locked:
            headers = {"Retry-After": str(job.lock_retry_after)} if job.lock_retry_after is not None else None
            return _error(423, f"Job {job.id} is waiting on dependencies", headers=headers)
        # Acquiring ignores agent tags and means assigned + accepted at once.
        job.state = "accepted"
        job.agent_id = agent.id
        agent.assigned_job = job.id
        return _json(self._job_json(job, agent))

    async def _h_start(self, request: web.Request, record: RecordedRequest) -> web.StreamResponse:
        job = self._job_for_token(record, request)
        if job.state != "accepted":
            raise _Reject(422, f"This job can't be started while it is in a '{job.state}' state")
        body = self._json_body(record, required=True)
        if not isinstance(body.get("started_at"), str):
            raise _Reject(422, "started_at is required")
        job.start_body = body
        job.started_at = time.monotonic()
        job.state = "running"
        return _json({"id": job.id, "state": job.state})

    async def _h_job_state(self, request: web.Request, record: RecordedRequest) -> web.StreamResponse:
        job = self._job_for_token(record, request)
        return _json({"state": job.state})

    async def _h_chunks(self, request: web.Request, record: RecordedRequest) -> web.StreamResponse:
        job = self._job_for_token(record, request)
        if job.state in _TERMINAL_STATES:
            # What Buildkite answers to chunks after the job finished.
            raise _Reject(400, "Job can't have chunks")
        if job.state not in _LIVE_STATES:
            raise _Reject(422, f"This job can't have chunks while it is in a '{job.state}' state")
        try:
            sequence = int(request.query["sequence"])
            offset = int(request.query["offset"])
            size = int(request.query["size"])
        except (KeyError, ValueError):
            raise _Reject(400, "sequence, offset and size query parameters are required integers") from None
        if offset < 0 or size < 0 or sequence < 0:
            raise _Reject(400, "sequence, offset and size must not be negative")
        if request.headers.get("Content-Encoding", "").lower() != "gzip":
            raise _Reject(400, "Chunks must be sent with Content-Encoding: gzip")
        try:
            data = gzip.decompress(record.body)
        except (OSError, EOFError, zlib.error):
            raise _Reject(400, "Chunk body is not valid gzip") from None
        if len(data) != size:
            raise _Reject(400, f"Chunk size {size} does not match its {len(data)} uncompressed bytes")
        chunk = ChunkRecord(sequence, offset, size, len(record.body), data, time.monotonic())
        # Keyed by offset: the library controller numbers sequences from 0, the agent from 1, and
        # three upload workers deliver out of order.
        seen_offset = job.chunk_sequences.get(sequence)
        existing = job.chunks_by_offset.get(offset)
        if seen_offset is not None and seen_offset != offset:
            msg = f"sequence {sequence} sent again for offset {offset} (was {seen_offset})"
            job.chunk_conflicts.append(msg)
            raise _Reject(422, msg)
        if existing is not None:
            if existing.data != data:
                msg = f"offset {offset} sent again with different bytes (sequence {sequence})"
                job.chunk_conflicts.append(msg)
                raise _Reject(422, msg)
            job.duplicate_chunks += 1
        else:
            job.chunks_by_offset[offset] = chunk
        job.chunk_sequences[sequence] = offset
        return web.Response(status=201, text="{}", content_type="application/json")

    async def _h_finish(self, request: web.Request, record: RecordedRequest) -> web.StreamResponse:
        job = self._job_for_token(record, request)
        body = self._json_body(record, required=True)
        job.finish_calls.append(body)
        if job.state in _TERMINAL_STATES:
            raise _Reject(422, f"This job has already finished ('{job.state}')")
        if job.state not in _LIVE_STATES:
            raise _Reject(422, f"This job can't be finished while it is in a '{job.state}' state")
        exit_status = body.get("exit_status")
        # Sent as a string of an int, "-1" meaning "did not run".
        if not isinstance(exit_status, str):
            raise _Reject(422, "exit_status must be a string")
        try:
            int(exit_status)
        except ValueError:
            raise _Reject(422, f"exit_status {exit_status!r} is not an integer") from None
        failed = body.get("chunks_failed_count")
        # Always present, even when 0 (no omitempty on the agent's side).
        if not isinstance(failed, int) or isinstance(failed, bool):
            raise _Reject(422, "chunks_failed_count must be an integer")
        reason = body.get("signal_reason")
        if reason is not None and reason not in SIGNAL_REASONS:
            raise _Reject(422, f"signal_reason {reason!r} is not one of {sorted(SIGNAL_REASONS)}")
        if not isinstance(body.get("finished_at"), str):
            raise _Reject(422, "finished_at is required")
        job.finish_body = body
        job.state = _FINAL_STATE[job.state]
        self._release(job)
        return _json({"id": job.id, "state": job.state})

    # ---------------------------------------------------------------------------- artifacts

    async def _h_artifacts_create(self, request: web.Request, record: RecordedRequest) -> web.StreamResponse:
        job = self._job_for_token(record, request)
        if job.state not in _LIVE_STATES:
            raise _Reject(422, f"This job can't have artifacts while it is in a '{job.state}' state")
        body = self._json_body(record, required=True)
        batch_id = body.get("id")
        if not isinstance(batch_id, str) or not batch_id:
            raise _Reject(422, "A batch needs an id")
        if body.get("upload_destination") not in (None, ""):
            raise _Reject(422, "Only Buildkite's own artifact storage is emulated")
        declared = body.get("artifacts")
        if not isinstance(declared, list) or not declared:
            raise _Reject(422, "artifacts must be a non-empty list")
        for index, item in enumerate(declared):
            problem = _artifact_problem(item)
            if problem is not None:
                raise _Reject(422, f"artifacts[{index}]: {problem}")
        seen = self._artifact_batches.get((job.id, batch_id))
        if seen is not None:
            # A retried create: the same batch id gives the same artifacts, and nothing new.
            if seen[0] != declared:
                raise _Reject(422, f"Batch {batch_id} was created with other artifacts")
            return _json(seen[1])
        policy = secrets.token_hex(16)
        template = {
            "action": {"url": self.root_url + "/", "method": "POST", "path": STORAGE_PATH,
                       "file_input": "file"},
            "data": {"key": f"jobs/{job.id}/${{artifact:path}}", "acl": "private", "policy": policy},
        }
        ids: list[str] = []
        specific: dict[str, Any] = {}
        for item in declared:
            artifact = EmulatedArtifact(
                id=str(uuid.uuid4()), job_id=job.id, batch_id=batch_id, path=item["path"],
                absolute_path=item["absolute_path"], glob_path=item["glob_path"], file_size=item["file_size"],
                sha1sum=item["sha1sum"], sha256sum=item["sha256sum"],
                content_type=str(item.get("content_type") or ""))
            if self.per_artifact_instructions:
                own = {"action": dict(template["action"]),
                       "data": {"key": f"jobs/{job.id}/{artifact.id}", "acl": "private", "policy": policy}}
                specific[artifact.id] = own
                artifact.fields = list(own["data"].items())
            else:
                artifact.fields = [(k, v.replace("${artifact:path}", artifact.path))
                                   for k, v in template["data"].items()]
            self.artifacts[artifact.id] = artifact
            ids.append(artifact.id)
        answer = {"id": batch_id, "artifact_ids": ids, "upload_instructions": template,
                  "per_artifact_instructions": specific}
        self._artifact_batches[(job.id, batch_id)] = (declared, answer)
        return _json(answer, status=201)

    async def _h_artifact_upload(self, request: web.Request, record: RecordedRequest) -> web.StreamResponse:
        # A presigned form upload: the form is its credential, and a request that carries another
        # (the agent's token) is one the storage refuses, as S3 refuses two auth mechanisms.
        if "Authorization" in request.headers:
            raise _Reject(400, "Only one auth mechanism allowed: the upload form carries its own")
        if any(k.lower().startswith("buildkite-") for k in request.headers):
            raise _Reject(400, "Buildkite- headers are the agent API's, not the storage's")
        if "Content-Length" not in request.headers:
            raise _Reject(411, "MissingContentLength: uploads must say their length")
        content_type = request.headers.get("Content-Type", "")
        kind, _, params = content_type.partition(";")
        params = params.strip()
        boundary = params.removeprefix("boundary=").strip('"')
        if kind.strip() != "multipart/form-data" or not params.startswith("boundary=") or not boundary:
            raise _Reject(400, "The upload must be multipart/form-data with a boundary")
        parts = _form_parts(record.body, boundary)
        if not parts:
            raise _Reject(400, "The form has no parts")
        *fields, (file_name, filename, content) = parts
        if filename is None:
            raise _Reject(400, "The file must be the form's last part")
        if any(name_of_file is not None for _, name_of_file, _ in fields):
            raise _Reject(400, "Only the last part may be a file")
        sent = [(name, value.decode()) for name, _, value in fields]
        key = dict(sent).get("key")
        candidates = [a for a in self.artifacts.values() if dict(a.fields).get("key") == key]
        if not candidates:
            raise _Reject(403, f"No upload was granted for key {key!r}")
        artifact = candidates[-1]
        if sent != artifact.fields:
            raise _Reject(403, f"The form's fields {sent} are not the ones granted {artifact.fields}")
        if file_name != "file":
            raise _Reject(400, f"The file goes in the field 'file', not {file_name!r}")
        if filename != artifact.path:
            raise _Reject(400, f"The file is named {filename!r}, the artifact {artifact.path!r}")
        if len(content) != artifact.file_size:
            raise _Reject(400, f"{len(content)} bytes arrived for an artifact of {artifact.file_size}")
        if hashlib.sha256(content).hexdigest() != artifact.sha256sum:
            raise _Reject(400, "The content's sha256 is not the one declared")
        if hashlib.sha1(content).hexdigest() != artifact.sha1sum:
            raise _Reject(400, "The content's sha1 is not the one declared")
        artifact.content = content
        artifact.uploads += 1
        return web.Response(status=204)

    async def _h_artifacts_update(self, request: web.Request, record: RecordedRequest) -> web.StreamResponse:
        job = self._job_for_token(record, request)
        body = self._json_body(record, required=True)
        states = body.get("artifacts")
        if not isinstance(states, list) or not states:
            raise _Reject(422, "artifacts must be a non-empty list")
        changes: list[tuple[EmulatedArtifact, str]] = []
        for index, item in enumerate(states):
            if not isinstance(item, dict) or not isinstance(item.get("id"), str):
                raise _Reject(422, f"artifacts[{index}] needs an id")
            artifact = self.artifacts.get(item["id"])
            if artifact is None or artifact.job_id != job.id:
                raise _Reject(404, f"No artifact {item['id']!r} in this job")
            state = item.get("state")
            if state not in ("finished", "error"):
                raise _Reject(422, f"artifacts[{index}]: state {state!r} is not finished or error")
            if state == "finished" and artifact.content is None:
                raise _Reject(422, f"Artifact {artifact.path} was never uploaded")
            changes.append((artifact, state))
        for artifact, state in changes:
            artifact.state = state
        return _json({})


def _artifact_problem(item: object) -> str | None:
    """Why an artifact of a batch create is not one the agent would send, or None."""
    if not isinstance(item, dict):
        return "not an object"
    path = item.get("path")
    if not isinstance(path, str) or not path or path.startswith("/") or ".." in path.split("/"):
        return "path must be a relative path without '..'"
    absolute = item.get("absolute_path")
    if not isinstance(absolute, str) or not absolute.startswith("/"):
        return "absolute_path must be absolute"
    if not isinstance(item.get("glob_path"), str):
        return "glob_path must be a string"
    size = item.get("file_size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        return "file_size must be a non-negative integer"
    for key, length in (("sha1sum", 40), ("sha256sum", 64)):
        value = item.get(key)
        if not isinstance(value, str) or len(value) != length or not set(value) <= _HEX:
            return f"{key} must be {length} lowercase hex digits"
    content_type = item.get("content_type")
    if content_type is not None and not isinstance(content_type, str):
        return "content_type must be a string"
    return None


def _form_parts(body: bytes, boundary: str) -> list[tuple[str, str | None, bytes]]:
    """A multipart/form-data body as (field name, file name or None, content), strictly parsed."""
    opening = b"--" + boundary.encode()
    closing = b"\r\n" + opening + b"--\r\n"
    if not body.startswith(opening + b"\r\n") or not body.endswith(closing):
        raise _Reject(400, "The form does not open and close with its boundary")
    inner = body[len(opening) + 2:len(body) - len(closing)]
    parts: list[tuple[str, str | None, bytes]] = []
    for raw in inner.split(b"\r\n" + opening + b"\r\n"):
        head, sep, content = raw.partition(b"\r\n\r\n")
        if not sep:
            raise _Reject(400, "A part has no headers")
        headers = {}
        for line in head.decode().split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        disposition = headers.get("content-disposition", "")
        if not disposition.startswith("form-data;"):
            raise _Reject(400, "A part is not form-data")
        params = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', disposition))
        if "name" not in params:
            raise _Reject(400, "A part has no name")
        filename = params.get("filename")
        parts.append((_unescape(params["name"]), None if filename is None else _unescape(filename), content))
    return parts


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)
