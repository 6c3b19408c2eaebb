"""Configuration (SPEC 9): config.toml plus GATEWAY_* overrides, and start-up refusing bad values."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import DEFAULT_CONFIG_PATH, Settings, load_settings
from gateway.errors import ConfigError


def test_config_toml_holds_every_setting_with_the_struct_defaults():
    # A key missing from config.toml, or a default that differs, is a documentation bug.
    import tomllib

    documented = tomllib.loads(DEFAULT_CONFIG_PATH.read_text())
    defaults = Settings()
    for section in Settings.__struct_fields__:
        struct = getattr(defaults, section)
        assert set(documented[section]) == set(struct.__struct_fields__), section
        for key in struct.__struct_fields__:
            assert documented[section][key] == getattr(struct, key), f"{section}.{key}"


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
        ({"GATEWAY_SERVER_POTR": "80"}, "GATEWAY_SERVER_POTR"),
        ({"GATEWAY_NOSUCH_KEY": "1"}, "GATEWAY_NOSUCH_KEY"),
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
