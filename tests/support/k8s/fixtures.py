"""pytest fixtures: an emulated cluster on a free port plus a real kubernetes_asyncio client for it.

Import into a conftest (`from tests.support.k8s.fixtures import *`).
`k8s_emulator` accepts options through indirect parametrisation, e.g.
`@pytest.mark.parametrize("k8s_emulator", [{"kubelet_mode": "process"}], indirect=True)`;
`k8s_emulator_factory` starts further emulators with any options.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import AsyncIterator

import pytest
import pytest_asyncio
from kubernetes_asyncio.client import ApiClient, Configuration

from .cluster import Cluster
from .server import Server
from .tokens import ADMIN_TOKEN

TEST_NAMESPACE = "agentjobs-test"


def configuration(url: str, token: str = ADMIN_TOKEN) -> Configuration:
    cfg = Configuration(host=url, api_key={"BearerToken": token},
                        api_key_prefix={"BearerToken": "Bearer"})
    cfg.verify_ssl = False
    return cfg


def kubeconfig(url: str, token: str = ADMIN_TOKEN, namespace: str = TEST_NAMESPACE) -> dict:
    return {
        "apiVersion": "v1", "kind": "Config", "preferences": {},
        "clusters": [{"name": "emulator", "cluster": {"server": url}}],
        "users": [{"name": "emulator-admin", "user": {"token": token}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator",
                                                      "user": "emulator-admin",
                                                      "namespace": namespace}}],
        "current-context": "emulator",
    }


@dataclass
class EmulatorHandle:
    cluster: Cluster
    server: Server
    url: str
    configuration: Configuration
    api_client: ApiClient
    kubeconfig: dict
    namespace: str

    @property
    def clock(self):
        return self.cluster.clock

    @property
    def kubelet(self):
        return self.cluster.kubelet

    @property
    def faults(self):
        return self.cluster.faults

    @property
    def rbac(self):
        return self.cluster.rbac

    @property
    def tokens(self):
        return self.cluster.tokens

    def client_for(self, token: str) -> ApiClient:
        """Another ApiClient authenticating with `token` (close it yourself)."""
        return ApiClient(configuration(self.url, token))


@contextlib.asynccontextmanager
async def running_emulator(namespace: str = TEST_NAMESPACE, **options) -> AsyncIterator[
        EmulatorHandle]:
    """Start cluster + HTTP server on 127.0.0.1:<free port>; tear both down afterwards."""
    cluster = Cluster(namespaces=(namespace,), **options)
    await cluster.start()
    server = Server(cluster)
    url = await server.start()
    client = ApiClient(configuration(url))
    try:
        yield EmulatorHandle(cluster, server, url, client.configuration, client,
                             kubeconfig(url, namespace=namespace), namespace)
    finally:
        await client.close()
        await cluster.stop()
        await server.stop()


@pytest_asyncio.fixture
async def k8s_emulator(request: pytest.FixtureRequest) -> AsyncIterator[EmulatorHandle]:
    """A fresh emulated cluster per test; options via indirect parametrisation."""
    options = dict(getattr(request, "param", None) or {})
    async with running_emulator(**options) as handle:
        yield handle


@pytest_asyncio.fixture
async def k8s_emulator_factory():
    """`await factory(**options)` → another running EmulatorHandle, stopped after the test."""
    async with contextlib.AsyncExitStack() as stack:
        async def start(**options) -> EmulatorHandle:
            return await stack.enter_async_context(running_emulator(**options))
        yield start


__all__ = ["k8s_emulator", "k8s_emulator_factory", "running_emulator", "EmulatorHandle",
           "configuration", "kubeconfig", "TEST_NAMESPACE"]
