"""`show`, `provenance`, `verify-outputs` and `replay`: what a job ran, and running it again, through
the running agent's local queue (README, "What did I run")."""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

from runner import exitcodes
from runner.errors import InputError
from runner.localqueue.client import LocalQueueClient, NoRecord, client_for
from runner.provenance.statement import subjects

CHUNK = 1024 * 1024
_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Non-blocking: a FIFO put where a file was expected must not hang the check.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    show = subparsers.add_parser("show", help="what a job ran: its trigger, image, outputs and record")
    show.add_argument("job_id", metavar="ID")
    show.add_argument("--json", action="store_true", help="one JSON object")
    show.set_defaults(handler=run_show)
    provenance = subparsers.add_parser(
        "provenance", help="a job's provenance record (in-toto, SLSA), byte for byte as stored")
    provenance.add_argument("job_id", metavar="ID")
    provenance.set_defaults(handler=run_provenance)
    verify = subparsers.add_parser(
        "verify-outputs", help="check files in DIR against the outputs a job's record names")
    verify.add_argument("job_id", metavar="ID")
    verify.add_argument("directory", metavar="DIR")
    verify.set_defaults(handler=run_verify_outputs)
    replay = subparsers.add_parser(
        "replay", help="queue a job's spec again on the running agent, as yourself; prints its id")
    replay.add_argument("job_id", metavar="ID")
    replay.add_argument("--workdir", metavar="DIR",
                        help="the new job's workspace (default: the current directory); a checkout of "
                             "the original's commit when its record names one")
    replay.set_defaults(handler=run_replay)
    for parser in (show, provenance, verify, replay):
        parser.add_argument("--config", metavar="C", help="the agent's config (tells where its socket is)")


def _client(args: argparse.Namespace) -> LocalQueueClient:
    return client_for(args.config)


# -- provenance --------------------------------------------------------------------------------


def run_provenance(args: argparse.Namespace) -> int:
    try:
        data = _client(args).provenance(args.job_id)
    except NoRecord as exc:
        print(f"hpc-runner: {exc}", file=sys.stderr)
        return exitcodes.INVALID_INPUT
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
    return exitcodes.OK


# -- verify-outputs ----------------------------------------------------------------------------


def run_verify_outputs(args: argparse.Namespace) -> int:
    try:
        data = _client(args).provenance(args.job_id)
    except NoRecord as exc:
        print(f"hpc-runner: {exc}", file=sys.stderr)
        return exitcodes.INVALID_INPUT
    try:
        statement = json.loads(data)
    except ValueError:
        raise InputError(f"the record of job {args.job_id} is not JSON") from None
    try:
        outputs = subjects(statement if isinstance(statement, dict) else {})
    except (AttributeError, TypeError):
        raise InputError(f"the record of job {args.job_id} has subjects that are not objects") from None
    try:
        top = os.open(args.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise InputError(exc.strerror or str(exc), file=args.directory) from None
    failed = 0
    try:
        for output in outputs:
            verdict = check_output(top, output.path, output.sha256)
            failed += verdict != "ok"
            print(f"{_shown(output.path)}: {verdict}")
    finally:
        os.close(top)
    if not outputs:
        print(f"hpc-runner: the record of job {args.job_id} names no outputs", file=sys.stderr)
    if failed:
        print(f"hpc-runner: {failed} of {len(outputs)} outputs of job {args.job_id} do not match its record",
              file=sys.stderr)
        return exitcodes.CHECK_FAILED
    return exitcodes.OK


def unsafe_path(path: str) -> str | None:
    """Why a path from a record cannot name a file under the directory checked, or None. A record is
    data: its paths must not lead the check out of that directory."""
    if not path or "\x00" in path:
        return "an empty path or one with NUL"
    if path.startswith("/"):
        return "an absolute path"
    if any(part in ("", ".", "..") for part in path.split("/")):
        return "not a plain relative path (it has '..', '.' or empty parts)"
    return None


def check_output(top: int, path: str, recorded: str) -> str:
    """`ok`, or what is wrong with the file at `path` under the directory `top`: every step is opened
    without following links, so a link in the directory cannot lead the check out of it."""
    unsafe = unsafe_path(path)
    if unsafe is not None:
        return f"refused: the record's path is {unsafe}"
    opened = _open_under(top, path.split("/"))
    if isinstance(opened, str):
        return opened
    try:
        if not stat.S_ISREG(os.fstat(opened).st_mode):
            return "not a regular file"
        digest = hashlib.sha256()
        while chunk := os.read(opened, CHUNK):
            digest.update(chunk)
    except OSError as exc:
        return f"cannot be read: {exc.strerror}"
    finally:
        os.close(opened)
    found = digest.hexdigest()
    return "ok" if found == recorded else f"differs: sha256 {found}, the record says {recorded}"


def _open_under(top: int, parts: list[str]) -> int | str:
    """The file's descriptor, or the verdict on why there is none."""
    fd = os.dup(top)
    try:
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            try:
                info = os.stat(part, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                return "missing"
            except OSError as exc:
                return f"cannot be read: {exc.strerror}"
            if stat.S_ISLNK(info.st_mode):
                where = "it is" if last else f"{'/'.join(parts[:index + 1])} is"
                return f"not checked: {where} a symbolic link, which is not followed"
            if not last and not stat.S_ISDIR(info.st_mode):
                return "missing"
            try:
                child = os.open(part, _FILE_FLAGS if last else _DIRECTORY_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # swapped for a link meanwhile
                    return "not checked: a symbolic link on its path, which is not followed"
                if exc.errno == errno.ENOENT:
                    return "missing"
                return f"cannot be read: {exc.strerror}"
            os.close(fd)
            fd = child
        return os.dup(fd)
    finally:
        os.close(fd)


def _shown(path: str) -> str:
    """A path as it may be printed on a terminal: control characters escaped."""
    return path if path.isprintable() else json.dumps(path)


# -- replay ------------------------------------------------------------------------------------


def run_replay(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir or ".").resolve()
    reply = _client(args).request({"op": "replay", "job_id": args.job_id, "workdir": str(workdir)})
    job, decision = reply["job"], reply["decision"]
    if not decision["allowed"]:
        print("denied by policy:", file=sys.stderr)
        for reason in decision["reasons"]:
            print(f"  - {reason}", file=sys.stderr)
        print(job["id"])
        return exitcodes.DENIED
    print(job["id"])
    return exitcodes.OK


# -- show --------------------------------------------------------------------------------------


def run_show(args: argparse.Namespace) -> int:
    view = _client(args).request({"op": "show", "job_id": args.job_id})["job"]
    if args.json:
        print(json.dumps(view, indent=2, sort_keys=True))
    else:
        print(format_view(view), end="")
    return exitcodes.OK


def _seconds(value: Any) -> str:
    return "-" if value is None else f"{float(value):.1f} s"


def format_view(view: dict[str, Any]) -> str:
    """`show`'s lines for a person."""
    lines: list[str] = []

    def add(label: str, text: str) -> None:
        lines.append(f"{label:<12}{text}")

    exit_status = "" if view.get("exit_status") is None else f", exit status {view['exit_status']}"
    detail = view.get("detail")
    said = detail and detail != f"exit status {view.get('exit_status')}"  # not twice
    lines.append(f"job {view['id']} ({view.get('name')}): {view.get('state')}{exit_status}"
                 + (f" ({detail})" if said else ""))
    trigger = view.get("trigger") or {}
    add("source", f"{view.get('source')}" + (f", by {trigger['actor']}" if trigger.get("actor") else ""))
    what = [f"{key} {trigger[key]}" for key in ("repository", "commit", "ref", "event") if trigger.get(key)]
    if what:
        add("trigger", ", ".join(what))
    if trigger.get("url"):
        add("link", str(trigger["url"]))
    account = f", account {view['account']}" if view.get("account") else ""
    slurm = [f"{key.replace('_', ' ')} {view[key]}" for key in ("slurm_account", "partition")
             if view.get(key)]
    add("grant", f"{view.get('grant') or '-'}{account}" + (f" ({', '.join(slurm)})" if slurm else ""))
    image = view.get("image") or {}
    add("image", f"{image.get('name') or '-'} {image.get('path') or ''}"
        + (f" sha256 {image['sha256']}" if image.get("sha256") else ""))
    if view.get("slurm_job_ids") or view.get("nodes"):
        ids = ", ".join(view.get("slurm_job_ids") or []) or "-"
        add("slurm", f"job {ids}" + (f" on {view['nodes']}" if view.get("nodes") else ""))
    add("times", f"waited {_seconds(view.get('queue_wait_seconds'))}, "
        f"ran {_seconds(view.get('run_seconds'))}")
    outputs = view.get("outputs") or []
    for index, output in enumerate(outputs):
        add("outputs" if index == 0 else "",
            f"{_shown(str(output['path']))}  sha256 {output['sha256']}  {output['size']} bytes")
    for index, item in enumerate(view.get("outputs_left_out") or []):
        add("left out" if index == 0 else "", f"{_shown(str(item.get('path')))}: {item.get('why')}")
    replay_of = view.get("replay_of")
    if replay_of:
        add("replay of", f"job {replay_of.get('job_id')} "
            f"(its record's sha256 {replay_of.get('provenance_sha256')})")
    if view.get("recorded"):
        add("record", f"sha256 {view.get('provenance_sha256')} (hpc-runner provenance {view['id']})")
        add("replay", str(view.get("replay_command")))
    else:
        add("record", f"none: {view.get('no_record')}")
    return "\n".join(lines) + "\n"
