"""Chaos: the whole broker goes away — ``rabbitmqctl stop_app`` — and comes back (``start_app``).

Issue 10's full broker cycle, on a RabbitMQ node the test owns
(``tests/support/private_rabbitmq.py``; the machine's broker is shared with
every other test). The Alertmanager bridge and a dispatcher (in process, the
emulated cluster, the kubelet ending every Job) both hold connections to it
while eight Alertmanagers keep sending webhooks, each a new alert group,
retrying every refusal until it gets a 200. The application is stopped for
``DOWN`` seconds, twice.

- While it is down the bridge refuses (503 ``broker_unavailable``) — never a 200
  for a message the broker did not confirm — and an agent that concludes then
  exits 4 (``finding_unpublished``), never 0;
- after it is back both reconnect by themselves, and every webhook that got a
  200 becomes exactly one Job, one ``dispatched`` and one ending report;
  nothing is dead-lettered and nothing is left in the intake queue.

Messages the dispatcher reports while the test's own copy of the results is
unreachable are kept in a quorum queue on the node and read afterwards.
Bounded, loopback only.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest

from dispatcher.jobs import jobspec
from dispatcher.bridge.webhook import BridgeService
from dispatcher.intake.reporting import lifecycle_message_id
from dispatcher.plumbing.settings import AmqpSettings, BridgeSettings, Settings
from schemas.routing import DEAD, INCIDENTS, RESULTS
from schemas import LifecycleState, decode, decode_incident, encode, identify
from tests.integration.dispatcher_harness import PodDriver, declare_topology, ready_messages
from tests.integration.k8s_helpers import prepare_cluster, settings_for
from tests.support.identities import url_for
from tests.integration.test_dispatcher import running_dispatcher
from tests.support import payloads, private_rabbitmq
from tests.support.k8s.resources import JOBS
from tests.support.services import wait_until

pytestmark = [pytest.mark.chaos, pytest.mark.integration,
              pytest.mark.skipif(private_rabbitmq.available() is not None,
                                 reason=f"private RabbitMQ node: {private_rabbitmq.available()}")]

CYCLES = 2  # stop_app/start_app cycles
DOWN = 5.0  # seconds the broker application stays stopped
UP_BETWEEN = 6.0  # seconds of normal service between cycles and before the first
SENDERS = 8
COPY = "chaos.results-copy"  # the test's durable copy of agentjobs.results
AGENTJOBS = str(Path(sys.executable).with_name("agentjobs"))
TERMINAL = {f"lifecycle.{s.value}" for s in (LifecycleState.SUCCEEDED, LifecycleState.FAILED,
                                               LifecycleState.CANCELLED)}


def _webhook(n: int) -> bytes:
    alert = payloads.am_alert(starts_at="2026-11-26T02:00:00Z", alertname="BrokerRestart", instance=f"i-{n}")
    return payloads.dumps(payloads.group([alert], group_key=f'{{}}:{{alertname="BrokerRestart", n="{n}"}}'))


async def _copy_of_results(url: str) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(COPY, durable=True, arguments={"x-queue-type": "quorum"})
        await queue.bind(RESULTS, "#")


async def _read_copy(url: str) -> list[tuple[str, str | None, Any]]:
    """Every message in the results copy so far (left in the queue: read again later)."""
    out = []
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(COPY, passive=True)
        taken = []
        while (message := await queue.get(no_ack=False, fail=False, timeout=5)) is not None:
            taken.append(message)
            out.append((message.routing_key or "", message.message_id, decode(message.body)))
        for message in taken:  # back into the queue, for the next read
            await message.reject(requeue=True)
    return out


async def _agent(url: str, tmp_path: Path) -> tuple[int, str]:
    """Run `agentjobs agent` (no Vault) on one incident against ``url``: (exit code, last stderr line)."""
    incident = decode_incident(_webhook(-1))
    work = tmp_path / f"agent-{time.monotonic_ns()}"
    (work / "input").mkdir(parents=True)
    (work / "input" / jobspec.INCIDENT_FILE).write_bytes(encode(incident))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(work),
           "AGENTJOBS_INVESTIGATION_ID": identify(incident).investigation_id, "AGENTJOBS_PHASE": "shadow",
           "AGENTJOBS_INPUT_DIR": str(work / "input"), "AGENTJOBS_VAULT__AUTH_MODE": "none",
           "AGENTJOBS_AMQP__URL": url, "AGENTJOBS_AMQP__PUBLISH_TIMEOUT": "3"}
    proc = await asyncio.create_subprocess_exec(AGENTJOBS, "agent", env=env, cwd=work,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    return proc.returncode, (err.decode().strip().splitlines() or [""])[-1]


async def test_a_full_broker_stop_and_start_loses_nothing_and_duplicates_nothing(k8s_emulator, tmp_path):
    handle = k8s_emulator
    prepare_cluster(handle)
    rng = random.Random(50)
    async with private_rabbitmq.private_rabbitmq() as node:
        url = node.amqp_url
        await declare_topology(url, settings_for(handle.namespace))
        await _copy_of_results(url)
        bridge = BridgeService(Settings(amqp=AmqpSettings(url=url_for(url, "bridge"), reconnect_interval=0.5,
                                                          publish_timeout=3.0),
                                        bridge=BridgeSettings(host="127.0.0.1", port=0)))
        port = await bridge.start()
        env = {"AGENTJOBS_AMQP__RECONNECT_INTERVAL": "0.5", "AGENTJOBS_RETRY__BASE": "0.05",
               "AGENTJOBS_RETRY__CAP": "1", "AGENTJOBS_ADMISSION__MAX_ACTIVE": "1000",
               **{f"AGENTJOBS_CLASSES__{c}__MAX_ACTIVE": "1000" for c in ("DEFAULT", "DATABASE", "KUBERNETES")}}
        sending = asyncio.Event()
        sending.set()
        sent: dict[str, int] = {}
        accepted: set[str] = set()
        refused: collections.Counter[str] = collections.Counter()
        accepted_while_down: list[str] = []
        agent_exits: list[tuple[int, str]] = []
        down = False
        numbers = iter(range(100_000))
        began = time.monotonic()

        async def alertmanager(http: aiohttp.ClientSession) -> None:
            """Sends new webhooks while ``sending``; each is retried until it gets a 200."""
            while sending.is_set():
                n = next(numbers)
                body = _webhook(n)
                event_id = decode_incident(body).event_id
                sent[event_id] = n
                for _ in range(600):  # bounded: about 60 s of refusals per webhook
                    was_down = down
                    try:
                        async with http.post(f"http://127.0.0.1:{port}/alerts", data=body,
                                             headers={"Content-Type": "application/json"}) as resp:
                            answer: dict[str, Any] = await resp.json()
                            if resp.status == 200:
                                if was_down and down:  # sent and answered while the broker was stopped
                                    accepted_while_down.append(event_id)
                                accepted.add(event_id)
                                break
                            assert resp.status == 503 and answer["error"] == "broker_unavailable", answer
                            refused["503"] += 1
                    except aiohttp.ClientError as exc:
                        refused[type(exc).__name__] += 1
                    await asyncio.sleep(0.1)
                else:
                    raise AssertionError(f"webhook {n} never accepted")
                await asyncio.sleep(rng.uniform(0.05, 0.2))

        try:
            async with PodDriver(handle, decide=lambda pod: 0).running_(), \
                    running_dispatcher(handle, url, **env) as service, \
                    aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
                senders = [asyncio.create_task(alertmanager(http)) for _ in range(SENDERS)]
                try:
                    # When the broker application is stopped and started again, twice, under steady traffic
                    cycles = []
                    for _ in range(CYCLES):
                        await asyncio.sleep(UP_BETWEEN)
                        before = len(accepted)
                        stopped = time.monotonic()
                        await node.stop_app()
                        down = True  # from stop_app's return until start_app is called: nothing can confirm
                        # ... and an agent that concludes now cannot publish its finding: exit 4, no success
                        agent_exits.append((await asyncio.gather(asyncio.sleep(DOWN), _agent(url, tmp_path)))[1])
                        down = False
                        await node.start_app()
                        cycles.append({"down_s": round(time.monotonic() - stopped, 1),
                                       "accepted_before": before})
                    await asyncio.sleep(UP_BETWEEN)
                    sending.clear()
                    async with asyncio.timeout(90):
                        await asyncio.gather(*senders)
                finally:
                    for task in senders:
                        task.cancel()

                # Then both reconnected by themselves
                async def ready() -> bool:
                    return service.ready and bridge.ready

                await wait_until(ready, timeout=30, what="dispatcher and bridge ready again")
                groups = {identify(decode_incident(_webhook(n))).investigation_id: identify(
                    decode_incident(_webhook(n))).job_name for n in sent.values()}

                async def all_ended() -> bool:
                    copy = await _read_copy(url)
                    return {m[1] for m in copy if m[0] in TERMINAL} >= {
                        lifecycle_message_id(i, LifecycleState.SUCCEEDED) for i in groups}

                await wait_until(all_ended, timeout=90, max_delay=1.0, what="every group's ending reported")

                async def intake_drained() -> bool:
                    return await ready_messages(url, INCIDENTS) == 0

                await wait_until(intake_drained, timeout=30, what="an empty intake queue")
                assert not service.crashed.is_set()
                retries = service.metrics.retries._value.get()
        finally:
            await bridge.stop()
        results = await _read_copy(url)
        dead = await ready_messages(url, DEAD)

    # Every webhook was accepted in the end, the outages met requests, and no 200 was given while down
    assert accepted == set(sent)
    assert refused, "the broker stops never met a webhook: the test did not test anything"
    assert accepted_while_down == [], "a 200 while the broker was stopped"
    # The agent, the other publisher, reported no success either: exit 4, its finding unpublished
    assert len(agent_exits) == CYCLES
    for code, last in agent_exits:
        assert code == 4 and last.startswith("finding_unpublished: "), (code, last)
    # Exactly one Job per group, one dispatched and one ending each, nothing dead-lettered
    jobs = sorted(j["metadata"]["name"] for j in handle.cluster.store.list(JOBS, handle.namespace))
    assert jobs == sorted(groups.values())
    dispatched = [m[1] for m in results if m[0] == "lifecycle.dispatched"]
    assert set(dispatched) == {lifecycle_message_id(i, LifecycleState.DISPATCHED) for i in groups}
    terminal: dict[str, set[str]] = collections.defaultdict(set)
    for routing_key, message_id, _ in results:
        if routing_key in TERMINAL:
            investigation_id, _, state = (message_id or "").partition(":")
            terminal[investigation_id].add(state)
    assert terminal == {i: {LifecycleState.SUCCEEDED.value} for i in groups}
    assert dead == 0 and not [m for m in results if m[0].startswith("deadletter.")]

    figures = {
        "broker_cycles": CYCLES, "cycles": cycles, "webhooks": len(sent), "groups": len(groups), "jobs": len(jobs),
        "refused": dict(refused), "dispatched_messages": len(dispatched),
        "dispatched_duplicates_deduplicated_by_id": len(dispatched) - len(set(dispatched)),
        "agent_exits_while_down": [c for c, _ in agent_exits],
        "dispatcher_retries": retries, "total_s": round(time.monotonic() - began, 1),
    }
    print("\nchaos broker restart:", json.dumps(figures, sort_keys=True))
