"""Checking out a Buildkite job's repository at its commit, on the agent's node.

Compute nodes need no network: the agent clones `BUILDKITE_REPO` into the job's workspace with
the service account's own git credentials (ssh keys, credential helpers), and nothing of them
ends up in the workspace: a URL's user and password are removed from the clone's config.

The branch (or pull request) a job names is what the policy decided on, but Buildkite asserts it
and no signature covers it, nor the commit: so the commit must be reachable from that ref in the
repository itself, or the job is refused before anything of it runs. A tag build's commit must be
the tag's own commit.
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

__all__ = ["CheckoutFailed", "CommitNotOnRef", "checkout", "without_credentials"]

_SHA = re.compile(r"[0-9a-f]{7,64}")
# Where the claimed ref is fetched to in the clone: a name no branch or tag of origin can take.
_CLAIMED = "refs/hpc-runner/claimed"
_TAGS = "refs/tags/"


class CommitNotOnRef(CheckoutFailed):
    """The commit is not reachable from the ref the job claims: the job must not run."""


async def _git(*args: str, cwd: Path | None = None, timeout: float = CHECKOUT_TIMEOUT_S) -> tuple[int, str]:
    # The service account's own git config: its ssh keys and credential helpers open the repository.
    return await run_git(args, cwd=cwd, env=git_environment(user_config=True), timeout=timeout)


async def checkout(repository: str, commit: str, workspace: Path, *, ref: str | None = None,
                   timeout: float = CHECKOUT_TIMEOUT_S) -> str:
    """Clone `repository` into `workspace` (new, or empty) and check out `commit`; git's output.

    `ref` is the ref the job claims (`refs/heads/B`, a tag's `refs/tags/T`, or a pull request's
    `refs/pull/N/head`): it is fetched, and `commit` must be reachable from it, or for a tag be
    its commit (CommitNotOnRef otherwise). `commit` may be a sha or `HEAD` (Buildkite sends HEAD
    before it knows the sha): the tip of `ref` (a tag's commit), or without one the repository's
    default branch.
    """
    target = _commit(commit)
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
    if ref is not None:
        await _fetch_claimed(repository, ref, workspace, transcript, timeout)
        if target == "HEAD":
            target = _CLAIMED
    if target != "HEAD" and (await _git("cat-file", "-e", f"{target}^{{commit}}", cwd=workspace))[0] != 0 \
            and _SHA.fullmatch(target):
        code, out = await _git("fetch", "--quiet", "origin", target, cwd=workspace, timeout=timeout)
        transcript.append(out)
    if ref is not None:
        # Checked before the tree is written: nothing of a commit from elsewhere reaches the workspace.
        target = await _reachable_from_claimed(repository, target, ref, workspace, transcript)
    # `--` ends the options and says that `target` is the commit, not a path.
    code, out = await _git("checkout", "--quiet", "--force", "--detach", target, "--", cwd=workspace)
    transcript.append(out)
    if code != 0:
        raise CheckoutFailed(f"git could not check out {target} of {without_credentials(repository)}"
                             f" (exit {code})", "".join(transcript))
    clean = without_credentials(repository)
    if clean != repository:
        await _git("remote", "set-url", "origin", clean, cwd=workspace)
    return "".join(transcript)


def _commit(commit: str) -> str:
    """`HEAD` or a SHA (lower case); anything else is refused before git sees it, where a value
    such as `-f` or `--orphan=x` would be taken as one of git's options."""
    target = commit or "HEAD"
    if target != "HEAD" and not _SHA.fullmatch(target.lower()):
        raise CheckoutFailed(f"{target!r} is not a commit SHA (hexadecimal) or HEAD, so it is not checked "
                             "out: a job names its commit by its SHA", "")
    return target if target == "HEAD" else target.lower()


async def _fetch_claimed(repository: str, ref: str, workspace: Path, transcript: list[str],
                         timeout: float) -> None:
    """Fetch `ref` of origin to `_CLAIMED`; a ref git would not accept is refused."""
    # A branch name is Buildkite's word: one that is no valid ref (a `:` would change the refspec)
    # never reaches a fetch.
    if (await _git("check-ref-format", ref, cwd=workspace))[0] != 0:
        raise CommitNotOnRef(f"{ref!r} is not a valid git ref", "".join(transcript))
    code, out = await _git("fetch", "--quiet", "--no-tags", "origin", f"+{ref}:{_CLAIMED}", cwd=workspace,
                           timeout=timeout)
    transcript.append(out)
    if code != 0:
        raise CheckoutFailed(f"git could not fetch {ref} of {without_credentials(repository)} (exit {code}), "
                             "so the job's commit cannot be checked against it", "".join(transcript))


async def _reachable_from_claimed(repository: str, target: str, ref: str, workspace: Path,
                                  transcript: list[str]) -> str:
    """The sha of `target`, which must be reachable from the claimed ref (CommitNotOnRef if not)."""
    code, out = await _git("rev-parse", "--verify", "--quiet", f"{target}^{{commit}}", cwd=workspace)
    if code != 0:
        raise CheckoutFailed(f"git could not check out {target} of {without_credentials(repository)}: "
                             "no such commit", "".join(transcript))
    sha = out.strip()
    if ref.startswith(_TAGS):
        return await _is_the_tags_commit(repository, sha, ref, workspace, transcript)
    code, out = await _git("merge-base", "--is-ancestor", sha, _CLAIMED, cwd=workspace)
    if code == 1:
        raise CommitNotOnRef(f"commit {sha} is not on {ref} of {without_credentials(repository)}: a job runs "
                             "only a commit of the branch (or pull request) the policy decided on",
                             "".join(transcript))
    if code != 0:
        transcript.append(out)
        raise CheckoutFailed(f"git could not tell whether {sha} is on {ref} (exit {code})",
                             "".join(transcript))
    return sha


async def _is_the_tags_commit(repository: str, sha: str, ref: str, workspace: Path,
                              transcript: list[str]) -> str:
    """`sha`, which must be the commit the claimed tag points to (CommitNotOnRef if not).

    Equality, not reachability: a tag names one commit, and "reachable from the tag" would let a
    grant for release tags run any older commit of the tag's history, one never released among
    them. The tag is peeled (`^{commit}`): a release's annotated tag is a tag object, not a commit.
    """
    code, out = await _git("rev-parse", "--verify", "--quiet", f"{_CLAIMED}^{{commit}}", cwd=workspace)
    if code != 0:
        raise CommitNotOnRef(f"{ref} of {without_credentials(repository)} does not point to a commit",
                             "".join(transcript))
    tagged = out.strip()
    if sha != tagged:
        raise CommitNotOnRef(f"commit {sha} is not {tagged}, the commit {ref} of "
                             f"{without_credentials(repository)} points to: a tag build runs only its "
                             "tag's commit", "".join(transcript))
    return sha
