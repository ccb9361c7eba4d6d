"""The keys of an agent that leases the hub's API jobs: `hub_url`, `hub_token_file` and `cluster`
(together), `checkout_url` and `hub_max_queue_age`; what each requires and refuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.config import DEFAULT_CHECKOUT_URL, DEFAULT_HUB_MAX_QUEUE_AGE, ApiConfig, parse_config_text

from .test_hub_config import error_of

OIDC = """
[[oidc]]
name = "github-actions"
issuer = "https://token.actions.githubusercontent.com"
audience = "hpc-runner"
kind = "github"
"""
AGENT = """\
policy = "/etc/hpc-runner/policy.toml"
hub_url = "https://hub.example.org/"
hub_token_file = "/etc/hpc-runner/hub-token"
cluster = "clima-hpc"
"""


def test_an_agent_with_hub_url_token_and_cluster_leases_api_jobs_with_defaults() -> None:
    config = parse_config_text(AGENT + OIDC)
    assert config.api == ApiConfig("https://hub.example.org", Path("/etc/hpc-runner/hub-token"), "clima-hpc",
                                   DEFAULT_CHECKOUT_URL, DEFAULT_HUB_MAX_QUEUE_AGE)
    assert config.api.checkout_url == "https://github.com/{repository}.git"
    assert config.api.max_queue_age == 3600
    # Its token is a secret the agent checks (0600, its own), and no job may see it.
    assert (Path("/etc/hpc-runner/hub-token"), "hub_token_file") in config.named_secret_files()
    assert Path("/etc/hpc-runner/hub-token") in config.protected_paths()
    assert parse_config_text(OIDC).api is None


@pytest.mark.parametrize("url", ["https://git.example.org/{repository}.git", "/srv/git/{repository}.git",
                                 "file:///srv/git/{repository}", "http://127.0.0.1:8080/{repository}"])
def test_checkout_url_and_the_maximum_queue_age_are_read(url: str) -> None:
    config = parse_config_text(f'checkout_url = "{url}"\nhub_max_queue_age = "15m"\n' + AGENT + OIDC)
    assert config.api is not None
    assert (config.api.checkout_url, config.api.max_queue_age) == (url, 900)


@pytest.mark.parametrize("left_out", ["hub_url", "hub_token_file", "cluster"])
def test_the_three_keys_go_together(left_out: str) -> None:
    text = "".join(line + "\n" for line in AGENT.splitlines() if not line.startswith(left_out)) + OIDC
    message = error_of(text)
    assert f"config.toml: {left_out}: is required with" in message and "needs all three" in message


@pytest.mark.parametrize("key, value", [("checkout_url", '"/srv/git/{repository}"'),
                                        ("hub_max_queue_age", '"1h"')])
def test_checkout_url_and_the_queue_age_are_only_used_with_a_hub(key: str, value: str) -> None:
    message = error_of(f"{key} = {value}\n" + OIDC)
    assert f"{key}: is only used with hub_url, hub_token_file and cluster" in message


@pytest.mark.parametrize("text, field, words", [
    (AGENT, "hub_url", "needs at least one [[oidc]] table"),
    (AGENT.replace('policy = "/etc/hpc-runner/policy.toml"\n', "") + OIDC, "policy", "is required when"),
    (AGENT.replace("https://hub.example.org/", "http://hub.example.org") + OIDC, "hub_url", "must use https://"),
    (AGENT.replace("clima-hpc", "clima hpc") + OIDC, "cluster", "is not a cluster name"),
    (AGENT.replace("/etc/hpc-runner/hub-token", "hub-token") + OIDC, "hub_token_file", "absolute"),
    ('checkout_url = "https://github.com/octo/repo.git"\n' + AGENT + OIDC, "checkout_url",
     "must contain {repository} once"),
    ('checkout_url = "https://{repository}/{ref}.git"\n' + AGENT + OIDC, "checkout_url",
     "no other placeholder"),
    ('checkout_url = "http://git.example.org/{repository}"\n' + AGENT + OIDC, "checkout_url", "must use https://"),
    ('checkout_url = "https://user:pw@git.example.org/{repository}"\n' + AGENT + OIDC, "checkout_url",
     "must not contain credentials"),
    ('checkout_url = "srv/git/{repository}"\n' + AGENT + OIDC, "checkout_url", "is not an https:// URL"),
    ('hub_max_queue_age = "30"\n' + AGENT + OIDC, "hub_max_queue_age", "needs a unit"),
    ('hub_max_queue_age = "30s"\n' + AGENT + OIDC, "hub_max_queue_age", "between 1m and 24h"),
    ('hub_max_queue_age = "2d"\n' + AGENT + OIDC, "hub_max_queue_age", "between 1m and 24h"),
])
def test_bad_values_are_refused_naming_the_key(text: str, field: str, words: str) -> None:
    message = error_of(text)
    assert f": {field}:" in message and words in message, message
