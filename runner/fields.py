"""Strict, typed reading of a TOML table: every error names the dotted field.

Job specs, policies and configs are all read through `Table`, so unknown keys, wrong
types and out-of-range numbers are reported the same way everywhere.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

from runner.errors import InputError
from runner.tomlsource import TomlDocument

T = TypeVar("T")

MAX_STRING = 4096
MAX_LIST = 1024
MAX_INT = 10**9

_MISSING = object()


def _type_name(value: object) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "a table"}.get(type(value), type(value).__name__)


class Table:
    """A view over one TOML table at a dotted path."""

    def __init__(self, doc: TomlDocument, data: dict[str, Any], path: str = "") -> None:
        self.doc = doc
        self.data = data
        self.path = path
        self._seen: set[str] = set()

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str | None, message: str) -> InputError:
        return self.doc.error(self.at(key) if key else self.path, message)

    def has(self, key: str) -> bool:
        return key in self.data

    def _get(self, key: str, default: Any) -> Any:
        self._seen.add(key)
        if key in self.data:
            return self.data[key]
        if default is _MISSING:
            raise self.error(key, "is required")
        return default

    def string(self, key: str, default: Any = _MISSING, *, pattern: str | None = None,
               what: str | None = None) -> Any:
        value = self._get(key, default)
        if value is default and key not in self.data:
            return value
        return self.check_string(key, value, pattern=pattern, what=what)

    def check_string(self, key: str, value: Any, *, pattern: str | None = None,
                     what: str | None = None) -> str:
        if not isinstance(value, str):
            raise self.error(key, f"must be a string, got {_type_name(value)}")
        if len(value) > MAX_STRING:
            raise self.error(key, f"is longer than {MAX_STRING} characters")
        if "\x00" in value:
            raise self.error(key, "contains a NUL character")
        if pattern is not None and not re.fullmatch(pattern, value):
            raise self.error(key, f"{value!r} is not {what or 'valid'}")
        return value

    def boolean(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        if key not in self.data:
            return value
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {_type_name(value)}")
        return value

    def integer(self, key: str, default: Any = _MISSING, *, minimum: int = 1,
                maximum: int = MAX_INT) -> Any:
        value = self._get(key, default)
        if key not in self.data:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"must be an integer, got {_type_name(value)}")
        if value < minimum:
            raise self.error(key, f"must be at least {minimum}, got {value}")
        if value > maximum:
            raise self.error(key, f"must be at most {maximum}, got {value}")
        return value

    def converted(self, key: str, convert: Callable[[Any], T], default: Any = _MISSING) -> Any:
        """Read a value and convert it; a ValueError from `convert` names the field."""
        value = self._get(key, default)
        if key not in self.data:
            return value
        try:
            return convert(value)
        except ValueError as exc:
            raise self.error(key, str(exc)) from None

    def string_list(self, key: str, default: Any = _MISSING, *, pattern: str | None = None,
                    what: str | None = None, unique: bool = True) -> Any:
        value = self._get(key, default)
        if key not in self.data:
            return value
        if not isinstance(value, list):
            raise self.error(key, f"must be an array of strings, got {_type_name(value)}")
        if len(value) > MAX_LIST:
            raise self.error(key, f"has more than {MAX_LIST} entries")
        items: list[str] = []
        for index, item in enumerate(value):
            items.append(self.check_string(f"{key}[{index}]", item, pattern=pattern, what=what))
        if unique:
            seen: set[str] = set()
            for index, item in enumerate(items):
                if item in seen:
                    raise self.error(f"{key}[{index}]", f"{item!r} is listed twice")
                seen.add(item)
        return tuple(items)

    def table(self, key: str, *, required: bool = False) -> Table | None:
        self._seen.add(key)
        if key not in self.data:
            if required:
                raise self.error(key, "is required")
            return None
        value = self.data[key]
        if not isinstance(value, dict):
            raise self.error(key, f"must be a table, got {_type_name(value)}")
        return Table(self.doc, value, self.at(key))

    def tables(self, key: str) -> list[Table]:
        """An array of tables (`[[key]]`)."""
        self._seen.add(key)
        value = self.data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.error(key, "must be an array of tables ([[" + self.at(key) + "]])")
        if len(value) > MAX_LIST:
            raise self.error(key, f"has more than {MAX_LIST} entries")
        return [Table(self.doc, item, f"{self.at(key)}[{i}]") for i, item in enumerate(value)]

    def named_tables(self, key: str) -> dict[str, Table]:
        """A table of tables keyed by name (`[key.NAME]`)."""
        outer = self.table(key)
        if outer is None:
            return {}
        result: dict[str, Table] = {}
        for name, value in outer.data.items():
            outer._seen.add(name)
            if not isinstance(value, dict):
                raise outer.error(name, f"must be a table, got {_type_name(value)}")
            result[name] = Table(self.doc, value, outer.at(name))
        return result

    def string_map(self, key: str, *, key_pattern: str, what: str) -> dict[str, str]:
        value = self._get(key, {})
        if not isinstance(value, dict):
            raise self.error(key, f"must be a table of strings, got {_type_name(value)}")
        if len(value) > MAX_LIST:
            raise self.error(key, f"has more than {MAX_LIST} entries")
        result: dict[str, str] = {}
        for name, item in value.items():
            if not re.fullmatch(key_pattern, name):
                raise self.error(f"{key}.{name}", f"{name!r} is not {what}")
            result[name] = self.check_string(f"{key}.{name}", item)
        return result

    def finish(self) -> None:
        """Reject keys nobody asked for: a typo must not silently mean a default."""
        for key in self.data:
            if key not in self._seen:
                known = ", ".join(sorted(self._seen)) or "none"
                raise self.error(key, f"unknown key (known keys here: {known})")
