"""Attack 1 of the issue-17 review: phase changes from anyone who can reach the broker.

A raw ``PhaseChanged(scope=forged, to=autonomous)`` published to ``agentjobs.phases`` was applied
by every dispatcher. Now the broker refuses it from identities without write there (the bridge,
operators), and where a sender does get it onto the phase log (the broker administrator, or a user
given write by mistake — here one named like a Vault-issued agent user), the dispatcher's phase
source refuses it by its broker-validated ``user_id``: only the trust identity moves phases.
"""

from __future__ import annotations

import aio_pika
import aiormq
import pytest

from dispatcher.intake.phases import LoggedPhases
from dispatcher.plumbing.amqp import broker_user
from dispatcher.plumbing.streamlog import StreamFollower
from schemas import Phase, PhaseChanged, encode, utcnow
from schemas.routing import PHASE_LOG, PHASES
from tests.integration.dispatcher_harness import declare_topology
from tests.integration.k8s_helpers import settings_for
from tests.support.identities import agent_user, user

pytestmark = [pytest.mark.security, pytest.mark.integration]
REFUSED = (aiormq.exceptions.ChannelAccessRefused, aiormq.exceptions.ChannelPreconditionFailed,
           aio_pika.exceptions.ChannelClosed)


def _change(scope: str, to: Phase) -> bytes:
    return encode(PhaseChanged(scope=scope, from_phase=Phase.SHADOW, to_phase=to, at=utcnow(),
                               reason="forged" if scope != "real" else "promoted"))


async def _publish(url: str, body: bytes, *, user_id: str | None) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(PHASES, ensure=False)
        await exchange.publish(aio_pika.Message(body, user_id=user_id), "phase.x", timeout=10)


async def test_only_the_trust_identity_moves_a_phase(amqp_vhost, rabbitmq_management):
    await declare_topology(amqp_vhost.amqp_url, settings_for("ns"))
    async with agent_user(rabbitmq_management, amqp_vhost.name, "aj-redteam") as (agent, agent_url):
        # (given write on agentjobs.phases by mistake)
        await rabbitmq_management.set_permissions(amqp_vhost.name, agent, configure="", write=".*", read="")
        # The bridge's and an operator's own credentials cannot even publish there: the broker refuses.
        for component in ("bridge", "operator", "admin"):
            with pytest.raises(REFUSED):
                await _publish(amqp_vhost.url(component), _change(f"forged-by-{component}", Phase.AUTONOMOUS),
                               user_id=user(component))
        # Claiming to be trust is refused by the broker itself (user_id must be the connection's user).
        with pytest.raises(REFUSED):
            await _publish(amqp_vhost.amqp_url, _change("forged-claiming-trust", Phase.AUTONOMOUS),
                           user_id=user("trust"))
        # These reach the log: the broker administrator (guest), with and without user_id, and the agent.
        await _publish(amqp_vhost.amqp_url, _change("forged-by-guest", Phase.AUTONOMOUS), user_id=None)
        await _publish(amqp_vhost.amqp_url, _change("forged-by-guest-id", Phase.AUTONOMOUS),
                       user_id=broker_user(amqp_vhost.amqp_url))
        await _publish(agent_url, _change("forged-by-agent", Phase.AUTONOMOUS), user_id=agent)
        # And the one real change.
        await _publish(amqp_vhost.url("trust"), _change("real", Phase.READ_ONLY), user_id=user("trust"))

    # The dispatcher's phase source, reading the log as the dispatcher does.
    phases = LoggedPhases(Phase.SHADOW, trust_user=user("trust"))
    follower = StreamFollower(PHASE_LOG, phases.on_log_entry, name="security-phase-log")
    connection = await aio_pika.connect_robust(amqp_vhost.url("dispatcher"))
    try:
        await follower.start(connection)
        await follower.catch_up(connection, timeout=10)
    finally:
        await follower.stop()
        await connection.close()

    assert phases.phases() == {"real": Phase.READ_ONLY}
    assert phases.refused == 3
    for scope in ("forged-by-guest", "forged-by-guest-id", "forged-by-agent", "forged-by-bridge",
                  "forged-by-operator", "forged-claiming-trust"):
        assert phases.phase_for(scope) is Phase.SHADOW  # the least-privileged default, untouched
