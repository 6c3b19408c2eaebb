"""The JavaScript client (clients/js) against a real gateway: `node --test clients/js/test/`.

The Node tests drive the trouble themselves through the harness's control
endpoint (tests/js_harness.py): short-lived tokens, a Valkey stop and start,
a replica restart, held stream slots, cut connections. This test starts the
harness, runs node, and shows node's output when it fails.
"""

from __future__ import annotations

import os
import shutil

import pytest

from tests.conftest import PROJECT
from tests.js_harness import NODE_MODULES, ROOT, run_node, running_harness

pytestmark = pytest.mark.skipif(shutil.which("node") is None and not os.environ.get("CI"), reason="node is missing")


async def test_node_client_suite_against_a_real_gateway(settings, signing_key, tmp_path):
    async with running_harness(settings, signing_key, PROJECT, tmp_path / "valkey") as harness:
        env = {**os.environ, "GATEWAY_URL": harness.gateway_url, "CONTROL_URL": harness.control_url}
        code, output = await run_node(
            ["--test", "--test-concurrency=1", "--test-reporter=spec", "clients/js/test/"], env, timeout_s=90
        )
    assert code == 0, output


async def test_typescript_declarations_compile_against_the_readme_usage():
    tsc = NODE_MODULES / "typescript" / "bin" / "tsc"
    code, output = await run_node(
        [str(tsc), "--noEmit", "--strict", "--target", "es2022", "--module", "nodenext", "--moduleResolution",
         "nodenext", "--types", "", str(ROOT / "clients/js/test/types.check.ts")],
        dict(os.environ),
        timeout_s=60,
    )  # fmt: skip
    assert code == 0, output


def test_checked_in_typescript_payload_types_are_what_the_code_generates():
    from gateway.schema import to_typescript

    assert (ROOT / "clients/js/src/events.d.ts").read_text() == to_typescript(), (
        "clients/js/src/events.d.ts is stale: run "
        ".venv/bin/python -m gateway schema --typescript -o clients/js/src/events.d.ts"
    )
