"""The ``rabbitmq`` tool and the queue playbook against a real backlog on the machine's RabbitMQ.

The tool connects as a user with *empty* configure/write/read permissions on
the scratch vhost — what the agent's Vault-issued broker user has on the vhosts
it may inspect — so a passive declare is shown to need nothing more. The vhost
name carries a slash and a space, so it only works if the URL quotes it. Setup
uses the broker's own user; the tool never does.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aio_pika
import pytest
import pytest_asyncio
from yarl import URL

from agent import config, engine
from agent.reasoning import Investigation, RulesReasoner, Tally
from agent.tools.base import Limits
from agent.tools.rabbitmq import RabbitMQTool
from agent.tools.toolbox import Toolbox
from schemas import Conclusion, Phase, encode
from tests.support.fake_tools import backlog_alert
from tests.support.observability import HangingServer
from tests.support.services import free_port, unique_name

pytestmark = pytest.mark.integration


@dataclass
class Broker:
    vhost: str  # scratch vhost: the broker user may do anything, ``user`` nothing but connect
    admin_url: str  # the broker user on ``vhost`` (setup only)
    agent_url: str  # the broker's default vhost, no credentials: what AGENTJOBS_AMQP__URL looks like
    user: str
    password: str


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def broker(rabbitmq, rabbitmq_management) -> AsyncIterator[Broker]:
    mgmt = rabbitmq_management
    vhost = unique_name("agentjobs-test", "queues") + "/orders q"
    user = unique_name("agentjobs-test-inspector")
    password = secrets.token_urlsafe(18) + "/:@%"  # characters a URL must quote
    await mgmt.create_vhost(vhost)
    try:
        await mgmt.set_permissions(vhost, rabbitmq.user)
        await mgmt.create_user(user, password)
        await mgmt.set_permissions(vhost, user, configure="", write="", read="")
        yield Broker(vhost=vhost, admin_url=rabbitmq.vhost_url(vhost),
                     agent_url=str(URL(rabbitmq.amqp_url).with_user(None)), user=user, password=password)
    finally:
        await mgmt.delete_user(user)
        await mgmt.delete_vhost(vhost)


@pytest_asyncio.fixture(loop_scope="session")
async def admin(broker: Broker) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    connection = await aio_pika.connect(broker.admin_url, timeout=10)
    try:
        yield await connection.channel(publisher_confirms=True)
    finally:
        await connection.close()


@pytest.fixture
def tool(broker: Broker) -> RabbitMQTool:
    return RabbitMQTool(broker.agent_url, username=broker.user, password=broker.password, limits=Limits(timeout=5))


async def _backlog(channel: aio_pika.abc.AbstractChannel, n: int) -> str:
    """A durable queue holding ``n`` ready messages and no consumer; returns its name."""
    name = unique_name("orders")
    await channel.declare_queue(name, durable=True)
    for i in range(n):
        await channel.default_exchange.publish(aio_pika.Message(f"order {i}".encode()), routing_key=name, timeout=10)
    return name  # each publish was confirmed: the broker holds them all


async def test_the_inspecting_user_really_has_no_permissions(broker, rabbitmq_management):
    [entry] = [p for p in await rabbitmq_management.vhost_permissions(broker.vhost) if p["user"] == broker.user]
    assert (entry["configure"], entry["write"], entry["read"]) == ("", "", "")


async def test_ready_messages_and_consumers_are_counted_with_a_passive_declare(broker, admin, tool):
    # Given a queue with 25 ready messages and nothing consuming it
    queue = await _backlog(admin, 25)
    # When the tool reads it as the user without permissions
    obs = await tool.run("queue_status", {"vhost": broker.vhost, "queue": queue})
    # Then the counts are the broker's
    assert obs.ok, obs.excerpt
    assert obs.data == {"vhost": broker.vhost, "queue": queue, "message_count": 25, "consumer_count": 0}
    assert f"queue {queue!r} in vhost {broker.vhost!r}: 25 ready message(s), 0 consumer(s)" in obs.excerpt
    assert "passive=True" in obs.query and broker.vhost in obs.query

    # Given a consumer that holds one delivery unacknowledged (prefetch 1)
    delivered = asyncio.Event()
    await admin.set_qos(prefetch_count=1)
    source = await admin.get_queue(queue, ensure=False)

    async def hold(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        delivered.set()

    tag = await source.consume(hold)
    try:
        await asyncio.wait_for(delivered.wait(), timeout=10)
        obs = await tool.run("queue_status", {"vhost": broker.vhost, "queue": queue})
    finally:
        await source.cancel(tag)
    # Then "ready" excludes the message out for delivery, and the consumer is counted
    assert obs.ok, obs.excerpt
    assert (obs.data["message_count"], obs.data["consumer_count"]) == (24, 1)


async def test_a_missing_queue_is_a_failed_observation_with_the_reason(broker, admin, tool):
    missing = unique_name("no-such-queue")
    obs = await tool.run("queue_status", {"vhost": broker.vhost, "queue": missing})
    assert not obs.ok and obs.data is None
    assert f"queue {missing!r} not found in vhost {broker.vhost!r} (NOT_FOUND)" in obs.excerpt
    assert not obs.evidence().ok
    # the next call is unaffected by the channel the broker closed
    queue = await _backlog(admin, 2)
    again = await tool.run("queue_status", {"vhost": broker.vhost, "queue": queue})
    assert again.ok and again.data["message_count"] == 2


async def test_an_exclusive_queue_of_another_connection_is_a_failed_observation(broker, admin, tool):
    queue = await admin.declare_queue(unique_name("exclusive"), exclusive=True)
    obs = await tool.run("queue_status", {"vhost": broker.vhost, "queue": queue.name})
    assert not obs.ok and "is exclusive to another connection (RESOURCE_LOCKED)" in obs.excerpt


async def test_a_vhost_the_user_may_not_open_is_a_failed_observation(broker, tool):
    for vhost in ("/", unique_name("agentjobs-test-no-such-vhost")):  # no permissions there; does not exist
        obs = await tool.run("queue_status", {"vhost": vhost, "queue": "orders"})
        assert not obs.ok
        assert f"access to vhost {vhost!r} refused for user {broker.user!r}" in obs.excerpt


async def test_without_a_vhost_the_tool_asks_about_the_agents_own_vhost(broker):
    own = RabbitMQTool(str(URL(broker.admin_url).with_user(None)), username=broker.user,
                       password=broker.password, limits=Limits(timeout=5))
    obs = await own.run("queue_status", {"queue": unique_name("no-such-queue")})
    assert not obs.ok and f"in vhost {broker.vhost!r} (NOT_FOUND)" in obs.excerpt


async def test_a_refused_login_and_an_unreachable_broker_are_failures_without_the_password(broker):
    wrong = "Wr0ng-" + secrets.token_urlsafe(12)
    refused = await RabbitMQTool(broker.agent_url, username=broker.user, password=wrong,
                                 limits=Limits(timeout=5)).run("queue_status", {"vhost": broker.vhost, "queue": "q"})
    where = f"{URL(broker.agent_url).host}:{URL(broker.agent_url).port}"
    assert not refused.ok and f"login to {where} refused for user {broker.user!r}" in refused.excerpt
    port = free_port()
    gone = await RabbitMQTool(f"amqp://127.0.0.1:{port}/", username=broker.user, password=broker.password,
                              limits=Limits(timeout=5)).run("queue_status", {"vhost": broker.vhost, "queue": "q"})
    assert not gone.ok and f"in vhost {broker.vhost!r} on 127.0.0.1:{port}:" in gone.excerpt
    for obs, secret in ((refused, wrong), (gone, broker.password)):
        text = encode(obs).decode()
        assert secret not in text and secret.replace("/", "%2F") not in text


async def test_a_broker_that_never_answers_is_cut_off_at_the_timeout(broker):
    async with HangingServer() as hanging:
        tool = RabbitMQTool(f"amqp://127.0.0.1:{hanging.port}/", username=broker.user, password=broker.password,
                            limits=Limits(timeout=1))
        obs = await asyncio.wait_for(tool.run("queue_status", {"vhost": broker.vhost, "queue": "q"}), timeout=10)
    assert not obs.ok and "timed out after 1 s" in obs.excerpt


async def test_the_rules_reasoner_finds_a_real_backlog_without_consumers(broker, admin, tool):
    # Given a real queue with 40 ready messages and no consumer, and the alert the demo sends about it
    queue = await _backlog(admin, 40)
    alert = backlog_alert(queue=queue, vhost=broker.vhost)
    toolbox = Toolbox([tool])
    inv = Investigation(incident=alert, tools=toolbox.tools, phase=Phase.READ_ONLY, run_tool=toolbox.run)
    # When the rules reasoner investigates with the real tool
    result = await RulesReasoner().investigate(inv)
    # Then "no consumer" is the conclusion, with the broker's evidence naming the queue
    assert result.conclusion is Conclusion.CONCLUSIVE, result.summary
    best = result.hypotheses[0]
    assert best.cause == "no_consumer"
    assert best.statement == f'queue "{queue}" in vhost "{broker.vhost}" has 40 ready messages and no consumer'
    assert any(e.source == "rabbitmq" and queue in e.excerpt and e.ok for e in best.evidence_for)
    assert toolbox.calls == {"rabbitmq.queue_status": 1}


async def test_the_agent_opens_the_queue_tool_from_its_environment_and_concludes(broker, admin):
    # Given the Job's environment (broker URL without credentials) and the agent's own broker user
    queue = await _backlog(admin, 7)
    env = config.load({"AGENTJOBS_INVESTIGATION_ID": "inv-queues", "AGENTJOBS_PHASE": "read-only",
                       "AGENTJOBS_INPUT_DIR": "/in", "AGENTJOBS_AMQP__URL": broker.agent_url,
                       "AGENTJOBS_VAULT__AUTH_MODE": "none"})
    tools, unavailable = await engine.open_tools(env, db_user=None, db_password=None, postgres_available=False,
                                                 amqp_user=broker.user, amqp_password=broker.password)
    assert [t.name for t in tools] == ["rabbitmq"] and unavailable == []
    # When it investigates an alert whose name matches no playbook
    try:
        finding = await engine.investigate(backlog_alert("SomethingIsOff", queue=queue, vhost=broker.vhost), env,
                                           tools=tools, tally=Tally())
    finally:
        await engine.close_tools(tools)
    # Then the finding names the real cause, and the password is nowhere in it
    assert finding.probable_cause == f'queue "{queue}" in vhost "{broker.vhost}" has 7 ready messages and no consumer'
    assert finding.hypotheses[0].cause == "no_consumer"
    assert broker.password not in encode(finding).decode()
