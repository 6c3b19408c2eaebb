"""deploy/prometheus/alerts.yaml and deploy/grafana: promtool's unit tests, and only metrics a real gateway serves.

promtool (Debian's prometheus package) checks the rules and runs their unit
tests (tests/prometheus/alerts_test.yaml). Skipped without promtool, except
in CI (env ``CI`` set), where ``.ci/run`` installs it and its absence is a
failure. The metric names test needs no promtool: it scrapes a real gateway
process after real requests and compares every name the dashboard and the
rules use with what the scrape holds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from typing import Any

import aiohttp
import pytest
import yaml

from tests.conftest import PROJECT
from tests.helpers import seed_job, stream_path
from tests.replicas import REPO, Replica, replica_env

ALERTS = REPO / "deploy" / "prometheus" / "alerts.yaml"
ALERT_TESTS = REPO / "tests" / "prometheus" / "alerts_test.yaml"
DASHBOARD = REPO / "deploy" / "grafana" / "candle-gateway.json"
PROMTOOL = shutil.which("promtool")

# PromQL words that are not metric names (functions are recognised by the parenthesis after them).
_KEYWORDS = {"and", "or", "unless", "bool", "inf", "nan"}


def need_promtool() -> str:
    if PROMTOOL is None:
        if os.environ.get("CI"):
            raise RuntimeError("promtool is not installed; .ci/run installs it (apt-get install prometheus)")
        pytest.skip("promtool is not installed (it is in CI)")
    return PROMTOOL


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or Grafana's ``label_values(metric, label)``) reads."""
    found = set(re.findall(r"label_values\(\s*([a-zA-Z_:][\w:]*)", expr))
    expr = re.sub(r"label_values\([^)]*\)", "", expr)
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges and subqueries
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\boffset\s+\S+", "", expr)
    expr = re.sub(r"\$\{[^}]*\}|\$\w+", "", expr)  # Grafana's variables
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)(\s*\()?", expr):
        name, call = match.groups()
        if call is None and name not in _KEYWORDS:
            found.add(name)
    return found


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            expressions.append(variable["query"]["query"])
    return expressions


def scraped_names(text: str) -> set[str]:
    """Every name a scrape declares or serves: samples, and each family's series by its type."""
    names: set[str] = set()
    suffixes = {"histogram": ("_bucket", "_count", "_sum"), "summary": ("_count", "_sum")}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(" ", 3)
            names.add(family)
            names.update(family + suffix for suffix in suffixes.get(kind, ()))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_metric_names_are_read_from_promql():
    expr = (
        'sum by (le) (rate(gateway_a_bucket{x="y",z=~"w"}[5m])) / clamp_min(sum(gateway_b_total offset 5m), 1e-9)'
        " > 3 and on (instance) absent(gateway_c) or label_values(gateway_d, instance) + $__rate_interval"
    )
    assert metric_names(expr) == {"gateway_a_bucket", "gateway_b_total", "gateway_c", "gateway_d"}


def test_alert_rules_pass_promtools_check_and_unit_tests():
    promtool = need_promtool()
    check = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    units = subprocess.run(
        [promtool, "test", "rules", str(ALERT_TESTS)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ALERT_TESTS.parent,
    )
    assert units.returncode == 0, units.stdout + units.stderr
    assert "SUCCESS" in units.stdout


def test_every_alert_has_a_case_that_fires_and_one_that_stays_silent():
    cases = [case for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    for rule in alert_rules():
        mine = [case for case in cases if case["alertname"] == rule["alert"]]
        assert any(case["exp_alerts"] for case in mine), f"no case where {rule['alert']} fires"
        assert any(not case["exp_alerts"] for case in mine), f"no case where {rule['alert']} stays silent"


def test_every_rule_has_a_severity_and_a_runbook():
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["runbook"] == "docs/OPERATIONS.md#alerts", rule["alert"]
    operations = (REPO / "docs" / "OPERATIONS.md").read_text()
    assert "\n## Alerts\n" in operations
    for rule in alert_rules():
        assert f"`{rule['alert']}`" in operations, f"docs/OPERATIONS.md says nothing of {rule['alert']}"


@pytest.fixture
async def gateway(redis_url, cert_endpoint, tmp_path):
    replica = Replica("observed", tmp_path, replica_env(redis_url, cert_endpoint.url, PROJECT))
    try:
        yield await replica.start()
    finally:
        replica.stop()


async def test_dashboard_and_alerts_name_only_metrics_a_real_gateway_serves(gateway, writer, token):
    await seed_job(writer("observed-job"), counts={"day": 20})
    async with aiohttp.ClientSession() as session:
        # A stream to its end, and a refused one, so that labelled families have samples too.
        async with session.get(
            gateway.base + stream_path("observed-job"), params={"intervals": "day", "token": token()}
        ) as response:
            assert response.status == 200
            assert b"all_complete" in await response.read()
        async with session.get(gateway.base + stream_path("observed-job"), params={"intervals": "day"}) as refused:
            assert refused.status == 401
        async with session.get(f"http://127.0.0.1:{gateway.metrics_port}/metrics") as scrape:
            served = scraped_names(await scrape.text())

    used_by_dashboard = set().union(*(metric_names(e) for e in dashboard_expressions()))
    used_by_alerts = set().union(*(metric_names(rule["expr"]) for rule in alert_rules()))
    # Not vacuous: both read the gateway's own families, and the scrape was parsed.
    assert {"gateway_streams_open", "gateway_first_data_chunk_seconds_bucket"} <= used_by_dashboard
    assert {"gateway_requests_refused_total", "gateway_streams_ended_total"} <= used_by_alerts
    assert "gateway_streams_started_total" in served
    assert not used_by_dashboard - served, f"the dashboard names what no scrape serves: {used_by_dashboard - served}"
    assert not used_by_alerts - served, f"the alert rules name what no scrape serves: {used_by_alerts - served}"
