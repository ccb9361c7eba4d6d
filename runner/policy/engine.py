"""`decide(policy, identity, job)`: the pure, deterministic capability decision.

Grants are tried in file order; the first that covers everything allows the job. A
denial carries every reason from every grant that names the identity, so a user sees
all they would have to change, not just the first obstacle.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from runner.identity import Identity
from runner.policy.model import DEFAULT_MAX_OUTPUT_BYTES, DEFAULT_MAX_QUEUE_TIME, Account, Grant, Policy
from runner.principals import ref_matches
from runner.spec import JobSpec
from runner.units import human_duration, slurm_memory, slurm_time

MPI_NETWORK_NOTE = ("MPI jobs share the host's network namespace (ranks reach the launcher over "
                    "loopback), so network = false cannot isolate them: the site firewall is the boundary")
SETUP_OFFLINE_NOTE = ("the setup phase runs without network: the grant has setup_network = false "
                      "(fill caches from what the workspace holds, or ask for setup_network)")
MPI_PID_NOTE = ("MPI jobs share the host's PID namespace (a private one would kill the other ranks when "
                "the first exits), so under the local executor they can see the agent's processes")


@dataclass(frozen=True)
class Usage:
    """What is already running, for the concurrency caps (a snapshot: decide stays pure).

    `running_by_account`: the jobs that take or claim a place under max_concurrent_jobs (those in
    Slurm or running, and those in the agent's queue ahead of the job decided). Those past the
    cap wait for a place: max_queued_jobs bounds how many."""

    running_by_account: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class SlurmResources:
    """The effective request that would go to Slurm."""

    account: str
    partition: str
    nodes: int
    tasks: int
    tasks_per_node: int | None
    cpus_per_task: int
    gpus: int
    memory_mb: int | None
    time_seconds: int
    # How long it may wait in Slurm's queue (never sent to Slurm: the agent takes it out).
    queue_seconds: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "account": self.account, "partition": self.partition, "nodes": self.nodes,
            "tasks": self.tasks, "tasks_per_node": self.tasks_per_node,
            "cpus_per_task": self.cpus_per_task, "gpus": self.gpus,
            "memory": slurm_memory(self.memory_mb) if self.memory_mb is not None else None,
            "time": slurm_time(self.time_seconds), "time_seconds": self.time_seconds,
            "queue_time": human_duration(self.queue_seconds), "queue_time_seconds": self.queue_seconds,
        }


@dataclass(frozen=True)
class AccountCaps:
    """The per-job caps of the account an allowed job spends, as `explain` shows them."""

    max_nodes: int
    max_tasks: int
    max_cpus_per_task: int
    max_gpus: int
    max_memory_mb: int | None
    max_time: int
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES
    max_queue_time: int = DEFAULT_MAX_QUEUE_TIME

    @classmethod
    def of(cls, account: Account) -> AccountCaps:
        return cls(account.max_nodes, account.task_cap, account.max_cpus_per_task, account.max_gpus,
                   account.max_memory_mb, account.max_time, account.max_output_bytes,
                   account.max_queue_time)

    def to_json(self) -> dict[str, Any]:
        return {
            "max_nodes": self.max_nodes, "max_tasks": self.max_tasks,
            "max_cpus_per_task": self.max_cpus_per_task, "max_gpus": self.max_gpus,
            "max_memory": slurm_memory(self.max_memory_mb) if self.max_memory_mb is not None else None,
            "max_time": human_duration(self.max_time),
            "max_output_bytes": self.max_output_bytes,
            "max_queue_time": human_duration(self.max_queue_time),
        }


@dataclass(frozen=True)
class Decision:
    allowed: bool
    grant: str | None = None
    account: str | None = None
    slurm: SlurmResources | None = None
    caps: AccountCaps | None = None       # the account's caps, for an allowed decision
    reasons: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    principals: tuple[str, ...] = ()
    image: str | None = None
    # The job's caches as (name, host directory), in the job's order.
    caches: tuple[tuple[str, str], ...] = ()
    setup_network: bool = False           # the job's setup phase has the network (setup_network)
    max_setup_time: int | None = None     # the account's cap on a setup phase, for `explain`
    mpi: bool = False
    network: bool = False
    gpus: bool = False
    retry_node_failure: bool = False      # the account allows one resubmission after a node failure
    signed_fields: tuple[str, ...] = ()   # what the allowing grant required the signature to cover
    # Why an allowed job must wait in the agent's queue before it may start ("account esm runs 5
    # of 5 jobs"); None: it may start now.
    waits: str | None = None

    @property
    def network_isolated(self) -> bool:
        """Whether the sandbox gets its own, loopback-only network namespace."""
        return self.allowed and not self.network and not self.mpi

    @property
    def setup_network_isolated(self) -> bool:
        """Whether the setup phase (one process, never MPI) gets a loopback-only namespace."""
        return self.allowed and not self.setup_network

    def to_json(self) -> dict[str, Any]:
        return {
            "allowed": self.allowed, "grant": self.grant, "account": self.account,
            "slurm": self.slurm.to_json() if self.slurm else None,
            "caps": self.caps.to_json() if self.caps else None,
            "reasons": list(self.reasons), "notes": list(self.notes),
            "principals": list(self.principals), "image": self.image,
            "caches": dict(self.caches),
            "setup": {"network": self.setup_network, "network_isolated": self.setup_network_isolated,
                      "max_time": human_duration(self.max_setup_time)
                      if self.max_setup_time is not None else None},
            "sandbox": {"mpi": self.mpi, "network": self.network, "gpus": self.gpus,
                        "network_isolated": self.network_isolated},
            "retry_node_failure": self.retry_node_failure,
            "signed_fields": list(self.signed_fields),
            "waits": self.waits,
        }


def _effective_resources(job: JobSpec, account: Account) -> SlurmResources:
    r = job.resources
    nodes = r.nodes or 1
    tasks = r.tasks if r.tasks is not None else nodes
    return SlurmResources(
        account=account.slurm_account,
        partition=r.partition or account.partitions[0],
        nodes=nodes, tasks=tasks, tasks_per_node=r.tasks_per_node,
        cpus_per_task=r.cpus_per_task or 1, gpus=r.gpus or 0,
        # with no request Slurm would give its own default, often the whole node: ask for the cap
        memory_mb=r.memory_mb if r.memory_mb is not None else account.max_memory_mb,
        time_seconds=r.time_seconds if r.time_seconds is not None else account.time_default,
        queue_seconds=r.queue_seconds if r.queue_seconds is not None else account.max_queue_time,
    )


def _account_reasons(job: JobSpec, account: Account, res: SlurmResources, usage: Usage) -> list[str]:
    """Every way the request exceeds the account's caps."""
    name = account.name
    reasons = []
    if res.partition not in account.partitions:
        reasons.append(f"partition {res.partition!r} is not one of account {name}'s partitions "
                       f"({', '.join(account.partitions)})")
    if res.nodes > account.max_nodes:
        reasons.append(f"{res.nodes} nodes exceed account {name}'s max_nodes = {account.max_nodes}")
    if res.tasks > account.task_cap:
        reasons.append(f"{res.tasks} tasks exceed account {name}'s max_tasks = {account.task_cap}")
    if res.cpus_per_task > account.max_cpus_per_task:
        reasons.append(f"{res.cpus_per_task} CPUs per task exceed account {name}'s max_cpus_per_task = "
                       f"{account.max_cpus_per_task}")
    if res.gpus > account.max_gpus:
        reasons.append(f"{res.gpus} GPUs exceed account {name}'s max_gpus = {account.max_gpus}")
    if res.time_seconds > account.max_time:
        reasons.append(f"walltime {human_duration(res.time_seconds)} exceeds account {name}'s "
                       f"max_time = {human_duration(account.max_time)}")
    if account.max_memory_mb is not None and res.memory_mb is not None \
            and res.memory_mb > account.max_memory_mb:
        reasons.append(f"memory {slurm_memory(res.memory_mb)} exceeds account {name}'s "
                       f"max_memory = {slurm_memory(account.max_memory_mb)}")
    if job.setup is not None and job.setup.time_seconds > account.max_setup_time:
        reasons.append(f"setup time {human_duration(job.setup.time_seconds)} exceeds account {name}'s "
                       f"max_setup_time = {human_duration(account.max_setup_time)}")
    if res.queue_seconds > account.max_queue_time:
        reasons.append(f"queue_time {human_duration(res.queue_seconds)} exceeds account {name}'s "
                       f"max_queue_time = {human_duration(account.max_queue_time)}")
    why = waits_for_a_place(account, usage)
    if why is not None and _waiting(account, usage) >= account.max_queued_jobs:
        reasons.append(f"{why}, and its waiting list is full (max_queued_jobs = {account.max_queued_jobs})")
    return reasons


def _waiting(account: Account, usage: Usage) -> int:
    """How many of the account's jobs already wait for a place."""
    cap = account.max_concurrent_jobs
    return 0 if cap is None else max(0, usage.running_by_account.get(account.name, 0) - cap)


def waits_for_a_place(account: Account, usage: Usage) -> str | None:
    """Why a job of `account` must wait for one of its jobs to end (max_concurrent_jobs), or None
    when it may start now: "account esm runs 5 of 5 jobs", and how many wait before it."""
    cap = account.max_concurrent_jobs
    running = usage.running_by_account.get(account.name, 0)
    if cap is None or running < cap:
        return None
    waiting = _waiting(account, usage)
    before = f"; {waiting} wait{'s' if waiting == 1 else ''} before it" if waiting else ""
    return f"account {account.name} runs {cap} of {cap} jobs{before}"


def _grant_reasons(policy: Policy, grant: Grant, identity: Identity, job: JobSpec) -> list[str]:
    """Every way this grant fails to cover the identity's context and the job's sandbox."""
    reasons = []
    event = identity.effective_event
    if grant.events is not None and event not in grant.events:
        reasons.append(f"event {event!r} is not one of the grant's events ({', '.join(grant.events)})")
    if grant.refs is not None:
        ref = identity.effective_ref
        if ref is None:
            reasons.append(f"the grant is limited to refs ({', '.join(grant.refs)}) and the job has no ref")
        elif not any(ref_matches(pattern, ref) for pattern in grant.refs):
            reasons.append(f"ref {ref!r} is not one of the grant's refs ({', '.join(grant.refs)})")
    if identity.fork and not grant.forks:
        reasons.append("the job comes from a fork and the grant has forks = false")
    if grant.signers is not None and identity.signer not in grant.signers:
        signer = f"signed by {identity.signer!r}" if identity.signer else "unsigned"
        reasons.append(f"the job is {signer}; the grant requires a signature by one of "
                       f"({', '.join(grant.signers)})")
    if grant.signed_fields is not None:
        unsigned = [f for f in grant.signed_fields if f not in identity.signed]
        if unsigned:
            one = len(unsigned) == 1
            who = f" (Buildkite asserts {'it' if one else 'them'})" if identity.source == "buildkite" else ""
            reasons.append(f"the job's {', '.join(unsigned)} {'is' if one else 'are'} not signed{who}; "
                           f"the grant requires signed_fields ({', '.join(grant.signed_fields)})")
    if job.resources.account is not None and job.resources.account != grant.account:
        reasons.append(f"the job asks for account {job.resources.account!r}; the grant is for "
                       f"{grant.account!r}")
    if job.image not in policy.images:
        reasons.append(f"image {job.image!r} is not in the policy's catalogue")
    elif job.image not in grant.images:
        allowed = ", ".join(grant.images) or "none"
        reasons.append(f"image {job.image!r} is not among the grant's images ({allowed})")
    for bind in job.binds:
        if not any(bind.covered_by(g) for g in grant.binds):
            reasons.append(f"bind {bind} is not granted")
    if job.mpi and not grant.mpi:
        reasons.append("the job uses MPI and the grant has mpi = false")
    if (job.resources.gpus or 0) > 0 and not grant.gpus:
        reasons.append(f"the job asks for {job.resources.gpus} GPUs and the grant has gpus = false")
    if job.network and not grant.network:
        reasons.append("the job asks for network access and the grant has network = false")
    caches = policy.accounts[grant.account].caches
    for cache in job.caches:
        if cache not in caches:
            known = ", ".join(sorted(caches)) or "none"
            reasons.append(f"cache {cache!r} is not one of account {grant.account}'s caches ({known})")
        elif cache not in grant.caches:
            reasons.append(f"cache {cache!r} is not granted (the grant's caches: "
                           f"{', '.join(grant.caches) or 'none'})")
    return reasons


def decide(policy: Policy, identity: Identity, job: JobSpec, usage: Usage | None = None) -> Decision:
    """Decide whether `identity` may run `job`; pure and deterministic."""
    usage = usage or Usage()
    principals = identity.principals()
    reasons: list[str] = []
    candidates = [g for g in policy.grants if any(p.matches(h) for p in g.principals for h in principals)]
    if not candidates:
        held = ", ".join(principals) or "none"
        return Decision(False, reasons=(f"no grant names this identity (it holds: {held})",),
                        principals=principals, image=job.image)
    for grant in candidates:
        account = policy.accounts[grant.account]
        resources = _effective_resources(job, account)
        failed = _grant_reasons(policy, grant, identity, job)
        if job.resources.account in (None, grant.account):
            failed += _account_reasons(job, account, resources, usage)
        if not failed:
            setup_network = job.setup is not None and grant.setup_network
            notes = ((MPI_NETWORK_NOTE,) if job.mpi and not job.network else ()) \
                + ((MPI_PID_NOTE,) if job.mpi else ()) \
                + ((SETUP_OFFLINE_NOTE,) if job.setup is not None and not setup_network else ())
            return Decision(True, grant=grant.name, account=account.name, slurm=resources,
                            caps=AccountCaps.of(account),
                            notes=notes, principals=principals, image=job.image, mpi=job.mpi,
                            network=job.network, gpus=resources.gpus > 0,
                            caches=tuple((c, account.caches[c]) for c in job.caches),
                            setup_network=setup_network, max_setup_time=account.max_setup_time,
                            retry_node_failure=account.retry_node_failures,
                            signed_fields=grant.signed_fields or (),
                            waits=waits_for_a_place(account, usage))
        reasons += [f"grant {grant.name!r}: {reason}" for reason in failed]
    return Decision(False, reasons=tuple(reasons), principals=principals, image=job.image)
