"""Requests and responses checked against GitHub's official OpenAPI description.

The description is ``@octokit/openapi`` (pinned in ``npm_packages``), OpenAPI 3.0.3. Its schemas are
JSON Schema "draft 5" plus OpenAPI's own keywords, so they are translated once into draft 4 (which
``jsonschema`` implements and whose ``$ref``/``exclusiveMinimum`` rules match), with:

* ``nullable: true`` turned into a ``"null"`` member of ``type`` (or of ``enum``, or an ``anyOf``
  alternative when the schema has no ``type`` of its own);
* every ``#/components/...`` reference pointed at one registered resource, so a schema is checked
  without inlining the whole 10 MB document;
* request-body objects *closed* (``additionalProperties: false`` where the description names the
  properties and says nothing about others). GitHub ignores unknown fields, which is exactly why a
  misspelt ``conclusoin`` would go unnoticed in production: here it is an error. Responses stay open.
* ``date-time`` strings checked (``YYYY-MM-DDTHH:MM:SSZ`` and other ISO 8601 forms with an offset).

``load_description()`` parses and indexes the file once per process. ``match`` finds the operation
for a method and a raw path (after an API prefix such as GitHub Enterprise Server's ``/api/v3``),
preferring literal segments over parameters, and letting a parameter span slashes only when no
single-segment match exists and the parameter is a file path, a ref or a branch (``contents/{path}``,
``git/ref/{ref}``). ``validate_request`` checks
path parameters, query parameters and the JSON body; ``validate_response`` checks what an emulator
answers. Every failure is an ``OpenApiValidationError`` naming the operation, the field and the rule.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import jsonschema
from jsonschema import Draft4Validator, FormatChecker
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4

from .npm_packages import package_dir

DEFAULT_DESCRIPTION = "api.github.com"
_HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_MAX_SHOWN = 120  # characters of an offending value quoted in an error
# Parameters that GitHub lets span slashes when they end the path: a file path, a git ref, a branch.
_SPANNING = frozenset({"path", "ref", "branch"})

_FORMATS = FormatChecker(formats=())


@_FORMATS.checks("date-time", raises=ValueError)
def _is_date_time(value: object) -> bool:
    if not isinstance(value, str):
        return True
    # RFC 3339 demands a time zone; fromisoformat alone would take a naive local time.
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})", value):
        raise ValueError(f"{value!r} is not an RFC 3339 date-time")
    datetime.fromisoformat(value.replace("z", "Z"))
    return True


class OpenApiValidationError(AssertionError):
    """A request (or a response) that GitHub's description does not allow.

    ``operation`` is the operationId (``checks/create``) or None when no operation matched,
    ``field`` the dotted place (``body.output.text``, ``query.per_page``), ``rule`` the broken rule
    (``maxLength 65535``, ``enum``, ``required``, ``unknown operation`` ...).
    """

    def __init__(self, message: str, *, operation: str | None, field: str, rule: str) -> None:
        super().__init__(message)
        self.operation = operation
        self.field = field
        self.rule = rule


@dataclass(frozen=True)
class Parameter:
    name: str
    location: str  # "path", "query", "header" or "cookie"
    required: bool
    schema: Mapping[str, Any]


@dataclass(frozen=True)
class Operation:
    operation_id: str
    method: str  # upper case
    template: str  # as in the description: /repos/{owner}/{repo}/check-runs
    parameters: tuple[Parameter, ...]
    body_schema: Mapping[str, Any] | None
    body_required: bool
    responses: Mapping[str, Mapping[str, Any]] = field(repr=False)

    def __str__(self) -> str:
        return f"{self.operation_id} ({self.method} {self.template})"


@dataclass(frozen=True)
class _Route:
    operation: Operation
    literal: tuple[bool, ...]  # per path segment: literal (True) or a parameter
    strict: re.Pattern[str]  # parameters within one segment
    spanning: re.Pattern[str]  # parameters may span slashes


def _shown(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + f"... ({len(text)} characters)"


class OpenApiDescription:
    """One parsed and indexed OpenAPI description; get it from ``load_description``."""

    def __init__(self, document: Mapping[str, Any], *, name: str) -> None:
        self.name = name
        self.version = str(document.get("info", {}).get("version", "?"))
        components = document.get("components", {})
        self._request_uri = f"urn:hpc-runner:openapi:{name}:request"
        self._response_uri = f"urn:hpc-runner:openapi:{name}:response"
        request_doc = {"components": {"schemas": {
            key: _translate(value, self._request_uri, close=True)
            for key, value in components.get("schemas", {}).items()}}}
        response_doc = {"components": {"schemas": {
            key: _translate(value, self._response_uri, close=False)
            for key, value in components.get("schemas", {}).items()}}}
        self._registry: Registry[Any] = Registry().with_resources([
            (self._request_uri, Resource(contents=request_doc, specification=DRAFT4)),
            (self._response_uri, Resource(contents=response_doc, specification=DRAFT4)),
        ])
        self._components = components
        # Official example values (``check-run``, ``pull-request`` ...), for emulators to start from.
        self.examples: dict[str, Any] = {key: value.get("value") for key, value in
                                         components.get("examples", {}).items()}
        self._routes: dict[str, list[_Route]] = {}
        self.operations: dict[str, Operation] = {}
        for template, item in document.get("paths", {}).items():
            shared = item.get("parameters", [])
            for method in _HTTP_METHODS:
                if method not in item:
                    continue
                op = self._operation(template, method, item[method], shared)
                self.operations[op.operation_id] = op
                self._routes.setdefault(op.method, []).append(_compile(op))
        self._validators: dict[tuple[str, str], Draft4Validator] = {}

    # ------------------------------------------------------------------------------ matching

    def match(self, method: str, raw_path: str, *, prefix: str = "") -> tuple[Operation, dict[str, str]]:
        """The operation for ``method`` and the raw (still percent-encoded) ``raw_path``, and its
        decoded path parameters. ``prefix`` (``/api/v3``) is what the server's base URL adds."""
        path = raw_path.split("?", 1)[0]
        if prefix:
            if not (path == prefix or path.startswith(prefix.rstrip("/") + "/")):
                raise OpenApiValidationError(
                    f"{method.upper()} {path}: the path does not start with the API prefix {prefix}",
                    operation=None, field="path", rule="unknown operation")
            path = path[len(prefix.rstrip("/")):] or "/"
        if len(path) > 1:
            path = path.rstrip("/")
        routes = self._routes.get(method.upper(), [])
        for kind in ("strict", "spanning"):
            found = [(r, m) for r in routes if (m := getattr(r, kind).fullmatch(path)) is not None]
            if found:
                # Literal segments win over parameters, the leftmost difference deciding:
                # /pulls/comments before /pulls/{pull_number}.
                route, m = min(found, key=lambda item: (-sum(item[0].literal),
                                                        tuple(not lit for lit in item[0].literal)))
                return route.operation, {k: unquote(v) for k, v in m.groupdict().items()}
        others = sorted(m for m, rs in self._routes.items() for r in rs
                        if r.strict.fullmatch(path) or r.spanning.fullmatch(path))
        hint = f" (the path exists for {', '.join(others)})" if others else ""
        raise OpenApiValidationError(
            f"{method.upper()} {path} is no operation of GitHub's REST API "
            f"({self.name} {self.version}){hint}",
            operation=None, field="path", rule="unknown operation")

    # ------------------------------------------------------------------------------ requests

    def validate_request(
        self,
        method: str,
        raw_path: str,
        *,
        query: Iterable[tuple[str, str]] = (),
        body: bytes | None = None,
        content_type: str | None = None,
        prefix: str = "",
    ) -> tuple[Operation, dict[str, Any]]:
        """Check a whole request; returns the operation and its typed path parameters.

        ``query`` is the decoded query as (name, value) pairs (repeated names allowed); ``body``
        the raw body (``None`` or empty: none was sent).
        """
        op, raw_params = self.match(method, raw_path, prefix=prefix)
        params = self._check_parameters(op, raw_params, list(query))
        self._check_body(op, body, content_type)
        return op, params

    def _check_parameters(self, op: Operation, path_params: Mapping[str, str],
                          query: list[tuple[str, str]]) -> dict[str, Any]:
        typed: dict[str, Any] = {}
        declared = {(p.location, p.name): p for p in op.parameters}
        for name, value in path_params.items():
            param = declared.get(("path", name))
            if param is None:  # a template parameter the description forgot to declare
                typed[name] = value
                continue
            typed[name] = self._check_value(op, f"path.{name}", param, [value])
        query_names = {name for name, _ in query}
        for name in sorted(query_names):
            if ("query", name) not in declared:
                allowed = sorted(p.name for p in op.parameters if p.location == "query")
                raise OpenApiValidationError(
                    f"{op}: query parameter `{name}` is not defined for this operation "
                    f"(defined: {', '.join(allowed) or 'none'})",
                    operation=op.operation_id, field=f"query.{name}", rule="unknown parameter")
        for param in op.parameters:
            if param.location != "query":
                continue
            values = [v for n, v in query if n == param.name]
            if not values:
                if param.required:
                    raise OpenApiValidationError(
                        f"{op}: query parameter `{param.name}` is required",
                        operation=op.operation_id, field=f"query.{param.name}", rule="required")
                continue
            self._check_value(op, f"query.{param.name}", param, values)
        return typed

    def _check_value(self, op: Operation, where: str, param: Parameter, values: list[str]) -> Any:
        schema = param.schema
        kind = schema.get("type")
        if kind != "array" and len(values) > 1:
            raise OpenApiValidationError(
                f"{op}: {where} is given {len(values)} times but takes one value",
                operation=op.operation_id, field=where, rule="single value")
        if kind == "array":
            items = schema.get("items", {})
            # form style: ?a=1&a=2 (explode, the default) or ?a=1,2
            raw = [part for v in values for part in (v.split(",") if len(values) == 1 else [v])]
            value: Any = [_coerce(op, where, items.get("type"), v) for v in raw]
        else:
            value = _coerce(op, where, kind, values[0])
        self._run(op, where, "parameter:" + op.operation_id + ":" + where, schema, value, close=True)
        return value

    def _check_body(self, op: Operation, body: bytes | None, content_type: str | None) -> None:
        if not body:
            if op.body_required:
                raise OpenApiValidationError(
                    f"{op}: a JSON request body is required",
                    operation=op.operation_id, field="body", rule="required")
            return
        if op.body_schema is None:
            raise OpenApiValidationError(
                f"{op}: this operation takes no request body, but {len(body)} bytes were sent",
                operation=op.operation_id, field="body", rule="no body")
        media = (content_type or "").split(";", 1)[0].strip().lower()
        if media != "application/json":
            raise OpenApiValidationError(
                f"{op}: the request body must be sent as application/json, not {media or 'no type'}",
                operation=op.operation_id, field="body", rule="content type")
        try:
            document = json.loads(body)
        except (UnicodeDecodeError, ValueError) as exc:
            raise OpenApiValidationError(
                f"{op}: the request body is not JSON ({exc})",
                operation=op.operation_id, field="body", rule="json") from None
        self._run(op, "body", "body:" + op.operation_id, op.body_schema, document, close=True)

    # ------------------------------------------------------------------------------ responses

    def validate_response(self, op: Operation, status: int, body: Any) -> None:
        """Check a JSON response body (already parsed) against what ``op`` documents for
        ``status``; a status the operation does not document is an error too."""
        response = op.responses.get(str(status)) or op.responses.get(f"{str(status)[0]}XX") \
            or op.responses.get("default")
        if response is None:
            raise OpenApiValidationError(
                f"{op}: status {status} is not a documented response (documented: "
                f"{', '.join(sorted(op.responses))})",
                operation=op.operation_id, field="status", rule="documented status")
        if "$ref" in response:
            response = self._components["responses"][response["$ref"].rsplit("/", 1)[-1]]
        schema = response.get("content", {}).get("application/json", {}).get("schema")
        if schema is None:
            return
        self._run(op, f"response {status}", f"response:{op.operation_id}:{status}", schema, body,
                  close=False)

    # ------------------------------------------------------------------------------ internals

    def _run(self, op: Operation, where: str, key: str, schema: Mapping[str, Any], instance: Any,
             *, close: bool) -> None:
        validator = self._validators.get((key, str(close)))
        if validator is None:
            uri = self._request_uri if close else self._response_uri
            validator = Draft4Validator(_translate(schema, uri, close=close), registry=self._registry,
                                        format_checker=_FORMATS)
            self._validators[(key, str(close))] = validator
        error = jsonschema.exceptions.best_match(validator.iter_errors(instance))
        if error is None:
            return
        # best_match descends into one alternative of an anyOf/oneOf and reports its failure as if
        # it were the rule; name the alternatives instead.
        alternatives = error
        while alternatives.parent is not None and alternatives.validator not in ("anyOf", "oneOf"):
            alternatives = alternatives.parent
        if alternatives.validator in ("anyOf", "oneOf"):
            error = alternatives
        place = ".".join([where, *(str(p) for p in error.absolute_path)])
        rule = str(error.validator)
        if error.validator in {"maxLength", "minLength", "maxItems", "minItems", "maximum", "minimum",
                               "pattern", "format"}:
            rule = f"{error.validator} {error.validator_value}"
        if error.validator == "enum":
            detail = f"{_shown(error.instance)} is not one of {error.validator_value}"
        elif error.validator == "maxLength" and isinstance(error.instance, str):
            detail = f"{len(error.instance)} characters, at most {error.validator_value} allowed"
        elif error.validator == "maxItems" and isinstance(error.instance, list):
            detail = f"{len(error.instance)} items, at most {error.validator_value} allowed"
        elif error.validator in ("anyOf", "oneOf"):
            failures = sorted({f"{'.'.join(str(p) for p in e.relative_path) or 'value'}: {e.message}"
                               for e in error.context}, key=len)
            detail = "matches none of the allowed forms: " + "; or ".join(failures)
        elif error.validator == "additionalProperties":
            detail = error.message
        else:
            detail = error.message if len(error.message) <= 2 * _MAX_SHOWN else \
                error.message[:2 * _MAX_SHOWN] + "..."
        raise OpenApiValidationError(f"{op}: {place}: {rule}: {detail}",
                                     operation=op.operation_id, field=place, rule=rule)

    def _operation(self, template: str, method: str, spec: Mapping[str, Any],
                   shared: list[Mapping[str, Any]]) -> Operation:
        params: dict[tuple[str, str], Parameter] = {}
        for raw in [*shared, *spec.get("parameters", [])]:
            if "$ref" in raw:
                raw = self._components["parameters"][raw["$ref"].rsplit("/", 1)[-1]]
            param = Parameter(name=raw["name"], location=raw["in"], required=bool(raw.get("required")),
                              schema=raw.get("schema", {}))
            params[(param.location, param.name)] = param
        body = spec.get("requestBody")
        body_schema = None
        if body is not None:
            body_schema = body.get("content", {}).get("application/json", {}).get("schema")
        return Operation(
            operation_id=spec.get("operationId", f"{method} {template}"),
            method=method.upper(),
            template=template,
            parameters=tuple(params.values()),
            body_schema=body_schema,
            body_required=bool(body and body.get("required")),
            responses=spec.get("responses", {}),
        )


def _compile(op: Operation) -> _Route:
    segments = op.template.strip("/").split("/") if op.template != "/" else []
    literal: list[bool] = []
    strict: list[str] = []
    spanning: list[str] = []
    for segment in segments:
        names = re.findall(r"\{([^}]+)\}", segment)
        literal.append(not names)
        strict_part = spanning_part = ""
        for piece in re.split(r"(\{[^}]+\})", segment):
            if piece.startswith("{") and piece.endswith("}"):
                group = re.sub(r"\W", "_", piece[1:-1])
                strict_part += f"(?P<{group}>[^/]+)"
                spanning_part += f"(?P<{group}>.+)" if piece[1:-1] in _SPANNING else f"(?P<{group}>[^/]+)"
            else:
                strict_part += re.escape(piece)
                spanning_part += re.escape(piece)
        strict.append(strict_part)
        spanning.append(spanning_part)
    return _Route(op, tuple(literal), re.compile("/" + "/".join(strict)),
                  re.compile("/" + "/".join(spanning)))


def _coerce(op: Operation, where: str, kind: Any, text: str) -> Any:
    def bad(what: str) -> OpenApiValidationError:
        return OpenApiValidationError(f"{op}: {where}: type {what}: {text!r} is not {what}",
                                      operation=op.operation_id, field=where, rule=f"type {what}")
    if kind == "integer":
        if not re.fullmatch(r"-?\d+", text):
            raise bad("integer")
        return int(text)
    if kind == "number":
        try:
            return float(text)
        except ValueError:
            raise bad("number") from None
    if kind == "boolean":
        if text not in ("true", "false"):
            raise bad("boolean")
        return text == "true"
    return text


def _translate(schema: Any, uri: str, *, close: bool) -> Any:
    """An OpenAPI 3.0 schema as a draft 4 JSON Schema (see the module docstring)."""
    if isinstance(schema, list):
        return [_translate(item, uri, close=close) for item in schema]
    if not isinstance(schema, dict):
        return schema
    if "$ref" in schema:
        ref = schema["$ref"]
        # A $ref's siblings are ignored in OpenAPI 3.0, as in draft 4.
        return {"$ref": uri + ref if ref.startswith("#/") else ref}
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("example", "examples", "description", "discriminator", "xml", "externalDocs",
                   "deprecated", "readOnly", "writeOnly", "nullable") or key.startswith("x-"):
            continue
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {name: _translate(sub, uri, close=close) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not", "allOf", "anyOf", "oneOf"):
            out[key] = _translate(value, uri, close=close)
        else:
            out[key] = copy.deepcopy(value)
    if close and _closable(schema):
        out["additionalProperties"] = False
    if schema.get("nullable") is True:
        if "type" in out:
            out["type"] = [out["type"], "null"] if isinstance(out["type"], str) else [*out["type"], "null"]
            if "enum" in out and None not in out["enum"]:
                out["enum"] = [*out["enum"], None]
        elif any(k in out for k in ("allOf", "anyOf", "oneOf", "enum")):
            out = {"anyOf": [{"type": "null"}, out]}
    return out


def _closable(schema: Mapping[str, Any]) -> bool:
    """An object whose properties are all named here (not spread over allOf branches)."""
    if "properties" not in schema or "additionalProperties" in schema or "allOf" in schema \
            or "patternProperties" in schema:
        return False
    named = set(schema["properties"])
    for key in ("anyOf", "oneOf"):
        for branch in schema.get(key, []):
            if not isinstance(branch, dict) or "$ref" in branch \
                    or not set(branch.get("properties", {})) <= named:
                return False
    return True


@lru_cache(maxsize=4)
def load_description(name: str = DEFAULT_DESCRIPTION) -> OpenApiDescription:
    """The description ``name`` (``api.github.com``, ``ghes-3.19`` ...), parsed once per process."""
    file = description_path(name)
    with file.open("rb") as stream:
        document = json.load(stream)
    return OpenApiDescription(document, name=name)


def description_path(name: str = DEFAULT_DESCRIPTION) -> Path:
    file = package_dir("@octokit/openapi") / "generated" / f"{name}.json"
    if not file.is_file():
        available = sorted(p.name.removesuffix(".json") for p in file.parent.glob("*.json")
                           if not p.name.endswith(".deref.json"))
        raise FileNotFoundError(f"no OpenAPI description {name!r} in {file.parent} (available: {available})")
    return file
