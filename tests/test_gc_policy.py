"""The serving process's garbage collector (gc_policy.py): start-up frozen, collections timed."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY

from gateway import gc_policy, metrics


@pytest.fixture
def restored_gc() -> Iterator[None]:
    """Whatever the test does to this (the test runner's) collector is undone after it."""
    threshold, callbacks = gc.get_threshold(), list(gc.callbacks)
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)
    gc.callbacks[:] = callbacks


def pauses(generation: int) -> float:
    return REGISTRY.get_sample_value("gateway_gc_pause_seconds_count", {"generation": str(generation)}) or 0.0


def test_start_up_is_frozen_and_the_youngest_generation_widened(restored_gc, caplog):
    gc.unfreeze()
    caplog.set_level("INFO", logger="gateway.gc_policy")
    gc_policy.settle_after_startup()
    assert gc.get_freeze_count() > 10_000  # at least the imports of this process
    assert gc.get_threshold()[0] == gc_policy.GEN0_THRESHOLD
    assert f"{gc.get_freeze_count()} start-up objects frozen" in caplog.text


def test_every_collection_is_timed_by_generation(restored_gc, monkeypatch):
    monkeypatch.setattr(metrics.SWITCH, "on", True)
    gc_policy.settle_after_startup()
    gc_policy.settle_after_startup()  # twice (a second app in one process) still times each collection once
    before = [pauses(generation) for generation in range(3)]
    gc.collect(0)
    gc.collect(2)
    assert [pauses(generation) - before[generation] for generation in range(3)] == [1, 0, 1]
