"""A job's provenance record and outputs at the hub: sent by the real agent's publisher before the
job's final state, kept by the real hub (its job store and its state dir), read back through the
jobs API by those who may see the job, and shown on the dashboard's job page.

The hub's checks are driven with the agent's own client (`HubClient`) over HTTP: a file whose
bytes differ from its record, a path with `..`, a record over the limit are each refused, naming
what was wrong; a hub that refuses or fails does not keep the job's final state from it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import urllib.parse
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yarl
from aiohttp import web
from conftest import wait_until
from structlog.testing import capture_logs

import runner.gateway.agent_jobs_api as agent_jobs_api
import runner.sources.api.report as report_module
from runner.gateway import jobs_protocol as protocol
from runner.gateway.board import HubBoard
from runner.gateway.jobstore import JobStore
from runner.gateway.outputs import OutputRefused, check_output_path, parse_record
from runner.identity import Identity
from runner.job import JobRecord
from runner.lifecycle.admission import workspace_of
from runner.metrics import endpoint_of
from runner.sources.api.client import HubClient, HubRefused
from runner.sqlitefile import StoreError
from runner.store import Store
from runner.web.board import NotVisible, Viewer
from runner.web.pages import Dashboard
from runner.web.security import add_security_headers
from runner.web.sessions import setup_sessions

from .test_agent import job
from .test_hub_publisher import Hub as PublishingHub
from .test_hub_publisher import (
    Node,
    ended_at_hub,
    node,  # noqa: F401  (fixture)
)
from .test_hub_publisher import hub as publishing_hub  # noqa: F401  (fixture)
from .test_hub_server import (  # noqa: F401  (fixtures)
    JOB,
    REPOSITORY,
    TOKEN_A,
    TOKEN_B,
    Hub,
    StartHub,
    hub,
    issuer,
    start_hub,
)

COMMIT = "c0ffee" + "0" * 34
PLOT = b"\x89PNG\r\n\x1a\n not really a plot"
TABLE = b"<script>alert(1)</script>\nrow 1\n"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def statement(outputs: dict[str, bytes], *, replay_of: str | None = None) -> bytes:
    """A record as an agent writes one (its shape, canonical JSON) naming `outputs`."""
    external: dict[str, Any] = {"job": JOB, "trigger": {"source": "github", "repository": REPOSITORY,
                                                        "commit": COMMIT}}
    if replay_of is not None:
        external["replay_of"] = {"job_id": replay_of, "provenance_sha256": "ab" * 32}
    record = {
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"name": path, "digest": {"sha256": sha256(data)}, "annotations": {"size": len(data)}}
                    for path, data in outputs.items()],
        "predicateType": "https://slsa.dev/provenance/v1",
        "predicate": {
            "buildDefinition": {
                "buildType": "urn:hpc-runner:job:v1", "externalParameters": external,
                "internalParameters": {"grant": "clima-ci", "account": "clima"},
                "resolvedDependencies": [{"name": "image", "uri": "file:///images/julia.sif",
                                          "digest": {"sha256": "11" * 32}}]},
            "runDetails": {
                "builder": {"id": "urn:hpc-runner:agent:login-a"},
                "metadata": {"invocationId": "01agentjob0001"},
                "byproducts": [{"name": "run", "annotations": {
                    "state": "succeeded", "slurm_job_ids": ["4242"], "nodes": "cn[01-02]",
                    "queue_wait_seconds": 12.5, "run_seconds": 75.0}}]}}}
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode()


async def registered_job(hub: Hub) -> str:  # noqa: F811
    """A GitHub job of REPOSITORY that agent A registered and runs in account `clima`."""
    job_id = "01jz0a1b2c3d4"
    body = protocol.registration_body(JOB, Identity(source="github", repository=REPOSITORY, actor="octocat",
                                                    event="push"), "hpc1", commit=COMMIT)
    assert (await hub.call("PUT", protocol.agent_job_path(job_id), agent=TOKEN_A, body=body))[0] == 201
    status, answer = await hub.publish(job_id, "running", account="clima", grant="clima-ci",
                                       members=("github:repo:CliMA/ClimaCore.jl",))
    assert status == 200, answer
    return job_id


def stored_files(hub: Hub) -> list[Path]:  # noqa: F811
    root = hub.server._state_dir / "outputs"
    return sorted(path for path in root.rglob("*") if path.is_file()) if root.exists() else []


async def put_output(client: HubClient, job_id: str, path: str, data: bytes, tmp: Path) -> None:
    source = tmp / f"upload-{sha256(path.encode())[:8]}"
    source.write_bytes(data)
    with source.open("rb") as handle:
        await client.put_output(job_id, path, handle, len(data))


# -- the hub's API ---------------------------------------------------------------------------------


async def test_a_record_and_two_outputs_are_read_back_by_those_who_see_the_job(hub: Hub,  # noqa: F811
                                                                              tmp_path: Path) -> None:
    job_id = await registered_job(hub)
    outputs = {"plots/a.png": PLOT, "results/deep/table.html": TABLE}
    record = statement(outputs)
    status, answer, _ = await hub.call("GET", f"/api/v1/jobs/{job_id}/provenance", token=hub.token())
    assert status == 404 and "no provenance record" in answer["error"]

    async with HubClient(hub.url, TOKEN_A) as client:
        held = await client.put_provenance(job_id, record)
        assert [(o.path, o.sha256, o.size, o.held) for o in held] == [
            (path, sha256(data), len(data), False) for path, data in outputs.items()]
        for path, data in outputs.items():
            await put_output(client, job_id, path, data, tmp_path)
        # Both sides may repeat themselves after a restart: the hub answers alike, holds one copy.
        assert all(output.held for output in await client.put_provenance(job_id, record))
        await put_output(client, job_id, "plots/a.png", PLOT, tmp_path)
    await hub.publish(job_id, "succeeded", exit_status=0)

    for token in (hub.token(), hub.token("CliMA/ClimaCore.jl")):        # its submitter, a member
        status, _, body = await hub.call("GET", f"/api/v1/jobs/{job_id}/provenance", token=token)
        assert (status, body) == (200, record)
        status, listing, _ = await hub.call("GET", f"/api/v1/jobs/{job_id}/outputs", token=token)
        assert status == 200
        assert [(o["path"], o["sha256"], o["size"]) for o in listing["outputs"]] == [
            (path, sha256(data), len(data)) for path, data in outputs.items()]
        for output in listing["outputs"]:
            async with hub.http.get(hub.url + output["url"],
                                    headers={"Authorization": f"Bearer {token}"}) as response:
                data = await response.read()
                assert response.status == 200
                assert sha256(data) == output["sha256"]
                assert response.headers["Content-Type"] == "application/octet-stream"
                assert response.headers["X-Content-Type-Options"] == "nosniff"
                assert response.headers["Content-Disposition"].startswith("attachment;")
    assert len(stored_files(hub)) == 2
    for path in stored_files(hub):
        assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
        assert path.name in {sha256(PLOT), sha256(TABLE)}

    # Whoever may not see the job hears of no such job, whichever way they ask.
    stranger = hub.token("Ocean/Model.jl")
    for path in ("provenance", "outputs", "outputs/plots/a.png"):
        status, answer, _ = await hub.call("GET", f"/api/v1/jobs/{job_id}/{path}", token=stranger)
        assert status == 404 and "no job" in answer["error"], path
    assert (await hub.call("GET", f"/api/v1/jobs/{job_id}/outputs/plots/a.png"))[0] == 401
    # A path the record does not name is no output, even a file the hub holds under another name.
    status, _, _ = await hub.call("GET", f"/api/v1/jobs/{job_id}/outputs/plots/{sha256(PLOT)}",
                                  token=hub.token())
    assert status == 404


async def test_the_hub_refuses_a_tampered_output_a_path_out_of_work_and_a_record_too_large(
        hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    job_id = await registered_job(hub)
    async with HubClient(hub.url, TOKEN_A) as client:
        with pytest.raises(HubRefused, match="no provenance record at the hub yet"):
            await put_output(client, job_id, "plots/a.png", PLOT, tmp_path)
        await client.put_provenance(job_id, statement({"plots/a.png": PLOT, "results/b.txt": b"b\n"}))

        tampered = PLOT.replace(b"really", b"REALLY")
        differs = (f"plots/a.png differs from its record: sha256 {sha256(tampered)}, "
                   f"its record says {sha256(PLOT)}")
        with pytest.raises(HubRefused, match=differs) as refused:
            await put_output(client, job_id, "plots/a.png", tampered, tmp_path)
        assert refused.value.status == 400
        with pytest.raises(HubRefused, match="differs from its record: 3 bytes, its record says 2"):
            await put_output(client, job_id, "results/b.txt", b"bb\n", tmp_path)
        with pytest.raises(HubRefused, match="names no such output"):
            await put_output(client, job_id, "results/c.txt", b"b\n", tmp_path)
        # Neither a refused file nor a piece of it is kept.
        assert stored_files(hub) == []
        assert (await hub.call("GET", f"/api/v1/jobs/{job_id}/outputs", token=hub.token()))[1]["outputs"][0][
            "url"] is None

        # `..` never leads anywhere: not in a record, not in a request's path.
        with pytest.raises(HubRefused, match=r"has a '\.\.' part"):
            await client.put_provenance(job_id, statement({"../../etc/cron.d/x": b"x"}))
        for path in ("results/../../x", "results/%2E%2E/%2E%2E/x", "results%2F..%2F..%2Fx", "/etc/x"):
            url = yarl.URL(f"{hub.url}{protocol.agent_outputs_path(job_id)}?path={path}", encoded=True)
            headers = {"Authorization": f"Bearer {TOKEN_A}"}
            async with hub.http.put(url, data=b"x", headers=headers) as response:
                answer = await response.json()
                assert (response.status, answer["error"][:13]) == (400, "output path '"), (path, answer)
                assert "'..' part" in answer["error"] or "absolute" in answer["error"]
        # Another agent may not add to the job; a second, different record is refused.
        other = statement({"plots/a.png": b"another"})
        status, answer, _ = await hub.call("PUT", protocol.agent_provenance_path(job_id), agent=TOKEN_B,
                                           data=other)
        assert status == 409 and "does not hold" in answer["error"]
        with pytest.raises(HubRefused, match="has another provenance record already"):
            await client.put_provenance(job_id, other)
        monkeypatch.setattr(agent_jobs_api, "MAX_RECORD_BYTES", 100)
        with pytest.raises(HubRefused, match="larger than 100 bytes") as refused:
            await client.put_provenance(job_id, statement({"x": b"x"}))
        assert refused.value.status == 413


async def test_a_restarted_hub_says_which_outputs_it_holds_and_takes_the_rest(
        start_hub: StartHub, tmp_path: Path) -> None:  # noqa: F811
    first = await start_hub(tmp_path / "kept")
    job_id = await registered_job(first)
    outputs = {"plots/a.png": PLOT, "results/table.html": TABLE}
    record = statement(outputs)
    async with HubClient(first.url, TOKEN_A) as client:
        await client.put_provenance(job_id, record)
        await put_output(client, job_id, "plots/a.png", PLOT, tmp_path)
    await first.server.close()

    second = await start_hub(tmp_path / "kept")
    async with HubClient(second.url, TOKEN_A) as client:
        held = await client.put_provenance(job_id, record)
        assert [(output.path, output.held) for output in held] == [("plots/a.png", True),
                                                                   ("results/table.html", False)]
        await put_output(client, job_id, "results/table.html", TABLE, tmp_path)
    for path, data in outputs.items():
        status, _, body = await second.call("GET", f"/api/v1/jobs/{job_id}/outputs/{path}",
                                            token=second.token())
        assert (status, sha256(body)) == (200, sha256(data))


def test_an_output_path_is_plain_names_under_work() -> None:
    assert check_output_path("results/a/b.nc") == "results/a/b.nc"
    for bad, words in (("../x", "'..' part"), ("a/../b", "'..' part"), ("/etc/passwd", "absolute"),
                       ("a//b", "'empty' part"), ("a/./b", "'.' part"), ("a\\b", "backslash"),
                       ("a\nb", "control character"), ("", "from 1 to")):
        with pytest.raises(OutputRefused, match=words):
            check_output_path(bad)
    # A record without outputs vouches for its log, which is no output file.
    log_only = {"_type": "https://in-toto.io/Statement/v1",
                "subject": [{"name": "log", "uri": "urn:hpc-runner:job:x:log", "digest": {"sha256": "0" * 64},
                             "annotations": {"size": 3}}]}
    assert parse_record(json.dumps(log_only).encode()) == ()
    with pytest.raises(OutputRefused, match="not an in-toto Statement"):
        parse_record(b'{"subject": []}')
    # An output's path goes in the query: the agent's request metrics name no directory of a job's.
    assert endpoint_of(f"{protocol.agent_outputs_path('01jz0a1b2c3d4')}?path=results/a.txt") == \
        "api/v1/agent/jobs/outputs"


def test_the_hub_keeps_a_record_and_its_outputs_as_they_came(tmp_path: Path) -> None:
    with JobStore.open(tmp_path) as store:
        store._conn.execute("INSERT INTO jobs (id, job, identity, principals, origin, created)"
                            " VALUES ('01jz0a1b2c3d4', '{}', '{}', '[]', 'agent', 0)")
        store._conn.execute("INSERT INTO provenance (job_seq, statement, sha256, received) VALUES (1, x'00',"
                            " 'x', 0)")
        store._conn.execute("INSERT INTO job_outputs (job_seq, path, sha256, size, received)"
                            " VALUES (1, 'a', 'x', 1, 0)")
        for sql in ("UPDATE provenance SET statement = x'01'", "DELETE FROM provenance",
                    "UPDATE job_outputs SET size = 2", "DELETE FROM job_outputs"):
            with pytest.raises(Exception, match="kept as it came"):
                store._conn.execute(sql)


# -- from the agent's publisher --------------------------------------------------------------------


ALICE = Identity(source="local", user="alice", groups=("esm",))


async def run_with_outputs(node: Node, files: dict[str, bytes]) -> JobRecord:  # noqa: F811
    """A local job declaring `results/*.txt` and `plots/*.png` that writes `files` and succeeds."""
    node.start()
    record = await node.submit(spec=dataclasses.replace(job(), outputs=("results/*.txt", "plots/*.png")))
    assert node.agent is not None
    await wait_until(lambda: record.id in node.executor.started, "the job to start")
    workspace = workspace_of(node.agent.job(record.id) or record)
    for path, data in files.items():
        (workspace / path).parent.mkdir(parents=True, exist_ok=True)
        (workspace / path).write_bytes(data)
    node.executor.release(record.id)
    return record


def agent_record(node: Node, job_id: str) -> bytes:  # noqa: F811
    with Store.open(node.config.state_dir) as store:
        data = store.provenance(job_id)
    assert data is not None
    return data


async def test_the_publisher_sends_the_record_and_outputs_before_the_final_state(
        publishing_hub: PublishingHub, node: Node) -> None:  # noqa: F811
    files = {"results/a.txt": b"alpha\n", "plots/b.png": PLOT}
    record = await run_with_outputs(node, files)

    await ended_at_hub(publishing_hub, record.id)
    # Whoever sees the job ended finds both, at once: they came before the final state.
    with JobStore.open(publishing_hub.state_dir) as store:
        assert store.provenance(record.id) == agent_record(node, record.id)
        assert store.outputs(record.id) == {path: (sha256(data), len(data)) for path, data in files.items()}
    assert publishing_hub.server is not None
    board = HubBoard(publishing_hub.server._jobs_thread, publishing_hub.server._wakeups)
    member = Viewer("esm", ("local:group:esm",))       # a member of its account, as the hub has it
    for path, data in files.items():
        opened = await board.open_output(member, record.id, path)
        assert opened is not None
        with opened.handle:
            assert sha256(opened.handle.read()) == sha256(data)
    with pytest.raises(NotVisible):
        await board.open_output(Viewer("mallory", ("local:user:mallory",)), record.id, "results/a.txt")


async def test_a_hub_that_refuses_the_record_still_gets_the_final_state(
        publishing_hub: PublishingHub, node: Node, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.setattr(agent_jobs_api, "MAX_RECORD_BYTES", 10)
    with capture_logs() as logs:
        record = await run_with_outputs(node, {"results/a.txt": b"alpha\n"})
        held, _ = await ended_at_hub(publishing_hub, record.id)
    assert held.state == "succeeded"
    with JobStore.open(publishing_hub.state_dir) as store:
        assert store.provenance(record.id) is None and store.outputs(record.id) == {}
    refused = [entry for entry in logs if entry["event"].startswith("the hub refused the job's provenance")]
    assert refused and "larger than 10 bytes" in refused[0]["error"]


async def test_a_hub_that_fails_to_keep_the_record_gets_the_final_state_after_the_bound(
        publishing_hub: PublishingHub, node: Node, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    def failing(*args: object) -> bool:
        raise StoreError("disk full")
    monkeypatch.setattr(JobStore, "save_provenance", failing)
    monkeypatch.setattr(report_module, "HAND_OVER_SECONDS", 1.0)
    with capture_logs() as logs:
        record = await run_with_outputs(node, {"results/a.txt": b"alpha\n"})
        held, _ = await ended_at_hub(publishing_hub, record.id)
    assert held.state == "succeeded"
    assert any(entry["event"].startswith("the hub did not take the job's provenance record")
               for entry in logs)


# -- the dashboard ---------------------------------------------------------------------------------


async def dashboard(hub: Hub, viewer: Viewer) -> aiohttp.ClientSession:  # noqa: F811
    """The hub's dashboard pages over its real board, for `viewer` (as a login would make them)."""
    async def viewer_of(_request: web.Request) -> Viewer:
        return viewer
    app = web.Application()
    setup_sessions(app, os.urandom(32), secure=False)
    add_security_headers(app)
    Dashboard(HubBoard(hub.server._jobs_thread, hub.server._wakeups), viewer_of,
              site_name="hub").add_routes(app)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    session = aiohttp.ClientSession(base_url=f"http://127.0.0.1:{port}")
    session._hpcr_runner = runner  # type: ignore[attr-defined]
    return session


async def close(session: aiohttp.ClientSession) -> None:
    await session.close()
    await session._hpcr_runner.cleanup()  # type: ignore[attr-defined]


async def test_the_job_page_shows_what_ran_and_the_replay_command_to_those_who_may_cancel(
        hub: Hub, tmp_path: Path) -> None:  # noqa: F811
    job_id = await registered_job(hub)
    outputs = {"plots/a b.png": PLOT, "results/table.html": TABLE}
    record = statement(outputs, replay_of="01jz0a1b2c3d0")
    async with HubClient(hub.url, TOKEN_A) as client:
        await client.put_provenance(job_id, record)
        await put_output(client, job_id, "plots/a b.png", PLOT, tmp_path)
    await hub.publish(job_id, "succeeded", exit_status=0)

    submitter = await dashboard(hub, Viewer("octocat", (f"github:repo:{REPOSITORY}",)))
    member = await dashboard(hub, Viewer("someone", ("github:repo:CliMA/ClimaCore.jl",)))
    stranger = await dashboard(hub, Viewer("stranger", ("github:repo:Ocean/Model.jl",)))
    try:
        async with submitter.get(f"/jobs/{job_id}") as answer:
            page = await answer.text()
            assert answer.status == 200
        assert 'id="what-ran"' in page and "/images/julia.sif" in page and "sha256:" + "11" * 32 in page
        assert f'href="https://github.com/{REPOSITORY}/commit/{COMMIT}"' in page
        assert "clima-ci" in page and "4242" in page and "cn[01-02]" in page
        assert "12s" in page and "1m 15s" in page
        for path, data in outputs.items():
            assert sha256(data) in page and path in page
        link = f'/jobs/{job_id}/outputs/{urllib.parse.quote("plots/a b.png")}'
        assert f'href="{link}"' in page
        assert "results/table.html</a>" not in page and "(not here)" in page     # the hub lacks it
        assert f'href="/jobs/{job_id}/provenance"' in page and sha256(record) in page
        assert 'href="/jobs/01jz0a1b2c3d0"' in page
        assert '<pre class="command" id="replay-command">hpc-runner replay 01agentjob0001</pre>' in page
        # The hub cannot start a replay (it runs on the agent, from a checkout): no button.
        assert 'id="replay-button"' not in page
        async with submitter.get(link) as answer:
            assert sha256(await answer.read()) == sha256(PLOT)
            assert answer.headers["Content-Disposition"].startswith("attachment;")
            assert answer.headers["X-Content-Type-Options"] == "nosniff"
        async with submitter.get(f"/jobs/{job_id}/provenance") as answer:
            assert await answer.read() == record

        # A member sees what ran, without the replay; a stranger sees nothing of it.
        async with member.get(f"/jobs/{job_id}") as answer:
            page = await answer.text()
        assert sha256(PLOT) in page and 'id="replay-command"' not in page
        for path in (f"/jobs/{job_id}", link, f"/jobs/{job_id}/provenance"):
            async with stranger.get(path) as answer:
                assert answer.status == 404, path
    finally:
        for session in (submitter, member, stranger):
            await close(session)
