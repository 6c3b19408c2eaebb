"""Firebase ID tokens (SPEC 4): real RS256 tokens, a real certificate endpoint, the production verifier."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import pytest

from gateway.auth import CertificateCache, TokenVerifier, token_verifier
from gateway.config import AuthSettings
from gateway.devtools.dev_auth import DevSigningKey, mint_token
from gateway.errors import Unauthenticated
from tests.conftest import PROJECT
from tests.helpers import open_stream, seed_job

JOB = "auth-job"


class FakeClock:
    """Monotonic time that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as client_session:
        yield client_session


def _settings(cert_endpoint, **overrides) -> AuthSettings:
    return AuthSettings(firebase_project_id=PROJECT, certs_url=cert_endpoint.url, **overrides)


@pytest.mark.parametrize(
    ("options", "check"),
    [
        ({"header_overrides": {"alg": "HS256"}}, "alg"),
        ({"header_overrides": {"alg": "none"}}, "alg"),
        ({"header_overrides": {"kid": None}}, "kid"),
        ({"header_overrides": {"kid": "not-a-current-kid"}}, "kid"),
        ({"claim_overrides": {"aud": "another-project"}}, "aud"),
        ({"claim_overrides": {"iss": "https://securetoken.google.com/another-project"}}, "iss"),
        ({"claim_overrides": {"sub": ""}}, "sub"),
        ({"claim_overrides": {"sub": "x" * 129}}, "sub"),
        ({"now": time.time() - 7200, "lifetime_s": 3600}, "exp"),
        ({"claim_overrides": {"iat": time.time() + 600}}, "iat"),
        ({"claim_overrides": {"auth_time": time.time() + 600}}, "auth_time"),
        ({"drop_claims": ["auth_time"]}, "auth_time"),
    ],
)
async def test_each_failed_check_is_a_401_naming_it_without_the_token(client, token, options, check):
    bad = token("alice", **options)
    response = await open_stream(client, JOB, intervals="day", token=bad)
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    body = await response.json()
    assert body["error"] == "unauthenticated"
    assert check in body["message"]
    for part in bad.split("."):
        assert part not in body["message"]


@pytest.mark.parametrize(
    "garbage", ["abc", "a.b", "a.b.c.d", "!!!.???.***", "eyJ9.eyJ9.sig", "bm90IGpzb24.bm90IGpzb24.c2ln"]
)
async def test_malformed_tokens_are_401(client, garbage):
    response = await open_stream(client, JOB, intervals="day", token=garbage)
    assert response.status == 401
    assert garbage not in (await response.json())["message"]


@pytest.mark.parametrize("part", ["header", "claims"])
async def test_deeply_nested_token_json_is_a_401_not_a_500(client, token, part):
    """msgspec raises RecursionError, not DecodeError, past about 1,000 levels: before any signature check."""
    import base64

    nested = b'{"alg":"RS256","x":' + b"[" * 1500 + b"]" * 1500 + b"}"
    encoded = base64.urlsafe_b64encode(nested).rstrip(b"=").decode()
    header, claims, signature = token("alice").split(".")
    forged = f"{encoded}.{claims}.{signature}" if part == "header" else f"{header}.{encoded}.{signature}"
    response = await open_stream(client, JOB, intervals="day", token=forged)
    assert response.status == 401
    assert f"token {part} is not a valid JSON object" in (await response.json())["message"]


async def test_signature_of_another_key_or_tampered_claims_does_not_verify(client, signing_key, token):
    impostor = DevSigningKey(DevSigningKey.generate().private_key_pem, signing_key.certificate_pem, kid=signing_key.kid)
    forged = mint_token(impostor, PROJECT, "alice")
    response = await open_stream(client, JOB, intervals="day", token=forged)
    assert response.status == 401
    assert "signature" in (await response.json())["message"]
    header, _, signature = token("alice").split(".")
    _, claims, _ = token("mallory").split(".")
    response = await open_stream(client, JOB, intervals="day", token=f"{header}.{claims}.{signature}")
    assert response.status == 401


async def test_expired_within_the_clock_skew_is_accepted(client, writer, token):
    await seed_job(writer(JOB), counts={"day": 1})
    recent = token("alice", now=time.time() - 3600 - 10, lifetime_s=3600)  # expired 10 s ago, skew 30 s
    response = await open_stream(client, JOB, intervals="day", token=recent)
    assert response.status == 200
    await response.read()


async def test_certificates_are_cached_for_their_max_age(cert_endpoint, session, token):
    clock = FakeClock()
    settings = _settings(cert_endpoint)
    verifier = TokenVerifier(settings, CertificateCache(session, settings, clock=clock))
    for _ in range(20):
        assert (await verifier.verify(token("alice"))).uid == "alice"
    assert cert_endpoint.fetch_count == 1
    clock.now += cert_endpoint.max_age_s + 1
    await verifier.verify(token("alice"))
    assert cert_endpoint.fetch_count == 2


async def test_many_waiting_requests_share_one_fetch(cert_endpoint, session, token):
    settings = _settings(cert_endpoint)
    verifier = TokenVerifier(settings, CertificateCache(session, settings))
    users = await asyncio.gather(*(verifier.verify(token(f"user{n}")) for n in range(50)))
    assert [user.uid for user in users] == [f"user{n}" for n in range(50)]
    assert cert_endpoint.fetch_count == 1


async def test_unknown_kid_refreshes_early_at_most_once_per_interval(cert_endpoint, session, token):
    clock = FakeClock()
    settings = _settings(cert_endpoint, unknown_kid_refresh_interval_s=30)
    verifier = TokenVerifier(settings, CertificateCache(session, settings, clock=clock))
    await verifier.verify(token("alice"))
    for kid in ("rotated-1", "rotated-2", "rotated-3"):
        with pytest.raises(Unauthenticated, match="kid"):
            await verifier.verify(token("alice", header_overrides={"kid": kid}))
    assert cert_endpoint.fetch_count == 2  # the first fetch and one early refresh
    clock.now += 31
    with pytest.raises(Unauthenticated):
        await verifier.verify(token("alice", header_overrides={"kid": "rotated-4"}))
    assert cert_endpoint.fetch_count == 3


async def test_rotated_key_is_accepted_once_its_kid_triggers_a_refresh(cert_endpoint, session, token):
    settings = _settings(cert_endpoint)
    verifier = TokenVerifier(settings, CertificateCache(session, settings, clock=FakeClock()))
    await verifier.verify(token("alice"))
    new_key = DevSigningKey.generate()
    cert_endpoint.keys.append(new_key)
    user = await verifier.verify(mint_token(new_key, PROJECT, "alice"))
    assert user.uid == "alice"
    assert cert_endpoint.fetch_count == 2


async def test_failing_endpoint_keeps_the_last_good_certificates_until_they_expire(cert_endpoint, session, token):
    clock = FakeClock()
    settings = _settings(cert_endpoint)
    verifier = TokenVerifier(settings, CertificateCache(session, settings, clock=clock))
    await verifier.verify(token("alice"))
    cert_endpoint.failing = True
    # Early refresh (unknown kid) fails: the known certificates still serve.
    with pytest.raises(Unauthenticated):
        await verifier.verify(token("alice", header_overrides={"kid": "unknown"}))
    assert (await verifier.verify(token("alice"))).uid == "alice"
    clock.now += cert_endpoint.max_age_s + 1
    with pytest.raises(Unauthenticated, match="certificates are unavailable"):
        await verifier.verify(token("alice"))
    cert_endpoint.failing = False
    clock.now += settings.unknown_kid_refresh_interval_s + 1
    assert (await verifier.verify(token("alice"))).uid == "alice"


async def test_certificate_endpoint_failing_from_the_start_is_a_clear_401(make_gateway, cert_endpoint, token):
    cert_endpoint.failing = True
    client = await make_gateway()
    response = await open_stream(client, JOB, intervals="day", token=token("alice"))
    assert response.status == 401
    assert "certificates are unavailable" in (await response.json())["message"]


async def test_admin_claim_must_be_exactly_true(cert_endpoint, session, token):
    settings = _settings(cert_endpoint)
    verifier = TokenVerifier(settings, CertificateCache(session, settings))
    assert (await verifier.verify(token("root", admin=True))).is_admin is True
    assert (await verifier.verify(token("root", claim_overrides={"admin": "true"}))).is_admin is False
    assert (await verifier.verify(token("alice"))).is_admin is False
    disabled = _settings(cert_endpoint, admin_claim="")
    plain = TokenVerifier(disabled, CertificateCache(session, disabled))
    assert (await plain.verify(token("root", admin=True))).is_admin is False


def _unsigned(token: str) -> str:
    """The Firebase Auth Emulator's form: alg none, no signature."""
    import base64
    import json

    header = base64.urlsafe_b64encode(json.dumps({"alg": "none", "typ": "JWT"}).encode()).rstrip(b"=").decode()
    return f"{header}.{token.split('.')[1]}."


async def test_emulator_tokens_only_when_the_emulator_variable_is_set(cert_endpoint, session, token, caplog):
    unsigned = _unsigned(token("alice"))
    settings = _settings(cert_endpoint)
    with pytest.raises(Unauthenticated, match="alg"):
        await token_verifier(settings, session, environ={}).verify(unsigned)
    with caplog.at_level(logging.WARNING, logger="gateway.auth"):
        emulated = token_verifier(settings, session, environ={"FIREBASE_AUTH_EMULATOR_HOST": "127.0.0.1:9099"})
    assert "FIREBASE_AUTH_EMULATOR_HOST" in caplog.text
    assert (await emulated.verify(unsigned)).uid == "alice"
    with pytest.raises(Unauthenticated, match="aud"):
        await emulated.verify(_unsigned(token("alice", claim_overrides={"aud": "other"})))


# --- a bad day at the certificate endpoint (issue 8, items 12-14) ---------------------------


async def test_failing_certificate_endpoint_is_not_asked_again_on_every_request(make_gateway, cert_endpoint, token):
    cert_endpoint.failing = True
    client = await make_gateway()
    forged = [token("alice", header_overrides={"kid": f"forged-{n}"}) for n in range(50)]
    genuine = [token(f"user{n}") for n in range(50)]
    started = time.monotonic()
    for bad, good in zip(forged, genuine, strict=True):
        for candidate in (bad, good):
            response = await open_stream(client, JOB, intervals="day", token=candidate)
            assert response.status == 401
            assert "certificates are unavailable" in (await response.json())["message"]
    elapsed = time.monotonic() - started
    # One fetch, then none for 2 s, 4 s, 8 s ... (a slow machine may reach a second or third).
    assert cert_endpoint.fetch_count <= 1 + (elapsed > 2) + (elapsed > 6), (cert_endpoint.fetch_count, elapsed)


async def test_certificate_fetches_back_off_while_failing_and_recover_at_once(cert_endpoint, session, token, caplog):
    clock = FakeClock()
    settings = _settings(cert_endpoint)
    verifier = TokenVerifier(settings, CertificateCache(session, settings, clock=clock))
    cert_endpoint.failing = True
    fetches_at = []
    for _ in range(200):  # 100 s of requests, one every half second
        before = cert_endpoint.fetch_count
        with pytest.raises(Unauthenticated, match="certificates are unavailable"):
            await verifier.verify(token("alice", header_overrides={"kid": "forged"}))
        if cert_endpoint.fetch_count > before:
            fetches_at.append(clock.now - 1000)
        clock.now += 0.5
    # 2, 4, 8, 16 s apart, then every 30 s.
    assert fetches_at == [0, 2, 6, 14, 30, 60, 90]
    assert "next attempt in 30 s" in caplog.text
    cert_endpoint.failing = False
    clock.now += 30
    assert (await verifier.verify(token("alice"))).uid == "alice"
    # A success resets the delay: the next failure waits 2 s again.
    cert_endpoint.failing = True
    clock.now += cert_endpoint.max_age_s + 1
    count = cert_endpoint.fetch_count
    for _ in range(4):
        with pytest.raises(Unauthenticated):
            await verifier.verify(token("alice"))
        clock.now += 0.5
    assert cert_endpoint.fetch_count == count + 1
    clock.now += 1
    with pytest.raises(Unauthenticated):
        await verifier.verify(token("alice"))
    assert cert_endpoint.fetch_count == count + 2


def _certificate_server(handler):
    app = aiohttp.web.Application()
    app.router.add_get("/certs", handler)
    return app


@pytest.mark.parametrize("declared", [False, True])
async def test_oversized_certificate_answer_is_a_failed_refresh_read_no_further(
    aiohttp_server, make_gateway, token, caplog, declared
):
    import tracemalloc

    piece = b" " * 65536
    total = 32 * 1024 * 1024
    sent = []

    async def huge(request):
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        if declared:
            response.content_length = total
        await response.prepare(request)
        try:
            for _ in range(total // len(piece)):
                await response.write(piece)
                sent.append(len(piece))
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            pass  # the gateway stopped reading: what this test wants
        return response

    server = await aiohttp_server(_certificate_server(huge))
    client = await make_gateway(auth={"certs_url": str(server.make_url("/certs")), "fetch_timeout_s": 30})
    tracemalloc.start()
    try:
        with caplog.at_level(logging.WARNING, logger="gateway.auth"):
            response = await open_stream(client, JOB, intervals="day", token=token())
            body = await response.json()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024, peak  # the whole answer would be 32 MiB, twice over
    assert sum(sent) < total
    assert response.status == 401
    assert "certificates are unavailable" in body["message"]
    assert "could not refresh signing certificates" in caplog.text
    assert ("declares 33554432 bytes" if declared else "larger than the 1048576 bytes") in caplog.text


def _ec_certificate_pem() -> str:
    from cryptography.hazmat.primitives.asymmetric import ec

    from gateway.devtools.dev_auth import self_signed_certificate_pem

    return self_signed_certificate_pem(ec.generate_private_key(ec.SECP256R1()), "an EC key", valid_days=30)


async def test_a_certificate_that_cannot_verify_rs256_fails_only_tokens_naming_it(
    aiohttp_server, make_gateway, writer, signing_key, token, caplog
):
    published = {
        signing_key.kid: signing_key.certificate_pem,
        "ec-key": _ec_certificate_pem(),
        "not-a-certificate": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    }
    fetches = []

    async def certs(request):
        fetches.append(1)
        return aiohttp.web.json_response(published, headers={"Cache-Control": "max-age=3600"})

    server = await aiohttp_server(_certificate_server(certs))
    client = await make_gateway(auth={"certs_url": str(server.make_url("/certs"))})
    await seed_job(writer(JOB), counts={"day": 1})
    with caplog.at_level(logging.WARNING, logger="gateway.auth"):
        for kid in ("ec-key", "not-a-certificate"):
            response = await open_stream(client, JOB, intervals="day", token=token(header_overrides={"kid": kid}))
            assert response.status == 401
            assert "cannot verify RS256" in (await response.json())["message"]
    assert "skipping signing certificate 'ec-key': not an RSA key" in caplog.text
    assert "skipping signing certificate 'not-a-certificate'" in caplog.text
    response = await open_stream(client, JOB, intervals="day", token=token())
    assert response.status == 200
    await response.read()
    assert len(fetches) == 1  # a kid published unusable is not a reason to fetch again


# -- issue 20, item 8: one spelling per token (canonical base64url only) --

_PARTS = ("header", "claims", "signature")
# Nine '?' (0x3f) hold one whole 3-byte group 0x3f3f3f whatever the alignment, which encodes as '8_':
# a segment carrying it has a '_' for the '+/' spelling to change.
_HAS_UNDERSCORE = "?????????"


def _spellable_token(token, part: str, *, trailing_bits: bool = False) -> str:
    """A valid token whose ``part`` has a '-' or '_' (and, if asked, a length with unused bits)."""
    for pad in range(3):
        filler = _HAS_UNDERSCORE + "x" * pad
        minted = token("alice", header_overrides={"x": filler}, claim_overrides={"x": filler})
        segment = minted.split(".")[_PARTS.index(part)]
        if ("-" in segment or "_" in segment) and (not trailing_bits or len(segment) % 4 in (2, 3)):
            return minted
    raise AssertionError(f"no token with a {part} fit for the test")


def _respell(segment: str, spelling: str) -> str:
    if spelling == "junk":
        return segment[:10] + "!!!!" + segment[10:]
    if spelling == "junk_space":
        return segment[:10] + " " + segment[10:]
    if spelling == "plus_slash":
        return segment.translate(str.maketrans("-_", "+/"))
    if spelling == "padding":
        return segment + "=" * (-len(segment) % 4 or 2)
    if spelling == "trailing_bits":
        # The last character carries 2 or 4 unused low bits; setting one decodes to the same bytes.
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        return segment[:-1] + alphabet[alphabet.index(segment[-1]) | 1]
    raise AssertionError(spelling)


@pytest.mark.parametrize("part", _PARTS)
@pytest.mark.parametrize("spelling", ["junk", "junk_space", "plus_slash", "padding", "trailing_bits"])
async def test_only_the_canonical_base64url_spelling_of_a_token_verifies(client, token, writer, part, spelling):
    await seed_job(writer(JOB), counts={"day": 3})
    minted = _spellable_token(token, part, trailing_bits=spelling == "trailing_bits")
    canonical = await open_stream(client, JOB, intervals="day", headers={"Authorization": f"Bearer {minted}"})
    assert canonical.status == 200  # the canonical spelling verifies (and is now in the verified-token cache)
    await canonical.release()
    segments = minted.split(".")
    index = _PARTS.index(part)
    segments[index] = _respell(segments[index], spelling)
    respelled = ".".join(segments)
    assert respelled != minted
    response = await open_stream(client, JOB, intervals="day", headers={"Authorization": f"Bearer {respelled}"})
    assert response.status == 401
    message = (await response.json())["message"]
    assert f"token {part} is not" in message and "base64url" in message
    for segment in segments:
        assert segment not in message
