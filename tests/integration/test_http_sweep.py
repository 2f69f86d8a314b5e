"""The http/service sweep against a real misbehaving service and a real Prometheus scraping it.

``FlakyService`` (a real aiohttp server) answers 200, 503, slowly or never on
routes under ``/svc/``; Debian's Prometheus scrapes four jobs on it and one on
a closed port, so its ``/api/v1/targets`` says what a production one would:
``connection refused``, ``server returned HTTP status 503``, ``context deadline
exceeded``, or up. The alerts are written as an SRE would, with names that
match no playbook pattern; the sweep probes only URLs under the allowed prefix.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import quote_plus

import pytest
import pytest_asyncio

from agent.reasoning import RulesReasoner
from agent.reasoning.base import Budget, Investigation
from agent.reasoning.http_sweep import sweep
from agent.reasoning.rules import alert_facts, conclude, rank
from agent.tools.base import Limits
from agent.tools.probe import ProbeTool
from agent.tools.prometheus import PrometheusTool
from schemas import Alert, AlertStatus, Conclusion, IncidentEvent, Phase, utcnow
from tests.support.endpoints import FlakyService
from tests.support.observability import PROMETHEUS, PROMETHEUS_MISSING, Prometheus, running, workdir
from tests.support.services import free_port

pytestmark = [pytest.mark.integration, pytest.mark.skipif(PROMETHEUS is None, reason=PROMETHEUS_MISSING)]


@dataclass
class Scene:
    service: FlakyService
    prometheus: Prometheus
    closed: str  # host:port nothing listens on


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def scene() -> AsyncIterator[Scene]:
    async with FlakyService(slow_s=0.3) as svc:
        closed = f"127.0.0.1:{free_port()}"
        jobs = [{"job_name": "checkout", "metrics_path": "/svc/metrics", "static_configs": [{"targets": [svc.target]}]},
                {"job_name": "failing", "metrics_path": "/svc/fail", "static_configs": [{"targets": [svc.target]}]},
                {"job_name": "stalled", "metrics_path": "/svc/hang", "static_configs": [{"targets": [svc.target]}]},
                {"job_name": "gone", "static_configs": [{"targets": [closed]}]}]
        with workdir("http-sweep") as wd:
            async with running(Prometheus(wd, scrape_configs=jobs, scrape_self=False)) as prom:
                await prom.wait_for_series('up{job="checkout"} == 1')
                for job in ("failing", "stalled", "gone"):
                    await prom.wait_for_series(f'up{{job="{job}"}} == 0')
                yield Scene(svc, prom, closed)


def incident(name: str, expr: str, **labels: str) -> IncidentEvent:
    all_labels = {"alertname": name, "severity": "critical", **labels}
    alert = Alert(status=AlertStatus.FIRING, labels=all_labels, annotations={}, starts_at=utcnow(),
                  generator_url=f"http://prometheus.invalid/graph?g0.expr={quote_plus(expr)}&g0.tab=1")
    return IncidentEvent(source="http://alertmanager:9093", group_key=f'{{}}:{{alertname="{name}"}}',
                         status=AlertStatus.FIRING, alerts=(alert,), common_labels=all_labels)


@pytest_asyncio.fixture(loop_scope="session")
async def tools(scene: Scene) -> AsyncIterator[dict]:
    probe = ProbeTool([f"{scene.service.base}/svc/", f"http://{scene.closed}/"], limits=Limits(timeout=1.0))
    prom = PrometheusTool(scene.prometheus.url, limits=Limits(timeout=5.0))
    yield {"http": probe, "prometheus": prom}
    await probe.close()
    await prom.close()


async def swept(tools: dict, inc: IncidentEvent):
    inv = Investigation(incident=inc, tools=tools, phase=Phase.READ_ONLY)
    drafts = await sweep(inv, alert_facts(inc))
    hypotheses = rank(drafts)
    return inv, hypotheses, conclude(hypotheses, [o for o in inv.observations if not o.ok])


def assert_clear(hypotheses, assessment, cause: str) -> None:
    assert hypotheses and hypotheses[0].cause == cause, [(h.cause, h.score) for h in hypotheses]
    assert assessment.conclusion is Conclusion.CONCLUSIVE, assessment.summary
    assert hypotheses[0].score >= 0.6
    assert len(hypotheses) == 1 or hypotheses[0].score - hypotheses[1].score >= 0.15


async def test_a_service_with_no_listener_is_endpoint_down_from_the_probe_and_prometheus(scene, tools):
    # Given checkout's pods are gone: nothing listens on its port, Prometheus's scrapes are refused
    inc = incident("CheckoutGone", 'up{job="gone"} == 0', job="gone", instance=scene.closed)

    # When the rules reasoner investigates with the probe and Prometheus
    inv = Investigation(incident=inc, tools=tools, phase=Phase.READ_ONLY)
    result = await RulesReasoner().investigate(inv)

    # Then the endpoint is down, from both sources
    assert result.conclusion is Conclusion.CONCLUSIVE, result.summary
    best = result.hypotheses[0]
    assert best.cause == "endpoint_down" and best.score >= 0.6
    assert "refused" in best.statement
    assert {e.source for e in best.evidence_for} >= {"http", "prometheus"}
    assert any("connection refused" in e.excerpt for e in best.evidence_for if e.source == "prometheus")


async def test_a_service_answering_503_is_endpoint_errors(scene, tools):
    inc = incident("CheckoutBroken", 'up{job="failing"} == 0', job="failing", instance=scene.service.target,
                   handler="/svc/fail")

    inv, hypotheses, assessment = await swept(tools, inc)

    assert_clear(hypotheses, assessment, "endpoint_errors")
    assert "503" in hypotheses[0].statement
    excerpts = " ".join(e.excerpt for e in hypotheses[0].evidence_for)
    assert "upstream database unavailable" in excerpts  # the body excerpt, as evidence
    assert "server returned HTTP status 503" in excerpts  # what Prometheus saw scraping it
    assert scene.service.hits["/svc/fail"] >= 1


async def test_a_service_slower_than_the_alerts_latency_threshold_is_endpoint_slow(scene, tools):
    expr = 'histogram_quantile(0.99, sum by (le) (rate(checkout_request_duration_seconds_bucket[5m]))) > 0.1'
    inc = incident("CheckoutP99", expr, job="checkout", instance=scene.service.target, handler="/svc/slow")

    _, hypotheses, assessment = await swept(tools, inc)

    assert_clear(hypotheses, assessment, "endpoint_slow")
    assert "0.1 s" in hypotheses[0].statement


async def test_a_service_that_never_answers_is_endpoint_slow_with_prometheus_timing_out_too(scene, tools):
    inc = incident("CheckoutStuck", 'up{job="stalled"} == 0', job="stalled", instance=scene.service.target,
                   handler="/svc/hang")

    _, hypotheses, assessment = await swept(tools, inc)

    assert_clear(hypotheses, assessment, "endpoint_slow")
    sources = {e.source: e.excerpt for e in hypotheses[0].evidence_for}
    assert "no answer within" in sources["http"]
    assert "deadline exceeded" in sources["prometheus"]


async def test_a_service_that_answers_quickly_after_the_condition_cleared_is_endpoint_healthy(scene, tools):
    inc = incident("CheckoutFlap", 'up{job="checkout"} == 0', job="checkout", instance=scene.service.target,
                   handler="/svc/ok")

    _, hypotheses, assessment = await swept(tools, inc)

    assert_clear(hypotheses, assessment, "endpoint_healthy")
    assert "200" in hypotheses[0].statement
    assert {e.source for e in hypotheses[0].evidence_for} == {"http", "prometheus"}


async def test_an_endpoint_outside_the_allowed_targets_is_never_probed_prometheus_still_answers(scene, tools):
    # Given the alert names /admin on the same port, which is not under the allowed /svc/ prefix
    before = scene.service.hits.get("/admin", 0)
    inc = incident("CheckoutAdmin", 'up{job="checkout"} == 0', job="checkout", instance=scene.service.target,
                   probe_url=f"{scene.service.base}/admin")

    inv, hypotheses, _ = await swept(tools, inc)

    # Then neither it nor the instance's root (outside /svc/ as well) is requested
    assert not [o for o in inv.observations if o.tool == "http"]
    assert scene.service.hits.get("/admin", 0) == before
    # ... and Prometheus's view of the target still counts
    down = next(h for h in hypotheses if h.cause == "endpoint_down")
    assert down.evidence_against and down.evidence_against[0].source == "prometheus"


async def test_a_probe_that_could_not_run_leaves_no_endpoint_hypothesis(scene):
    probe = ProbeTool([f"http://{scene.closed}/"])
    inc = incident("CheckoutGone", 'up{job="gone"} == 0', job="gone", instance=scene.closed)
    inv = Investigation(incident=inc, tools={"http": probe}, phase=Phase.READ_ONLY, budget=Budget(max_tool_calls=0))
    try:
        drafts = await sweep(inv, alert_facts(inc))
    finally:
        await probe.close()

    assert drafts == []
    [obs] = inv.observations
    assert not obs.ok and "budget" in obs.excerpt
