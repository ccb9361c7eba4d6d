"""The hub's outbound hooks as its config names them: the top-level `[[hooks]]` tables.

```toml
[[hooks]]
url = "https://ci.example.org/hpc-runner"          # https:// (plain http only to localhost)
secret_file = "/etc/hpc-runner/hook-secret"        # 0600, the service account's
states = ["succeeded", "failed"]                   # optional: default every state
```

Read as strictly as the rest of a config: unknown keys, wrong types and bad values are errors that
name the file, the line and the field. What a hook is sent is `runner.gateway.hooks`'.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from runner.fields import Table
from runner.job import JobState
from runner.urls import config_https_url

STATES = tuple(state.value for state in JobState)


@dataclass(frozen=True)
class Hook:
    """One `[[hooks]]` table; its `url` names it (two tables may not share one)."""

    url: str
    secret_file: Path
    states: frozenset[str] = frozenset(STATES)

    def fires_on(self, state: str) -> bool:
        return state in self.states


def parse_hook_tables(root: Table, key: str = "hooks") -> tuple[Hook, ...]:
    """The `[[key]]` array of tables under `root`; errors name the file, the line and the field."""
    hooks: list[Hook] = []
    for table in root.tables(key):
        url = table.converted("url", config_https_url)
        secret_file = table.converted("secret_file", _absolute_path)
        states = table.string_list("states", None, pattern=r"[a-z_]{1,32}", what="a job state")
        table.finish()
        if states is not None:
            unknown = [state for state in states if state not in STATES]
            if unknown:
                raise table.error("states", f"unknown state {unknown[0]!r}: the states are "
                                            f"{', '.join(STATES)}")
            if not states:
                raise table.error("states", "must name at least one state (leave it out for every state)")
        if any(hook.url == url for hook in hooks):
            raise table.error("url", f"{url!r} is already another [[{key}]] table's")
        hooks.append(Hook(url, secret_file, frozenset(STATES if states is None else states)))
    return tuple(hooks)


def _absolute_path(value: object) -> Path:
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty string")
    path = Path(value)
    if not path.is_absolute():
        raise ValueError(f"{value!r} must be an absolute path")
    return path
