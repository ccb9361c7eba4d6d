"""The setup phase and named caches: the spec and policy keys, every refusal, the setup's plan
(goldens in `golden/sandbox-setup*.txt`, `UPDATE_GOLDEN=1` rewrites them), the cache directory
checks, and the phase run through a stand-in executor into the job's log."""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import check_golden

from runner.errors import InputError
from runner.executors.local import LocalLaunch
from runner.identity import identity_from_json
from runner.job import Outcome
from runner.lifecycle.setup import (
    MAIN_GROUP,
    SETUP_GROUP,
    PreparedSetup,
    cache_size,
    check_caches,
    human_size,
    run_setup,
)
from runner.policy import Decision, decide, parse_policy_text
from runner.policy.engine import SETUP_OFFLINE_NOTE, SlurmResources
from runner.spec import DEFAULT_SETUP_SECONDS, JobSpec, Setup, parse_job_text, spec_from_json
from sandbox.plan import (
    JobPaths,
    SandboxPlan,
    SandboxRefused,
    SandboxSite,
    expected_env_name,
    plan_sandbox,
    plan_setup,
)

GOLDEN_DIR = Path(__file__).with_name("golden")
IMAGE = "/groups/esm/images/clima-ci.sif"
PATHS = JobPaths(job_id="job-42", workspace="/scratch/hpc-runner/job-42/work",
                 scratch="/scratch/hpc-runner/job-42/setup-tmp", meta="/scratch/hpc-runner/job-42/meta")
SITE = SandboxSite(protected_paths=("/var/lib/hpc-runner", "/scratch/hpc-runner"))
DEPOT = "/scratch/ci/esm/depot"

POLICY = f"""\
version = 1

[accounts.esm]
slurm_account = "esm"
partitions = ["debug"]
max_setup_time = "20m"

[accounts.esm.caches]
julia-depot = "{DEPOT}"
pip = "/scratch/ci/esm/pip"

[images.clima-ci]
path = "{IMAGE}"
sha256 = "{'a' * 64}"

[[grants]]
name = "esm-ci"
principals = ["local:user:alice"]
account = "esm"
images = ["clima-ci"]
caches = ["julia-depot"]
setup_network = true

[[grants]]
name = "esm-offline"
principals = ["local:user:bob"]
account = "esm"
images = ["clima-ci"]
caches = ["julia-depot"]
"""
ALICE = identity_from_json({"source": "local", "user": "alice"}, "alice")
BOB = identity_from_json({"source": "local", "user": "bob"}, "bob")


def job(extra: str = "", setup: str | None = 'command = ["julia", "-e", "using Pkg; Pkg.instantiate()"]',
        caches: str = 'caches = ["julia-depot"]') -> JobSpec:
    setup_table = f"\n[job.setup]\n{setup}\n" if setup is not None else ""
    return parse_job_text(f'[job]\nname = "tests"\nimage = "clima-ci"\ncommand = ["julia", "test.jl"]\n'
                          f"{caches}\n{extra}\n{setup_table}", "job.toml")


def error_of(text: str) -> str:
    with pytest.raises(InputError) as caught:
        parse_job_text(text, "job.toml")
    return str(caught.value)


# -- the spec ------------------------------------------------------------------------------------

def test_a_setup_table_and_caches_are_read_with_a_ten_minute_default() -> None:
    spec = job()
    assert spec.setup == Setup(command=("julia", "-e", "using Pkg; Pkg.instantiate()"), script=None,
                               time_seconds=600)
    assert DEFAULT_SETUP_SECONDS == 600
    assert spec.caches == ("julia-depot",)
    timed = job(setup='script = "make deps"\ntime = "2m"')
    assert timed.setup == Setup(command=None, script="make deps", time_seconds=120)


def test_setup_and_caches_survive_the_stores_round_trip() -> None:
    for spec in (job(), job(setup='script = "make deps\\n"\ntime = "90s"'), job(setup=None, caches="")):
        data = json.loads(json.dumps(spec.to_json()))
        assert spec_from_json(data, "stored") == spec


def test_a_record_from_before_setup_and_caches_still_reads() -> None:
    data = job(setup=None, caches="").to_json()
    del data["setup"], data["caches"]
    assert spec_from_json(data, "stored").setup is None


@pytest.mark.parametrize(("body", "message"), [
    ('[job.setup]\ntime = "5m"\n', "job.toml:5: job.setup: needs either `command` (an array) or `script`"),
    ('[job.setup]\ncommand = ["a"]\nscript = "b"\n', "job.toml:7: job.setup.script: give either"),
    ('[job.setup]\ncommand = ["a"]\nnetwork = true\n', "job.toml:7: job.setup.network: unknown key"),
    ('[job.setup]\ncommand = ["a"]\ntime = "soon"\n', "job.toml:7: job.setup.time: 'soon' is not a duration"),
    ('caches = ["julia.depot"]\n', "job.toml:5: job.caches[0]: 'julia.depot' is not a cache name"),
    ('caches = ["pip", "pip"]\n', "job.toml:5: job.caches[1]: 'pip' is listed twice"),
])
def test_a_malformed_setup_or_cache_list_names_file_line_and_field(body: str, message: str) -> None:
    text = f'[job]\nname = "t"\nimage = "i"\ncommand = ["x"]\n{body}'
    assert error_of(text).startswith(message)


# -- the policy ----------------------------------------------------------------------------------

def test_the_policy_reads_caches_grants_of_them_and_the_setup_caps() -> None:
    policy = parse_policy_text(POLICY, "p.toml")
    account = policy.accounts["esm"]
    assert dict(account.caches) == {"julia-depot": DEPOT, "pip": "/scratch/ci/esm/pip"}
    assert account.max_setup_time == 1200
    assert policy.grants[0].caches == ("julia-depot",) and policy.grants[0].setup_network
    assert not policy.grants[1].setup_network
    default = parse_policy_text(POLICY.replace('max_setup_time = "20m"\n', ""), "p.toml")
    assert default.accounts["esm"].max_setup_time == 1800


@pytest.mark.parametrize(("old", "new", "message"), [
    ('caches = ["julia-depot"]\nsetup_network', 'caches = ["conda"]\nsetup_network',
     "p.toml:21: grants[0].caches[0]: account esm has no cache 'conda' (its caches: julia-depot, pip)"),
    ('pip = "/scratch/ci/esm/pip"', 'pip = "scratch/pip"',
     "p.toml:10: accounts.esm.caches.pip: cache directory 'scratch/pip' must be an absolute path"),
    ('pip = "/scratch/ci/esm/pip"', 'Julia_depot = "/x"',
     "p.toml:10: accounts.esm.caches.Julia_depot: 'Julia_depot' and 'julia-depot' would both be "
     "HPC_RUNNER_CACHE_JULIA_DEPOT"),
    ('pip = "/scratch/ci/esm/pip"', 'pip = "/"', "p.toml:10: accounts.esm.caches.pip: a cache must not be"),
    ('setup_network = true', 'setup_network = "yes"', "p.toml:22: grants[0].setup_network: must be true or"),
])
def test_a_malformed_cache_or_setup_key_in_a_policy_names_file_line_and_field(old: str, new: str,
                                                                              message: str) -> None:
    assert old in POLICY
    with pytest.raises(InputError) as caught:
        parse_policy_text(POLICY.replace(old, new, 1), "p.toml")
    assert str(caught.value).startswith(message)


def test_an_allowed_decision_carries_the_caches_and_the_setups_network() -> None:
    policy = parse_policy_text(POLICY, "p.toml")
    decision = decide(policy, ALICE, job())
    assert decision.allowed and decision.caches == (("julia-depot", DEPOT),)
    assert decision.setup_network and not decision.setup_network_isolated
    data = decision.to_json()
    assert data["caches"] == {"julia-depot": DEPOT}
    assert data["setup"] == {"network": True, "network_isolated": False, "max_time": "20m"}
    assert SETUP_OFFLINE_NOTE not in decision.notes


def test_setup_network_not_granted_runs_the_setup_offline_and_says_so_rather_than_denying() -> None:
    decision = decide(parse_policy_text(POLICY, "p.toml"), BOB, job())
    assert decision.allowed
    assert not decision.setup_network and decision.setup_network_isolated
    assert SETUP_OFFLINE_NOTE in decision.notes


def test_a_job_without_setup_has_no_setup_network_even_where_the_grant_allows_it() -> None:
    decision = decide(parse_policy_text(POLICY, "p.toml"), ALICE, job(setup=None))
    assert decision.allowed and not decision.setup_network and not decision.notes


@pytest.mark.parametrize(("spec", "reason"), [
    (job(caches='caches = ["pip"]'),
     "grant 'esm-ci': cache 'pip' is not granted (the grant's caches: julia-depot)"),
    (job(caches='caches = ["conda"]'),
     "grant 'esm-ci': cache 'conda' is not one of account esm's caches (julia-depot, pip)"),
    (job(setup='command = ["make"]\ntime = "21m"'),
     "grant 'esm-ci': setup time 21m exceeds account esm's max_setup_time = 20m"),
])
def test_each_refusal_is_a_denial_with_its_reason(spec: JobSpec, reason: str) -> None:
    decision = decide(parse_policy_text(POLICY, "p.toml"), ALICE, spec)
    assert not decision.allowed
    assert decision.reasons == (reason,)


# -- the plan ------------------------------------------------------------------------------------

def allowed(spec: JobSpec, *, setup_network: bool) -> Decision:
    slurm = SlurmResources(account="esm", partition="debug", nodes=1, tasks=1, tasks_per_node=None,
                           cpus_per_task=1, gpus=0, memory_mb=None, time_seconds=1800)
    return Decision(True, grant="esm-ci", account="esm", slurm=slurm, image=spec.image,
                    caches=tuple((name, DEPOT) for name in spec.caches), setup_network=setup_network)


def render(result: SandboxPlan) -> str:
    parts = ["# argv", *(json.dumps(a) if "\n" in a else a for a in result.argv), "",
             "# env file", result.env_file.rstrip("\n")]
    if result.script is not None:
        parts += ["", "# script", result.script.rstrip("\n")]
    parts += ["", "# host env", *(f"{k}={v}" for k, v in sorted(result.host_env.items()))]
    return "\n".join(parts) + "\n"


@pytest.mark.parametrize(("name", "spec", "setup_network"), [
    ("setup", job(), False),
    ("setup-network", job(setup='script = "julia -e \\"using Pkg; Pkg.instantiate()\\"\\n"'), True),
])
def test_golden_setup_plan(name: str, spec: JobSpec, setup_network: bool) -> None:
    result = plan_setup(spec, allowed(spec, setup_network=setup_network), IMAGE, PATHS, SITE)
    check_golden(GOLDEN_DIR / f"sandbox-{name}.txt", render(result), "the setup plan")


def test_golden_main_plan_with_a_cache() -> None:
    spec = job()
    result = plan_sandbox(spec, allowed(spec, setup_network=True), IMAGE,
                          replace(PATHS, scratch="/scratch/hpc-runner/job-42/tmp"), SITE, None)
    check_golden(GOLDEN_DIR / "sandbox-caches.txt", render(result), "the main plan")


def binds_of(argv: tuple[str, ...]) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == "--bind"]


def test_caches_are_read_write_in_setup_and_read_only_in_the_main_phase() -> None:
    spec = job()
    decision = allowed(spec, setup_network=False)
    setup = plan_setup(spec, decision, IMAGE, PATHS, SITE)
    main = plan_sandbox(spec, decision, IMAGE, PATHS, SITE, None)
    assert f"{DEPOT}:/cache/julia-depot:rw" in binds_of(setup.argv)
    assert f"{DEPOT}:/cache/julia-depot:ro" in binds_of(main.argv)
    assert not any(b.startswith(DEPOT) and b.endswith(":rw") for b in binds_of(main.argv))
    for result in (setup, main):
        assert result.env["HPC_RUNNER_CACHE_JULIA_DEPOT"] == "/cache/julia-depot"
        assert expected_env_name("HPC_RUNNER_CACHE_JULIA_DEPOT", spec, result)


def test_the_setup_is_network_isolated_unless_granted_whatever_the_main_phase_has() -> None:
    spec = job(extra="network = true")
    offline = plan_setup(spec, replace(allowed(spec, setup_network=False), network=True), IMAGE, PATHS, SITE)
    online = plan_setup(spec, allowed(spec, setup_network=True), IMAGE, PATHS, SITE)
    assert "--network" in offline.argv and offline.argv[offline.argv.index("--network") + 1] == "none"
    assert "--net" not in online.argv and "--network" not in online.argv
    assert "--pid" in offline.argv and "--pid" in online.argv


@pytest.mark.parametrize(("directory", "links", "message"), [
    ("/var/lib/hpc-runner/cache", {}, "cache julia-depot refused: its directory /var/lib/hpc-runner/cache "
                                      "is inside the protected path /var/lib/hpc-runner"),
    ("/scratch", {}, "cache julia-depot refused: its directory /scratch is a parent of the protected path"),
    ("/scratch/ci/depot", {"/scratch/ci/depot": "/scratch/hpc-runner/job-7"},
     "cache julia-depot refused: its directory /scratch/ci/depot resolves to /scratch/hpc-runner/job-7, "
     "which is inside the protected path /scratch/hpc-runner"),
    ("/proc/self", {}, "cache julia-depot refused: its directory /proc/self is inside /proc"),
])
def test_a_cache_that_reaches_a_protected_path_is_refused(directory: str, links: dict[str, str],
                                                          message: str) -> None:
    spec = job()
    decision = replace(allowed(spec, setup_network=False), caches=(("julia-depot", directory),))

    def realpath(path: str) -> str:
        return links.get(path, path)
    for planner in (lambda: plan_setup(spec, decision, IMAGE, PATHS, SITE, realpath=realpath),
                    lambda: plan_sandbox(spec, decision, IMAGE, PATHS, SITE, None, realpath=realpath)):
        with pytest.raises(SandboxRefused) as caught:
            planner()
        assert str(caught.value).startswith(message)


def test_a_bind_onto_a_cache_is_refused() -> None:
    spec = job(extra='binds = ["/groups/esm/data:/cache/julia-depot/x:ro"]')
    with pytest.raises(SandboxRefused, match="overlapping /cache/julia-depot, which the runner binds"):
        plan_sandbox(spec, allowed(spec, setup_network=False), IMAGE, PATHS, SITE, None)


# -- the cache directory at start ----------------------------------------------------------------

def test_a_private_directory_of_the_service_account_is_a_cache(tmp_path: Path) -> None:
    depot = tmp_path / "depot"
    depot.mkdir(mode=0o755)
    check_caches(Decision(True, caches=(("julia-depot", str(depot)),)))


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: None, "does not exist"),
    (lambda p: p.write_text("x"), "is not a directory"),
    (lambda p: (p.mkdir(), p.chmod(0o777)), r"can be written by others \(mode 777\)"),
    (lambda p: (p.mkdir(), p.chmod(0o775)), r"can be written by others \(mode 775\)"),
])
def test_a_cache_directory_that_is_missing_or_open_to_others_refuses_the_job(tmp_path: Path, make: object,
                                                                             message: str) -> None:
    depot = tmp_path / "depot"
    assert callable(make)
    make(depot)
    with pytest.raises(SandboxRefused, match=message):
        check_caches(Decision(True, caches=(("julia-depot", str(depot)),)))


@pytest.mark.skipif(os.geteuid() != 0, reason="making a directory of another user needs root")
def test_a_cache_directory_of_another_user_refuses_the_job(tmp_path: Path) -> None:
    depot = tmp_path / "depot"
    depot.mkdir(mode=0o755)
    os.chown(depot, 65534, 65534)
    with pytest.raises(SandboxRefused, match="belongs to uid 65534, not to the service account"):
        check_caches(Decision(True, caches=(("julia-depot", str(depot)),)))


def test_a_cache_reached_through_a_world_writable_directory_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    (shared / "depot").mkdir(mode=0o755)
    with pytest.raises(SandboxRefused, match="could be swapped"):
        check_caches(Decision(True, caches=(("julia-depot", str(shared / "depot")),)))


# -- the size in the log -------------------------------------------------------------------------

def test_a_caches_size_counts_files_once_and_never_follows_links(tmp_path: Path) -> None:
    depot = tmp_path / "depot"
    (depot / "packages" / "A").mkdir(parents=True)
    (depot / "packages" / "A" / "src.jl").write_bytes(b"x" * 3000)
    os.link(depot / "packages" / "A" / "src.jl", depot / "hard")
    (depot / "small").write_bytes(b"y" * 24)
    outside = tmp_path / "big"
    outside.write_bytes(b"z" * 100_000)
    (depot / "link").symlink_to(outside)
    (depot / "dirlink").symlink_to(tmp_path)
    assert cache_size(depot, 10.0) == (3024, True)


def test_counting_a_cache_stops_at_its_deadline_and_says_so(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x")
    assert cache_size(tmp_path, -1.0) == (0, False)


@pytest.mark.parametrize(("size", "text"), [(0, "0 bytes"), (1023, "1023 bytes"), (1536, "1.5 KiB"),
                                            (int(1.2 * 1024 ** 3), "1.2 GiB"), (300 * 1024 ** 2, "300 MiB")])
def test_sizes_read_as_people_write_them(size: int, text: str) -> None:
    assert human_size(size) == text


# -- the phase, through a stand-in for the local executor ----------------------------------------

def setup_of(tmp_path: Path, caches: tuple[tuple[str, str], ...] = ()) -> PreparedSetup:
    launch = LocalLaunch(argv=("apptainer",), env={}, cwd=str(tmp_path), log_path=tmp_path / "output.log",
                         walltime_seconds=60, limit_name="setup time")
    return PreparedSetup("job-1", launch, caches)


def run(setup: PreparedSetup, outcome: Outcome, output: bytes = b"") -> Outcome | None:
    async def executor(launch: LocalLaunch, cancel: asyncio.Event | None) -> Outcome:
        with open(launch.log_path, "ab") as log:
            log.write(output)
        return outcome
    return asyncio.run(run_setup(setup, executor, asyncio.Event()))


def test_a_setup_that_succeeds_is_grouped_in_the_log_with_the_cache_size(tmp_path: Path) -> None:
    depot = tmp_path / "depot"
    depot.mkdir()
    (depot / "Manifest.toml").write_bytes(b"m" * 2048)
    setup = setup_of(tmp_path, (("julia-depot", str(depot)),))
    assert run(setup, Outcome("succeeded", 0, "exit status 0"), b"Precompiling...") is None
    assert (tmp_path / "output.log").read_text() == (
        f"{SETUP_GROUP}\nPrecompiling...\ncache julia-depot: 2.0 KiB\n{MAIN_GROUP}\n")


def test_a_failed_setup_ends_the_job_failed_saying_so(tmp_path: Path) -> None:
    ended = run(setup_of(tmp_path), Outcome("failed", 3, "exit status 3"), b"no network\n")
    assert ended == Outcome("failed", 3, "the setup phase failed: exit status 3")
    log = (tmp_path / "output.log").read_text()
    assert log.endswith("hpc-runner: the setup phase failed (exit status 3); the main phase does not run\n")
    assert MAIN_GROUP not in log


def test_a_setup_past_its_time_fails_the_job(tmp_path: Path) -> None:
    ended = run(setup_of(tmp_path), Outcome("timed_out", 143, "setup time of 60s exceeded"))
    assert ended == Outcome("failed", 143, "the setup phase failed: setup time of 60s exceeded")


def test_a_setup_cancelled_ends_the_job_cancelled(tmp_path: Path) -> None:
    ended = run(setup_of(tmp_path), Outcome("cancelled", 143, "cancelled"))
    assert ended is not None and ended.state == "cancelled"
    assert ended.detail == "cancelled during the setup phase"
