"""The sandbox plan: golden command lines, and what the planner refuses.

Goldens live in `golden/sandbox-*.txt`; `UPDATE_GOLDEN=1` rewrites them (review the diff).
"""

from __future__ import annotations

import json
import shlex
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

import pytest
from conftest import check_golden, wait_for

from runner.binds import Bind
from runner.errors import InfrastructureError
from runner.policy.engine import Decision, SlurmResources
from runner.spec import JobSpec, parse_job_text
from sandbox.hostmpi import HostMpi
from sandbox.plan import (
    APPTAINER_ADDED_ENV,
    DOCUMENTED_ENV,
    RANK_COUNT_SCRIPT,
    RANK_HOLD,
    RANK_HOLD_DIR,
    RANK_HOLD_NAME,
    RANK_HOLD_SCRIPT,
    JobPaths,
    SandboxPlan,
    SandboxRefused,
    SandboxSite,
    expected_env_name,
    plan_local_launch,
    plan_sandbox,
    rank_wrapper_script,
)

GOLDEN_DIR = Path(__file__).with_name("golden")
IMAGE = "/groups/esm/images/clima-ci.sif"
PATHS = JobPaths(job_id="job-42", workspace="/scratch/hpc-runner/job-42/work",
                 scratch="/scratch/hpc-runner/job-42/tmp", meta="/scratch/hpc-runner/job-42/meta")
SITE = SandboxSite(protected_paths=("/var/lib/hpc-runner", "/etc/hpc-runner/github-app.pem"))
FAKE_MPI = HostMpi(
    family="openmpi", version="4.1.4", prefix="/usr", mpirun="/usr/bin/mpirun",
    libmpi="/lib/x86_64-linux-gnu/libmpi.so.40",
    plugin_dirs=("/usr/lib/x86_64-linux-gnu/openmpi/lib/openmpi3",
                 "/usr/lib/x86_64-linux-gnu/pmix2/lib/pmix"),
    binds=(
        Bind("/usr/lib/x86_64-linux-gnu/openmpi/lib/openmpi3",
             "/usr/lib/x86_64-linux-gnu/openmpi/lib/openmpi3", "ro"),
        Bind("/usr/lib/x86_64-linux-gnu/pmix2/lib/pmix", "/usr/lib/x86_64-linux-gnu/pmix2/lib/pmix", "ro"),
        Bind("/etc/openmpi", "/etc/openmpi", "ro"),
        Bind("/usr/share/openmpi", "/usr/share/openmpi", "ro"),
        Bind("/lib/x86_64-linux-gnu/libmpi.so.40", "/opt/hpc-runner/mpi/lib/libmpi.so.40", "ro"),
        Bind("/lib/x86_64-linux-gnu/libpmix.so.2", "/opt/hpc-runner/mpi/lib/libpmix.so.2", "ro"),
    ),
)


def identity(path: str) -> str:
    return path


def fake_realpath(links: Mapping[str, str]) -> Callable[[str], str]:
    """A realpath over a pretend filesystem: `links` maps a path (or a prefix) to its target."""
    def resolve(path: str) -> str:
        for link, target in sorted(links.items(), key=lambda item: -len(item[0])):
            if path == link or path.startswith(link + "/"):
                return target + path[len(link):]
        return path
    return resolve


def job(body: str = 'command = ["julia", "--project", "test/runtests.jl"]', **extra: str) -> JobSpec:
    tables = "\n".join(f"[job.{name}]\n{content}" for name, content in extra.items())
    return parse_job_text(f'[job]\nname = "tests"\nimage = "clima-ci"\n{body}\n{tables}\n')


def allow(spec: JobSpec, *, network: bool | None = None, gpus: bool | None = None) -> Decision:
    r = spec.resources
    nodes = r.nodes or 1
    slurm = SlurmResources(account="esm", partition="expansion", nodes=nodes,
                           tasks=r.tasks or nodes, tasks_per_node=r.tasks_per_node,
                           cpus_per_task=r.cpus_per_task or 1, gpus=r.gpus or 0,
                           memory_mb=r.memory_mb, time_seconds=r.time_seconds or 1800)
    return Decision(True, grant="clima-prs", account="clima", slurm=slurm, image=spec.image,
                    mpi=spec.mpi, network=spec.network if network is None else network,
                    gpus=slurm.gpus > 0 if gpus is None else gpus)


def plan(spec: JobSpec, decision: Decision | None = None, *, site: SandboxSite = SITE,
         mpi: HostMpi | None = None, realpath: Callable[[str], str] = identity,
         paths: JobPaths = PATHS, extra_env: Mapping[str, str] = MappingProxyType({})) -> SandboxPlan:
    return plan_sandbox(spec, decision or allow(spec), IMAGE, paths, site, mpi,
                        realpath=realpath, extra_env=extra_env)


# -- goldens -------------------------------------------------------------------------------------

def _line(arg: str) -> str:
    # One argument per line; an argument with a newline is shown as a JSON string.
    return json.dumps(arg) if "\n" in arg else arg


def render(result: SandboxPlan, launch: tuple[str, ...]) -> str:
    prefix = launch[:len(launch) - len(result.argv)]
    parts = ["# argv", *map(_line, result.argv), "", "# env file", result.env_file.rstrip("\n")]
    if result.script is not None:
        parts += ["", "# script", result.script.rstrip("\n")]
    parts += ["", "# host env", *(f"{k}={v}" for k, v in sorted(result.host_env.items()))]
    parts += ["", "# passthrough", *result.passthrough]
    parts += ["", "# local launch before argv", *map(_line, prefix)]
    return "\n".join(parts) + "\n"


GOLDEN_CASES: dict[str, tuple[JobSpec, Decision | None, HostMpi | None]] = {}


def _case(name: str, spec: JobSpec, decision: Decision | None = None, mpi: HostMpi | None = None) -> None:
    GOLDEN_CASES[name] = (spec, decision, mpi)


_case("plain", job(body='command = ["julia", "--project", "test/runtests.jl"]\n'
                        'env = { JULIA_NUM_THREADS = "4" }'))
_case("script", job(body='script = """\nset -u\nmake -j4\n./run-tests --fast\n"""'))
_case("binds", job(body='command = ["ls", "/data", "/refs"]\n'
                        'binds = ["/groups/esm/data:/data:ro", "/groups/esm/refs:/refs"]'))
_case("network", job(body='command = ["pip", "install", "."]\nnetwork = true'))
_case("mpi", job(body='command = ["/work/build/mpi-tests"]', resources="nodes = 2\ntasks = 8\n"
                      "cpus_per_task = 4", mpi="enabled = true"), mpi=FAKE_MPI)
_case("gpu", job(body='command = ["nvidia-smi"]', resources="gpus = 2"))


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_golden_plan(name: str) -> None:
    spec, decision, mpi = GOLDEN_CASES[name]
    decision = decision or allow(spec)
    result = plan(spec, decision, mpi=mpi)
    text = render(result, plan_local_launch(result, spec, decision, mpi))
    check_golden(GOLDEN_DIR / f"sandbox-{name}.txt", text, "the plan")


def test_a_golden_mismatch_shows_a_diff_and_update_rewrites(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sandbox-x.txt").write_text("a\nb\n")
    monkeypatch.delenv("UPDATE_GOLDEN", raising=False)
    with pytest.raises(pytest.fail.Exception) as failed:
        check_golden(tmp_path / "sandbox-x.txt", "a\nc\n", "the plan")
    assert "-b\n+c" in str(failed.value)
    monkeypatch.setenv("UPDATE_GOLDEN", "1")
    check_golden(tmp_path / "sandbox-x.txt", "a\nc\n", "the plan")
    assert (tmp_path / "sandbox-x.txt").read_text() == "a\nc\n"


# -- flags ---------------------------------------------------------------------------------------

def flag_pairs(argv: tuple[str, ...], flag: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == flag]


def test_isolation_defaults() -> None:
    argv = plan(job()).argv
    assert argv[:3] == ("apptainer", "--quiet", "exec")
    for flag in ("--contain", "--cleanenv", "--no-eval", "--no-home"):
        assert flag in argv
    assert flag_pairs(argv, "--no-mount") == ["cwd"]
    assert flag_pairs(argv, "--home") == [f"{PATHS.scratch}:/tmp"]
    assert flag_pairs(argv, "--workdir") == [PATHS.scratch]
    assert flag_pairs(argv, "--pwd") == ["/work"]
    assert flag_pairs(argv, "--env-file") == [f"{PATHS.meta}/env"]
    assert flag_pairs(argv, "--bind") == [f"{PATHS.workspace}:/work:rw", f"{PATHS.meta}:/.hpc-runner:ro"]
    assert "--containall" not in argv and "--sharens" not in argv and "--userns" not in argv


def test_the_network_is_isolated_unless_granted() -> None:
    assert flag_pairs(plan(job()).argv, "--network") == ["none"]
    networked = job(body='command = ["true"]\nnetwork = true')
    assert "--net" not in plan(networked).argv and "--network" not in plan(networked).argv


def test_mpi_jobs_share_the_host_network_and_one_namespace() -> None:
    spec = job(mpi="enabled = true")
    argv = plan(spec, mpi=FAKE_MPI).argv
    assert "--net" not in argv and "--sharens" in argv
    assert not [bind for bind in flag_pairs(argv, "--bind") if "/dev/shm" in bind]


def test_nv_only_for_a_job_that_asks_for_gpus_under_a_grant_that_allows_them() -> None:
    gpu_job = job(resources="gpus = 1")
    assert "--nv" in plan(gpu_job).argv
    assert "--nv" not in plan(gpu_job, allow(gpu_job, gpus=False)).argv
    assert "--nv" not in plan(job(), allow(job(), gpus=True)).argv


def test_userns_and_extra_flags_come_from_the_site() -> None:
    site = SandboxSite(apptainer="/opt/apptainer/bin/apptainer", userns=True,
                       extra_flags=("--security", "seccomp:/etc/hpc-runner/seccomp.json"))
    argv = plan(job(), site=site).argv
    assert argv[0] == "/opt/apptainer/bin/apptainer" and "--userns" in argv
    image_at = argv.index(IMAGE)
    assert argv[image_at - 2:image_at] == site.extra_flags


def test_the_command_follows_the_image_unchanged() -> None:
    spec = job(body='command = ["--help", "$(id)", "a b"]')
    argv = plan(spec).argv
    assert argv[argv.index(IMAGE) + 1:] == ("--help", "$(id)", "a b")


def test_a_script_runs_with_sh_e_from_the_metadata_directory() -> None:
    result = plan(job(body='script = "echo hi\\nfalse\\n"'))
    assert result.argv[-3:] == ("/bin/sh", "-e", "/.hpc-runner/script")
    assert result.script == "echo hi\nfalse\n"


def test_the_plan_reads_nothing_but_realpath() -> None:
    seen: list[str] = []

    def recording(path: str) -> str:
        seen.append(path)
        return path

    spec = job(body='command = ["true"]\nbinds = ["/nonexistent/data:/data:ro"]')
    plan(spec, realpath=recording, paths=JobPaths("j", "/no/such/work", "/no/such/tmp", "/no/such/meta"))
    assert "/nonexistent/data" in seen and "/no/such/work" in seen


# -- binds ---------------------------------------------------------------------------------------

def with_binds(*binds: Bind, mpi: bool = False) -> JobSpec:
    # Built directly: the spec parser already refuses some of these, the planner must too.
    return JobSpec(name="tests", image="clima-ci", command=("true",), binds=binds, mpi=mpi)


def test_granted_binds_are_canonicalised() -> None:
    spec = with_binds(Bind("/groups/esm/data", "/data", "ro"))
    result = plan(spec, realpath=fake_realpath({"/groups/esm/data": "/gpfs/esm/data"}))
    assert "/gpfs/esm/data:/data:ro" in flag_pairs(result.argv, "--bind")


@pytest.mark.parametrize(("bind", "links", "expected"), [
    (Bind("/var/lib/hpc-runner/db", "/db"), {}, "inside the protected path /var/lib/hpc-runner"),
    (Bind("/groups/esm/data", "/data", "ro"), {"/groups/esm/data": "/var/lib/hpc-runner"},
     "/groups/esm/data resolves to /var/lib/hpc-runner, which is inside the protected path"),
    (Bind("/etc/hpc-runner", "/cfg", "ro"), {},
     "a parent of the protected path /etc/hpc-runner/github-app.pem"),
    (Bind("/etc", "/hostetc", "ro"), {}, "a parent of the protected path"),
    (Bind("/groups/x", "/x"), {"/groups/x": "/"}, "resolves to /, which is the root directory"),
    (Bind("/groups/p", "/p"), {"/groups/p": "/proc/1"}, "inside /proc"),
    (Bind("/groups/d", "/d"), {"/groups/d": "/dev/shm"}, "inside /dev"),
])
def test_binds_reaching_protected_places_are_refused(bind: Bind, links: dict[str, str],
                                                     expected: str) -> None:
    with pytest.raises(SandboxRefused) as refused:
        plan(with_binds(bind), realpath=fake_realpath(links))
    assert f"bind {bind} refused" in str(refused.value)
    assert expected in str(refused.value)


def test_a_protected_path_behind_a_symlink_is_protected_under_both_names() -> None:
    site = SandboxSite(protected_paths=("/srv/state",))
    realpath = fake_realpath({"/srv/state": "/data/hpc-runner-state"})
    with pytest.raises(SandboxRefused, match="parent of the protected path /data/hpc-runner-state"):
        plan(with_binds(Bind("/data", "/d", "ro")), site=site, realpath=realpath)


@pytest.mark.parametrize("target", ["/", "/proc/x", "/work/sub", "/.hpc-runner", "/opt/hpc-runner/mpi",
                                    "/.singularity.d/env"])
def test_binds_onto_reserved_targets_are_refused(target: str) -> None:
    with pytest.raises(SandboxRefused, match="its target"):
        plan(with_binds(Bind("/groups/esm/data", target, "ro")))


@pytest.mark.parametrize("target", ["/etc/openmpi", "/etc", "/usr/share/openmpi/help"])
def test_binds_overlapping_the_host_mpi_are_refused_for_mpi_jobs(target: str) -> None:
    spec = with_binds(Bind("/groups/esm/data", target, "ro"), mpi=True)
    with pytest.raises(SandboxRefused, match="which the runner binds"):
        plan(spec, allow(spec), mpi=FAKE_MPI)


def test_host_mpi_binds_are_checked_against_protected_paths_too() -> None:
    mpi = replace(FAKE_MPI, binds=(*FAKE_MPI.binds, Bind("/var/lib/hpc-runner/db", "/db", "ro")))
    spec = job(mpi="enabled = true")
    with pytest.raises(InfrastructureError, match=r"host MPI bind .* inside the protected path"):
        plan(spec, mpi=mpi)


def test_bind_paths_that_apptainer_would_split_are_refused() -> None:
    with pytest.raises(SandboxRefused, match="must not contain"):
        plan(with_binds(Bind("/groups/esm/data", "/data")),
             realpath=fake_realpath({"/groups/esm/data": "/gpfs/a,b"}))


@pytest.mark.parametrize("field", ["workspace", "scratch", "meta"])
def test_runner_directories_that_bind_cannot_express_are_an_infrastructure_error(field: str) -> None:
    paths = replace(PATHS, **{field: "/scratch/job:42"})
    with pytest.raises(InfrastructureError, match="must not contain"):
        plan(job(), paths=paths)


def test_a_workspace_holding_a_protected_path_is_an_infrastructure_error() -> None:
    paths = replace(PATHS, workspace="/var/lib")
    with pytest.raises(InfrastructureError, match="contains the protected path /var/lib/hpc-runner"):
        plan(job(), paths=paths)


def test_metadata_may_live_inside_the_state_directory() -> None:
    paths = replace(PATHS, meta="/var/lib/hpc-runner/jobs/job-42")
    binds = flag_pairs(plan(job(), paths=paths).argv, "--bind")
    assert "/var/lib/hpc-runner/jobs/job-42:/.hpc-runner:ro" in binds


def test_the_image_path_must_be_absolute() -> None:
    with pytest.raises(InfrastructureError, match="absolute"):
        plan_sandbox(job(), allow(job()), "docker://debian", PATHS, SITE, None, realpath=identity)


# -- environment ---------------------------------------------------------------------------------

def env_of(result: SandboxPlan) -> dict[str, str]:
    return dict(token.split("=", 1) for token in shlex.split(result.env_file))


def test_the_environment_is_exactly_documented_plus_the_spec() -> None:
    spec = job(body='command = ["true"]\nenv = { FOO = "bar" }', resources="nodes = 2\ntasks = 6\n"
                    "cpus_per_task = 3")
    assert env_of(plan(spec)) == {
        "CI": "true", "TMPDIR": "/tmp", "FOO": "bar", "HPC_RUNNER_JOB_ID": "job-42",
        "HPC_RUNNER_JOB_NAME": "tests", "HPC_RUNNER_ACCOUNT": "clima", "HPC_RUNNER_NODES": "2",
        "HPC_RUNNER_TASKS": "6", "HPC_RUNNER_CPUS_PER_TASK": "3", "HPC_RUNNER_WORKSPACE": "/work",
    }
    assert set(env_of(plan(spec))) - {"FOO"} <= set(DOCUMENTED_ENV)


def test_hostile_values_are_quoted_in_the_env_file() -> None:
    values = {"SUBST": "$(touch /tmp/pwned)", "TICKS": "`id`", "QUOTES": "it's \"so\"",
              "NEWLINE": "a\nb", "BRACES": "${HOME}"}
    result = plan(JobSpec(name="tests", image="clima-ci", command=("true",), env=values))
    assert "SUBST='$(touch /tmp/pwned)'\n" in result.env_file
    assert "TICKS='`id`'\n" in result.env_file
    assert "QUOTES='it'\"'\"'s \"so\"'\n" in result.env_file
    assert "NEWLINE='a\nb'\n" in result.env_file
    assert {k: env_of(result)[k] for k in values} == values


def test_home_is_set_by_flag_and_a_job_may_choose_it() -> None:
    spec = JobSpec(name="tests", image="clima-ci", command=("true",), env={"HOME": "/work/home"})
    result = plan(spec)
    assert flag_pairs(result.argv, "--home") == [f"{PATHS.scratch}:/work/home"]
    assert "HOME" not in env_of(result)


def test_a_relative_home_is_refused() -> None:
    spec = JobSpec(name="tests", image="clima-ci", command=("true",), env={"HOME": "home"})
    with pytest.raises(SandboxRefused, match="HOME"):
        plan(spec)


def test_extra_env_sits_between_the_runner_defaults_and_the_spec() -> None:
    spec = JobSpec(name="tests", image="clima-ci", command=("true",), env={"BUILDKITE_X": "spec"})
    env = env_of(plan(spec, extra_env={"BUILDKITE_X": "extra", "BUILDKITE_Y": "extra", "CI": "yes",
                                       "HPC_RUNNER_JOB_ID": "forged"}))
    assert env["BUILDKITE_X"] == "spec" and env["BUILDKITE_Y"] == "extra" and env["CI"] == "yes"
    assert env["HPC_RUNNER_JOB_ID"] == "job-42"


def test_an_invalid_extra_env_name_is_refused() -> None:
    with pytest.raises(SandboxRefused, match="not a shell name"):
        plan(job(), extra_env={"BAD-NAME": "x"})


def test_mpi_library_dir_comes_first_on_ld_library_path() -> None:
    spec = JobSpec(name="tests", image="clima-ci", command=("true",), mpi=True,
                   env={"LD_LIBRARY_PATH": "/opt/app/lib"})
    assert env_of(plan(spec, mpi=FAKE_MPI))["LD_LIBRARY_PATH"] == "/opt/hpc-runner/mpi/lib:/opt/app/lib"
    assert "LD_LIBRARY_PATH" not in env_of(plan(job()))


def test_expected_env_names() -> None:
    spec = job(body='command = ["true"]\nenv = { FOO = "1" }', mpi="enabled = true")
    result = plan(spec, mpi=FAKE_MPI)
    for name in ("FOO", "HOME", "CI", "APPTAINER_NAME", "SINGULARITY_BIND", "PWD", "OMPI_COMM_WORLD_RANK",
                 "PMIX_RANK", "SLURM_PROCID"):
        assert expected_env_name(name, spec, result), name
    for name in ("BAR", "OMPI", "USER", "TERM", "http_proxy"):
        assert not expected_env_name(name, spec, result), name
    assert not expected_env_name("OMPI_COMM_WORLD_RANK", job(), plan(job()))
    assert "APPTAINER_*" in APPTAINER_ADDED_ENV


# -- launching -----------------------------------------------------------------------------------

def test_a_plain_job_launches_as_its_argv_with_path_alone() -> None:
    spec = job()
    result = plan(spec)
    assert result.rank_wrapper == () and result.passthrough == ()
    assert plan_local_launch(result, spec, allow(spec), None) == result.argv
    assert dict(result.host_env) == {"PATH": SITE.host_path}


def test_an_mpi_job_launches_each_rank_through_the_wrapper_under_mpirun() -> None:
    spec = job(resources="tasks = 4", mpi="enabled = true")
    result = plan(spec, mpi=FAKE_MPI)
    launch = plan_local_launch(result, spec, allow(spec), FAKE_MPI)
    assert launch[:6] == ("/usr/bin/mpirun", "-np", "4", "--oversubscribe", "--bind-to", "none")
    assert launch[6:10] == result.rank_wrapper and result.rank_wrapper[0] == "/bin/sh"
    assert launch[10:] == result.argv
    assert dict(result.host_env) == {"PATH": SITE.host_path, "PMIX_MCA_gds": "hash"}


def test_a_root_site_lets_mpirun_run_as_root() -> None:
    spec = job(mpi="enabled = true")
    env = plan(spec, site=SandboxSite(userns=True), mpi=FAKE_MPI).host_env
    assert env["OMPI_ALLOW_RUN_AS_ROOT"] == env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] == "1"
    assert "OMPI_ALLOW_RUN_AS_ROOT" not in plan(spec, mpi=FAKE_MPI).host_env
    assert set(plan(job(), site=SandboxSite(userns=True)).host_env) == {"PATH"}


def test_a_module_installed_mpirun_directory_joins_the_launcher_path() -> None:
    mpi = replace(FAKE_MPI, mpirun="/opt/openmpi/4.1/bin/mpirun")
    spec = job(mpi="enabled = true")
    assert plan(spec, mpi=mpi).host_env["PATH"] == f"/opt/openmpi/4.1/bin:{SITE.host_path}"


def test_a_gpu_job_carries_cuda_visible_devices_across_cleanenv() -> None:
    assert plan(job(resources="gpus = 1")).passthrough == ("CUDA_VISIBLE_DEVICES",)


def test_mpi_without_a_discovered_host_mpi_is_an_infrastructure_error() -> None:
    with pytest.raises(InfrastructureError, match="no host MPI"):
        plan(job(mpi="enabled = true"))


def test_a_denied_decision_is_refused() -> None:
    with pytest.raises(SandboxRefused, match="did not allow"):
        plan(job(), Decision(False, reasons=("no",)))


def test_the_rank_wrapper_reexports_only_launcher_variables(tmp_path: Path) -> None:
    script = rank_wrapper_script(("OMPI_*", "PMIX_*", "SLURM_*", "CUDA_VISIBLE_DEVICES"))
    marker = tmp_path / "pwned"
    env = {"PATH": "/usr/bin:/bin", "OMPI_COMM_WORLD_RANK": "3", "PMIX_RANK": "3",
           "OMPI_TRICKY": f"a b $(touch {marker}) `touch {marker}`\nPMIX_FAKE=1",
           "SLURM_PROCID": "3", "CUDA_VISIBLE_DEVICES": "0,1", "CUDA_VISIBLE_DEVICES_X": "no",
           "OTHER": "no", "XOMPI_A": "no"}
    done = subprocess.run(["/bin/sh", "-c", script, "hpcr-rank", "env", "-0"], env=env,
                          capture_output=True, text=True, check=True)
    got = dict(item.split("=", 1) for item in done.stdout.split("\0") if item)
    carried = {k.removeprefix("APPTAINERENV_"): v for k, v in got.items() if k.startswith("APPTAINERENV_")}
    # A line of a multi-line value that looks like a variable yields only an empty one.
    assert carried == {"OMPI_COMM_WORLD_RANK": "3", "PMIX_RANK": "3", "OMPI_TRICKY": env["OMPI_TRICKY"],
                       "SLURM_PROCID": "3", "CUDA_VISIBLE_DEVICES": "0,1", "PMIX_FAKE": ""}
    assert not marker.exists()


def test_rank_wrapper_names_are_checked() -> None:
    with pytest.raises(ValueError, match="not a shell name"):
        rank_wrapper_script(("OMPI'; rm -rf /; '*",))


# -- the rank hold (why: see RANK_HOLD_SCRIPT) ----------------------------------------------------

SHELLS = [shell for shell in ("/bin/dash", "/bin/bash") if Path(shell).exists()]


def test_each_mpi_rank_runs_its_command_under_the_hold_and_other_jobs_do_not() -> None:
    spec = job(body='command = ["/work/build/mpi-tests", "--fast"]', mpi="enabled = true")
    argv = plan(spec, mpi=FAKE_MPI).argv
    assert argv[argv.index(IMAGE) + 1:] == ("/bin/sh", "-c", RANK_HOLD_SCRIPT, RANK_HOLD_NAME,
                                            "/work/build/mpi-tests", "--fast") == (*RANK_HOLD, *spec.command)
    plain = plan(job(body='command = ["make", "check"]')).argv
    assert plain[plain.index(IMAGE) + 1:] == ("make", "check")


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize(("env", "ranks"), [
    ({}, 1),
    ({"HPC_RUNNER_TASKS": "4"}, 4),
    # Under srun: this node's entry, whatever the job's total.
    ({"HPC_RUNNER_TASKS": "8", "SLURM_STEP_TASKS_PER_NODE": "4", "SLURM_NODEID": "0"}, 4),
    ({"HPC_RUNNER_TASKS": "7", "SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": "0"}, 2),
    ({"HPC_RUNNER_TASKS": "7", "SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": "2"}, 2),
    ({"HPC_RUNNER_TASKS": "7", "SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "SLURM_NODEID": "3"}, 1),
    ({"HPC_RUNNER_TASKS": "5", "SLURM_STEP_TASKS_PER_NODE": "3,2", "SLURM_NODEID": "1"}, 2),
    # Anything unexpected waits for no one, as Apptainer alone would.
    ({"HPC_RUNNER_TASKS": "8", "SLURM_STEP_TASKS_PER_NODE": "4"}, 1),
    ({"HPC_RUNNER_TASKS": "8", "SLURM_STEP_TASKS_PER_NODE": "4", "SLURM_NODEID": "1"}, 1),
    ({"HPC_RUNNER_TASKS": "8", "SLURM_STEP_TASKS_PER_NODE": "2(x", "SLURM_NODEID": "0"}, 1),
    ({"HPC_RUNNER_TASKS": "8", "SLURM_STEP_TASKS_PER_NODE": "(x2)", "SLURM_NODEID": "0"}, 1),
    ({"HPC_RUNNER_TASKS": "8", "SLURM_STEP_TASKS_PER_NODE": "$(id)*", "SLURM_NODEID": "0"}, 1),
    ({"HPC_RUNNER_TASKS": "8", "SLURM_STEP_TASKS_PER_NODE": "4", "SLURM_NODEID": "-1"}, 1),
    ({"HPC_RUNNER_TASKS": "many"}, 1),
])
def test_the_hold_counts_the_ranks_of_its_own_node(shell: str, env: dict[str, str], ranks: int) -> None:
    done = subprocess.run([shell, "-c", RANK_COUNT_SCRIPT + 'echo "$ranks"'],
                          env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True, check=True)
    assert (done.stdout, done.stderr) == (f"{ranks}\n", "")


def hold_in(marks: Path) -> str:
    assert RANK_HOLD_DIR in RANK_HOLD_SCRIPT
    return RANK_HOLD_SCRIPT.replace(RANK_HOLD_DIR, str(marks))


@pytest.mark.parametrize("shell", SHELLS)
def test_a_rank_ends_only_once_every_rank_of_its_node_has_started(shell: str, tmp_path: Path) -> None:
    marks, ran = tmp_path / "marks", tmp_path / "ran"
    env = {"PATH": "/usr/bin:/bin", "HPC_RUNNER_TASKS": "2"}
    rank = subprocess.Popen([shell, "-c", hold_in(marks), RANK_HOLD_NAME, "sh", "-c", f"touch {ran}; exit 7"],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(ran.exists, 10, what="the rank's command to run")
        assert len(list(marks.iterdir())) == 1
        with pytest.raises(subprocess.TimeoutExpired):
            rank.wait(0.5)  # its command has ended, the other rank has not started
        (marks / "other-rank").touch()
        assert rank.wait(10) == 7
        assert rank.stderr is not None and rank.stderr.read() == ""
    finally:
        rank.kill()
        rank.wait()


@pytest.mark.parametrize("shell", SHELLS)
def test_the_last_rank_to_start_ends_with_its_command(shell: str, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    (marks / "first-rank").touch()
    done = subprocess.run([shell, "-c", hold_in(marks), RANK_HOLD_NAME, "sh", "-c", "echo \"$0 $1\"; exit 3",
                           "it's", "$(id)"], env={"PATH": "/usr/bin:/bin", "HPC_RUNNER_TASKS": "2"},
                          capture_output=True, text=True, timeout=10)
    assert (done.returncode, done.stdout, done.stderr) == (3, "it's $(id)\n", "")


@pytest.mark.parametrize("shell", SHELLS)
def test_a_rank_that_cannot_mark_itself_started_fails_before_running_anything(
        shell: str, tmp_path: Path) -> None:
    (tmp_path / "file").touch()
    ran = tmp_path / "ran"
    marks = tmp_path / "file" / "marks"
    done = subprocess.run([shell, "-c", hold_in(marks), RANK_HOLD_NAME, "touch", str(ran)],
                          env={"PATH": "/usr/bin:/bin", "HPC_RUNNER_TASKS": "2"},
                          capture_output=True, text=True, timeout=10)
    assert done.returncode == 125
    assert "hpc-runner: cannot mark this rank started in" in done.stderr
    assert not ran.exists()
