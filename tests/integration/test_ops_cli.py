"""`agentjobs publish incident|feedback` and `agentjobs tail`, against real RabbitMQ."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import aio_pika
import pytest

from dispatcher.cli.ops import tail
from dispatcher.plumbing.settings import load_settings
from dispatcher.plumbing.topology import declare, dispatcher_topology
from schemas.routing import DEAD, FEEDBACK, INCIDENTS, PHASES
from schemas import (
    OperatorFeedback,
    Phase,
    PhaseChanged,
    Verdict,
    decode,
    decode_incident,
    encode,
    identify,
    utcnow,
)
from tests.integration.dispatcher_harness import declare_topology, ready_messages
from tests.support.payloads import SAMPLE_WEBHOOK, dumps

pytestmark = pytest.mark.integration
AGENTJOBS = str(Path(sys.executable).with_name("agentjobs"))


def _run(args: list[str], url: str, stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([AGENTJOBS, *args], input=stdin, capture_output=True, timeout=60,
                          env={**os.environ, "AGENTJOBS_AMQP__URL": url})


@pytest.fixture(autouse=True)
async def topology(amqp_vhost):
    """The dispatcher ran here once: operators declare nothing of the topology themselves."""
    await declare_topology(amqp_vhost.amqp_url, load_settings(None, {}))


async def test_publish_before_any_dispatcher_ran_says_so(rabbitmq_management):
    from tests.support.services import temporary_vhost

    async with temporary_vhost(rabbitmq_management, hint="ops-empty") as empty:
        done = await asyncio.to_thread(_run, ["publish", "incident", "-"], empty.url("operator"),
                                       dumps(SAMPLE_WEBHOOK))
    assert done.returncode == 2
    assert b"exchange agentjobs.incidents does not exist on this broker yet" in done.stderr
    assert b"Traceback" not in done.stderr


async def test_publish_incident_from_stdin_is_confirmed_and_queued(amqp_vhost):
    done = await asyncio.to_thread(_run, ["publish", "incident", "-"], amqp_vhost.url("operator"), dumps(SAMPLE_WEBHOOK))
    assert done.returncode == 0, done.stderr
    published = json.loads(done.stdout)
    assert published["job_name"].startswith("aj-postgrestoomanyconnections-")
    assert await ready_messages(amqp_vhost.amqp_url, INCIDENTS) == 1


async def test_publish_rejects_what_is_not_an_incident_with_the_reason(amqp_vhost):
    done = await asyncio.to_thread(_run, ["publish", "incident", "-"], amqp_vhost.url("operator"), b'{"version": "3"}')
    assert done.returncode == 2
    assert b"not an incident: unsupported_version" in done.stderr
    assert b"Traceback" not in done.stderr


async def test_tail_sees_dead_letters_without_taking_them_from_the_real_queue(amqp_vhost, rabbitmq_management):
    settings = load_settings(None, {"AGENTJOBS_AMQP__URL": amqp_vhost.url("operator")})
    connection = await aio_pika.connect(amqp_vhost.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await declare(channel, dispatcher_topology(settings.amqp))
        lines: list[str] = []
        tailing = asyncio.create_task(tail(settings, "dead", follow=False, as_json=True, filters={},
                                           echo=lines.append, idle_seconds=3))
        async with asyncio.timeout(10):  # wait until tail's own queue is bound
            while not [q for q in await rabbitmq_management.list_queues(amqp_vhost.name)
                       if q.name.startswith("amq.gen")]:
                await asyncio.sleep(0.05)
        exchange = await channel.get_exchange(DEAD)
        await exchange.publish(aio_pika.Message(b"{broken", headers={"x-agentjobs-reason": "invalid_json",
                                                                      "x-agentjobs-message": "JSON is malformed"}),
                               "alertmanager")
        shown = await tailing
    assert shown == 1 and json.loads(lines[0])["headers"]["x-agentjobs-reason"] == "invalid_json"
    assert await ready_messages(amqp_vhost.amqp_url, DEAD) == 1  # still there for the real consumer


async def test_status_lists_running_investigations_and_queue_depths(amqp_vhost, tmp_path):
    from dispatcher.jobs.local import LocalRuntime
    from dispatcher.intake.service import DispatcherService
    from tests.integration.dispatcher_harness import Results, publish

    env = {"AGENTJOBS_AMQP__URL": amqp_vhost.url("dispatcher"), "AGENTJOBS_VAULT__AUTH_MODE": "none",
           "AGENTJOBS_RUNTIME__STATE_DIR": str(tmp_path),
           "AGENTJOBS_CLASSES__DATABASE__COMMAND": json.dumps([sys.executable, "-c", "import time; time.sleep(60)"])}
    settings = load_settings(None, env)
    service = DispatcherService(settings, LocalRuntime(tmp_path / "local"), health_port=0)
    await service.start()
    try:
        body = dumps({**SAMPLE_WEBHOOK, "groupKey": "status-test"})
        job_name = identify(decode_incident(body)).job_name
        async with Results(amqp_vhost.amqp_url, binding="lifecycle.started") as started:
            await publish(amqp_vhost.amqp_url, [body])
            await started.wait_for(lambda: any(m[2].job_name == job_name for m in started.messages))
        done = await asyncio.to_thread(
            subprocess.run, [AGENTJOBS, "status", "--json"], capture_output=True, timeout=60,
            env={**os.environ, **env},
        )
    finally:
        await service.stop(drain_timeout=5)
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    (inv,) = [i for i in status["investigations"] if i["job_name"] == job_name]
    assert inv["phase"] == "shadow" and inv["class"] == "database" and inv["age_s"] >= 0
    assert status["queues"][INCIDENTS]["consumers"] == 1
    assert status["phases"] == {"*": "shadow"}


async def test_publish_feedback_from_options_lands_once_in_the_trust_queue(amqp_vhost):
    args = ["publish", "feedback", "--investigation", "inv-1", "--scope", "database", "--phase", "shadow",
            "--verdict", "modified", "--changed", "cause", "--operator", "alice", "--feedback-id", "fb-1"]
    done = await asyncio.to_thread(_run, args, amqp_vhost.url("operator"), b"")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"feedback_id": "fb-1", "scope": "database", "verdict": "modified",
                                       "routing_key": "feedback.modified.database"}
    connection = await aio_pika.connect(amqp_vhost.amqp_url)
    async with connection:
        queue = await (await connection.channel()).declare_queue(FEEDBACK, passive=True)
        async with queue.iterator() as messages:  # single-active-consumer queues allow no basic.get
            async for message in messages:
                await message.ack()
                break
        feedback = decode(message.body, OperatorFeedback)
    assert (feedback.verdict, feedback.changed_fields, feedback.operator) == (Verdict.MODIFIED, ("cause",), "alice")
    assert message.message_id == "fb-1"


async def test_publish_feedback_says_what_is_missing_or_wrong(amqp_vhost):
    connection = await aio_pika.connect(amqp_vhost.amqp_url)
    async with connection:
        await declare(await connection.channel(), dispatcher_topology(load_settings(None, {}).amqp))
    before = await ready_messages(amqp_vhost.amqp_url, FEEDBACK)
    done = await asyncio.to_thread(_run, ["publish", "feedback", "--scope", "db"], amqp_vhost.url("operator"), b"")
    assert done.returncode == 2
    assert b"--investigation, --phase, --verdict" in done.stderr
    done = await asyncio.to_thread(_run, ["publish", "feedback", "-"], amqp_vhost.url("operator"), b'{"kind": "feedback"}')
    assert done.returncode == 2
    assert b"not an operator feedback: missing_field" in done.stderr
    assert await ready_messages(amqp_vhost.amqp_url, FEEDBACK) == before  # nothing published


async def test_tail_phases_renders_phase_changes_readably(amqp_vhost, rabbitmq_management):
    settings = load_settings(None, {"AGENTJOBS_AMQP__URL": amqp_vhost.url("operator")})
    change = PhaseChanged(scope="database", from_phase=Phase.SHADOW, to_phase=Phase.READ_ONLY, at=utcnow(),
                          reason="promoted", samples=20, modification_rate=0.0)
    connection = await aio_pika.connect(amqp_vhost.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await declare(channel, dispatcher_topology(settings.amqp))
        lines: list[str] = []
        tailing = asyncio.create_task(tail(settings, "phases", follow=False, as_json=False, filters={},
                                           echo=lines.append, idle_seconds=3))
        async with asyncio.timeout(10):
            while not [q for q in await rabbitmq_management.list_queues(amqp_vhost.name)
                       if q.name.startswith("amq.gen")]:
                await asyncio.sleep(0.05)
        await (await channel.get_exchange(PHASES)).publish(aio_pika.Message(encode(change)), "phase.database")
        assert await tailing == 1
    assert lines == ["phase    database  shadow → read-only  (promoted, n=20, rate=0.00)"]
