"""The agent's dashboard on its own socket (`web_socket`), as local users reach it.

The agent runs as the service account with both its sockets outside the state dir; hpcr-alice
(hpcr-esm) submits through the local queue, and each user asks the dashboard's socket with curl,
as themselves: the kernel says who asks, so alice reads her job's log and hpcr-bob (hpcr-ocean,
neither a member nor an admin of esm) is told there is no such job.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import (
    AgentProcess,
    Cluster,
    RunnerSite,
    as_user,
    job_toml,
    make_runner_site,
    toml_string,
    write_public_file,
)

from .test_local_queue import ALICE, BOB, QueueUser, queue_policy


@pytest.fixture
def dashboard_site(cluster: Cluster, service_tmp: Path, shared_socket: Path, queue_users: dict[str, str]
                   ) -> RunnerSite:
    service_tmp.chmod(0o755)  # the users' workspaces live in it
    site = make_runner_site(service_tmp, cluster.image_sha256, socket=shared_socket, max_jobs=2)
    site.write_policy(queue_policy(cluster))
    # A top-level key: before the config's first table.
    key = f"web_socket = {toml_string(web_socket(site))}\n"
    write_public_file(site.config, key + site.config.read_text())
    return site


def web_socket(site: RunnerSite) -> Path:
    return site.socket.with_name("web.sock")


def get_as(user: str, site: RunnerSite, path: str) -> tuple[int, str]:
    """GET `path` on the dashboard's socket with curl, as `user`: the status and the body."""
    result = as_user(user, ["curl", "-sS", "--unix-socket", web_socket(site), "-w", "\n%{http_code}",
                            f"http://localhost{path}"], cwd="/", timeout=60)
    assert result.returncode == 0, result.stderr
    body, _, status = result.stdout.rpartition("\n")
    return int(status), body


def test_a_user_reads_their_jobs_log_and_another_user_is_told_there_is_no_such_job(
        dashboard_site: RunnerSite, agents: Callable[[RunnerSite], AgentProcess]) -> None:
    agent = agents(dashboard_site)
    agent.wait_for_log("dashboard listening")
    assert web_socket(dashboard_site).stat().st_mode & 0o777 == 0o666
    alice = QueueUser(ALICE, dashboard_site)
    job_id = alice.submit(job_toml("dashboard", command=["echo", "hello from the job"]))
    assert alice.wait_end(job_id)["state"] == "succeeded"

    status, body = get_as(ALICE, dashboard_site, f"/api/v1/jobs/{job_id}/log")
    # The job's output, then what ran.
    assert status == 200 and body.startswith("hello from the job\n--- what ran\n"), body
    status, body = get_as(ALICE, dashboard_site, f"/api/v1/jobs/{job_id}")
    assert status == 200 and json.loads(body)["state"] == "succeeded"
    status, body = get_as(ALICE, dashboard_site, "/")
    assert status == 200 and job_id in body and ALICE in body

    for path in (f"/api/v1/jobs/{job_id}", f"/api/v1/jobs/{job_id}/log", f"/jobs/{job_id}"):
        status, body = get_as(BOB, dashboard_site, path)
        assert status == 404, path
        assert "hello from the job" not in body
    status, body = get_as(BOB, dashboard_site, "/api/v1/jobs")
    assert status == 200 and json.loads(body)["jobs"] == []
