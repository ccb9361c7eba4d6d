"""A busy cluster never looks like a failing test, on the real slurmctld and slurmd through a real
agent (executor slurm): a job pending in Slurm past its queue_time is taken out of the queue and
ends `expired` with how long and why it waited; over its account's max_concurrent_jobs a job
waits `queued` in the agent, saying why, and runs when a place is free."""

from __future__ import annotations

import re
from collections.abc import Callable

from conftest import (
    SERVICE_USER,
    TEST_IMAGE_NAME,
    AgentProcess,
    Cluster,
    RunnerSite,
    image_table,
    policy_document,
    toml_table,
    wait_for,
)

from integration import test_agent_slurm
from integration.test_agent_slurm import (
    JOB_TIMEOUT_S,
    LONG_SCRIPT,
    NEVER_RUNS,
    QueueUser,
    cancel,
    job_bytes,
    read_log,
    slurm_job_toml,
    squeue_lists,
    submit,
)
from runner.executors.slurm.tracker import DEFAULT_INTERVAL_SECONDS

# test_agent_slurm's fixtures: an agent config with executor slurm, alice, and the Slurm jobs to clean up.
slurm_site, alice = test_agent_slurm.slurm_site, test_agent_slurm.alice
slurm_jobs = test_agent_slurm.slurm_jobs

ENDED = ("succeeded", "failed", "cancelled", "timed_out", "denied", "infra_failed", "expired")
EXPIRED_DETAIL = re.compile(r"^waited (\d+)s in Slurm's queue, past its queue_time of 20s \(Slurm's reason: "
                            r"(Resources|Priority)\); taken out of the queue before it started$")


def limits_policy(cluster: Cluster, *, max_concurrent_jobs: int | None = None) -> str:
    caps = {"max_concurrent_jobs": max_concurrent_jobs} if max_concurrent_jobs is not None else {}
    return policy_document(
        toml_table("[accounts.esm]", slurm_account="esm", partitions=["debug"], max_time="2m",
                   max_memory="1G", max_queue_time="10m", **caps),
        image_table(cluster.image, cluster.image_sha256),
        toml_table("[[grants]]", name="esm-members", principals=["local:group:hpcr-esm"], account="esm",
                   images=[TEST_IMAGE_NAME]),
        toml_table("[[grants]]", name="service", principals=[f"local:user:{SERVICE_USER}"], account="esm",
                   images=[TEST_IMAGE_NAME]))


def test_a_job_pending_past_its_queue_time_expires_saying_how_long_and_why_and_leaves_slurm(
    slurm_site: RunnerSite, cluster: Cluster, agents: Callable[[RunnerSite], AgentProcess], alice: QueueUser,
    slurm_jobs: list[str],
) -> None:
    slurm_site.write_policy(limits_policy(cluster))
    agents(slurm_site)
    hog = submit(alice, slurm_jobs, slurm_job_toml("hog", LONG_SCRIPT, time="2m", cpus_per_task=2))
    alice.wait_state(hog, "running", timeout=JOB_TIMEOUT_S)
    wait_for(lambda: b"started\n" in read_log(slurm_site, hog), 30, what="the hog to start")
    waiting = submit(alice, slurm_jobs,
                     slurm_job_toml("waits", NEVER_RUNS, time="1m") + 'queue_time = "20s"\n')
    alice.wait_state(waiting, "pending", timeout=30)

    # 20 s from its submission, and the tracker's next look at Slurm.
    ended = alice.wait_state(waiting, *ENDED, timeout=20 + 3 * DEFAULT_INTERVAL_SECONDS + 30)

    assert ended["state"] == "expired", ended
    found = EXPIRED_DETAIL.match(ended["detail"] or "")
    assert found, ended["detail"]
    assert 20 <= int(found.group(1)) <= 20 + 3 * DEFAULT_INTERVAL_SECONDS + 10
    log = alice.hpc_runner("logs", waiting, binary=True).stdout
    assert f"hpc-runner: expired: {ended['detail']}\n".encode() in log
    assert re.search(rb"^hpc-runner: pending: (Resources|Priority)", log, re.MULTILINE), log
    assert b"must never run" not in log and job_bytes(log) == b""
    assert not squeue_lists(waiting)
    assert alice.status(hog)["state"] == "running"  # the expiry took only the waiting job out
    cancel(alice, hog)
    assert alice.wait_state(hog, *ENDED, timeout=JOB_TIMEOUT_S)["state"] == "cancelled"


def test_over_max_concurrent_jobs_a_job_waits_queued_with_the_reason_and_runs_when_the_first_ends(
    slurm_site: RunnerSite, cluster: Cluster, agents: Callable[[RunnerSite], AgentProcess], alice: QueueUser,
    slurm_jobs: list[str],
) -> None:
    slurm_site.write_policy(limits_policy(cluster, max_concurrent_jobs=1))
    agents(slurm_site)
    first_script = "echo first started\nsleep 20\necho first done\n"
    first = submit(alice, slurm_jobs, slurm_job_toml("first", first_script, time="1m"))
    alice.wait_state(first, "running", timeout=JOB_TIMEOUT_S)

    second = submit(alice, slurm_jobs, slurm_job_toml("second", "echo second ran\n", time="1m"))

    waits = b"hpc-runner: waiting in the agent's queue: account esm runs 1 of 1 jobs (max_concurrent_jobs)"
    wait_for(lambda: waits in read_log(slurm_site, second), 30, what="the second job to say why it waits")
    assert alice.status(second)["state"] == "queued"
    assert alice.status(first)["state"] == "running"
    assert not squeue_lists(second)  # it waits in the agent, not in Slurm

    assert alice.wait_state(first, *ENDED, timeout=JOB_TIMEOUT_S)["state"] == "succeeded"
    assert alice.wait_state(second, *ENDED, timeout=JOB_TIMEOUT_S)["state"] == "succeeded"
    log = read_log(slurm_site, second)
    assert log.index(waits) < log.index(b"hpc-runner: submitted to Slurm") < log.index(b"second ran\n")
