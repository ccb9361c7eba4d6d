"""Reading, through the API and with the agent's own credentials, what a trigger claims.

Each trigger becomes `Facts` for `translate.assess`: the pull request as it is now (head SHA, fork,
open, labels, when it last changed), who really applied the label and when (the issue events, not a
webhook's `sender`), what the comment really says, who wrote it and when, who pushed which SHA (the
repository activity), that person's permission on the repository and their membership in the teams
the policy names. A command naming a short SHA also gets the pull request's commits that SHA matches
and the timeline events that replaced its head.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

from runner.config import GithubConfig
from runner.logging_setup import get_logger
from runner.sources.github.client import GitHubClient, GitHubHTTPError, api_path, next_link
from runner.sources.github.translate import (
    HEAD_REWRITES,
    MAX_PULL_COMMITS,
    Approval,
    Command,
    Facts,
    HeadRewrite,
    LabelEvent,
    Trigger,
    has_write,
    is_bot,
    is_fork,
    latest_label_event,
    parse_command,
)

log = get_logger("runner.sources.github")

MAX_PAGES = 10


class NotConfirmed(Exception):
    """The API does not back the trigger up (the comment is gone, the push is unknown)."""


@dataclass(frozen=True)
class Confirmed:
    facts: Facts
    label_event: LabelEvent | None = None   # label triggers: the event that is the approval
    labelled: bool = True                   # label triggers: the label is still on the pull request
    clone_url: str | None = None            # the base repository's


async def pages(client: GitHubClient, path: str, params: Mapping[str, str | int] | None = None, *,
                max_pages: int = MAX_PAGES) -> AsyncIterator[list[Any]]:
    """The pages of a list endpoint, first one first, following `Link: rel="next"`."""
    response = await client.request("GET", path, params=params)
    for _ in range(max_pages):
        if not isinstance(response.data, list):
            raise NotConfirmed(f"GET {path}: expected a list")
        yield response.data
        following = next_link(response.headers.get("Link"))
        if following is None or not following.startswith(client.api_url + "/"):
            return
        response = await client.request("GET", following[len(client.api_url):])


async def read_list(client: GitHubClient, path: str, params: Mapping[str, str | int] | None = None, *,
                    max_pages: int = MAX_PAGES) -> tuple[list[Any], bool]:
    """Every item of a list endpoint, and whether that is all of them (False: more than `max_pages`)."""
    items: list[Any] = []
    read = 0
    async for page in pages(client, path, params, max_pages=max_pages + 1):
        read += 1
        if read > max_pages:
            return items, False
        items += page
    return items, True


class Confirmer:
    def __init__(self, client: GitHubClient, config: GithubConfig) -> None:
        self._client = client
        self._config = config
        self._clone_urls: dict[str, str] = {}

    async def _get_unless_missing(self, path: str) -> Any:
        """The answer to a GET, or None when GitHub says 404 (no such thing, or not visible to us)."""
        try:
            return await self._client.get(path)
        except GitHubHTTPError as exc:
            if exc.status == 404:
                return None
            raise

    async def pull(self, repository: str, number: int) -> dict[str, Any]:
        owner, name = repository.split("/")
        data = await self._get_unless_missing(api_path("/repos/{owner}/{repo}/pulls/{number}", owner=owner,
                                                       repo=name, number=number))
        if data is None:
            raise NotConfirmed(f"{repository}#{number} is not a pull request")
        if not isinstance(data, dict):
            raise NotConfirmed(f"{repository}#{number}: the answer is not a pull request")
        return data

    async def permission(self, repository: str, user: str) -> str | None:
        owner, name = repository.split("/")
        path = api_path("/repos/{owner}/{repo}/collaborators/{username}/permission", owner=owner, repo=name,
                        username=user)
        data = await self._get_unless_missing(path)
        value = data.get("permission") if isinstance(data, Mapping) else None
        return str(value) if value else None

    async def teams(self, user: str, teams: tuple[tuple[str, str], ...]) -> tuple[str, ...]:
        """The `ORG/SLUG` of `teams` that `user` is an active member of."""
        found = []
        for org, slug in teams:
            path = api_path("/orgs/{org}/teams/{team_slug}/memberships/{username}", org=org, team_slug=slug,
                            username=user)
            data = await self._get_unless_missing(path)
            if isinstance(data, Mapping) and data.get("state") == "active":
                found.append(f"{org}/{slug}")
        return tuple(found)

    async def label_event(self, repository: str, number: int) -> LabelEvent | None:
        owner, name = repository.split("/")
        assert self._config.trigger_label is not None
        path = api_path("/repos/{owner}/{repo}/issues/{number}/events", owner=owner, repo=name, number=number)
        latest: LabelEvent | None = None
        async for page in pages(self._client, path, {"per_page": 100}):
            found = latest_label_event(page, self._config.trigger_label)
            if found is not None and (latest is None or found.id > latest.id):
                latest = found
        return latest

    async def comment(self, repository: str, comment_id: int) -> dict[str, Any]:
        owner, name = repository.split("/")
        data = await self._get_unless_missing(api_path("/repos/{owner}/{repo}/issues/comments/{comment_id}",
                                                       owner=owner, repo=name, comment_id=comment_id))
        if data is None:
            raise NotConfirmed(f"comment {comment_id} on {repository} no longer exists")
        if not isinstance(data, dict):
            raise NotConfirmed(f"comment {comment_id}: the answer is not a comment")
        return data

    async def short_sha_facts(self, repository: str, number: int, approval: Approval) -> Approval:
        """`approval` (whose command names a short SHA) with what tells whether that SHA names only
        the head of pull request `number`: the pull request's commits it matches, the head rewrites
        of its timeline, and whether both lists were read in full."""
        assert approval.sha is not None
        sha = approval.sha
        owner, name = repository.split("/")
        values = {"owner": owner, "repo": name}
        commits, listed = await read_list(self._client, api_path(
            "/repos/{owner}/{repo}/pulls/{pull_number}/commits", pull_number=number, **values),
            {"per_page": 100}, max_pages=3)
        events, whole = await read_list(self._client, api_path(
            "/repos/{owner}/{repo}/issues/{issue_number}/timeline", issue_number=number, **values),
            {"per_page": 100})
        matching = tuple(str(c["sha"]) for c in commits
                         if isinstance(c, Mapping) and str(c.get("sha") or "").startswith(sha))
        rewrites = tuple(HeadRewrite(str(e["event"]), str(e.get("created_at") or ""))
                         for e in events if isinstance(e, Mapping) and e.get("event") in HEAD_REWRITES)
        return replace(approval, matching=matching, rewrites=rewrites,
                       complete=listed and whole and len(commits) < MAX_PULL_COMMITS)

    async def push_actor(self, repository: str, branch: str, sha: str) -> str | None:
        """Who pushed `sha` to `branch`, from the repository's activity; NotConfirmed if nobody did."""
        owner, name = repository.split("/")
        path = api_path("/repos/{owner}/{repo}/activity", owner=owner, repo=name)
        async for page in pages(self._client, path, {"ref": f"refs/heads/{branch}", "per_page": 100},
                                max_pages=3):
            for item in page:
                if isinstance(item, Mapping) and item.get("after") == sha:
                    actor = item.get("actor")
                    return str(actor["login"]) if isinstance(actor, Mapping) and actor.get("login") else None
        raise NotConfirmed(f"no push of {sha[:12]} to {branch} in {repository}'s activity")

    async def confirm(self, trigger: Trigger, *, team_names: tuple[tuple[str, str], ...],
                      bound_sha_of: Any, label_event: LabelEvent | None = None) -> Confirmed:
        """The facts behind `trigger`; `bound_sha_of(label_event)` says which SHA a label event
        approved before (None: it is new); `label_event` saves looking it up again.
        Raises NotConfirmed, or a GitHubError to retry later."""
        repository = trigger.repository
        if trigger.kind == "push":
            assert trigger.sha is not None and trigger.branch is not None
            actor = trigger.actor
            if trigger.activity_id is None:
                # A webhook's pusher is a hint: the activity API says who pushed.
                actor = await self.push_actor(repository, trigger.branch, trigger.sha)
            permission = await self.permission(repository, actor) if actor else None
            teams = await self.teams(actor, team_names) if actor and has_write(permission) else ()
            return Confirmed(Facts(trigger.sha, actor, permission, actor_is_bot=actor is None
                                   or actor.endswith("[bot]"), teams=teams))
        assert trigger.number is not None
        event: LabelEvent | None = None
        bot = False
        command: Command | None = None
        if trigger.kind == "comment":
            assert trigger.comment_id is not None
            comment = await self.comment(repository, trigger.comment_id)
            text = self._config.comment_command or ""
            issue_url = str(comment.get("issue_url") or "")
            if not issue_url.endswith(f"/issues/{trigger.number}"):
                raise NotConfirmed(f"comment {trigger.comment_id} is not on #{trigger.number}")
            command = parse_command(str(comment.get("body") or ""), text)
            if command is None or command.verb != "run":
                raise NotConfirmed(f"comment {trigger.comment_id} does not hold `{text}`")
            user = comment.get("user")
            bot = is_bot(user) or bool(comment.get("performed_via_github_app"))
            actor = str(user["login"]) if isinstance(user, Mapping) and user.get("login") else None
            given = comment.get("created_at")
        else:
            event = label_event or await self.label_event(repository, trigger.number)
            actor = event.actor if event else None
            bot = bool(event and event.bot)
            given = event.created_at if event else None
        pull = await self.pull(repository, trigger.number)
        head = pull.get("head") or {}
        head_sha = str(head.get("sha") or "")
        labels = {str(item.get("name")) for item in pull.get("labels") or [] if isinstance(item, Mapping)}
        base_repo = (pull.get("base") or {}).get("repo") or {}
        permission = await self.permission(repository, actor) if actor and not bot else None
        # Teams matter only to someone whose trigger can run: save the requests for the others.
        teams = await self.teams(actor, team_names) if actor and has_write(permission) else ()
        updated = pull.get("updated_at")
        approval = Approval(str(given) if given else None, str(updated) if updated else None,
                            sha=command.sha if command else None,
                            sha_error=command.error if command else None)
        if approval.sha is not None and len(approval.sha) < 40 and head_sha.startswith(approval.sha) \
                and has_write(permission):
            approval = await self.short_sha_facts(repository, trigger.number, approval)
        facts = Facts(head_sha, actor, permission, actor_is_bot=bot, fork=is_fork(pull),
                      open=pull.get("state") == "open",
                      bound_sha=bound_sha_of(event) if event is not None else None, teams=teams,
                      approval=approval)
        clone_url = base_repo.get("clone_url") if isinstance(base_repo, Mapping) else None
        return Confirmed(facts, event, self._config.trigger_label in labels,
                         str(clone_url) if clone_url else None)

    async def clone_url(self, repository: str) -> str:
        """The repository's `clone_url` (asked once per agent: it changes only with a rename)."""
        if repository not in self._clone_urls:
            owner, name = repository.split("/")
            data = await self._client.get(api_path("/repos/{owner}/{repo}", owner=owner, repo=name))
            url = data.get("clone_url") if isinstance(data, Mapping) else None
            if not url:
                raise NotConfirmed(f"{repository}: the repository has no clone_url")
            self._clone_urls[repository] = str(url)
        return self._clone_urls[repository]
