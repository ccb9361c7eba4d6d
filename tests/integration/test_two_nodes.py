"""Multi-node jobs through the real agent, on the two-node cluster of deploy/dev/two-nodes.sh.

The agent (`executor = "slurm"`) runs as the service account with `SLURM_CONF` pointing at the
two-node cluster's configuration, which every Slurm command it starts inherits; the two nodes
are slurmd daemons in network, mount and UTS namespaces of their own, so a job across them is a
real multi-node job and a node whose link goes down is a real node failure. Everything a job
touches lives under the cluster's shared directory: each node's /tmp is its own.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import (
    SERVICE_USER,
    TEST_IMAGE_NAME,
    AgentProcess,
    Cluster,
    NodeLinks,
    RunnerSite,
    TwoNodes,
    image_table,
    make_runner_site,
    policy_document,
    spawn_as_user,
    toml_string,
    toml_table,
    wait_for,
)

from integration.test_agent_slurm import SUBMITTED, job_bytes, log_lines, read_log, stored_job
from integration.test_local_queue import QueueUser
from runner.executors.slurm.plan import BATCH_SCRIPT_NAME

REPO = Path(__file__).resolve().parents[2]
ALICE = "hpcr-alice"
# Both nodes share this machine's CPUs with whatever else runs on it: waits for a job are generous.
JOB_TIMEOUT_S = 150.0
# slurmctld marks a node that stopped answering down after SlurmdTimeout (10 s) and its next ping,
# about 20 s; its jobs then end NODE_FAIL. The agent must have told the end within this bound.
NODE_FAILURE_BOUND_S = 90.0


def two_nodes_policy(cluster: Cluster, two_nodes: TwoNodes, *, retry_node_failures: bool) -> str:
    """The account esm on the two-node cluster's partition: two nodes, one GPU; alice's group may
    run MPI jobs and ask for GPUs."""
    return policy_document(
        toml_table("[accounts.esm]", slurm_account=two_nodes.account, partitions=[two_nodes.partition],
                   max_nodes=2, max_gpus=1, max_time="3m", max_memory="1G",
                   retry_node_failures=retry_node_failures),
        image_table(cluster.image, cluster.image_sha256),
        toml_table("[[grants]]", name="esm-members", principals=["local:group:hpcr-esm"], account="esm",
                   images=[TEST_IMAGE_NAME], mpi=True, gpus=True))


def start_agent(site: RunnerSite, two_nodes: TwoNodes, timeout: float = 20.0) -> AgentProcess:
    """`hpc-runner agent` as the service account, its Slurm commands aimed at the two-node cluster."""
    stderr_path = site.root / f"agent-{time.monotonic_ns()}.log"
    with stderr_path.open("wb") as stderr:
        process = spawn_as_user(SERVICE_USER, ["hpc-runner", "agent", "--config", site.config], cwd=site.root,
                                env=two_nodes.env, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr)
    agent = AgentProcess(process, site, stderr_path)
    try:
        agent.wait_for_log("local queue listening", timeout)
    except BaseException:
        agent.stop()
        raise
    return agent


@pytest.fixture
def site_factory(cluster: Cluster, two_nodes: TwoNodes, two_nodes_tmp: Path, shared_socket: Path,
                 queue_users: dict[str, str]) -> Iterator[Callable[[bool], RunnerSite]]:
    """`site_factory(retry_node_failures)`: an agent on the two-node cluster, running, with alice's
    group allowed; the agent is stopped and its jobs cancelled after the test."""
    agents: list[AgentProcess] = []

    def make(retry_node_failures: bool) -> RunnerSite:
        site = make_runner_site(two_nodes_tmp, cluster.image_sha256, socket=shared_socket, max_jobs=4,
                                executor="slurm",
                                policy_text=two_nodes_policy(cluster, two_nodes,
                                                             retry_node_failures=retry_node_failures))
        agents.append(start_agent(site, two_nodes))
        return site

    yield make
    for agent in agents:
        agent.stop()
        # Whatever of this test still runs in Slurm (its jobs run in directories under the site's
        # work root); other jobs of the service account on the cluster are not this test's.
        listed = two_nodes.slurm("squeue", "-h", f"--user={SERVICE_USER}", "-o", "%i %Z", check=False).stdout
        ours = [line.split()[0] for line in listed.splitlines()
                if len(line.split()) == 2 and Path(line.split()[1]).is_relative_to(agent.site.work_root)]
        if ours:
            two_nodes.slurm("scancel", *ours, check=False)


def two_nodes_job(name: str, *, command: list[str] | None = None, script: str | None = None, nodes: int = 1,
                  tasks: int = 1, mpi: bool = False, gpus: int = 0, time: str = "2m") -> str:
    lines = ["[job]", f"name = {toml_string(name)}", f"image = {toml_string(TEST_IMAGE_NAME)}"]
    if command is not None:
        lines.append("command = [" + ", ".join(toml_string(arg) for arg in command) + "]")
    if script is not None:
        lines.append("script = '''\n" + script + "'''")
    lines += ["", "[job.resources]", f"time = {toml_string(time)}", f"nodes = {nodes}", f"tasks = {tasks}",
              'memory = "256M"']
    if gpus:
        lines.append(f"gpus = {gpus}")
    if mpi:
        lines += ["", "[job.mpi]", "enabled = true"]
    return "\n".join(lines) + "\n"


def slurm_ids(log: bytes) -> list[str]:
    return [match[0].decode() for match in SUBMITTED.findall(log)]


def sacct_fields(two_nodes: TwoNodes, slurm_id: str, *fields: str) -> dict[str, str]:
    """The allocation's line of `sacct -X` (what accounting recorded), fields by name: the one
    submitted last under that id, as a cluster whose controller state was made anew numbers its
    jobs from the start again while accounting keeps the earlier ones (`-D` lists them all)."""
    columns = ",".join(("Submit", *fields))
    result = two_nodes.slurm("sacct", "-n", "-X", "-P", "-D", "-j", slurm_id, "-o", columns)
    lines = [line.split("|") for line in result.stdout.strip().splitlines()]
    assert lines, result.stdout
    latest = max(lines, key=lambda values: values[0])
    return dict(zip(fields, latest[1:], strict=True))


def job_node(two_nodes: TwoNodes, slurm_id: str) -> str:
    """The node list of a job that runs or ran (scontrol while it is known, then sacct)."""
    def known() -> str | None:
        fields = two_nodes.slurm("scontrol", "show", "job", "-o", slurm_id, check=False).stdout
        match = re.search(r"(?:^|\s)NodeList=(\S+)", fields)
        return match.group(1) if match and match.group(1) != "(null)" else None

    return wait_for(known, 30, interval=0.2, what=f"Slurm job {slurm_id} to have a node")


def wait_for_log(site: RunnerSite, job_id: str, needle: bytes, timeout: float = JOB_TIMEOUT_S) -> bytes:
    return wait_for(lambda: (log if needle in (log := read_log(site, job_id)) else None), timeout,
                    interval=0.2, what=f"{needle!r} in job {job_id}'s log")


# -- one MPI world across the nodes ------------------------------------------------------------

# Each rank says where it runs before it becomes mpi-hello (exec: the same process, so the same
# rank and node), which then prints its rank line and rank 0 the allreduce of both.
WHERE_AND_HELLO = 'echo "rank $PMIX_RANK runs on $(hostname)"; exec /usr/local/bin/mpi-hello'


def test_a_two_node_mpi_job_is_one_world_with_a_rank_on_each_node(
    site_factory: Callable[[bool], RunnerSite], two_nodes: TwoNodes
) -> None:
    site = site_factory(False)
    alice = QueueUser(ALICE, site)
    job_id = alice.submit(two_nodes_job("across", command=["/bin/sh", "-c", WHERE_AND_HELLO], nodes=2,
                                        tasks=2, mpi=True))

    finished = alice.wait_end(job_id)

    log = read_log(site, job_id)
    assert finished["state"] == "succeeded", (finished, log)
    lines = {line.decode().rstrip("\n") for line in log_lines(job_bytes(log))}
    assert {"rank 0 of 2", "rank 1 of 2", "world size 2", "allreduce sum 3"} <= lines, log
    where = {line for line in lines if " runs on " in line}
    assert {line.split()[-1] for line in where} == set(two_nodes.nodes), log
    assert {line.split()[1] for line in where} == {"0", "1"}, log
    (slurm_id,) = slurm_ids(log)
    recorded = sacct_fields(two_nodes, slurm_id, "Cluster", "Account", "NNodes", "NodeList", "State")
    assert recorded == {"Cluster": two_nodes.cluster_name, "Account": two_nodes.account, "NNodes": "2",
                        "NodeList": "node[1-2]", "State": "COMPLETED"}, recorded


# -- node failures -----------------------------------------------------------------------------

# The first attempt waits for the node to fail; a second one (after a node failure) ends at once.
# The marker is in the job's scratch directory (/tmp in the sandbox): on the shared directory,
# not on a node, so both attempts of the job see it wherever they run.
TWO_ATTEMPTS_SCRIPT = textwrap.dedent("""\
    if [ -e /tmp/attempted ]; then echo "second attempt on $(hostname)"; exit 0; fi
    touch /tmp/attempted
    echo "first attempt on $(hostname)"
    sleep 150
    echo the node never failed
    """)


def test_a_job_whose_node_loses_its_link_runs_again_on_the_other_node(
    site_factory: Callable[[bool], RunnerSite], two_nodes: TwoNodes, node_links: NodeLinks
) -> None:
    site = site_factory(True)
    alice = QueueUser(ALICE, site)
    job_id = alice.submit(two_nodes_job("lost-node", script=TWO_ATTEMPTS_SCRIPT, time="3m"))
    log = wait_for_log(site, job_id, b"first attempt on ")
    (first_id,) = slurm_ids(log)
    lost = job_node(two_nodes, first_id)
    assert lost in two_nodes.nodes

    node_links.take_down(lost)
    cut = time.monotonic()
    finished = alice.wait_end(job_id, timeout=NODE_FAILURE_BOUND_S + JOB_TIMEOUT_S)

    log = read_log(site, job_id)
    assert finished["state"] == "succeeded", (finished, log)
    (other,) = set(two_nodes.nodes) - {lost}
    ours = [line for line in log_lines(job_bytes(log)) if not line.startswith((b"srun:", b"slurmstepd"))]
    assert ours == [f"first attempt on {lost}\n".encode(), f"second attempt on {other}\n".encode()], log
    assert b"a node of the job failed (NODE_FAIL)" in log and b"submitting it again, once" in log, log
    first, second = slurm_ids(log)
    assert first == first_id
    assert sacct_fields(two_nodes, first, "State", "NodeList") == {"State": "NODE_FAIL", "NodeList": lost}
    assert sacct_fields(two_nodes, second, "State", "NodeList") == {"State": "COMPLETED", "NodeList": other}
    stored = stored_job(site, job_id)
    assert stored.slurm_id == second and stored.final_status_entries == 1, stored
    # The resubmission was prompt: the job's end came within the bound of the cut plus a second
    # run that ends at once (the wait above allowed it longer, so a slow path fails here).
    assert time.monotonic() - cut < NODE_FAILURE_BOUND_S + 60, "the job ended too long after the cut"


def test_a_two_node_job_that_loses_a_node_ends_infra_failed_with_the_reason(
    site_factory: Callable[[bool], RunnerSite], two_nodes: TwoNodes, node_links: NodeLinks
) -> None:
    site = site_factory(False)
    alice = QueueUser(ALICE, site)
    job_id = alice.submit(two_nodes_job("both-nodes", script=TWO_ATTEMPTS_SCRIPT, nodes=2, tasks=2,
                                        time="3m"))
    wait_for_log(site, job_id, b"first attempt on ")
    lost = two_nodes.nodes[-1]

    node_links.take_down(lost)
    cut = time.monotonic()
    finished = alice.wait_end(job_id, timeout=NODE_FAILURE_BOUND_S)
    ended_after = time.monotonic() - cut

    log = read_log(site, job_id)
    assert finished["state"] == "infra_failed", (finished, log)
    assert ended_after < NODE_FAILURE_BOUND_S
    assert b"a node of the job failed (NODE_FAIL)" in log, log
    assert b"second attempt" not in log and b"submitting it again" not in log, log
    (slurm_id,) = slurm_ids(log)
    assert sacct_fields(two_nodes, slurm_id, "State")["State"] == "NODE_FAIL"
    assert stored_job(site, job_id).final_status_entries == 1


def test_a_two_node_job_submitted_again_after_a_node_failure_waits_for_the_node_and_then_runs(
    site_factory: Callable[[bool], RunnerSite], two_nodes: TwoNodes, node_links: NodeLinks
) -> None:
    site = site_factory(True)
    alice = QueueUser(ALICE, site)
    job_id = alice.submit(two_nodes_job("wait-for-node", script=TWO_ATTEMPTS_SCRIPT, nodes=2, tasks=2,
                                        time="3m"))
    wait_for_log(site, job_id, b"first attempt on ")
    lost = two_nodes.nodes[-1]

    node_links.take_down(lost)
    # The second submission cannot start while a node of the two is down: Slurm keeps it pending,
    # and the job's log says so (not a silent wait).
    def pending_again() -> bytes | None:
        log = read_log(site, job_id)
        since = log.rpartition(b"hpc-runner: submitted to Slurm as job")[2]
        return log if len(slurm_ids(log)) == 2 and b"hpc-runner: pending" in since else None

    log = wait_for(pending_again, NODE_FAILURE_BOUND_S, interval=0.5, what="the second submission, pending")
    assert alice.status(job_id)["state"] == "pending", log
    node_links.restore()
    finished = alice.wait_end(job_id, timeout=JOB_TIMEOUT_S)

    log = read_log(site, job_id)
    assert finished["state"] == "succeeded", (finished, log)
    assert b"a node of the job failed (NODE_FAIL)" in log and b"submitting it again, once" in log, log
    first, second = slurm_ids(log)
    assert sacct_fields(two_nodes, first, "State")["State"] == "NODE_FAIL"
    assert sacct_fields(two_nodes, second, "State", "NNodes") == {"State": "COMPLETED", "NNodes": "2"}
    assert stored_job(site, job_id).final_status_entries == 1


# -- GPUs --------------------------------------------------------------------------------------


def test_a_gpu_job_is_scheduled_on_the_gres_node_with_nv(
    site_factory: Callable[[bool], RunnerSite], two_nodes: TwoNodes
) -> None:
    site = site_factory(False)
    alice = QueueUser(ALICE, site)
    script = 'echo "gpu job on $(hostname) with CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset}"\n'
    job_id = alice.submit(two_nodes_job("gpu", script=script, gpus=1))

    finished = alice.wait_end(job_id)

    log = read_log(site, job_id)
    (slurm_id,) = slurm_ids(log)
    # What Slurm did: the job went to the one node with a GPU, which accounting charged.
    recorded = sacct_fields(two_nodes, slurm_id, "NodeList", "AllocTRES")
    assert recorded["NodeList"] == two_nodes.gpu_node, recorded
    assert "gres/gpu=1" in recorded["AllocTRES"].split(","), recorded
    # What the agent planned: --gpus for Slurm, --nv for Apptainer.
    batch = (site.work_root / job_id / BATCH_SCRIPT_NAME).read_text()
    assert "--gpus=1" in batch and "--nv" in batch, batch
    # The node has no GPU and no driver, and Apptainer's --nv then binds nothing: the job runs,
    # on the GRES node, and sees the device Slurm bound it to.
    assert finished["state"] == "succeeded", (finished, log)
    assert job_bytes(log) == f"gpu job on {two_nodes.gpu_node} with CUDA_VISIBLE_DEVICES=0\n".encode(), log
    assert stored_job(site, job_id).final_status_entries == 1


# -- the benchmark -----------------------------------------------------------------------------


def test_the_two_node_latency_benchmark_runs_and_writes_its_results(two_nodes: TwoNodes, tmp_path: Path
                                                                    ) -> None:
    """bench/two_node_latency.py --quick works end to end (what it measures is not checked: timings
    on a shared machine are no pass/fail criterion)."""
    output = tmp_path / "two_node_latency.json"
    result = subprocess.run([sys.executable, str(REPO / "bench" / "two_node_latency.py"), "--quick",
                             "--output", str(output)], cwd=REPO, capture_output=True, text=True, timeout=600,
                            check=False)

    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "| variant |" in result.stdout
    data = json.loads(output.read_text())
    assert data["benchmark"] == "two_node_latency" and data["quick"] is True
    assert set(data["sizes"]) == {"4", "1048576"}
    for size, entry in data["sizes"].items():
        assert set(entry["variants"]) == {"bare host MPI", "sandbox"}
        commands = data["commands"][size]
        # Both launched by the same srun options; only the sandbox goes through Apptainer.
        assert commands["sandbox"][:5] == commands["bare host MPI"][:5]
        assert "--mpi=pmix" in commands["bare host MPI"] and "apptainer" not in commands["bare host MPI"]
        assert "apptainer" in commands["sandbox"]
