"""An alert that resolves while its investigation runs: the Job stops, the ticket keeps the evidence.

Real RabbitMQ, the LocalRuntime running the real ``agentjobs agent`` (auth mode none), a
Prometheus stand-in that answers the agent's query, and a database address that accepts and
never answers, so the resolution arrives while the agent is mid-investigation with one
observation in hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from dispatcher.intake.service import DispatcherService
from dispatcher.jobs.local import LocalRuntime
from schemas import Conclusion, FailureReason, Finding, decode_incident, identify
from tests.integration.dispatcher_harness import Results, lifecycle_ids, publish
from tests.integration.k8s_helpers import settings_for
from tests.integration.lifecycle_helpers import STARTS, outcomes
from tests.integration.test_dispatcher import _until, env  # noqa: F401 - the fixture
from tests.support.identities import url_for
from tests.support.payloads import am_alert, dumps, group

pytestmark = pytest.mark.integration
EMPTY = {"status": "success", "data": {"resultType": "vector", "result": []}}


class SlowPrometheus:
    """Answers the first ``answer_first`` requests (an empty vector), then holds every later one open."""

    def __init__(self, answer_first: int = 0) -> None:
        self.answer_first = answer_first
        self.answered = 0
        self.holding = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.answered >= self.answer_first:
            self.holding.set()
            await asyncio.Event().wait()
        self.answered += 1
        return web.json_response(EMPTY)

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[str]:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            await runner.cleanup()


@contextlib.asynccontextmanager
async def silent_database() -> AsyncIterator[tuple[int, asyncio.Event]]:
    """A PostgreSQL address that accepts connections and never says a word (a server too busy to answer)."""
    connected = asyncio.Event()
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        connected.set()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], connected
    finally:
        for writer in held:
            writer.close()
        server.close()


def _agent_command() -> list[str]:
    script = Path(sys.executable).with_name("agentjobs")
    return [str(script), "agent"] if script.exists() else [sys.executable, "-m", "dispatcher.cli.main", "agent"]


async def test_a_resolution_mid_investigation_cancels_with_alert_resolved_and_keeps_the_partial_evidence(
        env, tmp_path):  # noqa: F811
    handle, url = env
    prometheus = SlowPrometheus(answer_first=1)
    body = dumps(group([am_alert(starts_at=STARTS, alertname="Resolving", instance="db-1", domain="database")],
                       group_key="lc-Resolving"))
    inv = identify(decode_incident(body)).investigation_id
    async with prometheus.serving() as prom_url, silent_database() as (silent_port, connected), \
            Results(url) as results:
        settings = settings_for(handle.namespace, AGENTJOBS_AMQP__URL=url_for(url, "dispatcher"),
                                AGENTJOBS_TOOLS__PROMETHEUS_URL=prom_url, AGENTJOBS_TOOLS__TIMEOUT="120",
                                AGENTJOBS_POSTGRES__DSN=f"postgresql://agent@127.0.0.1:{silent_port}/app",
                                AGENTJOBS_K8S__AGENT_COMMAND=json.dumps(_agent_command()))
        service = DispatcherService(settings, LocalRuntime(tmp_path / "local", use_cgroup=False), health_port=0)
        await service.start()
        try:
            # Given an agent that has made an observation and waits on its next query
            await publish(url, [body])
            await asyncio.wait_for(connected.wait(), 60)
            # When the alert resolves
            await publish(url, [dumps(group([am_alert(starts_at=STARTS, alertname="Resolving", instance="db-1",
                                                      domain="database", status="resolved",
                                                      ends_at="2026-11-26T02:30:00Z")], group_key="lc-Resolving"))])
            await results.wait_for(lambda: results.keys("lifecycle.cancelled"), timeout=60)
            await _until(lambda: outcomes(service).get("resolved_cancelled") == 1)
        finally:
            await service.stop(drain_timeout=5)
    # Then the investigation ends cancelled, because the alert resolved
    (cancelled,) = [m[2] for m in results.keys("lifecycle.cancelled")]
    assert cancelled.investigation_id == inv and cancelled.reason is FailureReason.ALERT_RESOLVED
    assert "resolved" in cancelled.message
    # and the ticket gets exactly one finding: the agent's own, with what it had observed
    findings = [m[2] for m in results.keys("finding.")]
    assert len(findings) == 1, findings
    (finding,) = findings
    assert isinstance(finding, Finding) and finding.investigation_id == inv
    assert finding.conclusion is Conclusion.INCONCLUSIVE and "stopped" in finding.summary
    assert prometheus.answered == 1
    assert any(e.source == "prometheus" and e.ok for e in finding.evidence), finding.evidence
    assert lifecycle_ids(results, "succeeded") == [] and lifecycle_ids(results, "failed") == []
