"""`hpc-runner doctor [--config C] [--json]`: preflight of this host for the agent."""

from __future__ import annotations

import argparse
import json

from runner.doctor import Host, doctor, exit_status, render_text


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "doctor", help="preflight: apptainer, Slurm, MPI, policy, keys, file permissions (exit 0 all good)")
    parser.add_argument("--config", metavar="C", help="the agent config (default: the embedded default)")
    parser.add_argument("--json", action="store_true", help="print the checks as a JSON list")
    parser.set_defaults(handler=run_doctor)


def run_doctor(args: argparse.Namespace, host: Host | None = None) -> int:
    checks = doctor(args.config, host or Host())
    if args.json:
        print(json.dumps([check.to_json() for check in checks], indent=2))
    else:
        print(render_text(checks))
    return exit_status(checks)
