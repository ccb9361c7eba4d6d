"""The dashboard of the agent's own jobs, on a Unix socket of its own (`web_socket`).

The pages are the hub's (`runner.web.pages`) and the reads of the jobs API the hub's too
(`runner.web.read_api`), over the agent's store (`AgentBoard`). There is no login: the viewer is
the local user on the other end of the socket, from the kernel (SO_PEERCRED), as for the local
queue. A user on another machine reaches it through ssh: `ssh -L 8080:/path/to/web.sock
login-node`, then http://localhost:8080/.

The session cookie only carries the CSRF token every state-changing request (a cancel) must
send back.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import hdrs, web

from runner.agent import Agent
from runner.localqueue.board import AgentBoard
from runner.localqueue.paths import listen_at
from runner.localqueue.peercred import identity_for_uid, peer_uid_gid
from runner.logging_setup import get_logger
from runner.web.board import Viewer
from runner.web.pages import Dashboard
from runner.web.read_api import ReadApi
from runner.web.security import add_security_headers
from runner.web.sessions import AGENT_COOKIE_NAME, load_session_key, setup_sessions

log = get_logger("runner.localqueue")

# Who is on the other end of a request's connection: their uid (None: nobody the kernel names).
PeerUid = Callable[[web.Request], int | None]
ViewerOf = Callable[[web.Request], Awaitable[Viewer | None]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# The names a browser uses for a port that `ssh -L` forwards to this socket.
_LOCAL_HOST = re.compile(r"(?:localhost|127\.0\.0\.1|\[::1\])(?::[0-9]{1,5})?", re.IGNORECASE)


def socket_peer_uid(request: web.Request) -> int | None:
    """The uid of the process that connected to the socket, as the kernel recorded it."""
    transport = request.transport
    sock = None if transport is None else transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        _pid, uid, _gid = peer_uid_gid(sock)
    except OSError:
        return None
    return uid


def local_viewer_of(peer_uid: PeerUid = socket_peer_uid) -> ViewerOf:
    """The viewer of a request: the peer's user, with `local:user:U` and a `local:group:G` for each
    of the user's groups (the system's, as the local queue has them)."""
    async def viewer_of(request: web.Request) -> Viewer | None:
        uid = peer_uid(request)
        if uid is None:
            return None
        # The user and group databases may be LDAP or SSSD: never on the event loop.
        identity = await asyncio.to_thread(identity_for_uid, uid)
        assert identity.user is not None
        return Viewer(name=identity.user, principals=identity.principals())
    return viewer_of


@web.middleware
async def local_host_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse a request whose Host is not this machine's loopback name (or is absent).

    Behind `ssh -L` the socket is a port on the user's own machine, and any web page in the user's
    browser can make it send requests there: under a name of its own that resolves to 127.0.0.1
    (DNS rebinding), a page would then read the answers as its own, same-origin, with the user's
    jobs and logs in them. Such a request carries the page's name as its Host; the user's own
    requests carry localhost or a loopback address. (State-changing requests also need the
    session's CSRF token, which no other site can read.)"""
    hosts = request.headers.getall(hdrs.HOST, [])
    if len(hosts) > 1 or (hosts and not _LOCAL_HOST.fullmatch(hosts[0])):
        raise web.HTTPMisdirectedRequest(
            text="this dashboard answers requests for localhost only (reach it with `ssh -L PORT:SOCKET "
                 "HOST` and open http://localhost:PORT/)\n", headers={"Cache-Control": "no-store"})
    return await handler(request)


def dashboard_app(board: AgentBoard, *, session_key: bytes, site_name: str,
                  peer_uid: PeerUid = socket_peer_uid) -> web.Application:
    """The dashboard's pages and the jobs API's reads over `board`, for the peer of each request."""
    app = web.Application(middlewares=[local_host_only])
    setup_sessions(app, session_key, secure=False, name=AGENT_COOKIE_NAME)
    add_security_headers(app)
    viewer_of = local_viewer_of(peer_uid)
    Dashboard(board, viewer_of, site_name=site_name, login_path=None, logout=False).add_routes(app)
    ReadApi(board, viewer_of).add_routes(app)
    return app


class AgentWebServer:
    """The dashboard on `path` (mode `mode`), made as the local queue's socket is (`listen_at`)."""

    def __init__(self, agent: Agent, path: Path, *, mode: int, cluster: str | None = None,
                 site_name: str | None = None, peer_uid: PeerUid = socket_peer_uid) -> None:
        self.path = path
        self.mode = mode
        self.board = AgentBoard(agent, cluster=cluster)
        self._state_dir = agent.store.state_dir
        self._site_name = site_name or f"hpc-runner on {socket.gethostname()}"
        self._peer_uid = peer_uid
        self._runner: web.AppRunner | None = None
        self._listener: socket.socket | None = None

    async def start(self) -> None:
        app = dashboard_app(self.board, session_key=load_session_key(self._state_dir),
                            site_name=self._site_name, peer_uid=self._peer_uid)
        self._listener = listen_at(self.path, self.mode, key="web_socket", what="the dashboard's socket")
        # The log streams and events end when asked to: no need to wait long for them at a stop.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.SockSite(self._runner, self._listener).start()
        log.info("dashboard listening", socket=str(self.path))

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._listener is not None:
            self._listener.close()
            # ours: a start that failed before it listened must not remove another agent's socket
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
