"""``candle-gateway serve`` run in the test process: ``main([...])``, real ports, real signals.

tests/test_ops_cli.py, tests/test_config.py and tests/test_shutdown.py run
``serve`` as a child process; what runs there is not measured. Here the
same entry point runs in the test process (on its main thread, where the
event loop's signal handlers must live), while a second thread plays the
client and the operator: it waits for the gateway's signal handler, asks the
ports, and sends the signal. Also here: what those tests do not check yet,
the start-up errors of the metrics port and of the host, and a worker that
dies on its own stopping the other.

Running ``serve`` in the test process changes process-wide state (the event
loop policy, signal handlers, the root logger, the garbage collector's
freeze and thresholds, the metrics switch); the fixture puts each back.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import logging
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from gateway.__main__ import main
from gateway.devtools.ports import free_port, free_port_block
from gateway.metrics import SWITCH
from gateway.server import StartupError, bind, run_worker

SIGNALS = (signal.SIGTERM, signal.SIGINT)
GRACE_S = 1.0
WATCHDOG_S = 40.0


def _early(signum: int, _: FrameType | None) -> None:
    raise AssertionError(f"signal {signum} arrived before the gateway installed its handler")


@dataclass
class Serving:
    port: int
    metrics_port: int

    def handler_installed(self, signum: signal.Signals = signal.SIGTERM) -> bool:
        """Whether ``serve`` has replaced the test's own handler (it is then safe to signal the process)."""
        return signal.getsignal(signum) is not _early


@pytest.fixture
def serving(monkeypatch, redis_url, tmp_path) -> Iterator[Serving]:
    """The environment of a ``serve`` on free ports; everything it changes in the process is put back after."""
    for name in list(os.environ):
        if name.startswith("GATEWAY_"):
            monkeypatch.delenv(name)
    ports = Serving(free_port(), free_port_block(2))
    for name, value in {
        "GATEWAY_REDIS_URL": redis_url,
        "GATEWAY_SERVER_HOST": "127.0.0.1",
        "GATEWAY_SERVER_PORT": str(ports.port),
        "GATEWAY_METRICS_PORT": str(ports.metrics_port),
        "GATEWAY_SERVER_SHUTDOWN_GRACE_S": str(GRACE_S),
        "GATEWAY_SERVER_MAX_CONNECTIONS": "50",
        "GATEWAY_DEV_STATE_DIR": str(tmp_path / "dev"),
    }.items():
        monkeypatch.setenv(name, value)
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    monkeypatch.setattr(SWITCH, "on", SWITCH.on)
    policy = asyncio.get_event_loop_policy()
    handlers = {signum: signal.getsignal(signum) for signum in SIGNALS}
    threshold, callbacks = gc.get_threshold(), list(gc.callbacks)
    for signum in SIGNALS:  # a signal sent too early fails the test instead of ending pytest
        signal.signal(signum, _early)
    # A serve that does not stop (a regression, or an operator that failed) would outlast
    # pytest-timeout, whose alarm the running event loop swallows: stop it from outside.
    done = threading.Event()
    fired: list[bool] = []

    def watchdog() -> None:
        if not done.wait(WATCHDOG_S):
            handler = signal.getsignal(signal.SIGTERM)
            if callable(handler) and handler is not _early:  # the gateway's, not the default
                fired.append(True)
                os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watchdog, daemon=True).start()
    try:
        yield ports
    finally:
        done.set()
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        asyncio.set_event_loop_policy(policy)
        gc.unfreeze()
        gc.set_threshold(*threshold)
        gc.callbacks[:] = callbacks
    assert not fired, f"serve was still running after {WATCHDOG_S} s: stopped by the watchdog"


class Operator(threading.Thread):
    """What a client and an operator do while ``serve`` holds the main thread; failures are kept for the test."""

    def __init__(self, script: Callable[[], None]) -> None:
        super().__init__(daemon=True)
        self._script = script
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._script()
        except BaseException as exc:  # reported by the test, on its thread
            self.error = exc

    def result(self) -> None:
        self.join(10)
        assert not self.is_alive()
        if self.error is not None:
            raise self.error


def wait_until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("waited too long")
        time.sleep(0.02)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def answers(port: int) -> bool:
    try:
        return get(f"http://127.0.0.1:{port}/metrics")[0] == 200
    except OSError:
        return False


def closed(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def log_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def index_of(lines: list[str], fragment: str) -> int:
    return next(i for i, line in enumerate(lines) if fragment in line)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_answers_then_stops_on_a_signal_phase_by_phase(serving, capfd, signum):
    seen: dict[str, Any] = {}

    def operate() -> None:
        wait_until(lambda: serving.handler_installed(signum))
        seen["healthz"] = get(f"http://127.0.0.1:{serving.port}/healthz")
        seen["readyz"] = get(f"http://127.0.0.1:{serving.port}/readyz")
        seen["metrics"] = get(f"http://127.0.0.1:{serving.metrics_port}/metrics")
        # A client in the middle of its headers when the signal comes: closed when the port closes.
        seen["held"] = held = socket.create_connection(("127.0.0.1", serving.port), timeout=10)
        held.sendall(b"GET /healthz HTTP/1.1\r\n")
        time.sleep(0.1)
        os.kill(os.getpid(), signum)

    operator = Operator(operate)
    operator.start()
    started = time.monotonic()
    status = main(["serve"])
    took_s = time.monotonic() - started
    operator.result()
    held: socket.socket = seen["held"]
    with held:
        assert held.recv(1024) == b""  # closed by the shutdown, not answered
    assert status == 0
    assert seen["healthz"] == (200, '{"status": "ok"}')
    assert seen["readyz"][0] == 200, seen["readyz"]
    status_code, metrics = seen["metrics"]
    assert status_code == 200
    assert "gateway_connections_open " in metrics and "gateway_connections_refused_total" in metrics
    assert closed(serving.port) and closed(serving.metrics_port)
    assert took_s < 20, took_s
    lines = log_lines(capfd.readouterr().err)
    phases = [
        "at most 50 client connections (server.max_connections)",
        f"serving on http://127.0.0.1:{serving.port} (worker 1 of 1, pid {os.getpid()}); "
        f"metrics http://127.0.0.1:{serving.metrics_port}/metrics",
        f"{signum.name} received: shutting down",
        f"draining: readiness and new streams answer 503; 0 open streams have {GRACE_S:.1f} s to end",
        f"stopped (pid {os.getpid()})",
    ]
    positions = [index_of(lines, phase) for phase in phases]
    assert positions == sorted(positions), lines


def test_serve_without_a_metrics_port_says_metrics_are_off(serving, monkeypatch, capfd):
    monkeypatch.setenv("GATEWAY_METRICS_PORT", "0")

    def operate() -> None:
        wait_until(serving.handler_installed)
        assert get(f"http://127.0.0.1:{serving.port}/healthz")[0] == 200
        os.kill(os.getpid(), signal.SIGTERM)

    operator = Operator(operate)
    operator.start()
    assert main(["serve"]) == 0
    operator.result()
    err = capfd.readouterr().err
    assert "metrics off (metrics.port = 0)" in err, err
    assert SWITCH.on is False  # the per-event metrics are not counted when nothing can read them


def test_a_busy_port_is_one_logged_line_and_status_2_before_anything_starts(serving, capfd):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", serving.metrics_port))
        holder.listen()
        assert main(["serve"]) == 2
    lines = log_lines(capfd.readouterr().err)
    assert len(lines) == 1, lines
    assert (
        f"metrics port {serving.metrics_port} is in use: stop what holds it, or set GATEWAY_METRICS_PORT or "
        "metrics.port" in lines[0]
    )
    assert closed(serving.port)  # the public port bound first is let go again


def test_a_host_that_cannot_be_listened_on_names_the_host_setting():
    # 192.0.2.1 (TEST-NET-1) is no address of this machine; the name does not resolve.
    for host in ("192.0.2.1", "no-such-host.invalid"):
        with pytest.raises(StartupError) as refused:
            bind(host, free_port(), reuse_port=False, what="port", setting="SERVER_PORT")
        message = str(refused.value)
        assert message.startswith(f"cannot listen on {host}:"), message
        assert message.endswith("set GATEWAY_SERVER_HOST or server.host"), message
        assert "\n" not in message


def test_workers_on_one_port_each_bind_it_with_reuse_port():
    port = free_port()
    first = bind("127.0.0.1", port, reuse_port=True, what="port", setting="SERVER_PORT")
    second = bind("127.0.0.1", port, reuse_port=True, what="port", setting="SERVER_PORT")
    try:
        assert first.getsockname() == second.getsockname() == ("127.0.0.1", port)
        with pytest.raises(StartupError, match=f"port {port} is in use"):  # without it, the port is taken
            bind("127.0.0.1", port, reuse_port=False, what="port", setting="SERVER_PORT")
    finally:
        first.close()
        second.close()


def test_a_config_file_that_cannot_be_read_is_one_line_and_status_2(serving, tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nretry_ms = 'soon'\n")
    assert main(["serve", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("configuration error: ") and "server.retry_ms" in err and err.count("\n") == 1, err
    assert closed(serving.port)


def test_run_worker_reports_a_start_up_error_as_status_2(serving, caplog):
    from gateway.config import load_settings

    settings = load_settings()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", serving.port))
        holder.listen()
        assert run_worker(settings, index=0, workers=1) == 2
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in records] == [
        f"port {serving.port} is in use: stop what holds it, or set GATEWAY_SERVER_PORT or server.port"
    ]
    assert closed(serving.metrics_port)  # never bound: the public port is looked at first


def _children() -> set[int]:
    mine = os.getpid()
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == mine:
                found.add(int(entry.name))
    return found


def test_a_worker_that_dies_on_its_own_stops_the_other_and_the_status_says_so(serving, capfd):
    """Two workers forked from the test process; one is killed: the parent stops the other and exits 1."""
    before = _children()
    killed: list[int] = []

    def operate() -> None:
        wait_until(lambda: answers(serving.metrics_port) and answers(serving.metrics_port + 1))
        workers = _children() - before
        assert len(workers) == 2, workers
        killed.append(min(workers))
        os.kill(killed[0], signal.SIGKILL)

    operator = Operator(operate)
    operator.start()
    started = time.monotonic()
    status = main(["serve", "--workers", "2"])
    took_s = time.monotonic() - started
    operator.result()
    assert status == 1
    assert took_s < 30, took_s
    assert not (_children() - before)  # no worker left behind
    assert closed(serving.port)
    err = capfd.readouterr().err
    assert f"started 2 workers on port {serving.port}" in err, err
    assert f"worker pid {killed[0]} exited with status -9: stopping the others" in err, err
    assert "SIGTERM received: stopping 2 workers" in err
    assert err.count("SIGTERM received: shutting down") == 1  # the surviving worker, drained
    assert "all workers stopped" in err


def test_workers_must_be_a_number_of_at_least_one_or_auto(capsys):
    for value in ("0", "two"):
        with pytest.raises(SystemExit) as refused:
            main(["serve", "--workers", value])
        assert refused.value.code == 2
        assert f"argument --workers: expected a number >= 1 or 'auto', got '{value}'" in capsys.readouterr().err


def test_serve_without_a_redis_url_is_one_line_and_status_2(serving, monkeypatch, capsys):
    monkeypatch.setenv("GATEWAY_REDIS_URL", "")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("configuration error: setting redis.url (GATEWAY_REDIS_URL): empty: serve needs a Redis")
    assert err.count("\n") == 1
    assert closed(serving.port)


def test_token_prints_a_development_token_for_the_uid(serving, capsys):
    assert main(["token", "--uid", "bob", "--admin", "--lifetime", "60"]) == 0
    token = capsys.readouterr().out.strip()
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["sub"] == "bob" and claims["admin"] is True
    assert claims["exp"] - claims["iat"] == 60
    assert signature


def test_schema_writes_the_openapi_document_and_the_typescript_types(tmp_path, capsys):
    from gateway.schema import openapi, to_typescript, to_yaml

    document = tmp_path / "openapi.yaml"
    assert main(["schema", "--output", str(document)]) == 0
    assert capsys.readouterr().out == ""
    assert document.read_text() == to_yaml(openapi())
    assert document.read_text().startswith('openapi: "3.1.0"\n')
    assert main(["schema", "--typescript"]) == 0
    assert capsys.readouterr().out == to_typescript()
