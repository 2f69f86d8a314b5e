"""The kill switch: what a read of agentjobs-kv/data/actions means, decided without I/O, and where it is asked.

The protocol asks the guard after the precondition and before the claim; a refusal or a guard that
cannot answer means nothing is claimed and nothing runs. The operator CLI's token order is here too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.credentials import Denied
from agent.reasoning.actions import gate
from agent.remediation import killswitch
from agent.remediation.protocol import MemoryLedger, Outcome, Refusal, current_guard, execute, guarded
from dispatcher.cli.actions import ActionsError, SwitchStatus, embedded_root_token, operator_token
from dispatcher.plumbing.settings import load_settings
from schemas import KillSwitch, Phase, ProposedAction
from schemas import vault_paths as vault_layout
from schemas.actions import NEVER_SET, KillSwitchUnreadable, parse_kill_switch
from tests.unit.test_remediation_protocol import Scripted, terminate

OFF = {"enabled": False, "by": "alice", "reason": "database migration until 14:00", "at": "2026-12-04T10:00:00+00:00"}


# --- the decision (pure) -----------------------------------------------------------------------

def test_the_switch_lives_in_the_kv_mount_every_phase_may_read() -> None:
    assert vault_layout.kv_actions_path() == "agentjobs-kv/data/actions"


def test_no_document_means_never_disabled() -> None:
    assert parse_kill_switch(None) is NEVER_SET and NEVER_SET.enabled
    assert killswitch.judge(None) is None


def test_enabled_lets_actions_run_and_disabled_refuses_naming_who_and_why() -> None:
    assert killswitch.judge({**OFF, "enabled": True}) is None
    refusal = killswitch.judge(OFF)

    assert refusal is not None and refusal.outcome is Outcome.REFUSED_KILL_SWITCH
    assert refusal.reason == ("refused by the kill switch: actions DISABLED by alice at 2026-12-04T10:00:00+00:00: "
                              "database migration until 14:00")


@pytest.mark.parametrize("data", [
    {"enabled": "false"}, {"enabled": "true"}, {"enabled": None}, {"by": "alice"}, {"enabled": 0},
    {"enabled": True, "by": 42},
], ids=repr)
def test_anything_but_a_well_formed_document_is_unreadable_and_refuses(data: dict[str, Any]) -> None:
    with pytest.raises(KillSwitchUnreadable):
        parse_kill_switch(data)
    refusal = killswitch.judge(data)
    assert refusal is not None and refusal.outcome is Outcome.REFUSED_KILL_SWITCH
    assert refusal.reason.startswith("kill switch unreadable (not a kill switch document: ")


def test_a_read_vault_refused_or_could_not_answer_fails_closed() -> None:
    for reason in ("permission denied (403)", "ConnectionError: refused", "Vault is sealed (503)"):
        refusal = killswitch.judge(Denied(path=vault_layout.kv_actions_path(), reason=reason))
        assert refusal == Refusal(reason=f"kill switch unreadable ({reason}): not acting")


def test_the_document_operators_write_reads_back_as_itself() -> None:
    switch = KillSwitch(**OFF)
    assert parse_kill_switch(switch.document()) == switch
    assert KillSwitch(enabled=True).describe() == "actions enabled"


# --- the guard, as the agent reads it ----------------------------------------------------------

class FakeSession:
    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.paths: list[str] = []

    async def read_kv(self, path: str) -> Any:
        self.paths.append(path)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


async def test_the_vault_guard_reads_the_switch_fresh_for_every_action() -> None:
    session = FakeSession({**OFF, "enabled": True}, OFF)
    guard = killswitch.VaultKillSwitch(session)

    assert await guard(terminate()) is None
    refused = await guard(terminate())
    assert refused is not None and "DISABLED by alice" in refused.reason
    assert session.paths == ["agentjobs-kv/data/actions"] * 2


async def test_the_vault_guard_fails_closed_when_the_session_itself_breaks() -> None:
    refusal = await killswitch.VaultKillSwitch(FakeSession(RuntimeError("boom")))(terminate())
    assert refusal == Refusal(reason="kill switch unreadable (RuntimeError): not acting")


async def test_without_a_vault_identity_nothing_can_be_stopped_so_nothing_acts() -> None:
    refusal = await killswitch.without_vault("no Vault identity in auth mode none")(terminate())
    assert refusal is not None and refusal.reason.startswith("kill switch unreadable (no Vault identity")


# --- where the protocol asks -------------------------------------------------------------------

async def refuse(action: ProposedAction) -> Refusal | None:
    return killswitch.judge(OFF)


async def test_refused_after_the_precondition_and_before_the_claim_nothing_runs_nothing_is_claimed() -> None:
    executor, ledger = Scripted(), MemoryLedger()
    result = await execute(terminate(), executor, done=ledger, investigation_id="inv-ks", guard=refuse)

    assert result.outcome is Outcome.REFUSED_KILL_SWITCH and not result.executed
    assert (executor.checks, executor.acts, executor.verifies) == (1, 0, 0)
    assert ledger.entries == {}  # enabled again, a later attempt of the Job may still act
    assert result.params() == {"outcome": "refused_kill_switch", "reason": killswitch.judge(OFF).reason,
                               "idempotency_key": result.key}


async def test_a_stale_action_is_reported_stale_without_asking_the_switch() -> None:
    asked: list[str] = []

    async def guard(action: ProposedAction) -> Refusal | None:
        asked.append(action.action)
        return None

    result = await execute(terminate(), Scripted(stale="pid 4242 no longer exists"), done=MemoryLedger(),
                           investigation_id="inv-ks", guard=guard)
    assert result.outcome is Outcome.SKIPPED_STALE and asked == []


async def test_a_guard_that_raises_refuses() -> None:
    async def broken(action: ProposedAction) -> Refusal | None:
        raise TimeoutError("vault did not answer")

    executor = Scripted()
    result = await execute(terminate(), executor, done=MemoryLedger(), investigation_id="inv-ks", guard=broken)
    assert result.outcome is Outcome.REFUSED_KILL_SWITCH and executor.acts == 0
    assert result.reason == "kill switch unreadable (TimeoutError: vault did not answer): not acting"


async def test_an_allowing_guard_changes_nothing() -> None:
    async def allow(action: ProposedAction) -> Refusal | None:
        return None

    result = await execute(terminate(), Scripted(), done=MemoryLedger(), investigation_id="inv-ks", guard=allow)
    assert result.outcome is Outcome.EXECUTED_VERIFIED


async def test_the_guard_the_engine_installs_covers_every_executor_the_gate_runs() -> None:
    executor = Scripted()
    with guarded(refuse):
        [action] = await gate([terminate()], Phase.AUTONOMOUS, executors={"terminate_backend": executor},
                              investigation_id="inv-gate")
    assert current_guard() is None  # only within the block

    assert not action.executed and executor.acts == 0
    assert (action.params["decision"], action.params["outcome"]) == ("execute", "refused_kill_switch")
    assert action.params["reason"].startswith("refused by the kill switch: actions DISABLED by alice")
    # below the phase the gate refuses first: the switch is never the reason
    with guarded(refuse):
        [proposed] = await gate([terminate()], Phase.LIMITED_REMEDIATION,
                                executors={"terminate_backend": executor}, investigation_id="inv-gate")
    assert proposed.params["decision"] == "propose_only" and "outcome" not in proposed.params


# --- the operator CLI's token and status line --------------------------------------------------

def _up_log(state: Path, *tokens: str) -> None:
    (state / "openbao").mkdir(parents=True)
    text = "".join(f"==> OpenBao server started!\n\nUnseal Key: x\nRoot Token: {t}\n\n" for t in tokens)
    (state / "openbao" / "openbao.log").write_text(text)


def test_the_operator_token_comes_from_the_flag_then_settings_then_ups_openbao(tmp_path: Path) -> None:
    _up_log(tmp_path, "root-old", "root-new")
    assert embedded_root_token(tmp_path) == "root-new"  # the last start's
    settings = load_settings(None, {"AGENTJOBS_RUNTIME__STATE_DIR": str(tmp_path)})
    assert operator_token(None, settings).token == "root-new"
    assert "agentjobs up" in operator_token(None, settings).source
    configured = load_settings(None, {"AGENTJOBS_RUNTIME__STATE_DIR": str(tmp_path), "AGENTJOBS_VAULT__TOKEN": "s.op"})
    assert operator_token(None, configured).token == "s.op"
    file = tmp_path / "token"
    file.write_text("s.fromfile\n")
    from_file = load_settings(None, {"AGENTJOBS_VAULT__TOKEN_FILE": str(file), "AGENTJOBS_VAULT__TOKEN": "s.op"})
    assert (operator_token(None, from_file).token, operator_token(None, from_file).source) == \
        ("s.fromfile", "vault.token_file")
    assert operator_token("s.flag", configured).token == "s.flag"


def test_no_token_anywhere_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ActionsError, match="no Vault token"):
        operator_token(None, load_settings(None, {"AGENTJOBS_RUNTIME__STATE_DIR": str(tmp_path)}))


def test_the_status_line_says_what_agents_will_do() -> None:
    assert SwitchStatus(switch=NEVER_SET).line() == \
        "actions enabled: never disabled (no kill switch document in Vault) (nothing stored)"
    assert SwitchStatus(switch=KillSwitch(**OFF), version=3).line() == (
        "actions DISABLED by alice at 2026-12-04T10:00:00+00:00: database migration until 14:00 "
        "(agentjobs-kv/data/actions version 3)")
    broken = SwitchStatus(switch=None, version=4, problem="not a kill switch document: 'enabled' is 'false'")
    assert "agents refuse every action" in broken.line() and broken.as_dict()["readable"] is False
