"""From a Buildkite job (the accept answer) to what the agent decides on: identity, job spec, env.

Pure functions: the caller has verified the step's signature and passes the verified key id.

- Identity: organisation and pipeline slugs, branch (or a tag build's tag), build creator and
  the creator's teams, event (push, pull_request, schedule, ...), fork status of a pull request
  (its repository differs from the pipeline's), and the signer. All of it is job env that
  Buildkite asserts; the identity names (`signed`) the fields whose variables the step's
  signature covers too.
- Job spec: the step's `hpc-runner` plugin block (the README's `[job]` table, without
  `command`/`script`); the step's command becomes the spec's `script`. Plugins are signed, so
  the resources a step asks for are covered by its signature. Without a block, or a block
  without `image`, the policy's only image is used when it has exactly one.
- Env: Buildkite's informational `BUILDKITE_*` variables (never a token), the step's env and
  the pipeline env the signature covers, then the block's own `env`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from runner.errors import InputError
from runner.fields import MAX_STRING
from runner.identity import BUILDKITE_EVENTS, SIGNABLE_FIELDS, Identity
from runner.sources.buildkite.signature import ENV_FIELD_PREFIX, plugin_full_source
from runner.sources.refusal import Refusal
from runner.spec import (
    ENV_NAME_PATTERN,
    NAME_PATTERN,
    RESERVED_ENV_NAMES,
    RESERVED_ENV_PREFIXES,
    JobSpec,
    parse_job_mapping,
)

PLUGIN_NAME = "hpc-runner"
DEFAULT_JOB_NAME = "buildkite-job"

# Never handed to a job: the agent's own credentials and where to use them.
_WITHHELD_ENV = frozenset({"BUILDKITE_AGENT_ACCESS_TOKEN", "BUILDKITE_AGENT_TOKEN",
                           "BUILDKITE_AGENT_ENDPOINT", "BUILDKITE_AGENT_PID", "BUILDKITE_ENV_FILE",
                           "BUILDKITE_ENV_JSON_FILE"})
_BUILDKITE_PASSED = ("BUILDKITE", "CI")
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_NAME = re.compile(NAME_PATTERN)
_ENV_NAME = re.compile(ENV_NAME_PATTERN)
# A tag name that makes a ref the identity can hold (refs/tags/TAG, at most 250 characters after
# refs/); what else git refuses in a ref (`..`, `.lock`) is refused by the checkout's
# check-ref-format before any fetch.
_TAG = re.compile(r"[A-Za-z0-9._+-][A-Za-z0-9._/+-]{0,244}")


class JobRefused(Refusal):
    """The job cannot be run as given."""


@dataclass(frozen=True)
class Translated:
    identity: Identity
    spec: JobSpec
    repository: str
    commit: str
    notes: tuple[str, ...]  # lines for the job log: what was left out and why


def plugin_name(source: str) -> str:
    """The plugin's name in any source form: `hpc-runner#v1`, `org/hpc-runner#v1`, a full URL."""
    full = plugin_full_source(source).partition("#")[0].rstrip("/")
    name = full.rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    name = name.removesuffix(".git").removesuffix("-buildkite-plugin")
    return name


def plugin_blocks(plugins_json: str) -> list[tuple[str, object]]:
    """(source, config) of each plugin in `BUILDKITE_PLUGINS` (a JSON list of one-key objects)."""
    if plugins_json.strip() in ("", "null", "[]"):
        return []
    try:
        plugins = json.loads(plugins_json)
    except ValueError:
        raise JobRefused("BUILDKITE_PLUGINS is not valid JSON") from None
    if not isinstance(plugins, list):
        raise JobRefused("BUILDKITE_PLUGINS is not a list of plugins")
    found: list[tuple[str, object]] = []
    for entry in plugins:
        if isinstance(entry, str):
            found.append((entry, None))
        elif isinstance(entry, Mapping) and len(entry) == 1:
            ((source, config),) = entry.items()
            found.append((str(source), config))
        else:
            raise JobRefused("BUILDKITE_PLUGINS holds an entry that is not a one-key object")
    return found


def hpc_runner_block(plugins_json: str) -> tuple[Mapping[str, Any] | None, list[str]]:
    """The step's hpc-runner plugin config (None when absent) and the other plugins' sources."""
    blocks = plugin_blocks(plugins_json)
    ours = [(source, config) for source, config in blocks if plugin_name(source) == PLUGIN_NAME]
    others = [source for source, _ in blocks if plugin_name(source) != PLUGIN_NAME]
    if len(ours) > 1:
        raise JobRefused(f"the step uses the {PLUGIN_NAME} plugin {len(ours)} times; give one block")
    if not ours:
        return None, others
    source, config = ours[0]
    if config is None:
        return {}, others
    if not isinstance(config, Mapping):
        raise JobRefused(f"the {PLUGIN_NAME} plugin's config ({source}) must be a table (the job spec)")
    return config, others


def job_spec(env: Mapping[str, str], block: Mapping[str, Any] | None, *, policy_images: Sequence[str],
             job_env: Mapping[str, str]) -> JobSpec:
    """The job spec: the block, the step's command as its script, the computed env merged in."""
    table: dict[str, Any] = dict(block or {})
    command = env.get("BUILDKITE_COMMAND", "")
    if "command" in table or "script" in table:
        if command.strip():
            raise JobRefused(f"the {PLUGIN_NAME} plugin block sets `command`/`script`, but the step has a "
                             "command too; give the command in the step only")
    elif command.strip():
        table["script"] = command
    else:
        raise JobRefused("the step has no command to run")
    if "image" not in table:
        if len(policy_images) != 1:
            raise JobRefused(f"the {PLUGIN_NAME} plugin block must name the `image` (the policy offers "
                             f"{', '.join(sorted(policy_images)) or 'none'})")
        table["image"] = policy_images[0]
    table.setdefault("name", _job_name(env))
    block_env = table.get("env", {})
    if not isinstance(block_env, Mapping):
        raise JobRefused(f"the {PLUGIN_NAME} plugin block's `env` must be a table of strings")
    table["env"] = {**job_env, **block_env}
    try:
        return parse_job_mapping(table, f"{PLUGIN_NAME} plugin block")
    except InputError as exc:
        raise JobRefused(str(exc)) from None


def _job_name(env: Mapping[str, str]) -> str:
    for key in ("BUILDKITE_STEP_KEY", "BUILDKITE_LABEL"):
        candidate = re.sub(r"[^A-Za-z0-9._-]+", "-", env.get(key, "")).strip("-._")[:64]
        if candidate and _NAME.fullmatch(candidate):
            return candidate
    return DEFAULT_JOB_NAME


def job_env(env: Mapping[str, str], step: Mapping[str, Any], signed_fields: Sequence[str]
            ) -> tuple[dict[str, str], list[str]]:
    """The variables handed to the job, and the names left out (for a note in the log).

    Passed: `BUILDKITE`, `CI`, `BUILDKITE_*` except the agent's credentials, the step's own env
    and the pipeline env the signature covers (`env::NAME`). Other variables of the job env (set
    when a build was created, never signed) stay out.
    """
    wanted: dict[str, str] = {}
    step_env = step.get("env")
    signed_pipeline = {f.removeprefix(ENV_FIELD_PREFIX) for f in signed_fields
                       if f.startswith(ENV_FIELD_PREFIX)}
    step_names = set(step_env) if isinstance(step_env, Mapping) else set()
    left_out: list[str] = []
    for name, value in env.items():
        informational = (name in _BUILDKITE_PASSED or name.startswith("BUILDKITE_")) \
            and name not in _WITHHELD_ENV
        if not (informational or name in step_names or name in signed_pipeline):
            left_out.append(name)
            continue
        reserved = name in RESERVED_ENV_NAMES or name.startswith(RESERVED_ENV_PREFIXES)
        if not _ENV_NAME.fullmatch(name) or reserved or len(value) > MAX_STRING or "\x00" in value:
            left_out.append(name)
            continue
        wanted[name] = value
    return wanted, sorted(left_out)


def _teams(value: str) -> tuple[tuple[str, ...], list[str]]:
    teams: list[str] = []
    bad: list[str] = []
    for team in re.split(r"[:,\s]+", value.strip()):
        if not team:
            continue
        (teams if _SEGMENT.fullmatch(team) else bad).append(team)
    return tuple(dict.fromkeys(teams)), bad


def _repo_key(url: str) -> str:
    """A repository URL reduced to host/path, so ssh and https forms of one repository compare equal."""
    text = url.strip().lower()
    text = re.sub(r"^[a-z+]+://", "", text)
    text = re.sub(r"^[^@/]+@", "", text)
    text = text.replace(":", "/", 1) if "/" not in text.split(":", 1)[0] else text
    return text.removesuffix("/").removesuffix(".git")


def signed_env_names(step: Mapping[str, Any], signed_fields: Sequence[str]) -> frozenset[str]:
    """The job env variables whose values a verified signature with `signed_fields` covers.

    The step's own env (the verifier compared each of its values with the job env), the pipeline
    env of each `env::NAME` field, and `BUILDKITE_REPO` (the signed `repository_url`).
    """
    names = {f.removeprefix(ENV_FIELD_PREFIX) for f in signed_fields if f.startswith(ENV_FIELD_PREFIX)}
    step_env = step.get("env")
    if "env" in signed_fields and isinstance(step_env, Mapping):
        names.update(str(name) for name in step_env)
    if "repository_url" in signed_fields:
        names.add("BUILDKITE_REPO")
    return frozenset(names)


def _signed(env: Mapping[str, str], signed_env: frozenset[str]) -> tuple[str, ...]:
    """The identity fields (SIGNABLE_FIELDS) all of whose source variables are signed."""
    is_pr = env.get("BUILDKITE_PULL_REQUEST", "false").isdigit()
    # A pull request's ref is refs/pull/N/head, a tag build's refs/tags/TAG (its BUILDKITE_BRANCH,
    # the tag's name too, then decides nothing), anything else's is its branch.
    made_of = set() if is_pr else {"BUILDKITE_TAG"} if env.get("BUILDKITE_TAG") else {"BUILDKITE_BRANCH"}
    sources = {
        "pipeline": {"BUILDKITE_ORGANIZATION_SLUG", "BUILDKITE_PIPELINE_SLUG"},
        "ref": {"BUILDKITE_PULL_REQUEST"} | made_of,
        "commit": {"BUILDKITE_COMMIT"},
        "event": {"BUILDKITE_PULL_REQUEST"} | (set() if is_pr else {"BUILDKITE_SOURCE"}),
        # Fork status compares the head repository with BUILDKITE_REPO.
        "pull_request": {"BUILDKITE_PULL_REQUEST"}
        | ({"BUILDKITE_PULL_REQUEST_REPO", "BUILDKITE_REPO"} if is_pr else set()),
        "teams": {"BUILDKITE_BUILD_CREATOR_TEAMS"},
    }
    return tuple(field for field in SIGNABLE_FIELDS if sources[field] <= signed_env)


def identity(env: Mapping[str, str], signer: str | None, *, signed_env: frozenset[str] = frozenset()
             ) -> tuple[Identity, list[str]]:
    """Who asks, from the job env Buildkite sent; notes name anything that could not be used.

    `signed_env` names the variables the step's verified signature covers (`signed_env_names`).
    """
    notes: list[str] = []
    organization = env.get("BUILDKITE_ORGANIZATION_SLUG", "")
    pipeline = env.get("BUILDKITE_PIPELINE_SLUG", "")
    for key, value in (("BUILDKITE_ORGANIZATION_SLUG", organization), ("BUILDKITE_PIPELINE_SLUG", pipeline)):
        if not _SEGMENT.fullmatch(value):
            raise JobRefused(f"{key} is {value!r}, not a Buildkite slug")
    teams, bad = _teams(env.get("BUILDKITE_BUILD_CREATOR_TEAMS", ""))
    if bad:
        notes.append(f"team names that are not slugs were ignored: {', '.join(bad)}")
    pull_request = env.get("BUILDKITE_PULL_REQUEST", "false")
    is_pr = pull_request.isdigit()
    tag = env.get("BUILDKITE_TAG") or None
    if tag is not None and is_pr:
        raise JobRefused(f"the build names both a tag (BUILDKITE_TAG {tag[:100]}) and a pull request "
                         f"(#{pull_request}): there is no one ref to decide on and check out")
    fork = False
    ref = None
    if tag is not None:
        if not _TAG.fullmatch(tag):
            raise JobRefused(f"BUILDKITE_TAG is {tag[:100]!r}, not a git tag name")
        # Buildkite names a tag build's branch after the tag: the ref the policy decides on and the
        # checkout fetches is the tag's, never refs/heads/TAG.
        ref = f"refs/tags/{tag}"
    if is_pr:
        pr_repo = env.get("BUILDKITE_PULL_REQUEST_REPO", "")
        # An unknown head repository counts as a fork: deny by default.
        fork = not pr_repo or _repo_key(pr_repo) != _repo_key(env.get("BUILDKITE_REPO", ""))
        ref = f"refs/pull/{pull_request}/head"
        event = "pull_request"
    else:
        event = BUILDKITE_EVENTS.get(env.get("BUILDKITE_SOURCE", "webhook"), "push")
    branch = env.get("BUILDKITE_BRANCH") or None
    creator = env.get("BUILDKITE_BUILD_CREATOR_EMAIL") or env.get("BUILDKITE_BUILD_CREATOR") or None
    ident = Identity(source="buildkite", organization=organization, pipeline=pipeline,
                     branch=_bounded(branch), creator=_bounded(creator), signer=signer, teams=teams,
                     event=event, ref=ref, fork=fork, signed=_signed(env, signed_env))
    return ident, notes


def _bounded(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.replace("\x00", "")
    return value[:256] or None


def translate(job: Mapping[str, Any], *, signer: str | None, signed_fields: Sequence[str],
              policy_images: Sequence[str]) -> Translated:
    """Everything the agent needs from a Buildkite job, or JobRefused with the reason."""
    env = job.get("env")
    step = job.get("step") or {}
    if not isinstance(env, Mapping) or not isinstance(step, Mapping):
        raise JobRefused("the job has no env or step")
    env = {str(k): str(v) for k, v in env.items()}
    ident, notes = identity(env, signer, signed_env=signed_env_names(step, signed_fields))
    block, others = hpc_runner_block(env.get("BUILDKITE_PLUGINS", ""))
    if others:
        notes.append(f"plugins are not run by hpc-runner; ignored: {', '.join(others)}")
    passed, left_out = job_env(env, step, signed_fields)
    if left_out:
        notes.append(f"unsigned variables not passed to the job: {', '.join(left_out)}")
    spec = job_spec(env, block, policy_images=policy_images, job_env=passed)
    repository = env.get("BUILDKITE_REPO", "")
    commit = env.get("BUILDKITE_COMMIT", "")
    if not repository:
        raise JobRefused("the job names no repository (BUILDKITE_REPO)")
    return Translated(ident, spec, repository, commit, tuple(notes))
