"""The agent's side of the local queue socket."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from runner import retention
from runner.agent import Agent, NoRecord
from runner.errors import HpcRunnerError
from runner.identity import Identity
from runner.job import JobRecord
from runner.localqueue.paths import listen_at
from runner.localqueue.peercred import identity_for_uid, peer_uid_gid
from runner.localqueue.protocol import MAX_REQUEST_BYTES, ProtocolError, decode_request, encode
from runner.localqueue.records import job_view
from runner.logging_setup import ConditionLog, get_logger
from runner.logs.tail import follow
from runner.spec import JobSpec, parse_job_text
from runner.tasks import TaskSet, pause
from runner.tomlsource import check_size

log = get_logger("runner.localqueue")

# An open connection holds one of the agent's file descriptors: its request must arrive, whole,
# within this time, or the connection is closed.
REQUEST_TIMEOUT_SECONDS = 10.0
# Connections one user may hold open at once (`logs --follow` holds one while it runs); more are
# refused, so that no user can take the descriptors the agent needs for everyone else.
MAX_CONNECTIONS_PER_USER = 16
# Threads that parse submitted jobs, away from the event loop (the CI sources' heartbeats and
# polls run there); each user has at most one parse at a time.
PARSE_WORKERS = 2
# After a failed accept (the file table full: EMFILE), the next try waits for one of our
# connections to close, or this long; connections wait in the listen backlog meanwhile.
ACCEPT_RETRY_SECONDS = 1.0


def job_summary(record: JobRecord) -> dict[str, Any]:
    return {
        "id": record.id, "name": record.spec.get("name"), "state": str(record.state),
        "exit_status": record.exit_status, "detail": record.outcome_detail,
        "user": record.identity.get("user"), "account": (record.decision or {}).get("account"),
        "created_at": record.created_at, "finished_at": record.finished_at,
        "reasons": (record.decision or {}).get("reasons", []),
    }


class LocalQueueServer:
    def __init__(self, agent: Agent, path: Path, *, mode: int = 0o600,
                 request_timeout: float = REQUEST_TIMEOUT_SECONDS,
                 max_connections_per_user: int = MAX_CONNECTIONS_PER_USER) -> None:
        self.agent = agent
        self.path = path
        self.mode = mode
        self.request_timeout = request_timeout
        self.max_connections_per_user = max_connections_per_user
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._serving = TaskSet()   # a task per connection, held until it ends
        self._connection_closed = asyncio.Event()
        self._connections: Counter[int] = Counter()   # open connections by uid
        self._parsing: dict[int, asyncio.Lock] = {}    # one parse at a time by uid
        self._parser = ThreadPoolExecutor(max_workers=PARSE_WORKERS, thread_name_prefix="hpc-runner-parse")
        self._accept_failures = ConditionLog(log)
        self._over_cap = ConditionLog(log)

    async def start(self) -> None:
        self._listener = listen_at(self.path, self.mode)
        self._accepting = asyncio.create_task(self._accept_loop())
        log.info("local queue listening", socket=str(self.path))

    async def close(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.gather(self._accepting, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
        self._parser.shutdown(wait=False, cancel_futures=True)
        if self._listener is not None:  # ours: a start that failed must not remove a live agent's socket
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def _accept_loop(self) -> None:
        """Accept connections, each served by a task of its own. asyncio's own servers log every
        failed accept with a traceback, a hundred times a second while the file table is full;
        here the condition is logged when it starts and when it ends, with how often it occurred."""
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _address = await loop.sock_accept(self._listener)
            except OSError as exc:
                self._accept_failures.occurred(errno.errorcode.get(exc.errno or 0, str(exc.errno)),
                                               "local queue cannot accept connections", error=str(exc))
                self._connection_closed.clear()
                await pause(ACCEPT_RETRY_SECONDS, self._connection_closed)
                continue
            for condition in self._accept_failures.active():
                self._accept_failures.ended(condition, "local queue accepts connections again",
                                            quiet=ACCEPT_RETRY_SECONDS)
            # Counted here, in the order connections arrive, so that a burst over the cap is
            # answered and closed at once instead of each holding a descriptor for a while.
            uid = self._admit(conn)
            if uid is None:
                conn.close()
                continue
            self._serving.spawn(self._serve(conn, uid))

    def _admit(self, conn: socket.socket) -> int | None:
        """The uid of the connection's user, counted against their cap; None (after answering
        why) when they are over the cap."""
        try:
            _pid, uid, _gid = peer_uid_gid(conn)
        except OSError:
            return None
        held = self._connections[uid]
        if held < self.max_connections_per_user:
            self._connections[uid] += 1
            return uid
        self._over_cap.occurred(f"uid {uid}", "local queue refuses a user's connections over the cap",
                                uid=uid, cap=self.max_connections_per_user)
        refusal = encode({"ok": False, "error": (
            f"too many connections: uid {uid} already has {held} open with the agent "
            f"(at most {self.max_connections_per_user} at once); close some and try again")})
        with contextlib.suppress(OSError):  # a fresh connection's buffer takes it whole, unless it is gone
            conn.send(refusal)
        return None

    async def _serve(self, conn: socket.socket, uid: int) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=MAX_REQUEST_BYTES + 1)
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            transport, _ = await loop.connect_accepted_socket(lambda: protocol, conn)
        except OSError:
            conn.close()
        else:
            await self._handle(reader, asyncio.StreamWriter(transport, protocol, reader, loop))
        finally:
            self._release(uid)
            self._connection_closed.set()

    def _release(self, uid: int) -> None:
        self._connections[uid] -= 1
        if self._connections[uid] <= 0:
            del self._connections[uid]
            self._over_cap.ended(f"uid {uid}", "local queue takes a user's connections again", uid=uid)

    async def _read_request(self, reader: asyncio.StreamReader) -> dict[str, Any]:
        try:
            line = await asyncio.wait_for(reader.readline(), self.request_timeout)
        except TimeoutError:
            raise ProtocolError(f"no complete request within {self.request_timeout:g} s") from None
        except ValueError:  # the reader's limit: the line is longer than any request may be
            raise ProtocolError(f"request is larger than {MAX_REQUEST_BYTES} bytes") from None
        return decode_request(line)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            _pid, uid, _gid = peer_uid_gid(writer.get_extra_info("socket"))
            # The user and group databases may be LDAP or SSSD, which can take seconds to answer:
            # never on the event loop that serves every other client and the CI sources.
            identity = await asyncio.to_thread(identity_for_uid, uid)
            try:
                request = await self._read_request(reader)
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
            await self._submit(request, identity, uid, writer)
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
        elif op == "show":
            record = self.agent.job_for(identity, str(request.get("job_id", "")))
            writer.write(encode({"ok": True, "job": job_view(self.agent, record)}))
        elif op == "provenance":
            self._provenance(request, identity, writer)
        elif op == "replay":
            await self._replay(request, identity, uid, writer)

    def _provenance(self, request: dict[str, Any], identity: Identity, writer: asyncio.StreamWriter) -> None:
        try:
            _record, data = self.agent.provenance(identity, str(request.get("job_id", "")))
        except NoRecord as exc:
            writer.write(encode({"ok": False, "error": str(exc), "no_record": True}))
            return
        writer.write(encode({"ok": True, "bytes": len(data)}))
        writer.write(data)

    async def _replay(self, request: dict[str, Any], identity: Identity, uid: int,
                      writer: asyncio.StreamWriter) -> None:
        job_id, workdir = request.get("job_id"), request.get("workdir")
        if not isinstance(job_id, str) or not isinstance(workdir, str):
            raise ProtocolError("replay needs `job_id` and `workdir`")
        if not Path(workdir).is_absolute():
            raise ProtocolError("workdir must be an absolute path")
        owner = None if uid in (self.agent_uid, 0) else uid  # as for submit
        record, decision = await self.agent.replay(identity, job_id, Path(workdir), submitter_uid=owner)
        writer.write(encode({"ok": True, "job": job_summary(record), "decision": decision.to_json()}))

    async def _submit(self, request: dict[str, Any], identity: Identity, uid: int,
                      writer: asyncio.StreamWriter) -> None:
        text, name, workdir = request.get("job"), request.get("name", "<job>"), request.get("workdir")
        if not isinstance(text, str) or not isinstance(workdir, str) or not isinstance(name, str):
            raise ProtocolError("submit needs `job` (the TOML text), `name` and `workdir`")
        spec = await self._parse_job(text, name, uid)
        if not Path(workdir).is_absolute():
            raise ProtocolError("workdir must be an absolute path")
        # A submitter may only offer a directory they own (the agent must not become a way into
        # files its account can read and theirs cannot); the agent's own account and root any.
        owner = None if uid in (self.agent_uid, 0) else uid
        record, decision = await self.agent.submit(identity, spec, Path(workdir), submitter_uid=owner)
        writer.write(encode({"ok": True, "job": job_summary(record), "decision": decision.to_json()}))

    async def _parse_job(self, text: str, name: str, uid: int) -> JobSpec:
        """The job parsed on a worker thread: a large job keeps the parser busy for a second or
        two, which the event loop must not wait for. A user's next parse waits for their last,
        so that one user's burst of submissions queues behind itself, not in front of others."""
        check_size(text, name)
        async with self._parsing.setdefault(uid, asyncio.Lock()):
            return await asyncio.get_running_loop().run_in_executor(self._parser, parse_job_text, text, name)

    @property
    def agent_uid(self) -> int:
        return os.geteuid()

    def _log_gone(self, record: JobRecord) -> str | None:
        """Why an ended job's log file is no longer there, or None while it is (or may yet be)."""
        if not record.state.is_terminal or record.log_path is None or os.path.lexists(record.log_path):
            return None
        expired = any(entry.action == retention.AUDIT_ACTION
                      for entry in self.agent.store.audit_entries(job_id=record.id))
        if expired:
            return (f"the log of job {record.id} has expired: it was removed as [retention] logs says "
                    f"(the job's record remains: hpc-runner status {record.id})")
        return f"the log of job {record.id} ({record.log_path}) is gone: it was removed"

    async def _logs(self, request: dict[str, Any], identity: Identity, writer: asyncio.StreamWriter) -> None:
        job_id = str(request.get("job_id", ""))
        record = self.agent.job_for(identity, job_id)
        follow_log = bool(request.get("follow"))
        gone = self._log_gone(record)
        if gone is not None:
            writer.write(encode({"ok": False, "error": gone, "log_gone": True}))
            return
        writer.write(encode({"ok": True, "job": job_summary(record)}))
        if record.log_path is None:
            return

        def done() -> bool:
            if not follow_log:
                return True
            current = self.agent.job(job_id)
            return current is None or current.state.is_terminal

        path = Path(record.log_path)
        if not follow_log and not path.exists():
            return
        async for _offset, chunk in follow(path, done=done):
            writer.write(chunk)
            await writer.drain()
