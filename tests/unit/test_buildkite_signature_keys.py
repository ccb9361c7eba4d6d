"""The Buildkite verification JWKS: public keys may be read by all, a shared HS256 key may not.

An `oct` (HMAC) key signs as well as it verifies: whoever can read it can sign any job. The agent
refuses to start on a JWKS holding one unless the file is a secret file (regular, ours, 0600).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from fakes.buildkite_signer import StepSigner

from runner import doctor
from runner.config import BuildkiteConfig, parse_config_text
from runner.errors import InputError
from runner.secrets import SecretFileError
from runner.sources.buildkite.source import load_trust


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


SHARED_KEY = {"kty": "oct", "k": _b64url(b"a-shared-secret-of-thirty-two-by"), "alg": "HS256", "kid": "ci"}


def site(tmp_path: Path, jwks_text: str, mode: int) -> BuildkiteConfig:
    token = tmp_path / "token"
    token.write_text("bk-token\n")
    token.chmod(0o600)
    jwks = tmp_path / "jwks.json"
    jwks.write_text(jwks_text)
    jwks.chmod(mode)
    return BuildkiteConfig(token_file=token, verification_jwks_file=jwks, endpoint="https://bk.invalid/v3",
                           tags=("queue=hpc",), workers=1, allow_unsigned=False, redacted_vars=())


def shared_jwks() -> str:
    return json.dumps({"keys": [StepSigner().public_jwk(), SHARED_KEY]})


def test_a_world_readable_jwks_holding_a_shared_key_stops_the_agent(tmp_path: Path) -> None:
    config = site(tmp_path, shared_jwks(), 0o644)
    with pytest.raises(SecretFileError) as caught:
        load_trust(config)
    message = str(caught.value)
    assert f"{tmp_path}/jwks.json is open to group or others (mode 0644)" in message
    assert "shared HS256 key 'ci'" in message
    assert caught.value.fix == f"chmod 600 {tmp_path}/jwks.json"


def test_a_jwks_holding_a_shared_key_is_read_when_it_is_a_secret_file(tmp_path: Path) -> None:
    _token, jwks = load_trust(site(tmp_path, shared_jwks(), 0o600))
    assert jwks is not None and sorted(jwks.keys) == ["ci", "hpc-test"]


def test_a_jwks_of_public_keys_only_may_be_read_by_everyone(tmp_path: Path) -> None:
    _token, jwks = load_trust(site(tmp_path, StepSigner().public_jwks(), 0o644))
    assert jwks is not None and list(jwks.keys) == ["hpc-test"]


def test_a_link_to_a_jwks_holding_a_shared_key_is_refused(tmp_path: Path) -> None:
    config = site(tmp_path, shared_jwks(), 0o600)
    assert config.verification_jwks_file is not None
    link = tmp_path / "link.json"
    link.symlink_to(config.verification_jwks_file)
    with pytest.raises(SecretFileError, match="is a symbolic link"):
        load_trust(BuildkiteConfig(config.token_file, link, config.endpoint, config.tags, 1, False, ()))


def test_doctor_fails_a_readable_shared_key_and_passes_public_keys(tmp_path: Path) -> None:
    shared = site(tmp_path, shared_jwks(), 0o644).verification_jwks_file
    assert shared is not None
    check = doctor.check_jwks_file(shared, "buildkite.verification_jwks_file")
    assert (check.name, check.status, check.fix) == (
        "file buildkite.verification_jwks_file", "FAIL", f"chmod 600 {shared}")
    assert "shared HS256 key 'ci'" in check.detail
    shared.chmod(0o600)
    assert doctor.check_jwks_file(shared, "buildkite.verification_jwks_file").status == "ok"
    shared.write_text(StepSigner().public_jwks())
    shared.chmod(0o644)
    public = doctor.check_jwks_file(shared, "buildkite.verification_jwks_file")
    assert (public.status, public.detail) == (
        "ok", f"{shared} (public keys only, writable only by its owner)")


def test_doctor_fails_a_jwks_the_agent_could_not_load(tmp_path: Path) -> None:
    path = site(tmp_path, "{}", 0o644).verification_jwks_file
    assert path is not None
    check = doctor.check_jwks_file(path, "buildkite.verification_jwks_file")
    assert check.status == "FAIL"
    assert 'must be a JSON object with a "keys" list' in check.detail


def test_a_jwks_that_is_not_text_stops_the_agent_naming_the_file(tmp_path: Path) -> None:
    config = site(tmp_path, "", 0o644)
    assert config.verification_jwks_file is not None
    config.verification_jwks_file.write_bytes(b'{"keys": [\xff]}')
    with pytest.raises(InputError) as caught:
        load_trust(config)
    assert str(caught.value) == f"{config.verification_jwks_file}: not UTF-8 text"
    check = doctor.check_jwks_file(config.verification_jwks_file, "buildkite.verification_jwks_file")
    assert (check.status, check.detail) == ("FAIL", f"{config.verification_jwks_file}: not UTF-8 text")


def test_no_job_may_bind_the_jwks(tmp_path: Path) -> None:
    config = parse_config_text(f'state_dir = "{tmp_path}/state"\npolicy = "/etc/hpc/policy.toml"\n'
                               '[buildkite]\ntoken_file = "/etc/hpc/token"\n'
                               'verification_jwks_file = "/etc/hpc/jwks.json"\n')
    assert (Path("/etc/hpc/jwks.json"), "buildkite.verification_jwks_file") in config.named_protected_paths()
