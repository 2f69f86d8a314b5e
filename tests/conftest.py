"""Fixtures for the real services every test tier shares.

Thin on purpose: the logic (finding, starting, cleaning up services) lives in
``tests/support/services.py`` so benchmarks can reuse it without pytest.
RabbitMQ and PostgreSQL are guaranteed by CI, so when they do not answer the
fixtures *fail* with instructions instead of skipping; only the Docker tier
skips when no engine answers.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio

pytest_plugins = ("tests.support.k8s.fixtures",)  # k8s_emulator, k8s_emulator_factory

from tests.support.services import (
    ManagementClient,
    OpenBaoServer,
    OpenBaoStartError,
    Postgres,
    RabbitMQ,
    ServiceUnavailable,
    Vhost,
    docker_available,
    resolve_postgres,
    resolve_rabbitmq,
    temporary_vhost,
)


@pytest.fixture(scope="session")
def _service_containers() -> Iterator[contextlib.ExitStack]:
    """Owns testcontainers started as fallbacks (stays empty without Docker)."""
    with contextlib.ExitStack() as stack:
        yield stack


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def rabbitmq(_service_containers: contextlib.ExitStack) -> RabbitMQ:
    """Where the broker is (AMQP URL of '/', management URL); fails if unreachable."""
    try:
        return await resolve_rabbitmq(_service_containers)
    except ServiceUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def rabbitmq_management(rabbitmq: RabbitMQ) -> AsyncIterator[ManagementClient]:
    """An open management API client, shared by the session."""
    async with rabbitmq.management() as mgmt:
        yield mgmt


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def amqp_vhost(
    rabbitmq_management: ManagementClient, request: pytest.FixtureRequest
) -> AsyncIterator[Vhost]:
    """A fresh vhost for this test module (full permissions for the broker user)."""
    async with temporary_vhost(rabbitmq_management, hint=request.module.__name__) as vhost:
        yield vhost


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def openbao() -> AsyncIterator[OpenBaoServer]:
    """A private OpenBao dev server (`.addr`, `.root_token`); leases revoked at the end."""
    server = OpenBaoServer()
    try:
        await server.start()
    except (OpenBaoStartError, FileNotFoundError) as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server
    finally:
        await server.stop()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def postgres(_service_containers: contextlib.ExitStack) -> Postgres:
    """Where PostgreSQL is (superuser DSN); fails if unreachable."""
    try:
        return await resolve_postgres(_service_containers)
    except ServiceUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[Any]:
    """A docker.DockerClient; skips the test when no Docker engine answers."""
    if not docker_available():
        pytest.skip("no Docker engine answers (docker.from_env(timeout=2).ping() failed)")
    import docker

    client = docker.from_env(timeout=10)
    try:
        yield client
    finally:
        client.close()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fuzz-long", action="store_true",
                     help="fuzz every target with 100,000 payloads instead of 10,000 (nightly-style)")


def pytest_configure(config: pytest.Config) -> None:
    # Read by tests/fuzz at import (hypothesis settings are fixed when a test is decorated).
    if config.getoption("--fuzz-long", default=False):
        os.environ["AGENTJOBS_FUZZ_EXAMPLES"] = "100000"
