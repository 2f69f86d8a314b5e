"""Earned autonomy end to end: feedback → trust consumer → phase log → the next Job's grants.

Real RabbitMQ (queues, streams), a real OpenBao configured by ``vault bootstrap``,
the Kubernetes API emulator behind the real client. Trust settings are shrunk
(5 clean feedbacks promote, no dwell or cool-down) so a promotion takes seconds.

Every component runs as its own broker identity: the trust consumer as trust, the
dispatcher as the dispatcher; verdicts come from an operator, pins from an admin, and
each investigation given feedback on was first dispatched (``lifecycle.dispatched`` from
the dispatcher) and found (``tests/support/trust_records.py``), as in production.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from datetime import UTC, datetime, timedelta

import aio_pika
import hvac
import msgspec
import pytest

from dispatcher.jobs import jobspec
from dispatcher.plumbing.settings import load_settings
from schemas.routing import FEEDBACK, FEEDBACK_LOG, PHASES
from dispatcher.trust.service import TrustService
from dispatcher.trust.policy import TrustLedger
from dispatcher.trust.records import AdmittedFeedback, decode_entry
from schemas import (
    OperatorFeedback,
    Phase,
    PhaseChanged,
    Verdict,
    decode_incident,
    identify,
)
from tests.integration.dispatcher_harness import Results, publish
from tests.integration.test_dispatcher import _until, running_dispatcher
from tests.integration.vault_helpers import vault_world
from tests.support.identities import url_for, user
from tests.support.k8s.resources import SECRETS
from tests.support.payloads import am_alert, dumps, group
from tests.support.trust_records import record_and_send, send_pin

pytestmark = pytest.mark.integration
T0 = datetime(2026, 11, 27, 2, 0, tzinfo=UTC)
FAST_TRUST = {  # k=0 of n=5 gives a Wilson upper bound of 0.434 (z 1.96)
    "AGENTJOBS_TRUST__CONFIDENCE_Z": "1.96",
    "AGENTJOBS_TRUST__MIN_SAMPLES": "5",
    "AGENTJOBS_TRUST__WINDOW": "200",
    "AGENTJOBS_TRUST__PROMOTE_THRESHOLD": "0.45",
    "AGENTJOBS_TRUST__DEMOTE_THRESHOLD": "0.6",
    "AGENTJOBS_TRUST__MIN_DWELL": "0",
    "AGENTJOBS_TRUST__COOLDOWN": "0",
    "AGENTJOBS_METRICS__PORT": "0",
}


def _feedback(n: int, scope: str, verdict: Verdict = Verdict.ACCEPTED, phase: Phase = Phase.SHADOW,
              **extra: object) -> OperatorFeedback:
    return OperatorFeedback(feedback_id=f"fb-{scope}-{n}", investigation_id=f"inv-{scope}-{n}", scope=scope,
                            phase=phase, verdict=verdict, at=T0 + timedelta(minutes=n), operator="alice", **extra)


async def _send_feedback(amqp_url: str, feedbacks: list[OperatorFeedback]) -> None:
    """Each investigation dispatched and found (dispatcher), then the verdicts in order (operator)."""
    await record_and_send(amqp_url, feedbacks)


async def admitted_feedback(amqp_url: str) -> list[OperatorFeedback]:
    """The verdicts in the feedback log, in log order, each at its admission time (what trust tallied)."""
    out: list[OperatorFeedback] = []
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1000)
        queue = await channel.declare_queue(FEEDBACK_LOG, passive=True)
        done = asyncio.Event()
        marker = f"end-{len(out)}-{id(out)}"
        publisher = await connection.channel(publisher_confirms=True)
        await publisher.default_exchange.publish(aio_pika.Message(b"", type="agentjobs.marker", message_id=marker),
                                                 FEEDBACK_LOG)

        async def on_message(message) -> None:
            if message.message_id == marker:
                done.set()
            elif message.type == "trust_feedback":
                entry = decode_entry(message.body)
                assert isinstance(entry, AdmittedFeedback)
                out.append(msgspec.structs.replace(entry.feedback, at=entry.admitted_at))
            await message.ack()

        await queue.consume(on_message, arguments={"x-stream-offset": "first"})
        async with asyncio.timeout(30):
            await done.wait()
    return out


@contextlib.asynccontextmanager
async def running_trust(url: str, env: dict[str, str]):
    """The trust consumer, as the trust identity (``url``: any URL of the vhost)."""
    settings = load_settings(None, {**env, "AGENTJOBS_AMQP__URL": url_for(url, "trust")})
    service = TrustService(settings, health_port=0)
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


def _incident(name: str) -> bytes:
    alert = am_alert(starts_at="2026-11-27T02:00:00Z", alertname=name, domain="database", severity="critical")
    return dumps(group([alert], group_key=f"trust-{name}"))


@pytest.fixture
async def world(k8s_emulator, amqp_vhost, rabbitmq_management, postgres, rabbitmq):
    async with vault_world(k8s_emulator, amqp_vhost, rabbitmq_management, postgres, rabbitmq) as vault:
        env = {**{k: v for k, v in vault.env.items() if k.startswith("AGENTJOBS_VAULT")}, **FAST_TRUST}
        yield k8s_emulator, amqp_vhost.amqp_url, vault, env


def _job_grants(handle, vault, job_name: str) -> tuple[str, str, list[str], str]:
    """(ServiceAccount, phase label, the Job token's policies, its wrapping token)."""
    job = handle.cluster.job(handle.namespace, job_name)
    pod = job["spec"]["template"]["spec"]
    accessor = job["metadata"]["annotations"][jobspec.ANN_TOKEN_ACCESSOR]
    policies = vault.root().auth.token.lookup_accessor(accessor)["data"]["policies"]
    secret = handle.cluster.store.get(SECRETS, handle.namespace, jobspec.secret_name(job_name))
    wrapping = base64.b64decode(secret["data"][jobspec.WRAPPED_TOKEN_FILE]).decode()
    return pod["serviceAccountName"], job["metadata"]["labels"][jobspec.LABEL_PHASE], policies, wrapping


async def test_feedback_promotes_the_scope_and_the_next_job_gets_the_new_phases_grants(world):
    handle, url, vault, env = world
    first, second = identify(decode_incident(_incident("PoolExhausted"))).job_name, \
        identify(decode_incident(_incident("PoolExhaustedAgain"))).job_name
    async with running_trust(url, env) as trust, running_dispatcher(handle, url, **env) as dispatcher, \
            Results(url, exchange=PHASES) as phases:
        # Given a Job in the shadow phase: the shadow ServiceAccount and a token of the shadow policy only
        await publish(url, [_incident("PoolExhausted")])
        await _until(lambda: handle.cluster.store.get(SECRETS, handle.namespace, jobspec.secret_name(first)))
        sa, label, policies, wrapping = _job_grants(handle, vault, first)
        assert (sa, label, policies) == ("agentjobs-agent-shadow", "shadow", ["agentjobs-agent-shadow"])
        # and that token is refused every write path in OpenBao
        agent = hvac.Client(url=vault.server.addr, token=wrapping)
        agent.token = agent.sys.unwrap()["auth"]["client_token"]
        for path, data in (("agentjobs-kv/data/llm", {"data": {"api_key": "x"}}),
                           ("sys/policies/acl/agentjobs-agent-shadow", {"policy": 'path "*" {}'}),
                           ("database/roles/agentjobs-diagnostics", {"db_name": "x"})):
            with pytest.raises(hvac.exceptions.Forbidden):
                agent.write_data(path, data=data)

        # When operators accept five shadow findings of the scope
        await _send_feedback(url, [_feedback(i, "database") for i in range(5)])

        # Then the trust consumer publishes the promotion, with the numbers that justified it
        await phases.wait_for(lambda: phases.messages)
        ((key, _, change, _),) = phases.messages
        assert isinstance(change, PhaseChanged) and key == "phase.database"
        assert (change.scope, change.from_phase, change.to_phase, change.reason) == \
            ("database", Phase.SHADOW, Phase.READ_ONLY, "promoted")
        assert change.samples == 5 and change.modification_rate == 0.0 and change.wilson_upper < 0.45
        assert trust.state.ledger.phase_for("database") is Phase.READ_ONLY
        # and the dispatcher, following the phase log, builds the next Job with read-only grants
        await _until(lambda: dispatcher.intake.phases.phase_for("database") is Phase.READ_ONLY)
        await publish(url, [_incident("PoolExhaustedAgain")])
        await _until(lambda: handle.cluster.store.get(SECRETS, handle.namespace, jobspec.secret_name(second)))
        sa, label, policies, _ = _job_grants(handle, vault, second)
        assert (sa, label, policies) == ("agentjobs-agent-read-only", "read-only", ["agentjobs-agent-read-only"])


async def test_restarting_trust_and_dispatcher_mid_stream_gives_identical_phases(world):
    handle, url, vault, env = world
    # A deterministic mix over three scopes: one good, one bad, one promoted then harmful
    feedbacks = [_feedback(i, "database") for i in range(8)]
    feedbacks += [_feedback(i, "network", Verdict.MODIFIED if i % 2 else Verdict.ACCEPTED) for i in range(8)]
    feedbacks += [_feedback(i, "kubernetes") for i in range(5)]
    feedbacks += [_feedback(5, "kubernetes", Verdict.REJECTED, Phase.READ_ONLY, harmful=True)]
    feedbacks += [_feedback(6, "kubernetes", Verdict.ACCEPTED, Phase.READ_ONLY)]
    by_sender_time = TrustLedger(load_settings(None, env).trust)
    for fb in feedbacks:
        by_sender_time.apply_feedback(fb)

    async with running_trust(url, env) as trust:
        await _send_feedback(url, feedbacks[:12])
        await _until(lambda: trust.state.ledger.has_seen("network", "fb-network-3"))
    async with running_dispatcher(handle, url, **env):
        pass  # a dispatcher that ran in between and is gone
    await _send_feedback(url, feedbacks[12:] + feedbacks[3:6])  # the rest, plus three repeats
    async with running_trust(url, env) as trust, running_dispatcher(handle, url, **env) as dispatcher:
        await _until(lambda: trust.state.ledger.has_seen("kubernetes", "fb-kubernetes-6"))
        await _until(lambda: dispatcher.intake.phases.phase_for("kubernetes") is Phase.READ_ONLY
                     and dispatcher.intake.phases.phase_for("database") is Phase.READ_ONLY)
        scopes = ("database", "network", "kubernetes")
        # a pure ledger fed the verdicts as the log holds them (in order, at their admission times)
        expected = TrustLedger(load_settings(None, env).trust)
        for fb in await admitted_feedback(url):
            expected.apply_feedback(fb)
        assert {s: trust.state.ledger.phase_for(s) for s in scopes} == \
            {s: expected.phase_for(s) for s in scopes} == \
            {s: by_sender_time.phase_for(s) for s in scopes} == \
            {s: dispatcher.intake.phases.phase_for(s) for s in scopes} == \
            {"database": Phase.READ_ONLY, "network": Phase.SHADOW, "kubernetes": Phase.READ_ONLY}
        assert [trust.state.ledger.explain(s) for s in scopes] == [expected.explain(s) for s in scopes]


async def test_invalid_feedback_is_dead_lettered_with_its_reason_and_the_consumer_goes_on(world):
    _handle, url, _vault, env = world
    async with running_trust(url, env) as trust, Results(url, exchange="agentjobs.dead") as dead:
        connection = await aio_pika.connect(url_for(url, "operator"))
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(FEEDBACK)
            operator = user("operator")
            await exchange.publish(aio_pika.Message(b'{"kind": "feedback", "scope": "db"}', user_id=operator),
                                   "feedback.db")
            await exchange.publish(aio_pika.Message(b"not json", user_id=operator), "feedback.db")
        await _send_feedback(url, [_feedback(1, "database")])
        await _until(lambda: trust.state.ledger.has_seen("database", "fb-database-1"))
        await dead.wait_for(lambda: len(dead.messages) == 2)
    reasons = sorted(headers["x-agentjobs-reason"] for *_, headers in dead.messages)
    assert reasons == ["invalid_json", "missing_field"]


async def test_a_pin_holds_the_scope_against_the_policy_until_unpinned(world):
    _handle, url, _vault, env = world
    from schemas import PhasePin

    async with running_trust(url, env) as trust, Results(url, exchange=PHASES) as phases:
        pin = PhasePin(command_id="pin-1", scope="database", phase=Phase.SHADOW, reason="change freeze",
                       operator="bob", at=T0)
        await send_pin(url, pin)  # as an admin
        (_, _, change, _), = await phases.wait_for(lambda: phases.messages)
        assert change.pinned and change.operator == "bob"
        await _send_feedback(url, [_feedback(i, "database") for i in range(1, 7)])
        await _until(lambda: trust.state.ledger.has_seen("database", "fb-database-6"))
        assert trust.state.ledger.phase_for("database") is Phase.SHADOW  # five clean ones would have promoted
        unpin = PhasePin(command_id="unpin-1", scope="database", phase=None, operator="bob",
                         at=T0 + timedelta(minutes=7))
        await send_pin(url, unpin)
        await phases.wait_for(lambda: len(phases.messages) == 2)
        assert phases.messages[1][2].reason == "unpinned"
        await _send_feedback(url, [_feedback(8, "database")])
        await _until(lambda: trust.state.ledger.phase_for("database") is Phase.READ_ONLY)

