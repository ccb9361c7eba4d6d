"""No test relies on a file that only a development machine has.

The suite must pass on a fresh machine after deploy/dev/setup.sh. A test that reads a leftover of an
experiment (a binary in /var/tmp, a dotfile in the service account's home) passes where it was written
and fails everywhere else. This reads every test and benchmark source for absolute paths outside the
repository, folding module constants such as ``HOME / ".profile"``, and requires every such path that
exists on this machine to be listed in deploy/dev/machine-paths.txt with who makes it.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MANIFEST = REPO / "deploy" / "dev" / "machine-paths.txt"
SOURCES = (REPO / "tests", REPO / "bench")
KINDS = ("setup", "test", "system", "sandbox")
# What a path in a test looks like: no spaces, no shell or format syntax.
PATH_TEXT = re.compile(r"/[A-Za-z0-9._@+-]*(?:/[A-Za-z0-9._@+-]*)*")


@dataclass(frozen=True)
class Entry:
    kind: str
    path: str
    line: int

    def covers(self, path: str) -> bool:
        if self.path.endswith("/") and self.path != "/":
            return path == self.path.rstrip("/") or path.startswith(self.path)
        return path == self.path


@dataclass(frozen=True)
class Reference:
    file: Path
    line: int
    path: str

    def __str__(self) -> str:
        return f"{self.file.relative_to(REPO)}:{self.line}: {self.path}"


def read_manifest(text: str) -> list[Entry]:
    entries = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or parts[0] not in KINDS or not parts[1].startswith("/"):
            raise ValueError(f"{MANIFEST.name}:{number}: expected `KIND /absolute/path` with KIND one of "
                             f"{', '.join(KINDS)}, got {raw!r}")
        entries.append(Entry(parts[0], parts[1], number))
    return entries


class _PathFinder(ast.NodeVisitor):
    """Absolute paths a module names: string literals, ``Path("/x")``, ``CONST / "name"``, and the
    constant head of an f-string (``f"/var/tmp/{x}"`` names /var/tmp)."""

    def __init__(self, constants: dict[str, str]) -> None:
        self.constants = constants
        self.found: list[tuple[int, str]] = []

    def value(self, node: ast.AST) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.Name):
            return self.constants.get(node.id)
        if isinstance(node, ast.Call) and len(node.args) == 1 and _called_name(node) in (
                "Path", "PurePath", "PurePosixPath"):
            return self.value(node.args[0])
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            left, right = self.value(node.left), self.value(node.right)
            if left is not None and right is not None:
                return right if right.startswith("/") else f"{left.rstrip('/')}/{right}"
        if isinstance(node, ast.JoinedStr) and node.values:
            head = node.values[0]
            if isinstance(head, ast.Constant) and isinstance(head.value, str) and len(node.values) > 1:
                return head.value.rsplit("/", 1)[0] or "/"
        return None

    def generic_visit(self, node: ast.AST) -> None:
        if isinstance(node, ast.Constant | ast.Name | ast.Call | ast.BinOp | ast.JoinedStr):
            text = self.value(node)
            if text is not None and PATH_TEXT.fullmatch(text) and text.startswith("/"):
                self.found.append((getattr(node, "lineno", 0), _normal(text)))
        super().generic_visit(node)


def _called_name(node: ast.Call) -> str | None:
    if isinstance(node.func, ast.Name):
        return node.func.id
    if isinstance(node.func, ast.Attribute):
        return node.func.attr
    return None


def _normal(path: str) -> str:
    parts = [part for part in path.split("/") if part not in ("", ".")]
    return "/" + "/".join(parts) + ("/" if path.endswith("/") and parts else "")


def module_constants(tree: ast.Module, inherited: dict[str, str]) -> dict[str, str]:
    """Module-level NAME = <path expression>, in order, each able to use the ones before it."""
    constants = dict(inherited)
    finder = _PathFinder(constants)
    for statement in tree.body:
        targets: list[ast.expr] = []
        if isinstance(statement, ast.Assign):
            targets, value = statement.targets, statement.value
        elif isinstance(statement, ast.AnnAssign) and statement.value is not None:
            targets, value = [statement.target], statement.value
        for target in targets:
            resolved = finder.value(value)
            if isinstance(target, ast.Name) and resolved is not None:
                constants[target.id] = resolved
    return constants


def references() -> Iterator[Reference]:
    conftest = ast.parse((REPO / "tests" / "conftest.py").read_text(encoding="utf-8"))
    shared = module_constants(conftest, {})
    for root in SOURCES:
        for file in sorted(root.rglob("*.py")):
            if file == Path(__file__).resolve():
                continue  # its own samples below are data, not paths it relies on
            tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
            finder = _PathFinder(module_constants(tree, shared))
            finder.visit(tree)
            for line, path in dict.fromkeys(finder.found):
                yield Reference(file, line, path)


def _outside_repository(path: str) -> bool:
    stripped = path.rstrip("/") or "/"
    return not (stripped == str(REPO) or stripped.startswith(f"{REPO}/"))


def undeclared(entries: list[Entry], found: list[Reference]) -> list[Reference]:
    """References to existing paths outside the repository that no manifest entry covers."""
    missing = []
    for reference in found:
        path = reference.path.rstrip("/") or "/"
        if not _outside_repository(path) or any(entry.covers(path) for entry in entries):
            continue
        if Path(path).exists() or Path(path).is_symlink():
            missing.append(reference)
    return missing


def test_every_existing_path_a_test_names_is_made_by_setup_or_by_the_tests() -> None:
    entries = read_manifest(MANIFEST.read_text(encoding="utf-8"))
    missing = undeclared(entries, list(references()))
    assert not missing, (
        "tests name paths outside the repository that exist here but that neither deploy/dev/setup.sh "
        "nor the tests make (they would be missing on a fresh machine); make them in setup.sh or in "
        "the test, then list them in deploy/dev/machine-paths.txt:\n  " + "\n  ".join(map(str, missing)))


def test_what_setup_is_said_to_make_exists() -> None:
    """The suite runs after setup.sh: a `setup` entry that is missing is a wrong manifest."""
    entries = read_manifest(MANIFEST.read_text(encoding="utf-8"))
    absent = [f"{MANIFEST.name}:{e.line}: {e.path}" for e in entries
              if e.kind == "setup" and not Path(e.path.rstrip("/")).exists()]
    if absent and not Path("/opt/hpc-runner/venv").exists():
        pytest.skip("deploy/dev/setup.sh has not run on this machine")
    assert not absent, "listed as made by setup.sh but missing:\n  " + "\n  ".join(absent)


# -- the check itself --------------------------------------------------------------------------


def _refs_in(source: str, tmp_path: Path) -> list[str]:
    file = tmp_path / "test_sample.py"
    file.write_text(source, encoding="utf-8")
    tree = ast.parse(source)
    finder = _PathFinder(module_constants(tree, {}))
    finder.visit(tree)
    return [path for _, path in finder.found]


def test_the_check_sees_paths_built_from_module_constants(tmp_path: Path) -> None:
    source = (
        'from pathlib import Path\n'
        'HOME = Path("/var/lib/hpcrunner")\n'
        'HELLO = Path("/var/tmp/exp/hello")\n'
        'def test(): return HOME / ".profile", f"/var/tmp/scratch/{1}"\n'
    )
    found = _refs_in(source, tmp_path)
    assert "/var/lib/hpcrunner/.profile" in found
    assert "/var/tmp/exp/hello" in found
    assert "/var/tmp/scratch" in found


def test_a_leftover_in_a_listed_home_is_not_covered_by_the_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "exp").mkdir(parents=True)
    (home / ".profile").write_text("")
    entries = read_manifest(f"setup {home}\n")
    found = [Reference(MANIFEST, 1, str(home)), Reference(MANIFEST, 2, str(home / ".profile")),
             Reference(MANIFEST, 3, str(home / "absent"))]
    assert [r.path for r in undeclared(entries, found)] == [str(home / ".profile")]
    assert undeclared(read_manifest(f"test {home}/\n"), found) == []
    only_root = undeclared(read_manifest("system /\n"), found)
    assert [r.path for r in only_root] == [str(home), str(home / ".profile")]


def test_a_malformed_manifest_line_is_named() -> None:
    with pytest.raises(ValueError, match=r"machine-paths.txt:2: expected `KIND /absolute/path`"):
        read_manifest("setup /a\nmade-by-hand /b\n")
