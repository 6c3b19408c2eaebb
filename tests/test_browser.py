"""Headless Chromium against a real gateway: the `node --test` files of tests/js/ (driven by playwright-core).

- browser.test.mjs: the client over the page's real fetch(), what a bare
  EventSource does with each answer (docs/FRONTEND.md), and the console that
  `make run` serves: live candles, a waiting interval, a dropped connection,
  a token refresh, every bar in view, chart point counts equal to what the
  gateway stored, the demo job continued across a restart; the screenshots
  are checked (DOM state and pixels), not only taken;
- hook.test.mjs: useCandleStream in a React app (esbuild-bundled from
  frontend/package-lock.json);
- cors.test.mjs: pages on other origins, allowed and refused.

Screenshots go to artifacts/screenshots/.

Without Chromium (Debian's `chromium` at /usr/bin/chromium, or CHROMIUM_PATH)
this test is skipped locally, and fails in CI (env CI set).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import PROJECT
from tests.js_harness import NODE_MODULES, ROOT, Harness, run_node, running_harness

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
        env = _browser_env(harness)
        code, output = await run_node(
            ["--test", "--test-concurrency=1", "--test-reporter=spec", "tests/js/browser.test.mjs"], env, timeout_s=300
        )
    assert code == 0, output


async def test_react_hook_in_headless_chromium(settings, signing_key, tmp_path):
    """useCandleStream in a StrictMode app of two charts: a cut, an expired token, new arguments, an unmount."""
    _require_browser()
    async with running_harness(settings, signing_key, PROJECT, tmp_path / "valkey") as harness:
        code, output = await run_node(
            ["--test", "--test-reporter=spec", "tests/js/hook.test.mjs"], _browser_env(harness), timeout_s=180
        )
    assert code == 0, output


async def test_cross_origin_pages_in_headless_chromium(settings, signing_key, tmp_path):
    """Pages on other ports: the origin in server.cors_origins streams; another is refused at the preflight."""
    _require_browser()
    async with running_harness(settings, signing_key, PROJECT, tmp_path / "valkey") as harness:
        code, output = await run_node(
            ["--test", "--test-reporter=spec", "tests/js/cors.test.mjs"], _browser_env(harness), timeout_s=150
        )
    assert code == 0, output


def _browser_env(harness: Harness) -> dict[str, str]:
    return {
        **os.environ,
        "GATEWAY_URL": harness.gateway_url,
        "CONTROL_URL": harness.control_url,
        "CHROMIUM_PATH": str(CHROMIUM),
        "SCREENSHOT_DIR": str(SCREENSHOTS),
        "ALLOWED_PAGE_URL": harness.allowed_page_url,
        "REFUSED_PAGE_URL": harness.refused_page_url,
    }
