"""The kill switch against real OpenBao and PostgreSQL: nothing acts while it is off, or while it cannot be read.

The switch is written as operators write it (``dispatcher.cli.actions.set_switch``, and the
``agentjobs actions`` commands as subprocesses) into an OpenBao bootstrapped by ``vault
bootstrap``; the agent reads it with a phase token minted as the dispatcher mints it. The
lock pile-up, the database roles and the agent's path through investigate → conclude → gate →
executor are the ones of ``test_remediation_postgres`` (its helpers, reused).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import pytest
import pytest_asyncio

from agent import engine
from agent.credentials import VaultSession
from agent.reasoning import Tally
from agent.remediation.killswitch import VaultKillSwitch
from agent.remediation.protocol import FileLedger, Guard, Refusal
from dispatcher.cli.actions import read_status, set_switch
from dispatcher.credentials.tokens import VaultCredentials
from dispatcher.plumbing.settings import load_settings
from schemas import Finding, Phase, ProposedAction
from schemas import vault_paths as layout
from tests.integration.test_phase_database_roles import agent_session
from tests.integration.test_remediation_postgres import (  # noqa: F401 - db is a fixture
    LOCK_ALERT,
    Db,
    agent_env,
    alive,
    db,
    lock_pileup,
    waiters_proceed,
)
from tests.integration.vault_helpers import Vault, bootstrapped_vault
from tests.support.fake_tools import incident
from tests.support.services import Postgres, RabbitMQ, Vhost, free_port

pytestmark = pytest.mark.integration

AGENTJOBS = str(Path(sys.executable).with_name("agentjobs"))
SWITCH = layout.kv_actions_path()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def vault(postgres: Postgres, rabbitmq: RabbitMQ, amqp_vhost: Vhost) -> AsyncIterator[Vault]:
    async with bootstrapped_vault(postgres, rabbitmq, amqp_vhost.name) as vault:
        yield vault


async def operator_sets(vault: Vault, *, enabled: bool, reason: str = "test") -> None:
    await asyncio.to_thread(set_switch, vault.root(), enabled=enabled, reason=reason, operator="oncall-test")


async def never_set(vault: Vault) -> None:
    root = vault.root()
    await asyncio.to_thread(root.delete, SWITCH.replace("/data/", "/metadata/", 1))
    assert (await asyncio.to_thread(read_status, root)).version == 0


async def run_agent(db: Db, phase: Phase, tmp_path: Path, guard: Guard) -> tuple[Finding, Any]:
    env = agent_env(db, phase, tmp_path, f"inv-ks-{uuid.uuid4().hex[:8]}")
    tools, _ = await engine.open_tools(env, db_user=db.agent, db_password=db.password, postgres_available=True)
    try:
        finding = await engine.investigate(incident("PostgresLockWaits", expr=LOCK_ALERT, instance="pg-0:9187"), env,
                                           tools=tools, tally=Tally(), guard=guard)
    finally:
        await engine.close_tools(tools)
    return finding, env


def terminate_of(finding: Finding) -> ProposedAction:
    [action] = [a for a in finding.proposed_actions if a.action == "terminate_backend"]
    return action


@contextlib.asynccontextmanager
async def autonomous_guard(vault: Vault, tmp_path: Path) -> AsyncIterator[VaultKillSwitch]:
    async with agent_session(vault, Phase.AUTONOMOUS, tmp_path) as session:
        yield VaultKillSwitch(session)


# --- new Jobs ---------------------------------------------------------------------------------

async def test_disabled_an_autonomous_agent_terminates_nothing_and_the_blocker_survives(vault, db, tmp_path):
    await operator_sets(vault, enabled=False, reason="incident review in progress")
    async with autonomous_guard(vault, tmp_path) as guard, lock_pileup(db, waiters=3) as chain:
        finding, env = await run_agent(db, Phase.AUTONOMOUS, tmp_path, guard)
        assert await alive(db, [chain.holder_pid]) == {chain.holder_pid}
        assert all(not t.done() for t in chain.waiters)

    action = terminate_of(finding)
    assert not action.executed and action.params["pid"] == str(chain.holder_pid)
    assert (action.params["decision"], action.params["outcome"]) == ("execute", "refused_kill_switch")
    assert action.params["reason"].startswith("refused by the kill switch: actions DISABLED by oncall-test at ")
    assert action.params["reason"].endswith(": incident review in progress")
    assert "undo" not in action.params and "before" not in action.params
    assert FileLedger(env.action_ledger_file).seen(action.params["idempotency_key"]) is None  # not even claimed


@pytest.mark.parametrize("state", ["enabled", "never set"])
async def test_enabled_or_never_set_the_autonomous_agent_acts(vault, db, tmp_path, state):
    if state == "enabled":
        await operator_sets(vault, enabled=True, reason="review done")
    else:
        await never_set(vault)
    async with autonomous_guard(vault, tmp_path) as guard, lock_pileup(db, waiters=3) as chain:
        finding, _ = await run_agent(db, Phase.AUTONOMOUS, tmp_path, guard)
        await waiters_proceed(chain)
        assert await alive(db, [chain.holder_pid]) == set()

    action = terminate_of(finding)
    assert action.executed and action.params["outcome"] == "executed_verified"


# --- running agents ---------------------------------------------------------------------------

async def test_flipped_while_the_agent_investigates_the_next_action_is_refused(vault, db, tmp_path):
    await operator_sets(vault, enabled=True)
    flipped: list[str] = []
    async with autonomous_guard(vault, tmp_path) as real, lock_pileup(db, waiters=3) as chain:
        async def operator_flips_first(action: ProposedAction) -> Refusal | None:
            # the Job started and investigated with actions enabled; an operator disables them now
            await operator_sets(vault, enabled=False, reason="stop everything")
            flipped.append(action.action)
            return await real(action)

        finding, env = await run_agent(db, Phase.AUTONOMOUS, tmp_path, operator_flips_first)
        assert await alive(db, [chain.holder_pid]) == {chain.holder_pid}

    assert flipped == ["terminate_backend"]
    action = terminate_of(finding)
    assert not action.executed and action.params["outcome"] == "refused_kill_switch"
    assert action.params["reason"].endswith(": stop everything")
    assert FileLedger(env.action_ledger_file).seen(action.params["idempotency_key"]) is None


# --- unreadable: fail closed ------------------------------------------------------------------

async def test_a_token_that_can_no_longer_read_the_switch_refuses_and_the_blocker_survives(vault, db, tmp_path):
    await operator_sets(vault, enabled=True)
    async with agent_session(vault, Phase.AUTONOMOUS, tmp_path) as session, lock_pileup(db, waiters=3) as chain:
        assert await session.revoke_self()  # e.g. the dispatcher revoked the Job's token mid-run
        finding, _ = await run_agent(db, Phase.AUTONOMOUS, tmp_path, VaultKillSwitch(session))
        assert await alive(db, [chain.holder_pid]) == {chain.holder_pid}

    action = terminate_of(finding)
    assert not action.executed and action.params["outcome"] == "refused_kill_switch"
    assert action.params["reason"].startswith("kill switch unreadable (")
    assert "(403)" in action.params["reason"] or "permission denied" in action.params["reason"]


async def test_vault_down_refuses() -> None:
    session = VaultSession(f"http://127.0.0.1:{free_port()}", timeout=2, phase=Phase.AUTONOMOUS)
    refusal = await VaultKillSwitch(session)(ProposedAction(action="terminate_backend", risk="medium"))
    assert refusal is not None and refusal.reason.startswith("kill switch unreadable (ConnectionError")


async def test_a_malformed_switch_refuses(vault, tmp_path):
    root = vault.root()
    await asyncio.to_thread(root.write_data, SWITCH, data={"data": {"enabled": "false", "by": "someone"}})
    try:
        async with autonomous_guard(vault, tmp_path) as guard:
            refusal = await guard(ProposedAction(action="terminate_backend", risk="medium"))
    finally:
        await operator_sets(vault, enabled=True)
    assert refusal is not None
    assert refusal.reason == "kill switch unreadable (not a kill switch document: 'enabled' is 'false', " \
                             "not true or false): not acting"


# --- who may read and write it ----------------------------------------------------------------

async def phase_token(vault: Vault, phase: Phase) -> str:
    """A token of ``phase`` exactly as a Job gets it (minted through the token role, then unwrapped)."""
    minter = VaultCredentials(load_settings(None, vault.env).vault)
    try:
        investigation = uuid.uuid4().hex
        wrapped = await minter.mint(phase=phase, investigation_id=investigation, incident_key="incident-ks",
                                    job_name=f"aj-{investigation[:12]}", ttl=300)
    finally:
        await minter.close()
    unwrapper = hvac.Client(url=vault.server.addr, token=wrapped.wrapping_token)
    return (await asyncio.to_thread(unwrapper.sys.unwrap))["auth"]["client_token"]


@pytest.mark.parametrize("phase", list(Phase), ids=lambda p: p.value)
async def test_every_phase_token_reads_the_switch_and_cannot_write_or_delete_it(vault, tmp_path, phase):
    await operator_sets(vault, enabled=False, reason=f"read by {phase.value}")
    async with agent_session(vault, phase, tmp_path) as session:
        assert (await session.read_kv(SWITCH))["reason"] == f"read by {phase.value}"  # the agent's own code path
    agent = hvac.Client(url=vault.server.addr, token=await phase_token(vault, phase))
    with pytest.raises(hvac.exceptions.Forbidden):
        await asyncio.to_thread(agent.write_data, SWITCH, data={"data": {"enabled": True, "by": "the agent"}})
    for path in (SWITCH.replace("/data/", "/metadata/", 1), SWITCH.replace("/data/", "/delete/", 1)):
        with pytest.raises(hvac.exceptions.Forbidden):
            await asyncio.to_thread(agent.delete, path)
    status = await asyncio.to_thread(read_status, vault.root())
    assert status.switch is not None and not status.switch.enabled and status.switch.by == "oncall-test"
    await operator_sets(vault, enabled=True)


async def test_the_dispatchers_token_cannot_read_it(vault):
    dispatcher = hvac.Client(url=vault.server.addr, token=vault.dispatcher_token)
    with pytest.raises(hvac.exceptions.Forbidden):
        await asyncio.to_thread(dispatcher.read, SWITCH)


# --- the operator's commands ------------------------------------------------------------------

def _cli(args: list[str], *, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_", "AGENTJOBS_"))}
    return subprocess.run([AGENTJOBS, *args], capture_output=True, text=True, timeout=60, cwd=cwd,
                          env={**clean, **env})


async def test_actions_disable_status_enable_as_subprocesses(vault, tmp_path):
    env = {"AGENTJOBS_VAULT__ADDR": vault.server.addr, "VAULT_TOKEN": vault.server.root_token}
    off = await asyncio.to_thread(_cli, ["actions", "disable", "--reason", "DB failover drill",
                                         "--operator", "alice"], env=env, cwd=tmp_path)
    assert off.returncode == 0, off.stderr
    assert off.stdout.startswith("actions DISABLED by alice at ") and ": DB failover drill (agentjobs-kv" in off.stdout

    shown = await asyncio.to_thread(_cli, ["actions", "status", "--json"], env=env, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)
    assert (status["enabled"], status["by"], status["reason"], status["readable"]) == (
        False, "alice", "DB failover drill", True)
    assert status["path"] == SWITCH and status["version"] >= 1
    # what the agent reads is what the operator wrote
    async with autonomous_guard(vault, tmp_path) as guard:
        refusal = await guard(ProposedAction(action="terminate_backend", risk="medium"))
    assert refusal is not None and "DISABLED by alice" in refusal.reason

    on = await asyncio.to_thread(_cli, ["actions", "enable", "--reason", "drill over", "--operator", "alice"],
                                 env=env, cwd=tmp_path)
    assert on.returncode == 0, on.stderr
    text = await asyncio.to_thread(_cli, ["actions", "status"], env=env, cwd=tmp_path)
    assert text.returncode == 0 and text.stdout.startswith("actions enabled by alice at ")
    assert f"version {status['version'] + 1}" in text.stdout


async def test_in_ups_directory_the_embedded_openbaos_root_token_is_used_when_nothing_else_is(vault, tmp_path):
    # `agentjobs up` keeps its OpenBao's dev log in <state_dir>/openbao/, where the dev server printed its root token
    (tmp_path / ".agentjobs" / "openbao").mkdir(parents=True)
    (tmp_path / ".agentjobs" / "openbao" / "openbao.log").write_text(
        f"==> OpenBao server started! Log data will stream in below:\n...\nRoot Token: {vault.server.root_token}\n")
    env = {"AGENTJOBS_VAULT__ADDR": vault.server.addr}
    off = await asyncio.to_thread(_cli, ["actions", "disable", "--reason", "from up's directory", "--operator", "bob"],
                                  env=env, cwd=tmp_path)
    assert off.returncode == 0, off.stderr
    assert (await asyncio.to_thread(read_status, vault.root())).switch.by == "bob"
    await operator_sets(vault, enabled=True)


async def test_without_the_right_token_the_commands_fail_clearly(vault, tmp_path):
    shadow = await phase_token(vault, Phase.SHADOW)
    env = {"AGENTJOBS_VAULT__ADDR": vault.server.addr, "VAULT_TOKEN": shadow}
    refused = await asyncio.to_thread(_cli, ["actions", "enable", "--reason", "agent tries"], env=env, cwd=tmp_path)
    assert refused.returncode == 2
    assert "permission denied: write agentjobs-kv/data/actions" in refused.stderr and "Traceback" not in refused.stderr
    none = await asyncio.to_thread(_cli, ["actions", "status"], env={"AGENTJOBS_VAULT__ADDR": vault.server.addr},
                                   cwd=tmp_path)
    assert none.returncode == 2 and "no Vault token" in none.stderr
    down = await asyncio.to_thread(_cli, ["actions", "status"], env={
        "AGENTJOBS_VAULT__ADDR": f"http://127.0.0.1:{free_port()}", "VAULT_TOKEN": "s.x"}, cwd=tmp_path)
    assert down.returncode == 2 and "cannot reach Vault" in down.stderr
