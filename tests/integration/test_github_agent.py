"""The agent serving GitHub on the real cluster: a labelled pull request runs through Slurm and
Apptainer and ends as a successful check run holding the log tail.

The agent runs as the service account (`hpc-runner agent --config`) in poll mode against the GitHub
emulator, which runs in this process on 127.0.0.1 (on a thread of its own, since the test waits
synchronously) and checks every request against GitHub's OpenAPI description. The repository is
a real git repository: its bare copy on disk is the `clone_url` the emulator advertises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import (
    TEST_IMAGE_NAME,
    AgentProcess,
    Cluster,
    RunnerSite,
    as_service_user,
    git,
    give_tree_to_service_user,
    source_site,
    toml_table,
    wait_for,
    write_service_secret,
)
from fakes.background_loop import BackgroundLoop
from fakes.github_activity import ActivityGitHub

from integration.test_agent_slurm import kill_agent, squeue_lists
from integration.test_buildkite_agent import stored_jobs

T = TypeVar("T")
REPO = "CliMA/ClimaAtmos.jl"
JOB_TIMEOUT_S = 120.0
JOBS = """[[jobs]]
name = "unit"
image = "test"
script = '''
cat data.txt
echo "all tests passed"
'''

[jobs.resources]
time = "1m"
cpus_per_task = 1
"""


class GitHubThread(BackgroundLoop):
    """The GitHub emulator on an event loop of its own thread; `call` runs a function there."""

    def __init__(self) -> None:
        super().__init__(timeout=60)
        self.gh: ActivityGitHub = self.call(ActivityGitHub)
        self.run(self.gh.start())

    def close(self) -> None:
        try:
            self.run(self.gh.close())           # fails the test on any request GitHub would refuse
        finally:
            self.stop()

    def check_runs(self, name: str) -> list[dict[str, Any]]:
        return [run for run in self.call(lambda: self.gh.check_runs(REPO)) if run["name"] == name]

    def completed_run(self) -> dict[str, Any] | None:
        """The check run of the job `unit`, once it is completed."""
        return next((r for r in self.check_runs("hpc-runner/unit") if r["status"] == "completed"), None)


@pytest.fixture
def github() -> Iterator[GitHubThread]:
    with contextlib.closing(GitHubThread()) as thread:
        yield thread


def github_site(cluster: Cluster, service_tmp: Path, github: GitHubThread, *, socket: Path) -> RunnerSite:
    key = write_service_secret(service_tmp / "github-app.pem", github.gh.app_private_key_pem)
    return source_site(
        cluster, service_tmp, socket=socket, max_jobs=4,
        grant=toml_table("[[grants]]", name="core-prs", principals=["github:team:CliMA/core"],
                         events=["pull_request"], refs=["refs/pull/*"], account="esm",
                         images=[TEST_IMAGE_NAME]),
        section=toml_table("[github]", app_id=github.gh.app_id, private_key_file=key, api_url=github.gh.url,
                           repositories=[REPO], trigger_label="run-hpc", poll_interval="5s",
                           log_url="https://ci.example.org/jobs/{id}"))


def running_job(site: RunnerSite) -> str | None:
    """The id of the site's one job, once the agent has it running and Slurm lists it."""
    jobs = stored_jobs(site)
    return jobs[0][0] if jobs and jobs[0][1] == "running" and squeue_lists(jobs[0][0]) else None


def labelled_pull_request(github: GitHubThread, root: Path, jobs: str = JOBS) -> tuple[int, str]:
    """A pull request by a member of CliMA/core, labelled by her; its head is a real commit."""
    work, bare = root / "git-work", root / "origin.git"
    work.mkdir()
    git("init", "--quiet", "--initial-branch=main", cwd=work)
    git("init", "--quiet", "--bare", str(bare), cwd=root)
    files = {".hpc-runner.toml": jobs, "data.txt": "from the repository\n"}
    for name, text in files.items():
        (work / name).write_text(text)
    git("add", "--all", cwd=work)
    git("commit", "--quiet", "-m", "jobs", cwd=work)
    main = git("rev-parse", "HEAD", cwd=work).strip()
    (work / "change.txt").write_text("a change\n")
    git("add", "--all", cwd=work)
    git("commit", "--quiet", "-m", "change", cwd=work)
    head = git("rev-parse", "HEAD", cwd=work).strip()
    git("push", "--quiet", str(bare), f"{main}:refs/heads/main", f"{head}:refs/heads/topic",
         f"{head}:refs/pull/1/head", cwd=work)
    give_tree_to_service_user(bare)

    def make() -> int:
        gh = github.gh
        gh.add_repository(REPO, installation=1)
        gh.clone_urls[REPO.lower()] = str(bare)
        gh.use_commit(REPO, "main", main, files)
        gh.add_team_member("CliMA", "core", "alice")
        gh.set_permission(REPO, "alice", "write")
        pr = gh.add_pull_request(REPO, head_ref="topic", author="alice", number=1)
        gh.point_pull_request(REPO, pr.number, head, {**files, "change.txt": "a change\n"})
        gh.label(REPO, pr.number, "run-hpc", by="alice")
        return pr.number

    return github.call(make), head


def test_a_labelled_pull_request_runs_on_the_cluster_as_a_successful_check_run(
        cluster: Cluster, service_tmp: Path, github: GitHubThread,
        agents: Callable[[RunnerSite], AgentProcess], shared_socket: Path) -> None:
    site = github_site(cluster, service_tmp, github, socket=shared_socket)
    number, head = labelled_pull_request(github, service_tmp)
    agent = agents(site)

    try:
        run = wait_for(github.completed_run, JOB_TIMEOUT_S, interval=0.5, what="the check run to complete")
    except AssertionError:
        raise AssertionError(f"no completed check run; the agent's log:\n{agent.log()}") from None

    assert run["head_sha"] == head
    assert run["conclusion"] == "success", run["output"]
    text = run["output"]["text"]
    assert "from the repository" in text and "all tests passed" in text
    [(job_id, state, slurm_id)] = stored_jobs(site)
    assert state == "succeeded" and slurm_id
    assert run["details_url"] == f"https://ci.example.org/jobs/{job_id}"
    assert run["external_id"].startswith(f"label:{REPO.lower()}#{number}:")
    summary = run["output"]["summary"]
    assert "`core-prs`" in summary and "Slurm account `esm`" in summary and "`refs/pull/1/head`" in summary
    history = run["_history"]
    assert history[0]["status"] == "queued" and history[-1]["conclusion"] == "success"
    # Nothing of the credentials used for the clone stayed in the workspace.
    workspace = site.work_root / job_id / "workspace"
    config = as_service_user(["git", "-C", str(workspace), "config", "--list", "--local"], check=True).stdout
    assert "extraheader" not in config.lower() and "ghs_" not in config
    agent.stop()


def test_a_cancel_comment_cancels_the_slurm_job_and_the_check_run_says_so(
        cluster: Cluster, service_tmp: Path, github: GitHubThread,
        agents: Callable[[RunnerSite], AgentProcess], shared_socket: Path) -> None:
    site = github_site(cluster, service_tmp, github, socket=shared_socket)
    sleeping = JOBS.replace('echo "all tests passed"', "sleep 90")
    number, _ = labelled_pull_request(github, service_tmp, sleeping)
    agent = agents(site)

    job_id = wait_for(lambda: running_job(site), JOB_TIMEOUT_S, interval=0.5, what="the job to run in Slurm")
    github.call(lambda: github.gh.add_comment(REPO, number, "/hpc-runner cancel", user="alice"))

    run = wait_for(github.completed_run, 60, interval=0.5, what="the check run to end")
    assert (run["conclusion"], run["output"]["title"]) == ("cancelled", "Cancelled by @alice"), agent.log()
    assert not squeue_lists(job_id)
    assert [state for _, state, _ in stored_jobs(site)] == ["cancelled"]
    agent.stop()


def test_an_agent_killed_mid_run_follows_the_job_again_and_completes_its_check_run_once(
        cluster: Cluster, service_tmp: Path, github: GitHubThread,
        agents: Callable[[RunnerSite], AgentProcess], shared_socket: Path) -> None:
    site = github_site(cluster, service_tmp, github, socket=shared_socket)
    slow = JOBS.replace('echo "all tests passed"',
                        'echo "before the restart"\nsleep 8\necho "after the restart"')
    labelled_pull_request(github, service_tmp, slow)
    first = agents(site)

    job_id = wait_for(lambda: running_job(site), JOB_TIMEOUT_S, interval=0.5, what="the job to run in Slurm")
    kill_agent(first)
    second = agents(site)

    run = wait_for(github.completed_run, JOB_TIMEOUT_S, interval=0.5, what="the check run to complete")
    assert run["conclusion"] == "success", second.log()
    text = run["output"]["text"]
    assert "before the restart" in text and "after the restart" in text
    assert sum(1 for body in run["_history"] if body.get("conclusion")) == 1
    assert len(github.check_runs("hpc-runner/unit")) == 1
    assert [(i, state) for i, state, _ in stored_jobs(site)] == [(job_id, "succeeded")]
    second.stop()


def test_the_agent_refuses_to_start_with_a_github_key_others_can_read(
        cluster: Cluster, service_tmp: Path, github: GitHubThread, shared_socket: Path) -> None:
    site = github_site(cluster, service_tmp, github, socket=shared_socket)
    (service_tmp / "github-app.pem").chmod(0o644)
    result = as_service_user(["hpc-runner", "agent", "--config", site.config], cwd=site.root, timeout=30)
    assert result.returncode == 1
    assert "refusing to start" in result.stderr and "github-app.pem" in result.stderr
    assert not site.socket.exists()
