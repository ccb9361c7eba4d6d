"""Tests of the GitHub REST emulator itself, driven by a plain aiohttp client."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from .github_api import GitHubEmulator, ManualClock
from .openapi_validator import OpenApiValidationError

REPO = "CliMA/ClimaAtmos.jl"
HEADERS = {"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": "2022-11-28",
           "User-Agent": "emulator-test"}


@pytest.fixture
async def gh(clock: ManualClock) -> AsyncIterator[GitHubEmulator]:
    async with GitHubEmulator(clock=clock.time) as emulator:
        emulator.add_repository(REPO, files={".hpc-runner.toml": "[[jobs]]\nname = 'x'\n"})
        yield emulator


async def call(http: aiohttp.ClientSession, gh: GitHubEmulator, method: str, path: str,
               credential: str | None, *, body: Any = None, headers: dict[str, str] | None = None,
               ) -> tuple[int, Any, aiohttp.ClientResponse]:
    hdrs = dict(HEADERS if headers is None else headers)
    if credential is not None:
        hdrs["Authorization"] = f"Bearer {credential}"
    data = None
    if body is not None:
        hdrs["Content-Type"] = "application/json"
        data = json.dumps(body).encode()
    async with http.request(method, gh.url + path, data=data, headers=hdrs) as resp:
        raw = await resp.read()
        return resp.status, (json.loads(raw) if raw else None), resp


async def token(http: aiohttp.ClientSession, gh: GitHubEmulator, installation: int = 1) -> str:
    status, body, _ = await call(http, gh, "POST", f"/app/installations/{installation}/access_tokens",
                                 gh.app_jwt())
    assert status == 201, body
    return str(body["token"])


# ------------------------------------------------------------------------------ validity


async def test_an_invalid_request_is_answered_422_and_fails_the_test_at_close(
        http: aiohttp.ClientSession, clock: ManualClock) -> None:
    emulator = GitHubEmulator(clock=clock.time)
    await emulator.start()
    emulator.add_repository(REPO)
    tok = emulator.installation_token()
    sha = emulator.repository(REPO).branches["main"]
    status, body, _ = await call(http, emulator, "POST", f"/repos/{REPO}/check-runs", tok,
                                 body={"name": "hpc", "head_sha": sha, "conclusion": "passed"})
    assert status == 422
    assert "checks/create" in body["message"] and "body.conclusion" in body["message"]
    assert emulator.requests("checks/create")[0].violation
    with pytest.raises(OpenApiValidationError, match=r"body\.conclusion: enum"):
        await emulator.close()


async def test_taken_violations_no_longer_fail_the_test(http: aiohttp.ClientSession,
                                                        gh: GitHubEmulator) -> None:
    status, body, _ = await call(http, gh, "GET", f"/repos/{REPO}/no-such-thing", gh.installation_token())
    assert (status, body["message"]) == (404, "Not Found")
    taken = gh.take_violations()
    assert len(taken) == 1 and "is no operation" in str(taken[0].violation)
    gh.assert_all_valid()


async def test_missing_user_agent_and_unknown_api_version_are_refused(
        http: aiohttp.ClientSession, gh: GitHubEmulator) -> None:
    async with aiohttp.ClientSession(skip_auto_headers=["User-Agent"]) as bare:
        hdrs = {k: v for k, v in HEADERS.items() if k != "User-Agent"}
        status, body, _ = await call(bare, gh, "GET", "/app", gh.app_jwt(), headers=hdrs)
    assert status == 403 and "User-Agent" in body["message"]
    status, body, _ = await call(http, gh, "GET", "/app", gh.app_jwt(),
                                 headers={**HEADERS, "X-GitHub-Api-Version": "2021-01-01"})
    assert status == 400 and "2021-01-01" in body["message"]
    status, _, _ = await call(http, gh, "GET", "/app", gh.app_jwt(), headers={"User-Agent": "x"})
    assert status == 200  # GitHub answers, but the missing headers are a client bug here
    assert [r.violation for r in gh.take_violations()] == [
        "no User-Agent header", "unsupported X-GitHub-Api-Version 2021-01-01",
        "no X-GitHub-Api-Version header; Accept is '*/*', not application/vnd.github+json"]


async def test_every_answer_of_a_tour_matches_the_response_schemas(
        http: aiohttp.ClientSession, gh: GitHubEmulator) -> None:
    pr = gh.add_pull_request(REPO, labels=["run-hpc"])
    gh.add_pull_request(REPO, fork="mallory/ClimaAtmos.jl")
    gh.add_comment(REPO, pr.number, "/hpc-runner run", user="bob")
    gh.add_team_member("CliMA", "core", "bob")
    tok = await token(http, gh)
    r = f"/repos/{REPO}"
    for path in [r, f"{r}/pulls", f"{r}/pulls/1", f"{r}/pulls/2", f"{r}/issues/1/comments",
                 f"{r}/issues/1/labels",
                 f"{r}/collaborators/bob/permission", "/orgs/CliMA/teams/core/memberships/bob",
                 f"{r}/contents/.hpc-runner.toml", f"{r}/branches/main", f"{r}/git/ref/heads/main",
                 f"{r}/commits/main", f"{r}/commits/{pr.head_sha}/check-runs", f"{r}/commits/main/status",
                 f"{r}/commits/main/statuses", "/rate_limit"]:
        status, body, _ = await call(http, gh, "GET", path, tok)
        assert status == 200, (path, body)
    status, run, _ = await call(http, gh, "POST", f"{r}/check-runs", tok,
                                body={"name": "hpc", "head_sha": pr.head_sha})
    assert status == 201
    status, _, _ = await call(http, gh, "PATCH", f"{r}/check-runs/{run['id']}", tok,
                              body={"conclusion": "success", "output": {"title": "t", "summary": "s"}})
    assert status == 200
    status, _, _ = await call(http, gh, "POST", f"{r}/statuses/{pr.head_sha}", tok, body={"state": "pending"})
    assert status == 201
    status, _, _ = await call(http, gh, "POST", f"{r}/issues/1/comments", tok, body={"body": "started"})
    assert status == 201
    status, _, _ = await call(http, gh, "DELETE", f"{r}/issues/1/labels/run-hpc", tok)
    assert status == 200
    assert gh.response_violations == []
    assert gh.count("pulls/get") == 2 and gh.counts()["checks/create"] == 1


# ------------------------------------------------------------------------------ app authentication


async def test_the_app_jwt_opens_app_endpoints_only(http: aiohttp.ClientSession, gh: GitHubEmulator) -> None:
    status, body, _ = await call(http, gh, "GET", f"/repos/{REPO}/installation", gh.app_jwt())
    assert (status, body["id"], body["app_id"]) == (200, 1, gh.app_id)
    status, body, _ = await call(http, gh, "GET", f"/repos/{REPO}/pulls", gh.app_jwt())
    assert (status, body["message"]) == (403, "Resource not accessible by integration")
    status, body, _ = await call(http, gh, "GET", f"/repos/{REPO}/installation", gh.installation_token())
    assert status == 401


@pytest.mark.parametrize(("claims", "message"), [
    ({"exp_after_iat": 601}, "'Expiration time' claim ('exp') is too far in the future"),
    ({"iat": 120, "exp_after_iat": 300}, "'Issued at' claim ('iat')"),
    ({"iat": -1000, "exp_after_iat": 600}, "'Expiration time' claim ('exp') must be a numeric value"),
    ({"iss": "999"}, "'Issuer' claim ('iss')"),
    ({"iss": ""}, "'Issuer' claim ('iss')"),
    ({"foreign_key": True}, "A JSON web token could not be decoded"),
])
async def test_jwts_that_github_refuses(http: aiohttp.ClientSession, gh: GitHubEmulator, clock: ManualClock,
                                        claims: dict[str, Any], message: str) -> None:
    iat = clock.now + claims.get("iat", -60)
    key = None
    if claims.get("foreign_key"):
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwt = gh.app_jwt(iat=iat, exp=iat + claims.get("exp_after_iat", 600), iss=claims.get("iss"), key=key)
    status, body, _ = await call(http, gh, "GET", "/app", jwt)
    assert status == 401 and message in body["message"]


async def test_a_jwt_with_a_little_clock_skew_is_accepted(http: aiohttp.ClientSession, gh: GitHubEmulator,
                                                          clock: ManualClock) -> None:
    jwt = gh.app_jwt(iat=clock.now + 30, exp=clock.now + 570)
    status, _, _ = await call(http, gh, "GET", "/app", jwt)
    assert status == 200


async def test_installation_tokens_are_long_opaque_and_expire(http: aiohttp.ClientSession, gh: GitHubEmulator,
                                                              clock: ManualClock) -> None:
    status, body, _ = await call(http, gh, "POST", "/app/installations/1/access_tokens", gh.app_jwt())
    assert status == 201 and body["token"].startswith("ghs_") and len(body["token"]) > 400
    assert body["expires_at"].endswith("Z")
    tok = body["token"]
    assert (await call(http, gh, "GET", f"/repos/{REPO}/pulls", tok))[0] == 200
    clock.advance(3600)
    status, body, _ = await call(http, gh, "GET", f"/repos/{REPO}/pulls", tok)
    assert (status, body["message"]) == (401, "Bad credentials")
    tok = await token(http, gh)
    gh.expire_tokens()
    assert (await call(http, gh, "GET", f"/repos/{REPO}/pulls", tok))[0] == 401
    status, _, _ = await call(http, gh, "POST", "/app/installations/77/access_tokens", gh.app_jwt())
    assert status == 404


async def test_a_token_sees_only_its_installation_s_private_repositories(
        http: aiohttp.ClientSession, gh: GitHubEmulator) -> None:
    gh.add_repository("other/secret", installation=2, private=True)
    status, _, _ = await call(http, gh, "GET", "/repos/other/secret/pulls", gh.installation_token(1))
    assert status == 404
    status, _, _ = await call(http, gh, "GET", "/repos/other/secret/pulls", gh.installation_token(2))
    assert status == 200


# ------------------------------------------------------------------------------ repository state


async def test_pull_requests_forks_labels_and_pushes(http: aiohttp.ClientSession, gh: GitHubEmulator) -> None:
    own = gh.add_pull_request(REPO, head_ref="topic", labels=["run-hpc"], author="alice")
    fork = gh.add_pull_request(REPO, fork="mallory/ClimaAtmos.jl", head_ref="main", author="mallory")
    tok = gh.installation_token()
    _, body, _ = await call(http, gh, "GET", f"/repos/{REPO}/pulls/{own.number}", tok)
    assert body["head"]["sha"] == own.head_sha and body["head"]["repo"]["full_name"] == REPO
    assert [label["name"] for label in body["labels"]] == ["run-hpc"]
    _, body, _ = await call(http, gh, "GET", f"/repos/{REPO}/pulls/{fork.number}", tok)
    assert body["head"]["repo"]["full_name"] == "mallory/ClimaAtmos.jl" and body["head"]["repo"]["fork"]
    assert body["base"]["repo"]["full_name"] == REPO and body["user"]["login"] == "mallory"
    new_sha = gh.update_pull_request(REPO, own.number)
    _, body, _ = await call(http, gh, "GET", f"/repos/{REPO}/pulls/{own.number}", tok)
    assert body["head"]["sha"] == new_sha != own.number
    before = gh.repository(REPO).branches["main"]
    after = gh.push(REPO, "main", {"src/a.jl": "x = 1\n"})
    _, body, _ = await call(http, gh, "GET", f"/repos/{REPO}/branches/main", tok)
    assert body["commit"]["sha"] == after != before
    assert body["commit"]["parents"][0]["sha"] == before


async def test_contents_are_base64_at_the_requested_ref(http: aiohttp.ClientSession,
                                                        gh: GitHubEmulator) -> None:
    old = gh.repository(REPO).branches["main"]
    gh.set_file(REPO, ".hpc-runner.toml", "[[jobs]]\nname = 'new'\n")
    tok = gh.installation_token()
    for ref, expected in ((old, "name = 'x'"), ("main", "name = 'new'")):
        path = f"/repos/{REPO}/contents/.hpc-runner.toml?ref={ref}"
        status, body, _ = await call(http, gh, "GET", path, tok)
        assert status == 200 and body["encoding"] == "base64"
        assert expected in base64.b64decode(body["content"]).decode()
    status, _, _ = await call(http, gh, "GET", f"/repos/{REPO}/contents/missing.toml", tok)
    assert status == 404


async def test_permissions_teams_and_comments(http: aiohttp.ClientSession, gh: GitHubEmulator) -> None:
    gh.set_permission(REPO, "bob", "maintain")
    gh.set_permission(REPO, "carol", "triage")
    gh.add_team_member("CliMA", "core", "bob", role="maintainer")
    pr = gh.add_pull_request(REPO)
    gh.add_comment(REPO, pr.number, "/hpc-runner run", user="bob")
    tok = gh.installation_token()
    _, body, _ = await call(http, gh, "GET", f"/repos/{REPO}/collaborators/bob/permission", tok)
    assert (body["permission"], body["role_name"]) == ("write", "maintain")
    _, body, _ = await call(http, gh, "GET", f"/repos/{REPO}/collaborators/carol/permission", tok)
    assert body["permission"] == "read"
    _, body, _ = await call(http, gh, "GET", "/orgs/CliMA/teams/core/memberships/bob", tok)
    assert (body["role"], body["state"]) == ("maintainer", "active")
    status, _, _ = await call(http, gh, "GET", "/orgs/CliMA/teams/core/memberships/carol", tok)
    assert status == 404
    _, body, _ = await call(http, gh, "GET", f"/repos/{REPO}/issues/{pr.number}/comments", tok)
    assert [(c["user"]["login"], c["body"]) for c in body] == [("bob", "/hpc-runner run")]


# ------------------------------------------------------------------------------ checks and statuses


async def test_check_runs_are_created_updated_and_listed(http: aiohttp.ClientSession,
                                                         gh: GitHubEmulator) -> None:
    pr = gh.add_pull_request(REPO)
    tok = gh.installation_token()
    r = f"/repos/{REPO}"
    _, run, _ = await call(http, gh, "POST", f"{r}/check-runs", tok,
                           body={"name": "hpc", "head_sha": pr.head_sha, "status": "in_progress",
                                 "external_id": "job-1"})
    assert run["status"] == "in_progress" and run["pull_requests"][0]["number"] == pr.number
    _, run, _ = await call(http, gh, "PATCH", f"{r}/check-runs/{run['id']}", tok,
                           body={"conclusion": "failure", "output": {"title": "t", "summary": "exit 1"}})
    assert (run["status"], run["conclusion"], run["output"]["summary"]) == ("completed", "failure", "exit 1")
    await call(http, gh, "POST", f"{r}/check-runs", tok, body={"name": "hpc", "head_sha": pr.head_sha})
    _, body, _ = await call(http, gh, "GET", f"{r}/commits/{pr.head_sha}/check-runs", tok)
    assert body["total_count"] == 1 and body["check_runs"][0]["status"] == "queued"  # latest per name
    _, body, _ = await call(http, gh, "GET", f"{r}/commits/{pr.head_sha}/check-runs?filter=all", tok)
    assert body["total_count"] == 2
    assert [c["conclusion"] for c in gh.check_runs(REPO)] == ["failure", None]


async def test_github_s_own_check_run_limits(http: aiohttp.ClientSession, gh: GitHubEmulator) -> None:
    sha = gh.repository(REPO).branches["main"]
    tok = gh.installation_token()
    url = f"/repos/{REPO}/check-runs"
    status, body, _ = await call(http, gh, "POST", url, tok, body={
        "name": "hpc", "head_sha": sha, "output": {"title": "t", "summary": "é" * 40000}})
    assert status == 422 and body["errors"][0]["message"] == "summary exceeds a maximum bytesize of 65535"
    status, body, _ = await call(http, gh, "POST", url, tok, body={"name": "hpc", "head_sha": sha,
                                                                   "status": "completed"})
    assert status == 422 and body["errors"][0]["field"] == "conclusion"
    status, body, _ = await call(http, gh, "POST", url, tok, body={"name": "hpc", "head_sha": "0" * 40})
    assert status == 422 and "No commit found" in body["errors"][0]["message"]
    status, body, _ = await call(http, gh, "POST", url, tok, body={"name": "hpc", "head_sha": sha,
                                                                   "conclusion": "stale"})
    assert status == 422
    gh.assert_all_valid()  # all of these were valid by the description: GitHub's rules refused them
    actions = [{"label": f"a{i}", "description": "d", "identifier": f"i{i}"} for i in range(4)]
    status, body, _ = await call(http, gh, "POST", url, tok, body={"name": "hpc", "head_sha": sha,
                                                                   "actions": actions})
    assert status == 422 and "maxItems 3" in body["message"]
    actions = [{"label": "l", "description": "d" * 41, "identifier": "i"}]
    status, body, _ = await call(http, gh, "POST", url, tok, body={"name": "hpc", "head_sha": sha,
                                                                   "actions": actions})
    assert status == 422 and "maxLength 40" in body["message"]
    status, body, _ = await call(http, gh, "POST", url, tok, body={
        "name": "hpc", "head_sha": sha, "output": {"title": "t", "summary": "s", "text": "x" * 65536}})
    assert status == 422 and "body.output.text" in body["message"]
    assert len(gh.take_violations()) == 3
    assert gh.check_runs() == []


async def test_checks_can_be_withheld_from_the_app_while_statuses_work(
        http: aiohttp.ClientSession, gh: GitHubEmulator) -> None:
    gh.forbid_checks(REPO)
    sha = gh.repository(REPO).branches["main"]
    tok = gh.installation_token()
    status, body, _ = await call(http, gh, "POST", f"/repos/{REPO}/check-runs", tok,
                                 body={"name": "hpc", "head_sha": sha})
    assert (status, body["message"]) == (403, "Resource not accessible by integration")
    pending = {"state": "pending", "context": "hpc-runner", "description": "queued"}
    status, body, resp = await call(http, gh, "POST", f"/repos/{REPO}/statuses/{sha}", tok, body=pending)
    assert status == 201 and resp.headers["Location"].endswith(sha)
    status, body, _ = await call(http, gh, "POST", f"/repos/{REPO}/statuses/{sha}", tok,
                                 body={"state": "success", "context": "hpc-runner", "description": "d" * 141})
    assert status == 422 and "maximum is 140 characters" in body["errors"][0]["message"]
    await call(http, gh, "POST", f"/repos/{REPO}/statuses/{sha}", tok,
               body={"state": "success", "context": "HPC-runner"})
    _, body, _ = await call(http, gh, "GET", f"/repos/{REPO}/commits/{sha}/status", tok)
    assert (body["state"], body["total_count"]) == ("success", 1)  # contexts are case-insensitive
    assert [s["state"] for s in gh.statuses(REPO, sha)] == ["pending", "success"]


# ------------------------------------------------------------------------------ rate limits and faults


async def test_rate_limit_headers_count_down_and_304_is_free(http: aiohttp.ClientSession, gh: GitHubEmulator,
                                                              clock: ManualClock) -> None:
    tok = gh.installation_token()
    status, _, resp = await call(http, gh, "GET", f"/repos/{REPO}/pulls", tok)
    assert status == 200
    for name in ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-used", "x-ratelimit-reset",
                 "x-ratelimit-resource"):
        assert name in resp.headers
    first = int(resp.headers["x-ratelimit-remaining"])
    etag = resp.headers["ETag"]
    status, body, resp = await call(http, gh, "GET", f"/repos/{REPO}/pulls", tok,
                                    headers={**HEADERS, "If-None-Match": etag})
    assert (status, body) == (304, None)
    assert int(resp.headers["x-ratelimit-remaining"]) == first
    gh.add_pull_request(REPO)
    status, _, resp = await call(http, gh, "GET", f"/repos/{REPO}/pulls", tok,
                                 headers={**HEADERS, "If-None-Match": etag})
    assert status == 200 and resp.headers["ETag"] != etag
    assert int(resp.headers["x-ratelimit-remaining"]) == first - 1
    # The 401 of a bad token carries the headers too.
    status, _, resp = await call(http, gh, "GET", f"/repos/{REPO}/pulls", "nonsense")
    assert status == 401 and "x-ratelimit-remaining" in resp.headers


async def test_an_exhausted_primary_limit_answers_until_reset(http: aiohttp.ClientSession, gh: GitHubEmulator,
                                                               clock: ManualClock) -> None:
    tok = gh.installation_token()
    gh.exhaust_rate_limit(1, reset_in=300)
    status, body, resp = await call(http, gh, "GET", f"/repos/{REPO}/pulls", tok)
    assert status == 403 and "API rate limit exceeded for installation ID 1" in body["message"]
    assert resp.headers["x-ratelimit-remaining"] == "0"
    assert int(resp.headers["x-ratelimit-reset"]) == int(clock.now + 300)
    gh.exhaust_rate_limit(1, reset_in=300, status=429)
    assert (await call(http, gh, "GET", f"/repos/{REPO}/pulls", tok))[0] == 429
    clock.advance(301)
    status, _, resp = await call(http, gh, "GET", f"/repos/{REPO}/pulls", tok)
    assert status == 200 and int(resp.headers["x-ratelimit-remaining"]) == 4999


async def test_secondary_limits_server_errors_and_slow_answers(http: aiohttp.ClientSession,
                                                               gh: GitHubEmulator) -> None:
    tok = gh.installation_token()
    sha = gh.repository(REPO).branches["main"]
    gh.secondary_rate_limit("checks/create", retry_after=30)
    status, body, resp = await call(http, gh, "POST", f"/repos/{REPO}/check-runs", tok,
                                    body={"name": "hpc", "head_sha": sha})
    assert status == 403 and "secondary rate limit" in body["message"] and resp.headers["retry-after"] == "30"
    gh.fail("checks/create", 502)
    assert (await call(http, gh, "POST", f"/repos/{REPO}/check-runs", tok,
                       body={"name": "hpc", "head_sha": sha}))[0] == 502
    assert gh.check_runs() == []
    gh.fail("checks/create", 500, processed=True)
    assert (await call(http, gh, "POST", f"/repos/{REPO}/check-runs", tok,
                       body={"name": "hpc", "head_sha": sha}))[0] == 500
    assert len(gh.check_runs()) == 1  # it happened although the answer said otherwise
    gh.delay("pulls/list", 0.3)
    with pytest.raises(TimeoutError):
        async with http.get(gh.url + f"/repos/{REPO}/pulls", timeout=aiohttp.ClientTimeout(total=0.1),
                            headers={**HEADERS, "Authorization": f"Bearer {tok}"}):
            pass
    assert [r.fault for r in gh.recorded[-4:]] == ["secondary", "status", "status", "delay"]


async def test_an_enterprise_server_prefix(http: aiohttp.ClientSession, clock: ManualClock) -> None:
    async with GitHubEmulator(prefix="/api/v3", clock=clock.time) as ghes:
        ghes.add_repository(REPO)
        assert ghes.url.endswith("/api/v3")
        status, _, _ = await call(http, ghes, "GET", f"/repos/{REPO}/pulls", ghes.installation_token())
        assert status == 200
        root = ghes.url.removesuffix("/api/v3")
        async with http.get(root + f"/repos/{REPO}/pulls", headers=HEADERS) as resp:
            assert resp.status == 404
        assert len(ghes.take_violations()) == 1
