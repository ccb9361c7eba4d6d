"""`hpc-runner agent`: the long-running agent (embedded default: local queue, local executor)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from runner import exitcodes
from runner.config import default_config, load_config
from runner.errors import InputError
from runner.logging_setup import get_logger
from runner.secrets import SecretFileError
from runner.serve import raise_open_file_limit, serve
from runner.site_policy import load_site_policy
from runner.sources.api.source import check_api
from runner.sources.buildkite.source import load_trust
from runner.sources.github.source import check_github

log = get_logger("runner.agent")


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("agent", help="run the long-running agent")
    parser.add_argument("--config", metavar="FILE", help="agent config (default: the embedded default)")
    parser.set_defaults(handler=run)


def hub_note(section: str) -> str:
    """What the agent says of a [hub] (or [gateway]) section in its config."""
    command = "gateway" if section == "gateway" else "hub"
    return (f"the config's [{section}] section is served by `hpc-runner {command}`, not by the agent; "
            "the agent leaves it alone")


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config) if args.config else default_config()
        if config.hub is not None:
            # A site may keep one config for both; saying so keeps anyone from expecting the
            # agent (on a login node, outbound only) to listen for webhooks.
            print(f"hpc-runner: note: {hub_note(config.hub.section)}", file=sys.stderr)
        policy = load_site_policy(config)
        if config.buildkite is not None:
            # Unreadable or open secrets stop the agent before it takes any job.
            load_trust(config.buildkite)
        if config.github is not None:
            check_github(config.github)
        if config.api is not None:
            check_api(config.api)
    except (InputError, SecretFileError, OSError) as exc:
        print(f"hpc-runner: refusing to start: {exc}", file=sys.stderr)
        return exitcodes.INVALID_INPUT
    raise_open_file_limit()
    return asyncio.run(serve(config, policy, lambda: load_site_policy(config),
                             grace_seconds=config.sandbox.grace_period))
