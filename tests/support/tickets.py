"""What ticketing tests publish: results as the dispatcher or a Job's agent would, each with its
broker-validated ``user_id``, and a finding with hypotheses, evidence and an action to show."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import aio_pika

from schemas import (
    Evidence, Finding, Hypothesis, LifecycleEvent, Phase, ProposedAction, RiskClass, Severity, encode,
)
from schemas.routing import RESULTS, finding_key, lifecycle_key
from tests.support.identities import url_for, user

from dispatcher.plumbing.settings import load_settings
from dispatcher.tickets.service import TicketsService

CAUSE = "lock contention on table ledger"


def finding(investigation_id: str, phase: Phase = Phase.SHADOW, *, domain: str = "database") -> Finding:
    return Finding(
        investigation_id=investigation_id, incident_key="k" * 32, idempotency_key=f"{investigation_id}:finding",
        summary="Seven sessions wait on a lock held by pid 4242", probable_cause=CAUSE,
        confidence=0.82, phase=phase, severity=Severity.CRITICAL, domain=domain, reasoner="rules",
        hypotheses=(Hypothesis(cause="lock_contention", statement="pid 4242 holds a lock 7 sessions wait for",
                               score=0.82, evidence_for=(Evidence(source="postgres", query="blocking chains",
                                                                  excerpt="pid 4242 blocks 7"),)),),
        proposed_actions=(ProposedAction(action="terminate_backend", target="pid 4242", risk=RiskClass.MEDIUM),),
    )


async def publish_as(url: str, sender_user: str, exchange: str, key: str, body: bytes, message_id: str,
                     *, times: int = 1) -> None:
    """Publish ``times`` copies (a redelivery's worth), confirmed, as ``sender_user`` on ``url``."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        target = await channel.get_exchange(exchange)
        for _ in range(times):
            await target.publish(aio_pika.Message(body, message_id=message_id, user_id=sender_user,
                                                  content_type="application/json",
                                                  delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                                 key, mandatory=False, timeout=10)


async def lifecycle_by_dispatcher(url: str, event: LifecycleEvent, *, times: int = 1) -> None:
    await publish_as(url_for(url, "dispatcher"), user("dispatcher"), RESULTS, lifecycle_key(event.state),
                     encode(event), f"{event.investigation_id}:{event.state.value}", times=times)


async def finding_by(url: str, sender: tuple[str, str] | None, found: Finding, *, times: int = 1) -> None:
    """The finding, from that Job's agent user (``sender``: its name and URL) or, with None, the dispatcher."""
    name, target = (user("dispatcher"), url_for(url, "dispatcher")) if sender is None else sender
    await publish_as(target, name, RESULTS, finding_key(found.severity, found.domain, found.phase),
                     encode(found), found.idempotency_key, times=times)


@contextlib.asynccontextmanager
async def running_tickets(url: str, env: dict[str, str]) -> AsyncIterator[TicketsService]:
    """`agentjobs tickets` as the ticketing identity on ``url``'s vhost, configured by ``env``."""
    settings = load_settings(None, {**env, "AGENTJOBS_AMQP__URL": url_for(url, "ticketing")})
    service = TicketsService(settings, health_port=0)
    await service.start()
    try:
        yield service
    finally:
        await service.stop(drain=2)
