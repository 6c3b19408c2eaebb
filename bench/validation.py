"""What validating a stored chunk costs, in process: ``python -m bench.validation``.

One chunk of 500 canonical candles (what ``JobWriter`` stores), as the
gateway's readers see it. Every case runs interleaved with the others, in a
rotating order, and the best of several rounds is printed, so a busy moment
of a shared machine hits all alike.
"""

from __future__ import annotations

import hashlib
import timeit
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from gateway.sources.candles import Candle, CandleValidator, ValidatedChunks, encode_candle

_CHUNK = 500
_ROUNDS = 10
_RUNS = 300


def main() -> None:
    start = datetime(2025, 4, 1, tzinfo=UTC)
    stored = [
        encode_candle(Candle(start + timedelta(minutes=i), 1000 + i * 0.25, 1001.5, 998.75, 1000.5, 1000 + i))
        for i in range(_CHUNK)
    ]
    array = b"[" + b",".join(stored) + b"]"
    warm = ValidatedChunks()
    CandleValidator("minute", memo=warm).to_json_array(stored)
    cases: dict[str, Callable[[], object]] = {
        "fast path, no memo": lambda: CandleValidator("minute").to_json_array(stored),
        "fast path + SHA-256 + remember (a first read)": lambda: CandleValidator(
            "minute", memo=ValidatedChunks()
        ).to_json_array(stored),
        "memo hit (join + SHA-256 + lookup)": lambda: CandleValidator("minute", memo=warm).to_json_array(stored),
        "SHA-256 of the chunk alone": lambda: hashlib.sha256(array).digest(),
        "slow path (each candle decoded alone, re-encoded)": lambda: CandleValidator("minute")._normalise(stored),
    }
    best = dict.fromkeys(cases, float("inf"))
    names = list(cases)
    for round_ in range(_ROUNDS):
        # Rotated each round: the first case of a round tends to run slower.
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            best[name] = min(best[name], timeit.timeit(cases[name], number=_RUNS) / _RUNS * 1e6)
    print(f"one chunk: {_CHUNK} candles, {len(array)} bytes; best of {_ROUNDS} x {_RUNS} runs")
    for name, microseconds in best.items():
        print(f"{microseconds:9.1f} µs  {name}")


if __name__ == "__main__":
    main()
