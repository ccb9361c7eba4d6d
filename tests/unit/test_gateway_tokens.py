"""The agent tokens file: its format, its errors (by line, never showing a token), authentication."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from runner.errors import InputError
from runner.gateway.tokens import AgentTokens, load_agent_tokens, parse_agent_tokens
from runner.secrets import SecretFileError

TOKEN_A = "a" * 16 + "0123456789abcdef0123456789abcdef"
TOKEN_B = "7f3c2e9d8b1a4c6e5f0d2b3a9c8e7f6d5c4b3a2910fedcba"
FILE_TEXT = f"""\
# hpc-runner gateway: one agent per line, NAME:TOKEN

login-node-1:{TOKEN_A}
   login-node-2 : {TOKEN_B}
"""


def test_each_token_names_its_agent() -> None:
    tokens = parse_agent_tokens(FILE_TEXT, "tokens")
    assert tokens.names == ("login-node-1", "login-node-2")
    assert tokens.agent_for(TOKEN_A) == "login-node-1"
    assert tokens.agent_for(TOKEN_B) == "login-node-2"


@pytest.mark.parametrize("presented", ["", TOKEN_A[:-1], TOKEN_A + "x", TOKEN_A.upper(),
                                       " " + TOKEN_A + "\n1"])
def test_a_token_that_is_not_exactly_one_in_the_file_is_nobody(presented: str) -> None:
    assert parse_agent_tokens(FILE_TEXT, "tokens").agent_for(presented) is None


@pytest.mark.parametrize("header, agent", [
    (f"Bearer {TOKEN_A}", "login-node-1"),
    (f"bearer {TOKEN_B}", "login-node-2"),
    (f"Bearer   {TOKEN_A}  ", "login-node-1"),
    (f"Token {TOKEN_A}", None),
    (f"Basic {TOKEN_A}", None),
    (TOKEN_A, None),
    ("Bearer", None),
    ("Bearer ", None),
    ("", None),
    (None, None),
])
def test_the_authorization_header_must_be_a_bearer_token(header: str | None, agent: str | None) -> None:
    assert parse_agent_tokens(FILE_TEXT, "tokens").agent_for_header(header) == agent


@pytest.mark.parametrize("text, line, message", [
    (f"agent {TOKEN_A}\n", 1, "is not NAME:TOKEN"),
    (f"# x\n\n-agent:{TOKEN_A}\n", 3, "agent name '-agent' must be"),
    (f":{TOKEN_A}\n", 1, "agent name '' must be"),
    (f"a:{TOKEN_A}\na:{TOKEN_B}\n", 2, "agent 'a' is listed twice"),
    (f"a:{TOKEN_A}\nb:{TOKEN_A}\n", 2, "agent 'b' has the same token as agent 'a'"),
    ("a:short-token\n", 1, "shorter than 32 characters"),
    ("a:\n", 1, "the token of agent 'a' is empty"),
    (f"a:{TOKEN_A[:20]} {TOKEN_A[20:]}\n", 1, "has spaces"),
])
def test_a_bad_line_is_named_and_its_token_never_shown(text: str, line: int, message: str) -> None:
    with pytest.raises(InputError) as caught:
        parse_agent_tokens(text, "/etc/hpc-runner/gateway-agent-tokens")
    error = caught.value
    assert (error.file, error.line) == ("/etc/hpc-runner/gateway-agent-tokens", line)
    assert message in str(error)
    assert TOKEN_A[:20] not in str(error) and TOKEN_B[:20] not in str(error)


def test_a_file_without_agents_is_refused() -> None:
    with pytest.raises(InputError, match="lists no agent"):
        parse_agent_tokens("# nobody yet\n\n", "tokens")


def test_an_empty_token_table_cannot_be_built() -> None:
    with pytest.raises(ValueError):
        AgentTokens({})


def test_the_file_is_read_as_a_secret(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(FILE_TEXT)
    path.chmod(0o600)
    assert load_agent_tokens(path).agent_for(TOKEN_B) == "login-node-2"
    path.chmod(0o640)
    with pytest.raises(SecretFileError, match="chmod 600"):
        load_agent_tokens(path)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SecretFileError, match=str(tmp_path / "absent")):
        load_agent_tokens(tmp_path / "absent")
    assert not os.path.exists(tmp_path / "absent")
