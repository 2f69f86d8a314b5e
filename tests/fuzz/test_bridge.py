"""The bridge's HTTP handler under 10,000+ hostile requests: every answer classified, nothing lost, still up.

A real `agentjobs bridge` process with a real RabbitMQ vhost behind it. Requests are
sent in order over one keep-alive connection; afterwards the intake queue holds
exactly one message per 200 answer.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatcher.plumbing.settings import AmqpSettings
from dispatcher.plumbing.topology import declare, dispatcher_topology
from tests.fuzz.strategies import BATCH, random_payloads
from tests.support.payloads import SAMPLE_WEBHOOK
from tests.support.services import free_port

pytestmark = [pytest.mark.fuzz, pytest.mark.integration]
EXAMPLES = int(os.environ.get("AGENTJOBS_FUZZ_EXAMPLES", "10000"))
TOKEN = "fuzz-token"
MAX_BODY = 16 * 1024
ANSWERS: Counter[int] = Counter()
REASONS: Counter[str] = Counter()


class Bridge:
    def __init__(self, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.port, self.proc, self.log = port, proc, log
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def request(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
                ) -> tuple[int, bytes]:
        for attempt in (1, 2):
            try:
                self.conn.request(method, path, body=body, headers=headers or {})
                resp = self.conn.getresponse()
                return resp.status, resp.read()
            except (http.client.HTTPException, ConnectionError):
                self.conn.close()  # the server may close after an error answer; reconnect once
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def topology(amqp_vhost) -> None:
    """Declared by the dispatcher's identity: the bridge's user may not declare anything."""
    import aio_pika

    connection = await aio_pika.connect(amqp_vhost.url("dispatcher"))
    async with connection:
        await declare(await connection.channel(), dispatcher_topology(AmqpSettings()))


@pytest.fixture(scope="module")
def bridge(amqp_vhost, topology, tmp_path_factory) -> Iterator[Bridge]:
    port = free_port()
    log = tmp_path_factory.mktemp("bridge") / "bridge.log"
    env = {**os.environ, "AGENTJOBS_AMQP__URL": amqp_vhost.url("bridge"), "AGENTJOBS_BRIDGE__BEARER_TOKEN": TOKEN,
           "AGENTJOBS_BRIDGE__MAX_BODY_BYTES": str(MAX_BODY), "AGENTJOBS_LOGGING__LEVEL": "warning"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("agentjobs")), "bridge", "--port", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    b = Bridge(port, proc, log)
    deadline = time.monotonic() + 30
    while True:
        try:
            if b.request("GET", "/readyz")[0] == 200:
                break
        except OSError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.05)
    yield b
    proc.terminate()
    proc.wait(30)


def _post(bridge: Bridge, body: bytes, *, auth: bool = True) -> None:
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = f"Bearer {TOKEN}"
    status, answer = bridge.request("POST", "/alerts", body, headers)
    ANSWERS[status] += 1
    assert status in (200, 400, 401, 413), (status, answer[:300], body[:300])
    if status != 401:
        parsed = json.loads(answer)  # every answer is JSON
        if status == 200:
            assert parsed["status"] == "accepted" and parsed["event_id"]
        else:
            assert parsed["error"] and " " not in parsed["error"]
            REASONS[parsed["error"]] += 1


@settings(max_examples=max(1, EXAMPLES // BATCH), deadline=None, suppress_health_check=list(HealthCheck),
          database=None)
@given(st.randoms(use_true_random=False))
def test_every_hostile_request_gets_a_classified_answer(bridge: Bridge, rng: random.Random) -> None:
    for body in random_payloads(rng, BATCH):
        _post(bridge, body)
    if rng.random() < 0.05:  # now and then: no credentials, and an oversized body
        _post(bridge, body, auth=False)
        _post(bridge, b"{" + b" " * (MAX_BODY + 10) + b"}")


async def test_afterwards_it_is_alive_and_the_queue_holds_exactly_the_accepted(bridge: Bridge, amqp_vhost) -> None:
    import aio_pika

    assert bridge.proc.poll() is None, "the bridge died under fuzzing"
    assert bridge.request("GET", "/healthz")[0] == 200
    _post(bridge, json.dumps({**SAMPLE_WEBHOOK, "groupKey": "after-fuzz"}).encode())
    assert sum(ANSWERS.values()) >= EXAMPLES, ANSWERS
    print(f"bridge answers: {dict(ANSWERS)}; rejection reasons: {dict(REASONS)}")
    assert ANSWERS[200] >= 1 and ANSWERS[400] >= 1 and ANSWERS[401] >= 1 and ANSWERS[413] >= 1
    connection = await aio_pika.connect(amqp_vhost.amqp_url)
    async with connection:
        queue = await (await connection.channel()).declare_queue("agentjobs.incidents", passive=True)
        assert queue.declaration_result.message_count == ANSWERS[200]
