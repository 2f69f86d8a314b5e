"""The ``prometheus`` tool against Debian's real Prometheus scraping real targets.

One Prometheus per module (its first scrape comes ~5 s after start) scrapes
itself, a small ``/metrics`` endpoint the tests set, and Debian's
``prometheus-postgres-exporter`` watching a fresh database.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import quote

import pytest
import pytest_asyncio

from agent.tools.base import Limits
from agent.tools.prometheus import PrometheusTool, expression_from_generator_url
from tests.support.observability import (
    POSTGRES_EXPORTER,
    PROMETHEUS,
    PROMETHEUS_MISSING,
    HangingServer,
    MetricsServer,
    PostgresExporter,
    Prometheus,
    idle_in_transaction,
    running,
    workdir,
)
from tests.support.services import free_port, temporary_database, unique_name, wait_until

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(PROMETHEUS is None, reason=PROMETHEUS_MISSING)]


@dataclass
class Observed:
    prometheus: Prometheus
    app: MetricsServer
    dbname: str
    dsn: str
    exporter: bool  # the postgres exporter is scraped


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def observed(postgres) -> AsyncIterator[Observed]:
    async with MetricsServer() as app, temporary_database(postgres, hint="prom") as (dbname, dsn):
        app.samples.update({
            'checkout_http_requests_total{code="200"}': 1000.0,
            'checkout_http_requests_total{code="500"}': 42.0,
            "checkout_db_pool_in_use": 19.0,
        })
        with workdir("prometheus") as wd:
            jobs = [{"job_name": "app", "static_configs": [{"targets": [app.target]}]},
                    # a target nothing listens on: Prometheus records it down with "connection refused"
                    {"job_name": "gone", "static_configs": [{"targets": [f"127.0.0.1:{free_port()}"]}]}]
            exporter = PostgresExporter(wd, dsn) if POSTGRES_EXPORTER else None
            if exporter is not None:
                await exporter.start()
                jobs.append({"job_name": "postgres", "static_configs": [{"targets": [exporter.target]}]})
            try:
                async with running(Prometheus(wd, scrape_configs=jobs)) as prom:
                    for job in prom.jobs:  # the tests read every job's first scrape: up, or down for "gone"
                        await prom.wait_for_series(f'up{{job="{job}"}} == {0 if job == "gone" else 1}')
                    yield Observed(prom, app, dbname, dsn, exporter is not None)
            finally:
                if exporter is not None:
                    exporter.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def tool(observed: Observed) -> AsyncIterator[PrometheusTool]:
    prom = PrometheusTool(observed.prometheus.url, limits=Limits(timeout=5, max_rows=50))
    yield prom
    await prom.close()


async def test_an_instant_query_returns_the_scrape_targets_series_with_labels_and_values(tool):
    obs = await tool.run("query", {"expr": "checkout_http_requests_total"})

    assert obs.ok, obs.excerpt
    assert (obs.tool, obs.operation, obs.query) == ("prometheus", "query", "checkout_http_requests_total")
    by_code = {s["metric"]["code"]: s["value"] for s in obs.data}
    assert by_code == {"200": 1000.0, "500": 42.0}
    assert all(s["metric"]["job"] == "app" and s["metric"]["__name__"] == "checkout_http_requests_total"
               for s in obs.data)
    assert 'code="500"' in obs.excerpt and "= 42" in obs.excerpt
    assert obs.evidence().source == "prometheus" and obs.evidence().ok


async def test_an_instant_query_at_a_time_before_any_scrape_is_empty_not_an_error(tool):
    obs = await tool.run("query", {"expr": "checkout_db_pool_in_use", "time": time.time() - 3600})

    assert obs.ok and obs.data == []
    assert obs.excerpt.startswith("0 series")


async def test_a_range_query_returns_points_over_the_window(tool):
    obs = await tool.run("query_range", {"expr": 'up{job="prometheus"}', "start": "now-1m", "end": "now",
                                         "step": "1s"})

    assert obs.ok, obs.excerpt
    (series,) = obs.data
    assert series["metric"]["job"] == "prometheus"
    assert series["values"] and all(v == 1.0 for _, v in series["values"])
    assert series["values"] == sorted(series["values"])
    assert "points" in obs.excerpt and "step 1s" in obs.excerpt


async def test_the_alerts_own_expression_is_rerun_from_its_generator_url_against_our_prometheus(tool):
    # Given a generatorURL naming another (unreachable) host, as alerts from elsewhere do
    expr = 'sum by (code) (checkout_http_requests_total{code=~"5.."}) > 10'
    url = f"http://prometheus.invalid:9090/graph?g0.expr={quote(expr)}&g0.tab=1"

    obs = await tool.run("alert_expression", {"generator_url": url})

    # Then the expression ran here (the URL's host was never needed) and still fires
    assert obs.ok, obs.excerpt
    assert obs.query == expr
    assert [(s["metric"], s["value"]) for s in obs.data] == [({"code": "500"}, 42.0)]


def test_the_expression_is_taken_from_g0_expr_only():
    url = "http://p:9090/graph?g0.expr=rate%28x%5B5m%5D%29+%3E+0&g0.tab=1&g1.expr=up"
    assert expression_from_generator_url(url) == "rate(x[5m]) > 0"


async def test_a_generator_url_without_an_expression_is_a_failed_observation(tool):
    obs = await tool.run("alert_expression", {"generator_url": "http://p:9090/graph?g0.tab=1"})

    assert not obs.ok and "g0.expr" in obs.excerpt and obs.data is None


async def test_invalid_promql_is_a_failed_observation_with_prometheus_reason(tool):
    obs = await tool.run("query", {"expr": "sum(rate(x[5m]"})

    assert not obs.ok
    assert "bad_data" in obs.excerpt and obs.query == "sum(rate(x[5m]"
    assert not obs.evidence().ok


async def test_missing_parameters_and_unknown_operations_are_failed_observations(tool):
    assert not (await tool.run("query", {})).ok
    assert "start must be before end" in (await tool.run("query_range", {"expr": "up", "start": "now",
                                                                          "end": "now-1h"})).excerpt
    assert "invalid duration" in (await tool.run("query_range", {"expr": "up", "step": "fast"})).excerpt
    unknown = await tool.run("delete_series", {"expr": "up"})
    assert not unknown.ok and "unknown operation" in unknown.excerpt


async def test_at_most_max_rows_series_are_kept_and_the_cut_is_flagged(observed):
    prom = PrometheusTool(observed.prometheus.url, limits=Limits(max_rows=3))
    try:
        obs = await prom.run("query", {"expr": '{__name__=~"prometheus_.+"}'})
    finally:
        await prom.close()

    assert obs.ok and obs.truncated
    assert len(obs.data) == 3
    assert "first 3 kept" in obs.excerpt


async def test_an_answer_larger_than_max_bytes_is_a_failed_observation(observed):
    prom = PrometheusTool(observed.prometheus.url, limits=Limits(max_bytes=2000))
    try:
        obs = await prom.run("query", {"expr": '{__name__=~".+"}'})
    finally:
        await prom.close()

    assert not obs.ok and "max_bytes" in obs.excerpt


async def test_a_prometheus_that_never_answers_is_bounded_by_the_timeout():
    async with HangingServer() as hanging:
        prom = PrometheusTool(hanging.url, limits=Limits(timeout=0.5),
                              headers={"Authorization": "Bearer s3cret-token-value"})
        try:
            obs = await prom.run("query", {"expr": "up"})
        finally:
            await prom.close()

    assert not obs.ok and "timed out after 0.5 s" in obs.excerpt
    assert hanging.connections == 1
    assert "s3cret-token-value" not in obs.excerpt


async def test_an_unreachable_prometheus_is_a_failed_observation():
    prom = PrometheusTool(f"http://127.0.0.1:{free_port()}", limits=Limits(timeout=2))
    try:
        obs = await prom.run("query", {"expr": "up"})
    finally:
        await prom.close()

    assert not obs.ok and "/api/v1/query" in obs.excerpt


async def test_idle_in_transaction_sessions_show_up_through_the_postgres_exporter(observed, tool):
    if not observed.exporter:
        pytest.skip("prometheus-postgres-exporter binary not found (Debian package prometheus-postgres-exporter)")
    expr = f'pg_stat_activity_count{{datname="{observed.dbname}",state="idle in transaction"}}'

    # Given six sessions of one application idle in transaction
    async with idle_in_transaction(observed.dsn, 6, application_name=unique_name("checkout-api")):
        # When Prometheus has scraped the exporter since
        async def seen() -> bool:
            obs = await tool.run("query", {"expr": expr})
            return obs.ok and bool(obs.data) and obs.data[0]["value"] >= 6

        await wait_until(seen, timeout=20, what=expr)
        obs = await tool.run("query", {"expr": f"{expr} / on(server) pg_settings_max_connections"})

    # Then the saturation ratio is there to be reasoned about
    assert obs.ok and obs.data and 0 < obs.data[0]["value"] < 1


async def test_the_scrape_targets_say_which_is_down_and_why(tool, observed):
    obs = await tool.run("targets", {})

    assert obs.ok, obs.excerpt
    by_job = {t["job"]: t for t in obs.data}
    assert {"prometheus", "app", "gone"} <= set(by_job)
    assert by_job["app"]["health"] == "up" and by_job["app"]["lastError"] == ""
    assert by_job["app"]["instance"] == observed.app.target
    assert by_job["app"]["scrapeDuration"] >= 0 and by_job["app"]["lastScrape"]
    gone = by_job["gone"]
    assert gone["health"] == "down" and "connection refused" in gone["lastError"]
    assert "health=down" in obs.excerpt and "connection refused" in obs.excerpt


async def test_the_scrape_targets_are_filtered_by_job_and_instance(tool, observed):
    by_job = await tool.run("targets", {"job": "app"})
    by_instance = await tool.run("targets", {"instance": observed.app.target})
    nothing = await tool.run("targets", {"job": "app", "instance": "127.0.0.1:1"})

    assert [t["instance"] for t in by_job.data] == [observed.app.target]
    assert [t["job"] for t in by_instance.data] == ["app"]
    assert nothing.ok and nothing.data == [] and nothing.excerpt.startswith("0 active target")
    assert 'job=\'app\'' in by_job.query


async def test_at_most_max_rows_targets_are_kept_and_unknown_parameters_are_refused(observed):
    prom = PrometheusTool(observed.prometheus.url, limits=Limits(max_rows=1))
    try:
        cut = await prom.run("targets", {})
        wrong = await prom.run("targets", {"state": "dropped"})
    finally:
        await prom.close()

    assert cut.ok and cut.truncated and len(cut.data) == 1
    assert not wrong.ok and "state" in wrong.excerpt
