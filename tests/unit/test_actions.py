"""The phase gate: what may run is decided by the registry and the phase, never by the proposer."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.reasoning.actions import (
    REGISTRY,
    Decision,
    Execution,
    allowed_risks,
    canonical,
    decide,
    gate,
    screen,
)
from schemas import Phase, ProposedAction, RiskClass


class RecordingExecutor:
    """Carries out nothing; records what it was asked to do (a double of the Executor port)."""

    def __init__(self, *, fail: bool = False) -> None:
        self.done: list[ProposedAction] = []
        self.fail = fail

    async def execute(self, action: ProposedAction) -> Execution:
        self.done.append(action)
        if self.fail:
            raise RuntimeError("deployment not found")
        return Execution(ok=True, before="restartedAt=none", after="restartedAt=2026-11-26T02:06:00Z",
                         undo=f"nothing to undo for {action.action}")


def proposal(action: str, risk: RiskClass = RiskClass.LOW, **params: str) -> ProposedAction:
    return ProposedAction(action=action, target="deployment/checkout-api in namespace shop", risk=risk,
                          params=params)


def every_action() -> list[ProposedAction]:
    return [proposal(name) for name in REGISTRY]


def executors_for_all() -> dict[str, RecordingExecutor]:
    return {name: RecordingExecutor() for name in REGISTRY}


@pytest.mark.parametrize("phase", [Phase.SHADOW, Phase.READ_ONLY])
async def test_shadow_and_read_only_execute_nothing_even_with_executors(phase: Phase) -> None:
    executors = executors_for_all()
    gated = await gate(every_action(), phase, executors=executors)
    assert len(gated) == len(REGISTRY)
    assert not any(a.executed for a in gated)
    assert all(not e.done for e in executors.values())


async def test_shadow_records_what_it_would_have_done() -> None:
    [a] = await gate([proposal("restart_deployment")], Phase.SHADOW)
    assert a.params["decision"] == "record_only"
    [b] = await gate([proposal("restart_deployment")], Phase.READ_ONLY)
    assert b.params["decision"] == "propose_only"


async def test_limited_remediation_executes_only_low_risk_actions() -> None:
    gated = await gate(every_action(), Phase.LIMITED_REMEDIATION, executors=executors_for_all())
    executed = {a.action for a in gated if a.executed}
    assert executed == {n for n, s in REGISTRY.items() if s.risk is RiskClass.LOW}
    assert executed == {"restart_deployment", "delete_pod"}


async def test_autonomous_executes_low_and_medium_but_never_high() -> None:
    gated = await gate(every_action(), Phase.AUTONOMOUS, executors=executors_for_all())
    by_name = {a.action: a for a in gated}
    assert by_name["terminate_idle_backends"].executed and by_name["scale_deployment"].executed
    assert not by_name["failover_database"].executed
    assert by_name["failover_database"].params["decision"] == "never_automatic"


async def test_an_allowed_action_without_an_executor_is_only_proposed() -> None:
    [a] = await gate([proposal("restart_deployment")], Phase.AUTONOMOUS)
    assert not a.executed and a.params["decision"] == "no_executor"


async def test_unknown_actions_are_dropped_with_a_note() -> None:
    kept, notes = screen([proposal("drop_database"), proposal("restart_deployment")])
    assert [a.action for a in kept] == ["restart_deployment"]
    assert notes == ("dropped proposed action 'drop_database': not in the action registry",)
    assert [a.action for a in await gate([proposal("drop_database")], Phase.AUTONOMOUS)] == []


async def test_the_registry_not_the_proposer_decides_the_risk() -> None:
    # Given a proposer that calls a failover "low risk"
    executors = executors_for_all()
    [a] = await gate([proposal("failover_database", RiskClass.LOW)], Phase.AUTONOMOUS, executors=executors)
    # Then the registry's class applies and it does not run
    assert a.risk is RiskClass.HIGH and not a.executed
    assert executors["failover_database"].done == []


async def test_a_proposers_executed_flag_is_ignored() -> None:
    claimed = ProposedAction(action="terminate_backend", target="pid 1", risk=RiskClass.LOW, executed=True)
    [a] = await gate([claimed], Phase.READ_ONLY)
    assert not a.executed and a.risk is RiskClass.MEDIUM


async def test_executed_actions_record_before_after_and_how_to_undo() -> None:
    executor = RecordingExecutor()
    [a] = await gate([proposal("restart_deployment")], Phase.LIMITED_REMEDIATION,
                     executors={"restart_deployment": executor})
    assert a.executed and len(executor.done) == 1
    assert a.params["before"] == "restartedAt=none" and a.params["after"].startswith("restartedAt=2026")
    assert a.params["undo"] == "nothing to undo for restart_deployment"


async def test_a_failing_executor_leaves_the_action_unexecuted_with_the_error() -> None:
    [a] = await gate([proposal("delete_pod")], Phase.LIMITED_REMEDIATION,
                     executors={"delete_pod": RecordingExecutor(fail=True)})
    assert not a.executed and a.params["error"] == "RuntimeError: deployment not found"


def test_aliases_and_spelling_map_to_registered_actions() -> None:
    assert canonical("rollout_restart") == "restart_deployment"
    assert canonical("Terminate-Idle-Backends") == "terminate_idle_backends"
    assert canonical("rm -rf /") is None


async def test_duplicate_proposals_are_kept_once() -> None:
    kept, _ = screen([proposal("delete_pod", pod="a"), proposal("delete_pod", pod="a"),
                      proposal("delete_pod", pod="b")])
    assert [a.params["pod"] for a in kept] == ["a", "b"]


def test_allowed_risks_grow_with_the_phase_and_never_include_high() -> None:
    ladder = [allowed_risks(p) for p in sorted(Phase, key=lambda p: p.rank)]
    assert ladder == [frozenset(), frozenset(), frozenset({RiskClass.READ, RiskClass.LOW}),
                      frozenset({RiskClass.READ, RiskClass.LOW, RiskClass.MEDIUM})]
    assert all(lower <= higher for lower, higher in zip(ladder, ladder[1:], strict=False))


@given(phase=st.sampled_from(list(Phase)), action=st.sampled_from(sorted(REGISTRY)),
       executors=st.sets(st.sampled_from(sorted(REGISTRY))))
def test_execution_is_never_beyond_the_phase(phase: Phase, action: str, executors: set[str]) -> None:
    decision = decide(action, phase, executors=executors)
    if decision is Decision.EXECUTE:
        assert REGISTRY[action].risk in allowed_risks(phase)
        assert REGISTRY[action].risk is not RiskClass.HIGH
        assert phase in (Phase.LIMITED_REMEDIATION, Phase.AUTONOMOUS) and action in executors
