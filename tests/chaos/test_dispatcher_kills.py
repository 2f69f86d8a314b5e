"""Chaos: two `agentjobs dispatcher` processes SIGKILLed at random while a storm arrives.

Issue 10's first chaos bullet. Two real dispatcher processes consume one intake
queue; 2,000 notifications in 300 groups (plus a few deliberately undecodable
ones) are published in batches while a driver SIGKILLs a random dispatcher
every few seconds and restarts it at once, at least ``MIN_KILLS`` times. The
emulated kubelet ends every Job (some succeed, some fail). Afterwards:

- every group has exactly one Job;
- every notification is accounted for: the intake queue is empty with nothing
  unacked, and ``agentjobs.dead`` holds exactly the undecodable ones, each with
  its reason (summing the processes' outcome counters is meaningless across
  kills, so the broker's queues are the ledger);
- every Job's ``dispatched`` lifecycle event was published;
- every Job's ending was reported once: exactly one distinct terminal message
  id (duplicates of the same id are allowed, delivery is at-least-once), in the
  state the kubelet gave it, with one failure result for each failed Job.

Bounded: the driver stops by itself once the storm is consumed and enough kills
happened, or fails at ``KILL_PHASE_BOUND``. Loopback only.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import time
import zlib
from pathlib import Path

import pytest

from dispatcher.jobs import jobspec
from dispatcher.intake.reporting import lifecycle_message_id
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
from tests.integration.test_dispatcher_processes import DispatcherProcess, _killed_on_exit
from tests.support.k8s.resources import JOBS
from tests.support.payloads import storm
from tests.support.services import wait_until

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

GROUPS = 300
NOTIFICATIONS = 2_000
MIN_KILLS = 20
BATCHES = 40  # the storm arrives in this many confirmed batches ...
BATCH_PAUSE = (0.8, 1.8)  # ... this many seconds apart, so kills land while work is in flight
KILL_PAUSE = (1.0, 3.0)  # seconds a restarted dispatcher runs before the next kill
KILL_PHASE_BOUND = 150.0  # seconds for the storm to be consumed under kills
# A replica's claim on a Job's ending is taken over after 60 s (k8s.claim_timeout, left at its
# default here): an ending claimed by a killed replica is reported that much later.
ENDINGS_BOUND = 100.0  # seconds after the kill phase for every ending to be reported
TERMINAL = (LifecycleState.SUCCEEDED, LifecycleState.FAILED, LifecycleState.CANCELLED)
# Deliberately undecodable notifications and the reason each must be dead-lettered with.
INVALID = {**{b"{not json %d" % i: "invalid_json" for i in range(5)},
           **{b"[%d]" % i: "not_an_object" for i in range(5)}}


def _ending(job_name: str) -> int | str:
    """How the kubelet ends a Job's pod: a deterministic tenth crash, a tenth are OOM-killed."""
    bucket = zlib.crc32(job_name.encode()) % 10
    return 2 if bucket == 0 else "oom" if bucket == 1 else 0


def _log_lines(paths: list[Path]) -> list[dict]:
    lines = []
    for path in paths:
        for raw in path.read_text(errors="replace").splitlines():
            try:
                doc = json.loads(raw)
            except ValueError:
                continue
            if isinstance(doc, dict):
                lines.append(doc)
    return lines


async def test_two_dispatchers_sigkilled_twenty_times_lose_nothing_and_duplicate_nothing(
    k8s_emulator, amqp_vhost, rabbitmq_management, tmp_path
):
    # Given two dispatcher processes on one queue, the emulator as their cluster
    handle = k8s_emulator
    prepare_cluster(handle)
    url = amqp_vhost.amqp_url
    await declare_topology(url, settings_for(handle.namespace))
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps(handle.kubeconfig))
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "AGENTJOBS_AMQP__URL": amqp_vhost.url("dispatcher"),
        "AGENTJOBS_AMQP__PREFETCH": "20",
        "AGENTJOBS_RUNTIME__KIND": "kubernetes",
        "AGENTJOBS_K8S__KUBECONFIG": str(kubeconfig),
        "AGENTJOBS_K8S__NAMESPACE": handle.namespace,
        "AGENTJOBS_LOGGING__FORMAT": "json",
        "AGENTJOBS_VAULT__AUTH_MODE": "none",
        "AGENTJOBS_ADMISSION__MAX_ACTIVE": "1000",
        **{f"AGENTJOBS_CLASSES__{c}__MAX_ACTIVE": "1000" for c in ("DEFAULT", "DATABASE", "KUBERNETES")},
    }
    seed = 10
    rng = random.Random(seed)
    bodies = storm(groups=GROUPS, notifications=NOTIFICATIONS, seed=seed) + list(INVALID)
    rng.shuffle(bodies)
    identities = {identify(decode_incident(b)) for b in bodies if b not in INVALID}
    by_investigation = {i.investigation_id: i.job_name for i in identities}
    assert len(by_investigation) == GROUPS
    expected_state = {
        inv: LifecycleState.SUCCEEDED if _ending(job) == 0 else LifecycleState.FAILED
        for inv, job in by_investigation.items()
    }
    # Job creation takes a while (as on a busy API server), so kills catch launches in flight
    handle.faults.inject("POST", r"/jobs$", delay=0.1, times=None)

    slots = [DispatcherProcess(env, tmp_path / "d0-0.log"), DispatcherProcess(env, tmp_path / "d1-0.log")]
    started = list(slots)
    published = asyncio.Event()
    kills = 0

    def dispatched() -> set[str]:
        return {m[2].investigation_id for m in results.keys("lifecycle.dispatched")}

    async def publisher() -> None:
        size = -(-len(bodies) // BATCHES)
        for start in range(0, len(bodies), size):
            await publish(url, bodies[start:start + size])
            await asyncio.sleep(rng.uniform(*BATCH_PAUSE))
        published.set()

    async def storm_consumed() -> bool:
        return published.is_set() and len(dispatched()) == GROUPS and await ready_messages(url, INCIDENTS) == 0

    async def killer() -> None:
        nonlocal kills
        deadline = time.monotonic() + KILL_PHASE_BOUND
        while kills < MIN_KILLS or not await storm_consumed():
            assert time.monotonic() < deadline, (
                f"not done after {KILL_PHASE_BOUND:.0f} s: {kills} kills, published={published.is_set()}, "
                f"dispatched={len(dispatched())}/{GROUPS}"
            )
            await asyncio.sleep(rng.uniform(*KILL_PAUSE))
            victim = rng.randrange(len(slots))
            await slots[victim].kill()
            slots[victim]._log.close()
            kills += 1
            slots[victim] = DispatcherProcess(env, tmp_path / f"d{victim}-{kills}.log")
            started.append(slots[victim])
            await slots[victim].start()

    began = time.monotonic()
    driver = PodDriver(handle, decide=lambda pod: _ending(pod["metadata"]["labels"]["job-name"]))
    async with driver.running_(), Results(url) as results, _killed_on_exit(started):
        for process in slots:
            await process.start()
        # When the storm is published while a random dispatcher is SIGKILLed and restarted every few seconds
        await asyncio.gather(publisher(), killer())
        kill_phase = time.monotonic() - began

        # Then (once endings claimed by killed replicas are taken over) every Job's ending is reported
        def terminal_ids() -> set[str]:
            return {m[1] for m in results.messages if m[0] in {f"lifecycle.{s.value}" for s in TERMINAL}}

        await results.wait_for(lambda: len({i.split(":")[0] for i in terminal_ids()}) == GROUPS,
                               timeout=ENDINGS_BOUND)

        # ... and acknowledged, i.e. fully reported: a replica killed between a Job's lifecycle
        # report and its failure result leaves the rest to the replica that takes the claim over
        async def all_acknowledged() -> bool:
            found = handle.cluster.store.list(JOBS, handle.namespace)
            return len(found) == GROUPS and all(
                jobspec.ANN_REPORTED in (j["metadata"].get("annotations") or {}) for j in found)

        await wait_until(all_acknowledged, timeout=ENDINGS_BOUND, what="every Job's ending acknowledged")

        # and nothing is left in the intake queue, neither ready nor unacked (management stats lag ~5 s)
        async def intake_empty() -> bool:
            info = await rabbitmq_management.get_queue(amqp_vhost.name, INCIDENTS)
            return info is not None and info.messages == 0 and info.messages_unacknowledged == 0

        await wait_until(intake_empty, timeout=30, what="an empty intake queue in the management API")
        for process in slots:
            assert await process.stop() == 0, process.log_path.read_text()[-3000:]
    elapsed = time.monotonic() - began

    # Every group has exactly one Job, and the cluster holds no other
    jobs = sorted(j["metadata"]["name"] for j in handle.cluster.store.list(JOBS, handle.namespace))
    assert jobs == sorted(by_investigation.values())
    # With no consumer left, anything unacked would be ready again: the intake queue is empty
    assert await ready_messages(url, INCIDENTS) == 0
    # Only the deliberately undecodable notifications were dead-lettered, each with its reason
    dead = await drain(url, DEAD)
    assert {m.body for m in dead} == set(INVALID)
    for message in dead:
        assert message.headers["x-agentjobs-reason"] == INVALID[message.body], message.headers
    # Every Job's `dispatched` was published (deterministic message id: one per investigation)
    dispatched_ids = {m[1] for m in results.keys("lifecycle.dispatched")}
    assert dispatched_ids == {lifecycle_message_id(inv, LifecycleState.DISPATCHED) for inv in by_investigation}
    # Every ending was reported once: one distinct terminal id per Job, in the state the kubelet gave it
    terminal: dict[str, set[str]] = collections.defaultdict(set)
    for routing_key, message_id, event, _ in results.messages:
        if routing_key in {f"lifecycle.{s.value}" for s in TERMINAL}:
            assert message_id == lifecycle_message_id(event.investigation_id, event.state)
            terminal[event.investigation_id].add(event.state)
    assert {inv: states for inv, states in terminal.items() if len(states) != 1} == {}
    assert {inv: next(iter(states)) for inv, states in terminal.items()} == expected_state
    # and each failed Job's ticket was closed with one failure result
    outcomes = {m[1] for m in results.keys("finding.")}
    failed = {inv for inv, state in expected_state.items() if state is LifecycleState.FAILED}
    assert outcomes == {f"{inv}:outcome" for inv in failed}

    # Figures (pytest -s shows them)
    logs = _log_lines([p.log_path for p in started])
    handled = collections.Counter(line.get("outcome") for line in logs if line.get("event") == "incident_handled")
    redelivered = sum(1 for line in logs if line.get("event") == "incident_handled" and line.get("attempt", 1) > 1)
    terminal_messages = sum(1 for m in results.messages if m[0] in {f"lifecycle.{s.value}" for s in TERMINAL})
    figures = {
        "kills_survived": kills, "dispatcher_processes": len(started), "incidents_published": len(bodies),
        "groups": GROUPS, "jobs": len(jobs), "dispatched_distinct": len(dispatched_ids),
        "dispatched_messages": len(results.keys("lifecycle.dispatched")),
        "terminal_distinct": sum(len(s) for s in terminal.values()), "terminal_messages": terminal_messages,
        "failed_jobs": len(failed), "dead_lettered_distinct": len({m.body for m in dead}),
        "dead_lettered_messages": len(dead), "handled_by_outcome_all_processes": dict(handled),
        "handled_on_redelivery": redelivered, "kill_phase_s": round(kill_phase, 1), "total_s": round(elapsed, 1),
    }
    print("\nchaos dispatcher kills:", json.dumps(figures, sort_keys=True))
