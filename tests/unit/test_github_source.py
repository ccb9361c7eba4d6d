"""The GitHub source against the GitHub emulator, with a stand-in agent (no Slurm) and real git.

What a user of GitHub would see: check runs (or commit statuses) on the right commit with the
right conclusion, the log tail, the reasons for a refusal; and what must never happen: a job from
code nobody with write permission approved, a trigger run twice, a token left in a workspace.
Every request the source sends is checked against GitHub's OpenAPI description by the emulator.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import wait_until
from fakes.github_webhooks import SECRET, examples, send

from runner.gateway.server import GatewayServer
from runner.gateway.tokens import parse_agent_tokens
from runner.sources.github import checks
from runner.sources.github import runs as runs_module
from runner.sources.github.gateway_client import GatewayClient, GatewayError
from runner.sources.github.jobsfile import parse_jobs_file
from runner.sources.github.source import GithubSource
from runner.sources.github.state import GithubState
from runner.sources.github.translate import CancelRequest
from runner.spec import JobSpec
from runner.tomlsource import MAX_FILE_BYTES

from .buildkite_host import FakeHost
from .github_site import COMMAND, FORK, JOBS, LABEL, POLICY, REPO, Site, github_site


def completed(runs: list[dict]) -> list[dict]:  # type: ignore[type-arg]
    return [run for run in runs if run["status"] == "completed"]


async def test_a_members_labelled_pull_request_runs_and_its_check_run_shows_the_log_tail(
        tmp_path: Path) -> None:
    async with github_site(tmp_path) as site:
        await site.poll()                                   # the first round only sets the cursors
        site.host.outputs["unit"] = [b"compiling\n", b"\x1b[32mall 42 tests passed\x1b[0m\n"]
        number = site.open_pull(author="alice", labelled_by="alice")
        head = site.gh.pull_request(REPO, number).head_sha
        await site.poll()

        [run] = site.check_runs("hpc-runner/unit", head)
        assert (run["status"], run["conclusion"]) == ("completed", "success")
        assert "all 42 tests passed" in run["output"]["text"]
        assert "\x1b" not in run["output"]["text"]
        assert "`core-prs`" in run["output"]["summary"]              # the grant that allowed it
        assert "github:team:CliMA/core" in run["output"]["summary"]
        assert run["external_id"].startswith(f"label:{REPO.lower()}#{number}:")
        history = run["_history"]
        assert history[0]["status"] == "queued" and history[0]["actions"][0]["identifier"] == "cancel"
        assert history[-1]["conclusion"] == "success" and history[-1]["actions"] == []
        assert len(site.host.ran) == 1
        record = site.host.store.get_job(site.host.ran[0])
        assert record is not None
        assert record.identity == {"source": "github", "repository": REPO, "actor": "alice",
                                   "teams": ["CliMA/core"], "event": "pull_request",
                                   "ref": f"refs/pull/{number}/head", "fork": False}
        # The workspace holds the commit, and nothing of the token that fetched it.
        workspace = site.host.root / "work" / record.id / "workspace"
        assert (workspace / "src" / "change.txt").read_text() == "from alice\n"
        tokens = list(site.gh.tokens)
        for path in (workspace / ".git").rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                assert not any(token.encode() in data for token in tokens), path

        # The same state seen again starts nothing.
        await site.poll()
        assert len(site.host.ran) == 1 and len(site.check_runs()) == 1


async def test_a_fork_pull_request_without_approval_does_not_run_and_says_why(tmp_path: Path) -> None:
    async with github_site(tmp_path) as site:
        await site.poll()
        site.gh.set_permission(REPO, "tom", "triage")     # may apply labels, may not approve code
        number = site.open_pull(author="mallory", fork=FORK, labelled_by="tom")
        head = site.gh.pull_request(REPO, number).head_sha
        await site.poll()

        assert site.host.ran == []
        [run] = site.check_runs(sha=head)
        assert (run["name"], run["conclusion"]) == ("hpc-runner", "action_required")
        summary = run["output"]["summary"]
        assert "@tom, who has read permission" in summary
        assert "Fork:** yes" in summary
        assert f"comment `{COMMAND}`" in summary
        assert site.check_runs("hpc-runner/unit") == []

        # The fork's author asking starts nothing either.
        site.gh.add_comment(REPO, number, COMMAND, user="mallory")
        await site.poll()
        assert site.host.ran == [] and len(site.check_runs()) == 1

        # A maintainer's approval runs it, as a fork, and the waiting check says who approved.
        site.gh.add_comment(REPO, number, f"Looks safe.\n{COMMAND}\n", user="alice")
        await site.poll()
        [job] = site.check_runs("hpc-runner/unit", head)
        assert job["conclusion"] == "success"
        [approval] = site.check_runs("hpc-runner", head)
        assert (approval["conclusion"], approval["output"]["title"]) == ("success", "Approved by @alice")
        record = site.host.store.get_job(site.host.ran[0])
        assert record is not None and record.identity["fork"] is True and record.identity["actor"] == "alice"


async def test_a_run_comment_by_a_read_only_user_starts_nothing_and_writes_nothing(tmp_path: Path) -> None:
    async with github_site(tmp_path) as site:
        await site.poll()
        number = site.open_pull(author="alice")
        site.gh.set_permission(REPO, "rita", "read")
        site.gh.add_comment(REPO, number, COMMAND, user="rita")
        site.gh.add_comment(REPO, number, f"> {COMMAND}\nquoted, not a command", user="alice")
        site.gh.add_comment(REPO, number, COMMAND, user="dependabot[bot]", user_type="Bot")
        writes = site.writes()
        await site.poll()
        assert site.host.ran == []
        assert site.check_runs() == [] and site.gh.statuses(REPO) == []
        assert site.writes() == writes


async def test_a_push_after_an_approval_needs_a_new_approval(tmp_path: Path) -> None:
    async with github_site(tmp_path) as site:
        await site.poll()
        number = site.open_pull(author="alice", labelled_by="alice")
        first = site.gh.pull_request(REPO, number).head_sha
        await site.poll()
        assert [r["conclusion"] for r in site.check_runs(sha=first)] == ["success"]

        second = site.push_to_pull(number, {"src/change.txt": "more\n"})
        await site.poll()
        assert len(site.host.ran) == 1                      # the label does not cover the new commit
        [waiting] = site.check_runs(sha=second)
        assert (waiting["name"], waiting["conclusion"]) == ("hpc-runner", "action_required")
        assert f"applied the label at commit {first[:12]}" in waiting["output"]["summary"]
        await site.poll()
        assert len(site.check_runs(sha=second)) == 1        # said once

        # Applying the label again approves the new head.
        site.gh.unlabel(REPO, number, LABEL, by="alice")
        site.gh.label(REPO, number, LABEL, by="alice")
        await site.poll()
        assert len(site.host.ran) == 2
        assert [r["conclusion"] for r in site.check_runs("hpc-runner/unit", second)] == ["success"]


async def test_a_push_between_a_run_comment_and_the_next_poll_never_runs_on_that_approval(
        tmp_path: Path) -> None:
    async with github_site(tmp_path) as site:
        await site.poll()
        number = site.open_pull(author="mallory", fork=FORK)
        reviewed = site.gh.pull_request(REPO, number).head_sha
        await site.poll()
        site.gh.add_comment(REPO, number, COMMAND, user="alice")    # alice approves what she reviewed
        site.later()
        pushed = site.push_to_pull(number, {"src/change.txt": "not what alice reviewed\n"})
        await site.poll()

        assert site.host.ran == [] and site.check_runs("hpc-runner/unit") == []
        [waiting] = site.check_runs(sha=pushed)
        assert (waiting["name"], waiting["conclusion"]) == ("hpc-runner", "action_required")
        summary = waiting["output"]["summary"]
        assert "changed at" in summary and "after @alice's comment at" in summary
        assert f"`{COMMAND} {pushed}`" in summary                   # how to approve this commit
        assert site.check_runs(sha=reviewed) == []

        # Naming the commit approves exactly it, whatever happened on the pull request before.
        site.later()
        site.gh.add_comment(REPO, number, f"reviewed that one too\n{COMMAND} {pushed[:7]}\n", user="alice")
        site.later()
        site.gh.add_comment(REPO, number, "thanks!", user="mallory")
        await site.poll()
        [job] = site.check_runs("hpc-runner/unit", pushed)
        assert job["conclusion"] == "success"
        [approval] = site.check_runs("hpc-runner", pushed)
        assert (approval["conclusion"], approval["output"]["title"]) == ("success", "Approved by @alice")
        record = site.host.store.get_job(site.host.ran[0])
        assert record is not None and record.identity["actor"] == "alice" and record.identity["fork"] is True


async def test_a_push_between_a_label_and_the_next_poll_never_runs_on_that_label(tmp_path: Path) -> None:
    async with github_site(tmp_path) as site:
        await site.poll()
        number = site.open_pull(author="mallory", fork=FORK)
        await site.poll()
        site.gh.label(REPO, number, LABEL, by="alice")
        site.later()
        pushed = site.push_to_pull(number, {"src/change.txt": "not what alice reviewed\n"})
        await site.poll()

        assert site.host.ran == []
        [waiting] = site.check_runs(sha=pushed)
        assert (waiting["name"], waiting["conclusion"]) == ("hpc-runner", "action_required")
        summary = waiting["output"]["summary"]
        assert "after the label was applied by @alice at" in summary
        assert f"remove and apply the `{LABEL}` label again" in summary
        await site.poll()
        assert site.host.ran == [] and len(site.check_runs()) == 1  # said once

        # Applying the label again, once nothing else changes, approves the head.
        site.later()
        site.gh.unlabel(REPO, number, LABEL, by="alice")
        site.gh.label(REPO, number, LABEL, by="alice")
        await site.poll()
        assert [r["conclusion"] for r in site.check_runs("hpc-runner/unit", pushed)] == ["success"]
        assert len(site.host.ran) == 1


async def test_a_run_comment_naming_a_commit_that_is_not_the_head_runs_nothing_and_says_so(
        tmp_path: Path) -> None:
    async with github_site(tmp_path) as site:
        await site.poll()
        number = site.open_pull(author="mallory", fork=FORK)
        reviewed = site.gh.pull_request(REPO, number).head_sha
        pushed = site.push_to_pull(number, {"src/change.txt": "newer\n"})
        site.later()
        site.gh.add_comment(REPO, number, f"{COMMAND} {reviewed[:10].upper()}", user="alice")
        site.gh.add_comment(REPO, number, f"{COMMAND} {reviewed[:5]}", user="alice")
        await site.poll()

        assert site.host.ran == []
        [waiting] = site.check_runs(sha=pushed)
        assert waiting["conclusion"] == "action_required"
        # Each refused command is answered, on the same check run: the latest answer shows.
        first, second = [body["output"]["summary"] for body in waiting["_history"]]
        assert f"approved commit `{reviewed[:10]}`, but the head of #{number} is `{pushed[:12]}`" in first
        assert f"`{reviewed[:5]}` has 5 hex digits; a commit SHA has 7 to 40" in second

        # The same comments seen again (a restart, a redelivery) are not answered again.
        site.state.set_cursor(REPO, "comments", "0")
        await site.poll()
        assert len(site.check_runs()[0]["_history"]) == 2 and site.host.ran == []


@pytest.mark.parametrize("replace, words", [
    ("push", "names more than one commit of #"),
    ("force-push", "was replaced (head_ref_force_pushed) at"),
])
async def test_a_commit_sharing_the_first_digits_of_the_approved_one_never_runs(
        tmp_path: Path, replace: str, words: str) -> None:
    async with github_site(tmp_path) as site:
        await site.poll()
        number = site.open_pull(author="mallory", fork=FORK)
        reviewed = site.gh.pull_request(REPO, number).head_sha
        site.later()
        site.gh.add_comment(REPO, number, f"{COMMAND} {reviewed[:7]}", user="alice")
        # Making a commit whose SHA starts with 7 given hex digits takes seconds: mallory pushes
        # one, on top of the reviewed commit or in its place, before the agent looks.
        twin = reviewed[:7] + ("0" if reviewed[7] != "0" else "1") + reviewed[8:]
        site.later()
        if replace == "push":
            site.gh.point_pull_request(REPO, number, twin, {**site.main_files(), "src/change.txt": "evil\n"})
        else:
            site.gh.force_push_pull_request(REPO, number, {"src/change.txt": "evil\n"}, sha=twin)
        await site.poll()

        assert site.host.ran == [] and site.check_runs("hpc-runner/unit") == []
        [waiting] = site.check_runs(sha=twin)
        assert waiting["conclusion"] == "action_required"
        summary = waiting["output"]["summary"]
        assert words in summary and "name the commit in full" in summary


async def test_a_cancel_comment_cancels_the_running_job(tmp_path: Path) -> None:
    async with github_site(tmp_path) as site:
        await site.poll()
        site.host.hold["unit"] = asyncio.Event()            # runs until cancelled
        number = site.open_pull(author="alice", labelled_by="alice")
        await site.source.poll_once(REPO)
        await wait_until(lambda: site.host.ran, what="the job to start")
        site.gh.add_comment(REPO, number, "/hpc-runner cancel", user="alice")
        await site.poll()
        [run] = site.check_runs("hpc-runner/unit")
        assert (run["conclusion"], run["output"]["title"]) == ("cancelled", "Cancelled by @alice")


async def test_a_cancel_request_from_someone_without_write_permission_is_ignored(tmp_path: Path) -> None:
    async with github_site(tmp_path) as site:
        await site.poll()
        hold = site.host.hold["unit"] = asyncio.Event()
        site.open_pull(author="alice", labelled_by="alice")
        await site.source.poll_once(REPO)
        await wait_until(lambda: site.check_runs("hpc-runner/unit"), what="the check run")
        [run] = site.check_runs("hpc-runner/unit")
        await site.source.cancel(CancelRequest(REPO, "rita", check_run_id=run["id"]))
        hold.set()
        await site.source.wait_idle()
        assert site.check_runs("hpc-runner/unit")[0]["conclusion"] == "success"


async def test_repositories_without_checks_get_commit_statuses(tmp_path: Path) -> None:
    async with github_site(tmp_path, log_url="https://ci.example.org/jobs/{id}") as site:
        site.gh.forbid_checks(REPO)
        await site.poll()
        number = site.open_pull(author="alice", labelled_by="alice")
        head = site.gh.pull_request(REPO, number).head_sha
        await site.poll()
        statuses = site.gh.statuses(REPO, head)
        assert statuses[0]["state"] == "pending"
        assert statuses[-1]["state"] == "success" and statuses[-1]["context"] == "hpc-runner/unit"
        assert statuses[-1]["target_url"] == f"https://ci.example.org/jobs/{site.host.ran[0]}"
        assert all(len(s["description"]) <= 140 for s in statuses)
        assert site.check_runs() == []


async def test_a_broken_jobs_file_is_a_failed_check_run_naming_line_and_field(tmp_path: Path) -> None:
    broken = "[[jobs]]\nname = \"unit\"\nimage = \"test\"\ncommand = [\"make\"]\ntimeout = \"5m\"\n"
    async with github_site(tmp_path) as site:
        await site.poll()
        number = site.open_pull(author="alice", labelled_by="alice", extra={".hpc-runner.toml": broken})
        await site.poll()
        [run] = site.check_runs(sha=site.gh.pull_request(REPO, number).head_sha)
        assert (run["name"], run["conclusion"]) == ("hpc-runner", "failure")
        assert ".hpc-runner.toml:5: jobs[0].timeout: unknown key" in run["output"]["summary"]
        assert site.host.ran == []


async def test_a_push_to_a_configured_branch_runs_as_the_pusher(tmp_path: Path) -> None:
    async with github_site(tmp_path) as site:
        await site.poll()
        sha = site.push_main({"src/main.txt": "release\n"}, author="alice")
        await site.poll()
        [run] = site.check_runs("hpc-runner/unit", sha)
        assert run["conclusion"] == "success"
        record = site.host.store.get_job(site.host.ran[0])
        assert record is not None
        assert (record.identity["event"], record.identity["ref"], record.identity["actor"]) == (
            "push", "refs/heads/main", "alice")


async def test_the_check_run_is_updated_at_most_once_per_interval_and_once_at_the_end(tmp_path: Path) -> None:
    async with github_site(tmp_path, update_interval=0.5) as site:
        await site.poll()
        site.host.outputs["unit"] = [b"step %d\n" % i for i in range(16)]
        site.host.piece_delay = 0.1                         # output for about 1.6 s
        site.open_pull(author="alice", labelled_by="alice")
        started = asyncio.get_running_loop().time()
        await site.poll()
        elapsed = asyncio.get_running_loop().time() - started
        [run] = site.check_runs("hpc-runner/unit")
        patches = run["_history"][1:]
        assert patches[-1]["conclusion"] == "success" and "step 15" in patches[-1]["output"]["text"]
        progress = patches[:-1]
        assert progress, "no update while the job ran"
        assert progress[0]["status"] == "in_progress"
        assert len(progress) <= elapsed / 0.5 + 1


async def test_a_job_the_policy_denies_fails_with_the_reasons_and_never_runs(tmp_path: Path) -> None:
    jobs = "[[jobs]]\nname = \"unit\"\nimage = \"test\"\ncommand = [\"make\"]\nnetwork = true\n"
    async with github_site(tmp_path, jobs=jobs) as site:
        await site.poll()
        site.open_pull(author="alice", labelled_by="alice")
        await site.poll()
        [run] = site.check_runs("hpc-runner/unit")
        assert (run["conclusion"], run["output"]["title"]) == ("failure", "Denied by the site's policy")
        assert "the job asks for network access and the grant has network = false" in run["output"]["summary"]
        assert len(run["_history"]) == 1                    # created completed: one request
        assert site.host.ran == []


async def test_secrets_of_the_job_never_reach_the_check_run(tmp_path: Path) -> None:
    jobs = JOBS_WITH_SECRET
    async with github_site(tmp_path, jobs=jobs) as site:
        await site.poll()
        site.host.outputs["unit"] = [b"using token s3cr3t-v", b"alue-42 now\n"]
        site.open_pull(author="alice", labelled_by="alice")
        await site.poll()
        [run] = site.check_runs("hpc-runner/unit")
        text = "".join(str(body.get("output", {}).get("text")) for body in run["_history"])
        assert "s3cr3t" not in text and "using token [REDACTED] now" in run["output"]["text"]


JOBS_WITH_SECRET = """[[jobs]]
name = "unit"
image = "test"
command = ["make"]
env = { API_TOKEN = "s3cr3t-value-42" }
"""


async def test_a_restarted_agent_follows_the_job_again_and_reports_it_once(tmp_path: Path) -> None:
    async with github_site(tmp_path) as site:
        await site.poll()
        site.host.outputs["unit"] = [b"before the restart\n", b"after the restart\n"]
        hold = site.host.hold["unit"] = asyncio.Event()
        site.open_pull(author="alice", labelled_by="alice")
        serving = asyncio.create_task(site.source.serve())
        await wait_until(lambda: site.host.ran and site.check_runs("hpc-runner/unit"), what="the job to run")
        serving.cancel()                                    # the agent goes away mid-run
        with contextlib.suppress(asyncio.CancelledError):
            await serving
        assert completed(site.check_runs()) == []

        hold.set()
        source = site.restart()
        serving = asyncio.create_task(source.serve())
        await wait_until(lambda: completed(site.check_runs()), what="the final report")
        site.host.draining.set()
        await serving
        [run] = site.check_runs("hpc-runner/unit")
        assert run["conclusion"] == "success" and "after the restart" in run["output"]["text"]
        assert sum(1 for body in run["_history"] if body.get("conclusion")) == 1
        assert len(site.host.ran) == 1 and len(site.check_runs()) == 1


# ------------------------------------------------------------------------------------ gateway mode


TOKEN_A = "agent-a-0123456789abcdef0123456789abcdef"
TOKEN_B = "agent-b-fedcba9876543210fedcba9876543210"


@contextlib.asynccontextmanager
async def gateway_server(tmp_path: Path) -> AsyncIterator[str]:
    tokens = parse_agent_tokens(f"login-a:{TOKEN_A}\nlogin-b:{TOKEN_B}\n", "tokens")
    server = GatewayServer(state_dir=tmp_path / "gateway", webhook_secret=SECRET, tokens=tokens)
    await server.start("127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        await server.close()


def labelled_payload(site: Site, number: int, sender: str) -> dict[str, Any]:
    example = next(e for e in examples("pull_request") if e.payload.get("action") == "labeled")
    payload = copy.deepcopy(example.payload)
    pr = site.gh.pull_request(REPO, number)
    payload["number"] = number
    payload["label"]["name"] = LABEL
    payload["pull_request"].update(number=number, labels=[{"name": LABEL}])
    payload["pull_request"]["head"]["sha"] = pr.head_sha
    payload["repository"]["full_name"] = REPO
    payload["sender"]["login"] = sender
    return payload


async def deliver(url: str, event: str, payload: dict[str, Any]) -> None:
    async with aiohttp.ClientSession() as http:
        answer = await send(http, url + "/webhook", event, json.dumps(payload).encode())
    assert answer.status in (200, 202), answer


async def gateway_counts(url: str) -> dict[str, int]:
    async with aiohttp.ClientSession() as http, http.get(
            url + "/api/v1/status", headers={"Authorization": f"Bearer {TOKEN_A}"}) as response:
        data: dict[str, int] = await response.json()
        return data


async def test_gateway_mode_runs_a_delivery_cancels_on_the_check_run_button_and_acknowledges(
        tmp_path: Path) -> None:
    async with gateway_server(tmp_path) as url, GatewayClient(url, TOKEN_A, wait_seconds=1) as gateway, \
            github_site(tmp_path, gateway=gateway, mode="gateway", gateway_url=url,
                        gateway_token_file=tmp_path / "token") as site:
        hold = site.host.hold["unit"] = asyncio.Event()
        number = site.open_pull(author="alice", labelled_by="alice")
        serving = asyncio.create_task(site.source.serve())
        await deliver(url, "pull_request", labelled_payload(site, number, "alice"))
        [run] = await wait_until(lambda: [r for r in site.check_runs("hpc-runner/unit")
                                          if r["status"] == "in_progress"], what="the job to run")
        site.gh.set_permission(REPO, "rita", "read")
        await deliver(url, "check_run", site.gh.requested_action_payload(REPO, run["id"], sender="rita"))
        await deliver(url, "check_run", site.gh.requested_action_payload(REPO, run["id"], sender="alice"))
        await wait_until(lambda: completed(site.check_runs()), what="the cancellation")
        assert not hold.is_set()
        [run] = site.check_runs("hpc-runner/unit")
        assert (run["conclusion"], run["output"]["title"]) == ("cancelled", "Cancelled by @alice")
        site.host.draining.set()
        await serving
        counts = await gateway_counts(url)
        assert (counts["waiting"], counts["leased"], counts["acknowledged"]) == (0, 0, 3)


async def test_a_delivery_naming_a_newer_head_does_not_make_the_label_approve_it(tmp_path: Path) -> None:
    async with gateway_server(tmp_path) as url, GatewayClient(url, TOKEN_A, wait_seconds=1) as gateway, \
            github_site(tmp_path, gateway=gateway, mode="gateway", gateway_url=url,
                        gateway_token_file=tmp_path / "token") as site:
        number = site.open_pull(author="mallory", fork=FORK, labelled_by="alice")
        site.later()
        pushed = site.push_to_pull(number, {"src/change.txt": "not what alice reviewed\n"})
        serving = asyncio.create_task(site.source.serve())
        # The relay is trusted for nothing: its `labeled` delivery names the head pushed after the label.
        payload = labelled_payload(site, number, "alice")
        assert payload["pull_request"]["head"]["sha"] == pushed
        await deliver(url, "pull_request", payload)
        [waiting] = await wait_until(lambda: site.check_runs(sha=pushed), what="the answer")
        site.host.draining.set()
        await serving
        assert site.host.ran == []
        assert waiting["conclusion"] == "action_required"
        assert "after the label was applied by @alice" in waiting["output"]["summary"]


async def test_a_lost_lease_does_not_let_a_second_agent_run_the_job(tmp_path: Path) -> None:
    async with gateway_server(tmp_path) as url, \
            GatewayClient(url, TOKEN_A, wait_seconds=1, lease_seconds=2) as gateway_a, \
            GatewayClient(url, TOKEN_B, wait_seconds=1, lease_seconds=30) as gateway_b, \
            github_site(tmp_path / "a", gateway=gateway_a, mode="gateway", gateway_url=url,
                        gateway_token_file=tmp_path / "token") as site:

        taken = asyncio.Event()
        take = gateway_a.next_delivery

        async def next_delivery(**options: Any) -> Any:
            # Agent A gets one delivery; then the gateway is out of its reach for good.
            if taken.is_set():
                raise GatewayError("gateway unreachable from agent A")
            delivery = await take(**options)
            if delivery is not None:
                taken.set()
            return delivery

        async def unreachable(delivery: Any) -> None:
            raise GatewayError("gateway unreachable from agent A")

        gateway_a.next_delivery = next_delivery             # type: ignore[method-assign]
        gateway_a.extend = unreachable                      # type: ignore[method-assign]
        hold = site.host.hold["unit"] = asyncio.Event()
        number = site.open_pull(author="alice", labelled_by="alice")
        serving_a = asyncio.create_task(site.source.serve())
        await deliver(url, "pull_request", labelled_payload(site, number, "alice"))
        await wait_until(lambda: site.host.ran, what="agent A to run the job")

        # Agent B, with its own state, gets the delivery once A's lease has run out.
        host_b = FakeHost(tmp_path / "b", POLICY)
        state_b = GithubState.open(tmp_path / "b" / "state")
        source_b = GithubSource(site.config, host_b, client=site.client, auth=site.source.auth, state=state_b,
                                gateway=gateway_b, update_interval=0.2)
        serving_b = asyncio.create_task(source_b.serve())
        await wait_until(lambda: state_b.triggers_with("elsewhere"), what="agent B to look")
        assert host_b.ran == []
        hold.set()
        await wait_until(lambda: completed(site.check_runs()), what="agent A's report")
        for host, serving in ((site.host, serving_a), (host_b, serving_b)):
            host.draining.set()
            await serving
        [run] = site.check_runs()
        assert run["name"] == "hpc-runner/unit" and run["conclusion"] == "success"
        state_b.close()
        host_b.store.close()


async def test_github_failing_while_a_job_is_prepared_delays_it_and_it_is_reported_once(
        tmp_path: Path) -> None:
    async with github_site(tmp_path, max_retries=0) as site:
        await site.poll()
        site.open_pull(author="alice", labelled_by="alice")
        site.gh.fail("checks/create", 503, times=2)              # not processed: GitHub made nothing
        site.gh.fail("checks/update", 502, times=1, processed=True)   # processed, answer lost
        await site.poll()
        [run] = site.check_runs("hpc-runner/unit")
        assert run["conclusion"] == "success"
        assert len(site.host.ran) == 1
        # Each try looked for the check run an earlier try may have made before making one.
        assert site.gh.count("checks/create") == 3 and site.gh.count("checks/list-for-ref") == 2


async def test_an_approved_fork_still_needs_a_grant_that_allows_forks(tmp_path: Path) -> None:
    async with github_site(tmp_path, policy=POLICY.replace("forks = true", "forks = false")) as site:
        await site.poll()
        number = site.open_pull(author="mallory", fork=FORK)
        site.gh.add_comment(REPO, number, COMMAND, user="alice")
        await site.poll()
        [run] = site.check_runs("hpc-runner/unit")
        assert run["conclusion"] == "failure"
        assert "the job comes from a fork and the grant has forks = false" in run["output"]["summary"]
        assert site.host.ran == []


async def test_a_denial_reported_as_a_commit_status_says_why_in_its_description(tmp_path: Path) -> None:
    jobs = "[[jobs]]\nname = \"unit\"\nimage = \"test\"\ncommand = [\"make\"]\nnetwork = true\n"
    async with github_site(tmp_path, jobs=jobs) as site:
        site.gh.forbid_checks(REPO)
        await site.poll()
        number = site.open_pull(author="alice", labelled_by="alice")
        await site.poll()
        [status] = site.gh.statuses(REPO, site.gh.pull_request(REPO, number).head_sha)
        assert status["state"] == "failure" and status["context"] == "hpc-runner/unit"
        assert status["description"].startswith("Denied by the site's policy; grant 'core-prs': the job asks "
                                                 "for network access")
        assert len(status["description"]) <= 140


async def test_a_large_jobs_file_is_parsed_while_the_event_loop_keeps_serving(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A jobs file near the size limit takes a second or more to parse: heartbeats and the other
    sources, on the same event loop, must go on meanwhile."""
    large = JOBS + "#\n" * ((MAX_FILE_BYTES - len(JOBS) - 64) // 2)   # valid, within the limit
    loop = asyncio.get_running_loop()
    order: list[str] = []
    parsing = asyncio.Event()
    ticked = threading.Event()

    def parse(text: str, name: str) -> tuple[JobSpec, ...]:
        order.append("parse started")
        loop.call_soon_threadsafe(parsing.set)
        jobs = parse_jobs_file(text, name)
        # Bounded: on the event loop's own thread the tick cannot come before this returns.
        ticked.wait(timeout=5)
        order.append("parse done")
        return jobs

    async def tick() -> None:   # a heartbeat, another source's poll
        await parsing.wait()
        order.append("tick")
        ticked.set()

    async with github_site(tmp_path, jobs=large) as site:
        await site.poll()
        monkeypatch.setattr(runs_module, "parse_jobs_file", parse)
        ticker = asyncio.create_task(tick())
        number = site.open_pull(author="alice", labelled_by="alice")
        await site.poll()
        await asyncio.wait_for(ticker, 10)

        assert order == ["parse started", "tick", "parse done"]
        [run] = site.check_runs("hpc-runner/unit", site.gh.pull_request(REPO, number).head_sha)
        assert run["conclusion"] == "success"


async def test_the_final_check_run_lists_the_jobs_outputs_with_their_digests_and_sizes(
        tmp_path: Path) -> None:
    async with github_site(tmp_path) as site:
        await site.poll()
        files = {"results/field.nc": b"\x89HDF" * 300, "plots/energy.png": b"\x89PNG" + b"p" * 99}
        site.host.collected["unit"] = files
        number = site.open_pull(author="alice", labelled_by="alice")
        head = site.gh.pull_request(REPO, number).head_sha
        await site.poll()

        [run] = site.check_runs("hpc-runner/unit", head)
        assert run["conclusion"] == "success"
        summary = run["_history"][-1]["output"]["summary"]
        assert "**Outputs (2, 1.3 KiB (1,303 bytes)):**" in summary
        for path, content in files.items():
            digest = hashlib.sha256(content).hexdigest()
            assert f"| `{path}` | {checks.human_bytes(len(content))} | `{digest}` |" in summary
        # Only the final report has them: the job's outputs exist once it has ended.
        assert all("Outputs" not in body["output"]["summary"] for body in run["_history"][:-1])
