"""``/metrics`` (issue 9.1): scraped during and after real streams, the counts match what clients received."""

from __future__ import annotations

import asyncio

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import metrics_app
from tests.conftest import PROJECT
from tests.faults import eventually
from tests.helpers import follow_and_append, group_sizes, make_candles, open_stream, seed_job, stream
from tests.replicas import Replica, replica_env
from tests.sse_client import SSEParser, Transcript

JOB = "metrics-job"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(scrape: dict, name: str, **labels: str) -> float:
    return scrape.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(client) -> dict:
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    return samples(await response.text())


async def test_a_note_to_its_written_events_is_timed_once_per_wake_up(client, aiohttp_client, writer, token):
    metrics = await aiohttp_client(metrics_app())
    name = "gateway_follow_note_to_written_seconds"
    before = await scrape(metrics)
    response, _, _ = await follow_and_append(client, writer(JOB), JOB, token, seeded=2, intervals="day")
    after = await scrape(metrics)
    response.close()
    # One follower, one append: one note, one look (a re-check may add one that no note caused, not timed).
    assert value(after, f"{name}_count") - value(before, f"{name}_count") == 1
    assert 0 < value(after, f"{name}_sum") - value(before, f"{name}_sum") < 2.0


async def test_metrics_count_what_clients_received(make_gateway, aiohttp_client, writer, token):
    gateway = await make_gateway(server={"max_streams_per_user": 2})
    metrics = await aiohttp_client(metrics_app())
    await seed_job(writer(JOB), counts={"day": 120, "minute": 1500})
    before = await scrape(metrics)

    # during: one follow stream held open past its snapshot
    held = await open_stream(gateway, JOB, token=token(), intervals="day", follow="true", chunk_size=50)
    parser, live = SSEParser(), Transcript()
    async for chunk in held.content.iter_any():
        live.raw += chunk
        parser.feed(chunk, live)
        if "interval_complete" in live.names:
            break
    during = await scrape(metrics)
    open_before = value(before, "gateway_streams_open", source="job", mode="follow")
    assert value(during, "gateway_streams_open", source="job", mode="follow") == open_before + 1
    assert value(during, "gateway_followers") == value(before, "gateway_followers") + 1
    assert value(during, "gateway_subscribed_job_channels") == value(before, "gateway_subscribed_job_channels") + 1

    # complete streams, a refused one (429: the user holds 2) and a bad token (401)
    done = [await stream(gateway, JOB, token=token(), intervals="day,minute", limit=2000, chunk_size=100)]
    second = await open_stream(gateway, JOB, token=token(), intervals="day", follow="true", chunk_size=50)
    await second.content.readuntil(b"event: interval_complete")
    refused = await open_stream(gateway, JOB, token=token(), intervals="day")
    assert refused.status == 429
    header, claims, signature = token().split(".")
    tampered = ("B" if signature[0] != "B" else "C") + signature[1:]  # canonical base64url that does not verify
    bad = await open_stream(gateway, JOB, token=f"{header}.{claims}.{tampered}", intervals="day")
    assert bad.status == 401
    second.close()
    held.close()
    done.append(await stream(gateway, JOB, token=token("bob", admin=True), intervals="minute", limit=1500))

    for _ in range(100):  # the server notices the closed follow streams
        after = await scrape(metrics)
        if value(after, "gateway_streams_open", source="job", mode="follow") == open_before:
            break
        await asyncio.sleep(0.02)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert value(after, "gateway_streams_open", source="job", mode="follow") == open_before
    assert delta("gateway_streams_started_total", source="job", mode="snapshot") == 2
    assert delta("gateway_streams_started_total", source="job", mode="follow") == 2
    assert delta("gateway_streams_ended_total", source="job", mode="snapshot", outcome="all_complete") == 2
    assert delta("gateway_streams_ended_total", source="job", mode="follow", outcome="client_gone") == 2
    received_events = sum(len(t.events) for t in done)
    received_points = sum(len(e.payload["data_points"]) for t in done for e in t.named("data_chunk"))
    chunks = sum(len(t.named("data_chunk")) for t in done)
    # The two follow streams sent their snapshots too; count what the held one received, the other read nothing.
    held_chunks = len(live.named("data_chunk"))
    assert delta("gateway_events_sent_total", event="data_chunk") >= chunks + held_chunks
    assert delta("gateway_events_sent_total", event="all_complete") == 2
    total_events = sum(delta("gateway_events_sent_total", event=e) for e in
                       ("interval_start", "data_chunk", "interval_complete", "all_complete", "error", "job_status"))  # fmt: skip
    follow_snapshot_events = total_events - received_events
    assert follow_snapshot_events == 2 * len(live.events)  # both follow streams sent the same snapshot
    assert delta("gateway_sent_bytes_total") == sum(len(t.raw) for t in done) + 2 * len(live.raw)
    assert delta("gateway_points_sent_total") == received_points + 2 * 120
    assert delta("gateway_first_data_chunk_seconds_count") == 4
    assert delta("gateway_stream_duration_seconds_count", mode="snapshot") == 2
    assert delta("gateway_requests_refused_total", status="429", reason="too_many_streams") == 1
    assert delta("gateway_requests_refused_total", status="401", reason="signature") == 1
    assert delta("gateway_redis_call_duration_seconds_count") > 0
    assert value(after, "gateway_certificate_refreshes_total", outcome="ok") >= 1


async def test_a_followers_first_data_chunk_written_by_its_hub_is_timed(make_gateway, aiohttp_client, writer, token):
    """A follower whose snapshot had no candle gets its first data_chunk from its job's hub: timed once, then."""
    gateway = await make_gateway(follow={"recheck_interval_s": 30.0}, server={"max_streams_per_user": 0})
    metrics = await aiohttp_client(metrics_app())
    name = "gateway_first_data_chunk_seconds_count"
    w = writer(JOB)
    await seed_job(w, counts={"minute": 0})
    before = await scrape(metrics)
    opened_at = asyncio.get_running_loop().time()
    response = await open_stream(gateway, JOB, token=token(), intervals="minute", follow="true")
    assert response.status == 200
    parser, transcript = SSEParser(), Transcript()
    while "interval_complete" not in transcript.names:
        parser.feed(await asyncio.wait_for(response.content.readany(), 10), transcript)
    assert not transcript.named("data_chunk")

    async def in_hub() -> bool:
        return group_sizes(gateway, JOB) == [1]

    assert await eventually(in_hub, 10.0)
    assert value(await scrape(metrics), name) == value(before, name)  # no data_chunk yet
    await asyncio.sleep(0.2)  # the histogram's sum must show the wait for the first candle
    for first in (0, 1):  # the second is not a first
        await w.append("minute", make_candles(1, first=first))
        while len(transcript.named("data_chunk")) <= first:
            parser.feed(await asyncio.wait_for(response.content.readany(), 10), transcript)
    after = await scrape(metrics)
    response.close()
    assert value(after, name) == value(before, name) + 1
    waited = value(after, "gateway_first_data_chunk_seconds_sum") - value(
        before, "gateway_first_data_chunk_seconds_sum"
    )
    assert 0.2 <= waited <= asyncio.get_running_loop().time() - opened_at  # from the request's arrival


async def test_metrics_port_of_a_real_process_and_zero_disables_it(redis_url, cert_endpoint, tmp_path):
    env = replica_env(redis_url, cert_endpoint.url, PROJECT)
    replica, off = (
        Replica("metrics", tmp_path, env),
        Replica("no-metrics", tmp_path, {**env, "GATEWAY_METRICS_PORT": "0"}),
    )
    await asyncio.gather(replica.start(), off.start())
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{replica.metrics_port}/metrics") as response:
                text = await response.text()
            assert "gateway_streams_open" in text and "process_resident_memory_bytes" in text
            # never on the public port
            async with session.get(f"{replica.base}/metrics") as response:
                assert response.status == 404
    finally:
        replica.terminate()
        await replica.wait()
    try:
        for _ in range(100):  # the line follows the port's opening
            if "serving on" in off.log():
                break
            await asyncio.sleep(0.05)
        assert "metrics off" in off.log()
        assert "start-up objects frozen" in off.log()  # serve settles the garbage collector (gc_policy.py)
    finally:
        off.terminate()
        await off.wait()


async def test_build_info_names_the_version_and_what_it_runs_on(aiohttp_client):
    import importlib.metadata
    import platform

    metrics = await aiohttp_client(metrics_app())
    response = await metrics.get("/metrics")
    text = await response.text()
    (line,) = [line for line in text.splitlines() if line.startswith("gateway_build_info{")]
    assert line.endswith(" 1.0")
    (family,) = [f for f in text_string_to_metric_families(text) if f.name in ("gateway_build", "gateway_build_info")]
    (sample,) = family.samples
    assert sample.labels["version"] == importlib.metadata.version("candle-gateway")
    assert sample.labels["python"] == platform.python_version()
    assert sample.labels["redis_py"] == importlib.metadata.version("redis")
    assert sample.labels["aiohttp"] == importlib.metadata.version("aiohttp")
