"""One typed settings object: ``config.toml`` plus ``GATEWAY_<SECTION>_<KEY>`` overrides.

Every setting, its default and its meaning is documented in ``config.toml``;
the structs below only carry the types and bounds, so a bad value stops
start-up with a message that names the setting (and the variable it came
from, when it came from the environment). A ``GATEWAY_*`` variable that names
no setting is only warned about: Kubernetes injects ``GATEWAY_PORT``,
``GATEWAY_SERVICE_HOST`` and the like into every pod when a Service named
``gateway`` exists, and those must not stop start-up.
"""

from __future__ import annotations

import logging
import os
import random
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from gateway.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "config.toml"
ENV_PREFIX = "GATEWAY_"

Port = Annotated[int, Meta(ge=0, le=65535)]
PositiveSeconds = Annotated[float, Meta(gt=0)]
NonNegativeInt = Annotated[int, Meta(ge=0)]
PositiveInt = Annotated[int, Meta(ge=1)]
# Project ids, dataset and table names as BigQuery allows them (a safe subset);
# they are spliced into SQL as identifiers, so nothing else may pass.
BIGQUERY_IDENTIFIER = r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,1023}\Z"
BigQueryName = Annotated[str, Meta(pattern=BIGQUERY_IDENTIFIER)]
# The project may be empty: the warehouse is then not configured (SPEC 9).
BigQueryProject = Annotated[str, Meta(pattern=r"^\Z|" + BIGQUERY_IDENTIFIER)]


class _Section(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """A config section: unknown keys are typos, and typos stop start-up."""


class ServerSettings(_Section, frozen=True):
    host: str = "127.0.0.1"
    port: Port = 8080
    retry_ms: NonNegativeInt = 3000
    retry_jitter: Annotated[float, Meta(ge=0, le=10)] = 1.0
    ping_interval_s: PositiveSeconds = 15.0
    send_timeout_s: PositiveSeconds = 30.0
    max_streams_per_user: NonNegativeInt = 8
    stream_slot_ttl_s: Annotated[int, Meta(ge=5)] = 60
    shutdown_grace_s: Annotated[float, Meta(ge=0)] = 5.0
    access_log: bool = True
    workers: Annotated[int, Meta(ge=1, le=512)] | Literal["auto"] = 1

    def jittered_retry_ms(self) -> int:
        """One connection's ``retry:``: ``retry_ms`` stretched by up to ``retry_jitter``, at random."""
        return round(self.retry_ms * (1 + self.retry_jitter * random.random()))  # noqa: S311 (not crypto)


class RedisSettings(_Section, frozen=True):
    url: str = ""
    cluster: bool = False
    max_connections: PositiveInt = 64
    pool_timeout_s: PositiveSeconds = 5.0
    socket_timeout_s: PositiveSeconds = 5.0
    connect_timeout_s: PositiveSeconds = 2.0
    retries: NonNegativeInt = 2
    outage_wait_s: Annotated[float, Meta(ge=0)] = 10.0


class AuthSettings(_Section, frozen=True):
    firebase_project_id: str = "demo-candles"
    certs_url: str = "https://www.googleapis.com/robot/v1/metadata/x509/securetoken@system.gserviceaccount.com"
    admin_claim: str = "admin"
    clock_skew_s: Annotated[int, Meta(ge=0, le=600)] = 30
    unknown_kid_refresh_interval_s: PositiveSeconds = 30.0
    fetch_timeout_s: PositiveSeconds = 5.0
    default_max_age_s: PositiveSeconds = 300.0


class BigQuerySettings(_Section, frozen=True):
    project: BigQueryProject = ""
    dataset: BigQueryName = "backtests"
    backtests_table: BigQueryName = "backtests"
    candles_table: BigQueryName = "candles"
    api_endpoint: str = ""
    location: str = ""
    query_timeout_s: PositiveSeconds = 30.0
    max_workers: PositiveInt = 8
    page_rows: Annotated[int, Meta(ge=100, le=100_000)] = 10_000
    missing_ttl_s: PositiveInt = 60
    max_lookups_per_user_per_s: NonNegativeInt = 10
    fill_lock_ttl_s: Annotated[float, Meta(ge=0.5)] = 5.0


class CacheSettings(_Section, frozen=True):
    ttl_s: PositiveInt = 7 * 24 * 3600


class FollowSettings(_Section, frozen=True):
    recheck_interval_s: PositiveSeconds = 1.0
    status_min_interval_s: PositiveSeconds = 0.25
    max_reads_in_flight: PositiveInt = 16


# Content codings of streams, in the server's order of preference; empty (or
# "identity") turns compression off.
CODEC_LIST = r"^\s*((zstd|gzip|identity)\s*(,\s*(zstd|gzip|identity)\s*)*)?\Z"


class CompressionSettings(_Section, frozen=True):
    codecs: Annotated[str, Meta(pattern=CODEC_LIST)] = "zstd,gzip"


class LogSettings(_Section, frozen=True):
    format: Literal["text", "json"] = "text"
    level: Literal["debug", "info", "warning", "error"] = "info"


class MetricsSettings(_Section, frozen=True):
    port: Port = 9090


class DevSettings(_Section, frozen=True):
    state_dir: str = ".dev"


class Settings(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Every setting of the gateway, grouped as in ``config.toml``."""

    server: ServerSettings = ServerSettings()
    redis: RedisSettings = RedisSettings()
    auth: AuthSettings = AuthSettings()
    bigquery: BigQuerySettings = BigQuerySettings()
    cache: CacheSettings = CacheSettings()
    follow: FollowSettings = FollowSettings()
    compression: CompressionSettings = CompressionSettings()
    log: LogSettings = LogSettings()
    metrics: MetricsSettings = MetricsSettings()
    dev: DevSettings = DevSettings()


_SECTIONS: dict[str, type[_Section]] = {
    name: field.type
    for name, field in zip(
        Settings.__struct_fields__,
        msgspec.structs.fields(Settings),
        strict=True,
    )
}
_ERROR_PATH = re.compile(r" - at `\$\.?([^`]*)`$")
# msgspec names a pattern by its regex; people want to read what it allows.
_PATTERN_MEANINGS = {
    f"Expected `str` matching regex {pattern!r}": "must be a BigQuery identifier"
    " (letters, digits, '_' and '-', not starting with '-')"
    for pattern in (BIGQUERY_IDENTIFIER, r"^\Z|" + BIGQUERY_IDENTIFIER)
} | {
    f"Expected `str` matching regex {CODEC_LIST!r}": "must be a comma-separated list of zstd, gzip"
    " (empty or identity: no compression)"
}


def load_settings(
    path: Path | str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Read ``config.toml`` (or ``path``), apply ``GATEWAY_*`` overrides, validate."""
    config_path = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    try:
        with config_path.open("rb") as file:
            raw: dict[str, Any] = tomllib.load(file)
    except FileNotFoundError as exc:
        raise ConfigError(str(config_path), "file not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(config_path), f"not valid TOML: {exc}") from exc

    from_env: dict[str, str] = {}
    unknown: list[str] = []
    for name, value in (os.environ if environ is None else environ).items():
        if not name.startswith(ENV_PREFIX):
            continue
        setting = _split_env_name(name)
        if setting is None:
            unknown.append(name)
            continue
        section, key = setting
        raw.setdefault(section, {})[key] = value
        from_env[f"{section}.{key}"] = name
    if unknown:
        # Names only: a value may be a secret (or a Service's address), and is no use here.
        log.warning(
            "ignoring %d environment variable(s) that name no setting (expected GATEWAY_<SECTION>_<KEY>): %s",
            len(unknown),
            ", ".join(sorted(unknown)),
        )
    return _convert(raw, from_env)


def with_overrides(settings: Settings, **sections: Mapping[str, Any]) -> Settings:
    """A copy of ``settings`` with some keys replaced, validated like the file."""
    raw = msgspec.to_builtins(settings)
    for section, values in sections.items():
        raw[section].update(values)
    return _convert(raw, {})


def _split_env_name(name: str) -> tuple[str, str] | None:
    """The (section, key) a ``GATEWAY_*`` variable overrides, or None if it names no setting."""
    rest = name[len(ENV_PREFIX) :].lower()
    for section, struct in _SECTIONS.items():
        if rest.startswith(section + "_"):
            key = rest[len(section) + 1 :]
            if key in struct.__struct_fields__:
                return section, key
    return None


def _convert(raw: dict[str, Any], from_env: Mapping[str, str]) -> Settings:
    try:
        # strict=False lets environment strings become ints, floats and bools.
        return msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        text = str(exc)
        match = _ERROR_PATH.search(text)
        setting = match.group(1) if match else "config"
        reason = _ERROR_PATH.sub("", text)
        reason = _PATTERN_MEANINGS.get(reason, reason)
        if setting in from_env:
            setting = f"{setting} ({from_env[setting]})"
        raise ConfigError(setting, reason) from exc
