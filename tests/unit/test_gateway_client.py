"""The agents' gateway client, its pure parts: reading a lease answer, backoff, configuration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from multidict import CIMultiDict

from runner.config import GithubConfig, parse_config_text
from runner.errors import InputError
from runner.gateway import protocol
from runner.secrets import SecretFileError
from runner.sources.github.gateway_client import GatewayClient, delivery_from_answer, retry_delay

LEASE_ID = "Zm9vYmFyYmF6cXV4cXV1eHh4"
BODY = json.dumps({"action": "synchronize", "number": 7}).encode()


def answer_headers(**overrides: str) -> CIMultiDict[str]:
    headers = CIMultiDict(protocol.lease_headers(
        event="pull_request", delivery_id="72d3162e-cc78-11e3-81ab-4c9367dc0958", lease_id=LEASE_ID,
        lease_seconds=120, lease_expires_at=1_800_000_120.0, received_at=1_800_000_000.5, attempt=2))
    for name, value in overrides.items():
        headers[name.replace("_", "-")] = value
    return headers


def test_a_lease_answer_becomes_a_delivery_with_its_lease() -> None:
    delivery = delivery_from_answer(answer_headers(), BODY, sent_at=100.0)
    assert (delivery.event, delivery.delivery_id, delivery.attempt) == (
        "pull_request", "72d3162e-cc78-11e3-81ab-4c9367dc0958", 2)
    assert delivery.payload == {"action": "synchronize", "number": 7}
    assert delivery.received_at == 1_800_000_000.5
    # The lease counts from when the request left, not from when the answer arrived.
    assert (delivery.lease.id, delivery.lease.seconds, delivery.lease.deadline) == (LEASE_ID, 120, 220.0)
    assert delivery.lease.remaining(now=200.0) == 20.0


def test_the_payload_is_not_in_the_delivery_repr() -> None:
    assert "synchronize" not in repr(delivery_from_answer(answer_headers(), BODY, sent_at=0.0))


@pytest.mark.parametrize("body, message", [(b"not json", "the body is not JSON"),
                                           (b"[]", "the body is not a JSON object")])
def test_a_body_that_is_not_a_json_object_is_named(body: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        delivery_from_answer(answer_headers(), body, sent_at=0.0)


@pytest.mark.parametrize("header, value, message", [
    ("Hpc-Runner-Lease-Id", "short", "is not a lease id"),
    ("X-GitHub-Event", "Pull Request", "is not an event name"),
    ("X-GitHub-Delivery", "../x", "is not a delivery id"),
    ("Hpc-Runner-Lease-Seconds", "0", "between 1 and 3600"),
    ("Hpc-Runner-Received-At", "yesterday", "malformed header"),
    ("Hpc-Runner-Attempt", "0", "is not a positive whole number"),
])
def test_a_malformed_lease_answer_is_refused(header: str, value: str, message: str) -> None:
    headers = answer_headers()
    headers[header] = value
    with pytest.raises(ValueError, match=message):
        delivery_from_answer(headers, BODY, sent_at=0.0)


def test_a_missing_header_is_named() -> None:
    headers = answer_headers()
    del headers["Hpc-Runner-Attempt"]
    with pytest.raises(ValueError, match="no Hpc-Runner-Attempt header"):
        delivery_from_answer(headers, BODY, sent_at=0.0)


def test_backoff_doubles_up_to_its_maximum_with_jitter() -> None:
    low, high = (lambda: 0.0), (lambda: 1.0)
    assert [retry_delay(n, initial=1, maximum=60, rng=high) for n in (1, 2, 3, 6, 7, 20)] == [
        1, 2, 4, 32, 60, 60]
    assert retry_delay(3, initial=1, maximum=60, rng=low) == 2.0
    assert retry_delay(1, initial=1, maximum=60, rng=high, retry_after=5) == 5


def test_lease_action_paths_refuse_anything_but_a_lease_id() -> None:
    assert protocol.lease_action_path(LEASE_ID, "ack") == f"/api/v1/leases/{LEASE_ID}/ack"
    with pytest.raises(ValueError):
        protocol.lease_action_path("../../status", "ack")
    with pytest.raises(ValueError):
        protocol.lease_action_path(LEASE_ID, "delete")


def github_config(tmp_path: Path, token_file: Path) -> str:
    key = tmp_path / "app.pem"
    return f"""
policy = "{tmp_path / 'policy.toml'}"
[github]
app_id = 1
private_key_file = "{key}"
repositories = ["CliMA/ClimaAtmos.jl"]
mode = "gateway"
gateway_url = "https://gateway.example.org/hpc/"
gateway_token_file = "{token_file}"
"""


def github_with_token_file(tmp_path: Path, mode: int) -> GithubConfig:
    """The [github] section of `github_config`, its token file written with `mode`."""
    token_file = tmp_path / "gateway-token"
    token_file.write_text("secret-token-0123456789abcdef0123456789\n")
    token_file.chmod(mode)
    config = parse_config_text(github_config(tmp_path, token_file))
    assert config.github is not None
    return config.github


def test_from_config_reads_the_token_file_and_never_shows_the_token(tmp_path: Path) -> None:
    client = GatewayClient.from_config(github_with_token_file(tmp_path, 0o600))
    assert "secret-token" not in repr(client)
    assert repr(client) == "GatewayClient('https://gateway.example.org/hpc')"


def test_from_config_refuses_a_token_file_open_to_others(tmp_path: Path) -> None:
    github = github_with_token_file(tmp_path, 0o644)
    with pytest.raises(SecretFileError, match="gateway token"):
        GatewayClient.from_config(github)


def test_from_config_needs_gateway_mode(tmp_path: Path) -> None:
    text = github_config(tmp_path, tmp_path / "t").replace('mode = "gateway"', 'mode = "poll"')
    text = "\n".join(line for line in text.splitlines() if not line.startswith("gateway_"))
    config = parse_config_text(text)
    assert config.github is not None
    with pytest.raises(InputError, match='mode = "gateway"'):
        GatewayClient.from_config(config.github)


@pytest.mark.parametrize("options", [{"wait_seconds": 56}, {"wait_seconds": -1}, {"lease_seconds": 0},
                                     {"lease_seconds": 3601}])
def test_out_of_range_poll_settings_are_refused(options: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        GatewayClient("https://gateway.example.org", "t" * 40, **options)
