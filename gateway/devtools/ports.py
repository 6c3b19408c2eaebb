"""Free loopback ports for the processes that development, tests and the benchmark start."""

from __future__ import annotations

import random
import socket


def free_port() -> int:
    """A port free on 127.0.0.1 now (the kernel's pick)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_port_block(count: int, first: int = 20000, last: int = 32000) -> int:
    """The first of ``count`` consecutive free ports below the ephemeral range.

    Worker i serves /metrics on ``metrics.port + i``; in the ephemeral range an
    outgoing connection may take one of those ports meanwhile.
    """
    for start in random.sample(range(first, last - count), 200):
        sockets = []
        try:
            for port in range(start, start + count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return start
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError("no block of free ports")
