"""Firebase ID token verification (SPEC 4), local and cheap, on google-auth's primitives.

Not ``google.oauth2.id_token.verify_firebase_token``: it fetches the
certificates on every call (blocking) and never checks ``iss``. Here the
certificates are fetched with aiohttp, parsed once into verifiers, cached for
the answer's ``max-age`` and refreshed by a single fetch however many
requests wait. Header and claims are decoded into typed structs; every
rejection names the check that failed and never echoes the token.

A bad day at the certificate endpoint costs little: a failed fetch is not
repeated for a few seconds (doubling up to ``_RETRY_MAX_S``, reset by a
success), meanwhile requests are answered at once; an answer is read up to
``MAX_CERTIFICATES_BYTES`` only; and each certificate is parsed on its own, so
one that is not an RSA key of at least 2048 bits is skipped (and logged), and
only a token naming it is refused.

A token that verified is remembered (by its SHA-256, never the token
itself, at most ``VERIFIED_TOKENS_KEPT`` of them) with its claims and the
verifier that checked it, so a client presenting it again (a reconnect
storm, a page opening several streams) skips the RS256 verification: the
claims, ``exp`` first, are checked again on every use against the clock, and
the entry counts only while the certificate cache still holds that very
verifier (a refresh or rotation makes the token verify afresh).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeVar

import aiohttp
import msgspec
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from google.auth import crypt

from gateway import metrics
from gateway.config import AuthSettings
from gateway.errors import Unauthenticated

log = logging.getLogger(__name__)

T = TypeVar("T")
EMULATOR_VARIABLE: Final = "FIREBASE_AUTH_EMULATOR_HOST"
_MAX_AGE: Final = re.compile(r"max-age=(\d+)")
_MAX_SUB_LENGTH: Final = 128
_BASE64URL: Final = re.compile(r"[A-Za-z0-9_-]*")
# Google's answer is about 4 KB; anything near this is not a certificate list.
MAX_CERTIFICATES_BYTES: Final = 1 << 20
# After a failed fetch, no other for this long; doubled per failure up to the
# maximum, reset by a success. Short enough that a recovered endpoint is used
# again within seconds, long enough that a flood of (forged) tokens does not
# become a flood of fetches.
_RETRY_FIRST_S: Final = 2.0
_RETRY_MAX_S: Final = 30.0
_MIN_RSA_BITS: Final = 2048
# Verified tokens remembered per process (about 730 bytes each, 7 MB when full); past it the
# least recently used is dropped and verifies again when it comes back.
VERIFIED_TOKENS_KEPT: Final = 10_000


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


class _Verified(msgspec.Struct, frozen=True):
    """A token whose signature verified: what its next use needs to be answered the same."""

    kid: str
    verifier: crypt.RSAVerifier
    claims: _Claims
    user: User


_decode_header = msgspec.json.Decoder(_Header).decode
_decode_claims = msgspec.json.Decoder(_Claims).decode
_decode_object = msgspec.json.Decoder(dict[str, Any]).decode
_decode_certificates = msgspec.json.Decoder(dict[str, str]).decode


class _CertificateFetchFailed(Exception):
    """A refresh that brought nothing usable (the message says why, for the log)."""


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
        # Kids the last good answer published with a certificate that cannot verify RS256.
        self._unusable: set[str] = set()
        self._expires_at = -float("inf")
        self._last_early_refresh = -float("inf")
        self._retry_at = -float("inf")
        self._retry_delay_s = _RETRY_FIRST_S
        self._refreshing: asyncio.Task[None] | None = None

    async def verifier_for(self, kid: str) -> crypt.RSAVerifier:
        """The verifier of certificate ``kid``; ``Unauthenticated`` if there is none."""
        if self._clock() >= self._expires_at and self._may_fetch():
            await self._refresh_once()
        verifier = self._verifiers.get(kid)
        if (
            verifier is None
            and kid not in self._unusable
            and self._clock() - self._last_early_refresh >= self._settings.unknown_kid_refresh_interval_s
            and self._may_fetch()
        ):
            # Google may have rotated its keys before our copy expired.
            self._last_early_refresh = self._clock()
            await self._refresh_once()
            verifier = self._verifiers.get(kid)
        if verifier is None:
            if not self._verifiers:
                raise Unauthenticated("signing certificates are unavailable; try again shortly")
            if kid in self._unusable:
                raise Unauthenticated("token kid names a signing certificate that cannot verify RS256")
            raise Unauthenticated("token kid is not one of the current signing certificates")
        return verifier

    def _may_fetch(self) -> bool:
        """False while backing off after a failed fetch (a fetch in flight may still be joined)."""
        return self._clock() >= self._retry_at or (self._refreshing is not None and not self._refreshing.done())

    async def _refresh_once(self) -> None:
        # Single flight: every caller waits on the same fetch.
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.create_task(self._fetch())
        await asyncio.shield(self._refreshing)

    async def _fetch(self) -> None:
        try:
            verifiers, unusable, max_age = await self._download()
        except _CertificateFetchFailed as exc:
            # The last good certificates keep serving until they expire.
            log.warning(
                "could not refresh signing certificates: %s; next attempt in %.0f s or later",
                exc,
                self._retry_delay_s,
            )
            metrics.certificate_refresh("failed")
            self._retry_at = self._clock() + self._retry_delay_s
            self._retry_delay_s = min(self._retry_delay_s * 2, _RETRY_MAX_S)
            if self._clock() >= self._expires_at:
                self._verifiers, self._unusable = {}, set()
            return
        metrics.certificate_refresh("ok")
        self._verifiers, self._unusable = verifiers, unusable
        self._expires_at = self._clock() + (max_age if max_age is not None else self._settings.default_max_age_s)
        self._retry_at, self._retry_delay_s = -float("inf"), _RETRY_FIRST_S

    async def _download(self) -> tuple[dict[str, crypt.RSAVerifier], set[str], float | None]:
        """Fetch and parse one answer: its verifiers, the kids it names unusable, its max-age."""
        try:
            async with self._session.get(
                self._settings.certs_url, timeout=aiohttp.ClientTimeout(total=self._settings.fetch_timeout_s)
            ) as response:
                response.raise_for_status()
                body = await _read_bounded(response, MAX_CERTIFICATES_BYTES)
                max_age = _max_age(response.headers.get("Cache-Control", ""))
            certificates = _decode_certificates(body)
        except (aiohttp.ClientError, TimeoutError, msgspec.DecodeError, ValueError) as exc:
            raise _CertificateFetchFailed(str(exc) or type(exc).__name__) from exc
        verifiers: dict[str, crypt.RSAVerifier] = {}
        unusable: set[str] = set()
        for kid, pem in certificates.items():
            try:
                verifiers[kid] = _rsa_verifier(pem)
            except ValueError as exc:
                # One bad certificate must not take the good ones with it.
                log.warning("skipping signing certificate %r: %s", kid[:64], exc)
                unusable.add(kid)
        if not verifiers:
            raise _CertificateFetchFailed(f"the answer holds no usable certificate ({len(certificates)} skipped)")
        return verifiers, unusable, max_age


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
        self._verified: OrderedDict[bytes, _Verified] = OrderedDict()

    async def verify(self, token: str) -> User:
        digest = hashlib.sha256(token.encode()).digest()
        known = self._verified.get(digest)
        # The same certificate lookup the token's first verification made: the
        # same 401 if its kid is gone, and a refreshed certificate verifies afresh.
        if known is not None and await self._certificates.verifier_for(known.kid) is known.verifier:
            try:
                self._check_claims(known.claims)
            except Unauthenticated:
                self._verified.pop(digest, None)  # expired: it cannot pass again
                raise
            self._remember(digest, known)
            return known.user
        parts = token.split(".")
        if len(parts) != 3:
            raise Unauthenticated("token is not a JWT (expected three dot-separated parts)")
        encoded_header, encoded_claims, encoded_signature = parts
        header = _decode_part(_b64(encoded_header, "header"), "header", _decode_header)
        claims_json = _b64(encoded_claims, "claims")
        claims = _decode_part(claims_json, "claims", _decode_claims)
        verifier: crypt.RSAVerifier | None = None
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
        user = User(uid=claims.sub, is_admin=self._is_admin(claims_json))
        if verifier is not None and header.kid:  # nothing to skip for an unsigned token
            self._remember(digest, _Verified(header.kid, verifier, claims, user))
        return user

    def _remember(self, digest: bytes, verified: _Verified) -> None:
        self._verified[digest] = verified
        self._verified.move_to_end(digest)
        if len(self._verified) > VERIFIED_TOKENS_KEPT:
            self._verified.popitem(last=False)

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
    """``part`` decoded, if it is canonical base64url (RFC 7515: no padding, unused bits zero); else 401.

    One spelling per token: with junk characters skipped, the ``+/``
    alphabet, ``=`` padding or unused bits set, a token would verify in
    countless spellings, each a new entry of the verified-token cache and
    each past any deny-list of the canonical one.
    """
    if not _BASE64URL.fullmatch(part):
        raise Unauthenticated(f"token {name} is not base64url (only A-Z a-z 0-9 - _, no padding)")
    if len(part) % 4 == 1:
        raise Unauthenticated(f"token {name} is not base64url (a length no encoding has)")
    try:
        decoded = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError):
        raise Unauthenticated(f"token {name} is not base64url") from None
    # The last character's unused low bits must be zero: the one spelling that encoding gives.
    if base64.urlsafe_b64encode(decoded).rstrip(b"=").decode() != part:
        raise Unauthenticated(f"token {name} is not canonical base64url (unused bits set)")
    return decoded


def _decode_part(part: bytes, name: str, decode: Callable[[bytes], T]) -> T:
    try:
        return decode(part)
    except (msgspec.DecodeError, RecursionError):  # msgspec: RecursionError when nested too deep
        raise Unauthenticated(f"token {name} is not a valid JSON object") from None


async def _read_bounded(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, or ``ValueError`` as soon as it is known to exceed ``limit`` bytes."""
    declared = response.content_length
    if declared is not None and declared > limit:
        raise ValueError(f"the answer declares {declared} bytes, more than the {limit} accepted")
    body = bytearray()
    async for piece in response.content.iter_any():
        body += piece
        if len(body) > limit:
            raise ValueError(f"the answer is larger than the {limit} bytes accepted")
    return bytes(body)


def _rsa_verifier(pem: str) -> crypt.RSAVerifier:
    """A verifier for an X.509 certificate of an RSA key fit for RS256; ``ValueError`` for anything else."""
    public_key = x509.load_pem_x509_certificate(pem.encode()).public_key()
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise ValueError(f"not an RSA key ({type(public_key).__name__}), so it cannot verify RS256")
    if public_key.key_size < _MIN_RSA_BITS:
        raise ValueError(f"an RSA key of {public_key.key_size} bits (at least {_MIN_RSA_BITS} required)")
    return crypt.RSAVerifier(public_key)


def _max_age(cache_control: str) -> float | None:
    match = _MAX_AGE.search(cache_control)
    return float(match.group(1)) if match else None
