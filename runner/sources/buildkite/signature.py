"""Verifying Buildkite pipeline signatures on the steps of the jobs we are given.

A pipeline uploader signs each command step: the signed values are the step's command,
env, plugins, matrix (and secrets, when it has some), the repository URL and one
`env::NAME` value per pipeline-level env var. The payload is the RFC 8785 (JCS) form of
`{"alg": <alg>, "values": {...}}`, and the signature is a compact JWS with a detached
payload, `BASE64URL(header) + ".." + BASE64URL(signature)`.

To trust a job we rebuild those values from what the job gives us, check the signature
against a key from our JWKS, and then check that what the job will actually run (its
`BUILDKITE_COMMAND`, env and `BUILDKITE_PLUGINS`) is what the signed step says, after the
job's matrix permutation is filled in. This follows the Buildkite agent's own checks, so
that a pipeline signed for Buildkite's agents is accepted here and nothing it rejects is.

Everything here is pure: the caller reads the JWKS file and the job.
"""

from __future__ import annotations

import base64
import binascii
import json
import posixpath
import re
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import rfc8785

from runner.errors import InputError
from runner.jwk import KeyType, VerificationKey, verification_key
from runner.sources.refusal import Refusal

# The agent's signing keys are EdDSA, ES512 or PS512; ES256 is what cloud KMS keys
# produce; HS256 is what the agent's own tests verify with, and the agent accepts any
# `alg` on a verification key. Each algorithm names the only key type (and curve) it may
# be used with, so a key cannot be reinterpreted under a weaker algorithm.
ALGORITHM_KEY_TYPES: Mapping[str, KeyType] = {
    "EdDSA": ("OKP", "Ed25519"),
    "ES256": ("EC", "P-256"),
    "ES512": ("EC", "P-521"),
    "PS512": ("RSA", None),
    "HS256": ("oct", None),
}

# Fields every command step signature must cover; `secrets` joins them when the step has
# secrets, so that stripping it from the signed list cannot hide a changed secret.
REQUIRED_FIELDS = ("command", "env", "plugins", "matrix", "repository_url")
ENV_FIELD_PREFIX = "env::"

# Step keys whose values are signed, or describe the signature, or that the matrix does
# not touch; every other key is still checked for unknown matrix tokens, as the agent does.
_MODELLED_STEP_KEYS = frozenset(
    {"command", "commands", "env", "plugins", "matrix", "secrets", "signature", "checkout",
     "key", "id", "identifier"}
)

# The agent's token pattern, spelt with ASCII classes because Go's `\w` and `\s` are ASCII.
_MATRIX_TOKEN = re.compile(r"\{\{[\t\n\f\r ]*matrix(\.[0-9A-Za-z_.\-]+)?[\t\n\f\r ]*\}\}")
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")
_BAD_PERCENT_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")

# JCS follows JavaScript: an integer beyond this is a double, formatted as one.
_MAX_SAFE_INTEGER = 2**53 - 1


class SignatureRejected(Refusal):
    """The job must not run: its signature is missing, invalid, or does not match the job."""


class JwksError(InputError):
    """A verification JWKS that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class Jwks:
    """Verification keys by key id; `name` is where they came from, for messages."""

    name: str
    keys: Mapping[str, VerificationKey]

    def shared_keys(self) -> list[VerificationKey]:
        """Keys that sign as well as verify (HMAC, kty "oct"): whoever can read one can sign jobs."""
        return [key for key in self.keys.values() if ALGORITHM_KEY_TYPES[key.alg][0] == "oct"]


@dataclass(frozen=True)
class VerifiedSignature:
    kid: str
    alg: str


# ---------------------------------------------------------------------------------------
# JWKS


def load_jwks(text: str, *, name: str) -> Jwks:
    """The verification keys in a JWKS document (RFC 7517), or a JwksError naming `name`.

    Every key needs a unique `kid` and an accepted `alg` that fits its key type. Private
    key material is refused: a verification file holding a signing key would let anyone
    who can read it sign jobs.
    """
    try:
        document = json.loads(text)
    except ValueError as error:
        raise JwksError(f"not valid JSON: {error}", file=name) from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise JwksError('must be a JSON object with a "keys" list (a JWKS)', file=name)
    if not entries:
        raise JwksError("holds no keys", file=name)
    keys: dict[str, VerificationKey] = {}
    for index, entry in enumerate(entries):
        key = _load_key(entry, file=name, index=index)
        if key.kid in keys:
            raise JwksError(f"key id {key.kid!r} is used twice", file=name, field=f"keys[{index}]")
        keys[key.kid] = key
    return Jwks(name=name, keys=keys)


def _load_key(entry: object, *, file: str, index: int) -> VerificationKey:
    where = f"keys[{index}]"
    if not isinstance(entry, dict):
        raise JwksError("must be a JSON object (a JWK)", file=file, field=where)
    kid = entry.get("kid")
    if not isinstance(kid, str) or not kid:
        raise JwksError('has no "kid": signatures name their key by kid', file=file, field=where)
    where = f"{where} (kid {kid!r})"

    def fail(message: str) -> JwksError:
        return JwksError(message, file=file, field=where)

    alg = entry.get("alg")
    if not isinstance(alg, str) or not alg:
        raise fail('has no "alg"; every verification key must name its algorithm')
    if alg not in ALGORITHM_KEY_TYPES:
        raise fail(f"algorithm {alg!r} is not accepted (accepted: {', '.join(ALGORITHM_KEY_TYPES)})")
    try:
        jwk = verification_key(entry, alg, ALGORITHM_KEY_TYPES[alg])
    except ValueError as error:
        raise fail(str(error)) from None
    return VerificationKey(kid=kid, alg=alg, jwk=jwk)


# ---------------------------------------------------------------------------------------
# Canonical payload


def signed_payload(fields: Mapping[str, object], alg: str) -> bytes:
    """The exact bytes a step signature covers: JCS of `{"alg": alg, "values": fields}`.

    Raises ValueError for values JSON cannot carry (NaN, infinities, non-string keys).
    """
    return _jcs({"alg": alg, "values": fields})


def _jcs(value: object) -> bytes:
    try:
        # The value is rebuilt from plain JSON types, which is what rfc8785 accepts.
        plain: Any = _json_numbers_as_signed(value)
        return rfc8785.dumps(plain)
    except (rfc8785.CanonicalizationError, TypeError) as error:
        raise ValueError(f"cannot canonicalise signed values: {error}") from None


def _json_numbers_as_signed(value: object) -> object:
    """`value` with plain dicts and lists, and large integers as the doubles JCS makes of them."""
    if isinstance(value, bool) or value is None or isinstance(value, str | float):
        return value
    if isinstance(value, int):
        return value if abs(value) <= _MAX_SAFE_INTEGER else float(value)
    if isinstance(value, Mapping):
        return {key: _json_numbers_as_signed(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_numbers_as_signed(item) for item in value]
    raise TypeError(f"{type(value).__name__} is not a JSON value")


# ---------------------------------------------------------------------------------------
# The step, as the signer saw it


@dataclass(frozen=True)
class _Plugin:
    source: str
    config: object


@dataclass(frozen=True)
class _Adjustment:
    with_: dict[str, str] | None
    skip: object
    rest: dict[str, object]


@dataclass(frozen=True)
class _Matrix:
    setup: dict[str, list[str]] | None
    adjustments: list[_Adjustment]
    rest: dict[str, object]


@dataclass(frozen=True)
class _Step:
    command: str
    env: dict[str, str]
    plugins: list[_Plugin]
    matrix: _Matrix | None
    secrets: list[dict[str, object]]
    has_checkout: bool


class _MalformedStep(Exception):
    pass


def _parse_step(step: Mapping[str, object]) -> _Step:
    return _Step(
        command=_parse_command(step),
        env=_parse_env(step.get("env")),
        plugins=_parse_plugins(step.get("plugins")),
        matrix=_parse_matrix(step.get("matrix")),
        secrets=_parse_secrets(step.get("secrets")),
        has_checkout=_checkout_is_set(step.get("checkout")),
    )


def _parse_command(step: Mapping[str, object]) -> str:
    if "command" in step and "commands" in step:
        raise _MalformedStep("step has both command and commands")
    value = step.get("command", step.get("commands"))
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(line, str) for line in value):
        # A command list runs, and is signed, as one script of lines.
        return "\n".join(value)
    raise _MalformedStep("step command is neither a string nor a list of strings")


def _parse_env(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise _MalformedStep("step env is not a map of strings")
    return dict(value)


def _parse_plugins(value: object) -> list[_Plugin]:
    # Plugins arrive as a list of one-key maps or names, or as one map; a map in the list
    # may name several plugins, which keep their order.
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    plugins: list[_Plugin] = []
    for item in items:
        if isinstance(item, str):
            plugins.append(_Plugin(item, None))
        elif isinstance(item, dict):
            plugins.extend(_Plugin(source, config) for source, config in item.items())
        else:
            raise _MalformedStep("step plugins are not a list of plugin names or maps")
    return plugins


def _parse_secrets(value: object) -> list[dict[str, object]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(
        isinstance(item, dict) and isinstance(item.get("key"), str)
        and isinstance(item.get("environment_variable", ""), str)
        for item in value
    ):
        raise _MalformedStep("step secrets are not a list of {key, environment_variable}")
    return [dict(item) for item in value]


def _matrix_value(value: object) -> str:
    # Matrix values are strings to the signer; YAML scalars become their Go spelling.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str):
        return value
    raise _MalformedStep(f"matrix value {value!r} is not a string, number or boolean")


def _parse_matrix(value: object) -> _Matrix | None:
    if value is None:
        return None
    if isinstance(value, list):
        return _Matrix(setup={"": [_matrix_value(item) for item in value]}, adjustments=[], rest={})
    if not isinstance(value, dict):
        raise _MalformedStep("step matrix is neither a list nor a map")
    rest = {k: v for k, v in value.items() if k not in ("setup", "adjustments")}
    adjustments = value.get("adjustments") or []
    if not isinstance(adjustments, list):
        raise _MalformedStep("matrix adjustments are not a list")
    return _Matrix(
        setup=_parse_matrix_setup(value["setup"]) if "setup" in value else None,
        adjustments=[_parse_adjustment(item) for item in adjustments],
        rest=rest,
    )


def _parse_matrix_setup(value: object) -> dict[str, list[str]] | None:
    if value is None:
        return None
    if isinstance(value, list):
        return {"": [_matrix_value(item) for item in value]}
    if isinstance(value, dict) and all(isinstance(items, list) for items in value.values()):
        return {dim: [_matrix_value(item) for item in items] for dim, items in value.items()}
    raise _MalformedStep("matrix setup is neither a list nor a map of lists")


def _parse_adjustment(value: object) -> _Adjustment:
    if not isinstance(value, dict):
        raise _MalformedStep("a matrix adjustment is not a map")
    with_ = value.get("with")
    parsed: dict[str, str] | None
    if isinstance(with_, dict):
        parsed = {dim: _matrix_value(item) for dim, item in with_.items()}
    elif with_ is None:
        parsed = None
    else:
        parsed = {"": _matrix_value(with_)}
    rest = {k: v for k, v in value.items() if k not in ("with", "skip")}
    return _Adjustment(with_=parsed, skip=value.get("skip"), rest=rest)


def _checkout_is_set(value: object) -> bool:
    # A checkout map of only empty or false settings changes nothing about the checkout.
    if isinstance(value, dict):
        return any(_is_non_empty(item) for item in value.values())
    return _is_non_empty(value)


def _is_non_empty(value: object) -> bool:
    if isinstance(value, dict | list | str):
        return len(value) > 0
    return value is not None and value is not False


# ---------------------------------------------------------------------------------------
# Signed values


def plugin_full_source(source: str) -> str:
    """A plugin reference as Buildkite signs it: `foo#v1` is the buildkite-plugins repo.

    `foo` means github.com/buildkite-plugins/foo-buildkite-plugin and `org/foo` means
    github.com/org/foo-buildkite-plugin; paths, URLs and longer references are kept.
    """
    if source == "" or source.startswith(("/", ".", "\\")):
        return source
    reference, _, fragment = source.partition("#")
    path = reference.partition("?")[0]
    # A colon in the first segment is a URL scheme (kept) or not a URL at all (kept).
    if ":" in path.split("/", 1)[0] or _CONTROL_CHARACTER.search(source):
        return source
    if _BAD_PERCENT_ESCAPE.search(path) or _BAD_PERCENT_ESCAPE.search(fragment):
        return source
    segments = urllib.parse.unquote(path, errors="replace").split("/")
    fragment = urllib.parse.unquote(fragment, errors="replace")
    if len(segments) > 2:
        return source
    repository = segments[-1] + "-buildkite-plugin" + (f"#{fragment}" if fragment else "")
    owner = segments[0] if len(segments) == 2 else "buildkite-plugins"
    return posixpath.normpath("/".join(part for part in ("github.com", owner, repository) if part))


def _plugin_value(plugin: _Plugin) -> dict[str, object]:
    config = plugin.config
    if isinstance(config, dict | list) and not config:
        config = None
    return {plugin_full_source(plugin.source): config}


def _plugins_value(plugins: Sequence[_Plugin]) -> list[dict[str, object]] | None:
    return [_plugin_value(plugin) for plugin in plugins] or None


def _matrix_setup_value(setup: dict[str, list[str]] | None) -> object:
    if setup is not None and len(setup) == 1 and setup.get(""):
        return setup[""]
    return setup


def _matrix_value_signed(matrix: _Matrix | None) -> object:
    if matrix is None or (not matrix.setup and not matrix.adjustments and not matrix.rest):
        return None
    if not matrix.adjustments and not matrix.rest and matrix.setup is not None \
            and list(matrix.setup) == [""] and matrix.setup[""]:
        return matrix.setup[""]
    value: dict[str, object] = dict(matrix.rest)
    value["setup"] = _matrix_setup_value(matrix.setup)
    if matrix.adjustments:
        value["adjustments"] = [_adjustment_value(adjustment) for adjustment in matrix.adjustments]
    return value


def _adjustment_value(adjustment: _Adjustment) -> dict[str, object]:
    value: dict[str, object] = dict(adjustment.rest)
    with_ = adjustment.with_
    value["with"] = with_[""] if with_ is not None and list(with_) == [""] else with_
    if _is_non_empty(adjustment.skip) and adjustment.skip != 0:
        value["skip"] = adjustment.skip
    return value


def _secret_value(secret: Mapping[str, object]) -> dict[str, object]:
    value = dict(secret)
    if not value.get("environment_variable"):
        value.pop("environment_variable", None)
    return value


def _signed_values(step: _Step, fields: Sequence[str], *, repository_url: str,
                   job_env: Mapping[str, str]) -> dict[str, object]:
    """The values of `fields` as the signer computed them, from the job's step and env."""
    values: dict[str, object] = {}
    for field in fields:
        if field == "command":
            values[field] = step.command
        elif field == "env":
            values[field] = step.env or None
        elif field == "plugins":
            values[field] = _plugins_value(step.plugins)
        elif field == "matrix":
            values[field] = _matrix_value_signed(step.matrix)
        elif field == "repository_url":
            values[field] = repository_url
        elif field == "secrets":
            values[field] = [_secret_value(secret) for secret in step.secrets] or None
        else:
            name = field.removeprefix(ENV_FIELD_PREFIX)
            if name not in job_env:
                raise SignatureRejected(
                    f"Job signature covers pipeline env var {name}, but the job's environment lacks it"
                )
            values[field] = job_env[name]
    return values


def _check_field_list(fields: Sequence[str], step: _Step) -> None:
    for field in fields:
        if field == "checkout":
            raise SignatureRejected(
                "Job signature covers checkout settings, which this agent cannot check against the job"
            )
        known = field in REQUIRED_FIELDS or field == "secrets"
        if not known and not (field.startswith(ENV_FIELD_PREFIX) and len(field) > len(ENV_FIELD_PREFIX)):
            raise SignatureRejected(
                f"Job signature covers field {field!r}, which this agent cannot check against the job"
            )
    required = [*REQUIRED_FIELDS, *(["secrets"] if step.secrets else [])]
    missing = [field for field in required if field not in fields]
    if missing:
        raise SignatureRejected(f"Job signature does not cover the step's {', '.join(missing)}")
    if step.has_checkout:
        raise SignatureRejected("Job step has checkout settings, which this agent cannot verify")


# ---------------------------------------------------------------------------------------
# JWS


@dataclass(frozen=True)
class _DetachedJws:
    encoded_header: str
    header: dict[str, object]
    signature: bytes


def _b64url_decode(text: str) -> bytes:
    if not _BASE64URL.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _parse_detached_jws(value: str) -> _DetachedJws:
    parts = value.split(".")
    if len(parts) != 3 or parts[1] != "" or not parts[0] or not parts[2]:
        raise SignatureRejected("Job signature is not a detached compact JWS (header..signature)")
    try:
        header = json.loads(_b64url_decode(parts[0]))
        signature = _b64url_decode(parts[2])
    except (ValueError, binascii.Error):
        raise SignatureRejected("Job signature is not a detached compact JWS: bad header or base64url") \
            from None
    if not isinstance(header, dict):
        raise SignatureRejected("Job signature header is not a JSON object")
    return _DetachedJws(encoded_header=parts[0], header=header, signature=signature)


def _key_for(jws: _DetachedJws, jwks: Jwks) -> VerificationKey:
    kid, alg = jws.header.get("kid"), jws.header.get("alg")
    if not isinstance(alg, str) or not alg:
        raise SignatureRejected("Job signature header names no algorithm")
    if not isinstance(kid, str) or not kid:
        # Cloud KMS signers leave the kid out; the agent, too, can only check those with
        # the KMS key itself, never against a JWKS.
        raise SignatureRejected(f"Job signature names no key id (kid), so no key in {jwks.name} can check it")
    if "crit" in jws.header:
        raise SignatureRejected("Job signature header has critical extensions this agent does not support")
    key = jwks.keys.get(kid)
    if key is None:
        raise SignatureRejected(f"Job signature was made with key {kid!r}, which is not in {jwks.name}")
    if alg != key.alg:
        raise SignatureRejected(
            f"Job signature uses algorithm {alg}, but key {kid!r} in {jwks.name} is for {key.alg}"
        )
    return key


def _signature_is_valid(jws: _DetachedJws, key: VerificationKey, payload: bytes) -> bool:
    signing_input = f"{jws.encoded_header}.{_b64url_encode(payload)}".encode("ascii")
    try:
        return bool(key.jwk.Algorithm.verify(signing_input, key.jwk.key, jws.signature))
    except (ValueError, TypeError):
        return False


# ---------------------------------------------------------------------------------------
# Matrix permutation


def _check_permutation(matrix: _Matrix | None, permutation: Mapping[str, str]) -> None:
    """Refuse a permutation the signed matrix does not produce (or that it skips)."""
    def reject(why: str) -> SignatureRejected:
        return SignatureRejected(f"Job matrix permutation does not match the signed step: {why}")

    setup = (matrix.setup or {}) if matrix is not None else {}
    if matrix is None:
        if permutation:
            raise reject("the step has no matrix")
        return
    if len(permutation) != len(setup):
        raise reject(f"it has {len(permutation)} dimensions, the matrix {len(setup)}")
    unknown = [dim for dim in permutation if dim not in setup]
    if unknown:
        raise reject(f"unknown dimension {unknown[0]!r}")
    valid = all(value in setup[dim] for dim, value in permutation.items())
    for adjustment in matrix.adjustments:
        with_ = adjustment.with_ or {}
        if len(with_) != len(setup) or any(dim not in setup for dim in with_):
            raise reject("a matrix adjustment does not fit the matrix dimensions")
        if all(with_.get(dim) == value for dim, value in permutation.items()):
            # Any skip value but false or absent skips (a string gives the reason).
            if adjustment.skip is not None and adjustment.skip is not False:
                raise reject("the matrix skips this combination")
            valid = True
    if not valid:
        raise reject("it is not a combination the matrix allows")


def _matrix_replacer(permutation: Mapping[str, str]) -> Callable[[str], str]:
    replacements = {("" if dim == "" else "." + dim): value for dim, value in permutation.items()}

    def replace(text: str) -> str:
        unknown: list[str] = []

        def one(match: re.Match[str]) -> str:
            token = match.group(1) or ""
            if token not in replacements:
                unknown.append("matrix" + token)
                return ""
            return replacements[token]

        result = _MATRIX_TOKEN.sub(one, text)
        if unknown:
            lacking = ", ".join(unknown)
            raise SignatureRejected(f"Job step uses matrix values the permutation lacks: {lacking}")
        return result

    return replace


def _replace_strings(value: object, replace: Callable[[str], str]) -> object:
    """`value` with `replace` applied to every string in it, map keys included."""
    if isinstance(value, str):
        return replace(value)
    if isinstance(value, dict):
        return {replace(k): _replace_strings(v, replace) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_strings(item, replace) for item in value]
    return value


def _with_permutation(step: _Step, raw_step: Mapping[str, object],
                      permutation: Mapping[str, str]) -> _Step:
    """The step the job runs: the signed step with the job's matrix values filled in."""
    _check_permutation(step.matrix, permutation)
    if not permutation:
        return step
    replace = _matrix_replacer(permutation)
    # Fields the job does not compare are still filled in, so that a token naming a
    # dimension the permutation lacks is refused wherever it is.
    for key, value in raw_step.items():
        if key not in _MODELLED_STEP_KEYS:
            _replace_strings(value, replace)
    for secret in step.secrets:
        _replace_strings([secret.get("key"), secret.get("environment_variable")], replace)
    return _Step(
        command=replace(step.command),
        env={name: replace(value) for name, value in step.env.items()},
        plugins=[_Plugin(replace(p.source), _replace_strings(p.config, replace)) for p in step.plugins],
        matrix=step.matrix,
        secrets=step.secrets,
        has_checkout=step.has_checkout,
    )


# ---------------------------------------------------------------------------------------
# The job against the step


def _check_job_matches(step: _Step, fields: Sequence[str], job_env: Mapping[str, str]) -> None:
    # Values are not quoted: the env may hold secrets and the reason goes to the job log.
    if "command" in fields and job_env.get("BUILDKITE_COMMAND", "") != step.command:
        raise SignatureRejected("Job command (BUILDKITE_COMMAND) does not match the signed step")
    if "env" in fields:
        for name, value in step.env.items():
            if name not in job_env:
                raise SignatureRejected(f"Job environment lacks {name}, which the signed step sets")
            if job_env[name] != value:
                raise SignatureRejected(f"Job environment variable {name} does not match the signed step")
    if "plugins" in fields and not _job_plugins_match(step.plugins, job_env.get("BUILDKITE_PLUGINS", "")):
        raise SignatureRejected("Job plugins (BUILDKITE_PLUGINS) do not match the signed step")


def _job_plugins_match(plugins: Sequence[_Plugin], job_plugins: str) -> bool:
    job_empty = job_plugins.strip() in ("", "null", "[]")
    if not plugins or job_empty:
        return not plugins and job_empty
    try:
        return _jcs(json.loads(job_plugins)) == _jcs(_plugins_value(plugins))
    except ValueError:
        return False


def _parse_signature(signature: Mapping[str, object] | None) -> tuple[str, list[str], str]:
    if not signature:
        raise SignatureRejected("Job has no signature, and this agent runs only signed steps")
    alg, fields, value = (signature.get(k) for k in ("algorithm", "signed_fields", "value"))
    if not isinstance(alg, str) or not isinstance(value, str) or not value or not isinstance(fields, list) \
            or not all(isinstance(field, str) for field in fields):
        raise SignatureRejected("Job signature is malformed: it needs algorithm, signed_fields and value")
    if not fields:
        raise SignatureRejected("Job signature covers no fields")
    return alg, fields, value


def verify_step_signature(
    signature: Mapping[str, object] | None,
    *,
    job_env: Mapping[str, str],
    step: Mapping[str, object],
    repository_url: str,
    jwks: Jwks,
    matrix_permutation: Mapping[str, str] | None = None,
) -> VerifiedSignature:
    """Check a job's step signature and that the job runs what was signed.

    `signature` is the step's `signature` object, `step` the job's step, `job_env` the
    job's env, `repository_url` its BUILDKITE_REPO and `matrix_permutation` the job's
    matrix values. Raises SignatureRejected with the reason when the job must not run.
    """
    alg, fields, value = _parse_signature(signature)
    jws = _parse_detached_jws(value)
    key = _key_for(jws, jwks)
    if alg != key.alg:
        raise SignatureRejected(f"Job signature says algorithm {alg}, but its header says {key.alg}")
    try:
        parsed = _parse_step(step)
    except _MalformedStep as error:
        raise SignatureRejected(f"Job step cannot be checked: {error}") from None
    _check_field_list(fields, parsed)
    values = _signed_values(parsed, fields, repository_url=repository_url, job_env=job_env)
    try:
        payload = signed_payload(values, alg)
    except ValueError as error:
        raise SignatureRejected(f"Job step cannot be checked: {error}") from None
    if not _signature_is_valid(jws, key, payload):
        pipeline_env = [f.removeprefix(ENV_FIELD_PREFIX) for f in fields if f.startswith(ENV_FIELD_PREFIX)]
        raise SignatureRejected(
            f"Job signature verification failed with key {key.kid!r}: the step, the repository "
            f"({repository_url}) or the pipeline env ({', '.join(pipeline_env) or 'none'}) "
            "is not what was signed"
        )
    runnable = _with_permutation(parsed, step, matrix_permutation or {})
    _check_job_matches(runnable, fields, job_env)
    return VerifiedSignature(kid=key.kid, alg=key.alg)
