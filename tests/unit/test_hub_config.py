"""The hub's section of a config: `[hub]`, or `[gateway]` read as before, and what each requires."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from runner.config import parse_config_text
from runner.errors import InputError

HUB = """\
[hub]
listen = "127.0.0.1:8443"
state_dir = "/var/lib/hpc-runner-hub"
agent_tokens_file = "/etc/hpc-runner/hub-agent-tokens"
public_url = "https://hub.example.org/"
"""
GATEWAY = """\
[gateway]
listen = "0.0.0.0:8443"
webhook_secret_file = "/etc/hpc-runner/hook"
agent_tokens_file = "/etc/hpc-runner/tokens"
state_dir = "/var/lib/hpc-runner-gateway"
"""


def error_of(text: str) -> str:
    with pytest.raises(InputError) as caught:
        parse_config_text(textwrap.dedent(text), "config.toml")
    return str(caught.value)


def test_a_hub_section_needs_no_webhook_secret_and_names_its_public_url() -> None:
    hub = parse_config_text(HUB).hub
    assert hub is not None
    assert (hub.section, hub.public_url, hub.webhook_secret_file) == ("hub", "https://hub.example.org", None)
    config = parse_config_text(HUB + 'webhook_secret_file = "/etc/hpc-runner/hook"\n')
    assert config.hub is not None and config.hub.webhook_secret_file == Path("/etc/hpc-runner/hook")
    assert config.secret_files() == [Path("/etc/hpc-runner/hook"), Path("/etc/hpc-runner/hub-agent-tokens")]
    assert (Path("/var/lib/hpc-runner-hub"), "hub.state_dir") in config.state_dirs()
    without_url = HUB.replace('public_url = "https://hub.example.org/"\n', "")
    assert "hub.public_url: is required" in error_of(without_url)
    assert "hub.public_url" in error_of(HUB.replace("https://hub", "http://hub"))


def test_a_gateway_section_is_read_as_before() -> None:
    config = parse_config_text(GATEWAY)
    hub = config.hub
    assert hub is not None
    assert (hub.section, hub.listen_host, hub.listen_port) == ("gateway", "0.0.0.0", 8443)
    assert hub.public_url is None
    assert config.secret_files() == [Path("/etc/hpc-runner/hook"), Path("/etc/hpc-runner/tokens")]
    assert (Path("/var/lib/hpc-runner-gateway"), "gateway.state_dir") in config.state_dirs()
    assert "gateway.webhook_secret_file: is required" in error_of(
        GATEWAY.replace('webhook_secret_file = "/etc/hpc-runner/hook"\n', ""))
    with_url = parse_config_text(GATEWAY + 'public_url = "https://gw.example.org"\n').hub
    assert with_url is not None and with_url.public_url == "https://gw.example.org"


def test_a_config_has_one_of_the_two_sections() -> None:
    assert "give [hub] or [gateway]" in error_of(HUB + "\n" + GATEWAY)
    assert "hub.listen" in error_of(HUB.replace("127.0.0.1:8443", "8443"))
    assert "hub.webhook_secret_url" in error_of(HUB + 'webhook_secret_url = "x"\n')
