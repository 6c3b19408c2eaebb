"""Compressed streams (issue 22): negotiation, per-write flushing, shared live bytes, the endpoint's headers.

The codecs' bytes are read back by decoders other than the ones that wrote
them where that exists (``gzip.decompress`` checks the trailer's CRC-32 and
length; curl decodes both codings); the core stream tests run under each
coding too (``tests/conftest.py``, ``CODINGS``).
"""

from __future__ import annotations

import asyncio
import gzip
import os
import shutil
import zlib

import pytest
from backports.zstd import ZstdDecompressor

from gateway.compression import (
    ZSTD_WINDOW_LOG,
    Codec,
    LiveEncoder,
    encoder_for,
    negotiate,
    parse_codecs,
)
from gateway.config import load_settings
from gateway.errors import ConfigError
from tests.helpers import open_stream, seed_job, stream_path
from tests.sse_client import read_stream

BOTH = (Codec.ZSTD, Codec.GZIP)
JOB = "coded-job"


@pytest.mark.parametrize(
    ("header", "chosen"),
    [
        (None, Codec.IDENTITY),
        ("", Codec.IDENTITY),
        ("gzip, deflate, br, zstd", Codec.ZSTD),  # what Chrome sends: equal weights, the server's order
        ("gzip, deflate, br", Codec.GZIP),
        ("gzip;q=1.0, zstd;q=0.5", Codec.GZIP),  # the client's weights come first
        ("zstd;q=0, gzip", Codec.GZIP),
        ("zstd;q=0, gzip;q=0", Codec.IDENTITY),
        ("*", Codec.ZSTD),
        ("*;q=0.1, zstd;q=0", Codec.GZIP),
        ("x-gzip", Codec.GZIP),
        ("GZIP;Q=0.7", Codec.GZIP),
        ("br, deflate", Codec.IDENTITY),
        ("identity", Codec.IDENTITY),
        ("zstd;q=nonsense, gzip;q=0.2", Codec.GZIP),
        ("identity;q=0, br", Codec.IDENTITY),  # nothing we have is acceptable: a plain stream beats none
    ],
)
def test_negotiation_weighs_q_values_then_prefers_zstd_over_gzip(header, chosen):
    assert negotiate(header, BOTH) is chosen


def test_the_setting_restricts_the_codecs_or_turns_compression_off():
    assert negotiate("zstd, gzip", (Codec.GZIP,)) is Codec.GZIP
    assert negotiate("zstd", (Codec.GZIP,)) is Codec.IDENTITY
    assert negotiate("zstd, gzip", ()) is Codec.IDENTITY
    assert parse_codecs("zstd,gzip") == BOTH
    assert parse_codecs(" gzip , zstd ") == (Codec.GZIP, Codec.ZSTD)
    assert parse_codecs("") == parse_codecs("identity") == ()
    with pytest.raises(ConfigError, match=r"compression\.codecs.*comma-separated list of zstd, gzip"):
        load_settings(environ={"GATEWAY_COMPRESSION_CODECS": "brotli"})


FRAMES = [b'id: %d\nevent: data_chunk\ndata: {"points_sent": %d, "x": "abc"}\n\n' % (i, i) for i in range(50)]


class _ZstdFrames:
    """A zstd reader of one body of many frames, as HTTP clients read it (one decompressor per frame)."""

    def __init__(self) -> None:
        self._frame = ZstdDecompressor()

    def decompress(self, data: bytes) -> bytes:
        out = b""
        while data:
            if self._frame.eof:
                self._frame = ZstdDecompressor()
            out += self._frame.decompress(data)
            data = self._frame.unused_data if self._frame.eof else b""
        return out


def _decoder(codec: Codec):
    if codec is Codec.GZIP:
        return zlib.decompressobj(31).decompress
    return _ZstdFrames().decompress


@pytest.mark.parametrize("codec", BOTH)
def test_every_write_decodes_on_arrival_and_the_body_decodes_whole(codec):
    encoder = encoder_for(codec)
    assert encoder is not None
    decode = _decoder(codec)
    body = b""
    for frame in FRAMES:
        coded = encoder.encode(frame)
        # Flushed: the decoder gives the whole frame back from this write alone.
        assert decode(coded) == frame
        body += coded
    body += encoder.finish()
    whole = b"".join(FRAMES)
    if codec is Codec.GZIP:
        assert gzip.decompress(body) == whole  # checks the trailer's CRC-32 and length
    else:
        assert ZstdDecompressor().decompress(body) == whole
    assert len(body) < len(whole) / 3  # 64-byte events: block and flush overheads weigh


def test_zstd_frames_declare_a_window_within_rfc_9659s_8_mb():
    encoder = encoder_for(Codec.ZSTD)
    assert encoder is not None
    coded = encoder.encode(b"x" * 1_000_000)
    assert coded[:4] == b"\x28\xb5\x2f\xfd"
    descriptor = coded[4]
    assert not descriptor & 0x20  # not single-segment: a window descriptor follows
    exponent, mantissa = coded[5] >> 3, coded[5] & 7
    window = (1 << (10 + exponent)) + ((1 << (10 + exponent)) // 8) * mantissa
    assert window == 1 << ZSTD_WINDOW_LOG <= 8 * 1024 * 1024


def test_gzip_codes_empty_writes_and_writes_larger_than_any_buffer_of_its_deflate():
    """ISA-L's output grows past its buffer for incompressible and long writes; an empty write still flushes."""
    encoder = encoder_for(Codec.GZIP)
    assert encoder is not None
    decode = _decoder(Codec.GZIP)
    writes = [b"", b": ping\n\n", os.urandom(1_500_000), b"x" * 3_000_000, b"", FRAMES[0]]
    body = b""
    for write in writes:
        coded = encoder.encode(write)
        assert decode(coded) == write
        body += coded
    assert gzip.decompress(body + encoder.finish()) == b"".join(writes)


def test_after_a_shared_gzip_restart_the_deflate_refers_to_nothing_before_it():
    """What a boarding member relies on (ISA-L's full flush): the shared bytes after ``restart`` decode alone.

    The frame that follows the restart repeats the one before it, the best
    match a compressor could want; a raw deflate decoder that never saw the
    earlier bytes still reads it back exactly.
    """
    live = LiveEncoder(Codec.GZIP)
    frame = FRAMES[7] * 4
    live.encode(frame)
    assert live.restart()
    after = live.encode(frame)
    assert zlib.decompressobj(-15).decompress(after) == frame
    # and without the restart, the same frame again is coded as a reference back (the check can fail)
    again = live.encode(frame)
    assert len(again) < len(after) / 2
    with pytest.raises(zlib.error):
        zlib.decompressobj(-15).decompress(again)


@pytest.mark.parametrize("codec", BOTH)
def test_connections_that_join_a_shared_live_encoder_at_different_times_decode_everything(codec):
    """Encode once, write many: each connection's body is its own frames, then the shared bytes, then its own."""
    live = LiveEncoder(codec)
    connections = [encoder_for(codec) for _ in range(3)]
    bodies = [b""] * 3
    plain = [b""] * 3
    decoders = [_decoder(codec) for _ in range(3)]

    def write(index: int, coded: bytes, frame: bytes) -> None:
        # Every write decodes on arrival, with the history this connection's decoder has.
        assert decoders[index](coded) == frame
        bodies[index] += coded
        plain[index] += frame

    aboard: list[int] = []
    for step, frame in enumerate(FRAMES):
        joining = step // 10  # connection 0 joins at frame 0... 2 at 20; 0 leaves at 30
        if step % 10 == 0 and joining < 3:
            restart = live.restart()
            for index in aboard:
                write(index, restart, b"")
            encoder = connections[joining]
            assert encoder is not None
            # its own writes first, then the hand-over
            own = b"own %d\n" % joining
            write(joining, encoder.encode(own), own)
            write(joining, encoder.hand_over(), b"")
            aboard.append(joining)
        if step == 30:
            leaving = connections[0]
            assert leaving is not None
            write(0, leaving.take_back(live), b"")
            aboard.remove(0)
            write(0, leaving.encode(b"own again\n"), b"own again\n")
        coded = live.encode(frame)
        for index in aboard:
            write(index, coded, frame)
            encoder = connections[index]
            assert encoder is not None
            encoder.took(frame, live)
        if step == 30:
            own_frame = connections[0].encode(frame)  # type: ignore[union-attr]
            write(0, own_frame, frame)
    for index in aboard:
        encoder = connections[index]
        assert encoder is not None
        write(index, encoder.take_back(live), b"")
    for index, encoder in enumerate(connections):
        assert encoder is not None
        write(index, encoder.finish(), b"")
        if codec is Codec.GZIP:
            assert gzip.decompress(bodies[index]) == plain[index]
        else:
            assert _ZstdFrames().decompress(bodies[index]) == plain[index]
    assert plain[2].startswith(b"own 2\n") and plain[2].endswith(FRAMES[-1])


async def test_a_stream_says_it_varies_by_accept_encoding_and_names_its_coding(make_gateway, writer, token):
    await seed_job(writer(JOB), counts={"day": 3}, status="completed")
    client = await make_gateway()
    jwt = token()
    for asked, coding in [("identity", None), ("gzip", "gzip"), ("gzip, zstd", "zstd"), ("br", None)]:
        # An unknown interval too: its interval_not_found message echoes the request (BREACH, docs/DECISIONS.md).
        response = await open_stream(client, JOB, token=jwt, intervals="day,hour", headers={"Accept-Encoding": asked})
        assert response.headers["Vary"] == "Accept-Encoding"
        assert response.headers.get("Content-Encoding") == coding
        transcript = await read_stream(response)
        assert transcript.names[-1] == "all_complete" and "error" in transcript.names
        # The token is never in the body: no secret is compressed next to the echoed parameters.
        assert jwt.encode() not in transcript.raw and jwt.split(".")[2].encode() not in transcript.raw

    off = await make_gateway(compression={"codecs": ""})
    response = await open_stream(off, JOB, token=token(), intervals="day", headers={"Accept-Encoding": "zstd, gzip"})
    assert "Content-Encoding" not in response.headers
    assert response.headers["Vary"] == "Accept-Encoding"
    await read_stream(response)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("coding", ["gzip", "zstd"])
async def test_curl_compressed_shows_each_live_event_as_it_is_sent(make_gateway, writer, token, coding):
    """``curl --compressed -N``: a follower's events, decoded by curl, each on its own as the worker appends."""
    client = await make_gateway()
    w = writer(JOB)
    await seed_job(w, counts={"minute": 2})
    url = client.make_url(stream_path(JOB)).with_query(intervals="minute", follow="true", token=token())
    curl = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-N", "--compressed", "-H", f"Accept-Encoding: {coding}", "-D", "/dev/stderr", str(url),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert curl.stdout is not None and curl.stderr is not None
    try:
        text = b""
        while b"event: interval_complete" not in text:
            text += await asyncio.wait_for(curl.stdout.read(65536), 10)
        for n in range(3):
            await w.append("minute", [_candle(2 + n)])
            live = b""
            while b"\n\n" not in live:
                live += await asyncio.wait_for(curl.stdout.read(65536), 10)
            # One event: the appended candle, decoded by curl before the next one exists.
            assert live.count(b"event: data_chunk") == 1 and b'"points_sent":%d' % (3 + n) in live
        await w.update(status="completed")
        rest = await asyncio.wait_for(curl.stdout.read(), 10)
        assert rest.rstrip().split(b"\n")[-2] == b"event: all_complete"
        headers = await curl.stderr.read()
        assert f"content-encoding: {coding}".encode() in headers.lower()
        # curl decoded the whole body, its end (the codec's trailer) included
        assert await asyncio.wait_for(curl.wait(), 10) == 0, headers
    finally:
        if curl.returncode is None:
            curl.kill()
            await curl.wait()


def _candle(n: int):
    from tests.helpers import make_candles

    return make_candles(1, first=n)[0]


async def test_followers_of_every_coding_share_a_hub_group_and_its_pings_and_leave_it_decodable(
    make_gateway, writer, token
):
    """One hub group, three codings: each follower decodes every live event, the group's pings and the end.

    Followers board one after another (each boarding restarts the shared
    encoder of its coding for those aboard); a ping interval shorter than
    the quiet between appends makes the group ping its compressed members.
    """
    from prometheus_client import REGISTRY

    from gateway.resources import NOTES
    from tests.faults import eventually
    from tests.helpers import group_sizes, make_candles
    from tests.sse_client import Transcript, next_events

    def sample(name: str, codec: str) -> float:
        return REGISTRY.get_sample_value(name, {"codec": codec}) or 0.0

    before = {codec: sample("gateway_compression_input_bytes_total", codec) for codec in ("gzip", "zstd")}
    before_out = {codec: sample("gateway_compression_output_bytes_total", codec) for codec in ("gzip", "zstd")}
    client = await make_gateway(
        follow={"recheck_interval_s": 30.0}, server={"ping_interval_s": 0.3, "max_streams_per_user": 0}
    )
    w = writer(JOB)
    await seed_job(w, counts={"minute": 2})
    codings = ["zstd", "identity", "gzip", "zstd", "gzip"]
    readers, transcripts = [], []
    for coding in codings:
        response = await open_stream(
            client, JOB, token=token(), intervals="minute", follow="true", headers={"Accept-Encoding": coding}
        )
        assert response.headers.get("Content-Encoding", "identity") == coding
        next_event = _reader(response, transcript := Transcript())
        transcripts.append(transcript)
        while (await next_events(next_event, 1))[0].event != "interval_complete":
            pass
        readers.append((response, next_event))

    def riders() -> list[int]:
        return group_sizes(client, JOB)

    async def all_aboard() -> bool:
        return riders() == [len(codings)]

    assert await eventually(all_aboard, 5.0)
    # One shared encoder per codec among the compressed members (each live event coded once per codec).
    hub = client.server.app[NOTES].hub(JOB)
    assert hub is not None and sorted(hub.groups[0].live) == ["gzip", "zstd"] and hub.groups[0].coded == 4
    for n, candle in enumerate(make_candles(3, first=2)):
        await w.append("minute", [candle])
        got = [(await next_events(next_event, 1))[0] for _, next_event in readers]
        assert {(event.event, event.payload["points_sent"]) for event in got} == {("data_chunk", 3 + n)}
        await asyncio.sleep(0.8)  # quiet: the group pings its members
    assert riders() == [len(codings)]  # the pings went through the group: nobody left it
    await w.update(status="completed")
    for response, next_event in readers:
        assert (await next_events(next_event, 1))[0].event == "all_complete"
        assert await response.content.read() == b""  # the body ended cleanly: gzip's trailer checked by the decoder
    # Pings arrived between the events, decoded like everything else.
    assert all(transcript.comments.count("ping") >= 2 for transcript in transcripts), transcripts[0].comments
    for codec in ("gzip", "zstd"):
        sent_in = sample("gateway_compression_input_bytes_total", codec) - before[codec]
        sent_out = sample("gateway_compression_output_bytes_total", codec) - before_out[codec]
        assert 0 < sent_out < sent_in


def _reader(response, transcript):
    """``next_event()`` of a response, its comments kept in ``transcript``."""
    from tests.sse_client import SSEParser

    parser, iterator = SSEParser(), response.content.iter_any().__aiter__()

    async def next_event():
        while True:
            if transcript.events:
                return transcript.events.pop(0)
            parser.feed(await iterator.__anext__(), transcript)

    return next_event


async def test_followers_of_mixed_codings_that_open_at_once_merge_into_one_group_and_decode_every_point(
    make_gateway, writer, token, monkeypatch
):
    """Followers of mixed codings open at once on a job the process does not hear yet: groups of their own, merged.

    Each needs a look of its own after its snapshot (no early registration),
    so each starts a group; the groups reach one spot and merge, which
    moves every compressed member onto the surviving group's shared
    encoder. Every body must still decode to every point exactly once, in
    order, with the pings between, and end cleanly (gzip's trailer checked
    by the client's decoder).
    """
    from gateway.resources import NOTES
    from tests.faults import eventually
    from tests.helpers import expected_points, group_sizes, make_candles
    from tests.sse_client import event_reader

    client = await make_gateway(
        follow={"recheck_interval_s": 30.0}, server={"max_streams_per_user": 0, "ping_interval_s": 0.3}
    )
    w = writer(JOB)
    seeded = make_candles(20)
    await seed_job(w, counts={"minute": 0})
    await w.append("minute", seeded)
    codings = ["zstd", "gzip", "identity", "zstd", "gzip", "zstd"]
    groups_seen: set[int] = set()

    async def follow(coding: str) -> tuple[list[dict], bytes]:
        response = await open_stream(
            client, JOB, token=token(), intervals="minute", follow="true", headers={"Accept-Encoding": coding}
        )
        assert response.headers.get("Content-Encoding", "identity") == coding
        next_event = event_reader(response)
        points: list[dict] = []
        while True:
            event = await asyncio.wait_for(next_event(), 20)
            assert event.event != "error", event.payload
            if event.event == "data_chunk":
                points.extend(event.payload["data_points"])
            if event.event == "all_complete":
                return points, await response.content.read()

    from gateway import hub as hub_module

    # A spy on the merge (it calls the real one): how many compressed members each merge moved.
    merged: list[int] = []
    take = hub_module._Group.take

    def counted_take(group, other):
        merged.append(sum(member.codec is not None for member in other.members))
        take(group, other)

    monkeypatch.setattr(hub_module._Group, "take", counted_take)
    followers = [asyncio.create_task(follow(coding)) for coding in codings]

    async def one_group() -> bool:
        hub = client.server.app[NOTES].hub(JOB)
        groups_seen.add(0 if hub is None else len(hub.groups))
        return group_sizes(client, JOB) == [len(codings)]

    try:
        assert await eventually(one_group, 10.0), group_sizes(client, JOB)
        appended = make_candles(5, first=20)
        for candle in appended:
            await w.append("minute", [candle])
            await asyncio.sleep(0.5)  # quiet: the group pings its compressed members
        await w.update(status="completed")
        results = await asyncio.wait_for(asyncio.gather(*followers), 30)
    finally:
        for task in followers:
            task.cancel()
    for coding, (points, rest) in zip(codings, results, strict=True):
        assert points == expected_points(seeded + appended), coding
        assert rest == b"", coding
    assert any(merged), f"no merge moved a compressed member: {merged}"
    print(f"hub groups seen while the followers joined: {sorted(groups_seen)}; merges (coded members): {merged}")
