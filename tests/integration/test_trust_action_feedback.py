"""Per-action feedback through the real trust consumer over RabbitMQ (issue 18).

As in production: the dispatcher reports each investigation (``lifecycle.dispatched``), its
finding — with the actions the phase gate decided, one executed — arrives on the results
exchange, operators send verdicts naming one of those actions. Trust counts them per action
(``agentjobs_action_feedback_total`` and ``agentjobs phase explain``), dead-letters a verdict
naming an action the finding never proposed (``unknown_action``), and a harmful flag on the
executed action demotes the scope at once.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from dispatcher.cli.ops import trust_state
from dispatcher.plumbing.settings import load_settings
from dispatcher.trust.policy import ActionTally
from schemas import (
    Finding,
    LifecycleState,
    OperatorFeedback,
    Phase,
    PhaseChanged,
    PhasePin,
    ProposedAction,
    RiskClass,
    Severity,
    Verdict,
    encode,
)
from schemas.routing import PHASES, RESULTS, finding_key, lifecycle_key
from tests.integration.dispatcher_harness import Results, declare_topology
from tests.integration.test_dispatcher import _until
from tests.integration.test_trust import FAST_TRUST, running_trust
from tests.support.identities import url_for, user
from tests.support.trust_records import _publish_all, dispatched, send_feedback, send_pin

pytestmark = pytest.mark.integration
T0 = datetime(2026, 11, 27, 2, 0, tzinfo=UTC)
LIMITED = Phase.LIMITED_REMEDIATION
SCOPE = "database"


def _key(inv: str) -> str:
    return f"{inv}:terminate_backend:0123456789abcdef"


def _finding(inv: str) -> Finding:
    """A finding as the agent publishes it after the gate: one action executed, one proposed only."""
    executed = ProposedAction(
        action="terminate_backend", target="pid 4242 on database pg-0", risk=RiskClass.MEDIUM, executed=True,
        params={"pid": "4242", "decision": "execute", "outcome": "executed_verified",
                "idempotency_key": _key(inv)})
    proposed = ProposedAction(
        action="restart_deployment", target="deployment/checkout in namespace shop", risk=RiskClass.LOW,
        params={"deployment": "checkout", "namespace": "shop", "decision": "propose_only"})
    return Finding(investigation_id=inv, incident_key=f"key-{inv}", idempotency_key=f"{inv}:finding",
                   summary="lock chain", probable_cause="a session holds a lock", confidence=0.8, phase=LIMITED,
                   severity=Severity.CRITICAL, domain=SCOPE, reasoner="rules", proposed_actions=(executed, proposed),
                   produced_at=T0)


async def _record(url: str, investigations: list[str]) -> None:
    lifecycle = [(RESULTS, lifecycle_key(LifecycleState.DISPATCHED), encode(dispatched(inv, LIMITED)),
                  f"{inv}:dispatched", "lifecycle") for inv in investigations]
    await _publish_all(url_for(url, "dispatcher"), lifecycle, sender_user=user("dispatcher"))
    findings = [(RESULTS, finding_key(f.severity, f.domain, f.phase), encode(f), f.idempotency_key, "finding")
                for f in map(_finding, investigations)]
    await _publish_all(url_for(url, "dispatcher"), findings, sender_user=user("dispatcher"))


def _fb(n: int, inv: str, verdict: Verdict, **extra: object) -> OperatorFeedback:
    return OperatorFeedback(feedback_id=f"fb-{n}", investigation_id=inv, scope=SCOPE, phase=LIMITED,
                            verdict=verdict, at=T0 + timedelta(minutes=n), operator="alice", **extra)


def _counted(service) -> dict[tuple[str, str, str], float]:
    return {(s.labels["action"], s.labels["verdict"], s.labels["harmful"]): s.value
            for m in service.metrics.action_feedback.collect() for s in m.samples if s.name.endswith("_total")}


@pytest.fixture
async def url(amqp_vhost, rabbitmq_management):
    await rabbitmq_management.delete_vhost(amqp_vhost.name)
    await rabbitmq_management.create_vhost(amqp_vhost.name)
    await rabbitmq_management.set_permissions(amqp_vhost.name, "guest")
    await declare_topology(amqp_vhost.amqp_url, load_settings(None, {}))  # as the dispatcher
    return amqp_vhost.amqp_url


async def test_verdicts_on_actions_are_counted_per_action_unknown_ones_refused_and_harm_demotes(url):
    async with running_trust(url, FAST_TRUST) as trust, Results(url, exchange=PHASES) as phases, \
            Results(url, exchange="agentjobs.dead") as dead:
        # Given the scope in limited-remediation (an admin's pin, then unpinned: the policy acts again)
        await send_pin(url, PhasePin(command_id="pin-1", scope=SCOPE, phase=LIMITED, reason="let it act",
                                     operator="bob", at=T0))
        await send_pin(url, PhasePin(command_id="unpin-1", scope=SCOPE, phase=None, operator="bob", at=T0))
        await phases.wait_for(lambda: len(phases.messages) == 2)
        assert trust.state.ledger.phase_for(SCOPE) is LIMITED and not trust.state.ledger.is_pinned(SCOPE)
        # and four investigations whose findings executed terminate_backend and proposed restart_deployment
        await _record(url, ["inv-a", "inv-b", "inv-c", "inv-d"])

        # When operators override the executed action (naming that very execution), accept the proposed one,
        await send_feedback(url, [
            _fb(1, "inv-a", Verdict.ACTION_OVERRIDDEN, action="terminate_backend", action_key=_key("inv-a")),
            _fb(2, "inv-b", Verdict.ACCEPTED, action="restart_deployment"),
            # name an action the finding never proposed, and an execution that never happened,
            _fb(3, "inv-c", Verdict.ACTION_OVERRIDDEN, action="scale_deployment"),
            _fb(4, "inv-c", Verdict.ACTION_OVERRIDDEN, action="terminate_backend", action_key=_key("inv-a")),
        ])
        await dead.wait_for(lambda: len(dead.messages) == 2)
        await _until(lambda: trust.state.ledger.has_seen(SCOPE, "fb-2"))

        # Then the two real ones are counted per action, in the counter and in the window
        assert _counted(trust) == {("terminate_backend", "action_overridden", "false"): 1.0,
                                   ("restart_deployment", "accepted", "false"): 1.0}
        explained = trust.state.ledger.explain(SCOPE)
        assert explained.samples == 2 and explained.actions == (
            ActionTally(action="restart_deployment", feedbacks=1, modifications=0, overridden=0, harmful=0),
            ActionTally(action="terminate_backend", feedbacks=1, modifications=1, overridden=1, harmful=0))
        # and the other two are dead-lettered with the reason, never tallied
        assert [h["x-agentjobs-reason"] for *_, h in dead.messages] == ["unknown_action", "unknown_action"]
        assert not trust.state.ledger.has_seen(SCOPE, "fb-3") and not trust.state.ledger.has_seen(SCOPE, "fb-4")
        assert trust.state.refused_entries == 0  # refused at admission: nothing of it reached the log
        # and `agentjobs phase explain`, replaying the logs as an operator, shows the same per-action counts
        operator = load_settings(None, {**FAST_TRUST, "AGENTJOBS_AMQP__URL": url_for(url, "operator")})
        shown = (await trust_state(operator)).ledger.explain(SCOPE)
        assert shown.actions == explained.actions
        assert "action terminate_backend: 1 verdict(s) in the window, 1 overridden, 0 harmful, 1 modified" \
            in shown.notes

        # When an operator flags the executed action of another investigation harmful
        await send_feedback(url, [_fb(5, "inv-d", Verdict.REJECTED, action="terminate_backend", harmful=True,
                                      action_key=_key("inv-d"))])
        # Then the scope is demoted at once, as any harmful flag demotes
        await phases.wait_for(lambda: len(phases.messages) == 3)
        change = phases.messages[2][2]
        assert isinstance(change, PhaseChanged)
        assert (change.from_phase, change.to_phase, change.reason) == (LIMITED, Phase.READ_ONLY, "harmful_action")
        assert _counted(trust)[("terminate_backend", "rejected", "true")] == 1.0

    # and a replay of the logs agrees (the new phase's window starts empty)
    replayed = await trust_state(operator)
    assert replayed.ledger.phase_for(SCOPE) is Phase.READ_ONLY and replayed.ledger.explain(SCOPE).actions == ()
    assert replayed.ledger.snapshot() == trust.state.ledger.snapshot()
