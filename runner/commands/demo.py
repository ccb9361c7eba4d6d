"""`hpc-runner demo`: the embedded default end to end."""

from __future__ import annotations

import argparse

from runner.demo.run import run_demo


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "demo", help="start an embedded agent, run the bundled examples, check their outcomes")
    parser.add_argument("--keep", action="store_true", help="keep the demo's state and logs")
    parser.set_defaults(handler=lambda args: run_demo(keep=args.keep))
