"""The component identities tests connect as: the product's own grants, on every test vhost.

One password per identity and test process (users are broker-wide; names are the defaults of
``[identities]``). ``temporary_vhost`` applies ``dispatcher.plumbing.identities.grants`` to each
vhost it creates, so a test connects as the bridge, the dispatcher, trust, an operator or an
admin with exactly the rights that component has in production — and ``Vhost.amqp_url`` (the
broker administrator, ``guest`` here) is left for what only the test itself does: inspecting
queues, creating users, attacking.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from dispatcher.plumbing.identities import COMPONENTS, grants, url_as
from dispatcher.plumbing.settings import IdentitySettings

IDENTITIES = IdentitySettings()
# Stable across test processes (users are broker-wide: concurrent runs must agree on them).
PASSWORDS = {component: f"agentjobs-test-{component}" for component in COMPONENTS}


def user(component: str) -> str:
    return next(g.user for g in grants(IDENTITIES) if g.component == component)


def url_for(vhost_url: str, component: str) -> str:
    """``vhost_url`` connecting as ``component`` (bridge, dispatcher, trust, operator, admin)."""
    return url_as(vhost_url, user(component), PASSWORDS[component])


async def grant_all(mgmt: Any, vhost: str) -> None:
    """Create/update every identity (this process's passwords) and grant it its rights on ``vhost``."""
    from dispatcher.plumbing.identities import apply

    for grant in grants(IDENTITIES):
        await apply(mgmt.http, mgmt.base_url, None, vhost, grant, PASSWORDS[grant.component])


@contextlib.asynccontextmanager
async def agent_user(mgmt: Any, vhost: str, job_name: str = "agentjobs-test-job") -> AsyncIterator[tuple[str, str]]:
    """An agent-shaped broker user (``token-<job name>-<uuid>``, what Vault's RabbitMQ engine issues
    an agent) with the agent's rights on ``vhost`` — publish to the results exchange, nothing else;
    yields ``(user, url)`` and deletes the user after."""
    from dispatcher.credentials.bootstrap import RESULTS_EXCHANGE

    name, password = f"{IDENTITIES.agent_prefix}{job_name}-{uuid.uuid4()}", uuid.uuid4().hex
    await mgmt.create_user(name, password)
    try:
        await mgmt.set_permissions(vhost, name, configure="", read="",
                                   write="^" + RESULTS_EXCHANGE.replace(".", r"\.") + "$")
        yield name, url_as(mgmt.rabbitmq.vhost_url(vhost), name, password)
    finally:
        await mgmt.delete_user(name)


def seed_up_credentials(state_dir: str | Path, vhost_url: str) -> None:
    """Store this process's identity passwords where ``agentjobs up`` keeps its credentials, so an
    ``up`` started by a test keeps them (users are broker-wide: a fresh password would lock out
    every other test vhost's connections as that identity)."""
    from dispatcher.plumbing.identities import store_credentials

    store_credentials(state_dir, {c: {"user": user(c), "password": PASSWORDS[c], "url": url_for(vhost_url, c)}
                                  for c in COMPONENTS})


def password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256``: base64(salt ‖ sha256(salt ‖ password))."""
    salt = salt if salt is not None else os.urandom(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def definitions_with_passwords(vhost: str = "/") -> dict[str, Any]:
    """Every identity as RabbitMQ definitions (``rabbitmqctl import_definitions``), with this
    process's passwords: for a broker without the management API (a private test node)."""
    from dispatcher.plumbing.identities import definitions

    doc = definitions(IDENTITIES, vhost)
    by_user = {user(c): PASSWORDS[c] for c in COMPONENTS}
    for entry in doc["users"]:
        entry["password_hash"] = password_hash(by_user[entry["name"]])
    return doc
