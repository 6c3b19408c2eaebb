"""Checks of settings that a type alone cannot express: the URLs' scheme, host and port; files that must exist.

``config.load_settings`` runs ``url_problem`` on each URL setting after the
types are converted; a problem stops start-up with one line naming the
setting (and its variable). Messages never repeat a whole URL: a Redis URL
may carry a password.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import SplitResult, urlsplit

REDIS_SCHEMES = ("redis", "rediss", "unix")
HTTP_SCHEMES = ("http", "https")
# A DNS name (Kubernetes Service names, Memorystore's IPs aside), as redis-py and aiohttp would resolve it.
_HOST_NAME = re.compile(r"^(?=.{1,253}\Z)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?\Z")


def redis_url_problem(url: str) -> str | None:
    """What is wrong with a non-empty ``redis.url``, or None.

    redis-py accepts more than it understands: a path that is not a number is
    database 0 without a word, an unknown query parameter fails the first
    connection with a ``TypeError``, and ``http://`` is a ``ValueError``
    traceback. Each is refused here instead, naming the part.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in REDIS_SCHEMES:
        shown = f"scheme {scheme}://" if scheme else "no scheme"
        return f"{shown}: use redis://, rediss:// (TLS) or unix://, e.g. redis://redis:6379/0"
    if parts.query:
        names = ", ".join(sorted({pair.split("=", 1)[0] for pair in parts.query.split("&") if pair}))
        return (
            f"query parameters are not read ({names}): TLS is redis.tls_ca_file, tls_cert_file and tls_key_file;"
            " timeouts and the pool are other redis.* settings"
        )
    if scheme == "unix":
        return None if parts.path else "unix:// needs a socket path, e.g. unix:///run/redis/redis.sock"
    problem = _host_and_port_problem(parts, default_port="6379")
    if problem is not None:
        return problem
    database = parts.path.lstrip("/")
    if database and not database.isdigit():
        return f"the database (the path) must be a number, e.g. redis://{parts.hostname}:6379/0"
    return None


def http_url_problem(url: str) -> str | None:
    """What is wrong with an http(s) URL setting (``auth.certs_url``, ``bigquery.api_endpoint``), or None."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in HTTP_SCHEMES:
        shown = f"scheme {scheme}://" if scheme else "no scheme"
        return f"{shown}: use http:// or https://"
    return _host_and_port_problem(parts, default_port="80 or 443")


def _host_and_port_problem(parts: SplitResult, *, default_port: str) -> str | None:
    host = parts.hostname
    if not host:
        example = "redis://redis:6379/0" if parts.scheme.startswith("redis") else "https://host/path"
        return f"no host: write {example}"
    if not _is_host(host):
        return f"host {host!r} is not a host name or an IP address"
    try:
        port = parts.port
    except ValueError:
        after = parts.netloc.rpartition("@")[2].rpartition(":")[2]
        return f"port {after!r} is not a number from 1 to 65535 (leave it out for {default_port})"
    if port == 0:
        return f"port 0 is not a port (leave it out for {default_port})"
    return None


def _is_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return bool(_HOST_NAME.match(host))
    return True


def readable_file_problem(path: str) -> str | None:
    """Why the file at ``path`` (a TLS CA, certificate or key) cannot be read, or None."""
    try:
        with open(path, "rb") as file:
            file.read(1)
    except FileNotFoundError:
        return f"{path}: no such file"
    except IsADirectoryError:
        return f"{path}: is a directory"
    except OSError as exc:
        return f"{path}: cannot be read ({exc.strerror or exc})"
    return None
