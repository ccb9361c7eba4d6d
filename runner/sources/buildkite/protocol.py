"""Buildkite's agent API as plain data: the requests an agent makes and how it reads the answers.

No I/O happens here (the client in `client.py` sends what these functions build), so every rule
of the protocol can be tested as a function: which token a call uses, what its body is, which
answers are retried and after how long, and what a job state or a ping action means.

The protocol is what the open-source `buildkite-agent` speaks (the API itself is not a published
contract): `POST register` with the registration token, then the session token for `connect`,
`heartbeat`, `ping`, `accept` and `disconnect`, and each job's own token for `start`, `chunks`,
the job-state poll and `finish`.
"""

from __future__ import annotations

import json
import random
import re
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from typing import Any, Literal

from runner.errors import HpcRunnerError
from runner.sources.buildkite.chunks import Chunk

TokenKind = Literal["registration", "session", "job"]

# Only headers with this prefix, from register and ping answers, are sent back on later requests.
SERVER_HEADER_PREFIX = "Buildkite-"
# A header name is an RFC 9110 token. A value may not hold a control character but tab, nor DEL
# (RFC 9110 section 5.5): aiohttp raises ValueError before sending such a request. Nor a lone
# surrogate, which cannot be encoded as UTF-8.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_UNSENDABLE_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\ud800-\udfff]")
# Buildkite's enum of reasons for a job that did not end by itself (a Rails enum: others are refused).
SIGNAL_REASONS = frozenset({"agent_refused", "agent_stop", "cancel", "signature_rejected",
                            "process_run_error", "stack_error"})
# What an agent reports for a job whose command never ran.
NOT_RUN = -1
# The agent's defaults when a job leaves its log settings at 0.
DEFAULT_CHUNK_INTERVAL_S = 1
DEFAULT_LOG_MAX_BYTES = 1024 * 1024 * 1024

_CANCEL_STATES = frozenset({"canceling", "canceled"})
_TIMEOUT_STATES = frozenset({"timing_out", "timed_out"})


class ProtocolError(HpcRunnerError):
    """An answer that does not have the shape the protocol promises."""


# ---------------------------------------------------------------------------------------------
# Requests


@dataclass(frozen=True)
class ApiRequest:
    """One call: `name` is the endpoint's name (for retry rules and logs), `path` is relative to
    the endpoint, `token` says which of the agent's tokens authorises it."""

    name: str
    method: str
    path: str
    token: TokenKind
    json_body: Mapping[str, Any] | None = None
    body: bytes | None = None
    query: Mapping[str, str] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)

    def encoded_body(self) -> bytes | None:
        if self.json_body is not None:
            # The Go agent's json.Encoder ends every body with a newline.
            return (json.dumps(self.json_body, separators=(",", ":")) + "\n").encode()
        return self.body

    def content_headers(self) -> dict[str, str]:
        if self.json_body is not None:
            return {"Content-Type": "application/json", **self.headers}
        return dict(self.headers)


def join_url(endpoint: str, path: str) -> str:
    """The agent's URL join: exactly one slash between the endpoint and the path."""
    return endpoint.rstrip("/") + "/" + path.lstrip("/")


def job_path(job_id: str, *rest: str) -> str:
    # Rails treats a '.' in a path segment as a format suffix, so the agent escapes it too.
    escaped = urllib.parse.quote(job_id, safe="").replace(".", "%2E")
    return "/".join(("jobs", escaped, *rest))


def utc_timestamp(now: datetime | None = None) -> str:
    moment = now or datetime.now(UTC)
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def register(*, name: str, hostname: str, tags: tuple[str, ...], version: str, pid: int,
             os_name: str = "linux", arch: str = "amd64") -> ApiRequest:
    """Register one agent session; tags travel as `meta_data` (`key=value` strings).

    `features` stays empty: this agent polls (no streaming pings) and accepts dispatched jobs.
    """
    body = {
        "name": name, "hostname": hostname, "os": os_name, "arch": arch,
        "script_eval_enabled": True, "ignore_in_dispatches": False,
        "version": version, "build": "hpc-runner", "meta_data": list(tags), "pid": pid,
        "features": [],
    }
    return ApiRequest("register", "POST", "register", "registration", json_body=body)


def connect() -> ApiRequest:
    return ApiRequest("connect", "POST", "connect", "session")


def heartbeat(now: datetime | None = None) -> ApiRequest:
    moment = now or datetime.now(UTC)
    # The agent sends its local time with its zone; Buildkite only echoes it.
    return ApiRequest("heartbeat", "POST", "heartbeat", "session",
                      json_body={"sent_at": moment.astimezone().isoformat()})


def ping() -> ApiRequest:
    return ApiRequest("ping", "GET", "ping", "session")


def accept(job_id: str) -> ApiRequest:
    return ApiRequest("accept", "PUT", job_path(job_id, "accept"), "session")


def start(job_id: str, now: datetime | None = None) -> ApiRequest:
    return ApiRequest("start", "PUT", job_path(job_id, "start"), "job",
                      json_body={"started_at": utc_timestamp(now)})


def chunk(job_id: str, piece: Chunk) -> ApiRequest:
    """A log chunk: its place in the query string, the gzip of its bytes as the body."""
    return ApiRequest("chunks", "POST", job_path(job_id, "chunks"), "job", body=piece.data,
                      query={"sequence": str(piece.sequence), "offset": str(piece.offset),
                             "size": str(piece.size)},
                      headers={"Content-Type": "text/plain", "Content-Encoding": "gzip"})


def job_state(job_id: str) -> ApiRequest:
    return ApiRequest("job_state", "GET", job_path(job_id), "job")


@dataclass(frozen=True)
class FinishReport:
    """How a job ended, as Buildkite is told: the exit status is a string of an int on the wire."""

    exit_status: int
    signal: str | None = None
    signal_reason: str | None = None
    chunks_failed_count: int = 0

    def __post_init__(self) -> None:
        if self.signal_reason is not None and self.signal_reason not in SIGNAL_REASONS:
            raise ValueError(f"signal_reason {self.signal_reason!r} is not one Buildkite knows")

    def to_json(self) -> dict[str, Any]:
        return {"exit_status": self.exit_status, "signal": self.signal, "signal_reason": self.signal_reason,
                "chunks_failed_count": self.chunks_failed_count}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FinishReport:
        return cls(int(data["exit_status"]), data.get("signal"), data.get("signal_reason"),
                   int(data.get("chunks_failed_count", 0)))


def finish(job_id: str, report: FinishReport, now: datetime | None = None) -> ApiRequest:
    body: dict[str, Any] = {"exit_status": str(report.exit_status), "finished_at": utc_timestamp(now),
                            # Always present, even when 0, as the agent sends it.
                            "chunks_failed_count": report.chunks_failed_count}
    if report.signal:
        body["signal"] = report.signal
    if report.signal_reason:
        body["signal_reason"] = report.signal_reason
    return ApiRequest("finish", "PUT", job_path(job_id, "finish"), "job", json_body=body)


def disconnect() -> ApiRequest:
    return ApiRequest("disconnect", "POST", "disconnect", "session")


# ---------------------------------------------------------------------------------------------
# Artifacts: created in a batch, uploaded to the storage each one's instructions name, then
# marked `finished` or `error`, as buildkite-agent does with a step's artifact_paths.

# What Buildkite's form instructions write for the artifact's path in their field values.
ARTIFACT_PATH_VARIABLE = "${artifact:path}"
ARTIFACT_STATES = frozenset({"finished", "error"})
# The agent's content type for a file whose extension names none.
FALLBACK_CONTENT_TYPE = "binary/octet-stream"
# Buildkite's own storage takes a single form upload of at most 5 GiB.
MAX_FORM_UPLOAD_BYTES = 5 * 1024 ** 3
# buildkite-agent creates artifacts 30 to a batch, so each batch's upload URLs are fresh when used.
ARTIFACT_BATCH_SIZE = 30


@dataclass(frozen=True)
class Artifact:
    """One file to upload: `path` is how Buildkite lists it (relative, with slashes)."""

    path: str
    absolute_path: str
    glob_path: str
    file_size: int
    sha1sum: str
    sha256sum: str
    content_type: str = FALLBACK_CONTENT_TYPE

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "absolute_path": self.absolute_path, "glob_path": self.glob_path,
                "file_size": self.file_size, "sha1sum": self.sha1sum, "sha256sum": self.sha256sum,
                "content_type": self.content_type}


def create_artifacts(job_id: str, batch_id: str, artifacts: Sequence[Artifact]) -> ApiRequest:
    """`POST /jobs/{id}/artifacts`: the batch's id makes a retried create return the same artifacts.
    No upload destination: the files go to Buildkite's own storage."""
    body = {"id": batch_id, "artifacts": [a.to_json() for a in artifacts], "upload_destination": ""}
    return ApiRequest("artifacts_create", "POST", job_path(job_id, "artifacts"), "job", json_body=body)


def update_artifacts(job_id: str, states: Sequence[tuple[str, str]]) -> ApiRequest:
    """`PUT /jobs/{id}/artifacts`: each artifact's id, and whether its upload `finished` or ended
    in `error`."""
    for _, state in states:
        if state not in ARTIFACT_STATES:
            raise ValueError(f"artifact state {state!r} is not one Buildkite takes")
    body = {"artifacts": [{"id": artifact_id, "state": state} for artifact_id, state in states]}
    return ApiRequest("artifacts_update", "PUT", job_path(job_id, "artifacts"), "job", json_body=body)


@dataclass(frozen=True)
class UploadInstructions:
    """Where and how one artifact is uploaded: a form sent with `method` to `url` with its path
    replaced by `path`, the `data` fields first and the file last as the field `file_input`."""

    url: str
    method: str
    path: str
    file_input: str
    data: tuple[tuple[str, str], ...]


def _instructions(value: object, where: str) -> UploadInstructions:
    if not isinstance(value, Mapping):
        raise ProtocolError(f"artifact batch answer: {where} is not an object")
    action = value.get("action")
    if not isinstance(action, Mapping):
        raise ProtocolError(f"artifact batch answer: {where} has no action")
    if isinstance(value.get("actions"), list) and value["actions"]:
        # A multipart upload: only offered to an agent that says it supports one, which this does not.
        raise ProtocolError(f"artifact batch answer: {where} asks for a multipart upload")
    url, method = action.get("url"), action.get("method")
    path, file_input = action.get("path", ""), action.get("file_input")
    if not isinstance(url, str) or not url.startswith(("https://", "http://")):
        raise ProtocolError(f"artifact batch answer: {where} has no http(s) upload URL")
    if not isinstance(method, str) or not method or not isinstance(file_input, str) or not file_input:
        raise ProtocolError(f"artifact batch answer: {where} has no method or file_input")
    if not isinstance(path, str):
        raise ProtocolError(f"artifact batch answer: {where} has a path that is not a string")
    data = value.get("data") or {}
    if not isinstance(data, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                for k, v in data.items()):
        raise ProtocolError(f"artifact batch answer: {where} has data that is not strings")
    return UploadInstructions(url, method.upper(), path, file_input, tuple(data.items()))


def parse_artifact_batch(data: object, count: int) -> list[tuple[str, UploadInstructions]]:
    """Each artifact's id and upload instructions, in the order they were sent: the batch's
    template, unless `per_artifact_instructions` has some for that id."""
    if not isinstance(data, Mapping):
        raise ProtocolError("artifact batch answer is not a JSON object")
    ids = data.get("artifact_ids")
    if not isinstance(ids, list) or len(ids) != count or not all(isinstance(i, str) and i for i in ids):
        raise ProtocolError(f"artifact batch answer: artifact_ids is not a list of {count} ids")
    specific = data.get("per_artifact_instructions") or {}
    if not isinstance(specific, Mapping):
        raise ProtocolError("artifact batch answer: per_artifact_instructions is not an object")
    template = data.get("upload_instructions")
    out = []
    for artifact_id in ids:
        own = specific.get(artifact_id)
        if own is not None:
            out.append((artifact_id, _instructions(own, f"the instructions of {artifact_id}")))
        elif template is not None:
            out.append((artifact_id, _instructions(template, "upload_instructions")))
        else:
            raise ProtocolError(f"artifact batch answer: no upload instructions for {artifact_id}")
    return out


def upload_url(instructions: UploadInstructions) -> str:
    """The action's URL with its path replaced by the action's path, as the agent builds it."""
    parts = urllib.parse.urlsplit(instructions.url)
    path = instructions.path or parts.path
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, parts.fragment))


def _quoted(value: str) -> str:
    # A form field's name or file name in a Content-Disposition header: quotes and backslashes
    # escaped as Go's multipart writer does, line breaks percent-encoded so none ends the header.
    return (value.replace("\\", "\\\\").replace('"', '\\"')
            .replace("\r", "%0D").replace("\n", "%0A"))


@dataclass(frozen=True)
class UploadForm:
    """A multipart/form-data body around a file: `head`, then the file's bytes, then `tail`."""

    method: str
    url: str
    content_type: str
    head: bytes
    tail: bytes

    def content_length(self, file_size: int) -> int:
        return len(self.head) + file_size + len(self.tail)


def upload_form(instructions: UploadInstructions, artifact: Artifact, boundary: str) -> UploadForm:
    """The storage upload of `artifact`: every data field (with the artifact's path put in), then
    the file, last, since S3's form uploads take nothing after it."""
    if not re.fullmatch(r"[0-9A-Za-z'()+_,./:=?-]{1,70}", boundary):
        raise ValueError("a multipart boundary is 1 to 70 plain characters")
    parts = []
    for key, value in instructions.data:
        value = value.replace(ARTIFACT_PATH_VARIABLE, artifact.path)
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{_quoted(key)}"\r\n\r\n'
                     .encode() + value.encode() + b"\r\n")
    field = _quoted(instructions.file_input)
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
                 f'filename="{_quoted(artifact.path)}"\r\nContent-Type: application/octet-stream\r\n\r\n'
                 .encode())
    return UploadForm(instructions.method, upload_url(instructions),
                      f"multipart/form-data; boundary={boundary}", b"".join(parts),
                      f"\r\n--{boundary}--\r\n".encode())


# ---------------------------------------------------------------------------------------------
# Answers


def _positive_int(data: Mapping[str, Any], key: str) -> int:
    value = data.get(key)
    # The Go agent feeds these to tickers that panic on 0: a server never sends one, so refuse it.
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ProtocolError(f"register answer: {key} must be a positive integer, got {value!r}")
    return value


def header_problem(name: str, value: str) -> str | None:
    """Why no HTTP request may carry this header, or None when one can."""
    if not _HEADER_NAME.fullmatch(name):
        return "its name is not a valid header name"
    if _UNSENDABLE_VALUE.search(value):
        return "its value holds a control character (a newline?) that no request may carry"
    return None


def server_headers(value: object) -> tuple[dict[str, str], dict[str, str]]:
    """The `request_headers` an answer asks for, keeping only `Buildkite-` names: those that can be
    sent back, and those that cannot (name: why). Sending one that cannot would make every later
    call of the session fail, so it is left out while the others are kept."""
    if not isinstance(value, Mapping):
        return {}, {}
    kept: dict[str, str] = {}
    refused: dict[str, str] = {}
    for name, text in value.items():
        if not (isinstance(name, str) and name.startswith(SERVER_HEADER_PREFIX) and isinstance(text, str)):
            continue
        problem = header_problem(name, text)
        if problem is None:
            kept[name] = text
        else:
            refused[name] = problem
    return kept, refused


@dataclass(frozen=True)
class Registration:
    agent_id: str
    name: str
    access_token: str
    endpoint: str | None
    request_headers: dict[str, str]
    ping_interval: int
    job_status_interval: int
    heartbeat_interval: int
    # Headers the answer asked for that no request may carry (name: why), left out of request_headers.
    refused_headers: dict[str, str] = field(default_factory=dict)


def parse_register(data: object) -> Registration:
    if not isinstance(data, Mapping):
        raise ProtocolError("register answer is not a JSON object")
    token = data.get("access_token")
    if not isinstance(token, str) or not token:
        raise ProtocolError("register answer has no access_token")
    endpoint = data.get("endpoint")
    headers, refused = server_headers(data.get("request_headers"))
    return Registration(
        agent_id=str(data.get("id", "")), name=str(data.get("name", "")), access_token=token,
        endpoint=endpoint if isinstance(endpoint, str) and endpoint else None,
        request_headers=headers,
        ping_interval=_positive_int(data, "ping_interval"),
        job_status_interval=_positive_int(data, "job_status_interval"),
        heartbeat_interval=_positive_int(data, "heartbeat_interval"),
        refused_headers=refused,
    )


@dataclass(frozen=True)
class Ping:
    action: str
    message: str | None
    job_id: str | None
    endpoint: str | None
    # None: the answer said nothing about headers, so the current set stays.
    request_headers: dict[str, str] | None
    # As in Registration: asked for, but left out of request_headers.
    refused_headers: dict[str, str] = field(default_factory=dict)

    @property
    def dispatches(self) -> bool:
        """A job is offered unless the agent is told to pause (or to go)."""
        return self.job_id is not None and self.action not in ("pause", "disconnect")


def parse_ping(data: object) -> Ping:
    if not isinstance(data, Mapping):
        raise ProtocolError("ping answer is not a JSON object")
    action = data.get("action") or ""
    job = data.get("job")
    job_id = job.get("id") if isinstance(job, Mapping) else None
    endpoint = data.get("endpoint")
    headers: dict[str, str] | None = None
    refused: dict[str, str] = {}
    if "request_headers" in data:
        headers, refused = server_headers(data["request_headers"])
    message = data.get("message")
    return Ping(action=str(action), message=message if isinstance(message, str) and message else None,
                job_id=job_id if isinstance(job_id, str) and job_id else None,
                endpoint=endpoint if isinstance(endpoint, str) and endpoint else None,
                request_headers=headers, refused_headers=refused)


JobStateAction = Literal["cancel", "timeout"]


def job_state_action(data: object) -> JobStateAction | None:
    """What a job-state answer asks of a running job: cancel it (cancelled or timed out), or nothing."""
    state = data.get("state") if isinstance(data, Mapping) else None
    if state in _CANCEL_STATES:
        return "cancel"
    if state in _TIMEOUT_STATES:
        return "timeout"
    return None


def error_message(raw: bytes) -> str:
    """Buildkite's `{"message": ...}`, or the start of whatever else came back."""
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if isinstance(data, Mapping) and isinstance(data.get("message"), str):
        return str(data["message"])
    return raw[:200].decode("utf-8", "replace").strip()


# ---------------------------------------------------------------------------------------------
# Retries


class Verdict(Enum):
    ok = "ok"
    retry = "retry"
    give_up = "give_up"


def classify(status: int | None, *, decodable: bool = True) -> Verdict:
    """Buildkite's retry classes: network errors (no status), 429, 5xx and a 2xx that is not
    JSON (a proxy's error page) are worth another try; any other 4xx is final."""
    if status is None:
        return Verdict.retry
    if 200 <= status < 300:
        return Verdict.ok if decodable else Verdict.retry
    if status == 429 or status >= 500:
        return Verdict.retry
    return Verdict.give_up


Delay = Callable[[int, random.Random], float]


def constant(seconds: float) -> Delay:
    return lambda attempt, rng: seconds


def exponential(base: float) -> Delay:
    """base ** attempt seconds: 1, 2, 4, 8... for base 2 (the agent's `Exponential(2s, 0)`)."""
    return lambda attempt, rng: float(base ** attempt)


def exponential_subsecond(initial_ms: float = 2000.0, jitter_s: float = 1.0) -> Delay:
    """initial_ms ** (attempt / 16 + 1) milliseconds plus up to `jitter_s`: 2 s, 3.2 s... ~6 min."""
    return lambda attempt, rng: initial_ms ** (attempt / 16 + 1) / 1000 + rng.uniform(0, jitter_s)


@dataclass(frozen=True)
class RetryPolicy:
    """How often one call is tried and how long to wait between tries.

    `network_only`: HTTP answers of any status are final (accept). `retry_all`: every failure is
    retried, whatever its status (connect).
    """

    attempts: int
    delay: Delay
    network_only: bool = False
    retry_all: bool = False
    # A 429's Retry-After is honoured up to this many seconds.
    max_retry_after: float = 300.0

    def scaled(self, factor: float) -> RetryPolicy:
        """The same policy with every wait multiplied by `factor` (tests and benchmarks)."""
        inner = self.delay
        return RetryPolicy(self.attempts, lambda a, r: inner(a, r) * factor, self.network_only,
                           self.retry_all, self.max_retry_after * factor)


def next_delay(policy: RetryPolicy, attempt: int, status: int | None, *, decodable: bool = True,
               retry_after: str | None = None, rng: random.Random | None = None) -> float | None:
    """Seconds to wait before trying again after failed try number `attempt` (from 1), or None
    when the call has failed for good."""
    verdict = classify(status, decodable=decodable)
    if verdict is Verdict.ok:
        return None
    if policy.network_only and status is not None:
        return None
    if verdict is Verdict.give_up and not policy.retry_all:
        return None
    if attempt >= policy.attempts:
        return None
    if status == 429 and retry_after is not None:
        seconds = _retry_after_seconds(retry_after)
        if seconds is not None:
            return min(seconds, policy.max_retry_after)
    return policy.delay(attempt - 1, rng or random.Random())


def _retry_after_seconds(value: str) -> float | None:
    try:
        seconds = float(value.strip())
    except ValueError:
        try:
            from email.utils import parsedate_to_datetime
            moment = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = (moment - datetime.now(UTC)).total_seconds()
    return max(0.0, seconds)


# The open-source buildkite-agent's retry schedules, one per endpoint.
DEFAULT_POLICIES: Mapping[str, RetryPolicy] = {
    "register": RetryPolicy(30, constant(10)),
    "connect": RetryPolicy(10, constant(5), retry_all=True),
    "heartbeat": RetryPolicy(10, constant(5)),
    # A failed ping is simply followed by the next one.
    "ping": RetryPolicy(1, constant(0)),
    "accept": RetryPolicy(30, constant(5), network_only=True),
    "start": RetryPolicy(7, exponential(2)),
    "chunks": RetryPolicy(12, exponential_subsecond()),
    "job_state": RetryPolicy(1, constant(0)),
    "finish": RetryPolicy(12, exponential_subsecond()),
    "disconnect": RetryPolicy(4, constant(1)),
    "artifacts_create": RetryPolicy(10, exponential_subsecond(500.0)),
    # Each storage upload: tried every 5 s, up to 10 times.
    "artifact_upload": RetryPolicy(10, constant(5)),
    "artifacts_update": RetryPolicy(10, exponential_subsecond(500.0)),
}


def jittered(interval: float, rng: random.Random) -> float:
    """An interval followed by a random wait in [0, interval), so many agents do not poll in step."""
    return interval + rng.uniform(0, interval) if interval > 0 else 0.0
