"""The local queue's socket under hostile clients: what one user sends or holds open must not stall
the agent or shut out other users, and must not flood the agent's log.

The server runs on an event loop of its own thread (as in the agent, where that loop also carries
the CI sources' heartbeats and polls); the tests are its blocking clients.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_IMAGE_NAME, closing_factory, image_table, policy_document, toml_table, wait_for
from fakes.background_loop import BackgroundLoop

import runner.localqueue.server as server_module
from runner.agent import Agent
from runner.config import AgentConfig
from runner.localqueue.client import AgentUnavailable, LocalQueueClient, RequestFailed
from runner.localqueue.protocol import MAX_REQUEST_BYTES
from runner.localqueue.server import LocalQueueServer
from runner.site_policy import load_site_policy
from runner.store import Store
from runner.tomlsource import MAX_FILE_BYTES, MAX_KEY_PARTS

REPO = Path(__file__).resolve().parents[2]
CLIENT_TIMEOUT_S = 10.0

POLICY = policy_document(
    toml_table("[accounts.ci]", slurm_account="ci", partitions=["local"]),
    image_table("/images/test.sif", "0" * 64),
    toml_table("[[grants]]", name="everyone", principals=[f"local:user:{pwd.getpwuid(os.getuid()).pw_name}"],
               account="ci", images=[TEST_IMAGE_NAME]))

JOB = '[job]\nname = "smoke"\nimage = "test"\ncommand = ["true"]\n'
# The job of the report: 60 KB whose parse held the agent's event loop for 21 s.
PATHOLOGICAL_JOB = ".".join(["x"] * 30_000) + " = 1\n"


class Queue:
    """A local queue server on its own event loop, with a real agent (not started: nothing runs)."""

    def __init__(self, root: Path, **options: Any) -> None:
        self.root = root
        self.socket = root / "q.sock"
        self.workspace = root / "ws"
        self.workspace.mkdir(parents=True)
        policy = root / "policy.toml"
        policy.write_text(POLICY)
        config = AgentConfig(state_dir=root / "state", work_root=root / "work", policy=policy,
                             executor="local", max_jobs=1)
        self.loop = BackgroundLoop(timeout=60)

        async def start() -> tuple[Store, LocalQueueServer]:
            store = Store.open(config.state_dir)
            agent = Agent(config, load_site_policy(config), store, grace_seconds=1)
            server = LocalQueueServer(agent, self.socket, **options)
            await server.start()
            return store, server

        self.store, self.server = self.loop.run(start())

    def client(self) -> LocalQueueClient:
        return LocalQueueClient(self.socket, timeout=CLIENT_TIMEOUT_S)

    def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CLIENT_TIMEOUT_S)
        sock.connect(str(self.socket))
        return sock

    def submit(self, text: str, name: str = "job.toml") -> dict[str, Any]:
        return self.client().request({"op": "submit", "job": text, "name": name,
                                      "workdir": str(self.workspace)})

    def close(self) -> None:
        self.loop.run(self.server.close())
        self.loop.call(self.store.close)
        self.loop.loop.call_soon_threadsafe(self.loop.loop.stop)
        self.loop.thread.join(10)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: a Unix socket's path holds at most 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="lq-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def queues(short_dir: Path) -> Iterator[Any]:
    numbers = itertools.count()

    def make(**options: Any) -> Queue:
        return Queue(short_dir / f"q{next(numbers)}", **options)

    yield from closing_factory(make, Queue.close)


@pytest.fixture
def queue(queues: Any) -> Queue:
    return queues()  # type: ignore[no-any-return]


def read_answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a reset after an answer is a
    close with some of our request unread)."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


# -- job text: bounded, and parsed away from the event loop --------------------------------------


def test_status_is_answered_while_a_pathological_job_is_being_parsed(
        queue: Queue, monkeypatch: pytest.MonkeyPatch) -> None:
    """The parse is held open until another client's status has been answered: a parse on the
    event loop would hold the loop too, and the status could not be answered first."""
    parsing, status_answered = threading.Event(), threading.Event()
    events: list[str] = []
    real_parse = server_module.parse_job_text

    def held_parse(text: str, name: str) -> Any:
        parsing.set()
        status_answered.wait(CLIENT_TIMEOUT_S)
        return real_parse(text, name)

    monkeypatch.setattr(server_module, "parse_job_text", held_parse)
    refusal: list[str] = []

    def submit_bad_job() -> None:
        with pytest.raises(RequestFailed) as caught:
            queue.submit(PATHOLOGICAL_JOB, "bad.toml")
        refusal.append(str(caught.value))
        events.append("bad submit answered")

    submitter = threading.Thread(target=submit_bad_job)
    submitter.start()
    assert parsing.wait(CLIENT_TIMEOUT_S), "the agent never started parsing the job"
    assert queue.client().request({"op": "status"})["jobs"] == []
    events.append("status answered")
    status_answered.set()
    submitter.join(CLIENT_TIMEOUT_S)
    assert events == ["status answered", "bad submit answered"]
    assert refusal == [f"bad.toml:1: invalid TOML: a key has more than {MAX_KEY_PARTS} dotted parts, "
                       "its table's name included"]


def test_a_user_lookup_that_hangs_holds_only_its_own_connection(
        queue: Queue, monkeypatch: pytest.MonkeyPatch) -> None:
    """With LDAP or SSSD behind it, looking a user up can hang; the next client is still served."""
    first_lookup, second_answered = threading.Event(), threading.Event()
    real_lookup = server_module.identity_for_uid
    held: list[bool] = []

    def lookup(uid: int) -> Any:
        if not held:
            held.append(True)
            first_lookup.set()
            second_answered.wait(CLIENT_TIMEOUT_S)
        return real_lookup(uid)

    monkeypatch.setattr(server_module, "identity_for_uid", lookup)
    answers: list[str] = []
    first = threading.Thread(target=lambda: answers.append(queue.client().request({"op": "ping"})["user"]))
    first.start()
    assert first_lookup.wait(CLIENT_TIMEOUT_S)
    assert queue.client().request({"op": "status"})["jobs"] == []
    answers.append("second")
    second_answered.set()
    first.join(CLIENT_TIMEOUT_S)
    assert answers == ["second", pwd.getpwuid(os.getuid()).pw_name]


def test_a_start_refused_for_a_live_socket_leaves_that_socket_alone(queue: Queue) -> None:
    second = LocalQueueServer(queue.server.agent, queue.socket)
    with pytest.raises(Exception, match="another agent is already listening"):
        queue.loop.run(second.start())
    queue.loop.run(second.close())
    assert queue.socket.exists()
    assert queue.client().request({"op": "status"})["jobs"] == []


def test_the_pathological_job_is_refused_and_the_queue_serves_on(queue: Queue) -> None:
    with pytest.raises(RequestFailed, match=r"^bad\.toml:1: invalid TOML: a key has more than"):
        queue.submit(PATHOLOGICAL_JOB, "bad.toml")
    assert queue.submit(JOB)["decision"]["allowed"] is True


def test_a_job_over_the_size_limit_is_refused_naming_the_limit(queue: Queue) -> None:
    text = JOB + "# " + "x" * MAX_FILE_BYTES + "\n"
    with pytest.raises(RequestFailed) as caught:
        queue.submit(text, "big.toml")
    assert str(caught.value) == f"big.toml: file is larger than {MAX_FILE_BYTES} bytes"


def test_a_job_just_under_the_limit_is_taken_though_its_request_is_twice_as_large(queue: Queue) -> None:
    # JSON writes each quote as two bytes: the request is about 2 MB for a 1 MB job.
    text = JOB + "# " + '"' * (MAX_FILE_BYTES - len(JOB) - 3) + "\n"
    assert len(text.encode()) == MAX_FILE_BYTES
    assert queue.submit(text)["decision"]["allowed"] is True


@pytest.mark.parametrize("request_bytes", [b"x" * (MAX_REQUEST_BYTES + 1) + b"\n",
                                           b"x" * (2 * MAX_REQUEST_BYTES)])
def test_a_request_over_the_size_limit_is_refused_naming_the_limit(
        queue: Queue, request_bytes: bytes) -> None:
    with queue.connect() as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # answered before it was all read
            sock.sendall(request_bytes)
        answer = json.loads(read_answer(sock))
    assert answer == {"ok": False, "error": f"request is larger than {MAX_REQUEST_BYTES} bytes"}


def test_a_request_nested_too_deeply_for_json_is_refused(queue: Queue) -> None:
    with queue.connect() as sock:
        sock.sendall(b"[" * 100_000 + b"\n")
        answer = json.loads(read_answer(sock))
    assert answer == {"ok": False, "error": "request is not JSON (nested too deeply)"}


# -- connections: idle ones are closed, one user's are capped ------------------------------------


def test_an_idle_connection_is_closed_after_the_request_timeout(queues: Any) -> None:
    queue = queues(request_timeout=0.2)
    with queue.connect() as idle:
        answer = json.loads(read_answer(idle))  # the server closes it: this returns
    assert answer == {"ok": False, "error": "no complete request within 0.2 s"}
    assert queue.client().request({"op": "status"})["ok"] is True


def test_connections_over_the_per_user_cap_are_refused_and_the_user_is_served_again_later(
        queues: Any) -> None:
    queue = queues(max_connections_per_user=3)
    held = [queue.connect() for _ in range(3)]
    with queue.connect() as over_cap:
        answer = json.loads(read_answer(over_cap))
    assert answer == {"ok": False, "error": f"too many connections: uid {os.getuid()} already has 3 open "
                                            "with the agent (at most 3 at once); close some and try again"}
    with pytest.raises(RequestFailed, match="too many connections"):
        queue.client().request({"op": "status"})
    held.pop().close()
    wait_for(lambda: _status_ok(queue), 10, interval=0.05, what="a status once a connection was closed")
    for sock in held:
        sock.close()


def test_a_client_waits_for_room_in_a_full_listen_backlog_until_its_timeout(short_dir: Path) -> None:
    path = short_dir / "full.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(0)  # nothing accepts: the backlog fills at once
        waiting = []
        with contextlib.suppress(BlockingIOError):
            while True:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                waiting.append(sock)
                sock.setblocking(False)
                sock.connect(str(path))
        with pytest.raises(AgentUnavailable) as caught:
            LocalQueueClient(path, timeout=0.3).request({"op": "ping"})
        for sock in waiting:
            sock.close()
    assert str(caught.value) == f"the agent on {path} takes no connections: its backlog stayed full"


def test_the_agent_raises_its_soft_open_file_limit_to_the_hard_one() -> None:
    code = ("import resource\n"
            "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))\n"
            "from runner.serve import raise_open_file_limit\n"
            "print(raise_open_file_limit(), *resource.getrlimit(resource.RLIMIT_NOFILE))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    returned, soft, hard = map(int, result.stdout.split())
    assert returned == soft == hard > 64


def _status_ok(queue: Queue) -> bool:
    try:
        return bool(queue.client().request({"op": "status"})["ok"])
    except RequestFailed:
        return False


# -- the log under a flood of connections --------------------------------------------------------

# A server alone in a process whose file table is nearly full: a few connections fill it.
FLOODED_SERVER = textwrap.dedent("""
    import asyncio, os, resource, sys
    from pathlib import Path
    from runner.localqueue.server import LocalQueueServer
    from runner.logging_setup import configure_logging

    configure_logging(stream=sys.stderr, force_json=True)

    async def main() -> None:
        server = LocalQueueServer(None, Path(sys.argv[1]))
        await server.start()
        in_use = len(os.listdir("/proc/self/fd"))
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 6, hard))
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
""")


def test_a_full_file_table_is_logged_once_with_a_count_not_once_per_refused_accept(short_dir: Path) -> None:
    log_path = short_dir / "agent.log"
    sock_path = short_dir / "q.sock"
    with log_path.open("wb") as log:
        child = subprocess.Popen([sys.executable, "-c", FLOODED_SERVER, str(sock_path)], cwd=REPO,
                                 stdout=subprocess.PIPE, stderr=log,
                                 env={**os.environ, "PYTHONPATH": str(REPO)})
    assert child.stdout is not None
    try:
        assert child.stdout.readline() == b"ready\n", log_path.read_text()
        flood = []
        for _ in range(40):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(sock_path))
            flood.append(sock)
        wait_for(lambda: "Too many open files" in log_path.read_text(), 10, interval=0.05,
                 what="the server to run out of file descriptors")
        for sock in flood:
            sock.close()
        client = LocalQueueClient(sock_path, timeout=CLIENT_TIMEOUT_S)

        def answered_and_logged() -> bool:
            answered = client.request({"op": "ping"})["ok"]
            return bool(answered) and "accepts connections again" in log_path.read_text()

        wait_for(answered_and_logged, 10, interval=0.2,
                 what="the server to answer and log that it accepts again")
    finally:
        child.kill()
        child.wait(10)
    log_text = log_path.read_text()
    lines = [json.loads(line) for line in log_text.splitlines() if line.strip()]
    about_accept = [line for line in lines if "accept" in line["event"]]
    assert [line["event"] for line in about_accept] == [
        "local queue cannot accept connections", "local queue accepts connections again"], log_text
    assert about_accept[0]["error"] == "[Errno 24] Too many open files"
    assert about_accept[1]["occurrences"] >= 1
    assert len(log_text) < 4096, log_text
