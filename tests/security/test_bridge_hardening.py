"""The webhook bridge against hostile clients (issue 17, points 4 and 5), over real sockets.

- No credentials on a public address: ``agentjobs bridge --host 0.0.0.0`` (the real console
  script) exits 2 with one line on stderr — an empty ``AGENTJOBS_BRIDGE__BEARER_TOKEN`` too.
- No topology rights: the bridge connects as its own broker user, declares nothing, and
  refuses to start when the incidents exchange is missing.
- Slowloris: partial headers, silence, a body trickled a byte at a time — each connection is
  closed within its timeout (asserted loosely: timeout + 5 s), logged at warning and counted.
- A connection cap: one more connection than ``bridge.max_connections`` is answered 503 and
  closed at once; a slot freed is usable again.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest
import pytest_asyncio
import structlog

from schemas import logs
from dispatcher.bridge.webhook import BridgeService, StartRefused
from dispatcher.plumbing.settings import AmqpSettings, BridgeSettings, LoggingSettings, Settings
from dispatcher.plumbing.topology import declare, dispatcher_topology
from schemas.routing import INCIDENTS
from tests.support import payloads
from tests.support.services import ManagementClient, Vhost, free_port, temporary_vhost, wait_until

pytestmark = [pytest.mark.security, pytest.mark.integration]

AGENTJOBS = str(Path(sys.executable).with_name("agentjobs"))
TOKEN = "hardening-token"
HEADER_TIMEOUT = 1.0  # seconds: small, so the slow clients are cut quickly
BODY_TIMEOUT = 2.0
SLACK = 5.0  # seconds allowed beyond a timeout (a shared 2-core machine): never a tight bound


# --------------------------------------------------------------------------- fixtures and helpers


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def topology(amqp_vhost: Vhost) -> Vhost:
    """Declared by the dispatcher's identity, as in production: the bridge's may not."""
    connection = await aio_pika.connect(amqp_vhost.url("dispatcher"))
    async with connection:
        await declare(await connection.channel(), dispatcher_topology(AmqpSettings()))
    return amqp_vhost


def _settings(vhost: Vhost, **bridge: Any) -> Settings:
    limits = {"header_timeout": HEADER_TIMEOUT, "body_timeout": BODY_TIMEOUT, **bridge}
    return Settings(amqp=AmqpSettings(url=vhost.url("bridge"), reconnect_interval=1.0, publish_timeout=3.0),
                    bridge=BridgeSettings(host="127.0.0.1", port=0, bearer_token=TOKEN, **limits))


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[BridgeService]:
    bridge = BridgeService(settings)
    await bridge.start()
    try:
        yield bridge
    finally:
        await bridge.stop()


@pytest.fixture
def log_lines() -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """The project's JSON logging into a buffer; returns the parsed lines so far."""
    stream = io.StringIO()
    logs.configure(LoggingSettings(format="json", level="info"), stream=stream)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()


def _refused(bridge: BridgeService, reason: str, metric: str = "agentjobs_bridge_connections_refused_total") -> float:
    return bridge.metrics.registry.get_sample_value(metric, {"reason": reason}) or 0.0


async def _until_closed(reader: asyncio.StreamReader, limit: float) -> tuple[bytes, float]:
    """Everything the server sent until it closed (EOF or reset), and when; fails after ``limit`` s."""
    started = time.monotonic()
    got = b""
    try:
        async with asyncio.timeout(limit):
            while chunk := await reader.read(65536):
                got += chunk
    except (ConnectionResetError, BrokenPipeError):
        pass
    except TimeoutError:
        raise AssertionError(f"connection still open after {limit} s; received {got[:200]!r}") from None
    return got, time.monotonic() - started


async def _trickle(writer: asyncio.StreamWriter, data: bytes, every: float) -> None:
    """One byte every ``every`` seconds, until the data or the connection ends."""
    for i in range(len(data)):
        if writer.is_closing():
            return
        try:
            writer.write(data[i:i + 1])
            await writer.drain()
        except (ConnectionError, OSError):
            return
        await asyncio.sleep(every)


async def _open(bridge: BridgeService) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", bridge.bound_port)


def _close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.close()


# --------------------------------------------------------------------------- no credentials, no public bridge


def _bridge_cli(args: list[str], amqp_url: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"),
               "AGENTJOBS_AMQP__URL": amqp_url, **env}
    return subprocess.run([AGENTJOBS, "bridge", *args], env=environ, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("args", "env", "shown"), [
    pytest.param(["--host", "0.0.0.0"], {}, "0.0.0.0", id="flag-no-token"),
    pytest.param(["--host", "0.0.0.0"], {"AGENTJOBS_BRIDGE__BEARER_TOKEN": ""}, "0.0.0.0", id="flag-empty-token"),
    pytest.param([], {"AGENTJOBS_BRIDGE__HOST": "0.0.0.0", "AGENTJOBS_BRIDGE__BEARER_TOKEN": ""}, "0.0.0.0",
                 id="env-empty-token"),
    pytest.param(["--host", "::"], {"AGENTJOBS_BRIDGE__BASIC_USERNAME": "am"}, "[::]", id="ipv6-user-no-password"),
])
async def test_an_unauthenticated_bridge_on_a_public_address_refuses_to_start(
    topology: Vhost, args: list[str], env: dict[str, str], shown: str
) -> None:
    # Given a broker it could reach, and a port nobody uses
    port = free_port()

    # When `agentjobs bridge` is told to listen on every address without credentials
    done = await asyncio.to_thread(_bridge_cli, [*args, "--port", str(port)], topology.url("bridge"), **env)

    # Then it exits 2 with one clear line on stderr, and never listened
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.splitlines()
    assert lines == [f"agentjobs bridge: refusing to listen on {shown}:{port} without bridge.bearer_token "
                     "(set AGENTJOBS_BRIDGE__BEARER_TOKEN, or bind 127.0.0.1)"], done.stderr
    assert done.stdout == ""
    with pytest.raises(OSError):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        _close(writer)


async def test_with_a_token_the_public_bridge_starts(topology: Vhost, tmp_path: Path) -> None:
    # The refusal is about credentials, not the address: with a token, 0.0.0.0 is served.
    port = free_port()
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "AGENTJOBS_AMQP__URL": topology.url("bridge"),
           "AGENTJOBS_BRIDGE__BEARER_TOKEN": TOKEN}
    proc = subprocess.Popen([AGENTJOBS, "bridge", "--host", "0.0.0.0", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            async def ready() -> bool:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                try:
                    async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                        return resp.status == 200
                except aiohttp.ClientError:
                    return False

            await wait_until(ready, timeout=30, what="the bridge on 0.0.0.0 ready")
            async with http.post(f"http://127.0.0.1:{port}/alerts", data=payloads.dumps(payloads.webhook())) as resp:
                assert resp.status == 401  # and it wants the token
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


async def test_the_service_itself_refuses_too(topology: Vhost) -> None:
    # An embedder (not the CLI) gets the same refusal, before any broker connection.
    settings = Settings(amqp=AmqpSettings(url=topology.url("bridge")), bridge=BridgeSettings(host="0.0.0.0", port=0))
    bridge = BridgeService(settings)
    with pytest.raises(StartRefused, match=r"refusing to listen on 0\.0\.0\.0:0 without bridge\.bearer_token"):
        await bridge.start()
    assert bridge._connection is None
    assert await bridge.run() == 2


# --------------------------------------------------------------------------- its broker user declares nothing


async def test_without_the_exchange_the_bridge_refuses_to_start_and_creates_nothing(
    rabbitmq_management: ManagementClient
) -> None:
    # Given a vhost where nobody declared the topology yet (the bridge's user has its grant there)
    async with temporary_vhost(rabbitmq_management, hint="bridge-no-topology") as vhost:
        bridge = BridgeService(_settings(vhost))

        # When the bridge starts, it refuses with a clear error
        with pytest.raises(StartRefused, match=rf"exchange {INCIDENTS} does not exist") as refused:
            await bridge.start()
        assert "agentjobs dispatcher" in refused.value.hint
        assert bridge.bound_port is None and bridge._connection is None

        # And it declared nothing (it could not: its user has no configure permission)
        connection = await aio_pika.connect(vhost.amqp_url)
        async with connection:
            with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
                await (await connection.channel()).get_exchange(INCIDENTS, ensure=True)
        assert await bridge.run() == 2


async def test_the_bridge_connects_as_its_own_user(topology: Vhost, rabbitmq_management: ManagementClient) -> None:
    async with running(_settings(topology)) as bridge:
        async def connected() -> bool:
            return any((c.get("client_properties") or {}).get("connection_name") == BridgeService.name
                       for c in await rabbitmq_management.list_connections(topology.name))

        await wait_until(connected, timeout=15, what="the bridge's connection")
        users = {c.get("user") for c in await rabbitmq_management.list_connections(topology.name)
                 if (c.get("client_properties") or {}).get("connection_name") == BridgeService.name}
        assert users == {"agentjobs-bridge"}
        assert bridge.ready


# --------------------------------------------------------------------------- slowloris


@pytest.mark.parametrize(("head", "rest"), [
    pytest.param(b"", b"", id="silent"),
    pytest.param(b"POST /alerts HTTP/1.1\r\nHost: bridge\r\nContent-Type: application/json\r\n",
                 b"X-Slow: " + b"a" * 1000, id="partial-headers"),
    pytest.param(b"POS", b"T /alerts HTTP/1.1\r\nHost: bridge\r\nX-Slow: " + b"a" * 1000, id="partial-request-line"),
])
async def test_a_client_that_never_finishes_its_headers_is_closed_within_the_header_timeout(
    topology: Vhost, log_lines: Callable[[], list[dict[str, Any]]], head: bytes, rest: bytes
) -> None:
    async with running(_settings(topology)) as bridge:
        # Given a client that sends part of a request head, then one more byte every 0.3 s
        reader, writer = await _open(bridge)
        writer.write(head)
        trickle = asyncio.create_task(_trickle(writer, rest, 0.3))
        try:
            # Then the bridge closes the connection once the header timeout is over, not before
            got, after = await _until_closed(reader, HEADER_TIMEOUT + SLACK)
        finally:
            trickle.cancel()
            _close(writer)
        assert after >= HEADER_TIMEOUT * 0.8, after
        assert got == b""  # nothing to answer: there was no request

        # And the refusal is counted and logged at warning, with the peer
        assert _refused(bridge, "header_timeout") == 1
        warnings = [line for line in log_lines() if line["level"] == "warning"]
        assert [(w["event"], w["reason"], w["remote"]) for w in warnings] == [
            ("connection_refused", "header_timeout", "127.0.0.1")]
        # And the bridge still serves everyone else
        async with aiohttp.ClientSession() as http, \
                http.get(f"http://127.0.0.1:{bridge.bound_port}/healthz") as resp:
            assert resp.status == 200


async def test_a_body_trickled_a_byte_a_second_is_cut_at_the_body_timeout_with_a_408(
    topology: Vhost, log_lines: Callable[[], list[dict[str, Any]]]
) -> None:
    async with running(_settings(topology)) as bridge:
        # Given a client with the right token, whose 500 KB body comes one byte per second
        reader, writer = await _open(bridge)
        writer.write(b"POST /alerts HTTP/1.1\r\nHost: bridge\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + TOKEN.encode() + b"\r\nContent-Length: 500000\r\n\r\n{")
        trickle = asyncio.create_task(_trickle(writer, b" " * 500000, 1.0))
        try:
            # Then it is answered 408 and closed within the body timeout (+ a short drain)
            got, _ = await _until_closed(reader, BODY_TIMEOUT + SLACK)
        finally:
            trickle.cancel()
            _close(writer)
        assert got.startswith(b"HTTP/1.1 408 "), got[:200]
        assert b'"body_timeout"' in got

        # And the refusal is counted and logged once at warning
        assert _refused(bridge, "body_timeout", "agentjobs_bridge_refused_total") == 1
        warnings = [line for line in log_lines() if line["level"] == "warning"]
        assert [(w["event"], w["reason"], w["status"]) for w in warnings] == [("request_refused", "body_timeout", 408)]
        assert TOKEN not in json.dumps(log_lines())


async def test_an_unauthenticated_trickled_body_is_answered_401_and_closed_quickly(topology: Vhost) -> None:
    async with running(_settings(topology)) as bridge:
        reader, writer = await _open(bridge)
        writer.write(b"POST /alerts HTTP/1.1\r\nHost: bridge\r\nContent-Length: 500000\r\n\r\n{")
        trickle = asyncio.create_task(_trickle(writer, b" " * 500000, 1.0))
        try:
            got, _ = await _until_closed(reader, BODY_TIMEOUT + SLACK)  # never waits for the body
        finally:
            trickle.cancel()
            _close(writer)
        assert got.startswith(b"HTTP/1.1 401 "), got[:200]
        assert _refused(bridge, "unauthorized", "agentjobs_bridge_refused_total") == 1


async def test_an_idle_kept_alive_connection_is_closed_quietly_but_a_slow_second_request_is_refused(
    topology: Vhost, log_lines: Callable[[], list[dict[str, Any]]]
) -> None:
    request = b"GET /healthz HTTP/1.1\r\nHost: bridge\r\n\r\n"
    async with running(_settings(topology)) as bridge:
        # Given a client that made one request and keeps the connection open, saying nothing
        reader, writer = await _open(bridge)
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        await reader.readexactly(length)
        # Then it is closed after the header timeout, without counting a refusal
        await _until_closed(reader, HEADER_TIMEOUT + SLACK)
        _close(writer)
        assert _refused(bridge, "header_timeout") == 0
        assert [line for line in log_lines() if line["level"] == "warning"] == []

        # But one that answers the answer with the next request's head, a byte at a time, is a
        # slow client: closed and counted
        reader, writer = await _open(bridge)
        writer.write(request)
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(length)
        trickle = asyncio.create_task(_trickle(writer, b"GET /healthz HTTP/1.1\r\nHost: " + b"b" * 1000, 0.3))
        try:
            await _until_closed(reader, HEADER_TIMEOUT + SLACK)
        finally:
            trickle.cancel()
            _close(writer)
        assert _refused(bridge, "header_timeout") == 1


# --------------------------------------------------------------------------- the connection cap


async def test_connections_beyond_the_cap_are_refused_at_once_and_a_freed_slot_serves_again(
    topology: Vhost, log_lines: Callable[[], list[dict[str, Any]]]
) -> None:
    cap = 3
    # (a long header timeout: the held connections must outlive the test's steps)
    async with running(_settings(topology, max_connections=cap, header_timeout=60.0)) as bridge:
        # Given as many idle connections as the cap allows
        held = [await _open(bridge) for _ in range(cap)]

        async def all_open() -> bool:
            return bridge.metrics.registry.get_sample_value("agentjobs_bridge_connections_open") == cap

        await wait_until(all_open, timeout=10, what=f"{cap} open connections")

        # When one more connects, it is answered 503 (or just closed) at once, never served
        reader, writer = await _open(bridge)
        got, _ = await _until_closed(reader, SLACK)
        _close(writer)
        assert got == b"" or got.startswith(b"HTTP/1.1 503 "), got[:200]
        assert _refused(bridge, "too_many_connections") == 1
        warnings = [line for line in log_lines() if line["level"] == "warning"]
        assert [(w["event"], w["reason"], w["max_connections"]) for w in warnings] == [
            ("connection_refused", "too_many_connections", cap)]

        # And once one of them leaves, a new client is served, and /metrics shows the refusal
        _close(held.pop()[1])

        async def slot_free() -> bool:
            return bridge.metrics.registry.get_sample_value("agentjobs_bridge_connections_open") == cap - 1

        await wait_until(slot_free, timeout=10, what="a free connection slot")
        async with aiohttp.ClientSession() as http, \
                http.get(f"http://127.0.0.1:{bridge.bound_port}/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
        assert 'agentjobs_bridge_connections_refused_total{reason="too_many_connections"} 1.0' in text
        for _, w in held:
            _close(w)


async def test_many_slow_clients_at_once_are_all_closed_within_the_timeouts(topology: Vhost) -> None:
    # The review's attack, scaled to a shared test machine: many bodies trickled and partial
    # headers at the same time; none outlives its timeout (+ slack), every one is counted.
    bodies, heads = 40, 10
    async with running(_settings(topology)) as bridge:
        opened = [await _open(bridge) for _ in range(bodies + heads)]
        trickles = []
        for i, (_, writer) in enumerate(opened):
            if i < bodies:
                writer.write(b"POST /alerts HTTP/1.1\r\nHost: bridge\r\nAuthorization: Bearer " + TOKEN.encode()
                             + b"\r\nContent-Length: 500000\r\n\r\n{")
                trickles.append(asyncio.create_task(_trickle(writer, b" " * 500000, 1.0)))
            else:
                writer.write(b"POST /alerts HTTP/1.1\r\nHost: bridge\r\n")
                trickles.append(asyncio.create_task(_trickle(writer, b"X-Slow: " + b"a" * 1000, 0.5)))
        try:
            results = await asyncio.gather(*(_until_closed(reader, BODY_TIMEOUT + SLACK) for reader, _ in opened))
        finally:
            for task in trickles:
                task.cancel()
            for _, writer in opened:
                _close(writer)
        assert all(got.startswith(b"HTTP/1.1 408 ") for got, _ in results[:bodies])
        assert all(got == b"" for got, _ in results[bodies:])
        assert _refused(bridge, "body_timeout", "agentjobs_bridge_refused_total") == bodies
        assert _refused(bridge, "header_timeout") == heads

        async def none_open() -> bool:
            return bridge.metrics.registry.get_sample_value("agentjobs_bridge_connections_open") == 0

        await wait_until(none_open, timeout=10, what="every slow connection gone")
