"""Many streams opening at once (issue 12): shared job reads, remembered tokens; nothing answered staler or looser."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import aiohttp
import pytest
from google.auth.crypt import rsa

from gateway.auth import CertificateCache, TokenVerifier
from gateway.config import AuthSettings
from gateway.devtools.dev_auth import DevSigningKey
from gateway.errors import Unauthenticated
from gateway.sources.fresh import FreshReads
from tests.conftest import PROJECT
from tests.helpers import expected_points, open_stream, seed_job, stream
from tests.test_tokens import FakeClock

JOB = "connect-job"


async def command_stats(redis_client) -> Counter[str]:
    info = await redis_client.info("commandstats")
    return Counter({name.removeprefix("cmdstat_"): stats["calls"] for name, stats in info.items()})


def count_signature_checks(monkeypatch) -> list[int]:
    """RS256 verifications from now on (a one-element list, so it stays current)."""
    checks = [0]
    original = rsa.RSAVerifier.verify

    def verify(self, message, signature):
        checks[0] += 1
        return original(self, message, signature)

    monkeypatch.setattr(rsa.RSAVerifier, "verify", verify)
    return checks


# -- one job read for streams that open together ----------------------------------


async def test_streams_opening_together_share_the_job_read_and_first_chunk_but_not_access(
    make_gateway, writer, token, redis_client
):
    client = await make_gateway(server={"max_streams_per_user": 0})
    stored = await seed_job(writer(JOB), counts={"day": 3})
    before = await command_stats(redis_client)
    # Redis holds every command for 1.5 s: all 20 requests ask while the first read waits.
    await redis_client.execute_command("CLIENT", "PAUSE", 1500, "ALL")
    users = ["alice"] * 10 + ["mallory"] * 10
    transcripts = await asyncio.gather(*(stream(client, JOB, token=token(uid), intervals="day") for uid in users))
    spent = await command_stats(redis_client) - before
    for uid, transcript in zip(users, transcripts, strict=True):
        if uid == "alice":
            assert transcript.names == ["interval_start", "data_chunk", "interval_complete", "all_complete"]
            assert transcript.named("data_chunk")[0].payload["data_points"] == expected_points(stored["day"])
        else:  # the shared read still went through mallory's own authorization
            assert [(e.event, e.payload["error"]) for e in transcript.events] == [("error", "job_not_found")]
    # The read in flight, and one after it for everyone who asked meanwhile; not 20 of each.
    assert spent["hgetall"] <= 2
    assert spent["lrange"] <= 3


async def test_a_stream_never_gets_a_job_read_that_started_before_it_asked():
    fresh = FreshReads()
    job = {"exists": False}
    release, reading = asyncio.Event(), asyncio.Event()
    started = 0

    async def read() -> bool:
        nonlocal started
        started += 1
        reading.set()
        seen = job["exists"]
        await release.wait()
        return seen

    first = asyncio.ensure_future(fresh.read("job", read))
    await reading.wait()  # the first read is under way, having seen no job
    job["exists"] = True  # a worker creates the job; then three more streams ask
    later = [asyncio.ensure_future(fresh.read("job", read)) for _ in range(3)]
    for _ in range(5):
        await asyncio.sleep(0)
    assert started == 1  # the three wait for the next read instead of joining this one
    release.set()
    assert await first is False
    assert await asyncio.gather(*later) == [True, True, True]
    assert started == 2  # and share it


async def test_callers_going_away_do_not_cancel_the_read_others_wait_for():
    fresh = FreshReads()
    release = asyncio.Event()

    async def read() -> str:
        await release.wait()
        return "job"

    first, leaving, staying = (asyncio.ensure_future(fresh.read("key", read)) for _ in range(3))
    for _ in range(5):
        await asyncio.sleep(0)
    first.cancel()  # the read in flight ends with its caller
    leaving.cancel()  # the queued one goes on for the caller that stays
    release.set()
    assert await staying == "job"
    assert first.cancelled()
    assert leaving.cancelled()


# -- verified tokens remembered -----------------------------------------------------


async def test_a_token_presented_again_is_not_verified_again_but_a_forged_twin_is(client, writer, token, monkeypatch):
    await seed_job(writer(JOB), counts={"day": 1})
    checks = count_signature_checks(monkeypatch)
    alice = token("alice")
    for _ in range(5):
        assert (await stream(client, JOB, token=alice, intervals="day")).names[-1] == "all_complete"
    assert checks == [1]
    # Same header and claims, another signature: another token, verified, refused.
    header, claims, signature = alice.split(".")
    forged = f"{header}.{claims}.{signature[:-8]}AAAAAAAA"
    response = await open_stream(client, JOB, token=forged, intervals="day")
    assert response.status == 401
    assert "signature" in (await response.json())["message"]
    assert checks == [2]


async def test_a_remembered_token_is_refused_the_moment_it_expires(make_gateway, writer, token, monkeypatch):
    client = await make_gateway(auth={"clock_skew_s": 0})
    await seed_job(writer(JOB), counts={"day": 1})
    checks = count_signature_checks(monkeypatch)
    now = time.time()
    expiring = token("alice", now=now - 3600 + 3, lifetime_s=3600)  # exp 2-3 s from now
    assert (await stream(client, JOB, token=expiring, intervals="day")).names[-1] == "all_complete"
    await asyncio.sleep(int(now) + 3 - time.time() + 0.05)
    response = await open_stream(client, JOB, token=expiring, intervals="day")
    assert response.status == 401
    assert "exp" in (await response.json())["message"]
    assert checks == [1]  # refused on its remembered claims, not by verifying it again


async def test_a_remembered_token_verifies_afresh_after_a_certificate_refresh_and_not_after_rotation(
    cert_endpoint, token, monkeypatch
):
    clock = FakeClock()
    settings = AuthSettings(firebase_project_id=PROJECT, certs_url=cert_endpoint.url)
    checks = count_signature_checks(monkeypatch)
    async with aiohttp.ClientSession() as session:
        verifier = TokenVerifier(settings, CertificateCache(session, settings, clock=clock))
        alice = token("alice")
        for _ in range(3):
            assert (await verifier.verify(alice)).uid == "alice"
        assert checks == [1]
        clock.now += cert_endpoint.max_age_s + 1  # the certificates are fetched again: new verifiers
        assert (await verifier.verify(alice)).uid == "alice"
        assert checks == [2]
        cert_endpoint.keys = [DevSigningKey.generate()]  # Google rotated the key that signed it away
        clock.now += cert_endpoint.max_age_s + 1
        with pytest.raises(Unauthenticated, match="kid is not one of the current"):
            await verifier.verify(alice)
