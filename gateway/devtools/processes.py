"""Server processes that tests and the benchmark start: the output in a file, ready once the port accepts."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

# A connect that hangs (a full backlog on a loaded machine) is tried again, not waited out.
_CONNECT_TIMEOUT_S = 0.2
_POLL_S = 0.05


def gateway_serve(*args: str) -> list[str]:
    """The command line of a production gateway (``python -m gateway serve``) with this interpreter."""
    return [sys.executable, "-m", "gateway", "serve", *args]


async def start_server(
    args: Sequence[str],
    *,
    env: Mapping[str, str],
    log: Path,
    port: int,
    cwd: str | Path | None = None,
    timeout_s: float = 30,
) -> subprocess.Popen[bytes]:
    """``args`` as a process once ``port`` accepts connections; its stdout and stderr go to ``log``.

    ``env`` is the process's whole environment (callers decide what of their
    own to pass on). A process that exits or does not open its port in time
    is killed, and the error carries the end of its log.
    """
    with log.open("wb") as out:
        # Popen returns at once (the wait below is async); the commands are the callers' own.
        process = subprocess.Popen(  # noqa: ASYNC220, S603
            list(args), cwd=cwd, env=dict(env), stdout=out, stderr=subprocess.STDOUT
        )
    try:
        await wait_for_port(port, process, timeout_s=timeout_s, log=log)
    except BaseException:
        process.kill()
        process.wait()
        raise
    return process


async def wait_for_port(
    port: int,
    process: subprocess.Popen[bytes] | None = None,
    *,
    timeout_s: float = 30,
    log: Path | None = None,
) -> None:
    """Return once 127.0.0.1:``port`` accepts a connection.

    ``RuntimeError`` if ``process`` exits first or ``timeout_s`` passes; it
    carries the end of ``log``, when given.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), _CONNECT_TIMEOUT_S)
            writer.close()
            return
        except OSError:  # refused, or the connect timed out (TimeoutError is an OSError)
            if process is not None and process.poll() is not None:
                problem = f"exited with status {process.returncode} before port {port} opened"
            elif time.monotonic() > deadline:
                problem = f"did not open port {port} within {timeout_s:g} s"
            else:
                await asyncio.sleep(_POLL_S)
                continue
        if log is not None:  # read once, on the way out
            problem += f"; {log}:\n{log.read_text(errors='replace')[-2000:]}"  # noqa: ASYNC240
        raise RuntimeError(f"{process.args!r} {problem}" if process is not None else f"the server {problem}")
