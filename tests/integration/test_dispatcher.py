"""The dispatcher end to end in one process: real RabbitMQ, the emulated Kubernetes API.

Every incident becomes exactly one Job, nothing is lost, every outcome is reported.
"""

from __future__ import annotations

import asyncio
import contextlib

import aio_pika
import pytest

from dispatcher.plumbing.metrics import Metrics
from dispatcher.jobs.kubernetes import KubernetesRuntime
from dispatcher.intake.service import DispatcherService
from schemas.routing import DEAD, RESULTS
from schemas import Conclusion, DeadLetter, FailureReason, Finding, decode_incident, identify
from tests.support.identities import agent_user, url_for
from tests.integration.dispatcher_harness import (
    PodDriver,
    Results,
    declare_topology,
    lifecycle_ids,
    publish,
)
from tests.integration.k8s_helpers import prepare_cluster, settings_for
from tests.support.k8s.resources import JOBS
from tests.support.payloads import am_alert, dumps, group, storm

pytestmark = pytest.mark.integration


def _consumed(metrics: Metrics) -> float:
    return sum(s.value for m in metrics.incidents.collect() for s in m.samples if s.name.endswith("_total"))


@contextlib.asynccontextmanager
async def running_dispatcher(handle, amqp_url: str, **env: str):
    settings = settings_for(handle.namespace, AGENTJOBS_AMQP__URL=url_for(amqp_url, "dispatcher"),
                            **env)
    runtime = KubernetesRuntime(handle.api_client, namespace=handle.namespace, request_timeout=2,
                                watch_timeout=30, claim_timeout=5)
    service = DispatcherService(settings, runtime, health_port=0)
    await service.start()
    try:
        yield service
    finally:
        await service.stop(drain_timeout=5)


async def _until(predicate, timeout: float = 30.0, interval: float = 0.02):
    async with asyncio.timeout(timeout):
        while not (result := predicate()):
            await asyncio.sleep(interval)
    return result


@pytest.fixture
async def env(k8s_emulator, amqp_vhost, rabbitmq_management):
    prepare_cluster(k8s_emulator)
    await rabbitmq_management.delete_vhost(amqp_vhost.name)
    await rabbitmq_management.create_vhost(amqp_vhost.name)
    await rabbitmq_management.set_permissions(amqp_vhost.name, "guest")
    await declare_topology(amqp_vhost.amqp_url, settings_for(k8s_emulator.namespace))
    return k8s_emulator, amqp_vhost.amqp_url


def _jobs(handle) -> list[str]:
    return sorted(j["metadata"]["name"] for j in handle.cluster.store.list(JOBS, handle.namespace))


async def test_a_storm_of_500_notifications_in_50_groups_makes_exactly_50_jobs(env):
    handle, url = env
    bodies = storm(groups=50, notifications=500, seed=1)
    expected = {identify(decode_incident(b)).job_name for b in bodies}
    assert len(expected) == 50
    caps = {"AGENTJOBS_ADMISSION__MAX_ACTIVE": "100", **{f"AGENTJOBS_CLASSES__{c}__MAX_ACTIVE": "100"
                                                         for c in ("DEFAULT", "DATABASE", "KUBERNETES")}}
    async with Results(url, binding="lifecycle.#") as results, running_dispatcher(handle, url, **caps) as service:
        await publish(url, bodies)
        await _until(lambda: _consumed(service.metrics) >= 500)
        await results.wait_for(lambda: len(set(lifecycle_ids(results, "dispatched"))) == 50)
    assert _jobs(handle) == sorted(expected)
    dispatched = [m[1] for m in results.keys("lifecycle.dispatched")]
    assert len(set(dispatched)) == 50  # deterministic message ids: one per investigation
    assert results.keys("lifecycle.attached"), "alerts joining a group are reported as attached"


async def test_malformed_messages_are_dead_lettered_with_a_reason_and_the_consumer_keeps_going(env):
    handle, url = env
    good = dumps(group([am_alert(starts_at="2026-11-26T02:00:00Z", alertname="AfterGarbage")], group_key="g-ok"))
    garbage = [b"{not json", b'{"version": "3", "alerts": []}', b'{"receiver": "\xff"}', b"[]"]
    async with Results(url, exchange=DEAD) as dead, Results(url, binding="deadletter.#") as records, \
            running_dispatcher(handle, url) as service:
        await publish(url, garbage + [good])
        await _until(lambda: _consumed(service.metrics) >= 5)
        await dead.wait_for(lambda: len(dead.messages) == 4)
        await records.wait_for(lambda: len(records.messages) == 4)
    assert [j for j in _jobs(handle) if "aftergarbage" in j]
    reasons = sorted(m[3]["x-agentjobs-reason"] for m in dead.messages)
    assert reasons == ["invalid_json", "not_an_object", "not_utf8", "unsupported_version"]
    for _, _, body, headers in dead.messages:
        assert body in garbage  # the original body, kept whole
        assert headers["x-agentjobs-error-kind"] == "permanent"
        assert headers["x-agentjobs-original-routing-key"] == "alertmanager"
    assert all(isinstance(m[2], DeadLetter) and m[2].preview for m in records.messages)


async def test_with_a_cap_of_two_criticals_launch_first(env):
    handle, url = env

    def incident(i: int, severity: str) -> bytes:
        return dumps(group([am_alert(starts_at="2026-11-26T02:00:00Z", alertname=f"Cap{i}", severity=severity)],
                           group_key=f"cap-{i}"))

    severities = ["info", "warning", "critical", "info", "critical", "warning", "info", "critical", "warning", "info"]
    driver = PodDriver(handle, decide=lambda pod: None)  # pods keep running until we end them
    async with driver.running_(), Results(url, binding="lifecycle.dispatched") as results, \
            running_dispatcher(handle, url, AGENTJOBS_ADMISSION__MAX_ACTIVE="2") as service:
        # Given two investigations running at a cap of two
        await publish(url, [incident(100, "info"), incident(101, "info")])
        await results.wait_for(lambda: len(results.messages) == 2)
        await _until(lambda: len(driver.running) == 2)
        # When ten incidents of mixed severity wait
        await publish(url, [incident(i, s) for i, s in enumerate(severities)])
        await _until(lambda: service.gate.waiting == 10)
        # Then each freed slot goes to the most severe waiting incident
        for n in range(10):
            driver.finish_oldest(0)
            await results.wait_for(lambda: len(results.messages) == 3 + n)
            await _until(lambda: len(driver.running) == 2 or service.gate.waiting == 0)
    launched = [m[2].job_name for m in results.messages[2:]]
    by_name = {identify(decode_incident(incident(i, s))).job_name: s for i, s in enumerate(severities)}
    assert [by_name[j] for j in launched] == ["critical"] * 3 + ["warning"] * 3 + ["info"] * 4


async def test_every_ending_is_reported_once_with_a_failure_result_when_there_is_no_finding(env):
    handle, url = env
    endings = {"Ok": 0, "Crash": 2, "Oom": "oom", "Slow": None}

    def decide(pod):
        name = pod["metadata"]["labels"]["job-name"]
        return next(v for k, v in endings.items() if f"-{k.lower()}-" in name)

    bodies = [dumps(group([am_alert(starts_at="2026-11-26T02:00:00Z", alertname=k)], group_key=f"end-{k}"))
              for k in endings]
    async with PodDriver(handle, decide).running_(), Results(url) as results, running_dispatcher(handle, url):
        await publish(url, bodies)
        await _until(lambda: len(handle.cluster.store.list(JOBS, handle.namespace)) == 4)
        await results.wait_for(lambda: len(lifecycle_ids(results, "started")) == 4)
        handle.clock.advance(901)  # the slow one hits its deadline (900 s), before any TTL (3600 s)
        await results.wait_for(
            lambda: len(results.keys("lifecycle.succeeded")) + len(results.keys("lifecycle.failed")) == 4
        )
        await results.wait_for(lambda: len(results.keys("finding.")) == 3)
    failed = {m[2].job_name.split("-")[1]: m[2].reason for m in results.keys("lifecycle.failed")}
    assert failed == {"crash": FailureReason.BACKOFF_LIMIT_EXCEEDED, "oom": FailureReason.OOM_KILLED,
                      "slow": FailureReason.DEADLINE_EXCEEDED}
    assert [m[2].job_name.split("-")[1] for m in results.keys("lifecycle.succeeded")] == ["ok"]
    for _, _, finding, _ in results.keys("finding."):
        assert isinstance(finding, Finding) and finding.conclusion is Conclusion.INCONCLUSIVE
    terminal_ids = [m[1] for m in results.messages if m[0] in ("lifecycle.succeeded", "lifecycle.failed")]
    assert len(terminal_ids) == len(set(terminal_ids)) == 4


async def test_a_resolved_group_cancels_its_investigation(env):
    handle, url = env
    firing = group([am_alert(starts_at="2026-11-26T02:00:00Z", alertname="Flap")], group_key="flap")
    resolved = group([am_alert(starts_at="2026-11-26T02:00:00Z", alertname="Flap", status="resolved",
                               ends_at="2026-11-26T02:05:00Z")], group_key="flap")
    async with PodDriver(handle, decide=lambda pod: None).running_(), Results(url) as results, \
            running_dispatcher(handle, url):
        await publish(url, [dumps(firing)])
        await results.wait_for(lambda: results.keys("lifecycle.started"))
        await publish(url, [dumps(resolved)])
        await results.wait_for(lambda: results.keys("lifecycle.cancelled"))
        await results.wait_for(lambda: results.keys("finding."))
    await _until(lambda: not _jobs(handle))
    assert len(results.keys("lifecycle.cancelled")) == 1
    assert "cancelled" in results.keys("finding.")[0][2].summary


async def test_kubernetes_api_faults_lose_nothing_and_duplicate_nothing(env):
    # Given an API server that fails 20 % of calls with 5xx, hangs on some, answers 429,
    # cuts watches, compacts history (410) and, for a while, rejects Jobs over quota
    handle, url = env
    ns = handle.namespace
    from tests.support.k8s.resources import RESOURCEQUOTAS

    handle.faults.inject("*", r"/namespaces/[^/]+/(jobs|secrets|pods)", status=503, times=None, probability=0.2, seed=1)
    handle.faults.inject("*", r"/namespaces/[^/]+/(jobs|secrets)", status=429, times=None, probability=0.05, seed=2)
    handle.faults.inject("*", r"/namespaces/[^/]+/jobs", timeout=True, times=None, probability=0.03, seed=3)
    handle.cluster.set_quota(ns, "runs", {"count/jobs.batch": 0})
    bodies = storm(groups=20, notifications=100, seed=3)
    expected = sorted({identify(decode_incident(b)).job_name for b in bodies})
    fast_retries = {"AGENTJOBS_RETRY__BASE": "0.05", "AGENTJOBS_RETRY__CAP": "0.5",
                    "AGENTJOBS_ADMISSION__MAX_ACTIVE": "100",
                    **{f"AGENTJOBS_CLASSES__{c}__MAX_ACTIVE": "100" for c in ("DEFAULT", "DATABASE", "KUBERNETES")}}
    async with PodDriver(handle, decide=lambda pod: 0).running_(), Results(url) as results, \
            running_dispatcher(handle, url, **fast_retries) as service:
        await publish(url, bodies)
        # When the quota is lifted after the dispatcher has been refused for a while
        await _until(lambda: service.metrics.retries._value.get() >= 20, timeout=30)
        assert _jobs(handle) == []  # refused over quota: nothing stored, nothing lost
        handle.cluster.gc.delete(RESOURCEQUOTAS, ns, "runs")
        for _ in range(3):  # and watches keep being cut and compacted
            await asyncio.sleep(0.2)
            handle.cluster.store.close_watches()
            handle.cluster.compact()
        # Then every group gets exactly one Job and every ending is reported exactly once
        await _until(lambda: _consumed(service.metrics) >= 100, timeout=60)
        await results.wait_for(lambda: len(set(lifecycle_ids(results, "succeeded"))) == 20, timeout=60)
        await asyncio.sleep(0.5)  # a late duplicate would arrive now
    assert _jobs(handle) == expected or all(j in expected for j in _jobs(handle))
    succeeded = [m[1] for m in results.keys("lifecycle.succeeded")]
    assert len(succeeded) == len(set(succeeded)) == 20
    assert set(lifecycle_ids(results, "dispatched")) == {identify(decode_incident(b)).investigation_id for b in bodies}
    assert not results.keys("deadletter.")


async def test_findings_published_by_agents_become_cost_metrics_by_domain(env, amqp_vhost, rabbitmq_management):
    from schemas import Cost, Finding, Phase, encode

    handle, url = env
    finding = Finding(investigation_id="cost-1", incident_key="k", idempotency_key="cost-1:finding", summary="s",
                      probable_cause="c", confidence=0.5, phase=Phase.SHADOW, domain="payments", reasoner="rules",
                      cost=Cost(tool_calls=5, cpu_seconds=0.25, wall_seconds=1.5))
    async with (Results(url, exchange=DEAD) as dead, running_dispatcher(handle, url) as service,
                agent_user(rabbitmq_management, amqp_vhost.name) as (agent, agent_url)):
        connection = await aio_pika.connect(agent_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            results = await channel.get_exchange(RESULTS, ensure=False)
            await results.publish(aio_pika.Message(encode(finding), user_id=agent), "finding.shadow.payments")
            await results.publish(aio_pika.Message(b"{not a finding", user_id=agent), "finding.shadow.payments")

        def tool_calls() -> float:
            return service.metrics.registry.get_sample_value(
                "agentjobs_investigation_tool_calls_total", {"domain": "payments", "reasoner": "rules"}) or 0

        await _until(lambda: tool_calls() == 5)
        await dead.wait_for(lambda: dead.messages)
    ((routing_key, _, _, headers),) = dead.messages
    assert routing_key == "finding.shadow.payments" and headers["x-agentjobs-reason"] == "invalid_json"


async def test_findings_from_anyone_but_an_agent_are_dead_lettered_and_never_counted(env):
    from schemas import Cost, Finding, Phase, encode

    handle, url = env
    finding = Finding(investigation_id="cost-2", incident_key="k", idempotency_key="cost-2:finding", summary="s",
                      probable_cause="c", confidence=0.5, phase=Phase.SHADOW, domain="forged", reasoner="rules",
                      cost=Cost(tool_calls=7, cpu_seconds=0.25, wall_seconds=1.5))
    async with Results(url, exchange=DEAD) as dead, running_dispatcher(handle, url) as service:
        connection = await aio_pika.connect(url)  # the broker administrator, no user_id
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            results = await channel.get_exchange(RESULTS)
            await results.publish(aio_pika.Message(encode(finding)), "finding.shadow.forged")
        await dead.wait_for(lambda: dead.messages)
        tool_calls = service.metrics.registry.get_sample_value(
            "agentjobs_investigation_tool_calls_total", {"domain": "forged", "reasoner": "rules"})
    ((routing_key, _, _, headers),) = dead.messages
    assert headers["x-agentjobs-reason"] == "forbidden_sender"
    assert "without user_id" in headers["x-agentjobs-message"]
    assert not tool_calls
