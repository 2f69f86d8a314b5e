"""Chaos: the Kubernetes API fails ~20 % of the dispatcher's calls while a storm arrives.

Issue 10's third chaos bullet. One in-process dispatcher (real RabbitMQ, the
emulated API server) handles 300 notifications in 60 groups while the emulator
injects, on the namespaced jobs/secrets/pods paths:

- 5xx (500, 502, 503) answers with a real Status body,
- 429 Too Many Requests with ``Retry-After``,
- hangs (the request never answers; the dispatcher's 2 s request timeout fires),
- dropped watch streams (the connection is cut after the first event),

and a background task cuts every open watch and compacts history every
``COMPACT_EVERY`` seconds, so the dispatcher resumes from a resourceVersion that
is gone and gets 410 Expired (then re-lists). The emulated kubelet ends every
pod (most succeed, a tenth crash, a tenth are OOM-killed). Afterwards the same
invariants as the SIGKILL chaos test:

- every group has exactly one Job, and the cluster holds no other;
- every Job's ``dispatched`` lifecycle event was published;
- every Job's ending was reported in exactly one terminal state (one distinct
  message id per Job; redeliveries of the same id are allowed), the state the
  kubelet gave it;
- nothing was dead-lettered, and the intake queue is empty (nothing ready, nothing unacked).

Bounded (every wait has a timeout), loopback only. ``pytest -s`` prints the figures
(faults injected by kind, requests seen, the realised fault rate).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import re
import time
import zlib

import pytest

from dispatcher.intake.reporting import lifecycle_message_id
from schemas.routing import DEAD, INCIDENTS
from schemas import LifecycleState, decode_incident, identify
from tests.integration.dispatcher_harness import (
    PodDriver,
    Results,
    declare_topology,
    publish,
    ready_messages,
)
from tests.integration.k8s_helpers import prepare_cluster, settings_for
from tests.integration.test_dispatcher import running_dispatcher
from tests.support.k8s.resources import CONFIGMAPS, JOBS, PODS
from tests.support.payloads import storm
from tests.support.services import wait_until

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

GROUPS = 60
NOTIFICATIONS = 300
BATCHES = 20  # the storm arrives in confirmed batches, so faults hit launches and endings in flight
BATCH_PAUSE = 0.5  # seconds between batches
ENDINGS_PER_TICK, TICK = 2, 0.3  # the kubelet ends this many running pods every TICK seconds

COMPACT_EVERY = 0.7  # seconds between "cut every watch + compact history" (→ 410 on resume)
DISPATCH_BOUND = 75.0  # seconds for every group's Job to be dispatched
ENDINGS_BOUND = 60.0  # seconds after that for every ending to be reported
TERMINAL = (LifecycleState.SUCCEEDED, LifecycleState.FAILED, LifecycleState.CANCELLED)
TERMINAL_KEYS = {f"lifecycle.{s.value}" for s in TERMINAL}
NAMESPACED = r"/namespaces/[^/]+/(jobs|secrets|pods)"


def _ending(job_name: str) -> int | str:
    """How the kubelet ends a Job's pod: a deterministic tenth crash, a tenth are OOM-killed."""
    bucket = zlib.crc32(job_name.encode()) % 10
    return 2 if bucket == 0 else "oom" if bucket == 1 else 0


def _count_expired_watches(handle) -> list[int]:
    """Count watches the emulator answers with 410 Expired (resumed from a compacted resourceVersion)."""
    store, counter = handle.cluster.store, [0]
    original = store.watch

    def watch(*args, **kwargs):
        try:
            return original(*args, **kwargs)
        except ValueError:
            counter[0] += 1
            raise

    store.watch = watch
    return counter


def _inject_faults(handle) -> dict[str, list]:
    """~20 % of namespaced jobs/secrets/pods requests fail; returns the faults by kind."""
    f = handle.faults
    # Faults are tried in order, each with its own seeded probability: the shares below add up
    # to ≈ 20 % of matching requests (the realised rate is printed).
    return {
        # GET …/jobs is the dispatcher's list and watch: a watch is cut after its first event (a
        # list at once, one more connection failure). First, so the other faults don't shadow it.
        "dropped_watch_stream": [
            f.inject("GET", r"/namespaces/[^/]+/jobs$", drop_stream=True, after_events=1, times=None,
                     probability=0.3, seed=16),
        ],
        "http_5xx": [
            f.inject("*", NAMESPACED, status=503, times=None, probability=0.08, seed=11),
            f.inject("*", NAMESPACED, status=500, times=None, probability=0.03, seed=12),
            f.inject("*", NAMESPACED, status=502, times=None, probability=0.02, seed=13),
        ],
        "http_429_retry_after": [
            f.inject("*", NAMESPACED, status=429, retry_after=1, times=None, probability=0.04, seed=14),
        ],
        # Not on list/watch (GET …/jobs): a hung watch stalls observation for watch_timeout +
        # request_timeout (32 s here), which says nothing new each time and would eat the budget.
        "hang_until_client_timeout": [
            f.inject("*", r"/namespaces/[^/]+/(jobs/[^/]+|secrets|pods)", timeout=True, times=None,
                     probability=0.03, seed=15),
        ],
    }


async def test_kubernetes_api_faults_at_twenty_percent_lose_nothing_and_duplicate_nothing(
    k8s_emulator, amqp_vhost, rabbitmq_management
):
    # Given a fresh vhost, the topology, and an emulated API server failing ~20 % of calls
    handle = k8s_emulator
    prepare_cluster(handle)
    url = amqp_vhost.amqp_url
    await rabbitmq_management.delete_vhost(amqp_vhost.name)
    await rabbitmq_management.create_vhost(amqp_vhost.name)
    await rabbitmq_management.set_permissions(amqp_vhost.name, "guest")
    await declare_topology(url, settings_for(handle.namespace))

    bodies = storm(groups=GROUPS, notifications=NOTIFICATIONS, seed=20)
    identities = {identify(decode_incident(b)) for b in bodies}
    by_investigation = {i.investigation_id: i.job_name for i in identities}
    assert len(by_investigation) == GROUPS
    expected_state = {
        inv: LifecycleState.SUCCEEDED if _ending(job) == 0 else LifecycleState.FAILED
        for inv, job in by_investigation.items()
    }
    env = {
        "AGENTJOBS_RETRY__BASE": "0.05", "AGENTJOBS_RETRY__CAP": "1.0",
        "AGENTJOBS_ADMISSION__MAX_ACTIVE": "1000",
        **{f"AGENTJOBS_CLASSES__{c}__MAX_ACTIVE": "1000" for c in ("DEFAULT", "DATABASE", "KUBERNETES")},
    }
    requests_before = len(handle.cluster.requests)
    expired = _count_expired_watches(handle)
    faults = _inject_faults(handle)
    compactions = 0
    stop_compacting = asyncio.Event()

    async def compactor() -> None:
        """Cut every open watch and forget history: the watcher resumes into a 410 and re-lists."""
        nonlocal compactions
        while not stop_compacting.is_set():
            with_timeout = asyncio.create_task(stop_compacting.wait())
            done, _ = await asyncio.wait({with_timeout}, timeout=COMPACT_EVERY)
            if done:
                break
            with_timeout.cancel()
            # An unrelated write first, so history moves past whatever the job watch last saw:
            # its resume is then always older than the compaction (a 410), not only when a
            # Job event happened to land in between.
            handle.cluster.store.create(CONFIGMAPS, {"metadata": {"name": f"compaction-{compactions}",
                                                                  "namespace": handle.namespace}, "data": {}})
            handle.cluster.compact()
            handle.cluster.store.close_watches()
            compactions += 1

    def dispatched() -> set[str]:
        return {m[2].investigation_id for m in results.keys("lifecycle.dispatched")}

    def terminal_investigations() -> set[str]:
        return {m[1].split(":")[0] for m in results.messages if m[0] in TERMINAL_KEYS and m[1]}

    async def kubelet() -> None:
        """End running pods a few at a time, so endings keep arriving through the faulty watch."""
        while True:
            await asyncio.sleep(TICK)
            for _ in range(min(ENDINGS_PER_TICK, len(driver.running))):
                name = driver.running[0]
                pod = handle.cluster.store.get(PODS, handle.namespace, name)
                driver.finish_oldest(_ending(pod["metadata"]["labels"]["job-name"]) if pod else 0)

    began = time.monotonic()
    driver = PodDriver(handle, decide=lambda pod: None)  # started at once, ended by kubelet()
    async with driver.running_(), Results(url) as results, running_dispatcher(handle, url, **env):
        compacting = asyncio.create_task(compactor())
        ending = asyncio.create_task(kubelet())
        try:
            # When the storm arrives in batches while the API server misbehaves
            size = -(-len(bodies) // BATCHES)
            for start in range(0, len(bodies), size):
                await publish(url, bodies[start:start + size])
                await asyncio.sleep(BATCH_PAUSE)
            # Then every group's Job is dispatched and every ending reported
            await results.wait_for(lambda: len(dispatched()) == GROUPS, timeout=DISPATCH_BOUND)
            dispatch_s = time.monotonic() - began
            await results.wait_for(lambda: len(terminal_investigations()) == GROUPS, timeout=ENDINGS_BOUND)
        finally:
            stop_compacting.set()
            await compacting
            ending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ending

        # and nothing is left in the intake queue, neither ready nor unacked (management stats lag ~5 s)
        async def intake_empty() -> bool:
            info = await rabbitmq_management.get_queue(amqp_vhost.name, INCIDENTS)
            return info is not None and info.messages == 0 and info.messages_unacknowledged == 0

        await wait_until(intake_empty, timeout=30, what="an empty intake queue in the management API")
        await asyncio.sleep(0.5)  # a late duplicate ending would arrive now
    elapsed = time.monotonic() - began
    handle.faults.clear()

    # Every group has exactly one Job, and the cluster holds no other
    jobs = sorted(j["metadata"]["name"] for j in handle.cluster.store.list(JOBS, handle.namespace))
    assert jobs == sorted(by_investigation.values())
    # With the dispatcher gone anything unacked would be ready again: the intake queue is empty
    assert await ready_messages(url, INCIDENTS) == 0
    assert await ready_messages(url, DEAD) == 0 and not results.keys("deadletter.")
    # Every Job's `dispatched` was published (deterministic message id: one per investigation)
    dispatched_ids = {m[1] for m in results.keys("lifecycle.dispatched")}
    assert dispatched_ids == {lifecycle_message_id(inv, LifecycleState.DISPATCHED) for inv in by_investigation}
    # Every ending was reported in exactly one terminal state, the one the kubelet gave it
    terminal: dict[str, set] = collections.defaultdict(set)
    for routing_key, message_id, event, _ in results.messages:
        if routing_key in TERMINAL_KEYS:
            assert message_id == lifecycle_message_id(event.investigation_id, event.state)
            terminal[event.investigation_id].add(event.state)
    assert {inv: states for inv, states in terminal.items() if len(states) != 1} == {}
    assert {inv: next(iter(states)) for inv, states in terminal.items()} == expected_state

    # Figures (pytest -s shows them)
    requests = handle.cluster.requests[requests_before:]
    matching = sum(1 for r in requests if re.search(NAMESPACED, r.path))
    injected = {kind: sum(f.hits for f in fs) for kind, fs in faults.items()}
    total_faults = sum(injected.values())
    figures = {
        "incidents_published": len(bodies), "groups": GROUPS, "jobs": len(jobs),
        "faults_injected": total_faults, "faults_by_kind": injected,
        "watch_cut_and_compacted": compactions, "watch_410_expired": expired[0],
        "api_requests": len(requests),
        "watch_requests": sum(1 for r in requests if r.query.get("watch") in ("true", "True", "1")), "api_requests_on_faulted_paths": matching,
        "fault_rate_on_faulted_paths": round(total_faults / max(1, matching), 3),
        "dispatched_messages": len(results.keys("lifecycle.dispatched")),
        "terminal_messages": sum(1 for m in results.messages if m[0] in TERMINAL_KEYS),
        "failed_jobs": sum(1 for s in expected_state.values() if s is LifecycleState.FAILED),
        "all_dispatched_s": round(dispatch_s, 1), "total_s": round(elapsed, 1),
    }
    print("\nchaos kubernetes api faults:", json.dumps(figures, sort_keys=True))
    assert injected["http_5xx"] and injected["http_429_retry_after"] and injected["hang_until_client_timeout"]
    assert injected["dropped_watch_stream"] and compactions and expired[0]
