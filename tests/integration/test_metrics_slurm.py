"""An agent with `[metrics]` on the real Slurm cluster, scraped as Prometheus would: while a job
runs in Slurm it counts one running job, and afterwards the job's end and the Slurm commands that
ran it."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Callable
from pathlib import Path

from conftest import AgentProcess, Cluster, RunnerSite, make_runner_site, toml_table, wait_for
from prometheus_client.parser import text_string_to_metric_families

from integration import test_agent_slurm
from integration.test_agent_slurm import SLURM_ACCOUNT, slurm_job_toml, slurm_policy
from integration.test_local_queue import WAITING_SCRIPT, QueueUser

ALICE = "hpcr-alice"
JOB_TIMEOUT_S = 150.0
# Cancels in Slurm whatever of the test's jobs still runs at its end.
slurm_jobs = test_agent_slurm.slurm_jobs


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def scrape_until(port: int, holds: Callable[[Samples], bool], what: str) -> Samples:
    def scraped() -> Samples | None:
        samples = scrape(port)
        return samples if holds(samples) else None
    return wait_for(scraped, 30, interval=0.2, what=what)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(value for (sample, sample_labels), value in samples.items()
               if sample == name and wanted <= sample_labels)


def test_a_scraped_agent_counts_a_slurm_job_running_then_ended(
    cluster: Cluster, service_tmp: Path, shared_socket: Path, queue_users: dict[str, str],
    agents: Callable[[RunnerSite], AgentProcess], slurm_jobs: list[str]
) -> None:
    service_tmp.chmod(0o755)  # alice's workspace lives in it
    port = free_port()
    site = make_runner_site(service_tmp, cluster.image_sha256, socket=shared_socket, max_jobs=2,
                            executor="slurm", sections=[toml_table("[metrics]", listen=f"127.0.0.1:{port}")])
    site.write_policy(slurm_policy(cluster))
    agent = agents(site)
    agent.wait_for_log("metrics served")
    assert total(scrape(port), "hpc_runner_jobs_running") == 0

    alice = QueueUser(ALICE, site)
    job_id = alice.submit(slurm_job_toml("metered", WAITING_SCRIPT, time="1m"))
    slurm_jobs.append(job_id)
    alice.wait_state(job_id, "running", timeout=JOB_TIMEOUT_S)
    during = scrape_until(port, lambda s: total(s, "hpc_runner_jobs_running") == 1,
                          "the agent to count one running job")
    assert total(during, "hpc_runner_jobs_running", account=SLURM_ACCOUNT) == 1
    assert total(during, "hpc_runner_jobs_started_total", source="local", account=SLURM_ACCOUNT) == 1
    assert total(during, "hpc_runner_slurm_commands_total", command="sbatch", result="ok") == 1
    squeue_calls = total(during, "hpc_runner_slurm_commands_total", command="squeue")
    assert squeue_calls >= 1

    alice.release(job_id)
    ended = alice.wait_end(job_id, timeout=JOB_TIMEOUT_S)
    assert ended["state"] == "succeeded", ended
    # The log's last bytes reach the local queue's offset just after the end is recorded.
    after = scrape_until(port, lambda s: total(s, "hpc_runner_jobs_ended_total") == 1
                         and total(s, "hpc_runner_job_run_seconds_count") == 1, "the job's end to be counted")
    assert total(after, "hpc_runner_jobs_running") == 0
    assert total(after, "hpc_runner_jobs_queued") == 0
    assert total(after, "hpc_runner_jobs_ended_total", source="local", account=SLURM_ACCOUNT,
                 state="succeeded") == 1
    assert total(after, "hpc_runner_slurm_commands_total", command="squeue") > squeue_calls
    assert total(after, "hpc_runner_slurm_command_seconds_count", command="sbatch") == 1
    assert total(after, "hpc_runner_job_run_seconds_count", source="local") == 1
    assert total(after, "hpc_runner_log_bytes_forwarded_total", source="local") > 0
