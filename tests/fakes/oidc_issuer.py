"""An OIDC issuer as CI systems run theirs: discovery, a key set (JWKS) and ID tokens it mints.

A real aiohttp server on 127.0.0.1 (ephemeral port) serves ``/.well-known/openid-configuration``
and the key set at ``/.well-known/jwks`` (where GitHub and Buildkite serve theirs), with RSA and EC
keys under several key ids. ``mint(kind, **overrides)`` makes tokens shaped as the vendors document
them:

* GitHub Actions (docs.github.com, "OpenID Connect reference"): RS256, header ``typ``/``alg``/
  ``x5t``/``kid``; claims ``jti sub aud ref sha repository repository_owner actor_id
  repository_visibility repository_id repository_owner_id run_id run_number run_attempt
  runner_environment actor workflow workflow_ref workflow_sha head_ref base_ref event_name ref_type
  job_workflow_ref job_workflow_sha iss nbf exp iat`` (and ``environment`` when the job has one);
  ids are strings; ``sub`` is
  ``repo:ORG/REPO:ref:refs/heads/BRANCH`` (``...:pull_request`` for a pull request, ``...:environment:
  NAME`` when the job has an environment); ``aud`` defaults to ``https://github.com/ORG``; ``nbf``
  is ten minutes before ``iat`` and ``exp`` five minutes after it.
* Buildkite (buildkite.com/docs, ``buildkite-agent oidc request-token``): RS256; claims ``iss sub
  aud iat nbf exp organization_slug pipeline_slug build_number build_branch build_tag build_commit
  step_key job_id agent_id build_source runner_environment``; ``sub`` is
  ``organization:ORG:pipeline:PIPELINE:ref:REF:commit:SHA:step:STEP_KEY``; ``aud`` defaults to
  ``https://buildkite.com/ORG``; ``build_tag`` is null on a branch build; five minutes of life.
* GitLab CI ``id_tokens`` (docs.gitlab.com, "OpenID Connect (OIDC) Authentication Using ID
  Tokens"): RS256; claims ``namespace_id namespace_path project_id project_path user_id user_login
  user_email pipeline_id pipeline_source job_id ref ref_type ref_path ref_protected environment
  runner_id runner_environment sha jti iss iat nbf exp sub aud``; ids and booleans are strings;
  ``sub`` is ``project_path:GROUP/PROJECT:ref_type:TYPE:ref:REF``; the issuer is the instance's URL.
* A site's identity provider (kind ``generic``, as Keycloak issues them): ``sub`` a UUID,
  ``preferred_username``, ``email``, ``groups``.

``exp - iat`` is 300 for every kind. Attacks are knobs of ``mint``: ``forged=True`` (signed by a key
the issuer never published, under a published key id), ``alg="none"`` (no signature),
``alg="HS256"`` (an HMAC keyed with the published public key: the algorithm confusion attack),
``kid=`` an unknown id, ``iss=``/``aud=`` another issuer or audience, ``now=`` in the past
(expired), ``nbf=`` in the future. ``rotate()`` publishes a new key and signs with it from then on;
``retire(kid)`` withdraws one. ``requests`` records every path asked for, so a test sees how often
the issuer was asked for its keys; ``jwks_override`` replaces the key set's body (an oversized or
broken answer), ``stall_key_set`` holds its answer back until the emulator closes (a client's
timeout); ``jwks_uri_override`` and ``discovery_issuer_override`` change what discovery says.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Literal

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

Kind = Literal["github", "buildkite", "gitlab", "generic"]
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

LIFETIME = 300
GITHUB_NOT_BEFORE = 600
DROP = object()   # an override that leaves a claim out

COMMIT = "9f3182061f1e2cca4702c368cbc039b7dc9d4485"


@functools.lru_cache(maxsize=16)
def _rsa_key(index: int) -> rsa.RSAPrivateKey:
    # Shared by every emulator of the test process: generating RSA keys is slow.
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@functools.lru_cache(maxsize=16)
def _ec_key(index: int) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _public_jwk(kid: str, key: PrivateKey) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        jwk: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
        jwk["alg"] = "RS256"
    else:
        jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
        jwk["alg"] = "ES256"
    jwk.update(kid=kid, use="sig")
    return jwk


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class OidcIssuerEmulator:
    """One issuer at ``url``; keys ``rsa-1`` (signing RS256), ``rsa-2`` and ``ec-1`` (signing ES256)."""

    def __init__(self, *, path: str = "", discovery: bool = True) -> None:
        self._path = path.rstrip("/")
        self._discovery = discovery
        self._keys: dict[str, PrivateKey] = {"rsa-1": _rsa_key(0), "rsa-2": _rsa_key(1), "ec-1": _ec_key(0)}
        self.published: list[str] = ["rsa-1", "rsa-2", "ec-1"]
        self.signing: dict[str, str] = {"RS256": "rsa-1", "ES256": "ec-1"}
        self._rotations = 0
        self.requests: list[str] = []
        self.jwks_override: bytes | None = None
        self.stall_key_set = False
        self._closing = asyncio.Event()
        self.jwks_uri_override: str | None = None
        self.discovery_issuer_override: str | None = None
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    # ---------------------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> OidcIssuerEmulator:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get(f"{self._path}/.well-known/openid-configuration", self._h_discovery)
        app.router.add_get(f"{self._path}/.well-known/jwks", self._h_jwks)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = int(self._runner.addresses[0][1])

    async def close(self) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        """The issuer, as tokens' ``iss`` and an ``[[oidc]]`` table's ``issuer`` spell it."""
        assert self._port is not None, "start the emulator first"
        return f"http://127.0.0.1:{self._port}{self._path}"

    @property
    def jwks_uri(self) -> str:
        return self.url + "/.well-known/jwks"

    def key_set_requests(self) -> int:
        return sum(1 for path in self.requests if path.endswith("/jwks"))

    # ---------------------------------------------------------------------------- keys

    def rotate(self, alg: Literal["RS256", "ES256"] = "RS256") -> str:
        """Publish a new key for `alg` and sign with it from now on; its key id is returned."""
        self._rotations += 1
        kid = f"{'rsa' if alg == 'RS256' else 'ec'}-rotated-{self._rotations}"
        self._keys[kid] = _rsa_key(1 + self._rotations) if alg == "RS256" else _ec_key(self._rotations)
        self.published.append(kid)
        self.signing[alg] = kid
        return kid

    def retire(self, kid: str) -> None:
        self.published.remove(kid)

    def key_set(self) -> dict[str, Any]:
        return {"keys": [_public_jwk(kid, self._keys[kid]) for kid in self.published]}

    # ---------------------------------------------------------------------------- handlers

    async def _h_discovery(self, request: web.Request) -> web.Response:
        self.requests.append(request.path)
        if not self._discovery:
            raise web.HTTPNotFound()
        return web.json_response({
            "issuer": self.discovery_issuer_override or self.url,
            "jwks_uri": self.jwks_uri_override or self.jwks_uri,
            "subject_types_supported": ["public", "pairwise"],
            "response_types_supported": ["id_token"],
            "claims_supported": ["sub", "aud", "exp", "iat", "iss", "jti", "nbf", "ref", "repository"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "scopes_supported": ["openid"],
        })

    async def _h_jwks(self, request: web.Request) -> web.Response:
        self.requests.append(request.path)
        if self.stall_key_set:
            await self._closing.wait()
        if self.jwks_override is not None:
            return web.Response(body=self.jwks_override, content_type="application/json")
        return web.json_response(self.key_set())

    # ---------------------------------------------------------------------------- tokens

    def claims(self, kind: Kind = "github", *, now: float | None = None, **overrides: Any) -> dict[str, Any]:
        """The claims of a token of `kind` as its vendor documents them, with `overrides` (``DROP``
        leaves a claim out)."""
        issued = int(time.time() if now is None else now)
        shaped, derive = _SHAPES[kind]
        claims = shaped(self.url, issued)
        claims.update(overrides)
        claims.update({name: value for name, value in derive(claims).items() if name not in overrides})
        return {name: value for name, value in claims.items() if value is not DROP}

    def mint(self, kind: Kind = "github", *, alg: str = "RS256", kid: str | None = None, forged: bool = False,
             header: Mapping[str, Any] | None = None, now: float | None = None, **overrides: Any) -> str:
        """A token of `kind`, signed with the current key for `alg` (see the module's attack knobs)."""
        if kind == "github" and alg == "RS256":
            # GitHub's header also carries the key's certificate thumbprint.
            kid = kid or self.signing[alg]
            header = {"x5t": _b64(hashlib.sha1(kid.encode()).digest()), **(header or {})}
        return self.sign(self.claims(kind, now=now, **overrides), alg=alg, kid=kid, forged=forged,
                         header=header)

    def sign(self, claims: Mapping[str, Any], *, alg: str = "RS256", kid: str | None = None,
             forged: bool = False, header: Mapping[str, Any] | None = None) -> str:
        if alg in ("none", "HS256"):
            kid = kid or self.signing["RS256"]
            head = {"typ": "JWT", "alg": alg, "kid": kid, **(header or {})}
            signed = f"{_b64(json.dumps(head).encode())}.{_b64(json.dumps(dict(claims)).encode())}"
            if alg == "none":
                return signed + "."
            # The confusion attack: the published public key used as a shared HMAC secret.
            secret = json.dumps(_public_jwk(kid, self._keys[kid])).encode()
            return f"{signed}.{_b64(hmac.new(secret, signed.encode(), hashlib.sha256).digest())}"
        kid = kid or self.signing[alg]
        key_type = rsa.RSAPrivateKey if alg == "RS256" else ec.EllipticCurvePrivateKey
        if forged:
            key: PrivateKey = _rsa_key(15) if alg == "RS256" else _ec_key(15)
        elif isinstance(self._keys.get(kid), key_type):
            key = self._keys[kid]
        else:
            # A key id the issuer never published, or one of a key of another type: the token is
            # signed by the issuer's current key for `alg` all the same.
            key = self._keys[self.signing[alg]]
        head = {"typ": "JWT", "kid": kid, **(header or {})}
        return jwt.encode(dict(claims), key, algorithm=alg, headers=head)


# ---------------------------------------------------------------------------------------------
# claims as each vendor documents them; `sub` and the default `aud` follow the other claims


def _github(issuer: str, issued: int) -> dict[str, Any]:
    return {
        "jti": str(uuid.uuid4()),
        "ref": "refs/heads/main",
        "sha": COMMIT,
        "repository": "octo-org/octo-repo",
        "repository_owner": "octo-org",
        "actor_id": "12",
        "repository_visibility": "private",
        "repository_id": "74",
        "repository_owner_id": "65",
        "run_id": "5893487610",
        "run_number": "10",
        "run_attempt": "2",
        "runner_environment": "github-hosted",
        "actor": "octocat",
        "workflow": "cluster-tests",
        "workflow_ref": "octo-org/octo-repo/.github/workflows/hpc.yml@refs/heads/main",
        "workflow_sha": COMMIT,
        "head_ref": "",
        "base_ref": "",
        "event_name": "push",
        "ref_type": "branch",
        "job_workflow_ref": "octo-org/octo-repo/.github/workflows/hpc.yml@refs/heads/main",
        "job_workflow_sha": COMMIT,
        "iss": issuer,
        "nbf": issued - GITHUB_NOT_BEFORE,
        "exp": issued + LIFETIME,
        "iat": issued,
    }


def _github_derived(claims: Mapping[str, Any]) -> dict[str, Any]:
    def escaped(value: Any) -> str:
        return str(value).replace(":", "%3A")
    sub = f"repo:{escaped(claims.get('repository'))}"
    if claims.get("environment"):
        sub += f":environment:{escaped(claims['environment'])}"
    elif claims.get("event_name") == "pull_request":
        sub += ":pull_request"
    else:
        sub += f":ref:{escaped(claims.get('ref'))}"
    return {"sub": sub, "aud": f"https://github.com/{claims.get('repository_owner')}"}


def _buildkite(issuer: str, issued: int) -> dict[str, Any]:
    return {
        "iss": issuer,
        "iat": issued,
        "nbf": issued,
        "exp": issued + LIFETIME,
        "organization_slug": "acme-inc",
        "pipeline_slug": "super-duper-app",
        "build_number": 1,
        "build_branch": "main",
        "build_tag": None,
        "build_commit": COMMIT,
        "step_key": "build",
        "job_id": "0184990a-477b-4fa8-9968-496074483cee",
        "agent_id": "0184990a-4782-42b5-afc1-16715b10b8ff",
        "build_source": "ui",
        "runner_environment": "buildkite-hosted",
    }


def _buildkite_derived(claims: Mapping[str, Any]) -> dict[str, Any]:
    tag = claims.get("build_tag")
    ref = f"refs/tags/{tag}" if tag else f"refs/heads/{claims.get('build_branch')}"
    organization = claims.get("organization_slug")
    return {"sub": f"organization:{organization}:pipeline:{claims.get('pipeline_slug')}:ref:{ref}"
                   f":commit:{claims.get('build_commit')}:step:{claims.get('step_key')}",
            "aud": f"https://buildkite.com/{organization}"}


def _gitlab(issuer: str, issued: int) -> dict[str, Any]:
    return {
        "namespace_id": "72",
        "namespace_path": "my-group",
        "project_id": "20",
        "project_path": "my-group/my-project",
        "user_id": "1",
        "user_login": "sample-user",
        "user_email": "sample-user@example.com",
        "pipeline_id": "574",
        "pipeline_source": "push",
        "job_id": "302",
        "ref": "feature-branch-1",
        "ref_type": "branch",
        "ref_path": "refs/heads/feature-branch-1",
        "ref_protected": "false",
        "environment": "test-environment2",
        "runner_id": 1,
        "runner_environment": "self-hosted",
        "sha": "714a629c0b401fdce83e847fc9589983fc6f46bc",
        "jti": "235b3a54-b797-45c7-ae9a-f72d7bc6ef5b",
        "iss": issuer,
        "iat": issued,
        "nbf": issued - 5,
        "exp": issued + LIFETIME,
        "aud": "https://vault.example.com",
    }


def _gitlab_derived(claims: Mapping[str, Any]) -> dict[str, Any]:
    return {"sub": f"project_path:{claims.get('project_path')}:ref_type:{claims.get('ref_type')}"
                   f":ref:{claims.get('ref')}"}


def _generic(issuer: str, issued: int) -> dict[str, Any]:
    return {
        "iss": issuer,
        "sub": "f7c9a3e2-5b1d-4c8e-9a6f-2d4b8e1c7a90",
        "aud": "hpc-portal",
        "exp": issued + LIFETIME,
        "iat": issued,
        "auth_time": issued - 30,
        "jti": str(uuid.uuid4()),
        "typ": "ID",
        "azp": "hpc-portal",
        "preferred_username": "alice",
        "email": "alice@example.org",
        "email_verified": True,
        "groups": ["hpc-users", "ocean-modellers"],
    }


def _nothing_derived(claims: Mapping[str, Any]) -> dict[str, Any]:
    return {}


_SHAPES = {"github": (_github, _github_derived), "buildkite": (_buildkite, _buildkite_derived),
           "gitlab": (_gitlab, _gitlab_derived), "generic": (_generic, _nothing_derived)}
