"""The serving process's garbage collector: what it may scan, how often, and how long it stopped the loop.

CPython's cyclic collector stops the event loop while it runs, and a full
(generation 2) collection walks every tracked object in the process. A
gateway holds about 100,000 of them from its imports alone (aiohttp,
redis-py, google-cloud-bigquery, grpc, pyarrow): 37 ms of walking on the
bench machine, paid again by every full collection, and in part by the
collections that new streams' objects trigger while they connect. So, once
start-up is done:

- ``gc.freeze()`` moves everything alive then (imports, settings, the
  app) into the permanent generation, which no collection scans again;
- the youngest generation is collected after ``GEN0_THRESHOLD``
  allocations instead of 700, so the churn of a busy stream (frames,
  futures, small structs, nearly all freed by reference counting first) is
  looked at less often; the older generations keep CPython's ratios.

Together they took a quarter or more off the gateway's CPU per new follow
stream (docs/PERFORMANCE.md, "Fan-out", the garbage collector). What is left
grows with the open streams (a few hundred objects each): a full
collection at 10,000 followers still stops the loop for 0.7-1.1 s. CPython
starts one only after ten collections of generation 1 and once the
long-lived objects grew by a quarter: about once while 10,000 streams
connect, where CPython's 700 made it ten times as often.

Cycles are still collected; this changes when, not whether.
``gateway_gc_pause_seconds`` (by generation) shows on-call what the
collector costs.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Final

from gateway import metrics

log = logging.getLogger(__name__)

# Allocations (net of frees) between collections of the youngest generation: CPython's
# default is 700. Against 700 in docs/PERFORMANCE.md ("Fan-out", the garbage collector).
GEN0_THRESHOLD: Final = 10_000


class _PauseTimer:
    """A ``gc.callbacks`` entry that times each collection into the pause histogram."""

    def __init__(self) -> None:
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif metrics.SWITCH.on:
            metrics.GC_PAUSE_SECONDS.labels(str(info["generation"])).observe(time.perf_counter() - self._started)


_timer = _PauseTimer()


def settle_after_startup() -> None:
    """Freeze what start-up built, widen the youngest generation, and time every collection from now on."""
    gc.collect()  # what start-up left as garbage is not worth keeping forever
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, older, oldest)
    if _timer not in gc.callbacks:
        gc.callbacks.append(_timer)
    log.info(
        "garbage collector: %d start-up objects frozen (never scanned again); youngest generation every %d allocations",
        gc.get_freeze_count(),
        GEN0_THRESHOLD,
    )
