"""The agent config (TOML): where state lives, which executor, which CI sources.

Read as strictly as a policy: unknown keys, wrong types and bad values are errors that
name the file, the line and the dotted field, so a typo never silently means a default.
Secrets are never in this file, only the paths of the files that hold them.
"""

from __future__ import annotations

import os
import pwd
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from runner.binds import check_absolute_path, is_within
from runner.errors import InputError
from runner.fields import Table
from runner.hook_tables import Hook, parse_hook_tables
from runner.oidc.issuers import OidcIssuer, issuer_url, parse_oidc_tables
from runner.policy import Policy
from runner.spec import NAME_PATTERN
from runner.tomlsource import TomlDocument, load_toml, parse_toml
from runner.units import parse_duration, parse_memory
from runner.urls import https_url
from sandbox.workspace import DEFAULT_MAX_WORKSPACE_BYTES

Executor = Literal["slurm", "local"]
MpiImplementation = Literal["openmpi", "auto", "none"]
GithubMode = Literal["poll", "gateway"]

EXECUTORS: tuple[Executor, ...] = ("slurm", "local")
MPI_IMPLEMENTATIONS: tuple[MpiImplementation, ...] = ("openmpi", "auto", "none")
GITHUB_MODES: tuple[GithubMode, ...] = ("poll", "gateway")

APP_NAME = "hpc-runner"
# Slurm queues what it cannot start yet, so many jobs in flight cost little; the local executor
# runs every job on this node, so its default is one job per CPU.
DEFAULT_MAX_JOBS_SLURM = 50
MAX_MAX_JOBS = 100_000
DEFAULT_BUILDKITE_ENDPOINT = "https://agent.buildkite.com/v3"
DEFAULT_GITHUB_API_URL = "https://api.github.com"
DEFAULT_TRIGGER_LABEL = "run-hpc"
DEFAULT_COMMENT_COMMAND = "/hpc-runner run"
DEFAULT_POLL_INTERVAL = 30
# Faster polling only burns the GitHub App's rate limit (5000 requests an hour).
MIN_POLL_INTERVAL = 5
MAX_BUILDKITE_WORKERS = 1000
DEFAULT_CHECKOUT_URL = "https://github.com/{repository}.git"
DEFAULT_HUB_MAX_QUEUE_AGE = 3600
MAX_HUB_MAX_QUEUE_AGE = 24 * 3600
# The top-level keys of an agent that leases the hub's API jobs: the first three go together.
API_KEYS = ("hub_url", "hub_token_file", "cluster")

_COMMAND_NAME = r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}"
_TAG = r"[A-Za-z0-9_.-]{1,64}=[^\x00-\x1f\x7f]{1,256}"
_REPOSITORY = r"[A-Za-z0-9][A-Za-z0-9-]{0,38}/[A-Za-z0-9._-]{1,100}"
# Branch names as git allows them in practice, with a trailing `/*` as the only wildcard
# (the same rule as principals in the policy).
_BRANCH = r"[A-Za-z0-9_][A-Za-z0-9._+/-]{0,254}?(/\*)?"
# An env variable name with `*`, `?` and `[...]` as glob characters (path.Match's, as the agent uses).
_REDACTED_VAR = r"[A-Za-z0-9_*?\[\]!-]{1,128}"
_LISTEN = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]{0,252}):(\d{1,5})")

# What each file-valued key holds, in words for messages.
FILE_DESCRIPTIONS = {
    "policy": "policy",
    "buildkite.token_file": "Buildkite agent token",
    "buildkite.verification_jwks_file": "Buildkite signature keys (JWKS)",
    "github.private_key_file": "GitHub App private key",
    "github.gateway_token_file": "gateway token",
    "gateway.webhook_secret_file": "GitHub webhook secret",
    "gateway.agent_tokens_file": "gateway's agent tokens",
    "hub.webhook_secret_file": "GitHub webhook secret",
    "hub.agent_tokens_file": "hub's agent tokens",
    "hooks.secret_file": "hook secret",
    "hub_token_file": "hub token",
    "login.client_secret_file": "dashboard login's client secret",
}


@dataclass(frozen=True)
class SandboxConfig:
    apptainer: str = "apptainer"          # a command name looked up on PATH, or an absolute path
    workdir_root: Path | None = None      # parent of each job's private /tmp; None: the job's dir
    grace_period: int = 10                # seconds between SIGTERM and SIGKILL at walltime or cancel
    # A local-queue workspace is copied at submission (see sandbox/workspace.py); at most this much.
    max_workspace_mb: int = DEFAULT_MAX_WORKSPACE_BYTES // (1024 * 1024)


@dataclass(frozen=True)
class MpiConfig:
    implementation: MpiImplementation = "auto"


@dataclass(frozen=True)
class SlurmConfig:
    poll_interval: int = 5                # seconds between squeue calls (one call for all jobs)
    srun: str = "srun"                    # on the compute node's PATH, or an absolute path
    mpi_plugin: str = "pmix"              # srun --mpi=


# How long a finished job's files are kept (`[retention]`), in seconds after the job ended.
DEFAULT_RETENTION_JOB_DIRS = 14 * 86400
DEFAULT_RETENTION_LOGS = 90 * 86400
DEFAULT_RETENTION_OUTPUTS = 90 * 86400
# Shorter than this could take a job's files before its source has fetched what it needs of them.
MIN_RETENTION = 3600


@dataclass(frozen=True)
class RetentionConfig:
    """`[retention]`: how long after a job ended its directory's contents (workspace, scratch,
    job files), its log (`output.log`) and its collected outputs are kept. Never the job's
    record or the audit log."""

    job_dirs: int = DEFAULT_RETENTION_JOB_DIRS
    logs: int = DEFAULT_RETENTION_LOGS
    outputs: int = DEFAULT_RETENTION_OUTPUTS


@dataclass(frozen=True)
class BuildkiteConfig:
    token_file: Path
    verification_jwks_file: Path | None
    endpoint: str = DEFAULT_BUILDKITE_ENDPOINT
    tags: tuple[str, ...] = ()
    workers: int = 1
    allow_unsigned: bool = False
    # Name globs of job env variables whose values are redacted from logs, beside Buildkite's defaults.
    redacted_vars: tuple[str, ...] = ()


@dataclass(frozen=True)
class GithubConfig:
    app_id: int
    private_key_file: Path
    repositories: tuple[str, ...]
    api_url: str = DEFAULT_GITHUB_API_URL
    mode: GithubMode = "poll"
    trigger_label: str | None = DEFAULT_TRIGGER_LABEL     # None: labels trigger nothing
    comment_command: str | None = DEFAULT_COMMENT_COMMAND  # None: comments trigger nothing
    push_branches: tuple[str, ...] = ()
    poll_interval: int = DEFAULT_POLL_INTERVAL            # seconds
    log_url: str | None = None                            # contains "{id}"
    gateway_url: str | None = None                        # mode "gateway" only
    gateway_token_file: Path | None = None                # mode "gateway" only


DEFAULT_LOGIN_USERNAME_CLAIM = "preferred_username"
DEFAULT_LOGIN_GROUPS_CLAIM = "groups"
DEFAULT_LOGIN_SCOPES = ("openid", "profile")
_SCOPE = r"[\x21\x23-\x5b\x5d-\x7e]{1,128}"     # RFC 6749's scope-token: no space, quote or backslash
_CLIENT_ID = r"[^\s\x00-\x1f\x7f]{1,256}"
_LOGIN_CLAIM = r"[^\s\x00-\x1f\x7f]{1,256}"


@dataclass(frozen=True)
class LoginConfig:
    """`[login]`: people log in to the hub's dashboard at the site's OpenID Connect provider."""

    issuer: str                           # exactly as its ID tokens' `iss` spell it
    client_id: str
    client_secret_file: Path
    username_claim: str = DEFAULT_LOGIN_USERNAME_CLAIM
    groups_claim: str = DEFAULT_LOGIN_GROUPS_CLAIM
    # None: openid and profile, and groups when the provider's discovery document offers that scope.
    scopes: tuple[str, ...] | None = None

    @property
    def discovery_url(self) -> str:
        return self.issuer.rstrip("/") + "/.well-known/openid-configuration"


@dataclass(frozen=True)
class HubConfig:
    """`[hub]`, or the same read from a `[gateway]` section (the hub's former name)."""

    listen_host: str
    listen_port: int
    webhook_secret_file: Path | None      # None: no webhooks are taken
    agent_tokens_file: Path
    state_dir: Path
    public_url: str | None = None         # None: the jobs API is not served
    section: str = "hub"                  # the section it was read from, for messages
    login: LoginConfig | None = None      # `[login]`: None, no dashboard login


@dataclass(frozen=True)
class ApiConfig:
    """The top-level `hub_url`, `hub_token_file` and `cluster`: the agent leases the hub's API jobs."""

    hub_url: str
    hub_token_file: Path
    cluster: str
    checkout_url: str = DEFAULT_CHECKOUT_URL    # "{repository}" is replaced by the job's repository
    max_queue_age: int = DEFAULT_HUB_MAX_QUEUE_AGE  # seconds a job may wait at the hub and still run


@dataclass(frozen=True)
class MetricsConfig:
    """`[metrics]`: where the process (agent or hub) serves `GET /metrics` for Prometheus. It has no
    authentication: loopback, or an address on a management network only."""

    listen_host: str
    listen_port: int


@dataclass(frozen=True)
class AgentConfig:
    state_dir: Path
    work_root: Path
    policy: Path | None                   # None: the embedded default policy
    executor: Executor
    max_jobs: int
    sandbox: SandboxConfig = SandboxConfig()
    mpi: MpiConfig = MpiConfig()
    buildkite: BuildkiteConfig | None = None
    github: GithubConfig | None = None
    hub: HubConfig | None = None
    source: str | None = None             # the file it was read from; None: the embedded default
    socket: Path | None = None            # the local queue's socket; None: <state_dir>/agent.sock
    slurm: SlurmConfig = SlurmConfig()
    # The issuers whose OIDC ID tokens are trusted (`[[oidc]]`), in the file's order.
    oidc: tuple[OidcIssuer, ...] = ()
    api: ApiConfig | None = None          # the hub's API jobs, leased by this agent
    # The hub's outbound hooks (`[[hooks]]`), in the file's order.
    hooks: tuple[Hook, ...] = ()
    # Where the agent serves the dashboard of its own jobs (a Unix socket); None: it serves none.
    web_socket: Path | None = None
    retention: RetentionConfig = RetentionConfig()
    # `[metrics]`: where Prometheus scrapes this process; None: no metrics are served.
    metrics: MetricsConfig | None = None

    def secret_files(self) -> list[Path]:
        """Every file holding a secret that the config names (each must be 0600, ours)."""
        return [path for path, _ in self.named_secret_files()]

    def named_secret_files(self) -> list[tuple[Path, str]]:
        """Secret files with the dotted config key that names each, for messages."""
        found: list[tuple[Path | None, str]] = []
        if self.buildkite:
            found.append((self.buildkite.token_file, "buildkite.token_file"))
        if self.github:
            found.append((self.github.private_key_file, "github.private_key_file"))
            found.append((self.github.gateway_token_file, "github.gateway_token_file"))
        if self.api:
            found.append((self.api.hub_token_file, "hub_token_file"))
        if self.hub:
            found.append((self.hub.webhook_secret_file, f"{self.hub.section}.webhook_secret_file"))
            found.append((self.hub.agent_tokens_file, f"{self.hub.section}.agent_tokens_file"))
            if self.hub.login is not None:
                found.append((self.hub.login.client_secret_file, "login.client_secret_file"))
        found += [(hook.secret_file, f"hooks[{index}].secret_file") for index, hook in enumerate(self.hooks)]
        return [(path, key) for path, key in found if path is not None]

    def trusted_files(self) -> list[tuple[Path, str]]:
        """Public files the agent trusts: anyone may read them, nobody else may change them."""
        found: list[tuple[Path, str]] = []
        if self.policy is not None:
            found.append((self.policy, "policy"))
        if self.buildkite and self.buildkite.verification_jwks_file is not None:
            found.append((self.buildkite.verification_jwks_file, "buildkite.verification_jwks_file"))
        return found

    def state_dirs(self) -> list[tuple[Path, str]]:
        found = [(self.state_dir, "state_dir")]
        if self.hub:
            found.append((self.hub.state_dir, f"{self.hub.section}.state_dir"))
        return found

    def protected_paths(self) -> list[Path]:
        """Paths no job may ever see: the state directories and every secret file.

        Every bind a job asks for or a grant allows, and every workspace, must stay clear of
        these; `work_root` (by default beside `state_dir`) must not contain them either.
        """
        return [path for path, _ in self.named_protected_paths()]

    def socket_path(self) -> Path:
        """Where the local queue listens: `socket`, else inside the private state dir."""
        return self.socket or self.state_dir / "agent.sock"

    def named_unbindable_paths(self) -> list[tuple[Path, str]]:
        """What no bind may be, hold or lie inside: the protected paths, and the directories
        of the jobs (`work_root`, `workdir_root`), where every job's workspace, scratch and log live."""
        found = [*self.named_protected_paths(), (self.work_root, "work_root")]
        if self.sandbox.workdir_root is not None:
            found.append((self.sandbox.workdir_root, "sandbox.workdir_root"))
        return found

    def named_protected_paths(self) -> list[tuple[Path, str]]:
        # The JWKS may hold a shared HS256 key, which signs jobs: no job may see it either.
        jwks = [(path, key) for path, key in self.trusted_files()
                if key == "buildkite.verification_jwks_file"]
        return self.state_dirs() + self.named_secret_files() + jwks


# ---------------------------------------------------------------------------------------------
# the embedded default


DEFAULT_WEB_SOCKET = "web.sock"


def default_state_dir() -> Path:
    """`$XDG_STATE_HOME/hpc-runner`, else `~/.local/state/hpc-runner` of the invoking user."""
    xdg = os.environ.get("XDG_STATE_HOME", "")
    # The XDG spec says to ignore a relative value.
    if xdg.startswith("/"):
        return _environment_path(xdg, "XDG_STATE_HOME") / APP_NAME
    return _home() / ".local" / "state" / APP_NAME


def _home() -> Path:
    home = os.environ.get("HOME", "")
    if not home.startswith("/"):
        home = pwd.getpwuid(os.geteuid()).pw_dir
    return _environment_path(home, "HOME")


def _environment_path(value: str, variable: str) -> Path:
    try:
        return Path(check_absolute_path(value, "path"))
    except ValueError as exc:
        raise InputError(str(exc), field=f"${variable}") from None


def default_work_root(state_dir: Path) -> Path:
    """Beside the state dir, never inside it: job directories are bound into sandboxes."""
    return state_dir.parent / f"{state_dir.name}-work"


def default_max_jobs(executor: Executor) -> int:
    if executor == "slurm":
        return DEFAULT_MAX_JOBS_SLURM
    return os.cpu_count() or 1


def default_config() -> AgentConfig:
    """The config used without `--config`: local executor, state under the user's home, and the
    dashboard on a socket in the (private) state dir, for its user to forward (`ssh -L`)."""
    state_dir = default_state_dir()
    return AgentConfig(state_dir=state_dir, work_root=default_work_root(state_dir), policy=None,
                       executor="local", max_jobs=default_max_jobs("local"),
                       web_socket=state_dir / DEFAULT_WEB_SOCKET)


# ---------------------------------------------------------------------------------------------
# value readers: each raises ValueError, which `Table.converted` turns into a located InputError


def _as_str(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {type(value).__name__} {value!r}")
    return value


def _path(value: object) -> Path:
    # The same rule as bind sources (no ':' or ','): work_root and workdir_root become bind
    # sources in Apptainer's comma- and colon-separated --bind syntax, and one rule for every
    # path keeps the config simple to explain.
    path = check_absolute_path(_as_str(value), "path")
    if path == "/":
        raise ValueError("must not be '/'")
    return Path(path)


def _apptainer_command(value: object) -> str:
    text = _as_str(value)
    if "/" in text:
        return str(_path(text))
    if not re.fullmatch(_COMMAND_NAME, text):
        raise ValueError(f"{text!r} is neither a command name nor an absolute path")
    return text


def _url(value: object) -> str:
    """An https URL (http only to a loopback host, for tests); returned without a trailing '/'."""
    return https_url(_as_str(value)).rstrip("/")


def _interval(value: object) -> int:
    # parse_duration reads a bare number as minutes (Slurm's --time); for an interval that is
    # a trap (30 would mean half an hour), so the unit must be written.
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        raise ValueError(f"{value!r} needs a unit: write \"30s\" or \"2m\"")
    return parse_duration(value)


def _log_url(value: object) -> str:
    text = _url(value)
    if "{id}" not in text:
        raise ValueError(f"{text!r} must contain {{id}}, replaced by the job id")
    # Any other brace would be read as a placeholder when the URL is filled in.
    if "{" in text.replace("{id}", "") or "}" in text.replace("{id}", ""):
        raise ValueError(f"{text!r} may contain no placeholder other than {{id}}")
    return text


def _listen(value: object) -> tuple[str, int]:
    text = _as_str(value)
    match = _LISTEN.fullmatch(text)
    if not match:
        raise ValueError(f"{text!r} is not HOST:PORT (for example \"0.0.0.0:8443\" or \"[::1]:8443\")")
    host, port = match.group(1).strip("[]"), int(match.group(2))
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is not between 1 and 65535")
    return host, port


def _checkout_url(value: object) -> str:
    """A repository URL with `{repository}` where the job's repository goes: https (http only to
    localhost), a `file://` URL or an absolute path (a mirror on this node)."""
    text = _as_str(value)
    if text.count("{repository}") != 1 or "{" in text.replace("{repository}", "") \
            or "}" in text.replace("{repository}", ""):
        raise ValueError(f"{text!r} must contain {{repository}} once, and no other placeholder")
    example = text.replace("{repository}", "owner/name")
    if example.startswith("/"):
        _path(example)
    elif example.startswith("file:///"):
        _path(example.removeprefix("file://"))
    else:
        https_url(example)
    return text


def _optional_text(table: Table, key: str, default: str) -> str | None:
    """A single-line string where "" switches the feature off."""
    value: str = table.string(key, default, pattern=r"[^\x00-\x1f\x7f]{0,256}",
                              what="a single line of at most 256 characters")
    return value.strip() or None


def _choice(table: Table, key: str, choices: tuple[str, ...], default: str) -> Any:
    value: str = table.string(key, default)
    if value not in choices:
        allowed = " or ".join(f'"{c}"' for c in choices)
        raise table.error(key, f"must be {allowed}, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------
# sections


def _parse_sandbox(table: Table | None) -> SandboxConfig:
    if table is None:
        return SandboxConfig()
    apptainer = table.converted("apptainer", _apptainer_command, "apptainer")
    workdir_root = table.converted("workdir_root", _path, None)
    grace_period = table.converted("grace_period", parse_duration, 10)
    max_workspace_mb = table.converted("max_workspace_size", parse_memory,
                                       DEFAULT_MAX_WORKSPACE_BYTES // (1024 * 1024))
    table.finish()
    return SandboxConfig(apptainer, workdir_root, grace_period, max_workspace_mb)


def _parse_mpi(table: Table | None) -> MpiConfig:
    if table is None:
        return MpiConfig()
    implementation = _choice(table, "implementation", MPI_IMPLEMENTATIONS, "auto")
    table.finish()
    return MpiConfig(implementation)


def _parse_slurm(table: Table | None) -> SlurmConfig:
    if table is None:
        return SlurmConfig()
    poll_interval = table.converted("poll_interval", _interval, 5)
    if poll_interval > 600:
        raise table.error("poll_interval", "must be at most 10m: a longer one hides a finished job too long")
    srun = table.converted("srun", _apptainer_command, "srun")
    mpi_plugin = table.string("mpi_plugin", "pmix", pattern=r"[a-z0-9_]{1,32}",
                              what="an srun --mpi plugin name")
    table.finish()
    return SlurmConfig(poll_interval, srun, mpi_plugin)


def _parse_retention(table: Table | None) -> RetentionConfig:
    if table is None:
        return RetentionConfig()
    kept = {key: table.converted(key, parse_duration, default)
            for key, default in (("job_dirs", DEFAULT_RETENTION_JOB_DIRS), ("logs", DEFAULT_RETENTION_LOGS),
                                 ("outputs", DEFAULT_RETENTION_OUTPUTS))}
    table.finish()
    for key, seconds in kept.items():
        if seconds < MIN_RETENTION:
            raise table.error(key, "must be at least 1h: a job's source may still read its files "
                                   "shortly after it ended")
    return RetentionConfig(**kept)


def _parse_metrics(table: Table) -> MetricsConfig:
    host, port = table.converted("listen", _listen)
    table.finish()
    return MetricsConfig(host, port)


def _parse_tags(table: Table) -> tuple[str, ...]:
    tags: tuple[str, ...] = table.string_list("tags", (), pattern=_TAG, what="a KEY=VALUE tag")
    keys: set[str] = set()
    for index, tag in enumerate(tags):
        key = tag.split("=", 1)[0]
        if key in keys:
            raise table.error(f"tags[{index}]", f"the tag {key!r} is set twice")
        keys.add(key)
    return tags


def _parse_buildkite(table: Table) -> BuildkiteConfig:
    token_file = table.converted("token_file", _path)
    endpoint = table.converted("endpoint", _url, DEFAULT_BUILDKITE_ENDPOINT)
    tags = _parse_tags(table)
    jwks = table.converted("verification_jwks_file", _path, None)
    workers = table.integer("workers", 1, maximum=MAX_BUILDKITE_WORKERS)
    allow_unsigned = table.boolean("allow_unsigned", False)
    redacted_vars = table.string_list("redacted_vars", (), pattern=_REDACTED_VAR,
                                      what="an env variable name glob (e.g. \"*_CREDENTIALS\")")
    table.finish()
    if jwks is None and not allow_unsigned:
        raise table.error("verification_jwks_file",
                          "is required: jobs must be signed (set allow_unsigned = true only for tests)")
    return BuildkiteConfig(token_file, jwks, endpoint, tags, workers, allow_unsigned, redacted_vars)


def _parse_github(table: Table) -> GithubConfig:
    app_id = table.integer("app_id")
    private_key_file = table.converted("private_key_file", _path)
    api_url = table.converted("api_url", _url, DEFAULT_GITHUB_API_URL)
    mode = _choice(table, "mode", GITHUB_MODES, "poll")
    repositories = table.string_list("repositories", pattern=_REPOSITORY, what="OWNER/NAME")
    if not repositories:
        raise table.error("repositories", "must list at least one repository (\"OWNER/NAME\")")
    trigger_label = _optional_text(table, "trigger_label", DEFAULT_TRIGGER_LABEL)
    comment_command = _optional_text(table, "comment_command", DEFAULT_COMMENT_COMMAND)
    push_branches = table.string_list("push_branches", (), pattern=_BRANCH,
                                      what="a branch name (a trailing /* is the only wildcard)")
    poll_interval = table.converted("poll_interval", _interval, DEFAULT_POLL_INTERVAL)
    if poll_interval < MIN_POLL_INTERVAL:
        raise table.error("poll_interval", f"must be at least {MIN_POLL_INTERVAL}s")
    log_url = table.converted("log_url", _log_url, None)
    gateway_url = table.converted("gateway_url", _url, None)
    gateway_token_file = table.converted("gateway_token_file", _path, None)
    table.finish()
    _check_github_mode(table, mode, gateway_url, gateway_token_file)
    return GithubConfig(app_id, private_key_file, repositories, api_url, mode, trigger_label,
                        comment_command, push_branches, poll_interval, log_url, gateway_url,
                        gateway_token_file)


def _check_github_mode(table: Table, mode: str, gateway_url: str | None,
                       gateway_token_file: Path | None) -> None:
    for key, value in (("gateway_url", gateway_url), ("gateway_token_file", gateway_token_file)):
        if mode == "gateway" and value is None:
            raise table.error(key, 'is required with mode = "gateway"')
        # Ignoring it would hide that the agent is not using the gateway someone set up.
        if mode == "poll" and value is not None:
            raise table.error(key, 'is only used with mode = "gateway" (mode is "poll")')


def _parse_hub(table: Table, section: str) -> HubConfig:
    """`[hub]`, or `[gateway]`: there, as before, webhooks are what it is for (their secret is
    required) and the jobs API is served only once a public URL is given."""
    host, port = table.converted("listen", _listen)
    if section == "hub":
        webhook_secret_file = table.converted("webhook_secret_file", _path, None)
        public_url = table.converted("public_url", _url)
    else:
        webhook_secret_file = table.converted("webhook_secret_file", _path)
        public_url = table.converted("public_url", _url, None)
    agent_tokens_file = table.converted("agent_tokens_file", _path)
    state_dir = table.converted("state_dir", _path)
    table.finish()
    return HubConfig(host, port, webhook_secret_file, agent_tokens_file, state_dir, public_url, section)


def _parse_hub_sections(root: Table) -> HubConfig | None:
    hub: HubConfig | None = _optional_section(root, "hub", lambda table: _parse_hub(table, "hub"))
    gateway: HubConfig | None = _optional_section(root, "gateway", lambda table: _parse_hub(table, "gateway"))
    if hub is not None and gateway is not None:
        raise root.error("gateway", "give [hub] or [gateway] (its former name), not both")
    return hub or gateway


def _parse_login(table: Table) -> LoginConfig:
    issuer = table.converted("issuer", issuer_url)
    client_id = table.string("client_id", pattern=_CLIENT_ID, what="a client id (one word, no spaces)")
    client_secret_file = table.converted("client_secret_file", _path)
    username_claim = table.string("username_claim", DEFAULT_LOGIN_USERNAME_CLAIM, pattern=_LOGIN_CLAIM,
                                  what="a claim name")
    groups_claim = table.string("groups_claim", DEFAULT_LOGIN_GROUPS_CLAIM, pattern=_LOGIN_CLAIM,
                                what="a claim name")
    scopes = table.string_list("scopes", None, pattern=_SCOPE, what="a scope (one word, no spaces)")
    table.finish()
    if scopes is not None and "openid" not in scopes:
        raise table.error("scopes", 'must include "openid": without it the provider gives no ID token')
    return LoginConfig(issuer, client_id, client_secret_file, username_claim, groups_claim, scopes)


def _with_login(root: Table, hub: HubConfig | None) -> HubConfig | None:
    """The hub with `[login]`, which needs its public URL: the provider sends people back there."""
    login: LoginConfig | None = _optional_section(root, "login", _parse_login)
    if login is None:
        return hub
    if hub is None or hub.public_url is None:
        raise root.error("login", "logs people in to the hub's dashboard: it needs a [hub] section with "
                                  "public_url (the provider redirects to public_url/login/callback)")
    return replace(hub, login=login)


def _parse_api(root: Table) -> ApiConfig | None:
    """The top-level keys of an agent that leases the hub's API jobs."""
    hub_url = root.converted("hub_url", _url, None)
    hub_token_file = root.converted("hub_token_file", _path, None)
    cluster = root.string("cluster", None, pattern=NAME_PATTERN,
                          what="a cluster name (letters, digits, '.', '_', '-'; at most 64)")
    checkout_url = root.converted("checkout_url", _checkout_url, None)
    max_queue_age = root.converted("hub_max_queue_age", _interval, None)
    given = {"hub_url": hub_url, "hub_token_file": hub_token_file, "cluster": cluster}
    if all(value is None for value in given.values()):
        for key, value in (("checkout_url", checkout_url), ("hub_max_queue_age", max_queue_age)):
            if value is not None:
                raise root.error(key, "is only used with hub_url, hub_token_file and cluster")
        return None
    for key, value in given.items():
        if value is None:
            others = " and ".join(other for other in API_KEYS if other != key)
            raise root.error(key, f"is required with {others}: an agent leasing the hub's API jobs needs "
                                  "all three")
    if max_queue_age is not None and not 60 <= max_queue_age <= MAX_HUB_MAX_QUEUE_AGE:
        raise root.error("hub_max_queue_age", "must be between 1m and 24h")
    assert hub_url is not None and hub_token_file is not None and cluster is not None
    return ApiConfig(hub_url, hub_token_file, cluster, checkout_url or DEFAULT_CHECKOUT_URL,
                     DEFAULT_HUB_MAX_QUEUE_AGE if max_queue_age is None else max_queue_age)


def _optional_section(root: Table, key: str, parse: Callable[[Table], Any]) -> Any:
    table = root.table(key)
    return None if table is None else parse(table)


def config_from_document(doc: TomlDocument) -> AgentConfig:
    root = Table(doc, doc.data)
    state_dir = root.converted("state_dir", _path, None) or default_state_dir()
    work_root = root.converted("work_root", _path, None) or default_work_root(state_dir)
    policy = root.converted("policy", _path, None)
    executor = _choice(root, "executor", EXECUTORS, "local")
    max_jobs = root.integer("max_jobs", default_max_jobs(executor), maximum=MAX_MAX_JOBS)
    socket = root.converted("socket", _path, None)
    web_socket = root.converted("web_socket", _path, None)
    sandbox = _parse_sandbox(root.table("sandbox"))
    mpi = _parse_mpi(root.table("mpi"))
    slurm = _parse_slurm(root.table("slurm"))
    retention = _parse_retention(root.table("retention"))
    buildkite = _optional_section(root, "buildkite", _parse_buildkite)
    github = _optional_section(root, "github", _parse_github)
    hub = _with_login(root, _parse_hub_sections(root))
    oidc = parse_oidc_tables(root)
    hooks = parse_hook_tables(root)
    if hooks and (hub is None or hub.public_url is None):
        raise root.error("hooks", "are sent by the hub: they need a [hub] section with public_url")
    api = _parse_api(root)
    metrics = _optional_section(root, "metrics", _parse_metrics)
    root.finish()
    _check_layout(root, state_dir, work_root)
    if policy is None and (buildkite or github or api):
        raise root.error("policy", "is required when [buildkite], [github] or hub_url is configured: "
                                   "CI jobs need the site's own policy file")
    if api is not None and not oidc:
        raise root.error("hub_url", "needs at least one [[oidc]] table: the agent verifies the token of "
                                    "every API job itself, against the issuers it trusts")
    if web_socket is not None and web_socket == (socket or state_dir / "agent.sock"):
        raise root.error("web_socket", "must not be the local queue's socket (`socket`): the dashboard "
                                       "needs a socket of its own")
    return AgentConfig(state_dir, work_root, policy, executor, max_jobs, sandbox, mpi, buildkite, github,
                       hub, doc.name, socket, slurm, oidc, api, hooks=hooks, web_socket=web_socket,
                       retention=retention, metrics=metrics)


def _check_layout(root: Table, state_dir: Path, work_root: Path) -> None:
    # Jobs see their workspace below work_root: the state directory must never be among them.
    if is_within(str(state_dir), str(work_root)):
        raise root.error("work_root", f"must not contain state_dir {str(state_dir)!r}: jobs' "
                                      "workspaces live below work_root")


def load_config(path: str | Path) -> AgentConfig:
    """Read and validate an agent config file; an InputError names file, line and field."""
    return config_from_document(load_toml(path))


def parse_config_text(text: str, name: str = "<config>") -> AgentConfig:
    return config_from_document(parse_toml(text, name))


# ---------------------------------------------------------------------------------------------
# the policy against this site


def check_policy_against_site(policy: Policy, config: AgentConfig) -> list[str]:
    """Why the policy's granted binds are unacceptable here; empty when they are fine.

    A grant bind is refused when its source, symlinks resolved, is a protected path (state
    directories, secret files) or a directory of the jobs (work_root, workdir_root), lies inside
    one, or contains one: binding `/etc` would expose `/etc/hpc-runner/github-app.pem` as surely
    as binding the key itself.
    """
    protected = [(os.path.realpath(path), what) for path, what in config.named_unbindable_paths()]
    reasons: list[str] = []
    for grant in policy.grants:
        for bind in grant.binds:
            source = os.path.realpath(bind.source)
            for path, what in protected:
                relation = _relation(source, path)
                if relation is not None:
                    resolved = "" if source == bind.source else f" (resolves to {source})"
                    reasons.append(f"grant {grant.name!r} bind {str(bind)!r}{resolved} {relation} "
                                   f"{path}, the agent's {what}: no job may see it")
    return reasons


def _relation(source: str, protected: str) -> str | None:
    if source == protected:
        return "is"
    if is_within(source, protected):
        return "lies inside"
    if is_within(protected, source):
        return "contains"
    return None
