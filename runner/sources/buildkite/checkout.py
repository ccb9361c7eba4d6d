"""Checking out a Buildkite job's repository at its commit, on the agent's node.

Compute nodes need no network: the agent clones `BUILDKITE_REPO` into the job's workspace with
the service account's own git credentials (ssh keys, credential helpers), and nothing of them
ends up in the workspace: a URL's user and password are removed from the clone's config.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path

from runner.sources.git import (
    CHECKOUT_TIMEOUT_S,
    CheckoutFailed,
    git_environment,
    run_git,
    without_credentials,
)

__all__ = ["CheckoutFailed", "checkout", "without_credentials"]

_SHA = re.compile(r"[0-9a-f]{7,64}")


async def _git(*args: str, cwd: Path | None = None, timeout: float = CHECKOUT_TIMEOUT_S) -> tuple[int, str]:
    # The service account's own git config: its ssh keys and credential helpers open the repository.
    return await run_git(args, cwd=cwd, env=git_environment(user_config=True), timeout=timeout)


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
