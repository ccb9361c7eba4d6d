"""A small client for GitHub's REST API, acting as a GitHub App installation.

Public API (everything else is internal)::

    client = GitHubClient(session, api_url="https://api.github.com", auth=AppAuth(app_id, key))
    client = GitHubClient.from_config(config.github, session)      # reads the private key file

    await client.get(path, *, params=None, installation=None) -> Any         # decoded JSON
    await client.post(path, json=None, *, installation=None) -> Any          # also patch, put
    await client.delete(path, *, installation=None) -> Any
    async for item in client.paginate(path, *, params=None, key=None, installation=None): ...
    await client.request(method, path, *, params=None, json=None, installation=None,
                         app=False) -> GitHubResponse                        # status, headers, data
    client.rate_limit(installation) -> RateLimit | None                     # last headers seen
    api_path("/repos/{owner}/{repo}/contents/{path}", owner=..., repo=..., path=...) -> str

``path`` is relative to ``api_url`` (``https://api.github.com`` or GitHub Enterprise Server's
``https://HOST/api/v3``) and already expanded (``api_path`` percent-encodes the values). Whose token
is used follows from the path: ``/repos/{owner}/{repo}/...`` uses that repository's installation,
``/orgs/{org}/...`` the organisation's (both looked up once with the app JWT), ``app=True`` the
app JWT itself; ``installation=ID`` (from a webhook payload) overrides.

Errors: ``GitHubHTTPError`` (a 4xx/5xx GitHub will not get over; ``.status``, ``.message``,
``.errors``, and the message names the request and GitHub's words), ``GitHubRateLimited`` (the
limit resets later than ``max_wait``), ``GitHubUnavailable`` (no answer after the retries),
``GitHubAuthError`` (from ``appauth``). All are ``HpcRunnerError``.

What it does for the caller, following GitHub's own guidance for REST clients (best practices, rate limits):

* sends ``Accept: application/vnd.github+json``, ``X-GitHub-Api-Version: 2022-11-28`` and a
  ``User-Agent``;
* primary rate limit: remembers ``x-ratelimit-*`` per token and, once ``remaining`` is 0, waits
  until ``reset`` instead of sending; a 403/429 with ``remaining: 0`` is waited out the same way;
* secondary rate limit: honours ``retry-after``; without one waits a minute, doubling each time;
* mutating requests go one at a time per client, at least ``write_spacing`` (1 s) apart;
* 5xx answers and lost connections are retried with exponential backoff (a POST only on 502, 503
  and 504, which mean it was not processed);
* GETs are conditional: the last ``ETag`` is sent as ``If-None-Match`` and a ``304`` (free of
  rate limit) returns the cached body;
* an installation token that GitHub answers 401 to is replaced once, then the error stands.

Time comes from an injectable ``Clock`` (``time()`` in epoch seconds, ``async sleep()``), so tests
run hours of rate-limit waits in no time.
"""

from __future__ import annotations

import asyncio
import copy
import json as jsonlib
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Protocol
from urllib.parse import quote, urlencode, urlsplit

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from runner import __version__
from runner.config import GithubConfig
from runner.errors import HpcRunnerError
from runner.logging_setup import get_logger
from runner.metrics import ci_call
from runner.sources.github.appauth import AppAuth, load_private_key

log = get_logger(__name__)

API_VERSION = "2022-11-28"
MEDIA_TYPE = "application/vnd.github+json"
USER_AGENT = f"hpc-runner/{__version__}"
MUTATING = frozenset({"POST", "PATCH", "PUT", "DELETE"})
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "PATCH", "DELETE"})
# A 5xx that says the request never reached the application, so even a POST may be repeated.
NOT_PROCESSED = frozenset({502, 503, 504})


# ------------------------------------------------------------------------------------ errors


class GitHubError(HpcRunnerError):
    """A GitHub API call that failed for good."""


class GitHubHTTPError(GitHubError):
    def __init__(self, method: str, path: str, status: int, message: str, *,
                 documentation_url: str | None = None, errors: list[Any] | None = None) -> None:
        self.method = method
        self.path = path
        self.status = status
        self.message = message
        self.documentation_url = documentation_url
        self.errors = errors or []
        detail = message
        for item in self.errors:
            if isinstance(item, Mapping):
                words = item.get("message") or item.get("code")
                where = ".".join(str(item[k]) for k in ("resource", "field") if item.get(k))
                detail += f"; {words}" + (f" ({where})" if where else "")
            else:
                detail += f"; {item}"
        super().__init__(f"GitHub {method} {path}: {status} {detail}")


class GitHubRateLimited(GitHubHTTPError):
    """GitHub's rate limit for this token resets at ``reset_at``, later than the client waits."""

    def __init__(self, method: str, path: str, status: int, message: str, *, reset_at: float) -> None:
        self.reset_at = reset_at
        super().__init__(method, path, status, message)


class GitHubUnavailable(GitHubError):
    """No usable answer: connection failures or timeouts, after the retries."""


# ------------------------------------------------------------------------------------ pure core


@dataclass(frozen=True)
class RateLimit:
    limit: int
    remaining: int
    used: int
    reset: float          # epoch seconds
    resource: str

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> RateLimit | None:
        try:
            return cls(limit=int(headers["x-ratelimit-limit"]),
                       remaining=int(headers["x-ratelimit-remaining"]),
                       used=int(headers.get("x-ratelimit-used", "0")),
                       reset=float(headers["x-ratelimit-reset"]),
                       resource=headers.get("x-ratelimit-resource", "core"))
        except (KeyError, ValueError):
            return None


def api_path(template: str, **values: str | int) -> str:
    """``template`` with each ``{name}`` replaced by its percent-encoded value; only ``path``
    (a file path in the repository) keeps its slashes."""
    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise KeyError(f"{template}: no value for {{{name}}}")
        return quote(str(values[name]), safe="/" if name == "path" else "")
    return re.sub(r"\{(\w+)\}", fill, template)


def auth_target(path: str) -> tuple[str, str] | None:
    """Whose installation a path needs: ``("repo", "o/r")``, ``("org", "o")`` or None."""
    parts = urlsplit(path).path.split("/")
    if len(parts) >= 4 and parts[1] == "repos" and parts[2] and parts[3]:
        return "repo", f"{parts[2]}/{parts[3]}"
    if len(parts) >= 3 and parts[1] == "orgs" and parts[2]:
        return "org", parts[2]
    return None


def retry_delay(method: str, status: int, headers: Mapping[str, str], message: str, attempt: int,
                now: float) -> float | None:
    """Seconds to wait before sending the request again, or None: the answer stands.

    ``attempt`` counts the retries already made (0 on the first answer).
    """
    if status in (403, 429):
        retry_after = headers.get("retry-after")
        if retry_after is not None:
            seconds = _retry_after_seconds(retry_after, now)
            if seconds is not None:
                return seconds
        limit = RateLimit.from_headers(headers)
        if limit is not None and limit.remaining == 0:
            return max(limit.reset - now, 0.0) + 1.0
        if status == 429 or "secondary rate limit" in message.lower():
            return 60.0 * 2.0 ** attempt
        return None  # a plain "forbidden"
    if status >= 500 and (method in IDEMPOTENT or status in NOT_PROCESSED):
        return float(min(2 ** attempt, 32))
    return None


def _retry_after_seconds(value: str, now: float) -> float | None:
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(parsedate_to_datetime(value).timestamp() - now, 0.0)
    except (TypeError, ValueError):
        return None


def next_link(header: str | None) -> str | None:
    """The ``rel="next"`` URL of a ``Link`` header."""
    if not header:
        return None
    for part in header.split(","):
        match = re.match(r'\s*<([^>]*)>\s*;(.*)', part)
        if match and re.search(r'rel="?([^";]*\s)?next(\s[^";]*)?"?', match.group(2)):
            return match.group(1)
    return None


def error_fields(body: Any) -> tuple[str, str | None, list[Any]]:
    """GitHub's message, documentation URL and ``errors`` list from an error body."""
    if isinstance(body, Mapping):
        errors = body.get("errors")
        return (str(body.get("message") or "(no message)"), body.get("documentation_url"),
                list(errors) if isinstance(errors, list) else [])
    text = str(body or "").strip()
    return (text[:300] or "(empty answer)"), None, []


# ------------------------------------------------------------------------------------ I/O


class Clock(Protocol):
    def time(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


@dataclass(frozen=True)
class GitHubResponse:
    status: int
    headers: CIMultiDictProxy[str]
    data: Any
    from_cache: bool = False   # a 304: ``data`` is the body of the earlier answer


@dataclass
class _Cached:
    etag: str
    response: GitHubResponse


class GitHubClient:
    """GitHub's REST API for one GitHub App; share one per agent (see the module docstring)."""

    def __init__(self, session: aiohttp.ClientSession, *, api_url: str, auth: AppAuth,
                 clock: Clock | None = None, user_agent: str = USER_AGENT, api_version: str = API_VERSION,
                 write_spacing: float = 1.0, max_retries: int = 4, max_wait: float = 3600.0,
                 timeout: float = 30.0, etag_cache_size: int = 512) -> None:
        self._session = session
        self._base = api_url.rstrip("/")
        self._auth = auth
        self._clock: Clock = clock or SystemClock()
        self._headers = {"Accept": MEDIA_TYPE, "X-GitHub-Api-Version": api_version, "User-Agent": user_agent}
        self._write_spacing = write_spacing
        self._max_retries = max_retries
        self._max_wait = max_wait
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._etags: OrderedDict[tuple[str, str], _Cached] = OrderedDict()
        self._etag_cache_size = etag_cache_size
        self._limits: dict[str, RateLimit] = {}
        self._write_lock = asyncio.Lock()
        self._last_write: float | None = None

    @classmethod
    def from_config(cls, config: GithubConfig, session: aiohttp.ClientSession,
                    **options: Any) -> GitHubClient:
        auth = AppAuth(config.app_id, load_private_key(config.private_key_file))
        return cls(session, api_url=config.api_url, auth=auth, **options)

    @property
    def api_url(self) -> str:
        return self._base

    # ---------------------------------------------------------------------------- verbs

    async def get(self, path: str, *, params: Mapping[str, str | int] | None = None,
                  installation: int | None = None) -> Any:
        return (await self.request("GET", path, params=params, installation=installation)).data

    async def post(self, path: str, json: Any = None, *, installation: int | None = None) -> Any:
        return (await self.request("POST", path, json=json, installation=installation)).data

    async def patch(self, path: str, json: Any = None, *, installation: int | None = None) -> Any:
        return (await self.request("PATCH", path, json=json, installation=installation)).data

    async def put(self, path: str, json: Any = None, *, installation: int | None = None) -> Any:
        return (await self.request("PUT", path, json=json, installation=installation)).data

    async def delete(self, path: str, *, installation: int | None = None) -> Any:
        return (await self.request("DELETE", path, installation=installation)).data

    async def paginate(self, path: str, *, params: Mapping[str, str | int] | None = None,
                       key: str | None = None, installation: int | None = None) -> AsyncIterator[Any]:
        """Every item of a list endpoint, page by page (``per_page=100``) along ``Link: next``.

        ``key`` names the list inside an object answer (``check_runs`` of
        ``GET /repos/{o}/{r}/commits/{ref}/check-runs``)."""
        query = {"per_page": 100, **(params or {})}
        response = await self.request("GET", path, params=query, installation=installation)
        while True:
            items = response.data[key] if key is not None else response.data
            if not isinstance(items, list):
                raise GitHubError(f"GitHub GET {path}: expected a list{f' in {key!r}' if key else ''}")
            for item in items:
                yield item
            following = next_link(response.headers.get("Link"))
            if following is None:
                return
            if not following.startswith(self._base + "/"):
                # The token must never travel to another host, whatever a header says.
                raise GitHubError(f"GitHub GET {path}: the next page {following} is outside {self._base}")
            response = await self.request("GET", following[len(self._base):], installation=installation)

    def rate_limit(self, installation: int | None = None) -> RateLimit | None:
        """The rate limit GitHub last reported for an installation's token (None: the app JWT)."""
        return self._limits.get(_bucket(installation))

    async def app_request(self, method: str, path: str) -> Any:
        """A call authenticated as the app itself (its JWT); what ``AppAuth`` uses."""
        return (await self.request(method, path, app=True)).data

    # ---------------------------------------------------------------------------- core

    async def request(self, method: str, path: str, *, params: Mapping[str, str | int] | None = None,
                      json: Any = None, installation: int | None = None, app: bool = False) -> GitHubResponse:
        method = method.upper()
        if not path.startswith("/"):
            raise ValueError(f"{path!r}: paths are relative to the API URL and start with /")
        if params:
            path += ("&" if "?" in path else "?") + urlencode(
                [(k, str(v)) for k, v in params.items()], quote_via=quote, safe=",")
        body = None if json is None else jsonlib.dumps(json, ensure_ascii=False).encode()
        if app:
            return await self._send(method, path, body, None, self._auth.jwt(self._clock.time()))
        if installation is None:
            installation = await self._installation_for(path)
        for refreshed in (False, True):
            # Wait out an exhausted limit before taking a token, which might not outlive the wait.
            await self._respect_primary_limit(method, path, _bucket(installation))
            token = await self._auth.token(self, installation, self._clock.time())
            try:
                return await self._send(method, path, body, installation, token)
            except GitHubHTTPError as exc:
                if exc.status != 401 or refreshed:
                    raise
                log.warning("github.token.rejected", installation=installation, method=method,
                            path=_loggable(path))
                self._auth.invalidate(installation, token)
        raise AssertionError("unreachable")

    async def _installation_for(self, path: str) -> int:
        target = auth_target(path)
        if target is None:
            raise ValueError(f"{path}: say which installation (installation=...) or app=True")
        kind, name = target
        if kind == "repo":
            return await self._auth.installation_for(self, repo=name)
        return await self._auth.installation_for(self, org=name)

    async def _send(self, method: str, path: str, body: bytes | None, installation: int | None,
                    credential: str) -> GitHubResponse:
        if method in MUTATING:
            async with self._write_lock:
                try:
                    return await self._attempts(method, path, body, installation, credential)
                finally:
                    self._last_write = self._clock.time()
        return await self._attempts(method, path, body, installation, credential)

    async def _attempts(self, method: str, path: str, body: bytes | None, installation: int | None,
                        credential: str) -> GitHubResponse:
        bucket = _bucket(installation)
        attempt = 0
        while True:
            await self._respect_primary_limit(method, path, bucket)
            if method in MUTATING and self._last_write is not None:
                gap = self._last_write + self._write_spacing - self._clock.time()
                if gap > 0:
                    await self._clock.sleep(gap)
            try:
                response = await self._exchange(method, path, body, bucket, credential)
                ci_call("github", method, path, response.status)
            except (aiohttp.ClientError, TimeoutError) as exc:
                ci_call("github", method, path, None)
                if method not in IDEMPOTENT or attempt >= self._max_retries:
                    raise GitHubUnavailable(f"GitHub {method} {_loggable(path)}: no answer "
                                            f"({type(exc).__name__}: {exc}) after {attempt + 1} attempt(s)") \
                        from None
                backoff = float(min(2 ** attempt, 32))
                log.warning("github.retry", method=method, path=_loggable(path), error=type(exc).__name__,
                            delay=backoff)
                await self._clock.sleep(backoff)
                attempt += 1
                continue
            if response.status < 400:
                return response
            message, docs, errors = error_fields(response.data)
            delay = retry_delay(method, response.status, response.headers, message, attempt,
                                self._clock.time())
            if delay is None or attempt >= self._max_retries:
                raise GitHubHTTPError(method, _loggable(path), response.status, message,
                                      documentation_url=docs, errors=errors)
            if delay > self._max_wait:
                raise GitHubRateLimited(method, _loggable(path), response.status,
                                        f"{message} (retry in {delay:.0f} s, longer than the "
                                        f"{self._max_wait:.0f} s this client waits)",
                                        reset_at=self._clock.time() + delay)
            log.warning("github.retry", method=method, path=_loggable(path), status=response.status,
                        message=message[:200], delay=delay)
            await self._clock.sleep(delay)
            attempt += 1

    async def _respect_primary_limit(self, method: str, path: str, bucket: str) -> None:
        limit = self._limits.get(bucket)
        if limit is None or limit.remaining > 0:
            return
        wait = limit.reset - self._clock.time()
        if wait <= 0:
            return
        if wait > self._max_wait:
            raise GitHubRateLimited(method, _loggable(path), 403,
                                    f"rate limit exhausted until {limit.reset:.0f} (in {wait:.0f} s)",
                                    reset_at=limit.reset)
        log.warning("github.rate_limit.wait", bucket=bucket, seconds=round(wait, 1))
        await self._clock.sleep(wait + 1.0)

    async def _exchange(self, method: str, path: str, body: bytes | None, bucket: str,
                        credential: str) -> GitHubResponse:
        headers = dict(self._headers)
        headers["Authorization"] = f"Bearer {credential}"
        if body is not None:
            headers["Content-Type"] = "application/json"
        cache_key = (bucket, path)
        cached = self._etags.get(cache_key) if method == "GET" else None
        if cached is not None:
            headers["If-None-Match"] = cached.etag
        url = URL(self._base + path, encoded=True)
        async with self._session.request(method, url, data=body, headers=headers, timeout=self._timeout,
                                         allow_redirects=method == "GET") as raw:
            payload = await raw.read()
            status = raw.status
            answer_headers = CIMultiDictProxy(CIMultiDict(raw.headers))
        limit = RateLimit.from_headers(answer_headers)
        if limit is not None:
            self._limits[bucket] = limit
        if status == 304 and cached is not None:
            self._etags.move_to_end(cache_key)
            # A copy: a caller that edits its answer must not edit the cache.
            return GitHubResponse(200, answer_headers, copy.deepcopy(cached.response.data), from_cache=True)
        response = GitHubResponse(status, answer_headers, _decode(payload, answer_headers))
        etag = answer_headers.get("ETag")
        if method == "GET" and status == 200 and etag:
            self._etags[cache_key] = _Cached(etag, response)
            self._etags.move_to_end(cache_key)
            while len(self._etags) > self._etag_cache_size:
                self._etags.popitem(last=False)
        return response


def _bucket(installation: int | None) -> str:
    return "app" if installation is None else f"installation:{installation}"


def _decode(payload: bytes, headers: Mapping[str, str]) -> Any:
    if not payload:
        return None
    if "json" in headers.get("Content-Type", ""):
        try:
            return jsonlib.loads(payload)
        except ValueError:
            pass
    return payload.decode("utf-8", "replace")


def _loggable(path: str) -> str:
    return path if len(path) <= 200 else path[:200] + "..."
