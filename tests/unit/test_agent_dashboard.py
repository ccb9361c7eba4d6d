"""The agent's dashboard on its own Unix socket: the real agent on a real store (the fake executor of
`test_agent`, so each state change happens when the test says), the real socket, a real HTTP
client through it, and the kernel's SO_PEERCRED saying who connects.

Who sees what: the submitter, the agent's own user and root, the account's admins, and the members
of the job's account (the principals of the grants that spend it); members may not cancel. The
test runs as root, which sees every job; other users are the local queue's test users
(hpcr-alice in hpcr-esm, hpcr-bob in hpcr-ocean), connecting for real through setpriv, or named
by an injected peer lookup.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import aiohttp
import pytest
from aiohttp import web
from conftest import TEST_IMAGE_NAME, image_table, policy_document, toml_table, wait_until

import runner.lifecycle.driver as driver_module
from runner.gateway.jobs_protocol import VIEW_FIELDS
from runner.gateway.protocol import format_time as hub_format_time
from runner.identity import Identity
from runner.job import JobState
from runner.lifecycle.admission import workspace_of
from runner.lifecycle.prepare import job_dir
from runner.localqueue.board import AgentBoard
from runner.localqueue.web import AgentWebServer, local_viewer_of, socket_peer_uid
from runner.store import JobFilter, Store, Visible, page_query
from runner.web import read_api
from runner.web.board import ListQuery, NotCancellable, NotVisible, Viewer

from .test_agent import SHA256, Harness, fake_prepare, job

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as other users")
SETPRIV = shutil.which("setpriv", path="/usr/bin:/bin") or "/usr/bin/setpriv"

POLICY = policy_document(
    toml_table("[accounts.esm]", slurm_account="esm", partitions=["local"], max_time="1h"),
    toml_table("[accounts.ocean]", slurm_account="ocean", partitions=["local"], max_time="1h",
               admins=["local:user:carol"]),
    image_table("/images/test.sif", SHA256),
    toml_table("[[grants]]", name="esm-members", principals=["local:group:hpcr-esm", "local:user:root"],
               account="esm", images=[TEST_IMAGE_NAME]),
    toml_table("[[grants]]", name="ocean-members", principals=["local:group:hpcr-ocean"], account="ocean",
               images=[TEST_IMAGE_NAME]))

ROOT = Identity(source="local", user="root", groups=("root",))
ALICE = Identity(source="local", user="hpcr-alice", groups=("hpcr-esm",))
ZED = Identity(source="local", user="zed", groups=("hpcr-ocean",))        # an ocean member, not a user here
CAROL = Viewer("carol", ("local:user:carol",))                            # ocean's admin
BOB = Viewer("hpcr-bob", ("local:user:hpcr-bob", "local:group:hpcr-ocean"))
STRANGER = Viewer("mallory", ("local:user:mallory", "local:group:others"))
ORIGIN = "http://localhost"
NOBODY = 65534


@dataclass
class Site:
    harness: Harness
    server: AgentWebServer
    socket: Path
    peer: dict[str, int | None]     # the uid the injected lookup answers; None: the kernel's
    seen: list[int | None]          # what the kernel said of each connection asked

    def client(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(self.socket)))

    def log_path(self, job_id: str) -> Path:
        return job_dir(self.harness.config, job_id) / "output.log"

    def write_log(self, job_id: str, data: bytes) -> None:
        """As the job appends to its log."""
        path = self.log_path(job_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab") as log:
            log.write(data)


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory every local user can traverse, owned by the test's user (as the agent's account)."""
    path = Path(tempfile.mkdtemp(prefix="hpcr-web-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def site(tmp_path: Path, public_dir: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Site]:
    monkeypatch.setattr(driver_module, "prepare_job", fake_prepare)
    harness = Harness(tmp_path / "agent")
    harness.policy_path.write_text(POLICY)
    assert harness.agent.reload_policy()
    peer: dict[str, int | None] = {"uid": None}
    seen: list[int | None] = []

    def peer_uid(request: web.Request) -> int | None:
        injected = peer["uid"]
        if injected is not None:
            return injected
        seen.append(socket_peer_uid(request))
        return seen[-1]

    path = public_dir / "run" / "web.sock"
    server = AgentWebServer(harness.agent, path, mode=0o666, cluster="hpc1", site_name="test cluster",
                            peer_uid=peer_uid)
    harness.agent.start()
    await server.start()
    try:
        yield Site(harness, server, path, peer, seen)
    finally:
        await server.close()
        await harness.close()


async def submit(site: Site, identity: Identity, name: str = "job") -> str:
    record = await site.harness.submit(identity, job(name))
    return record.id


# -- who is on the other end --------------------------------------------------------------------


async def test_the_viewer_is_the_user_the_kernel_names_with_their_local_principals(site: Site) -> None:
    async with site.client() as client, client.get(f"{ORIGIN}/") as answer:
        assert answer.status == 200
        assert re.search(r'class="viewer">\s*root\b', await answer.text())
    assert site.seen == [os.geteuid()] == [0]     # the kernel's word (SO_PEERCRED), not the request's
    viewer = await local_viewer_of(lambda _request: 0)(cast(web.Request, None))
    assert viewer is not None and viewer.name == "root"
    assert viewer.principals[0] == "local:user:root" and "local:group:root" in viewer.principals


# -- the pages -------------------------------------------------------------------------------------


async def test_the_list_shows_the_job_and_its_page_its_log_lines(site: Site) -> None:
    job_id = await submit(site, ROOT, "climate-run")
    await site.harness.wait_started(job_id)
    site.write_log(job_id, b"step 1 \x1b[32mok\x1b[0m\nstep 2 <done>\n")
    async with site.client() as client:
        async with client.get(f"{ORIGIN}/") as answer:
            listing = await answer.text()
        async with client.get(f"{ORIGIN}/jobs/{job_id}") as answer:
            page = await answer.text()
            headers = answer.headers
    assert "climate-run" in listing and job_id in listing
    assert "step 1" in page and "step 2 &lt;done&gt;" in page and 'class="ansi32"' in page
    assert "local:user:root" in page and "esm-members" in page
    assert headers["Cache-Control"] == "no-store"
    assert "default-src 'none'" in headers["Content-Security-Policy"]


async def test_cancel_needs_the_sessions_csrf_token(site: Site) -> None:
    job_id = await submit(site, ROOT)
    await site.harness.wait_started(job_id)
    async with site.client() as client:
        async with client.post(f"{ORIGIN}/jobs/{job_id}/cancel", data={}) as answer:
            assert answer.status == 403
            assert "CSRF" in await answer.text()
        assert site.harness.state(job_id) == JobState.running
        async with client.get(f"{ORIGIN}/jobs/{job_id}") as answer:
            found = re.search(r'name="csrf_token" value="([^"]+)"', await answer.text())
            # Its own cookie: a hub forwarded to localhost as well keeps its session apart.
            assert set(answer.cookies) == {"hpc_runner_agent_session"}
        assert found is not None
        async with client.post(f"{ORIGIN}/jobs/{job_id}/cancel", data={"csrf_token": found.group(1)},
                               allow_redirects=False) as answer:
            assert answer.status == 303 and answer.headers["Location"] == f"/jobs/{job_id}"
    await site.harness.wait_state(job_id, JobState.cancelled)
    assert [entry.actor for entry in site.harness.store.audit_entries(job_id=job_id)
            if entry.action == "cancel"] == ["local:user:root"]


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8080", "localhost.evil.example",
                                  "127.0.0.1.nip.io:8080"])
async def test_a_request_for_another_host_name_is_refused(site: Site, host: str) -> None:
    job_id = await submit(site, ROOT)
    async with site.client() as client:
        for path in ("/", f"/jobs/{job_id}", f"/api/v1/jobs/{job_id}/log"):
            async with client.get(f"{ORIGIN}{path}", headers={"Host": host}) as answer:
                assert answer.status == 421, path
                assert job_id not in await answer.text()
        for allowed in ("localhost:8080", "127.0.0.1:8080", "[::1]:8080", "LOCALHOST"):
            async with client.get(f"{ORIGIN}/api/v1/jobs/{job_id}", headers={"Host": allowed}) as answer:
                assert answer.status == 200, allowed


# -- the API's reads -----------------------------------------------------------------------------


async def test_the_api_answers_the_hubs_job_views(site: Site) -> None:
    job_id = await submit(site, ROOT, "first")
    await site.harness.wait_started(job_id)
    site.harness.executor.release(job_id)
    await site.harness.wait_state(job_id, JobState.succeeded)
    async with site.client() as client:
        async with client.get(f"{ORIGIN}/api/v1/jobs/{job_id}") as answer:
            view = await answer.json()
        async with client.get(f"{ORIGIN}/api/v1/jobs") as answer:
            listing = await answer.json()
        async with client.get(f"{ORIGIN}/api/v1/jobs/no-such-job") as answer:
            assert answer.status == 404 and "error" in await answer.json()
        async with client.get(f"{ORIGIN}/api/v1/jobs?limit=0") as answer:
            assert answer.status == 400
    record = site.harness.store.get_job(job_id)
    assert record is not None and record.finished_at is not None
    assert tuple(view) == VIEW_FIELDS == read_api.VIEW_FIELDS
    assert view["state"] == "succeeded" and view["exit_status"] == 0 and view["account"] == "esm"
    assert view["grant"] == "esm-members" and view["cluster"] == "hpc1" and view["url"] == f"/jobs/{job_id}"
    assert view["created"] == hub_format_time(record.created_at)
    assert view["ended"] == hub_format_time(record.finished_at)
    assert view["started"] is not None and view["created"] <= view["started"] <= view["ended"]
    assert listing == {"jobs": [view], "next": None}


async def test_a_denied_job_says_every_reason(site: Site) -> None:
    denied = await site.harness.submit(Identity(source="local", user="mallory"), job("nobodys"))
    async with site.client() as client:
        async with client.get(f"{ORIGIN}/api/v1/jobs/{denied.id}") as answer:
            view = await answer.json()
        async with client.get(f"{ORIGIN}/jobs/{denied.id}") as answer:
            page = await answer.text()
    assert view["state"] == "denied" and view["reasons"] and view["grant"] is None
    assert view["reasons"][0] in page.replace("&#39;", "'") and "denied" in page


async def test_the_log_is_byte_exact_from_any_offset(site: Site) -> None:
    job_id = await submit(site, ROOT)
    await site.harness.wait_started(job_id)
    data = b"plain\n\x1b[1;31mred\x1b[0m\r\nnot utf-8: \xff\xfe\x00\nno newline at the end"
    site.write_log(job_id, data)
    async with site.client() as client:
        async with client.get(f"{ORIGIN}/api/v1/jobs/{job_id}/log") as answer:
            assert answer.headers["Content-Type"] == "application/octet-stream"
            assert await answer.read() == data
        async with client.get(f"{ORIGIN}/api/v1/jobs/{job_id}/log?offset=7") as answer:
            assert await answer.read() == data[7:]
        async with client.get(f"{ORIGIN}/jobs/{job_id}/log/raw") as answer:
            assert await answer.read() == data
        async with client.get(f"{ORIGIN}/api/v1/jobs/{job_id}/log?offset=x") as answer:
            assert answer.status == 400


async def test_no_answer_holds_the_jobs_secrets(site: Site) -> None:
    secret = "s3cr3t-deploy-credential"
    spec = dataclasses.replace(job("deploy"), env=(("DEPLOY_TOKEN", secret),))
    job_id = (await site.harness.submit(ROOT, spec)).id
    await site.harness.wait_started(job_id)
    site.write_log(job_id, b"using " + secret[:8].encode())      # the rest not written yet
    async with site.client() as client:
        async with client.get(f"{ORIGIN}/api/v1/jobs/{job_id}/log") as answer:
            assert await answer.read() == b"using "
        site.write_log(job_id, secret[8:].encode() + b" to deploy\n")
        for path in (f"/api/v1/jobs/{job_id}/log", f"/jobs/{job_id}/log/raw", f"/jobs/{job_id}"):
            async with client.get(f"{ORIGIN}{path}") as answer:
                body = await answer.read()
                assert secret.encode() not in body and secret[:8].encode() not in body, path
        async with client.get(f"{ORIGIN}/api/v1/jobs/{job_id}/log") as answer:
            assert await answer.read() == b"using " + b"*" * len(secret) + b" to deploy\n"


async def test_following_the_log_streams_until_the_job_ends(site: Site) -> None:
    job_id = await submit(site, ROOT)
    await site.harness.wait_started(job_id)
    site.write_log(job_id, b"first\n")
    received = bytearray()
    async with site.client() as client, \
            client.get(f"{ORIGIN}/api/v1/jobs/{job_id}/log?follow=1") as answer:
        async def read_all() -> None:
            async for chunk in answer.content.iter_any():
                received.extend(chunk)
        reading = asyncio.ensure_future(read_all())
        await wait_until(lambda: bytes(received) == b"first\n", "the log's first line")
        site.write_log(job_id, b"second\n")
        await wait_until(lambda: bytes(received) == b"first\nsecond\n", "the line written while following")
        assert not reading.done()
        site.write_log(job_id, b"last words")
        site.harness.executor.release(job_id)
        await asyncio.wait_for(reading, 5)
    # The job's last line ends where the job left it; what ran follows on a line of its own.
    assert bytes(received).startswith(b"first\nsecond\nlast words\n--- what ran\n")
    assert site.harness.state(job_id) == JobState.succeeded


async def test_the_job_pages_live_lines_arrive_as_the_job_writes_them_until_it_ends(site: Site) -> None:
    job_id = await submit(site, ROOT)
    await site.harness.wait_started(job_id)
    received = bytearray()
    async with site.client() as client, \
            client.get(f"{ORIGIN}/jobs/{job_id}/events?offset=0&number=1") as answer:
        async def read_all() -> None:
            async for chunk in answer.content.iter_any():
                received.extend(chunk)
        reading = asyncio.ensure_future(read_all())
        site.write_log(job_id, b"live line one\n")
        await wait_until(lambda: b"live line one" in received, "the first line's event")
        assert b"event: end" not in received
        site.write_log(job_id, b"the last line")
        site.harness.executor.release(job_id)
        await asyncio.wait_for(reading, 5)
    text = received.decode().replace("\r\n", "\n")
    assert "the last line" in text and "event: status" in text and text.rstrip().endswith("event: end\ndata:")


# -- who sees what ---------------------------------------------------------------------------------


async def test_a_job_page_opened_before_the_jobs_end_hears_of_it_whenever_its_stream_starts(
        site: Site) -> None:
    job_id = await submit(site, ROOT)
    await site.harness.wait_started(job_id)
    site.write_log(job_id, b"done\n")
    site.harness.executor.release(job_id)
    await site.harness.wait_state(job_id, JobState.succeeded)
    # The page was rendered while the job ran; its stream starts only now.
    async with site.client() as client, \
            client.get(f"{ORIGIN}/jobs/{job_id}/events?offset=0&number=1") as answer:
        text = (await answer.read()).decode().replace("\r\n", "\n")
    assert "event: status" in text and "succeeded" in text.split("event: status", 1)[1]
    assert text.rstrip().endswith("event: end\ndata:")


async def test_another_user_gets_404_for_a_job_they_may_not_see(site: Site) -> None:
    theirs = await submit(site, ZED)
    site.peer["uid"] = NOBODY
    async with site.client() as client:
        for path in (f"/jobs/{theirs}", f"/jobs/{theirs}/log/raw", f"/api/v1/jobs/{theirs}",
                     f"/api/v1/jobs/{theirs}/log"):
            async with client.get(f"{ORIGIN}{path}") as answer:
                assert answer.status == 404, path
        async with client.get(f"{ORIGIN}/api/v1/jobs") as answer:
            assert (await answer.json())["jobs"] == []
        async with client.get(f"{ORIGIN}/") as answer:
            assert answer.status == 200 and theirs not in await answer.text()


@needs_root
async def test_a_local_user_connecting_for_real_sees_only_their_accounts_jobs(
        site: Site, queue_users: dict[str, str]) -> None:
    own = await submit(site, ALICE)
    others = await submit(site, ZED)
    answers = await asyncio.to_thread(_get_as, "hpcr-alice", site.socket,
                                      [f"/api/v1/jobs/{own}", f"/api/v1/jobs/{others}", "/api/v1/jobs"])
    assert [status for status, _ in answers] == [200, 404, 200]
    assert json.loads(answers[0][1])["id"] == own
    assert [view["id"] for view in json.loads(answers[2][1])["jobs"]] == [own]


# A client as small as can be, run as another user: GET each path, print status and body as JSON.
_GET = ("import http.client, json, socket, sys\n"
        "class C(http.client.HTTPConnection):\n"
        "    def connect(self):\n"
        "        self.sock = socket.socket(socket.AF_UNIX)\n"
        "        self.sock.connect(sys.argv[1])\n"
        "out = []\n"
        "for path in sys.argv[2:]:\n"
        "    c = C('localhost')\n"
        "    c.request('GET', path)\n"
        "    r = c.getresponse()\n"
        "    out.append([r.status, r.read().decode()])\n"
        "    c.close()\n"
        "print(json.dumps(out))\n")


def _get_as(user: str, socket_path: Path, paths: list[str]) -> list[tuple[int, str]]:
    result = subprocess.run(
        [SETPRIV, f"--reuid={user}", f"--regid={pwd.getpwnam(user).pw_gid}", "--init-groups", "--",
         sys.executable, "-I", "-c", _GET, str(socket_path), *paths],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return [(status, body) for status, body in json.loads(result.stdout)]


async def test_members_see_their_accounts_jobs_and_cancel_only_their_own(site: Site) -> None:
    board = site.server.board
    ocean = await submit(site, ZED, "ocean-job")
    esm = await submit(site, ROOT, "esm-job")
    # A member of ocean (by the grant's group) sees its jobs, not esm's; may not cancel them.
    assert (await board.detail(BOB, ocean)).may_cancel is False
    with pytest.raises(NotCancellable):
        await board.cancel(BOB, ocean)
    with pytest.raises(NotVisible):
        await board.detail(BOB, esm)
    with pytest.raises(NotVisible):
        await board.read_log(BOB, esm, 0, 100)
    assert [card.id for card in (await board.page(BOB, ListQuery())).cards] == [ocean]
    assert (await board.page(BOB, ListQuery())).accounts == ["ocean"]
    # Nobody's member sees nothing; the account's admin sees and cancels.
    assert (await board.page(STRANGER, ListQuery())).cards == []
    with pytest.raises(NotVisible):
        await board.detail(STRANGER, ocean)
    assert (await board.detail(CAROL, ocean)).may_cancel is True
    await board.cancel(CAROL, ocean)
    await site.harness.wait_state(ocean, JobState.cancelled)


async def test_the_list_filters_and_pages_newest_first(site: Site) -> None:
    board = site.server.board
    ids = [await submit(site, ALICE if n % 2 else ROOT, f"run-{n:02d}") for n in range(7)]
    root = Viewer("root", ROOT.principals())
    first = await board.page(root, ListQuery(limit=3))
    assert [card.id for card in first.cards] == ids[::-1][:3] and first.next_before == ids[4]
    second = await board.page(root, ListQuery(limit=3, before=first.next_before))
    assert [card.id for card in second.cards] == ids[::-1][3:6]
    last = await board.page(root, ListQuery(limit=3, before=second.next_before))
    assert [card.id for card in last.cards] == [ids[0]] and last.next_before is None
    named = await board.page(root, ListQuery(text="RUN-03"))
    assert [card.id for card in named.cards] == [ids[3]]
    by_actor = await board.page(root, ListQuery(text="hpcr-alice"))
    assert [card.id for card in by_actor.cards] == [ids[5], ids[3], ids[1]]
    assert (await board.page(root, ListQuery(source="github"))).cards == []
    assert (await board.page(root, ListQuery(account="ocean"))).cards == []
    site.harness.agent.cancel(ROOT, ids[6])
    cancelled = await board.page(root, ListQuery(states=("cancelled",)))
    assert [card.id for card in cancelled.cards] == [ids[6]]
    assert cancelled.accounts == ["esm", "ocean"]


async def test_a_waiting_follower_wakes_when_the_job_changes_or_its_log_grows(site: Site) -> None:
    board: AgentBoard = site.server.board
    job_id = await submit(site, ROOT)
    await site.harness.wait_started(job_id)
    started = time.monotonic()
    waiting = asyncio.ensure_future(board.wait_for_log(job_id, 0, 30))
    site.write_log(job_id, b"x")
    await asyncio.wait_for(waiting, 5)
    waiting = asyncio.ensure_future(board.wait_for_log(job_id, 1, 30))
    jobs = asyncio.ensure_future(board.wait_for_jobs(30))
    site.harness.executor.release(job_id)
    await asyncio.wait_for(asyncio.gather(waiting, jobs), 5)
    assert time.monotonic() - started < 5


# -- the store's page query ------------------------------------------------------------------------


def test_a_page_of_ten_thousand_jobs_reads_along_the_index(tmp_path: Path) -> None:
    with Store.open(tmp_path / "state") as store:
        identities = [{"source": "local", "user": f"user{n % 10}"} for n in range(10)]
        ids = [store.add_job(source="local", identity=identities[n % 10], spec={"name": f"job-{n}"}).id
               for n in range(10_000)]
        for n, job_id in enumerate(ids):
            if n % 3 == 0:
                store.record_decision(job_id, actor="test", decision={"allowed": True, "account": "esm"})
        visible = Visible("local", "user7", frozenset({"esm"}))
        started = time.perf_counter()
        page = store.page_jobs(JobFilter(), visible=visible, before=None, limit=50)
        took = time.perf_counter() - started
        expected = [job_id for n, job_id in enumerate(ids) if n % 3 == 0 or n % 10 == 7][::-1]
        assert [record.id for record in page] == expected[:50]
        following = store.page_jobs(JobFilter(), visible=visible, before=page[-1].id, limit=50)
        assert [record.id for record in following] == expected[50:100]
        named = store.page_jobs(JobFilter(text="JOB-9999"), visible=None, before=None, limit=5)
        assert [record.id for record in named] == [ids[9999]]
        assert store.page_jobs(JobFilter(), visible=None, before="no-such-job", limit=5) == []
        start = (page[-1].created_at, page[-1].id)
        sql, params = page_query(JobFilter(), visible=visible, start=start, limit=51)
        plan = " ".join(str(tuple(row)) for row in store._read(f"EXPLAIN QUERY PLAN {sql}", params))
        assert "jobs_created_at" in plan, plan
        assert took < 0.5, f"a page took {took:.3f} s"


def test_the_dashboard_socket_is_a_config_key_of_its_own(tmp_path: Path) -> None:
    from runner.config import parse_config_text
    from runner.errors import InputError
    from runner.localqueue.paths import web_socket_mode

    config = parse_config_text(f'state_dir = "{tmp_path}/state"\nweb_socket = "/run/hpc-runner/web.sock"\n')
    assert config.web_socket == Path("/run/hpc-runner/web.sock") and web_socket_mode(config) == 0o666
    private = parse_config_text(f'state_dir = "{tmp_path}/state"\nweb_socket = "{tmp_path}/state/web.sock"\n')
    assert web_socket_mode(private) == 0o600
    assert parse_config_text(f'state_dir = "{tmp_path}/state"\n').web_socket is None
    with pytest.raises(InputError, match="web_socket: must not be the local queue's socket"):
        parse_config_text(f'state_dir = "{tmp_path}/state"\nweb_socket = "{tmp_path}/state/agent.sock"\n')



# -- what ran ----------------------------------------------------------------------------------------


async def test_a_finished_jobs_page_shows_what_ran_its_outputs_and_to_those_who_may_the_replay(
        site: Site) -> None:
    record = await site.harness.submit(ZED, dataclasses.replace(job("ocean-run"), outputs=("results/*.txt",)))
    await site.harness.wait_started(record.id)
    workspace = workspace_of(site.harness.store.get_job(record.id) or record)
    (workspace / "results").mkdir()
    (workspace / "results" / "a.txt").write_bytes(b"alpha\n")
    # A link in the workspace is no output: it is left out, and nothing it names is given out.
    (workspace / "results" / "secret.txt").symlink_to(site.harness.config.state_dir / "state.sqlite3")
    received = bytearray()
    async with site.client() as client, \
            client.get(f"{ORIGIN}/jobs/{record.id}/events?offset=0&number=1") as answer:
        # A page opened while the job runs gets the panel with the status that ends it.
        async def read_all() -> None:
            async for chunk in answer.content.iter_any():
                received.extend(chunk)
        reading = asyncio.ensure_future(read_all())
        await wait_until(lambda: b"event: status" in received, "the running job's status")
        assert b'id="no-record"' in received and b"output-link" not in received
        site.harness.executor.release(record.id)
        await asyncio.wait_for(reading, 5)
    await site.harness.wait_state(record.id, JobState.succeeded)
    last_status = received.decode().rsplit("event: status", 1)[1]
    assert "succeeded" in last_status and 'class="output-link">results/a.txt</a>' in last_status
    stored = site.harness.store.provenance(record.id)
    assert stored is not None
    digest = hashlib.sha256(b"alpha\n").hexdigest()

    async with site.client() as client:
        async with client.get(f"{ORIGIN}/jobs/{record.id}") as answer:
            page = await answer.text()
        async with client.get(f"{ORIGIN}/jobs/{record.id}/outputs/results/a.txt") as answer:
            assert await answer.read() == b"alpha\n"
            assert answer.headers["Content-Disposition"] == "attachment; filename*=UTF-8''a.txt"
            assert answer.headers["X-Content-Type-Options"] == "nosniff"
        async with client.get(f"{ORIGIN}/jobs/{record.id}/outputs/results/secret.txt") as answer:
            assert answer.status == 404
        async with client.get(f"{ORIGIN}/jobs/{record.id}/provenance") as answer:
            assert await answer.read() == stored
        # The read API mirrors the hub's.
        async with client.get(f"{ORIGIN}/api/v1/jobs/{record.id}/provenance") as answer:
            assert (answer.status, await answer.read()) == (200, stored)
        async with client.get(f"{ORIGIN}/api/v1/jobs/{record.id}/outputs") as answer:
            assert (await answer.json())["outputs"] == [
                {"path": "results/a.txt", "sha256": digest, "size": 6,
                 "url": f"/api/v1/jobs/{record.id}/outputs/results/a.txt"}]
        async with client.get(f"{ORIGIN}/api/v1/jobs/{record.id}/outputs/results/a.txt") as answer:
            assert await answer.read() == b"alpha\n"
        site.peer["uid"] = pwd.getpwnam("hpcr-bob").pw_uid       # a member of ocean: sees, may not cancel
        async with client.get(f"{ORIGIN}/jobs/{record.id}") as answer:
            members_page = await answer.text()
        site.peer["uid"] = NOBODY
        for path in (f"/jobs/{record.id}/provenance", f"/jobs/{record.id}/outputs/results/a.txt",
                     f"/api/v1/jobs/{record.id}/provenance",
                     f"/api/v1/jobs/{record.id}/outputs/results/a.txt"):
            async with client.get(f"{ORIGIN}{path}") as answer:
                assert answer.status == 404, path

    assert 'id="what-ran"' in page and digest in page
    assert f'href="/jobs/{record.id}/outputs/results/a.txt"' in page
    assert f'href="/jobs/{record.id}/provenance"' in page and hashlib.sha256(stored).hexdigest() in page
    assert "ocean-members" in page and "results/secret.txt: a symbolic link" in page
    # The replay (the command to run in a checkout: a browser has none) is for those who may cancel.
    assert f'<pre class="command" id="replay-command">hpc-runner replay {record.id}</pre>' in page
    assert digest in members_page and 'id="replay-command"' not in members_page


async def replay_form(client: aiohttp.ClientSession, job_id: str) -> str:
    """The CSRF token of the job page's Replay form (which must be there)."""
    async with client.get(f"{ORIGIN}/jobs/{job_id}") as answer:
        page = await answer.text()
    assert 'id="replay-button"' in page, page
    found = re.search(r'id="replay-form">\s*<input type="hidden" name="csrf_token" value="([^"]+)"', page)
    assert found is not None
    return found.group(1)


async def test_the_replay_button_replays_from_the_submitted_directory_as_the_viewer(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    job_id = await submit(site, ROOT, "to-replay")
    await site.harness.wait_started(job_id)
    site.harness.executor.release(job_id)
    await site.harness.wait_state(job_id, JobState.succeeded)
    async with site.client() as client:
        token = await replay_form(client, job_id)
        # The image at the policy's path is not the one the job ran (here there is none): refused,
        # saying why, and nothing queued.
        async with client.post(f"{ORIGIN}/jobs/{job_id}/replay", data={"csrf_token": token},
                               allow_redirects=False) as answer:
            assert answer.status == 409
            assert f"is not the one job {job_id} ran" in await answer.text()
        assert len(site.harness.store.list_jobs()) == 1

        async def image_unchanged(*_args: object) -> None:  # image verification is stood in for
            return None
        monkeypatch.setattr(site.harness.agent, "_check_replayed_image", image_unchanged)
        async with client.post(f"{ORIGIN}/jobs/{job_id}/replay", data={}) as answer:
            assert answer.status == 403 and "CSRF" in await answer.text()
        async with client.post(f"{ORIGIN}/jobs/{job_id}/replay", data={"csrf_token": token},
                               allow_redirects=False) as answer:
            assert answer.status == 303
            new_id = answer.headers["Location"].removeprefix("/jobs/")
    replayed = site.harness.store.get_job(new_id)
    assert replayed is not None and replayed.spec == site.harness.store.get_job(job_id).spec  # type: ignore[union-attr]
    assert replayed.identity["user"] == "root"
    assert replayed.decision is not None \
        and replayed.decision["submitted_workspace"] == str(site.harness.workspace)
    assert [e.detail["job_id"] for e in site.harness.store.audit_entries(job_id=new_id)
            if e.action == "replay_of"] == [job_id]


async def test_only_those_who_may_cancel_a_job_may_replay_it(
        site: Site) -> None:
    record = await site.harness.submit(ZED, job("ocean-run"))
    await site.harness.wait_started(record.id)
    site.harness.executor.release(record.id)
    await site.harness.wait_state(record.id, JobState.succeeded)
    board = site.server.board
    with pytest.raises(NotCancellable):
        await board.replay(BOB, record.id)        # a member of ocean: sees it, may not replay it
    with pytest.raises(NotVisible):
        await board.replay(STRANGER, record.id)
    async with site.client() as client:
        site.peer["uid"] = pwd.getpwnam("hpcr-bob").pw_uid
        async with client.get(f"{ORIGIN}/jobs/{record.id}") as answer:
            assert 'id="replay-button"' not in await answer.text()
        async with client.post(f"{ORIGIN}/jobs/{record.id}/replay", data={}) as answer:
            assert answer.status == 403
