"""The local queue's socket: where it may live, how its mode is set, and who is on the other end.

These use the real kernel: Unix sockets, file modes, SO_PEERCRED, and the local users and groups
of the test machine (hpcr-alice in hpcr-esm, hpcr-bob in hpcr-ocean).
"""

from __future__ import annotations

import asyncio
import grp
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from runner.agent import Agent
from runner.errors import InputError
from runner.localqueue.server import LocalQueueServer

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as other users")
NOBODY = 65534
SETPRIV = shutil.which("setpriv", path="/usr/bin:/bin") or "/usr/bin/setpriv"
# A client as small as can be: connect, ask who we are, print the answer.
PING = ("import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "s.connect(sys.argv[1])\n"
        "s.sendall(b'{\"op\": \"ping\"}\\n')\n"
        "print(s.makefile().readline(), end='')\n")


def server(path: Path, mode: int) -> LocalQueueServer:
    # `ping` and starting to listen never reach the agent.
    return LocalQueueServer(cast(Agent, None), path, mode=mode)


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory every local user can traverse, owned by the test's user (as the agent's account)."""
    path = Path(tempfile.mkdtemp(prefix="hpcr-sock-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def refused(path: Path, mode: int = 0o666) -> str:
    listener = server(path, mode)
    with pytest.raises(InputError) as caught:
        await listener.start()
    return str(caught.value)


# --- where the socket may live --------------------------------------------------------------------

@pytest.mark.parametrize("mode", [0o1777, 0o777, 0o775, 0o757])
async def test_a_socket_directory_others_can_write_is_refused(public_dir: Path, mode: int) -> None:
    shared = public_dir / "shared"
    shared.mkdir()
    shared.chmod(mode)
    message = await refused(shared / "agent.sock")
    assert f"{shared}, the local queue socket's directory, is writable by group or others (mode {mode:04o})" \
        in message
    assert "a directory of its own" in message
    assert not (shared / "agent.sock").exists()


@needs_root
async def test_a_socket_directory_of_another_user_is_refused(public_dir: Path) -> None:
    theirs = public_dir / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, NOBODY, NOBODY)
    message = await refused(theirs / "agent.sock")
    assert f"{theirs}, the local queue socket's directory, is owned by nobody" in message
    assert not (theirs / "agent.sock").exists()


async def test_a_directory_above_that_others_can_write_is_refused_unless_sticky(public_dir: Path) -> None:
    shared = public_dir / "shared"
    (shared / "ours").mkdir(parents=True, mode=0o755)
    shared.chmod(0o777)      # anyone could rename `ours` away and put their own in its place
    assert f"{shared}, a directory above the local queue socket, is writable by group or others" \
        in await refused(shared / "ours" / "agent.sock")
    shared.chmod(0o1777)     # sticky, like /tmp: nobody can rename what is not theirs
    listener = server(shared / "ours" / "agent.sock", 0o666)
    await listener.start()
    await listener.close()


async def test_a_socket_in_a_subdirectory_we_own_of_a_sticky_directory_serves(public_dir: Path) -> None:
    public_dir.chmod(0o1777)
    path = public_dir / "hpc-runner" / "agent.sock"
    listener = server(path, 0o666)
    await listener.start()
    try:
        assert stat.S_ISSOCK(path.lstat().st_mode)
        assert stat.S_IMODE(path.lstat().st_mode) == 0o666
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o755
        # Nothing is left of how it was made: only the socket is in its directory.
        assert os.listdir(path.parent) == ["agent.sock"]
    finally:
        await listener.close()
    assert not path.exists()


async def test_a_private_socket_is_0600_from_the_start(tmp_path: Path) -> None:
    path = tmp_path / "state" / "agent.sock"
    listener = server(path, 0o600)
    await listener.start()
    try:
        assert stat.S_IMODE(path.lstat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    finally:
        await listener.close()


async def test_a_stale_socket_is_replaced(public_dir: Path) -> None:
    path = public_dir / "run" / "agent.sock"
    path.parent.mkdir(mode=0o755)
    with socket.socket(socket.AF_UNIX) as dead:     # an agent that died: its socket file stays behind
        dead.bind(str(path))
    listener = server(path, 0o666)
    await listener.start()
    try:
        assert stat.S_IMODE(path.lstat().st_mode) == 0o666
        assert json.loads(await asyncio.to_thread(ping, path))["ok"] is True
    finally:
        await listener.close()


async def test_a_live_socket_is_left_alone(public_dir: Path) -> None:
    path = public_dir / "run" / "agent.sock"
    first = server(path, 0o666)
    await first.start()
    try:
        assert "another agent is already listening" in await refused(path)
        assert json.loads(await asyncio.to_thread(ping, path))["ok"] is True
    finally:
        await first.close()


async def test_the_mode_is_never_set_through_a_link_put_in_place_of_the_socket(
        public_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Someone replaces the socket with a link to a file just as the agent sets the socket's mode:
    the file keeps its mode. (They could only if they could write the directory, which the agent
    refuses; this is the second line of defence.)"""
    victim = public_dir / "state.sqlite"
    victim.write_text("the agent's state\n")
    victim.chmod(0o600)
    path = public_dir / "run" / "agent.sock"
    real_chmod = os.chmod

    def chmod_after_a_swap(target: Any, mode: int, **kwargs: Any) -> None:
        if os.fspath(target) == str(path) and stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
            path.symlink_to(victim)
        real_chmod(target, mode, **kwargs)

    monkeypatch.setattr(os, "chmod", chmod_after_a_swap)
    listener = server(path, 0o666)
    try:
        await listener.start()
    finally:
        await listener.close()
        monkeypatch.undo()
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600


# --- who is on the other end ----------------------------------------------------------------------

def ping(path: Path) -> str:
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(path))
        client.sendall(b'{"op": "ping"}\n')
        return client.makefile().readline()


def ping_as(user: str, gid: int, socket_path: Path) -> dict[str, Any]:
    """Ping the agent from a process of `user` whose effective gid is `gid` (as after `sg`, `newgrp`
    or a setgid program), with the user's own supplementary groups."""
    result = subprocess.run(
        [SETPRIV, f"--reuid={user}", f"--regid={gid}", "--init-groups", "--",
         sys.executable, "-I", "-c", PING, str(socket_path)],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


@needs_root
async def test_a_peers_effective_group_is_not_a_group_membership(
        public_dir: Path, queue_users: dict[str, str]) -> None:
    path = public_dir / "run" / "agent.sock"
    listener = server(path, 0o666)
    await listener.start()
    try:
        other = grp.getgrnam(queue_users["hpcr-bob"]).gr_gid
        own = grp.getgrnam(queue_users["hpcr-alice"]).gr_gid
        borrowed = await asyncio.to_thread(ping_as, "hpcr-alice", other, path)
        assert (borrowed["user"], borrowed["groups"]) == ("hpcr-alice", ["hpcr-esm"])
        plain = await asyncio.to_thread(ping_as, "hpcr-alice", own, path)
        assert (plain["user"], plain["groups"]) == ("hpcr-alice", ["hpcr-esm"])
    finally:
        await listener.close()
