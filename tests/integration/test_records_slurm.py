"""What did I run, on the real cluster: a local user's job through the agent's Slurm executor and the
test image, then `provenance`, `show`, `verify-outputs` and `replay` as that user.

The policy's image is a private copy of the test image in the test's directory, so that the test
can change its bytes (and the policy's pin) and see a replay refused.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import (
    SERVICE_USER,
    TEST_IMAGE_NAME,
    AgentProcess,
    Cluster,
    RunnerSite,
    image_table,
    job_toml,
    make_runner_site,
    policy_document,
    toml_table,
)

from integration.test_local_queue import QueueUser

ALICE = "hpcr-alice"
# The node's two CPUs may be busy with other test runs.
JOB_TIMEOUT_S = 150.0
# A deterministic job: the same two outputs, byte for byte, every time it runs.
OUTPUTS_SCRIPT = (
    "mkdir -p results/run plots\n"
    "printf 'alpha %s\\n' 1 2 3 > results/run/a.txt\n"
    "printf 'beta\\000\\377\\n' > plots/b.dat\n"
)


def records_policy(image: Path, sha256: str) -> str:
    return policy_document(
        toml_table("[accounts.esm]", slurm_account="esm", partitions=["debug"], max_time="2m",
                   max_memory="1G"),
        image_table(image, sha256),
        toml_table("[[grants]]", name="esm-members", principals=["local:group:hpcr-esm"], account="esm",
                   images=[TEST_IMAGE_NAME]))


def outputs_job() -> str:
    text = job_toml("two-outputs", script=OUTPUTS_SCRIPT, time="1m")
    return text.replace("[job]\n", '[job]\noutputs = ["results/**/*.txt", "/work/plots/*.dat"]\n', 1)


def sha256sum(path: Path) -> str:
    result = subprocess.run(["sha256sum", path], capture_output=True, text=True, timeout=60, check=True)
    return result.stdout.split()[0]


@pytest.fixture
def image(cluster: Cluster, service_tmp: Path) -> Path:
    """A copy of the test image only root can change, in a directory of the service account's."""
    directory = service_tmp / "images"
    directory.mkdir(mode=0o755)
    copy = directory / "test.sif"
    shutil.copyfile(cluster.image, copy)
    copy.chmod(0o644)
    return copy


@pytest.fixture
def site(cluster: Cluster, service_tmp: Path, shared_socket: Path, queue_users: dict[str, str],
         image: Path) -> RunnerSite:
    service_tmp.chmod(0o755)  # the users' workspaces live in it
    return make_runner_site(service_tmp, cluster.image_sha256, socket=shared_socket, max_jobs=2,
                            executor="slurm", policy_text=records_policy(image, cluster.image_sha256))


@pytest.fixture
def slurm_jobs() -> Iterator[list[str]]:
    """Whatever of the test's jobs Slurm still runs afterwards is cancelled."""
    job_ids: list[str] = []
    yield job_ids
    for job_id in job_ids:
        subprocess.run(["scancel", f"--name=hpcr-{job_id}", f"--user={SERVICE_USER}"], capture_output=True,
                       timeout=30, check=False)


def provenance(user: QueueUser, job_id: str) -> bytes:
    result = user.hpc_runner("provenance", job_id, binary=True)
    assert result.returncode == 0, result.stderr
    data: bytes = result.stdout
    return data


def subjects(record: bytes) -> dict[str, str]:
    return {s["name"]: s["digest"]["sha256"] for s in json.loads(record)["subject"]}


def test_a_run_is_recorded_verified_and_replayed_and_a_changed_image_refuses_the_replay(
        cluster: Cluster, site: RunnerSite, image: Path, agents: Callable[[RunnerSite], AgentProcess],
        slurm_jobs: list[str]) -> None:
    agent = agents(site)
    alice = QueueUser(ALICE, site)
    first = alice.submit(outputs_job())
    slurm_jobs.append(first)
    assert alice.wait_end(first, timeout=JOB_TIMEOUT_S)["state"] == "succeeded"

    # The record names both outputs, with the digests of the files the job gave back.
    record = provenance(alice, first)
    returned = {path: sha256sum(alice.workspace / path) for path in ("results/run/a.txt", "plots/b.dat")}
    assert subjects(record) == returned
    shown = json.loads(alice.hpc_runner("show", first, "--json").stdout)
    assert shown["provenance_sha256"] == hashlib.sha256(record).hexdigest()
    assert shown["slurm_job_ids"] and shown["nodes"] == cluster.node
    assert (shown["image"]["path"], shown["image"]["sha256"]) == (str(image), cluster.image_sha256)

    # A replay from the same directory: the same spec, the same outputs, linked to the first.
    replayed = alice.hpc_runner("replay", first)
    assert replayed.returncode == 0, replayed.stderr
    second = replayed.stdout.splitlines()[-1]
    slurm_jobs.append(second)
    assert alice.wait_end(second, timeout=JOB_TIMEOUT_S)["state"] == "succeeded"
    again = json.loads(provenance(alice, second))
    assert again["predicate"]["buildDefinition"]["externalParameters"]["replay_of"] == {
        "job_id": first, "provenance_sha256": hashlib.sha256(record).hexdigest()}
    assert subjects(provenance(alice, second)) == returned

    # The returned files match the record; one changed byte does not.
    verified = alice.hpc_runner("verify-outputs", first, alice.workspace)
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.splitlines() == ["plots/b.dat: ok", "results/run/a.txt: ok"]
    changed = alice.workspace / "plots" / "b.dat"
    data = bytearray(changed.read_bytes())
    data[-1] ^= 1
    changed.write_bytes(bytes(data))
    failed = alice.hpc_runner("verify-outputs", first, alice.workspace)
    assert failed.returncode == 1
    assert failed.stdout.splitlines() == [
        f"plots/b.dat: differs: sha256 {hashlib.sha256(data).hexdigest()}, the record says "
        f"{returned['plots/b.dat']}", "results/run/a.txt: ok"]

    # The image at the policy's path changes, and the policy is pinned to the new bytes: the
    # replay is refused all the same, since it would not run what the record says ran.
    with image.open("ab") as appended:
        appended.write(b"\0")
    now = sha256sum(image)
    site.write_policy(records_policy(image, now))
    agent.send(signal.SIGHUP)
    agent.wait_for_log("policy reloaded")
    refused = alice.hpc_runner("replay", first)
    assert refused.returncode == 1
    assert (f"image 'test' at {image} is not the one job {first} ran: its sha256 is now {now}, "
            f"the record says {cluster.image_sha256}") in refused.stderr
    assert len(json.loads(alice.hpc_runner("status", "--json").stdout)) == 2  # nothing more queued
