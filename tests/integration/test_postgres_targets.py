"""PostgreSQL targets from alert labels, against real PostgreSQL, OpenBao and RabbitMQ (issue 19).

``postgres.targets.ledger`` is a second database (on the machine's server, as a second server would
be: its own Vault connection and roles); the default target carries ``postgres.match``, so an alert
naming neither is not investigated on a server it does not name. The bootstrap is the real one, the
tokens are minted as the dispatcher mints them, and the agent runs as the Job runs it.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import aio_pika
import psycopg
import pytest
import pytest_asyncio

from agent.credentials import Denied, DynamicSecret
from dispatcher.credentials.bootstrap import bootstrap
from dispatcher.jobs.jobspec import postgres_targets_env
from dispatcher.plumbing.settings import Settings
from schemas import Alert, AlertStatus, Finding, IncidentEvent, Phase, decode, encode, identify
from schemas import vault_paths as layout
from tests.integration.test_agent import _agent_env, _bootstrap_settings, _mint_wrapped, _run_agent, results
from tests.integration.test_phase_database_roles import agent_session, member_of_signal_backend
from tests.integration.vault_helpers import Vault
from tests.support.services import OpenBaoServer, Postgres, RabbitMQ, Vhost, temporary_database

pytestmark = pytest.mark.integration

__all__ = ["results"]  # the fixture, shared with test_agent


@dataclass(frozen=True)
class World:
    bao: OpenBaoServer
    settings: Settings
    ledger: str  # the named target's database
    default_db: str


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def world(postgres: Postgres, rabbitmq: RabbitMQ, amqp_vhost: Vhost) -> AsyncIterator[World]:
    """A ledger database as target ``ledger``, OpenBao bootstrapped with it (stopped before it is dropped)."""
    async with temporary_database(postgres, hint="ledger") as (ledger, ledger_admin_dsn):
        bao = OpenBaoServer()
        await bao.start()
        try:
            targets = {"ledger": {"dsn": ledger_admin_dsn.replace(f"{postgres.user}@", "", 1),
                                  "admin_dsn": ledger_admin_dsn, "match": {"datname": ledger}}}
            settings = _bootstrap_settings(bao, postgres, rabbitmq, amqp_vhost,
                                           POSTGRES__TARGETS=json.dumps(targets),
                                           POSTGRES__MATCH=json.dumps({"datname": postgres.dbname}))
            await asyncio.to_thread(bootstrap, bao.hvac_client(), settings)
            yield World(bao=bao, settings=settings, ledger=ledger, default_db=postgres.dbname)
        finally:
            await bao.stop()


def _vault(world: World) -> Vault:
    return Vault(server=world.bao, env={"AGENTJOBS_VAULT__ADDR": world.bao.addr,
                                         "AGENTJOBS_VAULT__TOKEN": world.bao.root_token},
                 dispatcher_token=world.bao.root_token)


async def _current_database(postgres: Postgres, dbname: str, user: DynamicSecret) -> str:
    async with await psycopg.AsyncConnection.connect(
            host=postgres.host, port=postgres.port, dbname=dbname, user=user.username, password=user.password,
            autocommit=True, connect_timeout=5) as conn:
        cur = await conn.execute("SELECT current_database()")
        row = await cur.fetchone()
    assert row is not None
    return str(row[0])


@pytest.mark.parametrize("phase", [Phase.SHADOW, Phase.AUTONOMOUS], ids=lambda p: p.value)
async def test_each_phase_gets_its_own_kind_of_user_on_the_named_target_and_never_the_other_kind(
    world: World, postgres: Postgres, phase: Phase, tmp_path: Path
) -> None:
    async with agent_session(_vault(world), phase, tmp_path) as session:
        # When the Job of this phase asks for a user on the ledger target
        user = await session.database("ledger")
        assert isinstance(user, DynamicSecret), user
        # Then it is a real user there, of its phase's kind: only the acting phases may signal backends
        assert await _current_database(postgres, world.ledger, user) == world.ledger
        assert await member_of_signal_backend(postgres, user.username) is (phase is Phase.AUTONOMOUS)
        # ... and the other kind's role on that target is refused by Vault
        other_kind = next(role for role in layout.target_roles("ledger")
                          if role != layout.database_role_for(phase, "ledger"))
        refused = await session.read_secret(f"{layout.DATABASE_MOUNT}/creds/{other_kind}")
        assert isinstance(refused, Denied), refused


async def _investigate(world: World, results: aio_pika.abc.AbstractQueue, tmp_path: Path,
                       labels: dict[str, str]) -> tuple[int, str, Finding | None]:
    """The real agent, on an incident with ``labels``, with the Job environment the dispatcher writes."""
    now = datetime.now(UTC)
    incident = IncidentEvent(
        source="https://alertmanager.test", group_key=f'{{}}:{{alertname="LedgerPostingsDelayed",run="{now}"}}',
        status=AlertStatus.FIRING,
        alerts=(Alert(status=AlertStatus.FIRING, starts_at=now,
                      labels={"alertname": "LedgerPostingsDelayed", "severity": "critical", **labels}),))
    wrapping_token, _ = await _mint_wrapped(world.bao, incident)
    input_dir, home = tmp_path / "input", tmp_path / "home"
    input_dir.mkdir()
    home.mkdir()
    (input_dir / "incident.json").write_bytes(encode(incident))
    (input_dir / "wrapped-token").write_text(wrapping_token)
    env = {**_agent_env(world.bao, world.settings, incident, input_dir, home), **postgres_targets_env(world.settings)}
    code, output = await _run_agent(env)
    message = await results.get(timeout=10, fail=False)
    if message is None:
        return code, output, None
    await message.ack()
    finding = decode(message.body, Finding)
    assert finding.investigation_id == identify(incident).investigation_id
    return code, output, finding


async def test_the_agent_investigates_the_database_the_alert_names_and_says_which_answered(
    world: World, results: aio_pika.abc.AbstractQueue, tmp_path: Path
) -> None:
    code, output, finding = await _investigate(world, results, tmp_path, {"datname": world.ledger})
    assert code == 0, output
    assert finding is not None
    selected = [e for e in finding.evidence if e.query == "select target by alert labels"]
    assert len(selected) == 1 and selected[0].ok
    assert f"PostgreSQL target ledger (127.0.0.1:" in selected[0].excerpt
    assert f"/{world.ledger}) selected by the alert's labels datname={world.ledger}" in selected[0].excerpt
    queried = [e for e in finding.evidence if e.source == "postgres" and e.query.startswith("-- postgres target")]
    assert queried and all(e.ok for e in queried), queried
    assert all(f"-- postgres target ledger (127.0.0.1:" in e.query and f"/{world.ledger})" in e.query
               for e in queried)


async def test_an_alert_naming_an_unknown_database_is_not_investigated_elsewhere_and_the_finding_says_so(
    world: World, results: aio_pika.abc.AbstractQueue, tmp_path: Path
) -> None:
    unknown = f"payroll_{uuid.uuid4().hex[:6]}"
    code, output, finding = await _investigate(world, results, tmp_path, {"datname": unknown})
    assert code == 0, output
    assert finding is not None
    said = [e for e in finding.evidence if e.query == "select target by alert labels"]
    assert len(said) == 1 and not said[0].ok
    assert f"the alert's labels datname={unknown} match no PostgreSQL target (default, ledger)" in said[0].excerpt
    assert "PostgreSQL was not queried directly" in said[0].excerpt
    assert not [e for e in finding.evidence if e.query.startswith("-- postgres target")]
