"""The typed keys under which the application keeps its shared resources.

Each is set by the one cleanup context in ``app.py`` that creates and closes
it; handlers only read them.
"""

from __future__ import annotations

from aiohttp import web

from gateway.auth import TokenVerifier
from gateway.config import Settings
from gateway.lifecycle import Lifecycle
from gateway.limits import ProcessStreamCap, StreamSlots
from gateway.live import JobNotes
from gateway.redis_client import RedisClient
from gateway.sources.resolve import Sources

SETTINGS = web.AppKey("settings", Settings)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
REDIS = web.AppKey("redis", RedisClient)
SLOTS = web.AppKey("slots", StreamSlots)
STREAM_CAP = web.AppKey("stream_cap", ProcessStreamCap)
NOTES = web.AppKey("notes", JobNotes)
VERIFIER = web.AppKey("verifier", TokenVerifier)
SOURCES = web.AppKey("sources", Sources)
