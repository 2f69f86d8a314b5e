"""The ``logs`` tool against Loki's HTTP API with lines pushed through its push API.

Grafana Loki is not packaged by Debian (its ``loki`` package is a genetics
program), so the Loki here is ``tests.support.observability.LokiDouble``: the
real push/query wire format and a LogQL subset, in memory. The tool cannot
tell the difference; point it at a real Loki and the same calls work.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import pytest_asyncio

from agent.tools.base import Limits
from agent.tools.logs import LogsTool
from tests.support.observability import HangingServer, LokiDouble, push_logs

pytestmark = pytest.mark.integration

NOW = time.time()


@dataclass
class Loki:
    server: LokiDouble
    errors_by_pod: dict[str, int]
    lines: int


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def loki() -> AsyncIterator[Loki]:
    async with LokiDouble() as server:
        # Given ten minutes of checkout logs: one pod failing on the database, one fine, and another app
        a = [(NOW - 600 + i * 10, f'level=info msg="order placed" order={i}') for i in range(60)]
        a += [(NOW - 300 + i * 10 + 5, f'level=error msg="db timeout: remaining connection slots are reserved" '
                                       f"attempt={i}") for i in range(30)]
        b = [(NOW - 600 + i * 20, f'level=info msg="order placed" order=b{i}') for i in range(30)]
        b += [(NOW - 120, 'level=error msg="payment provider returned 502"')]
        billing = [(NOW - 60, 'level=error msg="billing exploded"')]
        await push_logs(server.url, [
            ({"app": "checkout-api", "namespace": "shop", "pod": "checkout-api-7d9f-a"}, a),
            ({"app": "checkout-api", "namespace": "shop", "pod": "checkout-api-7d9f-b"}, b),
            ({"app": "billing", "namespace": "shop", "pod": "billing-1"}, billing),
        ])
        yield Loki(server, {"checkout-api-7d9f-a": 30, "checkout-api-7d9f-b": 1}, len(a) + len(b))


@pytest_asyncio.fixture(loop_scope="session")
async def tool(loki: Loki) -> AsyncIterator[LogsTool]:
    logs = LogsTool(loki.server.url, limits=Limits(timeout=5, max_rows=100), now=lambda: NOW + 1)
    yield logs
    await logs.close()


async def test_query_range_returns_lines_newest_first_with_timestamps_and_labels(tool):
    obs = await tool.run("query_range", {"query": '{app="checkout-api"} |= "db timeout"', "start": "now-15m"})

    assert obs.ok, obs.excerpt
    assert obs.query == '{app="checkout-api"} |= "db timeout"'
    assert len(obs.data) == 30 and not obs.truncated
    first = obs.data[0]
    assert first["labels"] == {"app": "checkout-api", "namespace": "shop", "pod": "checkout-api-7d9f-a"}
    assert "attempt=29" in first["line"] and first["ts"].endswith("Z")
    assert [ln["ts_ns"] for ln in obs.data] == sorted((ln["ts_ns"] for ln in obs.data), reverse=True)
    assert obs.excerpt.startswith("30 lines (backward")


async def test_query_range_forward_and_a_window_that_excludes_everything(tool):
    forward = await tool.run("query_range", {"query": '{app="billing"}', "direction": "forward"})
    empty = await tool.run("query_range", {"query": '{app="checkout-api"}', "start": NOW - 7200,
                                           "end": NOW - 3600})

    assert forward.ok and [ln["line"] for ln in forward.data] == ['level=error msg="billing exploded"']
    assert empty.ok and empty.data == []


async def test_at_most_max_rows_lines_are_asked_for_and_kept(loki):
    logs = LogsTool(loki.server.url, limits=Limits(max_rows=3), now=lambda: NOW + 1)
    try:
        obs = await logs.run("query_range", {"query": '{namespace="shop"}', "limit": 1000})
    finally:
        await logs.close()

    assert obs.ok and obs.truncated and len(obs.data) == 3
    path, params = loki.server.requests[-1]
    assert path == "/loki/api/v1/query_range" and params["limit"] == "3" and params["direction"] == "backward"


async def test_error_counts_by_pod_with_share_of_all_lines_and_samples(loki, tool):
    obs = await tool.run("error_counts", {"selector": '{app="checkout-api"}', "window": "15m", "by": ["pod"],
                                          "samples": 3})

    assert obs.ok, obs.excerpt
    data = obs.data
    assert {g["labels"]["pod"]: g["count"] for g in data["by"]} == loki.errors_by_pod
    assert data["total"] == 31 and data["lines_total"] == loki.lines and data["window_s"] == 900
    assert [g["labels"]["pod"] for g in data["by"]][0] == "checkout-api-7d9f-a"  # largest first
    assert len(data["samples"]) == 3 and all("level=error" in s["line"] for s in data["samples"])
    assert data["samples"][0]["ts_ns"] > data["samples"][-1]["ts_ns"]
    assert obs.query == ('sum by (pod) (count_over_time({app="checkout-api"} '
                         '|~ `(?i)(error|exception|fatal|panic|traceback)` [15m]))')
    assert "31 lines matching" in obs.excerpt and "of 121 lines" in obs.excerpt


async def test_error_counts_over_a_short_window_and_a_custom_pattern(tool):
    recent = await tool.run("error_counts", {"selector": '{app="checkout-api"}', "window": "3m", "samples": 0})
    payment = await tool.run("error_counts", {"selector": '{namespace="shop"}', "pattern": "502|exploded"})

    assert recent.ok and recent.data["total"] == 18 + 1 and recent.data["samples"] == []
    assert payment.ok and payment.data["total"] == 2 and payment.data["by"] == [{"labels": {}, "count": 2}]


async def test_untrusted_selectors_and_patterns_are_refused_before_reaching_loki(loki, tool):
    before = len(loki.server.requests)
    cases = [
        {"selector": 'app="x"'},
        {"selector": '{app="x"}) or vector(1'},
        {"selector": '{app="x"}', "pattern": "a`) or vector(1"},
        {"selector": '{app="x"}', "pattern": "(unclosed"},
        {"selector": '{app="x"}', "by": ["pod) or (x"]},
    ]
    for params in cases:
        obs = await tool.run("error_counts", params)
        assert not obs.ok and obs.excerpt.startswith("invalid parameters"), params
    assert len(loki.server.requests) == before


async def test_invalid_logql_is_a_failed_observation_with_lokis_reason(tool):
    obs = await tool.run("query_range", {"query": 'app="checkout-api"'})

    assert not obs.ok and "parse error" in obs.excerpt and obs.data is None


async def test_a_metric_query_returns_series(tool):
    query = 'sum by (pod) (count_over_time({app="checkout-api"} |= "error" [1m]))'
    obs = await tool.run("query_range", {"query": query, "start": "now-10m"})

    assert obs.ok, obs.excerpt
    assert {s["metric"]["pod"] for s in obs.data} == {"checkout-api-7d9f-a", "checkout-api-7d9f-b"}
    assert all(v >= 1 for s in obs.data for _, v in s["values"])


async def test_an_answer_larger_than_max_bytes_is_a_failed_observation(loki):
    logs = LogsTool(loki.server.url, limits=Limits(max_bytes=500), now=lambda: NOW + 1)
    try:
        obs = await logs.run("query_range", {"query": '{namespace="shop"}'})
    finally:
        await logs.close()

    assert not obs.ok and "max_bytes" in obs.excerpt


async def test_a_loki_that_never_answers_is_bounded_by_the_timeout():
    async with HangingServer() as hanging:
        logs = LogsTool(hanging.url, limits=Limits(timeout=0.5), headers={"Authorization": "Bearer tok-abcdef-123"})
        try:
            obs = await logs.run("error_counts", {"selector": '{app="x"}'})
        finally:
            await logs.close()

    assert not obs.ok and "timed out after 0.5 s" in obs.excerpt
    assert "tok-abcdef-123" not in obs.excerpt


async def test_the_tenant_header_is_sent(loki):
    logs = LogsTool(loki.server.url, tenant="team-shop", now=lambda: NOW + 1)
    try:
        obs = await logs.run("query_range", {"query": '{app="billing"}'})
    finally:
        await logs.close()
    assert obs.ok and len(obs.data) == 1
    assert loki.server.tenants[-1] == "team-shop"
