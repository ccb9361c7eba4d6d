"""A log as the dashboard shows it: whole lines, numbered, coloured by classes, grouped."""

from __future__ import annotations

import pytest

from runner.web.logview import MAX_LINE_BYTES, LogLines, blocks_of, count_lines, lines_of
from runner.web.render import render_lines

LOG = (b"--- :hammer: build\n"
       b"\x1b[32mcompiling\x1b[0m <main.c> & co\n"
       b"+++ tests\n"
       b"\x1b[1;31mFAIL: test_a\n"          # red left on at the line's end...
       b"  assert 1 == 2\x1b[0m\n"          # ...goes on here, as in a terminal
       b"~~~ cleanup\n"
       b"^^^ +++\n"
       b"caf\xc3\xa9 \xff\xfe\n"
       b"no newline at the end")


def test_lines_are_numbered_grouped_escaped_and_coloured_by_class() -> None:
    lines = lines_of(LOG)

    assert [line.number for line in lines] == list(range(1, 10))
    assert [line.group for line in lines] == ["collapsed", None, "expanded", None, None, "quiet", None, None,
                                              None]
    assert lines[0].html == ":hammer: build"
    assert lines[1].html == '<span class="ansi32">compiling</span> &lt;main.c&gt; &amp; co'
    assert lines[3].html == '<span class="ansi1 ansi31">FAIL: test_a</span>'
    assert lines[4].html == '<span class="ansi1 ansi31">  assert 1 == 2</span>'
    assert lines[6].expands_previous
    assert lines[7].html == "caf\u00e9 \ufffd\ufffd"
    assert lines[8].html == "no newline at the end"
    assert "style=" not in "".join(line.html for line in lines)


@pytest.mark.parametrize("size", [1, 3, 7, 64, 4096])
def test_pieces_cut_anywhere_give_the_same_lines_each_once(size: int) -> None:
    reader = LogLines()
    lines = []
    for start in range(0, len(LOG), size):
        lines += reader.feed(LOG[start:start + size])
    lines += reader.flush()
    assert lines == lines_of(LOG)
    assert reader.consumed == len(LOG)


def test_a_line_not_ended_yet_waits_for_its_newline() -> None:
    reader = LogLines(first_number=120, offset=5000)
    assert reader.feed(b"half a li") == []
    [line] = reader.feed(b"ne\nnext")
    assert (line.number, line.offset, line.html) == (120, 5000, "half a line")
    assert reader.consumed == 5012 and reader.next_number == 121


def test_a_line_longer_than_the_limit_is_cut_and_counted_as_the_viewer_numbers_it() -> None:
    log = b"short\n" + b"x" * (2 * MAX_LINE_BYTES + 10) + b"\nafter\n" + b"y" * MAX_LINE_BYTES + b"\nend\n"
    lines = lines_of(log)
    assert [len(line.html) for line in lines][:4] == [5, MAX_LINE_BYTES, MAX_LINE_BYTES, 10]
    for size in (1000, 65536, 100_000, len(log)):
        assert count_lines(log[i:i + size] for i in range(0, len(log), size)) == len(lines)


def test_long_lines_side_by_side_and_at_a_pieces_edges_are_counted_as_the_viewer_numbers_them() -> None:
    long, longer = b"x" * MAX_LINE_BYTES, b"y" * (3 * MAX_LINE_BYTES - 1)
    log = b"a\n" + long + b"\n" + longer + b"\n" + long + b"\nb\n" + b"\n" * 3 + longer + b"\nend\n"
    lines = lines_of(log)
    assert len(lines) == 1 + 2 + 3 + 2 + 1 + 3 + 3 + 1
    for size in (2, 999, MAX_LINE_BYTES - 1, MAX_LINE_BYTES, MAX_LINE_BYTES + 2, 3 * MAX_LINE_BYTES,
                 len(log)):
        assert count_lines(log[i:i + size] for i in range(0, len(log), size)) == len(lines), size
    # Each of the long lines alone between a piece's first and last newline.
    for start in (1, 2 + len(long), 3 + len(long) + len(longer)):
        end = log.index(b"\n", start + 1) + 1
        pieces = [log[:start], log[start:end], log[end:]]
        assert count_lines(pieces) == len(lines), start


def test_blocks_nest_the_lines_after_a_group_line_in_its_group() -> None:
    blocks = blocks_of(lines_of(b"before\n--- one\na\nb\n+++ two\nc\n"))
    assert [(block.header.html if block.header else None, [line.html for line in block.lines])
            for block in blocks] == [(None, ["before"]), ("one", ["a", "b"]), ("two", ["c"])]


def test_rendered_lines_have_anchors_and_collapsible_groups() -> None:
    html = render_lines(lines_of(b"--- build\nmake <all>\n+++ tests\nok\n"))
    assert '<details class="group group-collapsed"><summary class="line" id="L1">' in html
    assert '<a class="ln" href="#L2">2</a><span class="text">make &lt;all&gt;</span>' in html
    assert '<details class="group group-expanded" open>' in html
    assert html.index('id="L2"') < html.index("</details>")      # line 2 is inside the first group


def test_rendering_new_lines_again_reads_no_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """A log's new lines go to every viewer: once the template is loaded, rendering touches no file."""
    lines = lines_of(b"\x1b[31mred\x1b[0m\n")
    first = render_lines(lines)

    def no_stat(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a file looked at while rendering: {args}")

    with monkeypatch.context() as patch:
        patch.setattr("os.stat", no_stat)
        again = render_lines(lines)
    assert again == first
