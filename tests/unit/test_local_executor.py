"""The local executor: exact environment, one log for both streams, walltime, cancellation, no strays."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import wait_until

from runner.errors import InfrastructureError
from runner.executors.local import (
    MIN_MEMORY_LIMIT_BYTES,
    LocalExecutor,
    LocalLaunch,
    ProcessInfo,
    job_processes,
    memory_limit,
    parse_stat,
)
from runner.job import Outcome

DEADLINE_S = 10.0
ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}


def launch(tmp_path: Path, script: str, *, walltime: float = 30.0, grace: float = 5.0,
           env: dict[str, str] | None = None) -> LocalLaunch:
    return LocalLaunch(argv=("/bin/sh", "-c", script), env=ENV if env is None else env,
                       cwd=str(tmp_path), log_path=tmp_path / "job.log", walltime_seconds=walltime,
                       grace_seconds=grace)


def log_of(spec: LocalLaunch) -> str:
    return spec.log_path.read_text() if spec.log_path.exists() else ""


def group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


async def cancel_once_logged(spec: LocalLaunch, started: Callable[[str], bool],
                             what: str = "the job to start") -> tuple[Outcome, float]:
    """Run `spec` and set its cancel event once `started` holds for its log (`what` names that
    moment); its outcome, and how many seconds it took to end after the cancel."""
    cancel = asyncio.Event()
    running = asyncio.ensure_future(LocalExecutor().run(spec, cancel))
    await wait_until(lambda: started(log_of(spec)), what)
    cancel.set()
    cancelled_at = time.monotonic()
    outcome = await asyncio.wait_for(running, DEADLINE_S)
    return outcome, time.monotonic() - cancelled_at


def leader_pid(spec: LocalLaunch) -> int:
    """The job scripts print `leader=$$` first: the shell is the group leader, its pid the pgid."""
    found = re.search(r"leader=(\d+)", log_of(spec))
    assert found, log_of(spec)
    return int(found.group(1))


@pytest.fixture
def umask_077() -> Iterator[None]:
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


# --- exit statuses -------------------------------------------------------------------------------

async def test_success(tmp_path: Path) -> None:
    spec = launch(tmp_path, "echo hello")
    assert await LocalExecutor().run(spec) == Outcome("succeeded", 0, "exit status 0")
    assert log_of(spec) == "hello\n"


async def test_exit_status_3_comes_back_as_3(tmp_path: Path) -> None:
    outcome = await LocalExecutor().run(launch(tmp_path, "exit 3"))
    assert outcome == Outcome("failed", 3, "exit status 3")


async def test_death_by_signal_is_128_plus_n_and_named(tmp_path: Path) -> None:
    outcome = await LocalExecutor().run(launch(tmp_path, "kill -SEGV $$"))
    assert outcome.state == "failed"
    assert outcome.exit_status == 128 + 11
    assert "SIGSEGV" in outcome.detail


# --- what the job sees ---------------------------------------------------------------------------

async def test_the_environment_is_exactly_the_given_one(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPC_RUNNER_AGENT_SECRET", "must not leak")
    spec = LocalLaunch(argv=("/usr/bin/env",), env={"PATH": "/usr/bin:/bin", "FOO": "bar baz"},
                       cwd=str(tmp_path), log_path=tmp_path / "job.log", walltime_seconds=30)
    assert (await LocalExecutor().run(spec)).state == "succeeded"
    assert sorted(log_of(spec).splitlines()) == ["FOO=bar baz", "PATH=/usr/bin:/bin"]


async def test_stdin_is_dev_null_and_cwd_is_applied(tmp_path: Path) -> None:
    spec = launch(tmp_path, "readlink /proc/self/fd/0; pwd; cat; echo end")
    assert (await LocalExecutor().run(spec)).state == "succeeded"
    assert log_of(spec) == f"/dev/null\n{tmp_path}\nend\n"


async def test_the_job_leads_its_own_session(tmp_path: Path) -> None:
    code = "import os; print(os.getsid(0) == os.getpid() == os.getpgid(0))"
    spec = LocalLaunch(argv=(sys.executable, "-c", code), env={}, cwd=str(tmp_path),
                       log_path=tmp_path / "job.log", walltime_seconds=30)
    assert (await LocalExecutor().run(spec)).state == "succeeded"
    assert log_of(spec) == "True\n"


async def test_stdout_and_stderr_interleave_in_order_in_one_file(tmp_path: Path) -> None:
    script = "for i in 1 2 3 4 5; do echo out$i; echo err$i >&2; done"
    spec = launch(tmp_path, script)
    assert (await LocalExecutor().run(spec)).state == "succeeded"
    assert log_of(spec).split() == [f"{stream}{i}" for i in range(1, 6) for stream in ("out", "err")]


async def test_the_log_is_appended_to_and_created_0640(tmp_path: Path, umask_077: None) -> None:
    spec = launch(tmp_path, "echo second")
    assert (await LocalExecutor().run(spec)).state == "succeeded"
    assert stat.S_IMODE(spec.log_path.stat().st_mode) == 0o640
    spec.log_path.chmod(0o600)
    spec.log_path.write_text("first\n")
    assert (await LocalExecutor().run(spec)).state == "succeeded"
    assert log_of(spec) == "first\nsecond\n"
    # An existing log keeps the mode it has.
    assert stat.S_IMODE(spec.log_path.stat().st_mode) == 0o600


async def test_a_program_that_cannot_start_is_an_infrastructure_error(tmp_path: Path) -> None:
    spec = LocalLaunch(argv=("/nonexistent/apptainer", "exec"), env=ENV, cwd=str(tmp_path),
                       log_path=tmp_path / "job.log", walltime_seconds=30)
    with pytest.raises(InfrastructureError, match="/nonexistent/apptainer"):
        await LocalExecutor().run(spec)
    assert "hpc-runner: cannot start /nonexistent/apptainer" in log_of(spec)


async def test_a_missing_log_directory_is_an_infrastructure_error(tmp_path: Path) -> None:
    spec = LocalLaunch(argv=("/bin/true",), env=ENV, cwd=str(tmp_path),
                       log_path=tmp_path / "missing" / "job.log", walltime_seconds=30)
    with pytest.raises(InfrastructureError, match="job log"):
        await LocalExecutor().run(spec)


def test_an_empty_argv_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="argv"):
        LocalLaunch(argv=(), env={}, cwd=str(tmp_path), log_path=tmp_path / "log", walltime_seconds=1)


# --- memory --------------------------------------------------------------------------------------

MIB = 1024 * 1024
ALLOCATE = "import sys; block = bytearray(int(sys.argv[1]) * 2**20); print('allocated', len(block) // 2**20)"


def limited(tmp_path: Path, argv: tuple[str, ...], limit_mib: int) -> LocalLaunch:
    return LocalLaunch(argv=argv, env=ENV, cwd=str(tmp_path), log_path=tmp_path / "job.log",
                       walltime_seconds=30, memory_limit_bytes=limit_mib * MIB)


async def test_a_process_of_the_job_cannot_take_more_memory_than_the_limit(tmp_path: Path) -> None:
    spec = limited(tmp_path, (sys.executable, "-c", ALLOCATE, "600"), 300)
    outcome = await LocalExecutor().run(spec)
    assert (outcome.state, outcome.exit_status) == ("failed", 1)
    assert "MemoryError" in log_of(spec)


async def test_a_job_within_its_limit_runs_and_its_children_are_held_to_it(tmp_path: Path) -> None:
    script = f"{sys.executable} -c \"{ALLOCATE}\" 100 && grep 'Max data size' /proc/self/limits"
    spec = limited(tmp_path, ("/bin/sh", "-c", script), 300)
    assert (await LocalExecutor().run(spec)).state == "succeeded"
    assert log_of(spec).split() == ["allocated", "100", "Max", "data", "size", str(300 * MIB), str(300 * MIB),
                                    "bytes"]


async def test_a_limited_job_starts_with_the_signal_dispositions_of_an_unlimited_one(tmp_path: Path) -> None:
    """The limit is set by a Python process that then becomes the job: Python ignores SIGPIPE and
    SIGXFSZ, and ignored signals survive exec, so `yes | head` would go on writing into a closed pipe."""
    script = "grep -E '^Sig(Ign|Blk):' /proc/self/status; yes | head -n 1"
    plain = LocalLaunch(argv=("/bin/sh", "-c", script), env=ENV, cwd=str(tmp_path),
                        log_path=tmp_path / "plain.log", walltime_seconds=30)
    spec = limited(tmp_path, ("/bin/sh", "-c", script), 300)
    assert (await LocalExecutor().run(plain)).state == "succeeded"
    assert (await LocalExecutor().run(spec)).state == "succeeded"
    assert log_of(spec) == plain.log_path.read_text()
    assert "Broken pipe" not in log_of(spec)


async def test_a_program_that_cannot_start_under_a_limit_is_an_infrastructure_error(tmp_path: Path) -> None:
    spec = limited(tmp_path, ("/nonexistent/apptainer", "exec"), 300)
    with pytest.raises(InfrastructureError, match="/nonexistent/apptainer"):
        await LocalExecutor().run(spec)
    assert "hpc-runner: cannot start /nonexistent/apptainer" in log_of(spec)


def test_the_limit_is_the_jobs_memory_but_never_less_than_apptainer_needs_to_start() -> None:
    assert memory_limit(None) is None
    assert memory_limit(16 * 1024) == 16 * 1024 * MIB
    assert memory_limit(64) == MIN_MEMORY_LIMIT_BYTES == 256 * MIB


# --- walltime ------------------------------------------------------------------------------------

async def test_walltime_terminates_the_job(tmp_path: Path) -> None:
    spec = launch(tmp_path, "echo leader=$$; exec sleep 1000", walltime=0.5, grace=5.0)
    started = time.monotonic()
    outcome = await LocalExecutor().run(spec)
    elapsed = time.monotonic() - started
    assert outcome.state == "timed_out"
    assert outcome.detail == "walltime of 0.5s exceeded"
    assert outcome.exit_status == 128 + 15
    # sleep dies of SIGTERM at once: no need to wait for the grace period.
    assert elapsed < 0.5 + 2.0
    assert "hpc-runner: walltime of 0.5s exceeded; sent SIGTERM\n" in log_of(spec)
    assert "SIGKILL" not in log_of(spec)
    assert not group_exists(leader_pid(spec))


async def test_walltime_kills_a_group_ignoring_sigterm_within_grace_plus_one_second(tmp_path: Path) -> None:
    script = "trap '' TERM; echo leader=$$; sleep 1000 & sleep 1000 & sleep 1000"
    spec = launch(tmp_path, script, walltime=0.5, grace=1.0)
    started = time.monotonic()
    outcome = await LocalExecutor().run(spec)
    elapsed = time.monotonic() - started
    assert outcome.state == "timed_out"
    assert outcome.detail == "walltime of 0.5s exceeded"
    assert elapsed < 0.5 + 1.0 + 1.0
    assert elapsed >= 0.5 + 1.0
    log = log_of(spec)
    assert "hpc-runner: walltime of 0.5s exceeded; sent SIGTERM\n" in log
    assert log.endswith("hpc-runner: walltime of 0.5s exceeded; sent SIGKILL\n")
    assert not group_exists(leader_pid(spec))


async def test_notes_start_on_a_line_of_their_own(tmp_path: Path) -> None:
    spec = launch(tmp_path, "printf 'no newline'; exec sleep 1000", walltime=0.2)
    await LocalExecutor().run(spec)
    assert log_of(spec).startswith("no newline\nhpc-runner: walltime of 0.2s exceeded; sent SIGTERM\n")


# --- stray processes -----------------------------------------------------------------------------

async def test_background_children_do_not_outlive_a_finished_job(tmp_path: Path) -> None:
    script = "echo leader=$$; sleep 1000 & sleep 1000 & (sleep 1000 &); echo started"
    spec = launch(tmp_path, script, grace=5.0)
    outcome = await LocalExecutor().run(spec)
    assert outcome == Outcome("succeeded", 0, "exit status 0")
    assert "hpc-runner: the job's command exited but left processes running; sent SIGTERM" in log_of(spec)
    assert not group_exists(leader_pid(spec))


async def test_stray_children_ignoring_sigterm_are_killed(tmp_path: Path) -> None:
    script = "trap '' TERM; echo leader=$$; sleep 1000 & exit 4"
    spec = launch(tmp_path, script, grace=0.3)
    outcome = await LocalExecutor().run(spec)
    assert outcome == Outcome("failed", 4, "exit status 4")
    assert log_of(spec).endswith("left processes running; sent SIGKILL\n")
    assert not group_exists(leader_pid(spec))


# --- cancellation --------------------------------------------------------------------------------

async def test_cancel_terminates_the_group(tmp_path: Path) -> None:
    spec = launch(tmp_path, "echo leader=$$; sleep 1000 & sleep 1000", grace=5.0)
    outcome, _ = await cancel_once_logged(spec, lambda log: "leader=" in log)
    assert outcome.state == "cancelled"
    assert outcome.detail == "cancelled"
    assert "hpc-runner: job cancelled; sent SIGTERM\n" in log_of(spec)
    assert not group_exists(leader_pid(spec))


async def test_cancel_of_a_group_ignoring_sigterm_ends_within_grace_plus_one_second(tmp_path: Path) -> None:
    spec = launch(tmp_path, "trap '' TERM; echo leader=$$; sleep 1000", grace=0.5)
    outcome, seconds = await cancel_once_logged(spec, lambda log: "leader=" in log)
    assert seconds < 0.5 + 1.0
    assert outcome.state == "cancelled"
    assert log_of(spec).endswith("hpc-runner: job cancelled; sent SIGKILL\n")
    assert not group_exists(leader_pid(spec))


async def test_cancel_set_before_the_start_runs_nothing(tmp_path: Path) -> None:
    spec = launch(tmp_path, "echo ran > ran.txt")
    cancel = asyncio.Event()
    cancel.set()
    outcome = await LocalExecutor().run(spec, cancel)
    assert outcome.state == "cancelled"
    assert not (tmp_path / "ran.txt").exists()


async def test_a_cancel_event_that_is_never_set_changes_nothing(tmp_path: Path) -> None:
    outcome = await LocalExecutor().run(launch(tmp_path, "exit 3"), asyncio.Event())
    assert outcome == Outcome("failed", 3, "exit status 3")


async def test_cancelling_the_task_kills_the_group(tmp_path: Path) -> None:
    spec = launch(tmp_path, "trap '' TERM; echo leader=$$; sleep 1000 & sleep 1000")
    running = asyncio.ensure_future(LocalExecutor().run(spec))
    await wait_until(lambda: "leader=" in log_of(spec), "the job to start")
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert not group_exists(leader_pid(spec))


async def test_concurrent_jobs_are_independent(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    quick = launch(tmp_path / "a", "echo leader=$$; sleep 1000 & exit 5", grace=5.0)
    slow = launch(tmp_path / "b", "echo leader=$$; exec sleep 1000", walltime=0.5)
    outcomes = await asyncio.gather(LocalExecutor().run(quick), LocalExecutor().run(slow))
    assert [outcome.state for outcome in outcomes] == ["failed", "timed_out"]
    assert outcomes[0].exit_status == 5
    assert not group_exists(leader_pid(quick))
    assert not group_exists(leader_pid(slow))


async def test_a_log_that_cannot_be_written_does_not_stop_the_walltime(tmp_path: Path) -> None:
    # /dev/full fails every write with ENOSPC, as a full disk would.
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    spec = LocalLaunch(argv=("/bin/sh", "-c", "exec sleep 1000"), env=ENV, cwd=str(tmp_path),
                       log_path=Path("/dev/full"), walltime_seconds=0.2, grace_seconds=1.0)
    outcome = await asyncio.wait_for(LocalExecutor().run(spec), DEADLINE_S)
    assert outcome.state == "timed_out"


async def test_the_walltime_is_written_as_a_person_would(tmp_path: Path) -> None:
    spec = launch(tmp_path, "exec sleep 1000", walltime=1.0)
    outcome = await LocalExecutor().run(spec)
    assert outcome.detail == "walltime of 1s exceeded"
    assert "hpc-runner: walltime of 1s exceeded; sent SIGTERM\n" in log_of(spec)


# --- processes that leave the job's group or session -------------------------------------------

# Moves into a process group of its own, as Apptainer moves a container's processes, then says so.
MOVES_OUT = (f"{sys.executable} -I -S -c 'import os, time; os.setpgid(0, 0); "
             "print(\"moved=%d\" % os.getpid(), flush=True); time.sleep(1000)' &")
# Starts a session of its own, as a daemon does (setsid(1) execs its command in it; a background
# job of a shell without job control leads no group, so setsid need not fork), then says so.
DETACHES = "setsid sh -c 'echo detached=$$; exec sleep 1000' &"


def until_logged(*names: str) -> str:
    """Shell that waits until the job's log (job.log in its working directory) names them all."""
    return f"until {' && '.join(f'grep -q {name}= job.log' for name in names)}; do sleep 0.01; done"


def running(pid: int) -> bool:
    """Whether the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return False
    return stat.rpartition(b")")[2].split()[0] != b"Z"


@pytest.fixture
def strays() -> Iterator[Callable[..., list[int]]]:
    """`strays(spec, *names)`: the pids the job logged as NAME=PID, killed after the test whatever
    its outcome, so that a failing test leaves nothing behind."""
    seen: list[int] = []

    def logged(spec: LocalLaunch, *names: str) -> list[int]:
        pids = [int(pid) for name in names for pid in re.findall(rf"\b{name}=(\d+)", log_of(spec))]
        seen.extend(pids)
        return pids

    yield logged
    for pid in seen:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


async def test_walltime_ends_processes_that_left_the_group_or_the_session(
        tmp_path: Path, strays: Callable[..., list[int]]) -> None:
    script = "\n".join(["echo leader=$$", MOVES_OUT, DETACHES, until_logged("moved", "detached"),
                        "exec sleep 1000"])
    spec = launch(tmp_path, script, walltime=2.0, grace=5.0)
    outcome = await LocalExecutor().run(spec)
    pids = strays(spec, "moved", "detached")
    assert outcome.state == "timed_out"
    assert len(pids) == 2, log_of(spec)
    assert [pid for pid in pids if running(pid)] == []
    # SIGTERM reached them: they did not wait out the grace period.
    assert "SIGKILL" not in log_of(spec)


async def test_cancel_kills_processes_that_left_the_group_or_the_session_ignoring_sigterm(
        tmp_path: Path, strays: Callable[..., list[int]]) -> None:
    script = "\n".join(["trap '' TERM", "echo leader=$$", MOVES_OUT, DETACHES, "exec sleep 1000"])
    spec = launch(tmp_path, script, grace=0.3)
    outcome, _ = await cancel_once_logged(spec, lambda log: "moved=" in log and "detached=" in log)
    pids = strays(spec, "moved", "detached")
    assert outcome.state == "cancelled"
    assert log_of(spec).endswith("hpc-runner: job cancelled; sent SIGKILL\n")
    assert [pid for pid in pids if running(pid)] == []


async def test_what_a_finished_job_left_in_another_group_is_ended_and_reaped(
        tmp_path: Path, strays: Callable[..., list[int]]) -> None:
    script = "\n".join(["echo leader=$$", MOVES_OUT, until_logged("moved"), "exit 0"])
    spec = launch(tmp_path, script, grace=5.0)
    outcome = await asyncio.wait_for(LocalExecutor().run(spec), DEADLINE_S)
    (moved,) = strays(spec, "moved")
    assert outcome == Outcome("succeeded", 0, "exit status 0")
    assert "hpc-runner: the job's command exited but left processes running; sent SIGTERM" in log_of(spec)
    # Re-parented to us when the job's shell exited, and reaped: not even a zombie is left.
    assert not Path(f"/proc/{moved}").exists()


async def test_cancelling_the_task_kills_processes_that_left_the_group_or_the_session(
        tmp_path: Path, strays: Callable[..., list[int]]) -> None:
    script = "\n".join(["trap '' TERM", "echo leader=$$", MOVES_OUT, DETACHES, "exec sleep 1000"])
    spec = launch(tmp_path, script)
    running_job = asyncio.ensure_future(LocalExecutor().run(spec))
    await wait_until(lambda: "moved=" in log_of(spec) and "detached=" in log_of(spec), "the job to start")
    running_job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running_job
    pids = strays(spec, "moved", "detached")
    assert [pid for pid in pids if running(pid)] == []


async def test_a_job_starting_session_after_session_while_ignoring_sigterm_is_ended_whole(
        tmp_path: Path, strays: Callable[..., list[int]]) -> None:
    # Every new session's parent is the job's shell, which dies with them: one started between
    # a look at the job's processes and the SIGKILL would be re-parented to us, in a session that
    # is none of the job's, and get away.
    script = "trap '' TERM\necho leader=$$\nwhile :; do\n" + DETACHES + "\nsleep 0.01\ndone"
    spec = launch(tmp_path, script, grace=0.3)
    outcome, _ = await cancel_once_logged(spec, lambda log: log.count("detached=") >= 5,
                                          "the job to start sessions")
    pids = strays(spec, "detached")
    assert outcome.state == "cancelled"
    assert [pid for pid in pids if running(pid)] == []


async def test_ending_a_job_leaves_other_jobs_and_the_agents_own_children_alone(
        tmp_path: Path, strays: Callable[..., list[int]]) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    # The agent's own child (a git, an sbatch), and one of B's processes re-parented to the agent
    # (their subshell exits at once), are children of the agent just like A's orphans would be.
    agents_own = subprocess.Popen(["sleep", "1000"])
    try:
        first = launch(tmp_path / "a", "\n".join(["echo leader=$$", MOVES_OUT, "exec sleep 1000"]), grace=5.0)
        orphan = "(sleep 1000 & echo orphan=$!)"
        second = launch(tmp_path / "b", "\n".join(["echo leader=$$", MOVES_OUT, orphan, "exec sleep 1000"]),
                        grace=5.0)
        cancel_first, cancel_second = asyncio.Event(), asyncio.Event()
        first_job = asyncio.ensure_future(LocalExecutor().run(first, cancel_first))
        second_job = asyncio.ensure_future(LocalExecutor().run(second, cancel_second))
        await wait_until(lambda: "moved=" in log_of(first) and "moved=" in log_of(second)
                         and "orphan=" in log_of(second), "both jobs to start")
        cancel_first.set()
        assert (await asyncio.wait_for(first_job, DEADLINE_S)).state == "cancelled"
        firsts = strays(first, "moved", "leader")
        seconds = strays(second, "moved", "orphan", "leader")
        assert [pid for pid in firsts if running(pid)] == []
        assert [pid for pid in seconds if not running(pid)] == []
        assert agents_own.poll() is None

        cancel_second.set()
        assert (await asyncio.wait_for(second_job, DEADLINE_S)).state == "cancelled"
        assert [pid for pid in seconds if running(pid)] == []
        assert agents_own.poll() is None
    finally:
        agents_own.kill()
        agents_own.wait()


# Holds /dev/fuse open, as a FUSE server (Apptainer's squashfuse) does; on SIGTERM it says whether
# the job's shell, its parent, had already ended.
FUSE_SERVER = f"""{sys.executable} -I -S -c '
import os, signal, sys, time
fuse = os.open("/dev/fuse", os.O_RDWR)
shell = os.getppid()
def ended(*_):
    print("server ended", "before" if os.getppid() == shell else "after", "the rest", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, ended)
print("server=%d" % os.getpid(), flush=True)
while True:
    time.sleep(1)
' &"""


@pytest.mark.skipif(not os.access("/dev/fuse", os.R_OK | os.W_OK), reason="no /dev/fuse to open")
async def test_a_filesystem_server_of_the_job_is_terminated_only_after_the_rest_has_ended(
        tmp_path: Path, strays: Callable[..., list[int]]) -> None:
    # The shell's cleanup takes a while and needs its files (in a container, squashfuse serves them).
    script = "\n".join(["echo leader=$$", FUSE_SERVER, until_logged("server"),
                        "trap 'sleep 0.3; echo rest ended; exit 0' TERM", "echo ready",
                        "while :; do sleep 0.05; done"])
    spec = launch(tmp_path, script, grace=5.0)
    outcome, _ = await cancel_once_logged(spec, lambda log: "ready" in log)
    strays(spec, "server")
    assert outcome.state == "cancelled"
    assert log_of(spec).endswith("rest ended\nserver ended after the rest\n"), log_of(spec)


# --- which processes are the job's ---------------------------------------------------------------

def process(pid: int, ppid: int, sid: int, start: int = 100, zombie: bool = False) -> ProcessInfo:
    return ProcessInfo(pid=pid, ppid=ppid, sid=sid, start=start, zombie=zombie)


AGENT = 999


def test_a_jobs_processes_are_its_session_those_seen_as_its_own_and_all_their_descendants() -> None:
    table = {info.pid: info for info in [
        process(AGENT, 1, 5),
        process(10, AGENT, 10),  # the launcher, leading its session
        process(11, 10, 10),  # in its session (in a group of its own, as Apptainer's are)
        process(12, AGENT, 10, zombie=True),  # re-parented to the agent, still in the session
        process(13, 10, 13),  # a session of its own, but its parent is the job's
        process(14, 13, 14),  # and its child, in yet another session
        process(15, AGENT, 15, start=500),  # a session of its own and no parent left: seen before
        process(16, AGENT, 16, start=700),  # a process with the pid of one seen before, but started later
        process(20, AGENT, 20),  # another job's launcher
        process(21, 20, 20),  # and its process
        process(22, AGENT, 20),  # and its orphan
        process(30, AGENT, 5),  # the agent's own child
    ]}
    members = job_processes(table, 10, {15: 500, 16: 600})
    assert sorted(members) == [10, 11, 12, 13, 14, 15]
    assert members[12] == table[12]


def test_the_process_table_entry_is_read_whatever_the_command_is_called() -> None:
    own = parse_stat(os.getpid(), Path("/proc/self/stat").read_bytes())
    assert own is not None
    assert (own.ppid, own.sid, own.zombie) == (os.getppid(), os.getsid(0), False)
    fields = " ".join(["Z", "7", "8", "9", *["0"] * 15, "4242", "0"])
    assert parse_stat(5, f"5 (a) S 1 2 3 (b)) {fields}".encode()) == ProcessInfo(5, 7, 9, 4242, True)
    assert parse_stat(5, b"5 (truncated) S 1") is None
