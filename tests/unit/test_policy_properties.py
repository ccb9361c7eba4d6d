"""Properties of `decide` over random policies, identities, jobs and usage."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from typing import NamedTuple, TypeVar

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner.binds import parse_bind
from runner.identity import Identity
from runner.policy import Policy, Usage, decide
from runner.policy.model import Account, Grant, Image
from runner.principals import parse_principal
from runner.spec import JobSpec, Resources

T = TypeVar("T")

SETTINGS = settings(max_examples=200, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

ACCOUNT_NAMES = ("a0", "a1", "a2")
PARTITIONS = ("p0", "p1", "p2")
IMAGE_NAMES = ("i0", "i1", "i2")
PRINCIPAL_POOL = (
    "github:org:O", "github:repo:O/r", "github:repo:O/*", "github:repo:OX/r", "github:team:O/core",
    "github:team:O/*", "github:user:u", "buildkite:org:bk", "buildkite:pipeline:bk/p",
    "buildkite:pipeline:bk/*", "buildkite:team:bk/core", "local:user:u", "local:group:g",
)
EVENTS = ("push", "pull_request", "local", "schedule")
REFS = ("refs/heads/main", "refs/pull/*", "refs/tags/*")
BINDS = ("/d:/d:ro", "/d:/d:rw", "/s:/s:rw", "/t:/t:ro")
SIGNERS = ("k1", "k2")


def _subset(pool: tuple[T, ...], min_size: int = 0) -> st.SearchStrategy[tuple[T, ...]]:
    return st.lists(st.sampled_from(pool), min_size=min_size, unique=True).map(tuple)


def _mostly(usual: T, strategy: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    """`usual` three times in four: random jobs rarely fit random grants otherwise."""
    return st.one_of(st.just(usual), st.just(usual), st.just(usual), strategy)


# Strategies are built once: building them inside every draw would dominate the run time.
_PARTITION_LISTS = _subset(PARTITIONS, min_size=1)
_PRINCIPAL_LISTS = _subset(PRINCIPAL_POOL, min_size=1)
_EVENT_LISTS = _mostly(None, _subset(EVENTS))
_REF_LISTS = _mostly(None, _subset(REFS))
_IMAGE_LISTS = _subset(IMAGE_NAMES, min_size=1)
_BIND_LISTS = _subset(BINDS)
_SIGNER_LISTS = _mostly(None, _subset(SIGNERS))
_GRANT_FLAGS = _mostly(True, st.booleans())
_MEMORY_CAPS = st.none() | st.integers(1, 64).map(lambda gigabytes: gigabytes * 1024)
_CONCURRENCY_CAPS = st.none() | st.integers(1, 5)
_PARSED_PRINCIPALS = {text: parse_principal(text) for text in PRINCIPAL_POOL}
_PARSED_BINDS = {text: parse_bind(text) for text in BINDS}
_ACCOUNT_NAME_LISTS = _subset(ACCOUNT_NAMES, min_size=1)
_IMAGES = {name: Image(name, f"/images/{name}.sif", sha256="0" * 64) for name in IMAGE_NAMES}


@st.composite
def accounts(draw: st.DrawFn, name: str) -> Account:
    max_minutes = draw(st.integers(1, 600))
    default_minutes = draw(st.none() | st.integers(1, max_minutes))
    return Account(
        name=name, slurm_account=f"slurm-{name}", partitions=draw(_PARTITION_LISTS),
        max_nodes=draw(st.integers(1, 8)), max_gpus=draw(st.integers(0, 4)), max_time=max_minutes * 60,
        default_time=default_minutes * 60 if default_minutes is not None else None,
        max_memory_mb=draw(_MEMORY_CAPS), max_concurrent_jobs=draw(_CONCURRENCY_CAPS),
    )


@st.composite
def grants(draw: st.DrawFn, name: str, account_names: tuple[str, ...]) -> Grant:
    return Grant(
        name=name,
        principals=tuple(_PARSED_PRINCIPALS[p] for p in draw(_PRINCIPAL_LISTS)),
        account=draw(st.sampled_from(account_names)),
        events=draw(_EVENT_LISTS), refs=draw(_REF_LISTS), forks=draw(st.booleans()),
        images=draw(_IMAGE_LISTS), binds=tuple(_PARSED_BINDS[b] for b in draw(_BIND_LISTS)),
        mpi=draw(_GRANT_FLAGS), gpus=draw(_GRANT_FLAGS), network=draw(_GRANT_FLAGS),
        signers=draw(_SIGNER_LISTS),
    )


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    names = draw(_ACCOUNT_NAME_LISTS)
    count = draw(st.integers(0, 4))
    return Policy(
        accounts={name: draw(accounts(name)) for name in names}, images=dict(_IMAGES),
        grants=tuple(draw(grants(f"g{index}", names)) for index in range(count)),
    )


_SOURCES = st.sampled_from(("github", "buildkite", "local"))
_FORKS = _mostly(False, st.booleans())
_GITHUB_REPOS = st.sampled_from(("O/r", "O/x", "OX/r", "o/R"))
_GITHUB_ACTORS = st.sampled_from(("u", "v"))
_GITHUB_TEAMS = _subset(("O/core", "O/other", "OX/core"))
_GITHUB_EVENTS = st.sampled_from(("push", "pull_request", "schedule"))
_GITHUB_REFS = st.sampled_from((None, "refs/heads/main", "refs/heads/dev", "refs/pull/1/head", "refs/tags/v1"))
_BUILDKITE_ORGS = st.sampled_from(("bk", "bk2"))
_BUILDKITE_PIPELINES = st.sampled_from(("p", "q"))
_BUILDKITE_BRANCHES = st.sampled_from((None, "main", "dev"))
_BUILDKITE_TEAMS = _subset(("core", "other"))
_BUILDKITE_SIGNERS = st.sampled_from((None, *SIGNERS, "k3"))
_LOCAL_USERS = st.sampled_from(("u", "w"))
_LOCAL_GROUPS = _subset(("g", "h"))
_LOCAL_EVENTS = st.sampled_from((None, "local", "push"))


@st.composite
def identities(draw: st.DrawFn) -> Identity:
    source = draw(_SOURCES)
    if source == "github":
        return Identity(source="github", repository=draw(_GITHUB_REPOS), actor=draw(_GITHUB_ACTORS),
                        teams=draw(_GITHUB_TEAMS), event=draw(_GITHUB_EVENTS), ref=draw(_GITHUB_REFS),
                        fork=draw(_FORKS))
    if source == "buildkite":
        return Identity(source="buildkite", organization=draw(_BUILDKITE_ORGS),
                        pipeline=draw(_BUILDKITE_PIPELINES), branch=draw(_BUILDKITE_BRANCHES),
                        teams=draw(_BUILDKITE_TEAMS), signer=draw(_BUILDKITE_SIGNERS), fork=draw(_FORKS))
    return Identity(source="local", user=draw(_LOCAL_USERS), groups=draw(_LOCAL_GROUPS),
                    event=draw(_LOCAL_EVENTS))


class Case(NamedTuple):
    policy: Policy
    identity: Identity
    job: JobSpec
    usage: Usage


# One way, or none, in which a case built after a grant departs from it.
KNOBS = ("none", "nodes", "gpus", "time", "memory", "partition", "running", "account", "image", "binds",
         "mpi", "network", "fork", "event", "ref", "signer", "principal")
_KNOBS = st.sampled_from(KNOBS)
_REF_EXAMPLES = {"refs/heads/main": "refs/heads/main", "refs/pull/*": "refs/pull/7/head",
                 "refs/tags/*": "refs/tags/v1"}


def _identity_holding(principal: str, *, event: str | None, ref: str | None, fork: bool,
                      signer: str | None) -> Identity:
    """An identity that holds `principal` (a wildcard stands for a name in the pool)."""
    source, kind, value = principal.split(":")
    owner, _, name = value.partition("/")
    name = {"*": "r" if kind == "repo" else "p" if kind == "pipeline" else "core"}.get(name, name)
    if source == "github":
        return Identity(source="github", repository=f"{owner}/{name}" if kind == "repo" else "O/x",
                        actor=value if kind == "user" else "v",
                        teams=(f"{owner}/{name}",) if kind == "team" else (), event=event, ref=ref, fork=fork)
    if source == "buildkite":
        return Identity(source="buildkite", organization=owner, pipeline=name if kind == "pipeline" else "q",
                        teams=(name,) if kind == "team" else (), event=event, ref=ref, fork=fork, signer=signer)
    return Identity(source="local", user=value if kind == "user" else "w",
                    groups=(value,) if kind == "group" else (), event=event)


@st.composite
def cases_near_a_grant(draw: st.DrawFn, policy: Policy) -> Case:
    """A case that fits one grant of the policy and its account exactly, but for at most one knob."""
    knob = draw(_KNOBS)
    grant = draw(st.sampled_from(policy.grants))
    account = policy.accounts[grant.account]
    nodes = draw(st.none() | st.integers(1, account.max_nodes))
    tasks_per_node = draw(st.none() | st.integers(1, 4))
    memory_cap = account.max_memory_mb or 64 * 1024
    resources = Resources(
        account=draw(st.sampled_from((None, grant.account))),
        partition=draw(st.none() | st.sampled_from(account.partitions)),
        nodes=account.max_nodes + draw(st.integers(1, 2)) if knob == "nodes" else nodes,
        tasks=(nodes or 1) * tasks_per_node if tasks_per_node is not None and knob != "nodes" else None,
        tasks_per_node=tasks_per_node if knob != "nodes" else None,
        cpus_per_task=draw(st.none() | st.integers(1, 4)),
        gpus=(account.max_gpus + 1 if knob == "gpus"
              else draw(st.none() | st.integers(0, account.max_gpus if grant.gpus else 0))),
        memory_mb=(memory_cap + draw(st.integers(1, 1024)) if knob == "memory"
                   else draw(st.none() | st.integers(1, memory_cap))),
        time_seconds=(account.max_time + draw(st.integers(1, 60)) if knob == "time"
                      else draw(st.none() | st.integers(1, account.max_time))),
    )
    if knob == "partition":
        resources = replace(resources, partition="p9")
    if knob == "account":
        others = [name for name in (*ACCOUNT_NAMES, "zz") if name != grant.account]
        resources = replace(resources, account=draw(st.sampled_from(others)))
    granted_binds = {b.target: b for b in grant.binds}     # one bind per target, as a job needs
    binds = draw(_subset(tuple(granted_binds.values())))
    if knob == "binds":
        binds = (*binds, parse_bind("/elsewhere:/elsewhere:ro"))
    image = draw(st.sampled_from(grant.images))
    if knob == "image":
        image = draw(st.sampled_from([i for i in (*IMAGE_NAMES, "missing") if i not in grant.images]))
    job = JobSpec(name="job", image=image, command=("true",), binds=binds, resources=resources,
                  mpi=True if knob == "mpi" else grant.mpi and draw(st.booleans()),
                  network=True if knob == "network" else grant.network and draw(st.booleans()))

    event = draw(st.sampled_from(grant.events)) if grant.events else None
    if knob == "event":
        event = draw(st.sampled_from([e for e in EVENTS if not grant.events or e not in grant.events] or ["api"]))
    ref = _REF_EXAMPLES[draw(st.sampled_from(grant.refs))] if grant.refs else draw(st.sampled_from(
        (None, "refs/heads/dev")))
    if knob == "ref":
        ref = "refs/heads/elsewhere"
    signer = draw(st.sampled_from(grant.signers)) if grant.signers else draw(st.sampled_from((None, "k1")))
    if knob == "signer":
        signer = "k3"
    fork = True if knob == "fork" else grant.forks and draw(st.booleans())
    principal = str(draw(st.sampled_from(grant.principals)))
    if knob == "principal":
        principal = "local:user:nobody"
    identity = _identity_holding(principal, event=event, ref=ref, fork=fork, signer=signer)

    running = {name: draw(st.integers(0, a.max_concurrent_jobs - 1 if a.max_concurrent_jobs else 3))
               for name, a in policy.accounts.items() if draw(st.booleans())}
    if knob == "running" and account.max_concurrent_jobs is not None:
        running[account.name] = account.max_concurrent_jobs + draw(st.integers(0, 1))
    return Case(policy, identity, job, Usage(running_by_account=running))


@st.composite
def any_jobs(draw: st.DrawFn) -> JobSpec:
    nodes = draw(st.none() | st.integers(1, 10))
    return JobSpec(
        name="job", image=draw(st.sampled_from((*IMAGE_NAMES, "missing"))), command=("true",),
        binds=tuple(_PARSED_BINDS[b] for b in draw(_subset(("/d:/d:ro", "/s:/s:rw", "/t:/t:ro")))),
        network=draw(st.booleans()), mpi=draw(st.booleans()),
        resources=Resources(
            account=draw(st.none() | st.sampled_from((*ACCOUNT_NAMES, "zz"))),
            partition=draw(st.none() | st.sampled_from((*PARTITIONS, "p9"))), nodes=nodes,
            gpus=draw(st.none() | st.integers(0, 6)), memory_mb=draw(st.none() | st.integers(1, 80 * 1024)),
            time_seconds=draw(st.none() | st.integers(1, 700 * 60))))


_USAGES = st.dictionaries(st.sampled_from(ACCOUNT_NAMES), st.integers(0, 6)).map(
    lambda running: Usage(running_by_account=running))


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """Mostly cases built after one grant of a random policy, sometimes anything at all."""
    policy = draw(policies())
    if policy.grants and draw(_mostly(True, st.booleans())):
        return draw(cases_near_a_grant(policy))
    return Case(policy, draw(identities()), draw(any_jobs()), draw(_USAGES))


def _allowed_alone(case: Case) -> list[Grant]:
    """The grants that allow the job in a policy of their own."""
    return [g for g in case.policy.grants
            if decide(case.policy.with_grants((g,)), case.identity, case.job, case.usage).allowed]


def _exceeds_a_cap(account: Account, job: JobSpec, usage: Usage) -> bool:
    """Whether the job, with the documented defaults filled in, breaks any cap of `account`."""
    r = job.resources
    time = r.time_seconds if r.time_seconds is not None else (
        account.default_time if account.default_time is not None else min(account.max_time, 3600))
    return ((r.nodes or 1) > account.max_nodes
            or (r.gpus or 0) > account.max_gpus
            or time > account.max_time
            or (account.max_memory_mb is not None and r.memory_mb is not None
                and r.memory_mb > account.max_memory_mb)
            or (account.max_concurrent_jobs is not None
                and usage.running_by_account.get(account.name, 0) >= account.max_concurrent_jobs)
            or (r.partition or account.partitions[0]) not in account.partitions)


@SETTINGS
@given(cases())
def test_a_job_exceeding_a_cap_of_its_account_is_never_allowed(case: Case) -> None:
    decision = decide(*case)
    if decision.allowed:
        assert decision.account is not None
        assert not _exceeds_a_cap(case.policy.accounts[decision.account], case.job, case.usage)
        assert case.job.resources.account in (None, decision.account)


@SETTINGS
@given(cases())
def test_a_job_exceeding_the_caps_of_every_account_is_denied(case: Case) -> None:
    if all(_exceeds_a_cap(account, case.job, case.usage) for account in case.policy.accounts.values()):
        assert not decide(*case).allowed


@SETTINGS
@given(cases(), st.data())
def test_adding_a_grant_anywhere_never_denies_an_allowed_job(case: Case, data: st.DataObject) -> None:
    policy = case.policy
    extra = data.draw(grants("extra", tuple(policy.accounts)))
    position = data.draw(st.integers(0, len(policy.grants)))
    wider = policy.with_grants(policy.grants[:position] + (extra,) + policy.grants[position:])
    if decide(*case).allowed:
        assert decide(wider, case.identity, case.job, case.usage).allowed


@SETTINGS
@given(cases())
def test_a_job_is_allowed_exactly_when_one_grant_allows_it_on_its_own(case: Case) -> None:
    covering = _allowed_alone(case)
    assert decide(*case).allowed == bool(covering)
    remaining = case.policy.with_grants(tuple(g for g in case.policy.grants if g not in covering))
    assert not decide(remaining, case.identity, case.job, case.usage).allowed


@SETTINGS
@given(cases())
def test_removing_the_only_covering_grant_denies(case: Case) -> None:
    decision = decide(*case)
    covering = _allowed_alone(case)
    if decision.allowed and len(covering) == 1:
        assert covering[0].name == decision.grant
        without = case.policy.with_grants(tuple(g for g in case.policy.grants if g.name != decision.grant))
        assert not decide(without, case.identity, case.job, case.usage).allowed


@SETTINGS
@given(cases())
def test_decide_is_deterministic_and_leaves_its_inputs_alone(case: Case) -> None:
    policy, identity, job, usage = case
    before = (copy.deepcopy(policy), copy.deepcopy(identity), job.to_json(), dict(usage.running_by_account))
    first = json.dumps(decide(*case).to_json())
    second = json.dumps(decide(*case).to_json())
    assert first == second
    assert (policy, identity, job.to_json(), dict(usage.running_by_account)) == before


@SETTINGS
@given(cases())
def test_a_denied_decision_gives_reasons_and_no_resources(case: Case) -> None:
    decision = decide(*case)
    if not decision.allowed:
        assert (decision.grant, decision.account, decision.slurm) == (None, None, None)
        assert decision.reasons


@SETTINGS
@given(cases())
def test_an_allowed_decision_names_a_grant_of_the_identity_and_fits_its_account(case: Case) -> None:
    policy, identity, job, _ = case
    decision = decide(*case)
    if not decision.allowed:
        return
    grant = next(g for g in policy.grants if g.name == decision.grant)
    assert any(p.matches(held) for p in grant.principals for held in identity.principals())
    assert decision.account == grant.account
    account, slurm = policy.accounts[grant.account], decision.slurm
    assert slurm is not None and decision.reasons == ()
    assert slurm.account == account.slurm_account
    assert slurm.partition in account.partitions
    assert 1 <= slurm.nodes <= account.max_nodes
    assert slurm.tasks >= slurm.nodes
    assert 0 <= slurm.gpus <= account.max_gpus
    assert 0 < slurm.time_seconds <= account.max_time
    assert -(-slurm.time_seconds // 60) * 60 <= account.max_time   # also once Slurm rounds up to minutes
    if account.max_memory_mb is not None:
        assert slurm.memory_mb is not None and slurm.memory_mb <= account.max_memory_mb


@SETTINGS
@given(cases())
def test_an_allowed_decision_covers_the_jobs_context_image_binds_and_sandbox(case: Case) -> None:
    policy, identity, job, _ = case
    decision = decide(*case)
    if not decision.allowed:
        return
    grant = next(g for g in policy.grants if g.name == decision.grant)
    assert grant.events is None or identity.effective_event in grant.events
    assert grant.forks or not identity.fork
    assert grant.signers is None or identity.signer in grant.signers
    assert job.image in grant.images
    assert all(any(b.covered_by(g) for g in grant.binds) for b in job.binds)
    assert grant.mpi or not job.mpi
    assert grant.network or not job.network
    assert grant.gpus or not job.resources.gpus


@SETTINGS
@given(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,8}", fullmatch=True),
       st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,8}", fullmatch=True),
       st.from_regex(r"[A-Za-z0-9._/-]{1,12}", fullmatch=True))
def test_a_trailing_wildcard_never_crosses_an_organisation(granted_org: str, held_org: str, rest: str) -> None:
    pattern = parse_principal(f"github:repo:{granted_org}/*")
    matched = pattern.matches(f"github:repo:{held_org}/{rest}")
    assert matched == (granted_org.lower() == held_org.lower() and "/" not in rest)
