"""Buildkite step signatures: the recorded vectors, and every way a job must be refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Mapping

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from runner.sources.buildkite.signature import (
    Jwks,
    JwksError,
    SignatureRejected,
    VerifiedSignature,
    load_jwks,
    plugin_full_source,
    signed_payload,
    verify_step_signature,
)

# Test-only keys and values published with Buildkite's go-pipeline and agent tests.
KID = "TEST_DO_NOT_USE"
PRIVATE_D = "4Gyw8sTl6pVvbsI5iAbPE1LHvW68BnPf6wUedgVsnag"
PUBLIC_X = "1qWvxwM10mDkEp1iKU2ODZqaxYkIW6qCiuaJEV1JWrY"
PUBLIC_JWKS = json.dumps(
    {"keys": [{"alg": "EdDSA", "crv": "Ed25519", "kid": KID, "kty": "OKP", "use": "sig", "x": PUBLIC_X}]}
)
EDDSA_HEADER = "eyJhbGciOiJFZERTQSIsImtpZCI6IlRFU1RfRE9fTk9UX1VTRSJ9"
REPO = "git@github.com:buildkite/agent.git"
BASE_FIELDS = ["command", "env", "matrix", "plugins", "repository_url"]

V1_PAYLOAD = (
    '{"alg":"EdDSA","values":{"command":"llamas","env":{"CONTEXT":"cats","DEPLOY":"0"},"matrix":null,'
    '"plugins":[{"github.com/buildkite-plugins/some-plugin-buildkite-plugin#v1.0.0":null},'
    '{"github.com/buildkite-plugins/another-plugin-buildkite-plugin#v3.4.5":{"llama":"Kuzco"}}],'
    '"repository_url":"fake-repo"}}'
)
V1_VALUE = (
    EDDSA_HEADER + "..VvC3kr18HKN8me3NvSJcG6m-Kco54n-088kq8bqF5eNIZVqbtuMhIzw_pp8UltASUvUcEypPnZJ3eYjzOeIVDQ"
)
V1_STEP: dict[str, object] = {
    "command": "llamas",
    "plugins": [{"some-plugin#v1.0.0": None}, {"another-plugin#v3.4.5": {"llama": "Kuzco"}}],
    "env": {"CONTEXT": "cats", "DEPLOY": "0"},
}
V1_PLUGINS_ENV = json.dumps([
    {"github.com/buildkite-plugins/some-plugin-buildkite-plugin#v1.0.0": None},
    {"github.com/buildkite-plugins/another-plugin-buildkite-plugin#v3.4.5": {"llama": "Kuzco"}},
])
V1_JOB_ENV = {"CONTEXT": "cats", "DEPLOY": "0", "MISC": "llama drama", "BUILDKITE_COMMAND": "llamas",
              "BUILDKITE_PLUGINS": V1_PLUGINS_ENV, "BUILDKITE_REPO": "fake-repo"}

V2_PUBLIC_PEM = b"""-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAETbursv8d9C1Fa/89/d2FqSo2sw/z
eke9F0IWiOKGJuuXENVcp8U5FfxStK9sKVH4tPMCpVNPNr1pMa/3NFVlLA==
-----END PUBLIC KEY-----
"""
V2_VALUE = ("eyJhbGciOiJFUzI1NiJ9..Op5KSww95n5s1b9jz0Me5UGqUQPcHzEIFvkWTB_yEv6qEDnnFUO1XsC5592fQoAcB0VnP"
            "nHaK31iSiCypREIdA")

SOME_PLUGIN = "github.com/buildkite-plugins/some-buildkite-plugin#v1.0.0"

V3_PAYLOAD = (
    '{"alg":"EdDSA","values":{"command":"echo hello world","env":{"DEPLOY":"1"},"matrix":null,'
    '"plugins":[{"github.com/buildkite-plugins/some-buildkite-plugin#v1.0.0":{"key":"value"}}],'
    '"repository_url":"git@github.com:buildkite/agent.git"}}'
)
V3_VALUE = (
    EDDSA_HEADER + "..19RrgTmhGzvIN4zwZuUmHj4DqYvUMNnS6iFhTFmYJhV6mDPJdklbVMCThZST7xOczLr1gcmO15eflxHzh5imDA"
)
V3_STEP: dict[str, object] = {
    "command": "echo hello world", "plugins": [{"some#v1.0.0": {"key": "value"}}], "env": {"DEPLOY": "1"},
}
V3_JOB_ENV = {"BUILDKITE_COMMAND": "echo hello world", "DEPLOY": "1", "BUILDKITE_REPO": REPO,
              "BUILDKITE_PLUGINS": json.dumps([{SOME_PLUGIN: {"key": "value"}}])}

V4_FIELDS = ["command", "env", "env::DEPLOY", "matrix", "plugins", "repository_url"]
V4_PAYLOAD = (
    '{"alg":"EdDSA","values":{"command":"echo hello world","env":null,"env::DEPLOY":"0","matrix":null,'
    '"plugins":null,"repository_url":"git@github.com:buildkite/agent.git"}}'
)
V4_VALUE = (
    EDDSA_HEADER + "..XMxvO2d4W9GXRFQS9xr_eaEqFuGkYauhT-fQ-RQMw6Z3hgSI-X0EPQbdg1dWtzsrb4g5AY3XOa38vNA8omwnAQ"
)
V4_STEP: dict[str, object] = {"command": "echo hello world"}
V4_JOB_ENV = {"BUILDKITE_COMMAND": "echo hello world", "DEPLOY": "0", "BUILDKITE_REPO": REPO}

V5_PAYLOAD = (
    '{"alg":"EdDSA","values":{"command":"echo {{matrix.greeting}} {{matrix.object}}",'
    '"env":{"MESSAGE":"{{matrix.greeting}} {{matrix.object}}"},"env::DEPLOY":"0",'
    '"matrix":{"setup":{"greeting":["hello","今日は"],"object":["world","47"]}},'
    '"plugins":[{"github.com/buildkite-plugins/some-buildkite-plugin#v1.0.0":'
    '{"message":"{{matrix.greeting}} {{matrix.object}}"}}],'
    '"repository_url":"git@github.com:buildkite/agent.git"}}'
)
V5_VALUE = (
    EDDSA_HEADER + "..GvhIke_-AgoaAnGWu_7LDsaGLZ7vvRWAvIIRq0fb7JxQCXAsZPUWsIctwhEyupzR13O07Ypb_uQL9ILK5gKjAg"
)
V5_STEP: dict[str, object] = {
    "command": "echo {{matrix.greeting}} {{matrix.object}}",
    "plugins": [{"some#v1.0.0": {"message": "{{matrix.greeting}} {{matrix.object}}"}}],
    "env": {"MESSAGE": "{{matrix.greeting}} {{matrix.object}}"},
    "matrix": {"setup": {"greeting": ["hello", "今日は"], "object": ["world", 47]}},
}
V5_PERMUTATION = {"greeting": "hello", "object": "world"}
V5_JOB_ENV = {"BUILDKITE_COMMAND": "echo hello world", "MESSAGE": "hello world", "DEPLOY": "0",
              "BUILDKITE_REPO": REPO,
              "BUILDKITE_PLUGINS": json.dumps([{SOME_PLUGIN: {"message": "hello world"}}])}

V6_FIELDS = [*V4_FIELDS, "secrets"]
V6_PAYLOAD = (
    '{"alg":"EdDSA","values":{"command":"echo hello secrets","env":null,"env::DEPLOY":"0","matrix":null,'
    '"plugins":null,"repository_url":"git@github.com:buildkite/agent.git","secrets":['
    '{"environment_variable":"DATABASE_URL","key":"DATABASE_URL"},'
    '{"environment_variable":"API_TOKEN","key":"API_TOKEN"}]}}'
)
V6_VALUE = (
    EDDSA_HEADER + "..GEUbszXV-IyZnwAdIa-UVtL5qwn2Hr-Nc7U6LUCr2nL4WHplpKnFQMlkWtfB0EkMnbW_BbBIEVLKKUmJh8KMAA"
)
V6_STEP: dict[str, object] = {
    "command": "echo hello secrets",
    "secrets": [{"key": "DATABASE_URL", "environment_variable": "DATABASE_URL"},
                {"key": "API_TOKEN", "environment_variable": "API_TOKEN"}],
}
V6_JOB_ENV = {"BUILDKITE_COMMAND": "echo hello secrets", "DEPLOY": "0", "BUILDKITE_REPO": REPO}

HS256_VALUES = {  # derived for the agent's integration fixtures, key b"llamas"
    "job": (V3_PAYLOAD, "KGsjV1z9bq_DfXu95krWVbxlGtbAhL1Q4SC7KCyXJ60"),
    "jobWithNoPlugins": (V4_PAYLOAD, "dkRQ2MEgcwTP2eBP8On7Mn1G01hchfYJifNDGZt3tJY"),
    "jobWithMatrix": (V5_PAYLOAD, "TLnzfWnk0V6hSoVUsI6ybm41gb05Gk7Mb4Yhp6tKhJY"),
    "jobWithSecrets": (V6_PAYLOAD, "JMRrxLjARztmgwnwhJ-4DKgAdWV8Q4tkkfYFslPt2jE"),
}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def jwks() -> Jwks:
    return load_jwks(PUBLIC_JWKS, name="/etc/hpc-runner/buildkite.jwks")


def sig(value: str, fields: list[str] = BASE_FIELDS, alg: str = "EdDSA") -> dict[str, object]:
    return {"algorithm": alg, "signed_fields": fields, "value": value}


def sign(values: Mapping[str, object], *, header: Mapping[str, str] | None = None) -> dict[str, object]:
    """A signature made with the test key, for cases no recorded vector covers."""
    header = header or {"alg": "EdDSA", "kid": KID}
    encoded = b64url(json.dumps(header, separators=(",", ":")).encode())
    signing_input = f"{encoded}.{b64url(signed_payload(values, header['alg']))}".encode()
    key = ed25519.Ed25519PrivateKey.from_private_bytes(b64url_decode(PRIVATE_D))
    return sig(f"{encoded}..{b64url(key.sign(signing_input))}", sorted(values), header["alg"])


def verify(signature: Mapping[str, object] | None, step: Mapping[str, object], env: Mapping[str, str],
           *, keys: Jwks | None = None, permutation: Mapping[str, str] | None = None) -> VerifiedSignature:
    return verify_step_signature(signature, job_env=env, step=step, repository_url=env["BUILDKITE_REPO"],
                                 jwks=keys or jwks(), matrix_permutation=permutation)


def rejection(signature: Mapping[str, object] | None, step: Mapping[str, object], env: Mapping[str, str],
              **kwargs: object) -> str:
    with pytest.raises(SignatureRejected) as caught:
        verify(signature, step, env, **kwargs)  # type: ignore[arg-type]
    return caught.value.reason


# --- canonical payloads ------------------------------------------------------------------------


def v1_values() -> dict[str, object]:
    return {
        "command": "llamas", "env": {"CONTEXT": "cats", "DEPLOY": "0"}, "matrix": None,
        "plugins": json.loads(V1_PLUGINS_ENV), "repository_url": "fake-repo",
    }


def test_payload_matches_upstream_eddsa_vector_byte_for_byte() -> None:
    assert signed_payload(v1_values(), "EdDSA") == V1_PAYLOAD.encode()


def test_payload_for_es256_differs_only_in_alg() -> None:
    assert signed_payload(v1_values(), "ES256") == V1_PAYLOAD.replace('"EdDSA"', '"ES256"').encode()


def test_payload_keeps_non_ascii_raw_and_sorts_keys() -> None:
    values = {"matrix": {"setup": {"object": ["world", "47"], "greeting": ["hello", "今日は"]}},
              "command": "x"}
    assert signed_payload(values, "EdDSA") == (
        '{"alg":"EdDSA","values":{"command":"x","matrix":{"setup":{"greeting":["hello","今日は"],'
        '"object":["world","47"]}}}}'
    ).encode()


def test_payload_formats_numbers_as_jcs_does() -> None:
    assert signed_payload({"n": [1.0, 1e-7, 2**60]}, "EdDSA") == (
        b'{"alg":"EdDSA","values":{"n":[1,1e-7,1152921504606847000]}}'
    )


@pytest.mark.parametrize(("name", "payload", "mac"), [(n, p, m) for n, (p, m) in HS256_VALUES.items()])
def test_hs256_agent_fixture_vectors_sign_the_same_payloads(name: str, payload: str, mac: str) -> None:
    header = "eyJhbGciOiJIUzI1NiIsImtpZCI6ImxsYW1hcyJ9"
    hs_payload = payload.replace('"alg":"EdDSA"', '"alg":"HS256"').encode()
    digest = hmac.new(b"llamas", f"{header}.{b64url(hs_payload)}".encode(), hashlib.sha256).digest()
    assert b64url(digest) == mac, name


# --- recorded vectors verify ---------------------------------------------------------------------


def test_upstream_eddsa_vector_verifies() -> None:
    assert verify(sig(V1_VALUE), V1_STEP, V1_JOB_ENV) == VerifiedSignature(kid=KID, alg="EdDSA")


def test_step_env_shadowing_pipeline_env_vector_verifies() -> None:
    assert verify(sig(V3_VALUE), V3_STEP, V3_JOB_ENV).kid == KID


def test_pipeline_env_vector_verifies() -> None:
    assert verify(sig(V4_VALUE, V4_FIELDS), V4_STEP, V4_JOB_ENV).kid == KID


def test_matrix_vector_verifies_with_its_permutation() -> None:
    assert verify(sig(V5_VALUE, V4_FIELDS), V5_STEP, V5_JOB_ENV, permutation=V5_PERMUTATION).kid == KID


def test_secrets_vector_verifies() -> None:
    assert verify(sig(V6_VALUE, V6_FIELDS), V6_STEP, V6_JOB_ENV).kid == KID


@pytest.mark.parametrize(("payload", "value"), [
    (V3_PAYLOAD, V3_VALUE), (V4_PAYLOAD, V4_VALUE), (V5_PAYLOAD, V5_VALUE), (V6_PAYLOAD, V6_VALUE),
])
def test_recorded_payloads_are_what_the_recorded_values_sign(payload: str, value: str) -> None:
    header, _, signature = value.partition("..")
    public = ed25519.Ed25519PublicKey.from_public_bytes(b64url_decode(PUBLIC_X))
    public.verify(b64url_decode(signature), f"{header}.{b64url(payload.encode())}".encode())


def test_kms_es256_vector_is_valid_but_refused_without_a_key_id() -> None:
    # The recorded KMS signature is good over the ES256 payload...
    header, _, signature = V2_VALUE.partition("..")
    raw = b64url_decode(signature)
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    public = load_pem_public_key(V2_PUBLIC_PEM)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    signing_input = f"{header}.{b64url(signed_payload(v1_values(), 'ES256'))}".encode()
    public.verify(der, signing_input, ec.ECDSA(hashes.SHA256()))
    with pytest.raises(InvalidSignature):
        public.verify(der, signing_input + b"x", ec.ECDSA(hashes.SHA256()))
    # ...but names no key, so no JWKS key can be chosen for it.
    assert "names no key id" in rejection(sig(V2_VALUE, alg="ES256"), V1_STEP, V1_JOB_ENV)


# --- tampering --------------------------------------------------------------------------------


def test_tampered_job_command_is_refused() -> None:
    reason = rejection(sig(V3_VALUE), V3_STEP, {**V3_JOB_ENV, "BUILDKITE_COMMAND": "echo pwned"})
    assert reason == "Job command (BUILDKITE_COMMAND) does not match the signed step"


def test_tampered_step_command_fails_the_signature() -> None:
    reason = rejection(sig(V3_VALUE), {**V3_STEP, "command": "echo pwned"},
                       {**V3_JOB_ENV, "BUILDKITE_COMMAND": "echo pwned"})
    assert reason.startswith("Job signature verification failed with key 'TEST_DO_NOT_USE'")


def test_tampered_job_env_is_refused() -> None:
    reason = rejection(sig(V3_VALUE), V3_STEP, {**V3_JOB_ENV, "DEPLOY": "crimes"})
    assert reason == "Job environment variable DEPLOY does not match the signed step"
    reason = rejection(sig(V3_VALUE), V3_STEP, {k: v for k, v in V3_JOB_ENV.items() if k != "DEPLOY"})
    assert reason == "Job environment lacks DEPLOY, which the signed step sets"


def test_tampered_pipeline_env_fails_the_signature() -> None:
    reason = rejection(sig(V4_VALUE, V4_FIELDS), V4_STEP, {**V4_JOB_ENV, "DEPLOY": "crimes"})
    assert "pipeline env (DEPLOY)" in reason and "crimes" not in reason
    without = {k: v for k, v in V4_JOB_ENV.items() if k != "DEPLOY"}
    reason = rejection(sig(V4_VALUE, V4_FIELDS), V4_STEP, without)
    assert reason == "Job signature covers pipeline env var DEPLOY, but the job's environment lacks it"


def test_tampered_plugins_are_refused() -> None:
    env = {**V3_JOB_ENV, "BUILDKITE_PLUGINS": json.dumps([{SOME_PLUGIN: {"key": "evil"}}])}
    assert rejection(sig(V3_VALUE), V3_STEP, env) == (
        "Job plugins (BUILDKITE_PLUGINS) do not match the signed step"
    )
    assert rejection(sig(V3_VALUE), V3_STEP, {**V3_JOB_ENV, "BUILDKITE_PLUGINS": "[]"}) == (
        "Job plugins (BUILDKITE_PLUGINS) do not match the signed step"
    )


def test_plugins_compare_as_canonical_json() -> None:
    spaced = json.dumps([{SOME_PLUGIN: {"key": "value"}}], indent=2)
    assert verify(sig(V3_VALUE), V3_STEP, {**V3_JOB_ENV, "BUILDKITE_PLUGINS": spaced}).kid == KID
    assert verify(sig(V4_VALUE, V4_FIELDS), V4_STEP, {**V4_JOB_ENV, "BUILDKITE_PLUGINS": "null"}).kid == KID


def test_tampered_repository_fails_the_signature_and_names_it() -> None:
    env = {**V3_JOB_ENV, "BUILDKITE_REPO": "https://github.com/haxors/agent.git"}
    reason = rejection(sig(V3_VALUE), V3_STEP, env)
    assert reason.startswith("Job signature verification failed")
    assert "(https://github.com/haxors/agent.git)" in reason


def test_matrix_permutation_outside_the_matrix_is_refused() -> None:
    env = {**V5_JOB_ENV, "BUILDKITE_COMMAND": "echo goodbye mister anderson",
           "MESSAGE": "goodbye mister anderson"}
    reason = rejection(sig(V5_VALUE, V4_FIELDS), V5_STEP, env,
                       permutation={"greeting": "goodbye", "object": "mister anderson"})
    assert reason == ("Job matrix permutation does not match the signed step: "
                      "it is not a combination the matrix allows")
    assert "dimensions" in rejection(sig(V5_VALUE, V4_FIELDS), V5_STEP, V5_JOB_ENV)


def test_matrix_env_that_does_not_follow_the_permutation_is_refused() -> None:
    reason = rejection(sig(V5_VALUE, V4_FIELDS), V5_STEP, {**V5_JOB_ENV, "MESSAGE": "hello pwned"},
                       permutation=V5_PERMUTATION)
    assert reason == "Job environment variable MESSAGE does not match the signed step"


def test_matrix_value_in_other_dimension_is_accepted() -> None:
    env = {**V5_JOB_ENV, "BUILDKITE_COMMAND": "echo 今日は 47", "MESSAGE": "今日は 47",
           "BUILDKITE_PLUGINS": json.dumps([{SOME_PLUGIN: {"message": "今日は 47"}}])}
    assert verify(sig(V5_VALUE, V4_FIELDS), V5_STEP, env, permutation={"greeting": "今日は", "object": "47"})


# --- keys ---------------------------------------------------------------------------------------


def test_signature_from_a_different_key_with_the_same_id_fails() -> None:
    other = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    keys = load_jwks(PUBLIC_JWKS.replace(PUBLIC_X, b64url(other)), name="other.jwks")
    assert rejection(sig(V3_VALUE), V3_STEP, V3_JOB_ENV, keys=keys).startswith(
        "Job signature verification failed with key 'TEST_DO_NOT_USE'"
    )


def test_signature_from_a_key_not_in_the_jwks_is_refused() -> None:
    keys = load_jwks(PUBLIC_JWKS.replace(KID, "someone-else"), name="site.jwks")
    assert rejection(sig(V3_VALUE), V3_STEP, V3_JOB_ENV, keys=keys) == (
        "Job signature was made with key 'TEST_DO_NOT_USE', which is not in site.jwks"
    )


def test_header_algorithm_must_match_the_keys() -> None:
    p256 = ec.generate_private_key(ec.SECP256R1()).public_key().public_numbers()
    key = {"kty": "EC", "crv": "P-256", "alg": "ES256", "kid": KID,
           "x": b64url(p256.x.to_bytes(32, "big")), "y": b64url(p256.y.to_bytes(32, "big"))}
    keys = load_jwks(json.dumps({"keys": [key]}), name="ec.jwks")
    assert rejection(sig(V3_VALUE), V3_STEP, V3_JOB_ENV, keys=keys) == (
        "Job signature uses algorithm EdDSA, but key 'TEST_DO_NOT_USE' in ec.jwks is for ES256"
    )


def test_signature_algorithm_must_match_the_header() -> None:
    assert rejection(sig(V3_VALUE, alg="ES512"), V3_STEP, V3_JOB_ENV) == (
        "Job signature says algorithm ES512, but its header says EdDSA"
    )


# --- fields -------------------------------------------------------------------------------------


def test_unknown_signed_field_is_refused_even_when_validly_signed() -> None:
    values = {**json.loads(V3_PAYLOAD)["values"], "priority": 5}
    assert rejection(sign(values), V3_STEP, V3_JOB_ENV) == (
        "Job signature covers field 'priority', which this agent cannot check against the job"
    )


def test_signature_must_cover_the_required_fields() -> None:
    values = {k: v for k, v in json.loads(V3_PAYLOAD)["values"].items() if k != "env"}
    assert rejection(sign(values), V3_STEP, V3_JOB_ENV) == "Job signature does not cover the step's env"


def test_signature_must_cover_secrets_when_the_step_has_them() -> None:
    values = {k: v for k, v in json.loads(V6_PAYLOAD)["values"].items() if k != "secrets"}
    assert rejection(sign(values), V6_STEP, V6_JOB_ENV) == "Job signature does not cover the step's secrets"


def test_checkout_settings_are_refused() -> None:
    values = {**json.loads(V3_PAYLOAD)["values"], "checkout": {"depth": 1}}
    step = {**V3_STEP, "checkout": {"depth": 1}}
    assert "checkout" in rejection(sign(values), step, V3_JOB_ENV)
    assert rejection(sig(V3_VALUE), step, V3_JOB_ENV) == (
        "Job step has checkout settings, which this agent cannot verify"
    )


def test_commands_list_is_signed_as_lines() -> None:
    values = {**json.loads(V3_PAYLOAD)["values"], "command": "make\nmake test"}
    step = {**V3_STEP, "commands": ["make", "make test"]}
    step.pop("command")
    assert verify(sign(values), step, {**V3_JOB_ENV, "BUILDKITE_COMMAND": "make\nmake test"}).kid == KID


# --- missing or malformed signatures ------------------------------------------------------------


@pytest.mark.parametrize("signature", [None, {}])
def test_missing_signature_is_refused(signature: dict[str, object] | None) -> None:
    assert rejection(signature, V3_STEP, V3_JOB_ENV) == (
        "Job has no signature, and this agent runs only signed steps"
    )


@pytest.mark.parametrize(("signature", "expected"), [
    ({"algorithm": "EdDSA", "value": V3_VALUE}, "Job signature is malformed"),
    (sig(V3_VALUE, []), "Job signature covers no fields"),
    (sig("YWxwYWNhcw=="), "Job signature is not a detached compact JWS"),
    (sig(V3_VALUE.replace("..", ".e30.")), "Job signature is not a detached compact JWS"),
    (sig("!!!.." + V3_VALUE.partition("..")[2]), "Job signature is not a detached compact JWS"),
])
def test_malformed_signature_is_refused(signature: dict[str, object], expected: str) -> None:
    assert rejection(signature, V3_STEP, V3_JOB_ENV).startswith(expected)


# --- JWKS ---------------------------------------------------------------------------------------


def test_jwks_keys_are_indexed_by_kid() -> None:
    keys = jwks()
    assert keys.name == "/etc/hpc-runner/buildkite.jwks"
    assert list(keys.keys) == [KID] and keys.keys[KID].alg == "EdDSA"


def okp(**changes: object) -> str:
    key: dict[str, object] = {"alg": "EdDSA", "crv": "Ed25519", "kid": KID, "kty": "OKP", "x": PUBLIC_X}
    key.update(changes)
    return json.dumps({"keys": [{k: v for k, v in key.items() if v is not None}]})


@pytest.mark.parametrize(("text", "expected"), [
    ("{not json", "keys.jwks: not valid JSON"),
    ("[]", 'keys.jwks: must be a JSON object with a "keys" list'),
    ('{"keys": []}', "keys.jwks: holds no keys"),
    ('{"keys": ["x"]}', "keys.jwks: keys[0]: must be a JSON object"),
    (okp(kid=None), 'keys.jwks: keys[0]: has no "kid"'),
    (okp(alg=None), "keys.jwks: keys[0] (kid 'TEST_DO_NOT_USE'): has no \"alg\""),
    (okp(alg="RS256"), "keys.jwks: keys[0] (kid 'TEST_DO_NOT_USE'): algorithm 'RS256' is not accepted"),
    (okp(alg="ES512"), "keys.jwks: keys[0] (kid 'TEST_DO_NOT_USE'): ES512 needs a key with kty 'EC'"),
    (okp(use="enc"), "keys.jwks: keys[0] (kid 'TEST_DO_NOT_USE'): \"use\" is 'enc'"),
    (okp(d=PRIVATE_D), "keys.jwks: keys[0] (kid 'TEST_DO_NOT_USE'): holds a private key"),
    (okp(x="AAAA"), "keys.jwks: keys[0] (kid 'TEST_DO_NOT_USE'): is not a valid EdDSA key"),
    (json.dumps({"keys": [{"kty": "oct", "k": "bGxhbWFz", "alg": "HS256", "kid": "llamas"}]}),
     "keys.jwks: keys[0] (kid 'llamas'): The HMAC key is 6 bytes long"),
    ('{"keys": [' + okp()[10:-2] + "," + okp()[10:-2] + "]}",
     "keys.jwks: keys[1]: key id 'TEST_DO_NOT_USE' is used twice"),
])
def test_bad_jwks_names_the_file_and_the_key(text: str, expected: str) -> None:
    with pytest.raises(JwksError) as caught:
        load_jwks(text, name="keys.jwks")
    assert str(caught.value).startswith(expected)


def test_hs256_keys_of_full_length_are_accepted() -> None:
    secret = b"a-shared-secret-of-thirty-two-by"
    keys = load_jwks(json.dumps({"keys": [{"kty": "oct", "k": b64url(secret), "alg": "HS256", "kid": "ci"}]}),
                     name="hs.jwks")
    assert keys.keys["ci"].alg == "HS256"


# --- plugin references --------------------------------------------------------------------------


@pytest.mark.parametrize(("source", "full"), [
    ("docker#v5.0.0", "github.com/buildkite-plugins/docker-buildkite-plugin#v5.0.0"),
    ("docker", "github.com/buildkite-plugins/docker-buildkite-plugin"),
    ("my-org/thing#main", "github.com/my-org/thing-buildkite-plugin#main"),
    ("github.com/my-org/thing-buildkite-plugin#v1", "github.com/my-org/thing-buildkite-plugin#v1"),
    ("https://example.com/p.git#v1", "https://example.com/p.git#v1"),
    ("git@github.com:org/p.git#v1", "git@github.com:org/p.git#v1"),
    ("./.buildkite/plugins/local", "./.buildkite/plugins/local"),
    ("/opt/plugins/local", "/opt/plugins/local"),
    ("", ""),
])
def test_plugin_references_are_signed_in_full(source: str, full: str) -> None:
    assert plugin_full_source(source) == full
