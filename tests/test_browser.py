"""Headless Chromium against a real gateway: `node --test tests/js/` (driven by playwright-core).

The client over the page's real fetch(), what a bare EventSource does with
each answer (docs/FRONTEND.md), and the console that `make run` serves:
live candles, a dropped connection, a token refresh, chart point counts equal
to what the gateway stored. Screenshots go to artifacts/screenshots/.

Without Chromium (Debian's `chromium` at /usr/bin/chromium, or CHROMIUM_PATH)
this test is skipped locally, and fails in CI (env CI set).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import PROJECT
from tests.js_harness import NODE_MODULES, ROOT, run_node, running_harness

CHROMIUM = Path(os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"))
SCREENSHOTS = ROOT / "artifacts" / "screenshots"


def _require_browser() -> None:
    missing = [str(path) for path in (CHROMIUM, NODE_MODULES / "playwright-core") if not path.exists()]
    if not missing:
        return
    message = f"missing {', '.join(missing)} (apt-get install chromium; make install)"
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the browser tests: {message}")
    pytest.skip(message)


async def test_client_eventsource_and_console_in_headless_chromium(settings, signing_key, tmp_path):
    _require_browser()
    async with running_harness(settings, signing_key, PROJECT, tmp_path / "valkey") as harness:
        env = {
            **os.environ,
            "GATEWAY_URL": harness.gateway_url,
            "CONTROL_URL": harness.control_url,
            "CHROMIUM_PATH": str(CHROMIUM),
            "SCREENSHOT_DIR": str(SCREENSHOTS),
        }
        code, output = await run_node(
            # NODE_TEST_ARGS: e.g. --test-name-pattern=zstd, to run some of them while working on them
            [
                "--test",
                "--test-concurrency=1",
                "--test-reporter=spec",
                *os.environ.get("NODE_TEST_ARGS", "").split(),
                "tests/js/",
            ],
            env,
            timeout_s=120,
        )
    assert code == 0, output
