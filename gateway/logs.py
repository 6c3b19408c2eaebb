"""Logging: one format for the whole process, and nothing in it that a request could abuse.

- ``configure_logging`` installs one stderr handler on the root logger,
  readable text by default or one JSON object per line (``log.format``).
- No line ever holds a token: ``RedactingFilter`` sits on that handler and
  on aiohttp's own loggers (whose parser errors quote the raw request line,
  ``Authorization`` header included) and rewrites the formatted message, its
  arguments and any traceback, replacing ``token=...``, ``Bearer ...`` and
  JWT-shaped strings, percent-encoded or not.
- No line is forged by a request: ``escape`` writes control and other
  non-printable characters as ``\\xNN`` in everything taken from a request.
- ``STREAMS`` (``gateway.streams``) carries the one line per stream when it
  ends; its fields go in ``extra={"fields": {...}}`` and become ``key=value``
  pairs in text or keys of the JSON object.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

STREAMS: Final = logging.getLogger("gateway.streams")

REDACTED: Final = "[redacted]"
_SECRETS = re.compile(
    r"""
    (?P<param>(?:token|access_token|id_token)=)[^&\s"']*       # a query parameter
    | (?P<bearer>Bearer)[ \t]+[^\s"',]+                       # an Authorization header value
    | eyJ[A-Za-z0-9_-]{8,}(?:\.[A-Za-z0-9_-]*)*              # a JWT (or its first parts), wherever it is
    """,
    re.IGNORECASE | re.VERBOSE,
)
# %XX of a printable ASCII character (a token's are all printable): the only ones
# decoded before redaction, so that decoding never makes a control character.
_PRINTABLE_ESCAPE = re.compile(r"%(2[0-9A-Fa-f]|[3-6][0-9A-Fa-f]|7[0-9A-Ea-e])")
_DECODE_ROUNDS: Final = 3  # %2574 is %74 is t: a request may be encoded more than once
_UNPRINTABLE = re.compile(r"[^\x20-\x7e\u00a0-\ud7ff\ue000-\ufffd]")
# aiohttp's loggers: the parser's errors and the access log carry request bytes.
_AIOHTTP_LOGGERS: Final = ("aiohttp.server", "aiohttp.access", "aiohttp.web", "aiohttp.internal", "aiohttp.client")


def redact(text: str) -> str:
    """``text`` without tokens: query parameters, bearer values and JWT-shaped strings.

    Also when percent-encoded (``%74oken=%65yJ...``, as a request the HTTP
    parser rejects is logged as it came): a text holding a token only once
    decoded is logged decoded, and redacted.
    """
    if "%" in text:
        text = _decoded_if_secret(text)
    if "=" not in text and "ey" not in text and "earer" not in text:
        return text  # the common case, without running the expression
    return _SECRETS.sub(_replacement, text)


def _decoded_if_secret(text: str) -> str:
    decoded = text
    for _ in range(_DECODE_ROUNDS):
        once = _PRINTABLE_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), decoded)
        if once == decoded:
            break
        decoded = once
    return decoded if decoded != text and _SECRETS.search(decoded) else text


def _replacement(match: re.Match[str]) -> str:
    if match.group("param"):
        return match.group("param") + REDACTED
    if match.group("bearer"):
        return match.group("bearer") + " " + REDACTED
    return REDACTED


def escape(text: str) -> str:
    """``text`` with control and non-printable characters as ``\\xNN``: one request, one line."""
    return _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def clean(text: str) -> str:
    """Escaped and redacted: for anything a request sent."""
    return redact(escape(text))


class RedactingFilter(logging.Filter):
    """Rewrites each record so that its message, arguments and traceback hold no token."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            message = str(record.msg)
        # aiohttp's messages are one line (tracebacks go apart); ours may span lines on purpose.
        record.msg = escape(redact(message)) if record.name.startswith("aiohttp") else escape_lines(redact(message))
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def escape_lines(text: str) -> str:
    """Escapes carriage returns and other controls but keeps real line breaks of our own messages."""
    return "\n".join(escape(line) for line in text.split("\n"))


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...``; the whole line redacted once more."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            line += "".join(f" {key}={_text_value(value)}" for key, value in fields.items())
        return redact(line)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time``, ``level``, ``logger``, ``message``, then the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            entry.update(fields)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        return redact(json.dumps(entry, default=str, ensure_ascii=True))


def _text_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, list | tuple):
        return ",".join(escape(str(item)) for item in value)
    text = escape(str(value))
    return text if text and " " not in text and '"' not in text else json.dumps(text)


def configure_logging(log_format: str = "text", level: int = logging.INFO) -> logging.Handler:
    """One stderr handler on the root logger, in ``log_format``, that never writes a token; returns it."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_gateway", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._gateway = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RedactingFilter())
    root.addHandler(handler)
    root.setLevel(level)
    install_redaction()
    return handler


def install_redaction() -> None:
    """The filter on aiohttp's loggers too, so that records are clean for every handler (tests' too)."""
    for name in _AIOHTTP_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in logger.filters):
            logger.addFilter(RedactingFilter())
