"""`hpc-runner policy check` and `hpc-runner policy explain`."""

from __future__ import annotations

import argparse
import grp
import json
import os
import pwd
import sys

from runner import exitcodes
from runner.errors import InputError
from runner.identity import Identity, load_identity
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
    """The invoking user and their groups, as the embedded local queue would see them.

    Taken from the process's real uid and group list, never from `$USER` or `$LOGNAME`,
    which anyone can set to someone else's name.
    """
    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:        # a uid without a passwd entry: no grant can name it
        user = str(os.getuid())
    gids = {*os.getgroups(), os.getgid()}
    groups = sorted({grp.getgrgid(gid).gr_name for gid in gids if _has_group(gid)})
    return Identity(source="local", user=user, groups=tuple(groups))


def _has_group(gid: int) -> bool:
    try:
        grp.getgrgid(gid)
    except KeyError:
        return False
    return True


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
