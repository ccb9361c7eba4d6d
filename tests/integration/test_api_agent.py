"""An API job end to end: submitted to `hpc-runner hub` with a minted OIDC token over HTTP, leased
by `hpc-runner agent` on the real cluster, checked out from a real git repository, run through
Slurm and Apptainer, and its state and log read back at the hub byte-exact.

The hub runs as a process of its own (as root, from this checkout), the agent as the service
account; the OIDC issuer emulator runs in this process on 127.0.0.1, on an event loop of its own
thread, and both the hub and the agent fetch its keys. The repository is a bare repository on disk
that the agent's `checkout_url` (a `file://` URL) names.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    TEST_IMAGE_NAME,
    AgentProcess,
    Cluster,
    RunnerSite,
    as_service_user,
    git,
    give_tree_to_service_user,
    source_site,
    toml_string,
    toml_table,
    wait_for,
    write_public_file,
    write_service_secret,
)
from fakes.background_loop import BackgroundLoop
from fakes.oidc_issuer import OidcIssuerEmulator

from integration.test_agent_slurm import squeue_lists
from integration.test_gateway import TOKEN, GatewayProcess, Site
from runner.auditlines import KEYS
from runner.sources.api.published import agent_record

REPOSITORY = "octo-org/octo-repo"
CLUSTER = "dev"
AUDIENCE = "hpc-runner"
JOB_TIMEOUT_S = 120.0
JOB = {"name": "unit", "image": TEST_IMAGE_NAME, "script": "cat data.txt\necho all tests passed\n",
       "resources": {"time": "1m", "cpus_per_task": 1}}
TERMINAL = {"succeeded", "failed", "cancelled", "timed_out", "denied", "infra_failed"}


class IssuerThread(BackgroundLoop):
    """The OIDC issuer emulator, serving on an event loop of its own thread."""

    def __init__(self) -> None:
        super().__init__(timeout=60)
        self.issuer: OidcIssuerEmulator = self.call(OidcIssuerEmulator)
        self.run(self.issuer.start())

    def close(self) -> None:
        try:
            self.run(self.issuer.close())
        finally:
            self.stop()

    def token(self, repository: str, commit: str) -> str:
        owner = repository.split("/")[0]
        return self.call(lambda: self.issuer.mint("github", aud=AUDIENCE, repository=repository,
                                                  repository_owner=owner, sha=commit))


@pytest.fixture
def issuer() -> Iterator[IssuerThread]:
    with contextlib.closing(IssuerThread()) as thread:
        yield thread


def hub_site(root: Path, port: int, issuer: IssuerThread) -> Site:
    """A hub's config in `root` (made here) listening on `port`, serving the jobs API to tokens of
    the emulator."""
    site = Site(root, port)
    site.root.mkdir()
    site.write(issuer=issuer.issuer.url)
    return site


def start_hub(site: Site, log: Path, issuer: IssuerThread) -> GatewayProcess:
    """`hpc-runner hub` on `site`'s config, once it answers; its stderr appended to `log`."""
    process = GatewayProcess(site, log, "hub")
    try:
        issuer.run(process.ready())
    except BaseException:
        process.kill()
        raise
    return process


@pytest.fixture
def hub(tmp_path: Path, unused_tcp_port: int, issuer: IssuerThread) -> Iterator[Site]:
    site = hub_site(tmp_path / "hub", unused_tcp_port, issuer)
    process = start_hub(site, tmp_path / "hub.log", issuer)
    try:
        yield site
    finally:
        process.kill()


def published_repository(root: Path) -> tuple[Path, str]:
    """A bare repository holding one commit of data.txt, as the service account's; its commit."""
    work, bare = root / "git-work", root / "repos" / f"{REPOSITORY}.git"
    work.mkdir()
    bare.parent.mkdir(parents=True)
    git("init", "--quiet", "--initial-branch=main", cwd=work)
    git("init", "--quiet", "--bare", str(bare), cwd=root)
    (work / "data.txt").write_text("from the repository\n")
    git("add", "--all", cwd=work)
    git("commit", "--quiet", "-m", "data", cwd=work)
    commit = git("rev-parse", "HEAD", cwd=work).strip()
    git("push", "--quiet", str(bare), f"{commit}:refs/heads/main", cwd=work)
    give_tree_to_service_user(root / "repos")
    return bare, commit


def api_site(cluster: Cluster, root: Path, hub: Site, issuer: IssuerThread, *, socket: Path) -> RunnerSite:
    """An agent through Slurm that leases the hub's API jobs for `CLUSTER`, trusting the GitHub
    tokens of `issuer`; repository octo-org/octo-repo may run on account esm."""
    site = source_site(
        cluster, root, socket=socket, max_jobs=2,
        grant=toml_table("[[grants]]", name="octo", principals=[f"github:repo:{REPOSITORY}"], account="esm",
                         images=[TEST_IMAGE_NAME]),
        section=toml_table("[[oidc]]", name="github-actions", issuer=issuer.issuer.url, audience=AUDIENCE,
                           kind="github"))
    token_file = write_service_secret(root / "hub-token", TOKEN + "\n")
    # Top-level keys come before the config's first table.
    keys = "".join(f"{key} = {toml_string(value)}\n" for key, value in (
        ("hub_url", hub.url), ("hub_token_file", str(token_file)), ("cluster", CLUSTER),
        ("checkout_url", f"file://{root}/repos/{{repository}}.git")))
    write_public_file(site.config, keys + site.config.read_text())
    return site


def call(hub: Site, method: str, path: str, token: str, body: Any = None) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(hub.url + path, data=data, method=method,
                                     headers={"Authorization": f"Bearer {token}",
                                              "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def ended(hub: Site, job_id: str, token: str) -> dict[str, Any]:
    def final() -> dict[str, Any] | None:
        status, body = call(hub, "GET", f"/api/v1/jobs/{job_id}", token)
        assert status == 200, body
        view: dict[str, Any] = json.loads(body)
        return view if view["state"] in TERMINAL else None

    found: dict[str, Any] = wait_for(final, JOB_TIMEOUT_S, interval=0.5,
                                     what=f"job {job_id} to end at the hub")
    return found


def submit(hub: Site, token: str, body: dict[str, Any]) -> str:
    status, answer = call(hub, "POST", "/api/v1/jobs", token, body)
    assert status == 201, answer
    return str(json.loads(answer)["id"])


def test_a_job_submitted_to_the_hub_runs_on_the_cluster_and_the_hub_holds_its_state_and_log(
        cluster: Cluster, service_tmp: Path, hub: Site, issuer: IssuerThread, shared_socket: Path,
        agents: Callable[[RunnerSite], AgentProcess]) -> None:
    _, commit = published_repository(service_tmp)
    site = api_site(cluster, service_tmp, hub, issuer, socket=shared_socket)
    agent = agents(site)
    token = issuer.token(REPOSITORY, commit)
    job_id = submit(hub, token, {"job": JOB, "cluster": CLUSTER})
    elsewhere = issuer.token("octo-org/elsewhere", commit)
    denied_id = submit(hub, elsewhere, {"job": JOB})

    try:
        view = ended(hub, job_id, token)
        denied = ended(hub, denied_id, elsewhere)
    except AssertionError:
        raise AssertionError(f"a job did not end at the hub; the agent's log:\n{agent.log()}") from None

    assert (view["state"], view["exit_status"], view["account"], view["grant"]) == ("succeeded", 0, "esm",
                                                                                     "octo")
    # (`started` is known only when the agent saw the job running; a short one may end before.)
    assert view["slurm_job_id"] and view["ended"]
    status, log = call(hub, "GET", f"/api/v1/jobs/{job_id}/log", token)
    assert status == 200
    assert f"hpc-runner: checking out {commit} of {REPOSITORY}".encode() in log
    assert b"from the repository\n" in log and b"all tests passed\n" in log
    # Byte-exact: the hub holds the job's log as the agent's job directory does.
    [record_id] = [path.parent.name for path in site.work_root.glob("*/output.log")
                   if path.read_bytes() == log]
    assert squeue_lists(record_id) is False
    assert denied["state"] == "denied" and denied["reasons"]
    status, denied_log = call(hub, "GET", f"/api/v1/jobs/{denied_id}/log", elsewhere)
    assert b"hpc-runner: denied by policy:\n" in denied_log
    assert all(f"  - {reason}\n".encode() in denied_log for reason in denied["reasons"])


def test_the_hub_holds_the_agents_provenance_record_byte_for_byte_and_the_jobs_output(
        cluster: Cluster, service_tmp: Path, hub: Site, issuer: IssuerThread, shared_socket: Path,
        agents: Callable[[RunnerSite], AgentProcess]) -> None:
    _, commit = published_repository(service_tmp)
    site = api_site(cluster, service_tmp, hub, issuer, socket=shared_socket)
    agent = agents(site)
    token = issuer.token(REPOSITORY, commit)
    spec = {**JOB, "script": "mkdir -p results\ncp data.txt results/copy.txt\n", "outputs": ["results/*.txt"]}
    job_id = submit(hub, token, {"job": spec, "cluster": CLUSTER})
    try:
        view = ended(hub, job_id, token)
    except AssertionError:
        raise AssertionError(f"the job did not end at the hub; the agent's log:\n{agent.log()}") from None
    assert view["state"] == "succeeded"

    # As soon as the hub shows the job ended, it holds the record: the very bytes the agent stored.
    status, at_hub = call(hub, "GET", f"/api/v1/jobs/{job_id}/provenance", token)
    assert status == 200, at_hub
    [record_id] = [path.parent.name for path in site.work_root.glob("*/output.log")]
    assert agent_record(site.state_dir, record_id) == at_hub
    status, listing = call(hub, "GET", f"/api/v1/jobs/{job_id}/outputs", token)
    [output] = json.loads(listing)["outputs"]
    expected = hashlib.sha256(b"from the repository\n").hexdigest()
    assert (output["path"], output["sha256"], output["size"]) == ("results/copy.txt", expected, 20)
    status, data = call(hub, "GET", output["url"], token)
    assert status == 200 and hashlib.sha256(data).hexdigest() == expected
    # Another repository's token sees neither.
    elsewhere = issuer.token("octo-org/elsewhere", commit)
    assert call(hub, "GET", f"/api/v1/jobs/{job_id}/provenance", elsewhere)[0] == 404
    assert call(hub, "GET", output["url"], elsewhere)[0] == 404


def test_the_hubs_audit_trail_of_a_job_agrees_with_its_agents_audit_log(
        cluster: Cluster, service_tmp: Path, hub: Site, issuer: IssuerThread, shared_socket: Path,
        agents: Callable[[RunnerSite], AgentProcess]) -> None:
    _, commit = published_repository(service_tmp)
    site = api_site(cluster, service_tmp, hub, issuer, socket=shared_socket)
    admins = 'admins = ["github:repo:octo-org/audit-tools"]\n'
    site.write_policy(site.policy.read_text().replace("[accounts.esm]\n", "[accounts.esm]\n" + admins, 1))
    agent = agents(site)
    token = issuer.token(REPOSITORY, commit)
    job_id = submit(hub, token, {"job": JOB, "cluster": CLUSTER})
    try:
        view = ended(hub, job_id, token)
    except AssertionError:
        raise AssertionError(f"the job did not end at the hub; the agent's log:\n{agent.log()}") from None
    assert view["state"] == "succeeded"

    status, body = call(hub, "GET", f"/api/v1/audit?account=esm&job={job_id}",
                        issuer.token("octo-org/audit-tools", commit))
    assert status == 200, body
    at_hub = [json.loads(line) for line in body.decode().splitlines()]
    assert all(list(item) == list(KEYS) for item in at_hub)
    assert [item["action"] for item in at_hub][:2] == ["submitted", "accepted"]
    assert at_hub[-1]["action"] == "final_status" and at_hub[-1]["detail"]["state"] == "succeeded"
    # Its submitter may follow the job, not read its trail.
    assert call(hub, "GET", f"/api/v1/audit?job={job_id}", token)[0] == 403

    # The agent ran this one job on account esm: its own audit log tells of it alike.
    local = as_service_user(["hpc-runner", "audit", "--json", "--account", "esm", "--config", site.config],
                            check=True)
    at_agent = [json.loads(line) for line in local.stdout.splitlines()]
    assert at_agent and all(list(item) == list(KEYS) for item in at_agent)
    facts = ("account", "grant", "slurm_id", "state")
    assert {tuple(item[key] for key in facts) for item in at_hub} == \
        {tuple(item[key] for key in facts) for item in at_agent} == {("esm", "octo", view["slurm_job_id"],
                                                                      "succeeded")}
