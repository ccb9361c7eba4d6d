"""The agent serving Buildkite on the real cluster: signed steps from the agent API emulator run
through Slurm and Apptainer, their logs and exit statuses go back to the emulator.

The agent runs as the service account (`hpc-runner agent --config`), the emulator in this
process on 127.0.0.1 (on a thread of its own, since the test waits synchronously). Jobs are
tiny and the emulator's intervals short, so the whole file takes a minute or two.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import signal
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import (
    TEST_IMAGE_NAME,
    AgentProcess,
    Cluster,
    RunnerSite,
    git,
    give_tree_to_service_user,
    source_site,
    toml_table,
    wait_for,
    write_public_file,
    write_service_secret,
)
from fakes.background_loop import BackgroundLoop
from fakes.buildkite_api import BuildkiteEmulator
from fakes.buildkite_signer import StepSigner, signed_job

from integration.test_agent_slurm import kill_agent, squeue_lists
from runner.store import DB_FILENAME

T = TypeVar("T")
JOB_TIMEOUT_S = 150.0
STAMP = re.compile(rb"\x1b_bk;t=\d+\x07")
PLUGIN = {"hpc-runner#v1": {"image": "test", "resources": {"time": "1m", "cpus_per_task": 1}}}
# The `serve` fixture: `serve(workers=N)` starts an agent; its site and process.
Serve = Callable[..., tuple[RunnerSite, AgentProcess]]


def unstamped(log: bytes) -> bytes:
    return STAMP.sub(b"", log)


class EmulatorThread(BackgroundLoop):
    """The emulator on an event loop of its own thread; `call` runs a function there."""

    def __init__(self) -> None:
        super().__init__(timeout=30)
        self.bk: BuildkiteEmulator = self.call(lambda: BuildkiteEmulator(heartbeat_interval=2))
        self.run(self.bk.start())

    def close(self) -> None:
        self.run(self.bk.close())
        self.stop()

    # Shortcuts for what the tests look at.
    def queue(self, job: dict[str, Any]) -> str:
        return self.call(lambda: self.bk.queue_job(job, agent_query_rules=["queue=hpc"]))

    def state(self, job_id: str) -> str:
        return self.call(lambda: self.bk.job_state(job_id))

    def log(self, job_id: str) -> bytes:
        return self.call(lambda: self.bk.log(job_id))

    def finishes(self, job_id: str) -> list[dict[str, Any]]:
        return self.call(lambda: self.bk.finishes(job_id))

    def wait_finished(self, job_id: str, timeout: float = JOB_TIMEOUT_S) -> dict[str, Any]:
        wait_for(lambda: self.state(job_id) in ("finished", "canceled", "timed_out"), timeout,
                 interval=0.2, what=f"Buildkite job {job_id} to finish")
        finishes = self.finishes(job_id)
        assert len(finishes) == 1, finishes
        return finishes[0]

    def wait_running_with(self, job_id: str, output: bytes, what: str) -> None:
        """Wait until the job runs and its log in Buildkite holds ``output``."""
        wait_for(lambda: self.state(job_id) == "running" and output in unstamped(self.log(job_id)),
                 JOB_TIMEOUT_S, interval=0.2, what=what)


@pytest.fixture
def emulator() -> Iterator[EmulatorThread]:
    with contextlib.closing(EmulatorThread()) as thread:
        yield thread


@pytest.fixture
def signer() -> StepSigner:
    return StepSigner(kid="cluster-test")


@pytest.fixture
def repo(service_tmp: Path) -> Path:
    """A git repository the service account can clone, with one commit."""
    path = service_tmp / "repo"
    # The emulator's jobs name the branch main: the checkout checks that the commit is on it.
    git("init", "-q", "-b", "main", path, cwd=service_tmp)
    (path / "data.txt").write_text("from the repository\n")
    git("add", "data.txt", cwd=path)
    git("commit", "-qm", "first", cwd=path)
    give_tree_to_service_user(path)
    return path


def buildkite_site(cluster: Cluster, service_tmp: Path, emulator: EmulatorThread, signer: StepSigner, *,
                   socket: Path, workers: int = 2, max_jobs: int = 10) -> RunnerSite:
    token = write_service_secret(service_tmp / "buildkite-token", emulator.bk.registration_token + "\n")
    jwks = service_tmp / "buildkite-jwks.json"
    write_public_file(jwks, signer.public_jwks())
    return source_site(
        cluster, service_tmp, socket=socket, max_jobs=max_jobs,
        grant=toml_table("[[grants]]", name="pipeline", principals=["buildkite:pipeline:example/pipeline"],
                         account="esm", images=[TEST_IMAGE_NAME], signers=[signer.kid]),
        section=toml_table("[buildkite]", token_file=token, verification_jwks_file=jwks,
                           endpoint=emulator.bk.url, tags=["queue=hpc"], workers=workers))


def stored_jobs(site: RunnerSite) -> list[tuple[str, str, str | None]]:
    """(id, state, slurm_id) of every job in the agent's store, read-only."""
    uri = f"file:{site.state_dir / DB_FILENAME}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as db:
        return [(r[0], r[1], r[2]) for r in db.execute("SELECT id, state, slurm_id FROM jobs")]


def runner_workspace(site: RunnerSite, bk_id: str) -> Path:
    """The workspace (/work) of the runner job of a Buildkite job."""
    uri = f"file:{site.state_dir / DB_FILENAME}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as db:
        row = db.execute("SELECT decision FROM jobs WHERE source = 'buildkite' AND external_id = ?",
                         (bk_id,)).fetchone()
    assert row is not None and row[0], f"no decided runner job for Buildkite job {bk_id}"
    return Path(json.loads(row[0])["workspace"])


def runner_job(site: RunnerSite, bk_id: str) -> str:
    uri = f"file:{site.state_dir / DB_FILENAME}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as db:
        row = db.execute("SELECT id FROM jobs WHERE source = 'buildkite' AND external_id = ?",
                         (bk_id,)).fetchone()
    assert row is not None, f"no runner job for Buildkite job {bk_id}"
    return str(row[0])


def output_file(site: RunnerSite, job_id: str) -> bytes:
    return (site.work_root / job_id / "output.log").read_bytes()


@pytest.fixture
def serve(cluster: Cluster, service_tmp: Path, emulator: EmulatorThread, signer: StepSigner,
          agents: Callable[[RunnerSite], AgentProcess], shared_socket: Path
          ) -> Iterator[Serve]:
    """Starts an agent serving the emulator through Slurm (``serve(workers=N)``): its site and
    process. Whatever of its jobs Slurm still runs after the test is cancelled."""
    sites: list[RunnerSite] = []

    def start(workers: int = 2) -> tuple[RunnerSite, AgentProcess]:
        site = buildkite_site(cluster, service_tmp, emulator, signer, socket=shared_socket, workers=workers)
        sites.append(site)
        return site, agents(site)

    yield start
    for site in sites:
        with contextlib.suppress(Exception):
            for job_id, _, _ in stored_jobs(site):
                subprocess.run(["scancel", f"--name=hpcr-{job_id}"], capture_output=True, timeout=30,
                               check=False)


def test_a_signed_step_runs_in_slurm_and_its_log_and_status_reach_buildkite(
        emulator: EmulatorThread, signer: StepSigner, repo: Path, serve: Serve) -> None:
    site, _ = serve()
    command = "cat data.txt\nprintf 'two\\nthree'\necho\necho \"secret is $DEPLOY_TOKEN\"\nexit 3"
    job_id = emulator.queue(signed_job(signer, command, repo=str(repo), plugins=[PLUGIN],
                                       step_env={"DEPLOY_TOKEN": "hunter2-secret"}))

    body = emulator.wait_finished(job_id)

    assert (body["exit_status"], body.get("signal_reason"), body["chunks_failed_count"]) == ("3", None, 0)
    log = emulator.log(job_id)
    runner_id = runner_job(site, job_id)
    # Byte for byte what the agent's log file holds, once Buildkite's timestamps are taken out and
    # with the secret redacted.
    assert unstamped(log) == output_file(site, runner_id).replace(b"hunter2-secret", b"[REDACTED]")
    text = unstamped(log)
    assert text.startswith("~~~ ✅ Job signature verified (key cluster-test, EdDSA)\n".encode()), text
    job_output = b"".join(line for line in text.splitlines(keepends=True) if not line.startswith(b"srun: "))
    assert b"from the repository\ntwo\nthree\nsecret is [REDACTED]\n" in job_output, text
    assert b"hunter2-secret" not in text
    assert re.search(rb"hpc-runner: submitted to Slurm as job [0-9]+ \(hpcr-" + runner_id.encode(), text)
    (state,) = [s for i, s, _ in stored_jobs(site) if i == runner_id]
    assert state == "failed"


def tampered(signer: StepSigner, repo: str) -> dict[str, dict[str, Any]]:
    jobs: dict[str, dict[str, Any]] = {}

    def fresh() -> dict[str, Any]:
        return signed_job(signer, "echo must never run", repo=repo, plugins=[PLUGIN], step_env={"MODE": "ci"})

    jobs["command"] = fresh()
    jobs["command"]["env"]["BUILDKITE_COMMAND"] = jobs["command"]["step"]["command"] = "echo pwned"
    jobs["env"] = fresh()
    jobs["env"]["env"]["MODE"] = "evil"
    jobs["plugins"] = fresh()
    jobs["plugins"]["env"]["BUILDKITE_PLUGINS"] = jobs["plugins"]["env"]["BUILDKITE_PLUGINS"].replace(
        '"time": "1m"', '"time": "2m"')
    jobs["repository"] = fresh()
    jobs["repository"]["env"]["BUILDKITE_REPO"] = repo + "-fork"
    jobs["wrong key"] = signed_job(StepSigner(kid="cluster-test"), "echo must never run", repo=repo,
                                   plugins=[PLUGIN])
    jobs["alg mismatch"] = fresh()
    jobs["alg mismatch"]["step"]["signature"]["algorithm"] = "ES256"
    jobs["missing"] = signed_job(None, "echo must never run", repo=repo, plugins=[PLUGIN])
    return jobs


def test_tampered_and_unsigned_steps_end_signature_rejected_and_never_reach_slurm(
        emulator: EmulatorThread, signer: StepSigner, repo: Path, serve: Serve) -> None:
    site, _ = serve(workers=4)
    ids = {name: emulator.queue(job) for name, job in tampered(signer, str(repo)).items()}

    for name, job_id in ids.items():
        body = emulator.wait_finished(job_id, timeout=60)
        assert (body["exit_status"], body["signal_reason"]) == ("-1", "signature_rejected"), name
        log = unstamped(emulator.log(job_id))
        assert log.startswith("+++ ⛔ Job signature verification failed\nerror: ".encode()), (name, log)
        assert b"must never run" not in log.split(b"\n", 2)[1], name
    # The agent recorded no job, so nothing was ever submitted to Slurm.
    assert stored_jobs(site) == []


def test_an_agent_killed_mid_job_and_restarted_completes_the_log_and_finishes_once(
        emulator: EmulatorThread, signer: StepSigner, repo: Path, serve: Serve,
        agents: Callable[[RunnerSite], AgentProcess]) -> None:
    site, agent = serve()
    command = "i=1\nwhile [ $i -le 40 ]; do echo \"line $i\"; i=$((i + 1)); sleep 0.2; done"
    job_id = emulator.queue(signed_job(signer, command, repo=str(repo), plugins=[PLUGIN]))
    emulator.wait_running_with(job_id, b"line 3\n", "the first lines in Buildkite")
    kill_agent(agent)
    before = unstamped(emulator.log(job_id))
    assert b"line 40\n" not in before

    agents(site)
    body = emulator.wait_finished(job_id)

    assert body["exit_status"] == "0"
    log = unstamped(emulator.log(job_id))
    runner_id = runner_job(site, job_id)
    assert log == output_file(site, runner_id)
    job_lines = [line for line in log.split(b"\n") if line.startswith(b"line ")]
    assert job_lines == [f"line {i}".encode() for i in range(1, 41)]
    assert emulator.call(lambda: emulator.bk.jobs[job_id].chunk_conflicts) == []


def test_cancel_in_buildkite_leaves_no_slurm_job(
        emulator: EmulatorThread, signer: StepSigner, repo: Path, serve: Serve) -> None:
    site, _ = serve()
    job_id = emulator.queue(signed_job(signer, "echo started\nsleep 100\necho not cancelled", repo=str(repo),
                                       plugins=[PLUGIN]))
    emulator.wait_running_with(job_id, b"started\n", "the job to start")
    runner_id = runner_job(site, job_id)
    assert squeue_lists(runner_id)

    emulator.call(lambda: emulator.bk.cancel_job(job_id))
    body = emulator.wait_finished(job_id, timeout=60)

    assert (body["exit_status"], body["signal"], body["signal_reason"]) == ("-1", "SIGTERM", "cancel")
    assert emulator.state(job_id) == "canceled"
    assert not squeue_lists(runner_id)
    log = unstamped(emulator.log(job_id))
    assert b"the job was cancelled in Buildkite; cancelling" in log and b"not cancelled" not in log


def test_ten_jobs_at_once_with_ten_workers_all_complete(
        emulator: EmulatorThread, signer: StepSigner, repo: Path, serve: Serve) -> None:
    serve(workers=10)
    ids = [emulator.queue(signed_job(signer, f"echo job {n}", repo=str(repo), plugins=[PLUGIN]))
           for n in range(10)]

    for n, job_id in enumerate(ids):
        body = emulator.wait_finished(job_id, timeout=240)
        assert body["exit_status"] == "0", (n, unstamped(emulator.log(job_id)))
        assert f"\njob {n}\n".encode() in unstamped(emulator.log(job_id))
    agents_used = emulator.call(lambda: {emulator.bk.jobs[j].agent_id for j in ids})
    assert len(emulator.call(lambda: emulator.bk.agents)) == 10
    assert len(agents_used) >= 2


def test_sigterm_lets_the_job_finish_and_disconnects_a_second_cancels_it_as_agent_stop(
        emulator: EmulatorThread, signer: StepSigner, repo: Path, serve: Serve,
        agents: Callable[[RunnerSite], AgentProcess]) -> None:
    site, agent = serve(workers=1)
    # It runs until the test lets it end: Buildkite's job starts once Slurm's runs, and only a
    # job still running when the agent's tracker looks is seen running.
    waiting = "echo started\nwhile [ ! -e go ]; do sleep 0.1; done\necho done"
    first = emulator.queue(signed_job(signer, waiting, repo=str(repo), plugins=[PLUGIN]))
    emulator.wait_running_with(first, b"started\n", "the first job to start")

    agent.send(signal.SIGTERM)
    agent.wait_for_log("draining", timeout=10)
    (runner_workspace(site, first) / "go").touch()
    body = emulator.wait_finished(first, timeout=60)
    assert body["exit_status"] == "0" and b"done\n" in unstamped(emulator.log(first))
    assert agent.wait_exit(30) == 0
    assert all(a.disconnected for a in emulator.call(lambda: list(emulator.bk.agents.values())))

    agent = agents(site)
    second = emulator.queue(signed_job(signer, "echo started\nsleep 100", repo=str(repo), plugins=[PLUGIN]))
    emulator.wait_running_with(second, b"started\n", "the second job to start")
    agent.send(signal.SIGTERM)
    agent.wait_for_log("draining", timeout=10)
    agent.send(signal.SIGTERM)
    body = emulator.wait_finished(second, timeout=60)
    assert (body["exit_status"], body["signal_reason"]) == ("-1", "agent_stop")
    assert agent.wait_exit(30) == 0
    assert not squeue_lists(runner_job(site, second))


def test_a_steps_declared_outputs_become_its_artifacts_with_the_files_digests(
        emulator: EmulatorThread, signer: StepSigner, repo: Path, serve: Serve) -> None:
    site, _ = serve(workers=1)
    plugin = {"hpc-runner#v1": {**PLUGIN["hpc-runner#v1"], "outputs": ["results/**/*.nc", "plots/*.png"]}}
    command = ("mkdir -p results/run1 plots\nseq 1 5000 > results/run1/state.nc\n"
               "head -c 3000 /dev/urandom > plots/sst.png\necho not an output > notes.txt")
    job_id = emulator.queue(signed_job(signer, command, repo=str(repo), plugins=[plugin]))

    body = emulator.wait_finished(job_id)

    assert body["exit_status"] == "0", unstamped(emulator.log(job_id))
    runner_id = runner_job(site, job_id)
    collected = site.work_root / runner_id / "outputs"
    artifacts = emulator.call(lambda: {a.path: (a.state, a.sha256sum, a.content, a.glob_path)
                                       for a in emulator.bk.job_artifacts(job_id)})
    assert set(artifacts) == {"results/run1/state.nc", "plots/sst.png"}
    for path, (state, sha256, content, _) in artifacts.items():
        on_disk = (collected / path).read_bytes()
        assert state == "finished" and content == on_disk
        assert sha256 == hashlib.sha256(on_disk).hexdigest()
    assert artifacts["results/run1/state.nc"][2] == "".join(f"{n}\n" for n in range(1, 5001)).encode()
    assert artifacts["plots/sst.png"][3] == "plots/*.png"
    assert b"hpc-runner: 2 of 2 artifact(s) uploaded\n" in unstamped(emulator.log(job_id))
