"""The CLI's side of the local queue socket."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from runner.config import default_config, load_config
from runner.errors import HpcRunnerError
from runner.localqueue.paths import check_socket_path
from runner.localqueue.protocol import ProtocolError, decode_response, encode

CONNECT_RETRY_SECONDS = 0.01


class AgentUnavailable(HpcRunnerError):
    pass


class RequestFailed(HpcRunnerError):
    pass


class LogGone(RequestFailed):
    """The job ended and its log file was removed (its `[retention]` expired)."""


class NoRecord(RequestFailed):
    """The job has no provenance record (yet): still running, never ran, or not recorded."""


class LocalQueueClient:
    def __init__(self, path: Path, *, timeout: float | None = 30.0) -> None:
        self.path = path
        self.timeout = timeout

    def _connect(self) -> socket.socket:
        check_socket_path(self.path)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                return self._connected(sock)
            except BlockingIOError:
                # With a timeout, a Unix socket's connect fails at once rather than waiting while
                # the agent's listen backlog is full (someone's burst of connections): try again.
                sock.close()
                if deadline is not None and time.monotonic() >= deadline:
                    raise AgentUnavailable(f"the agent on {self.path} takes no connections: "
                                           "its backlog stayed full") from None
                time.sleep(CONNECT_RETRY_SECONDS)

    def _connected(self, sock: socket.socket) -> socket.socket:
        try:
            sock.connect(str(self.path))
        except BlockingIOError:
            raise
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            raise AgentUnavailable(f"no agent is listening on {self.path}; start one with "
                                   "`hpc-runner agent` (same --config)") from None
        except PermissionError:
            sock.close()
            raise AgentUnavailable(f"permission denied on {self.path}") from None
        except OSError as exc:
            sock.close()
            raise AgentUnavailable(f"cannot connect to {self.path}: {exc.strerror or exc}") from None
        return sock

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        with self._connect() as sock:
            try:
                _send(sock, message)
                reply = decode_response(_read_line(sock))
            except (OSError, ProtocolError) as exc:
                raise AgentUnavailable(f"no answer from the agent on {self.path}: {exc}") from None
        if not reply.get("ok"):
            raise RequestFailed(str(reply.get("error", "the agent refused the request")))
        return reply

    def stream_logs(self, job_id: str, *, follow: bool) -> Iterator[bytes]:
        """The job's log bytes, exactly as written; with follow, until the job ends."""
        sock = self._connect()
        if follow:
            sock.settimeout(None)
        try:
            try:
                _send(sock, {"op": "logs", "job_id": job_id, "follow": follow})
                reply = decode_response(_read_line(sock))
            except (OSError, ProtocolError) as exc:
                raise AgentUnavailable(f"no answer from the agent on {self.path}: {exc}") from None
            if not reply.get("ok"):
                error = str(reply.get("error", "the agent refused the request"))
                raise LogGone(error) if reply.get("log_gone") else RequestFailed(error)
            while chunk := sock.recv(65536):
                yield chunk
        finally:
            sock.close()


    def provenance(self, job_id: str) -> bytes:
        """The job's provenance record, byte for byte as the agent stored it."""
        with self._connect() as sock:
            try:
                _send(sock, {"op": "provenance", "job_id": job_id})
                reply = decode_response(_read_line(sock))
                if not reply.get("ok"):
                    error = str(reply.get("error", "the agent refused the request"))
                    raise NoRecord(error) if reply.get("no_record") else RequestFailed(error)
                size = reply.get("bytes")
                if not isinstance(size, int) or size < 0:
                    raise ProtocolError("the agent's answer does not say how long the record is")
                data = _read_exactly(sock, size)
            except (OSError, ProtocolError) as exc:
                raise AgentUnavailable(f"no answer from the agent on {self.path}: {exc}") from None
        return data


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(min(size - len(data), 65536))
        if not chunk:
            raise ProtocolError(f"the agent sent {len(data)} of the record's {size} bytes")
        data += chunk
    return bytes(data)


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    # The agent may have answered before reading it all (over the user's connection cap, a
    # request too large) and closed: its answer is still there to read.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(encode(message))


def _read_line(sock: socket.socket) -> bytes:
    data = bytearray()
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return bytes(data)


def client_for(config: str | None) -> LocalQueueClient:
    """The client of the agent whose config is `config` (the embedded default's when None): the
    commands' `--config` tells where its socket is."""
    agent_config = load_config(config) if config else default_config()
    return LocalQueueClient(agent_config.socket_path())
