"""The hub's HTTP contract for API jobs, as plain data and functions (no I/O).

Shared by the hub (`jobs_api`, `agent_jobs_api`) and the agents' client, so both sides agree on
paths, bodies and limits by construction. Times on the wire are UTC in RFC 3339
(`protocol.format_time`).

Users (authenticated by an OIDC ID token of a trusted issuer):

    POST   /api/v1/jobs                 {"job": {...}, "cluster"?, "repository"?, "commit"?} -> 201
    GET    /api/v1/jobs?limit=N&before=ID  -> {"jobs": [<job view>...], "next": ID | null}
    GET    /api/v1/jobs/ID              -> <job view>
    GET    /api/v1/jobs/ID/log?offset=N&follow=1  -> the log's bytes from N
    GET    /api/v1/jobs/ID/provenance   -> its provenance record, byte for byte (404 before it has one)
    GET    /api/v1/jobs/ID/outputs      -> {"outputs": [{"path", "sha256", "size", "url" | null}...]}
    GET    /api/v1/jobs/ID/outputs/PATH -> the output file, as an attachment
    DELETE /api/v1/jobs/ID              -> 202 <job view>

Agents (authenticated by their agent token, as for webhook leases):

    POST /api/v1/agent/jobs/lease?cluster=NAME&wait=W&seconds=S  -> 200 <lease> | 204
    PUT  /api/v1/agent/jobs/ID   <registration>      -> 201 (200 when repeated) <agent view>
    GET  /api/v1/agent/jobs/ID                       -> 200 <agent view>
    POST /api/v1/agent/jobs/ID/state   <state body>  -> 200 <agent view>
    POST /api/v1/agent/jobs/ID/log?offset=N  raw bytes -> 200 {"length"} | 409 {"error", "length"}
    GET  /api/v1/agent/hub                           -> 200 {"public_url": URL | null}
    PUT  /api/v1/agent/jobs/ID/provenance   the record -> 201 (200 when repeated) <outputs held>
    PUT  /api/v1/agent/jobs/ID/outputs?path=PATH  the file  -> 201 (200 when held) | 400 {"error"}

where <agent view> is {"id", "state", "cancel_requested", "log_length"}, and <outputs held> is
{"sha256", "outputs": [{"path", "sha256", "size", "held"}...]}: the outputs the record names, and
whether the hub has each file already. A record is refused past its size limit or when it is no
in-toto Statement; a file unless the record names its path and it has the record's size and sha256.

A registration (`{"job", "identity", "cluster", "repository"?, "commit"?, "created"?, "source"?,
"source_label"?, "source_url"?}`) puts a job of the agent's other sources (Buildkite, GitHub, its
local queue) on the hub under the agent's own job id, to publish its state and log as those of an
API job; the job is the registering agent's. `source` names the agent's source, `source_label` and
`source_url` where the job came from ("O/R#12" and its pull request), for the hub's pages.

A state publication may name, beside the account's `admins`, its `members` (the principal
patterns of the grants that spend the account: they may see the job at the hub, not cancel it)
a `state_reason` (why a queued or pending job waits: Slurm's reason while it pends there) and a
`node_list` (the nodes it was given, as Slurm names them).

An agent's lease on a job lasts `seconds` until the agent publishes the job's first state (any
state, `queued` included): from then on the job is that agent's for good, since handing a job
that may hold a Slurm allocation to another agent would run it twice. A lease that runs out before
that returns the job to the queue for the next agent.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from runner.errors import InputError
from runner.gateway.protocol import format_time, parse_time
from runner.identity import Identity, identity_from_json
from runner.job import JOB_ID_PATTERN, TERMINAL_STATES, JobState
from runner.spec import NAME_PATTERN, parse_job_mapping

JOBS_PATH = "/api/v1/jobs"
AGENT_JOBS_PATH = "/api/v1/agent/jobs"
AGENT_LEASE_PATH = f"{AGENT_JOBS_PATH}/lease"
# Where an agent learns the hub's public address, for the links it gives out (a GitHub check
# run's "details"): the agent may reach the hub by another address than its users do.
AGENT_HUB_PATH = "/api/v1/agent/hub"
JOB_PAGE_PATH = "/jobs"               # public_url + /jobs/ID: the job's page, its `url`
# The audit trail of the jobs of the accounts the caller administers, as JSON lines.
AUDIT_PATH = "/api/v1/audit"
AUDIT_CONTENT_TYPE = "application/x-ndjson"
# The query of an audit request; any other parameter is refused, naming it (a typo must not
# widen an export).
AUDIT_QUERY = ("account", "job", "since", "after")
# Entries of the trail read from the job store at a time, however many the answer streams.
AUDIT_BATCH = 500

# A job table is a few kilobytes; its script may be up to 256 KiB, which JSON may write in up to
# six times as many bytes (\u escapes). Anything larger is refused before it is read.
MAX_SUBMISSION_BYTES = 2 * 1024 * 1024
# Levels of objects and arrays in a submission, the body itself being the first: a job table is
# four deep ({"job": {"resources": {...}}}); this leaves room while every walk stays shallow.
MAX_JSON_NESTING = 16
MAX_LOG_APPEND_BYTES = 4 * 1024 * 1024
# What the hub keeps of one job's log (as Buildkite's default cap); an append beyond it is refused.
MAX_LOG_BYTES = 1024 * 1024 * 1024
# What one read of a log answers at most; a client reads on from where it ended.
MAX_LOG_READ_BYTES = 4 * 1024 * 1024
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500

CLUSTER_PATTERN = re.compile(NAME_PATTERN)
# The top-level fields of a submission; any other is refused, naming it.
SUBMISSION_FIELDS = ("job", "cluster", "repository", "commit")
# What an agent may say in a state publication; each is optional but `state`, and one left out
# keeps what the hub holds.
STATE_FIELDS = ("state", "exit_status", "reasons", "account", "grant", "admins", "members", "slurm_job_id",
                "started", "ended", "state_reason", "node_list")
REGISTRATION_FIELDS = ("job", "identity", "cluster", "repository", "commit", "created", "source",
                       "source_label", "source_url")
STATES = tuple(state.value for state in JobState)
TERMINAL = frozenset(state.value for state in TERMINAL_STATES)
# The view of a job that GET answers (and the job.state hooks will carry).
VIEW_FIELDS = ("id", "state", "exit_status", "reasons", "cluster", "account", "grant", "slurm_job_id",
               "created", "started", "ended", "url")

_SLURM_JOB_ID = re.compile(r"[0-9]{1,20}(?:[_+][0-9]{1,20})?")
MAX_REASONS = 64
MAX_REASON_CHARS = 2000
MAX_ADMINS = 256
MAX_MEMBERS = 256
MAX_STATE_REASON_CHARS = 500
MAX_NODE_LIST_CHARS = 1000
MAX_SOURCE_LABEL_CHARS = 200
MAX_URL_CHARS = 2048
# The name of an agent's source (`github`, `buildkite`, `local`); `api` is the hub's own.
_SOURCE_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")


def job_path(job_id: str) -> str:
    return f"{JOBS_PATH}/{_checked_id(job_id)}"


def job_log_path(job_id: str) -> str:
    return f"{job_path(job_id)}/log"


def agent_job_path(job_id: str) -> str:
    return f"{AGENT_JOBS_PATH}/{_checked_id(job_id)}"


def agent_state_path(job_id: str) -> str:
    return f"{agent_job_path(job_id)}/state"


def agent_log_path(job_id: str) -> str:
    return f"{agent_job_path(job_id)}/log"


def agent_provenance_path(job_id: str) -> str:
    return f"{agent_job_path(job_id)}/provenance"


def agent_outputs_path(job_id: str) -> str:
    """Where an output file goes, its path under /work in the query (`path`): a query, not more
    of the URL's path, so that nothing between agent and hub resolves a `..` in it, and a request's
    metrics name no directory of a job's."""
    return f"{agent_job_path(job_id)}/outputs"


def job_url(public_url: str, job_id: str) -> str:
    return f"{public_url.rstrip('/')}{JOB_PAGE_PATH}/{_checked_id(job_id)}"


def hub_info(public_url: str | None) -> dict[str, Any]:
    """The answer of AGENT_HUB_PATH."""
    return {"public_url": public_url}


def parse_hub_info(data: object) -> str | None:
    """The hub's public URL from an AGENT_HUB_PATH answer (None: the hub serves no jobs API);
    ValueError naming what is wrong."""
    url = data.get("public_url") if isinstance(data, dict) else ""
    if url is None:
        return None
    if not isinstance(url, str) or not url.startswith(("https://", "http://")) or len(url) > 2048:
        raise ValueError("the hub's answer has no http(s) public_url")
    return url


def _checked_id(job_id: str) -> str:
    if not JOB_ID_PATTERN.fullmatch(job_id):
        raise ValueError(f"{job_id[:80]!r} is not a job id")
    return job_id


def parse_offset(value: str | None, *, name: str = "offset") -> int:
    """A byte offset from a query parameter (default 0); ValueError naming `name` if it is wrong."""
    if value is None or value == "":
        return 0
    if not value.isascii() or not value.isdigit() or len(value) > 19:
        raise ValueError(f"{name} must be a whole number of bytes, got {value[:40]!r}")
    return int(value)


def audit_query(*, account: str | None = None, job_id: str | None = None, since: str | None = None,
                after: int = 0) -> str:
    """The path and query of an audit request, naming only the filters given."""
    pairs = [(key, value) for key, value in (("account", account), ("job", job_id), ("since", since),
                                             ("after", str(after) if after else None)) if value is not None]
    return AUDIT_PATH + (f"?{urlencode(pairs)}" if pairs else "")


def parse_limit(value: str | None) -> int:
    if value is None or value == "":
        return DEFAULT_PAGE_SIZE
    if not value.isascii() or not value.isdigit() or not 1 <= int(value[:6]) <= MAX_PAGE_SIZE:
        raise ValueError(f"limit must be a whole number from 1 to {MAX_PAGE_SIZE}, got {value[:40]!r}")
    return int(value)


def parse_flag(value: str | None, *, name: str) -> bool:
    if value in (None, "", "0", "false"):
        return False
    if value in ("1", "true"):
        return True
    raise ValueError(f"{name} must be 1 or 0, got {value[:40]!r}")


def parse_cluster(value: object, *, name: str = "cluster") -> str:
    if not isinstance(value, str) or not CLUSTER_PATTERN.fullmatch(value):
        raise ValueError(f"{name} must be a cluster name (letters, digits, '.', '_', '-'; at most 64)")
    return value


# --- the agent's state publication ---

@dataclass(frozen=True)
class StateUpdate:
    """What an agent says about one of its jobs; None (or absent from `given`) keeps the hub's value."""

    state: str
    given: frozenset[str]                  # the fields the publication named
    exit_status: int | None = None
    reasons: tuple[str, ...] = ()
    account: str | None = None
    grant: str | None = None
    admins: tuple[str, ...] = ()
    members: tuple[str, ...] = ()
    slurm_job_id: str | None = None
    started: float | None = None
    ended: float | None = None
    state_reason: str | None = None
    node_list: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The publication's body (only the fields it names)."""
        full: dict[str, Any] = {
            "state": self.state, "exit_status": self.exit_status, "reasons": list(self.reasons),
            "account": self.account, "grant": self.grant, "admins": list(self.admins),
            "members": list(self.members), "slurm_job_id": self.slurm_job_id,
            "state_reason": self.state_reason, "node_list": self.node_list,
            "started": None if self.started is None else format_time(self.started),
            "ended": None if self.ended is None else format_time(self.ended),
        }
        return {key: value for key, value in full.items() if key in self.given or key == "state"}


def state_body(state: str, **fields: Any) -> dict[str, Any]:
    """The body of a publication of `state` and the fields given (times as epoch seconds), checked
    as the hub checks it: for the agents' client."""
    body: dict[str, Any] = {"state": state}
    for key, value in fields.items():
        if key in ("started", "ended") and isinstance(value, int | float):
            value = format_time(value)
        body[key] = list(value) if isinstance(value, tuple) else value
    parse_state_update(body)
    return body


def unknown_fields(data: Mapping[str, Any], known: tuple[str, ...]) -> list[str]:
    """The keys of `data` not among `known`, in their order, each cut to 80 characters."""
    return [str(key)[:80] for key in data if key not in known]


def _body_object(data: object, known: tuple[str, ...]) -> Mapping[str, Any]:
    """`data` as a JSON object of only `known` fields; ValueError naming the others."""
    if not isinstance(data, Mapping):
        raise ValueError("the body must be a JSON object")
    unknown = unknown_fields(data, known)
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)} (known: {', '.join(known)})")
    return data


def parse_state_update(body: object) -> StateUpdate:
    """Check an agent's state publication; ValueError naming the field at fault."""
    data = _body_object(body, STATE_FIELDS)
    state = data.get("state")
    if state not in STATES:
        raise ValueError(f"state must be one of {', '.join(STATES)}")
    values: dict[str, Any] = {}
    exit_status = data.get("exit_status")
    if exit_status is not None and (isinstance(exit_status, bool) or not isinstance(exit_status, int)
                                    or not 0 <= exit_status <= 255):
        raise ValueError("exit_status must be a whole number from 0 to 255, or null")
    values["exit_status"] = exit_status
    values["reasons"] = _strings(data.get("reasons"), "reasons", MAX_REASONS, MAX_REASON_CHARS)
    values["admins"] = _strings(data.get("admins"), "admins", MAX_ADMINS, 256)
    values["members"] = _strings(data.get("members"), "members", MAX_MEMBERS, 256)
    values["state_reason"] = _line_or_none(data.get("state_reason"), "state_reason", MAX_STATE_REASON_CHARS)
    values["node_list"] = _line_or_none(data.get("node_list"), "node_list", MAX_NODE_LIST_CHARS)
    for key in ("account", "grant"):
        value = data.get(key)
        if value is not None and (not isinstance(value, str) or not re.fullmatch(NAME_PATTERN, value)):
            raise ValueError(f"{key} must be a name (letters, digits, '.', '_', '-'; at most 64), or null")
        values[key] = value
    slurm_job_id = data.get("slurm_job_id")
    if slurm_job_id is not None and (not isinstance(slurm_job_id, str)
                                     or not _SLURM_JOB_ID.fullmatch(slurm_job_id)):
        raise ValueError("slurm_job_id must be a Slurm job id as a string (\"1234\", \"1234_5\"), or null")
    values["slurm_job_id"] = slurm_job_id
    for key in ("started", "ended"):
        values[key] = _time_or_none(data.get(key), key)
    return StateUpdate(state=str(state), given=frozenset(str(key) for key in data), **values)


def _strings(value: object, name: str, most: int, longest: int) -> tuple[str, ...]:
    if value is None:
        return ()
    if (not isinstance(value, list) or len(value) > most
            or not all(isinstance(item, str) and 0 < len(item) <= longest and "\x00" not in item
                       for item in value)):
        raise ValueError(f"{name} must be a list of at most {most} non-empty strings "
                         f"of at most {longest} characters")
    return tuple(value)


def _line_or_none(value: object, name: str, longest: int) -> str | None:
    if value is not None and (not isinstance(value, str) or not 0 < len(value) <= longest
                              or any(ord(ch) < 0x20 for ch in value)):
        raise ValueError(f"{name} must be a single line of at most {longest} characters, or null")
    return value


# --- a job of the agent's other sources ---

@dataclass(frozen=True)
class Registration:
    job: dict[str, Any]                 # the job's [job] table, as JSON
    identity: Identity                  # whom the agent's source verified
    cluster: str
    repository: str | None
    commit: str | None
    created: float | None
    source: str | None = None           # the agent's source that took the job
    source_label: str | None = None     # where it came from, in words ("O/R#12")
    source_url: str | None = None       # and a link there (the pull request, the Buildkite job)


def registration_body(job: Mapping[str, Any], identity: Identity, cluster: str, *,
                      repository: str | None = None, commit: str | None = None,
                      created: float | None = None, source: str | None = None,
                      source_label: str | None = None, source_url: str | None = None) -> dict[str, Any]:
    """The body of a registration, checked as the hub checks it: for the agents' client."""
    body = {"job": dict(job), "identity": identity.to_json(), "cluster": cluster, "repository": repository,
            "commit": commit, "created": None if created is None else format_time(created)}
    # Named only when known, so that a hub of before these fields takes the registration as it did.
    body |= {key: value for key, value in (("source", source), ("source_label", source_label),
                                           ("source_url", source_url)) if value is not None}
    parse_registration(body)
    return body


def parse_registration(body: object) -> Registration:
    """Check an agent's registration of a job; ValueError naming the field at fault."""
    data = _body_object(body, REGISTRATION_FIELDS)
    job = data.get("job")
    if not isinstance(job, dict):
        raise ValueError("job must be the job's [job] table as a JSON object")
    try:
        parse_job_mapping(job, "job")
        identity = identity_from_json(data.get("identity"), "identity")
    except InputError as exc:
        raise ValueError(str(exc)) from None
    cluster = parse_cluster(data.get("cluster"))
    texts = {key: data.get(key) for key in ("repository", "commit")}
    for key, value in texts.items():
        if value is not None and (not isinstance(value, str) or not 0 < len(value) <= 512
                                  or any(ord(ch) < 0x20 for ch in value)):
            raise ValueError(f"{key} must be a single line of at most 512 characters, or null")
    created = _time_or_none(data.get("created"), "created")
    source = data.get("source")
    if source is not None and (not isinstance(source, str) or not _SOURCE_NAME.fullmatch(source)):
        raise ValueError("source must be the name of the agent's source (\"github\", \"local\"), or null")
    source_url = _line_or_none(data.get("source_url"), "source_url", MAX_URL_CHARS)
    if source_url is not None and not source_url.startswith(("https://", "http://")):
        raise ValueError("source_url must be an http(s) URL, or null")
    return Registration(job=job, identity=identity, cluster=cluster, repository=texts["repository"],
                        commit=texts["commit"], created=created, source=source,
                        source_label=_line_or_none(data.get("source_label"), "source_label",
                                                   MAX_SOURCE_LABEL_CHARS),
                        source_url=source_url)


def _time_or_none(value: object, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, str) and len(value) <= 40:
        try:
            return parse_time(value)
        except ValueError:
            pass
    raise ValueError(f"{name} must be a UTC time (\"2025-01-31T12:00:00.000Z\"), or null")


# --- what an agent gets when it leases a job ---

@dataclass(frozen=True)
class JobLease:
    """A leased API job, as the lease answer's JSON body carries it."""

    id: str
    job: dict[str, Any]                 # the submitted `job` object, exactly as received
    token: str                          # the submitter's OIDC token, for the agent to verify itself
    issuer: str                         # the name of the hub's [[oidc]] issuer that verified it
    cluster: str | None
    repository: str | None
    commit: str | None
    received_at: float                  # when the hub received the submission
    lease_seconds: int
    lease_expires_at: float
    attempt: int                        # 1 the first time the job is handed out
    cancel_requested: bool

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "job": self.job, "token": self.token, "issuer": self.issuer,
                "cluster": self.cluster, "repository": self.repository, "commit": self.commit,
                "received_at": format_time(self.received_at), "lease_seconds": self.lease_seconds,
                "lease_expires": format_time(self.lease_expires_at), "attempt": self.attempt,
                "cancel_requested": self.cancel_requested}


def parse_job_lease(data: object) -> JobLease:
    """Read a lease answer's body; ValueError naming what is wrong."""
    if not isinstance(data, Mapping):
        raise ValueError("the hub's lease answer is not a JSON object")
    try:
        job_id, job, token = data["id"], data["job"], data["token"]
        if not isinstance(job_id, str) or not JOB_ID_PATTERN.fullmatch(job_id):
            raise ValueError("id is not a job id")
        if not isinstance(job, dict) or not isinstance(token, str) or not token:
            raise ValueError("job must be an object and token a string")
        optional = {key: data.get(key) for key in ("cluster", "repository", "commit")}
        if not all(value is None or isinstance(value, str) for value in optional.values()):
            raise ValueError("cluster, repository and commit must be strings or null")
        attempt = data["attempt"]
        seconds = data["lease_seconds"]
        if (isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1
                or isinstance(seconds, bool) or not isinstance(seconds, int)):
            raise ValueError("attempt and lease_seconds must be whole numbers")
        return JobLease(id=job_id, job=job, token=token, issuer=str(data["issuer"]),
                        cluster=optional["cluster"], repository=optional["repository"],
                        commit=optional["commit"], received_at=parse_time(str(data["received_at"])),
                        lease_seconds=seconds, lease_expires_at=parse_time(str(data["lease_expires"])),
                        attempt=attempt, cancel_requested=bool(data.get("cancel_requested")))
    except KeyError as exc:
        raise ValueError(f"the hub's lease answer has no {exc.args[0]!r}") from None
    except ValueError as exc:
        raise ValueError(f"the hub's lease answer is malformed: {exc}") from None
