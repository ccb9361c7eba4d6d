"""`hpc-runner gateway`: the GitHub webhook gateway, deployed where GitHub can reach it.

Agents on a login node accept no inbound connections; the gateway receives GitHub's webhooks,
stores the verified ones in its durable queue, and agents take them with outbound long polls.
It refuses to start (exit 1) without a `[gateway]` section or with a secret file that is
missing, open to others or malformed. SIGTERM (or Ctrl-C) stops it cleanly; SIGHUP re-reads
the agent tokens file (and keeps the old tokens if the new file is wrong).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import signal
import sys
from collections.abc import Callable

from runner import exitcodes
from runner.config import FILE_DESCRIPTIONS, GatewayConfig, load_config
from runner.errors import HpcRunnerError, InputError
from runner.gateway.server import GatewayServer
from runner.gateway.tokens import AgentTokens, load_agent_tokens
from runner.logging_setup import get_logger
from runner.secrets import SecretFileError, read_secret_file
from runner.sqlitefile import StoreError

log = get_logger("runner.gateway")

# GitHub asks for "a random string with high entropy"; a short one can be guessed offline from a
# single signed delivery.
MIN_SECRET_LENGTH = 16


class _Refusal(Exception):
    pass


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "gateway", help="run the GitHub webhook gateway (stores verified deliveries; agents pull them)")
    parser.add_argument("--config", metavar="FILE", help="config file with a [gateway] section")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        gateway = _gateway_config(args.config)
        secret = read_webhook_secret(gateway)
        tokens = load_agent_tokens(gateway.agent_tokens_file)
    except (_Refusal, InputError, SecretFileError) as exc:
        print(f"hpc-runner: refusing to start the gateway: {exc}", file=sys.stderr)
        return exitcodes.INVALID_INPUT
    return asyncio.run(serve(gateway, secret, tokens))


def _gateway_config(path: str | None) -> GatewayConfig:
    if not path:
        raise _Refusal("it needs --config FILE, a config with a [gateway] section")
    config = load_config(path)
    if config.gateway is None:
        raise _Refusal(f"{path} has no [gateway] section (listen, webhook_secret_file, "
                       "agent_tokens_file, state_dir)")
    return config.gateway


def read_webhook_secret(gateway: GatewayConfig) -> str:
    path = gateway.webhook_secret_file
    secret = read_secret_file(path, what=FILE_DESCRIPTIONS["gateway.webhook_secret_file"])
    if len(secret) < MIN_SECRET_LENGTH:
        raise SecretFileError(
            f"GitHub webhook secret {path} is shorter than {MIN_SECRET_LENGTH} characters", path=path,
            fix=f"write a random secret (`openssl rand -hex 32 > {path}`) and set the same one on "
                "GitHub's webhook")
    return secret


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host.lower() == "localhost"


async def serve(gateway: GatewayConfig, secret: str, tokens: AgentTokens, *,
                ready: Callable[[GatewayServer], None] | None = None,
                stop: asyncio.Event | None = None) -> int:
    """Serve until SIGTERM/SIGINT (or `stop`, set by an embedding caller)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    server = GatewayServer(state_dir=gateway.state_dir, webhook_secret=secret, tokens=tokens)

    def reload_tokens() -> None:
        try:
            server.replace_tokens(load_agent_tokens(gateway.agent_tokens_file))
        except HpcRunnerError as exc:
            log.error("agent tokens not reloaded; the old ones stay in force", error=str(exc))
            return
        log.info("agent tokens reloaded", path=str(gateway.agent_tokens_file))

    # Before listening: from then on a SIGTERM must stop the gateway cleanly, not kill it.
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_tokens)
    try:
        try:
            await server.start(gateway.listen_host, gateway.listen_port)
        except (StoreError, OSError) as exc:
            await server.close()
            where = f"{gateway.listen_host}:{gateway.listen_port}"
            detail = str(exc) if isinstance(exc, StoreError) else f"cannot listen on {where}: {exc.strerror}"
            print(f"hpc-runner: refusing to start the gateway: {detail}", file=sys.stderr)
            return exitcodes.INVALID_INPUT
        log.info("gateway listening", host=gateway.listen_host, port=server.port,
                 agents=list(tokens.names), state_dir=str(gateway.state_dir))
        if not _is_loopback(gateway.listen_host):
            log.warning("the gateway speaks plain HTTP: put a TLS-terminating proxy in front of it, "
                        "or agent tokens cross the network in the clear")
        if ready is not None:
            ready(server)
        await stop.wait()
        log.info("gateway stopping")
        await server.close()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
    log.info("gateway stopped")
    return exitcodes.OK
