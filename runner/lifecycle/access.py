"""Who may see and cancel a job: its submitter, an admin of its account, and the agent's own user."""

from __future__ import annotations

import pwd

from runner.errors import HpcRunnerError
from runner.identity import Identity
from runner.job import JobRecord
from runner.policy import Policy


class NotAllowed(HpcRunnerError):
    """The caller may not do this (for example cancel another user's job)."""


class UnknownJob(HpcRunnerError):
    pass


def may_control(policy: Policy, identity: Identity, record: JobRecord, *, agent_uid: int) -> bool:
    """The submitter, an admin of the job's account (as the policy names them), or the agent's
    own user (or root) on this machine."""
    if identity.user is not None and record.identity.get("user") == identity.user \
            and record.identity.get("source") == identity.source:
        return True
    if identity.source == "local" and identity.user is not None:
        try:
            if pwd.getpwnam(identity.user).pw_uid in (agent_uid, 0):
                return True
        except KeyError:
            pass
    account = (record.decision or {}).get("account")
    if account:
        principals = identity.principals()
        return any(admin.matches(p) for admin in policy.admins_of(account) for p in principals)
    return False


def refuse_unless_allowed(policy: Policy, identity: Identity, record: JobRecord, *, agent_uid: int) -> None:
    if not may_control(policy, identity, record, agent_uid=agent_uid):
        raise NotAllowed(f"job {record.id} belongs to {record.identity.get('user', '?')}; only they "
                         "or an admin of its account may see or cancel it")
