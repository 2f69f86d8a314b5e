"""Every metric the alerting rules and the Grafana dashboard read is served by a running agentjobs service.

Each service is started the way the other integration tests start it (real RabbitMQ, the
Kubernetes API emulator for the dispatcher), its ``/metrics`` is scraped over HTTP, and the
metric names in every PromQL expression of ``k8s/observability/`` are looked up in what came
back. A name counts as served when its ``# TYPE`` line is there: prometheus_client writes one
for every metric, also a labelled one with no children yet — which has no sample line.

A selector that names a scrape job (``{job="agentjobs-trust"}``) must be served by that very job.
Jobs are started from ``SERVICES`` (job name → how to start it); a job without an entry yet
lists what it will serve in ``EXPECTED_MISSING``, and the test fails once such an entry is
served after all, so the list never outlives the service.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from dispatcher.bridge.webhook import BridgeService
from dispatcher.plumbing.settings import AmqpSettings, BridgeSettings, Settings, load_settings
from dispatcher.tickets.service import TicketsService
from dispatcher.trust.service import TrustService
from tests.integration.dispatcher_harness import declare_topology
from tests.integration.k8s_helpers import prepare_cluster, settings_for
from tests.integration.test_dispatcher import running_dispatcher
from tests.unit.test_alert_rules import rule_exprs
from tests.unit.test_dashboard import dashboard_exprs, metric_names

pytestmark = pytest.mark.integration
SYNTHETIC = {"up"}  # written by Prometheus itself, not by a service
SELECTOR = re.compile(r"\b(agentjobs_[A-Za-z0-9_]+)\s*\{([^}]*)\}")
JOB_LABEL = re.compile(r'\bjob\s*=\s*"([^"]+)"')
# Sample names a metric family of each type writes besides its own name.
FAMILY_SAMPLES = {"histogram": ("_bucket", "_count", "_sum", "_created"), "summary": ("_count", "_sum", "_created"),
                  "counter": (), "gauge": (), "info": ("_info",), "stateset": (), "gaugehistogram": ("_bucket",),
                  "unknown": ()}


@dataclass(frozen=True)
class World:
    """What the services are started in: the emulated cluster and this module's vhost."""

    handle: Any
    vhost: Any


StartService = Callable[[World], AbstractAsyncContextManager[str]]  # yields the service's /metrics URL


@contextlib.asynccontextmanager
async def dispatcher(world: World) -> AsyncIterator[str]:
    async with running_dispatcher(world.handle, world.vhost.url("dispatcher")) as service:
        assert service._health is not None
        yield f"http://127.0.0.1:{service._health.bound_port}/metrics"


@contextlib.asynccontextmanager
async def trust(world: World) -> AsyncIterator[str]:
    settings = load_settings(None, {"AGENTJOBS_AMQP__URL": world.vhost.url("trust")})
    service = TrustService(settings, health_port=0)
    await service.start()
    try:
        assert service._health is not None
        yield f"http://127.0.0.1:{service._health.bound_port}/metrics"
    finally:
        await service.stop()


@contextlib.asynccontextmanager
async def bridge(world: World) -> AsyncIterator[str]:
    settings = Settings(amqp=AmqpSettings(url=world.vhost.url("bridge"), reconnect_interval=1.0),
                        bridge=BridgeSettings(port=0))
    service = BridgeService(settings)
    port = await service.start()
    try:
        yield f"http://127.0.0.1:{port}/metrics"
    finally:
        await service.stop()


@contextlib.asynccontextmanager
async def tickets(world: World) -> AsyncIterator[str]:
    # the webhook backend: nothing is sent unless a result arrives, and none does here
    settings = load_settings(None, {"AGENTJOBS_AMQP__URL": world.vhost.url("ticketing"),
                                    "AGENTJOBS_TICKETS__BACKEND": "webhook",
                                    "AGENTJOBS_TICKETS__WEBHOOK__URL": "http://127.0.0.1:9/unused",
                                    "AGENTJOBS_TICKETS__WEBHOOK__SECRET": "unused"})
    service = TicketsService(settings, health_port=0)
    await service.start()
    try:
        assert service._health is not None
        yield f"http://127.0.0.1:{service._health.bound_port}/metrics"
    finally:
        await service.stop(drain=1)


SERVICES: dict[str, StartService] = {
    "agentjobs-dispatcher": dispatcher,
    "agentjobs-trust": trust,
    "agentjobs-bridge": bridge,
    "agentjobs-tickets": tickets,
}
# (job, metric) the rules or the dashboard read that no started service serves yet.
EXPECTED_MISSING: set[tuple[str, str]] = set()


def served(exposition: str) -> set[str]:
    """Every metric and sample name a text exposition offers (from ``# TYPE`` lines and samples)."""
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.add(name)
            names.update(name + suffix for suffix in FAMILY_SAMPLES.get(kind, ()))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


def used() -> tuple[set[str], set[tuple[str, str]]]:
    """Metric names read by the rules and the dashboard, and (job, metric) for selectors naming a job."""
    exprs = [*rule_exprs(), *dashboard_exprs()]
    names = set().union(*(metric_names(e) for e in exprs)) - SYNTHETIC
    by_job = {(job.group(1), m.group(1)) for e in exprs for m in SELECTOR.finditer(e)
              for job in JOB_LABEL.finditer(m.group(2))}
    return names, by_job


def test_served_reads_type_lines_of_metrics_without_samples() -> None:
    text = ("# HELP agentjobs_a_total h\n# TYPE agentjobs_a_total counter\n"
            "# HELP agentjobs_h_seconds h\n# TYPE agentjobs_h_seconds histogram\n"
            'agentjobs_g{queue="q"} 1.0\n')
    assert served(text) >= {"agentjobs_a_total", "agentjobs_h_seconds_bucket", "agentjobs_h_seconds_count",
                            "agentjobs_g"}


def test_jobs_named_in_selectors_are_known() -> None:
    _, by_job = used()
    missing_jobs = {job for job, _ in EXPECTED_MISSING}
    assert {job for job, _ in by_job} <= set(SERVICES) | missing_jobs
    assert missing_jobs.isdisjoint(SERVICES)  # a started job has no expected-missing metrics


@pytest.fixture
async def world(k8s_emulator, amqp_vhost, rabbitmq_management) -> World:
    prepare_cluster(k8s_emulator)
    await rabbitmq_management.delete_vhost(amqp_vhost.name)
    await rabbitmq_management.create_vhost(amqp_vhost.name)
    await rabbitmq_management.set_permissions(amqp_vhost.name, "guest")
    await declare_topology(amqp_vhost.amqp_url, settings_for(k8s_emulator.namespace))
    return World(handle=k8s_emulator, vhost=amqp_vhost)


async def test_every_metric_the_rules_and_the_dashboard_read_is_served(world: World) -> None:
    # Given every component running, each scraped over HTTP as Prometheus would
    by_service: dict[str, set[str]] = {}
    async with contextlib.AsyncExitStack() as stack, \
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        for job, start in SERVICES.items():
            url = await stack.enter_async_context(start(world))
            async with http.get(url) as resp:
                assert resp.status == 200, job
                by_service[job] = served(await resp.text())
    everywhere = set().union(*by_service.values())
    names, by_job = used()
    expected_missing = {metric for _, metric in EXPECTED_MISSING}
    # Then each name read is served by at least one of them, beside the ones still to come
    assert names - everywhere - expected_missing == set()
    # And a selector naming a job is served by that job
    assert {(job, metric) for job, metric in by_job
            if job in by_service and metric not in by_service[job]} == set()
    assert {(job, metric) for job, metric in by_job if job not in by_service} <= EXPECTED_MISSING
    # And nothing listed as still to come is served already (or the list has gone stale)
    assert {(job, m) for job, m in EXPECTED_MISSING if m.startswith("agentjobs_tickets_")
            and m in everywhere} == set()
