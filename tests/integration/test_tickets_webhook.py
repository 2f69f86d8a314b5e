"""The generic webhook backend: signed JSON per result, retried through a receiver's outage, refused ones dead-lettered.

Real RabbitMQ with every component as its own identity, the real `agentjobs tickets` service,
and an HTTP receiver written here (what an integrator would run) that checks the signature.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest
from aiohttp import web

from dispatcher.plumbing.settings import load_settings
from dispatcher.tickets.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, signature
from schemas import DeadLetter, Phase, decode
from schemas.routing import DEAD
from tests.integration.dispatcher_harness import declare_topology, drain
from tests.support.tickets import finding, finding_by, lifecycle_by_dispatcher, running_tickets
from tests.support.trust_records import dispatched

pytestmark = pytest.mark.integration
SECRET = "webhook-test-secret"


class Receiver:
    """Answers each POST with the next status of ``script`` (then 200); keeps the valid ones."""

    def __init__(self, *script: int) -> None:
        self.script = list(script)
        self.received: list[dict] = []
        self.keys: list[str] = []
        self.bad_signatures = 0
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        stamp = request.headers.get(TIMESTAMP_HEADER, "")
        if request.headers.get(SIGNATURE_HEADER) != signature(SECRET, stamp, body):
            self.bad_signatures += 1
            return web.Response(status=401)
        status = self.script.pop(0) if self.script else 200
        if status == 200:
            self.received.append(json.loads(body))
            self.keys.append(request.headers["Idempotency-Key"])
        return web.Response(status=status, text="scripted")


@contextlib.asynccontextmanager
async def receiving(receiver: Receiver):
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    receiver.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/hook"
    try:
        yield receiver
    finally:
        await runner.cleanup()


def webhook_tickets(url: str, receiver: Receiver):
    return running_tickets(url, {"AGENTJOBS_TICKETS__BACKEND": "webhook",
                                 "AGENTJOBS_TICKETS__WEBHOOK__URL": receiver.url,
                                 "AGENTJOBS_TICKETS__WEBHOOK__SECRET": SECRET,
                                 "AGENTJOBS_RETRY__BASE": "0.05", "AGENTJOBS_RETRY__CAP": "0.2"})


@pytest.fixture
async def url(amqp_vhost):
    await declare_topology(amqp_vhost.amqp_url, load_settings(None, {}))
    return amqp_vhost.amqp_url


async def _until(predicate, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.05)


async def test_results_arrive_signed_and_a_receivers_outage_is_waited_out(url):
    inv = "ba" + "5" * 38
    async with receiving(Receiver(503, 503, 500)) as receiver, webhook_tickets(url, receiver) as tickets:
        await lifecycle_by_dispatcher(url, dispatched(inv, Phase.READ_ONLY))
        await finding_by(url, None, finding(inv, Phase.READ_ONLY))
        await _until(lambda: len(receiver.received) == 2)
        assert receiver.bad_signatures == 0 and receiver.script == []
        assert tickets.metrics.backend_errors.labels(backend="webhook", kind="temporary")._value.get() == 3
    opened, found = receiver.received
    assert opened["event"] == "lifecycle.dispatched" and opened["key"] == inv and opened["notes"] == []
    assert found["event"] == "finding" and [n["op_id"] for n in found["notes"]] == [f"{inv}:finding",
                                                                                     f"{inv}:finding:record"]
    assert found["notes"][0]["cause"] == "lock contention on table ledger"


async def test_a_redelivered_result_carries_the_same_idempotency_key(url):
    inv = "bb" + "6" * 38
    async with receiving(Receiver()) as receiver, webhook_tickets(url, receiver):
        await finding_by(url, None, finding(inv, Phase.READ_ONLY), times=2)
        await _until(lambda: len(receiver.received) == 2)
    assert receiver.keys[0] == receiver.keys[1]


async def test_a_result_the_receiver_refuses_is_dead_lettered_with_its_answer(url):
    inv = "bc" + "7" * 38
    async with receiving(Receiver(400)) as receiver, webhook_tickets(url, receiver) as tickets:
        await finding_by(url, None, finding(inv, Phase.READ_ONLY))
        await _until(lambda: tickets.metrics.results.labels(kind="finding", outcome="dead_lettered")._value.get() == 1)
    [letter] = [decode(m.headers["x-agentjobs-dead-letter"].encode(), DeadLetter) for m in await drain(url, DEAD)]
    assert letter.reason == "webhook_rejected" and "HTTP 400 scripted" in letter.message
    assert receiver.received == []
