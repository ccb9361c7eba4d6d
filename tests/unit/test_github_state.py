"""The GitHub source's own state file: private, durable, a trigger taken once."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from runner.sources.github.state import FILENAME, GithubState
from runner.store import StoreError


def test_a_trigger_is_taken_once_across_reopening(tmp_path: Path) -> None:
    with GithubState.open(tmp_path) as state:
        assert state.claim_trigger("comment:o/r:5", repository="O/R", kind="comment", sha="a" * 40,
                                   outcome="running", detail="{}")
        assert not state.claim_trigger("comment:o/r:5", repository="O/R", kind="comment", sha="b" * 40,
                                       outcome="running")
        state.put_run("comment:o/r:5/unit", trigger_key="comment:o/r:5", repository="O/R",
                      data={"job": "unit"})
        state.set_cursor("O/R", "comments", "41")
    with GithubState.open(tmp_path) as state:
        row = state.trigger("comment:o/r:5")
        assert row is not None and (row.sha, row.outcome) == ("a" * 40, "running")
        assert [r.external_id for r in state.open_runs()] == ["comment:o/r:5/unit"]
        assert state.cursor("o/r", "comments") == "41"
        state.close_run("comment:o/r:5/unit")
        assert state.open_runs() == [] and state.run_done("comment:o/r:5/unit")
    mode = stat.S_IMODE((tmp_path / FILENAME).stat().st_mode)
    assert mode == 0o600
    # SQLite's header says write-ahead logging (file format versions 2 and 2).
    assert (tmp_path / FILENAME).read_bytes()[18:20] == b"\x02\x02"


def test_a_state_file_others_can_read_is_refused(tmp_path: Path) -> None:
    (tmp_path / FILENAME).write_bytes(b"")
    (tmp_path / FILENAME).chmod(0o644)
    with pytest.raises(StoreError, match="open to group or others; it holds which GitHub triggers ran"):
        GithubState.open(tmp_path)
