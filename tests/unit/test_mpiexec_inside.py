"""`[job.mpi] launch = "inside"`: the spec, the plans (goldens), the mpiexec shim, the launcher's
request checks, and the launcher end to end with a real process standing in for srun.

Goldens live in `golden/*-inside.txt`; `UPDATE_GOLDEN=1` rewrites them (review the diff).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import MappingProxyType

import pytest
from conftest import check_golden, wait_for

from runner.binds import Bind
from runner.errors import InputError
from runner.executors.slurm.plan import SlurmSite, plan_batch
from runner.job.prepared import PreparedJob
from runner.policy.engine import Decision, SlurmResources
from runner.spec import JobSpec, parse_job_text, spec_from_json
from sandbox.hostmpi import HostMpi
from sandbox.images import VerifiedImage
from sandbox.mpiexec import (
    CHANNEL_TARGET,
    MAX_REQUEST_BYTES,
    REFUSED_STATUS,
    InsideLaunch,
    Request,
    RequestRefused,
    launch_env_text,
    launcher_argv,
    parse_request,
    shim_script,
)
from sandbox.plan import RANK_HOLD, JobPaths, SandboxPlan, SandboxSite, plan_local_launch, plan_sandbox

GOLDEN_DIR = Path(__file__).with_name("golden")
IMAGE = VerifiedImage(name="clima-ci", path="/groups/esm/images/clima-ci.sif", sha256="9f2c" + "0" * 60,
                      signer=None)
JOB_DIR = "/scratch/hpc-runner/01jd5x7k2m9qr"
PATHS = JobPaths(job_id="01jd5x7k2m9qr", workspace=f"{JOB_DIR}/work", scratch=f"{JOB_DIR}/tmp",
                 meta=f"{JOB_DIR}/meta")
PYTHON = "/opt/hpc-runner/venv/bin/python"
FAKE_MPI = HostMpi(
    family="openmpi", version="4.1.4", prefix="/usr", mpirun="/usr/bin/mpirun",
    libmpi="/lib/x86_64-linux-gnu/libmpi.so.40",
    plugin_dirs=("/usr/lib/x86_64-linux-gnu/openmpi/lib/openmpi3",),
    binds=(Bind("/usr/lib/x86_64-linux-gnu/openmpi/lib/openmpi3",
                "/usr/lib/x86_64-linux-gnu/openmpi/lib/openmpi3", "ro"),
           Bind("/lib/x86_64-linux-gnu/libmpi.so.40", "/opt/hpc-runner/mpi/lib/libmpi.so.40", "ro")),
    launcher_env=MappingProxyType({"PMIX_MCA_gds": "hash"}),
)
INSIDE_JOB = """\
[job]
name = "climate"
image = "clima-ci"
script = '''
julia --project prepare.jl
mpiexec -n 4 julia --project run.jl
julia --project plots.jl
'''
[job.resources]
nodes = 2
tasks = 8
cpus_per_task = 2
[job.mpi]
enabled = true
launch = "inside"
"""


def job(text: str = INSIDE_JOB) -> JobSpec:
    return parse_job_text(text)


def allow(spec: JobSpec) -> Decision:
    r = spec.resources
    slurm = SlurmResources(account="esm", partition="expansion", nodes=r.nodes or 1, tasks=r.tasks or 1,
                           tasks_per_node=r.tasks_per_node, cpus_per_task=r.cpus_per_task or 1, gpus=0,
                           memory_mb=None, time_seconds=1800)
    return Decision(True, grant="clima-prs", account="clima", slurm=slurm, image=spec.image, mpi=spec.mpi)


def inside_plan(spec: JobSpec | None = None) -> tuple[JobSpec, SandboxPlan]:
    spec = spec or job()
    return spec, plan_sandbox(spec, allow(spec), IMAGE.path, PATHS, SandboxSite(), FAKE_MPI,
                              realpath=lambda path: path)


# -- the spec ------------------------------------------------------------------------------------

def test_launch_is_ranks_unless_asked_and_inside_round_trips() -> None:
    ranks = job(INSIDE_JOB.replace('launch = "inside"\n', ""))
    assert ranks.mpi_launch == "ranks"
    assert "mpi_launch" not in ranks.to_json()
    inside = job()
    assert inside.mpi_launch == "inside"
    assert inside.to_json()["mpi_launch"] == "inside"
    assert spec_from_json(inside.to_json(), "stored") == inside
    assert spec_from_json(ranks.to_json(), "stored") == ranks


@pytest.mark.parametrize(("table", "message"), [
    ('enabled = false\nlaunch = "inside"', "needs enabled = true"),
    ('launch = "inside"', "needs enabled = true"),
    ('enabled = true\nlaunch = "outside"', '"ranks" or "inside"'),
    ("enabled = true\nlaunch = 1", "must be a string"),
])
def test_inside_needs_mpi_and_launch_is_one_of_two(table: str, message: str) -> None:
    text = f'[job]\nname = "j"\nimage = "i"\ncommand = ["x"]\n[job.mpi]\n{table}\n'
    with pytest.raises(InputError, match=message):
        parse_job_text(text)


# -- goldens ---------------------------------------------------------------------------------------

def _line(arg: str) -> str:
    return json.dumps(arg) if "\n" in arg else arg


def test_golden_sandbox_and_local_launch() -> None:
    spec, result = inside_plan()
    assert result.mpiexec is not None
    launch = plan_local_launch(result, spec, allow(spec), FAKE_MPI, python=PYTHON)
    text = "\n".join(["# the command's argv", *map(_line, result.argv), "", "# env file",
                      result.env_file.rstrip("\n"), "", "# rank argv", *map(_line, result.mpiexec.rank_argv),
                      "", "# local launch", *map(_line, launch)]) + "\n"
    check_golden(GOLDEN_DIR / "sandbox-mpi-inside.txt", text, "the plan")


def test_golden_batch_script() -> None:
    spec, result = inside_plan()
    prepared = PreparedJob(job_id=PATHS.job_id, spec=spec, decision=allow(spec), image=IMAGE, plan=result,
                           argv=(), workspace=Path(PATHS.workspace), job_dir=Path(JOB_DIR),
                           log_path=Path(JOB_DIR) / "output.log")
    batch = plan_batch(prepared, comment="https://buildkite.com/clima/ci/builds/1#a",
                       site=SlurmSite(python=PYTHON))
    check_golden(GOLDEN_DIR / "slurm-mpi-inside.txt", batch.script, "the batch script")


def test_the_command_runs_once_in_its_own_sandbox_and_the_ranks_keep_the_mpi_plan() -> None:
    spec, inside = inside_plan()
    _, ranks = inside_plan(job(INSIDE_JOB.replace('launch = "inside"\n', "")))
    assert inside.mpiexec is not None
    # the ranks: the "ranks" launch's argv, up to and including the rank hold
    assert inside.mpiexec.rank_argv == ranks.argv[:len(inside.mpiexec.rank_argv)]
    assert inside.mpiexec.rank_argv[-len(RANK_HOLD):] == RANK_HOLD
    # the command: no --sharens (nothing joins it), a PID namespace, the channel; the script once
    assert "--sharens" in ranks.argv and "--sharens" not in inside.argv and "--pid" in inside.argv
    assert f"{JOB_DIR}/tmp/mpiexec:{CHANNEL_TARGET}:rw" in inside.argv
    assert not any(CHANNEL_TARGET in word for word in inside.mpiexec.rank_argv)
    assert inside.argv[-4:] == (IMAGE.path, "/bin/sh", "-e", "/.hpc-runner/script")
    assert "PREPEND_PATH='/.hpc-runner/bin'" in inside.env_file
    # the local launch: the launcher, then mpirun with N in place
    launch = plan_local_launch(inside, spec, allow(spec), FAKE_MPI, python=PYTHON)
    assert launch[:4] == (PYTHON, "-I", "-m", "sandbox.mpiexec_launcher")
    assert launch[-len(inside.argv):] == inside.argv


# -- the launcher's request checks ----------------------------------------------------------------

def request(*words: str) -> bytes:
    return b"".join(word.encode() + b"\0" for word in words)


def test_a_request_is_argv_ranks_extra_env_and_a_directory_under_work() -> None:
    parsed = parse_request(request("-x", "FOO=a=b c", "-x", "EMPTY=", "-n", "3", "-wd", "/work/run/../case",
                                   "--", "julia", "--project", "-e", "x\ny", ""), tasks=8)
    assert parsed == Request(ranks=3, argv=("julia", "--project", "-e", "x\ny", ""), cwd="/work/case",
                             env=MappingProxyType({"FOO": "a=b c", "EMPTY": ""}))


@pytest.mark.parametrize(("words", "message"), [
    (("-n", "9", "-wd", "/work", "--", "a"), "more than this job's 8 tasks"),
    (("-n", "1000", "-wd", "/work", "--", "a"), "more than this job's 8 tasks"),
    (("-n", "two", "-wd", "/work", "--", "a"), "whole number from 1 to 8"),
    (("-n", "0", "-wd", "/work", "--", "a"), "whole number from 1 to 8"),
    (("-n", "-1", "-wd", "/work", "--", "a"), "whole number from 1 to 8"),
    (("-n", "2.0", "-wd", "/work", "--", "a"), "whole number from 1 to 8"),
    (("-n", "99999999999999999999", "-wd", "/work", "--", "a"), "whole number from 1 to 8"),
    (("-x", "HPC_RUNNER_TASKS=1", "-n", "1", "-wd", "/work", "--", "a"), "reserved"),
    (("-x", "LD_PRELOAD=/work/x.so", "-n", "1", "-wd", "/work", "--", "a"), "reserved"),
    (("-x", "SLURM_NTASKS=9", "-n", "1", "-wd", "/work", "--", "a"), "reserved"),
    (("-x", "APPTAINERENV_X=1", "-n", "1", "-wd", "/work", "--", "a"), "reserved"),
    (("-x", "PMIX_MCA_x=1", "-n", "1", "-wd", "/work", "--", "a"), "reserved"),
    (("-x", "1BAD=1", "-n", "1", "-wd", "/work", "--", "a"), "not a variable name"),
    (("-x", "NOVALUE", "-n", "1", "-wd", "/work", "--", "a"), "NAME=VALUE"),
    (("-n", "1", "-wd", "/etc", "--", "a"), "outside /work"),
    (("-n", "1", "-wd", "/work/../etc", "--", "a"), "outside /work"),
    (("-n", "1", "-wd", "/workshop", "--", "a"), "outside /work"),
    (("-n", "1", "-wd", "work", "--", "a"), "not an absolute path"),
    (("-n", "1", "-wd", "/work", "--"), "names no program"),
    (("-n", "1", "-wd", "/work"), "names no program"),
    (("-wd", "/work", "--", "a"), "lacks -n"),
    (("-n", "1", "-n", "2", "-wd", "/work", "--", "a"), "not something mpiexec may ask for"),
    (("--mca", "plm", "-n", "1", "-wd", "/work", "--", "a"), "not something mpiexec may ask for"),
    (("--host", "evil", "-n", "1", "-wd", "/work", "--", "a"), "not something mpiexec may ask for"),
    (("-n",), "has no value"),
])
def test_every_refusal(words: tuple[str, ...], message: str) -> None:
    with pytest.raises(RequestRefused, match=message):
        parse_request(request(*words), tasks=8)


def test_a_request_too_large_or_unfinished_is_refused() -> None:
    big = request("-n", "1", "-wd", "/work", "--", "echo", "x" * MAX_REQUEST_BYTES)
    with pytest.raises(RequestRefused, match="larger than"):
        parse_request(big, tasks=8)
    with pytest.raises(RequestRefused, match="not complete"):
        parse_request(request("-n", "1", "-wd", "/work", "--", "a")[:-1], tasks=8)


def test_a_launch_env_file_adds_the_requests_variables_and_its_size_after_the_jobs() -> None:
    parsed = Request(ranks=2, argv=("a",), cwd="/work", env=MappingProxyType({"OMP_NUM_THREADS": "it's"}))
    text = launch_env_text("CI='true'\nHPC_RUNNER_TASKS='8'\n", parsed)
    assert text == "CI='true'\nHPC_RUNNER_TASKS='8'\nHPC_RUNNER_TASKS='2'\nOMP_NUM_THREADS='it'\"'\"'s'\n"


# -- the shim ------------------------------------------------------------------------------------

def run_shim(tmp_path: Path, *args: str, tasks: int = 4, channel: Path | None = None,
             env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    shim = tmp_path / "mpiexec"
    shim.write_text(shim_script(tasks, str(channel if channel is not None else tmp_path / "channel")))
    return subprocess.Popen(["/bin/sh", str(shim), *args], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={"PATH": os.environ["PATH"], **(env or {})})


def test_the_shim_refuses_more_ranks_than_tasks_and_starts_nothing(tmp_path: Path) -> None:
    (tmp_path / "channel").mkdir()
    shim = run_shim(tmp_path, "-n", "1000", "/usr/local/bin/mpi-hello")
    _, err = shim.communicate(timeout=10)
    assert shim.returncode == 2
    assert b"mpiexec: -n 1000 is more than this job's 4 tasks" in err
    assert b"nothing was started" in err
    assert not list((tmp_path / "channel").glob("*.ready"))


@pytest.mark.parametrize(("args", "message"), [
    (("--host", "a,b", "prog"), b"--host: this job's mpiexec takes only -n N and -x"),
    (("-n", "x", "prog"), b"expected a whole number from 1 to 4"),
    (("-n", "2"), b"usage: mpiexec"),
    (("-x", "9X", "prog"), b"not a variable name"),
])
def test_the_shim_refuses_what_it_cannot_ask_for(tmp_path: Path, args: tuple[str, ...],
                                                 message: bytes) -> None:
    (tmp_path / "channel").mkdir()
    shim = run_shim(tmp_path, *args)
    _, err = shim.communicate(timeout=10)
    assert shim.returncode == 2 and message in err
    assert not list((tmp_path / "channel").glob("*.ready"))


def test_the_shim_is_no_launcher_where_there_is_no_channel(tmp_path: Path) -> None:
    shim = run_shim(tmp_path, "-n", "1", "prog")
    _, err = shim.communicate(timeout=10)
    assert shim.returncode == 127 and b"only the job's command can start ranks" in err


def test_the_shim_writes_its_request_and_exits_with_the_answer(tmp_path: Path) -> None:
    channel = tmp_path / "channel"
    channel.mkdir()
    (channel / f"{os.getpid()}-0.req").write_bytes(b"")  # a name taken: the shim picks another
    shim = run_shim(tmp_path, "-np", "3", "-x", "FOO=a b", "-x", "KEPT", "--", "prog", "-n", "it's\nx",
                    env={"KEPT": "from the environment"})
    ready = wait_for(lambda: list(channel.glob("*.ready")), 10, what="the request")
    stem = ready[0].name.removesuffix(".ready")
    words = (channel / f"{stem}.req").read_bytes().split(b"\0")
    assert words == [b"-x", b"FOO=a b", b"-x", b"KEPT=from the environment", b"-n", b"3",
                     b"-wd", str(tmp_path).encode(), b"--", b"prog", b"-n", b"it's\nx", b""]
    assert shim.poll() is None  # it waits for the answer
    (channel / f"{stem}.status").write_text("3\n")
    assert shim.wait(timeout=10) == 3


# -- the launcher end to end ---------------------------------------------------------------------

FAKE_SRUN = """\
import json, os, sys
argv = sys.argv[1:]
image = argv.index("IMAGE")
with open(argv[argv.index("--env-file") + 1]) as handle:
    env_file = handle.read()
with open(os.environ["RECORD"], "a") as record:
    record.write(json.dumps({"argv": argv, "env_file": env_file}) + "\\n")
program = argv[image + 1:]
print(f"rank output of {' '.join(program)}", flush=True)
sys.exit(int(program[1]) if program[0] == "fail" else 0)
"""
# The job's command, standing in for the shim (which runs in the sandbox, where the workspace is
# /work): writes requests as the shim does, one after the other.
JOB_COMMAND = """\
ask() {
    name=$1; shift
    printf '%s\\0' "$@" >"$CHANNEL/$name.req"
    : >"$CHANNEL/$name.ready"
    while [ ! -e "$CHANNEL/$name.status" ]; do sleep 0.01; done
    read -r status <"$CHANNEL/$name.status"
    echo "$name: $status"
}
echo before
ask 1-0 -x FOO=bar -n 2 -wd /work/sub -- hello 'a b'
ask 2-0 -n 1 -wd /work -- fail 3
ask 3-0 -n 1000 -wd /work -- hello
ask 4-0 -n 1 -wd /work/out -- hello
echo after
exit 7
"""


def checkout_launcher(argv: tuple[str, ...]) -> list[str]:
    """The launcher's command line without `-I`, so that PYTHONPATH makes it this checkout's."""
    assert argv[1] == "-I"
    return [argv[0], *argv[2:]]


def test_the_launcher_runs_requests_in_turn_and_answers_each(tmp_path: Path) -> None:
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "env").write_text("CI='true'\nHPC_RUNNER_TASKS='4'\n")
    workspace = tmp_path / "work"
    (workspace / "sub").mkdir(parents=True)
    (workspace / "out").symlink_to("/etc")  # a link out of the workspace
    srun = tmp_path / "srun.py"
    srun.write_text(FAKE_SRUN)
    channel = tmp_path / "channel"
    inside = InsideLaunch(tasks=4, channel=str(channel), shim=str(meta / "bin" / "mpiexec"),
                          env_file=str(meta / "env"), workspace=str(workspace),
                          rank_argv=("fake-apptainer", "exec", "--pwd", "/work", "--env-file",
                                     str(meta / "env"), "IMAGE"))
    fake_srun = (sys.executable, str(srun), "--ntasks={n}")
    job_command = ("/bin/sh", "-c", JOB_COMMAND)
    argv = checkout_launcher(launcher_argv(sys.executable, inside, fake_srun, (), job_command))
    record = tmp_path / "record"
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"], "CHANNEL": str(channel), "RECORD": str(record),
                               "PYTHONPATH": str(Path(__file__).parents[2])})
    log = done.stdout + done.stderr
    assert done.returncode == 7, log
    lines = done.stdout.splitlines()
    assert lines == ["before", "rank output of hello a b", "1-0: 0", "rank output of fail 3", "2-0: 3",
                     "3-0: 126", "4-0: 126", "after"]
    assert "refused request 3-0: -n 1000 is more than this job's 4 tasks" in done.stderr
    assert "refused request 4-0: the working directory /work/out leads outside /work" in done.stderr
    first, second = [json.loads(line) for line in record.read_text().splitlines()]
    assert first["argv"][:4] == ["--ntasks=2", "fake-apptainer", "exec", "--pwd"]
    assert first["argv"][4] == "/work/sub"
    assert first["env_file"] == "CI='true'\nHPC_RUNNER_TASKS='4'\nFOO='bar'\nHPC_RUNNER_TASKS='2'\n"
    assert second["argv"][0] == "--ntasks=1" and second["argv"][-2:] == ["fail", "3"]
    # the shim the launcher wrote is the job's, with its task count
    assert (meta / "bin" / "mpiexec").read_text() == shim_script(4)
    assert REFUSED_STATUS == 126


@pytest.mark.skipif(os.getuid() != 0, reason="placing a file of another uid needs root")
def test_the_launcher_refuses_a_request_another_uid_wrote(tmp_path: Path) -> None:
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "env").write_text("CI='true'\n")
    channel = tmp_path / "channel"
    srun = tmp_path / "srun.py"
    srun.write_text(FAKE_SRUN)
    command = """\
while [ ! -e "$CHANNEL/9-0.ready" ]; do sleep 0.01; done
while [ ! -e "$CHANNEL/9-0.status" ]; do sleep 0.01; done
read -r status <"$CHANNEL/9-0.status"; echo "foreign: $status"
"""
    inside = InsideLaunch(tasks=2, channel=str(channel), shim=str(meta / "bin" / "mpiexec"),
                          env_file=str(meta / "env"), workspace=str(tmp_path),
                          rank_argv=("a", "--pwd", "/work", "--env-file", "e", "IMAGE"))
    fake_srun = (sys.executable, str(srun), "--ntasks={n}")
    argv = checkout_launcher(launcher_argv(sys.executable, inside, fake_srun, (), ("/bin/sh", "-c", command)))
    record = tmp_path / "record"
    env = {"PATH": os.environ["PATH"], "CHANNEL": str(channel), "RECORD": str(record),
           "PYTHONPATH": str(Path(__file__).parents[2])}
    launcher = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    wait_for(lambda: channel.is_dir(), 20, what="the channel")
    for suffix in ("req", "ready"):
        # made whole, and another uid's, before it appears in the channel
        path = tmp_path / f"9-0.{suffix}"
        path.write_bytes(request("-n", "1", "-wd", "/work", "--", "hello") if suffix == "req" else b"")
        os.chown(path, 4242, 4242)
        path.rename(channel / path.name)
    out, err = launcher.communicate(timeout=60)
    assert launcher.returncode == 0
    assert "foreign: 126" in out
    assert "refused request 9-0: 9-0.ready was written by uid 4242, not by this job" in err
    assert not record.exists()  # nothing was launched


def test_a_launcher_started_again_clears_what_an_earlier_run_left_in_the_channel(tmp_path: Path) -> None:
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "env").write_text("CI='true'\n")
    channel = tmp_path / "channel"
    (channel / "left-dir").mkdir(parents=True)
    (channel / "1-0.ready").write_bytes(b"")  # a request of the earlier run, never to be served now
    (channel / "1-0.req").write_bytes(request("-n", "1", "-wd", "/work", "--", "hello"))
    inside = InsideLaunch(tasks=1, channel=str(channel), shim=str(meta / "bin" / "mpiexec"),
                          env_file=str(meta / "env"), workspace=str(tmp_path),
                          rank_argv=("a", "--pwd", "/work", "--env-file", "e", "IMAGE"))
    argv = checkout_launcher(launcher_argv(sys.executable, inside, ("false",), (),
                                           ("/bin/sh", "-c", 'ls -A "$CHANNEL"; exit 4')))
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"], "CHANNEL": str(channel),
                               "PYTHONPATH": str(Path(__file__).parents[2])})
    assert done.returncode == 4, done.stderr
    assert done.stdout == "" and "refused" not in done.stderr
