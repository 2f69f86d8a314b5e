"""``agentjobs up``: the whole product on one machine, in one process tree.

Starts an OpenBao dev server (bundled ``bao``) and configures it with
``vault bootstrap``, then the dispatcher with the embedded ``LocalRuntime``
(each investigation a local process running ``agentjobs agent``), its
metrics endpoints, the trust consumer and the Alertmanager webhook bridge.
RabbitMQ comes from settings (default: local); PostgreSQL is used when configured. Ctrl-C / SIGTERM drains the dispatcher, stops running
investigations, revokes every credential issued, and stops OpenBao.
``--demo`` publishes a realistic alert storm and prints what happened to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlsplit

import aio_pika
import aiohttp
import hvac
import msgspec

from schemas import decode, utcnow
from schemas.errors import DecodeError

from dispatcher.cli import preflight
from dispatcher.plumbing.amqp import broker_user

from schemas import vault_paths as vault_layout
from dispatcher.cli.board import Board
from dispatcher.cli.demo import DemoProblems, with_dsn_parts
from dispatcher.bridge.webhook import BridgeService, StartRefused
from dispatcher.credentials.embedded_openbao import EmbeddedOpenBao, EmbeddedVaultError
from schemas.logs import get_logger
from schemas.redaction import mask_text
from dispatcher.jobs.local import LocalRuntime
from dispatcher.intake.service import DispatcherService
from dispatcher.plumbing import identities
from dispatcher.plumbing.settings import ActionsSettings, IdentitySettings, ScopeActions, Settings
from dispatcher.plumbing.signals import cancel_on, stop_event
from schemas.routing import FEEDBACK, INCIDENTS, PHASES, RESULTS
from dispatcher.trust.service import TrustService
from dispatcher.credentials.bootstrap import BootstrapError, bootstrap

log = get_logger("agentjobs.up")


def _agent_command() -> list[str]:
    # Local Jobs get a scrubbed environment without PATH: name the executable absolutely.
    script = Path(sys.executable).with_name("agentjobs")
    return [str(script), "agent"] if script.exists() else [sys.executable, "-m", "dispatcher.cli.main", "agent"]


def embedded_settings(settings: Settings, *, vault_token: str) -> Settings:
    """Settings for the embedded default: local runtime, our OpenBao, our agent command, and where
    the agents may act (``embedded_actions``) (pure)."""
    return msgspec.structs.replace(
        settings,
        runtime=msgspec.structs.replace(settings.runtime, kind="local"),
        vault=msgspec.structs.replace(settings.vault, token=vault_token, token_file="",
                                      auth_mode="per-investigation"),
        k8s=msgspec.structs.replace(settings.k8s, agent_command=_agent_command()),
        actions=embedded_actions(settings),
    )


def embedded_actions(settings: Settings) -> ActionsSettings:
    """The allow-lists of the embedded default (pure): with ``[actions.scopes]`` left as shipped (every
    list empty: nothing allowed anywhere), the agents may act on the database they are given
    (``postgres.dsn``'s: by default this machine's server), so that a scope an operator pins to a phase
    that may act does act (the phases, the limits and the kill switch still decide whether and how
    often). Configured allow-lists are kept as they are."""
    actions = settings.actions
    database = unquote(urlsplit(settings.postgres.dsn).path.lstrip("/")) if "://" in settings.postgres.dsn else ""
    if actions.scopes != {"default": ScopeActions()} or not database:
        return actions
    default = ScopeActions(databases=[database])
    return msgspec.structs.replace(actions, scopes={"default": default})


def as_component(settings: Settings, url: str) -> Settings:
    """``settings`` connecting to the broker as one component identity (pure)."""
    return msgspec.structs.replace(settings, amqp=msgspec.structs.replace(settings.amqp, url=url))


def shared_identities(ids: IdentitySettings, user: str) -> IdentitySettings:
    """Every component identity collapsed onto one broker user: the reduced mode (pure)."""
    return msgspec.structs.replace(ids, bridge=user, dispatcher=user, trust=user, operators=[user], admins=[user])


async def component_identities(settings: Settings, state: Path, *, managed: bool) -> tuple[Settings, dict[str, str], str]:
    """Each component's broker URL, the settings to run with, and the line to print.

    With the management API: the least-privilege identities of ``dispatcher/plumbing/identities.py``
    are created (or updated) on the broker, and their credentials stored 0600 in the state dir
    (passwords kept across runs), where ``phase pin``, ``publish``, ``tail`` and ``status`` find
    them. Without it (reduced mode) everything runs as ``amqp.url``'s user and the sender checks
    cannot tell the components apart — said so, never hidden.
    """
    user = broker_user(settings.amqp.url)
    if not managed:
        identities.credentials_path(state).unlink(missing_ok=True)  # never point ops at stale users
        ids = shared_identities(settings.identities, user)
        urls = {component: settings.amqp.url for component in identities.COMPONENTS}
        return (msgspec.structs.replace(settings, identities=ids), urls,
                f"broker identities: reduced mode, every component and operator connects as {user!r} "
                "(enable the management API for one least-privilege user each)")
    base, auth = preflight.management_api(settings)
    creds = await identities.ensure_identities(settings.amqp.url, base, auth, settings.identities,
                                               identities.load_credentials(state))
    path = identities.store_credentials(state, creds)
    names = ", ".join(f"{c}={v['user']}" for c, v in creds.items())
    urls = {c: creds[c]["url"] if c in creds else settings.amqp.url for c in identities.COMPONENTS}
    return settings, urls, \
        f"broker identities: {names} (operator/admin credentials in {path}, mode 0600)"


class ResultsWatch:
    """Feeds a ``Board`` from copies of ``agentjobs.results`` and ``agentjobs.phases`` (exclusive queue)."""

    def __init__(self, board: Board, echo: Callable[[str], None] | None) -> None:
        self.board = board
        self.echo = echo  # None while a live table shows the board instead
        self.changed = asyncio.Event()
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None

    async def start(self, settings: Settings) -> None:
        self._connection = await aio_pika.connect_robust(settings.amqp.url)  # an operator: declares nothing
        channel = await self._connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(RESULTS, "#")
        await queue.bind(PHASES, "#")
        await queue.consume(self._on_message, no_ack=True)

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        try:
            body = decode(message.body)
        except DecodeError:
            return
        line = self.board.observe(body, message.routing_key or "")
        if line and self.echo is not None:
            self.echo(line)
        self.changed.set()

    async def stop(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._connection.close(), timeout=5)


def _quiet_if_broken(echo: Callable[[str], None]) -> Callable[[str], None]:
    def safe(line: str) -> None:
        with contextlib.suppress(OSError):  # BrokenPipeError and friends
            echo(line)

    return safe


async def _show_live(board: Board, stop: asyncio.Event) -> None:
    """Redraw the board twice a second in place until ``stop`` (terminals only)."""
    from rich.live import Live

    with Live(board.table(utcnow()), refresh_per_second=2, transient=False) as live:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await stop.wait()
            live.update(board.table(utcnow()))


async def run_up(
    settings: Settings, *, demo: bool, exit_after_demo: bool, echo: Callable[[str], None], live: bool = False,
) -> int:
    """Run everything until stopped; returns the process exit code.

    ``live``: show a table redrawn in place (a terminal) instead of one line per event.
    SIGINT/SIGTERM stop it with exit 0 at any point, also while it is still starting.
    """
    stop = stop_event()  # first thing: a signal while starting is not lost
    problem = await preflight.rabbitmq_problem(settings.amqp.url)
    if problem is not None:
        echo(preflight.NO_RABBITMQ.format(url=mask_text(settings.amqp.url), error=problem))
        return 2
    settings, postgres_error, postgres_note = await preflight.postgres_settings(settings)
    if postgres_error is not None:
        echo(postgres_error)
        return 2
    broker = await preflight.broker_mode(settings)
    if broker.per_investigation_users and not settings.tools.rabbitmq_management_url:
        # The management API answers: the agents' rabbitmq tool asks it too (as their own monitoring user).
        settings = msgspec.structs.replace(settings, tools=msgspec.structs.replace(
            settings.tools, rabbitmq_management_url=preflight.management_api(settings)[0]))
    for note in (broker.note, postgres_note):
        if note:
            echo(note)
    state = Path(settings.runtime.state_dir)
    try:
        settings, urls, note = await component_identities(settings, state, managed=broker.per_investigation_users)
    except (OSError, RuntimeError, aiohttp.ClientError) as exc:
        echo(f"error: could not create the broker identities: {mask_text(str(exc))}")
        return 2
    echo(note)
    bao = EmbeddedOpenBao(state / "openbao", settings.vault.addr)
    try:
        await bao.start()
    except EmbeddedVaultError as exc:
        echo(f"error: {exc}")
        return 2
    service: DispatcherService | None = None
    trust: TrustService | None = None
    bridge: BridgeService | None = None
    watch: ResultsWatch | None = None
    board = Board(settings.trust.initial_phase)
    dispatcher_token = ""
    # A signal (also one that came during the steps above) cancels whatever starts below, the
    # demo included (it waits on the board, not on `stop`); `finally` then stops what is up.
    disarm = cancel_on(stop)
    problems: DemoProblems | None = None
    try:
        if demo:  # before Vault: the agents' broker role must know the demo's vhost
            problems = DemoProblems(settings)
            await problems.open(management=broker.per_investigation_users)
            echo("demo: created " + ", ".join(problems.created) + " — with a lock held, sessions waiting, "
                 "connections hogged and a queue without consumer (all removed on exit)")
            if problems.own_vhost:
                settings = msgspec.structs.replace(settings, vault=msgspec.structs.replace(
                    settings.vault, rabbitmq_inspect_vhosts=[*settings.vault.rabbitmq_inspect_vhosts, problems.vhost]))
            if problems.postgres is not None and settings.postgres.dsn:
                # The agents look at (and may act in) the demo's database: an executor ends sessions of
                # its Job's own database only, and the embedded allow-list names that one.
                settings = msgspec.structs.replace(settings, postgres=msgspec.structs.replace(
                    settings.postgres, dsn=with_dsn_parts(settings.postgres.dsn, database=problems.names.database)))
        root = hvac.Client(url=bao.addr, token=bao.root_token)
        # Its warnings are summarised in the line below; as log lines they would only repeat it.
        logging.getLogger("dispatcher.credentials.bootstrap").setLevel(logging.ERROR)
        try:
            report = await asyncio.to_thread(bootstrap, root, settings,
                                             shared_broker_user=not broker.per_investigation_users)
        except BootstrapError as exc:
            echo(f"error: vault bootstrap failed: {exc}")
            return 2
        echo(f"OpenBao {bao.addr}: {len(report.changes)} objects configured" + "".join(f"; {n}" for n in report.notes))
        created = await asyncio.to_thread(root.auth.token.create, policies=[vault_layout.DISPATCHER_POLICY],
                                          ttl="24h", display_name="agentjobs-up-dispatcher")
        dispatcher_token = created["auth"]["client_token"]
        embedded = embedded_settings(settings, vault_token=dispatcher_token)
        service = DispatcherService(as_component(embedded, urls["dispatcher"]), LocalRuntime(state / "local"))
        await service.start()
        # The trust consumer shares the dispatcher's metrics endpoint address: no server of its own here.
        trust = TrustService(msgspec.structs.replace(
            as_component(embedded, urls["trust"]), metrics=msgspec.structs.replace(embedded.metrics, port=0)))
        await trust.start()
        bridge = BridgeService(as_component(embedded, urls["bridge"]))
        try:
            bridge_port = await bridge.start()
        except StartRefused as exc:
            echo(f"error: bridge: {exc.message} ({exc.hint})")
            bridge = None
            return 2
        echo(f"bridge: Alertmanager webhook at http://{settings.bridge.host}:{bridge_port}/alerts")
        phases = ", ".join(f"{k}={v.value}" for k, v in trust.state.ledger.phases().items())
        echo(f"trust: tallying operator feedback from {FEEDBACK}; phases: "
             f"{phases or 'all scopes ' + settings.trust.initial_phase.value}")
        allowed = "; ".join(f"database {', '.join(a.databases) or '(none)'} in scope {scope}"
                            for scope, a in sorted(embedded.actions.scopes.items()))
        echo(f"remediation: limited-remediation and autonomous agents may act on {allowed}, at most "
             f"{embedded.actions.max_per_scope_per_hour} execution(s) per scope an hour (`agentjobs phase pin "
             "SCOPE autonomous --reason ...` lets a scope act; `agentjobs actions disable --reason ...` stops all)")
        echo(f"dispatcher: consuming {INCIDENTS} on {settings.amqp.url.rpartition('@')[2]}, local runtime in "
             f"{state / 'local'}, metrics on http://{settings.metrics.host}:{settings.metrics.port}/metrics")
        watch = ResultsWatch(board, None if live else echo)
        await watch.start(as_component(embedded, urls["operator"]))
        echo("running — Ctrl-C stops everything and revokes every credential")
        shown = asyncio.create_task(_show_live(board, stop)) if live else None
        if problems is not None:
            await _demo(as_component(embedded, urls["operator"]), problems, echo, stop, exit_after_demo, watch)
        disarm()  # from here on `stop` ends the wait below
        if not stop.is_set():
            waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(service.crashed.wait())]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for w in waiters:
                w.cancel()
        stop.set()
        if shown is not None:
            await shown
        return 1 if service.crashed.is_set() else 0
    except asyncio.CancelledError:
        if not stop.is_set():
            raise
        asyncio.current_task().uncancel()  # type: ignore[union-attr]  # ours, taken as a stop
        return 0  # stopped by a signal while starting
    finally:
        disarm()  # a signal during the clean-up must not cut it short
        # Stopping must finish even when the output is gone (`agentjobs up | head` closes the
        # pipe): a failed progress line must not leave OpenBao or credentials behind.
        echo = _quiet_if_broken(echo)
        echo("stopping: draining the dispatcher, stopping investigations, revoking credentials")
        if watch is not None:
            await watch.stop()
        if bridge is not None:
            await bridge.stop()
        if trust is not None:
            await trust.stop()
        if service is not None:
            await service.stop()
        if dispatcher_token:
            await bao.revoke_tree(dispatcher_token)  # every agent token is its child
            # Token revocation drops leases asynchronously; a dev server stopped now would leave
            # their database and broker users behind. Sweep them synchronously first.
            await bao.revoke_leases((vault_layout.DATABASE_MOUNT, vault_layout.RABBITMQ_MOUNT))
        bao.stop_now()
        if problems is not None:
            await problems.close()
            echo("demo: removed its database, role, sessions, queue and vhost")
        echo("stopped")


async def _demo(
    settings: Settings, problems: DemoProblems, echo: Callable[[str], None], stop: asyncio.Event, exit_after: bool,
    watch: ResultsWatch,
) -> None:
    bodies, groups = problems.notifications()
    board = watch.board
    connection = await aio_pika.connect(settings.amqp.url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange(INCIDENTS)
        echo(f"demo: publishing their alerts as Alertmanager would: {len(bodies)} notifications in {groups} groups "
             "(investigations show up below as they happen)")
        for body in bodies:  # in order: re-sends of a group after its first notification
            await exchange.publish(aio_pika.Message(body, user_id=broker_user(settings.amqp.url)), "alertmanager.demo",
                                   timeout=30)
        echo(f"demo: all {len(bodies)} notifications confirmed by the broker")
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(180):
            while not (board.done(groups) or stop.is_set()):
                watch.changed.clear()
                await watch.changed.wait()
    echo(f"demo: {len(board.dispatched)} investigations for {len(bodies)} notifications; outcomes {board.outcomes()}; "
         f"{len(board.findings)} findings published to exchange {RESULTS} (routing keys "
         f"{', '.join(sorted(board.finding_keys)) or 'finding.<severity>.<domain>'})")
    for finding in board.findings.values():
        top = finding.hypotheses[0] if finding.hypotheses else None
        echo(f"demo: {finding.summary.splitlines()[0][:240]}"
             + (f" — evidence: {top.evidence_for[0].excerpt[:160]}" if top and top.evidence_for else ""))
    for line in board.actions_summary():  # what the agents did about it, or what would let them act
        echo(f"demo: {line}")
    if exit_after:
        stop.set()
