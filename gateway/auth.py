"""Firebase ID token verification (SPEC 4), local and cheap, on google-auth's primitives.

Not ``google.oauth2.id_token.verify_firebase_token``: it fetches the
certificates on every call (blocking) and never checks ``iss``. Here the
certificates are fetched with aiohttp, parsed once into verifiers, cached for
the answer's ``max-age`` and refreshed by a single fetch however many
requests wait. Header and claims are decoded into typed structs; every
rejection names the check that failed and never echoes the token.
"""

from __future__ import annotations

import asyncio
import binascii
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeVar

import aiohttp
import msgspec
from google.auth import crypt
from google.auth._helpers import padded_urlsafe_b64decode

from gateway import metrics
from gateway.config import AuthSettings
from gateway.errors import Unauthenticated

log = logging.getLogger(__name__)

T = TypeVar("T")
EMULATOR_VARIABLE: Final = "FIREBASE_AUTH_EMULATOR_HOST"
_MAX_AGE: Final = re.compile(r"max-age=(\d+)")
_MAX_SUB_LENGTH: Final = 128


class User(msgspec.Struct, frozen=True):
    """The authenticated caller."""

    uid: str
    is_admin: bool


class _Header(msgspec.Struct):
    alg: str
    kid: str | None = None


class _Claims(msgspec.Struct):
    aud: str | list[str] | None = None
    iss: str | None = None
    sub: str | None = None
    exp: float | None = None
    iat: float | None = None
    auth_time: float | None = None


_decode_header = msgspec.json.Decoder(_Header).decode
_decode_claims = msgspec.json.Decoder(_Claims).decode
_decode_object = msgspec.json.Decoder(dict[str, Any]).decode
_decode_certificates = msgspec.json.Decoder(dict[str, str]).decode


class CertificateCache:
    """Google's signing certificates as verifiers, cached for their ``max-age``."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        settings: AuthSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._session = session
        self._settings = settings
        self._clock = clock
        self._verifiers: dict[str, crypt.RSAVerifier] = {}
        self._expires_at = -float("inf")
        self._last_early_refresh = -float("inf")
        self._refreshing: asyncio.Task[None] | None = None

    async def verifier_for(self, kid: str) -> crypt.RSAVerifier:
        """The verifier of certificate ``kid``; ``Unauthenticated`` if there is none."""
        if self._clock() >= self._expires_at:
            await self._refresh_once()
        verifier = self._verifiers.get(kid)
        if (
            verifier is None
            and self._clock() - self._last_early_refresh >= self._settings.unknown_kid_refresh_interval_s
        ):
            # Google may have rotated its keys before our copy expired.
            self._last_early_refresh = self._clock()
            await self._refresh_once()
            verifier = self._verifiers.get(kid)
        if verifier is None:
            if not self._verifiers:
                raise Unauthenticated("signing certificates are unavailable; try again shortly")
            raise Unauthenticated("token kid is not one of the current signing certificates")
        return verifier

    async def refresh(self) -> None:
        """Fetch now (a warm-up at start-up); failures are logged, not raised."""
        await self._refresh_once()

    async def _refresh_once(self) -> None:
        # Single flight: every caller waits on the same fetch.
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.create_task(self._fetch())
        await asyncio.shield(self._refreshing)

    async def _fetch(self) -> None:
        try:
            async with self._session.get(
                self._settings.certs_url, timeout=aiohttp.ClientTimeout(total=self._settings.fetch_timeout_s)
            ) as response:
                response.raise_for_status()
                body = await response.read()
                max_age = _max_age(response.headers.get("Cache-Control", ""))
            certificates = _decode_certificates(body)
            verifiers = {kid: crypt.RSAVerifier.from_string(pem) for kid, pem in certificates.items()}
        except (aiohttp.ClientError, TimeoutError, msgspec.DecodeError, ValueError) as exc:
            # The last good certificates keep serving until they expire.
            log.warning("could not refresh signing certificates: %s", exc)
            metrics.certificate_refresh("failed")
            if self._clock() >= self._expires_at:
                self._verifiers = {}
            return
        metrics.certificate_refresh("ok")
        self._verifiers = verifiers
        self._expires_at = self._clock() + (max_age if max_age is not None else self._settings.default_max_age_s)


class TokenVerifier:
    """Checks Firebase ID tokens; ``verify`` raises ``Unauthenticated`` naming the failed check."""

    def __init__(
        self,
        settings: AuthSettings,
        certificates: CertificateCache,
        *,
        emulator: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._certificates = certificates
        self._emulator = emulator
        self._clock = clock
        self._issuer = f"https://securetoken.google.com/{settings.firebase_project_id}"

    async def verify(self, token: str) -> User:
        parts = token.split(".")
        if len(parts) != 3:
            raise Unauthenticated("token is not a JWT (expected three dot-separated parts)")
        encoded_header, encoded_claims, encoded_signature = parts
        header = _decode_part(_b64(encoded_header, "header"), "header", _decode_header)
        claims_json = _b64(encoded_claims, "claims")
        claims = _decode_part(claims_json, "claims", _decode_claims)
        if self._emulator and header.alg == "none":
            pass  # the Firebase Auth Emulator's unsigned tokens, accepted in emulator mode only
        else:
            if header.alg != "RS256":
                raise Unauthenticated("token alg must be RS256")
            if not header.kid:
                raise Unauthenticated("token header has no kid")
            verifier = await self._certificates.verifier_for(header.kid)
            signature = _b64(encoded_signature, "signature")
            if not verifier.verify(f"{encoded_header}.{encoded_claims}".encode(), signature):
                raise Unauthenticated("token signature does not verify")
        self._check_claims(claims)
        assert claims.sub is not None
        return User(uid=claims.sub, is_admin=self._is_admin(claims_json))

    def _check_claims(self, claims: _Claims) -> None:
        project = self._settings.firebase_project_id
        if claims.aud != project:
            raise Unauthenticated(f"token aud is not the Firebase project '{project}'")
        if claims.iss != self._issuer:
            raise Unauthenticated(f"token iss is not {self._issuer}")
        if not isinstance(claims.sub, str) or not claims.sub or len(claims.sub) > _MAX_SUB_LENGTH:
            raise Unauthenticated("token sub must be a non-empty string of at most 128 characters")
        now = self._clock()
        skew = self._settings.clock_skew_s
        if claims.exp is None or claims.exp + skew <= now:
            raise Unauthenticated("token has expired (exp)")
        if claims.iat is None or claims.iat - skew > now:
            raise Unauthenticated("token was issued in the future (iat)")
        if claims.auth_time is None or claims.auth_time - skew > now:
            raise Unauthenticated("token auth_time is in the future or missing")

    def _is_admin(self, claims_json: bytes) -> bool:
        claim = self._settings.admin_claim
        if not claim:
            return False
        return _decode_object(claims_json).get(claim) is True


def token_verifier(
    settings: AuthSettings, session: aiohttp.ClientSession, environ: Mapping[str, str] = os.environ
) -> TokenVerifier:
    """The verifier for this process: emulator mode if and only if ``FIREBASE_AUTH_EMULATOR_HOST`` is set."""
    emulator = bool(environ.get(EMULATOR_VARIABLE))
    if emulator:
        log.warning(
            "%s is set: UNSIGNED Firebase Auth Emulator tokens are ACCEPTED. Never set it in production.",
            EMULATOR_VARIABLE,
        )
    return TokenVerifier(settings, CertificateCache(session, settings), emulator=emulator)


def _b64(part: str, name: str) -> bytes:
    try:
        decoded: bytes = padded_urlsafe_b64decode(part)
        return decoded
    except (binascii.Error, ValueError):
        raise Unauthenticated(f"token {name} is not base64url") from None


def _decode_part(part: bytes, name: str, decode: Callable[[bytes], T]) -> T:
    try:
        return decode(part)
    except msgspec.DecodeError:
        raise Unauthenticated(f"token {name} is not a valid JSON object") from None


def _max_age(cache_control: str) -> float | None:
    match = _MAX_AGE.search(cache_control)
    return float(match.group(1)) if match else None
