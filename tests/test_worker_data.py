"""Broken worker data (issue 8, items 16-18): what a worker stores never reaches a client unchecked.

Through the real endpoint where the behaviour shows there (a raw line break
in a ``data:`` line, a non-UTC time, a rewritten list), and property tests
of the validator itself: whatever the fast path sends is what the slow path
would send re-encoded (same fields, values and instants), or the slow path
refuses the chunk and so does the fast path.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import DataError
from gateway.sources.candles import CandleValidator, ValidatedChunks, encode_candle
from gateway.sources.keys import candles_key
from tests.helpers import expected_points, seed_job, stream

JOB = "worker-data-job"
_SSE_FIELDS = (b"data:", b"id:", b"event:", b"retry:", b":")


def _points(transcript) -> list[dict[str, Any]]:
    return [p for e in transcript.named("data_chunk") for p in e.payload["data_points"]]


def _assert_every_line_is_an_sse_field(raw: bytes) -> None:
    """A raw CR or LF inside an event's data would start a line that is no field."""
    for line in raw.replace(b"\r\n", b"\n").split(b"\n"):
        assert line == b"" or line.startswith(_SSE_FIELDS), line[:80]
    assert b"\r" not in raw


async def _store(redis_client, interval: str, elements: list[bytes]) -> None:
    key = candles_key(JOB, interval)
    await redis_client.delete(key)
    await redis_client.rpush(key, *elements)


def _raw(time: str, volume: Any = 1000, **fields: Any) -> dict[str, Any]:
    return {"time": time, "open": 1.5, "high": 2.0, "low": 1.0, "close": 1.75, "volume": volume, **fields}


# --- 16: a line break inside a stored candle -------------------------------------------------


@pytest.mark.parametrize("separator", ["\n", "\r\n", "\r"])
async def test_pretty_printed_candle_is_re_encoded_never_splitting_a_data_line(
    client, writer, token, redis_client, separator
):
    stored = await seed_job(writer(JOB), counts={"minute": 3})
    elements = [encode_candle(c) for c in stored["minute"]]
    # A worker that pretty-prints (valid JSON, with line breaks and indentation).
    elements[1] = json.dumps(json.loads(elements[1]), indent=2).replace("\n", separator).encode()
    await _store(redis_client, "minute", elements)
    transcript = await stream(client, JOB, token=token(), intervals="minute")
    _assert_every_line_is_an_sse_field(transcript.raw)
    assert transcript.names == ["interval_start", "data_chunk", "interval_complete", "all_complete"]
    assert _points(transcript) == expected_points(stored["minute"])


# --- 17: repeated keys ------------------------------------------------------------------------


async def test_candle_with_two_time_keys_is_a_data_error_naming_it(client, writer, token, redis_client):
    await seed_job(writer(JOB), counts={"minute": 0, "day": 1})
    # The reported case: a Z time then a +05:30 one. The neighbour writes its
    # time with a space, so the array as a whole still holds one T and one Z
    # per candle: what the old fast check counted.
    twice = (
        b'{"time":"2025-04-01T09:15:00Z","time":"2025-04-01 15:46:00+05:30",'
        b'"open":1.5,"high":2.0,"low":1.0,"close":1.75,"volume":1000}'
    )
    spaced = msgspec.json.encode(_raw("2025-04-01 10:00:00Z"))
    await _store(redis_client, "minute", [spaced, twice])
    transcript = await stream(client, JOB, token=token(), intervals="minute,day")
    assert transcript.names == [
        "interval_start", "error", "interval_start", "data_chunk", "interval_complete", "all_complete",
    ]  # fmt: skip
    error = transcript.events[1].payload
    assert (error["error"], error["interval"], error["points_sent"]) == ("data_error", "minute", 0)
    assert "candle 1 of interval 'minute'" in error["message"]
    assert "'time' twice" in error["message"]
    assert "+05:30" not in transcript.raw.decode()


@pytest.mark.parametrize("field", ["volume", "open"])
async def test_any_repeated_field_is_a_data_error(client, writer, token, redis_client, field):
    await seed_job(writer(JOB), counts={"minute": 0})
    candle = _raw("2025-04-01T09:15:00Z")
    body = msgspec.json.encode(candle)[:-1] + f',"{field}":7}}'.encode()
    await _store(redis_client, "minute", [body])
    transcript = await stream(client, JOB, token=token(), intervals="minute")
    assert transcript.names == ["interval_start", "error", "all_complete"]
    assert f"'{field}' twice" in transcript.events[1].payload["message"]


# --- other spellings the old fast check let through, or that both paths must refuse ------------


@pytest.mark.parametrize(
    ("element", "sent_time"),
    [
        # Escaped key and escaped letters: a client gets the decoded, canonical form.
        (b'{"ti\\u006de":"2025-04-01T09:15:00Z","open":1.5,"high":2.0,"low":1.0,"close":1.75,"volume":5}', None),
        (b'{"time":"2025-04-01\\u005409:15:00\\u005a","open":1.5,"high":2.0,"low":1.0,"close":1.75,"volume":5}', None),
        # Lower-case separator and suffix, a space separator, another offset.
        (b'{"time":"2025-04-01t09:15:00z","open":1.5,"high":2.0,"low":1.0,"close":1.75,"volume":5}', None),
        (b'{"time":"2025-04-01 09:15:00Z","open":1.5,"high":2.0,"low":1.0,"close":1.75,"volume":5}', None),
        (b'{"time":"2025-04-01T14:45:00+05:30","open":1.5,"high":2.0,"low":1.0,"close":1.75,"volume":5}', None),
        # Already canonical: sent byte for byte.
        (
            b'{"time":"2025-04-01T09:15:00Z","open":1.5,"high":2.0,"low":1.0,"close":1.75,"volume":5}',
            b'"2025-04-01T09:15:00Z"',
        ),
    ],
)
async def test_every_spelling_reaches_clients_as_utc_z(client, writer, token, redis_client, element, sent_time):
    await seed_job(writer(JOB), counts={"minute": 0})
    await _store(redis_client, "minute", [element])
    transcript = await stream(client, JOB, token=token(), intervals="minute")
    assert _points(transcript) == [
        {"time": "2025-04-01T09:15:00Z", "open": 1.5, "high": 2.0, "low": 1.0, "close": 1.75, "volume": 5}
    ]
    if sent_time is not None:
        assert element in transcript.raw


@pytest.mark.parametrize(
    "element",
    [
        b'{"time":"2025-04-01T09:15:00Z","open":1.5,"high":2.0,"low":1.0,"close":1.75,"volume":1e5}',
        b'{"time":"2025-04-01T09:15:00Z","open":NaN,"high":2.0,"low":1.0,"close":1.75,"volume":5}',
        b'{"time":"2025-04-01T09:15:00Z","open":1e400,"high":2.0,"low":1.0,"close":1.75,"volume":5}',
        b'{"time":"2025-04-01T09:15:00Z","open":1.5,"high":2.0,"low":1.0,"close":1.75,"volume":99999999999999999999}',
        b'{"time":"2025-04-01T09:15:00Z","open":1.5,"high":2.0,"low":1.0,"close":1.75,"volume":"5"}',
    ],
)
async def test_numbers_outside_the_contract_are_a_data_error(client, writer, token, redis_client, element):
    await seed_job(writer(JOB), counts={"minute": 0})
    await _store(redis_client, "minute", [element])
    transcript = await stream(client, JOB, token=token(), intervals="minute")
    assert transcript.names == ["interval_start", "error", "all_complete"]
    assert transcript.events[1].payload["error"] == "data_error"
    assert "candle 0 of interval 'minute'" in transcript.events[1].payload["message"]


@pytest.mark.parametrize("depth", [2000, 100_000])
async def test_a_deeply_nested_extra_field_is_a_data_error(client, writer, token, redis_client, depth):
    """msgspec raises RecursionError (not DecodeError) when it skips a field nested this deep."""
    await seed_job(writer(JOB), counts={"minute": 0})
    nested = b"[" * depth + b"]" * depth
    element = msgspec.json.encode(_raw("2025-04-01T09:15:00Z"))[:-1] + b',"extra":' + nested + b"}"
    await _store(redis_client, "minute", [element])
    transcript = await stream(client, JOB, token=token(), intervals="minute")
    assert transcript.names == ["interval_start", "error", "all_complete"]
    assert "candle 0 of interval 'minute' is malformed" in transcript.events[1].payload["message"]


async def test_a_candle_split_across_two_elements_is_a_data_error(client, writer, token, redis_client):
    """Spliced, a fragment and a double element make a valid array of the same length."""
    await seed_job(writer(JOB), counts={"minute": 0})
    first, second, third = (msgspec.json.encode(_raw(f"2025-04-01T09:1{n}:00Z", volume=n)) for n in range(3))
    cut = first.index(b',"low"')
    elements = [first[:cut], first[cut + 1 :], second + b"," + third]
    await _store(redis_client, "minute", elements)
    transcript = await stream(client, JOB, token=token(), intervals="minute")
    assert transcript.names == ["interval_start", "error", "all_complete"]
    assert "candle 0 of interval 'minute' is malformed" in transcript.events[1].payload["message"]


# --- 18: the memo of validated chunks is keyed by content ------------------------------------


async def test_a_rewrite_keeping_every_length_is_validated_again(client, writer, token, redis_client):
    stored = await seed_job(writer(JOB), counts={"minute": 6}, status="running")
    first = await stream(client, JOB, token=token(), intervals="minute", chunk_size=3)
    assert _points(first) == expected_points(stored["minute"])
    # Against the contract, a worker rewrites the list: same count, same byte
    # length of every element, of every chunk. volume 1000 -> "10" (a string),
    # and two candles swapped (out of order).
    elements = [encode_candle(c) for c in stored["minute"]]
    elements[1] = elements[1].replace(b'"volume":1001', b'"volume":"10"')
    elements[3], elements[4] = elements[4], elements[3]
    assert len(elements[1]) == len(encode_candle(stored["minute"][1]))
    await _store(redis_client, "minute", elements)
    again = await stream(client, JOB, token=token(), intervals="minute", chunk_size=3)
    assert again.names == ["interval_start", "error", "all_complete"]
    assert "candle 1 of interval 'minute'" in again.events[1].payload["message"]
    # Repaired but still out of order: the second chunk fails on its own.
    elements[1] = encode_candle(stored["minute"][1])
    await _store(redis_client, "minute", elements)
    third = await stream(client, JOB, token=token(), intervals="minute", chunk_size=3)
    assert third.names == ["interval_start", "data_chunk", "error", "all_complete"]
    assert "candle 4 of interval 'minute' is not after" in third.events[2].payload["message"]


def test_the_memo_answers_only_for_the_very_bytes_it_validated():
    memo = ValidatedChunks()
    elements = [msgspec.json.encode(_raw(f"2025-04-01T09:1{n}:00Z", volume=1000 + n)) for n in range(3)]
    array = CandleValidator("minute", memo=memo).to_json_array(elements)
    assert CandleValidator("minute", memo=memo).to_json_array(elements) == array
    same_length = [*elements[:2], elements[2].replace(b'"volume":1002', b'"volume":"10"')]
    assert len(b",".join(same_length)) == len(b",".join(elements))
    with pytest.raises(DataError, match="candle 2"):
        CandleValidator("minute", memo=memo).to_json_array(same_length)


# --- properties: the fast path equals the slow path, or both refuse --------------------------

_BASE = datetime(2025, 4, 1, tzinfo=UTC)
_OFFSETS = ["Z", "z", "+00:00", "-00:00", "+05:30", "-04:00", "+0530"]

_times = st.builds(
    lambda seconds, micros: _BASE + timedelta(seconds=seconds, microseconds=micros),
    st.integers(0, 10**7),
    st.sampled_from([0, 0, 0, 500_000, 123_456]),
)
_prices = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.integers(-(10**6), 10**6),
    st.sampled_from(["1e5", "1E-3", "-0", "-0.0", "1e400", "NaN", "Infinity", '"5"', "null", "01", "1.", "true"]),
)
_volumes = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from(["1e5", "5.0", "99999999999999999999", "-0", '"5"', str(2**63), str(-(2**63) - 1)]),
)


def _time_text(instant: datetime, offset: str, separator: str) -> str:
    if offset in ("Z", "z"):
        local, suffix = instant, offset
    else:
        sign = -1 if offset.startswith("-") else 1
        hours, minutes = int(offset[1:3]), int(offset[-2:])
        local = instant + sign * timedelta(hours=hours, minutes=minutes)
        suffix = offset
    text = local.replace(tzinfo=None).isoformat(sep=separator)
    return text + suffix


def _number(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


@st.composite
def _candle_text(draw: Any, instant: datetime) -> bytes:
    """One stored candle, in any of the spellings a worker might produce (or get wrong)."""
    time = _time_text(instant, draw(st.sampled_from(_OFFSETS)), draw(st.sampled_from(["T", "T", "T", "t", " "])))
    if draw(st.booleans()) and time.endswith(("Z", "z")):
        time = time.replace("T", "\\u0054")  # an escape the decoder reads as T
    pairs = [
        ["time", json.dumps(time).replace("\\\\u0054", "\\u0054")],
        ["open", _number(draw(_prices))],
        ["high", _number(draw(_prices))],
        ["low", _number(draw(_prices))],
        ["close", _number(draw(_prices))],
        ["volume", _number(draw(_volumes))],
    ]
    mutation = draw(
        st.sampled_from(["none", "none", "none", "shuffle", "extra", "repeat", "repeat_time", "escape_key", "drop"])
    )
    if mutation == "shuffle":
        pairs = draw(st.permutations(pairs))
    elif mutation == "extra":
        pairs.insert(draw(st.integers(0, 6)), ["note", json.dumps(draw(st.sampled_from(["T", "Z", "time", "x\n"])))])
    elif mutation == "repeat":
        name, value = draw(st.sampled_from(pairs))
        pairs.insert(draw(st.integers(0, 6)), [name, value])
    elif mutation == "repeat_time":
        other = _time_text(instant + timedelta(hours=1), "+05:30", draw(st.sampled_from(["T", " "])))
        pairs.insert(draw(st.integers(0, 6)), ["time", json.dumps(other)])
    elif mutation == "escape_key":
        pair = draw(st.sampled_from(pairs))
        pair[0] = pair[0][0] + "\\u00" + format(ord(pair[0][1]), "02x") + pair[0][2:]
    elif mutation == "drop":
        pairs.pop(draw(st.integers(0, 5)))
    space = draw(st.sampled_from(["", "", " ", "\n", "\r\n", "\t"]))
    body = ("," + space).join(f'"{name}":{space}{value}' for name, value in pairs)
    return ("{" + space + body + space + "}").encode()


@st.composite
def _chunks(draw: Any) -> list[bytes]:
    count = draw(st.integers(1, 6))
    instants = sorted(draw(st.lists(_times, min_size=count, max_size=count)))
    if draw(st.integers(0, 9)) == 0:
        draw(st.randoms()).shuffle(instants)  # sometimes out of order, or repeated
    elements = [draw(_candle_text(instant)) for instant in instants]
    if count > 1 and draw(st.integers(0, 9)) == 0:
        # A fragment: cut one element in two at a comma, glue two others together.
        i = draw(st.integers(0, count - 2))
        joined = elements[i] + b"," + elements[i + 1]
        cut = draw(st.sampled_from([n for n, byte in enumerate(joined) if byte == ord(",")]))
        elements[i : i + 2] = [joined[:cut], joined[cut + 1 :]]
    return elements


def _slow(elements: list[bytes]) -> bytes | None:
    try:
        return CandleValidator("minute")._normalise(elements)
    except DataError:
        return None


def _fast(elements: list[bytes], memo: ValidatedChunks | None) -> bytes | None:
    try:
        return CandleValidator("minute", memo=memo).to_json_array(elements)
    except DataError:
        return None


def _same_candles(fast: bytes, slow: bytes) -> None:
    """Same fields, values and instants; the fast path's times are literally UTC ``...T...Z``."""
    assert b"\n" not in fast and b"\r" not in fast
    # Pairs, not dicts: a repeated key must not hide behind the parser keeping the last.
    sent = json.loads(fast, object_pairs_hook=lambda pairs: pairs)
    canonical = json.loads(slow, object_pairs_hook=dict)
    assert len(sent) == len(canonical)
    for pairs, reference in zip(sent, canonical, strict=True):
        point = dict(pairs)
        assert len(pairs) == 6 and set(point) == set(reference)
        time = point["time"]
        assert time.endswith("Z") and "T" in time, time
        parsed = msgspec.json.decode(json.dumps(time), type=datetime)
        assert parsed == msgspec.json.decode(json.dumps(reference["time"]), type=datetime)
        for name in ("open", "high", "low", "close"):
            assert isinstance(point[name], int | float) and math.isfinite(point[name])
            assert point[name] == reference[name]
        assert type(point["volume"]) is int and point["volume"] == reference["volume"]


# Derandomized: the same examples on every run (no flaky suite, no example database on disk).
_PROPERTY: dict[str, Any] = {
    "deadline": None,
    "derandomize": True,
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow],
}


@settings(max_examples=600, **_PROPERTY)
@given(_chunks())
def test_fast_path_sends_what_the_slow_path_would_or_refuses_as_it_does(elements):
    slow = _slow(elements)
    for memo in (None, ValidatedChunks()):
        fast = _fast(elements, memo)
        if slow is None:
            assert fast is None, fast
        else:
            assert fast is not None
            _same_candles(fast, slow)
        if memo is not None:
            assert _fast(elements, memo) == fast  # a memo hit answers the same


@settings(max_examples=300, **_PROPERTY)
@given(st.lists(_times, min_size=1, max_size=8, unique=True), st.data())
def test_canonical_chunks_take_the_fast_path_byte_for_byte(instants, data):
    """What JobWriter stores (msgspec's canonical form) is spliced, never re-encoded."""
    from gateway.sources.candles import Candle

    candles = [
        Candle(instant, data.draw(st.floats(-1e9, 1e9)), 2.0, 1.0, 1.5, data.draw(st.integers(0, 2**53)))
        for instant in sorted(instants)
    ]
    elements = [encode_candle(c) for c in candles]
    assert CandleValidator("minute").to_json_array(elements) == b"[" + b",".join(elements) + b"]"
