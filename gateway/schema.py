"""The machine-readable contract: an OpenAPI 3.1 document generated from the structs the gateway encodes.

``python -m gateway schema`` prints it (``docs/openapi.yaml`` is its output,
checked in; a test fails when the two disagree). The event schemas come from
``msgspec.json.schema_components`` over ``gateway.protocol``'s structs, so a
field added there shows up here. What the structs cannot say is added in one
place, ``_refine``: ``data_points`` is ``msgspec.Raw`` (an already encoded
array of candles), so its schema is the candle array of
``gateway.sources.candles``; ``job_status`` and ``error`` name their values.

OpenAPI 3.1 has no standard way to describe the events of a
``text/event-stream``; the response schema follows the shape OpenAPI 3.2
adopted for it (``itemSchema``): one ``oneOf`` branch per event, each with its
``event`` name and a ``data`` string whose ``contentSchema`` is the payload.
``x-sse-events`` maps each event name to its payload schema for tools.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

import msgspec

from gateway import params, protocol
from gateway.compression import PREFERENCE
from gateway.sources.candles import CanonicalCandle

OPENAPI_VERSION: Final = "3.1.0"
# The document's own version: bump it when the contract changes.
CONTRACT_VERSION: Final = "1.0.0"
STREAM_PATH: Final = "/api/sse/backtest/{id}/data/multi"
_REF: Final = "#/components/schemas/{name}"

# Event name -> payload struct, in stream order. A new event goes here too: the
# test suite refuses any event whose name docs/openapi.yaml does not know.
EVENTS: Final[dict[str, type[msgspec.Struct]]] = {
    protocol.INTERVAL_START.decode(): protocol.IntervalStart,
    protocol.DATA_CHUNK.decode(): protocol.DataChunk,
    protocol.INTERVAL_COMPLETE.decode(): protocol.IntervalComplete,
    protocol.ALL_COMPLETE.decode(): protocol.AllComplete,
    protocol.ERROR.decode(): protocol.ErrorEvent,
    protocol.JOB_STATUS.decode(): protocol.JobStatusEvent,
}

JOB_STATUSES: Final = ("queued", "running", "paused", "completed", "failed", "cancelled")
# The error events' codes (docs/PROTOCOL.md, errors inside the stream); the stream
# raises them as gateway.errors classes or, for interval_not_found, by name.
STREAM_ERRORS: Final = ("job_not_found", "job_error", "interval_not_found", "data_error", "connection_error")
# RFC 3339 in UTC with a Z suffix, fractional seconds when the stored time had them.
UTC_TIME_PATTERN: Final = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?Z$"

_EVENT_DESCRIPTIONS: Final = {
    "IntervalStart": "Opens an interval: its point and chunk counts are fixed here.",
    "DataChunk": "Up to chunk_size points of one interval, ascending in time, with the stream's progress.",
    "IntervalComplete": "Closes an interval's snapshot (live points may follow in follow mode).",
    "AllComplete": "The last event of a stream not ended by a fatal error; the server closes the stream after it.",
    "ErrorEvent": "A problem with the job (fatal: job_not_found, job_error, connection_error) or with one interval.",
    "JobStatusEvent": "Follow mode: the job's status, current bar or backtest id changed.",
    "Progress": "Where the stream stands, counting the chunk that carries it.",
    "IntervalProgress": "One interval's counts in progress.overall_progress.",
    "Candle": "One OHLCV point.",
}


def event_components() -> dict[str, Any]:
    """JSON Schemas of every event payload and what they refer to, keyed by component name."""
    _, components = msgspec.json.schema_components([*EVENTS.values(), list[CanonicalCandle]], ref_template=_REF)
    return _refine(components)


def _refine(components: dict[str, Any]) -> dict[str, Any]:
    candle = components.pop("CanonicalCandle")
    candle["title"] = "Candle"
    # The struct parses any offset; what clients receive is always UTC with Z.
    candle["properties"]["time"] = {"type": "string", "format": "date-time", "pattern": UTC_TIME_PATTERN}
    components["Candle"] = candle
    components["DataChunk"]["properties"]["data_points"] = {
        "type": "array",
        "items": {"$ref": _REF.format(name="Candle")},
        "description": "Points of this chunk, ascending in time (sent as stored JSON: msgspec.Raw).",
    }
    for component in components.values():
        for name, field in component["properties"].items():
            if name == "job_status":
                field["enum"] = list(JOB_STATUSES)
    components["ErrorEvent"]["properties"]["error"]["enum"] = list(STREAM_ERRORS)
    for name, description in _EVENT_DESCRIPTIONS.items():
        components[name]["description"] = description
    return dict(sorted(components.items()))


def openapi() -> dict[str, Any]:
    """The whole OpenAPI 3.1 document as plain data."""
    schemas = event_components()
    schemas["RequestError"] = {
        "title": "RequestError",
        "description": "The JSON body of every answer before the stream starts (400, 401, 429, 503).",
        "type": "object",
        "properties": {
            "error": {
                "type": "string",
                "enum": ["invalid_request", "unauthenticated", "too_many_streams", "too_many_requests", "unavailable"],
            },
            "message": {"type": "string"},
        },
        "required": ["error", "message"],
    }
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Candle stream gateway",
            "version": CONTRACT_VERSION,
            "description": "Streams a backtest's OHLCV candles, for several intervals, over one SSE connection. "
            "The prose contract is docs/PROTOCOL.md. Generated by `python -m gateway schema`; do not edit.",
        },
        "paths": {STREAM_PATH: {"get": _operation()}},
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "Firebase ID token"},
                "tokenParameter": {"type": "apiKey", "in": "query", "name": "token"},
            },
        },
        "security": [{"bearer": []}, {"tokenParameter": []}],
    }


def _operation() -> dict[str, Any]:
    return {
        "operationId": "streamCandles",
        "summary": "Stream candles of several intervals of a job or completed backtest",
        "parameters": _parameters(),
        "responses": {
            "200": {
                "description": "The event stream. Every event has an id; the first also carries retry:. "
                "While idle the server sends ': ping' comment lines. Compressed when Accept-Encoding allows "
                "(zstd, else gzip), flushed at every event.",
                "headers": {
                    "Cache-Control": {"schema": {"type": "string", "const": "no-cache"}},
                    "X-Accel-Buffering": {"schema": {"type": "string", "const": "no"}},
                    "Vary": {"schema": {"type": "string", "const": "Accept-Encoding"}},
                    "Content-Encoding": {
                        "description": "zstd or gzip when the body is compressed; absent for identity.",
                        "schema": {"type": "string", "enum": [codec.value for codec in PREFERENCE]},
                    },
                },
                "content": {"text/event-stream": {"schema": _event_stream_schema()}},
                "x-sse-events": {name: {"$ref": _REF.format(name=_name(cls))} for name, cls in EVENTS.items()},
            },
            "204": {"description": "A resume whose position is already past all_complete: the stream is done."},
            "400": _error_answer("invalid_request", "A parameter breaks a rule; the message names it."),
            "401": _error_answer(
                "unauthenticated",
                "No token, or a token that fails verification; the message names the failed check.",
                {"WWW-Authenticate": {"required": True, "schema": {"type": "string"}}},
            ),
            "429": _error_answer(
                ("too_many_streams", "too_many_requests"),
                "The user already holds the configured number of open streams (too_many_streams), or caused more "
                "warehouse lookups of ids the cache does not know this second than allowed (too_many_requests).",
                {"Retry-After": _retry_after()},
            ),
            "503": _error_answer(
                "unavailable",
                "The replica cannot serve the stream now (Redis unreachable, or draining).",
                {
                    "Retry-After": _retry_after(
                        "Seconds to wait before trying again; sent when Redis is unreachable (a draining "
                        "replica's 503 is retried by the ingress on another replica at once).",
                        required=False,
                    )
                },
            ),
        },
    }


def _parameters() -> list[dict[str, Any]]:
    low, high = params.LIMIT_RANGE
    chunk_low, chunk_high = params.CHUNK_SIZE_RANGE
    name = params.INTERVAL_PATTERN.pattern
    return [
        {
            "name": "id",
            "in": "path",
            "required": True,
            "description": "A job id, or a completed backtest id (bt_...).",
            "schema": {"type": "string", "pattern": f"^{params.ID_PATTERN.pattern}$"},
        },
        {
            "name": "intervals",
            "in": "query",
            "required": True,
            "description": f"1 to {params.MAX_INTERVALS} comma-separated interval names, streamed in this order; "
            "repeats are dropped (first position kept).",
            "schema": {"type": "string", "pattern": f"^{name}(,{name})*$"},
        },
        _query("limit", "Maximum points per interval: the first `limit` in time order.",
               {"type": "integer", "minimum": low, "maximum": high, "default": params.DEFAULT_LIMIT}),
        _query("chunk_size", "Points per data_chunk event.",
               {"type": "integer", "minimum": chunk_low, "maximum": chunk_high, "default": params.DEFAULT_CHUNK_SIZE}),
        _query("follow", "Keep a running job's stream open and send new points live (any letter case).",
               {"type": "string", "enum": ["true", "false", "1", "0"], "default": "false"}),
        _query("order", "sequential: one interval after the other; interleaved: one chunk per interval per round.",
               {"type": "string", "enum": [order.value for order in params.Order], "default": "sequential"}),
        _query("token", "Firebase ID token, for clients that cannot send Authorization (the header wins).",
               {"type": "string"}),
        _query("last_event_id", "Resume after this event id, for clients that cannot send Last-Event-ID "
               "(the header wins).", {"type": "string"}),
        {
            "name": "Last-Event-ID",
            "in": "header",
            "description": "Resume after this event id (opaque; valid only for the same parameters).",
            "schema": {"type": "string"},
        },
        {
            "name": "Accept-Encoding",
            "in": "header",
            "description": "Content codings the client decodes, with q-values: zstd or gzip (zstd at equal "
            "weight), identity otherwise. Browsers send it by themselves.",
            "schema": {"type": "string"},
        },
    ]  # fmt: skip


def _query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


def _retry_after(description: str = "Seconds to wait before trying again.", required: bool = True) -> dict[str, Any]:
    return {"description": description, "required": required, "schema": {"type": "integer", "minimum": 0}}


def _error_answer(
    code: str | tuple[str, ...], description: str, headers: dict[str, Any] | None = None
) -> dict[str, Any]:
    error = {"const": code} if isinstance(code, str) else {"enum": list(code)}
    schema = {"allOf": [{"$ref": _REF.format(name="RequestError")}, {"properties": {"error": error}}]}
    answer: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        answer["headers"] = headers
    return answer


def _event_stream_schema() -> dict[str, Any]:
    branches = [
        {
            "type": "object",
            "properties": {
                "event": {"const": name},
                "id": {"type": "string", "description": "Opaque resume position."},
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": {"$ref": _REF.format(name=_name(cls))},
                },
                "retry": {"type": "integer", "minimum": 0},
            },
            "required": ["event", "id", "data"],
        }
        for name, cls in EVENTS.items()
    ]
    return {"description": "One item per SSE event.", "oneOf": branches}


def _name(cls: type[msgspec.Struct]) -> str:
    return cls.__name__


# -- YAML ----------------------------------------------------------------------
# A tiny emitter (block style; every string JSON-quoted, which YAML reads as
# the same string), so that production needs no YAML library.

_PLAIN_KEY: Final = re.compile(r"[A-Za-z_$][A-Za-z0-9_.$-]*")
_RESERVED: Final = frozenset({"true", "false", "null", "yes", "no", "on", "off", "y", "n", "~"})


def to_yaml(value: Any) -> str:
    """``value`` (dicts, lists, strings, numbers, booleans, None) as block YAML."""
    return "\n".join(_yaml_lines(value, 0)) + "\n"


def _scalar(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _key(key: str) -> str:
    return key if _PLAIN_KEY.fullmatch(key) and key.lower() not in _RESERVED else _scalar(key)


def _yaml_lines(value: Any, indent: int) -> list[str]:
    pad = " " * indent
    lines: list[str] = []
    if isinstance(value, dict):
        if not value:
            return [pad + "{}"]
        for key, item in value.items():
            if isinstance(item, dict | list) and item:
                lines.append(f"{pad}{_key(key)}:")
                lines.extend(_yaml_lines(item, indent + 2))
            else:
                lines.append(f"{pad}{_key(key)}: {_inline(item)}")
    elif isinstance(value, list):
        if not value:
            return [pad + "[]"]
        for item in value:
            if isinstance(item, dict | list) and item:
                nested = _yaml_lines(item, indent + 2)
                lines.append(f"{pad}- {nested[0].lstrip()}")
                lines.extend(nested[1:])
            else:
                lines.append(f"{pad}- {_inline(item)}")
    else:
        lines.append(pad + _inline(value))
    return lines


def _inline(value: Any) -> str:
    if isinstance(value, dict):
        return "{}"
    if isinstance(value, list):
        return "[]"
    return _scalar(value)


# -- TypeScript ----------------------------------------------------------------
# clients/js/src/events.d.ts: the payload types of the JavaScript client, from
# the same components (a test keeps the checked-in file equal to this).


def to_typescript(components: dict[str, Any] | None = None) -> str:
    """TypeScript declarations of every event payload, and the event name -> payload map."""
    components = components if components is not None else event_components()
    lines = [
        "// Generated by `python -m gateway schema --typescript` from the gateway's event structs. Do not edit.",
        "",
        "export type JobStatus = " + " | ".join(json.dumps(status) for status in JOB_STATUSES) + ";",
        "export type StreamErrorCode = " + " | ".join(json.dumps(code) for code in STREAM_ERRORS) + ";",
        "",
    ]
    for name, schema in components.items():
        if schema.get("description"):
            lines.append(f"/** {schema['description']} */")
        lines.append(f"export interface {name} {{")
        required = set(schema.get("required", ()))
        for field, field_schema in schema["properties"].items():
            optional = "" if field in required else "?"
            lines.append(f"  {field}{optional}: {_ts_type(field_schema)};")
        lines.extend(["}", ""])
    lines.append("/** Event name -> payload. */")
    lines.append("export interface EventPayloads {")
    lines.extend(f"  {name}: {_name(cls)};" for name, cls in EVENTS.items())
    lines.extend(["}", ""])
    return "\n".join(lines)


def _ts_type(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        return str(schema["$ref"]).rsplit("/", 1)[-1]
    if "anyOf" in schema:
        return " | ".join(_ts_type(option) for option in schema["anyOf"])
    if "enum" in schema:
        values = tuple(schema["enum"])
        if values == JOB_STATUSES:
            return "JobStatus"
        if values == STREAM_ERRORS:
            return "StreamErrorCode"
        return " | ".join(json.dumps(value) for value in values)
    kind = schema.get("type")
    if kind == "array":
        item = _ts_type(schema["items"])
        return f"({item})[]" if "|" in item else f"{item}[]"
    if kind == "object":
        return f"Record<string, {_ts_type(schema.get('additionalProperties', {}))}>"
    return {"string": "string", "integer": "number", "number": "number", "boolean": "boolean", "null": "null"}.get(
        str(kind), "unknown"
    )
