"""The agent's side of the local queue socket."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from pathlib import Path
from typing import Any

from runner.agent import Agent, NotAllowed
from runner.errors import HpcRunnerError, InfrastructureError, InputError
from runner.identity import Identity
from runner.localqueue.paths import check_socket_path
from runner.localqueue.peercred import identity_for_uid, peer_uid_gid
from runner.localqueue.protocol import MAX_REQUEST_BYTES, ProtocolError, decode_request, encode
from runner.logging_setup import get_logger
from runner.logs.tail import follow
from runner.spec import parse_job_text
from runner.store import JobRecord

log = get_logger("runner.localqueue")


def job_summary(record: JobRecord) -> dict[str, Any]:
    return {
        "id": record.id, "name": record.spec.get("name"), "state": str(record.state),
        "exit_status": record.exit_status, "detail": record.outcome_detail,
        "user": record.identity.get("user"), "account": (record.decision or {}).get("account"),
        "created_at": record.created_at, "finished_at": record.finished_at,
        "reasons": (record.decision or {}).get("reasons", []),
    }


class LocalQueueServer:
    def __init__(self, agent: Agent, path: Path, *, mode: int = 0o600) -> None:
        self.agent = agent
        self.path = path
        self.mode = mode
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        check_socket_path(self.path)
        # a socket for every local user needs a directory they can traverse
        self.path.parent.mkdir(mode=0o755 if self.mode & 0o066 else 0o700, parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            if _socket_alive(self.path):
                raise InputError(f"another agent is already listening on {self.path}")
            self.path.unlink()
        try:
            self._server = await asyncio.start_unix_server(self._handle, path=str(self.path),
                                                           limit=MAX_REQUEST_BYTES + 1)
        except OSError as exc:
            raise InfrastructureError(f"cannot listen on {self.path}: {exc.strerror or exc}") from None
        os.chmod(self.path, self.mode)
        log.info("local queue listening", socket=str(self.path))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            _pid, uid, gid = peer_uid_gid(writer.get_extra_info("socket"))
            identity = identity_for_uid(uid, gid)
            try:
                request = decode_request(await reader.readline())
                await self._dispatch(request, identity, uid, writer)
            except (ProtocolError, HpcRunnerError, ValueError) as exc:
                writer.write(encode({"ok": False, "error": str(exc)}))
            except Exception as exc:
                # The caller still gets an answer; the agent keeps serving everyone else.
                log.exception("local queue request failed", user=identity.user)
                writer.write(encode({"ok": False, "error": f"internal error in the agent: {exc}"}))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _dispatch(self, request: dict[str, Any], identity: Identity, uid: int,
                        writer: asyncio.StreamWriter) -> None:
        op = request["op"]
        if op == "ping":
            writer.write(encode({"ok": True, "user": identity.user, "groups": list(identity.groups)}))
        elif op == "submit":
            self._submit(request, identity, uid, writer)
        elif op == "status":
            if request.get("job_id"):
                records = [self.agent.job_for(identity, str(request["job_id"]))]
            else:
                records = self.agent.visible_jobs(identity)
            writer.write(encode({"ok": True, "jobs": [job_summary(r) for r in records]}))
        elif op == "cancel":
            record = self.agent.cancel(identity, str(request.get("job_id", "")))
            writer.write(encode({"ok": True, "job": job_summary(record)}))
        elif op == "logs":
            await self._logs(request, identity, writer)

    def _submit(self, request: dict[str, Any], identity: Identity, uid: int,
                writer: asyncio.StreamWriter) -> None:
        text, name, workdir = request.get("job"), request.get("name", "<job>"), request.get("workdir")
        if not isinstance(text, str) or not isinstance(workdir, str) or not isinstance(name, str):
            raise ProtocolError("submit needs `job` (the TOML text), `name` and `workdir`")
        spec = parse_job_text(text, name)
        workspace = _owned_workspace(Path(workdir), uid, self.agent_uid)
        # Checked again when the job starts: the directory must still be the submitter's then.
        owner = None if uid in (self.agent_uid, 0) else uid
        record, decision = self.agent.submit(identity, spec, workspace, workspace_owner=owner)
        writer.write(encode({"ok": True, "job": job_summary(record), "decision": decision.to_json()}))

    @property
    def agent_uid(self) -> int:
        return os.geteuid()

    async def _logs(self, request: dict[str, Any], identity: Identity, writer: asyncio.StreamWriter) -> None:
        job_id = str(request.get("job_id", ""))
        record = self.agent.job_for(identity, job_id)
        follow_log = bool(request.get("follow"))
        writer.write(encode({"ok": True, "job": job_summary(record)}))
        if record.log_path is None:
            return

        def done() -> bool:
            if not follow_log:
                return True
            current = self.agent.store.get_job(job_id)
            return current is None or current.state.is_terminal

        path = Path(record.log_path)
        if not follow_log and not path.exists():
            return
        async for _offset, chunk in follow(path, done=done):
            writer.write(chunk)
            await writer.drain()


def _owned_workspace(workdir: Path, uid: int, agent_uid: int) -> Path:
    """A submitter may only offer a directory they own: the agent must not become a way
    into files its own account can read and theirs cannot. Returns it with symlinks resolved."""
    if not workdir.is_absolute():
        raise ProtocolError("workdir must be an absolute path")
    real = Path(os.path.realpath(workdir))
    try:
        info = real.stat()
    except OSError as exc:
        raise InputError(f"workspace {workdir}: {exc.strerror}") from None
    if not real.is_dir():
        raise InputError(f"workspace {workdir} is not a directory")
    if info.st_uid != uid and uid not in (agent_uid, 0):
        raise NotAllowed(f"workspace {workdir} is owned by uid {info.st_uid}, not by you (uid {uid})")
    return real


def _socket_alive(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1)
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True
