"""`hpc-runner remote run|status|logs|cancel|audit`: a job on a cluster through the hub's jobs API.

For a CI step (GitHub Actions, GitLab CI, Buildkite) or anyone holding an OIDC ID token the hub
trusts. `remote run` exits as `hpc-runner run` does: the job's status, 124 timed out, 125 when the
job could not be run (the hub unreachable or refusing the token or the job), 126 denied, 130
cancelled. Job output goes to stdout exactly as written; hpc-runner's own lines to stderr.
`remote audit` prints the audit trail of the accounts the token administers, as `hpc-runner
audit` prints the agent's (the same lines, or with `--json` the same JSON lines).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from runner import exitcodes
from runner.auditlines import json_line, parse_since, text_line
from runner.commands.run import cancel_on_signals, write_stdout
from runner.errors import HpcRunnerError, InputError
from runner.remote.calls import (
    AUDIENCE_ENV,
    DEFAULT_AUDIENCE,
    HUB_ENV,
    NO_TOKEN_SOURCE,
    JobFile,
    ci_source,
    ending_lines,
    exit_status,
    load_job_file,
    requested_audience,
    submission_body,
    token_source,
)
from runner.remote.ci_tokens import obtain_token
from runner.remote.client import HubClient, HubRefused
from runner.urls import https_url


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "remote", help="run a job on a cluster through the hub, with a CI system's OIDC token "
                       "(exit: the job's status; 126 denied; 125 infrastructure; 130 cancelled)")
    sub = parser.add_subparsers(dest="remote_command", required=True,
                                metavar="{run,status,logs,cancel,audit}")
    run = sub.add_parser("run", help="submit a job file, stream its log, exit with its status")
    run.add_argument("job", metavar="JOB.toml")
    run.add_argument("--cluster", metavar="NAME", help="the cluster to run on (default: the hub's choice)")
    run.set_defaults(handler=run_remote)
    status = sub.add_parser("status", help="print a job's state")
    status.add_argument("--json", action="store_true", help="the hub's view of the job, as JSON")
    logs = sub.add_parser("logs", help="print a job's log")
    logs.add_argument("--follow", action="store_true", help="until the job ends")
    cancel = sub.add_parser("cancel", help="cancel a job")
    for command, handler in ((status, show_status), (logs, show_logs), (cancel, cancel_job)):
        command.add_argument("id", metavar="ID")
        command.set_defaults(handler=handler)
    audit = sub.add_parser("audit", help="the audit trail of the accounts the token administers")
    audit.add_argument("--account", metavar="A", help="only the entries of this account's jobs")
    audit.add_argument("--job", metavar="ID", help="only the entries about this job")
    audit.add_argument("--since", metavar="DATE",
                       help="only entries from then on: a date (2026-12-01, UTC) or an RFC 3339 time")
    audit.add_argument("--json", action="store_true", help="one JSON object per line, as `audit --json`")
    audit.set_defaults(handler=show_audit)
    for command in (run, status, logs, cancel, audit):
        command.add_argument("--hub", metavar="URL", default=os.environ.get(HUB_ENV),
                             help=f"the hub's URL (default: ${HUB_ENV})")
        command.add_argument("--token-file", metavar="F", help="a file holding the OIDC ID token (mode 0600)")
        command.add_argument("--token-env", metavar="NAME",
                             help="a variable holding the OIDC ID token (GitLab CI's id_tokens)")
        command.add_argument("--audience", metavar="A",
                             default=os.environ.get(AUDIENCE_ENV, DEFAULT_AUDIENCE),
                             help="the audience the hub's [[oidc]] issuer is configured with, asked of "
                                  f"GitHub Actions and Buildkite (default: ${AUDIENCE_ENV}, else "
                                  f"{DEFAULT_AUDIENCE!r}); `remote run` binds it to the job's digest")


def run_remote(args: argparse.Namespace) -> int:
    try:
        job = load_job_file(args.job)
    except InputError as exc:
        print(f"hpc-runner: {exc}", file=sys.stderr)
        return exitcodes.INFRASTRUCTURE
    return _with_client(args, requested_audience(args.audience, job.table), lambda hub: _run(hub, job, args))


async def _run(hub: HubClient, job: JobFile, args: argparse.Namespace) -> int:
    repository, commit = ci_source(os.environ)
    answer = await hub.submit(submission_body(job.table, cluster=args.cluster, repository=repository,
                                              commit=commit))
    job_id = str(answer.get("id"))
    print(f"hpc-runner: job {job_id} {answer.get('state')}: {answer.get('url')}", file=sys.stderr)
    cancelling = asyncio.create_task(_cancel_when_asked(hub, job_id, cancel_on_signals()))
    try:
        await hub.copy_log(job_id, lambda data: write_stdout(0, data), follow=True)
        view = await hub.job(job_id)
    finally:
        cancelling.cancel()
    for line in ending_lines(view):
        print(f"hpc-runner: {line}", file=sys.stderr)
    return exit_status(view)


async def _cancel_when_asked(hub: HubClient, job_id: str, asked: asyncio.Event) -> None:
    """On Ctrl-C or SIGTERM, ask the hub to cancel the job; its log streams on until it ends."""
    await asked.wait()
    print(f"hpc-runner: cancelling job {job_id}", file=sys.stderr)
    try:
        await hub.cancel(job_id)
    except HpcRunnerError as exc:
        print(f"hpc-runner: job {job_id} could not be cancelled: {exc}", file=sys.stderr)


def show_status(args: argparse.Namespace) -> int:
    async def status(hub: HubClient) -> int:
        view = await hub.job(args.id)
        if args.json:
            print(json.dumps(view, indent=2))
        else:
            _print_view(view)
        return exitcodes.OK
    return _with_client(args, args.audience, status)


def show_logs(args: argparse.Namespace) -> int:
    async def logs(hub: HubClient) -> int:
        await hub.copy_log(args.id, lambda data: write_stdout(0, data), follow=args.follow)
        return exitcodes.OK
    return _with_client(args, args.audience, logs)


def cancel_job(args: argparse.Namespace) -> int:
    async def cancel(hub: HubClient) -> int:
        view = await hub.cancel(args.id)
        print(f"hpc-runner: job {args.id} cancel requested ({view.get('state')})", file=sys.stderr)
        return exitcodes.OK
    return _with_client(args, args.audience, cancel)


def show_audit(args: argparse.Namespace) -> int:
    # Judged here as the hub judges it, so a typo is told without a token being fetched.
    try:
        if args.since is not None:
            parse_since(args.since)
    except InputError as exc:
        print(f"hpc-runner: {exc}", file=sys.stderr)
        return exitcodes.INVALID_INPUT

    def write(item: dict[str, Any]) -> None:
        sys.stdout.write(json_line(item) if args.json else text_line(item))

    async def audit(hub: HubClient) -> int:
        await hub.audit(write, account=args.account, job_id=args.job, since=args.since)
        sys.stdout.flush()
        return exitcodes.OK
    return _with_client(args, args.audience, audit)


def _print_view(view: dict[str, Any]) -> None:
    for key, value in view.items():
        if isinstance(value, list):
            value = "; ".join(map(str, value)) if value else None
        if value is not None:
            print(f"{key}: {value}")


def _with_client(args: argparse.Namespace, audience: str,
                 action: Callable[[HubClient], Awaitable[int]]) -> int:
    """`action` with a client of the hub holding the caller's token; 125 with the reason when the
    hub cannot be reached, or refuses the token or the request (the hub's `error` said)."""
    if not args.hub:
        print(f"hpc-runner: --hub URL is required (or set ${HUB_ENV})", file=sys.stderr)
        return exitcodes.USAGE
    try:
        hub_url = https_url(args.hub)
    except ValueError as exc:
        print(f"hpc-runner: --hub: {exc}", file=sys.stderr)
        return exitcodes.USAGE
    source = token_source(os.environ, token_file=args.token_file, token_env=args.token_env)
    if source is None:
        print(f"hpc-runner: {NO_TOKEN_SOURCE}", file=sys.stderr)
        return exitcodes.INFRASTRUCTURE

    async def connected() -> int:
        async with aiohttp.ClientSession() as http:
            token = await obtain_token(source, audience, env=os.environ, http=http)
            return await action(HubClient(http, hub_url, token))
    try:
        return asyncio.run(connected())
    except HubRefused as refused:
        what = "the token" if refused.status == 401 else "the request"
        print(f"hpc-runner: the hub refused {what} ({refused.status}): {refused.error}", file=sys.stderr)
    except HpcRunnerError as exc:
        print(f"hpc-runner: {exc}", file=sys.stderr)
    return exitcodes.INFRASTRUCTURE
