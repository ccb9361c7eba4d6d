"""Checking out the commit under test into a job's workspace, on the agent's node.

The installation token opens the repository for this one fetch and nothing else: it reaches git
as an `http.<origin>.extraHeader` in git's environment (`GIT_CONFIG_COUNT`/`KEY`/`VALUE`), which
applies to the repository's own origin only (never to a redirect elsewhere or a submodule on
another host), never appears on a command line (visible to every user of a login node in `ps`) and
is never written to the workspace's `.git/config`. Jobs cannot read the agent's environment: they
run in their own PID namespace on a compute node.

The commit is fetched by its ref (`refs/pull/N/head` for pull requests, which the base repository
holds for forks too, or the branch) and checked out detached at exactly the confirmed SHA; a SHA the
ref does not reach is fetched by id.
"""

from __future__ import annotations

import asyncio
import base64
import re
import shutil
import urllib.parse
from pathlib import Path

from runner.sources.git import (
    CHECKOUT_TIMEOUT_S,
    CheckoutFailed,
    git_environment,
    run_git,
    without_credentials,
)

__all__ = ["CheckoutFailed", "auth_environment", "checkout"]

_SHA = re.compile(r"[0-9a-f]{40}")


def auth_environment(clone_url: str, token: str | None) -> dict[str, str]:
    """git config, through the environment, that sends the token to `clone_url`'s origin only."""
    parts = urllib.parse.urlsplit(clone_url)
    if token is None or parts.scheme not in ("https", "http") or not parts.hostname:
        return {}
    origin = f"{parts.scheme}://{parts.netloc}/"
    basic = base64.b64encode(f"x-access-token:{token}".encode()).decode()
    return {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": f"http.{origin}.extraHeader",
            "GIT_CONFIG_VALUE_0": f"Authorization: Basic {basic}"}


def _scrub(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[REDACTED]")
    return text


async def checkout(clone_url: str, sha: str, workspace: Path, *, ref: str | None, token: str | None,
                   timeout: float = CHECKOUT_TIMEOUT_S) -> str:
    """Make `workspace` a repository with `sha` checked out (detached); git's output.

    `ref` (`refs/pull/12/head`, `refs/heads/main`) is fetched first; the token, if any, is used for
    the fetches only.
    """
    if not _SHA.fullmatch(sha):
        raise CheckoutFailed(f"{sha!r} is not a commit SHA", "")
    if workspace.exists():
        # A restarted agent finds its own earlier attempt: start again from nothing.
        await asyncio.to_thread(shutil.rmtree, workspace)
    workspace.mkdir(mode=0o700, parents=True)
    secrets = [token or ""]
    # Neither the system's nor the service account's git config: a credential helper there would
    # store the token, a hooks path would run code.
    plain = git_environment(user_config=False)
    authed = git_environment(auth_environment(clone_url, token), user_config=False)
    transcript: list[str] = []

    async def step(args: list[str], env: dict[str, str]) -> int:
        code, out = await run_git(args, cwd=workspace, env=env, timeout=timeout)
        transcript.append(_scrub(out, secrets))
        return code

    if await step(["init", "--quiet"], plain) \
            or await step(["remote", "add", "--", "origin", clone_url], plain):
        raise CheckoutFailed("git could not set up the workspace", "".join(transcript))
    wanted = [f"+{ref}:refs/remotes/origin/hpc-runner-head"] if ref else []
    code = await step(["fetch", "--quiet", "--no-tags", "origin", *wanted], authed) if wanted else 1
    have = code == 0 and (await step(["cat-file", "-e", f"{sha}^{{commit}}"], plain)) == 0
    if not have:
        code = await step(["fetch", "--quiet", "--no-tags", "origin", sha], authed)
        if code != 0:
            raise CheckoutFailed(f"git could not fetch commit {sha[:12]} from "
                                 f"{without_credentials(clone_url)} (exit {code})", "".join(transcript))
    # `--` ends the options and says that `sha` is the commit, not a path.
    if await step(["checkout", "--quiet", "--force", "--detach", sha, "--"], plain):
        raise CheckoutFailed(f"git could not check out {sha[:12]}", "".join(transcript))
    return "".join(transcript)
