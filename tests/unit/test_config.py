"""The agent config: what a site writes, what the agent refuses, what jobs may never see."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
from conftest import binds_policy

from runner.config import (
    AgentConfig,
    check_policy_against_site,
    default_config,
    load_config,
    parse_config_text,
)
from runner.errors import InputError
from runner.fields import Table
from runner.oidc.issuers import OidcIssuer, parse_oidc_tables
from runner.policy import parse_policy_text
from runner.tomlsource import parse_toml

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "config.example.toml"

MINIMAL_BUILDKITE = """\
policy = "/etc/hpc-runner/policy.toml"
executor = "slurm"

[buildkite]
token_file = "/etc/hpc-runner/token"
verification_jwks_file = "/etc/hpc-runner/jwks.json"
"""

MINIMAL_GITHUB = """\
policy = "/etc/hpc-runner/policy.toml"

[github]
app_id = 7
private_key_file = "/etc/hpc-runner/app.pem"
repositories = ["octo/hello"]
"""


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(textwrap.dedent(text))
    return path


def load_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(InputError) as caught:
        load_config(write_config(tmp_path, text))
    return str(caught.value)


# --- the example and every section --------------------------------------------------------------


def test_the_example_config_loads_with_every_section() -> None:
    config = load_config(EXAMPLE)
    assert config.executor == "slurm"
    assert config.state_dir == Path("/var/lib/hpc-runner")
    assert config.work_root == Path("/scratch/hpc-runner")
    assert config.policy == Path("/etc/hpc-runner/policy.toml")
    assert config.max_jobs == 50
    assert config.sandbox.apptainer == "/usr/bin/apptainer"
    assert config.mpi.implementation == "openmpi"
    assert (config.slurm.poll_interval, config.slurm.srun, config.slurm.mpi_plugin) == (5, "srun", "pmix")
    assert config.sandbox.grace_period == 30
    assert config.sandbox.max_workspace_mb == 2048
    assert config.buildkite is not None
    assert config.buildkite.workers == 10
    assert config.buildkite.tags == ("queue=hpc",)
    assert config.buildkite.allow_unsigned is False
    assert config.buildkite.redacted_vars == ("*_CREDENTIALS",)
    assert config.github is not None
    assert config.github.poll_interval == 30
    assert config.github.repositories == ("CliMA/ClimaAtmos.jl",)
    assert config.github.log_url == "https://ci.example.org/jobs/{id}"
    assert config.hub is not None
    assert (config.hub.listen_host, config.hub.listen_port) == ("0.0.0.0", 8443)
    assert (config.hub.section, config.hub.public_url) == ("hub", "https://hub.example.org")
    assert [(i.name, i.kind, i.organization) for i in config.oidc] == [
        ("github-actions", "github", None), ("buildkite", "buildkite", "clima")]
    assert config.source == str(EXAMPLE)


def test_the_example_names_every_key_the_loader_knows() -> None:
    text = EXAMPLE.read_text()
    for key in ("state_dir", "work_root", "policy", "executor", "max_jobs", "apptainer", "workdir_root",
                "implementation", "token_file", "endpoint", "tags", "verification_jwks_file", "workers",
                "allow_unsigned", "app_id", "private_key_file", "api_url", "mode", "repositories",
                "trigger_label", "comment_command", "push_branches", "poll_interval", "log_url",
                "gateway_url", "gateway_token_file", "listen", "webhook_secret_file", "agent_tokens_file",
                "socket", "grace_period", "srun", "mpi_plugin", "redacted_vars", "max_workspace_size",
                "name", "issuer", "audience", "kind", "jwks_uri", "organization", "username_claim",
                "groups_claim", "public_url", "hub_url", "hub_token_file", "cluster", "checkout_url",
                "hub_max_queue_age"):
        assert f"{key} =" in text, key


def test_max_workspace_size_is_a_size_and_a_bad_one_is_named(tmp_path: Path) -> None:
    assert load_config(write_config(tmp_path, "")).sandbox.max_workspace_mb == 1024
    error = load_error(tmp_path, '[sandbox]\nmax_workspace_size = "lots"\n')
    assert "sandbox.max_workspace_size" in error and "is not a memory size" in error


def test_an_empty_config_means_the_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    config = load_config(write_config(tmp_path, ""))
    assert config.state_dir == tmp_path / "state" / "hpc-runner"
    assert config.work_root == config.state_dir.parent / "hpc-runner-work"
    assert config.executor == "local"
    assert config.policy is None
    assert config.sandbox.apptainer == "apptainer"
    assert config.mpi.implementation == "auto"
    assert (config.buildkite, config.github, config.hub) == (None, None, None)
    assert config.web_socket is None        # a config file names its dashboard's socket, if any


def test_buildkite_defaults() -> None:
    config = parse_config_text(MINIMAL_BUILDKITE)
    assert config.buildkite is not None
    assert config.buildkite.endpoint == "https://agent.buildkite.com/v3"
    assert config.buildkite.workers == 1
    assert config.buildkite.tags == ()
    assert config.max_jobs == 50


def test_github_defaults() -> None:
    config = parse_config_text(MINIMAL_GITHUB)
    assert config.github is not None
    assert config.github.api_url == "https://api.github.com"
    assert config.github.mode == "poll"
    assert config.github.trigger_label == "run-hpc"
    assert config.github.comment_command == "/hpc-runner run"
    assert config.github.push_branches == ()
    assert config.github.poll_interval == 30


def test_an_empty_trigger_switches_it_off() -> None:
    config = parse_config_text(MINIMAL_GITHUB + 'trigger_label = ""\ncomment_command = ""\n')
    assert config.github is not None
    assert (config.github.trigger_label, config.github.comment_command) == (None, None)


@pytest.mark.parametrize(("written", "seconds"), [("2m", 120), ("1h30m", 5400), ("90s", 90), ("0:45", 45)])
def test_poll_interval_is_converted_to_seconds(written: str, seconds: int) -> None:
    config = parse_config_text(MINIMAL_GITHUB + f'poll_interval = "{written}"\n')
    assert config.github is not None
    assert config.github.poll_interval == seconds


def test_github_gateway_mode_reads_its_url_and_token() -> None:
    config = parse_config_text(MINIMAL_GITHUB + 'mode = "gateway"\ngateway_url = "https://gw.example.org/"\n'
                               'gateway_token_file = "/etc/hpc-runner/gw-token"\n')
    assert config.github is not None
    assert config.github.gateway_url == "https://gw.example.org"
    assert Path("/etc/hpc-runner/gw-token") in config.secret_files()


def test_default_config_uses_xdg_state_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    config = default_config()
    assert config.state_dir == tmp_path / "hpc-runner"
    assert config.work_root == tmp_path / "hpc-runner-work"
    assert (config.executor, config.policy, config.source) == ("local", None, None)
    assert (config.buildkite, config.github, config.hub) == (None, None, None)
    # The dashboard on a socket of the user's own, in the private state dir.
    assert config.web_socket == tmp_path / "hpc-runner" / "web.sock"


def test_default_config_falls_back_to_the_home_directory(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_config().state_dir == tmp_path / ".local" / "state" / "hpc-runner"
    # The XDG spec: a relative value is ignored.
    monkeypatch.setenv("XDG_STATE_HOME", "relative/state")
    assert default_config().state_dir == tmp_path / ".local" / "state" / "hpc-runner"


# --- errors name file, line and field ------------------------------------------------------------


def test_unknown_top_level_key_names_file_line_and_key(tmp_path: Path) -> None:
    message = load_error(tmp_path, """\
        executor = "local"
        max_job = 4
        """)
    assert "config.toml:2:" in message
    assert "max_job: unknown key" in message


def test_unknown_key_in_buildkite_names_file_line_and_dotted_field(tmp_path: Path) -> None:
    message = load_error(tmp_path, MINIMAL_BUILDKITE + "workerz = 4\n")
    assert "config.toml:7:" in message
    assert "buildkite.workerz: unknown key" in message


@pytest.mark.parametrize(("text", "field", "complaint"), [
    ('max_jobs = "10"', "max_jobs", "must be an integer"),
    ("executor = 1", "executor", "must be a string"),
    ('[sandbox]\napptainer = ["apptainer"]', "sandbox.apptainer", "must be a string"),
    ('sandbox = "apptainer"', "sandbox", "must be a table"),
    ('[mpi]\nimplementation = true', "mpi.implementation", "must be a string"),
    ("state_dir = 5", "state_dir", "must be a string"),
])
def test_wrong_types_are_refused(tmp_path: Path, text: str, field: str, complaint: str) -> None:
    message = load_error(tmp_path, text + "\n")
    assert f"{field}: " in message
    assert complaint in message


def test_wrong_types_inside_sections_are_refused(tmp_path: Path) -> None:
    message = load_error(tmp_path, MINIMAL_BUILDKITE + 'workers = "ten"\n')
    assert "config.toml:7: buildkite.workers: must be an integer" in message
    message = load_error(tmp_path, MINIMAL_BUILDKITE + 'tags = "queue=hpc"\n')
    assert "buildkite.tags: must be an array" in message
    message = load_error(tmp_path, MINIMAL_GITHUB.replace("app_id = 7", 'app_id = "7"'))
    assert "config.toml:4: github.app_id: must be an integer" in message


@pytest.mark.parametrize("path", ["var/lib/hpc-runner", "/var/lib/../hpc-runner", "/var/lib/a:b", "/"])
def test_relative_dotdot_and_odd_paths_are_refused(tmp_path: Path, path: str) -> None:
    message = load_error(tmp_path, f'state_dir = "{path}"\n')
    assert "config.toml:1: state_dir:" in message


def test_relative_secret_file_is_refused(tmp_path: Path) -> None:
    message = load_error(tmp_path, MINIMAL_BUILDKITE.replace("/etc/hpc-runner/token", "token"))
    assert "config.toml:5: buildkite.token_file:" in message
    assert "absolute" in message


def test_bad_executor_value(tmp_path: Path) -> None:
    message = load_error(tmp_path, 'executor = "pbs"\n')
    assert "config.toml:1: executor:" in message
    assert '"slurm" or "local"' in message


def test_bad_mpi_implementation(tmp_path: Path) -> None:
    message = load_error(tmp_path, '[mpi]\nimplementation = "mpich"\n')
    assert "config.toml:2: mpi.implementation:" in message


def test_log_url_must_contain_the_id_placeholder(tmp_path: Path) -> None:
    message = load_error(tmp_path, MINIMAL_GITHUB + 'log_url = "https://ci.example.org/jobs/"\n')
    assert "config.toml:7: github.log_url:" in message
    assert "{id}" in message
    message = load_error(tmp_path, MINIMAL_GITHUB + 'log_url = "https://ci.example.org/{org}/{id}"\n')
    assert "no placeholder other than {id}" in message


@pytest.mark.parametrize("url", ["http://agent.example.org/v3", "ftp://agent.example.org",
                                 "https://user:pw@agent.example.org", "agent.buildkite.com"])
def test_endpoint_must_be_https(tmp_path: Path, url: str) -> None:
    message = load_error(tmp_path, MINIMAL_BUILDKITE + f'endpoint = "{url}"\n')
    assert "buildkite.endpoint:" in message


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/v3", "http://localhost:9000", "http://[::1]:80"])
def test_plain_http_is_allowed_to_loopback_for_tests(url: str) -> None:
    config = parse_config_text(MINIMAL_BUILDKITE + f'endpoint = "{url}"\n')
    assert config.buildkite is not None
    assert config.buildkite.endpoint == url


def test_redacted_vars_are_name_globs(tmp_path: Path) -> None:
    assert parse_config_text(MINIMAL_BUILDKITE).buildkite.redacted_vars == ()  # type: ignore[union-attr]
    message = load_error(tmp_path, MINIMAL_BUILDKITE + 'redacted_vars = ["MY SECRET"]\n')
    assert "buildkite.redacted_vars[0]" in message and "an env variable name glob" in message, message


def test_workers_range(tmp_path: Path) -> None:
    assert "at least 1" in load_error(tmp_path, MINIMAL_BUILDKITE + "workers = 0\n")
    assert "at most 1000" in load_error(tmp_path, MINIMAL_BUILDKITE + "workers = 1001\n")


def test_tags_are_key_value_and_unique(tmp_path: Path) -> None:
    assert "buildkite.tags[0]" in load_error(tmp_path, MINIMAL_BUILDKITE + 'tags = ["queue"]\n')
    message = load_error(tmp_path, MINIMAL_BUILDKITE + 'tags = ["queue=a", "queue=b"]\n')
    assert "buildkite.tags[1]" in message
    assert "set twice" in message


def test_jobs_must_be_signed_unless_explicitly_allowed(tmp_path: Path) -> None:
    text = MINIMAL_BUILDKITE.replace('verification_jwks_file = "/etc/hpc-runner/jwks.json"\n', "")
    assert "buildkite.verification_jwks_file: is required" in load_error(tmp_path, text)
    config = parse_config_text(text + "allow_unsigned = true\n")
    assert config.buildkite is not None
    assert config.buildkite.verification_jwks_file is None


def test_ci_sources_need_a_site_policy(tmp_path: Path) -> None:
    message = load_error(tmp_path, MINIMAL_GITHUB.replace('policy = "/etc/hpc-runner/policy.toml"\n', ""))
    assert "policy: is required" in message


def test_gateway_mode_needs_url_and_token_and_poll_mode_refuses_them(tmp_path: Path) -> None:
    message = load_error(tmp_path, MINIMAL_GITHUB + 'mode = "gateway"\n')
    assert "github.gateway_url: is required" in message
    message = load_error(tmp_path, MINIMAL_GITHUB + 'gateway_url = "https://gw.example.org"\n')
    assert "github.gateway_url: is only used with" in message
    assert 'must be "poll" or "gateway"' in load_error(tmp_path, MINIMAL_GITHUB + 'mode = "push"\n')


def test_repositories_must_be_owner_slash_name(tmp_path: Path) -> None:
    message = load_error(tmp_path, MINIMAL_GITHUB.replace('"octo/hello"', '"octo"'))
    assert "config.toml:6: github.repositories[0]:" in message
    assert "at least one" in load_error(tmp_path, MINIMAL_GITHUB.replace('["octo/hello"]', "[]"))


def test_poll_interval_has_a_floor(tmp_path: Path) -> None:
    assert "at least 5s" in load_error(tmp_path, MINIMAL_GITHUB + 'poll_interval = "1s"\n')
    assert "github.poll_interval:" in load_error(tmp_path, MINIMAL_GITHUB + 'poll_interval = "soon"\n')
    # A bare number would be minutes to Slurm: here the unit must be written.
    assert "needs a unit" in load_error(tmp_path, MINIMAL_GITHUB + "poll_interval = 30\n")
    assert "needs a unit" in load_error(tmp_path, MINIMAL_GITHUB + 'poll_interval = "30"\n')


def test_push_branches_allow_only_a_trailing_wildcard(tmp_path: Path) -> None:
    config = parse_config_text(MINIMAL_GITHUB + 'push_branches = ["main", "release/*"]\n')
    assert config.github is not None
    assert config.github.push_branches == ("main", "release/*")
    assert "github.push_branches[0]" in load_error(tmp_path, MINIMAL_GITHUB + 'push_branches = ["ma*n"]\n')


@pytest.mark.parametrize(("listen", "host", "port"), [("0.0.0.0:8443", "0.0.0.0", 8443),
                                                      ("[::1]:9000", "::1", 9000),
                                                      ("gw.example.org:443", "gw.example.org", 443)])
def test_gateway_listen_address(listen: str, host: str, port: int) -> None:
    config = parse_config_text(textwrap.dedent(f"""\
        [gateway]
        listen = "{listen}"
        webhook_secret_file = "/etc/hpc-runner/hook"
        agent_tokens_file = "/etc/hpc-runner/tokens"
        state_dir = "/var/lib/hpc-runner-gateway"
        """))
    assert config.hub is not None
    assert (config.hub.listen_host, config.hub.listen_port) == (host, port)


@pytest.mark.parametrize("listen", ["8443", "0.0.0.0:99999", "0.0.0.0:", "host name:80"])
def test_bad_listen_address(tmp_path: Path, listen: str) -> None:
    message = load_error(tmp_path, f"""\
        [gateway]
        listen = "{listen}"
        webhook_secret_file = "/etc/hpc-runner/hook"
        agent_tokens_file = "/etc/hpc-runner/tokens"
        state_dir = "/var/lib/hpc-runner-gateway"
        """)
    assert "config.toml:2: gateway.listen:" in message


def test_apptainer_is_a_command_name_or_an_absolute_path(tmp_path: Path) -> None:
    assert parse_config_text('[sandbox]\napptainer = "apptainer-1.4"\n').sandbox.apptainer == "apptainer-1.4"
    assert "sandbox.apptainer" in load_error(tmp_path, '[sandbox]\napptainer = "bin/apptainer"\n')
    assert "sandbox.apptainer" in load_error(tmp_path, '[sandbox]\napptainer = "apptainer --debug"\n')


def test_state_dir_must_not_lie_in_work_root(tmp_path: Path) -> None:
    message = load_error(tmp_path, 'state_dir = "/scratch/ci/state"\nwork_root = "/scratch/ci"\n')
    assert "work_root: must not contain state_dir" in message


def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    assert "config.toml:2:" in load_error(tmp_path, 'executor = "local"\nmax_jobs = = 3\n')


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nope\.toml: no such file"):
        load_config(tmp_path / "nope.toml")


# --- secret files and protected paths ------------------------------------------------------------


def test_secret_files_and_protected_paths_of_the_example() -> None:
    config = load_config(EXAMPLE)
    assert config.secret_files() == [
        Path("/etc/hpc-runner/buildkite-agent-token"),
        Path("/etc/hpc-runner/github-app.pem"),
        Path("/etc/hpc-runner/github-webhook-secret"),
        Path("/etc/hpc-runner/gateway-agent-tokens"),
    ]
    # The JWKS may be public (checked for tampering, and for secrecy only when it holds a shared
    # key), but no job may see it either way.
    assert Path("/etc/hpc-runner/buildkite-jwks.json") not in config.secret_files()
    assert config.protected_paths() == [Path("/var/lib/hpc-runner"), Path("/var/lib/hpc-runner-gateway"),
                                         *config.secret_files(), Path("/etc/hpc-runner/buildkite-jwks.json")]


# --- the policy against this site -------------------------------------------------------------


def site(tmp_path: Path) -> AgentConfig:
    etc = tmp_path / "etc" / "hpc-runner"
    etc.mkdir(parents=True)
    (tmp_path / "state").mkdir()
    return parse_config_text(f"""\
state_dir = "{tmp_path}/state"
work_root = "{tmp_path}/work"
policy = "{etc}/policy.toml"

[github]
app_id = 1
private_key_file = "{etc}/github-app.pem"
repositories = ["octo/hello"]
""")


def test_a_policy_with_harmless_binds_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    policy = parse_policy_text(binds_policy(f"{tmp_path}/data:/data:ro"))
    assert check_policy_against_site(policy, site(tmp_path)) == []


def test_a_grant_binding_the_state_dir_is_reported(tmp_path: Path) -> None:
    policy = parse_policy_text(binds_policy(f"{tmp_path}/state:/state"))
    [reason] = check_policy_against_site(policy, site(tmp_path))
    assert "grant 'data'" in reason
    assert f"{tmp_path}/state:/state:rw" in reason
    assert f"is {tmp_path}/state, the agent's state_dir" in reason


def test_a_grant_binding_inside_the_state_dir_is_reported(tmp_path: Path) -> None:
    policy = parse_policy_text(binds_policy(f"{tmp_path}/state/jobs:/jobs:ro"))
    [reason] = check_policy_against_site(policy, site(tmp_path))
    assert "lies inside" in reason


def test_a_grant_binding_a_parent_of_a_secret_file_is_reported(tmp_path: Path) -> None:
    policy = parse_policy_text(binds_policy(f"{tmp_path}/etc:/host-etc:ro"))
    [reason] = check_policy_against_site(policy, site(tmp_path))
    assert f"contains {tmp_path}/etc/hpc-runner/github-app.pem" in reason
    assert "github.private_key_file" in reason


def test_a_bind_through_a_symlink_into_the_state_dir_is_reported(tmp_path: Path) -> None:
    config = site(tmp_path)
    (tmp_path / "state" / "db").mkdir()
    os.symlink(tmp_path / "state" / "db", tmp_path / "innocent")
    policy = parse_policy_text(binds_policy(f"{tmp_path}/innocent:/data:ro"))
    [reason] = check_policy_against_site(policy, config)
    assert f"resolves to {tmp_path}/state/db" in reason
    assert f"lies inside {tmp_path}/state" in reason


def test_a_grant_binding_the_jobs_directories_is_reported(tmp_path: Path) -> None:
    """Every job's workspace, scratch and log live below work_root: no job may see another's."""
    policy = parse_policy_text(binds_policy(f"{tmp_path}/work:/w:ro", f"{tmp_path}:/all:ro",
                                              f"{tmp_path}/work/some-job:/j"))
    reasons = check_policy_against_site(policy, site(tmp_path))
    assert f"is {tmp_path}/work, the agent's work_root" in reasons[0]
    assert any(f"contains {tmp_path}/work, the agent's work_root" in r for r in reasons)
    assert f"lies inside {tmp_path}/work, the agent's work_root" in reasons[-1]


def test_every_offending_bind_is_reported(tmp_path: Path) -> None:
    policy = parse_policy_text(binds_policy(f"{tmp_path}/state:/s", f"{tmp_path}/etc:/e:ro",
                                              f"{tmp_path}/elsewhere:/x"))
    assert len(check_policy_against_site(policy, site(tmp_path))) == 2


# --- [[oidc]]: the issuers whose ID tokens are trusted ---------------------------------------------

GITHUB_ISSUER = """\
[[oidc]]
name = "github-actions"
issuer = "https://token.actions.githubusercontent.com"
audience = "hpc-runner"
kind = "github"
"""


def oidc_table(**keys: str) -> str:
    return "[[oidc]]\n" + "".join(f'{key} = "{value}"\n' for key, value in keys.items())


def test_oidc_tables_are_read_in_order_with_their_defaults() -> None:
    config = parse_config_text(GITHUB_ISSUER + oidc_table(
        name="sso", issuer="https://sso.example.org/realms/hpc/", audience="hpc-runner", kind="generic",
        groups_claim="roles", jwks_uri="https://sso.example.org/keys"))
    github, sso = config.oidc
    assert github == OidcIssuer("github-actions", "https://token.actions.githubusercontent.com",
                                "hpc-runner", "github")
    assert github.discovery_url == "https://token.actions.githubusercontent.com/.well-known/openid-configuration"
    assert github.username_claims == ("preferred_username", "sub")
    # The issuer is kept as written: a token's `iss` must equal it, trailing '/' included.
    assert (sso.issuer, sso.jwks_uri, sso.groups_claim) == (
        "https://sso.example.org/realms/hpc/", "https://sso.example.org/keys", "roles")
    assert sso.discovery_url == "https://sso.example.org/realms/hpc/.well-known/openid-configuration"
    assert parse_config_text("").oidc == ()


def test_a_generic_issuer_names_its_username_claim() -> None:
    (issuer,) = parse_config_text(oidc_table(name="sso", issuer="https://sso.example.org", audience="a",
                                             kind="generic", username_claim="email")).oidc
    assert issuer.username_claims == ("email",)


@pytest.mark.parametrize("url", ["http://token.example.org", "http://10.0.0.1:8080", "ftp://x.example.org",
                                 "https://user:pw@x.example.org", "https://x.example.org/?tenant=1",
                                 "token.actions.githubusercontent.com"])
def test_an_issuer_must_be_https_but_on_loopback(tmp_path: Path, url: str) -> None:
    message = load_error(tmp_path, oidc_table(name="x", issuer=url, audience="a", kind="github"))
    assert f"{tmp_path / 'config.toml'}:3: oidc[0].issuer: " in message


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080", "http://127.8.9.1", "http://[::1]:9000",
                                 "http://localhost:8080/realms/test"])
def test_a_loopback_issuer_may_use_plain_http_for_tests(url: str) -> None:
    (issuer,) = parse_config_text(oidc_table(name="x", issuer=url, audience="a", kind="github")).oidc
    assert issuer.issuer == url


def test_an_http_issuer_is_refused_saying_why(tmp_path: Path) -> None:
    message = load_error(tmp_path, oidc_table(name="x", issuer="http://token.example.org", audience="a",
                                              kind="github"))
    assert message.endswith("oidc[0].issuer: 'http://token.example.org' must use https:// (plain http only "
                            "to localhost, for tests)")


def test_unknown_key_in_an_oidc_table_names_file_line_and_field(tmp_path: Path) -> None:
    message = load_error(tmp_path, GITHUB_ISSUER + GITHUB_ISSUER.replace("github-actions", "two")
                         .replace('kind = "github"', 'kind = "github"\naudiences = ["x"]'))
    assert f"{tmp_path / 'config.toml'}:11: oidc[1].audiences: unknown key" in message


@pytest.mark.parametrize(("text", "field", "complaint"), [
    (oidc_table(name="x", issuer="https://a.example.org", audience="a"), "oidc[0].kind", "is required"),
    (oidc_table(name="x", issuer="https://a.example.org", audience="a", kind="jenkins"), "oidc[0].kind",
     'must be "github" or "buildkite" or "gitlab" or "generic", got \'jenkins\''),
    (oidc_table(name="x", issuer="https://a.example.org", kind="github"), "oidc[0].audience", "is required"),
    (oidc_table(name="x", issuer="https://a.example.org", audience="two words", kind="github"),
     "oidc[0].audience", "is not an audience"),
    (oidc_table(name="x y", issuer="https://a.example.org", audience="a", kind="github"),
     "oidc[0].name", "is not a name"),
    (oidc_table(name="x", issuer="https://agent.buildkite.com", audience="a", kind="buildkite"),
     "oidc[0].organization", "is required with kind = \"buildkite\""),
    (oidc_table(name="x", issuer="https://a.example.org", audience="a", kind="github", organization="clima"),
     "oidc[0].organization", 'is only used with kind = "buildkite" (kind is "github")'),
    (oidc_table(name="x", issuer="https://a.example.org", audience="a", kind="gitlab", groups_claim="g"),
     "oidc[0].groups_claim", 'is only used with kind = "generic" (kind is "gitlab")'),
    (oidc_table(name="x", issuer="https://a.example.org", audience="a", kind="github",
                jwks_uri="http://keys.example.org"), "oidc[0].jwks_uri", "must use https://"),
    ("oidc = 1\n", "oidc", "must be an array of tables ([[oidc]])"),
    ("[oidc]\nname = 'x'\n", "oidc", "must be an array of tables ([[oidc]])"),
])
def test_bad_oidc_tables_are_refused_naming_the_field(tmp_path: Path, text: str, field: str,
                                                      complaint: str) -> None:
    message = load_error(tmp_path, text)
    assert f"{field}: " in message
    assert complaint in message


def test_issuers_whose_principals_a_policy_could_not_tell_apart_are_refused(tmp_path: Path) -> None:
    twice = GITHUB_ISSUER + GITHUB_ISSUER.replace('name = "github-actions"', 'name = "again"')
    assert "oidc[1].issuer: 'https://token.actions.githubusercontent.com' is already trusted as " \
           "'github-actions'" in load_error(tmp_path, twice)
    enterprise = GITHUB_ISSUER + oidc_table(name="ghes", issuer="https://github.example.org/_services/token",
                                            audience="hpc-runner", kind="github")
    assert "oidc[1].kind: 'github-actions' is already a github issuer: the tokens of both would hold the " \
           "same github: principals" in load_error(tmp_path, enterprise)
    same_name = GITHUB_ISSUER + oidc_table(name="github-actions", issuer="https://gitlab.com",
                                           audience="a", kind="gitlab")
    assert "oidc[1].name: another [[oidc]] table is already named 'github-actions'" in load_error(
        tmp_path, same_name)


def test_two_buildkite_organisations_share_the_one_issuer() -> None:
    config = parse_config_text(
        oidc_table(name="clima", issuer="https://agent.buildkite.com", audience="a", kind="buildkite",
                   organization="clima")
        + oidc_table(name="ocean", issuer="https://agent.buildkite.com", audience="a", kind="buildkite",
                     organization="ocean-lab"))
    assert [issuer.organization for issuer in config.oidc] == ["clima", "ocean-lab"]
    with pytest.raises(InputError, match=r"oidc\[1\].issuer: .* is already trusted as 'clima'"):
        parse_config_text(
            oidc_table(name="clima", issuer="https://agent.buildkite.com", audience="a", kind="buildkite",
                       organization="clima")
            + oidc_table(name="again", issuer="https://agent.buildkite.com", audience="b", kind="buildkite",
                         organization="clima"))


def test_another_config_reads_its_oidc_tables_with_the_same_parser() -> None:
    doc = parse_toml('[hub]\nlisten = "0.0.0.0:8443"\n\n' + GITHUB_ISSUER.replace("hpc-runner", "x y"),
                     "hub.toml")
    with pytest.raises(InputError) as caught:
        parse_oidc_tables(Table(doc, doc.data))
    assert str(caught.value) == "hub.toml:7: oidc[0].audience: 'x y' is not an audience (one word, no spaces)"
