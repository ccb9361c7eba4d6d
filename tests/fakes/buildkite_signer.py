"""Signing Buildkite steps as `buildkite-agent pipeline upload` does, for tests.

The payload is the JCS form of `{"alg", "values"}` over the step's signed fields, the signature
a detached compact JWS (`header..signature`). Keys are generated per test (Ed25519 by default);
`public_jwks()` is what the agent's `verification_jwks_file` holds.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from runner.sources.buildkite.signature import ENV_FIELD_PREFIX, plugin_full_source, signed_payload

from .buildkite_api import make_job


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class StepSigner:
    kid: str = "hpc-test"
    alg: str = "EdDSA"

    def __post_init__(self) -> None:
        if self.alg == "EdDSA":
            self._private: Any = ed25519.Ed25519PrivateKey.generate()
        elif self.alg == "ES256":
            self._private = ec.generate_private_key(ec.SECP256R1())
        else:
            raise ValueError(f"unsupported test algorithm {self.alg}")

    def public_jwk(self) -> dict[str, Any]:
        algorithm = jwt.get_algorithm_by_name(self.alg)
        jwk = json.loads(algorithm.to_jwk(self._private.public_key()))
        return {**jwk, "kid": self.kid, "alg": self.alg, "use": "sig"}

    def public_jwks(self) -> str:
        return json.dumps({"keys": [self.public_jwk()]})

    def sign_values(self, values: Mapping[str, Any], *, header_alg: str | None = None) -> dict[str, Any]:
        header = {"alg": header_alg or self.alg, "kid": self.kid}
        payload = signed_payload(values, self.alg)
        encoded_header = _b64(json.dumps(header, separators=(",", ":")).encode())
        signing_input = f"{encoded_header}.{_b64(payload)}".encode()
        algorithm = jwt.get_algorithm_by_name(self.alg)
        signature = algorithm.sign(signing_input, self._private)
        return {"algorithm": self.alg, "signed_fields": sorted(values),
                "value": f"{encoded_header}..{_b64(signature)}"}

    def sign_step(self, step: Mapping[str, Any], repository_url: str,
                  pipeline_env: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The `signature` object of a command step, as the uploader signs it."""
        plugins = step.get("plugins") or []
        signed_plugins = []
        for plugin in plugins:
            ((source, config),) = plugin.items() if isinstance(plugin, Mapping) else ((plugin, None),)
            if isinstance(config, dict | list) and not config:
                config = None
            signed_plugins.append({plugin_full_source(source): config})
        step_env = dict(step.get("env") or {})
        values: dict[str, Any] = {
            "command": step.get("command", ""),
            "env": step_env or None,
            "plugins": signed_plugins or None,
            "matrix": None,
            "repository_url": repository_url,
        }
        for name, value in (pipeline_env or {}).items():
            if name not in step_env:
                values[ENV_FIELD_PREFIX + name] = value
        return self.sign_values(values)


def plugins_env(plugins: list[Mapping[str, Any]]) -> str:
    """`BUILDKITE_PLUGINS` as the backend sends it: full sources, one-key objects."""
    out = []
    for plugin in plugins:
        ((source, config),) = plugin.items()
        out.append({plugin_full_source(source): config})
    return json.dumps(out)


def signed_job(signer: StepSigner | None, command: str, *, repo: str, commit: str = "HEAD",
               plugins: list[Mapping[str, Any]] | None = None, step_env: Mapping[str, str] | None = None,
               pipeline_env: Mapping[str, str] | None = None, env: Mapping[str, str] | None = None,
               **fields: Any) -> dict[str, Any]:
    """A job whose step is signed by `signer` (None: unsigned), with the env the backend derives."""
    step: dict[str, Any] = {"command": command}
    if plugins:
        step["plugins"] = plugins
    if step_env:
        step["env"] = dict(step_env)
    job_env = {**(pipeline_env or {}), **(step_env or {}),
               "BUILDKITE_PLUGINS": plugins_env(plugins) if plugins else "", **(env or {})}
    signature = signer.sign_step(step, repo, pipeline_env) if signer is not None else None
    return make_job(command, repo=repo, commit=commit, env=job_env, step=step, signature=signature, **fields)
