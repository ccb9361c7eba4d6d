"""`submit`, `status`, `logs` and `cancel`: talk to the running agent's local queue."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from runner import exitcodes
from runner.errors import InputError
from runner.localqueue.client import LocalQueueClient, LogGone, client_for
from runner.spec import parse_job_text


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    submit = subparsers.add_parser("submit", help="queue a job on the running agent; prints its id")
    submit.add_argument("job", metavar="JOB.toml")
    submit.add_argument("--workdir", metavar="DIR",
                        help="the job's workspace (default: the current directory)")
    submit.set_defaults(handler=run_submit)
    status = subparsers.add_parser("status", help="show your jobs, or one job")
    status.add_argument("job_id", nargs="?", metavar="ID")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=run_status)
    logs = subparsers.add_parser("logs", help="print a job's log exactly as the job wrote it")
    logs.add_argument("job_id", metavar="ID")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    logs.set_defaults(handler=run_logs)
    cancel = subparsers.add_parser("cancel", help="cancel a queued or running job")
    cancel.add_argument("job_id", metavar="ID")
    cancel.set_defaults(handler=run_cancel)
    for parser in (submit, status, logs, cancel):
        parser.add_argument("--config", metavar="C", help="the agent's config (tells where its socket is)")


def _client(args: argparse.Namespace) -> LocalQueueClient:
    return client_for(args.config)


def run_submit(args: argparse.Namespace) -> int:
    # An unreadable or invalid job file is an InputError naming it; main reports it like any other.
    try:
        text = Path(args.job).read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(exc.strerror or str(exc), file=args.job) from None
    parse_job_text(text, args.job)  # fail early, before the agent sees the job
    workdir = Path(args.workdir or ".").resolve()
    reply = _client(args).request({"op": "submit", "job": text, "name": args.job, "workdir": str(workdir)})
    job, decision = reply["job"], reply["decision"]
    if not decision["allowed"]:
        print("denied by policy:", file=sys.stderr)
        for reason in decision["reasons"]:
            print(f"  - {reason}", file=sys.stderr)
        print(job["id"])
        return exitcodes.DENIED
    print(job["id"])
    return exitcodes.OK


def _format_time(stamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp)) if stamp else "-"


def _print_jobs(jobs: list[dict[str, Any]]) -> None:
    header = f"{'ID':<14} {'NAME':<20} {'STATE':<12} {'EXIT':>4}  {'USER':<12} {'SUBMITTED':<19}"
    print(header)
    for job in jobs:
        exit_status = "-" if job["exit_status"] is None else str(job["exit_status"])
        print(f"{job['id']:<14} {str(job['name'])[:20]:<20} {job['state']:<12} {exit_status:>4}  "
              f"{str(job['user'])[:12]:<12} {_format_time(job['created_at']):<19}")
        if job["state"] == "denied":
            for reason in job["reasons"]:
                print(f"{'':<14} - {reason}")


def run_status(args: argparse.Namespace) -> int:
    request: dict[str, Any] = {"op": "status"}
    if args.job_id:
        request["job_id"] = args.job_id
    jobs = _client(args).request(request)["jobs"]
    if args.json:
        print(json.dumps(jobs, indent=2))
    else:
        _print_jobs(jobs)
    return exitcodes.OK


def run_logs(args: argparse.Namespace) -> int:
    out = sys.stdout.buffer
    try:
        for chunk in _client(args).stream_logs(args.job_id, follow=args.follow):
            out.write(chunk)
            out.flush()
    except LogGone as exc:
        print(f"hpc-runner: {exc}", file=sys.stderr)
        return exitcodes.INVALID_INPUT
    return exitcodes.OK


def run_cancel(args: argparse.Namespace) -> int:
    job = _client(args).request({"op": "cancel", "job_id": args.job_id})["job"]
    print(f"{job['id']} {job['state']}")
    return exitcodes.OK
