"""``agentjobs up``: the whole product on one machine, in one process tree.

Starts an OpenBao dev server (bundled ``bao``) and configures it with
``vault bootstrap``, then the dispatcher with the embedded ``LocalRuntime``
(each investigation a local process running ``agentjobs agent``), its
metrics endpoints and the Alertmanager webhook bridge. RabbitMQ comes from settings (default: local); PostgreSQL
is used when configured. Ctrl-C / SIGTERM drains the dispatcher, stops running
investigations, revokes every credential issued, and stops OpenBao.
``--demo`` publishes a realistic alert storm and prints what happened to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import aio_pika
import hvac
import msgspec

from schemas import Finding, LifecycleEvent, decode
from schemas.errors import DecodeError

from . import vault_layout
from .bridge import BridgeService
from .embedded_vault import EmbeddedOpenBao, EmbeddedVaultError
from .logs import get_logger
from .runtime_local import LocalRuntime
from .service import DispatcherService
from .settings import Settings
from .topology import INCIDENTS, RESULTS, declare, dispatcher_topology
from .vault_bootstrap import BootstrapError, bootstrap

log = get_logger("agentjobs.up")
NO_RABBITMQ = """\
error: cannot reach RabbitMQ at {url} ({error}).
agentjobs needs a RabbitMQ broker. Get one with either:
  sudo apt-get install rabbitmq-server && sudo rabbitmq-server -detached
  docker run -d -p 5672:5672 -p 15672:15672 rabbitmq:3-management
or point agentjobs at yours: AGENTJOBS_AMQP__URL=amqp://user:password@host:5672/vhost"""


def _agent_command() -> list[str]:
    # Local Jobs get a scrubbed environment without PATH: name the executable absolutely.
    script = Path(sys.executable).with_name("agentjobs")
    return [str(script), "agent"] if script.exists() else [sys.executable, "-m", "dispatcher.cli", "agent"]


def embedded_settings(settings: Settings, *, vault_token: str) -> Settings:
    """Settings for the embedded default: local runtime, our OpenBao, our agent command (pure)."""
    return msgspec.structs.replace(
        settings,
        runtime=msgspec.structs.replace(settings.runtime, kind="local"),
        vault=msgspec.structs.replace(settings.vault, token=vault_token, token_file="",
                                      auth_mode="per-investigation"),
        k8s=msgspec.structs.replace(settings.k8s, agent_command=_agent_command()),
    )


async def _rabbitmq_reachable(url: str) -> str | None:
    try:
        connection = await aio_pika.connect(url, timeout=5)
    except Exception as exc:  # any failure means "not usable"; the message names it
        return f"{type(exc).__name__}: {exc}"[:200]
    await connection.close()
    return None


class DemoWatch:
    """Prints investigations as their lifecycle events and findings arrive on agentjobs.results."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo = echo
        self.dispatched: set[str] = set()
        self.ended: dict[str, str] = {}
        self.findings: dict[str, Finding] = {}
        self.changed = asyncio.Event()

    async def on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        try:
            body = decode(message.body)
        except DecodeError:
            return
        key = message.routing_key or ""
        if isinstance(body, LifecycleEvent):
            if body.state.value == "dispatched" and body.investigation_id not in self.dispatched:
                self.dispatched.add(body.investigation_id)
                self.echo(f"  dispatched  {body.job_name}  (phase {body.phase.value if body.phase else '-'})")
            elif body.state.terminal and body.investigation_id not in self.ended:
                self.ended[body.investigation_id] = body.state.value
                why = f" ({body.reason.value})" if body.reason else ""
                self.echo(f"  {body.state.value:<10}  {body.job_name}{why}")
        elif isinstance(body, Finding) and body.reasoner != "dispatcher":
            self.findings[body.investigation_id] = body
            self.echo(f"  finding     {key}: {body.summary[:90]} (confidence {body.confidence:.2f})")
        self.changed.set()

    def done(self, expected: int) -> bool:
        return len(self.ended) >= expected and self.ended.keys() >= self.dispatched


async def run_up(settings: Settings, *, demo: bool, exit_after_demo: bool, echo: Callable[[str], None]) -> int:
    """Run everything until stopped; returns the process exit code."""
    problem = await _rabbitmq_reachable(settings.amqp.url)
    if problem is not None:
        from .redaction import mask_text

        echo(NO_RABBITMQ.format(url=mask_text(settings.amqp.url), error=problem))
        return 2
    state = Path(settings.runtime.state_dir)
    bao = EmbeddedOpenBao(state / "openbao", settings.vault.addr)
    try:
        await bao.start()
    except EmbeddedVaultError as exc:
        echo(f"error: {exc}")
        return 2
    service: DispatcherService | None = None
    bridge: BridgeService | None = None
    dispatcher_token = ""
    try:
        root = hvac.Client(url=bao.addr, token=bao.root_token)
        try:
            report = await asyncio.to_thread(bootstrap, root, settings)
        except BootstrapError as exc:
            echo(f"error: vault bootstrap failed: {exc}")
            return 2
        echo(f"OpenBao {bao.addr}: {len(report.changes)} objects configured" + "".join(f"; {n}" for n in report.notes))
        created = await asyncio.to_thread(root.auth.token.create, policies=[vault_layout.DISPATCHER_POLICY],
                                          ttl="24h", display_name="agentjobs-up-dispatcher")
        dispatcher_token = created["auth"]["client_token"]
        embedded = embedded_settings(settings, vault_token=dispatcher_token)
        service = DispatcherService(embedded, LocalRuntime(state / "local"))
        await service.start()
        bridge = BridgeService(embedded)
        bridge_port = await bridge.start()
        echo(f"bridge: Alertmanager webhook at http://{settings.bridge.host}:{bridge_port}/alerts")
        echo(f"dispatcher: consuming {INCIDENTS} on {settings.amqp.url.rpartition('@')[2]}, local runtime in "
             f"{state / 'local'}, metrics on http://{settings.metrics.host}:{settings.metrics.port}/metrics")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if demo:
            await _demo(embedded, echo, stop, exit_after_demo)
        if not stop.is_set():
            echo("running — Ctrl-C stops everything and revokes every credential")
            waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(service.crashed.wait())]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for w in waiters:
                w.cancel()
        return 1 if service.crashed.is_set() else 0
    finally:
        echo("stopping: draining the dispatcher, stopping investigations, revoking credentials")
        if bridge is not None:
            await bridge.stop()
        if service is not None:
            await service.stop()
        if dispatcher_token:
            await bao.revoke_tree(dispatcher_token)  # every agent token is its child
            # Token revocation drops leases asynchronously; a dev server stopped now would leave
            # their database and broker users behind. Sweep them synchronously first.
            await bao.revoke_leases((vault_layout.DATABASE_MOUNT, vault_layout.RABBITMQ_MOUNT))
        bao.stop_now()
        echo("stopped")


async def _demo(settings: Settings, echo: Callable[[str], None], stop: asyncio.Event, exit_after: bool) -> None:
    from .demo import storm_bodies

    bodies, groups = storm_bodies()
    watch = DemoWatch(echo)
    connection = await aio_pika.connect(settings.amqp.url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await declare(channel, dispatcher_topology(settings.amqp))
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(RESULTS, "#")
        await queue.consume(watch.on_message, no_ack=True)
        exchange = await channel.get_exchange(INCIDENTS)
        echo(f"demo: publishing an alert storm: {len(bodies)} Alertmanager notifications in {groups} groups")
        await asyncio.gather(*(exchange.publish(aio_pika.Message(b), "alertmanager.demo", timeout=30) for b in bodies))
        echo("demo: published (confirmed); investigations:")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(180):
                while not (watch.done(groups) or stop.is_set()):
                    watch.changed.clear()
                    await watch.changed.wait()
        outcomes: dict[str, int] = {}
        for state in watch.ended.values():
            outcomes[state] = outcomes.get(state, 0) + 1
        echo(f"demo: {len(watch.dispatched)} investigations for {len(bodies)} notifications; outcomes {outcomes}; "
             f"{len(watch.findings)} findings published to exchange {RESULTS} (routing keys finding.<severity>.<domain>)")
    if exit_after:
        stop.set()
