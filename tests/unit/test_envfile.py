"""The env file: every value reaches the job byte for byte, whatever it contains."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from sandbox.envfile import EnvFileError, render_env_file, single_quote

HOSTILE = {
    "SUBST": "$(touch /tmp/pwned)",
    "BACKTICKS": "`id`",
    "QUOTES": "it's \"quoted\"",
    "NEWLINES": "line1\nline2\n",
    "EMPTY": "",
    "BRACES": "${HOME}",
    "BACKSLASHES": "a\\b\\\\c\\",
    "SPACES": "  lead and trail  ",
    "LONE_QUOTE": "'",
    "UNICODE": "ünï€ode",
    "GLOB": "*",
    "SEMICOLON": "a; rm -rf /",
}


def parse_assignments(text: str) -> dict[str, str]:
    """Read the file back the way a POSIX shell tokenises it."""
    return dict(token.split("=", 1) for token in shlex.split(text))


def test_lines_are_sorted_and_always_single_quoted() -> None:
    text = render_env_file({"B": "2", "A": "plain", "C": "/usr/bin:/bin"})
    assert text == "A='plain'\nB='2'\nC='/usr/bin:/bin'\n"


def test_empty_environment_is_an_empty_file() -> None:
    assert render_env_file({}) == ""


def test_a_quote_is_closed_escaped_and_reopened() -> None:
    assert single_quote("it's") == "'it'\"'\"'s'"


def test_hostile_values_round_trip_through_shell_tokenising() -> None:
    assert parse_assignments(render_env_file(HOSTILE)) == HOSTILE


def test_hostile_values_survive_a_real_shell(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    env = {**HOSTILE, "SUBST": f"$(touch {marker})", "TICKS": f"`touch {marker}`"}
    env_file = tmp_path / "env"
    env_file.write_text(render_env_file(env))
    done = subprocess.run(["/bin/sh", "-c", f"set -a; . {shlex.quote(str(env_file))}; exec env -0"],
                          env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, check=True)
    got = dict(item.split("=", 1) for item in done.stdout.split("\0") if item)
    for name, value in env.items():
        assert got[name] == value, name
    assert not marker.exists()


@pytest.mark.parametrize("name", ["", "1ABC", "A-B", "A B", "A=B", "A\nB", "A\x00B", "Ä", "A\n"])
def test_names_that_are_not_shell_names_are_refused(name: str) -> None:
    with pytest.raises(EnvFileError, match="not a shell name"):
        render_env_file({name: "x"})


def test_a_nul_in_a_value_is_refused() -> None:
    with pytest.raises(EnvFileError, match="NUL"):
        render_env_file({"A": "x\x00y"})
