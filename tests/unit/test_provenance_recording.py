"""The end of a run written down by a real agent (real store, the fake executor of test_agent):
outputs collected from the job's workspace, the `--- what ran` group at the end of its log, and a
provenance record that validates and holds none of the job's secrets."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from attestation import validate_record
from conftest import git

import runner.lifecycle.driver as driver_module
from runner.agent import Agent
from runner.config import AgentConfig, BuildkiteConfig
from runner.identity import Identity
from runner.job import JobState, OutputFile
from runner.job.prepared import PreparedJob
from runner.lifecycle.prepare import Site, job_dir
from runner.lifecycle.recording import RECORDED_ACTION
from runner.policy import Decision
from runner.provenance.statement import subjects
from runner.site_policy import load_site_policy
from runner.spec import JobSpec, parse_job_text
from runner.store import Store
from sandbox.images import VerifiedImage
from sandbox.plan import SandboxPlan
from unit.test_agent import POLICY, SHA256, FakeExecutor

ALICE = Identity(source="local", user="alice", groups=("esm",))
DEADLINE_S = 10.0
# Values that must never reach a record: three named by the default patterns, one by the site's.
SECRETS = {"API_TOKEN": "tok-5f2b9c1e-never-in-a-record", "X_SECRET": "sec-0d7e4a-never-in-a-record",
           "DB_PASSWORD": "pw-8c1f33-never-in-a-record", "SITE_CREDENTIAL": "cred-77aa-never-in-a-record"}


def prepare_with_env(site: Site, *, job_id: str, spec: JobSpec, decision: Decision,
                     workspace: Path) -> PreparedJob:
    """Preparation without a sandbox: the plan's environment is the job's own env and one of ours."""
    directory = job_dir(site.config, job_id)
    directory.mkdir(parents=True, exist_ok=True)
    plan = SandboxPlan(argv=("true",), env_file="", script=None, rank_wrapper=(),
                       env={"HOME": "/work", **spec.env})
    return PreparedJob(job_id=job_id, spec=spec, decision=decision,
                       image=VerifiedImage("test", "/images/test.sif", SHA256, None), plan=plan,
                       argv=plan.argv, workspace=workspace, job_dir=directory,
                       log_path=directory / "output.log")


class RecordingAgent:
    """An agent whose site redacts SITE_* beside the defaults, with the fake executor."""

    def __init__(self, root: Path) -> None:
        root.mkdir()
        (root / "policy.toml").write_text(POLICY)
        buildkite = BuildkiteConfig(token_file=root / "token", verification_jwks_file=None,
                                    redacted_vars=("SITE_*",))
        self.config = AgentConfig(state_dir=root / "state", work_root=root / "work",
                                  policy=root / "policy.toml", executor="local", max_jobs=2,
                                  buildkite=buildkite)
        self.submitted = root / "submitted"
        self.submitted.mkdir()
        self.store = Store.open(self.config.state_dir)
        self.executor = FakeExecutor()
        self.agent = Agent(self.config, load_site_policy(self.config), self.store,
                           policy_loader=lambda: load_site_policy(self.config), grace_seconds=1,
                           executor=self.executor)

    async def wait(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while not condition():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}")
            await asyncio.sleep(0.005)

    def state(self, job_id: str) -> JobState:
        record = self.store.get_job(job_id)
        assert record is not None
        return record.state

    async def run(self, spec_text: str, *, before_end: Callable[[Path], None] = lambda _: None) -> str:
        """Submit, let the job start, call `before_end` with its directory, and let it succeed."""
        record, _ = await self.agent.submit(ALICE, parse_job_text(spec_text), self.submitted,
                                            submitter_uid=None)
        await self.wait(lambda: record.id in self.executor.started, f"job {record.id} to start")
        before_end(job_dir(self.config, record.id))
        self.executor.release(record.id)
        await self.wait(lambda: self.state(record.id) == JobState.succeeded, f"job {record.id} to succeed")
        return record.id

    def record(self, job_id: str) -> bytes:
        data = self.store.provenance(job_id)
        assert data is not None, f"job {job_id} has no provenance record"
        return data


@pytest.fixture
async def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[RecordingAgent]:
    monkeypatch.setattr(driver_module, "prepare_job", prepare_with_env)
    made = RecordingAgent(tmp_path / "agent")
    made.agent.start()
    yield made
    made.agent.drain()
    await made.agent.stop_workers()
    made.store.close()


def spec_text(*, outputs: str = '["results/**/*"]', env: dict[str, str] | None = None) -> str:
    lines = ['[job]', 'name = "rec"', 'image = "test"', 'command = ["true"]', f'outputs = {outputs}',
             '[job.env]', *(f'{name} = "{value}"' for name, value in (env or {}).items())]
    return "\n".join(lines) + "\n"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_a_run_keeps_its_outputs_and_a_record_without_its_secrets(site: RecordingAgent) -> None:
    git("init", "-q", "-b", "main", cwd=site.submitted)
    (site.submitted / "run.sh").write_text("true\n")
    git("add", "run.sh", cwd=site.submitted)
    git("commit", "-q", "-m", "one", cwd=site.submitted)
    commit = git("rev-parse", "HEAD", cwd=site.submitted).strip()

    def job_writes(directory: Path) -> None:
        (directory / "workspace/results/sub").mkdir(parents=True)
        (directory / "workspace/results/a.txt").write_bytes(b"alpha\n")
        (directory / "workspace/results/sub/b.dat").write_bytes(b"beta\n")

    job_id = await site.run(spec_text(env={"MODEL": "visible-setting", **SECRETS}), before_end=job_writes)

    data = site.record(job_id)
    record = validate_record(data)
    build = record["predicate"]["buildDefinition"]
    for name, value in SECRETS.items():
        assert value.encode() not in data, f"the value of {name} is in the record"
        assert build["externalParameters"]["job"]["env"][name] == "[REDACTED]"
        assert build["internalParameters"]["environment"][name] == "[REDACTED]"
    assert b"visible-setting" in data
    expected = [OutputFile("results/a.txt", sha256(b"alpha\n"), 6),
                OutputFile("results/sub/b.dat", sha256(b"beta\n"), 5)]
    assert subjects(record) == expected
    assert site.agent.driver.ended(job_id).outputs == tuple(expected)
    kept = job_dir(site.config, job_id) / "outputs"
    assert (kept / "results/a.txt").read_bytes() == b"alpha\n"
    assert (kept / "results/sub/b.dat").read_bytes() == b"beta\n"
    source = [d for d in build["resolvedDependencies"] if d["name"] == "source"]
    assert source == [{"name": "source", "digest": {"gitCommit": commit}}]
    audit = [e for e in site.store.audit_entries(job_id=job_id) if e.action == RECORDED_ACTION]
    assert [e.detail["sha256"] for e in audit] == [sha256(data)]
    # Nor does the log or the job's facts file hold a value (the log is shipped to the CI service).
    directory = job_dir(site.config, job_id)
    for path in (directory / "output.log", directory / "run-facts.json"):
        assert not any(value.encode() in path.read_bytes() for value in SECRETS.values()), path


async def test_the_what_ran_group_starts_on_its_own_line_and_the_record_digests_the_whole_log(
    site: RecordingAgent
) -> None:
    def job_writes(directory: Path) -> None:
        (directory / "output.log").write_bytes(b"first line\nlast words without a newline")

    job_id = await site.run(spec_text(outputs='["nothing/*.nc"]'), before_end=job_writes)

    log = (job_dir(site.config, job_id) / "output.log").read_bytes()
    assert log.startswith(b"first line\nlast words without a newline\n--- what ran\nimage:     test (")
    assert b"  no file matched the output pattern 'nothing/*.nc'\n" in log
    assert log.endswith(f"replay:    hpc-runner replay {job_id}\n".encode())
    record = validate_record(site.record(job_id))
    byproduct = record["predicate"]["runDetails"]["byproducts"][0]
    assert (byproduct["name"], byproduct["digest"]["sha256"], byproduct["annotations"]["size"]) == (
        "log", sha256(log), len(log))
    # Nothing collected: the log is what the record vouches for, and no output is handed on.
    assert [s["name"] for s in record["subject"]] == ["log"]
    assert site.agent.driver.ended(job_id).outputs == ()


async def test_a_log_that_ends_with_a_newline_gets_no_blank_line_before_the_group(
    site: RecordingAgent
) -> None:
    def job_writes(directory: Path) -> None:
        (directory / "output.log").write_bytes(b"done\n")

    job_id = await site.run(spec_text(), before_end=job_writes)
    assert (job_dir(site.config, job_id) / "output.log").read_bytes().startswith(b"done\n--- what ran\n")
    validate_record(site.record(job_id))


async def test_the_record_is_stored_once(site: RecordingAgent) -> None:
    job_id = await site.run(spec_text())
    first = site.record(job_id)
    validate_record(first)
    assert json.loads(first)["predicate"]["runDetails"]["metadata"]["invocationId"] == job_id
    assert site.store.save_provenance(job_id, b"{}") is False
    assert site.record(job_id) == first
    assert [e.action for e in site.store.audit_entries(job_id=job_id)].count(RECORDED_ACTION) == 1
    assert (job_dir(site.config, job_id) / "output.log").read_bytes().count(b"--- what ran\n") == 1
