"""`hpc-runner hub` (and its former name `hpc-runner gateway`): the one public piece, deployed where
CI systems and GitHub can reach it.

Agents on a login node accept no inbound connections; the hub receives GitHub's webhooks (with a
webhook secret) and jobs submitted to its REST API with an OIDC ID token (with a public URL and
`[[oidc]]` issuers), stores them, and agents take them with outbound long polls and publish their
jobs' states and logs back. Its section is `[hub]`; a `[gateway]` section is read as before. It
refuses to start (exit 1) without a section, with a secret file that is missing, open to others
or malformed, or with a public URL and no issuer to trust. SIGTERM (or Ctrl-C) stops it cleanly;
SIGHUP re-reads the agent tokens file (and keeps the old tokens if the new file is wrong). Its
messages name it as it was called.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import signal
import sys
from collections.abc import Callable, Sequence

from runner import exitcodes
from runner.config import FILE_DESCRIPTIONS, AgentConfig, HubConfig, MetricsConfig, load_config
from runner.errors import HpcRunnerError, InputError
from runner.gateway.callers import authenticator
from runner.gateway.hooks import HookTarget
from runner.gateway.server import GatewayServer, JobsApiSettings
from runner.gateway.tokens import AgentTokens, load_agent_tokens
from runner.logging_setup import get_logger
from runner.metrics import MetricsServer
from runner.metrics import hub as hub_metrics
from runner.oidc.verify import TokenVerifier
from runner.secrets import SecretFileError, read_secret_file
from runner.sqlitefile import StoreError
from runner.web.login import Login
from runner.web.sessions import load_session_key

log = get_logger("runner.gateway")

# GitHub asks for "a random string with high entropy"; a short one can be guessed offline from a
# single signed delivery.
MIN_SECRET_LENGTH = 16
NAMES = ("hub", "gateway")


class _Refusal(Exception):
    pass


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    hub = subparsers.add_parser(
        "hub", help="run the hub: GitHub's webhooks and the jobs REST API in, agents pull them")
    gateway = subparsers.add_parser(
        "gateway", help="the hub under its former name (the same command)")
    for parser in (hub, gateway):
        parser.add_argument("--config", metavar="FILE",
                            help="config file with a [hub] (or [gateway]) section")
        parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    name = args.command if args.command in NAMES else "hub"
    try:
        config = _config(args.config, name)
        hub = config.hub
        assert hub is not None
        secret = None if hub.webhook_secret_file is None else read_webhook_secret(hub)
        tokens = load_agent_tokens(hub.agent_tokens_file)
        jobs_api = _jobs_api(config, hub)
        hooks = read_hook_secrets(config)
    except (_Refusal, InputError, SecretFileError, StoreError) as exc:
        print(f"hpc-runner: refusing to start the {name}: {exc}", file=sys.stderr)
        return exitcodes.INVALID_INPUT
    return asyncio.run(serve(hub, secret, tokens, jobs_api=jobs_api, hooks=hooks, name=name,
                             metrics=config.metrics))


def _config(path: str | None, name: str) -> AgentConfig:
    if not path:
        raise _Refusal(f"it needs --config FILE, a config with a [{name}] section")
    config = load_config(path)
    if config.hub is None:
        if name == "gateway":
            raise _Refusal(f"{path} has no [gateway] section (listen, webhook_secret_file, "
                           "agent_tokens_file, state_dir)")
        raise _Refusal(f"{path} has no [hub] section (listen, state_dir, agent_tokens_file, public_url, "
                       "and webhook_secret_file to take GitHub's webhooks)")
    return config


def _jobs_api(config: AgentConfig, hub: HubConfig) -> JobsApiSettings | None:
    if hub.public_url is None:
        return None
    if not config.oidc:
        raise _Refusal(f"[{hub.section}] public_url serves the jobs API, whose callers are known by their "
                       "OIDC ID tokens: add an [[oidc]] table for each issuer to trust")
    # The dashboard's pages are served with the API; people log in at [login]'s provider.
    login = None if hub.login is None else Login(hub.login, hub.public_url)
    return JobsApiSettings(public_url=hub.public_url, authenticate=authenticator(TokenVerifier(config.oidc)),
                           session_key=load_session_key(hub.state_dir), login=login)


def read_hook_secrets(config: AgentConfig) -> list[HookTarget]:
    """Each `[[hooks]]` table with its secret, which must be as strong as a webhook secret."""
    targets = []
    for hook in config.hooks:
        secret = read_secret_file(hook.secret_file, what=FILE_DESCRIPTIONS["hooks.secret_file"])
        if len(secret) < MIN_SECRET_LENGTH:
            raise SecretFileError(
                f"hook secret {hook.secret_file} is shorter than {MIN_SECRET_LENGTH} characters",
                path=hook.secret_file,
                fix=f"write a random secret (`openssl rand -hex 32 > {hook.secret_file}`) and give the same "
                    "one to the hook's receiver")
        targets.append(HookTarget(hook, secret.encode("utf-8")))
    return targets


def read_webhook_secret(hub: HubConfig) -> str:
    path = hub.webhook_secret_file
    assert path is not None
    secret = read_secret_file(path, what=FILE_DESCRIPTIONS[f"{hub.section}.webhook_secret_file"])
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


async def serve(hub: HubConfig, secret: str | None, tokens: AgentTokens, *,
                jobs_api: JobsApiSettings | None = None, hooks: Sequence[HookTarget] = (), name: str = "hub",
                ready: Callable[[GatewayServer], None] | None = None,
                stop: asyncio.Event | None = None, metrics: MetricsConfig | None = None) -> int:
    """Serve until SIGTERM/SIGINT (or `stop`, set by an embedding caller); with `metrics`, its
    `/metrics` too, on that address."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    server = GatewayServer(state_dir=hub.state_dir, webhook_secret=secret, tokens=tokens, jobs_api=jobs_api,
                           hooks=hooks)

    def reload_tokens() -> None:
        try:
            server.replace_tokens(load_agent_tokens(hub.agent_tokens_file))
        except HpcRunnerError as exc:
            log.error("agent tokens not reloaded; the old ones stay in force", error=str(exc))
            return
        log.info("agent tokens reloaded", path=str(hub.agent_tokens_file))

    # Before listening: from then on a SIGTERM must stop the hub cleanly, not kill it.
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_tokens)
    metrics_server = None if metrics is None else MetricsServer(hub_metrics().registry, metrics.listen_host,
                                                                metrics.listen_port)
    try:
        where = f"{hub.listen_host}:{hub.listen_port}"
        try:
            await server.start(hub.listen_host, hub.listen_port)
            if metrics_server is not None:
                where = f"{metrics_server.host}:{metrics_server.port} ([metrics] listen)"
                await metrics_server.start()
        except (StoreError, OSError) as exc:
            await server.close()
            detail = str(exc) if isinstance(exc, StoreError) else f"cannot listen on {where}: {exc.strerror}"
            print(f"hpc-runner: refusing to start the {name}: {detail}", file=sys.stderr)
            return exitcodes.INVALID_INPUT
        log.info(f"{name} listening", host=hub.listen_host, port=server.port,
                 agents=list(tokens.names), state_dir=str(hub.state_dir), webhooks=secret is not None,
                 jobs_api=None if jobs_api is None else jobs_api.public_url)
        if not _is_loopback(hub.listen_host):
            log.warning(f"the {name} speaks plain HTTP: put a TLS-terminating proxy in front of it, "
                        "or agent tokens cross the network in the clear")
        if ready is not None:
            ready(server)
        await stop.wait()
        log.info(f"{name} stopping")
        if metrics_server is not None:
            await metrics_server.close()
        await server.close()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
    log.info(f"{name} stopped")
    return exitcodes.OK
