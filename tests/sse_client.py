"""A small SSE reader for tests: real bytes off a real HTTP response, parsed per the HTML standard."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from tests.event_schemas import validate_event


@dataclass
class Event:
    event: str
    data: str
    id: str | None
    retry: int | None = None

    @property
    def payload(self) -> Any:
        return json.loads(self.data)


@dataclass
class Transcript:
    """Everything a stream sent: its events, comment lines, and the raw bytes."""

    events: list[Event] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    raw: bytes = b""

    def named(self, name: str) -> list[Event]:
        return [event for event in self.events if event.event == name]

    @property
    def names(self) -> list[str]:
        return [event.event for event in self.events]


class SSEParser:
    """Feeds bytes, yields events; keeps partial lines between feeds."""

    def __init__(self) -> None:
        self._buffer = b""
        self._fields: dict[str, str] = {}
        self._data: list[str] = []

    def feed(self, chunk: bytes, transcript: Transcript) -> list[Event]:
        self._buffer += chunk
        done: list[Event] = []
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            text = line.rstrip(b"\r").decode()
            if text == "":
                if self._data or self._fields:
                    retry = self._fields.get("retry")
                    event = Event(
                        event=self._fields.get("event", "message"),
                        data="\n".join(self._data),
                        id=self._fields.get("id"),
                        retry=int(retry) if retry is not None else None,
                    )
                    # Every event any test receives must match the published schemas.
                    validate_event(event.event, event.data)
                    transcript.events.append(event)
                    done.append(event)
                self._fields, self._data = {}, []
            elif text.startswith(":"):
                transcript.comments.append(text[1:].strip())
            else:
                name, _, value = text.partition(":")
                value = value.removeprefix(" ")
                if name == "data":
                    self._data.append(value)
                else:
                    self._fields[name] = value
        return done


async def read_stream(
    response: aiohttp.ClientResponse,
    *,
    stop_after: int | None = None,
    midway: tuple[Callable[[Transcript], bool], Callable[[], Awaitable[object]]] | None = None,
) -> Transcript:
    """Read until the server closes the stream (or ``stop_after`` events have arrived).

    ``midway``: (when, act): ``await act()`` once, as soon as ``when(transcript)``
    holds (to break something while the stream runs).
    """
    transcript = Transcript()
    parser = SSEParser()
    async for chunk in response.content.iter_any():
        transcript.raw += chunk
        parser.feed(chunk, transcript)
        if midway is not None and midway[0](transcript):
            await midway[1]()
            midway = None
        if stop_after is not None and len(transcript.events) >= stop_after:
            break
    return transcript


def event_reader(response: aiohttp.ClientResponse) -> Callable[[], Awaitable[Event]]:
    """``next_event()``: the stream's events one at a time, as they arrive."""
    parser, transcript = SSEParser(), Transcript()
    iterator = response.content.iter_any().__aiter__()

    async def next_event() -> Event:
        while True:
            if transcript.events:
                return transcript.events.pop(0)
            parser.feed(await iterator.__anext__(), transcript)

    return next_event


async def next_events(next_event: Callable[[], Awaitable[Event]], count: int, wait_s: float = 10) -> list[Event]:
    """The next ``count`` events, each within ``wait_s``."""
    return [await asyncio.wait_for(next_event(), timeout=wait_s) for _ in range(count)]
