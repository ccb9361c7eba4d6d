"""Policy files: shared project accounts, the image catalogue and grants (deny by default)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from runner.binds import Bind, check_absolute_path, parse_bind
from runner.fields import Table
from runner.identity import SIGNABLE_FIELDS
from runner.principals import PrincipalPattern, check_ref_pattern, parse_principal
from runner.spec import (
    CACHE_NAME_PATTERN,
    MAX_CPUS_PER_TASK,
    MAX_GPUS,
    MAX_NODES,
    MAX_TASKS,
    NAME_PATTERN,
    cache_env_name,
)
from runner.tomlsource import TomlDocument, load_toml, parse_toml
from runner.units import human_duration, parse_duration, parse_memory

POLICY_VERSION = 1
DEFAULT_TIME_CAP = 3600
# Caps of an account that names none: every job has them, whichever executor runs it (the local
# executor starts `mpirun -np TASKS` on the agent's own node, where no Slurm limit applies).
DEFAULT_TASKS_PER_NODE = 64
DEFAULT_MAX_CPUS_PER_TASK = 16
# What a job's collected outputs may add up to when its account names no max_output_bytes: they
# are copied into the job's directory, on the agent's file system.
DEFAULT_MAX_OUTPUT_BYTES = 1024 ** 3
# How long a job may wait in Slurm's queue when its account names no max_queue_time (and what a
# job that names no queue_time gets): a day, longer than any CI run waits for its result.
DEFAULT_MAX_QUEUE_TIME = 24 * 3600
# Jobs that may wait in the agent's queue for a place under max_concurrent_jobs, per account,
# when the account names no max_queued_jobs.
DEFAULT_MAX_QUEUED_JOBS = 100
# The longest setup phase of an account that names no max_setup_time: it runs on the agent's own
# node, outside any Slurm allocation.
DEFAULT_MAX_SETUP_TIME = 1800
EVENTS = ("push", "pull_request", "local", "schedule", "api", "ui", "trigger", "merge_group")


@dataclass(frozen=True)
class Account:
    """A shared project account: a group's Slurm allocation and its caps."""

    name: str
    slurm_account: str
    partitions: tuple[str, ...]
    max_nodes: int = 1
    max_gpus: int = 0
    max_time: int = DEFAULT_TIME_CAP
    default_time: int | None = None
    max_memory_mb: int | None = None
    max_concurrent_jobs: int | None = None
    admins: tuple[PrincipalPattern, ...] = ()
    # Submit a job again, once, when a node fails under it (NODE_FAIL, BOOT_FAIL). Off unless
    # the account says so: the second attempt is charged to the account's allocation too.
    retry_node_failures: bool = False
    max_tasks: int | None = None          # None: DEFAULT_TASKS_PER_NODE on each of max_nodes
    max_cpus_per_task: int = DEFAULT_MAX_CPUS_PER_TASK
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES
    max_setup_time: int = DEFAULT_MAX_SETUP_TIME
    # Named caches: a name to a host directory of the service account's (`julia-depot =
    # "/scratch/ci/esm/depot"`), bound at /cache/NAME for the jobs whose grant names it.
    caches: Mapping[str, str] = field(default_factory=dict)
    max_queue_time: int = DEFAULT_MAX_QUEUE_TIME
    max_queued_jobs: int = DEFAULT_MAX_QUEUED_JOBS

    @property
    def task_cap(self) -> int:
        """Tasks (MPI ranks) per job, all its nodes together."""
        return self.max_tasks if self.max_tasks is not None else DEFAULT_TASKS_PER_NODE * self.max_nodes

    @property
    def time_default(self) -> int:
        """Omitted walltime: the account's default, else its max_time capped at an hour."""
        return self.default_time if self.default_time is not None else min(self.max_time, DEFAULT_TIME_CAP)


@dataclass(frozen=True)
class Image:
    """A catalogue entry: a path and how it is pinned (exactly one of sha256 or signed_by)."""

    name: str
    path: str
    sha256: str | None = None
    signed_by: str | None = None


@dataclass(frozen=True)
class Grant:
    name: str
    principals: tuple[PrincipalPattern, ...]
    account: str
    events: tuple[str, ...] | None = None
    refs: tuple[str, ...] | None = None
    forks: bool = False
    images: tuple[str, ...] = ()
    binds: tuple[Bind, ...] = ()
    mpi: bool = False
    gpus: bool = False
    network: bool = False
    signers: tuple[str, ...] | None = None
    # Identity fields that must come from the step's signature, not from what Buildkite asserts.
    signed_fields: tuple[str, ...] | None = None
    # The account's caches this grant's jobs may use.
    caches: tuple[str, ...] = ()
    # Whether a job's setup phase has the network (to fetch packages); the main phase never
    # gets it from this, only from `network`.
    setup_network: bool = False


@dataclass(frozen=True)
class Policy:
    accounts: dict[str, Account]
    images: dict[str, Image]
    grants: tuple[Grant, ...]
    source: str = "<policy>"

    def with_grants(self, grants: tuple[Grant, ...]) -> Policy:
        return Policy(self.accounts, self.images, grants, self.source)

    def admins_of(self, account: str) -> tuple[PrincipalPattern, ...]:
        found = self.accounts.get(account)
        return found.admins if found else ()


def _principals(table: Table, key: str, *, required: bool) -> tuple[PrincipalPattern, ...]:
    texts: tuple[str, ...] = table.string_list(key) if required else table.string_list(key, ())
    if required and not texts:
        raise table.error(key, "must name at least one principal")
    patterns = []
    for index, text in enumerate(texts):
        try:
            patterns.append(parse_principal(text))
        except ValueError as exc:
            raise table.error(f"{key}[{index}]", str(exc)) from None
    return tuple(patterns)


def _parse_account(name: str, table: Table) -> Account:
    if not re.fullmatch(NAME_PATTERN, name):
        raise table.error(None, f"{name!r} is not a valid account name")
    slurm_account = table.string("slurm_account", pattern=NAME_PATTERN, what="a Slurm account name")
    partitions = table.string_list("partitions", pattern=NAME_PATTERN, what="a partition name")
    if not partitions:
        raise table.error("partitions", "must list at least one partition (the first is the default)")
    max_nodes = table.integer("max_nodes", 1, maximum=MAX_NODES)
    max_gpus = table.integer("max_gpus", 0, minimum=0, maximum=MAX_GPUS)
    max_tasks = table.integer("max_tasks", None, maximum=MAX_TASKS)
    max_cpus_per_task = table.integer("max_cpus_per_task", DEFAULT_MAX_CPUS_PER_TASK,
                                      maximum=MAX_CPUS_PER_TASK)
    max_time = table.converted("max_time", parse_duration, DEFAULT_TIME_CAP)
    default_time = table.converted("default_time", parse_duration, None)
    max_memory = table.converted("max_memory", parse_memory, None)
    max_concurrent = table.integer("max_concurrent_jobs", None, maximum=100_000)
    admins = _principals(table, "admins", required=False)
    retry_node_failures = table.boolean("retry_node_failures", False)
    max_output_bytes = table.converted("max_output_bytes", _byte_size, DEFAULT_MAX_OUTPUT_BYTES)
    max_setup_time = table.converted("max_setup_time", parse_duration, DEFAULT_MAX_SETUP_TIME)
    caches = _parse_caches(table)
    max_queue_time = table.converted("max_queue_time", parse_duration, DEFAULT_MAX_QUEUE_TIME)
    max_queued_jobs = table.integer("max_queued_jobs", DEFAULT_MAX_QUEUED_JOBS, minimum=0, maximum=100_000)
    table.finish()
    # Slurm counts walltime in whole minutes and rounds a request up: a cap of "90s" would
    # let a "90s" job run for two minutes.
    for key, seconds in (("max_time", max_time), ("default_time", default_time)):
        if seconds is not None and seconds % 60:
            raise table.error(key, f"must be a whole number of minutes (Slurm's granularity), "
                                   f"got {human_duration(seconds)}")
    if default_time is not None and default_time > max_time:
        raise table.error("default_time", "must not exceed max_time")
    if max_tasks is not None and max_tasks < max_nodes:
        raise table.error("max_tasks", f"must be at least max_nodes ({max_nodes}): every node of a job "
                                       "runs at least one task")
    return Account(name, slurm_account, partitions, max_nodes, max_gpus, max_time, default_time,
                   max_memory, max_concurrent, admins, retry_node_failures, max_tasks=max_tasks,
                   max_cpus_per_task=max_cpus_per_task, max_output_bytes=max_output_bytes,
                   max_setup_time=max_setup_time, caches=caches,
                   max_queue_time=max_queue_time, max_queued_jobs=max_queued_jobs)


def _parse_caches(table: Table) -> Mapping[str, str]:
    """`[accounts.X.caches]`: cache names to absolute host directories."""
    caches = table.string_map("caches", key_pattern=CACHE_NAME_PATTERN,
                              what="a cache name (letters, digits, '_', '-'; at most 64)")
    variables: dict[str, str] = {}
    for name, text in caches.items():
        try:
            path = check_absolute_path(text, "cache directory")
        except ValueError as exc:
            raise table.error(f"caches.{name}", str(exc)) from None
        if path == "/":
            raise table.error(f"caches.{name}", "a cache must not be the root directory")
        caches[name] = path
        # Jobs find a cache by its variable, which folds case and '-': two names must not share one.
        variable = cache_env_name(name)
        if variable in variables:
            raise table.error(f"caches.{name}", f"{name!r} and {variables[variable]!r} would both be "
                                                f"{variable}")
        variables[variable] = name
    return caches


def _byte_size(value: object) -> int:
    """Bytes from a whole number of bytes (0: collect nothing) or a size such as "512M" or "10G"."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"must not be negative, got {value}")
        return value
    return parse_memory(value) * 1024 * 1024


def _parse_image(name: str, table: Table) -> Image:
    if not re.fullmatch(NAME_PATTERN, name):
        raise table.error(None, f"{name!r} is not a valid image name")
    path = table.converted("path", lambda v: check_absolute_path(_as_str(v), "image path"))
    sha256 = table.string("sha256", None)
    signed_by = table.string("signed_by", None)
    table.finish()
    if (sha256 is None) == (signed_by is None):
        raise table.error(None, "pin the image with exactly one of `sha256` or `signed_by`")
    if sha256 is not None:
        sha256 = sha256.lower().removeprefix("sha256:")
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise table.error("sha256", "must be 64 hexadecimal digits (the output of sha256sum)")
    if signed_by is not None:
        signed_by = signed_by.replace(" ", "").upper()
        if not re.fullmatch(r"[0-9A-F]{40}", signed_by):
            raise table.error("signed_by", "must be a 40-digit PGP key fingerprint")
    return Image(name, path, sha256, signed_by)


def _as_str(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value


def _parse_grant(table: Table, accounts: dict[str, Account], images: dict[str, Image]) -> Grant:
    name = table.string("name", pattern=NAME_PATTERN, what="a grant name")
    principals = _principals(table, "principals", required=True)
    account = table.string("account", pattern=NAME_PATTERN, what="an account name")
    if account not in accounts:
        known = ", ".join(sorted(accounts)) or "none defined"
        raise table.error("account", f"no account {account!r} in this policy (accounts: {known})")
    events = table.string_list("events", None)
    if events is not None:
        for index, event in enumerate(events):
            if event not in EVENTS:
                raise table.error(f"events[{index}]", f"unknown event {event!r} (known: {', '.join(EVENTS)})")
    refs = table.string_list("refs", None)
    if refs is not None:
        for index, ref in enumerate(refs):
            try:
                check_ref_pattern(ref)
            except ValueError as exc:
                raise table.error(f"refs[{index}]", str(exc)) from None
    forks = table.boolean("forks", False)
    image_names = table.string_list("images", ())
    for index, image in enumerate(image_names):
        if image not in images:
            known = ", ".join(sorted(images)) or "none defined"
            raise table.error(f"images[{index}]", f"no image {image!r} in the catalogue (images: {known})")
    binds = []
    for index, text in enumerate(table.string_list("binds", ())):
        try:
            binds.append(parse_bind(text))
        except ValueError as exc:
            raise table.error(f"binds[{index}]", str(exc)) from None
    mpi = table.boolean("mpi", False)
    gpus = table.boolean("gpus", False)
    network = table.boolean("network", False)
    signers = table.string_list("signers", None, pattern=r"[A-Za-z0-9._:-]{1,128}", what="a key id")
    signed_fields = table.string_list("signed_fields", None)
    caches = table.string_list("caches", (), pattern=CACHE_NAME_PATTERN, what="a cache name")
    for index, cache in enumerate(caches):
        if cache not in accounts[account].caches:
            known = ", ".join(sorted(accounts[account].caches)) or "none defined"
            raise table.error(f"caches[{index}]", f"account {account} has no cache {cache!r} "
                                                  f"(its caches: {known})")
    setup_network = table.boolean("setup_network", False)
    if signed_fields is not None:
        for index, field in enumerate(signed_fields):
            if field not in SIGNABLE_FIELDS:
                raise table.error(f"signed_fields[{index}]",
                                  f"unknown field {field!r} (known: {', '.join(SIGNABLE_FIELDS)})")
    table.finish()
    # An omitted list means "any" (or, for signers, "no signature needed"); an empty one would
    # silently mean "none", which is never what its author meant.
    meanings = {"signers": "no signature is required", "signed_fields": "nothing needs to be signed"}
    for key, values in (("events", events), ("refs", refs), ("signers", signers),
                        ("signed_fields", signed_fields)):
        if values == ():
            meaning = meanings.get(key, f"any {key.rstrip('s')} is allowed")
            raise table.error(key, f"must not be empty (omit `{key}` and {meaning})")
    return Grant(name, principals, account, events, refs, forks, image_names, tuple(binds), mpi, gpus,
                 network, signers, signed_fields, caches=caches, setup_network=setup_network)


def policy_from_document(doc: TomlDocument) -> Policy:
    root = Table(doc, doc.data)
    version = root.integer("version", minimum=0, maximum=1000)
    if version != POLICY_VERSION:
        raise root.error("version", f"this hpc-runner reads policy version {POLICY_VERSION}, got {version}")
    accounts = {name: _parse_account(name, t) for name, t in root.named_tables("accounts").items()}
    images = {name: _parse_image(name, t) for name, t in root.named_tables("images").items()}
    grants: list[Grant] = []
    for table in root.tables("grants"):
        grant = _parse_grant(table, accounts, images)
        if any(g.name == grant.name for g in grants):
            raise table.error("name", f"another grant is already named {grant.name!r}")
        grants.append(grant)
    root.finish()
    return Policy(accounts, images, tuple(grants), doc.name)


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy file; an InputError names file, line and field."""
    return policy_from_document(load_toml(path))


def parse_policy_text(text: str, name: str = "<policy>") -> Policy:
    return policy_from_document(parse_toml(text, name))
