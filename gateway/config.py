"""One typed settings object: defaults, an optional config file, then ``GATEWAY_<SECTION>_<KEY>`` overrides.

The defaults live here, in the package: an installed gateway needs no file,
and ``GATEWAY_*`` variables alone configure it. A file (``--config PATH``,
the repository's ``config.toml`` is the documented template) overrides the
defaults it names. Every setting, its default and its meaning is documented
in ``config.toml`` (a test holds it to the structs below, which carry the
types and bounds), so a bad value stops start-up with a message that names
the setting (and the variable it came from, when it came from the
environment). A ``GATEWAY_*`` variable or a file
key that names no setting stops start-up too, suggesting the closest one;
only the names Kubernetes injects for Services (``GATEWAY_SERVICE_HOST``,
``GATEWAY_PORT_8080_TCP``, ... when a Service is named ``gateway``) are
merely warned about (docs/DECISIONS.md).
"""

from __future__ import annotations

import difflib
import logging
import os
import random
import re
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec
from msgspec import Meta

from gateway.config_checks import http_url_problem, readable_file_problem, redis_url_problem
from gateway.errors import ConfigError, GatewayError

log = logging.getLogger(__name__)

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


# A browser's Origin as it sends it: scheme, host, optional port; no path, no trailing slash.
CORS_ORIGIN = r"^https?://([A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?\Z"
CorsOrigin = Annotated[str, Meta(pattern=CORS_ORIGIN)]


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
    max_streams_per_process: NonNegativeInt = 10_000
    max_connections: NonNegativeInt = 0
    header_timeout_s: PositiveSeconds = 10.0
    keepalive_timeout_s: PositiveSeconds = 15.0
    stream_slot_ttl_s: Annotated[int, Meta(ge=5)] = 60
    shutdown_grace_s: Annotated[float, Meta(ge=0)] = 5.0
    access_log: bool = True
    workers: Annotated[int, Meta(ge=1, le=512)] | Literal["auto"] = 1
    # Origins whose pages may read streams cross-origin (gateway/cors.py); empty: same-origin only.
    cors_origins: tuple[CorsOrigin, ...] = ()

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
    password: str = ""
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_check_hostname: bool = True


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
_UNKNOWN_FIELD = re.compile(r"^Object contains unknown field `([^`]*)`$")
# What Kubernetes injects for a Service whose name starts with "gateway" (GATEWAY_SERVICE_HOST,
# GATEWAY_PORT_8080_TCP_ADDR, GATEWAY_REDIS_PORT for a Service "gateway-redis", ...).
_SERVICE_LINK = re.compile(
    r"^[A-Z0-9_]+_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT(_[0-9]+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)?)\Z"
)
# msgspec names a pattern by its regex; people want to read what it allows.
_PATTERN_MEANINGS = {
    f"Expected `str` matching regex {pattern!r}": "must be a BigQuery identifier"
    " (letters, digits, '_' and '-', not starting with '-')"
    for pattern in (BIGQUERY_IDENTIFIER, r"^\Z|" + BIGQUERY_IDENTIFIER)
} | {
    f"Expected `str` matching regex {CORS_ORIGIN!r}": "must be an origin, scheme://host[:port]"
    " (http or https, no path, no trailing slash), e.g. https://app.example.com"
}


def load_settings(
    path: Path | str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """The defaults, overridden by the file at ``path`` (if any), then by ``GATEWAY_*`` variables; validated."""
    raw: dict[str, Any] = {} if path is None else read_config_file(Path(path))

    from_env: dict[str, str] = {}
    unknown: list[str] = []
    service_links: list[str] = []
    for name, value in (os.environ if environ is None else environ).items():
        if not name.startswith(ENV_PREFIX):
            continue
        setting = _split_env_name(name)
        if setting is None:
            (service_links if _SERVICE_LINK.match(name) else unknown).append(name)
            continue
        section, key = setting
        # A list setting (server.cors_origins) comes from the environment comma-separated.
        raw.setdefault(section, {})[key] = _split_list(value) if _is_list(section, key) else value
        from_env[f"{section}.{key}"] = name
    if unknown:
        raise UnknownSettingError(_unknown_variables_message(sorted(unknown)))
    if service_links:
        # Names only: a value is a Service's address, and no use here.
        log.warning(
            "ignoring %d Kubernetes service-link variable(s) that name no setting: %s"
            " (enableServiceLinks: false in the pod spec turns them off)",
            len(service_links),
            ", ".join(sorted(service_links)),
        )
    return _convert(raw, from_env)


def read_config_file(path: Path) -> dict[str, Any]:
    """The TOML file given by ``--config``; ``ConfigFileError`` (one line naming the flag) if it cannot be read."""
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except FileNotFoundError as exc:
        raise ConfigFileError(path, "no such file") from exc
    except IsADirectoryError as exc:
        raise ConfigFileError(path, "is a directory") from exc
    except OSError as exc:
        raise ConfigFileError(path, f"cannot be read ({exc.strerror or exc})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(path, f"is not valid TOML ({exc})") from exc


class UnknownSettingError(ConfigError):
    """A ``GATEWAY_*`` variable or a file key that names no setting (the message suggests the closest)."""

    def __init__(self, message: str) -> None:
        GatewayError.__init__(self, message)
        self.setting = ""


class ConfigFileError(ConfigError):
    """The file named by ``--config`` is missing or unreadable."""

    def __init__(self, path: Path, problem: str) -> None:
        # Not "setting ...": the flag is what the operator typed.
        GatewayError.__init__(self, f"--config {path}: {problem} (every setting has a default; the file is optional)")
        self.setting = "--config"


def with_overrides(settings: Settings, **sections: Mapping[str, Any]) -> Settings:
    """A copy of ``settings`` with some keys replaced, validated like the file."""
    raw = msgspec.to_builtins(settings)
    for section, values in sections.items():
        raw[section].update(values)
    return _convert(raw, {})


def _is_list(section: str, key: str) -> bool:
    return isinstance(getattr(_SECTIONS[section](), key), tuple)


def _split_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _split_env_name(name: str) -> tuple[str, str] | None:
    """The (section, key) a ``GATEWAY_*`` variable overrides, or None if it names no setting."""
    rest = name[len(ENV_PREFIX) :].lower()
    for section, struct in _SECTIONS.items():
        if rest.startswith(section + "_"):
            key = rest[len(section) + 1 :]
            if key in struct.__struct_fields__:
                return section, key
    return None


def _setting_variables() -> list[str]:
    return [f"{ENV_PREFIX}{section}_{key}".upper() for section, struct in _SECTIONS.items()
            for key in struct.__struct_fields__]  # fmt: skip


def _did_you_mean(word: str, choices: list[str]) -> str:
    """`` (did you mean X?)`` when one of ``choices`` is close to ``word`` (a typo), else nothing."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


def _unknown_variables_message(names: list[str]) -> str:
    described = ", ".join(name + _did_you_mean(name, _setting_variables()) for name in names)
    return (
        f"environment variable {described} names no setting (expected GATEWAY_<SECTION>_<KEY>,"
        " e.g. GATEWAY_REDIS_URL; every setting is listed in config.toml)"
        if len(names) == 1
        else f"environment variables {described} name no setting (expected GATEWAY_<SECTION>_<KEY>,"
        " e.g. GATEWAY_REDIS_URL; every setting is listed in config.toml)"
    )


def _unknown_key_message(section: str, key: str) -> str:
    """A file key (``section.key``, or a whole section when ``section`` is empty) that names no setting."""
    if not section:
        return f"config file: [{key}] is not a section{_did_you_mean(key, list(_SECTIONS))}; the sections are " + (
            ", ".join(_SECTIONS)
        )
    keys = list(_SECTIONS[section].__struct_fields__)
    suggestion = _did_you_mean(key, keys)
    if suggestion:
        suggestion = suggestion.replace("mean ", f"mean {section}.")
    return f"config file: {section}.{key} is not a setting{suggestion}"


def _problems(settings: Settings) -> Iterator[tuple[str, str]]:
    """(setting, problem) for each setting that is wrong in a way its type cannot say."""
    redis = settings.redis
    if redis.url:
        problem = redis_url_problem(redis.url)
        if problem:
            yield "redis.url", problem
    for setting, url in (
        ("auth.certs_url", settings.auth.certs_url),
        ("bigquery.api_endpoint", settings.bigquery.api_endpoint),
    ):
        if url:
            problem = http_url_problem(url)
            if problem:
                yield setting, problem
    if redis.password and urlsplit(redis.url).password:
        yield "redis.password", "redis.url holds a password too: set one of them (redis-py would use the URL's)"
    tls_files = {"redis.tls_ca_file": redis.tls_ca_file, "redis.tls_cert_file": redis.tls_cert_file,
                 "redis.tls_key_file": redis.tls_key_file}  # fmt: skip
    for setting, path in tls_files.items():
        if not path:
            continue
        if redis.url and urlsplit(redis.url).scheme != "rediss":
            yield setting, "set, but redis.url is not rediss://: TLS settings need a rediss:// URL"
        problem = readable_file_problem(path)
        if problem:
            yield setting, problem
    if bool(redis.tls_cert_file) != bool(redis.tls_key_file):
        yield "redis.tls_cert_file", "a client certificate needs both redis.tls_cert_file and redis.tls_key_file"


def _convert(raw: dict[str, Any], from_env: Mapping[str, str]) -> Settings:
    try:
        # strict=False lets environment strings become ints, floats and bools.
        settings = msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        text = str(exc)
        match = _ERROR_PATH.search(text)
        setting = match.group(1) if match else "config"
        reason = _ERROR_PATH.sub("", text)
        unknown = _UNKNOWN_FIELD.match(reason)
        if unknown is not None and (match is None or setting in _SECTIONS):
            section = setting if match is not None else ""
            raise UnknownSettingError(_unknown_key_message(section, unknown.group(1))) from exc
        reason = _PATTERN_MEANINGS.get(reason, reason)
        if setting in from_env:
            setting = f"{setting} ({from_env[setting]})"
        raise ConfigError(setting, reason) from exc
    for setting, problem in _problems(settings):
        named = f"{setting} ({from_env[setting]})" if setting in from_env else setting
        raise ConfigError(named, problem)
    return settings
