"""Outputs and provenance records of jobs that ran in Slurm, through a real agent with the Slurm
executor, submitted by a local user through the shared queue from a git checkout.

The record is read from the agent's store as the test (read-only); every fact in it is checked
against the thing itself: `sha256sum` of the files and of the SIF, `git rev-parse HEAD` of the
checkout, `sacct` for the Slurm job, `hpc-runner logs` for the log.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from attestation import validate_record
from conftest import (
    SERVICE_USER,
    TEST_IMAGE_NAME,
    AgentProcess,
    Cluster,
    RunnerSite,
    git,
    image_table,
    job_toml,
    make_runner_site,
    policy_document,
    toml_table,
)

from integration.test_local_queue import QueueUser
from runner.store import DB_FILENAME

ALICE = "hpcr-alice"
SLURM_ACCOUNT = "esm"
JOB_TIMEOUT_S = 150.0
TOKEN = "tok-3c9a1f7e2b-must-stay-out-of-records"
KIB = 1024


def provenance_policy(cluster: Cluster) -> str:
    """Alice's group may spend `esm` (default output cap) and `small` (1M of outputs), both in `debug`."""
    return policy_document(
        toml_table("[accounts.esm]", slurm_account=SLURM_ACCOUNT, partitions=["debug"], max_time="2m",
                   max_memory="1G"),
        toml_table("[accounts.small]", slurm_account=SLURM_ACCOUNT, partitions=["debug"], max_time="2m",
                   max_memory="1G", max_output_bytes="1M"),
        image_table(cluster.image, cluster.image_sha256),
        toml_table("[[grants]]", name="esm-members", principals=["local:group:hpcr-esm"], account="esm",
                   images=[TEST_IMAGE_NAME]),
        toml_table("[[grants]]", name="small-members", principals=["local:group:hpcr-esm"], account="small",
                   images=[TEST_IMAGE_NAME]))


def outputs_job(name: str, script: str, *, outputs: list[str], account: str,
                env: dict[str, str] | None = None) -> str:
    text = job_toml(name, script=script, env=env, time="1m")
    listed = ", ".join(json.dumps(pattern) for pattern in outputs)
    text = text.replace("network = false\n", f"network = false\noutputs = [{listed}]\n", 1)
    return text + f'account = "{account}"\ncpus_per_task = 1\n'


@pytest.fixture
def site(cluster: Cluster, service_tmp: Path, shared_socket: Path, queue_users: dict[str, str]) -> RunnerSite:
    service_tmp.chmod(0o755)  # the users' workspaces live in it
    made = make_runner_site(service_tmp, cluster.image_sha256, socket=shared_socket, max_jobs=2,
                            executor="slurm")
    made.write_policy(provenance_policy(cluster))
    return made


@pytest.fixture
def alice(site: RunnerSite, agents: Callable[[RunnerSite], AgentProcess]) -> QueueUser:
    agents(site)
    return QueueUser(ALICE, site)


@pytest.fixture
def slurm_jobs() -> Any:
    """The hpc-runner ids a test submits; whatever Slurm still runs of them afterwards is cancelled."""
    job_ids: list[str] = []
    yield job_ids
    for job_id in job_ids:
        subprocess.run(["scancel", f"--name=hpcr-{job_id}", f"--user={SERVICE_USER}"], capture_output=True,
                       timeout=30, check=False)


def stored_record(site: RunnerSite, job_id: str) -> bytes:
    """The job's provenance record as the agent stored it, read-only, as root."""
    uri = f"file:{site.state_dir / DB_FILENAME}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as db:
        row = db.execute("SELECT statement FROM provenance WHERE job_id = ?", (job_id,)).fetchone()
    assert row is not None, f"job {job_id} has no provenance record"
    return bytes(row[0])


def sha256sum(path: Path) -> str:
    result = subprocess.run(["sha256sum", "--", path], capture_output=True, text=True, timeout=60, check=True)
    return result.stdout.split()[0]


def sacct_ids(job_id: str) -> list[str]:
    """The Slurm job ids sacct knows for the job's name (allocations only, not their steps)."""
    result = subprocess.run(["sacct", "-X", "-n", "-P", "-a", "--name", f"hpcr-{job_id}", "-o", "JobID",
                             "-S", "now-1hour"], capture_output=True, text=True, timeout=30, check=True)
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


def make_checkout(user: QueueUser) -> str:
    """The user's workspace as a git checkout with one commit; its HEAD. Made as root, then
    given to the user (git refuses to work in a directory of another owner)."""
    workspace = user.workspace
    owner = workspace.stat()
    os.chown(workspace, 0, 0)
    (workspace / "README").write_text("the experiment\n")
    git("init", "-q", "-b", "main", cwd=workspace)
    git("add", "README", cwd=workspace)
    git("commit", "-q", "-m", "experiment", cwd=workspace)
    head = git("rev-parse", "HEAD", cwd=workspace).strip()
    subprocess.run(["chown", "-R", f"{owner.st_uid}:{owner.st_gid}", workspace], check=True, timeout=30)
    return head


def predicate(record: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = record["predicate"]
    return found


def test_a_slurm_jobs_record_names_its_outputs_image_commit_and_slurm_job_and_not_its_token(
    site: RunnerSite, alice: QueueUser, slurm_jobs: list[str], cluster: Cluster
) -> None:
    commit = make_checkout(alice)
    script = textwrap.dedent("""\
        mkdir -p /work/results/sub
        echo "alpha $RANDOM" > /work/results/a.txt
        head -c 5000 /dev/urandom > /work/results/sub/b.dat
        echo done
        """)
    job_id = alice.submit(outputs_job("prov", script, outputs=["results/**/*"], account="esm",
                                      env={"API_TOKEN": TOKEN}))
    slurm_jobs.append(job_id)

    finished = alice.wait_end(job_id, timeout=JOB_TIMEOUT_S)
    assert (finished["state"], finished["exit_status"]) == ("succeeded", 0), finished

    data = stored_record(site, job_id)
    record = validate_record(data)
    assert TOKEN.encode() not in data
    # Subjects: exactly the two files, as collected and as they came back to the submitted directory.
    kept = site.work_root / job_id / "outputs"
    names = ["results/a.txt", "results/sub/b.dat"]
    assert [(s["name"], s["digest"]["sha256"]) for s in record["subject"]] == [
        (name, sha256sum(kept / name)) for name in names]
    assert [sha256sum(alice.workspace / name) for name in names] == [sha256sum(kept / name) for name in names]
    assert [s["annotations"]["size"] for s in record["subject"]] == [(kept / n).stat().st_size for n in names]
    # The image, the commit, the Slurm job.
    dependencies = {d["name"]: d for d in predicate(record)["buildDefinition"]["resolvedDependencies"]}
    assert dependencies["image"]["digest"] == {"sha256": sha256sum(cluster.image)}
    assert dependencies["image"]["uri"] == f"file://{cluster.image}"
    assert dependencies["source"]["digest"] == {"gitCommit": commit}
    run = next(b for b in predicate(record)["runDetails"]["byproducts"] if b["name"] == "run")
    assert len(sacct_ids(job_id)) == 1
    assert run["annotations"]["slurm_job_ids"] == sacct_ids(job_id)
    assert (run["annotations"]["state"], run["annotations"]["exit_status"]) == ("succeeded", 0)
    internal = predicate(record)["buildDefinition"]["internalParameters"]
    assert (internal["account"], internal["slurm_account"], internal["executor"]) == ("esm", "esm", "slurm")
    job = predicate(record)["buildDefinition"]["externalParameters"]["job"]
    assert job["env"] == {"API_TOKEN": "[REDACTED]"}
    # The log ends with what ran, naming both digests; `hpc-runner logs` prints it.
    printed = alice.hpc_runner("logs", job_id)
    assert printed.returncode == 0, printed.stderr
    assert TOKEN not in printed.stdout
    group = printed.stdout[printed.stdout.rindex("--- what ran\n"):]
    assert group.endswith(f"replay:    hpc-runner replay {job_id}\n"), group
    for subject in record["subject"]:
        assert f"  sha256:{subject['digest']['sha256']}  {subject['name']}\n" in group, group
    assert f"at {commit}" in group and f"slurm:     job {run['annotations']['slurm_job_ids'][0]} on" in group
    log_digest = next(b for b in predicate(record)["runDetails"]["byproducts"] if b["name"] == "log")
    assert log_digest["digest"]["sha256"] == sha256sum(site.work_root / job_id / "output.log")


def test_outputs_past_the_accounts_max_output_bytes_are_named_in_the_record_and_the_log(
    site: RunnerSite, alice: QueueUser, slurm_jobs: list[str]
) -> None:
    script = textwrap.dedent(f"""\
        mkdir -p /work/out
        head -c {700 * KIB} /dev/urandom > /work/out/1.bin
        head -c {700 * KIB} /dev/urandom > /work/out/2.bin
        """)
    job_id = alice.submit(outputs_job("capped", script, outputs=["out/*.bin"], account="small"))
    slurm_jobs.append(job_id)

    finished = alice.wait_end(job_id, timeout=JOB_TIMEOUT_S)
    assert (finished["state"], finished["exit_status"]) == ("succeeded", 0), finished

    record = validate_record(stored_record(site, job_id))
    kept = site.work_root / job_id / "outputs"
    assert [(s["name"], s["digest"]["sha256"]) for s in record["subject"]] == [
        ("out/1.bin", sha256sum(kept / "out/1.bin"))]
    assert not (kept / "out/2.bin").exists()
    byproducts = predicate(record)["runDetails"]["byproducts"]
    left_out = next(b for b in byproducts if b["name"] == "outputs-left-out")
    why = (f"{700 * KIB} bytes would pass the account's max_output_bytes "
           f"({1024 * KIB - 700 * KIB} bytes were left)")
    assert left_out["annotations"]["files"] == [{"path": "out/2.bin", "why": why}]
    printed = alice.hpc_runner("logs", job_id)
    assert printed.returncode == 0, printed.stderr
    assert f"  not collected: out/2.bin: {why}\n" in printed.stdout
    assert "outputs:   1 file(s), 716800 bytes\n" in printed.stdout
