"""The example policies in policies/ are valid and decide the cases their comments describe."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.identity import Identity, load_identity
from runner.policy import Decision, Policy, load_policy
from runner.policy import decide as decide_policy
from runner.policy.engine import SlurmResources
from runner.sources.buildkite.translate import identity as buildkite_identity
from runner.spec import JobSpec, load_job, parse_job_text

POLICIES = Path(__file__).resolve().parents[2] / "policies"
EXAMPLES = POLICIES / "examples"


def _policy(name: str) -> Policy:
    return load_policy(POLICIES / f"{name}.toml")


def _job(image: str, extra: str = "", resources: str = "") -> JobSpec:
    text = f'[job]\nname = "ci"\nimage = "{image}"\ncommand = ["make", "test"]\n{extra}'
    return parse_job_text(text + ("\n[job.resources]\n" + resources if resources else ""), "job.toml")


def _decide(policy: str, identity: Identity, job: JobSpec) -> Decision:
    return decide_policy(_policy(policy), identity, job)


@pytest.mark.parametrize("name", ["research-group", "shared-cluster", "strict-site"])
def test_example_policy_is_valid(name: str) -> None:
    policy = _policy(name)
    assert policy.grants and policy.accounts and policy.images


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.json")), ids=lambda p: p.name)
def test_example_identity_is_valid(path: Path) -> None:
    assert load_identity(path).principals()


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.name)
def test_example_job_is_valid(path: Path) -> None:
    assert load_job(path).name == path.stem


# --- research-group.toml --------------------------------------------------------------------------

def test_alices_pull_request_runs_the_mpi_tests_job_with_the_accounts_slurm_request() -> None:
    decision = decide_policy(_policy("research-group"), load_identity(EXAMPLES / "alice-pr.json"),
                             load_job(EXAMPLES / "mpi-tests.toml"))
    assert (decision.allowed, decision.grant, decision.account, decision.reasons) == (
        True, "clima-prs", "clima", ())
    assert decision.slurm == SlurmResources(
        account="esm", partition="expansion", nodes=2, tasks=8, tasks_per_node=None, cpus_per_task=4, gpus=0,
        memory_mb=16 * 1024, time_seconds=1800, queue_seconds=24 * 3600)
    assert decision.mpi and not decision.network_isolated


def test_the_example_buildkite_identity_runs_the_mpi_tests_job() -> None:
    decision = decide_policy(_policy("research-group"), load_identity(EXAMPLES / "buildkite-main.json"),
                             load_job(EXAMPLES / "mpi-tests.toml"))
    assert (decision.allowed, decision.grant) == (True, "clima-prs")


def test_a_core_member_from_a_fork_is_denied_because_of_forks() -> None:
    fork = Identity(source="github", repository="CliMA/ClimaAtmos.jl", actor="alice", teams=("CliMA/core",),
                    event="pull_request", ref="refs/pull/14/head", fork=True)
    decision = _decide("research-group", fork, load_job(EXAMPLES / "mpi-tests.toml"))
    assert decision.reasons == (
        "grant 'clima-prs': the job comes from a fork and the grant has forks = false",)


def test_an_outsiders_fork_pull_request_is_denied() -> None:
    decision = decide_policy(_policy("research-group"), load_identity(EXAMPLES / "fork-pr.json"),
                             load_job(EXAMPLES / "mpi-tests.toml"))
    assert not decision.allowed
    assert decision.reasons[0].startswith("no grant names this identity")


def test_a_job_too_big_lists_each_cap_and_grant_rule_it_breaks() -> None:
    decision = decide_policy(_policy("research-group"), load_identity(EXAMPLES / "alice-pr.json"),
                             load_job(EXAMPLES / "too-big.toml"))
    assert decision.reasons == (
        "grant 'clima-prs': bind /home:/home:rw is not granted",
        "grant 'clima-prs': the job asks for network access and the grant has network = false",
        "grant 'clima-prs': 16 nodes exceed account clima's max_nodes = 4",
        "grant 'clima-prs': walltime 2d exceeds account clima's max_time = 4h",
    )


def test_a_local_user_gets_nothing_from_the_research_group_policy() -> None:
    decision = decide_policy(_policy("research-group"), load_identity(EXAMPLES / "local-user.json"),
                             load_job(EXAMPLES / "mpi-tests.toml"))
    assert decision.reasons == ("no grant names this identity (it holds: local:user:alice, local:group:esm)",)


def test_a_push_to_another_branch_is_denied() -> None:
    push = Identity(source="github", repository="CliMA/ClimaAtmos.jl", actor="alice", teams=("CliMA/core",),
                    event="push", ref="refs/heads/experiment")
    decision = _decide("research-group", push, _job("clima-ci"))
    assert decision.reasons == ("grant 'clima-prs': ref 'refs/heads/experiment' is not one of the grant's "
                                "refs "
                                "(refs/heads/main, refs/pull/*)",)


# --- strict-site.toml -----------------------------------------------------------------------------

def _physics_pipeline(signer: str | None, *, branch: str = "main", fork: bool = False) -> Identity:
    return Identity(source="buildkite", organization="physics", pipeline="solver-ci", branch=branch,
                    signer=signer, fork=fork)


def test_strict_site_runs_a_signed_pipeline_on_main() -> None:
    decision = _decide("strict-site", _physics_pipeline("physics-2026"),
                       _job("physics-ci", "[job.mpi]\nenabled = true\n", 'time = "1h"\nnodes = 2'))
    assert (decision.allowed, decision.grant) == (True, "signed-pipelines")
    assert decision.slurm is not None
    assert (decision.slurm.account, decision.slurm.partition) == ("phys-ci", "ci")


def test_strict_site_runs_a_signed_release_tag() -> None:
    # The identity Buildkite's job env for a build of tag v2.0 makes (its branch is the tag's name).
    env = {"BUILDKITE_ORGANIZATION_SLUG": "physics", "BUILDKITE_PIPELINE_SLUG": "solver-ci",
           "BUILDKITE_TAG": "v2.0", "BUILDKITE_BRANCH": "v2.0", "BUILDKITE_PULL_REQUEST": "false",
           "BUILDKITE_SOURCE": "webhook"}
    tag, _ = buildkite_identity(env, "physics-2026")
    assert tag.ref == "refs/tags/v2.0"
    assert _decide("strict-site", tag, _job("physics-ci")).allowed


def test_strict_site_denies_an_unsigned_pipeline() -> None:
    decision = _decide("strict-site", _physics_pipeline(None), _job("physics-ci"))
    assert decision.reasons == ("grant 'signed-pipelines': the job is unsigned; the grant requires a "
                                "signature "
                                "by one of (physics-2026)",)


def test_strict_site_denies_a_pipeline_signed_with_another_key() -> None:
    decision = _decide("strict-site", _physics_pipeline("physics-2025"), _job("physics-ci"))
    assert decision.reasons == ("grant 'signed-pipelines': the job is signed by 'physics-2025'; the grant "
                                "requires a signature by one of (physics-2026)",)


def test_strict_site_denies_a_signed_pipeline_on_another_branch() -> None:
    decision = _decide("strict-site", _physics_pipeline("physics-2026", branch="dev"), _job("physics-ci"))
    assert not decision.allowed


@pytest.mark.parametrize("identity", [
    _physics_pipeline("physics-2026", fork=True),
    Identity(source="github", repository="physics-org/solver", actor="rel", teams=("physics-org/release",),
             event="push", ref="refs/heads/main", fork=True),
], ids=["buildkite", "github"])
def test_strict_site_gives_a_fork_nothing(identity: Identity) -> None:
    decision = _decide("strict-site", identity, _job("physics-ci"))
    assert not decision.allowed
    assert all("fork" in reason for reason in decision.reasons)


def test_strict_site_lets_the_release_team_push_main_without_mpi() -> None:
    release = Identity(source="github", repository="physics-org/solver", actor="rel",
                       teams=("physics-org/release",), event="push", ref="refs/heads/main")
    assert _decide("strict-site", release, _job("physics-ci")).grant == "release-team"
    mpi = _decide("strict-site", release, _job("physics-ci", "[job.mpi]\nenabled = true\n"))
    assert mpi.reasons == ("grant 'release-team': the job uses MPI and the grant has mpi = false",)


def test_strict_site_grants_no_network_and_no_forks() -> None:
    assert not any(g.network or g.forks for g in _policy("strict-site").grants)


# --- shared-cluster.toml --------------------------------------------------------------------------

def _ocean_repo(repository: str = "ocean-lab/nemo-ci") -> Identity:
    return Identity(source="github", repository=repository, actor="olga", event="push", ref="refs/heads/main")


def test_shared_cluster_runs_an_ocean_repository_on_the_ocean_account() -> None:
    decision = _decide("shared-cluster", _ocean_repo(), _job("ocean-model", resources="nodes = 8"))
    assert (decision.allowed, decision.grant) == (True, "ocean-ci")
    assert decision.slurm is not None
    assert (decision.slurm.account, decision.slurm.partition, decision.slurm.time_seconds,
            decision.slurm.memory_mb) == ("ocean-2026", "ocean", 30 * 60, 256 * 1024)


def test_shared_cluster_keeps_one_groups_repository_off_the_other_groups_account() -> None:
    decision = _decide("shared-cluster", _ocean_repo(), _job("ocean-model", resources='account = "atmos"'))
    assert decision.reasons == (
        "grant 'ocean-ci': the job asks for account 'atmos'; the grant is for 'ocean'",)


def test_shared_cluster_keeps_one_groups_repository_off_the_other_groups_image() -> None:
    decision = _decide("shared-cluster", _ocean_repo(), _job("atmos-cuda"))
    assert decision.reasons == ("grant 'ocean-ci': image 'atmos-cuda' is not among the grant's images "
                                "(ocean-model, smoke)",)


def test_shared_cluster_wildcard_does_not_reach_a_lookalike_organisation() -> None:
    decision = _decide("shared-cluster", _ocean_repo("ocean-lab-x/repo"), _job("ocean-model"))
    assert decision.reasons == ("no grant names this identity (it holds: github:org:ocean-lab-x, "
                                "github:repo:ocean-lab-x/repo, github:user:olga)",)


def test_shared_cluster_runs_an_atmosphere_pipeline_with_gpus() -> None:
    pipeline = Identity(source="buildkite", organization="atmos", pipeline="dycore", branch="main")
    decision = _decide("shared-cluster", pipeline, _job("atmos-cuda", resources="gpus = 8\nnodes = 2"))
    assert (decision.allowed, decision.grant, decision.gpus) == (True, "atmos-ci", True)
    assert decision.slurm is not None and decision.slurm.partition == "atmos-gpu"


def test_shared_cluster_denies_an_atmosphere_pipeline_the_ocean_account() -> None:
    pipeline = Identity(source="buildkite", organization="atmos", pipeline="dycore", branch="main")
    decision = _decide("shared-cluster", pipeline, _job("smoke", resources='account = "ocean"'))
    assert not decision.allowed


RSE = Identity(source="local", user="rita", groups=("rse",))


@pytest.mark.parametrize(("account", "slurm_account"), [("ocean-debug", "ocean-2026"),
                                                        ("atmos-debug", "atmos-2026")])
def test_shared_cluster_runs_rse_smoke_tests_on_each_groups_debug_partition(
        account: str, slurm_account: str) -> None:
    decision = _decide("shared-cluster", RSE, _job("smoke", resources=f'account = "{account}"'))
    assert decision.allowed
    assert decision.slurm is not None
    assert (decision.slurm.account, decision.slurm.partition) == (slurm_account, "debug")


def test_shared_cluster_runs_an_rse_smoke_test_that_names_no_account_on_a_debug_partition() -> None:
    decision = _decide("shared-cluster", RSE, _job("smoke"))
    assert decision.slurm is not None and decision.slurm.partition == "debug"


@pytest.mark.parametrize("resources", [
    'account = "ocean"', 'account = "atmos"', 'partition = "ocean"', 'partition = "atmos-gpu"',
    'account = "ocean-debug"\npartition = "ocean"', "nodes = 2", 'time = "1h"',
])
def test_shared_cluster_keeps_rse_smoke_tests_off_the_production_partitions_and_caps(resources: str) -> None:
    assert not _decide("shared-cluster", RSE, _job("smoke", resources=resources)).allowed


def test_shared_cluster_rse_may_not_run_the_groups_model_images() -> None:
    job = _job("ocean-model", resources='account = "ocean-debug"')
    assert not _decide("shared-cluster", RSE, job).allowed
