#!/usr/bin/env python
"""Dispatch benchmark: real RabbitMQ + the Kubernetes API emulator, no LocalRuntime.

Prints, then ends with one JSON line (see benchmarks/README.md for what each figure means):

1. dispatch latency p50/p99 — publish (with confirm) of a new incident → its Job create
   accepted by the API server — at a steady 100 new incidents/s, each a distinct group;
2. sustained incidents/s dispatched with a pre-published backlog, and the dispatcher's process
   CPU-ms per distinct incident beside a same-work baseline's (issue 22): a hand-written consumer
   (``same_work_role``) doing exactly the dispatcher's external work per incident — consume,
   decode, the same API writes as raw JSON over one aiohttp session (here, auth mode ``none``: the
   Job alone, the incident riding in it), one confirmed ``dispatched`` publish, ack — over the same
   incidents on a fresh cluster; the ratio baseline/ours (target >= 0.7; ours <= 0.8 ms);
2b. context: incidents/s handled with a pre-published realistic alert storm (re-sends, joining
   alerts, CloudEvent-wrapped, shuffled; ``tests/support/payloads.storm``) and the Jobs it made;
2c. the storm of the issue: 600 notifications in 6 groups → 6 Jobs, time to drain, against the
   time phase 3's raw ceiling needs for as many messages;
3. the raw ceiling: a plain aio-pika consume+decode+ack loop over the same bodies, same
   prefetch, same quorum queue arguments, and the ratio dispatched/s ÷ raw/s;
4. the resident set of a process hosting only the dispatcher, before and with 10,000 active
   investigations (dispatched through the real service; caps raised so all stay active).

Three processes, so that each figure is about the dispatcher and not its test doubles:
this orchestrator (publisher, raw consumer), an emulator process, and one fresh dispatcher
process per phase. Create times are taken inside the emulator (a store listener on Jobs
ADDED) with ``time.monotonic()``, which on Linux is the system-wide CLOCK_MONOTONIC, so they
compare directly with the publish times taken here.

Run: ``.venv/bin/python benchmarks/dispatch.py [--quick] [--profile DIR]``. Needs RabbitMQ on
127.0.0.1:5672 with the management API (``AGENTJOBS_TEST_AMQP_URL`` /
``AGENTJOBS_TEST_RABBITMQ_MGMT_URL`` override); uses a temporary vhost, deleted afterwards.
Misses against the targets are reported, never turned into a failing exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

NAMESPACE = "agentjobs-bench"
ROUTING_KEY = "alertmanager"
RAW_QUEUE = "bench.raw"
HIGH_CAP = 100_000  # admission caps high enough never to throttle

TARGET_P99_MS = 25.0
TARGET_RATIO = 0.25
TARGET_CPU_MS = 0.8  # dispatcher CPU-ms per distinct incident (issue 22)
TARGET_SAME_WORK = 0.7  # same-work baseline CPU ÷ ours (issue 22)
TARGET_RSS_MB = 150.0
STORM_SEED = 4  # fixed, so every run replays the same storm


# --------------------------------------------------------------------------------------------
# small shared helpers
# --------------------------------------------------------------------------------------------


def rss_mb() -> float:
    """Resident set of this process (VmRSS), in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (from /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def broker_pids() -> list[int]:
    """The local RabbitMQ (Erlang VM) processes, for CPU accounting only."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == "beam.smp":
                    pids.append(int(entry.name))
    return pids


def cpu_snapshot(pids: dict[str, list[int]]) -> dict[str, float]:
    return {name: sum(proc_cpu_s(p) for p in group) for name, group in pids.items()}


class GcPauses:
    """Records this process's garbage-collector pauses (gc.callbacks), to explain latency tails."""

    def __init__(self, threshold_s: float = 0.002) -> None:
        self.threshold_s = threshold_s
        self.pauses: list[tuple[float, float, int]] = []  # (monotonic start, seconds, generation)
        self._start = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.monotonic()
        else:
            took = time.monotonic() - self._start
            if took >= self.threshold_s:
                self.pauses.append((self._start, took, info["generation"]))


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def quiet_logging() -> None:
    """structlog (and stdlib loggers routed through it) at warning, to stderr."""
    from schemas.logs import configure
    from dispatcher.plumbing.settings import LoggingSettings

    configure(LoggingSettings(level="warning", format="json"))


# --------------------------------------------------------------------------------------------
# child processes: a tiny JSON-lines protocol over stdin/stdout
# --------------------------------------------------------------------------------------------


async def serve(handlers: dict[str, Callable[[dict], Awaitable[dict]]]) -> None:
    """Answer one JSON command per stdin line until EOF or ``exit``; replies go to the real stdout.

    SIGINT is ignored: on Ctrl-C the orchestrator shuts children down in order (and a child
    whose orchestrator vanished sees EOF and cleans up).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    proto = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # anything else printing to stdout must not corrupt the protocol
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def reply(doc: dict) -> None:
        proto.write(json.dumps(doc).encode() + b"\n")

    reply({"ready": True, "pid": os.getpid(), "rss_mb": rss_mb()})
    while line := await reader.readline():
        cmd = json.loads(line)
        try:
            result = await handlers[cmd["cmd"]](cmd)
        except Exception as exc:  # noqa: BLE001 - reported to the orchestrator, which stops the run
            result = {"error": f"{cmd['cmd']}: {exc!r}"}
        reply(result)
        if cmd["cmd"] == "exit":
            break
    if "exit" in handlers:
        with contextlib.suppress(Exception):
            await handlers["exit"]({"cmd": "exit"})


class Child:
    """A child process of this script in one role, driven by ``call``."""

    def __init__(self, role: str, *args: str) -> None:
        self.role = role
        self.args = args
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, timeout: float = 60.0) -> dict:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, str(Path(__file__).resolve()), "--role", self.role, *self.args,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=2**26,
        )
        return await self._read(timeout)

    async def _read(self, timeout: float) -> dict:
        assert self.proc is not None and self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"{self.role} process exited (status {await self.proc.wait()})")
        doc = json.loads(line)
        if "error" in doc:
            raise RuntimeError(f"{self.role} process: {doc['error']}")
        return doc

    async def call(self, cmd: str, timeout: float = 60.0, **fields: Any) -> dict:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **fields}).encode() + b"\n")
        await self.proc.stdin.drain()
        return await self._read(timeout)

    async def close(self, timeout: float = 20.0) -> None:
        """Ask the child to exit (clean-up runs there); kill it by pid if it does not."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.call("exit", timeout=timeout), timeout)
        with contextlib.suppress(Exception):
            proc.stdin.close()  # type: ignore[union-attr]
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except (TimeoutError, asyncio.CancelledError):
            proc.kill()
            await proc.wait()




class _IndexedObjects(dict):
    """The emulator store's object dict plus two indexes: keys by resource plural, key by uid."""

    def __init__(self, items: dict) -> None:
        super().__init__()
        self.by_plural: dict[str, dict[tuple, None]] = {}
        self.by_uid: dict[str, tuple] = {}
        for key, obj in items.items():
            self[key] = obj

    def __setitem__(self, key: tuple, obj: dict) -> None:
        super().__setitem__(key, obj)
        self.by_plural.setdefault(key[0], {})[key] = None
        uid = obj["metadata"].get("uid")
        if uid:
            self.by_uid[uid] = key

    def pop(self, key: tuple, *default: Any) -> Any:
        obj = super().pop(key, *default)
        if obj is not None and key in self.by_plural.get(key[0], {}):
            del self.by_plural[key[0]][key]
            self.by_uid.pop(obj["metadata"].get("uid"), None)
        return obj


def index_emulator_store(store: Any) -> None:
    """Benchmark-only speed-up of the emulator's Store, same results: ``list`` and ``find_by_uid``.

    The emulator scans every stored object on each ``list`` (called per create by quota admission
    and the quota controller hook) and each ``find_by_uid`` (per owned Secret, by the garbage
    collector), so with 10,000 Jobs + Secrets it — not the dispatcher — would set the pace.
    """
    import copy

    from tests.support.k8s.resources import BY_KIND

    objects = _IndexedObjects(store._objects)
    store._objects = objects

    def list_(rt: Any, namespace: str | None = None) -> list[dict]:
        out = [copy.deepcopy(objects[k]) for k in objects.by_plural.get(rt.plural, ())
               if namespace is None or k[1] == namespace]
        out.sort(key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]))
        return out

    def find_by_uid(uid: str) -> tuple[Any, dict] | None:
        key = objects.by_uid.get(uid)
        if key is None:
            return None
        obj = objects[key]
        return BY_KIND[(obj["apiVersion"], obj["kind"])], copy.deepcopy(obj)

    store.list = list_
    store.find_by_uid = find_by_uid

# --------------------------------------------------------------------------------------------
# role: emulator (the Kubernetes API emulator, timing Job creates)
# --------------------------------------------------------------------------------------------


async def emulator_role(profile: str | None) -> None:
    from tests.integration.k8s_helpers import prepare_cluster
    from tests.support.k8s.fixtures import running_emulator
    from tests.support.k8s.resources import JOBS
    from tests.support.k8s.tokens import ADMIN_TOKEN

    quiet_logging()
    # A client hanging up a watch stream at shutdown is not worth a traceback here.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    pauses = GcPauses()
    stack = contextlib.AsyncExitStack()
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    created: dict[str, float] = {}  # Job name → monotonic time its create was committed
    reached = asyncio.Event()
    want = [0]

    def on_event(ev: Any) -> None:
        if ev.rt is JOBS and ev.type == "ADDED":
            created.setdefault(ev.obj["metadata"]["name"], time.monotonic())
            if len(created) >= want[0]:
                reached.set()

    async def fresh(cmd: dict) -> dict:
        """A new, empty cluster (the previous one is stopped)."""
        await stack.aclose()
        created.clear()
        # The emulator stands in for a (Go) API server: its own collector pauses (up to ~180 ms
        # with thousands of stored objects) must not be billed to the dispatcher, so it collects
        # only here, between phases.
        gc.enable()
        gc.collect()
        gc.disable()
        handle = await stack.enter_async_context(running_emulator(NAMESPACE))
        index_emulator_store(handle.cluster.store)
        prepare_cluster(handle)
        # No Job controller: Jobs stay exactly as created (no pods), so every investigation stays
        # active, and the controller's per-reconcile pod listing (O(pods)) cannot slow the API.
        await handle.cluster.controller.stop()
        handle.cluster.store.subscribe(on_event)
        return {"url": handle.url, "token": ADMIN_TOKEN, "namespace": handle.namespace}

    async def wait_jobs(cmd: dict) -> dict:
        want[0] = cmd["n"]
        reached.clear()
        if len(created) < want[0]:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(cmd.get("within", 60)):
                    await reached.wait()
        return {"count": len(created), "created": created if cmd.get("times", True) else {},
                "gc_pauses": pauses.pauses}

    async def count(cmd: dict) -> dict:
        return {"count": len(created), "cpu_s": time.process_time()}

    async def exit_(cmd: dict) -> dict:
        await stack.aclose()
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile)
        return {"ok": True}

    await serve({"fresh": fresh, "wait_jobs": wait_jobs, "count": count, "exit": exit_})


# --------------------------------------------------------------------------------------------
# role: dispatcher (the real DispatcherService + KubernetesRuntime, nothing else)
# --------------------------------------------------------------------------------------------


async def dispatcher_role(profile: str | None) -> None:
    from kubernetes_asyncio.client import ApiClient, Configuration

    from dispatcher.jobs.kubernetes import KubernetesRuntime
    from dispatcher.intake.service import DispatcherService
    from dispatcher.plumbing.settings import load_settings

    quiet_logging()
    pauses = GcPauses()
    state: dict[str, Any] = {}
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()

    def dispatched() -> float:
        # The service's own counter: incremented once `dispatched` is confirmed, right before the ack.
        return state["service"].metrics.incidents.labels(outcome="dispatched")._value.get()

    async def start(cmd: dict) -> dict:
        settings = load_settings(None, cmd["env"])
        cfg = Configuration(host=cmd["url"], api_key={"BearerToken": cmd["token"]},
                            api_key_prefix={"BearerToken": "Bearer"})
        runtime = KubernetesRuntime(ApiClient(cfg), namespace=settings.k8s.namespace,
                                    request_timeout=settings.k8s.request_timeout,
                                    watch_timeout=settings.k8s.watch_timeout, owns_client=True)
        service = DispatcherService(settings, runtime, health_port=0)
        state["service"] = service
        if profiler is not None:
            profiler.enable()
        t0, cpu0 = time.monotonic(), time.process_time()
        await service.start()
        t1 = time.monotonic()
        # CPU per incident counts from here: start-up (connect, declare, replay, list, the GC freeze)
        # is paid once per process, not per incident; what was dispatched during it is subtracted.
        return {"t_start": t0, "t_started": t1, "cpu_started_s": time.process_time(),
                "startup_cpu_s": time.process_time() - cpu0, "dispatched_at_start": dispatched()}

    async def status(cmd: dict) -> dict:
        service = state.get("service")
        if cmd.get("settle"):
            await asyncio.sleep(cmd["settle"])
        gc.collect()
        return {
            "rss_mb": rss_mb(),
            "cpu_s": time.process_time(),
            "dispatched": dispatched() if service else 0,
            "tracked": len(service.tracker) if service else 0,
            "active": service.gate.active if service else 0,
            "waiting": service.gate.waiting if service else 0,
            "gc_pauses": pauses.pauses,
            "gc_objects": len(gc.get_objects()),
        }

    def consumed() -> dict[str, float]:
        # `agentjobs_incidents_consumed_total` by outcome (every handled delivery counts once).
        counts: dict[str, float] = {}
        for metric in state["service"].metrics.incidents.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    counts[sample.labels["outcome"]] = counts.get(sample.labels["outcome"], 0) + sample.value
        return counts

    async def wait_consumed(cmd: dict) -> dict:
        n, deadline = cmd["n"], time.monotonic() + cmd.get("within", 60)
        while sum(consumed().values()) < n and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        t_done = time.monotonic()
        counts = consumed()
        return {"t_done": t_done, "consumed": sum(counts.values()), "by_outcome": counts}

    async def wait_dispatched(cmd: dict) -> dict:
        n, deadline = cmd["n"], time.monotonic() + cmd.get("within", 60)
        while dispatched() < n and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        return {"t_done": time.monotonic(), "dispatched": dispatched(), "cpu_s": time.process_time()}

    async def exit_(cmd: dict) -> dict:
        service = state.pop("service", None)
        if service is not None:
            await service.stop(drain_timeout=5)
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile)
        return {"ok": True}

    await serve({"start": start, "status": status, "wait_dispatched": wait_dispatched,
                 "wait_consumed": wait_consumed, "exit": exit_})


# --------------------------------------------------------------------------------------------
# role: same-work baseline (issue 22) — the dispatcher's external work per distinct incident,
# hand-written, no abstractions
# --------------------------------------------------------------------------------------------


async def same_work_role() -> None:
    """Consume, decode, the same API write as raw JSON over one aiohttp session (the Job, its incident
    riding in it as the dispatcher's does where nothing secret is carried: auth mode ``none``), one
    confirmed ``dispatched`` publish, ack — what the dispatcher must do at the least for each new
    investigation, so its CPU per incident is the yardstick for ours."""
    import base64

    import aio_pika
    import aiohttp

    from dispatcher.jobs import jobspec
    from dispatcher.plumbing.settings import load_settings
    from schemas import decode_incident, identify
    from schemas.routing import INCIDENTS, RESULTS
    from tests.manifests.render import sample_job

    quiet_logging()
    state: dict[str, Any] = {"done": 0}
    placeholder = "__INCIDENT__"

    async def start(cmd: dict) -> dict:
        settings = load_settings(None, cmd["env"])
        # The writes the dispatcher under test makes: the Job alone where its incident rides in it
        # (jobspec.inline_input), else the Job and its owned Secret (a dispatcher from before issue 22).
        inline = getattr(jobspec, "inline_input", None)
        files = {jobspec.INCIDENT_FILE: placeholder.encode()}
        template, left = inline(sample_job(settings), files) if inline else (sample_job(settings), files)
        with_secret = bool(left)
        sample_name = template["metadata"]["name"]
        sample_id = template["metadata"]["labels"][jobspec.LABEL_INVESTIGATION]
        raw_template = json.dumps(template)
        ns = cmd["namespace"]
        http = aiohttp.ClientSession(headers={"Authorization": f"Bearer {cmd['token']}",
                                              "Content-Type": "application/json"})
        jobs_url = f"{cmd['url']}/apis/batch/v1/namespaces/{ns}/jobs"
        secrets_url = f"{cmd['url']}/api/v1/namespaces/{ns}/secrets"
        connection = await aio_pika.connect(settings.amqp.url)
        channel = await connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=settings.amqp.prefetch)
        results = await channel.get_exchange(RESULTS)
        queue = await channel.get_queue(INCIDENTS)
        user = str(connection.url.user or "guest")  # the broker checks user_id against the connection's user
        state.update(http=http, connection=connection)

        async def handle(message: Any) -> None:
            event = decode_incident(message.body, max_bytes=settings.bridge.max_body_bytes)
            ident = identify(event)
            job = (raw_template.replace(sample_name, ident.job_name).replace(sample_id, ident.investigation_id)
                   .replace(f'"{placeholder}"', json.dumps(message.body.decode())))
            async with http.post(jobs_url, data=job) as resp:
                created = await resp.read()
            if with_secret:
                uid = json.loads(created)["metadata"]["uid"]
                secret = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                          "metadata": {"name": f"{ident.job_name}-input", "namespace": ns,
                                       "labels": {jobspec.LABEL_MANAGED_BY: jobspec.MANAGED_BY,
                                                  jobspec.LABEL_INVESTIGATION: ident.investigation_id},
                                       "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job",
                                                            "name": ident.job_name, "uid": uid, "controller": False,
                                                            "blockOwnerDeletion": False}]},
                          "data": {jobspec.INCIDENT_FILE: base64.b64encode(message.body).decode()}}
                async with http.post(secrets_url, data=json.dumps(secret)) as resp:
                    await resp.read()
            body = json.dumps({"kind": "lifecycle", "state": "dispatched", "investigation_id": ident.investigation_id,
                               "incident_key": ident.incident_key, "job_name": ident.job_name}).encode()
            await results.publish(aio_pika.Message(body, message_id=f"{ident.investigation_id}:dispatched",
                                                   user_id=user, content_type="application/json",
                                                   delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                                  routing_key="lifecycle.dispatched")
            await message.ack()
            state["done"] += 1

        t0 = time.monotonic()
        await queue.consume(handle)
        return {"t_start": t0, "cpu_started_s": time.process_time(), "done_at_start": state["done"]}

    async def wait_done(cmd: dict) -> dict:
        deadline = time.monotonic() + cmd.get("within", 60)
        while state["done"] < cmd["n"] and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        return {"t_done": time.monotonic(), "done": state["done"], "cpu_s": time.process_time()}

    async def exit_(cmd: dict) -> dict:
        if "connection" in state:
            await state.pop("connection").close()
        if "http" in state:
            await state.pop("http").close()
        return {"ok": True}

    await serve({"start": start, "wait_done": wait_done, "exit": exit_})


# --------------------------------------------------------------------------------------------
# orchestrator
# --------------------------------------------------------------------------------------------


def dispatcher_env(amqp_url: str) -> dict[str, str]:
    """Settings overrides: this vhost, the bench namespace, admission caps that never throttle."""
    from dispatcher.plumbing.settings import load_settings

    env = {
        "AGENTJOBS_AMQP__URL": amqp_url,
        "AGENTJOBS_K8S__NAMESPACE": NAMESPACE,
        "AGENTJOBS_LOGGING__LEVEL": "warning",
        # No Vault here: per-investigation token minting is out of scope, as in the issue-4 tests.
        "AGENTJOBS_VAULT__AUTH_MODE": "none",
        "AGENTJOBS_ADMISSION__MAX_ACTIVE": str(HIGH_CAP),
    }
    for name in load_settings(None, {}).classes:
        env[f"AGENTJOBS_CLASSES__{name.upper()}__MAX_ACTIVE"] = str(HIGH_CAP)
    return env


def incidents(run: str, phase: str, n: int) -> tuple[list[bytes], list[str]]:
    """``n`` Alertmanager webhooks, each a distinct firing group (→ one Job each), and their Job names."""
    from schemas import decode_incident, identify
    from tests.support.payloads import am_alert, dumps, group

    bodies, names = [], []
    for i in range(n):
        alert = am_alert(starts_at="2026-11-26T02:00:00Z", alertname="BenchHighLatency",
                         instance=f"{phase}-{i}", service=f"svc-{i % 97}")
        body = dumps(group([alert], group_key=f'{{}}:{{bench="{run}", phase="{phase}", n="{i}"}}'))
        bodies.append(body)
        names.append(identify(decode_incident(body)).job_name)
    if len(set(names)) != n:
        raise RuntimeError("incident bodies do not map to distinct Jobs")
    return bodies, names


def as_sender(amqp_url: str, exchange: str) -> tuple[str, str | None]:
    """Incidents come from an operator identity (the dispatcher refuses anyone else); the raw
    baseline's queue is the broker administrator's."""
    from schemas.routing import INCIDENTS
    from tests.support.identities import url_for, user

    return (url_for(amqp_url, "operator"), user("operator")) if exchange == INCIDENTS else (amqp_url, None)


async def publish_all(amqp_url: str, bodies: list[bytes], *, exchange: str, routing_key: str) -> None:
    """Pipelined publish with confirms (persistent), as an alert bridge under a storm would."""
    import aio_pika

    amqp_url, user_id = as_sender(amqp_url, exchange)
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        target = await channel.get_exchange(exchange) if exchange else channel.default_exchange
        window = asyncio.Semaphore(1000)

        async def one(body: bytes) -> None:
            async with window:
                await target.publish(aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                                      user_id=user_id), routing_key, timeout=30)

        await asyncio.gather(*(one(b) for b in bodies))


async def publish_paced(amqp_url: str, bodies: list[bytes], rate: float, *, exchange_name: str,
                        routing_key: str) -> tuple[list[float], list[float]]:
    """Publish one body every 1/rate s, each awaiting its own confirm (no coordinated omission).

    Message ids are the indexes. Returns (monotonic time each publish started, confirm latency in s).
    """
    import aio_pika

    sent = [0.0] * len(bodies)
    confirm = [0.0] * len(bodies)
    amqp_url, user_id = as_sender(amqp_url, exchange_name)
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange(exchange_name) if exchange_name else channel.default_exchange

        async def one(i: int) -> None:
            message = aio_pika.Message(bodies[i], delivery_mode=aio_pika.DeliveryMode.PERSISTENT, message_id=str(i),
                                       user_id=user_id)
            sent[i] = time.monotonic()
            await exchange.publish(message, routing_key, timeout=10)
            confirm[i] = time.monotonic() - sent[i]

        tasks = []
        start = time.monotonic() + 0.05
        try:
            for i in range(len(bodies)):
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(i)))
            await asyncio.gather(*tasks)
        finally:  # interrupted: settle the in-flight publishes quietly before the connection closes
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return sent, confirm


async def broker_latency(amqp_url: str, bodies: list[bytes], rate: float, prefetch: int) -> list[float]:
    """publish (confirm) → delivery to a plain consumer of ``RAW_QUEUE``, in ms, at ``rate``/s."""
    import aio_pika

    received = [0.0] * len(bodies)
    done = asyncio.Event()
    count = 0

    async def on_message(message: Any) -> None:
        nonlocal count
        received[int(message.message_id)] = time.monotonic()
        await message.ack()
        count += 1
        if count >= len(bodies):
            done.set()

    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.get_queue(RAW_QUEUE)
        await queue.consume(on_message)
        sent, _ = await publish_paced(amqp_url, bodies, rate, exchange_name="", routing_key=RAW_QUEUE)
        async with asyncio.timeout(30):
            await done.wait()
    return [(r - s) * 1000 for r, s in zip(received, sent)]


async def raw_ceiling(amqp_url: str, n: int, prefetch: int, max_bytes: int) -> float:
    """messages/s of a plain consume + decode + ack loop over ``RAW_QUEUE`` (already filled)."""
    import aio_pika

    from schemas import decode_incident

    done = asyncio.Event()
    count = 0

    async def on_message(message: Any) -> None:
        nonlocal count
        decode_incident(message.body, max_bytes=max_bytes)
        await message.ack()
        count += 1
        if count >= n:
            done.set()

    t0 = time.monotonic()
    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.get_queue(RAW_QUEUE)
        await queue.consume(on_message)
        async with asyncio.timeout(120):
            await done.wait()
        elapsed = time.monotonic() - t0
    return n / elapsed


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        self.run = uuid.uuid4().hex[:6]
        self.emulator = Child("emulator", *(("--profile", str(Path(args.profile) / "emulator.prof"))
                                             if args.profile else ()))
        self.figures: dict[str, Any] = {"quick": self.quick}
        self.amqp_url = ""
        self.env: dict[str, str] = {}
        self.cluster: dict[str, Any] = {}

    def say(self, text: str) -> None:
        print(text, flush=True)

    async def fresh_cluster(self) -> None:
        self.cluster = await self.emulator.call("fresh")

    async def dispatcher(self, phase: str) -> Child:
        args: tuple[str, ...] = ()
        if self.args.profile:
            Path(self.args.profile).mkdir(parents=True, exist_ok=True)
            args = ("--profile", str(Path(self.args.profile) / f"dispatcher-{phase}.prof"))
        child = Child("dispatcher", *args)
        await child.start()
        return child

    async def start_dispatcher(self, child: Child) -> dict:
        return await child.call("start", env=self.env, url=self.cluster["url"], token=self.cluster["token"])

    # -- 1. latency at a steady rate ---------------------------------------------------------
    async def latency(self) -> None:
        from schemas.routing import INCIDENTS

        rate = 100.0
        seconds = 5.0 if self.quick else 20.0
        warmup = int(rate * 1.0)  # first second: connections, pools and caches warm up; not counted
        n = int(rate * seconds)
        bodies, names = incidents(self.run, "lat", warmup + n)
        await self.fresh_cluster()
        child = await self.dispatcher("latency")
        try:
            await self.start_dispatcher(child)
            sent, confirm = await publish_paced(self.amqp_url, bodies, rate, exchange_name=INCIDENTS,
                                                routing_key=ROUTING_KEY)
            done = await self.emulator.call("wait_jobs", timeout=70, n=len(bodies), within=60)
            status = await child.call("status")
        finally:
            await child.close()
        created = done["created"]
        missing = [name for name in names if name not in created]
        if missing:
            raise RuntimeError(f"latency phase: {len(missing)} incidents never got a Job")
        from dispatcher.plumbing.settings import load_settings

        broker_n = int(rate * (3.0 if self.quick else 10.0))
        prefetch = load_settings(None, self.env).amqp.prefetch
        broker = await broker_latency(self.amqp_url, bodies[:broker_n], rate, prefetch)
        lat = [(created[names[i]] - sent[i]) * 1000 for i in range(warmup, len(bodies))]
        if self.args.dump:
            rows = [f"{i},{sent[i] - sent[warmup]:.4f},{(created[names[i]] - sent[i]) * 1000:.3f},"
                    f"{confirm[i] * 1000:.3f}\n" for i in range(warmup, len(bodies))]
            Path(self.args.dump).write_text("i,sent_s,latency_ms,confirm_ms\n" + "".join(rows))
        conf = [c * 1000 for c in confirm[warmup:]]
        achieved = (n - 1) / (sent[-1] - sent[warmup])
        window = (sent[warmup], max(created[name] for name in names))
        gc_in = {who: [p for p in doc["gc_pauses"] if window[0] <= p[0] <= window[1]]
                 for who, doc in (("dispatcher", status), ("emulator", done))}
        slow = [i for i in range(warmup, len(bodies)) if (created[names[i]] - sent[i]) * 1000 >= pct(lat, 99)]

        def overlaps_gc(i: int) -> bool:
            return any(sent[i] - 0.001 <= start + took and start <= created[names[i]]
                       for pauses in gc_in.values() for start, took, _ in pauses)

        slow_during_gc = sum(1 for i in slow if overlaps_gc(i))
        p50, p99 = pct(lat, 50), pct(lat, 99)
        self.figures.update(
            latency_incidents=n, latency_rate_per_s=round(achieved, 1), dispatch_p50_ms=round(p50, 2),
            dispatch_p99_ms=round(p99, 2), p99_ms=round(p99, 2), dispatch_max_ms=round(max(lat), 2),
            publish_confirm_p50_ms=round(pct(conf, 50), 2), publish_confirm_p99_ms=round(pct(conf, 99), 2),
            broker_delivery_p50_ms=round(pct(broker, 50), 2), broker_delivery_p99_ms=round(pct(broker, 99), 2),
            dispatcher_gc_pause_max_ms=round(max((t for _, t, _ in gc_in["dispatcher"]), default=0.0) * 1000, 1),
            dispatcher_gc_pauses=len(gc_in["dispatcher"]),
        )
        self.say(f"\n1. Dispatch latency, publish → Job create accepted, {n} new incidents at {achieved:.1f}/s "
                 f"(after {warmup} warm-up incidents; {status['gc_objects']} objects in the dispatcher heap)")
        self.say(f"   p50 {p50:7.2f} ms   p90 {pct(lat, 90):7.2f} ms   p99 {p99:7.2f} ms   max {max(lat):7.2f} ms"
                 f"   [target p99 < {TARGET_P99_MS:.0f} ms: {verdict(p99 < TARGET_P99_MS)}]")
        self.say(f"   (publish → broker confirm alone: p50 {pct(conf, 50):.2f} ms, p99 {pct(conf, 99):.2f} ms; "
                 f"dispatcher RSS after the phase {status['rss_mb']:.1f} MB)")
        self.say(f"   context, broker alone (same queue type, a plain consumer, {broker_n} at {rate:.0f}/s): publish → "
                 f"delivery p50 {pct(broker, 50):.2f} ms, p99 {pct(broker, 99):.2f} ms, max {max(broker):.2f} ms")
        for who, pauses in gc_in.items():
            longest = max((took for _, took, _ in pauses), default=0.0) * 1000
            gens = sorted({g for _, _, g in pauses})
            self.say(f"   {who} GC pauses ≥ 2 ms during the phase: {len(pauses)}, longest {longest:.1f} ms"
                     f" (generations {gens or '-'})")
        self.say(f"   incidents at or above p99 whose dispatch overlapped a GC pause: {slow_during_gc} of {len(slow)}")

    # -- 2 + 3. sustained throughput vs the raw ceiling --------------------------------------
    async def throughput(self) -> None:
        from dispatcher.plumbing.settings import load_settings
        from schemas.routing import INCIDENTS

        n = 1000 if self.quick else 5000
        reps = 1 if self.quick else 3  # ours and the baseline alternately; the median of each
        bodies, _ = incidents(self.run, "tput", n)
        settings = load_settings(None, self.env)
        runs, sames = [], []
        for _ in range(reps):
            runs.append(await self.sustained(bodies))
            sames.append(await self.same_work(bodies))  # the same incidents through the same-work consumer
        run = sorted(runs, key=lambda r: r["cpu_ms"]["dispatcher"])[len(runs) // 2]
        same = sorted(sames, key=lambda r: r["cpu_ms"])[len(sames) // 2]
        cpu_ms, rate, elapsed, create_rate = run["cpu_ms"], run["rate"], run["elapsed"], run["create_rate"]
        startup_cpu_ms = run["startup_cpu_ms"]
        spread = {"dispatcher": [round(r["cpu_ms"]["dispatcher"], 3) for r in runs],
                  "same_work": [round(r["cpu_ms"], 3) for r in sames]}

        storm = await self.storm(*((100, 1000) if self.quick else (500, 5000)))  # 2b, a fresh dispatcher process
        few = await self.storm(6, 600)  # 2c: the storm — hundreds of alerts in a few groups

        # The same bodies through a plain consume + decode + ack loop, same prefetch and queue type.
        raws = []
        for _ in range(3):  # a run of the raw loop is short (about a second): take the median of three
            await publish_all(self.amqp_url, bodies, exchange="", routing_key=RAW_QUEUE)
            raws.append(await raw_ceiling(self.amqp_url, n, settings.amqp.prefetch, settings.bridge.max_body_bytes))
        raw = sorted(raws)[1]
        ratio = rate / raw
        storm_ratio = storm["rate"] / raw
        ours = cpu_ms["dispatcher"]
        self.figures.update(
            dispatcher_cpu_ms_per_incident=round(ours, 3), same_work_cpu_ms_per_incident=round(same["cpu_ms"], 3),
            same_work_ratio=round(same["cpu_ms"] / ours, 3) if ours else None,
            same_work_incidents_per_s=round(same["rate"], 1), dispatcher_startup_cpu_ms=round(startup_cpu_ms, 1),
            cpu_ms_runs=spread,
            throughput_incidents=n, dispatched_per_s=round(rate, 1), job_creates_per_s=round(create_rate, 1),
            raw_consume_per_s=round(raw, 1), ratio_vs_raw=round(ratio, 3),
            **{f"cpu_{k}_ms_per_incident": round(v, 3) for k, v in cpu_ms.items()},
            storm_notifications=storm["n"], storm_groups=storm["groups"], storm_seed=STORM_SEED,
            storm_incidents_per_s=round(storm["rate"], 1), storm_jobs=storm["jobs"],
            storm_jobs_match_groups=storm["jobs"] == storm["groups"], storm_ratio_vs_raw=round(storm_ratio, 3),
            storm_outcomes={k: int(v) for k, v in sorted(storm["by_outcome"].items())},
            few_groups_storm_notifications=few["n"], few_groups_storm_groups=few["groups"],
            few_groups_storm_jobs=few["jobs"], few_groups_storm_drain_s=round(few["elapsed"], 3),
            few_groups_storm_raw_drain_s=round(few["n"] / raw, 3),
            few_groups_storm_ratio_vs_raw=round((few["n"] / raw) / few["elapsed"], 3),
        )
        self.say(f"\n2. Sustained dispatch, {n} distinct incidents pre-published (prefetch {settings.amqp.prefetch})")
        self.say(f"   {rate:8.1f} incidents/s dispatched (service start → last `dispatched` confirmed and counted,"
                 f" {elapsed:.2f} s); Job creates {create_rate:.1f}/s first → last")
        self.say("   CPU per incident: " + ", ".join(f"{k} {v:.2f} ms" for k, v in cpu_ms.items())
                 + f" (of {os.cpu_count()} cores, all shared; the dispatcher's from the end of its start-up, which"
                 f" took {startup_cpu_ms:.0f} CPU-ms; median of {len(runs)} runs: {spread['dispatcher']})")
        self.say(f"   same-work baseline (consume, decode, the same API writes as raw JSON over one aiohttp session, one "
                 f"confirmed publish, ack; same incidents, fresh cluster): {same['cpu_ms']:.2f} CPU-ms per incident, "
                 f"{same['rate']:.0f}/s (median of {spread['same_work']}) → ratio baseline/ours {same['cpu_ms'] / ours:.2f}"
                 f"   [targets: ours ≤ {TARGET_CPU_MS:.1f} ms {verdict(ours <= TARGET_CPU_MS)}, "
                 f"ratio ≥ {TARGET_SAME_WORK:.1f} {verdict(same['cpu_ms'] / ours >= TARGET_SAME_WORK)}]")
        outcomes = ", ".join(f"{k} {int(v)}" for k, v in sorted(storm["by_outcome"].items()))
        self.say(f"\n2b. Alert storm (context: realistic alert-storm mix, not the target), {storm['n']} notifications "
                 f"over {storm['groups']} groups pre-published (re-sends, joining alerts, CloudEvent-wrapped, "
                 f"shuffled; seed {STORM_SEED})")
        self.say(f"   {storm['rate']:8.1f} incidents/s handled (service start → incidents_consumed_total, all outcomes,"
                 f" reaches {storm['n']}, {storm['elapsed']:.2f} s); ratio handled/raw {storm_ratio:.3f}"
                 f" (raw ceiling of phase 3)")
        self.say(f"   Jobs created {storm['jobs']} for {storm['groups']} groups "
                 f"[check Jobs == groups: {'OK' if storm['jobs'] == storm['groups'] else 'WRONG'}]; outcomes: {outcomes}")
        self.say(f"\n2c. Alert storm in a few groups: {few['n']} notifications over {few['groups']} groups "
                 f"pre-published → {few['jobs']} Jobs [check: {'OK' if few['jobs'] == few['groups'] else 'WRONG'}]; "
                 f"drained (every delivery handled) in {few['elapsed']:.2f} s from service start; the raw ceiling "
                 f"of phase 3 would take {few['n'] / raw:.2f} s → ratio {(few['n'] / raw) / few['elapsed']:.3f}")
        self.say(f"\n3. Raw ceiling: aio-pika consume + decode + ack, same {n} bodies, quorum queue, "
                 f"prefetch {settings.amqp.prefetch}")
        runs = ", ".join(f"{r:.0f}" for r in raws)
        self.say(f"   {raw:8.1f} messages/s (median of {runs})   ratio dispatched/raw {ratio:.3f}"
                 f"   [target ≥ {TARGET_RATIO:.2f}: {verdict(ratio >= TARGET_RATIO)}]"
                 f"   (dispatcher RSS after {n}: {run['rss_mb']:.1f} MB)")

    async def sustained(self, bodies: list[bytes]) -> dict[str, Any]:
        """One fresh dispatcher over the pre-published ``bodies``: rate, and CPU per incident of the
        dispatcher (its own clock, after start-up), the emulator and the broker (/proc)."""
        from schemas.routing import INCIDENTS

        n = len(bodies)
        await self.fresh_cluster()
        child = await self.dispatcher("throughput")
        pids = {"dispatcher": [child.pid], "emulator": [self.emulator.pid], "broker": broker_pids()}
        try:
            await publish_all(self.amqp_url, bodies, exchange=INCIDENTS, routing_key=ROUTING_KEY)
            cpu_before = cpu_snapshot(pids)
            started = await self.start_dispatcher(child)
            done = await child.call("wait_dispatched", timeout=310, n=n, within=300)
            cpu_after = cpu_snapshot(pids)
            jobs = await self.emulator.call("wait_jobs", timeout=20, n=n, within=10)
            status = await child.call("status")
        finally:
            await child.close()
        if done["dispatched"] < n or jobs["count"] < n:
            raise RuntimeError(f"throughput phase: only {done['dispatched']} of {n} dispatched")
        cpu_ms = {k: (cpu_after[k] - cpu_before[k]) * 1000 / n for k in pids}
        # the dispatcher's own clock from the end of its start-up (see dispatcher_role's start)
        cpu_ms["dispatcher"] = ((done["cpu_s"] - started["cpu_started_s"]) * 1000
                                / max(1, n - started["dispatched_at_start"]))
        elapsed = done["t_done"] - started["t_start"]
        creates = sorted(jobs["created"].values())
        return {"cpu_ms": cpu_ms, "rate": n / elapsed, "elapsed": elapsed,
                "create_rate": (n - 1) / (creates[-1] - creates[0]), "startup_cpu_ms": started["startup_cpu_s"] * 1000,
                "rss_mb": status["rss_mb"]}

    async def same_work(self, bodies: list[bytes]) -> dict[str, float]:
        """Process CPU per incident (and rate) of ``same_work_role`` over ``bodies``, measured like phase 2's."""
        from schemas.routing import INCIDENTS

        n = len(bodies)
        await self.fresh_cluster()
        child = Child("same-work")
        await child.start()
        try:
            await publish_all(self.amqp_url, bodies, exchange=INCIDENTS, routing_key=ROUTING_KEY)
            before = proc_cpu_s(child.pid)
            started = await child.call("start", env=self.env, url=self.cluster["url"], token=self.cluster["token"],
                                       namespace=self.cluster["namespace"])
            done = await child.call("wait_done", timeout=310, n=n, within=300)
            after = proc_cpu_s(child.pid)
            jobs = await self.emulator.call("wait_jobs", timeout=20, n=n, within=10, times=False)
        finally:
            await child.close()
        if done["done"] < n or jobs["count"] < n:
            raise RuntimeError(f"same-work baseline: {done['done']} of {n} done, {jobs['count']} Jobs created")
        del before, after  # the process's own clock, from consuming on (below), like the dispatcher's
        cpu_ms = (done["cpu_s"] - started["cpu_started_s"]) * 1000 / max(1, n - started["done_at_start"])
        return {"cpu_ms": cpu_ms, "rate": n / (done["t_done"] - started["t_start"])}

    # -- 2b. a realistic alert storm, same set-up as phase 2 --------------------------------
    async def storm(self, groups: int, n: int) -> dict[str, Any]:
        """Pre-published ``storm()`` bodies; incidents/s until every delivery is handled, and Jobs made."""
        from schemas.routing import INCIDENTS
        from schemas import decode_incident, identify
        from tests.support.payloads import storm as storm_bodies

        bodies = storm_bodies(groups=groups, notifications=n, seed=STORM_SEED)
        if len({identify(decode_incident(b)).job_name for b in bodies}) != groups:
            raise RuntimeError("storm bodies do not map to one Job per group")
        await self.fresh_cluster()
        child = await self.dispatcher("storm")
        try:
            await publish_all(self.amqp_url, bodies, exchange=INCIDENTS, routing_key=ROUTING_KEY)
            started = await self.start_dispatcher(child)
            done = await child.call("wait_consumed", timeout=310, n=n, within=300)
            # Every Job create precedes its delivery's count; wait briefly in case of fewer.
            jobs = await self.emulator.call("wait_jobs", timeout=20, n=groups, within=5, times=False)
        finally:
            await child.close()
        if done["consumed"] < n:
            raise RuntimeError(f"storm phase: only {done['consumed']:.0f} of {n} deliveries handled")
        elapsed = done["t_done"] - started["t_start"]
        return {"n": n, "groups": groups, "rate": n / elapsed, "elapsed": elapsed, "jobs": jobs["count"],
                "by_outcome": done["by_outcome"]}

    # -- 4. cost growth: RSS and p99 at 1k, 10k and 50k active investigations ------------------
    async def memory(self) -> None:
        """Active investigations piled up in one dispatcher (admission caps never throttle); at each
        level its RSS and the p99 of a paced 100/s probe of new incidents dispatched beside them."""
        from schemas.routing import INCIDENTS

        levels = (1000, 2000) if self.quick else (1000, 10_000) + ((50_000,) if self.args.rss_50k else ())
        probe_n = 100 if self.quick else 300  # per level, at 100/s; they stay active too
        bodies, _ = incidents(self.run, "rss", levels[-1])
        await self.fresh_cluster()
        child = await self.dispatcher("rss")
        points: list[dict[str, Any]] = []
        try:
            await self.start_dispatcher(child)
            before = await child.call("status", settle=0.5)
            published = probes = 0
            for level in levels:
                batch = bodies[published:level - probes]
                await publish_all(self.amqp_url, batch, exchange=INCIDENTS, routing_key=ROUTING_KEY)
                published += len(batch)
                await child.call("wait_dispatched", timeout=610, n=published + probes, within=600)
                status = await child.call("status", settle=0.5)
                probe, names = incidents(self.run, f"probe{level}", probe_n)
                sent, _ = await publish_paced(self.amqp_url, probe, 100.0, exchange_name=INCIDENTS,
                                              routing_key=ROUTING_KEY)
                done = await self.emulator.call("wait_jobs", timeout=130, n=published + probes + probe_n,
                                                within=120)
                probes += probe_n
                lat = [(done["created"][names[i]] - sent[i]) * 1000 for i in range(len(names))
                       if names[i] in done["created"]]
                points.append({"active": status["active"], "rss_mb": status["rss_mb"],
                               "p99_ms": pct(lat, 99), "p50_ms": pct(lat, 50),
                               "gc_objects": status["gc_objects"]})
        finally:
            await child.close()
        first, last = points[0], points[-1]
        marginal_kb = (last["rss_mb"] - first["rss_mb"]) * 1024 / max(1, last["active"] - first["active"])
        ten = next((p for p in points if p["active"] >= 10_000), None)
        at_10k = ten["rss_mb"] if ten else last["rss_mb"] + marginal_kb * (10_000 - last["active"]) / 1024
        self.figures.update(
            rss_baseline_mb=round(before["rss_mb"], 1), rss_active_mb=round(last["rss_mb"], 1),
            rss_active_count=last["active"], rss_10k_active_mb=round(at_10k, 1), rss_mb=round(at_10k, 1),
            rss_10k_extrapolated=ten is None, rss_marginal_per_investigation_kb=round(marginal_kb, 2),
            growth=[{k: round(v, 2) if isinstance(v, float) else v for k, v in p.items()} for p in points],
        )
        self.say(f"\n4. Cost growth: one dispatcher process (DispatcherService + KubernetesRuntime) with active "
                 f"investigations piling up; at each level its RSS and a {probe_n}-incident probe at 100/s")
        self.say(f"   baseline (started, idle) {before['rss_mb']:7.1f} MB")
        for p in points:
            self.say(f"   {p['active']:>6} active: RSS {p['rss_mb']:7.1f} MB, probe p50 {p['p50_ms']:6.2f} ms "
                     f"p99 {p['p99_ms']:6.2f} ms, {p['gc_objects']} objects in the heap")
        for a, b in zip(points, points[1:], strict=False):
            kb = (b["rss_mb"] - a["rss_mb"]) * 1024 / max(1, b["active"] - a["active"])
            self.say(f"   {a['active']} → {b['active']}: {kb:.2f} KB per investigation")
        label = "measured" if ten else "extrapolated with the slope (--quick)"
        self.say(f"   at 10,000 active: {at_10k:7.1f} MB ({label})"
                 f"   [target < {TARGET_RSS_MB:.0f} MB: {verdict(at_10k < TARGET_RSS_MB)}]")

    async def main(self) -> None:
        import aio_pika

        from dispatcher.plumbing.settings import load_settings
        from dispatcher.plumbing.topology import declare, dispatcher_topology
        from tests.support.identities import url_for
        from tests.support.services import RabbitMQ, temporary_vhost

        # SIGTERM cleans up like Ctrl-C: cancellation runs every `finally` (children, vhost).
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)

        t_begin = time.monotonic()
        rabbitmq = RabbitMQ.from_env()
        await rabbitmq.check()
        async with rabbitmq.management() as mgmt, temporary_vhost(mgmt, hint="bench-dispatch") as vhost:
            self.amqp_url = rabbitmq.vhost_url(vhost.name)
            self.env = dispatcher_env(url_for(self.amqp_url, "dispatcher"))
            settings = load_settings(None, self.env)
            topology = dispatcher_topology(settings.amqp)
            connection = await aio_pika.connect(self.amqp_url)
            async with connection:
                channel = await connection.channel()
                await declare(channel, topology)
                incident_queue = next(q for q in topology.queues if q.name == "agentjobs.incidents")
                await channel.declare_queue(RAW_QUEUE, durable=True, arguments=dict(incident_queue.arguments))
            self.say(f"agentjobs dispatch benchmark{' (--quick)' if self.quick else ''}: RabbitMQ vhost "
                     f"{vhost.name}, Kubernetes API emulator in its own process (Job controller off), "
                     f"one fresh dispatcher process per phase")
            if self.args.profile:
                Path(self.args.profile).mkdir(parents=True, exist_ok=True)
            try:
                await self.emulator.start()
                await self.latency()
                await self.throughput()
                await self.memory()
            finally:
                await self.emulator.close()
        f = self.figures
        f["targets"] = {
            "p99_under_25_ms": f["dispatch_p99_ms"] < TARGET_P99_MS,
            "ratio_at_least_0_25": f["ratio_vs_raw"] >= TARGET_RATIO,
            "rss_under_150_mb": f["rss_10k_active_mb"] < TARGET_RSS_MB,
        }
        f["duration_s"] = round(time.monotonic() - t_begin, 1)
        self.say(f"\nTargets: p99 {verdict(f['targets']['p99_under_25_ms'])}, throughput ratio "
                 f"{verdict(f['targets']['ratio_at_least_0_25'])}, RSS {verdict(f['targets']['rss_under_150_mb'])}"
                 f"  (total {f['duration_s']} s)")
        print(json.dumps(f), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter run (about 30 s)")
    parser.add_argument("--profile", metavar="DIR", help="write a cProfile of each dispatcher process to DIR")
    parser.add_argument("--dump", metavar="CSV", help="write per-incident latencies of phase 1 to CSV")
    parser.add_argument("--rss-50k", action="store_true", help="phase 4 also at 50,000 active (a few minutes more)")
    parser.add_argument("--role", choices=("emulator", "dispatcher", "same-work"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "emulator":
        asyncio.run(emulator_role(args.profile))
        return 0
    if args.role == "same-work":
        asyncio.run(same_work_role())
        return 0
    if args.role == "dispatcher":
        from dispatcher.plumbing import tasks
        tasks.run(dispatcher_role(args.profile))  # the event loop `agentjobs dispatcher` runs on
        return 0
    quiet_logging()
    try:
        asyncio.run(Bench(args).main())
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; child processes stopped and the vhost deleted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
