"""A stand-in for the agent as a `JobHost`, for tests of the Buildkite source without Slurm.

It admits with the real policy engine and the real store, and "runs" a job by appending to the
job's output file what the test scripted (`outputs`), piece by piece, while the file is followed
as the agent follows a Slurm job's output; a cancel ends the job as cancelled. A job named in
`collected` ends with those files collected into its directory's `outputs/`, as the agent collects
a job's declared outputs, and names them in its end.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from pathlib import Path

from conftest import TEST_IMAGE_NAME, image_table, policy_document, toml_table

from runner.identity import identity_from_json
from runner.job import OUTPUTS_DIR, JobRecord, JobState, OutputFile
from runner.logs.tail import follow
from runner.policy import Policy, decide
from runner.policy.model import parse_policy_text
from runner.sources import Admission, Admitted, Ended, LogSink, StateWatcher
from runner.sources.buildkite.state import BuildkiteState
from runner.store import Store


def host_policy(*grants: str) -> str:
    """A policy for the stand-in host: the account ``ci``, an image never opened, and ``grants``."""
    return policy_document(
        toml_table("[accounts.ci]", slurm_account="ci", partitions=["debug"], max_time="10m"),
        image_table("/nonexistent/test.sif", "0" * 64),
        *grants)


POLICY = host_policy(toml_table("[[grants]]", name="pipeline",
                                principals=["buildkite:pipeline:example/pipeline"], account="ci",
                                images=[TEST_IMAGE_NAME]))


class FakeHost:
    def __init__(self, root: Path, policy_text: str = POLICY) -> None:
        self.root = root
        self.store = Store.open(root / "state")
        self._buildkite_state: BuildkiteState | None = None
        self._policy = parse_policy_text(policy_text)
        self._draining = asyncio.Event()
        self._stopping = asyncio.Event()
        # What each job writes, by job name: pieces appended one after another.
        self.outputs: dict[str, list[bytes]] = {}
        self.default_output = [b"hello from the job\n"]
        self.piece_delay = 0.02
        self.hold: dict[str, asyncio.Event] = {}   # a job named here waits for the event (or cancel)
        self.ran: list[str] = []
        self.exit_status = 0
        # What each job leaves as its collected outputs, by job name: relative path -> content.
        self.collected: dict[str, dict[str, bytes]] = {}

    def buildkite_state(self) -> BuildkiteState:
        """The Buildkite source's own state file, beside this host's store (as the agent's is)."""
        if self._buildkite_state is None:
            self._buildkite_state = BuildkiteState.open(self.root / "state")
        return self._buildkite_state

    @property
    def policy(self) -> Policy:
        return self._policy

    @property
    def draining(self) -> asyncio.Event:
        return self._draining

    @property
    def stopping(self) -> asyncio.Event:
        return self._stopping

    def log_path(self, job_id: str) -> Path:
        return self.root / "work" / job_id / "output.log"

    async def admit(self, admission: Admission) -> Admitted:
        existing = self.store.find_by_external_id(admission.source, admission.external_id)
        if existing is not None:
            decision = decide(self.policy, identity_from_json(existing.identity), admission.spec)
            return Admitted(existing.id, decision, self.log_path(existing.id),
                            self.root / "work" / existing.id / "workspace", new=False)
        decision = decide(self.policy, admission.identity, admission.spec)
        record = self.store.add_job(source=admission.source, external_id=admission.external_id,
                                    identity=admission.identity.to_json(), spec=admission.spec.to_json())
        path = self.log_path(record.id)
        self.store.set_log_path(record.id, path)
        self.note(record.id, admission.log_preamble)
        workspace = self.root / "work" / record.id / "workspace"
        self.store.record_decision(record.id, actor="test",
                                   decision=decision.to_json() | {"workspace": str(workspace)})
        if not decision.allowed:
            self.note(record.id, "hpc-runner: denied by policy:\n"
                      + "".join(f"  - {r}\n" for r in decision.reasons))
        return Admitted(record.id, decision, path, workspace, new=True)

    def job(self, job_id: str) -> JobRecord | None:
        return self.store.get_job(job_id)

    def note(self, job_id: str, text: str) -> None:
        path = self.log_path(job_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab") as handle:
            handle.write(text.encode())

    def fail(self, job_id: str, detail: str) -> Ended:
        self.store.set_state(job_id, JobState.infra_failed, outcome_detail=detail)
        self.store.mark_final_reported(job_id)
        return Ended(JobState.infra_failed, None, detail)

    async def run(self, job_id: str, *, sink: LogSink, cancel: asyncio.Event, offset: int = 0,
                  on_change: StateWatcher | None = None) -> Ended:
        record = self.store.get_job(job_id)
        assert record is not None
        self.ran.append(job_id)
        record = self.store.set_state(job_id, JobState.running)
        if on_change is not None:
            on_change(record)
        writer = asyncio.create_task(self._write(job_id, str(record.spec["name"]), cancel))
        return await self._follow(job_id, writer, sink, offset)

    async def resume(self, job_id: str, *, sink: LogSink, cancel: asyncio.Event, offset: int = 0,
                     on_change: StateWatcher | None = None) -> Ended:
        record = self.store.get_job(job_id)
        assert record is not None
        if record.state == JobState.queued:
            return await self.run(job_id, sink=sink, cancel=cancel, offset=offset, on_change=on_change)
        if record.state.is_terminal:
            done = asyncio.get_running_loop().create_future()
            done.set_result(None)
            writer: asyncio.Future[None] = done
        else:
            writer = asyncio.create_task(self._write(job_id, str(record.spec["name"]), cancel, resume=True))
        return await self._follow(job_id, writer, sink, offset)

    async def _follow(self, job_id: str, writer: asyncio.Future[None], sink: LogSink, start: int) -> Ended:
        async for offset, data in follow(self.log_path(job_id), offset=start, done=writer.done,
                                         poll_interval=0.02):
            await sink(offset, data)
        await writer
        record = self.store.get_job(job_id)
        assert record is not None
        self.store.mark_final_reported(job_id)
        outputs = self.collect(job_id, str(record.spec["name"]))
        return Ended(record.state, record.exit_status, record.outcome_detail, outputs)

    def collect(self, job_id: str, name: str) -> tuple[OutputFile, ...]:
        files = self.collected.get(name, {})
        root = self.log_path(job_id).parent / OUTPUTS_DIR
        for path, content in files.items():
            target = root / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
        return tuple(OutputFile(path, hashlib.sha256(content).hexdigest(), len(content))
                     for path, content in sorted(files.items()))

    async def _write(self, job_id: str, name: str, cancel: asyncio.Event, *, resume: bool = False) -> None:
        path = self.log_path(job_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        pieces = self.outputs.get(name, self.default_output)
        if resume:
            written = path.read_bytes() if path.exists() else b""
            pieces = _remaining(pieces, written)
        for piece in pieces:
            if cancel.is_set():
                break
            with path.open("ab") as handle:
                handle.write(piece)
                handle.flush()
                os.fsync(handle.fileno())
            await asyncio.sleep(self.piece_delay)
        hold = self.hold.get(name)
        if hold is not None and not cancel.is_set():
            waiters = [asyncio.create_task(hold.wait()), asyncio.create_task(cancel.wait())]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiter
        if cancel.is_set():
            self.note(job_id, "hpc-runner: job cancelled; sent SIGTERM\n")
            self.store.set_state(job_id, JobState.cancelled, outcome_detail="cancelled")
        elif self.exit_status == 0:
            self.store.set_state(job_id, JobState.succeeded, exit_status=0)
        else:
            self.store.set_state(job_id, JobState.failed, exit_status=self.exit_status)


def _remaining(pieces: list[bytes], written: bytes) -> list[bytes]:
    """The pieces not yet in the file (a resumed job carries on where it was)."""
    whole = b"".join(pieces)
    # The file may hold the agent's own notes before the job's output.
    start = written.find(whole[:16]) if whole else -1
    done = len(written) - start if start >= 0 else 0
    rest = whole[done:]
    return [rest] if rest else []
