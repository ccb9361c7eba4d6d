"""Checks a stored provenance record against the in-toto Statement v1 and SLSA provenance v1
definitions, as the in-toto-attestation package ships them (protobuf messages, and its
ResourceDescriptor and Statement checks). Used by the unit and the integration tests alike.

`json_format.ParseDict` refuses a field the message does not define, a value of the wrong type and
a timestamp that is not RFC 3339. It also accepts a field's proto name (`predicate_type`) where
the JSON form is `predicateType`; `_json_names_only` refuses that, so that a record another tool
reads by the JSON names is the one checked here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any, TypeVar

import rfc8785
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message
from in_toto_attestation.predicates.provenance.v1 import provenance_pb2
from in_toto_attestation.v1 import statement_pb2
from in_toto_attestation.v1.resource_descriptor import ResourceDescriptor
from in_toto_attestation.v1.statement import Statement

M = TypeVar("M", bound=Message)

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
SLSA_PROVENANCE_V1 = "https://slsa.dev/provenance/v1"
# The digest forms of in-toto's digest set that the records use: lowercase hex of the right length.
_DIGESTS = {"sha256": re.compile(r"[0-9a-f]{64}"), "gitCommit": re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")}
# Messages whose JSON form is not an object of fields (google.protobuf's well-known types).
_OPAQUE = {"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue",
           "google.protobuf.Timestamp"}


def _json_names_only(value: Any, descriptor: Descriptor, where: str) -> None:
    assert isinstance(value, dict), f"{where} is not an object"
    fields = {field.json_name: field for field in descriptor.fields}
    for key, item in value.items():
        assert key in fields, f"{where}: {key!r} is not a field of {descriptor.full_name} (JSON name)"
        field = fields[key]
        message = field.message_type
        if message is None or message.full_name in _OPAQUE or message.GetOptions().map_entry:
            continue
        items = item if field.is_repeated else [item]
        for index, element in enumerate(items):
            _json_names_only(element, message, f"{where}.{key}[{index}]")


def _descriptors(statement: statement_pb2.Statement, provenance: provenance_pb2.Provenance
                 ) -> Iterator[tuple[str, Any]]:
    for index, subject in enumerate(statement.subject):
        yield f"subject[{index}]", subject
    for index, dependency in enumerate(provenance.build_definition.resolved_dependencies):
        yield f"resolvedDependencies[{index}]", dependency
    for index, byproduct in enumerate(provenance.run_details.byproducts):
        yield f"byproducts[{index}]", byproduct


def _parsed(value: Any, message: M) -> M:
    try:
        return json_format.ParseDict(value, message)
    except json_format.ParseError as exc:
        raise AssertionError(f"not a {message.DESCRIPTOR.full_name}: {exc}") from None


def validate_record(data: bytes) -> dict[str, Any]:
    """The record, parsed, once it has passed every check; AssertionError (or the package's
    ValueError) naming what is wrong otherwise."""
    document = json.loads(data)
    assert rfc8785.dumps(document) == data, "the record's bytes are not its RFC 8785 canonical form"
    assert document.get("_type") == STATEMENT_TYPE, document.get("_type")
    assert document.get("predicateType") == SLSA_PROVENANCE_V1, document.get("predicateType")

    statement = _parsed(document, statement_pb2.Statement())
    _json_names_only(document, statement_pb2.Statement.DESCRIPTOR, "statement")
    Statement.copy_from_pb(statement).validate()

    predicate = document["predicate"]
    provenance = _parsed(predicate, provenance_pb2.Provenance())
    _json_names_only(predicate, provenance_pb2.Provenance.DESCRIPTOR, "predicate")
    # SLSA v1: buildType and builder.id are required, externalParameters too (an object).
    assert provenance.build_definition.build_type, "predicate.buildDefinition.buildType is empty"
    assert provenance.run_details.builder.id, "predicate.runDetails.builder.id is empty"
    assert isinstance(predicate["buildDefinition"].get("externalParameters"), dict)

    for where, proto in _descriptors(statement, provenance):
        ResourceDescriptor.copy_from_pb(proto).validate()
        for algorithm, digest in proto.digest.items():
            form = _DIGESTS.get(algorithm)
            assert form is not None, f"{where}: digest algorithm {algorithm!r} is not one the records use"
            assert form.fullmatch(digest), f"{where}: {algorithm} {digest!r} is not lowercase hex"
    return dict(document)
