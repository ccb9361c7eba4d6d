"""The demo: start the embedded agent, submit the bundled examples, check each outcome."""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from runner.config import AgentConfig, default_config
from runner.embedded import ensure_embedded_policy
from runner.localqueue.client import LocalQueueClient
from runner.logging_setup import configure_logging
from runner.policy import load_policy
from runner.serve import serve

DEMO_GRACE_SECONDS = 2.0


@dataclass(frozen=True)
class Example:
    file: str
    expect_state: str
    check: Callable[[str, dict[str, Any]], str | None]   # (log, decision) -> problem or None
    describe: str


def _log_has(*needles: str) -> Callable[[str, dict[str, Any]], str | None]:
    def check(log: str, _decision: dict[str, Any]) -> str | None:
        missing = [n for n in needles if n not in log]
        return f"log lacks {missing}" if missing else None
    return check


def _has_reasons(_log: str, decision: dict[str, Any]) -> str | None:
    return None if decision.get("reasons") else "no reasons given"


EXAMPLES = (
    Example("hello.toml", "succeeded", _log_has("hello from the sandbox", "working directory: /work"),
            "a plain job in the sandbox"),
    Example("mpi-allreduce.toml", "succeeded", _log_has("world size 2", "allreduce sum 3"),
            "2 MPI ranks with the host Open MPI"),
    Example("denied.toml", "denied", _has_reasons, "a job the policy denies"),
    Example("walltime.toml", "timed_out", _log_has("starting a task"), "a job past its walltime"),
)


def _say(text: str = "") -> None:
    print(text, flush=True)


def _run_example(client: LocalQueueClient, example: Example, workspace: Path) -> tuple[bool, str]:
    text = resources.files("runner.bundled").joinpath("jobs", example.file).read_text()
    _say(f"\n=== {example.file}: {example.describe} (expect {example.expect_state})")
    reply = client.request({"op": "submit", "job": text, "name": example.file, "workdir": str(workspace)})
    job, decision = reply["job"], reply["decision"]
    verdict = f"allowed by grant {decision['grant']!r}" if decision["allowed"] else "denied"
    _say(f"job {job['id']}: {verdict}")
    for reason in decision["reasons"]:
        _say(f"  reason: {reason}")
    log = b"".join(client.stream_logs(job["id"], follow=True)).decode("utf-8", "replace")
    if log:
        _say("--- log")
        sys.stdout.write(log if log.endswith("\n") else log + "\n")
        _say("---")
    final = client.request({"op": "status", "job_id": job["id"]})["jobs"][0]
    problem = None if final["state"] == example.expect_state else \
        f"ended {final['state']}, expected {example.expect_state}"
    problem = problem or example.check(log, decision)
    detail = final.get("detail") or ""
    if final["exit_status"] is not None and not detail.startswith("exit status"):
        detail = f"exit status {final['exit_status']}" + (f"; {detail}" if detail else "")
    _say(f"outcome: {final['state']}" + (f" ({detail})" if detail else ""))
    return problem is None, problem or "as expected"


def _demo_config(root: Path) -> AgentConfig:
    base = default_config()
    state = root / "state"
    return AgentConfig(state_dir=state, work_root=root / "work", policy=None, executor="local",
                       max_jobs=2, sandbox=base.sandbox, mpi=base.mpi)


async def _demo(root: Path) -> int:
    config = _demo_config(root)
    state = config.state_dir
    state.mkdir(mode=0o700)
    policy_path = ensure_embedded_policy(config)
    policy = load_policy(policy_path)
    workspace = root / "workspace"
    workspace.mkdir(mode=0o700)
    ready, stop = asyncio.Event(), asyncio.Event()
    agent = asyncio.create_task(serve(config, policy, lambda: load_policy(policy_path),
                                      grace_seconds=DEMO_GRACE_SECONDS, ready=ready.set, stop=stop))
    await asyncio.wait({agent, asyncio.create_task(ready.wait())}, return_when=asyncio.FIRST_COMPLETED)
    if agent.done():
        await agent
        return 1
    _say(f"agent ready: local queue on {config.socket_path()}, policy {policy_path}")
    client = LocalQueueClient(config.socket_path(), timeout=None)
    results = []
    try:
        for example in EXAMPLES:
            results.append((example, *await asyncio.to_thread(_run_example, client, example, workspace)))
    finally:
        stop.set()
        await agent
    _say("\n=== summary")
    for example, ok, detail in results:
        _say(f"{'ok  ' if ok else 'FAIL'} {example.file:<20} {detail}")
    return 0 if all(ok for _, ok, _ in results) else 1


def run_demo(keep: bool = False) -> int:
    # The demo speaks for itself on stdout; the embedded agent only reports problems.
    configure_logging(level="warning", force_json=not sys.stderr.isatty())
    root = Path(tempfile.mkdtemp(prefix="hpc-runner-demo-"))
    os.chmod(root, 0o700)
    try:
        return asyncio.run(_demo(root))
    finally:
        if not keep:
            import shutil
            shutil.rmtree(root, ignore_errors=True)
        else:
            _say(f"demo files kept in {root}")
