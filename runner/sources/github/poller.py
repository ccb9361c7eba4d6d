"""Poll mode: the agent alone asks GitHub, every `poll_interval`, what happened in its repositories.

Per repository and round, at most three list requests, each conditional (`If-None-Match` with the
last `ETag`), so an unchanged repository costs three `304`s, which GitHub does not count against
the rate limit:

* `GET /repos/{o}/{r}/pulls?state=open&sort=updated&direction=desc` (with `trigger_label`): open
  pull requests carrying the label; one whose head SHA or `updated_at` changed since it was last
  seen is looked at again (a new push, or the label applied again);
* `GET /repos/{o}/{r}/issues/comments?sort=created&direction=desc` (with `comment_command`):
  comments newer than the newest one already seen (ids only grow, so an edit is never new);
* `GET /repos/{o}/{r}/activity` (with `push_branches`): pushes, merges and branch creations newer
  than the newest activity already seen.

On its first round a repository's comment and activity lists only set the starting point: nothing
said before the agent was configured runs. What `poll` returns is handled in order, and each
item moves its cursor only once handled (`Observed.mark`), so an item whose confirmation failed
(GitHub unavailable) comes back in the next round.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from runner.config import GithubConfig
from runner.sources.github.client import GitHubClient, api_path
from runner.sources.github.confirm import pages
from runner.sources.github.state import GithubState
from runner.sources.github.translate import (
    CancelRequest,
    Trigger,
    branch_pushes,
    command_comments,
    labelled_pulls,
    newest_id,
)

MAX_PAGES = 10
RECHECK_SECONDS = 60.0
# The new items of a list read past its cursor: each with the id the cursor moves to once handled.
Picked = list[tuple[Trigger | CancelRequest, int | None]]


@dataclass(frozen=True)
class Observed:
    """Something the poll found: a trigger, a cancel request, or (item None) only a cursor to move."""

    item: Trigger | CancelRequest | None
    mark: Callable[[], None]


class Poller:
    def __init__(self, client: GitHubClient, state: GithubState, config: GithubConfig, *,
                 clock: Callable[[], float] = time.time) -> None:
        self._client = client
        self._state = state
        self._config = config
        self._clock = clock

    async def poll(self, repository: str) -> list[Observed]:
        found: list[Observed] = []
        if self._config.trigger_label is not None:
            found += await self._pulls(repository, self._config.trigger_label)
        if self._config.comment_command is not None:
            found += await self._comments(repository, self._config.comment_command)
        if self._config.push_branches:
            found += await self._pushes(repository)
        return found

    def _path(self, template: str, repository: str) -> str:
        owner, name = repository.split("/")
        return api_path(template, owner=owner, repo=name)

    async def _pulls(self, repository: str, label: str) -> list[Observed]:
        path = self._path("/repos/{owner}/{repo}/pulls", repository)
        params: dict[str, str | int] = {"state": "open", "sort": "updated", "direction": "desc",
                                        "per_page": 100}
        items: list[Any] = []
        async for page in pages(self._client, path, params, max_pages=MAX_PAGES):
            items += page
        found = []
        now = self._clock()
        for pull in labelled_pulls(items, label):
            key = f"pull:{pull.number}"
            if not _changed(self._state.cursor(repository, key), pull.marker):
                continue
            found.append(Observed(
                Trigger("label", repository, number=pull.number, sha=pull.head_sha),
                _setter(self._state, repository, key, f"{pull.marker}|{now:.0f}")))
        return found

    async def _comments(self, repository: str, command: str) -> list[Observed]:
        path = self._path("/repos/{owner}/{repo}/issues/comments", repository)
        params: dict[str, str | int] = {"sort": "created", "direction": "desc", "per_page": 100}

        def commands(items: list[Any], after: int) -> Picked:
            return [(item, item.comment_id)
                    for item in command_comments(repository, items, after_id=after, command=command)]

        return await self._past_cursor(repository, "comments", path, params, commands)

    async def _pushes(self, repository: str) -> list[Observed]:
        path = self._path("/repos/{owner}/{repo}/activity", repository)

        def pushes(items: list[Any], after: int) -> Picked:
            return [(item, item.activity_id)
                    for item in branch_pushes(repository, items, after_id=after,
                                              branches=self._config.push_branches)]

        return await self._past_cursor(repository, "activity", path, {"per_page": 100}, pushes)

    async def _past_cursor(self, repository: str, cursor: str, path: str, params: dict[str, str | int],
                           new: Callable[[list[Any], int], Picked]) -> list[Observed]:
        """What a list GitHub gives newest first (comments, activity) holds past the id `cursor` names:
        `new(items, after)` picks the triggers, each with the id the cursor moves to once it is handled.
        A repository's first round only sets the starting point."""
        known = self._state.cursor(repository, cursor)
        after = int(known) if known is not None else None
        items: list[Any] = []
        async for page in pages(self._client, path, params, max_pages=MAX_PAGES):
            items += page
            # Newest first: once a page reaches what was seen, the next pages hold nothing new.
            if after is None or any(isinstance(i, dict) and isinstance(i.get("id"), int) and i["id"] <= after
                                    for i in page):
                break
        newest = newest_id(items, after or 0)
        if after is None:
            return [Observed(None, _setter(self._state, repository, cursor, str(newest)))]
        found = [Observed(item, _setter(self._state, repository, cursor, str(item_id)))
                 for item, item_id in new(items, after)]
        if newest > after:
            found.append(Observed(None, _setter(self._state, repository, cursor, str(newest))))
        return found


def _changed(seen: str | None, marker: str) -> bool:
    """Whether a pull request must be looked at again.

    `updated_at` has whole seconds: a label applied again in the second the agent last looked
    leaves it as it was. A pull request updated shortly before it was last seen is therefore
    looked at again until that time is `RECHECK_SECONDS` (clock skew included) in the past; the
    look costs conditional requests that GitHub answers `304`.
    """
    if seen is None:
        return True
    sha, _, rest = seen.partition("|")
    updated, _, seen_at = rest.rpartition("|")
    if f"{sha}|{updated}" != marker:
        return True
    try:
        stamp = datetime.fromisoformat(updated.replace("Z", "+00:00")).timestamp()
        return stamp >= float(seen_at) - RECHECK_SECONDS
    except ValueError:
        return True


def _setter(state: GithubState, repository: str, name: str, value: str) -> Callable[[], None]:
    def mark() -> None:
        state.set_cursor(repository, name, value)
    return mark
