"""A restarted trust consumer starts from the newest snapshot and replays only the log after it —
with exactly the state a full replay gives; a snapshot that does not fit is ignored, and said so.

The consumer runs as the trust identity; each verdict is on an investigation the dispatcher
reported and a finding was published for, so the log holds those records too."""

from __future__ import annotations

import pytest

from dispatcher.cli.ops import trust_state
from dispatcher.plumbing.settings import load_settings
from schemas import Verdict
from tests.integration.dispatcher_harness import declare_topology
from tests.integration.test_dispatcher import _until
from tests.integration.test_trust import FAST_TRUST, _feedback, _send_feedback, running_trust
from tests.support.identities import url_for

pytestmark = pytest.mark.integration
EVERY = 40  # a snapshot after this many feedback-log entries


def _story() -> list:
    """Two scopes; one is promoted, then more feedback of both kinds arrives."""
    out = [_feedback(n, "database") for n in range(60)]
    out += [_feedback(100 + n, "network", Verdict.MODIFIED if n % 3 == 0 else Verdict.ACCEPTED) for n in range(45)]
    return out


def _state(service) -> dict:
    ledger = service.state.ledger
    return {"phases": ledger.phases(), "explain": {s: ledger.explain(s) for s in ledger.phases()},
            "ledger": ledger.snapshot(), "decided": service.state.decided}


@pytest.fixture
async def url(amqp_vhost, rabbitmq_management):
    await rabbitmq_management.delete_vhost(amqp_vhost.name)
    await rabbitmq_management.create_vhost(amqp_vhost.name)
    await rabbitmq_management.set_permissions(amqp_vhost.name, "guest")
    await declare_topology(amqp_vhost.amqp_url, load_settings(None, {}))  # as the dispatcher
    return amqp_vhost.amqp_url


async def test_a_restart_replays_only_what_came_after_the_snapshot_and_ends_in_the_same_state(url):
    env = {**FAST_TRUST, "AGENTJOBS_TRUST__SNAPSHOT_EVERY": str(EVERY)}
    story = _story()
    # Given a trust consumer that tallied a story, snapshotting every EVERY entries
    async with running_trust(url, env) as first:
        await _send_feedback(url, story)
        await _until(lambda: sum(s.value for m in first.metrics.feedback.collect() for s in m.samples
                                 if s.name.endswith("_total")) == len(story), timeout=60)
        before = _state(first)
    assert before["phases"]["database"].value != "shadow"  # the story did promote
    # When it restarts
    async with running_trust(url, env) as restarted:
        after = _state(restarted)
        replayed = restarted._feedback_log.applied
    # Then it read the snapshot and replayed only the tail of the log, into the same state
    assert 0 < replayed < len(story) // 2, replayed
    assert after == before
    # and `agentjobs phase show|explain` reads the same state the same way, as an operator (read only:
    # it may not even write a stream marker)
    shown = await trust_state(load_settings(None, {**env, "AGENTJOBS_AMQP__URL": url_for(url, "operator")}))
    assert shown.ledger.snapshot() == before["ledger"] and shown.decided == before["decided"]
    # and a consumer without snapshots, replaying everything, agrees
    async with running_trust(url, {**FAST_TRUST, "AGENTJOBS_TRUST__SNAPSHOT_EVERY": "0"}) as full:
        assert full._feedback_log.applied >= len(story)
        assert _state(full) == before


async def test_a_snapshot_taken_under_other_settings_is_ignored_and_the_whole_log_replayed(url):
    env = {**FAST_TRUST, "AGENTJOBS_TRUST__SNAPSHOT_EVERY": str(EVERY)}
    story = _story()
    async with running_trust(url, env) as first:
        await _send_feedback(url, story)
        await _until(lambda: first._feedback_log.applied >= len(story), timeout=60)
    # When the policy changes (a smaller window), the old snapshot must not stand for the log
    changed = {**env, "AGENTJOBS_TRUST__WINDOW": "30"}
    async with running_trust(url, changed) as restarted:
        assert restarted._feedback_log.applied >= len(story)  # everything replayed
        explained = restarted.state.ledger.explain("network")
    assert explained.samples <= 30


async def test_a_snapshot_not_written_by_trust_is_never_restored(url):
    import aio_pika
    import msgspec

    from dispatcher.trust import snapshots
    from schemas.routing import TRUST_SNAPSHOTS
    from tests.support.identities import user

    env = {**FAST_TRUST, "AGENTJOBS_TRUST__SNAPSHOT_EVERY": str(EVERY)}
    async with running_trust(url, env) as first:
        await _send_feedback(url, _story())
        await _until(lambda: first._feedback_log.applied >= EVERY, timeout=60)
    connection = await aio_pika.connect_robust(url)  # the broker administrator, who may write any queue
    async with connection:
        real = await snapshots.newest(connection, timeout=10, writers=frozenset({user("trust")}))
        assert real is not None
        forged = msgspec.structs.replace(real, applied=999_999)
        channel = await connection.channel(publisher_confirms=True)
        await channel.default_exchange.publish(aio_pika.Message(
            snapshots.encode_snapshot(forged), type=snapshots.SNAPSHOT_TYPE, message_id="forged",
            content_type=snapshots.CONTENT_TYPE), TRUST_SNAPSHOTS)
        # the newest entry of the stream is the forgery, but only trust's own snapshot counts
        assert (await snapshots.newest(connection, timeout=10)).applied == 999_999
        restored = await snapshots.newest(connection, timeout=10, writers=frozenset({user("trust")}))
    assert restored == real
