"""ActionRecords from a real agent run: `agentjobs agent`'s run() as a Job runs it, against real services.

The Job's token is minted as the dispatcher mints it (phase token role, response-wrapped); the
agent unwraps it, takes its phase's PostgreSQL user and its own RabbitMQ user from Vault, reads
the kill switch before acting, publishes its finding and then one ActionRecord per gated action
to ``agentjobs.results``. A copy queue bound to ``action.#`` and ``agentjobs tail actions`` (in
process and as a subprocess) see them. The lock pile-up is ``test_remediation_postgres``'s.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import pytest_asyncio

from agent import config as agent_config
from agent import main as agent_main
from dispatcher.cli.ops import tail
from dispatcher.credentials.tokens import VaultCredentials
from dispatcher.jobs.jobspec import without_credentials
from dispatcher.plumbing.settings import load_settings
from schemas import Phase, encode
from tests.integration.dispatcher_harness import declare_topology
from tests.integration.test_remediation_postgres import (  # noqa: F401 - db is a fixture
    LOCK_ALERT,
    UNDO,
    Db,
    granted,
    alive,
    db,
    lock_pileup,
    waiters_proceed,
)
from tests.integration.vault_helpers import Vault, bootstrapped_vault
from tests.support.action_records import action_records
from tests.support.fake_tools import incident
from tests.support.services import Postgres, RabbitMQ, Vhost

pytestmark = pytest.mark.integration

AGENTJOBS = str(Path(sys.executable).with_name("agentjobs"))


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def vault(postgres: Postgres, rabbitmq: RabbitMQ, amqp_vhost: Vhost) -> Vault:
    await declare_topology(amqp_vhost.amqp_url, load_settings(None, {}))
    async with bootstrapped_vault(postgres, rabbitmq, amqp_vhost.name) as vault:
        yield vault


async def job(vault: Vault, db: Db, amqp_vhost: Vhost, phase: Phase, tmp_path: Path) -> agent_config.AgentEnv:
    """What the dispatcher hands a Job of ``phase``: a wrapped token, the incident, addresses without credentials."""
    investigation_id = uuid.uuid4().hex
    job_name = f"aj-records-{investigation_id[:12]}"
    minter = VaultCredentials(load_settings(None, vault.env).vault)
    try:
        wrapped = await minter.mint(phase=phase, investigation_id=investigation_id, incident_key="incident-records",
                                    job_name=job_name, ttl=600)
    finally:
        await minter.close()
    base = tmp_path / phase.value
    (base / "input").mkdir(parents=True)
    (base / "work").mkdir()
    env = agent_config.load({
        "AGENTJOBS_INVESTIGATION_ID": investigation_id, "AGENTJOBS_JOB_NAME": job_name,
        "AGENTJOBS_PHASE": phase.value, "AGENTJOBS_INPUT_DIR": str(base / "input"),
        "AGENTJOBS_VAULT__ADDR": vault.server.addr, "AGENTJOBS_VAULT__AUTH_MODE": "per-investigation",
        "AGENTJOBS_AMQP__URL": without_credentials(amqp_vhost.amqp_url), "AGENTJOBS_POSTGRES__DSN": db.address,
        "AGENTJOBS_TOOLS__RABBITMQ": "false", "AGENTJOBS_WORK_DIR": str(base / "work"), **granted(db.address),
    })
    env.wrapped_token_file.write_text(wrapped.wrapping_token)
    env.incident_file.write_bytes(encode(incident("PostgresLockWaits", expr=LOCK_ALERT, instance="pg-0:9187")))
    return env


async def test_an_autonomous_run_publishes_executed_verified_and_tail_shows_it(vault, db, amqp_vhost, tmp_path):
    env = await job(vault, db, amqp_vhost, Phase.AUTONOMOUS, tmp_path)
    settings = load_settings(None, {"AGENTJOBS_AMQP__URL": amqp_vhost.url("operator"),
                                    "AGENTJOBS_RUNTIME__STATE_DIR": str(tmp_path / "state")})
    lines: list[str] = []
    bound, shown = asyncio.Event(), asyncio.Event()

    def echo(line: str) -> None:
        lines.append(line)
        if env.investigation_id[:16] in line:
            shown.set()

    tailing = asyncio.create_task(tail(settings, "actions", follow=False, as_json=False, filters={},
                                       echo=echo, idle_seconds=20, status=lambda _: bound.set()))
    async with action_records(amqp_vhost.amqp_url) as copies, lock_pileup(db, waiters=3) as chain:
        await asyncio.wait_for(bound.wait(), 10)
        await agent_main.run(env)
        [(key, record)] = await copies.of(env.investigation_id)
        await waiters_proceed(chain)
        assert await alive(db, [chain.holder_pid]) == set()
    await asyncio.wait_for(shown.wait(), 30)
    tailing.cancel()

    assert key == "action.executed_verified.database"
    assert (record.action, record.decision, record.outcome, record.executed) == (
        "terminate_backend", "execute", "executed_verified", True)
    assert record.target.startswith(f"pid {chain.holder_pid}") and record.params["pid"] == str(chain.holder_pid)
    assert record.undo == UNDO and "blocked 3 session(s)" in record.before and record.reason.startswith("executed")
    assert (record.phase, record.domain) == (Phase.AUTONOMOUS, "database")
    assert record.idempotency_key.startswith(f"{env.investigation_id}:terminate_backend:")
    [(_, _, headers)] = [c for c in copies.got if c[1].investigation_id == env.investigation_id]
    assert (headers["job_name"], headers["outcome"], headers["action"]) == (
        env.job_name, "executed_verified", "terminate_backend")
    [line] = [line for line in lines if env.investigation_id[:16] in line]
    assert line.startswith("action   action.executed_verified.database  terminate_backend pid ")
    assert "executed_verified" in line and "undo: none (a terminated session" in line


async def test_a_read_only_run_publishes_propose_only_and_the_blocker_survives(vault, db, amqp_vhost, tmp_path):
    env = await job(vault, db, amqp_vhost, Phase.READ_ONLY, tmp_path)
    async with action_records(amqp_vhost.amqp_url) as copies, lock_pileup(db, waiters=3) as chain:
        await agent_main.run(env)
        [(key, record)] = await copies.of(env.investigation_id)
        assert await alive(db, [chain.holder_pid]) == {chain.holder_pid}

    assert key == "action.propose_only.database"
    assert (record.decision, record.outcome, record.executed, record.undo) == (
        "propose_only", "propose_only", False, "")
    assert "not medium-risk actions: proposed only" in record.reason
    assert record.phase is Phase.READ_ONLY


async def test_tail_actions_as_a_subprocess_shows_what_a_disabled_switch_refused(vault, db, amqp_vhost, tmp_path):
    from dispatcher.cli.actions import set_switch

    await asyncio.to_thread(set_switch, vault.root(), enabled=False, reason="records test", operator="oncall")
    env = await job(vault, db, amqp_vhost, Phase.AUTONOMOUS, tmp_path)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "AGENTJOBS_"))}
    proc = subprocess.Popen([AGENTJOBS, "tail", "actions", "--follow"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env={**clean, "AGENTJOBS_AMQP__URL": amqp_vhost.url("operator")})

    def first_line_about(investigation: str) -> str:
        assert proc.stdout is not None
        for line in proc.stdout:
            if investigation[:16] in line:
                return line.rstrip("\n")
        return ""

    try:
        assert proc.stderr is not None
        ready = await asyncio.to_thread(proc.stderr.readline)  # "tail: actions from exchange ...": bound
        assert ready.startswith("tail: actions from exchange agentjobs.results (action.#)"), ready
        async with lock_pileup(db, waiters=3) as chain:
            await agent_main.run(env)
            assert await alive(db, [chain.holder_pid]) == {chain.holder_pid}
        line = await asyncio.wait_for(asyncio.to_thread(first_line_about, env.investigation_id), 30)
        proc.terminate()
        assert await asyncio.to_thread(proc.wait, 10) == 0  # SIGTERM stops tail with exit 0
    finally:
        if proc.poll() is None:
            proc.kill()
        await asyncio.to_thread(set_switch, vault.root(), enabled=True, reason="records test done",
                                operator="oncall")
    assert line.startswith("action   action.refused_kill_switch.database  terminate_backend pid ")
    assert "refused by the kill switch: actions DISABLED by oncall" in line
