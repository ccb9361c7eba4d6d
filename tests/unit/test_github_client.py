"""The GitHub REST client against the GitHub emulator: rate limits, retries, ETags, serial writes.

Every test's emulator checks each request against GitHub's OpenAPI description and fails the test
at teardown on any violation, so "every request valid" holds throughout. Time is a ``ManualClock``
shared by client and emulator: waits of minutes take none.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from fakes.github_api import GitHubEmulator, ManualClock

from runner.config import GithubConfig
from runner.secrets import SecretFileError
from runner.sources.github.appauth import AppAuth
from runner.sources.github.client import (
    GitHubClient,
    GitHubHTTPError,
    GitHubRateLimited,
    GitHubUnavailable,
    api_path,
    auth_target,
    next_link,
    retry_delay,
)

REPO = "CliMA/ClimaAtmos.jl"
R = f"/repos/{REPO}"


@pytest.fixture
async def gh(clock: ManualClock) -> AsyncIterator[GitHubEmulator]:
    async with GitHubEmulator(clock=clock.time) as emulator:
        emulator.add_repository(REPO)
        yield emulator


def make_client(gh: GitHubEmulator, http: aiohttp.ClientSession, clock: ManualClock,
                **options: float) -> GitHubClient:
    return GitHubClient(http, api_url=gh.url, auth=AppAuth(gh.app_id, gh.app_private_key_pem), clock=clock,
                        **options)  # type: ignore[arg-type]


@pytest.fixture
async def client(gh: GitHubEmulator, http: aiohttp.ClientSession, clock: ManualClock) -> GitHubClient:
    c = make_client(gh, http, clock)
    await c.get(R)  # installation and token in place, so tests count only their own calls
    clock.advance(1.0)  # and the token request (a POST) a second ago
    clock.sleeps.clear()
    return c


def check_run(gh: GitHubEmulator) -> dict[str, str]:
    return {"name": "hpc-runner", "head_sha": gh.repository(REPO).branches["main"]}


# ------------------------------------------------------------------------------ headers and errors


async def test_every_request_carries_github_s_headers(gh: GitHubEmulator, client: GitHubClient) -> None:
    await client.post(f"{R}/check-runs", json=check_run(gh))
    for request in gh.recorded:
        headers = {k.lower(): v for k, v in request.headers.items()}
        assert headers["accept"] == "application/vnd.github+json"
        assert headers["x-github-api-version"] == "2022-11-28"
        assert headers["user-agent"].startswith("hpc-runner/")
        assert headers["authorization"].startswith("Bearer ")


async def test_a_4xx_names_the_request_and_github_s_words(gh: GitHubEmulator, client: GitHubClient) -> None:
    body = check_run(gh) | {"output": {"title": "log", "summary": "é" * 40000}}
    with pytest.raises(GitHubHTTPError) as info:
        await client.post(f"{R}/check-runs", json=body)
    assert info.value.status == 422
    assert str(info.value) == (f"GitHub POST {R}/check-runs: 422 Validation Failed; "
                               "summary exceeds a maximum bytesize of 65535 (CheckRun.summary)")
    assert gh.count("checks/create") == 1   # a 422 is final: not retried
    with pytest.raises(GitHubHTTPError, match=f"GET {R}/pulls/99: 404 Not Found"):
        await client.get(f"{R}/pulls/99")


async def test_checks_withheld_from_the_app_is_a_403_to_fall_back_on(gh: GitHubEmulator,
                                                                       client: GitHubClient) -> None:
    gh.forbid_checks(REPO)
    with pytest.raises(GitHubHTTPError) as info:
        await client.post(f"{R}/check-runs", json=check_run(gh))
    assert (info.value.status, info.value.message) == (403, "Resource not accessible by integration")
    assert gh.count("checks/create") == 1
    sha = check_run(gh)["head_sha"]
    status = await client.post(f"{R}/statuses/{sha}", json={"state": "pending", "context": "hpc-runner"})
    assert status["state"] == "pending"


async def test_an_enterprise_server_api_url(http: aiohttp.ClientSession, clock: ManualClock) -> None:
    async with GitHubEmulator(prefix="/api/v3", clock=clock.time) as ghes:
        ghes.add_repository(REPO)
        client = make_client(ghes, http, clock)
        assert client.api_url.endswith("/api/v3")
        assert await client.get(f"{R}/pulls") == []
        assert all(r.path.startswith("/api/v3/") for r in ghes.recorded)


# ------------------------------------------------------------------------------ rate limits


async def test_a_secondary_limit_with_retry_after_is_waited_out(gh: GitHubEmulator, client: GitHubClient,
                                                                 clock: ManualClock) -> None:
    gh.secondary_rate_limit("checks/create", retry_after=30)
    run = await client.post(f"{R}/check-runs", json=check_run(gh))
    assert run["name"] == "hpc-runner"
    assert clock.sleeps == [30.0]
    assert [r.status for r in gh.requests("checks/create")] == [403, 201]
    assert len(gh.check_runs()) == 1


async def test_a_secondary_limit_without_retry_after_backs_off_from_a_minute(
        gh: GitHubEmulator, client: GitHubClient, clock: ManualClock) -> None:
    gh.secondary_rate_limit("pulls/list", retry_after=None, times=2)
    assert await client.get(f"{R}/pulls") == []
    assert clock.sleeps == [60.0, 120.0]


@pytest.mark.parametrize("status", [403, 429])
async def test_an_exhausted_primary_limit_is_waited_until_reset(gh: GitHubEmulator, client: GitHubClient,
                                                                 clock: ManualClock, status: int) -> None:
    gh.exhaust_rate_limit(1, reset_in=300, status=status)
    assert await client.get(f"{R}/pulls") == []
    assert [r.status for r in gh.requests("pulls/list")] == [status, 200]
    assert clock.sleeps == [301.0]


async def test_a_known_exhausted_limit_is_not_hammered(http: aiohttp.ClientSession,
                                                       clock: ManualClock) -> None:
    async with GitHubEmulator(clock=clock.time, rate_limit=4) as gh:
        gh.add_repository(REPO)
        client = make_client(gh, http, clock)
        started = clock.now
        for path in ("/pulls", "/branches/main", "/git/ref/heads/main", "/commits/main"):
            await client.get(R + path)
        limit = client.rate_limit(1)
        assert limit is not None and limit.remaining == 0 and limit.reset == int(started + 3600)
        assert await client.get(f"{R}/pulls") == []
        assert all(r.status in (200, 201, 304) for r in gh.recorded), "a request went into an exhausted limit"
        assert clock.sleeps == [3601.0]


async def test_a_reset_beyond_max_wait_is_an_error_not_a_hang(gh: GitHubEmulator,
                                                              http: aiohttp.ClientSession,
                                                              clock: ManualClock) -> None:
    client = make_client(gh, http, clock, max_wait=600)
    await client.get(R)
    gh.exhaust_rate_limit(1, reset_in=3000)
    with pytest.raises(GitHubRateLimited) as info:
        await client.get(f"{R}/pulls")
    assert info.value.reset_at == pytest.approx(clock.now + 3001)
    assert "API rate limit exceeded for installation ID 1" in str(info.value)
    with pytest.raises(GitHubRateLimited, match="rate limit exhausted until"):
        await client.get(f"{R}/pulls")
    assert gh.count("pulls/list") == 1   # the second call was refused without asking GitHub
    assert clock.sleeps == []


# ------------------------------------------------------------------------------ retries


async def test_server_errors_are_retried_with_backoff(gh: GitHubEmulator, client: GitHubClient,
                                                      clock: ManualClock) -> None:
    gh.fail("pulls/get", 502, times=3)
    gh.add_pull_request(REPO)
    pr = await client.get(f"{R}/pulls/1")
    assert pr["number"] == 1
    assert clock.sleeps == [1.0, 2.0, 4.0]
    gh.fail("pulls/get", 500, times=10)
    with pytest.raises(GitHubHTTPError, match=f"GET {R}/pulls/1: 500 Server Error"):
        await client.get(f"{R}/pulls/1")
    assert gh.count("pulls/get") == 4 + 5


async def test_a_post_is_repeated_only_when_github_did_not_process_it(gh: GitHubEmulator,
                                                                      client: GitHubClient) -> None:
    gh.fail("checks/create", 502)
    await client.post(f"{R}/check-runs", json=check_run(gh))
    assert len(gh.check_runs()) == 1
    gh.fail("checks/create", 500, processed=True)
    with pytest.raises(GitHubHTTPError, match="500"):
        await client.post(f"{R}/check-runs", json=check_run(gh))
    assert len(gh.check_runs()) == 2   # no duplicate from a blind retry
    assert gh.count("checks/create") == 3


async def test_a_slow_answer_is_retried_for_a_get(gh: GitHubEmulator, http: aiohttp.ClientSession,
                                                  clock: ManualClock) -> None:
    client = make_client(gh, http, clock, timeout=0.2)
    await client.get(R)
    gh.delay("pulls/list", 5.0)
    assert await client.get(f"{R}/pulls") == []
    assert gh.count("pulls/list") == 2
    gh.delay("checks/create", 5.0)
    with pytest.raises(GitHubUnavailable, match=r"POST .*check-runs: no answer"):
        await client.post(f"{R}/check-runs", json=check_run(gh))


# ------------------------------------------------------------------------------ etags, writes, pages


async def test_polling_gets_are_conditional_and_free(gh: GitHubEmulator, client: GitHubClient) -> None:
    gh.add_pull_request(REPO)
    first = await client.request("GET", f"{R}/pulls")
    remaining = client.rate_limit(1).remaining  # type: ignore[union-attr]
    again = await client.request("GET", f"{R}/pulls")
    assert again.from_cache and again.data == first.data
    assert gh.requests("pulls/list")[-1].headers["If-None-Match"] == first.headers["ETag"]
    assert client.rate_limit(1).remaining == remaining  # type: ignore[union-attr]
    gh.add_pull_request(REPO)
    fresh = await client.request("GET", f"{R}/pulls")
    assert not fresh.from_cache and len(fresh.data) == 2


async def test_writes_go_one_at_a_time_a_second_apart(http: aiohttp.ClientSession,
                                                      clock: ManualClock) -> None:
    async with GitHubEmulator(clock=clock.time, write_latency=0.02) as gh:
        gh.add_repository(REPO)
        pr = gh.add_pull_request(REPO)
        client = make_client(gh, http, clock)
        await client.get(R)
        await asyncio.gather(*(client.post(f"{R}/issues/{pr.number}/comments", json={"body": f"c{i}"})
                               for i in range(5)),
                             client.get(f"{R}/pulls"))
        assert gh.max_writes_in_flight == 1
        starts = [r.started for r in gh.requests("issues/create-comment")]
        assert all(later - earlier >= 1.0 for earlier, later in itertools.pairwise(starts))
        assert sorted(c["body"] for c in gh.comments(REPO, pr.number)) == [f"c{i}" for i in range(5)]


async def test_pages_are_followed(gh: GitHubEmulator, client: GitHubClient) -> None:
    pr = gh.add_pull_request(REPO)
    for i in range(150):
        gh.add_comment(REPO, pr.number, f"comment {i}")
    bodies = [c["body"] async for c in client.paginate(f"{R}/issues/{pr.number}/comments")]
    assert bodies == [f"comment {i}" for i in range(150)]
    assert [dict(r.query).get("page", "1") for r in gh.requests("issues/list-comments")] == ["1", "2"]
    sha = gh.repository(REPO).branches["main"]
    await client.post(f"{R}/check-runs", json=check_run(gh))
    runs = [r async for r in client.paginate(f"{R}/commits/{sha}/check-runs", key="check_runs")]
    assert [r["name"] for r in runs] == ["hpc-runner"]


# ------------------------------------------------------------------------------ the pure parts


def test_retry_decisions_follow_github_s_rules() -> None:
    limits = {"x-ratelimit-limit": "5000", "x-ratelimit-remaining": "0", "x-ratelimit-used": "5000",
              "x-ratelimit-reset": "1000", "x-ratelimit-resource": "core"}
    assert retry_delay("GET", 403, {"retry-after": "7"}, "secondary rate limit", 0, now=0) == 7
    assert retry_delay("GET", 403, limits, "API rate limit exceeded", 0, now=900) == 101
    assert retry_delay("GET", 429, {}, "", 2, now=0) == 240
    assert retry_delay("GET", 403, {}, "Resource not accessible by integration", 0, now=0) is None
    assert retry_delay("POST", 500, {}, "", 0, now=0) is None
    assert retry_delay("POST", 503, {}, "", 1, now=0) == 2
    assert retry_delay("PATCH", 500, {}, "", 0, now=0) == 1
    assert retry_delay("GET", 404, {}, "Not Found", 0, now=0) is None


def test_paths_and_links() -> None:
    assert api_path("/repos/{owner}/{repo}/contents/{path}", owner="o", repo="r", path="a b/c.toml") \
        == "/repos/o/r/contents/a%20b/c.toml"
    assert api_path("/repos/{owner}/{repo}/branches/{branch}", owner="o", repo="r", branch="feat/x") \
        == "/repos/o/r/branches/feat%2Fx"
    with pytest.raises(KeyError, match="repo"):
        api_path("/repos/{owner}/{repo}", owner="o")
    assert auth_target("/repos/o/r/pulls?state=open") == ("repo", "o/r")
    assert auth_target("/orgs/CliMA/teams/core/memberships/bob") == ("org", "CliMA")
    assert auth_target("/rate_limit") is None
    link = '<https://api.github.com/x?page=2>; rel="next", <https://api.github.com/x?page=5>; rel="last"'
    assert next_link(link) == "https://api.github.com/x?page=2"
    assert next_link('<https://api.github.com/x?page=1>; rel="prev"') is None
    assert next_link(None) is None


async def test_a_next_page_on_another_host_is_refused(gh: GitHubEmulator, client: GitHubClient,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    pr = gh.add_pull_request(REPO)
    for i in range(3):
        gh.add_comment(REPO, pr.number, f"c{i}")
    gh_page = gh._page

    def foreign(*args: object, **kwargs: object) -> object:
        status, items, _ = gh_page(*args, **kwargs)  # type: ignore[arg-type]
        return status, items, {"Link": '<https://evil.example/steal?page=2>; rel="next"'}

    monkeypatch.setattr(gh, "_page", foreign)
    with pytest.raises(Exception, match="outside"):
        _ = [c async for c in client.paginate(f"{R}/issues/{pr.number}/comments")]


async def test_a_client_from_the_agent_config(gh: GitHubEmulator, http: aiohttp.ClientSession,
                                              clock: ManualClock, tmp_path: Path) -> None:
    key_file = tmp_path / "github-app.pem"
    key_file.write_text(gh.app_private_key_pem)
    key_file.chmod(0o600)
    config = GithubConfig(app_id=gh.app_id, private_key_file=key_file, repositories=(REPO,), api_url=gh.url)
    client = GitHubClient.from_config(config, http, clock=clock)
    assert client.api_url == gh.url
    assert (await client.get(R))["full_name"] == REPO
    key_file.chmod(0o640)
    with pytest.raises(SecretFileError, match="0600"):
        GitHubClient.from_config(config, http)
