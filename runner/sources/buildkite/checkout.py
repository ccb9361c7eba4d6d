"""Checking out a Buildkite job's repository at its commit, on the agent's node.

Compute nodes need no network: the agent clones `BUILDKITE_REPO` into the job's workspace with
the service account's own git credentials (ssh keys, credential helpers), and nothing of them
ends up in the workspace: a URL's user and password are removed from the clone's config.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import urllib.parse
from pathlib import Path

from runner.errors import HpcRunnerError

CHECKOUT_TIMEOUT_S = 600.0
_SHA = re.compile(r"[0-9a-f]{7,64}")


class CheckoutFailed(HpcRunnerError):
    """git could not produce the commit; `output` is what git said."""

    def __init__(self, message: str, output: str) -> None:
        self.output = output
        super().__init__(message)


def without_credentials(url: str) -> str:
    """`https://user:token@host/x.git` without `user:token@`; other forms unchanged."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme in ("http", "https") and (parts.username or parts.password):
        host = parts.hostname or ""
        netloc = host + (f":{parts.port}" if parts.port else "")
        return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return url


def _git_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    # Never wait for a password nobody will type; never ask ssh to confirm an unknown host key.
    env.update({"GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "/bin/false", "LC_ALL": "C"})
    env.setdefault("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
    return env


async def _git(*args: str, cwd: Path | None = None, timeout: float = CHECKOUT_TIMEOUT_S) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        "git", *args, cwd=cwd, env=_git_env(), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        return 124, f"git {args[0]} took longer than {timeout:g} s and was stopped\n"
    return process.returncode or 0, out.decode("utf-8", "replace")


async def checkout(repository: str, commit: str, workspace: Path, *, refspec: str | None = None,
                   timeout: float = CHECKOUT_TIMEOUT_S) -> str:
    """Clone `repository` into `workspace` (new, or empty) and check out `commit`; git's output.

    `commit` may be a sha or `HEAD` (Buildkite sends HEAD before it knows the sha); `refspec`
    (a pull request's `refs/pull/N/head`) is fetched when the commit is not on a branch.
    """
    if workspace.exists():
        # A restarted agent finds its own earlier attempt: start again from nothing.
        await asyncio.to_thread(shutil.rmtree, workspace)
    workspace.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    transcript = []
    code, out = await _git("clone", "--no-checkout", "--", repository, str(workspace), timeout=timeout)
    transcript.append(out)
    if code != 0:
        raise CheckoutFailed(f"git clone of {without_credentials(repository)} failed (exit {code})",
                             "".join(transcript))
    target = commit or "HEAD"
    if target != "HEAD" and (await _git("cat-file", "-e", f"{target}^{{commit}}", cwd=workspace))[0] != 0:
        wanted = [target] if _SHA.fullmatch(target) else []
        if refspec:
            wanted.append(refspec)
        if wanted:
            code, out = await _git("fetch", "--quiet", "origin", *wanted, cwd=workspace, timeout=timeout)
            transcript.append(out)
    code, out = await _git("checkout", "--quiet", "--force", "--detach", target, cwd=workspace)
    transcript.append(out)
    if code != 0:
        raise CheckoutFailed(f"git could not check out {target} of {without_credentials(repository)}"
                             f" (exit {code})", "".join(transcript))
    clean = without_credentials(repository)
    if clean != repository:
        await _git("remote", "set-url", "origin", clean, cwd=workspace)
    return "".join(transcript)
