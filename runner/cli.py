"""`hpc-runner`: the command-line entry point (the commands and their exit statuses: README, "Commands")."""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from collections.abc import Sequence

from runner import __version__, exitcodes
from runner.commands import agent, audit, demo, doctor, gc, hub, policy, queue, records, remote, run
from runner.errors import HpcRunnerError, InputError
from runner.localqueue.client import RequestFailed
from runner.logging_setup import configure_logging

COMMANDS = (agent, run, queue, records, policy, doctor, demo, hub, remote, audit, gc)


def installed_version() -> str:
    """The installed distribution's version; the source tree's when it is run uninstalled."""
    try:
        return importlib.metadata.version("hpc-runner")
    except importlib.metadata.PackageNotFoundError:
        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpc-runner",
        description="A CI agent for HPC clusters: signed jobs, a capability policy, "
                    "Slurm and Apptainer with the host MPI, live logs back to the CI service.")
    parser.add_argument("--version", action="version", version=f"hpc-runner {installed_version()}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    configure_logging()
    args = build_parser().parse_args(argv)
    try:
        status: int = args.handler(args)
    except InputError as exc:
        print(f"hpc-runner: {exc}", file=sys.stderr)
        return exitcodes.INVALID_INPUT
    except RequestFailed as exc:
        print(f"hpc-runner: refused: {exc}", file=sys.stderr)
        return exitcodes.INVALID_INPUT
    except HpcRunnerError as exc:
        print(f"hpc-runner: {exc}", file=sys.stderr)
        return exitcodes.INFRASTRUCTURE
    except KeyboardInterrupt:
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
