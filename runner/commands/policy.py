"""`hpc-runner policy check` and `hpc-runner policy explain`."""

from __future__ import annotations

import argparse
import json
import os
import sys

from runner import exitcodes
from runner.errors import InputError
from runner.identity import Identity, load_identity
from runner.localqueue.peercred import identity_for_uid
from runner.policy import decide, load_policy
from runner.spec import load_job


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("policy", help="validate policies and explain decisions")
    sub = parser.add_subparsers(dest="policy_command", required=True, metavar="{check,explain}")
    check = sub.add_parser("check", help="validate policy files (exit 0 valid, 1 invalid)")
    check.add_argument("files", nargs="+", metavar="FILE")
    check.set_defaults(handler=run_check)
    explain = sub.add_parser("explain",
                             help="print the decision for a job as JSON (exit 0 allowed, 126 denied)")
    explain.add_argument("--policy", required=True, metavar="P")
    explain.add_argument("--job", required=True, metavar="J")
    explain.add_argument("--identity", metavar="I.json",
                         help="the identity to decide for (default: the invoking local user)")
    explain.set_defaults(handler=run_explain)


def run_check(args: argparse.Namespace) -> int:
    status = exitcodes.OK
    for file in args.files:
        try:
            policy = load_policy(file)
        except InputError as exc:
            print(f"invalid: {exc}", file=sys.stderr)
            status = exitcodes.INVALID_INPUT
            continue
        print(f"valid: {file} ({len(policy.accounts)} accounts, {len(policy.images)} images, "
              f"{len(policy.grants)} grants)")
    return status


def local_identity() -> Identity:
    """The invoking user and their groups, as the embedded local queue sees them.

    Taken from the process's real uid and the system's group database, never from `$USER` or
    `$LOGNAME`, which anyone can set to someone else's name, nor from the process's gids, which
    a setgid program or `sg` can make groups the user does not belong to.
    """
    return identity_for_uid(os.getuid())


def run_explain(args: argparse.Namespace) -> int:
    try:
        policy = load_policy(args.policy)
        job = load_job(args.job)
        identity = load_identity(args.identity) if args.identity else local_identity()
    except InputError as exc:
        print(f"invalid: {exc}", file=sys.stderr)
        return exitcodes.INVALID_INPUT
    decision = decide(policy, identity, job)
    print(json.dumps(decision.to_json(), indent=2))
    return exitcodes.OK if decision.allowed else exitcodes.DENIED
