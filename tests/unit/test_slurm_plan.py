"""The Slurm batch job: golden sbatch arguments and scripts, and the script run for real.

Goldens live in `golden/slurm-*.txt`; `UPDATE_GOLDEN=1` rewrites them (review the diff). They
pin the Slurm layer around a fixed sandbox plan, so changes to Apptainer's flags show up in the
sandbox goldens and not here.
"""

from __future__ import annotations

import json
import shlex
import stat
import subprocess
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

import pytest
from conftest import check_golden

from runner.executors.slurm.plan import (
    COMMENT_MAX_CHARS,
    SlurmSite,
    SubmitOptions,
    plan_batch,
    sanitize_comment,
)
from runner.job.prepared import PreparedJob
from runner.policy.engine import Decision, SlurmResources
from runner.spec import JobSpec, Resources
from sandbox.images import VerifiedImage
from sandbox.plan import RANK_WRAPPER_NAME, JobPaths, SandboxPlan, SandboxSite, plan_sandbox, plan_srun_launch

GOLDEN_DIR = Path(__file__).with_name("golden")
JOB_DIR = Path("/scratch/hpc-runner/01jd5x7k2m9qr")
IMAGE = VerifiedImage(name="clima-ci", path="/groups/esm/images/clima-ci.sif",
                      sha256="9f2c" + "0" * 60, signer=None)
WRAPPER = ("/bin/sh", "-c", "for name in $(env | sed -n 's/^\\(PMIX_[A-Za-z0-9_]*\\)=.*/\\1/p'); do "
           'eval "value=\\${$name}"; export "APPTAINERENV_$name=$value"; done; exec "$@"', RANK_WRAPPER_NAME)


def sandbox_argv(*command: str) -> tuple[str, ...]:
    return ("apptainer", "--quiet", "exec", "--contain", "--cleanenv", "--no-eval",
            "--bind", f"{JOB_DIR}/work:/work:rw", "--pwd", "/work", "--env-file", f"{JOB_DIR}/meta/env",
            IMAGE.path, *command)


def resources(**changes: object) -> SlurmResources:
    base = SlurmResources(account="esm", partition="expansion", nodes=1, tasks=1, tasks_per_node=None,
                          cpus_per_task=1, gpus=0, memory_mb=None, time_seconds=1800)
    return replace(base, **changes)  # type: ignore[arg-type]


def prepared(*, mpi: bool = False, gpus: bool = False, slurm: SlurmResources | None = None,
             wrapper: tuple[str, ...] = (), command: tuple[str, ...] = ("julia", "--project", "test/run.jl"),
             host_env: dict[str, str] | None = None, job_dir: Path = JOB_DIR) -> PreparedJob:
    res = slurm or resources()
    spec = JobSpec(name="mpi-tests" if mpi else "tests", image="clima-ci", command=command, mpi=mpi,
                   resources=Resources(gpus=res.gpus))
    decision = Decision(True, grant="clima-prs", account="clima", slurm=res, image="clima-ci", mpi=mpi,
                        gpus=gpus)
    env = host_env or {"PATH": "/usr/local/bin:/usr/bin:/bin"}
    plan = SandboxPlan(argv=sandbox_argv(*command), env_file="", script=None, rank_wrapper=wrapper,
                       host_env=MappingProxyType(env))
    return PreparedJob(job_id="01jd5x7k2m9qr", spec=spec, decision=decision, image=IMAGE, plan=plan,
                       argv=(), workspace=job_dir / "work", job_dir=job_dir, log_path=job_dir / "output.log")


COMMENT = "https://buildkite.com/clima/climaatmos-ci/builds/812#0190a1b2-c3d4"
MPI_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "PMIX_MCA_gds": "hash"}
CASES = {
    "plain": (prepared(), SubmitOptions()),
    "mpi": (prepared(mpi=True, wrapper=WRAPPER, host_env=MPI_ENV, command=("/work/build/mpi-tests",),
                     slurm=resources(nodes=2, tasks=8, tasks_per_node=4, cpus_per_task=4, memory_mb=16384,
                                     time_seconds=4 * 3600)), SubmitOptions()),
    "gpu": (prepared(gpus=True, wrapper=(*WRAPPER[:3], RANK_WRAPPER_NAME), command=("nvidia-smi",),
                     slurm=resources(gpus=2, memory_mb=1536, time_seconds=90, partition="gpu")),
            SubmitOptions()),
    "held": (prepared(command=("sh", "-c", "echo 'it''s'; exit 3")),
             SubmitOptions(begin="now+1hour", hold=True)),
}


def render(case: str) -> str:
    job, options = CASES[case]
    batch = plan_batch(job, comment=COMMENT, options=options)
    return "\n".join(["# sbatch arguments", *batch.args, "", "# batch script", batch.script])


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_batch_job(case: str) -> None:
    check_golden(GOLDEN_DIR / f"slurm-{case}.txt", render(case), "the batch job")


# -- sbatch arguments ------------------------------------------------------------------------------

def args_of(job: PreparedJob, **kw: object) -> dict[str, str]:
    batch = plan_batch(job, comment=str(kw.pop("comment", "ci-1")), **kw)  # type: ignore[arg-type]
    pairs = {}
    for arg in batch.args:
        key, _, value = arg.partition("=")
        assert key not in pairs, f"{key} given twice"
        pairs[key] = value
    return pairs


def test_resources_are_exactly_the_decisions() -> None:
    args = args_of(prepared(slurm=resources(nodes=2, tasks=8, tasks_per_node=4, cpus_per_task=3, gpus=1,
                                            memory_mb=2048, time_seconds=61)))
    assert {key: args[key] for key in ("--account", "--partition", "--nodes", "--ntasks", "--ntasks-per-node",
                                       "--cpus-per-task", "--gpus", "--mem", "--time")} == {
        "--account": "esm", "--partition": "expansion", "--nodes": "2", "--ntasks": "8",
        "--ntasks-per-node": "4", "--cpus-per-task": "3", "--gpus": "1", "--mem": "2G",
        "--time": "0-00:02:00"}


def test_optional_resources_are_left_out_when_not_asked_for() -> None:
    args = args_of(prepared())
    for key in ("--ntasks-per-node", "--gpus", "--gres", "--mem", "--begin", "--hold"):
        assert key not in args


def test_output_and_error_both_go_to_the_log_appended_and_no_environment_is_exported() -> None:
    args = args_of(prepared())
    assert args["--output"] == args["--error"] == str(JOB_DIR / "output.log")
    assert args["--open-mode"] == "append"
    assert args["--export"] == "NONE"
    assert args["--chdir"] == str(JOB_DIR)
    assert "--no-requeue" in args and "--parsable" in args
    assert args["--job-name"] == "hpcr-01jd5x7k2m9qr"


def test_the_comment_is_one_bounded_line_of_printable_text() -> None:
    hostile = "https://ci.example.org/x\n#SBATCH --account=other\r\x1b[2J" + "é" * 5 + "y" * 500
    comment = args_of(prepared(), comment=hostile)["--comment"]
    assert len(comment) == COMMENT_MAX_CHARS and comment.endswith("...")
    assert comment.isprintable() and comment.isascii()
    assert comment.startswith("https://ci.example.org/x #SBATCH --account=other  [2J?????yyy")
    assert sanitize_comment("  ci-42  ") == "ci-42"


def test_begin_must_be_a_time_sbatch_understands() -> None:
    assert SubmitOptions(begin="now+60").begin == "now+60"
    assert SubmitOptions(begin="2026-11-26T10:00:00").begin
    for bad in ("now+1hour --account=x", "tomorrow;", "now\n"):
        with pytest.raises(ValueError):
            SubmitOptions(begin=bad)


def test_a_denied_decision_cannot_be_planned() -> None:
    job = prepared()
    with pytest.raises(ValueError):
        plan_batch(replace(job, decision=Decision(False, reasons=("no",))), comment="x")


# -- the launch line -------------------------------------------------------------------------------

def test_mpi_jobs_run_every_rank_through_pmix_and_the_wrapper() -> None:
    job = prepared(mpi=True, wrapper=WRAPPER, slurm=resources(tasks=2))
    launch = plan_srun_launch(job.plan, job.spec, job.decision)
    assert launch[:5] == ("srun", "--export=ALL", "--mpi=pmix", "--unbuffered", "--kill-on-bad-exit=1")
    assert launch[5:] == (*WRAPPER, *job.plan.argv)
    threaded = prepared(mpi=True, wrapper=WRAPPER, slurm=resources(tasks=2, cpus_per_task=4))
    assert "--cpus-per-task=4" in plan_srun_launch(threaded.plan, threaded.spec, threaded.decision)


def test_other_jobs_run_once_with_the_whole_node() -> None:
    job = prepared(slurm=resources(tasks=4, cpus_per_task=2))
    launch = plan_srun_launch(job.plan, job.spec, job.decision, srun="/opt/slurm/bin/srun")
    assert launch == ("/opt/slurm/bin/srun", "--export=ALL", "--nodes=1", "--ntasks=1", "--unbuffered",
                      *job.plan.argv)
    assert not any(arg.startswith("--cpus-per-task") for arg in launch)


def test_the_site_chooses_srun_and_the_mpi_plugin() -> None:
    job = prepared(mpi=True, wrapper=WRAPPER)
    site = SlurmSite(srun="/opt/slurm/bin/srun", mpi_plugin="pmix_v4")
    script = plan_batch(job, comment="x", site=site).script
    assert "/opt/slurm/bin/srun --export=ALL --mpi=pmix_v4 " in script


def test_a_real_sandbox_plan_is_launched_word_for_word(tmp_path: Path) -> None:
    """The planner's own argv, hostile words included, comes out of the script unchanged."""
    hostile = ("printf", "%s\n", "it's $HOME `id` \"q\"", "a\nb")
    spec = JobSpec(name="tests", image="clima-ci", command=hostile, env={"GREETING": "hi there"})
    decision = prepared().decision
    paths = JobPaths(job_id="j1", workspace=str(tmp_path / "work"), scratch=str(tmp_path / "tmp"),
                     meta=str(tmp_path / "meta"))
    plan = plan_sandbox(spec, decision, IMAGE.path, paths, SandboxSite(), None, realpath=lambda p: p)
    job = replace(prepared(), spec=spec, plan=plan)
    recorded = run_script(tmp_path, job, srun_exit=0)
    assert recorded["argv"] == list(plan_srun_launch(plan, spec, decision)[1:])


# -- the script, run for real against a fake srun --------------------------------------------------

FAKE_SRUN = """#!/usr/bin/python3
import json, os, sys
with open(os.environ["FAKE_SRUN_RECORD"], "w") as out:
    json.dump({"argv": sys.argv[1:], "env": dict(os.environ)}, out)
sys.exit(int(os.environ["FAKE_SRUN_EXIT"]))
"""


def run_script(tmp_path: Path, job: PreparedJob, *, srun_exit: int,
               stale_status: str | None = None) -> dict[str, object]:
    """Run the batch script with a recording srun first on its PATH; returns what srun saw."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    srun = bin_dir / "srun"
    srun.write_text(FAKE_SRUN)
    srun.chmod(stat.S_IRWXU)
    job_dir = tmp_path / "job"
    job_dir.mkdir(exist_ok=True)
    env = {**job.plan.host_env, "PATH": f"{bin_dir}:{job.plan.host_env['PATH']}"}
    job = replace(job, job_dir=job_dir, log_path=job_dir / "output.log",
                  plan=replace(job.plan, host_env=MappingProxyType(env)))
    batch = plan_batch(job, comment="x")
    if stale_status is not None:
        Path(batch.status_path).write_text(stale_status)
    record = tmp_path / "srun.json"
    result = subprocess.run(["/bin/bash", "-c", batch.script], cwd=job_dir, capture_output=True, text=True,
                            env={"FAKE_SRUN_RECORD": str(record), "FAKE_SRUN_EXIT": str(srun_exit)},
                            timeout=30, check=False)
    assert result.returncode == srun_exit, result.stderr
    assert Path(batch.status_path).read_text() == f"{srun_exit}\n"
    assert not Path(batch.status_path + ".tmp").exists()
    data: dict[str, object] = json.loads(record.read_text())
    return data


@pytest.mark.parametrize("code", [0, 3, 137])
def test_the_script_records_the_exit_status_and_exits_with_it(tmp_path: Path, code: int) -> None:
    recorded = run_script(tmp_path, prepared(), srun_exit=code, stale_status="0\n")
    assert recorded["argv"] == ["--export=ALL", "--nodes=1", "--ntasks=1", "--unbuffered",
                                *prepared().plan.argv]


def test_the_script_exports_the_launchers_environment(tmp_path: Path) -> None:
    job = prepared(mpi=True, wrapper=WRAPPER, host_env={**MPI_ENV, "ODD": "a b'c$d"})
    recorded = run_script(tmp_path, job, srun_exit=0)
    env = recorded["env"]
    assert isinstance(env, dict)
    assert env["PMIX_MCA_gds"] == "hash" and env["ODD"] == "a b'c$d"
    assert recorded["argv"] == list(plan_srun_launch(job.plan, job.spec, job.decision)[1:])


def test_the_script_is_valid_bash_with_a_readable_header() -> None:
    job, options = CASES["mpi"]
    script = plan_batch(job, comment=COMMENT, options=options).script
    subprocess.run(["/bin/bash", "-n"], input=script, text=True, check=True, timeout=30)
    header = script.split("set -u", 1)[0]
    assert "hpcr-01jd5x7k2m9qr" in header and IMAGE.path in header and (IMAGE.sha256 or "") in header
    assert "set -u\n" in script and shlex.quote(str(JOB_DIR / "exit-status")) in script
