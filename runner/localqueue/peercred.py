"""Who is on the other end of a Unix socket, from the kernel rather than the request."""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct

from runner.identity import Identity


def peer_uid_gid(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the connected peer, as the kernel recorded them at connect().

    The gid is the peer's effective gid at that moment, not a group membership: see
    identity_for_uid.
    """
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def identity_for_uid(uid: int) -> Identity:
    """The local identity of a Unix user: their name and every group they belong to.

    The groups are the system's: the user's primary group (from the password database) and
    the groups that list them (getgrouplist). Never the gid of the connecting process: a user
    may run with an effective gid that is no membership of theirs (a setgid program, `sg` with
    a group password), and the kernel reports that one.
    """
    try:
        account = pwd.getpwuid(uid)
    except KeyError:
        user = f"uid-{uid}"
        return Identity(source="local", user=user, groups=())
    user = account.pw_name
    names = []
    for group_id in sorted(set(_grouplist(user, account.pw_gid))):
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
