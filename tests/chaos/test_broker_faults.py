"""Chaos: broker connections force-closed again and again through the management API.

Issue 10's second chaos bullet, for the two things that hold a broker connection
on the incident path:

- the dispatcher (in process, real RabbitMQ, the emulated cluster) has its
  connection closed every 1-2 s while a storm is published in confirmed
  batches → it recovers every time: each group ends with exactly one Job and
  a ``dispatched`` event, each ending is reported once, nothing is left in the
  intake queue and nothing was dead-lettered;
- the Alertmanager bridge has its connection closed every 1-2 s while webhooks
  keep arriving → a 200 is only ever given for a message the broker confirmed:
  every accepted webhook is in the intake queue. The bridge is at-least-once
  (a confirm lost with the connection makes a 503 for a message that did
  arrive, and Alertmanager's retry adds a copy), so copies of an accepted
  webhook are allowed; a lost 200 is not.

The full ``rabbitmqctl stop_app``/``start_app`` cycle needs a broker node of the
test's own (this one is shared with every other test): ``test_broker_restart.py``.

Cadence: a connection is closed 1-2 s after the management API lists it. The
API learns of new connections from the broker's statistics, every 5 s by
default, so a reconnected client is closed again about every 5 s (while the
client itself is back within milliseconds: robust connections retry at once).

Bounded: the closers stop by themselves after ``MIN_CLOSES`` closes once the
load is through, or fail at their bound. Loopback only.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from dispatcher.bridge.webhook import BridgeService
from dispatcher.intake.reporting import lifecycle_message_id
from dispatcher.plumbing.settings import AmqpSettings, BridgeSettings, Settings
from schemas.routing import DEAD, INCIDENTS
from schemas import LifecycleState, decode_incident, identify
from tests.integration.dispatcher_harness import (
    PodDriver,
    Results,
    declare_topology,
    drain,
    publish,
    ready_messages,
)
from tests.integration.k8s_helpers import prepare_cluster, settings_for
from tests.integration.test_dispatcher import running_dispatcher
from tests.support import payloads
from tests.support.k8s.resources import JOBS
from tests.support.services import ManagementClient, wait_until

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

MIN_CLOSES = 12
CLOSE_PAUSE = (1.0, 2.0)  # seconds after the management API lists a connection until it is closed
CLOSE_PHASE_BOUND = 120.0  # seconds for the load to get through under closes
DISPATCHER = "agentjobs-dispatcher"  # connection_name in the client properties
GROUPS = 100
NOTIFICATIONS = 1_000
BATCH = 40  # notifications per confirmed batch ...
BATCH_PAUSE = (1.0, 2.0)  # ... this many seconds apart: the storm lasts about as long as the closes
TERMINAL = {f"lifecycle.{s.value}" for s in (LifecycleState.SUCCEEDED, LifecycleState.FAILED,
                                               LifecycleState.CANCELLED)}


@pytest.fixture
async def vhost(amqp_vhost, rabbitmq_management):
    """This module's vhost, emptied for each test."""
    await rabbitmq_management.delete_vhost(amqp_vhost.name)
    await rabbitmq_management.create_vhost(amqp_vhost.name)
    await rabbitmq_management.set_permissions(amqp_vhost.name, rabbitmq_management.rabbitmq.user)
    return amqp_vhost


class Closer:
    """Force-closes one client's broker connection, each time as soon as it is back and has lived a little."""

    def __init__(self, mgmt: ManagementClient, vhost: str, connection_name: str, rng: random.Random) -> None:
        self.mgmt = mgmt
        self.vhost = vhost
        self.connection_name = connection_name
        self.rng = rng
        self.closed: list[str] = []  # broker-side names of the connections closed
        self.closed_at: list[float] = []  # monotonic seconds of each close

    async def _current(self) -> str:
        found: list[str] = []

        async def probe() -> bool:
            found[:] = [c["name"] for c in await self.mgmt.list_connections(self.vhost)
                        if (c.get("client_properties") or {}).get("connection_name") == self.connection_name
                        and c.get("state", "running") == "running" and c["name"] not in self.closed]
            return len(found) == 1

        await wait_until(probe, timeout=30, what=f"{self.connection_name}'s connection to come back")
        return found[0]

    async def run(self, *, at_least: int, done: Callable[[], Awaitable[bool]], bound: float) -> None:
        """Close until ``at_least`` closes happened and ``done()``; fail after ``bound`` seconds."""
        deadline = time.monotonic() + bound
        while len(self.closed) < at_least or not await done():
            assert time.monotonic() < deadline, f"not done after {bound:.0f} s and {len(self.closed)} closes"
            name = await self._current()
            await asyncio.sleep(self.rng.uniform(*CLOSE_PAUSE))
            await self.mgmt.close_connection(name, reason="chaos: connection force-closed")
            self.closed_at.append(time.monotonic())
            self.closed.append(name)
        await self._current()  # and it came back after the last one too

    @property
    def mean_interval_s(self) -> float:
        """Mean seconds between two closes."""
        times = self.closed_at
        return round((times[-1] - times[0]) / (len(times) - 1), 1) if len(times) > 1 else 0.0


async def test_dispatcher_recovers_from_repeated_forced_connection_closes(
    k8s_emulator, vhost, rabbitmq_management
):
    # Given a dispatcher consuming the intake queue, the emulated kubelet ending every Job
    handle = k8s_emulator
    prepare_cluster(handle)
    url = vhost.amqp_url
    await declare_topology(url, settings_for(handle.namespace))
    rng = random.Random(20)
    bodies = payloads.storm(groups=GROUPS, notifications=NOTIFICATIONS, seed=20)
    by_investigation = {i.investigation_id: i.job_name for i in (identify(decode_incident(b)) for b in bodies)}
    assert len(by_investigation) == GROUPS
    # Job creation takes a while (as on a busy API server), so closes catch launches in flight
    handle.faults.inject("POST", r"/jobs$", delay=0.2, times=None)
    settings = {
        "AGENTJOBS_RETRY__BASE": "0.05", "AGENTJOBS_RETRY__CAP": "1",
        "AGENTJOBS_ADMISSION__MAX_ACTIVE": "1000",
        **{f"AGENTJOBS_CLASSES__{c}__MAX_ACTIVE": "1000" for c in ("DEFAULT", "DATABASE", "KUBERNETES")},
    }
    closer = Closer(rabbitmq_management, vhost.name, DISPATCHER, rng)
    published = asyncio.Event()
    began = time.monotonic()

    async with PodDriver(handle, decide=lambda pod: 0).running_(), Results(url) as results, \
            running_dispatcher(handle, url, **settings) as service:

        def dispatched() -> set[str]:
            return {m[2].investigation_id for m in results.keys("lifecycle.dispatched")}

        async def publisher() -> None:
            for start in range(0, len(bodies), BATCH):  # confirmed batches spread over the closes
                await publish(url, bodies[start:start + BATCH])
                await asyncio.sleep(rng.uniform(*BATCH_PAUSE))
            published.set()

        async def storm_through() -> bool:
            return published.is_set() and len(dispatched()) == len(by_investigation) and \
                await ready_messages(url, INCIDENTS) == 0

        # When its connection is force-closed every 1-2 s (as soon as it is back) while the storm arrives
        await asyncio.gather(publisher(), closer.run(at_least=MIN_CLOSES, done=storm_through,
                                                     bound=CLOSE_PHASE_BOUND))
        close_phase = time.monotonic() - began

        # Then it recovered: consuming again, every ending reported, nothing ready or unacked
        async def ready() -> bool:
            return service.ready

        await wait_until(ready, timeout=30, what="the dispatcher consuming again")
        await results.wait_for(lambda: len({m[1] for m in results.messages if m[0] in TERMINAL}) >= GROUPS,
                               timeout=60)

        async def intake_empty() -> bool:
            info = await rabbitmq_management.get_queue(vhost.name, INCIDENTS)
            return info is not None and info.messages == 0 and info.messages_unacknowledged == 0

        await wait_until(intake_empty, timeout=30, what="an empty intake queue in the management API")
        assert not service.crashed.is_set()
        handled = {s.labels["outcome"]: int(s.value) for m in service.metrics.incidents.collect()
                   for s in m.samples if s.name.endswith("_total")}

    # Exactly one Job per group, nothing else in the cluster
    jobs = sorted(j["metadata"]["name"] for j in handle.cluster.store.list(JOBS, handle.namespace))
    assert jobs == sorted(by_investigation.values())
    # Nothing lost: the queue is empty with no consumer left, nothing was dead-lettered
    assert await ready_messages(url, INCIDENTS) == 0
    assert await drain(url, DEAD) == []
    # Every group's `dispatched` (one message id per investigation), every ending reported once
    dispatched_ids = {m[1] for m in results.keys("lifecycle.dispatched")}
    assert dispatched_ids == {lifecycle_message_id(i, LifecycleState.DISPATCHED) for i in by_investigation}
    terminal: dict[str, set[str]] = collections.defaultdict(set)
    for routing_key, message_id, _, _ in results.messages:
        if routing_key in TERMINAL:
            investigation_id, _, state = message_id.partition(":")
            terminal[investigation_id].add(state)
    assert terminal == {i: {LifecycleState.SUCCEEDED.value} for i in by_investigation}
    assert not results.keys("deadletter.")

    figures = {
        "connections_closed": len(closer.closed), "close_interval_s_mean": closer.mean_interval_s,
        "incidents_published": len(bodies), "groups": len(by_investigation), "jobs": len(jobs),
        "dispatched_messages": len(results.keys("lifecycle.dispatched")),
        "terminal_messages": sum(1 for m in results.messages if m[0] in TERMINAL),
        "handled_by_outcome": dict(handled), "retries": service.metrics.retries._value.get(),
        "close_phase_s": round(close_phase, 1), "total_s": round(time.monotonic() - began, 1),
    }
    print("\nchaos broker faults, dispatcher:", json.dumps(figures, sort_keys=True))


def _webhook(n: int) -> bytes:
    alert = payloads.am_alert(starts_at="2026-11-26T02:00:00Z", alertname="BridgeChaos", instance=f"i-{n}")
    return payloads.dumps(payloads.group([alert], group_key=f'{{}}:{{alertname="BridgeChaos", n="{n}"}}'))


async def test_bridge_answers_200_only_for_confirmed_webhooks_while_its_connection_is_closed_repeatedly(
    vhost, rabbitmq_management
):
    # Given the bridge, as its own identity (nothing consumes the intake queue, so it is the ledger)
    await declare_topology(vhost.amqp_url, settings_for("bridge-chaos"))
    settings = Settings(
        amqp=AmqpSettings(url=vhost.url("bridge"), reconnect_interval=1.0, publish_timeout=3.0),
        bridge=BridgeSettings(host="127.0.0.1", port=0),
    )
    bridge = BridgeService(settings)
    port = await bridge.start()
    rng = random.Random(30)
    closer = Closer(rabbitmq_management, vhost.name, BridgeService.name, rng)
    closing = asyncio.Event()  # set once the closer is through: senders stop taking new webhooks
    sent: dict[str, int] = {}  # event_id → webhook number, for every webhook sent
    accepted: set[str] = set()  # event_ids answered 200
    refused: collections.Counter[str] = collections.Counter()  # non-200 answers and errors, by kind
    retried: set[str] = set()  # event_ids refused at least once (so sent again)
    numbers = iter(range(100_000))
    began = time.monotonic()

    async def alertmanager(http: aiohttp.ClientSession) -> None:
        """One Alertmanager: sends new webhooks while the closer runs, retrying each until 200."""
        while not closing.is_set():
            n = next(numbers)
            body = _webhook(n)
            event_id = decode_incident(body).event_id
            sent[event_id] = n
            for attempt in range(200):  # bounded; Alertmanager retries for its group_interval
                try:
                    async with http.post(f"http://127.0.0.1:{port}/alerts", data=body,
                                         headers={"Content-Type": "application/json"}) as resp:
                        answer: dict[str, Any] = await resp.json()
                        if resp.status == 200:
                            assert answer["event_id"] == event_id, answer
                            accepted.add(event_id)
                            break
                        assert resp.status == 503 and answer["error"] == "broker_unavailable", (resp.status, answer)
                        assert int(resp.headers["Retry-After"]) >= 1
                        refused[f"503:{answer['message'][:40]}"] += 1
                except aiohttp.ClientError as exc:
                    refused[type(exc).__name__] += 1
                retried.add(event_id)
                await asyncio.sleep(rng.uniform(0.1, 0.3))  # (Alertmanager would honour Retry-After)
            else:
                raise AssertionError(f"webhook {n} never accepted")
            await asyncio.sleep(rng.uniform(0.05, 0.25))

    async def nothing_pending() -> bool:
        return True

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            senders = [asyncio.create_task(alertmanager(http), name=f"alertmanager-{i}") for i in range(8)]
            try:
                # When its connection is force-closed every 1-2 s (as soon as it is back) under steady traffic
                await closer.run(at_least=MIN_CLOSES, done=nothing_pending, bound=CLOSE_PHASE_BOUND)
                closing.set()
                async with asyncio.timeout(60):
                    await asyncio.gather(*senders)
            finally:
                for task in senders:
                    task.cancel()

            async def ready() -> bool:
                return bridge.ready

            await wait_until(ready, timeout=30, what="the bridge ready again")
    finally:
        await bridge.stop()

    # Then every webhook that got a 200 is in the intake queue: no 200 was given for an unconfirmed message
    queued = await drain(vhost.amqp_url, INCIDENTS)
    copies = collections.Counter(m.message_id for m in queued)
    assert accepted == set(sent)  # every webhook was retried until accepted
    assert accepted - set(copies) == set(), "a 200 was given for a message that is not in the queue"
    assert set(copies) - accepted == set()  # nothing foreign
    for message in queued:  # the original bytes, under the id the bridge answered with
        assert decode_incident(message.body).event_id == message.message_id
    # At-least-once: more than one copy only of a webhook that was refused and sent again (a lost confirm)
    extra = {e: c - 1 for e, c in copies.items() if c > 1}
    assert set(extra) <= retried, extra
    assert refused, "the closes never met a request: the test did not test anything"

    figures = {
        "connections_closed": len(closer.closed), "close_interval_s_mean": closer.mean_interval_s,
        "webhooks": len(sent), "answers_200": len(accepted), "refused": sum(refused.values()),
        "refused_by_kind": dict(refused), "webhooks_refused_at_least_once": len(retried),
        "queued_messages": len(queued), "queued_distinct": len(copies),
        "extra_copies": sum(extra.values()), "total_s": round(time.monotonic() - began, 1),
    }
    print("\nchaos broker faults, bridge:", json.dumps(figures, sort_keys=True))
