"""A job's log as the dashboard shows it: lines, numbered, with ANSI colours as CSS classes and
Buildkite's group lines (pure; no I/O).

A log arrives in pieces (the hub's follow, a file's growth), cut anywhere, a UTF-8 character or an
escape sequence included. `LogLines` takes the pieces and gives back whole lines only, each once,
numbered from the line the view started at; the piece of a line not ended yet waits for its
newline (or for the job's end, `flush`). Each line is decoded on its own, bytes that are not
UTF-8 shown as U+FFFD.

Colours: ansi2html turns a line's SGR sequences into `<span class="ansi31">`: classes, never
inline styles, since the pages' content security policy allows no inline style. A colour left
on at a line's end goes on at the next line's start, as in a terminal (ansi2html sees one line at
a time, so the codes still in force are carried over and put in front of the next line).

Groups (Buildkite's convention, which CI scripts already print): a line `--- NAME` opens a
collapsed group, `+++ NAME` an expanded one, `~~~ NAME` a collapsed, de-emphasised one; the lines
after it belong to it until the next group line. `^^^ +++` expands the group before it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from ansi2html import Ansi2HTMLConverter

GroupKind = Literal["collapsed", "expanded", "quiet"]

_GROUP_PREFIXES: dict[bytes, GroupKind] = {b"--- ": "collapsed", b"+++ ": "expanded", b"~~~ ": "quiet"}
_EXPAND_PREVIOUS = b"^^^ +++"
_SGR = re.compile(r"\x1b\[([0-9;:]*)m")
# Codes carried from one line to the next, at most: enough for any real colour state.
_MAX_CARRIED = 16
# A line longer than this is cut into several (a progress bar without newlines, a binary dump).
MAX_LINE_BYTES = 64 * 1024


@dataclass(frozen=True)
class LogLine:
    number: int                      # 1 for the log's first line
    offset: int                      # where it starts in the log, in bytes
    html: str                        # its text, escaped, colours as spans
    group: GroupKind | None = None   # a group line: the group it opens
    expands_previous: bool = False   # `^^^ +++`: the group before it is to be expanded


class LogLines:
    """Whole lines from a log fed in pieces (see the module's text)."""

    def __init__(self, *, first_number: int = 1, offset: int = 0) -> None:
        self.next_number = first_number
        self.offset = offset                # where the pending bytes start in the log
        self._pending = b""
        self._carried: list[str] = []
        self._converter = Ansi2HTMLConverter(inline=False, escaped=True, linkify=False)

    @property
    def consumed(self) -> int:
        """How far into the log the lines given so far reach (the next line starts there)."""
        return self.offset

    def feed(self, data: bytes) -> list[LogLine]:
        """The lines `data` completes."""
        self._pending += data
        lines: list[LogLine] = []
        while True:
            # A newline within a line's first MAX_LINE_BYTES ends it; else those bytes are a line.
            end = self._pending.find(b"\n", 0, MAX_LINE_BYTES)
            if end < 0:
                if len(self._pending) < MAX_LINE_BYTES:
                    break
                end = MAX_LINE_BYTES - 1
            lines.append(self._line(self._pending[:end + 1]))
        return lines

    def flush(self) -> list[LogLine]:
        """The last line, when the log ended without a newline."""
        if not self._pending:
            return []
        return [self._line(self._pending)]

    def _line(self, raw: bytes) -> LogLine:
        self._pending = self._pending[len(raw):]
        start = self.offset
        self.offset += len(raw)
        number = self.next_number
        self.next_number += 1
        body = raw.rstrip(b"\n").rstrip(b"\r")
        group: GroupKind | None = None
        for prefix, kind in _GROUP_PREFIXES.items():
            if body.startswith(prefix):
                group = kind
                body = body[len(prefix):]
                break
        expands = body.startswith(_EXPAND_PREVIOUS)
        text = body.decode("utf-8", "replace")
        carried = "".join(self._carried)
        self._carry(text)
        html = self._converter.convert(carried + text, full=False)
        return LogLine(number, start, html, group, expands)

    def _carry(self, text: str) -> None:
        for match in _SGR.finditer(text):
            params = match.group(1)
            if params in ("", "0") or params.startswith("0;"):
                self._carried = [] if params in ("", "0") else [match.group(0)]
            else:
                self._carried.append(match.group(0))
        del self._carried[:-_MAX_CARRIED]


def lines_of(data: bytes, *, first_number: int = 1, offset: int = 0, final: bool = True) -> list[LogLine]:
    """The lines of a whole piece of log (its last line too when `final`)."""
    reader = LogLines(first_number=first_number, offset=offset)
    lines = reader.feed(data)
    return lines + reader.flush() if final else lines


class LineCounter:
    """How many lines `LogLines` would number in a log's first bytes that end with a newline, fed in
    pieces without holding them: a view that starts further on numbers its lines from there."""

    # A long line with the newline before it: the search jumps from newline to newline, where a
    # bare run of non-newlines would be tried at every byte of every line (100 MB took 3 s).
    _LONG = re.compile(rb"\n([^\n]{%d,})" % MAX_LINE_BYTES)

    def __init__(self) -> None:
        self.lines = 0
        self._run = 0                       # the bytes of the line not ended yet

    def feed(self, chunk: bytes) -> None:
        first = chunk.find(b"\n")
        if first < 0:
            self._run += len(chunk)
            return
        last = chunk.rfind(b"\n")
        # Each ended line is one line, and one more per MAX_LINE_BYTES it holds (`LogLines.feed`).
        self.lines += chunk.count(b"\n") + (self._run + first) // MAX_LINE_BYTES
        for long in self._LONG.finditer(chunk, first, last):
            self.lines += len(long.group(1)) // MAX_LINE_BYTES
        self._run = len(chunk) - last - 1


def count_lines(chunks: Iterable[bytes]) -> int:
    counter = LineCounter()
    for chunk in chunks:
        counter.feed(chunk)
    return counter.lines


def ansi_stylesheet() -> str:
    """The CSS of every class the converter gives (served as a file: no inline style anywhere)."""
    converter = Ansi2HTMLConverter(inline=False, dark_bg=True)
    headers = converter.produce_headers()
    return headers.removeprefix('<style type="text/css">\n').removesuffix("\n</style>\n")


@dataclass(frozen=True)
class Block:
    """Lines as the page nests them: a group line and the lines after it, or (`header` None) the
    lines before a piece's first group line, which belong to whatever group was open before."""

    header: LogLine | None
    lines: tuple[LogLine, ...]


def blocks_of(lines: Iterable[LogLine]) -> list[Block]:
    blocks: list[Block] = []
    header: LogLine | None = None
    body: list[LogLine] = []
    for line in lines:
        if line.group is not None:
            if header is not None or body:
                blocks.append(Block(header, tuple(body)))
            header, body = line, []
        else:
            body.append(line)
    if header is not None or body:
        blocks.append(Block(header, tuple(body)))
    return blocks
