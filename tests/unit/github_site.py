"""A GitHub source wired to the GitHub emulator, a stand-in agent and a real git repository.

`github_site()` gives a `Site`: the emulator (`ActivityGitHub`, every request checked against
GitHub's OpenAPI description), the stand-in agent of `buildkite_host` (real policy engine and
store; jobs "run" by writing scripted output), the source under test, and a git repository whose
bare copy is the `clone_url` the emulator advertises, so checkouts are real.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
from conftest import TEST_IMAGE_NAME, git, toml_table
from fakes.github_activity import ActivityGitHub

from runner.config import GithubConfig
from runner.sources.github.appauth import AppAuth, load_private_key
from runner.sources.github.client import GitHubClient
from runner.sources.github.gateway_client import GatewayClient
from runner.sources.github.source import GithubSource
from runner.sources.github.state import GithubState

from .buildkite_host import FakeHost, host_policy

REPO = "CliMA/ClimaAtmos.jl"
FORK = "mallory/ClimaAtmos.jl"
LABEL = "run-hpc"
COMMAND = "/hpc-runner run"
JOBS = """# the cluster's jobs
[[jobs]]
name = "unit"
image = "test"
command = ["make", "test"]

[jobs.resources]
time = "5m"
"""
POLICY = host_policy(toml_table("[[grants]]", name="core-prs", principals=["github:team:CliMA/core"],
                                events=["pull_request", "push"], refs=["refs/pull/*", "refs/heads/main"],
                                forks=True, account="ci", images=[TEST_IMAGE_NAME]))


class GitRepo:
    """A work repository and the bare repository it publishes to (what `clone_url` names)."""

    def __init__(self, root: Path) -> None:
        self.work = root / "work"
        self.bare = root / "origin.git"
        self.work.mkdir(parents=True)
        git("init", "--quiet", "--initial-branch=main", cwd=self.work)
        git("init", "--quiet", "--bare", str(self.bare), cwd=root)

    def commit(self, files: Mapping[str, str], *, branch: str = "main", start: str | None = None) -> str:
        """A commit of `files` on `branch` (made from `start` when given), published; its SHA."""
        if self._has_commits():
            exists = bool(git("branch", "--list", branch, cwd=self.work).strip())
            git("checkout", "--quiet", "-B", branch, start or (branch if exists else "HEAD"), cwd=self.work)
        for name, text in files.items():
            path = self.work / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        git("add", "--all", cwd=self.work)
        git("commit", "--quiet", "--allow-empty", "-m", f"change {time.monotonic_ns()}", cwd=self.work)
        sha = git("rev-parse", "HEAD", cwd=self.work).strip()
        git("push", "--quiet", "--force", str(self.bare), f"{sha}:refs/heads/{branch}", cwd=self.work)
        return sha

    def publish_pull(self, number: int, sha: str) -> None:
        """What GitHub keeps for every pull request, forks included: `refs/pull/N/head`."""
        git("push", "--quiet", "--force", str(self.bare), f"{sha}:refs/pull/{number}/head", cwd=self.work)

    def _has_commits(self) -> bool:
        return subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=self.work,
                              capture_output=True).returncode == 0


@dataclass
class Site:
    gh: ActivityGitHub
    host: FakeHost
    state: GithubState
    source: GithubSource
    config: GithubConfig
    client: GitHubClient
    repo: GitRepo
    root: Path
    files: dict[str, str] = field(default_factory=dict)

    def main_files(self) -> dict[str, str]:
        return dict(self.files)

    def open_pull(self, *, author: str = "alice", fork: str | None = None, labelled_by: str | None = None,
                  extra: Mapping[str, str] | None = None) -> int:
        """A pull request whose head is a real commit; labelled with `LABEL` by `labelled_by`."""
        pr = self.gh.add_pull_request(REPO, author=author, fork=fork, head_ref=f"topic-{time.monotonic_ns()}")
        self.push_to_pull(pr.number, extra or {"src/change.txt": f"from {author}\n"}, start="main")
        if labelled_by is not None:
            self.gh.label(REPO, pr.number, LABEL, by=labelled_by)
        return pr.number

    def push_to_pull(self, number: int, files: Mapping[str, str], *, start: str | None = None) -> str:
        pr = self.gh.pull_request(REPO, number)
        tree = {**self.files, **files}
        sha = self.repo.commit(tree, branch=pr.head_ref, start=start)
        self.repo.publish_pull(number, sha)
        self.gh.point_pull_request(REPO, number, sha, tree)
        return sha

    def push_main(self, files: Mapping[str, str], *, author: str = "alice") -> str:
        self.files.update(files)
        sha = self.repo.commit(self.files, branch="main")
        self.gh.use_commit(REPO, "main", sha, self.files, author=author)
        return sha

    def later(self, seconds: float = 2.0) -> None:
        """GitHub's clock moves on: what happens next has later timestamps (they have whole seconds)."""
        clock = self.gh.clock
        self.gh.clock = lambda: clock() + seconds

    def check_runs(self, name: str | None = None, sha: str | None = None) -> list[dict[str, Any]]:
        return [run for run in self.gh.check_runs(REPO, sha) if name is None or run["name"] == name]

    def writes(self) -> int:
        return sum(1 for r in self.gh.recorded
                   if r.method in ("POST", "PATCH") and r.credential == "installation")

    async def poll(self) -> None:
        """One poll round, then every job it started run to its report."""
        await self.source.poll_once(REPO)
        await self.source.wait_idle()

    def restart(self, **options: Any) -> GithubSource:
        """A new source on the same state, as after a restart of the agent."""
        self.source = GithubSource(self.config, self.host, client=self.client, auth=self.source.auth,
                                   state=self.state, gateway=options.pop("gateway", None),
                                   update_interval=self.source.update_interval, retry_seconds=0.1, **options)
        return self.source


def github_config(gh: ActivityGitHub, key_file: Path, **overrides: Any) -> GithubConfig:
    config = GithubConfig(app_id=gh.app_id, private_key_file=key_file, repositories=(REPO,), api_url=gh.url,
                          trigger_label=LABEL, comment_command=COMMAND, push_branches=("main",),
                          poll_interval=5)
    return replace(config, **overrides)


@asynccontextmanager
async def github_site(tmp_path: Path, *, gateway: GatewayClient | None = None, update_interval: float = 0.2,
                      jobs: str = JOBS, policy: str = POLICY, max_retries: int = 4,
                      **config: Any) -> AsyncIterator[Site]:
    async with ActivityGitHub() as gh, aiohttp.ClientSession() as session:
        tmp_path.mkdir(parents=True, exist_ok=True)
        key_file = tmp_path / "github-app.pem"
        key_file.write_text(gh.app_private_key_pem)
        key_file.chmod(0o600)
        repo = GitRepo(tmp_path / "git")
        gh.add_repository(REPO, installation=1)
        gh.clone_urls[REPO.lower()] = str(repo.bare)
        gh.add_team_member("CliMA", "core", "alice")
        gh.set_permission(REPO, "alice", "write")
        settings = github_config(gh, key_file, **config)
        auth = AppAuth(settings.app_id, load_private_key(key_file))
        client = GitHubClient(session, api_url=gh.url, auth=auth, write_spacing=0.0, max_retries=max_retries)
        host = FakeHost(tmp_path / "agent", policy)
        state = GithubState.open(tmp_path / "agent" / "state")
        source = GithubSource(settings, host, client=client, auth=auth, state=state, gateway=gateway,
                              update_interval=update_interval, retry_seconds=0.1)
        site = Site(gh, host, state, source, settings, client, repo, tmp_path)
        site.push_main({".hpc-runner.toml": jobs, "README.md": "# ClimaAtmos\n"})
        try:
            yield site
        finally:
            await site.source.wait_idle()
            state.close()
            host.store.close()
