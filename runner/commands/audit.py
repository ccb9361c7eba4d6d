"""`hpc-runner audit`: the audit trail, each entry with the job it is about.

Who asked (the job's principal), through which source and grant, which account it spent, its
Slurm id and how it ended, beside the entry's own actor, action and detail. One readable line per
entry, or with `--json` one JSON object per line (the same keys every time, times in RFC 3339 UTC)
for a SIEM to take in; the line format is `runner.auditlines`, which the hub's audit trail shares.
The audit log lives in the agent's private state dir: only its account reads it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from typing import Any, TextIO

from runner import exitcodes
from runner.auditlines import KEYS, entry, json_line, parse_since, text_line
from runner.config import AgentConfig, default_config, load_config
from runner.errors import InputError
from runner.identity import identity_from_json
from runner.job import JobRecord
from runner.secrets import user_name
from runner.store import DB_FILENAME, AuditEntry, Store

__all__ = ["KEYS", "add_parser", "open_state_store", "parse_since", "run_audit", "trail", "write_trail"]

# Entries read from the store at a time: the log only grows, and a SIEM export may take all of it.
BATCH = 1000


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "audit", help="the audit trail: who ran what, through which grant and account")
    parser.add_argument("--job", metavar="ID", help="only the entries about this job")
    parser.add_argument("--since", metavar="DATE",
                        help="only entries from then on: a date (2026-12-01, UTC) or an RFC 3339 time")
    parser.add_argument("--account", metavar="A", help="only the entries of jobs that spent this account")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--config", metavar="C", help="the agent config (default: the embedded default)")
    parser.set_defaults(handler=run_audit)


def run_audit(args: argparse.Namespace) -> int:
    since = parse_since(args.since) if args.since is not None else None
    config = load_config(args.config) if args.config else default_config()
    with open_state_store(config, "audit") as store:
        write_trail(store, sys.stdout, job_id=args.job, since=since, account=args.account, as_json=args.json)
    return exitcodes.OK


def open_state_store(config: AgentConfig, command: str) -> Store:
    """The agent's store, opened only by the account that owns its state dir: anyone else cannot
    read it, and root would leave files in it the agent cannot write."""
    state_dir = config.state_dir
    try:
        owner = os.stat(state_dir).st_uid
    except FileNotFoundError:
        raise InputError(f"no state dir at {state_dir}: the agent has not run with this config "
                         "(give its config with --config)") from None
    except OSError as exc:
        raise InputError(f"cannot read the state dir {state_dir}: {exc.strerror}") from None
    if owner != os.geteuid():
        name = user_name(owner)
        raise InputError(f"the state dir {state_dir} belongs to {name}: only {name}, the agent's account, "
                         f"may read it (run `sudo -u {name} hpc-runner {command} ...`)")
    if not (state_dir / DB_FILENAME).exists():
        raise InputError(f"no state database in {state_dir}: the agent has not run with this config")
    return Store.open(state_dir)


def principal_of(job: JobRecord) -> str | None:
    try:
        return identity_from_json(job.identity).actor_principal
    except InputError:  # recorded by an older version: its name as it was given
        for key in ("user", "actor"):
            name = job.identity.get(key)
            if isinstance(name, str):
                return f"{job.identity.get('source', job.source)}:user:{name}"
        return None


def entries(store: Store, *, job_id: str | None = None) -> Iterator[AuditEntry]:
    after = 0
    while batch := store.audit_entries(job_id=job_id, since_seq=after, limit=BATCH):
        yield from batch
        after = batch[-1].seq


def trail(store: Store, *, job_id: str | None = None, since: float | None = None,
          account: str | None = None) -> Iterator[dict[str, Any]]:
    """Each entry with its job's facts, oldest first, as a `--json` line's object."""
    jobs: dict[str, JobRecord | None] = {}
    for logged in entries(store, job_id=job_id):
        if since is not None and logged.at < since:
            continue
        job = None
        if logged.job_id is not None:
            if logged.job_id not in jobs:
                jobs[logged.job_id] = store.get_job(logged.job_id)
            job = jobs[logged.job_id]
        decision = (job.decision if job is not None else None) or {}
        if account is not None and decision.get("account") != account:
            continue
        yield entry(
            seq=logged.seq, at=logged.at, action=logged.action, actor=logged.actor, job_id=logged.job_id,
            source=job.source if job else None, principal=principal_of(job) if job else None,
            grant=decision.get("grant"), account=decision.get("account"),
            slurm_id=job.slurm_id if job else None, state=str(job.state) if job else None,
            exit_status=job.exit_status if job else None, detail=logged.detail)


def write_trail(store: Store, out: TextIO, *, job_id: str | None = None, since: float | None = None,
                account: str | None = None, as_json: bool = False) -> int:
    """Write the trail to `out`; how many entries it held."""
    count = 0
    for item in trail(store, job_id=job_id, since=since, account=account):
        out.write(json_line(item) if as_json else text_line(item))
        count += 1
    return count
