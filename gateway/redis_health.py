"""Why Redis fails, named: the cause of a failure, the process's Redis state, and the start-up check.

``classify_redis_failure`` is the one function that reads a redis-py (or
socket, or ssl) exception and names its cause; ``redis_client.call_redis``
raises ``RedisUnreachable`` carrying it, the metric counts it as its
``cause`` label, ``/readyz`` answers it, and ``HEALTH`` logs it once per
change of state (a cause that starts, changes, or ends), never per request.

The causes, and what an operator does about each, are in
docs/OPERATIONS.md ("Redis failures, by cause").
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import logging
import socket
import ssl
import time
from urllib.parse import urlsplit

import redis.exceptions
from redis.asyncio.cluster import RedisCluster

from gateway.config import RedisSettings

log = logging.getLogger(__name__)


class RedisCause(enum.StrEnum):
    """Why a Redis call failed; the value is the metric label and ``/readyz``'s ``redis`` field."""

    AUTH_FAILED = "auth_failed"
    TLS_FAILED = "tls_failed"
    CONNECTION_REFUSED = "connection_refused"
    NAME_NOT_RESOLVED = "name_not_resolved"
    TIMEOUT = "timeout"
    CLUSTER_MISCONFIGURED = "cluster_misconfigured"
    CONNECTION_LOST = "connection_lost"
    PROTOCOL_ERROR = "protocol_error"
    UNREACHABLE = "unreachable"


#: Causes that trying again for a few seconds cannot mend (a password, a certificate, a setting):
#: a new stream meeting one is answered 503 at once instead of being held for ``redis.outage_wait_s``.
LASTING_CAUSES = frozenset(
    {RedisCause.AUTH_FAILED, RedisCause.TLS_FAILED, RedisCause.CLUSTER_MISCONFIGURED, RedisCause.PROTOCOL_ERROR}
)

#: How each cause reads in a message ("Redis <phrase> while counting open streams").
PHRASES = {
    RedisCause.AUTH_FAILED: "authentication failed",
    RedisCause.TLS_FAILED: "TLS failed",
    RedisCause.CONNECTION_REFUSED: "refused the connection",
    RedisCause.NAME_NOT_RESOLVED: "host name not resolved",
    RedisCause.TIMEOUT: "timed out",
    RedisCause.CLUSTER_MISCONFIGURED: "cluster mode misconfigured",
    RedisCause.CONNECTION_LOST: "closed the connection",
    RedisCause.PROTOCOL_ERROR: "answered in something other than the Redis protocol",
    RedisCause.UNREACHABLE: "unreachable",
}

#: What the operator does about it (the log line's end).
ADVICE = {
    RedisCause.AUTH_FAILED: "check redis.password (GATEWAY_REDIS_PASSWORD) or the password in redis.url"
    " against the server's AUTH string / requirepass",
    RedisCause.TLS_FAILED: "check redis.tls_ca_file (the server's CA), redis.tls_cert_file/tls_key_file,"
    " and that the server speaks TLS (rediss://) on that port",
    RedisCause.CONNECTION_REFUSED: "nothing listens at redis.url's host and port: check the port, and that Redis runs",
    RedisCause.NAME_NOT_RESOLVED: "check the host in redis.url (a typo, or a DNS name this pod cannot resolve)",
    RedisCause.TIMEOUT: "the server did not answer within redis.connect_timeout_s/socket_timeout_s:"
    " check the network path (firewall, VPC peering) and the server's load",
    RedisCause.CLUSTER_MISCONFIGURED: "set redis.cluster to match the server"
    " (true for a Redis Cluster, false otherwise)",
    RedisCause.CONNECTION_LOST: (
        "a restart or a network cut; if it persists and the server requires TLS, use rediss://;"
        " on rediss://, a server that requires client certificates may reset instead of refusing"
        " (TLS 1.3): check redis.tls_cert_file/tls_key_file"
    ),
    RedisCause.PROTOCOL_ERROR: "redis.url's port is not a Redis port",
    RedisCause.UNREACHABLE: "see the detail",
}

_DETAIL_CHARS = 160
SPEAKS_TLS = "the server closed a plain connection and speaks TLS on that port: use rediss://"


def classify_redis_failure(exc: BaseException) -> tuple[RedisCause, str]:
    """The cause of a failed Redis call, and a short detail (the innermost error's words) for the log.

    Reads the whole chain (``__cause__``/``__context__``): redis-py wraps the
    socket's or ssl's error in its own ``ConnectionError``, and the cluster
    client wraps that again. The most specific cause found anywhere wins.
    """
    chain = _chain(exc)
    detail = _detail(chain)
    for cause, matches in _RULES:
        if any(matches(error) for error in chain):
            return cause, detail
    return RedisCause.UNREACHABLE, detail


def _chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and len(chain) < 10:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _detail(chain: list[BaseException]) -> str:
    # The innermost error that says something (a timeout ends in a wordless CancelledError).
    innermost = next((e for e in reversed(chain) if str(e) and not isinstance(e, asyncio.CancelledError)), chain[0])
    text = " ".join((str(innermost) or type(innermost).__name__).split())
    if text.startswith(("NOAUTH", "HELLO must be called with the client already authenticated")):
        return "NOAUTH: the server requires a password and none was sent"
    return text[:_DETAIL_CHARS]


def _is_auth(error: BaseException) -> bool:
    if isinstance(error, redis.exceptions.AuthenticationError | redis.exceptions.AuthenticationWrongNumberOfArgsError):
        return True
    return isinstance(error, redis.exceptions.ResponseError) and str(error).startswith(("NOAUTH", "WRONGPASS"))


def _is_tls(error: BaseException) -> bool:
    return isinstance(error, ssl.SSLError)


def _is_cluster(error: BaseException) -> bool:
    if isinstance(error, redis.exceptions.AskError):  # MOVED and ASK: a cluster, talked to as one server
        return True
    text = str(error)
    return (isinstance(error, redis.exceptions.RedisClusterException) and "not enabled" in text) or (
        isinstance(error, redis.exceptions.ResponseError) and "cluster support disabled" in text
    )


def _is_dns(error: BaseException) -> bool:
    return isinstance(error, socket.gaierror)


def _is_refused(error: BaseException) -> bool:
    return isinstance(error, ConnectionRefusedError) or (
        isinstance(error, OSError) and error.errno == errno.ECONNREFUSED
    )


def _is_timeout(error: BaseException) -> bool:
    return isinstance(error, redis.exceptions.TimeoutError | TimeoutError)


def _is_lost(error: BaseException) -> bool:
    if isinstance(error, ConnectionResetError | BrokenPipeError | asyncio.IncompleteReadError):
        return True
    if isinstance(error, RuntimeError) and "closed" in str(error):
        # A write on a transport a reset already closed (uvloop: "unable to perform operation on
        # <TCPTransport closed=True ...>"), which redis-py lets through as it is.
        return True
    return isinstance(error, redis.exceptions.ConnectionError) and "closed by server" in str(error)


def _is_protocol(error: BaseException) -> bool:
    return isinstance(error, redis.exceptions.InvalidResponse)


# Most specific first: a TLS failure may end in a reset, a cluster failure wraps a refusal.
_RULES = (
    (RedisCause.AUTH_FAILED, _is_auth),
    (RedisCause.TLS_FAILED, _is_tls),
    (RedisCause.CLUSTER_MISCONFIGURED, _is_cluster),
    (RedisCause.NAME_NOT_RESOLVED, _is_dns),
    (RedisCause.CONNECTION_REFUSED, _is_refused),
    (RedisCause.TIMEOUT, _is_timeout),
    (RedisCause.CONNECTION_LOST, _is_lost),
    (RedisCause.PROTOCOL_ERROR, _is_protocol),
)


# -- the state of this process's Redis -------------------------------------------------


class RedisHealth:
    """What this process last saw of Redis: a cause while failing, None while it answers.

    ``failed`` and ``answered`` log only when the state changes, so an outage
    is one warning when it starts (or changes cause) and one line when it
    ends, however many requests met it. Per process: each worker logs its own.
    """

    def __init__(self) -> None:
        self.cause: RedisCause | None = None
        self.detail = ""
        self.since = time.monotonic()
        self.address = "Redis"
        self.speaks_tls = False
        self.answered_at = float("-inf")

    def reset(self, settings: RedisSettings) -> None:
        """A new client (a new app): no state yet."""
        self.cause = None
        self.detail = ""
        self.since = time.monotonic()
        self.address = f"Redis at {redacted_address(settings.url)}"
        self.speaks_tls = False
        self.answered_at = float("-inf")

    def failed(
        self, cause: RedisCause, detail: str, *, when: str = "", started: float | None = None
    ) -> tuple[RedisCause, str]:
        """Note a failure (logged if the state changed); returns its cause as this process knows it.

        ``started`` is when the failed call began (``time.monotonic()``): a call
        begun before Redis last answered failed on the outage that answer ended
        (a background call's connect attempt still in flight), so it does not
        start a new one.
        """
        if cause is RedisCause.CONNECTION_LOST and self.speaks_tls:
            # The start-up check found TLS behind a redis:// URL: every closed connection is that.
            cause, detail = RedisCause.TLS_FAILED, SPEAKS_TLS
        if cause == self.cause or (self.cause is None and started is not None and started < self.answered_at):
            return cause, detail
        if cause is RedisCause.CONNECTION_LOST and self.cause is not None:
            # A pooled connection finding out, one by one, that the outage closed it: the
            # outage's cause is what new connections meet, and it stands.
            return self.cause, self.detail
        self.cause, self.detail, self.since = cause, detail, time.monotonic()
        log.warning("%s%s: %s (%s: %s): %s", self.address, when, PHRASES[cause], cause.value, detail, ADVICE[cause])
        return cause, detail

    def answered(self) -> None:
        # A cluster talked to as one server answers for the keys of its own slots and MOVED for the
        # rest: the misconfiguration stands until a restart with the right redis.cluster.
        if self.cause is None or self.cause is RedisCause.CLUSTER_MISCONFIGURED:
            return
        log.info(
            "%s answers again (it failed with %s for %.1f s)",
            self.address,
            self.cause.value,
            time.monotonic() - self.since,
        )
        self.cause = None
        self.detail = ""
        self.answered_at = time.monotonic()


HEALTH = RedisHealth()


# -- the start-up check ----------------------------------------------------------------------


async def check_at_start_up(client: object, settings: RedisSettings) -> None:
    """Ask Redis once what it is, and log it: version and mode, or a warning naming why it did not answer.

    Bounded by ``connect_timeout_s + socket_timeout_s``; the gateway starts
    either way (``/readyz`` answers 503 until Redis does), so that a Redis
    restart and a gateway rollout may overlap.
    """
    HEALTH.reset(settings)
    bound_s = settings.connect_timeout_s + settings.socket_timeout_s
    when = " at start-up (serving anyway; /readyz answers 503 until Redis answers)"
    try:
        async with asyncio.timeout(bound_s):
            info = await client.info("server")  # type: ignore[attr-defined]
            nodes = len(client.get_nodes()) if isinstance(client, RedisCluster) else 1
    except TimeoutError:
        HEALTH.failed(RedisCause.TIMEOUT, f"no answer within {bound_s:g} s", when=when)
        return
    except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError) as exc:
        cause, detail = classify_redis_failure(exc)
        plain = urlsplit(settings.url).scheme == "redis"
        if cause is RedisCause.CONNECTION_LOST and plain and await _speaks_tls(settings):
            HEALTH.speaks_tls = True
        HEALTH.failed(cause, detail, when=when)
        return
    name = info.get("server_name") or "redis"
    version = info.get("valkey_version") or info.get("redis_version") or "unknown"
    mode = info.get("server_mode") or info.get("redis_mode") or "standalone"
    log.info(
        "%s: %s %s, %s%s%s",
        HEALTH.address,
        name,
        version,
        "cluster" if mode == "cluster" else "single server",
        f" of {nodes} nodes" if nodes > 1 else "",
        ", TLS" if urlsplit(settings.url).scheme == "rediss" else "",
    )
    if mode == "cluster" and not settings.cluster:
        detail = "the server is a Redis Cluster node but redis.cluster = false"
        HEALTH.failed(RedisCause.CLUSTER_MISCONFIGURED, detail, when=" at start-up")


def redacted_address(url: str) -> str:
    """``scheme://host:port`` of a Redis URL: no password, no database."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix://{parts.path}"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}"


async def _speaks_tls(settings: RedisSettings) -> bool:
    """Whether the server at ``redis.url`` completes a TLS handshake (it closed a plain connection)."""
    parts = urlsplit(settings.url)
    # Only to learn whether the port speaks TLS: nothing is sent, so nothing is verified.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        async with asyncio.timeout(settings.connect_timeout_s):
            _, writer = await asyncio.open_connection(parts.hostname, parts.port or 6379, ssl=context)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.wait_closed()
    return True
