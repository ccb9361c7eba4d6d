"""What starts a run on GitHub, and whether it may: pure functions, no I/O.

Three things trigger a run (README, "GitHub"):

* a pull request labelled with `trigger_label` (the labeller's approval);
* a new issue comment on a pull request whose line is exactly `comment_command` (edits never count:
  a comment is seen once, when it is new; comments by bots and apps are ignored);
* a push to one of `push_branches` (a trailing `/*` is the only wildcard).

Wherever a trigger comes from (the agent's own polling or a webhook relayed by the gateway, which
the agent does not trust), it is only a hint of where to look. `assess` decides on `Facts` that the
agent read through the API with its own credentials: the pull request's head SHA *now*, whether
its head repository differs from the base (a fork), and the actor's permission on the repository
(`write` or `admin`; GitHub maps `maintain` to `write` and `triage` to `read`). `author_association`
is never used: webhooks compute it without a viewer and report private org members as
`CONTRIBUTOR`.

Approvals are bound to the commit the approver saw. `/hpc-runner run <sha>` (7 to 40 hex digits)
approves the commit it names and nothing else: it runs only if that commit is the head, and a
short SHA only if it names no other commit of the pull request and the head was not force-pushed
since the comment (a commit with the same first digits is cheap to make). A label, or the command
without a SHA, approves the head when it was given; GitHub records no time for a push to a pull
request except as the pull request's `updated_at`, so such an approval runs only if the pull
request was not updated after it (commit dates are set by whoever commits, and a webhook's SHA is
only the gateway's word). A label event, once looked at for a head, never approves another one: a
later push needs a new approval. Fork pull requests therefore never run on code that nobody with
write permission approved, and the policy (a grant with `forks = true`) still decides whether they
run at all.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from runner.identity import Identity, identity_from_json
from runner.policy import Policy

TriggerKind = Literal["label", "comment", "push"]
WRITE_PERMISSIONS = frozenset({"admin", "write", "maintain"})
# Activity types that move a branch to a new commit (a deletion does not).
BRANCH_UPDATES = frozenset({"push", "force_push", "branch_creation", "pr_merge", "merge_queue_merge"})
ZERO_SHA = "0" * 40
CANCEL_ACTION = "cancel"         # the identifier of the check runs' Cancel button
# Events after which the pull request's head may be a commit that is no descendant of the one
# before (or the same one again): what a short SHA cannot tell apart.
HEAD_REWRITES = frozenset({"head_ref_force_pushed", "head_ref_deleted", "head_ref_restored", "reopened"})
MIN_SHA_DIGITS = 7
MAX_PULL_COMMITS = 250           # GitHub lists at most this many commits of a pull request
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_SHA = re.compile(r"[0-9a-f]{40}")
_HEX = re.compile(r"[0-9a-fA-F]+")


# ------------------------------------------------------------------------------------ triggers


@dataclass(frozen=True)
class Trigger:
    """A reason to run, as observed; every field is a hint until `assess` confirmed it."""

    kind: TriggerKind
    repository: str                 # OWNER/NAME as configured
    number: int | None = None       # the pull request (label, comment)
    sha: str | None = None          # label: the head the agent's own poll listed; push: the pushed SHA
    actor: str | None = None        # who labelled, commented or pushed
    comment_id: int | None = None
    branch: str | None = None       # push
    activity_id: int | None = None  # push, from the activity API
    delivery_id: str | None = None  # the webhook delivery it came from, if any

    def describe(self) -> str:
        who = f" by @{self.actor}" if self.actor else ""
        if self.kind == "label":
            return f"label on #{self.number}{who}"
        if self.kind == "comment":
            return f"comment on #{self.number}{who}"
        return f"push to {self.branch}{who}"


@dataclass(frozen=True)
class CancelRequest:
    """Someone asked to cancel: the Cancel button of a check run, or a cancel comment on a PR."""

    repository: str
    actor: str | None
    check_run_id: int | None = None
    number: int | None = None
    comment_id: int | None = None
    delivery_id: str | None = None


def trigger_key(trigger: Trigger, *, label_event: int | None = None) -> str:
    """The durable identity of a trigger: one run per key, the same from polling and webhooks."""
    repo = trigger.repository.lower()
    if trigger.kind == "label":
        if label_event is None:
            raise ValueError("a label trigger's key needs its label event id")
        return f"label:{repo}#{trigger.number}:{label_event}"
    if trigger.kind == "comment":
        return f"comment:{repo}:{trigger.comment_id}"
    return f"push:{repo}:{trigger.branch}@{trigger.sha}"


# ------------------------------------------------------------------------------------ small rules


def is_bot(user: Any) -> bool:
    """A GitHub App or other bot account: never a source of approvals or commands."""
    if not isinstance(user, Mapping):
        return True
    login = str(user.get("login") or "")
    return user.get("type") == "Bot" or login.endswith("[bot]") or not login


def has_write(permission: str | None) -> bool:
    return permission in WRITE_PERMISSIONS


def is_fork(pull: Mapping[str, Any]) -> bool:
    """Whether a pull request's head lives in another repository (or in one that was deleted).

    `head.repo.fork` alone is not enough: in a repository that is itself a fork, a pull request
    between two of its own branches has `fork: true` too.
    """
    head = (pull.get("head") or {}).get("repo")
    base = (pull.get("base") or {}).get("repo")
    if not isinstance(head, Mapping) or not isinstance(base, Mapping):
        return True
    return head.get("id") != base.get("id")


def branch_matches(patterns: Iterable[str], branch: str) -> bool:
    """`main` matches `main`; `release/*` matches `release/1.2` (one or more further segments)."""
    for pattern in patterns:
        if pattern.endswith("/*"):
            if branch.startswith(pattern[:-1]) and len(branch) > len(pattern) - 1:
                return True
        elif branch == pattern:
            return True
    return False


def cancel_command(command: str) -> str | None:
    """`/hpc-runner cancel` for `/hpc-runner run`; None when the command does not end in `run`."""
    head, _, last = command.rpartition(" ")
    return f"{head} cancel" if head and last == "run" else None


@dataclass(frozen=True)
class Command:
    """A command found in a comment: run (of the commit `sha` names, if any) or cancel."""

    verb: Literal["run", "cancel"]
    sha: str | None = None          # lowercase hex, 7 to 40 digits
    error: str | None = None        # why its argument names no commit


def named_sha(argument: str) -> Command:
    """The run command for `run <argument>`, where `argument` is hex digits."""
    digits = len(argument)
    if MIN_SHA_DIGITS <= digits <= 40:
        return Command("run", sha=argument.lower())
    return Command("run", error=f"`{argument}` has {digits} hex digits; a commit SHA has "
                                f"{MIN_SHA_DIGITS} to 40")


def parse_command(body: str, command: str) -> Command | None:
    """The command of a comment: a line that is exactly `command` (run), `command SHA` (run of
    that commit; SHA is hex digits) or the cancel form of `command`.

    The command must stand alone on its line (leading and trailing blanks aside): a quoted line
    (`> /hpc-runner run`), a mention inside a sentence, anything but hex digits after it, or a
    line in a fenced code block is not one. The first run line counts.
    """
    cancel = cancel_command(command)
    fence: str | None = None
    found: Command | None = None
    for raw in body.splitlines():
        opening = _FENCE.match(raw)
        if fence is not None:
            if opening and opening.group(1)[0] == fence[0] and len(opening.group(1)) >= len(fence) \
                    and not raw.strip().strip(fence[0]):
                fence = None
            continue
        if opening:
            fence = opening.group(1)
            continue
        line = raw.strip()
        if line == command:
            return Command("run")
        rest = line[len(command):] if line.startswith(command) else ""
        if rest[:1].isspace() and _HEX.fullmatch(rest.strip()):
            return named_sha(rest.strip())
        if cancel is not None and line == cancel:
            found = Command("cancel")
    return found


def comment_verb(body: str, command: str) -> Literal["run", "cancel"] | None:
    """`run` or `cancel` when the comment holds that command (`parse_command`)."""
    found = parse_command(body, command)
    return found.verb if found is not None else None


def pull_number_of_comment(comment: Mapping[str, Any]) -> int | None:
    """The pull request an issue comment belongs to (None for a comment on a plain issue)."""
    url = str(comment.get("html_url") or "")
    match = re.search(r"/pull/(\d+)(?:#|$)", url)
    return int(match.group(1)) if match else None


# ------------------------------------------------------------------------------------ poll results


@dataclass(frozen=True)
class LabelledPull:
    number: int
    head_sha: str
    updated_at: str

    @property
    def marker(self) -> str:
        """Changes whenever something about the pull request may have changed (a label re-applied)."""
        return f"{self.head_sha}|{self.updated_at}"


def labelled_pulls(pulls: Iterable[Any], label: str) -> list[LabelledPull]:
    """Open pull requests of a `GET /repos/{o}/{r}/pulls` page that carry `label`."""
    found = []
    for pull in pulls:
        if not isinstance(pull, Mapping) or pull.get("state", "open") != "open":
            continue
        names = {str(item.get("name")) for item in pull.get("labels") or [] if isinstance(item, Mapping)}
        sha = str((pull.get("head") or {}).get("sha") or "")
        if label in names and isinstance(pull.get("number"), int) and _SHA.fullmatch(sha):
            found.append(LabelledPull(pull["number"], sha, str(pull.get("updated_at") or "")))
    return found


def command_comments(repository: str, comments: Iterable[Any], *, after_id: int,
                     command: str) -> list[Trigger | CancelRequest]:
    """Commands in comments newer than `after_id`, oldest first; bots and plain issues ignored."""
    found: list[tuple[int, Trigger | CancelRequest]] = []
    for comment in comments:
        if not isinstance(comment, Mapping) or not isinstance(comment.get("id"), int):
            continue
        if comment["id"] <= after_id or is_bot(comment.get("user")) \
                or comment.get("performed_via_github_app"):
            continue
        number = pull_number_of_comment(comment)
        verb = comment_verb(str(comment.get("body") or ""), command)
        if number is None or verb is None:
            continue
        actor = str(comment["user"]["login"])
        if verb == "run":
            found.append((comment["id"], Trigger("comment", repository, number=number, actor=actor,
                                                 comment_id=comment["id"])))
        else:
            found.append((comment["id"], CancelRequest(repository, actor, number=number,
                                                       comment_id=comment["id"])))
    return [item for _, item in sorted(found, key=lambda pair: pair[0])]


def branch_pushes(repository: str, activities: Iterable[Any], *, after_id: int,
                  branches: Sequence[str]) -> list[Trigger]:
    """Pushes (from `GET /repos/{o}/{r}/activity`) to matching branches newer than `after_id`."""
    found = []
    for item in activities:
        if not isinstance(item, Mapping) or not isinstance(item.get("id"), int) or item["id"] <= after_id:
            continue
        if item.get("activity_type") not in BRANCH_UPDATES:
            continue
        ref = str(item.get("ref") or "")
        branch = ref.removeprefix("refs/heads/") if ref.startswith("refs/heads/") else ref
        sha = str(item.get("after") or "")
        if not branch or not _SHA.fullmatch(sha) or sha == ZERO_SHA or not branch_matches(branches, branch):
            continue
        actor = item.get("actor") if isinstance(item.get("actor"), Mapping) else None
        found.append(Trigger("push", repository, sha=sha, branch=branch, activity_id=item["id"],
                             actor=str(actor["login"]) if actor and actor.get("login") else None))
    return sorted(found, key=lambda t: t.activity_id or 0)


def newest_id(items: Iterable[Any], current: int) -> int:
    ids = [int(item["id"]) for item in items if isinstance(item, Mapping) and isinstance(item.get("id"), int)]
    return max([current, *ids])


@dataclass(frozen=True)
class LabelEvent:
    id: int
    actor: str | None
    bot: bool
    created_at: str | None = None   # GitHub's time of the event


def latest_label_event(events: Iterable[Any], label: str) -> LabelEvent | None:
    """The most recent `labeled` event of `label` in `GET /repos/{o}/{r}/issues/{n}/events`."""
    latest: LabelEvent | None = None
    for event in events:
        if not isinstance(event, Mapping) or event.get("event") != "labeled" \
                or not isinstance(event.get("id"), int):
            continue
        if str((event.get("label") or {}).get("name")) != label:
            continue
        actor = event.get("actor")
        login = str(actor.get("login")) if isinstance(actor, Mapping) and actor.get("login") else None
        bot = is_bot(actor) or bool(event.get("performed_via_github_app"))
        created = event.get("created_at")
        candidate = LabelEvent(event["id"], login, bot, str(created) if created else None)
        if latest is None or candidate.id > latest.id:
            latest = candidate
    return latest


# ------------------------------------------------------------------------------------ webhooks


def from_delivery(event: str, payload: Mapping[str, Any], *, repositories: Sequence[str],
                  trigger_label: str | None, comment_command: str | None,
                  push_branches: Sequence[str], delivery_id: str | None = None,
                  ) -> Trigger | CancelRequest | None:
    """The trigger a webhook delivery hints at, or None for anything this agent does not act on.

    Nothing in `payload` is trusted: the result only says where to look through the API.
    """
    repo = payload.get("repository")
    full_name = str(repo.get("full_name")) if isinstance(repo, Mapping) else ""
    configured = {name.lower(): name for name in repositories}
    repository = configured.get(full_name.lower())
    if repository is None:
        return None
    action = payload.get("action")
    sender = payload.get("sender")
    actor = str(sender.get("login")) if isinstance(sender, Mapping) and sender.get("login") else None
    if event == "pull_request" and trigger_label is not None:
        # The payload's head SHA is not taken: which commit a label approves is read through the API.
        pull = payload.get("pull_request")
        if not isinstance(pull, Mapping) or not isinstance(pull.get("number"), int):
            return None
        labels = {str(item.get("name")) for item in pull.get("labels") or [] if isinstance(item, Mapping)}
        if action == "labeled" and str((payload.get("label") or {}).get("name")) == trigger_label:
            return Trigger("label", repository, number=pull["number"], actor=actor, delivery_id=delivery_id)
        if action in ("synchronize", "reopened") and trigger_label in labels:
            # New commits on a labelled pull request: the label's approval does not cover them.
            return Trigger("label", repository, number=pull["number"], actor=None, delivery_id=delivery_id)
        return None
    if event == "issue_comment" and comment_command is not None:
        comment, issue = payload.get("comment"), payload.get("issue")
        if action != "created" or not isinstance(comment, Mapping) or not isinstance(issue, Mapping):
            return None
        if not isinstance(issue.get("pull_request"), Mapping) or not isinstance(comment.get("id"), int) \
                or not isinstance(issue.get("number"), int):
            return None
        if is_bot(comment.get("user")) or comment.get("performed_via_github_app"):
            return None
        verb = comment_verb(str(comment.get("body") or ""), comment_command)
        if verb == "run":
            return Trigger("comment", repository, number=issue["number"], actor=actor,
                           comment_id=comment["id"], delivery_id=delivery_id)
        if verb == "cancel":
            return CancelRequest(repository, actor, number=issue["number"], comment_id=comment["id"],
                                 delivery_id=delivery_id)
        return None
    if event == "push" and push_branches:
        ref = str(payload.get("ref") or "")
        sha = str(payload.get("after") or "")
        if payload.get("deleted") or not ref.startswith("refs/heads/") or not _SHA.fullmatch(sha) \
                or sha == ZERO_SHA:
            return None
        branch = ref.removeprefix("refs/heads/")
        if not branch_matches(push_branches, branch):
            return None
        # `pusher.name` is a git author name, not always a login: `sender` is; the activity API
        # confirms who it was either way.
        return Trigger("push", repository, sha=sha, branch=branch, actor=actor, delivery_id=delivery_id)
    if event == "check_run" and action == "requested_action":
        requested = payload.get("requested_action")
        check_run = payload.get("check_run")
        if isinstance(requested, Mapping) and requested.get("identifier") == CANCEL_ACTION \
                and isinstance(check_run, Mapping) and isinstance(check_run.get("id"), int):
            return CancelRequest(repository, actor, check_run_id=check_run["id"], delivery_id=delivery_id)
    return None


# ------------------------------------------------------------------------------------ assessment


@dataclass(frozen=True)
class HeadRewrite:
    """An event of the pull request's timeline after which its head may be an unrelated commit."""

    event: str
    created_at: str


@dataclass(frozen=True)
class Approval:
    """When a label or a run command was given and what GitHub says happened since (all through the
    API): which commit it approves follows from these (`approval_problem`)."""

    at: str | None                          # created_at of the labeled event or of the comment
    pull_updated_at: str | None             # the pull request's updated_at, read after the approval
    sha: str | None = None                  # the commit the command names (lowercase hex)
    sha_error: str | None = None            # why the command's argument names no commit
    # A short `sha` only: the pull request's commits it matches, the head rewrites of its timeline,
    # and whether both lists were read in full.
    matching: tuple[str, ...] = ()
    rewrites: tuple[HeadRewrite, ...] = ()
    complete: bool = True


@dataclass(frozen=True)
class Facts:
    """What the agent read through the API, with its own credentials, after the trigger."""

    head_sha: str                    # the commit to run: the PR head now, or the pushed SHA
    actor: str | None                # the approver: labeller (from the issue events), commenter, pusher
    permission: str | None           # the actor's permission on the repository
    actor_is_bot: bool = False
    fork: bool = False
    open: bool = True
    # For a label: the SHA this label event was bound to when the agent first saw it (None: new).
    bound_sha: str | None = None
    teams: tuple[str, ...] = ()      # ORG/SLUG of the policy's teams the actor is an active member of
    approval: Approval | None = None  # label and comment triggers: None when GitHub could not say


@dataclass(frozen=True)
class Run:
    sha: str
    identity: Identity


@dataclass(frozen=True)
class NeedsApproval:
    """Not run: someone with write permission must approve this SHA (check run `action_required`)."""

    sha: str
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class Ignore:
    """Nothing to run and nothing to report on GitHub (only the agent's log says why)."""

    reason: str


Verdict = Run | NeedsApproval | Ignore


def how_to_approve(trigger_label: str | None, comment_command: str | None, sha: str | None = None) -> str:
    ways = []
    if comment_command:
        ways.append(f"comment `{comment_command}`" + (f" or, naming the commit, `{comment_command} {sha}`"
                                                       if sha else ""))
    if trigger_label:
        ways.append(f"remove and apply the `{trigger_label}` label again")
    return "someone with write permission on the repository can approve this commit: " + " or ".join(ways)


def _moment(stamp: str | None) -> datetime | None:
    """A GitHub timestamp (`2026-01-01T12:00:00Z`), or None when there is no usable one."""
    try:
        moment = datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


def approval_problem(trigger: Trigger, facts: Facts) -> str | None:
    """Why the label or run command of `trigger` does not approve `facts.head_sha` (None: it does).

    Times are GitHub's own (whole seconds). A head rewrite in the approval's second refuses a short
    SHA. Without a SHA, the pull request's `updated_at` in that second is the approval's own (a label
    or a comment moves it), so it cannot refuse: a push in that very second is the one case those
    times cannot order, which naming the commit closes.
    """
    approval = facts.approval
    head = facts.head_sha
    label = trigger.kind == "label"
    who = f"the label was applied by @{facts.actor}" if label else f"@{facts.actor}'s comment"
    given = "the label was applied" if label else f"@{facts.actor} commented"
    if approval is None:
        return f"GitHub did not say when {given}, so which commit it approves is unknown"
    if approval.sha_error is not None:
        return f"@{facts.actor}'s command names no commit: {approval.sha_error}"
    at = _moment(approval.at)
    if approval.sha is not None:
        if not head.startswith(approval.sha):
            return (f"@{facts.actor} approved commit `{approval.sha}`, but the head of #{trigger.number} is "
                    f"`{head[:12]}`: an approval covers only the commit it names")
        if len(approval.sha) == 40:
            return None
        # Anyone can make a commit whose SHA starts like another one's: a short SHA must name no
        # other commit of the pull request, and the head must not have been replaced since.
        others = sorted({sha for sha in approval.matching if sha != head})
        if others:
            return (f"`{approval.sha}` names more than one commit of #{trigger.number} (`{head[:12]}`, "
                    + ", ".join(f"`{sha[:12]}`" for sha in others) + "): name the commit in full")
        if not approval.complete:
            return (f"#{trigger.number} has more commits or events than the agent can read, so it cannot "
                    f"tell that `{approval.sha}` names only its head: name the commit in full")
        if at is None:
            return f"GitHub did not say when {given}, so a short SHA is not enough: name the commit in full"
        for rewrite in approval.rewrites:
            when = _moment(rewrite.created_at)
            if when is None or when >= at:
                return (f"the head of #{trigger.number} was replaced ({rewrite.event}) at "
                        f"{rewrite.created_at}, after {who} at {approval.at}, and a short SHA may name the "
                        "new commit too: name the commit in full")
        return None
    updated = _moment(approval.pull_updated_at)
    if at is None or updated is None:
        return (f"GitHub did not say when {given} or when the pull request last changed, so the agent "
                "cannot tell whether its head changed since")
    if updated > at:
        # A push to a pull request leaves no time GitHub vouches for but this one; comments, labels
        # and reviews move it too, and GitHub does not tell them apart.
        return (f"the pull request changed at {approval.pull_updated_at}, after {who} at {approval.at} "
                "(new commits, or any other update: GitHub does not tell them apart), and an approval "
                "without a SHA covers only the commit that was the head when it was given")
    return None


def assess(trigger: Trigger, facts: Facts, *, how_to: str = "") -> Verdict:
    """Whether and as whom `trigger` runs, on `facts` read through the API.

    `how_to` (from `how_to_approve`) ends the reasons of a `NeedsApproval`.
    """
    what = trigger.describe()

    def needs(reason: str) -> NeedsApproval:
        return NeedsApproval(facts.head_sha, (reason, how_to) if how_to else (reason,))

    if not facts.open:
        return Ignore(f"{what}: the pull request is closed")
    if facts.actor is None:
        if trigger.kind == "label":
            return needs(f"pull request #{trigger.number} has the label, but the agent cannot tell "
                         "who applied it")
        return Ignore(f"{what}: the actor could not be confirmed through the API")
    if facts.actor_is_bot:
        return Ignore(f"{what}: @{facts.actor} is a bot or an app, which cannot approve runs")
    if trigger.kind == "label":
        if facts.bound_sha is not None and facts.bound_sha != facts.head_sha:
            return needs(f"@{facts.actor} applied the label at commit {facts.bound_sha[:12]}; the pull "
                         f"request has new commits since (head {facts.head_sha[:12]}), and a label approves "
                         "only the commit it was applied at")
        if trigger.sha is not None and trigger.sha != facts.head_sha and facts.bound_sha is None:
            return needs(f"the label was applied at commit {trigger.sha[:12]}, but the pull request's "
                         f"head is now {facts.head_sha[:12]}: the approval does not cover newer commits")
        if not has_write(facts.permission):
            return needs(f"the label was applied by @{facts.actor}, who has {facts.permission or 'no'} "
                         f"permission on {trigger.repository}; the label approves a run only when "
                         "applied by someone with write permission")
    elif not has_write(facts.permission):
        # Anyone can comment on a public repository: a comment without write permission starts
        # nothing and costs GitHub no writes (no check run), so it cannot be used to spam.
        return Ignore(f"{what}: @{facts.actor} has {facts.permission or 'no'} permission on "
                      f"{trigger.repository}; commands need write")
    # A label event already bound to this head was decided on when first seen: whether it ran is
    # the agent's record of it, never a second look at times that only grow.
    if trigger.kind != "push" and not (trigger.kind == "label" and facts.bound_sha is not None):
        problem = approval_problem(trigger, facts)
        if problem is not None:
            return needs(problem)
    return Run(facts.head_sha, github_identity(trigger, facts))


def github_identity(trigger: Trigger, facts: Facts) -> Identity:
    """The identity the policy sees (README, "GitHub"), validated like an `--identity` file."""
    if trigger.kind == "push":
        event, ref = "push", f"refs/heads/{trigger.branch}"
    else:
        event, ref = "pull_request", f"refs/pull/{trigger.number}/head"
    data: dict[str, Any] = {"source": "github", "repository": trigger.repository, "event": event,
                            "ref": ref, "fork": facts.fork, "teams": list(facts.teams)}
    if facts.actor:
        data["actor"] = facts.actor
    return identity_from_json(data, f"GitHub {trigger.describe()}")


def policy_teams(policy: Policy) -> tuple[tuple[str, str], ...]:
    """The GitHub teams (ORG, SLUG) that the policy's grants name, whose membership must be checked."""
    found: dict[tuple[str, str], None] = {}
    for grant in policy.grants:
        for principal in grant.principals:
            if principal.source == "github" and principal.kind == "team" \
                    and principal.name is not None and principal.name != "*":
                found[(principal.owner, principal.name)] = None
    return tuple(found)


def wildcard_teams(policy: Policy) -> tuple[str, ...]:
    """`github:team:ORG/*` principals: membership of every team of an organisation is not looked up."""
    return tuple(sorted({str(p) for g in policy.grants for p in g.principals
                         if p.source == "github" and p.kind == "team" and p.name == "*"}))
