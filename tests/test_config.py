"""Configuration (SPEC 9): config.toml plus GATEWAY_* overrides, and start-up refusing bad values."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import Settings, _split_env_name, load_settings
from gateway.errors import ConfigError

CONFIG_TOML = Path(__file__).resolve().parent.parent / "config.toml"


def test_config_toml_holds_every_setting_with_the_struct_defaults():
    # A key missing from config.toml, or a default that differs, is a documentation bug.
    import tomllib

    documented = tomllib.loads(CONFIG_TOML.read_text())
    defaults = Settings()
    for section in Settings.__struct_fields__:
        struct = getattr(defaults, section)
        assert set(documented[section]) == set(struct.__struct_fields__), section
        for key in struct.__struct_fields__:
            default = getattr(struct, key)
            # TOML has arrays, the structs tuples (server.cors_origins).
            assert documented[section][key] == (list(default) if isinstance(default, tuple) else default), (
                f"{section}.{key}"
            )


def readme_settings_table() -> dict[str, tuple[str, object, str]]:
    """README's settings table: ``section.key`` -> (variable, default, meaning)."""
    import tomllib

    text = (CONFIG_TOML.parent / "README.md").read_text()
    section = text[text.index("## Configuration") :]
    section = section[: section.index("\n## ", 1)]
    rows: dict[str, tuple[str, object, str]] = {}
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [cell.strip() for cell in line.strip("|").split(" | ")]
        assert len(cells) == 4, line
        setting, variable, default, meaning = (cell.strip("`") if i < 3 else cell for i, cell in enumerate(cells))
        assert setting not in rows, f"{setting} twice"
        rows[setting] = (variable, tomllib.loads(f"value = {default}")["value"], meaning)
    return rows


def _as_toml(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


def test_readme_table_config_toml_and_defaults_name_the_same_settings_with_the_same_defaults():
    import tomllib

    documented = tomllib.loads(CONFIG_TOML.read_text())
    defaults = Settings()
    in_package = {
        # TOML has no tuple: a list setting's default (a tuple in the struct) reads back as a list.
        f"{section}.{key}": _as_toml(getattr(getattr(defaults, section), key))
        for section in Settings.__struct_fields__
        for key in getattr(defaults, section).__struct_fields__
    }
    in_file = {f"{section}.{key}": value for section, keys in documented.items() for key, value in keys.items()}
    table = readme_settings_table()
    assert set(table) == set(in_package) == set(in_file)
    for setting, (variable, default, meaning) in table.items():
        assert variable == "GATEWAY_" + setting.replace(".", "_").upper(), setting
        assert default == in_package[setting] == in_file[setting], setting
        assert meaning, f"{setting} has no meaning in README"
        # The variable the table names is the one that sets it.
        assert _split_env_name(variable) == tuple(setting.split(".")), setting


def test_environment_overrides_convert_to_the_setting_type():
    settings = load_settings(
        environ={
            "GATEWAY_SERVER_PORT": "9090",
            "GATEWAY_REDIS_URL": "redis://redis:6379/0",
            "GATEWAY_AUTH_FIREBASE_PROJECT_ID": "prod-project",
            "GATEWAY_SERVER_ACCESS_LOG": "false",
            "GATEWAY_FOLLOW_RECHECK_INTERVAL_S": "0.5",
            "UNRELATED": "ignored",
        }
    )
    assert settings.server.port == 9090
    assert settings.redis.url == "redis://redis:6379/0"
    assert settings.auth.firebase_project_id == "prod-project"
    assert settings.server.access_log is False
    assert settings.follow.recheck_interval_s == 0.5


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"GATEWAY_SERVER_PORT": "eighty"}, "server.port (GATEWAY_SERVER_PORT)"),
        ({"GATEWAY_SERVER_PORT": "70000"}, "server.port (GATEWAY_SERVER_PORT)"),
        ({"GATEWAY_SERVER_PING_INTERVAL_S": "0"}, "server.ping_interval_s (GATEWAY_SERVER_PING_INTERVAL_S)"),
        ({"GATEWAY_BIGQUERY_PAGE_ROWS": "5"}, "bigquery.page_rows (GATEWAY_BIGQUERY_PAGE_ROWS)"),
        ({"GATEWAY_BIGQUERY_DATASET": "bad name"}, "bigquery.dataset (GATEWAY_BIGQUERY_DATASET)"),
        ({"GATEWAY_BIGQUERY_PROJECT": "p`; DROP"}, "bigquery.project (GATEWAY_BIGQUERY_PROJECT)"),
        ({"GATEWAY_BIGQUERY_CANDLES_TABLE": "-x"}, "bigquery.candles_table (GATEWAY_BIGQUERY_CANDLES_TABLE)"),
        ({"GATEWAY_BIGQUERY_BACKTESTS_TABLE": "a\n"}, "bigquery.backtests_table (GATEWAY_BIGQUERY_BACKTESTS_TABLE)"),
    ],
)
def test_a_bad_value_is_refused_naming_the_setting(environ, named):
    with pytest.raises(ConfigError) as caught:
        load_settings(environ=environ)
    assert caught.value.message.startswith(f"setting {named}:")


def test_a_typo_in_the_file_is_refused_naming_it(tmp_path: Path):
    path = tmp_path / "config.toml"
    path.write_text("[server]\nprot = 80\n")
    with pytest.raises(ConfigError, match="server") as caught:
        load_settings(path, environ={})
    assert "prot" in caught.value.message


def test_serve_with_a_bad_setting_stops_with_a_message_naming_it():
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve"],
        env={"GATEWAY_SERVER_PORT": "not-a-port", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "server.port (GATEWAY_SERVER_PORT)" in result.stderr


def test_a_bad_bigquery_name_in_the_file_is_refused_naming_it(tmp_path: Path):
    path = tmp_path / "config.toml"
    path.write_text('[bigquery]\nproject = "prod"\ndataset = "back.tests"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    assert caught.value.message == (
        "setting bigquery.dataset: must be a BigQuery identifier (letters, digits, '_' and '-', not starting with '-')"
    )


# What Kubernetes injects into every pod of a namespace with a Service named "gateway".
SERVICE_LINKS = {
    "GATEWAY_PORT": "tcp://10.96.0.17:8080",
    "GATEWAY_SERVICE_HOST": "10.96.0.17",
    "GATEWAY_SERVICE_PORT": "8080",
    "GATEWAY_SERVICE_PORT_HTTP": "8080",
    "GATEWAY_PORT_8080_TCP": "tcp://10.96.0.17:8080",
    "GATEWAY_PORT_8080_TCP_PROTO": "tcp",
    "GATEWAY_PORT_8080_TCP_PORT": "8080",
    "GATEWAY_PORT_8080_TCP_ADDR": "10.96.0.17",
}


def test_service_link_variables_are_one_warning_naming_them_without_values(caplog):
    with caplog.at_level(logging.WARNING, logger="gateway.config"):
        settings = load_settings(environ={**SERVICE_LINKS, "GATEWAY_REDIS_PORT": "tcp://10.96.0.9:6379",
                                          "GATEWAY_SERVER_PORT": "9090"})  # fmt: skip
    assert settings.server.port == 9090
    assert len(caplog.records) == 1
    line = caplog.records[0].getMessage()
    for name in [*SERVICE_LINKS, "GATEWAY_REDIS_PORT"]:
        assert name in line
    assert "GATEWAY_SERVER_PORT," not in line and not line.endswith("GATEWAY_SERVER_PORT")
    for value in [*SERVICE_LINKS.values(), "tcp://10.96.0.9:6379"]:
        assert value not in line.replace("GATEWAY_PORT_8080", "")


def test_a_variable_that_names_no_setting_stops_start_up_naming_it_without_its_value():
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={**SERVICE_LINKS, "GATEWAY_SERVER_POTR": "secret-ish", "GATEWAY_NOTHING_LIKE": "x"})
    message = caught.value.message
    assert message.startswith(
        "environment variables GATEWAY_NOTHING_LIKE, GATEWAY_SERVER_POTR (did you mean GATEWAY_SERVER_PORT?)"
        " name no setting"
    )
    assert "secret-ish" not in message and "GATEWAY_SERVICE_HOST" not in message


def _gateway_command(*arguments: str, environ: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *arguments],
        env={"PATH": "/usr/bin:/bin", **environ},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_pod_with_service_link_variables_starts(tmp_path: Path):
    """``token`` loads the settings exactly as ``serve`` does, without needing a store."""
    result = _gateway_command("token", environ={**SERVICE_LINKS, "GATEWAY_DEV_STATE_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(".") == 2  # a token
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "GATEWAY_SERVICE_HOST" in warnings[0]
    assert "10.96.0.17" not in result.stderr


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("GATEWAY_BIGQUERY_DATASET", "bad name"),
        ("GATEWAY_BIGQUERY_PROJECT", "my project"),
        ("GATEWAY_BIGQUERY_CANDLES_TABLE", "candles`; --"),
    ],
)
def test_serve_with_a_bad_bigquery_name_stops_with_one_line_naming_it(variable, value):
    environ = {
        "GATEWAY_BIGQUERY_PROJECT": "prod-project",
        "GATEWAY_REDIS_URL": "redis://127.0.0.1:1/0",
        variable: value,
    }
    try:
        result = _gateway_command("serve", environ=environ)
    except subprocess.TimeoutExpired:
        pytest.fail("serve did not stop on a bad BigQuery name")
    assert result.returncode == 2, result.stderr[-2000:]
    setting = variable.removeprefix("GATEWAY_").lower().replace("bigquery_", "bigquery.", 1)
    assert result.stderr.splitlines() == [
        f"configuration error: setting {setting} ({variable}): must be a BigQuery identifier"
        " (letters, digits, '_' and '-', not starting with '-')"
    ]


def test_a_setting_refused_only_at_start_up_is_the_same_one_line(monkeypatch, capsys):
    """Defence in depth: a ConfigError from building the app is not a traceback either."""
    import gateway.server
    from gateway.__main__ import main

    def refuse(settings):
        raise ConfigError("bigquery.dataset", "must be a BigQuery identifier")

    monkeypatch.setattr(gateway.server, "serve", refuse)
    # main() installs its log handler on the root logger, bound to this test's captured stderr.
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    assert main(["serve"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "configuration error: setting bigquery.dataset: must be a BigQuery identifier"
    ]


# Every configuration mistake through the real command line: one line on stderr, exit status 2.
ONE_LINE_MISTAKES = [
    pytest.param(
        {"GATEWAY_REDIS_URLL": "redis://redis:6379/0"},
        "",
        "configuration error: environment variable GATEWAY_REDIS_URLL (did you mean GATEWAY_REDIS_URL?) names no"
        " setting (expected GATEWAY_<SECTION>_<KEY>, e.g. GATEWAY_REDIS_URL; every setting is listed in config.toml)",
        id="unknown-variable",
    ),
    pytest.param(
        {"GATEWAY_REDIS_URL": "http://redis:6379/0"},
        "",
        "configuration error: setting redis.url (GATEWAY_REDIS_URL): scheme http://: use redis://, rediss:// (TLS)"
        " or unix://, e.g. redis://redis:6379/0",
        id="scheme",
    ),
    pytest.param(
        {"GATEWAY_REDIS_URL": "redis:6379"},
        "",
        "configuration error: setting redis.url (GATEWAY_REDIS_URL): no host: write redis://redis:6379/0",
        id="no-host",
    ),
    pytest.param(
        {"GATEWAY_REDIS_URL": "redis://user:hunter2@red_is,x:6379/0"},
        "",
        "configuration error: setting redis.url (GATEWAY_REDIS_URL): host 'red_is,x' is not a host name or an IP"
        " address",
        id="host",
    ),
    pytest.param(
        {"GATEWAY_REDIS_URL": "redis://:hunter2@redis:637900/0"},
        "",
        "configuration error: setting redis.url (GATEWAY_REDIS_URL): port '637900' is not a number from 1 to 65535"
        " (leave it out for 6379)",
        id="port",
    ),
    pytest.param(
        {"GATEWAY_REDIS_URL": "redis://redis:6379/cache"},
        "",
        "configuration error: setting redis.url (GATEWAY_REDIS_URL): the database (the path) must be a number,"
        " e.g. redis://redis:6379/0",
        id="database",
    ),
    pytest.param(
        {"GATEWAY_REDIS_URL": "rediss://redis:6379/0?ssl_ca_certs=/etc/ca.pem"},
        "",
        "configuration error: setting redis.url (GATEWAY_REDIS_URL): query parameters are not read (ssl_ca_certs):"
        " TLS is redis.tls_ca_file, tls_cert_file and tls_key_file; timeouts and the pool are other redis.* settings",
        id="query",
    ),
    pytest.param(
        {},
        "[redis]\nurl = 'http://redis'\n",
        "configuration error: setting redis.url: scheme http://: use redis://, rediss:// (TLS) or unix://,"
        " e.g. redis://redis:6379/0",
        id="scheme-in-file",
    ),
    pytest.param(
        {"GATEWAY_REDIS_URL": "redis://redis:6379/0"},
        "[server]\nprot = 80\n",
        "configuration error: config file: server.prot is not a setting (did you mean server.port?)",
        id="unknown-key",
    ),
    pytest.param(
        {"GATEWAY_REDIS_URL": "redis://redis:6379/0"},
        "[sever]\nport = 80\n",
        "configuration error: config file: [sever] is not a section (did you mean server?); the sections are"
        " server, redis, auth, bigquery, cache, follow, compression, log, metrics, dev",
        id="unknown-section",
    ),
    pytest.param(
        {"GATEWAY_AUTH_CERTS_URL": "www.googleapis.com/robot"},
        "",
        "configuration error: setting auth.certs_url (GATEWAY_AUTH_CERTS_URL): no scheme: use http:// or https://",
        id="certs-url",
    ),
    pytest.param(
        {},
        "",
        "configuration error: setting redis.url (GATEWAY_REDIS_URL): empty: serve needs a Redis,"
        " e.g. GATEWAY_REDIS_URL=redis://redis:6379/0 (an embedded Valkey is for `candle-gateway dev` only)",
        id="empty-redis-url",
    ),
]


@pytest.mark.parametrize(("environ", "file_text", "line"), ONE_LINE_MISTAKES)
def test_each_configuration_mistake_is_one_line_and_exit_status_2(environ, file_text, line, tmp_path: Path):
    arguments = ["serve"]
    if file_text:
        config = tmp_path / "gateway.toml"
        config.write_text(file_text)
        arguments += ["--config", str(config)]
    # Ports of the kernel's choosing, should a mistake be accepted and the gateway start.
    result = _gateway_command(*arguments, environ={"GATEWAY_SERVER_PORT": "0", "GATEWAY_METRICS_PORT": "0", **environ})
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.splitlines() == [line]
    assert "hunter2" not in result.stderr


# An empty redis.url is refused by serve, not by the settings: dev starts a Valkey for it.
@pytest.mark.parametrize(("environ", "file_text", "line"), [p for p in ONE_LINE_MISTAKES if p.id != "empty-redis-url"])
def test_each_mistake_is_refused_when_the_settings_load(environ, file_text, line, tmp_path: Path):
    """The same mistakes in process (what the command line prints is this message)."""
    path = None
    if file_text:
        path = tmp_path / "gateway.toml"
        path.write_text(file_text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ=environ)
    assert f"configuration error: {caught.value.message}" == line
