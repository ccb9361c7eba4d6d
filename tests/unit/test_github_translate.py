"""Triggers and their assessment: the pure rules of who may run what on GitHub."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from fakes.github_webhooks import examples

from runner.policy.model import parse_policy_text
from runner.sources.github.translate import (
    Approval,
    CancelRequest,
    Command,
    Facts,
    HeadRewrite,
    Ignore,
    NeedsApproval,
    Run,
    Trigger,
    assess,
    branch_matches,
    branch_pushes,
    command_comments,
    comment_verb,
    from_delivery,
    is_fork,
    labelled_pulls,
    latest_label_event,
    parse_command,
    policy_teams,
    trigger_key,
    wildcard_teams,
)

COMMAND = "/hpc-runner run"
REPO = "Codertocat/Hello-World"
SHA_A = "a" * 40
SHA_B = "b" * 40


# ------------------------------------------------------------------------------------ comments


@pytest.mark.parametrize("body, verb", [
    ("/hpc-runner run", "run"),
    ("  /hpc-runner run  \r\n", "run"),
    ("Looks good.\n/hpc-runner run\nthanks", "run"),
    ("/hpc-runner cancel", "cancel"),
    ("/hpc-runner run please", None),              # not exactly the command
    ("please /hpc-runner run", None),
    ("> /hpc-runner run", None),                   # a quote of someone else's command
    ("```\n/hpc-runner run\n```", None),           # an example in a code block
    ("~~~~\n/hpc-runner run\n~~~~\n", None),
    ("```\nexample\n```\n/hpc-runner run", "run"),
    ("/HPC-RUNNER RUN", None),
    ("/hpc-runner runs", None),
])
def test_a_command_stands_alone_on_its_line(body: str, verb: str | None) -> None:
    assert comment_verb(body, COMMAND) == verb


@pytest.mark.parametrize("body, command", [
    ("/hpc-runner run 1a2b3c4", Command("run", sha="1a2b3c4")),
    ("ok\n  /hpc-runner run   ABCDEF0123  \n", Command("run", sha="abcdef0123")),
    (f"/hpc-runner run {SHA_A}", Command("run", sha=SHA_A)),
    ("/hpc-runner run abc12", Command("run", error="`abc12` has 5 hex digits; a commit SHA has 7 to 40")),
    (f"/hpc-runner run {SHA_A}0", Command("run", error=f"`{SHA_A}0` has 41 hex digits; a commit SHA has "
                                                        "7 to 40")),
    ("/hpc-runner run 1a2b3c4 5d6e7f8", None),       # one SHA, nothing else
    ("/hpc-runner run 1a2b3c4g", None),
    ("/hpc-runner run1a2b3c4", None),
    ("> /hpc-runner run 1a2b3c4", None),
    ("```\n/hpc-runner run 1a2b3c4\n```", None),
    ("/hpc-runner cancel\n/hpc-runner run 1a2b3c4", Command("run", sha="1a2b3c4")),
])
def test_a_run_command_may_name_the_commit_it_approves(body: str, command: Command | None) -> None:
    assert parse_command(body, COMMAND) == command


def _comment(cid: int, body: str, number: int | None = 7, user: str = "alice", kind: str = "User",
             app: bool = False) -> dict[str, Any]:
    url = f"https://github.com/{REPO}/pull/{number}#issuecomment-{cid}" if number else \
        f"https://github.com/{REPO}/issues/3#issuecomment-{cid}"
    return {"id": cid, "body": body, "html_url": url, "user": {"login": user, "type": kind},
            "performed_via_github_app": {"id": 1} if app else None}


def test_only_new_human_commands_on_pull_requests_count_oldest_first() -> None:
    comments = [_comment(15, COMMAND), _comment(12, "/hpc-runner cancel"), _comment(11, COMMAND),
                _comment(16, COMMAND, number=None), _comment(17, COMMAND, user="ci[bot]", kind="Bot"),
                _comment(18, COMMAND, app=True), _comment(19, "nice work")]
    found = command_comments(REPO, comments, after_id=11, command=COMMAND)
    assert found == [CancelRequest(REPO, "alice", number=7, comment_id=12),
                     Trigger("comment", REPO, number=7, actor="alice", comment_id=15)]


# ------------------------------------------------------------------------------------ poll lists


def test_labelled_pulls_and_pushes_from_list_answers() -> None:
    pulls = [{"number": 1, "state": "open", "labels": [{"name": "run-hpc"}], "head": {"sha": SHA_A},
              "updated_at": "2026-01-01T00:00:00Z"},
             {"number": 2, "state": "open", "labels": [{"name": "bug"}], "head": {"sha": SHA_B}}]
    [pull] = labelled_pulls(pulls, "run-hpc")
    assert (pull.number, pull.head_sha, pull.marker) == (1, SHA_A, f"{SHA_A}|2026-01-01T00:00:00Z")
    activity = [{"id": 9, "activity_type": "push", "ref": "refs/heads/main", "after": SHA_A,
                 "actor": {"login": "alice"}},
                {"id": 8, "activity_type": "branch_deletion", "ref": "refs/heads/release/1",
                 "after": "0" * 40},
                {"id": 7, "activity_type": "branch_creation", "ref": "refs/heads/release/1", "after": SHA_B,
                 "actor": {"login": "bob"}},
                {"id": 6, "activity_type": "push", "ref": "refs/heads/feature", "after": SHA_B},
                {"id": 5, "activity_type": "push", "ref": "refs/heads/main", "after": SHA_B}]
    pushes = branch_pushes(REPO, activity, after_id=5, branches=["main", "release/*"])
    assert [(t.branch, t.sha, t.actor, t.activity_id) for t in pushes] == [
        ("release/1", SHA_B, "bob", 7), ("main", SHA_A, "alice", 9)]


@pytest.mark.parametrize("pattern, branch, matches", [
    ("main", "main", True), ("main", "main2", False), ("release/*", "release/1.2", True),
    ("release/*", "release/", False), ("release/*", "releases/1", False), ("release/*", "release/a/b", True),
])
def test_push_branches(pattern: str, branch: str, matches: bool) -> None:
    assert branch_matches([pattern], branch) is matches


def test_the_latest_labelled_event_of_the_label_names_the_approver() -> None:
    events = [{"id": 3, "event": "labeled", "label": {"name": "run-hpc"}, "actor": {"login": "alice"}},
              {"id": 5, "event": "labeled", "label": {"name": "bug"}, "actor": {"login": "bob"}},
              {"id": 4, "event": "unlabeled", "label": {"name": "run-hpc"}, "actor": {"login": "carol"}},
              {"id": 6, "event": "labeled", "label": {"name": "run-hpc"}, "actor": {"login": "dave"}}]
    event = latest_label_event(events, "run-hpc")
    assert event is not None and (event.id, event.actor, event.bot) == (6, "dave", False)
    assert latest_label_event(events[1:2], "run-hpc") is None


def test_a_fork_is_a_head_repository_other_than_the_base() -> None:
    same = {"head": {"repo": {"id": 1, "fork": True}}, "base": {"repo": {"id": 1, "fork": True}}}
    other = {"head": {"repo": {"id": 2, "fork": True}}, "base": {"repo": {"id": 1}}}
    deleted = {"head": {"repo": None}, "base": {"repo": {"id": 1}}}
    assert (is_fork(same), is_fork(other), is_fork(deleted)) == (False, True, True)


# ------------------------------------------------------------------------------------ webhooks


def _delivery(event: str, action: str | None, **changes: Any) -> dict[str, Any]:
    example = next(e for e in examples(event) if action is None or e.payload.get("action") == action)
    payload = copy.deepcopy(example.payload)
    for key, value in changes.items():
        payload[key] = value
    return payload


def _from(event: str, payload: dict[str, Any]) -> Trigger | CancelRequest | None:
    return from_delivery(event, payload, repositories=[REPO], trigger_label="run-hpc",
                         comment_command=COMMAND, push_branches=["master"], delivery_id="d-1")


def test_official_example_deliveries_become_hints() -> None:
    labelled = _delivery("pull_request", "labeled", label={"name": "run-hpc"})
    # The payload's head SHA is the gateway's word only: which commit runs is read through the API.
    assert _from("pull_request", labelled) == Trigger("label", REPO, number=2, actor="Codertocat",
                                                      delivery_id="d-1")
    assert _from("pull_request", _delivery("pull_request", "labeled")) is None          # another label
    pushed = _delivery("push", None, ref="refs/heads/master")
    push = _from("push", pushed)
    assert isinstance(push, Trigger) and (push.branch, push.sha, push.actor) == (
        "master", pushed["after"], "Codertocat")
    comment = _delivery("issue_comment", "created")
    comment["comment"]["body"] = COMMAND
    assert _from("issue_comment", comment) is None                      # on an issue, not a pull request
    comment["issue"]["pull_request"] = {"url": "https://api.github.com/repos/x/y/pulls/1"}
    assert _from("issue_comment", comment) == Trigger(
        "comment", REPO, number=comment["issue"]["number"], actor="Codertocat",
        comment_id=comment["comment"]["id"], delivery_id="d-1")
    edited = _delivery("issue_comment", "edited", comment=comment["comment"], issue=comment["issue"])
    assert _from("issue_comment", edited) is None                      # edits never trigger
    action = _delivery("check_run", "requested_action")
    action["repository"]["full_name"] = REPO
    assert _from("check_run", action) is None                          # not our button
    action["requested_action"] = {"identifier": "cancel"}
    assert _from("check_run", action) == CancelRequest(
        REPO, action["sender"]["login"], check_run_id=action["check_run"]["id"], delivery_id="d-1")


def test_a_synchronize_of_a_labelled_pull_request_is_looked_at_and_others_ignored() -> None:
    pushed = _delivery("pull_request", "synchronize")
    assert _from("pull_request", pushed) is None
    pushed["pull_request"]["labels"].append({"name": "run-hpc"})
    found = _from("pull_request", pushed)
    assert isinstance(found, Trigger) and found.kind == "label" and found.actor is None
    other = _delivery("pull_request", "labeled", label={"name": "run-hpc"})
    other["repository"]["full_name"] = "someone/else"
    assert _from("pull_request", other) is None
    tag = _delivery("push", None)                                       # refs/tags/simple-tag
    assert _from("push", tag) is None


# ------------------------------------------------------------------------------------ assessment


NOW = "2026-01-01T12:00:00Z"


def _facts(**changes: Any) -> Facts:
    base: dict[str, Any] = {"head_sha": SHA_A, "actor": "alice", "permission": "write",
                            "teams": ("CliMA/core",), "approval": Approval(NOW, NOW)}
    return Facts(**(base | changes))


LABEL = Trigger("label", "CliMA/ClimaAtmos.jl", number=12, sha=SHA_A, actor="alice")
COMMENT = Trigger("comment", "CliMA/ClimaAtmos.jl", number=12, actor="alice", comment_id=5)
PUSH = Trigger("push", "CliMA/ClimaAtmos.jl", sha=SHA_A, branch="main", actor="alice", activity_id=3)


def test_a_writer_s_label_runs_as_them_with_the_identity_the_policy_sees() -> None:
    verdict = assess(LABEL, _facts())
    assert isinstance(verdict, Run) and verdict.sha == SHA_A
    assert verdict.identity.to_json() == {
        "source": "github", "repository": "CliMA/ClimaAtmos.jl", "actor": "alice", "teams": ["CliMA/core"],
        "event": "pull_request", "ref": "refs/pull/12/head", "fork": False}
    push = assess(PUSH, _facts())
    assert isinstance(push, Run) and push.identity.ref == "refs/heads/main" and push.identity.event == "push"


def test_a_fork_runs_only_as_an_approved_fork() -> None:
    verdict = assess(COMMENT, _facts(fork=True))
    assert isinstance(verdict, Run) and verdict.identity.fork is True


@pytest.mark.parametrize("facts, words", [
    (_facts(permission="read"), "who has read permission"),
    (_facts(permission=None), "who has no permission"),
    (_facts(bound_sha=SHA_B), f"applied the label at commit {SHA_B[:12]}"),
    (_facts(head_sha=SHA_B), f"applied at commit {SHA_A[:12]}"),
    (_facts(actor=None), "cannot tell who applied it"),
])
def test_a_label_that_is_no_approval_of_the_head_asks_for_one(facts: Facts, words: str) -> None:
    verdict = assess(LABEL, facts, how_to="comment `/hpc-runner run`")
    assert isinstance(verdict, NeedsApproval)
    assert verdict.sha == facts.head_sha
    assert words in verdict.reasons[0] and verdict.reasons[-1] == "comment `/hpc-runner run`"


@pytest.mark.parametrize("trigger", [COMMENT, PUSH])
@pytest.mark.parametrize("facts", [_facts(permission="read"), _facts(permission="triage"),
                                   _facts(actor_is_bot=True), _facts(open=False)])
def test_commands_and_pushes_without_write_permission_start_nothing_and_ask_nothing(
        trigger: Trigger, facts: Facts) -> None:
    assert isinstance(assess(trigger, facts), Ignore)


def test_maintain_counts_as_write_and_admin_too() -> None:
    assert isinstance(assess(COMMENT, _facts(permission="maintain")), Run)
    assert isinstance(assess(COMMENT, _facts(permission="admin")), Run)


def test_keys_are_stable_and_distinct() -> None:
    assert trigger_key(LABEL, label_event=99) == "label:clima/climaatmos.jl#12:99"
    assert trigger_key(COMMENT) == "comment:clima/climaatmos.jl:5"
    assert trigger_key(PUSH) == f"push:clima/climaatmos.jl:main@{SHA_A}"
    with pytest.raises(ValueError):
        trigger_key(LABEL)


def test_the_teams_to_look_up_are_those_the_policy_names() -> None:
    policy = parse_policy_text("""version = 1
[accounts.a]
slurm_account = "a"
partitions = ["p"]
[images.i]
path = "/i.sif"
sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
[[grants]]
name = "g"
principals = ["github:team:CliMA/core", "github:team:CliMA/*", "github:user:bob", "buildkite:team:o/t"]
account = "a"
images = ["i"]
""")
    assert policy_teams(policy) == (("CliMA", "core"),)
    assert wildcard_teams(policy) == ("github:team:CliMA/*",)


# ------------------------------------------------------------------------------------ bound to a commit


LATER = "2026-01-01T12:00:01Z"
EARLIER = "2026-01-01T11:59:59Z"
SHORT = SHA_A[:7]


@pytest.mark.parametrize("trigger", [COMMENT, LABEL])
def test_without_a_sha_an_approval_covers_the_head_only_if_the_pull_request_did_not_change_after_it(
        trigger: Trigger) -> None:
    assert isinstance(assess(trigger, _facts(approval=Approval(NOW, NOW))), Run)
    assert isinstance(assess(trigger, _facts(approval=Approval(NOW, EARLIER))), Run)
    changed = assess(trigger, _facts(approval=Approval(NOW, LATER)), how_to="comment `/hpc-runner run`")
    assert isinstance(changed, NeedsApproval) and changed.sha == SHA_A
    who = "@alice's comment" if trigger.kind == "comment" else "the label was applied by @alice"
    assert f"the pull request changed at {LATER}, after {who} at {NOW}" in changed.reasons[0]
    assert changed.reasons[-1] == "comment `/hpc-runner run`"
    for unknown in (None, Approval(None, NOW), Approval(NOW, None), Approval("yesterday", NOW)):
        assert isinstance(assess(trigger, _facts(approval=unknown)), NeedsApproval)


def test_a_label_event_bound_to_the_head_before_is_not_looked_at_again() -> None:
    # Whether it ran is the agent's record of it; the caller never runs a label event twice.
    assert isinstance(assess(LABEL, _facts(bound_sha=SHA_A, approval=Approval(NOW, LATER))), Run)


def test_a_full_sha_approves_exactly_that_commit_whatever_happened_since() -> None:
    named = Approval(NOW, LATER, sha=SHA_A, rewrites=(HeadRewrite("head_ref_force_pushed", LATER),))
    assert isinstance(assess(COMMENT, _facts(approval=named)), Run)
    other = assess(COMMENT, _facts(head_sha=SHA_B, approval=named))
    assert isinstance(other, NeedsApproval) and other.sha == SHA_B
    assert f"approved commit `{SHA_A}`, but the head of #12 is `{SHA_B[:12]}`" in other.reasons[0]


@pytest.mark.parametrize("approval, words", [
    (Approval(NOW, LATER, sha=SHORT, matching=(SHA_A,)), None),
    (Approval(NOW, LATER, sha=SHORT, matching=(SHA_A,),
              rewrites=(HeadRewrite("head_ref_force_pushed", EARLIER),)), None),
    (Approval(NOW, NOW, sha=SHORT, matching=(SHA_A, SHORT + "f" * 33)), "names more than one commit of #12"),
    (Approval(NOW, NOW, sha=SHORT, matching=(SHA_A,), complete=False), "more commits or events than"),
    (Approval(NOW, NOW, sha=SHORT, matching=(SHA_A,), rewrites=(HeadRewrite("head_ref_force_pushed", NOW),)),
     f"was replaced (head_ref_force_pushed) at {NOW}, after @alice's comment at {NOW}"),
    (Approval(NOW, NOW, sha=SHORT, matching=(SHA_A,), rewrites=(HeadRewrite("reopened", "?"),)), "replaced"),
    (Approval(None, NOW, sha=SHORT, matching=(SHA_A,)), "a short SHA is not enough"),
    (Approval(NOW, NOW, sha="bbbbbbb"), "approved commit `bbbbbbb`, but the head of #12 is"),
    (Approval(NOW, NOW, sha_error="`abc` has 3 hex digits"), "names no commit: `abc` has 3 hex digits"),
])
def test_a_short_sha_must_name_only_the_head_and_the_head_must_not_have_been_replaced_since(
        approval: Approval, words: str | None) -> None:
    verdict = assess(COMMENT, _facts(approval=approval))
    if words is None:
        assert isinstance(verdict, Run)
    else:
        assert isinstance(verdict, NeedsApproval) and words in verdict.reasons[0]
        if "replaced" in words or "more" in words or "enough" in words:
            assert "name the commit in full" in verdict.reasons[0]
