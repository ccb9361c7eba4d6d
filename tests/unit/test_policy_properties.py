"""Properties of `decide` over random policies, identities, jobs and usage."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from typing import NamedTuple, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner.binds import parse_bind
from runner.identity import Identity
from runner.policy import Policy, Usage, decide
from runner.policy.model import Account, Grant, Image
from runner.principals import parse_principal, ref_matches
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
_EVENT_LISTS = _mostly(None, _subset(EVENTS, min_size=1))
_REF_LISTS = _mostly(None, _subset(REFS, min_size=1))
_IMAGE_LISTS = _subset(IMAGE_NAMES, min_size=1)
_BIND_LISTS = _subset(BINDS)
_SIGNER_LISTS = _mostly(None, _subset(SIGNERS, min_size=1))
_GRANT_FLAGS = _mostly(True, st.booleans())
_MEMORY_CAPS = st.none() | st.integers(1, 64).map(lambda gigabytes: gigabytes * 1024)
_CONCURRENCY_CAPS = st.none() | st.integers(1, 5)
_PARSED_PRINCIPALS = {text: parse_principal(text) for text in PRINCIPAL_POOL}
_PARSED_BINDS = {text: parse_bind(text) for text in BINDS}
_ACCOUNT_NAME_LISTS = _subset(ACCOUNT_NAMES, min_size=1)
_IMAGES = {name: Image(name, f"/images/{name}.sif", sha256="0" * 64) for name in IMAGE_NAMES}


# Plain functions of `draw` rather than composite strategies: a strategy object per call
# would be built and validated again for every example.
def _draw_account(draw: st.DrawFn, name: str) -> Account:
    max_minutes = draw(st.integers(1, 600))
    default_minutes = draw(_mostly(None, st.integers(1, 600)))
    if default_minutes is not None:
        default_minutes = min(default_minutes, max_minutes)
    return Account(
        name=name, slurm_account=f"slurm-{name}", partitions=draw(_PARTITION_LISTS),
        max_nodes=draw(st.integers(1, 8)), max_gpus=draw(st.integers(0, 4)), max_time=max_minutes * 60,
        default_time=default_minutes * 60 if default_minutes is not None else None,
        max_memory_mb=draw(_MEMORY_CAPS), max_concurrent_jobs=draw(_CONCURRENCY_CAPS),
        max_queued_jobs=draw(st.integers(0, 2)),
    )


def _draw_grant(draw: st.DrawFn, name: str, account_names: tuple[str, ...]) -> Grant:
    return Grant(
        name=name,
        principals=tuple(_PARSED_PRINCIPALS[p] for p in draw(_PRINCIPAL_LISTS)),
        account=account_names[draw(st.integers(0, len(account_names) - 1))],
        events=draw(_EVENT_LISTS), refs=draw(_REF_LISTS), forks=draw(st.booleans()),
        images=draw(_IMAGE_LISTS), binds=tuple(_PARSED_BINDS[b] for b in draw(_BIND_LISTS)),
        mpi=draw(_GRANT_FLAGS), gpus=draw(_GRANT_FLAGS), network=draw(_GRANT_FLAGS),
        signers=draw(_SIGNER_LISTS),
    )


@st.composite
def extra_grants(draw: st.DrawFn, account_names: tuple[str, ...]) -> Grant:
    return _draw_grant(draw, "extra", account_names)


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    names = draw(_ACCOUNT_NAME_LISTS)
    count = draw(st.integers(0, 4))
    return Policy(
        accounts={name: _draw_account(draw, name) for name in names}, images=dict(_IMAGES),
        grants=tuple(_draw_grant(draw, f"g{index}", names) for index in range(count)),
    )


_SOURCES = st.sampled_from(("github", "buildkite", "local"))
_FORKS = _mostly(False, st.booleans())
_GITHUB_REPOS = st.sampled_from(("O/r", "O/x", "OX/r", "o/R"))
_GITHUB_ACTORS = st.sampled_from(("u", "v"))
_GITHUB_TEAMS = _subset(("O/core", "O/other", "OX/core"))
_GITHUB_EVENTS = st.sampled_from(("push", "pull_request", "schedule"))
_GITHUB_REFS = st.sampled_from(
    (None, "refs/heads/main", "refs/heads/dev", "refs/pull/1/head", "refs/tags/v1"))
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
KNOBS = ("none", "nodes", "gpus", "gpu_grant", "time", "memory", "partition", "running", "account", "image",
         "binds", "mpi", "network", "fork", "event", "ref", "signer", "principal")
_KNOBS = st.sampled_from(KNOBS)
RULES = KNOBS[1:]
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
                        teams=(name,) if kind == "team" else (), event=event, ref=ref, fork=fork,
                        signer=signer)
    return Identity(source="local", user=value if kind == "user" else "w",
                    groups=(value,) if kind == "group" else (), event=event)


def _make_knob_bite(knob: str, grant: Grant, account: Account, draw: st.DrawFn) -> tuple[Grant, Account]:
    """Narrow the grant or its account so that departing on `knob` breaks one of its rules."""
    if knob == "memory" and account.max_memory_mb is None:
        account = replace(account, max_memory_mb=draw(st.integers(1, 64)) * 1024)
    if knob == "running" and account.max_concurrent_jobs is None:
        account = replace(account, max_concurrent_jobs=draw(st.integers(1, 5)))
    if knob == "fork":
        grant = replace(grant, forks=False)
    if knob == "mpi":
        grant = replace(grant, mpi=False)
    if knob == "network":
        grant = replace(grant, network=False)
    if knob == "gpu_grant":
        grant = replace(grant, gpus=False)
        account = replace(account, max_gpus=max(account.max_gpus, 1))
    if knob == "fork" and all(p.source == "local" for p in grant.principals):   # local jobs are no forks
        grant = replace(grant, principals=(*grant.principals, _PARSED_PRINCIPALS["github:org:O"]))
    if knob == "event" and grant.events is None:
        grant = replace(grant, events=("push",))
    if knob == "ref" and grant.refs is None:
        grant = replace(grant, refs=("refs/heads/main",))
    if knob == "signer" and grant.signers is None:
        grant = replace(grant, signers=("k1",))
    return grant, account


class NearCase(NamedTuple):
    case: Case
    grant: Grant    # the grant the case was built after
    knob: str       # how the case departs from it


def _near_case(draw: st.DrawFn, policy: Policy, knob: str) -> NearCase:
    """A case that fits one grant of the policy and its account exactly, but for `knob`."""
    index = draw(st.integers(0, len(policy.grants) - 1))
    original = policy.grants[index]
    grant, account = _make_knob_bite(knob, original, policy.accounts[original.account], draw)
    policy = Policy({**policy.accounts, account.name: account}, policy.images,
                    (*policy.grants[:index], grant, *policy.grants[index + 1:]), policy.source)

    nodes = draw(st.none() | st.integers(1, account.max_nodes))
    tasks_per_node = draw(st.none() | st.integers(1, 4))
    memory_cap = account.max_memory_mb or 64 * 1024
    resources = Resources(
        account=draw(st.sampled_from((None, grant.account))),
        partition=draw(st.none() | st.sampled_from(account.partitions)),
        nodes=nodes, tasks=(nodes or 1) * tasks_per_node if tasks_per_node is not None else None,
        tasks_per_node=tasks_per_node, cpus_per_task=draw(st.none() | st.integers(1, 4)),
        gpus=draw(st.none() | st.integers(0, account.max_gpus if grant.gpus else 0)),
        memory_mb=draw(st.none() | st.integers(1, memory_cap)),
        time_seconds=draw(st.none() | st.integers(1, account.max_time)),
    )
    if knob == "nodes":
        resources = replace(resources, nodes=account.max_nodes + draw(st.integers(1, 2)), tasks=None,
                            tasks_per_node=None)
    elif knob == "gpus":
        resources = replace(resources, gpus=account.max_gpus + 1)
    elif knob == "gpu_grant":
        resources = replace(resources, gpus=draw(st.integers(1, account.max_gpus)))
    elif knob == "memory":
        resources = replace(resources, memory_mb=memory_cap + draw(st.integers(1, 2)))
    elif knob == "time":
        resources = replace(resources, time_seconds=account.max_time + draw(st.integers(1, 2)))
    elif knob == "partition":
        resources = replace(resources, partition="p9")
    elif knob == "account":
        others = [name for name in (*ACCOUNT_NAMES, "zz") if name != grant.account]
        resources = replace(resources, account=draw(st.sampled_from(others)))
    granted_binds = {b.target: b for b in grant.binds}     # one bind per target, as a job needs
    binds = draw(_subset(tuple(granted_binds.values()))) if granted_binds else ()
    if knob == "binds":
        binds = (*binds, parse_bind("/elsewhere:/elsewhere:ro"))
    image = draw(st.sampled_from(grant.images))
    if knob == "image":
        image = draw(st.sampled_from([i for i in (*IMAGE_NAMES, "missing") if i not in grant.images]))
    job = JobSpec(name="job", image=image, command=("true",), binds=binds, resources=resources,
                  mpi=knob == "mpi" or (grant.mpi and draw(st.booleans())),
                  network=knob == "network" or (grant.network and draw(st.booleans())))

    event = draw(st.sampled_from(grant.events)) if grant.events else None
    if knob == "event" and grant.events is not None:
        event = draw(st.sampled_from([e for e in (*EVENTS, "api") if e not in grant.events]))
    ref = _REF_EXAMPLES[draw(st.sampled_from(grant.refs))] if grant.refs else draw(st.sampled_from(
        (None, "refs/heads/dev")))
    if knob == "ref":
        ref = "refs/heads/elsewhere"
    signer = draw(st.sampled_from(grant.signers)) if grant.signers else draw(st.sampled_from((None, "k1")))
    if knob == "signer":
        signer = "k3"
    principals = [p for p in grant.principals if knob != "fork" or p.source != "local"]
    principal = "local:user:nobody" if knob == "principal" else str(draw(st.sampled_from(principals)))
    fork = knob == "fork" or (grant.forks and draw(st.booleans()))
    identity = _identity_holding(principal, event=event, ref=ref, fork=fork, signer=signer)

    running = {name: draw(st.integers(0, a.max_concurrent_jobs - 1 if a.max_concurrent_jobs else 3))
               for name, a in policy.accounts.items() if draw(st.booleans())}
    if knob == "running" and account.max_concurrent_jobs is not None:
        # past the cap and a full waiting list: below that the job waits, allowed
        running[account.name] = (account.max_concurrent_jobs + account.max_queued_jobs
                                  + draw(st.integers(0, 1)))
    return NearCase(Case(policy, identity, job, Usage(running_by_account=running)), grant, knob)


@st.composite
def near_cases(draw: st.DrawFn, knobs: tuple[str, ...]) -> NearCase:
    policy = draw(policies())
    if not policy.grants:
        policy = policy.with_grants((_draw_grant(draw, "g0", tuple(policy.accounts)),))
    return _near_case(draw, policy, draw(st.sampled_from(knobs)))


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


_MOSTLY_TRUE = _mostly(True, st.booleans())
_USAGES = st.dictionaries(st.sampled_from(ACCOUNT_NAMES), st.integers(0, 6)).map(
    lambda running: Usage(running_by_account=running))


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """Mostly cases built after one grant of a random policy, sometimes anything at all."""
    policy = draw(policies())
    near_a_grant: bool = draw(_MOSTLY_TRUE)
    if policy.grants and near_a_grant:
        return _near_case(draw, policy, draw(_KNOBS)).case
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
                and usage.running_by_account.get(account.name, 0)
                >= account.max_concurrent_jobs + account.max_queued_jobs)
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
@given(cases(), st.data())
def test_adding_a_grant_anywhere_never_denies_an_allowed_job(case: Case, data: st.DataObject) -> None:
    policy = case.policy
    extra = data.draw(extra_grants(tuple(policy.accounts)))
    position = data.draw(st.integers(0, len(policy.grants)))
    wider = policy.with_grants((*policy.grants[:position], extra, *policy.grants[position:]))
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
def test_an_allowed_decision_is_justified_by_the_grant_it_names(case: Case) -> None:
    policy, identity, job, _ = case
    decision = decide(*case)
    if not decision.allowed:
        return
    grant = next(g for g in policy.grants if g.name == decision.grant)
    # the identity, its context and the sandbox
    assert any(p.matches(held) for p in grant.principals for held in identity.principals())
    assert grant.events is None or identity.effective_event in grant.events
    ref = identity.effective_ref
    assert grant.refs is None or (ref is not None and any(ref_matches(p, ref) for p in grant.refs))
    assert grant.forks or not identity.fork
    assert grant.signers is None or identity.signer in grant.signers
    assert job.image in grant.images
    assert all(any(b.covered_by(g) for g in grant.binds) for b in job.binds)
    assert grant.mpi or not job.mpi
    assert grant.network or not job.network
    assert grant.gpus or not job.resources.gpus
    # the account's caps, on what would go to Slurm
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


@pytest.mark.parametrize("rule", RULES)
@settings(SETTINGS, max_examples=20)
@given(data=st.data())
def test_departing_from_a_grant_on_any_one_rule_is_denied_by_that_grant(
        rule: str, data: st.DataObject) -> None:
    near = data.draw(near_cases((rule,)))
    policy, identity, job, usage = near.case
    decision = decide(policy.with_grants((near.grant,)), identity, job, usage)
    assert not decision.allowed
    assert decision.reasons


@SETTINGS
@given(near_cases(("none",)))
def test_a_case_that_fits_a_grant_is_allowed_by_that_grant(near: NearCase) -> None:
    policy, identity, job, usage = near.case
    decision = decide(policy.with_grants((near.grant,)), identity, job, usage)
    signable = near.grant.signers is None or identity.source == "buildkite"  # only Buildkite steps are signed
    has_ref = near.grant.refs is None or identity.source != "local"  # local jobs come with no git ref
    if signable and has_ref:
        assert (decision.allowed, decision.grant, decision.reasons) == (True, near.grant.name, ())


@SETTINGS
@given(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,8}", fullmatch=True),
       st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,8}", fullmatch=True),
       st.from_regex(r"[A-Za-z0-9._/-]{1,12}", fullmatch=True))
def test_a_trailing_wildcard_never_crosses_an_organisation(
        granted_org: str, held_org: str, rest: str) -> None:
    pattern = parse_principal(f"github:repo:{granted_org}/*")
    matched = pattern.matches(f"github:repo:{held_org}/{rest}")
    assert matched == (granted_org.lower() == held_org.lower() and "/" not in rest)
