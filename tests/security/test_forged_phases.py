"""Attack 1 of the issue-17 review: phase changes from anyone who can reach the broker.

A raw ``PhaseChanged(scope=forged, to=autonomous)`` published to ``agentjobs.phases`` was applied
by every dispatcher. Now the broker refuses it from identities without write there (the
bridge), and where a sender does get it onto the phase log (the broker administrator, or a user
given write by mistake — here one named like a Vault-issued agent user), the dispatcher's phase
source refuses it by its broker-validated ``user_id``: only the trust identity moves phases.
"""

from __future__ import annotations

import secrets
import uuid

import aio_pika
import aiormq
import pytest

from dispatcher.intake.phases import LoggedPhases
from dispatcher.plumbing.amqp import broker_user, connect
from dispatcher.plumbing.streamlog import StreamFollower
from schemas import Phase, PhaseChanged, encode, utcnow
from schemas.routing import PHASE_LOG, PHASES
from tests.support.identities import with_credentials

pytestmark = [pytest.mark.security, pytest.mark.integration]


def _change(scope: str, to: Phase) -> bytes:
    return encode(PhaseChanged(scope=scope, from_phase=Phase.SHADOW, to_phase=to, at=utcnow(),
                               reason="forged" if scope != "real" else "promoted"))


async def _publish(url: str, body: bytes, *, user_id: str | None) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(PHASES, ensure=False)
        await exchange.publish(aio_pika.Message(body, user_id=user_id), "phase.x", timeout=10)


async def test_only_the_trust_identity_moves_a_phase(broker_identities, amqp_vhost, rabbitmq_management):
    ids = broker_identities
    # An agent-shaped user that was (wrongly) given write on agentjobs.phases.
    agent_user = f"token-aj-redteam-{secrets.token_hex(8)}-{uuid.uuid4()}"
    password = secrets.token_urlsafe(12)
    await rabbitmq_management.create_user(agent_user, password)
    await rabbitmq_management.set_permissions(amqp_vhost.name, agent_user, configure="", write=".*", read="")
    try:
        # The bridge's own credential cannot even publish there: the broker closes the channel.
        with pytest.raises((aiormq.exceptions.ChannelAccessRefused, aio_pika.exceptions.ChannelClosed)):
            await _publish(ids.url("bridge"), _change("forged-by-bridge", Phase.AUTONOMOUS),
                           user_id=ids.user("bridge"))
        # Claiming to be trust is refused by the broker itself (user_id must be the connection's user).
        with pytest.raises((aiormq.exceptions.ChannelPreconditionFailed, aio_pika.exceptions.ChannelClosed)):
            await _publish(amqp_vhost.amqp_url, _change("forged-claiming-trust", Phase.AUTONOMOUS),
                           user_id=ids.user("trust"))
        # These reach the log: the broker administrator (guest) and the agent-shaped user.
        await _publish(amqp_vhost.amqp_url, _change("forged-by-guest", Phase.AUTONOMOUS), user_id=None)
        await _publish(amqp_vhost.amqp_url, _change("forged-by-guest-id", Phase.AUTONOMOUS),
                       user_id=broker_user(amqp_vhost.amqp_url))
        await _publish(with_credentials(amqp_vhost.amqp_url, agent_user, password),
                       _change("forged-by-agent", Phase.AUTONOMOUS), user_id=agent_user)
        # And the one real change.
        await _publish(ids.url("trust"), _change("real", Phase.READ_ONLY), user_id=ids.user("trust"))

        phases = LoggedPhases(Phase.SHADOW, trust_user=ids.user("trust"))
        follower = StreamFollower(PHASE_LOG, phases.on_log_entry, name="security-phase-log")
        connection = await connect(ids.settings("dispatcher").amqp, name="security-test")
        try:
            await follower.start(connection)
            await follower.catch_up(connection, timeout=10)
        finally:
            await follower.stop()
            await connection.close()
    finally:
        await rabbitmq_management.delete_user(agent_user)

    assert phases.phases() == {"real": Phase.READ_ONLY}
    assert phases.refused == 3
    for scope in ("forged-by-guest", "forged-by-guest-id", "forged-by-agent", "forged-by-bridge"):
        assert phases.phase_for(scope) is Phase.SHADOW  # the least-privileged default, untouched
