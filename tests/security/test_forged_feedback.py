"""Attacks 1 and 2 of the issue-17 review, against the trust consumer on the real broker.

1. A forged ``PhasePin(scope=redteam, phase=autonomous)`` — as the broker administrator
   (``guest``), as the bridge's user, as an agent-shaped user, as an operator (not an admin) —
   moves nothing: the broker refuses it where the sender has no write, and what does reach the
   trust consumer is dead-lettered ``forbidden_sender`` (who sent it, who may), counted, never
   applied. An admin's pin still works.
2. Backdated ``accepted`` feedback for investigations that never existed — 2,000 of them, from a
   real operator, stamped from 30 days ago up to now, one set per phase — changes no phase: each
   is dead-lettered ``unknown_investigation``. For a real investigation, a verdict naming another
   scope or phase is refused; a verdict before its finding is refused; a finding or
   ``lifecycle.dispatched`` from someone else is refused; a correction replaces the verdict
   (n stays 1); and backdating a real verdict cannot skip the dwell (time is the trust consumer's
   clock at admission).

Genuine verdicts on real findings still promote exactly as the policy says
(``tests/integration/test_trust.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta

import aio_pika
import aiormq
import pytest

from dispatcher.plumbing.settings import load_settings
from dispatcher.trust.policy import Blocker
from dispatcher.trust.service import TrustService
from schemas import (
    DeadLetter,
    LifecycleState,
    OperatorFeedback,
    Phase,
    PhasePin,
    Verdict,
    decode,
    encode,
    utcnow,
)
from schemas.routing import DEAD, FEEDBACK, RESULTS, finding_key, lifecycle_key
from tests.integration.dispatcher_harness import declare_topology
from tests.support.identities import agent_user, grant_all, url_for, user
from tests.support.trust_records import (
    dispatched,
    finding,
    job_name,
    record_investigations,
    send_feedback,
    send_pin,
)

pytestmark = [pytest.mark.security, pytest.mark.integration]
REFUSED = (aiormq.exceptions.ChannelAccessRefused, aiormq.exceptions.ChannelPreconditionFailed,
           aio_pika.exceptions.ChannelClosed)
FAST = {  # 5 clean verdicts promote; no dwell, no cool-down (unless a test says otherwise)
    "AGENTJOBS_TRUST__CONFIDENCE_Z": "1.96",
    "AGENTJOBS_TRUST__MIN_SAMPLES": "5",
    "AGENTJOBS_TRUST__WINDOW": "200",
    "AGENTJOBS_TRUST__PROMOTE_THRESHOLD": "0.45",
    "AGENTJOBS_TRUST__DEMOTE_THRESHOLD": "0.6",
    "AGENTJOBS_TRUST__MIN_DWELL": "0",
    "AGENTJOBS_TRUST__COOLDOWN": "0",
    "AGENTJOBS_TRUST__SNAPSHOT_EVERY": "0",
    "AGENTJOBS_METRICS__PORT": "0",
}


@pytest.fixture
async def url(amqp_vhost, rabbitmq_management):
    """An emptied vhost with every identity's grants and the topology (the admin URL: for attacks)."""
    await rabbitmq_management.delete_vhost(amqp_vhost.name)
    await rabbitmq_management.create_vhost(amqp_vhost.name)
    await rabbitmq_management.set_permissions(amqp_vhost.name, "guest")
    await declare_topology(amqp_vhost.amqp_url, load_settings(None, {}))
    return amqp_vhost.amqp_url


@contextlib.asynccontextmanager
async def running_trust(url: str, **env: str):
    service = TrustService(load_settings(None, {**FAST, **env, "AGENTJOBS_AMQP__URL": url_for(url, "trust")}),
                           health_port=0)
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


def _refused(trust: TrustService, reason: str, kind: str) -> float:
    return trust.metrics.refused.labels(reason=reason, kind=kind)._value.get()


async def _dead_letters(url: str, n: int, *, timeout: float = 60) -> list[tuple[str, DeadLetter]]:
    """Take ``n`` dead letters from ``agentjobs.dead``: (reason header, record)."""
    out: list[tuple[str, DeadLetter]] = []
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(DEAD)
        async with asyncio.timeout(timeout):
            while len(out) < n:
                message = await queue.get(no_ack=True, fail=False)
                if message is None:
                    await asyncio.sleep(0.05)
                    continue
                headers = message.headers or {}
                record = decode(str(headers["x-agentjobs-dead-letter"]).encode(), DeadLetter)
                out.append((str(headers["x-agentjobs-reason"]), record))
        await asyncio.sleep(0.3)
        assert await queue.get(no_ack=True, fail=False) is None, "more dead letters than expected"
    return out


async def _publish(url: str, exchange: str, key: str, body: bytes, *, user_id: str | None,
                   message_id: str = "") -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        target = await channel.get_exchange(exchange, ensure=False)
        await target.publish(aio_pika.Message(body, user_id=user_id, message_id=message_id or None,
                                              content_type="application/json"), key, timeout=10)


def _pin(command_id: str, scope: str = "redteam") -> bytes:
    return encode(PhasePin(command_id=command_id, scope=scope, phase=Phase.AUTONOMOUS, reason="attacker",
                           operator="attacker", at=utcnow()))


def _verdict(n: int, investigation_id: str, *, scope: str = "database", phase: Phase = Phase.SHADOW,
             verdict: Verdict = Verdict.ACCEPTED, ago: timedelta = timedelta(0)) -> OperatorFeedback:
    return OperatorFeedback(feedback_id=f"fb-{investigation_id}-{n}", investigation_id=investigation_id, scope=scope,
                            phase=phase, verdict=verdict, at=utcnow() - ago, operator="alice")


async def test_forged_pins_move_nothing_and_are_dead_lettered_forbidden_sender(url, amqp_vhost, rabbitmq_management):
    vhost = amqp_vhost.name
    async with running_trust(url) as trust, agent_user(rabbitmq_management, vhost, "aj-redteam") as (agent, agent_url):
        # The bridge's own credentials cannot even publish to agentjobs.feedback: the broker refuses.
        with pytest.raises(REFUSED):
            await _publish(url_for(url, "bridge"), FEEDBACK, "pin.redteam", _pin("by-bridge-0"),
                           user_id=user("bridge"))
        # Nor can an operator send on pin.*, nor anyone claim to be the admin (user_id is checked).
        with pytest.raises(REFUSED):
            await _publish(url_for(url, "operator"), FEEDBACK, "pin.redteam", _pin("by-operator-0"),
                           user_id=user("operator"))
        with pytest.raises(REFUSED):
            await _publish(url, FEEDBACK, "pin.redteam", _pin("claiming-admin"), user_id=user("admin"))
        # What does reach the trust consumer: the broker administrator (with and without user_id),
        # the bridge's and an agent's users given write by mistake, and an operator on feedback.*.
        for name in (user("bridge"), agent):
            await rabbitmq_management.set_permissions(vhost, name, configure="", write=".*", read="")
        try:
            await _publish(url, FEEDBACK, "pin.redteam", _pin("by-guest"), user_id=None, message_id="by-guest")
            await _publish(url, FEEDBACK, "pin.redteam", _pin("by-guest-id"), user_id="guest",
                           message_id="by-guest-id")
            await _publish(url_for(url, "bridge"), FEEDBACK, "pin.redteam", _pin("by-bridge"),
                           user_id=user("bridge"), message_id="by-bridge")
            await _publish(agent_url, FEEDBACK, "pin.redteam", _pin("by-agent"), user_id=agent, message_id="by-agent")
            await _publish(url_for(url, "operator"), FEEDBACK, "feedback.redteam", _pin("by-operator"),
                           user_id=user("operator"), message_id="by-operator")
        finally:
            await grant_all(rabbitmq_management, vhost)  # the bridge's real grant back
        dead = await _dead_letters(url, 5)

        # Then nothing moved, and each was dead-lettered forbidden_sender, saying who sent it and who may
        assert trust.state.ledger.phases() == {}
        assert trust.state.decided == {} and trust.state.published == {}
        assert {reason for reason, _ in dead} == {"forbidden_sender"}
        by_id = {record.message_id: record for _, record in dead}
        assert set(by_id) == {"by-guest", "by-guest-id", "by-bridge", "by-agent", "by-operator"}
        assert "a sender without user_id" in by_id["by-guest"].message
        for message_id, sender in (("by-guest-id", "guest"), ("by-bridge", user("bridge")), ("by-agent", agent),
                                   ("by-operator", user("operator"))):
            assert f"{sender!r} may not send phase pins" in by_id[message_id].message
            assert f"allowed: {user('admin')}" in by_id[message_id].message
        assert all(record.component == "trust" for record in by_id.values())
        assert _refused(trust, "forbidden_sender", "phase_pin") == 5

        # while an admin's pin still works
        await send_pin(url, PhasePin(command_id="real", scope="redteam", phase=Phase.READ_ONLY, reason="drill",
                                     operator="bob", at=utcnow()))
        async with asyncio.timeout(15):
            while trust.state.ledger.phase_for("redteam") is not Phase.READ_ONLY:
                await asyncio.sleep(0.02)
        assert trust.state.ledger.is_pinned("redteam")


async def test_2000_backdated_accepted_verdicts_for_made_up_investigations_change_no_phase(url):
    now = utcnow()
    fakes = [OperatorFeedback(feedback_id=f"fb-fake-{phase.value}-{n}", investigation_id=f"fake-{n}",
                              scope="redteam", phase=phase, verdict=Verdict.ACCEPTED,
                              at=now - timedelta(days=30) + timedelta(seconds=n * 5184), operator="attacker")
             for phase in Phase for n in range(500)]
    assert len(fakes) == 2000
    async with running_trust(url) as trust:
        await send_feedback(url, fakes)  # a real operator's credentials
        dead = await _dead_letters(url, len(fakes), timeout=180)
        assert {reason for reason, _ in dead} == {"unknown_investigation"}
        assert _refused(trust, "unknown_investigation", "feedback") == len(fakes)
        assert trust.state.ledger.phases() == {}  # not even a scope was created
        assert trust.state.ledger.explain("redteam").samples == 0
        assert trust.state.decided == {}
        assert "fake-7" in next(record.message for _, record in dead if record.message_id == "fb-fake-shadow-7")


async def test_verdicts_must_match_the_investigation_trust_recorded(url, amqp_vhost, rabbitmq_management):
    async with running_trust(url) as trust, \
            agent_user(rabbitmq_management, amqp_vhost.name, job_name("inv-real")) as (agent, agent_password_url), \
            agent_user(rabbitmq_management, amqp_vhost.name, "aj-another-job") as (other_agent, other_url):
        # Given a real investigation in scope database, phase shadow, whose own agent published the finding
        from urllib.parse import unquote, urlsplit

        password = unquote(urlsplit(agent_password_url).password or "")
        await record_investigations(url, [("inv-real", "database", Phase.SHADOW)], agent={"inv-real": (agent, password)})
        # and one dispatched whose finding only another Job's agent claims to have published
        await _publish(url_for(url, "dispatcher"), RESULTS, lifecycle_key(LifecycleState.DISPATCHED),
                       encode(dispatched("inv-nofinding", Phase.SHADOW)), user_id=user("dispatcher"))
        forged_finding = finding("inv-nofinding", "database", Phase.SHADOW)
        await _publish(other_url, RESULTS, finding_key(forged_finding.severity, "database", Phase.SHADOW),
                       encode(forged_finding), user_id=other_agent, message_id="forged-finding")
        # and a lifecycle.dispatched forged by an agent
        await _publish(other_url, RESULTS, lifecycle_key(LifecycleState.DISPATCHED),
                       encode(dispatched("inv-forged", Phase.AUTONOMOUS)), user_id=other_agent,
                       message_id="forged-dispatched")
        refused = await _dead_letters(url, 2)
        assert sorted((reason, r.message_id) for reason, r in refused) == \
            [("forbidden_sender", "forged-dispatched"), ("forbidden_sender", "forged-finding")]
        assert trust.state.investigations.get("inv-forged") is None
        assert _refused(trust, "forbidden_sender", "lifecycle") == 1
        assert _refused(trust, "forbidden_sender", "finding") == 1

        # When an operator names another scope, another phase, a Job without a finding, or none at all
        await send_feedback(url, [
            _verdict(1, "inv-real", scope="payments"),
            _verdict(2, "inv-real", phase=Phase.AUTONOMOUS),
            _verdict(3, "inv-nofinding"),
            _verdict(4, "inv-forged", phase=Phase.AUTONOMOUS),
        ])
        dead = await _dead_letters(url, 4)
        # Then each is refused with its reason, and nothing is tallied
        assert sorted((r.message_id, reason) for reason, r in dead) == [
            ("fb-inv-forged-4", "unknown_investigation"),
            ("fb-inv-nofinding-3", "no_finding"),
            ("fb-inv-real-1", "scope_mismatch"),
            ("fb-inv-real-2", "phase_mismatch"),
        ]
        detail = {r.message_id: r.message for _, r in dead}
        assert "'payments'" in detail["fb-inv-real-1"] and "'database'" in detail["fb-inv-real-1"]
        assert "autonomous" in detail["fb-inv-real-2"] and "shadow" in detail["fb-inv-real-2"]
        for scope in ("database", "payments"):
            assert trust.state.ledger.explain(scope).samples == 0

        # And the matching verdict counts once; a correction replaces it (n stays 1)
        await send_feedback(url, [_verdict(5, "inv-real")])
        async with asyncio.timeout(15):
            while trust.state.ledger.explain("database").samples != 1:
                await asyncio.sleep(0.02)
        await send_feedback(url, [_verdict(6, "inv-real", verdict=Verdict.REJECTED)])
        async with asyncio.timeout(15):
            while not trust.state.ledger.has_seen("database", "fb-inv-real-6"):
                await asyncio.sleep(0.02)
        explained = trust.state.ledger.explain("database")
        assert (explained.samples, explained.modifications) == (1, 1)
        assert trust.state.ledger.phase_for("database") is Phase.SHADOW


async def test_backdated_verdicts_on_real_findings_cannot_skip_the_dwell(url):
    investigations = [(f"inv-dwell-{n}", "database", Phase.SHADOW) for n in range(8)]
    async with running_trust(url, AGENTJOBS_TRUST__MIN_DWELL="3600") as trust:
        await record_investigations(url, investigations)
        # Clean verdicts from a real operator, stamped as if the scope had been in shadow for weeks
        await send_feedback(url, [_verdict(n, inv, ago=timedelta(days=29) - timedelta(hours=n))
                                  for n, (inv, _, _) in enumerate(investigations)])
        async with asyncio.timeout(30):
            while trust.state.ledger.explain("database").samples != len(investigations):
                await asyncio.sleep(0.02)
        explained = trust.state.ledger.explain("database")
        # Then they count — at their admission times, so the dwell has barely begun
        assert explained.phase is Phase.SHADOW
        assert explained.promote_blockers == (Blocker.DWELL,)
        assert explained.time_in_phase_s < 600
        assert trust.state.decided == {}
