"""Who is on the other end of a Unix socket, from the kernel rather than the request."""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct

from runner.identity import Identity


def peer_uid_gid(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the connected peer, as the kernel recorded them at connect()."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def identity_for_uid(uid: int, gid: int) -> Identity:
    """The local identity of a Unix user: their name and every group they belong to."""
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = f"uid-{uid}"
        return Identity(source="local", user=user, groups=())
    names = []
    for group_id in sorted(set(_grouplist(user, gid))):
        try:
            names.append(grp.getgrgid(group_id).gr_name)
        except KeyError:
            continue
    return Identity(source="local", user=user, groups=tuple(sorted(set(names))))


def _grouplist(user: str, gid: int) -> list[int]:
    try:
        return os.getgrouplist(user, gid)
    except OSError:
        return [gid]
