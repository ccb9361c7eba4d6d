"""`show`, `provenance`, `verify-outputs` and `replay` through the real local queue server and client.

The agent is real (store, admission, lifecycle, provenance record), on an event loop of its own
thread as in `hpc-runner agent`; only image verification and the sandbox are stood in for:
preparation takes the policy's image file as it is, and the executor is a fake that writes the
job's two outputs into its workspace (a job named `held` waits until the test lets it end). The
commands run in-process through `runner.cli.main`, as a user types them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_IMAGE_NAME, git, image_table, policy_document, toml_string, toml_table, wait_for
from fakes.background_loop import BackgroundLoop

import runner.lifecycle.driver as driver_module
from runner import exitcodes
from runner.agent import Agent
from runner.cli import main
from runner.config import load_config
from runner.executors.local import LocalLaunch
from runner.job import Outcome
from runner.job.prepared import PreparedJob
from runner.lifecycle.prepare import Site, job_dir
from runner.localqueue.client import LocalQueueClient, NoRecord, RequestFailed
from runner.localqueue.server import LocalQueueServer
from runner.policy import Decision
from runner.site_policy import load_site_policy
from runner.spec import JobSpec
from runner.store import Store
from sandbox.images import VerifiedImage, sha256_file
from sandbox.plan import SandboxPlan

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
SETPRIV = shutil.which("setpriv", path="/usr/bin:/bin") or "/usr/bin/setpriv"
ME = pwd.getpwuid(os.getuid()).pw_name
TIMEOUT_S = 20.0
# What the fake executor writes, as a deterministic job would.
OUTPUTS = {"results/run/a.txt": b"alpha\n", "plots/b.dat": b"beta\x00\xff\n"}
JOB = ('[job]\nname = "{name}"\nimage = "test"\ncommand = ["true"]\n'
       'outputs = ["results/**/*.txt", "/work/plots/*.dat"]\n')
# A client as small as can be, for a request as another user: one line out, one line back.
REQUEST = ("import socket, sys\n"
           "s = socket.socket(socket.AF_UNIX)\n"
           "s.connect(sys.argv[1])\n"
           "s.sendall(sys.argv[2].encode() + b'\\n')\n"
           "print(s.makefile().readline(), end='')\n")


def prepare_with_policy_image(site: Site, *, job_id: str, spec: JobSpec, decision: Decision,
                              workspace: Path) -> PreparedJob:
    """The job's directory and the policy's image as it is now (no Apptainer verification)."""
    directory = job_dir(site.config, job_id)
    directory.mkdir(parents=True, exist_ok=True)
    image = site.policy.images[spec.image]
    plan = SandboxPlan(argv=("true",), env_file="", script=None, rank_wrapper=())
    return PreparedJob(job_id=job_id, spec=spec, decision=decision,
                       image=VerifiedImage(spec.image, image.path, sha256_file(image.path), None), plan=plan,
                       argv=plan.argv, workspace=workspace, job_dir=directory,
                       log_path=directory / "output.log")


class WritingExecutor:
    """Writes OUTPUTS into the job's workspace and a line into its log; a job named `held` first
    waits for `release`."""

    def __init__(self) -> None:
        self.held = asyncio.Event()

    async def run(self, launch: LocalLaunch, cancel: asyncio.Event | None = None) -> Outcome:
        directory = launch.log_path.parent
        spec = json.loads((directory / "workspace" / ".name").read_text()) \
            if (directory / "workspace" / ".name").exists() else None
        if spec == "held":
            await self.held.wait()
        for relative, data in OUTPUTS.items():
            path = directory / "workspace" / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        with open(launch.log_path, "ab") as log:
            log.write(b"wrote the outputs\n")
        return Outcome("succeeded", 0, "exit status 0")


class Site_:
    """An agent serving its local queue on a socket every local user can reach."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(driver_module, "prepare_job", prepare_with_policy_image)
        self.root = root
        self.image = root / "images" / "test.sif"
        self.image.parent.mkdir()
        self.image.write_bytes(b"an image's bytes\n" * 1000)
        self.policy = root / "policy.toml"
        self.write_policy()
        self.socket = root / "run" / "q.sock"
        self.config_path = root / "config.toml"
        self.config_path.write_text(
            f"state_dir = {toml_string(root / 'state')}\nwork_root = {toml_string(root / 'work')}\n"
            f"policy = {toml_string(self.policy)}\nexecutor = \"local\"\nmax_jobs = 2\n"
            f"socket = {toml_string(self.socket)}\n")
        self.config = load_config(self.config_path)
        self.executor = WritingExecutor()
        self.loop = BackgroundLoop(timeout=60)

        async def start() -> tuple[Store, Agent, LocalQueueServer]:
            store = Store.open(self.config.state_dir)
            agent = Agent(self.config, load_site_policy(self.config), store, grace_seconds=1,
                          executor=self.executor, policy_loader=lambda: load_site_policy(self.config))
            agent.start()
            server = LocalQueueServer(agent, self.socket, mode=0o666)
            await server.start()
            return store, agent, server

        self.store, self.agent, self.server = self.loop.run(start())

    def write_policy(self, sha256: str | None = None) -> None:
        self.policy.write_text(policy_document(
            toml_table("[accounts.ci]", slurm_account="ci", partitions=["local"]),
            image_table(self.image, sha256 or hashlib.sha256(self.image.read_bytes()).hexdigest()),
            toml_table("[[grants]]", name="mine", principals=[f"local:user:{ME}"], account="ci",
                       images=[TEST_IMAGE_NAME])))

    def client(self) -> LocalQueueClient:
        return LocalQueueClient(self.socket, timeout=TIMEOUT_S)

    def workspace(self, name: str) -> Path:
        path = self.root / name
        path.mkdir()
        return path

    def submit(self, workspace: Path, name: str = "outputs") -> str:
        (workspace / ".name").write_text(json.dumps(name))
        reply = self.client().request({"op": "submit", "job": JOB.format(name=name), "name": "job.toml",
                                       "workdir": str(workspace)})
        return str(reply["job"]["id"])

    def state(self, job_id: str) -> str:
        return str(self.client().request({"op": "status", "job_id": job_id})["jobs"][0]["state"])

    def wait_end(self, job_id: str) -> None:
        wait_for(lambda: self.state(job_id) == "succeeded", TIMEOUT_S, interval=0.02,
                 what=f"job {job_id} to succeed")

    def stored(self, job_id: str) -> bytes | None:
        return self.loop.call(lambda: self.store.provenance(job_id))

    def cli(self, *args: str | os.PathLike[str], capture: pytest.CaptureFixture[bytes]
            ) -> tuple[int, bytes, str]:
        status = main([*(os.fspath(a) for a in args), "--config", str(self.config_path)])
        out, err = capture.readouterr()
        return status, out, err.decode()

    def close(self) -> None:
        self.loop.call(self.executor.held.set)
        self.loop.run(self.server.close())

        async def stop() -> None:
            self.agent.drain()
            self.agent.drain()
            await self.agent.stop_workers()

        self.loop.run(stop())
        self.loop.call(self.store.close)
        self.loop.stop()


@pytest.fixture
def site(monkeypatch: pytest.MonkeyPatch) -> Iterator[Site_]:
    # Short (a socket's path holds 107 bytes) and traversable by every local user.
    root = Path(tempfile.mkdtemp(prefix="rq-", dir="/tmp"))
    root.chmod(0o755)
    made = Site_(root, monkeypatch)
    try:
        yield made
    finally:
        made.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def ended(site: Site_) -> tuple[str, Path]:
    """A job that ran and wrote its two outputs, and the directory it was submitted from."""
    workspace = site.workspace("ws")
    job_id = site.submit(workspace)
    site.wait_end(job_id)
    return job_id, workspace


# -- provenance --------------------------------------------------------------------------------


def test_provenance_prints_the_stored_record_byte_for_byte(
        site: Site_, ended: tuple[str, Path], capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    job_id, _ = ended
    status, out, _err = site.cli("provenance", job_id, capture=capfdbinary)

    assert status == 0
    assert out == site.stored(job_id)  # no newline added, nothing re-encoded
    names = {s["name"]: s["digest"]["sha256"] for s in json.loads(out)["subject"]}
    assert names == {path: hashlib.sha256(data).hexdigest() for path, data in OUTPUTS.items()}


def test_provenance_of_a_job_without_a_record_says_why_and_fails(
        site: Site_, capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    held = site.submit(site.workspace("ws"), name="held")
    wait_for(lambda: site.state(held) == "running", TIMEOUT_S, interval=0.02, what="the held job to run")

    status, out, err = site.cli("provenance", held, capture=capfdbinary)
    assert (status, out) == (exitcodes.INVALID_INPUT, b"")
    assert f"job {held} has no record yet: it is still running" in err

    status, out, err = site.cli("provenance", "nosuchjob0000", capture=capfdbinary)
    assert (status, out) == (exitcodes.INVALID_INPUT, b"")
    assert "no job nosuchjob0000" in err

    site.loop.call(site.executor.held.set)
    site.wait_end(held)
    assert site.cli("provenance", held, capture=capfdbinary)[0] == 0


def test_a_denied_job_never_ran_and_has_no_record(site: Site_) -> None:
    site.write_policy()
    site.policy.write_text(site.policy.read_text().replace(f'local:user:{ME}', "local:user:nobody-else"))
    assert site.loop.call(site.agent.reload_policy)
    reply = site.client().request({"op": "submit", "job": JOB.format(name="denied"), "name": "job.toml",
                                   "workdir": str(site.workspace("ws"))})
    job_id = reply["job"]["id"]

    with pytest.raises(NoRecord, match=f"job {job_id} never ran \\(it ended denied"):
        site.client().provenance(job_id)


# -- who may see -------------------------------------------------------------------------------


def request_as(user: str, socket_path: Path, message: dict[str, Any]) -> dict[str, Any]:
    result = subprocess.run(
        [SETPRIV, f"--reuid={user}", f"--regid={pwd.getpwnam(user).pw_gid}", "--init-groups", "--",
         sys.executable, "-I", "-c", REQUEST, str(socket_path), json.dumps(message)],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


@needs_root
def test_another_user_gets_the_usual_refusal_from_every_op(
        site: Site_, ended: tuple[str, Path], queue_users: dict[str, str]) -> None:
    job_id, _ = ended
    bob = "hpcr-bob"
    bobs = Path(tempfile.mkdtemp(prefix="bob-", dir=site.root))
    os.chown(bobs, pwd.getpwnam(bob).pw_uid, -1)
    for message in ({"op": "show", "job_id": job_id}, {"op": "provenance", "job_id": job_id},
                    {"op": "replay", "job_id": job_id, "workdir": str(bobs)}):
        answer = request_as(bob, site.socket, message)
        assert answer == {"ok": False, "error": f"job {job_id} belongs to {ME}; only they or an admin "
                                                "of its account may see or cancel it"}, message
    # Nothing was queued for bob, and the refusal sent no record bytes after its line.
    assert len(site.client().request({"op": "status"})["jobs"]) == 1


# -- verify-outputs ----------------------------------------------------------------------------


def test_verify_outputs_passes_on_the_returned_files_and_catches_a_changed_byte_and_a_missing_file(
        site: Site_, ended: tuple[str, Path], capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    job_id, workspace = ended
    status, out, _ = site.cli("verify-outputs", job_id, workspace, capture=capfdbinary)
    assert status == 0
    assert out.decode().splitlines() == ["plots/b.dat: ok", "results/run/a.txt: ok"]

    changed = workspace / "plots" / "b.dat"
    data = bytearray(changed.read_bytes())
    data[0] ^= 1
    changed.write_bytes(bytes(data))
    (workspace / "results" / "run" / "a.txt").unlink()
    (workspace / "unrelated.txt").write_text("not named by the record\n")

    status, out, err = site.cli("verify-outputs", job_id, workspace, capture=capfdbinary)
    assert status == exitcodes.CHECK_FAILED == 1
    assert out.decode().splitlines() == [
        f"plots/b.dat: differs: sha256 {hashlib.sha256(data).hexdigest()}, "
        f"the record says {hashlib.sha256(OUTPUTS['plots/b.dat']).hexdigest()}",
        "results/run/a.txt: missing"]
    assert f"2 of 2 outputs of job {job_id} do not match its record" in err


def test_verify_outputs_does_not_follow_a_link_in_dir_out_of_it(
        site: Site_, ended: tuple[str, Path], capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    job_id, workspace = ended
    outside = site.workspace("outside")
    shutil.move(workspace / "results", outside / "results")  # the right bytes, but elsewhere
    (workspace / "results").symlink_to(outside / "results")

    status, out, _ = site.cli("verify-outputs", job_id, workspace, capture=capfdbinary)
    assert status == 1
    assert "results/run/a.txt: not checked: results is a symbolic link, which is not followed" \
        in out.decode().splitlines()


def test_verify_outputs_refuses_record_paths_that_leave_dir(
        site: Site_, capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    # A record is data: one that names `../secret` or an absolute path, with the digest of the
    # file actually there, must not make the check read it, nor pass.
    held = site.submit(site.workspace("ws"), name="held")
    checked = site.workspace("checked")
    secret = site.root / "secret"
    secret.write_bytes(b"outside DIR\n")
    digest = hashlib.sha256(secret.read_bytes()).hexdigest()
    record = json.dumps({"_type": "https://in-toto.io/Statement/v1", "subject": [
        {"name": "../secret", "digest": {"sha256": digest}},
        {"name": str(secret), "digest": {"sha256": digest}}]}).encode()
    assert site.loop.call(lambda: site.store.save_provenance(held, record))

    status, out, _ = site.cli("verify-outputs", held, checked, capture=capfdbinary)
    assert status == 1
    assert out.decode().splitlines() == [
        "../secret: refused: the record's path is not a plain relative path "
        "(it has '..', '.' or empty parts)",
        f"{secret}: refused: the record's path is an absolute path"]


# -- replay ------------------------------------------------------------------------------------


def replay(site: Site_, job_id: str, workdir: Path) -> dict[str, Any]:
    return site.client().request({"op": "replay", "job_id": job_id, "workdir": str(workdir)})


def test_a_replay_runs_the_same_spec_and_its_record_links_to_the_original(
        site: Site_, ended: tuple[str, Path], capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    job_id, workspace = ended
    original = site.stored(job_id)
    assert original is not None

    status, out, _ = site.cli("replay", job_id, "--workdir", workspace, capture=capfdbinary)
    assert status == 0
    new_id = out.decode().strip()
    assert new_id != job_id
    site.wait_end(new_id)

    replayed = json.loads(site.stored(new_id) or b"{}")
    external = replayed["predicate"]["buildDefinition"]["externalParameters"]
    first = json.loads(original)
    assert external["replay_of"] == {"job_id": job_id,
                                     "provenance_sha256": hashlib.sha256(original).hexdigest()}
    assert external["job"] == first["predicate"]["buildDefinition"]["externalParameters"]["job"]
    assert replayed["subject"] == first["subject"]

    shown = json.loads(site.cli("show", new_id, "--json", capture=capfdbinary)[1])
    assert shown["replay_of"] == external["replay_of"]
    text = site.cli("show", new_id, capture=capfdbinary)[1].decode()
    assert f"replay of   job {job_id} (its record's sha256 {hashlib.sha256(original).hexdigest()})" in text


def test_a_replay_is_refused_when_the_image_file_changed_naming_both_digests(
        site: Site_, ended: tuple[str, Path]) -> None:
    job_id, workspace = ended
    recorded = hashlib.sha256(site.image.read_bytes()).hexdigest()
    with site.image.open("ab") as image:
        image.write(b"x")
    now = hashlib.sha256(site.image.read_bytes()).hexdigest()
    site.write_policy(now)  # the policy takes the new image: the record does not
    assert site.loop.call(site.agent.reload_policy)

    with pytest.raises(RequestFailed) as refused:
        replay(site, job_id, workspace)
    assert str(refused.value) == (f"image 'test' at {site.image} is not the one job {job_id} ran: "
                                  f"its sha256 is now {now}, the record says {recorded}")
    assert len(site.client().request({"op": "status"})["jobs"]) == 1  # nothing queued


def test_a_replay_needs_a_checkout_of_the_recorded_commit(
        site: Site_, capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    checkout = site.workspace("checkout")
    git("init", "-q", "-b", "main", cwd=checkout)
    (checkout / "model.py").write_text("version = 1\n")
    git("add", "model.py", cwd=checkout)
    git("commit", "-q", "-m", "one", cwd=checkout)
    first = git("rev-parse", "HEAD", cwd=checkout).strip()
    job_id = site.submit(checkout)
    site.wait_end(job_id)
    recorded = json.loads(site.stored(job_id) or b"{}")
    assert recorded["predicate"]["buildDefinition"]["externalParameters"]["trigger"]["commit"] == first

    (checkout / "model.py").write_text("version = 2\n")
    git("commit", "-q", "-am", "two", cwd=checkout)
    second = git("rev-parse", "HEAD", cwd=checkout).strip()
    with pytest.raises(RequestFailed) as refused:
        replay(site, job_id, checkout)
    assert f"job {job_id} ran commit {first}, and {checkout} is at commit {second}: clone the " \
           "repository and check out that commit" in str(refused.value)
    with pytest.raises(RequestFailed, match=f"{first}, and {site.root / 'plain'} is no git checkout"):
        replay(site, job_id, site.workspace("plain"))

    # What show says to do works.
    command = json.loads(site.cli("show", job_id, "--json", capture=capfdbinary)[1])["replay_command"]
    assert command == (f"git clone {checkout} replay-{job_id} && git -C replay-{job_id} checkout --detach "
                       f"{first} && hpc-runner replay {job_id} --workdir replay-{job_id}")
    git("checkout", "-q", first, cwd=checkout)
    new_id = replay(site, job_id, checkout)["job"]["id"]
    site.wait_end(new_id)
    trigger = json.loads(site.stored(new_id) or b"{}")["predicate"]["buildDefinition"]["externalParameters"]
    assert (trigger["trigger"]["commit"], trigger["replay_of"]["job_id"]) == (first, job_id)


# -- show --------------------------------------------------------------------------------------


def test_show_reads_the_record_for_a_person_and_as_json(
        site: Site_, ended: tuple[str, Path], capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    job_id, workspace = ended
    record = site.stored(job_id) or b""
    status, out, _ = site.cli("show", job_id, "--json", capture=capfdbinary)
    assert status == 0
    view = json.loads(out)
    assert (view["state"], view["exit_status"], view["recorded"], view["no_record"]) == \
        ("succeeded", 0, True, None)
    assert (view["grant"], view["account"], view["trigger"]["source"], view["trigger"]["actor"]) == \
        ("mine", "ci", "local", ME)
    assert view["image"] == {"name": "test", "path": str(site.image),
                             "sha256": hashlib.sha256(site.image.read_bytes()).hexdigest()}
    assert view["outputs"] == [{"path": path, "sha256": hashlib.sha256(OUTPUTS[path]).hexdigest(),
                                "size": len(OUTPUTS[path])} for path in sorted(OUTPUTS)]
    assert view["provenance_sha256"] == hashlib.sha256(record).hexdigest()
    assert view["replay_of"] is None
    assert view["replay_command"] == f"hpc-runner replay {job_id} --workdir {workspace}"
    assert view["queue_wait_seconds"] >= 0 and view["run_seconds"] >= 0

    text = site.cli("show", job_id, capture=capfdbinary)[1].decode()
    assert text.startswith(f"job {job_id} (outputs): succeeded, exit status 0")
    assert f"results/run/a.txt  sha256 {hashlib.sha256(OUTPUTS['results/run/a.txt']).hexdigest()}  6 bytes" \
        in text
    assert f"record      sha256 {hashlib.sha256(record).hexdigest()}" in text


def test_show_of_a_running_job_says_what_is_known_and_that_it_has_no_record_yet(
        site: Site_, capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    held = site.submit(site.workspace("ws"), name="held")
    wait_for(lambda: site.state(held) == "running", TIMEOUT_S, interval=0.02, what="the held job to run")

    view = json.loads(site.cli("show", held, "--json", capture=capfdbinary)[1])
    assert (view["state"], view["recorded"], view["outputs"], view["replay_command"]) == \
        ("running", False, [], None)
    assert view["no_record"].startswith(f"job {held} has no record yet: it is still running")
    assert (view["grant"], view["account"], view["image"]["path"]) == ("mine", "ci", str(site.image))
    text = site.cli("show", held, capture=capfdbinary)[1].decode()
    assert f"record      none: job {held} has no record yet" in text
