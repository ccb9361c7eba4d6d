"""`hpc-runner audit`: the audit trail, each entry with the job it is about.

Who asked (the job's principal), through which source and grant, which account it spent, its
Slurm id and how it ended, beside the entry's own actor, action and detail. One readable line per
entry, or with `--json` one JSON object per line (the same keys every time, times in RFC 3339 UTC)
for a SIEM to take in. The audit log lives in the agent's private state dir: only its account reads it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Iterator
from typing import Any, TextIO

from runner import exitcodes
from runner.config import AgentConfig, default_config, load_config
from runner.errors import InputError
from runner.identity import identity_from_json
from runner.job import JobRecord
from runner.secrets import user_name
from runner.store import DB_FILENAME, AuditEntry, Store

# Entries read from the store at a time: the log only grows, and a SIEM export may take all of it.
BATCH = 1000
# The keys of a `--json` line, in this order, every one on every line (null when unknown).
KEYS = ("seq", "time", "action", "actor", "job_id", "source", "principal", "grant", "account",
        "slurm_id", "state", "exit_status", "detail")


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


def parse_since(text: str) -> float:
    """Seconds since the epoch from a date (midnight UTC) or an RFC 3339 time with its offset."""
    value = text.strip()
    try:
        if len(value) == 10:
            day = dt.date.fromisoformat(value)
            return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp()
        moment = dt.datetime.fromisoformat(value.replace("z", "Z"))
    except ValueError:
        moment = None
    if moment is None or "T" not in value.upper() or moment.tzinfo is None:
        raise InputError(f"--since {text!r} is neither a date (2026-12-01) nor an RFC 3339 time with its "
                         "offset (2026-12-01T08:00:00Z, 2026-12-01T09:00:00+01:00)")
    return moment.timestamp()


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


def rfc3339(seconds: float) -> str:
    moment = dt.datetime.fromtimestamp(seconds, dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


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
    for entry in entries(store, job_id=job_id):
        if since is not None and entry.at < since:
            continue
        job = None
        if entry.job_id is not None:
            if entry.job_id not in jobs:
                jobs[entry.job_id] = store.get_job(entry.job_id)
            job = jobs[entry.job_id]
        decision = (job.decision if job is not None else None) or {}
        if account is not None and decision.get("account") != account:
            continue
        yield {
            "seq": entry.seq, "time": rfc3339(entry.at), "action": entry.action, "actor": entry.actor,
            "job_id": entry.job_id,
            "source": job.source if job else None,
            "principal": principal_of(job) if job else None,
            "grant": decision.get("grant"), "account": decision.get("account"),
            "slurm_id": job.slurm_id if job else None,
            "state": str(job.state) if job else None,
            "exit_status": job.exit_status if job else None,
            "detail": entry.detail,
        }


def render_line(item: dict[str, Any]) -> str:
    about = f" job {item['job_id']}" if item["job_id"] else ""
    facts = [f"{key} {item[key]}" for key in ("source", "principal", "grant", "account") if item[key]]
    if item["slurm_id"]:
        facts.append(f"slurm {item['slurm_id']}")
    if item["state"]:
        ended = "" if item["exit_status"] is None else f" (exit {item['exit_status']})"
        facts.append(f"now {item['state']}{ended}")
    job = f" [{', '.join(facts)}]" if facts else ""
    detail = json.dumps(item["detail"], sort_keys=True, separators=(",", ":")) if item["detail"] else ""
    return f"{item['time']} #{item['seq']} {item['action']}{about} by {item['actor']}{job}" + \
        (f" {detail}" if detail else "")


def write_trail(store: Store, out: TextIO, *, job_id: str | None = None, since: float | None = None,
                account: str | None = None, as_json: bool = False) -> int:
    """Write the trail to `out`; how many entries it held."""
    count = 0
    for item in trail(store, job_id=job_id, since=since, account=account):
        if as_json:
            out.write(json.dumps({key: item[key] for key in KEYS}, separators=(",", ":")) + "\n")
        else:
            out.write(render_line(item) + "\n")
        count += 1
    return count
