"""The Alertmanager bridge against real RabbitMQ: 200 only after the confirm, errors Alertmanager understands.

Requests are hand-made with aiohttp (the wire format Alertmanager uses); a test
with Debian's real ``prometheus-alertmanager`` sending to the bridge is still
to be written.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aio_pika
import aiohttp
import pytest
import pytest_asyncio
import structlog
from prometheus_client.parser import text_string_to_metric_families

from schemas import logs
from dispatcher.bridge.webhook import BridgeService
from dispatcher.plumbing.settings import AmqpSettings, BridgeSettings, LoggingSettings, Settings
from dispatcher.plumbing.topology import declare, dispatcher_topology
from schemas.routing import INCIDENTS
from tests.support import payloads
from tests.support.identities import grant_all, user
from tests.support.services import ManagementClient, Vhost, wait_until

pytestmark = pytest.mark.integration

MAX_BODY = 64 * 1024  # bytes; small so oversized bodies stay cheap
TOKEN = "s3cret-bridge-token"
BASIC = ("alertmanager", "hunter2-basic")
_AMQP_URL: list[str] = []  # this module's vhost URL, set by the `incidents` fixture


def _settings(vhost: Vhost, **bridge: Any) -> Settings:
    """The bridge as its own broker user (publish alertmanager.* to the incidents exchange, nothing else)."""
    return Settings(
        amqp=AmqpSettings(url=vhost.url("bridge"), reconnect_interval=1.0, publish_timeout=3.0),
        bridge=BridgeSettings(port=0, max_body_bytes=MAX_BODY, **bridge),
    )


@pytest_asyncio.fixture(scope="module", loop_scope="session", autouse=True)
async def topology(amqp_vhost: Vhost) -> None:
    """Declared by the dispatcher's identity, as in production: the bridge may not declare."""
    connection = await aio_pika.connect(amqp_vhost.url("dispatcher"))
    async with connection:
        await declare(await connection.channel(), dispatcher_topology(AmqpSettings()))


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[tuple[BridgeService, str]]:
    bridge = BridgeService(settings)
    port = await bridge.start()
    try:
        yield bridge, f"http://127.0.0.1:{port}"
    finally:
        await bridge.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def bridge(amqp_vhost: Vhost) -> AsyncIterator[tuple[BridgeService, str]]:
    async with running(_settings(amqp_vhost)) as pair:
        yield pair


@pytest_asyncio.fixture(loop_scope="session")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


@pytest_asyncio.fixture(loop_scope="session")
async def incidents(amqp_vhost: Vhost, bridge: Any) -> AsyncIterator[aio_pika.abc.AbstractQueue]:
    """The real intake queue, emptied before the test (the dispatcher's identity declared it)."""
    _AMQP_URL[:] = [amqp_vhost.amqp_url]
    connection = await aio_pika.connect(amqp_vhost.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(INCIDENTS, passive=True)
        await queue.purge()
        yield queue


async def _count(queue: aio_pika.abc.AbstractQueue) -> int:
    """Exact number of ready messages (a passive declare; management stats lag)."""
    connection = await aio_pika.connect(_AMQP_URL[0])
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(INCIDENTS, passive=True)
        return declared.declaration_result.message_count or 0


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def _bridge_connection(mgmt: ManagementClient, vhost: str) -> str:
    """The broker-side name of the bridge's (only) open connection; a reconnect shows up after a few ms."""
    found: list[dict[str, Any]] = []

    async def probe() -> bool:
        found[:] = [c for c in await mgmt.list_connections(vhost)
                    if (c.get("client_properties") or {}).get("connection_name") == BridgeService.name
                    and c.get("state", "running") == "running"]
        return len(found) == 1

    await wait_until(probe, timeout=15, what="the bridge's connection in the management API")
    return found[0]["name"]


async def _wait_ready(service: BridgeService, ready: bool) -> None:
    async def probe() -> bool:
        return service.ready is ready

    await wait_until(probe, timeout=15, what=f"bridge ready={ready}")


# --------------------------------------------------------------------------- 200


async def test_webhook_is_answered_200_only_once_it_is_in_the_queue(bridge, http, incidents) -> None:
    # Given the sample Alertmanager v4 webhook
    _, url = bridge
    body = payloads.dumps(payloads.webhook(receiver="Team DB.pager"))

    # When Alertmanager posts it
    async with http.post(f"{url}/alerts", data=body, headers={"Content-Type": "application/json"}) as resp:
        answer = await resp.json()

    # Then the answer is 200 and the original bytes are already in the intake queue
    assert resp.status == 200, answer
    assert answer["routing_key"] == "alertmanager.team_db_pager"
    assert await _count(incidents) == 1
    message = await incidents.get(no_ack=False, timeout=5)
    assert message is not None
    await message.ack()
    assert message.body == body
    assert message.routing_key == "alertmanager.team_db_pager"
    assert message.message_id == answer["event_id"]
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT


async def test_cloudevent_is_accepted_too(bridge, http, incidents) -> None:
    _, url = bridge
    body = payloads.dumps(payloads.cloudevent(payloads.webhook()))
    async with http.post(f"{url}/alerts", data=body) as resp:
        assert resp.status == 200, await resp.text()
    assert await _count(incidents) == 1


# --------------------------------------------------------------------------- 400 / 413


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "empty_body"),
        (b"{not json", "invalid_json"),
        (b"[1, 2]", "not_an_object"),
        (b'{"hello": "world"}', "unknown_format"),
        (payloads.dumps(payloads.webhook(version="3")), "unsupported_version"),
        (payloads.dumps({k: v for k, v in payloads.webhook().items() if k != "alerts"}), "missing_field"),
        (payloads.dumps(payloads.webhook(status="resolved")), "inconsistent_status"),
        (b'{"kind": "finding"}', "unknown_kind"),
    ],
)
async def test_malformed_payload_is_400_with_the_reason_and_nothing_published(
    bridge, http, incidents, body: bytes, reason: str
) -> None:
    _, url = bridge
    async with http.post(f"{url}/alerts", data=body) as resp:
        answer = await resp.json()
    assert resp.status == 400
    assert answer["error"] == reason, answer
    assert answer["message"]
    assert await _count(incidents) == 0


async def test_oversized_body_is_413_with_a_json_error(bridge, http, incidents) -> None:
    _, url = bridge
    big = payloads.dumps(payloads.webhook(commonAnnotations={"blob": "x" * (MAX_BODY + 1)}))
    async with http.post(f"{url}/alerts", data=big) as resp:  # with Content-Length
        answer = await resp.json()
    assert resp.status == 413
    assert answer["error"] == "too_large"
    assert await _count(incidents) == 0


async def test_oversized_chunked_body_is_413_without_reading_it_all(bridge, http, incidents) -> None:
    # Given a body with no Content-Length, streamed past the limit
    _, url = bridge

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"version": "4", "blob": "'
        for _ in range(4):
            yield b"x" * (MAX_BODY // 2)
        yield b'"}'

    async with http.post(f"{url}/alerts", data=chunks()) as resp:
        answer = await resp.json()
    assert resp.status == 413
    assert answer["error"] == "too_large"
    assert await _count(incidents) == 0


# --------------------------------------------------------------------------- 401


async def test_auth_bearer_and_basic(amqp_vhost: Vhost, http, incidents) -> None:
    settings = _settings(amqp_vhost, bearer_token=TOKEN, basic_username=BASIC[0], basic_password=BASIC[1])
    body = payloads.dumps(payloads.webhook())
    async with running(settings) as (_, url):
        rejected = [
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": f"Bearer {TOKEN}x"},
            {"Authorization": TOKEN},
            _basic(BASIC[0], "wrong"),
            _basic("someone", BASIC[1]),
            {"Authorization": "Basic !!!notbase64"},
        ]
        for headers in rejected:
            async with http.post(f"{url}/alerts", data=body, headers=headers) as resp:
                answer = await resp.json()
                assert resp.status == 401, headers
                assert answer["error"] == "unauthorized"
                challenges = resp.headers.getall("WWW-Authenticate")
                assert any(c.startswith("Bearer ") for c in challenges)
                assert any(c.startswith("Basic ") for c in challenges)
        assert await _count(incidents) == 0

        for headers in ({"Authorization": f"Bearer {TOKEN}"}, _basic(*BASIC)):
            async with http.post(f"{url}/alerts", data=body, headers=headers) as resp:
                assert resp.status == 200, await resp.text()
        assert await _count(incidents) == 2


async def test_auth_is_checked_before_the_body_is_judged(amqp_vhost: Vhost, http, incidents) -> None:
    async with (
        running(_settings(amqp_vhost, bearer_token=TOKEN)) as (_, url),
        http.post(f"{url}/alerts", data=b"x" * (MAX_BODY * 2)) as resp,
    ):
        assert resp.status == 401


# --------------------------------------------------------------------------- every 4xx is logged and counted
# Alertmanager does not retry a 4xx, so a refusal is a lost notification: the operator must see it.

PEER = "203.0.113.7, 198.51.100.2"  # X-Forwarded-For as a proxy would send it (logged, not trusted)
BODY_MARKER = "body-marker-7f3a"  # must never reach a log line
WRONG_TOKEN = "wrong-bearer-9c1e"  # must never reach a log line either


@pytest.fixture
def log_lines() -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """The project's JSON logging into a buffer; returns the parsed lines so far."""
    stream = io.StringIO()
    logs.configure(LoggingSettings(format="json", level="info"), stream=stream)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()


async def _refused_total(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """``agentjobs_bridge_refused_total`` by reason, scraped from the bridge's ``/metrics``."""
    async with http.get(f"{url}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    return {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "agentjobs_bridge_refused_total"
    }


@pytest_asyncio.fixture(loop_scope="session")
async def guarded(amqp_vhost: Vhost) -> AsyncIterator[tuple[BridgeService, str]]:
    """A bridge that wants ``Bearer TOKEN`` (per test: the 503 tests expect one bridge connection)."""
    async with running(_settings(amqp_vhost, bearer_token=TOKEN)) as pair:
        yield pair


_GOOD = {"Authorization": f"Bearer {TOKEN}"}


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "status", "reason"),
    [
        pytest.param("POST", "/alerts", {"Authorization": f"Bearer {WRONG_TOKEN}"},
                     payloads.dumps(payloads.webhook(commonAnnotations={"m": BODY_MARKER})),
                     401, "unauthorized", id="401-wrong-bearer"),
        pytest.param("POST", "/alerts", {}, payloads.dumps(payloads.webhook()), 401, "unauthorized",
                     id="401-no-credentials"),
        pytest.param("POST", "/alerts", _GOOD, f'{{"version": "4", "m": "{BODY_MARKER}"'.encode(),
                     400, "invalid_json", id="400-malformed"),
        pytest.param("POST", "/alerts", _GOOD, payloads.dumps(payloads.webhook(version="3", m=BODY_MARKER)),
                     400, "unsupported_version", id="400-version"),
        pytest.param("POST", "/alerts", _GOOD,
                     payloads.dumps(payloads.webhook(commonAnnotations={"m": BODY_MARKER * MAX_BODY})),
                     413, "too_large", id="413-oversize"),
        pytest.param("POST", "/alert", _GOOD, payloads.dumps(payloads.webhook()), 404, "not_found",
                     id="404-wrong-path"),
        pytest.param("GET", "/alerts", _GOOD, b"", 405, "method_not_allowed", id="405-wrong-method"),
    ],
)
async def test_a_refused_request_is_counted_and_logged_once_at_warning_with_the_peer(
    guarded, http, incidents, log_lines, method: str, path: str, headers: dict[str, str], body: bytes,
    status: int, reason: str,
) -> None:
    # Given the bridge's refusal counters before
    _, url = guarded
    before = await _refused_total(http, url)

    # When a request it must refuse arrives through a proxy
    async with http.request(method, f"{url}{path}", data=body or None,
                            headers={**headers, "X-Forwarded-For": PEER}) as resp:
        await resp.read()
    assert resp.status == status

    # Then the refusal is counted under its reason, and only that
    after = await _refused_total(http, url)
    assert after.get(reason, 0) - before.get(reason, 0) == 1, after
    assert sum(after.values()) - sum(before.values()) == 1, (before, after)

    # And exactly one warning line says who was refused and why
    lines = log_lines()
    warnings = [line for line in lines if line["level"] == "warning"]
    assert len(warnings) == 1, lines
    (line,) = warnings
    assert line["event"] == "request_refused"
    assert line["logger"] == "dispatcher.bridge.webhook"
    assert (line["status"], line["reason"]) == (status, reason)
    assert line["remote"] == "127.0.0.1"  # the socket's peer, not the header
    assert line["forwarded_for"] == PEER
    assert (line["method"], line["path"]) == (method, path)
    if status == 401:
        assert line["auth_scheme"] == ("bearer" if headers else "none")
    # And neither a credential nor the body is in any line
    text = json.dumps(lines)
    for secret in (TOKEN, WRONG_TOKEN, BODY_MARKER, "Authorization"):
        assert secret not in text
    assert await _count(incidents) == 0


async def test_accepted_requests_and_probes_are_not_counted_as_refused(guarded, http, incidents, log_lines) -> None:
    _, url = guarded
    before = await _refused_total(http, url)
    async with http.post(f"{url}/alerts", data=payloads.dumps(payloads.webhook()), headers=_GOOD) as resp:
        assert resp.status == 200, await resp.text()
    async with http.get(f"{url}/healthz") as resp:
        assert resp.status == 200
    assert await _refused_total(http, url) == before
    lines = log_lines()
    assert [line["event"] for line in lines if line["level"] == "warning"] == []
    assert [line["event"] for line in lines if line.get("logger") == "dispatcher.bridge.webhook"] == ["alert_forwarded"]
    assert TOKEN not in json.dumps(lines)


# --------------------------------------------------------------------------- 503 and retry


async def test_broker_closed_before_request_is_503_then_retry_succeeds_once(
    bridge, http, incidents, amqp_vhost: Vhost, rabbitmq_management: ManagementClient
) -> None:
    service, url = bridge
    body = payloads.dumps(payloads.webhook())
    await _wait_ready(service, True)

    # Given the broker force-closes the bridge's connection and refuses reconnects for a while
    # (robust connections retry at once, so without the refusal the outage would last milliseconds)
    name = await _bridge_connection(rabbitmq_management, amqp_vhost.name)
    await rabbitmq_management.delete_permissions(amqp_vhost.name, user("bridge"))
    try:
        await rabbitmq_management.close_connection(name, reason="test: broker went away")
        await _wait_ready(service, False)

        # When Alertmanager posts meanwhile, it is told to retry, and readiness says so
        async with http.post(f"{url}/alerts", data=body) as resp:
            answer = await resp.json()
            assert resp.status == 503, answer
            assert answer["error"] == "broker_unavailable"
            assert int(resp.headers["Retry-After"]) >= 1
        async with http.get(f"{url}/readyz") as resp:
            assert resp.status == 503
    finally:
        await grant_all(rabbitmq_management, amqp_vhost.name)  # the bridge's grant back, as before

    # Then after the robust connection is back, the retry is confirmed: exactly one incident
    await _wait_ready(service, True)
    async with http.get(f"{url}/readyz") as resp:
        assert resp.status == 200
    async with http.post(f"{url}/alerts", data=body) as resp:
        assert resp.status == 200, await resp.text()
    assert await _count(incidents) == 1


async def test_broker_closed_during_request_is_503_then_retry_succeeds_once(
    bridge, http, incidents, amqp_vhost: Vhost, rabbitmq_management: ManagementClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service, url = bridge
    body = payloads.dumps(payloads.webhook(receiver="mid-request"))
    await _wait_ready(service, True)
    name = await _bridge_connection(rabbitmq_management, amqp_vhost.name)

    # Given the connection is killed after the body was accepted, right before the publish
    publisher = service._publisher
    assert publisher is not None
    real_publish = publisher.publish

    async def publish_after_kill(*args: Any, **kwargs: Any) -> None:
        await rabbitmq_management.close_connection(name, reason="test: killed mid-request")
        await real_publish(*args, **kwargs)

    monkeypatch.setattr(publisher, "publish", publish_after_kill)

    # When Alertmanager posts, the publish is not confirmed: 503
    async with http.post(f"{url}/alerts", data=body) as resp:
        answer = await resp.json()
    assert resp.status == 503, answer
    assert answer["error"] == "broker_unavailable"
    monkeypatch.undo()

    # Then Alertmanager's retry (after reconnection) lands exactly one incident
    await _wait_ready(service, True)
    async with http.post(f"{url}/alerts", data=body) as resp:
        assert resp.status == 200, await resp.text()
    assert await _count(incidents) == 1
    message = await incidents.get(no_ack=False, timeout=5)
    assert message is not None and message.body == body
    await message.ack()


# --------------------------------------------------------------------------- health


async def test_healthz_and_readyz(bridge, http) -> None:
    service, url = bridge
    await _wait_ready(service, True)
    async with http.get(f"{url}/healthz") as resp:
        assert resp.status == 200
    async with http.get(f"{url}/readyz") as resp:
        assert resp.status == 200
        assert json.loads(await resp.text())["ready"] is True
