"""No process of a local MPI job outlives its walltime or Ctrl-C.

Apptainer moves each rank's processes into process groups of their own (and under `--sharens`
its signal forwarding does not reach them), so ending the launcher's process group is not
enough. These jobs run through `hpc-runner run` as the service account, with the real Apptainer,
the test image and the host Open MPI; afterwards nothing may remain of them, neither in the
launcher's session nor anywhere with the job's id in its environment.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from conftest import SERVICE_USER, OutputReader, RunnerSite, job_toml, spawn_as_user, wait_for

JOB_TIMEOUT_S = 60.0
# Time enough for both ranks to start beating on a loaded machine.
WALLTIME = "8s"
# Long enough for a killed container to be torn down on a loaded machine; processes that
# survive their job run for a minute (see HEARTBEAT), far beyond it.
GONE_TIMEOUT_S = 5.0
# Each rank says it started, then appends a line to its heartbeat file in the workspace every
# 0.2 s for a minute: far longer than any job below lets it run.
HEARTBEAT = (
    'i=0\n'
    'while [ "$i" -lt 300 ]; do\n'
    '    echo beat >> "/work/heartbeat-$OMPI_COMM_WORLD_RANK"; i=$((i + 1)); sleep 0.2\n'
    'done\n'
)
BEATING = 'echo "rank $OMPI_COMM_WORLD_RANK beating"\n' + HEARTBEAT
# Ignoring SIGTERM (as its `sleep` does too) makes a rank wait for SIGKILL: what Apptainer and
# mpirun pass on of SIGTERM cannot end it early, by luck of timing.
IGNORING_SIGTERM = "trap '' TERM\n"
# Each rank leaves its heartbeat running in the background, as a daemon would (its output
# elsewhere, or mpirun would wait for it), and ends once the heartbeat has begun.
LEAVES_A_HEARTBEAT = (
    IGNORING_SIGTERM + '(\n' + HEARTBEAT + ') >/dev/null 2>&1 &\n'
    'while [ ! -s "/work/heartbeat-$OMPI_COMM_WORLD_RANK" ]; do sleep 0.05; done\n'
    'echo "rank $OMPI_COMM_WORLD_RANK beating"\n'
)
RANKS = 2
BEATING_LINES = [f"rank {rank} beating".encode() for rank in range(RANKS)]


@dataclass(frozen=True)
class ProcessEntry:
    pid: int
    ppid: int
    sid: int
    zombie: bool


def process_table() -> dict[int, ProcessEntry]:
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path("/proc", name, "stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2:].split()
        table[int(name)] = ProcessEntry(int(name), int(fields[1]), int(fields[3]), fields[0] == b"Z")
    return table


def describe(pid: int) -> str:
    try:
        cmdline = Path("/proc", str(pid), "cmdline").read_bytes()
    except OSError:
        return f"{pid} (gone)"
    return f"{pid} {cmdline.replace(bytes(1), b' ').decode(errors='replace')[:200]}"


def carries_job_id(pid: int, job_id: str) -> bool:
    try:
        environ = Path("/proc", str(pid), "environ").read_bytes()
    except OSError:
        return False
    return f"HPC_RUNNER_JOB_ID={job_id}".encode() in environ.split(b"\0")


def job_processes(session: int, job_id: str | None) -> list[int]:
    """Running processes in the launcher's session, or (inside the container) with the job's id."""
    return [entry.pid for entry in process_table().values()
            if not entry.zombie
            and (entry.sid == session or (job_id is not None and carries_job_id(entry.pid, job_id)))]


def assert_no_process_left(session: int, job_id: str) -> None:
    try:
        wait_for(lambda: not job_processes(session, job_id), GONE_TIMEOUT_S,
                 what=f"the processes of job {job_id} to end")
    except AssertionError:
        left = [describe(pid) for pid in job_processes(session, job_id)]
        raise AssertionError(f"{len(left)} processes of job {job_id} outlived it:\n"
                             + "\n".join(left)) from None


@dataclass
class RunningJob:
    """`hpc-runner run` of one job, with the session of the job's launcher (mpirun)."""

    process: subprocess.Popen[bytes]
    stdout: OutputReader
    session: int
    job_id: str

    def finish(self) -> tuple[int, str, str]:
        """Exit status, stdout and stderr of `run`, once it has exited."""
        code = self.process.wait(JOB_TIMEOUT_S)
        assert self.process.stderr is not None
        stderr = self.process.stderr.read().decode()
        return code, self.stdout.read_to_end(JOB_TIMEOUT_S).decode(), stderr


def launcher_session(run_pid: int) -> int | None:
    """The job's launcher: the child of `run` that leads a session of its own."""
    leaders = [entry.pid for entry in process_table().values()
               if entry.ppid == run_pid and entry.sid == entry.pid]
    return leaders[0] if len(leaders) == 1 else None


def job_id_of(site: RunnerSite) -> str:
    """The id of the one job run with this site: the name of its directory under work_root."""
    (job_dir,) = site.work_root.iterdir()
    return job_dir.name


@contextmanager
def running(site: RunnerSite, job: Path) -> Iterator[RunningJob]:
    """Start `run`; yield once every rank has said it is beating. Whatever the test's outcome,
    nothing of the job is left running afterwards."""
    process = spawn_as_user(SERVICE_USER, ["hpc-runner", "run", job, "--config", site.config,
                                           "--workdir", site.workspace],
                            cwd=site.root, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    session = job_id = None
    try:
        stdout = OutputReader(process.stdout)
        session = wait_for(lambda: launcher_session(process.pid), JOB_TIMEOUT_S, interval=0.05,
                           what="the job's launcher to start")
        job_id = job_id_of(site)
        for line in BEATING_LINES:
            stdout.wait_for(line, JOB_TIMEOUT_S)
        yield RunningJob(process, stdout, session, job_id)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        # A failed test must not leave a minute of heartbeats behind on a shared machine.
        if session is not None:
            for pid in job_processes(session, job_id):
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def heartbeats(site: RunnerSite) -> list[int]:
    """How many beats each rank wrote."""
    return [len((site.workspace / f"heartbeat-{rank}").read_text().splitlines()) for rank in range(RANKS)]


def beating_job(site: RunnerSite, name: str, script: str, time: str | None = None) -> Path:
    return site.write_job(name, job_toml(name, command=["/bin/sh", "-c", script], tasks=RANKS, mpi=True,
                                         time=time))


def test_no_rank_of_an_mpi_job_outlives_its_walltime(runner_site: RunnerSite) -> None:
    job = beating_job(runner_site, "mpi-overrun", IGNORING_SIGTERM + BEATING, time=WALLTIME)

    with running(runner_site, job) as run:
        code, stdout, stderr = run.finish()

        assert code == 124, f"stdout:\n{stdout}\nstderr:\n{stderr}"
        assert f"timed_out: walltime of {WALLTIME} exceeded" in stderr
        assert f"hpc-runner: walltime of {WALLTIME} exceeded; sent SIGKILL" in stdout
        assert all(beats > 0 for beats in heartbeats(runner_site))
        assert_no_process_left(run.session, run.job_id)


def test_no_rank_of_an_mpi_job_outlives_ctrl_c(runner_site: RunnerSite) -> None:
    job = beating_job(runner_site, "mpi-interrupted", BEATING)

    with running(runner_site, job) as run:
        run.process.send_signal(signal.SIGINT)
        code, stdout, stderr = run.finish()

        assert code == 130, f"stdout:\n{stdout}\nstderr:\n{stderr}"
        assert f"job {run.job_id} cancelled: cancelled" in stderr
        assert "hpc-runner: job cancelled; sent SIGTERM" in stdout
        assert_no_process_left(run.session, run.job_id)


def test_what_the_ranks_of_an_mpi_job_leave_in_the_background_does_not_outlive_its_walltime(
    runner_site: RunnerSite,
) -> None:
    # The ranks' own shells are gone; their heartbeats, re-parented to `run`, keep Apptainer and
    # so mpirun waiting until the walltime.
    job = beating_job(runner_site, "mpi-leaves-heartbeats", LEAVES_A_HEARTBEAT, time=WALLTIME)

    with running(runner_site, job) as run:
        code, stdout, stderr = run.finish()

        assert code == 124, f"stdout:\n{stdout}\nstderr:\n{stderr}"
        assert f"timed_out: walltime of {WALLTIME} exceeded" in stderr
        assert_no_process_left(run.session, run.job_id)
