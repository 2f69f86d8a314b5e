"""The ``rabbitmq`` tool and the queue playbook against a real backlog on the machine's RabbitMQ.

The tool connects as a user with *empty* configure/write/read permissions on
the scratch vhost and the ``monitoring`` tag — what the agent's Vault-issued
broker user has on the vhosts it may inspect — so a passive declare is shown to
need nothing more, and the management API to answer it. The vhost name carries
a slash and a space, so it only works if the URL quotes it. Setup uses the
broker's own user; the tool never does.

Management statistics are sampled every few seconds: the management tests wait
(``wait_until``) for the broker to report what the test did.
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
from agent.tools.base import Limits, Observation
from agent.tools.rabbitmq import MANAGEMENT_OPERATIONS, RabbitMQTool
from agent.tools.toolbox import Toolbox
from schemas import Conclusion, Phase, encode
from tests.support.fake_tools import backlog_alert
from tests.support.observability import HangingServer
from tests.support.services import free_port, unique_name, wait_until

pytestmark = pytest.mark.integration


@dataclass
class Broker:
    vhost: str  # scratch vhost: the broker user may do anything, ``user`` nothing but connect
    admin_url: str  # the broker user on ``vhost`` (setup only)
    agent_url: str  # the broker's default vhost, no credentials: what AGENTJOBS_AMQP__URL looks like
    user: str
    password: str
    management_url: str  # the management API, no credentials: what AGENTJOBS_TOOLS__RABBITMQ_MANAGEMENT_URL holds


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def broker(rabbitmq, rabbitmq_management) -> AsyncIterator[Broker]:
    mgmt = rabbitmq_management
    vhost = unique_name("agentjobs-test", "queues") + "/orders q"
    user = unique_name("agentjobs-test-inspector")
    password = secrets.token_urlsafe(18) + "/:@%"  # characters a URL must quote
    await mgmt.create_vhost(vhost)
    try:
        await mgmt.set_permissions(vhost, rabbitmq.user)
        await mgmt.create_user(user, password, tags="monitoring")  # as the Vault role issues it
        await mgmt.set_permissions(vhost, user, configure="", write="", read="")
        yield Broker(vhost=vhost, admin_url=rabbitmq.vhost_url(vhost),
                     agent_url=str(URL(rabbitmq.amqp_url).with_user(None)), user=user, password=password,
                     management_url=mgmt.base_url)
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


# --- the management API ---------------------------------------------------------------------------


@pytest_asyncio.fixture(loop_scope="session")
async def managed(broker: Broker) -> AsyncIterator[RabbitMQTool]:
    tool = RabbitMQTool(broker.agent_url, username=broker.user, password=broker.password, limits=Limits(timeout=5),
                        management_url=broker.management_url)
    try:
        yield tool
    finally:
        await tool.close()


async def _until(tool: RabbitMQTool, operation: str, params: dict, done, what: str) -> Observation:
    """The first observation of ``operation`` for which ``done(obs)`` holds (statistics are sampled)."""
    seen: list[Observation] = []

    async def probe() -> bool:
        seen.append(await tool.run(operation, params))
        return seen[-1].ok and bool(done(seen[-1]))

    try:
        await wait_until(probe, timeout=30, what=what, first_delay=0.5, max_delay=1.0)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; last: {seen[-1].excerpt if seen else None}") from None
    return seen[-1]


def _row(obs: Observation, name: str) -> dict | None:
    return next((q for q in obs.data["queues"] if q["name"] == name), None)


def test_the_management_operations_are_offered_only_with_a_management_url(broker):
    plain = RabbitMQTool(broker.agent_url, username=broker.user, password=broker.password)
    assert set(plain.operations()) == {"queue_status"}
    managed = RabbitMQTool(broker.agent_url, username=broker.user, password=broker.password,
                           management_url=broker.management_url)
    assert set(managed.operations()) == {"queue_status", "overview", "queues", "queue", "connections"}
    assert set(MANAGEMENT_OPERATIONS) < set(managed.operations())


async def test_queues_lists_the_backed_up_queues_first_with_their_ready_messages_and_consumers(broker, admin, managed):
    # Given two queues without consumer, one far more backed up than the other
    small, big = await _backlog(admin, 2), await _backlog(admin, 30)
    # When the monitoring user lists the vhost's queues
    obs = await _until(managed, "queues", {"vhost": broker.vhost},
                       # a queue's first management sample may carry its message counts before its consumer
                       # count: wait for both
                       lambda o: (_row(o, big) or {}).get("messages_ready") == 30
                       and (_row(o, big) or {}).get("consumers") is not None
                       and (_row(o, small) or {}).get("messages_ready") == 2, "both backlogs in the statistics")
    # Then the bigger backlog comes first, with the counts and rates diagnosis needs
    names = [q["name"] for q in obs.data["queues"]]
    assert names.index(big) < names.index(small)
    row = _row(obs, big)
    assert (row["vhost"], row["messages_unacknowledged"], row["consumers"]) == (broker.vhost, 0, 0)
    assert {"publish_rate", "deliver_rate", "ack_rate", "ready_rate", "consumer_utilisation", "state",
            "idle_since"} <= set(row)
    assert f"queue {big!r} in vhost {broker.vhost!r}: ready=30 unacked=0 consumers=0" in obs.excerpt
    # And a name filter keeps only the queues whose name contains it
    only = await managed.run("queues", {"vhost": broker.vhost, "name": big[-8:]})
    assert only.ok and [q["name"] for q in only.data["queues"]] == [big]


async def test_queues_are_bounded_by_max_rows(broker, admin):
    for _ in range(3):
        await _backlog(admin, 1)
    tool = RabbitMQTool(broker.agent_url, username=broker.user, password=broker.password,
                        limits=Limits(timeout=5, max_rows=2), management_url=broker.management_url)
    try:
        obs = await _until(tool, "queues", {"vhost": broker.vhost}, lambda o: o.data["matched"] >= 3,
                           "three queues listed")
    finally:
        await tool.close()
    assert len(obs.data["queues"]) == 2 and obs.truncated


async def test_queue_shows_a_stalled_consumers_full_prefetch_window(broker, admin, managed):
    # Given a consumer with prefetch 4 that never acknowledges, and 10 messages
    queue = await _backlog(admin, 10)
    consumer = await aio_pika.connect(broker.admin_url, timeout=10,
                                      client_properties={"connection_name": "stuck-worker"})
    try:
        channel = await consumer.channel()
        await channel.set_qos(prefetch_count=4)
        held: list[aio_pika.abc.AbstractIncomingMessage] = []
        four = asyncio.Event()

        async def never_ack(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            held.append(message)
            if len(held) >= 4:
                four.set()

        await (await channel.get_queue(queue, ensure=False)).consume(never_ack)
        await asyncio.wait_for(four.wait(), timeout=10)
        # When the tool looks at the queue
        obs = await _until(managed, "queue", {"vhost": broker.vhost, "queue": queue},
                           lambda o: o.data["messages_unacknowledged"] == 4 and o.data["messages_ready"] == 6
                           and o.data["consumer_details"] and o.data["channels"], "the consumer in the statistics")
    finally:
        await consumer.close()
    # Then the consumer's window (4) is full of unacknowledged messages, on its channel too
    [c] = obs.data["consumer_details"]
    assert (c["prefetch_count"], c["ack_required"], c["active"]) == (4, True, True)
    assert obs.data["prefetch_total"] == 4 and obs.data["consumers"] == 1
    [ch] = obs.data["channels"]
    assert ch["name"] == c["channel"] and ch["messages_unacknowledged"] == 4 and ch["prefetch_count"] == 4
    assert "prefetch=4 ack_required=True" in obs.excerpt and "unacked=4" in obs.excerpt


async def test_a_missing_queue_and_a_vhost_without_permissions_are_failed_observations(broker, managed):
    missing = unique_name("no-such-queue")
    gone = await managed.run("queue", {"vhost": broker.vhost, "queue": missing})
    assert not gone.ok and f"queue {missing!r} not found in vhost {broker.vhost!r}" in gone.excerpt
    assert "(HTTP 404)" in gone.excerpt
    refused = await managed.run("queues", {"vhost": "/"})  # monitoring, but no permissions on "/"
    assert not refused.ok and f"refused user {broker.user!r} (HTTP 401)" in refused.excerpt
    assert "\n" not in refused.excerpt


async def test_overview_reports_each_nodes_alarms_and_the_brokers_totals(managed):
    obs = await _until(managed, "overview", {}, lambda o: all(n["mem_limit"] for n in o.data["nodes"]),
                       "node memory figures")
    assert obs.data["nodes"] and obs.data["alarms"] == []  # the shared broker is never put in an alarm
    node = obs.data["nodes"][0]
    assert node["mem_alarm"] is False and node["disk_free_alarm"] is False
    assert node["mem_used"] > 0 and node["disk_free"] > node["disk_free_limit"] > 0
    assert {"connections", "queues", "consumers"} <= set(obs.data["object_totals"])
    assert set(obs.data["message_rates"]) >= {"publish", "deliver_get", "ack"}
    assert "no memory or disk alarm" in obs.excerpt and f"node {node['name']}: no memory alarm" in obs.excerpt


async def test_connections_lists_only_the_ones_the_broker_holds_back(broker, admin, managed):
    # Given our own running connections in the vhost (the admin channel's)
    obs = await _until(managed, "connections", {"vhost": broker.vhost}, lambda o: o.data["total"] >= 1,
                       "the admin connection")
    # Then none of them is reported as held back (no alarm on the shared broker)
    assert obs.data["held"] == 0 and obs.data["connections"] == []
    assert f"0 of {obs.data['total']} connection(s) on vhost {broker.vhost!r}" in obs.excerpt


async def test_a_user_without_the_monitoring_tag_is_refused_without_its_password_in_the_answer(
        broker, rabbitmq_management):
    user, password = unique_name("agentjobs-test-untagged"), "Pw-" + secrets.token_urlsafe(12)
    await rabbitmq_management.create_user(user, password)  # no tag: the management API refuses it
    try:
        tool = RabbitMQTool(broker.agent_url, username=user, password=password, management_url=broker.management_url)
        try:
            obs = await tool.run("overview", {})
        finally:
            await tool.close()
    finally:
        await rabbitmq_management.delete_user(user)
    assert not obs.ok and f"refused user {user!r} (HTTP 401)" in obs.excerpt and "monitoring tag" in obs.excerpt
    assert password not in encode(obs).decode()


async def test_unreachable_hanging_and_oversized_management_answers_are_failures(broker):
    port = free_port()
    gone = RabbitMQTool(broker.agent_url, username=broker.user, password=broker.password,
                        management_url=f"http://127.0.0.1:{port}")
    try:
        refused = await gone.run("overview", {})
    finally:
        await gone.close()
    assert not refused.ok and f"management API http://127.0.0.1:{port}:" in refused.excerpt
    async with HangingServer() as hanging:
        slow = RabbitMQTool(broker.agent_url, username=broker.user, password=broker.password,
                            limits=Limits(timeout=1), management_url=hanging.url)
        try:
            hung = await asyncio.wait_for(slow.run("queues", {}), timeout=10)
        finally:
            await slow.close()
    assert not hung.ok and "timed out after 1 s" in hung.excerpt
    small = RabbitMQTool(broker.agent_url, username=broker.user, password=broker.password,
                         limits=Limits(timeout=5, max_bytes=64), management_url=broker.management_url)
    try:
        big = await small.run("overview", {})
    finally:
        await small.close()
    assert not big.ok and "answer larger than 64 bytes" in big.excerpt
    for obs in (refused, hung, big):
        assert broker.password not in encode(obs).decode()


async def test_unknown_parameters_are_refused_before_anything_is_asked(managed):
    obs = await managed.run("overview", {"vhost": "x"})
    assert not obs.ok and "invalid parameters: unknown parameter(s) vhost" in obs.excerpt


async def test_the_agent_offers_the_management_operations_when_its_environment_names_the_api(broker):
    env = config.load({"AGENTJOBS_INVESTIGATION_ID": "inv-mgmt", "AGENTJOBS_PHASE": "read-only",
                       "AGENTJOBS_INPUT_DIR": "/in", "AGENTJOBS_AMQP__URL": broker.agent_url,
                       "AGENTJOBS_VAULT__AUTH_MODE": "none",
                       "AGENTJOBS_TOOLS__RABBITMQ_MANAGEMENT_URL": broker.management_url})
    assert env.tools.rabbitmq_management_url == broker.management_url
    tools, _ = await engine.open_tools(env, db_user=None, db_password=None, postgres_available=False,
                                       amqp_user=broker.user, amqp_password=broker.password)
    try:
        [tool] = tools
        assert "queues" in tool.operations()
        obs = await tool.run("queues", {"vhost": broker.vhost})
    finally:
        await engine.close_tools(tools)
    assert obs.ok, obs.excerpt
