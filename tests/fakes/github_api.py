"""An in-process emulator of GitHub's REST API, as a GitHub App installation sees it.

Every request is first checked against GitHub's official OpenAPI description (``openapi_validator``):
an unknown operation, a bad parameter or a body the description does not allow is answered
``422`` as GitHub would, *and* recorded, so ``close()`` (the end of ``async with``) fails the test
unless the test took the violation with ``take_violations()``. Responses are built from the
description's own examples and checked against its response schemas too.

Beyond the schema it is strict where GitHub is:

* auth: the app JWT (RS256, verified with the app's public key; ``iss`` the app id; ``exp`` at
  most 10 minutes after ``iat`` and ahead of the clock; ``iat`` not in the future beyond 60 s of
  skew) opens only the app endpoints; installation tokens (opaque, ``ghs_``, stateless-format
  length by default) open the installation's repositories and expire (``401 Bad credentials``);
* check runs: ``head_sha`` must be a known commit, a completed run needs a conclusion, ``stale`` is
  GitHub's alone, ``output.summary``/``output.text`` at most 65535 *bytes*; commit statuses: a
  description of at most 140 characters, 1000 per sha and context; a mode in which checks are not
  granted to the app (``403 Resource not accessible by integration``);
* rate limits: ``x-ratelimit-limit/remaining/used/reset/resource`` on every answer, per token;
  exhaustion answers 403 (or 429) with ``remaining: 0``; a ``304`` (``If-None-Match`` against
  the ``ETag`` of a GET) costs nothing;
* ``User-Agent`` required (403 without), ``X-GitHub-Api-Version`` must be a version GitHub has.

Tests drive state with ``add_repository``, ``push``, ``set_file``, ``add_pull_request``,
``update_pull_request``, ``label``, ``add_comment``, ``set_permission``, ``add_team_member``,
``forbid_checks``; inject faults with ``fail``, ``secondary_rate_limit``, ``exhaust_rate_limit``,
``delay``, ``expire_tokens``; inspect ``requests()``, ``count()``, ``check_runs()``, ``statuses()``,
``comments()``. Time comes from ``clock`` (epoch seconds) so tests can share a fake clock with the
client. It listens on 127.0.0.1 on an ephemeral port; ``url`` is the API base URL (with ``prefix``,
e.g. ``/api/v3`` to look like GitHub Enterprise Server).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import functools
import hashlib
import itertools
import json
import secrets
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from .openapi_validator import (
    DEFAULT_DESCRIPTION,
    OpenApiDescription,
    OpenApiValidationError,
    Operation,
    load_description,
)

SUPPORTED_API_VERSIONS = frozenset({"2022-11-28", "2026-03-10"})
DOCS = "https://docs.github.com/rest"
RATE_DOCS = "https://docs.github.com/rest/overview/rate-limits-for-the-rest-api"
MAX_JWT_LIFETIME = 600
JWT_SKEW = 60
TOKEN_LIFETIME = 3600
# The app endpoints, which take the app's JWT and nothing else.
JWT_OPERATIONS = frozenset({
    "apps/get-authenticated", "apps/get-repo-installation", "apps/get-org-installation",
    "apps/get-user-installation", "apps/list-installations", "apps/get-installation",
    "apps/create-installation-access-token",
})
CHECK_OPERATIONS = frozenset({"checks/create", "checks/update", "checks/get", "checks/list-for-ref"})
PERMISSION_LEVEL = {"admin": "admin", "maintain": "write", "write": "write", "triage": "read",
                    "read": "read", "none": "none"}

Clock = Callable[[], float]


class ManualClock:
    """Wall-clock time that moves only when told to or when someone sleeps on it: share one between
    the emulator (``clock=c.time``) and a client (``clock=c``) and an hour of rate-limit waiting
    takes no real time. ``sleeps`` records every wait asked for."""

    def __init__(self, start: float = 1_790_000_000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += max(seconds, 0.0)
        await asyncio.sleep(0)


@functools.lru_cache(maxsize=1)
def _app_key() -> rsa.RSAPrivateKey:
    # One key per test process: generating RSA keys is the slowest part of starting an emulator.
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(int(epoch), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _sha(*parts: object) -> str:
    return hashlib.sha1(repr(parts).encode()).hexdigest()


class _Answer(Exception):
    """Raised in a handler to answer with GitHub's error shape."""

    def __init__(self, status: int, message: str, *, errors: list[dict[str, Any]] | None = None,
                 headers: Mapping[str, str] | None = None, docs: str = DOCS) -> None:
        super().__init__(message)
        self.status = status
        self.body: dict[str, Any] = {"message": message, "documentation_url": docs, "status": str(status)}
        if errors:
            self.body["errors"] = errors
        self.headers = dict(headers or {})


@dataclass
class RecordedRequest:
    method: str
    path: str                      # as sent, prefix included
    query: list[tuple[str, str]]
    headers: dict[str, str]
    body: bytes
    operation: str | None = None   # operationId, None when the path matched nothing
    credential: Literal["jwt", "installation", "none", "invalid"] = "none"
    installation: int | None = None
    status: int | None = None
    fault: str | None = None
    violation: str | None = None   # why the request broke GitHub's description or rules
    expected: bool = False         # the test took the violation with take_violations()
    started: float = 0.0           # emulator clock

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass
class Fault:
    kind: Literal["status", "secondary", "delay"]
    remaining: int
    status: int = 502
    message: str | None = None
    retry_after: int | None = None
    seconds: float = 0.0
    processed: bool = False


@dataclass
class Commit:
    sha: str
    files: dict[str, bytes]
    parents: list[str]
    message: str
    author: str
    date: float


@dataclass
class PullRequest:
    number: int
    repo: str                      # base repository full name
    head_repo: str                 # == repo unless from a fork
    head_ref: str
    head_sha: str
    base_ref: str
    author: str
    title: str
    labels: list[str] = field(default_factory=list)
    state: str = "open"
    draft: bool = False
    id: int = 0
    created: float = 0.0
    updated: float = 0.0


@dataclass
class Repository:
    owner: str
    name: str
    id: int
    installation: int | None
    default_branch: str = "main"
    private: bool = False
    fork_of: str | None = None
    branches: dict[str, str] = field(default_factory=dict)       # name -> sha
    permissions: dict[str, str] = field(default_factory=dict)    # login -> role
    checks_forbidden: bool = False

    @property
    def full_name(self) -> str:
        return f"{self.owner}/{self.name}"


@dataclass
class _Bucket:
    limit: int
    remaining: int
    reset: float
    status_when_exhausted: int = 403


class GitHubEmulator:
    """``async with GitHubEmulator() as gh:`` — GitHub's REST API at ``gh.url``."""

    def __init__(self, *, app_id: int = 12345, app_slug: str = "hpc-runner", prefix: str = "",
                 clock: Clock | None = None, description: str = DEFAULT_DESCRIPTION,
                 rate_limit: int = 5000, token_lifetime: float = TOKEN_LIFETIME,
                 stateless_tokens: bool = True, write_latency: float = 0.0,
                 check_responses: bool = True) -> None:
        import time

        self.app_id = app_id
        self.app_slug = app_slug
        self.prefix = prefix.rstrip("/")
        self.clock: Clock = clock or time.time
        self.api: OpenApiDescription = load_description(description)
        self.rate_limit_per_hour = rate_limit
        self.token_lifetime = token_lifetime
        self.stateless_tokens = stateless_tokens
        self.write_latency = write_latency
        self.check_responses = check_responses
        self._key = _app_key()
        self.app_private_key_pem: str = self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()).decode()
        self._public_key = self._key.public_key()

        self.repos: dict[str, Repository] = {}
        self.commits: dict[str, Commit] = {}
        self.pulls: dict[tuple[str, int], PullRequest] = {}
        self.issue_comments: dict[tuple[str, int], list[dict[str, Any]]] = {}
        self.check_run_records: dict[int, dict[str, Any]] = {}
        self.status_records: list[dict[str, Any]] = []
        # (org, team slug) -> login -> (role, state)
        self.teams: dict[tuple[str, str], dict[str, tuple[str, str]]] = {}
        self.org_installations: dict[str, int] = {}
        self.tokens: dict[str, tuple[int, float]] = {}                     # token -> (installation, expires)
        self.recorded: list[RecordedRequest] = []
        self.response_violations: list[str] = []
        self.writes_in_flight = 0
        self.max_writes_in_flight = 0
        self._buckets: dict[str, _Bucket] = {}
        self._faults: dict[str | None, deque[Fault]] = {}
        self._ids = itertools.count(1000)
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._closing = asyncio.Event()

    # ---------------------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> GitHubEmulator:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close(check=exc is None)

    async def start(self) -> None:
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = int(self._runner.addresses[0][1])

    async def close(self, *, check: bool = True) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if check:
            self.assert_all_valid()

    @property
    def url(self) -> str:
        if self._port is None:
            raise RuntimeError("the emulator is not running")
        return f"http://127.0.0.1:{self._port}{self.prefix}"

    # ---------------------------------------------------------------------------- test API: state

    def add_repository(self, full_name: str, *, installation: int | None = 1, private: bool = False,
                       default_branch: str = "main",
                       files: Mapping[str, str | bytes] | None = None) -> Repository:
        """A repository with one commit on its default branch; ``installation=None``: the app is not
        installed there."""
        owner, name = full_name.split("/")
        repo = Repository(owner, name, next(self._ids), installation, default_branch, private)
        self.repos[full_name.lower()] = repo
        self.push(full_name, default_branch, files or {"README.md": "# " + name + "\n"},
                  message="Initial commit")
        if installation is not None:
            self.org_installations.setdefault(owner.lower(), installation)
        return repo

    def repository(self, full_name: str) -> Repository:
        try:
            return self.repos[full_name.lower()]
        except KeyError:
            raise KeyError(f"no repository {full_name!r}; add it with add_repository") from None

    def push(self, full_name: str, branch: str, files: Mapping[str, str | bytes | None] | None = None, *,
             message: str = "Change", author: str = "alice") -> str:
        """A new commit on ``branch`` (created if new): the parent's files with ``files`` applied
        (``None`` deletes one). Returns its sha."""
        repo = self.repository(full_name)
        parent = repo.branches.get(branch)
        tree = dict(self.commits[parent].files) if parent else {}
        for path, content in (files or {}).items():
            if content is None:
                tree.pop(path, None)
            else:
                tree[path] = content.encode() if isinstance(content, str) else bytes(content)
        sha = _sha(full_name, branch, parent, sorted(tree.items()), message, next(self._ids))
        self.commits[sha] = Commit(sha, tree, [parent] if parent else [], message, author, self.clock())
        repo.branches[branch] = sha
        return sha

    def set_file(self, full_name: str, path: str, content: str | bytes, *, branch: str | None = None) -> str:
        repo = self.repository(full_name)
        return self.push(full_name, branch or repo.default_branch, {path: content}, message=f"Update {path}")

    def add_pull_request(self, full_name: str, *, head_ref: str = "feature", author: str = "alice",
                         fork: str | None = None, files: Mapping[str, str | bytes | None] | None = None,
                         labels: Iterable[str] = (), title: str = "A change", base_ref: str | None = None,
                         draft: bool = False, number: int | None = None) -> PullRequest:
        """An open pull request whose head is a new commit on ``head_ref`` of ``fork`` (a repository
        ``owner/name`` that is created if needed) or of the repository itself."""
        repo = self.repository(full_name)
        base_ref = base_ref or repo.default_branch
        head_name = fork or full_name
        if head_name.lower() not in self.repos:
            head_repo = self.add_repository(head_name, installation=None)
            head_repo.fork_of = full_name
            head_repo.branches = {}
        head_repo = self.repository(head_name)
        if head_ref not in head_repo.branches:
            head_repo.branches[head_ref] = repo.branches[base_ref]
        sha = self.push(head_name, head_ref, files or {f"change-{next(self._ids)}.txt": "change\n"},
                        author=author)
        number = number or self._next_issue_number(full_name)
        now = self.clock()
        pr = PullRequest(number, repo.full_name, head_repo.full_name, head_ref, sha, base_ref, author, title,
                         list(labels), draft=draft, id=next(self._ids), created=now, updated=now)
        self.pulls[(full_name.lower(), number)] = pr
        return pr

    def pull_request(self, full_name: str, number: int) -> PullRequest:
        try:
            return self.pulls[(full_name.lower(), number)]
        except KeyError:
            raise KeyError(f"no pull request {full_name}#{number}") from None

    def update_pull_request(self, full_name: str, number: int,
                            files: Mapping[str, str | bytes | None] | None = None) -> str:
        """A new head commit (what GitHub reports as ``synchronize``); returns its sha."""
        pr = self.pull_request(full_name, number)
        pr.head_sha = self.push(pr.head_repo, pr.head_ref, files or {f"change-{next(self._ids)}.txt": "x\n"},
                                author=pr.author)
        pr.updated = self.clock()
        return pr.head_sha

    def close_pull_request(self, full_name: str, number: int) -> None:
        self.pull_request(full_name, number).state = "closed"

    def label(self, full_name: str, number: int, name: str) -> None:
        pr = self.pull_request(full_name, number)
        if name not in pr.labels:
            pr.labels.append(name)
            pr.updated = self.clock()

    def unlabel(self, full_name: str, number: int, name: str) -> None:
        pr = self.pull_request(full_name, number)
        pr.labels.remove(name)

    def add_comment(self, full_name: str, number: int, body: str, *, user: str = "alice",
                    user_type: str = "User") -> int:
        """An issue comment on issue or pull request ``number``; returns its id."""
        self.repository(full_name)
        return self._store_comment(full_name, number, body, user, user_type)["id"]

    def set_permission(self, full_name: str, user: str, role: str) -> None:
        """``role``: admin, maintain, write, triage, read or none (as in repository settings)."""
        if role not in PERMISSION_LEVEL:
            raise ValueError(f"role {role!r} is not one of {sorted(PERMISSION_LEVEL)}")
        self.repository(full_name).permissions[user.lower()] = role

    def add_team_member(self, org: str, team_slug: str, user: str, *, role: str = "member",
                        state: str = "active") -> None:
        self.teams.setdefault((org.lower(), team_slug.lower()), {})[user.lower()] = (role, state)

    def forbid_checks(self, full_name: str | None = None, forbidden: bool = True) -> None:
        """The app was not granted ``checks: write`` (on one repository or on all)."""
        for repo in [self.repository(full_name)] if full_name else list(self.repos.values()):
            repo.checks_forbidden = forbidden

    # ---------------------------------------------------------------------------- test API: faults

    def fail(self, operation: str | None, status: int = 502, *, times: int = 1, message: str | None = None,
             processed: bool = False) -> None:
        """The next ``times`` calls of ``operation`` (an operationId such as ``checks/create``; None:
        any) are answered ``status``; with ``processed`` the effect happens first."""
        self._add_fault(operation, Fault("status", times, status=status, message=message,
                                         processed=processed))

    def secondary_rate_limit(self, operation: str | None = None, *, times: int = 1,
                             retry_after: int | None = 60, status: int = 403) -> None:
        """GitHub's secondary ("abuse") limit: 403 with ``retry-after`` (or without, when None)."""
        self._add_fault(operation, Fault("secondary", times, status=status, retry_after=retry_after))

    def delay(self, operation: str | None, seconds: float, *, times: int = 1) -> None:
        """Answer only after ``seconds`` of real time (a slow GitHub)."""
        self._add_fault(operation, Fault("delay", times, seconds=seconds))

    def exhaust_rate_limit(self, installation: int | None = None, *, reset_in: float = 600.0,
                           status: int = 403) -> None:
        """The primary limit of an installation's tokens (None: the app JWT) is used up until
        ``reset_in`` seconds from now; answers are ``status`` (403 or 429) until then."""
        bucket = self._bucket(self._bucket_key(installation))
        bucket.remaining = 0
        bucket.reset = self.clock() + reset_in
        bucket.status_when_exhausted = status

    def expire_tokens(self) -> None:
        """Every installation token issued so far is now expired."""
        now = self.clock()
        for token, (installation, _) in list(self.tokens.items()):
            self.tokens[token] = (installation, now - 1)

    def clear_faults(self) -> None:
        self._faults.clear()

    # ---------------------------------------------------------------------------- test API: inspection

    def requests(self, operation: str | None = None) -> list[RecordedRequest]:
        return [r for r in self.recorded if operation is None or r.operation == operation]

    def count(self, operation: str) -> int:
        return sum(1 for r in self.recorded if r.operation == operation)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.recorded:
            key = r.operation or f"{r.method} {r.path}"
            out[key] = out.get(key, 0) + 1
        return out

    def violations(self) -> list[RecordedRequest]:
        return [r for r in self.recorded if r.violation and not r.expected]

    def take_violations(self) -> list[RecordedRequest]:
        """The invalid requests not taken before, which the test thereby declares expected."""
        taken = self.violations()
        for r in taken:
            r.expected = True
        return taken

    def assert_all_valid(self) -> None:
        problems = [f"{r.method} {r.path}: {r.violation}" for r in self.violations()]
        problems += [f"emulator answer: {v}" for v in self.response_violations]
        if problems:
            raise OpenApiValidationError(
                f"{len(problems)} request(s) broke GitHub's API description or rules:\n  "
                + "\n  ".join(problems), operation=None, field="", rule="all requests valid")

    def check_runs(self, full_name: str | None = None, head_sha: str | None = None) -> list[dict[str, Any]]:
        return [copy.deepcopy(c) for c in self.check_run_records.values()
                if (full_name is None or c["_repo"] == full_name.lower())
                and (head_sha is None or c["head_sha"] == head_sha)]

    def statuses(self, full_name: str | None = None, sha: str | None = None) -> list[dict[str, Any]]:
        return [copy.deepcopy(s) for s in self.status_records
                if (full_name is None or s["_repo"] == full_name.lower())
                and (sha is None or s["_sha"] == sha)]

    def comments(self, full_name: str, number: int) -> list[dict[str, Any]]:
        return copy.deepcopy(self.issue_comments.get((full_name.lower(), number), []))

    def rate_limit_remaining(self, installation: int | None = None) -> int:
        return self._bucket(self._bucket_key(installation)).remaining

    def installation_token(self, installation: int = 1) -> str:
        """A fresh token, as if minted through the API (for tests that drive HTTP by hand)."""
        return self._mint(installation)[0]

    def app_jwt(self, *, iat: float | None = None, exp: float | None = None, iss: Any = None,
                key: rsa.RSAPrivateKey | None = None) -> str:
        now = self.clock()
        claims = {"iat": int(now - 60 if iat is None else iat), "exp": int(now + 540 if exp is None else exp),
                  "iss": str(self.app_id) if iss is None else iss}
        return jwt.encode(claims, key or self._key, algorithm="RS256")

    # ---------------------------------------------------------------------------- request handling

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        record = RecordedRequest(request.method, request.path, list(request.query.items()),
                                 dict(request.headers), body, started=self.clock())
        self.recorded.append(record)
        mutating = request.method in ("POST", "PATCH", "PUT", "DELETE")
        if mutating:
            self.writes_in_flight += 1
            self.max_writes_in_flight = max(self.max_writes_in_flight, self.writes_in_flight)
        try:
            if mutating and self.write_latency:
                await self._sleep(self.write_latency)
            status, payload, headers, op = await self._process(request, record)
        finally:
            if mutating:
                self.writes_in_flight -= 1
        record.status = status
        bucket_key = self._bucket_key(record.installation) if record.credential in ("jwt", "installation") \
            else "anonymous"
        bucket = self._bucket(bucket_key)
        encoded = b"" if payload is None else json.dumps(payload).encode()
        if request.method == "GET" and status == 200:
            etag = 'W/"' + hashlib.sha256(encoded).hexdigest() + '"'
            headers["ETag"] = etag
            if request.headers.get("If-None-Match") == etag:
                # Conditional requests that come back 304 do not count against the rate limit.
                record.status = 304
                return web.Response(status=304, headers={**headers, **self._limit_headers(bucket)})
        refused_for_limit = status in (403, 429) and record.fault == "exhausted"
        if status != 304 and bucket.remaining > 0 and not refused_for_limit:
            bucket.remaining -= 1
        headers.update(self._limit_headers(bucket))
        if op is not None and self.check_responses and payload is not None and record.violation is None:
            try:
                self.api.validate_response(op, status, payload)
            except OpenApiValidationError as exc:
                self.response_violations.append(str(exc))
        if payload is None:
            return web.Response(status=status, headers=headers)
        return web.Response(status=status, body=encoded, content_type="application/json", headers=headers)

    async def _process(self, request: web.Request,
                       record: RecordedRequest) -> tuple[int, Any, dict[str, str], Operation | None]:
        op: Operation | None = None
        try:
            self._check_headers(record)
            try:
                op, params = self.api.validate_request(
                    request.method, request.raw_path, query=record.query, body=record.body,
                    content_type=request.headers.get("Content-Type"), prefix=self.prefix)
            except OpenApiValidationError as exc:
                record.operation = exc.operation
                record.violation = str(exc)
                raise _Answer(422 if exc.operation else 404,
                              f"Invalid request.\n\n{exc}" if exc.operation else "Not Found") from None
            record.operation = op.operation_id
            self._authenticate(request, record, op)
            self._check_rate_limit(record)
            fault = self._take_fault(op.operation_id)
            if fault is not None:
                record.fault = fault.kind
                if fault.kind == "delay":
                    await self._sleep(fault.seconds)
                elif fault.kind == "secondary":
                    headers = {"retry-after": str(fault.retry_after)} if fault.retry_after is not None else {}
                    raise _Answer(fault.status, "You have exceeded a secondary rate limit. Please wait a few "
                                  "minutes before you try again.", headers=headers,
                                  docs=RATE_DOCS + "#about-secondary-rate-limits")
                elif not fault.processed:
                    raise _Answer(fault.status, fault.message or "Server Error")
            handler = getattr(self, "_op_" + op.operation_id.replace("/", "__").replace("-", "_"), None)
            if handler is None:
                record.violation = f"{op} is valid but not emulated"
                raise _Answer(501, f"{op} is not emulated")
            status, payload, headers = await handler(request, record, params)
            if fault is not None and fault.kind == "status" and fault.processed:
                raise _Answer(fault.status, fault.message or "Server Error")
            return status, payload, headers, op
        except _Answer as answer:
            return answer.status, answer.body, answer.headers, None

    def _check_headers(self, record: RecordedRequest) -> None:
        headers = {k.lower(): v for k, v in record.headers.items()}
        if not headers.get("user-agent"):
            record.violation = "no User-Agent header"
            raise _Answer(403, "Request forbidden by administrative rules. Please make sure your request "
                          "has a User-Agent header.", docs="https://docs.github.com/rest/overview/resources-in-the-rest-api#user-agent-required")
        version = headers.get("x-github-api-version")
        if version is not None and version not in SUPPORTED_API_VERSIONS:
            record.violation = f"unsupported X-GitHub-Api-Version {version}"
            raise _Answer(400, f"API version '{version}' is not supported.")
        problems = []
        if version is None:
            problems.append("no X-GitHub-Api-Version header")
        if "application/vnd.github+json" not in headers.get("accept", ""):
            problems.append(f"Accept is {headers.get('accept')!r}, not application/vnd.github+json")
        if problems:
            record.violation = "; ".join(problems)

    def _authenticate(self, request: web.Request, record: RecordedRequest, op: Operation) -> None:
        header = request.headers.get("Authorization", "")
        scheme, _, credential = header.partition(" ")
        if not header:
            record.credential = "none"
            raise _Answer(401, "Requires authentication")
        if scheme.lower() not in ("bearer", "token") or not credential:
            record.credential = "invalid"
            raise _Answer(401, "Bad credentials")
        if credential in self.tokens:
            installation, expires = self.tokens[credential]
            record.installation = installation
            record.credential = "installation"
            if self.clock() >= expires:
                raise _Answer(401, "Bad credentials")
            if op.operation_id in JWT_OPERATIONS:
                raise _Answer(401, "A JSON web token could not be decoded")
            return
        if credential.count(".") == 2:
            record.credential = "invalid"
            self._verify_jwt(credential)
            record.credential = "jwt"
            if op.operation_id not in JWT_OPERATIONS:
                raise _Answer(403, "Resource not accessible by integration")
            return
        record.credential = "invalid"
        raise _Answer(401, "Bad credentials")

    def _verify_jwt(self, token: str) -> None:
        try:
            header = jwt.get_unverified_header(token)
            if header.get("alg") != "RS256":
                raise _Answer(401, "A JSON web token could not be decoded")
            claims = jwt.decode(token, self._public_key, algorithms=["RS256"],
                                options={"verify_exp": False, "verify_iat": False, "verify_nbf": False,
                                         "require": []})
        except jwt.InvalidTokenError:
            raise _Answer(401, "A JSON web token could not be decoded") from None
        now = self.clock()
        iat, exp, iss = claims.get("iat"), claims.get("exp"), claims.get("iss")
        if not isinstance(iat, int) or isinstance(iat, bool):
            raise _Answer(401, "'Issued at' claim ('iat') must be an Integer representing the time that the "
                          "assertion was issued.")
        if not isinstance(exp, int) or isinstance(exp, bool):
            raise _Answer(401, "'Expiration time' claim ('exp') must be a numeric value representing the "
                          "future time at which the assertion expires.")
        if iat > now + JWT_SKEW:
            raise _Answer(401, "'Issued at' claim ('iat') must be an Integer representing the time that the "
                          "assertion was issued.")
        if exp - iat > MAX_JWT_LIFETIME or exp > now + MAX_JWT_LIFETIME:
            raise _Answer(401, "'Expiration time' claim ('exp') is too far in the future")
        if exp <= now:
            raise _Answer(401, "'Expiration time' claim ('exp') must be a numeric value representing the "
                          "future time at which the assertion expires.")
        if not isinstance(iss, str) or iss != str(self.app_id):
            raise _Answer(401, "'Issuer' claim ('iss') must be an Integer")

    def _check_rate_limit(self, record: RecordedRequest) -> None:
        bucket = self._bucket(self._bucket_key(record.installation if record.credential == "installation"
                                               else None))
        if bucket.remaining > 0:
            return
        record.fault = "exhausted"
        who = f"installation ID {record.installation}" if record.credential == "installation" \
            else f"app ID {self.app_id}"
        raise _Answer(bucket.status_when_exhausted, f"API rate limit exceeded for {who}.", docs=RATE_DOCS)

    def _bucket_key(self, installation: int | None) -> str:
        return "app" if installation is None else f"installation:{installation}"

    def _bucket(self, key: str) -> _Bucket:
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None or now >= bucket.reset:
            bucket = _Bucket(self.rate_limit_per_hour, self.rate_limit_per_hour, now + 3600)
            self._buckets[key] = bucket
        return bucket

    def _limit_headers(self, bucket: _Bucket) -> dict[str, str]:
        return {"x-ratelimit-limit": str(bucket.limit), "x-ratelimit-remaining": str(bucket.remaining),
                "x-ratelimit-used": str(bucket.limit - bucket.remaining),
                "x-ratelimit-reset": str(int(bucket.reset)), "x-ratelimit-resource": "core",
                "X-GitHub-Media-Type": "github.v3; format=json"}

    def _add_fault(self, operation: str | None, fault: Fault) -> None:
        if operation is not None and operation not in self.api.operations:
            raise ValueError(f"{operation!r} is no operationId of GitHub's API")
        if fault.remaining < 1:
            raise ValueError("times must be at least 1")
        self._faults.setdefault(operation, deque()).append(fault)

    def _take_fault(self, operation: str) -> Fault | None:
        for key in (operation, None):
            queue = self._faults.get(key)
            if queue:
                fault = queue[0]
                fault.remaining -= 1
                if fault.remaining <= 0:
                    queue.popleft()
                return fault
        return None

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)

    # ---------------------------------------------------------------------------- helpers

    def _repo_for(self, record: RecordedRequest, params: Mapping[str, Any]) -> Repository:
        repo = self.repos.get(f"{params['owner']}/{params['repo']}".lower())
        # An installation reads its own repositories and public ones; a private repository of
        # another installation does not exist for it.
        if repo is None or (repo.installation != record.installation and repo.private):
            raise _Answer(404, "Not Found")
        return repo

    def _writable_repo(self, record: RecordedRequest, params: Mapping[str, Any]) -> Repository:
        repo = self._repo_for(record, params)
        if repo.installation != record.installation:
            raise _Answer(403, "Resource not accessible by integration")
        return repo

    def _resolve(self, repo: Repository, ref: str) -> str:
        """A sha for a branch name, ``refs/heads/X``, ``refs/pull/N/head``, ``heads/X`` or a sha."""
        name = ref.removeprefix("refs/").removeprefix("heads/")
        if name in repo.branches:
            return repo.branches[name]
        if name.startswith("pull/") and name.endswith("/head"):
            with contextlib.suppress(ValueError, KeyError):
                return self.pull_request(repo.full_name, int(name.split("/")[1])).head_sha
        matches = [sha for sha in self.commits if len(ref) >= 7 and sha.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        raise _Answer(422, f"No commit found for SHA: {ref}")

    def _next_issue_number(self, full_name: str) -> int:
        numbers = [n for (r, n) in self.pulls if r == full_name.lower()]
        numbers += [n for (r, n) in self.issue_comments if r == full_name.lower()]
        return max(numbers, default=0) + 1

    def _user(self, login: str, user_type: str = "User") -> dict[str, Any]:
        user = copy.deepcopy(self.api.examples["issue-comment"]["user"])
        uid = int(hashlib.sha1(login.lower().encode()).hexdigest()[:7], 16)
        user.update({"login": login, "id": uid, "type": user_type, "url": f"https://api.github.com/users/{login}",
                     "html_url": f"https://github.com/{login}"})
        return user

    def _repo_json(self, repo: Repository) -> dict[str, Any]:
        data = copy.deepcopy(self.api.examples["pull-request"]["base"]["repo"])
        full = repo.full_name
        data.update({"id": repo.id, "name": repo.name, "full_name": full,
                     "owner": self._user(repo.owner, "Organization"), "private": repo.private,
                     "fork": repo.fork_of is not None, "default_branch": repo.default_branch,
                     "html_url": f"https://github.com/{full}", "url": f"https://api.github.com/repos/{full}",
                     "clone_url": f"https://github.com/{full}.git", "visibility":
                         "private" if repo.private else "public"})
        return data

    def _pull_json(self, pr: PullRequest) -> dict[str, Any]:
        data = copy.deepcopy(self.api.examples["pull-request"])
        base_repo, head_repo = self.repository(pr.repo), self.repository(pr.head_repo)
        url = f"https://api.github.com/repos/{pr.repo}/pulls/{pr.number}"
        data.update({
            "id": pr.id, "number": pr.number, "state": pr.state, "title": pr.title, "draft": pr.draft,
            "url": url, "html_url": f"https://github.com/{pr.repo}/pull/{pr.number}",
            "user": self._user(pr.author), "labels": [self._label_json(pr.repo, n) for n in pr.labels],
            "created_at": _iso(pr.created), "updated_at": _iso(pr.updated), "requested_teams": [],
            "closed_at": None if pr.state == "open" else _iso(pr.updated), "merged_at": None, "merged": False,
            "merge_commit_sha": None,
            "author_association": "CONTRIBUTOR" if pr.head_repo != pr.repo else "MEMBER",
            "head": {"label": f"{head_repo.owner}:{pr.head_ref}", "ref": pr.head_ref, "sha": pr.head_sha,
                     "user": self._user(head_repo.owner), "repo": self._repo_json(head_repo)},
            "base": {"label": f"{base_repo.owner}:{pr.base_ref}", "ref": pr.base_ref,
                     "sha": base_repo.branches[pr.base_ref], "user": self._user(base_repo.owner),
                     "repo": self._repo_json(base_repo)},
        })
        return data

    def _label_json(self, full_name: str, name: str) -> dict[str, Any]:
        label = copy.deepcopy(self.api.examples["label-items"][0])
        label.update({"id": int(hashlib.sha1(name.encode()).hexdigest()[:7], 16), "name": name,
                      "url": f"https://api.github.com/repos/{full_name}/labels/{name}", "default": False})
        return label

    def _store_comment(self, full_name: str, number: int, body: str, login: str,
                       user_type: str) -> dict[str, Any]:
        comment = copy.deepcopy(self.api.examples["issue-comment"])
        cid = next(self._ids)
        now = _iso(self.clock())
        comment.update({"id": cid, "body": body, "user": self._user(login, user_type),
                        "created_at": now, "updated_at": now,
                        "url": f"https://api.github.com/repos/{full_name}/issues/comments/{cid}",
                        "html_url": f"https://github.com/{full_name}/issues/{number}#issuecomment-{cid}",
                        "issue_url": f"https://api.github.com/repos/{full_name}/issues/{number}",
                        "author_association": "NONE"})
        self.issue_comments.setdefault((full_name.lower(), number), []).append(comment)
        return comment

    def _mint(self, installation: int) -> tuple[str, float]:
        if self.stateless_tokens:
            # The 2026 stateless format: ghs_<app id>_<JWT>, about 520 characters, not for clients to parse.
            random_part = base64.urlsafe_b64encode(secrets.token_bytes(380)).decode().rstrip("=")
            token = f"ghs_{self.app_id}_{random_part}"
        else:
            token = "ghs_" + secrets.token_urlsafe(27)[:36]
        expires = self.clock() + self.token_lifetime
        self.tokens[token] = (installation, expires)
        return token, expires

    @staticmethod
    def _body(record: RecordedRequest) -> dict[str, Any]:
        data = record.json()
        return data if isinstance(data, dict) else {}

    # ---------------------------------------------------------------------------- operations

    Result = tuple[int, Any, dict[str, str]]

    async def _op_apps__get_authenticated(self, request: web.Request, record: RecordedRequest,
                                          params: Mapping[str, Any]) -> Result:
        app = copy.deepcopy(self.api.examples["integration"])
        app.update({"id": self.app_id, "slug": self.app_slug, "name": self.app_slug})
        return 200, app, {}

    def _installation_json(self, installation: int, account: str) -> dict[str, Any]:
        data = copy.deepcopy(self.api.examples["installation"])
        data.update({"id": installation, "app_id": self.app_id, "app_slug": self.app_slug,
                     "account": self._user(account, "Organization"),
                     "access_tokens_url": f"https://api.github.com/app/installations/{installation}/access_tokens",
                     "permissions": {"checks": "write", "statuses": "write", "contents": "read",
                                     "pull_requests": "read", "issues": "write", "metadata": "read",
                                     "members": "read"}})
        return data

    async def _op_apps__get_repo_installation(self, request: web.Request, record: RecordedRequest,
                                              params: Mapping[str, Any]) -> Result:
        repo = self.repos.get(f"{params['owner']}/{params['repo']}".lower())
        if repo is None or repo.installation is None:
            raise _Answer(404, "Not Found")
        return 200, self._installation_json(repo.installation, repo.owner), {}

    async def _op_apps__get_org_installation(self, request: web.Request, record: RecordedRequest,
                                             params: Mapping[str, Any]) -> Result:
        installation = self.org_installations.get(str(params["org"]).lower())
        if installation is None:
            raise _Answer(404, "Not Found")
        return 200, self._installation_json(installation, params["org"]), {}

    async def _op_apps__create_installation_access_token(self, request: web.Request, record: RecordedRequest,
                                                         params: Mapping[str, Any]) -> Result:
        installation = params["installation_id"]
        known = {r.installation for r in self.repos.values()} | set(self.org_installations.values())
        if installation not in known:
            raise _Answer(404, "Not Found")
        token, expires = self._mint(installation)
        return 201, {"token": token, "expires_at": _iso(expires),
                     "permissions": self._installation_json(installation, "x")["permissions"],
                     "repository_selection": "selected"}, {}

    async def _op_rate_limit__get(self, request: web.Request, record: RecordedRequest,
                                  params: Mapping[str, Any]) -> Result:
        data = copy.deepcopy(self.api.examples["rate-limit-overview"])
        bucket = self._bucket(self._bucket_key(record.installation))
        core = {"limit": bucket.limit, "used": bucket.limit - bucket.remaining, "remaining": bucket.remaining,
                "reset": int(bucket.reset)}
        data["resources"]["core"] = core
        data["rate"] = dict(core)
        bucket.remaining += 1  # free of the primary limit (the wrapper takes one off again)
        return 200, data, {}

    async def _op_repos__get(self, request: web.Request, record: RecordedRequest,
                             params: Mapping[str, Any]) -> Result:
        repo = self._repo_for(record, params)
        data = copy.deepcopy(self.api.examples["full-repository-default-response"])
        data.update({k: v for k, v in self._repo_json(repo).items() if k in data})
        data.update({"language": None, "parent": None, "source": None, "organization": None})
        for key in ("parent", "source", "organization", "template_repository"):
            data.pop(key, None)
        return 200, data, {}

    async def _op_pulls__list(self, request: web.Request, record: RecordedRequest,
                              params: Mapping[str, Any]) -> Result:
        repo = self._repo_for(record, params)
        query = dict(record.query)
        state = query.get("state", "open")
        pulls = [p for (r, _), p in sorted(self.pulls.items()) if r == repo.full_name.lower()
                 and (state == "all" or p.state == state)]
        if "head" in query:
            pulls = [p for p in pulls
                     if f"{self.repository(p.head_repo).owner}:{p.head_ref}" == query["head"]]
        if "base" in query:
            pulls = [p for p in pulls if p.base_ref == query["base"]]
        key = {"updated": lambda p: p.updated}.get(query.get("sort", "created"), lambda p: p.created)
        pulls.sort(key=lambda p: (key(p), p.number), reverse=query.get("direction", "desc") == "desc")
        items = []
        for pr in pulls:
            item = self._pull_json(pr)
            for extra in ("merged", "mergeable", "rebaseable", "mergeable_state", "merged_by", "comments",
                          "review_comments", "maintainer_can_modify", "commits", "additions", "deletions",
                          "changed_files"):
                item.pop(extra, None)
            items.append(item)
        return self._page(request, record, items)

    def _page(self, request: web.Request, record: RecordedRequest, items: list[Any],
              key: str | None = None, extra: Mapping[str, Any] | None = None) -> Result:
        query = dict(record.query)
        per_page = min(int(query.get("per_page", 30)), 100)
        page = max(int(query.get("page", 1)), 1)
        chunk = items[(page - 1) * per_page: page * per_page]
        headers: dict[str, str] = {}
        if page * per_page < len(items):
            following = dict(query, page=str(page + 1), per_page=str(per_page))
            link = f"http://127.0.0.1:{self._port}{request.path}?" + "&".join(
                f"{k}={v}" for k, v in following.items())
            headers["Link"] = f'<{link}>; rel="next"'
        if key is None:
            return 200, chunk, headers
        return 200, {"total_count": len(items), key: chunk, **(extra or {})}, headers

    async def _op_pulls__get(self, request: web.Request, record: RecordedRequest,
                             params: Mapping[str, Any]) -> Result:
        repo = self._repo_for(record, params)
        pr = self.pulls.get((repo.full_name.lower(), params["pull_number"]))
        if pr is None:
            raise _Answer(404, "Not Found")
        return 200, self._pull_json(pr), {}

    async def _op_issues__list_comments(self, request: web.Request, record: RecordedRequest,
                                        params: Mapping[str, Any]) -> Result:
        repo = self._repo_for(record, params)
        comments = self.issue_comments.get((repo.full_name.lower(), params["issue_number"]), [])
        since = dict(record.query).get("since")
        if since:
            comments = [c for c in comments if c["updated_at"] >= since.replace("+00:00", "Z")]
        return self._page(request, record, copy.deepcopy(comments))

    async def _op_issues__create_comment(self, request: web.Request, record: RecordedRequest,
                                         params: Mapping[str, Any]) -> Result:
        repo = self._writable_repo(record, params)
        body = self._body(record)["body"]
        if len(body) > 65536:
            raise _Answer(422, "Validation Failed", errors=[{"resource": "IssueComment", "code": "custom",
                                                              "field": "body", "message": "body is too long "
                                                              "(maximum is 65536 characters)"}])
        comment = self._store_comment(repo.full_name, params["issue_number"], body,
                                      f"{self.app_slug}[bot]", "Bot")
        return 201, copy.deepcopy(comment), {"Location": comment["url"]}

    async def _op_issues__list_labels_on_issue(self, request: web.Request, record: RecordedRequest,
                                               params: Mapping[str, Any]) -> Result:
        repo = self._repo_for(record, params)
        pr = self.pulls.get((repo.full_name.lower(), params["issue_number"]))
        labels = pr.labels if pr else []
        return self._page(request, record, [self._label_json(repo.full_name, n) for n in labels])

    async def _op_issues__remove_label(self, request: web.Request, record: RecordedRequest,
                                       params: Mapping[str, Any]) -> Result:
        repo = self._writable_repo(record, params)
        pr = self.pulls.get((repo.full_name.lower(), params["issue_number"]))
        if pr is None or params["name"] not in pr.labels:
            raise _Answer(404, "Label does not exist")
        pr.labels.remove(params["name"])
        return 200, [self._label_json(repo.full_name, n) for n in pr.labels], {}

    async def _op_repos__get_collaborator_permission_level(self, request: web.Request,
                                                           record: RecordedRequest,
                                                           params: Mapping[str, Any]) -> Result:
        repo = self._repo_for(record, params)
        role = repo.permissions.get(str(params["username"]).lower(), "none" if repo.private else "read")
        user = self._user(params["username"]) | {"role_name": role}
        return 200, {"permission": PERMISSION_LEVEL[role], "role_name": role, "user": user}, {}

    async def _op_teams__get_membership_for_user_in_org(self, request: web.Request, record: RecordedRequest,
                                                        params: Mapping[str, Any]) -> Result:
        members = self.teams.get((str(params["org"]).lower(), str(params["team_slug"]).lower()))
        if record.installation != self.org_installations.get(str(params["org"]).lower()):
            raise _Answer(404, "Not Found")
        member = (members or {}).get(str(params["username"]).lower())
        if member is None:
            raise _Answer(404, "Not Found")
        role, state = member
        return 200, {"url": f"https://api.github.com/organizations/1/team/1/memberships/{params['username']}",
                     "role": role, "state": state}, {}

    async def _op_repos__get_content(self, request: web.Request, record: RecordedRequest,
                                     params: Mapping[str, Any]) -> Result:
        repo = self._repo_for(record, params)
        ref = dict(record.query).get("ref") or repo.default_branch
        try:
            sha = self._resolve(repo, ref)
        except _Answer:
            raise _Answer(404, f"No commit found for the ref {ref}") from None
        path = str(params["path"]).strip("/")
        files = self.commits[sha].files
        if path not in files:
            raise _Answer(404, "Not Found")
        content = files[path]
        encoded = base64.b64encode(content).decode()
        # GitHub wraps the base64 text at 60 characters.
        wrapped = "\n".join(encoded[i:i + 60] for i in range(0, len(encoded), 60)) + "\n"
        blob = hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
        url = f"https://api.github.com/repos/{repo.full_name}/contents/{path}?ref={ref}"
        return 200, {"type": "file", "encoding": "base64", "size": len(content),
                     "name": path.rsplit("/", 1)[-1],
                     "path": path, "content": wrapped, "sha": blob, "url": url, "git_url": None,
                     "html_url": None, "download_url": None,
                     "_links": {"self": url, "git": None, "html": None}}, {}

    def _commit_json(self, repo: Repository, sha: str) -> dict[str, Any]:
        commit = self.commits[sha]
        data = copy.deepcopy(self.api.examples["commit"])
        url = f"https://api.github.com/repos/{repo.full_name}/commits/{sha}"
        data.update({"sha": sha, "url": url, "html_url": f"https://github.com/{repo.full_name}/commit/{sha}",
                     "comments_url": url + "/comments", "author": self._user(commit.author),
                     "committer": self._user(commit.author), "files": [],
                     "parents": [{"sha": p, "url": f"https://api.github.com/repos/{repo.full_name}/commits/{p}"}
                                 for p in commit.parents]})
        data["commit"].update({"message": commit.message, "url": url})
        for who in ("author", "committer"):
            data["commit"][who] = {"name": commit.author, "email": f"{commit.author}@example.org",
                                   "date": _iso(commit.date)}
        return data

    async def _op_repos__get_commit(self, request: web.Request, record: RecordedRequest,
                                    params: Mapping[str, Any]) -> Result:
        repo = self._repo_for(record, params)
        return 200, self._commit_json(repo, self._resolve(repo, params["ref"])), {}

    async def _op_repos__get_branch(self, request: web.Request, record: RecordedRequest,
                                    params: Mapping[str, Any]) -> Result:
        repo = self._repo_for(record, params)
        sha = repo.branches.get(params["branch"])
        if sha is None:
            raise _Answer(404, "Branch not found")
        data = copy.deepcopy(self.api.examples["branch-get"])
        commit = self._commit_json(repo, sha)
        for key in ("sha", "url", "html_url", "comments_url", "author", "committer", "parents"):
            data["commit"][key] = commit[key]
        data["commit"]["commit"].update({k: commit["commit"][k] for k in ("message", "author", "committer")})
        data["name"] = params["branch"]
        return 200, data, {}

    async def _op_git__get_ref(self, request: web.Request, record: RecordedRequest,
                               params: Mapping[str, Any]) -> Result:
        repo = self._repo_for(record, params)
        ref = str(params["ref"])
        if not ref.startswith("heads/") or ref.removeprefix("heads/") not in repo.branches:
            raise _Answer(404, "Not Found")
        sha = repo.branches[ref.removeprefix("heads/")]
        url = f"https://api.github.com/repos/{repo.full_name}/git/refs/{ref}"
        return 200, {"ref": f"refs/{ref}", "node_id": "REF_" + sha[:8], "url": url,
                     "object": {"type": "commit", "sha": sha,
                                "url": f"https://api.github.com/repos/{repo.full_name}/git/commits/{sha}"},
                     }, {}

    # ---- checks

    def _checks_repo(self, record: RecordedRequest, params: Mapping[str, Any]) -> Repository:
        repo = self._repo_for(record, params) if record.method == "GET" \
            else self._writable_repo(record, params)
        if repo.checks_forbidden:
            raise _Answer(403, "Resource not accessible by integration",
                          docs="https://docs.github.com/rest/checks/runs#create-a-check-run")
        return repo

    def _check_output_rules(self, body: Mapping[str, Any], creating: bool,
                            current: Mapping[str, Any] | None) -> None:
        errors = []
        output = body.get("output") or {}
        for key in ("summary", "text"):
            value = output.get(key)
            if isinstance(value, str) and len(value.encode()) > 65535:
                errors.append({"resource": "CheckRun", "code": "custom", "field": key,
                               "message": f"{key} exceeds a maximum bytesize of 65535"})
        if body.get("conclusion") == "stale":
            errors.append({"resource": "CheckRun", "code": "custom", "field": "conclusion",
                           "message": "conclusion 'stale' can only be set by GitHub"})
        status = body.get("status")
        completing = status == "completed" or "completed_at" in body
        if completing and not body.get("conclusion") and not (current and current.get("conclusion")):
            errors.append({"resource": "CheckRun", "code": "missing_field", "field": "conclusion",
                           "message": "conclusion is required when status is completed"})
        if creating and status in ("requested", "waiting", "pending"):
            errors.append({"resource": "CheckRun", "code": "invalid", "field": "status"})
        if errors:
            raise _Answer(422, "Validation Failed", errors=errors)

    def _check_run_json(self, record: dict[str, Any]) -> dict[str, Any]:
        data = copy.deepcopy(self.api.examples["check-run"])
        visible = {k: v for k, v in record.items() if not k.startswith("_")}
        output = visible.pop("output", {})
        data.update(visible)
        data["output"] = {"title": output.get("title"), "summary": output.get("summary"),
                          "text": output.get("text"), "annotations_count": record["_annotations"],
                          "annotations_url": data["url"] + "/annotations"}
        data["app"] = dict(data["app"], id=self.app_id, slug=self.app_slug)
        data["pull_requests"] = [
            {"id": pr.id, "number": pr.number, "url": f"https://api.github.com/repos/{pr.repo}/pulls/{pr.number}",
             "head": {"ref": pr.head_ref, "sha": pr.head_sha,
                      "repo": {"id": self.repository(pr.head_repo).id, "name": pr.head_repo.split("/")[1],
                               "url": f"https://api.github.com/repos/{pr.head_repo}"}},
             "base": {"ref": pr.base_ref, "sha": self.repository(pr.repo).branches[pr.base_ref],
                      "repo": {"id": self.repository(pr.repo).id, "name": pr.repo.split("/")[1],
                               "url": f"https://api.github.com/repos/{pr.repo}"}}}
            for pr in self.pulls.values()
            if pr.repo.lower() == record["_repo"] and pr.head_sha == record["head_sha"]
            and pr.head_repo == pr.repo]  # fork heads are not detected (the description's note)
        return data

    async def _op_checks__create(self, request: web.Request, record: RecordedRequest,
                                 params: Mapping[str, Any]) -> Result:
        repo = self._checks_repo(record, params)
        body = self._body(record)
        if body["head_sha"] not in self.commits:
            raise _Answer(422, "Validation Failed", errors=[{
                "resource": "CheckRun", "code": "invalid", "field": "head_sha",
                "message": f"No commit found for SHA: {body['head_sha']}"}])
        self._check_output_rules(body, True, None)
        run_id = next(self._ids)
        now = _iso(self.clock())
        status = "completed" if body.get("conclusion") else body.get("status", "queued")
        run: dict[str, Any] = {
            "id": run_id, "name": body["name"], "head_sha": body["head_sha"], "status": status,
            "conclusion": body.get("conclusion"), "external_id": body.get("external_id", ""),
            "details_url": body.get("details_url", f"https://github.com/apps/{self.app_slug}"),
            "started_at": body.get("started_at", now),
            "completed_at": body.get("completed_at", now if status == "completed" else None),
            "output": dict(body.get("output") or {}), "check_suite": {"id": 7},
            "url": f"https://api.github.com/repos/{repo.full_name}/check-runs/{run_id}",
            "html_url": f"https://github.com/{repo.full_name}/runs/{run_id}",
            "_repo": repo.full_name.lower(),
            "_annotations": len((body.get("output") or {}).get("annotations", [])),
            "_actions": list(body.get("actions", [])), "_history": [copy.deepcopy(body)],
        }
        self.check_run_records[run_id] = run
        return 201, self._check_run_json(run), {}

    async def _op_checks__update(self, request: web.Request, record: RecordedRequest,
                                 params: Mapping[str, Any]) -> Result:
        repo = self._checks_repo(record, params)
        run = self.check_run_records.get(params["check_run_id"])
        if run is None or run["_repo"] != repo.full_name.lower():
            raise _Answer(404, "Not Found")
        body = self._body(record)
        self._check_output_rules(body, False, run)
        for key in ("name", "details_url", "external_id", "started_at", "status", "conclusion",
                    "completed_at"):
            if key in body:
                run[key] = body[key]
        if body.get("conclusion"):
            run["status"] = "completed"
            run.setdefault("completed_at", None)
            run["completed_at"] = run["completed_at"] or _iso(self.clock())
        if "output" in body:
            annotations = body["output"].get("annotations", [])
            run["output"] = {k: v for k, v in body["output"].items() if k != "annotations"}
            run["_annotations"] += len(annotations)  # annotations are appended, not replaced
        if "actions" in body:
            run["_actions"] = list(body["actions"])
        run["_history"].append(copy.deepcopy(body))
        return 200, self._check_run_json(run), {}

    async def _op_checks__get(self, request: web.Request, record: RecordedRequest,
                              params: Mapping[str, Any]) -> Result:
        repo = self._checks_repo(record, params)
        run = self.check_run_records.get(params["check_run_id"])
        if run is None or run["_repo"] != repo.full_name.lower():
            raise _Answer(404, "Not Found")
        return 200, self._check_run_json(run), {}

    async def _op_checks__list_for_ref(self, request: web.Request, record: RecordedRequest,
                                       params: Mapping[str, Any]) -> Result:
        repo = self._checks_repo(record, params)
        sha = self._resolve(repo, params["ref"])
        query = dict(record.query)
        runs = [r for r in self.check_run_records.values() if r["_repo"] == repo.full_name.lower()
                and r["head_sha"] == sha and query.get("check_name", r["name"]) == r["name"]
                and query.get("status", r["status"]) == r["status"]]
        runs.sort(key=lambda r: -r["id"])
        if query.get("filter", "latest") == "latest":
            seen: set[str] = set()
            runs = [r for r in runs if not (r["name"] in seen or seen.add(r["name"]))]  # type: ignore[func-returns-value]
        return self._page(request, record, [self._check_run_json(r) for r in runs], key="check_runs")

    # ---- statuses

    async def _op_repos__create_commit_status(self, request: web.Request, record: RecordedRequest,
                                              params: Mapping[str, Any]) -> Result:
        repo = self._writable_repo(record, params)
        body = self._body(record)
        sha = str(params["sha"])
        if sha not in self.commits:
            raise _Answer(422, f"No commit found for SHA: {sha}")
        description = body.get("description")
        if isinstance(description, str) and len(description) > 140:
            raise _Answer(422, "Validation Failed", errors=[{
                "resource": "Status", "code": "custom", "field": "description",
                "message": "description is too long (maximum is 140 characters)"}])
        context = body.get("context") or "default"
        same = [s for s in self.status_records if s["_repo"] == repo.full_name.lower() and s["_sha"] == sha
                and s["context"].lower() == context.lower()]
        if len(same) >= 1000:
            raise _Answer(422, "Validation Failed", errors=[{
                "resource": "Status", "code": "custom", "field": "context",
                "message": "This SHA and context has reached the maximum number of statuses."}])
        status = copy.deepcopy(self.api.examples["status"])
        now = _iso(self.clock())
        status.update({"id": next(self._ids), "state": body["state"], "description": description,
                       "target_url": body.get("target_url"), "context": context, "created_at": now,
                       "updated_at": now, "creator": self._user(f"{self.app_slug}[bot]", "Bot"),
                       "url": f"https://api.github.com/repos/{repo.full_name}/statuses/{sha}"})
        self.status_records.append(status | {"_repo": repo.full_name.lower(), "_sha": sha})
        return 201, status, {"Location": status["url"]}

    def _latest_statuses(self, repo: Repository, sha: str) -> list[dict[str, Any]]:
        latest: dict[str, dict[str, Any]] = {}
        for s in self.status_records:
            if s["_repo"] == repo.full_name.lower() and s["_sha"] == sha:
                latest[s["context"].lower()] = {k: v for k, v in s.items() if not k.startswith("_")}
        return list(latest.values())

    async def _op_repos__list_commit_statuses_for_ref(self, request: web.Request, record: RecordedRequest,
                                                      params: Mapping[str, Any]) -> Result:
        repo = self._repo_for(record, params)
        sha = self._resolve(repo, params["ref"])
        items = [{k: v for k, v in s.items() if not k.startswith("_")} for s in reversed(self.status_records)
                 if s["_repo"] == repo.full_name.lower() and s["_sha"] == sha]
        return self._page(request, record, items)

    async def _op_repos__get_combined_status_for_ref(self, request: web.Request, record: RecordedRequest,
                                                     params: Mapping[str, Any]) -> Result:
        repo = self._repo_for(record, params)
        sha = self._resolve(repo, params["ref"])
        statuses = self._latest_statuses(repo, sha)
        states = {s["state"] for s in statuses}
        if states & {"error", "failure"}:
            state = "failure"
        elif "pending" in states or not states:
            state = "pending"
        else:
            state = "success"
        for s in statuses:
            s.pop("creator", None)
        data = copy.deepcopy(self.api.examples["combined-commit-status"])
        data.update({"state": state, "statuses": statuses, "sha": sha, "total_count": len(statuses),
                     "repository": self._repo_json(repo) | {"language": None},
                     "commit_url": f"https://api.github.com/repos/{repo.full_name}/commits/{sha}",
                     "url": f"https://api.github.com/repos/{repo.full_name}/commits/{sha}/status"})
        data["repository"] = {k: data["repository"][k] for k in
                              self.api.examples["combined-commit-status"]["repository"]}
        return 200, data, {}
