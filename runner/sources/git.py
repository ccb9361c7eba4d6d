"""Running git for a checkout on the agent's node: a safe environment, a deadline, its output.

Each source checks out its own way (Buildkite with the service account's git credentials,
GitHub with the installation token for one fetch), on these shared pieces.
"""

from __future__ import annotations

import asyncio
import os
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path

from runner.errors import HpcRunnerError

CHECKOUT_TIMEOUT_S = 600.0


class CheckoutFailed(HpcRunnerError):
    """git could not produce the commit; `output` is what git said (credentials removed)."""

    def __init__(self, message: str, output: str) -> None:
        self.output = output
        super().__init__(message)


def git_environment(extra: Mapping[str, str] | None = None, *, user_config: bool) -> dict[str, str]:
    """The agent's environment for git, without its GIT_* variables, never prompting.

    `user_config` keeps the service account's git config (its credential helpers, for example);
    without it, neither the system's nor the user's config applies (a credential helper would
    store a token given for one fetch; a hooks path would run code).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    # Never wait for a password nobody will type; never ask ssh about an unknown host key.
    env.update({"GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "/bin/false", "LC_ALL": "C",
                "GIT_SSH_COMMAND": "ssh -o BatchMode=yes"})
    if not user_config:
        env.update({"GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null"})
    env.update(extra or {})
    return env


async def run_git(args: Sequence[str], *, cwd: Path | None, env: Mapping[str, str],
                  timeout: float = CHECKOUT_TIMEOUT_S) -> tuple[int, str]:
    """git's exit status and its output (stdout and stderr, as it interleaved them)."""
    process = await asyncio.create_subprocess_exec(
        "git", *args, cwd=cwd, env=dict(env), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        return 124, f"git {args[0]} took longer than {timeout:g} s and was stopped\n"
    return process.returncode or 0, out.decode("utf-8", "replace")


def without_credentials(url: str) -> str:
    """`https://user:token@host/x.git` without `user:token@`; other forms unchanged."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme in ("http", "https") and (parts.username or parts.password):
        host = parts.hostname or ""
        netloc = host + (f":{parts.port}" if parts.port else "")
        return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return url
