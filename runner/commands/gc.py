"""`hpc-runner gc`: remove the finished jobs' files `[retention]` says have expired, now.

The agent does the same once an hour; this is for an admin who needs the space back at once, or
wants to see (`--dry-run`) what would go. Job records and the audit log stay.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import TextIO

from runner import exitcodes, retention
from runner.commands.audit import open_state_store
from runner.config import AgentConfig, default_config, load_config
from runner.secrets import user_name


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("gc", help="remove finished jobs' files past their [retention]")
    parser.add_argument("--dry-run", action="store_true", help="only say what would go, and its size")
    parser.add_argument("--config", metavar="C", help="the agent config (default: the embedded default)")
    parser.set_defaults(handler=run_gc)


def run_gc(args: argparse.Namespace) -> int:
    config = load_config(args.config) if args.config else default_config()
    return collect(config, sys.stdout, dry_run=args.dry_run)


def collect(config: AgentConfig, out: TextIO, *, dry_run: bool,
            clock: Callable[[], float] = time.time) -> int:
    """Remove (or list, with `dry_run`) what has expired, one line each with its size; 1 when
    something could not be removed."""
    with open_state_store(config, "gc") as store:
        expired = retention.expired_now(config, store, clock())
        removed, failed = retention.remove_all(expired, dry_run=dry_run)
        if not dry_run:
            retention.audit_removals(store, removed, actor=f"hpc-runner gc ({user_name(os.geteuid())})")
    verb = "would remove" if dry_run else "removed"
    shown = [item for item in removed if dry_run or item.gone]
    for item in shown:
        out.write(f"{verb} {item.expired.path} ({retention.human_size(item.size)}; job "
                  f"{item.expired.job_id}, {item.expired.kind} expired)\n")
    for reason in failed:
        print(f"hpc-runner: cannot remove {reason}", file=sys.stderr)
    total = sum(item.size for item in shown)
    out.write(f"gc: {verb} {len(shown)} paths, {retention.human_size(total)}\n")
    return exitcodes.INVALID_INPUT if failed else exitcodes.OK
