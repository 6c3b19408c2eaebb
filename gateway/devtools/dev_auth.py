"""Development tokens: a local RS256 signing key and the endpoint that serves its certificate.

``make run`` and the tests point ``auth.certs_url`` at a ``CertificateEndpoint``
and sign tokens with a ``DevSigningKey``, so development tokens go through the
very verification code production uses. Nothing here is active unless
configured that way.
"""

from __future__ import annotations

import base64
import datetime
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID
from google.auth import crypt

_KEY_FILE = "dev-signing-key.pem"
_CERT_FILE = "dev-signing-cert.pem"


class DevSigningKey:
    """An RSA key and its self-signed certificate, named by ``kid``."""

    def __init__(self, private_key_pem: str, certificate_pem: str, kid: str) -> None:
        self.private_key_pem = private_key_pem
        self.certificate_pem = certificate_pem
        self.kid = kid
        self._signer = crypt.RSASigner.from_string(private_key_pem, key_id=kid)

    @classmethod
    def generate(cls) -> DevSigningKey:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        certificate_pem = self_signed_certificate_pem(key, "candle-gateway development", valid_days=3650)
        private_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        return cls(private_pem, certificate_pem, kid=uuid.uuid4().hex)

    @classmethod
    def load_or_create(cls, state_dir: Path) -> DevSigningKey:
        """The key kept in ``state_dir`` (created on first use), so separate commands share it."""
        key_path, cert_path = state_dir / _KEY_FILE, state_dir / _CERT_FILE
        if key_path.is_file() and cert_path.is_file():
            certificate_pem = cert_path.read_text()
            kid = x509.load_pem_x509_certificate(certificate_pem.encode()).fingerprint(hashes.SHA256()).hex()[:40]
            return cls(key_path.read_text(), certificate_pem, kid=kid)
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        generated = cls.generate()
        key_path.touch(mode=0o600)
        key_path.write_text(generated.private_key_pem)
        cert_path.write_text(generated.certificate_pem)
        return cls.load_or_create(state_dir)

    def sign(self, header: dict[str, Any], claims: dict[str, Any]) -> str:
        """A JWS with exactly this header (google.auth.jwt.encode would always add a kid)."""
        signing_input = f"{_b64(msgspec.json.encode(header))}.{_b64(msgspec.json.encode(claims))}"
        signature = self._signer.sign(signing_input.encode())
        return f"{signing_input}.{_b64(signature)}"


def mint_token(
    key: DevSigningKey,
    project_id: str,
    uid: str,
    *,
    admin: bool = False,
    lifetime_s: int = 3600,
    now: float | None = None,
    header_overrides: dict[str, Any] | None = None,
    claim_overrides: dict[str, Any] | None = None,
    drop_claims: Iterable[str] = (),
) -> str:
    """A Firebase-shaped ID token signed by ``key``; the overrides let tests forge bad ones."""
    issued = int(now if now is not None else time.time())
    claims: dict[str, Any] = {
        "iss": f"https://securetoken.google.com/{project_id}",
        "aud": project_id,
        "auth_time": issued,
        "user_id": uid,
        "sub": uid,
        "iat": issued,
        "exp": issued + lifetime_s,
        "firebase": {"identities": {}, "sign_in_provider": "custom"},
    }
    if admin:
        claims["admin"] = True
    claims.update(claim_overrides or {})
    for name in drop_claims:
        claims.pop(name, None)
    header: dict[str, Any] = {"alg": "RS256", "kid": key.kid, "typ": "JWT"}
    header.update(header_overrides or {})
    header = {name: value for name, value in header.items() if value is not None}
    return key.sign(header, claims)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class CertificateEndpoint:
    """Serves ``GET /certs`` like Google's endpoint: ``{kid: PEM}`` with ``Cache-Control: max-age``."""

    def __init__(self, keys: list[DevSigningKey], max_age_s: int = 3600) -> None:
        self.keys = keys
        self.max_age_s = max_age_s
        self.failing = False
        self.fetch_count = 0
        self.url = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/certs", self._certs)
        return app

    async def _certs(self, request: web.Request) -> web.Response:
        self.fetch_count += 1
        if self.failing:
            return web.Response(status=500, text="certificate service failing (test)")
        return web.json_response(
            {key.kid: key.certificate_pem for key in self.keys},
            headers={"Cache-Control": f"public, max-age={self.max_age_s}, must-revalidate, no-transform"},
        )


def self_signed_certificate_pem(key: CertificateIssuerPrivateKeyTypes, name: str, *, valid_days: int) -> str:
    """An X.509 certificate of ``key``'s public half, signed by ``key`` itself, as PEM."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=valid_days))
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM).decode()
