"""Who may see and cancel a job at the hub, as keys a job and a caller share (pure functions).

A job is visible to the identity that submitted it, to the admins of its account and to the
members of its account; only the first two may cancel it. "The identity that submitted it" is
what the token says the job came from, not who pressed the button: its principals of repository,
pipeline or project kind (`github:repo:O/R`, `buildkite:pipeline:O/P`, `gitlab:project:G/P`), so
that any later token of the same repository or pipeline may follow and cancel the job. An
identity with none of those (a site IdP's user) owns its jobs by its `idp:user:` principal. A
token's `sub` is never compared.

The admins are principal patterns of the agent's policy (`github:team:O/T`, `github:repo:O/*`),
as the agent publishes them with its decision; the members are the principal patterns of the
policy's grants that spend the account (whoever may run jobs on it may follow its jobs, not stop
another's). Each becomes keys of the job, kept with its role (`ROLES`); a caller's keys are its
principals and, for each two-part one, the trailing wildcard of its owner (`github:repo:O/*`,
`gitlab:project:G/SG/*`), which is exactly what a pattern of the policy matches
(`runner.principals`: exact names, GitHub's without regard to case, and `/*` for one further
segment). A job is visible when the two share a key of any role, and cancellable when they share
one of `CANCELLING_ROLES`, which the job store can ask SQLite with an index.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum

from runner.principals import parse_principal

# The roles a key of a job has (`job_access.role` in the job store).
OWNER, ADMIN, MEMBER = "owner", "admin", "member"
ROLES = (OWNER, ADMIN, MEMBER)
CANCELLING_ROLES = (OWNER, ADMIN)

OWNER_KINDS = frozenset({"repo", "pipeline", "project"})
# The kind that owns the jobs of an identity with no repository, pipeline or project.
FALLBACK_OWNERS = ("idp:user:",)


def _parts(principal: str) -> tuple[str, str, str]:
    source, _, rest = principal.partition(":")
    kind, _, value = rest.partition(":")
    return source, kind, value


def normalise(principal: str) -> str:
    """The key of a principal or pattern: GitHub names compare without regard to case."""
    return principal.lower() if principal.startswith("github:") else principal


def owner_keys(principals: Iterable[str]) -> tuple[str, ...]:
    """The keys that own a job submitted with these principals (see the module's text)."""
    held = list(principals)
    owners = [p for p in held if _parts(p)[1] in OWNER_KINDS]
    if not owners:
        owners = [p for p in held if p.startswith(FALLBACK_OWNERS)]
    return tuple(sorted({normalise(p) for p in owners}))


def admin_keys(patterns: Iterable[str], *, what: str = "admins") -> tuple[str, ...]:
    """The keys of an account's admin (or member) patterns; ValueError naming one that is no
    principal, under `what`."""
    keys: set[str] = set()
    for text in patterns:
        try:
            pattern = parse_principal(text)
        except ValueError as exc:
            raise ValueError(f"{what}: {exc}") from None
        keys.add(normalise(str(pattern)))
    return tuple(sorted(keys))


def caller_keys(principals: Iterable[str]) -> tuple[str, ...]:
    """The keys a caller holding these principals matches (its names and their owners' wildcards)."""
    keys: set[str] = set()
    for principal in principals:
        keys.add(normalise(principal))
        source, kind, value = _parts(principal)
        # The owner is all but the last part: an organisation (`O/R`), or a GitLab project's
        # group path (`G/SG/P`), as `runner.principals` reads a pattern's.
        owner, slash, name = value.rpartition("/")
        if slash and owner and name:
            keys.add(normalise(f"{source}:{kind}:{owner}/*"))
    return tuple(sorted(keys))


def member_keys(patterns: Iterable[str]) -> tuple[str, ...]:
    """The keys of an account's members (its grants' principal patterns)."""
    return admin_keys(patterns, what="members")


def may_access(job_keys: Iterable[str], caller: Iterable[str]) -> bool:
    return not set(job_keys).isdisjoint(caller)


class Access(Enum):
    """What a caller may do with a job."""

    NONE = "none"           # not even know it is there (404)
    SEE = "see"             # look at it and its log, not cancel it (a member)
    CANCEL = "cancel"       # look and cancel (its submitter, its account's admins)


def access_of(keys_by_role: Iterable[tuple[str, str]], caller: Iterable[str]) -> Access:
    """What a caller holding the keys `caller` may do with a job whose keys are `keys_by_role`
    ((role, key) pairs): the one rule of the REST API and the dashboard."""
    held = set(caller)
    roles = {role for role, key in keys_by_role if key in held}
    if roles & set(CANCELLING_ROLES):
        return Access.CANCEL
    return Access.SEE if roles else Access.NONE


NOT_CANCELLABLE = "only its submitter and its account's admins may cancel job {job_id}"
