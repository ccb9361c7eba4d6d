"""The job spec: what a user asks to run, parsed strictly from TOML.

The same `[job]` table is a file for `hpc-runner run`, a `[[jobs]]` entry of a
repository's `.hpc-runner.toml`, and the config block of the Buildkite plugin.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from runner.binds import Bind, parse_bind
from runner.errors import InputError
from runner.fields import Table
from runner.tomlsource import TomlDocument, load_toml, parse_toml
from runner.units import parse_duration, parse_memory

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
ENV_NAME_PATTERN = r"[A-Za-z_][A-Za-z0-9_]{0,127}"
MAX_SCRIPT_BYTES = 256 * 1024
MAX_NODES = 100_000
MAX_TASKS = 10_000_000
MAX_CPUS_PER_TASK = 4096
MAX_GPUS = 100_000
MAX_OUTPUT_PATTERNS = 100
MAX_OUTPUT_PATTERN_CHARS = 512
# A cache's name becomes a directory (/cache/NAME) and, upper-cased with '-' as '_', part of a
# variable name (HPC_RUNNER_CACHE_NAME): so no '.'.
CACHE_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"
MAX_CACHES = 32
CACHE_ROOT = "/cache"
CACHE_ENV_PREFIX = "HPC_RUNNER_CACHE_"
DEFAULT_SETUP_SECONDS = 600
# Where the workspace is in the sandbox: output patterns may name it, and mean a path under it.
WORKSPACE_PREFIX = "/work/"

# Set by the runner or the MPI launcher; a job that sets them would break its own launch
# or pretend to be something it is not.
RESERVED_ENV_PREFIXES = ("HPC_RUNNER_", "APPTAINER", "SINGULARITY", "SLURM_", "PMIX_", "PMI_")
RESERVED_ENV_NAMES = ("LD_PRELOAD", "LD_AUDIT")
# `[job.mpi] launch`: every rank runs the command ("ranks"), or the command runs once and starts
# ranks with `mpiexec` from inside the sandbox ("inside", see sandbox.mpiexec).
MPI_LAUNCHES = ("ranks", "inside")


@dataclass(frozen=True)
class Resources:
    """What the job asks of Slurm; None means "let the account's default decide"."""

    account: str | None = None
    partition: str | None = None
    nodes: int | None = None
    tasks: int | None = None
    tasks_per_node: int | None = None
    cpus_per_task: int | None = None
    gpus: int | None = None
    memory_mb: int | None = None
    time_seconds: int | None = None
    # How long the job may wait in Slurm's queue before it is taken out of it (`expired`).
    queue_seconds: int | None = None


@dataclass(frozen=True)
class Setup:
    """The setup phase: one process on the agent's node before the main phase (`[job.setup]`)."""

    command: tuple[str, ...] | None = None
    script: str | None = None
    time_seconds: int = DEFAULT_SETUP_SECONDS

    def to_json(self) -> dict[str, Any]:
        return {"command": list(self.command) if self.command is not None else None,
                "script": self.script, "time_seconds": self.time_seconds}


def cache_env_name(name: str) -> str:
    """The variable that tells a job where cache `name` is: HPC_RUNNER_CACHE_JULIA_DEPOT."""
    return CACHE_ENV_PREFIX + name.upper().replace("-", "_")


def cache_target(name: str) -> str:
    return f"{CACHE_ROOT}/{name}"


@dataclass(frozen=True)
class JobSpec:
    name: str
    image: str
    command: tuple[str, ...] | None = None
    script: str | None = None
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    binds: tuple[Bind, ...] = ()
    network: bool = False
    resources: Resources = Resources()
    mpi: bool = False
    mpi_launch: str = "ranks"  # one of MPI_LAUNCHES
    # Globs of files under /work collected when the job ends (`results/**/*.nc`), relative to /work.
    outputs: tuple[str, ...] = ()
    setup: Setup | None = None
    # Names of the account's caches the job uses (read-write in setup, read-only after).
    caches: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """A plain-data view, for the state store and `explain`."""
        r = self.resources
        data: dict[str, Any] = {
            "name": self.name, "image": self.image,
            "command": list(self.command) if self.command is not None else None,
            "script": self.script, "env": dict(self.env),
            "binds": [str(b) for b in self.binds], "network": self.network, "mpi": self.mpi,
            "outputs": list(self.outputs),
            "setup": self.setup.to_json() if self.setup is not None else None,
            "caches": list(self.caches),
            "resources": {
                "account": r.account, "partition": r.partition, "nodes": r.nodes, "tasks": r.tasks,
                "tasks_per_node": r.tasks_per_node, "cpus_per_task": r.cpus_per_task, "gpus": r.gpus,
                "memory_mb": r.memory_mb, "time_seconds": r.time_seconds,
                "queue_time_seconds": r.queue_seconds,
            },
        }
        # Only when not the default: the stored form of every other job stays as it was.
        if self.mpi_launch != "ranks":
            data["mpi_launch"] = self.mpi_launch
        return data

    def to_table(self) -> dict[str, Any]:
        """The `[job]` table that parses back into this spec."""
        return _table_from_json(self.to_json())


def _check_env_name(name: str) -> None:
    if name in RESERVED_ENV_NAMES or name.startswith(RESERVED_ENV_PREFIXES):
        raise ValueError(f"{name} is reserved for the runner and the MPI launcher")


def parse_output_pattern(text: str) -> str:
    """An output glob as a path relative to /work: `*` and `?` within one name, `**` for any number
    of directories. ValueError naming what is wrong: it must stay inside the workspace."""
    if len(text) > MAX_OUTPUT_PATTERN_CHARS:
        raise ValueError(f"is longer than {MAX_OUTPUT_PATTERN_CHARS} characters")
    if "\x00" in text or "\\" in text:
        raise ValueError("must not contain NUL or backslash")
    pattern = text[len(WORKSPACE_PREFIX):] if text.startswith(WORKSPACE_PREFIX) else text
    if pattern.startswith("/"):
        raise ValueError(f"{text!r} is outside the workspace: give a path under /work, or relative to it")
    parts = pattern.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"{text!r} must be a plain relative path (no empty, '.' or '..' parts)")
    if "**" in parts[-1:]:
        raise ValueError(f"{text!r} must end in a file name pattern, not '**'")
    if any("**" in part and part != "**" for part in parts):
        raise ValueError(f"{text!r}: '**' stands for whole directories only (as in results/**/*.nc)")
    return pattern


def parse_resources(table: Table | None) -> Resources:
    if table is None:
        return Resources()
    account = table.string("account", None, pattern=NAME_PATTERN, what="an account name")
    partition = table.string("partition", None, pattern=NAME_PATTERN, what="a partition name")
    nodes = table.integer("nodes", None, maximum=MAX_NODES)
    tasks = table.integer("tasks", None, maximum=MAX_TASKS)
    per_node = table.integer("tasks_per_node", None, maximum=MAX_TASKS)
    cpus = table.integer("cpus_per_task", None, maximum=MAX_CPUS_PER_TASK)
    gpus = table.integer("gpus", None, minimum=0, maximum=MAX_GPUS)
    memory = table.converted("memory", parse_memory, None)
    time = table.converted("time", parse_duration, None)
    queue_time = table.converted("queue_time", parse_duration, None)
    table.finish()
    effective_nodes = nodes or 1
    if per_node is not None:
        if tasks is None:
            tasks = effective_nodes * per_node
        elif tasks != effective_nodes * per_node:
            raise table.error("tasks", f"{tasks} tasks cannot be spread as {per_node} per node "
                                       f"over {effective_nodes} node(s) "
                                       f"(that is {effective_nodes * per_node})")
    if tasks is not None and tasks < effective_nodes:
        raise table.error("tasks", f"{tasks} task(s) cannot fill {effective_nodes} nodes "
                                   "(each node needs at least one task)")
    return Resources(account, partition, nodes, tasks, per_node, cpus, gpus, memory, time, queue_time)


def _command_or_script(table: Table) -> tuple[tuple[str, ...] | None, str | None]:
    """Exactly one of `command` (an array) or `script` (a string)."""
    command: tuple[str, ...] | None = None
    if table.has("command"):
        command = table.string_list("command", unique=False)
        if not command:
            raise table.error("command", "must not be empty")
    else:
        table.string_list("command", None)
    script: str | None = None
    if table.has("script"):
        script = table.converted("script", _script)
    else:
        table.string("script", None)
    if command is None and script is None:
        raise table.error(None, "needs either `command` (an array) or `script` (a string)")
    if command is not None and script is not None:
        raise table.error("script", "give either `command` or `script`, not both")
    return command, script


def parse_setup(table: Table | None) -> Setup | None:
    if table is None:
        return None
    command, script = _command_or_script(table)
    time = table.converted("time", parse_duration, DEFAULT_SETUP_SECONDS)
    table.finish()
    if time <= 0:
        raise table.error("time", "must be longer than nothing")
    return Setup(command, script, time)


def parse_job_table(table: Table) -> JobSpec:
    """Parse one `[job]` table (or a `[[jobs]]` entry, or a plugin config block)."""
    name = table.string("name", pattern=NAME_PATTERN,
                        what="a job name (letters, digits, '.', '_', '-'; at most 64)")
    image = table.string("image", pattern=NAME_PATTERN, what="an image name from the policy's catalogue")
    command, script = _command_or_script(table)
    env = table.string_map("env", key_pattern=ENV_NAME_PATTERN, what="an environment variable name")
    for env_name in env:
        try:
            _check_env_name(env_name)
        except ValueError as exc:
            raise table.error(f"env.{env_name}", str(exc)) from None
    binds: list[Bind] = []
    for index, text in enumerate(table.string_list("binds", ())):
        try:
            binds.append(parse_bind(text))
        except ValueError as exc:
            raise table.error(f"binds[{index}]", str(exc)) from None
    targets = [b.target for b in binds]
    for index, target in enumerate(targets):
        if targets.index(target) != index:
            raise table.error(f"binds[{index}]", f"two binds mount onto {target}")
    network = table.boolean("network", False)
    resources = parse_resources(table.table("resources"))
    mpi = False
    mpi_launch = "ranks"
    mpi_table = table.table("mpi")
    if mpi_table is not None:
        mpi = mpi_table.boolean("enabled", False)
        mpi_launch = mpi_table.string("launch", "ranks", pattern="|".join(MPI_LAUNCHES),
                                      what='"ranks" or "inside"')
        mpi_table.finish()
        if mpi_launch == "inside" and not mpi:
            raise mpi_table.error("launch", '"inside" starts MPI ranks: it needs enabled = true')
    outputs: list[str] = []
    patterns = table.string_list("outputs", ())
    if len(patterns) > MAX_OUTPUT_PATTERNS:
        raise table.error("outputs", f"at most {MAX_OUTPUT_PATTERNS} patterns")
    for index, text in enumerate(patterns):
        try:
            outputs.append(parse_output_pattern(text))
        except ValueError as exc:
            raise table.error(f"outputs[{index}]", str(exc)) from None
    setup = parse_setup(table.table("setup"))
    caches = table.string_list("caches", (), pattern=CACHE_NAME_PATTERN,
                               what="a cache name (letters, digits, '_', '-'; at most 64)")
    if len(caches) > MAX_CACHES:
        raise table.error("caches", f"at most {MAX_CACHES} caches")
    table.finish()
    return JobSpec(name=name, image=image, command=command, script=script,
                   env=MappingProxyType(dict(env)), binds=tuple(binds), network=network,
                   resources=resources, mpi=mpi, mpi_launch=mpi_launch, outputs=tuple(outputs), setup=setup,
                   caches=tuple(caches))


def _script(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    if not value.strip():
        raise ValueError("must not be empty")
    if len(value.encode()) > MAX_SCRIPT_BYTES:
        raise ValueError(f"is longer than {MAX_SCRIPT_BYTES} bytes")
    if "\x00" in value:
        raise ValueError("contains a NUL character")
    return value


def job_from_document(doc: TomlDocument) -> JobSpec:
    root = Table(doc, doc.data)
    job = root.table("job", required=True)
    assert job is not None
    spec = parse_job_table(job)
    root.finish()
    return spec


def load_job(path: str | Path) -> JobSpec:
    """Read a job spec file (a `[job]` table)."""
    return job_from_document(load_toml(path))


def parse_job_text(text: str, name: str = "<job>") -> JobSpec:
    return job_from_document(parse_toml(text, name))


def parse_job_mapping(data: Mapping[str, Any], name: str) -> JobSpec:
    """Parse a job table that arrived as data (a Buildkite plugin block, a `[[jobs]]` entry)."""
    if not isinstance(data, Mapping):
        raise InputError("the job must be a table", file=name)
    doc = TomlDocument(name=name, data={"job": dict(data)})
    job = Table(doc, doc.data).table("job", required=True)
    assert job is not None
    return parse_job_table(job)


def spec_from_json(data: Mapping[str, Any], name: str) -> JobSpec:
    """A spec back from its `to_json` form (as the state store keeps it), checked as on input."""
    return parse_job_mapping(_table_from_json(data), name)


def _table_from_json(data: Mapping[str, Any]) -> dict[str, Any]:
    table: dict[str, Any] = {"name": data["name"], "image": data["image"], "network": data["network"]}
    for key in ("command", "script"):
        if data.get(key) is not None:
            table[key] = data[key]
    for key in ("env", "binds", "outputs", "caches"):
        if data.get(key):
            table[key] = data[key]
    resources = {k: v for k, v in (data.get("resources") or {}).items() if v is not None}
    # Whole megabytes and seconds, as the parser stored them, written so that it reads them back.
    if "memory_mb" in resources:
        resources["memory"] = f"{resources.pop('memory_mb')}M"
    if "time_seconds" in resources:
        resources["time"] = f"{resources.pop('time_seconds')}s"
    if "queue_time_seconds" in resources:
        resources["queue_time"] = f"{resources.pop('queue_time_seconds')}s"
    if resources:
        table["resources"] = resources
    if data.get("mpi"):
        table["mpi"] = {"enabled": True}
        if data.get("mpi_launch"):
            table["mpi"]["launch"] = data["mpi_launch"]
    setup = data.get("setup")
    if setup:
        table["setup"] = {key: setup[key] for key in ("command", "script") if setup.get(key) is not None}
        table["setup"]["time"] = f"{setup['time_seconds']}s"
    return table
