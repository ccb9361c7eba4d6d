"""The GitHub emulator plus what makes a pull request run: who did what, and code to clone.

`ActivityGitHub` is `GitHubEmulator` (every request still checked against GitHub's OpenAPI
description) with the endpoints a CI source polls and confirms through:

* `GET /repos/{o}/{r}/issues/{n}/events`: label events with the person who applied the label
  (`label(..., by=...)`, `unlabel(..., by=...)`);
* `GET /repos/{o}/{r}/issues/{n}/timeline`: those label events, the comments, the pull request's
  commits (`committed`, which carry no time of their own but the commit's dates) and its force
  pushes (`force_push_pull_request`: `head_ref_force_pushed`, served only here because the
  description's schema for the issue events answer has no such event); and
  `GET /repos/{o}/{r}/pulls/{n}/commits`, the commits of a pull request, oldest first. A comment
  on a pull request moves its `updated_at`, as GitHub's do;
* `GET /repos/{o}/{r}/issues/comments` (the repository's comments, `sort`/`direction`/`since`) and
  `GET /repos/{o}/{r}/issues/comments/{id}`; comments on pull requests link to `/pull/N` as GitHub's do;
* `GET /repos/{o}/{r}/activity`: every push (`push(..., author=...)` is the pusher), newest first,
  with GitHub's `before`/`after` cursors;
* real git: `use_commit` and `point_pull_request` make the emulator's commits the SHAs of a real
  repository, and `clone_urls` says what `clone_url` the repositories advertise (a bare repository
  on disk), so a source can clone what it was told to run;
* `requested_action_payload`: the `check_run` `requested_action` webhook GitHub sends when someone
  clicks a check run's button, built from the official example.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from .github_api import Commit, GitHubEmulator, PullRequest, RecordedRequest, _Answer

Result = tuple[int, Any, dict[str, str]]


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(int(epoch), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ActivityGitHub(GitHubEmulator):
    def __init__(self, **options: Any) -> None:
        self.label_events: dict[tuple[str, int], list[dict[str, Any]]] = {}
        self.force_pushes: dict[tuple[str, int], list[dict[str, Any]]] = {}
        self.activities: dict[str, list[dict[str, Any]]] = {}
        self.clone_urls: dict[str, str] = {}
        self._event_ids = itertools.count(5_000_000)
        self._activity_ids = itertools.count(9_000_000)
        super().__init__(**options)

    # ---------------------------------------------------------------------------- state

    def push(self, full_name: str, branch: str, files: Mapping[str, str | bytes | None] | None = None, *,
             message: str = "Change", author: str = "alice") -> str:
        before = self.repository(full_name).branches.get(branch) if full_name.lower() in self.repos else None
        sha = super().push(full_name, branch, files, message=message, author=author)
        self._record_push(full_name, branch, before, sha, author)
        return sha

    def _record_push(self, full_name: str, branch: str, before: str | None, after: str, actor: str) -> None:
        self.activities.setdefault(full_name.lower(), []).append({
            "id": next(self._activity_ids), "node_id": f"ACT_{after[:10]}", "before": before or "0" * 40,
            "after": after, "ref": f"refs/heads/{branch}", "timestamp": _iso(self.clock()),
            "activity_type": "push" if before else "branch_creation", "actor": self._simple_user(actor)})

    def use_commit(self, full_name: str, branch: str, sha: str, files: Mapping[str, str | bytes], *,
                   author: str = "alice") -> str:
        """A commit with a real SHA (of a git repository the test made) as the new head of `branch`."""
        repo = self.repository(full_name)
        before = repo.branches.get(branch)
        tree = {k: v.encode() if isinstance(v, str) else bytes(v) for k, v in files.items()}
        self.commits[sha] = Commit(sha, tree, [before] if before else [], "Change", author, self.clock())
        repo.branches[branch] = sha
        self._record_push(full_name, branch, before, sha, author)
        return sha

    def point_pull_request(self, full_name: str, number: int, sha: str, files: Mapping[str, str | bytes], *,
                           author: str | None = None) -> None:
        """The pull request's head becomes a real commit (pushed to its head branch)."""
        pr = self.pull_request(full_name, number)
        self.use_commit(pr.head_repo, pr.head_ref, sha, files, author=author or pr.author)
        pr.head_sha = sha
        pr.updated = self.clock()

    def force_push_pull_request(self, full_name: str, number: int, files: Mapping[str, str | bytes], *,
                                sha: str | None = None, by: str | None = None) -> str:
        """The pull request's head becomes a new commit on its base (not a descendant of the old
        head), as after `git push --force`; `sha` chooses its SHA. Returns the SHA."""
        pr = self.pull_request(full_name, number)
        base = self.repository(full_name).branches[pr.base_ref]
        self.repository(pr.head_repo).branches[pr.head_ref] = base      # the old head is gone from it
        if sha is None:
            new = self.push(pr.head_repo, pr.head_ref, files, author=pr.author)
        else:
            tree = {**self.commits[base].files, **files}
            new = self.use_commit(pr.head_repo, pr.head_ref, sha, tree, author=pr.author)
        pr.head_sha = new
        pr.updated = self.clock()
        event_id = next(self._event_ids)
        self.force_pushes.setdefault((full_name.lower(), number), []).append({
            "id": event_id, "node_id": f"HRFPE_{event_id}",
            "url": f"https://api.github.com/repos/{full_name}/issues/events/{event_id}",
            "actor": self._simple_user(by or pr.author), "event": "head_ref_force_pushed", "commit_id": new,
            "commit_url": f"https://api.github.com/repos/{pr.head_repo}/commits/{new}",
            "created_at": _iso(self.clock()), "performed_via_github_app": None})
        return new

    def pull_commits(self, full_name: str, number: int) -> list[str]:
        """The commits of a pull request (reachable from its head, not from its base), oldest first."""
        pr = self.pull_request(full_name, number)
        base: set[str] = set()
        todo = [self.repository(full_name).branches[pr.base_ref]]
        while todo:
            sha = todo.pop()
            if sha in self.commits and sha not in base:
                base.add(sha)
                todo += self.commits[sha].parents
        found: list[str] = []
        todo = [pr.head_sha]
        while todo:
            sha = todo.pop()
            if sha in self.commits and sha not in base and sha not in found:
                found.append(sha)
                todo += self.commits[sha].parents
        return sorted(found, key=lambda sha: (self.commits[sha].date, -found.index(sha)))

    def label(self, full_name: str, number: int, name: str, *, by: str = "alice") -> None:
        pr = self.pull_request(full_name, number)
        if name in pr.labels:
            return
        super().label(full_name, number, name)
        self._label_event(full_name, number, name, by, "labeled")

    def unlabel(self, full_name: str, number: int, name: str, *, by: str = "alice") -> None:
        super().unlabel(full_name, number, name)
        self._label_event(full_name, number, name, by, "unlabeled")
        self.pull_request(full_name, number).updated = self.clock()

    def _label_event(self, full_name: str, number: int, name: str, actor: str, event: str) -> None:
        event_id = next(self._event_ids)
        self.label_events.setdefault((full_name.lower(), number), []).append({
            "id": event_id, "node_id": f"LE_{event_id}",
            "url": f"https://api.github.com/repos/{full_name}/issues/events/{event_id}",
            "actor": self._simple_user(actor), "event": event, "commit_id": None, "commit_url": None,
            "created_at": _iso(self.clock()), "performed_via_github_app": None,
            "label": {"name": name, "color": "ededed"}})

    def add_pull_request(self, full_name: str, **options: Any) -> PullRequest:
        labels = list(options.pop("labels", ()))
        labelled_by = options.pop("labelled_by", "alice")
        pr = super().add_pull_request(full_name, **options)
        for name in labels:
            self.label(full_name, pr.number, name, by=labelled_by)
        return pr

    def _simple_user(self, login: str) -> dict[str, Any]:
        user_type = "Bot" if login.endswith("[bot]") else "User"
        return self._user(login, user_type)

    # ---------------------------------------------------------------------------- answers

    def _repo_json(self, repo: Any) -> dict[str, Any]:
        data = super()._repo_json(repo)
        url = self.clone_urls.get(repo.full_name.lower())
        if url is not None:
            data["clone_url"] = url
        return data

    def _store_comment(self, full_name: str, number: int, body: str, login: str,
                       user_type: str) -> dict[str, Any]:
        comment = super()._store_comment(full_name, number, body, login, user_type)
        pr = self.pulls.get((full_name.lower(), number))
        if pr is not None:
            comment["html_url"] = f"https://github.com/{full_name}/pull/{number}#issuecomment-{comment['id']}"
            pr.updated = self.clock()
        return comment

    async def _op_issues__list_events(self, request: web.Request, record: RecordedRequest,
                                      params: Mapping[str, Any]) -> Result:
        repo = self._repo_for(record, params)
        events = self.label_events.get((repo.full_name.lower(), params["issue_number"]), [])
        return self._page(request, record, copy.deepcopy(events))

    async def _op_issues__list_events_for_timeline(self, request: web.Request, record: RecordedRequest,
                                                   params: Mapping[str, Any]) -> Result:
        repo = self._repo_for(record, params)
        key = (repo.full_name.lower(), params["issue_number"])
        items: list[tuple[str, dict[str, Any]]] = []
        for event in self.label_events.get(key, []) + self.force_pushes.get(key, []):
            items.append((event["created_at"], copy.deepcopy(event)))
        for comment in self.issue_comments.get(key, []):
            items.append((comment["created_at"], copy.deepcopy(comment) | {"event": "commented",
                                                                              "actor": comment["user"]}))
        if key in self.pulls:
            for sha in self.pull_commits(repo.full_name, params["issue_number"]):
                items.append((_iso(self.commits[sha].date), self._committed_event(repo.full_name, sha)))
        items.sort(key=lambda item: item[0])          # stable: in the order they happened
        excluded = set(filter(None, dict(record.query).get("exclude", "").split(",")))
        return self._page(request, record, [item for _, item in items if item["event"] not in excluded])

    def _committed_event(self, full_name: str, sha: str) -> dict[str, Any]:
        commit = self.commits[sha]
        url = f"https://api.github.com/repos/{full_name}/git/commits/{sha}"
        person = {"name": commit.author, "email": f"{commit.author}@example.org", "date": _iso(commit.date)}
        return {"event": "committed", "sha": sha, "node_id": f"C_{sha[:16]}", "url": url,
                "html_url": f"https://github.com/{full_name}/commit/{sha}", "author": dict(person),
                "committer": dict(person), "message": commit.message,
                "tree": {"sha": hashlib.sha1(sha.encode()).hexdigest(),
                         "url": f"https://api.github.com/repos/{full_name}/git/trees/{sha}"},
                "parents": [{"sha": parent, "html_url": f"https://github.com/{full_name}/commit/{parent}",
                             "url": f"https://api.github.com/repos/{full_name}/git/commits/{parent}"}
                            for parent in commit.parents],
                "verification": {"verified": False, "reason": "unsigned", "signature": None, "payload": None,
                                 "verified_at": None}}

    async def _op_pulls__list_commits(self, request: web.Request, record: RecordedRequest,
                                      params: Mapping[str, Any]) -> Result:
        repo = self._repo_for(record, params)
        if (repo.full_name.lower(), params["pull_number"]) not in self.pulls:
            raise _Answer(404, "Not Found")
        shas = self.pull_commits(repo.full_name, params["pull_number"])[:250]   # GitHub lists at most 250
        return self._page(request, record, [self._commit_json(repo, sha) for sha in shas])

    async def _op_issues__list_comments_for_repo(self, request: web.Request, record: RecordedRequest,
                                                 params: Mapping[str, Any]) -> Result:
        repo = self._repo_for(record, params)
        query = dict(record.query)
        comments = [c for (name, _), items in self.issue_comments.items() if name == repo.full_name.lower()
                    for c in items]
        since = query.get("since")
        if since:
            comments = [c for c in comments if c["updated_at"] >= since.replace("+00:00", "Z")]
        key = "updated_at" if query.get("sort") == "updated" else "created_at"
        # GitHub's default order is ascending by id; direction applies with sort.
        descending = "sort" in query and query.get("direction", "desc") == "desc"
        comments.sort(key=lambda c: (c[key], c["id"]), reverse=descending)
        return self._page(request, record, copy.deepcopy(comments))

    async def _op_issues__get_comment(self, request: web.Request, record: RecordedRequest,
                                      params: Mapping[str, Any]) -> Result:
        repo = self._repo_for(record, params)
        for (name, _), items in self.issue_comments.items():
            if name == repo.full_name.lower():
                for comment in items:
                    if comment["id"] == params["comment_id"]:
                        return 200, copy.deepcopy(comment), {}
        raise _Answer(404, "Not Found")

    async def _op_repos__list_activities(self, request: web.Request, record: RecordedRequest,
                                         params: Mapping[str, Any]) -> Result:
        repo = self._repo_for(record, params)
        query = dict(record.query)
        items = list(self.activities.get(repo.full_name.lower(), []))
        ref = query.get("ref")
        if ref:
            wanted = ref if ref.startswith("refs/") else f"refs/heads/{ref}"
            items = [a for a in items if a["ref"] == wanted]
        if query.get("activity_type"):
            items = [a for a in items if a["activity_type"] == query["activity_type"]]
        if query.get("actor"):
            items = [a for a in items if a["actor"]["login"].lower() == query["actor"].lower()]
        items.sort(key=lambda a: a["id"], reverse=query.get("direction", "desc") == "desc")
        if query.get("after"):
            cursor = int(query["after"])
            items = [a for a in items if (a["id"] < cursor if query.get("direction", "desc") == "desc"
                                          else a["id"] > cursor)]
        per_page = min(int(query.get("per_page", 30)), 100)
        page, rest = items[:per_page], items[per_page:]
        headers: dict[str, str] = {}
        if rest:
            following = {k: v for k, v in query.items() if k != "after"} | {"after": str(page[-1]["id"])}
            link = f"{self.url}{request.path.removeprefix(self.prefix)}?" + "&".join(
                f"{k}={v}" for k, v in following.items())
            headers["Link"] = f'<{link}>; rel="next"'
        return 200, copy.deepcopy(page), headers

    # ---------------------------------------------------------------------------- webhooks

    def requested_action_payload(self, full_name: str, check_run_id: int, *, sender: str,
                                 identifier: str = "cancel") -> dict[str, Any]:
        """GitHub's `check_run` `requested_action` delivery for a click on a check run's button."""
        from .github_webhooks import examples

        example = next(e for e in examples("check_run") if e.payload.get("action") == "requested_action")
        payload = copy.deepcopy(example.payload)
        run = self.check_run_records[check_run_id]
        repo = self.repository(full_name)
        payload["check_run"].update({"id": check_run_id, "name": run["name"], "head_sha": run["head_sha"],
                                     "external_id": run["external_id"], "status": run["status"]})
        payload["requested_action"] = {"identifier": identifier}
        payload["repository"].update({"id": repo.id, "name": repo.name, "full_name": repo.full_name})
        payload["sender"].update({"login": sender, "type": "User"})
        payload["installation"] = {"id": repo.installation, "node_id": "MDIzOkludGVncmF0aW9uSW5zdGFsbGF0aW9u"}
        return payload
