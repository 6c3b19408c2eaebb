"""Every event the test suite receives is checked against docs/openapi.yaml (validators built once).

The document is generated from the structs the gateway encodes
(``python -m gateway schema``; ``tests/test_schema.py`` keeps the checked-in
file equal to the code), so a payload that drifts from the published
contract fails whichever test received it.

Two validators of the same document: ``jsonschema`` (the reference
implementation) for answers and single payloads, and ``jsonschema-rs`` (by
the schemathesis authors) for the events of the whole suite, which carry
millions of candles: ``jsonschema`` takes about 90 µs per candle and would
add half a minute to ``make test``; ``jsonschema-rs`` takes under 1 µs.
``tests/test_schema.py`` checks that both agree on good and bad payloads.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jsonschema_rs
import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

OPENAPI_PATH = Path(__file__).resolve().parent.parent / "docs" / "openapi.yaml"
STREAM_PATH = "/api/sse/backtest/{id}/data/multi"
_BASE = "urn:candle-gateway:openapi"


@functools.cache
def openapi_document() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(OPENAPI_PATH.read_text())
    return document


@functools.cache
def event_schemas() -> dict[str, str]:
    """Event name -> JSON pointer of its payload schema in the document."""
    events = openapi_document()["paths"][STREAM_PATH]["get"]["responses"]["200"]["x-sse-events"]
    return {name: ref["$ref"].removeprefix("#") for name, ref in events.items()}


@functools.cache
def validator_for(pointer: str) -> Draft202012Validator:
    """A ``jsonschema`` validator of the schema at ``pointer`` (e.g. ``/components/schemas/DataChunk``)."""
    registry: Registry = Registry().with_resource(
        _BASE,
        Resource(contents=openapi_document(), specification=DRAFT202012),  # type: ignore[call-arg]
    )
    return Draft202012Validator({"$ref": f"{_BASE}#{pointer}"}, registry=registry)


@functools.cache
def fast_validator_for(pointer: str) -> Any:
    """The same schema for ``jsonschema-rs``: a root that holds the components its references point into."""
    return jsonschema_rs.validator_for({"$ref": f"#{pointer}", "components": openapi_document()["components"]})


# Many tests read one stream many times (concurrent readers, resumes): an
# event already found valid is not checked again.
@functools.lru_cache(maxsize=2048)
def validate_event(name: str, data: str) -> None:
    """Raise ``AssertionError`` unless ``data`` is a valid payload of event ``name``."""
    pointer = event_schemas().get(name)
    if pointer is None:
        raise AssertionError(f"event {name!r} is not in docs/openapi.yaml")
    payload = json.loads(data)
    validator = fast_validator_for(pointer)
    if not validator.is_valid(payload):
        errors = "; ".join(str(error) for error in validator.iter_errors(payload))
        raise AssertionError(f"{name} event does not match docs/openapi.yaml: {errors[:2000]}")
