"""Which repository of the App's GitHub a clone URL names (pure).

The GitHub App's credentials open repositories on its own GitHub only: a URL names one of them
when its host is that GitHub's web host (github.com for api.github.com, a GitHub Enterprise
Server's own host otherwise) and its path is `OWNER/NAME`. The Buildkite source uses this to
confirm a pull request build, and the API source to decide whether a checkout gets the App's
token (never sent to another host).
"""

from __future__ import annotations

import re
import urllib.parse

_SEGMENT = re.compile(r"[A-Za-z0-9._-]{1,100}")
_SCP_LIKE = re.compile(r"(?:[^@/]+@)?(?P<host>[^:/]+):(?P<path>[^/].*)")


def github_web_host(api_url: str) -> str:
    """The host whose repositories `api_url` serves: github.com for api.github.com, else the
    GitHub Enterprise Server's own host (its API is https://HOST/api/v3)."""
    host = (urllib.parse.urlsplit(api_url).hostname or "").lower()
    return "github.com" if host == "api.github.com" else host


def github_repository(url: str, web_host: str) -> str | None:
    """`OWNER/NAME` when the clone URL `url` names a repository on `web_host`, else None."""
    text = url.strip()
    if "://" in text:
        parts = urllib.parse.urlsplit(text)
        host, path = (parts.hostname or ""), parts.path
    else:
        match = _SCP_LIKE.fullmatch(text)
        if match is None:
            return None
        host, path = match["host"], match["path"]
    if host.lower() != web_host:
        return None
    segments = path.strip("/").removesuffix(".git").split("/")
    if len(segments) != 2 or not all(_SEGMENT.fullmatch(s) and s.strip(".") for s in segments):
        return None
    return "/".join(segments)
