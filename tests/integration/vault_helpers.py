"""A fresh OpenBao configured by ``agentjobs vault bootstrap``, for tests that need agent credentials."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import quote, urlsplit, urlunsplit

import hvac

from schemas import vault_paths as layout
from dispatcher.plumbing.settings import load_settings
from dispatcher.credentials.bootstrap import bootstrap
from tests.support.services import OpenBaoServer, Postgres, RabbitMQ

from .dispatcher_harness import declare_topology
from .k8s_helpers import prepare_cluster


@dataclass(frozen=True)
class Vault:
    server: OpenBaoServer
    env: dict[str, str]  # AGENTJOBS_* for a dispatcher that mints through this Vault
    dispatcher_token: str

    def root(self) -> hvac.Client:
        return self.server.hvac_client()

    def token_alive(self, accessor: str) -> bool:
        try:
            self.root().auth.token.lookup_accessor(accessor)
            return True
        except (hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden):
            return False


def service_env(server: OpenBaoServer, postgres: Postgres, rabbitmq: RabbitMQ, vhost: str) -> dict[str, str]:
    user, password = rabbitmq.management_credentials
    mgmt = urlsplit(rabbitmq.management_url)
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{mgmt.netloc.rpartition('@')[2]}"
    return {
        "AGENTJOBS_VAULT__ADDR": server.addr,
        "AGENTJOBS_VAULT__AUTH_MODE": "per-investigation",
        "AGENTJOBS_VAULT__RABBITMQ_VHOST": vhost,
        "AGENTJOBS_VAULT__KUBERNETES_HOST": "http://127.0.0.1:6443",
        "AGENTJOBS_POSTGRES__ADMIN_DSN": postgres.dsn,
        "AGENTJOBS_POSTGRES__DSN": postgres.dsn.replace(f"{postgres.user}@", "", 1),
        "AGENTJOBS_AMQP__MANAGEMENT_URL": urlunsplit(mgmt._replace(netloc=netloc)),
    }


@contextlib.asynccontextmanager
async def bootstrapped_vault(postgres: Postgres, rabbitmq: RabbitMQ, vhost: str) -> AsyncIterator[Vault]:
    """Fresh OpenBao → bootstrap → a token with the dispatcher policy; stopped (leases revoked) after."""
    server = OpenBaoServer()
    await server.start()
    try:
        env = service_env(server, postgres, rabbitmq, vhost)
        await asyncio.to_thread(bootstrap, server.hvac_client(), load_settings(None, env))
        created = await asyncio.to_thread(
            server.hvac_client().auth.token.create, policies=[layout.DISPATCHER_POLICY], ttl="2h"
        )
        token = created["auth"]["client_token"]
        yield Vault(server=server, env={**env, "AGENTJOBS_VAULT__TOKEN": token}, dispatcher_token=token)
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def vault_world(k8s_emulator, amqp_vhost, rabbitmq_management, postgres: Postgres,
                      rabbitmq: RabbitMQ) -> AsyncIterator[Vault]:
    """What a dispatcher that mints tokens needs: the emulated cluster's ServiceAccounts, an emptied
    vhost with the topology declared, and a freshly bootstrapped OpenBao (stopped afterwards)."""
    prepare_cluster(k8s_emulator)
    await rabbitmq_management.delete_vhost(amqp_vhost.name)
    await rabbitmq_management.create_vhost(amqp_vhost.name)
    await rabbitmq_management.set_permissions(amqp_vhost.name, "guest")
    async with bootstrapped_vault(postgres, rabbitmq, amqp_vhost.name) as vault:
        await declare_topology(amqp_vhost.amqp_url, load_settings(None, {}))
        yield vault
