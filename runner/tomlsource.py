"""Loading TOML with enough memory of the text to name the line of a field.

`tomllib` reports lines for syntax errors only. To point semantic errors at a line we
walk the text once, after `tomllib` has accepted it, and remember where each dotted
path (`grants[1].images[0]`, `job.env.A`) was written. The walk is used for messages,
never for parsing, so a path it cannot place only loses its line number.
"""

from __future__ import annotations

import bisect
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.errors import InputError

MAX_FILE_BYTES = 1024 * 1024
# tomllib's work on a dotted key grows with the square of its parts (its table's name included),
# and the line indexer's with the square of the nesting: both are bounded before either of them
# sees the text. No file of ours needs more than a few of either.
MAX_KEY_PARTS = 16
MAX_NESTING = 16

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_SCALAR_END = re.compile(r"[,\]}#\n]")

# Tokens for `check_shape`. Each string form matches whatever follows its opening quote (up to its
# end, the end of its line, or the end of the text), and each alternative inside a string is
# decided by its first character: the scan is linear on any input, valid or not.
_SHAPE_TOKEN = re.compile(
    r'(?P<string>"""(?:[^"\\]|\\[\s\S]?|"(?!""))*(?:""""{0,2}|\Z)'   # up to two more quotes are content
    r"|'''(?:[^']|'(?!''))*(?:''''{0,2}|\Z)"
    r'|"(?:[^"\\\n]|\\[^\n]?)*(?:"|(?=\n)|\Z)'
    r"|'[^'\n]*(?:'|(?=\n)|\Z))"
    r"|(?P<comment>#[^\n]*)"
    r"|(?P<part>[A-Za-z0-9_+:-]+)"   # a bare key; a number, date or boolean in a value
    r"|(?P<space>[ \t\r]+)"
    r"|(?P<newline>\n)"
    r"|(?P<other>[\s\S])"
)


class _LineIndexer:
    """Walks TOML text that `tomllib` has already accepted and notes where each path starts.

    It knows just enough TOML to stay out of strings, comments, arrays and inline tables,
    so that a line inside a multi-line string never passes for a table header or a key,
    and elements of arrays (`grants[1].images[0]`) get their own lines. It is iterative,
    so any nesting `tomllib` accepts is walked without recursion.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.newlines = [i for i, ch in enumerate(text) if ch == "\n"]
        self.lines: dict[str, int] = {}
        self.array_counts: dict[str, int] = {}

    def line(self) -> int:
        return bisect.bisect_left(self.newlines, self.pos) + 1

    def note(self, path: str) -> None:
        if path:
            self.lines.setdefault(path, self.line())

    def peek(self, count: int = 1) -> str:
        return self.text[self.pos:self.pos + count]

    def skip_blank(self, *, newlines: bool) -> None:
        text = self.text
        while self.pos < len(text):
            ch = text[self.pos]
            if ch in " \t" or (newlines and ch in "\r\n"):
                self.pos += 1
            elif newlines and ch == "#":
                end = text.find("\n", self.pos)
                self.pos = len(text) if end < 0 else end
            else:
                return

    def skip_string(self) -> str:
        """Step over a string at `pos`, returning its source text."""
        text, start = self.text, self.pos
        quote = text[start]
        if text.startswith(quote * 3, start):
            self.pos = start + 3
            while not text.startswith(quote * 3, self.pos):
                self.pos += 2 if quote == '"' and text[self.pos] == "\\" else 1
            self.pos += 3
            # up to two quotes right before the closing delimiter belong to the string
            for _ in range(2):
                if self.peek() == quote:
                    self.pos += 1
        else:
            self.pos = start + 1
            while text[self.pos] != quote:
                self.pos += 2 if quote == '"' and text[self.pos] == "\\" else 1
            self.pos += 1
        return text[start:self.pos]

    def read_key(self) -> list[str]:
        parts: list[str] = []
        while True:
            self.skip_blank(newlines=False)
            ch = self.peek()
            if ch == '"':
                raw = self.skip_string()
                # only escapes need TOML's own reading
                parts.append(next(iter(tomllib.loads(f"{raw} = 0"))) if "\\" in raw else raw[1:-1])
            elif ch == "'":
                parts.append(self.skip_string()[1:-1])
            else:
                match = _BARE_KEY.match(self.text, self.pos)
                if match is None:
                    return parts
                parts.append(match.group())
                self.pos = match.end()
            self.skip_blank(newlines=False)
            if self.peek() != ".":
                return parts
            self.pos += 1

    def header(self) -> str:
        double = self.peek(2) == "[["
        self.pos += 2 if double else 1
        parts = self.read_key()
        self.pos += 2 if double else 1
        resolved = ""
        for index, part in enumerate(parts):
            resolved = f"{resolved}.{part}" if resolved else part
            if index < len(parts) - 1:
                if resolved in self.array_counts:
                    resolved += f"[{self.array_counts[resolved] - 1}]"
                self.note(resolved)
        if double:
            count = self.array_counts.get(resolved, 0)
            self.array_counts[resolved] = count + 1
            self.note(resolved)
            resolved += f"[{count}]"
        self.note(resolved)
        return resolved

    def key_path(self, prefix: str) -> str:
        path = prefix
        for part in self.read_key():
            path = f"{path}.{part}" if path else part
            self.note(path)
        self.skip_blank(newlines=False)
        self.pos += 1  # '='
        return path

    def run(self) -> dict[str, int]:
        text = self.text
        table = ""
        # open arrays and inline tables: [path, next array index or -1 for a table]
        stack: list[list[Any]] = []
        last: tuple[int, int] | None = None
        while True:
            if (self.pos, len(stack)) == last:   # no progress: give up on the rest, keep what we have
                return self.lines
            last = (self.pos, len(stack))
            # at a statement, or right after a value inside an array or inline table
            if not stack:
                self.skip_blank(newlines=True)
                if self.pos >= len(text):
                    return self.lines
                if self.peek() == "[":
                    table = self.header()
                    continue
                path = self.key_path(table)
            else:
                self.skip_blank(newlines=True)
                container = stack[-1]
                ch = self.peek()
                if ch == ",":
                    self.pos += 1
                    self.skip_blank(newlines=True)
                    if container[1] >= 0:
                        container[1] += 1
                    ch = self.peek()
                if ch and ch in "]}":
                    self.pos += 1
                    stack.pop()
                    continue
                if container[1] >= 0:
                    path = f"{container[0]}[{container[1]}]"
                    self.note(path)
                else:
                    path = self.key_path(container[0])
            # a value for `path`
            self.skip_blank(newlines=False)
            ch = self.peek()
            if ch and ch in "\"'":
                self.skip_string()
            elif ch == "[":
                self.pos += 1
                stack.append([path, 0])
            elif ch == "{":
                self.pos += 1
                stack.append([path, -1])
            else:
                end = _SCALAR_END.search(text, self.pos)
                self.pos = len(text) if end is None else end.start()


def check_shape(text: str, name: str) -> None:
    """Refuse TOML that would cost far more to parse than its size says: a key of more than
    MAX_KEY_PARTS dotted parts (its table's name included), or arrays and inline tables nested
    more than MAX_NESTING deep. One linear pass that knows strings and comments, so that dots
    and brackets inside them count for nothing; everything else is left to tomllib."""
    line = 1
    depth = 0             # open arrays and inline tables
    table_parts = 0       # parts of the current table's name
    parts = 0             # parts of the dotted name being read
    budget = MAX_KEY_PARTS
    after_dot = False
    at_statement = True   # at the start of a line, outside arrays and inline tables
    in_header = False
    for match in _SHAPE_TOKEN.finditer(text):
        kind, token = match.lastgroup, match.group()
        if kind in ("space", "comment"):
            continue
        if kind == "newline":
            line += 1
            parts, after_dot = 0, False
            if depth == 0:
                at_statement, in_header = True, False
            continue
        if kind in ("string", "part"):
            if not after_dot:  # a new name: a key at a statement carries its table's name
                parts = 0
                budget = MAX_KEY_PARTS - (table_parts if at_statement else 0)
            parts, after_dot, at_statement = parts + 1, False, False
            if parts > budget:
                raise InputError(f"invalid TOML: a key has more than {MAX_KEY_PARTS} dotted parts, "
                                 "its table's name included", file=name, line=line)
            line += token.count("\n")
            continue
        if token == "." and parts and not after_dot:
            after_dot = True
            continue
        name_parts, parts, after_dot = parts, 0, False
        if token == "[" and (at_statement or (in_header and not name_parts)):
            in_header = True  # [table] or [[array of tables]]
        elif token == "]" and in_header:
            table_parts, in_header = name_parts, False
        elif token in ("[", "{"):
            depth += 1
            if depth > MAX_NESTING:
                raise InputError("invalid TOML: arrays or tables nested too deeply "
                                 f"(more than {MAX_NESTING} levels)", file=name, line=line)
        elif token in ("]", "}"):
            depth = max(depth - 1, 0)
        at_statement = False


def _index_lines(text: str) -> dict[str, int]:
    indexer = _LineIndexer(text)
    try:
        return indexer.run()
    except (IndexError, tomllib.TOMLDecodeError):
        return indexer.lines


@dataclass
class TomlDocument:
    """Parsed TOML plus a map from dotted paths to line numbers."""

    name: str
    data: dict[str, Any]
    lines: dict[str, int] = field(default_factory=dict)

    def line_of(self, path: str) -> int | None:
        """The line of `path`, or of its nearest enclosing table that we could place."""
        probe = path
        while probe:
            if probe in self.lines:
                return self.lines[probe]
            if "." not in probe and "[" not in probe:
                break
            cut = max(probe.rfind("."), probe.rfind("["))
            probe = probe[:cut]
        return None

    def error(self, path: str, message: str) -> InputError:
        return InputError(message, file=self.name, line=self.line_of(path), field=path or None)


def check_size(text: str, name: str) -> None:
    if len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        raise InputError(f"file is larger than {MAX_FILE_BYTES} bytes", file=name)


def parse_toml(text: str, name: str) -> TomlDocument:
    """Parse TOML text; a syntax error becomes an InputError with file and line."""
    check_size(text, name)
    check_shape(text, name)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        match = re.search(r"\(at line (\d+), column (\d+)\)", message)
        line = int(match.group(1)) if match else None
        detail = re.sub(r"\s*\(at line \d+, column \d+\)", "", message)
        if match:
            detail += f" (column {match.group(2)})"
        raise InputError(f"invalid TOML: {detail}", file=name, line=line) from None
    except RecursionError:
        raise InputError("invalid TOML: arrays or tables nested too deeply", file=name) from None
    except ValueError as exc:
        # tomllib lets int()'s refusal of integers with thousands of digits through
        long_number = re.search(r"\d{1000}", text)
        if long_number is None:
            raise InputError(f"invalid TOML: {exc}", file=name) from None
        line = text.count("\n", 0, long_number.start()) + 1
        raise InputError("invalid TOML: a number has too many digits", file=name, line=line) from None
    return TomlDocument(name=name, data=data, lines=_index_lines(text))


def read_text_limited(path: str | Path, limit: int = MAX_FILE_BYTES) -> str:
    """Read a UTF-8 text file of at most `limit` bytes; errors name the file.

    Reads at most `limit + 1` bytes whatever `stat` says, so that a device (or a symlink
    to one, such as `/dev/zero`) cannot make us read without end.
    """
    file = Path(path)
    try:
        with file.open("rb") as stream:
            raw = stream.read(limit + 1)
    except FileNotFoundError:
        raise InputError("no such file", file=str(path)) from None
    except IsADirectoryError:
        raise InputError("is a directory, not a file", file=str(path)) from None
    except PermissionError:
        raise InputError("permission denied", file=str(path)) from None
    except OSError as exc:
        raise InputError(exc.strerror or str(exc), file=str(path)) from None
    if len(raw) > limit:
        raise InputError(f"file is larger than {limit} bytes", file=str(path))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError("not UTF-8 text", file=str(path)) from None


def load_toml(path: str | Path) -> TomlDocument:
    """Read and parse a TOML file, naming it in every error."""
    return parse_toml(read_text_limited(path), str(path))
