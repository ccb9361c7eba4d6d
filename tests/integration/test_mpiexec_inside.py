"""`[job.mpi] launch = "inside"` on this machine's Slurm cluster and through the local executor: the
job's script runs once, pre-processes, starts ranks with `mpiexec` (twice), post-processes; what
mpiexec refuses; a failing rank's status; a channel that only its own job can reach; and, through
the agent on the two-node cluster, one MPI world started from inside across both nodes.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import textwrap
from pathlib import Path

import pytest
from conftest import (
    SERVICE_USER,
    Cluster,
    RunnerSite,
    TwoNodes,
    as_service_user,
    job_toml,
    make_runner_site,
    spawn_as_user,
    wait_for,
)

from integration.test_agent_slurm import SUBMITTED, job_bytes, log_lines, read_log, slurm_policy
from integration.test_local_queue import QueueUser
from integration.test_two_nodes import ALICE, start_agent, two_nodes_job, two_nodes_policy

JOB_TIMEOUT_S = 150.0

# Pre-processing writes the ranks' input; the first launch's ranks read it and each writes a file;
# post-processing counts them; a second launch (all tasks, the default) writes into the log.
PIPELINE = textwrap.dedent("""\
    mkdir -p out
    echo "pre-processed" >out/input.txt
    mpiexec -n 2 /bin/sh -c 'read -r line <out/input.txt && exec /usr/local/bin/mpi-hello >"out/hello.$$"'
    echo "post-processed: $(cat out/hello.* | grep -c '^rank ') ranks, $(grep -h '^world size' out/hello.*)"
    mpiexec /usr/local/bin/mpi-hello
    echo "after the second launch"
    mpiexec -n 1 /bin/sh -c 'echo "a rank fails"; exit 3' || echo "the script saw status $?"
    mpiexec -n 1000 /usr/local/bin/mpi-hello || echo "refused with status $?"
    mpiexec -n 1 /bin/sh -c 'test -e /opt/hpc-runner/mpiexec || echo "a rank has no channel"'
    echo "the command ran once"
    """)


def inside_job(name: str, script: str, *, tasks: int = 2) -> str:
    text = job_toml(name, script=script, tasks=tasks, mpi=True, time="2m")
    assert text.endswith("[job.mpi]\nenabled = true\n"), text
    return text + 'launch = "inside"\n'


def check_pipeline(output: str, workspace: Path) -> None:
    lines = output.splitlines()
    assert "post-processed: 2 ranks, world size 2" in lines, output
    # the second launch's ranks, in the job's log
    assert "world size 2" in lines and "allreduce sum 3" in lines, output
    assert lines.index("allreduce sum 3") < lines.index("after the second launch"), output
    assert "a rank fails" in lines, output
    assert any(line.startswith("the script saw status ") and line != "the script saw status 0"
               for line in lines), output
    assert "mpiexec: -n 1000 is more than this job's 2 tasks ([job.resources] tasks); nothing was started" \
        in lines, output
    assert "refused with status 2" in lines, output
    assert "a rank has no channel" in lines, output
    assert lines.count("the command ran once") == 1, output
    assert len(list((workspace / "out").glob("hello.*"))) == 2


def test_a_script_runs_mpiexec_between_its_steps_locally(runner_site: RunnerSite) -> None:
    job = runner_site.write_job("pipeline", inside_job("pipeline", PIPELINE))

    result = runner_site.run(job, timeout=JOB_TIMEOUT_S)

    assert result.returncode == 0, result.stdout + result.stderr
    check_pipeline(result.stdout, runner_site.workspace)


@pytest.fixture
def slurm_run_site(runner_site: RunnerSite, cluster: Cluster) -> RunnerSite:
    runner_site.write_policy(slurm_policy(cluster))
    return runner_site


def test_a_script_runs_mpiexec_between_its_steps_in_slurm(slurm_run_site: RunnerSite) -> None:
    job = slurm_run_site.write_job("pipeline", inside_job("pipeline", PIPELINE))

    result = slurm_run_site.run(job, "--executor", "slurm", timeout=JOB_TIMEOUT_S)

    assert result.returncode == 0, result.stdout + result.stderr
    assert SUBMITTED.match(result.stdout.encode()), result.stdout
    check_pipeline(result.stdout, slurm_run_site.workspace)


# Waits, with its channel open, until the test has tried to reach it from outside.
WAITING = textwrap.dedent("""\
    while [ ! -e /work/go ]; do sleep 0.1; done
    mpiexec -n 1 /bin/sh -c 'echo "own request ran"'
    """)
FOREIGN_NAME = "9-0"


def test_only_the_job_reaches_its_channel(runner_site: RunnerSite) -> None:
    # The request below is refused for its uid: this test's must differ from the job's.
    assert as_service_user(["id", "-u"]).stdout.strip() != str(os.getuid())
    first_workspace = runner_site.root / "first"
    first_workspace.mkdir(mode=0o755)
    account = pwd.getpwnam(SERVICE_USER)
    os.chown(first_workspace, account.pw_uid, account.pw_gid)
    job = runner_site.write_job("waiting", inside_job("waiting", WAITING, tasks=1))
    first = spawn_as_user(SERVICE_USER, ["hpc-runner", "run", job, "--config", runner_site.config,
                                         "--workdir", first_workspace],
                          cwd=runner_site.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        channels = wait_for(lambda: list(runner_site.work_root.glob("*/tmp/mpiexec")), 60,
                            what="the first job's channel")
        channel = channels[0]
        # A request of another uid (this test's), whole before it appears, as the shim would write it.
        request = b"".join(word + b"\0" for word in (b"-n", b"1", b"-wd", b"/work", b"--", b"/bin/sh", b"-c",
                                                      b"echo foreign request ran"))
        for suffix, data in (("req", request), ("ready", b"")):
            staged = channel / f".{FOREIGN_NAME}.{suffix}"
            staged.write_bytes(data)
            staged.rename(channel / f"{FOREIGN_NAME}.{suffix}")
        wait_for(lambda: (channel / f"{FOREIGN_NAME}.status").exists(), 30, what="the launcher's answer")
        assert (channel / f"{FOREIGN_NAME}.status").read_text() == "126\n"

        # Another job, while the first one's channel holds that request, sees no such path.
        other = runner_site.write_job("other", job_toml("other", script=textwrap.dedent("""\
            if [ -e /opt/hpc-runner/mpiexec ]; then ls -A /opt/hpc-runner/mpiexec; else echo "no channel"; fi
            """), mpi=True, tasks=1, time="1m"))
        seen = runner_site.run(other, timeout=JOB_TIMEOUT_S)
        assert seen.returncode == 0 and "no channel" in seen.stdout.splitlines(), seen.stdout + seen.stderr
        # Another inside job sees its own channel only, empty of the first job's requests.
        listing = 'echo "entries: $(ls -A /opt/hpc-runner/mpiexec | wc -l)"\n'
        own = runner_site.run(runner_site.write_job("own", inside_job("own", listing, tasks=1)),
                              timeout=JOB_TIMEOUT_S)
        assert own.returncode == 0 and "entries: 0" in own.stdout.splitlines(), own.stdout + own.stderr

        (first_workspace / "go").touch()
        out, err = first.communicate(timeout=JOB_TIMEOUT_S)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, out + err
    assert f"hpc-runner: mpiexec: refused request {FOREIGN_NAME}: {FOREIGN_NAME}.ready was written by uid " \
        f"{os.getuid()}, not by this job" in out, out
    assert "foreign request ran" not in out
    assert "own request ran" in out.splitlines()


# -- across the two-node cluster ---------------------------------------------------------------

# The command says where it runs once; each rank says where it runs, then becomes mpi-hello.
ACROSS = textwrap.dedent("""\
    echo "the command runs on $(hostname)"
    mpiexec -n 2 /bin/sh -c 'echo "rank $PMIX_RANK runs on $(hostname)"; exec /usr/local/bin/mpi-hello'
    echo "after the ranks"
    """)


def test_an_inside_job_starts_one_world_across_two_nodes(
    cluster: Cluster, two_nodes: TwoNodes, two_nodes_tmp: Path, shared_socket: Path,
    queue_users: dict[str, str]
) -> None:
    site = make_runner_site(two_nodes_tmp, cluster.image_sha256, socket=shared_socket, max_jobs=4,
                            executor="slurm",
                            policy_text=two_nodes_policy(cluster, two_nodes, retry_node_failures=False))
    agent = start_agent(site, two_nodes)
    try:
        alice = QueueUser(ALICE, site)
        job = two_nodes_job("inside-across", script=ACROSS, nodes=2, tasks=2, mpi=True)
        job_id = alice.submit(job + 'launch = "inside"\n')

        finished = alice.wait_end(job_id)
    finally:
        agent.stop()
        two_nodes.slurm("scancel", f"--user={SERVICE_USER}", check=False)

    log = read_log(site, job_id)
    assert finished["state"] == "succeeded", (finished, log)
    lines = [line.decode().rstrip("\n") for line in log_lines(job_bytes(log))]
    # the command once, on the allocation's first node; the ranks one on each node, one world
    commands = [line for line in lines if line.startswith("the command runs on ")]
    assert commands == [f"the command runs on {two_nodes.nodes[0]}"], log
    where = {line for line in lines if line.startswith("rank ") and " runs on " in line}
    assert {line.split()[-1] for line in where} == set(two_nodes.nodes), log
    assert {"rank 0 of 2", "rank 1 of 2", "world size 2", "allreduce sum 3"} <= set(lines), log
    assert lines.index("allreduce sum 3") < lines.index("after the ranks"), log
