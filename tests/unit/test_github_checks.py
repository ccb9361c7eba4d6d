"""Check-run text: GitHub's byte limits, Markdown that a job's output cannot break, no secrets."""

from __future__ import annotations

import pytest

from runner.job import JobState, OutputFile
from runner.sources import Ended
from runner.sources.github.checks import (
    MAX_DESCRIPTION_CHARS,
    MAX_OUTPUT_BYTES,
    LogTail,
    clip_utf8,
    code,
    code_block,
    completion_of,
    create_body,
    log_text,
    outputs_sections,
    readable,
    status_body,
    status_state,
    summary,
    tail_utf8,
    update_body,
)


def test_clipping_counts_bytes_and_never_splits_a_character() -> None:
    text = "é" * 40_000                                  # 80,000 bytes
    clipped = clip_utf8(text, MAX_OUTPUT_BYTES)
    assert len(clipped.encode()) <= MAX_OUTPUT_BYTES and clipped.endswith("…(cut)")
    assert clip_utf8("short", 10) == "short"
    tail = tail_utf8("aé€😀".encode() * 10, 7)
    assert tail.decode("utf-8")                          # starts on a character boundary
    assert len(tail) <= 7


def test_the_log_tail_is_a_code_block_its_content_cannot_close() -> None:
    block = code_block("````\n# not a heading\n<img src=x>\n", 1000, cut_note="")
    fence = block.splitlines()[0]
    assert fence == "`````" and block.endswith("`````\n")
    assert "\n````\n" in block                            # the log's own fence is only text


def test_a_long_log_keeps_its_end_within_githubs_limit_with_a_note() -> None:
    tail = LogTail(limit=200_000)
    lines = b"".join(b"line %06d \xe2\x82\xac\n" % i for i in range(20_000))   # ~300 kB with multibyte
    tail.feed(0, lines)
    text = log_text(tail, full_log="https://ci.example.org/jobs/1")
    assert len(text.encode()) <= MAX_OUTPUT_BYTES
    assert text.startswith("*Only the end of the log is shown (the whole log: https://ci.example.org/jobs/1).*")
    assert "line 019999 €" in text and "line 000000" not in text


def test_terminal_output_is_made_readable() -> None:
    assert readable("\x1b[1;31mred\x1b[0m plain\x1b]0;title\x07\n") == "red plain\n"
    assert readable("progress 10%\rprogress 100%\nnext\r\n") == "progress 100%\nnext\n"
    assert readable("bell\x07 nul\x00 tab\t") == "bell nul tab\t"


def test_the_tail_skips_bytes_it_was_given_before_and_follows_a_restarted_file() -> None:
    tail = LogTail()
    tail.feed(0, b"hello ")
    tail.feed(0, b"hello world\n")                       # a resumed reader sends from an older offset
    tail.feed(12, b"more\n")
    assert tail.text() == "hello world\nmore\n" and tail.end == 17
    tail.feed(0, b"")                                    # truncated: the file starts again
    tail.feed(0, b"again\n")
    assert tail.text().endswith("--- the log file started again ---\nagain\n")


def test_secrets_are_redacted_even_when_split_between_pieces() -> None:
    tail = LogTail(["ghs_0123456789abcdef"])
    tail.feed(0, b"token=ghs_01234")
    tail.feed(15, b"56789abcdef done\n")
    tail.close()
    assert tail.text() == "token=[REDACTED] done\n"


def test_a_resumed_tail_is_seeded_from_the_file() -> None:
    tail = LogTail(limit=10)
    tail.seed(b"0123456789abcdef", 16)
    tail.feed(16, b"XY")
    assert tail.text() == "89abcdefXY" and tail.cut


@pytest.mark.parametrize("ended, conclusion, title", [
    (Ended(JobState.succeeded, 0, None), "success", "Succeeded"),
    (Ended(JobState.failed, 3, None), "failure", "Failed with exit status 3"),
    (Ended(JobState.cancelled, None, "cancelled"), "cancelled", "Cancelled"),
    (Ended(JobState.timed_out, None, None), "timed_out", "Reached its walltime"),
    (Ended(JobState.expired, None, "waited 1h in Slurm's queue"), "timed_out",
     "Expired in the queue: the cluster was busy, the job did not run"),
    (Ended(JobState.denied, None, None), "failure", "Denied by the site's policy"),
    (Ended(JobState.infra_failed, None, "git clone failed"), "failure", "Could not run"),
])
def test_how_a_job_ended_becomes_a_conclusion(ended: Ended, conclusion: str, title: str) -> None:
    completion = completion_of(ended)
    assert (completion.conclusion, completion.title) == (conclusion, title)


def test_commit_statuses_say_the_outcome_in_at_most_140_characters() -> None:
    body = status_body(context="hpc-runner/unit", state=status_state("completed", "failure"),
                       description="Failed with exit status 1; " + "x" * 300, target_url=None)
    assert body["state"] == "failure" and len(body["description"]) == MAX_DESCRIPTION_CHARS
    assert status_state("in_progress", None) == "pending"
    assert status_state("completed", "cancelled") == "error"
    assert status_state("completed", "action_required") == "pending"


def test_request_bodies_open_with_a_cancel_button_and_close_without_it() -> None:
    opened = create_body(name="hpc-runner/unit", head_sha="a" * 40, external_id="k/unit", title="Queued",
                         summary="s", details_url="https://ci.example.org/jobs/x")
    assert opened["status"] == "queued" and opened["actions"][0]["identifier"] == "cancel"
    assert opened["details_url"] == "https://ci.example.org/jobs/x"
    done = update_body(title="Succeeded", summary="s", text="t", conclusion="success")
    assert done["status"] == "completed" and done["actions"] == [] and done["completed_at"].endswith("Z")
    denied = create_body(name="hpc-runner/unit", head_sha="a" * 40, external_id="k/unit", title="Denied",
                         summary="s", details_url=None, conclusion="failure")
    assert "actions" not in denied and denied["status"] == "completed"


def test_values_chosen_by_others_are_code_spans() -> None:
    assert code("main") == "`main`"
    assert code("a`b") == "``a`b``"
    assert code("`x`") == "`` `x` ``"
    assert code("two\nlines") == "`two lines`"


def test_outputs_are_a_table_of_path_size_and_digest_cut_after_the_row_limit() -> None:
    outputs = [OutputFile(f"results/run{i:03}.nc", f"{i:064x}", 1024 * i + 5) for i in range(25)]
    text = summary(outputs_sections(outputs, rows=20))
    assert text.startswith("**Outputs (25, ")
    assert "| Path | Size | SHA-256 |" in text
    assert f"| `results/run001.nc` | 1.0 KiB (1,029 bytes) | `{1:064x}` |" in text
    assert "| `results/run000.nc` | 5 bytes |" in text
    assert "run019.nc" in text and "run020.nc" not in text
    assert text.rstrip().endswith("and 5 more")


def test_an_outputs_path_cannot_break_the_table_or_the_summarys_limit() -> None:
    odd = OutputFile("a|b`c/" + "d" * 70_000 + "/end.png", "e" * 64, 1)
    text = summary(outputs_sections([odd] * 20))
    assert len(text.encode()) < MAX_OUTPUT_BYTES
    row = next(line for line in text.splitlines() if "end.png" in line)
    # Three cells, whatever the path holds: its pipe escaped, its middle given up.
    assert row.replace("\\|", "").count("|") == 4
    assert "a\\|b`c/ddd" in row and "…" in row and row.count("d") < 300


def test_left_out_outputs_are_listed_with_why() -> None:
    left_out = [("big.nc", "would pass max_output_bytes"), ("link.png", "a symbolic link")]
    text = summary(outputs_sections([], left_out))
    assert text == ("**Outputs left out:**\n- `big.nc`: would pass max_output_bytes\n"
                    "- `link.png`: a symbolic link\n")
    assert summary(outputs_sections([])) == "\n"
