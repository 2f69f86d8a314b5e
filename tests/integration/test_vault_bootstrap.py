"""``agentjobs vault bootstrap`` against a fresh OpenBao, real PostgreSQL and real RabbitMQ.

The threat checks of issue 5 live here too: what a shadow-phase token can and
cannot do, what the dispatcher's own token can and cannot do, that revoking by
accessor removes every credential issued under the token, and that the audit
log attributes every agent request to its investigation.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika
import aiormq
import hvac
import hvac.exceptions
import psycopg
import pytest
import pytest_asyncio

from schemas import vault_paths as layout
from dispatcher.plumbing.settings import Settings, load_settings
from dispatcher.credentials.bootstrap import (
    POLICY_DIR,
    BootstrapReport,
    bootstrap,
    database_connection,
    rabbitmq_connection,
    token_ttl,
)
from schemas import Phase
from tests.support.services import (
    ManagementClient,
    OpenBaoServer,
    Postgres,
    RabbitMQ,
    Vhost,
    free_port,
    wait_until,
)

pytestmark = pytest.mark.integration

REVOCATION_TIMEOUT = 10.0  # seconds: "within 10 s the users are gone" (issue 5)


# --------------------------------------------------------------------------- #
# fixtures
# --------------------------------------------------------------------------- #


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def bao() -> AsyncIterator[OpenBaoServer]:
    """A fresh OpenBao of this module only, with a file audit device (server config)."""
    server = OpenBaoServer(audit_log=True)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()  # revokes every lease: no PostgreSQL role or RabbitMQ user leaks


@pytest.fixture(scope="module")
def vault_env(
    bao: OpenBaoServer, postgres: Postgres, rabbitmq: RabbitMQ, amqp_vhost: Vhost
) -> dict[str, str]:
    """AGENTJOBS_* variables pointing the settings at this module's services."""
    user, password = rabbitmq.management_credentials
    mgmt = urlsplit(rabbitmq.management_url)
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{mgmt.netloc.rpartition('@')[2]}"
    return {
        "AGENTJOBS_VAULT__ADDR": bao.addr,
        "AGENTJOBS_VAULT__RABBITMQ_VHOST": amqp_vhost.name,
        # The kubernetes auth config only needs a host here; no login happens in this module.
        "AGENTJOBS_VAULT__KUBERNETES_HOST": "http://127.0.0.1:6443",
        "AGENTJOBS_POSTGRES__ADMIN_DSN": postgres.dsn,
        "AGENTJOBS_POSTGRES__DSN": postgres.dsn.replace(f"{postgres.user}@", "", 1),
        "AGENTJOBS_AMQP__URL": rabbitmq.amqp_url,
        "AGENTJOBS_AMQP__MANAGEMENT_URL": urlunsplit(mgmt._replace(netloc=netloc)),
    }


@pytest.fixture(scope="module")
def settings(vault_env: dict[str, str]) -> Settings:
    return load_settings(None, vault_env)


@dataclass(frozen=True)
class FirstRuns:
    first: BootstrapReport
    second: BootstrapReport


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def bootstrapped(bao: OpenBaoServer, settings: Settings) -> FirstRuns:
    """Bootstrap twice on the fresh server (what every other test builds on)."""
    first = await asyncio.to_thread(bootstrap, bao.hvac_client(), settings)
    second = await asyncio.to_thread(bootstrap, bao.hvac_client(), settings)
    return FirstRuns(first=first, second=second)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def dispatcher(bao: OpenBaoServer, bootstrapped: FirstRuns) -> hvac.Client:
    """A client holding a token with the dispatcher policy (plus `default`, as an admin would)."""
    created = await asyncio.to_thread(
        bao.hvac_client().auth.token.create, policies=[layout.DISPATCHER_POLICY], ttl="1h"
    )
    return bao.hvac_client(created["auth"]["client_token"])


@dataclass(frozen=True)
class AgentToken:
    token: str
    accessor: str
    wrapped_accessor: str
    client: hvac.Client


def mint_agent_token(
    bao: OpenBaoServer, dispatcher: hvac.Client, phase: Phase, investigation_id: str
) -> AgentToken:
    """What the dispatcher and the agent do: create through the role, wrapped; unwrap once."""
    wrapped = dispatcher.write_data(
        f"auth/token/create/{layout.token_role(phase)}",
        data={
            "meta": {
                layout.META_INVESTIGATION: investigation_id,
                layout.META_INCIDENT: f"incident-{investigation_id}",
                layout.META_PHASE: phase.value,
            },
            "ttl": "10m",
        },
        wrap_ttl="60s",
    )["wrap_info"]
    unwrapped = hvac.Client(url=bao.addr, token=wrapped["token"]).sys.unwrap()
    token = unwrapped["auth"]["client_token"]
    return AgentToken(
        token=token,
        accessor=unwrapped["auth"]["accessor"],
        wrapped_accessor=wrapped["wrapped_accessor"],
        client=bao.hvac_client(token),
    )


@pytest_asyncio.fixture(loop_scope="session")
async def shadow(bao: OpenBaoServer, dispatcher: hvac.Client) -> AgentToken:
    return await asyncio.to_thread(
        mint_agent_token, bao, dispatcher, Phase.SHADOW, f"inv-{uuid.uuid4().hex[:12]}"
    )


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


async def pg_role_exists(postgres: Postgres, role: str) -> bool:
    return await postgres.role_exists(role)


async def rabbit_user_exists(mgmt: ManagementClient, user: str) -> bool:
    return await mgmt.user_exists(user)


def amqp_url_for(rabbitmq: RabbitMQ, vhost: str, user: str, password: str) -> str:
    parts = urlsplit(rabbitmq.vhost_url(vhost))
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


async def run_cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """`agentjobs …` as a subprocess (the CLI configures logging process-wide)."""
    base = {
        k: v for k, v in os.environ.items() if not k.startswith(("AGENTJOBS_", "VAULT_", "BAO_"))
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dispatcher.cli.main",
        *args,
        env={**base, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    return proc.returncode or 0, out.decode(), err.decode()


# --------------------------------------------------------------------------- #
# bootstrap
# --------------------------------------------------------------------------- #


def test_connection_settings_keep_secrets_out_of_urls() -> None:
    settings = load_settings(
        None,
        {
            "AGENTJOBS_POSTGRES__ADMIN_DSN": "postgresql://admin:s3cr%40t@db:5432/app?sslmode=require",
            "AGENTJOBS_AMQP__MANAGEMENT_URL": "http://mq-admin:hunter2@mq:15672/",
        },
    )
    db = database_connection(settings)
    assert db.connection_url == "postgresql://{{username}}:{{password}}@db:5432/app?sslmode=require"
    assert (db.username, db.password, db.dbname) == ("admin", "s3cr@t", "app")
    mq = rabbitmq_connection(settings)
    assert (mq.connection_uri, mq.username, mq.password) == (
        "http://mq:15672",
        "mq-admin",
        "hunter2",
    )


async def test_bootstrap_on_fresh_openbao_then_no_changes(
    bao: OpenBaoServer, bootstrapped: FirstRuns, settings: Settings, vault_env: dict[str, str]
) -> None:
    # Given a fresh OpenBao, bootstrapped once
    written = {c.path for c in bootstrapped.first.changes}
    for phase in Phase:
        assert f"sys/policies/acl/{layout.policy(phase)}" in written
        assert f"auth/token/roles/{layout.token_role(phase)}" in written
        assert f"auth/kubernetes/role/{layout.kubernetes_role(phase)}" in written
    assert {
        f"sys/policies/acl/{layout.DISPATCHER_POLICY}",
        "sys/auth/kubernetes",
        "auth/kubernetes/config",
        "sys/mounts/database",
        "database/config/agentjobs-postgres",
        "database/roles/agentjobs-diagnostics",
        "database/roles/agentjobs-remediation",
        "sys/mounts/rabbitmq",
        "rabbitmq/config/connection",
        "rabbitmq/roles/agentjobs-results",
        "sys/mounts/agentjobs-kv",
        "agentjobs-kv/data/llm",
    } <= written
    assert any("placeholder CA" in note for note in bootstrapped.first.notes)

    # Then the second run changed nothing
    assert bootstrapped.second.changes == []

    # And the CLI, a third time, says so and exits 0
    code, out, err = await run_cli("vault", "bootstrap", "--token", bao.root_token, env=vault_env)
    assert code == 0, err
    assert out.splitlines()[0] == "no changes"
    assert bao.root_token not in out + err

    # And so does it reading the policies from elsewhere (a container mounts their ConfigMap)
    with tempfile.TemporaryDirectory() as mounted:
        for hcl in POLICY_DIR.glob("*.hcl"):
            shutil.copy(hcl, mounted)
        code, out, err = await run_cli("vault", "bootstrap", "--token", bao.root_token, "--policy-dir", mounted,
                                       env=vault_env)
    assert code == 0 and out.splitlines()[0] == "no changes", err

    # And the token role carries the limits the dispatcher relies on
    role = await asyncio.to_thread(
        bao.hvac_client().read, f"auth/token/roles/{layout.token_role(Phase.SHADOW)}"
    )
    assert role["data"]["allowed_policies"] == [layout.policy(Phase.SHADOW)]
    assert role["data"]["orphan"] is False
    assert role["data"]["renewable"] is True
    assert role["data"]["token_explicit_max_ttl"] == token_ttl(settings) == 1200 + 120

    # And the connection allows both database roles, the remediation one alone signalling backends
    connection = await asyncio.to_thread(bao.hvac_client().read, "database/config/agentjobs-postgres")
    assert sorted(connection["data"]["allowed_roles"]) == ["agentjobs-diagnostics", "agentjobs-remediation"]
    for name, signals in (("agentjobs-diagnostics", False), ("agentjobs-remediation", True)):
        body = (await asyncio.to_thread(bao.hvac_client().read, f"database/roles/{name}"))["data"]
        granted = " ".join(body["creation_statements"])
        assert "pg_read_all_stats" in granted and "default_transaction_read_only = on" in granted
        assert ("pg_signal_backend" in granted) is signals, name


async def test_bootstrap_keeps_an_existing_llm_key(
    bao: OpenBaoServer, bootstrapped: FirstRuns, settings: Settings
) -> None:
    # Given an operator stored the LLM key
    root = bao.hvac_client()
    await asyncio.to_thread(
        root.secrets.kv.v2.create_or_update_secret,
        path=layout.KV_LLM,
        secret={"api_key": "sk-operator"},
        mount_point=layout.KV_MOUNT,
    )
    # When bootstrap runs again
    report = await asyncio.to_thread(bootstrap, root, settings)
    # Then nothing changed and the key is still there
    assert report.changes == []
    read = await asyncio.to_thread(
        root.secrets.kv.v2.read_secret_version,
        path=layout.KV_LLM,
        mount_point=layout.KV_MOUNT,
        raise_on_deleted_version=True,
    )
    assert read["data"]["data"] == {"api_key": "sk-operator"}


async def test_bootstrap_without_admin_dsn_skips_database_engine(
    bao: OpenBaoServer, bootstrapped: FirstRuns, vault_env: dict[str, str]
) -> None:
    settings = load_settings(None, {**vault_env, "AGENTJOBS_POSTGRES__ADMIN_DSN": ""})
    report = await asyncio.to_thread(bootstrap, bao.hvac_client(), settings)
    assert report.changes == []
    assert any(note.startswith("skipped: database engine") for note in report.notes)


async def test_cli_exits_2_when_vault_unreachable_or_token_lacks_rights(
    bootstrapped: FirstRuns, dispatcher: hvac.Client, vault_env: dict[str, str]
) -> None:
    # Unreachable: nothing listens on the port
    code, out, err = await run_cli(
        "vault",
        "bootstrap",
        "--addr",
        f"http://127.0.0.1:{free_port()}",
        "--token",
        "not-a-token",
        env=vault_env,
    )
    assert code == 2
    assert "cannot reach Vault" in err
    assert "Traceback" not in err

    # A token without admin rights (the dispatcher's), passed through VAULT_TOKEN
    code, out, err = await run_cli(
        "vault", "bootstrap", env={**vault_env, "VAULT_TOKEN": dispatcher.token}
    )
    assert code == 2
    assert "permission denied" in err
    assert "Traceback" not in err
    assert dispatcher.token not in out + err


async def test_changed_admin_password_is_applied_but_never_printed(
    bao: OpenBaoServer, bootstrapped: FirstRuns, settings: Settings, vault_env: dict[str, str]
) -> None:
    # Given the PostgreSQL admin password changed (trust auth here ignores its value)
    secret = "pw-" + uuid.uuid4().hex
    dsn = settings.postgres.admin_dsn.replace("postgres@", f"postgres:{secret}@", 1)
    assert secret in dsn
    try:
        # When bootstrap runs with it
        code, out, err = await run_cli(
            "vault",
            "bootstrap",
            "--token",
            bao.root_token,
            env={**vault_env, "AGENTJOBS_POSTGRES__ADMIN_DSN": dsn},
        )
        # Then the connection is rewritten (the fingerprint noticed), and no output has it
        assert code == 0, err
        assert "updated database connection agentjobs-postgres" in out
        assert secret not in out + err
        assert bao.root_token not in out + err
        stored = await asyncio.to_thread(
            bao.hvac_client().read, "database/config/agentjobs-postgres"
        )
        assert secret not in json.dumps(stored)
    finally:
        await asyncio.to_thread(bootstrap, bao.hvac_client(), settings)


# --------------------------------------------------------------------------- #
# what a shadow-phase agent token can do
# --------------------------------------------------------------------------- #


async def test_shadow_token_is_the_phase_policy_only(
    shadow: AgentToken, settings: Settings
) -> None:
    info = (await asyncio.to_thread(shadow.client.auth.token.lookup_self))["data"]
    assert info["policies"] == [layout.policy(Phase.SHADOW)]  # not even `default`
    assert info["meta"][layout.META_PHASE] == Phase.SHADOW.value
    assert info["orphan"] is False
    # The role's token_explicit_max_ttl caps renewals (the token's own explicit_max_ttl
    # field reads 0: the role's value is applied at creation and renewal).
    renewed = await asyncio.to_thread(shadow.client.auth.token.renew_self, increment="100h")
    assert 0 < renewed["auth"]["lease_duration"] <= token_ttl(settings)


async def test_shadow_token_gets_read_only_postgres_user(
    shadow: AgentToken, postgres: Postgres
) -> None:
    # When the agent reads its database credentials
    creds = (await asyncio.to_thread(shadow.client.read, layout.database_creds_path()))["data"]
    user, password = creds["username"], creds["password"]

    # Then a real role exists that can read statistics…
    assert await pg_role_exists(postgres, user)
    async with await psycopg.AsyncConnection.connect(
        host=postgres.host,
        port=postgres.port,
        dbname=postgres.dbname,
        user=user,
        password=password,
        autocommit=True,
    ) as conn:
        cur = await conn.execute("SELECT count(*) FROM pg_stat_activity")
        assert (await cur.fetchone())[0] >= 1
        # …but cannot write: read-only by default, and no privilege even when it asks for R/W
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            await conn.execute("CREATE TABLE agent_was_here (id int)")
        await conn.execute("SET default_transaction_read_only = off")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            await conn.execute("CREATE TABLE agent_was_here (id int)")


async def test_shadow_token_gets_rabbitmq_user_that_only_publishes_results(
    shadow: AgentToken,
    rabbitmq: RabbitMQ,
    rabbitmq_management: ManagementClient,
    amqp_vhost: Vhost,
) -> None:
    # Given the exchanges exist (declared by the broker admin, as the dispatcher would)
    admin = await aio_pika.connect(amqp_vhost.amqp_url)
    async with admin:
        channel = await admin.channel()
        await channel.declare_exchange(
            "agentjobs.results", aio_pika.ExchangeType.TOPIC, durable=True
        )
        await channel.declare_exchange(
            "agentjobs.incidents", aio_pika.ExchangeType.TOPIC, durable=True
        )

    # When the agent reads its RabbitMQ credentials
    creds = (await asyncio.to_thread(shadow.client.read, layout.rabbitmq_creds_path()))["data"]
    assert await rabbit_user_exists(rabbitmq_management, creds["username"])
    url = amqp_url_for(rabbitmq, amqp_vhost.name, creds["username"], creds["password"])

    agent = await aio_pika.connect(url)
    async with agent:
        # Then it can publish to the results exchange, confirmed by the broker
        channel = await agent.channel(publisher_confirms=True, on_return_raises=True)
        results = await channel.get_exchange("agentjobs.results")  # passive declare: allowed
        confirmation = await results.publish(
            aio_pika.Message(b"{}"), routing_key="finding.info.test", mandatory=False, timeout=10
        )
        assert confirmation is not None

        # And publishing anywhere else is refused by the broker
        other_channel = await agent.channel(publisher_confirms=True)
        incidents = await other_channel.get_exchange("agentjobs.incidents", ensure=False)
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await incidents.publish(
                aio_pika.Message(b"{}"), routing_key="x", mandatory=False, timeout=10
            )


async def test_the_agents_rabbitmq_user_is_tagged_monitoring_so_the_management_api_answers_it(
    bao: OpenBaoServer,
    shadow: AgentToken,
    rabbitmq: RabbitMQ,
    rabbitmq_management: ManagementClient,
    amqp_vhost: Vhost,
) -> None:
    from agent.tools.rabbitmq import RabbitMQTool

    # Given the role as bootstrap wrote it: the monitoring tag beside the vhosts map
    role = await asyncio.to_thread(bao.hvac_client().read, f"{layout.RABBITMQ_MOUNT}/roles/{layout.RABBITMQ_ROLE}")
    assert role["data"]["tags"] == "monitoring"
    # When the agent's Vault-issued user asks the management API
    creds = (await asyncio.to_thread(shadow.client.read, layout.rabbitmq_creds_path()))["data"]
    user = await rabbitmq_management._request("GET", f"/api/users/{quote(creds['username'], safe='')}")
    assert user["tags"] in (["monitoring"], "monitoring")
    tool = RabbitMQTool(rabbitmq.amqp_url, username=creds["username"], password=creds["password"],
                        management_url=rabbitmq_management.base_url)
    try:
        overview = await tool.run("overview", {})
        own = await tool.run("queues", {"vhost": amqp_vhost.name})
        outside = await tool.run("queues", {"vhost": "/"})  # not in its vhosts map
    finally:
        await tool.close()
    # Then it reads the nodes' alarms and its own vhost's queues, and nothing of a vhost outside its map
    assert overview.ok and overview.data["nodes"], overview.excerpt
    assert own.ok, own.excerpt
    assert not outside.ok and "HTTP 401" in outside.excerpt


FORBIDDEN_FOR_AGENTS: list[tuple[str, str, dict[str, Any] | None]] = [
    # write paths in its own domains
    ("write", "agentjobs-kv/data/llm", {"data": {"api_key": "stolen"}}),
    ("write", "database/config/agentjobs-postgres", {"allowed_roles": ["*"]}),
    ("read", "database/config/agentjobs-postgres", None),
    ("write", "database/roles/agentjobs-diagnostics", {"db_name": "agentjobs-postgres"}),
    ("write", "database/roles/agentjobs-remediation", {"db_name": "agentjobs-postgres"}),
    # the database role of the phases that act (pg_signal_backend): not shadow's to read
    ("read", "database/creds/agentjobs-remediation", None),
    ("write", "rabbitmq/config/connection", {"connection_uri": "http://evil"}),
    ("write", "rabbitmq/roles/agentjobs-results", {"vhosts": "{}"}),
    # Vault itself
    ("write", "sys/policies/acl/agentjobs-agent-shadow", {"policy": 'path "*" {}'}),
    ("read", "sys/mounts", None),
    ("write", "sys/leases/revoke-prefix/database", {}),
    ("write", "auth/token/create", {"policies": ["agentjobs-agent-shadow"]}),
    ("write", "auth/token/create/agentjobs-agent-autonomous", {}),
    ("write", "auth/token/revoke-accessor", {"accessor": "x"}),
    ("write", "cubbyhole/stash", {"x": "y"}),  # not even the `default` policy's cubbyhole
    # other domains
    ("read", "agentjobs-kv/data/other", None),
    ("read", "agentjobs-kv/data/bootstrap", None),
    ("read", "secret/data/anything", None),  # another mount (dev mode's kv)
    ("read", "database/creds/other-role", None),
]


@pytest.mark.parametrize(("op", "path", "body"), FORBIDDEN_FOR_AGENTS, ids=lambda v: str(v)[:40])
async def test_shadow_token_is_denied(
    shadow: AgentToken, op: str, path: str, body: dict[str, Any] | None
) -> None:
    def attempt() -> Any:
        if op == "read":
            return shadow.client.adapter.get(f"/v1/{path}")
        return shadow.client.write_data(path, data=body)

    with pytest.raises(hvac.exceptions.Forbidden):
        await asyncio.to_thread(attempt)


@pytest.mark.parametrize("phase", list(Phase), ids=lambda p: p.value)
async def test_each_phase_reads_the_database_role_of_its_phase_only(
    bao: OpenBaoServer, dispatcher: hvac.Client, postgres: Postgres, phase: Phase
) -> None:
    # Given a token of the phase, as the dispatcher mints it
    agent = await asyncio.to_thread(
        mint_agent_token, bao, dispatcher, phase, f"inv-{uuid.uuid4().hex[:12]}"
    )
    try:
        own = layout.database_creds_path(phase)
        other = next(
            layout.database_creds_path(p) for p in Phase if layout.database_creds_path(p) != own
        )
        acting = phase in (Phase.LIMITED_REMEDIATION, Phase.AUTONOMOUS)
        assert own == ("database/creds/agentjobs-remediation" if acting else "database/creds/agentjobs-diagnostics")
        # When it reads its own role's credentials: a real PostgreSQL user
        creds = (await asyncio.to_thread(agent.client.read, own))["data"]
        assert await pg_role_exists(postgres, creds["username"])
        # Then the other role's are refused by Vault
        with pytest.raises(hvac.exceptions.Forbidden):
            await asyncio.to_thread(agent.client.adapter.get, f"/v1/{other}")
    finally:
        await asyncio.to_thread(agent.client.auth.token.revoke_self)


async def test_shadow_token_reads_llm_secret(shadow: AgentToken) -> None:
    read = await asyncio.to_thread(shadow.client.read, layout.kv_llm_path())
    assert read is not None and "data" in read["data"]


# --------------------------------------------------------------------------- #
# revocation by the dispatcher
# --------------------------------------------------------------------------- #


async def test_revoke_by_accessor_removes_token_and_every_credential(
    shadow: AgentToken,
    dispatcher: hvac.Client,
    postgres: Postgres,
    rabbitmq_management: ManagementClient,
) -> None:
    # Given an agent that holds a PostgreSQL user and a RabbitMQ user
    db = (await asyncio.to_thread(shadow.client.read, layout.database_creds_path()))["data"]
    mq = (await asyncio.to_thread(shadow.client.read, layout.rabbitmq_creds_path()))["data"]
    assert await pg_role_exists(postgres, db["username"])
    assert await rabbit_user_exists(rabbitmq_management, mq["username"])
    # (the dispatcher only ever saw the wrapped accessor — it is the token's accessor)
    assert shadow.wrapped_accessor == shadow.accessor
    looked_up = await asyncio.to_thread(dispatcher.auth.token.lookup_accessor, shadow.accessor)
    assert looked_up["data"]["meta"][layout.META_PHASE] == "shadow"

    # When the dispatcher revokes by accessor (the Job ended)
    await asyncio.to_thread(dispatcher.auth.token.revoke_accessor, shadow.wrapped_accessor)

    # Then the token is gone…
    with pytest.raises(hvac.exceptions.InvalidRequest):
        await asyncio.to_thread(dispatcher.auth.token.lookup_accessor, shadow.accessor)
    with pytest.raises(hvac.exceptions.Forbidden):
        await asyncio.to_thread(shadow.client.auth.token.lookup_self)

    # …and so are the users it was issued
    async def pg_gone() -> bool:
        return not await pg_role_exists(postgres, db["username"])

    async def mq_gone() -> bool:
        return not await rabbit_user_exists(rabbitmq_management, mq["username"])

    await wait_until(pg_gone, timeout=REVOCATION_TIMEOUT, what="PostgreSQL role dropped")
    await wait_until(mq_gone, timeout=REVOCATION_TIMEOUT, what="RabbitMQ user deleted")


DENIED_TO_DISPATCHER: list[tuple[str, dict[str, Any] | None, str | None]] = [
    # (path, body or None for a read, wrap_ttl)
    ("database/creds/agentjobs-diagnostics", None, None),
    ("database/creds/agentjobs-remediation", None, None),
    ("rabbitmq/creds/agentjobs-results", None, None),
    ("agentjobs-kv/data/llm", None, None),
    ("auth/token/create", {"policies": ["agentjobs-agent-shadow"]}, "60s"),
    ("auth/token/create-orphan", {"policies": ["agentjobs-agent-shadow"]}, "60s"),
    ("auth/token/create/some-other-role", {}, "60s"),
    # through an agent role, but unwrapped: wrapping is mandatory
    ("auth/token/create/agentjobs-agent-shadow", {}, None),
    ("auth/token/roles/agentjobs-agent-shadow", {"allowed_policies": ["root"]}, None),
    ("sys/policies/acl/agentjobs-dispatcher", {"policy": 'path "*" {}'}, None),
]


@pytest.mark.parametrize(("path", "body", "wrap"), DENIED_TO_DISPATCHER, ids=lambda v: str(v)[:40])
async def test_dispatcher_token_cannot_read_creds_or_mint_other_tokens(
    dispatcher: hvac.Client, path: str, body: dict[str, Any] | None, wrap: str | None
) -> None:
    def attempt() -> Any:
        if body is None:
            return dispatcher.adapter.get(f"/v1/{path}")
        return dispatcher.write_data(path, data=body, wrap_ttl=wrap)

    with pytest.raises(hvac.exceptions.Forbidden):
        await asyncio.to_thread(attempt)


async def test_dispatcher_cannot_widen_policies_through_an_agent_role(
    dispatcher: hvac.Client,
) -> None:
    for policies in (["root"], [layout.DISPATCHER_POLICY], [layout.policy(Phase.AUTONOMOUS)]):
        with pytest.raises((hvac.exceptions.Forbidden, hvac.exceptions.InvalidRequest)):
            await asyncio.to_thread(
                dispatcher.write_data,
                f"auth/token/create/{layout.token_role(Phase.SHADOW)}",
                data={"policies": policies},
                wrap_ttl="60s",
            )


# --------------------------------------------------------------------------- #
# audit
# --------------------------------------------------------------------------- #


async def test_audit_log_attributes_every_agent_request_to_its_investigation(
    bao: OpenBaoServer, dispatcher: hvac.Client
) -> None:
    # Given an agent token minted for one investigation
    investigation = f"inv-audit-{uuid.uuid4().hex[:8]}"
    agent = await asyncio.to_thread(mint_agent_token, bao, dispatcher, Phase.SHADOW, investigation)

    # When the agent does its work — including a request it is not allowed to make
    def work() -> set[str]:
        client = agent.client
        client.auth.token.lookup_self()
        db = client.read(layout.database_creds_path())
        client.read(layout.rabbitmq_creds_path())
        client.read(layout.kv_llm_path())
        client.sys.renew_lease(lease_id=db["lease_id"], increment=60)
        with pytest.raises(hvac.exceptions.Forbidden):
            client.read("agentjobs-kv/data/other")
        client.auth.token.revoke_self()
        return {
            "auth/token/lookup-self",
            layout.database_creds_path(),
            layout.rabbitmq_creds_path(),
            layout.kv_llm_path(),
            "sys/leases/renew",
            "agentjobs-kv/data/other",
            "auth/token/revoke-self",
        }

    expected_paths = await asyncio.to_thread(work)

    # Then every audit entry made with that token carries the investigation id
    hashed = (
        await asyncio.to_thread(
            bao.hvac_client().write_data,
            "sys/audit-hash/agentjobs-test",
            data={"input": agent.token},
        )
    )["data"]["hash"]
    assert bao.audit_log_path is not None

    def agent_entries() -> list[dict[str, Any]]:
        entries = [json.loads(line) for line in bao.audit_log_path.read_text().splitlines()]
        return [e for e in entries if (e.get("auth") or {}).get("client_token") == hashed]

    async def all_paths_logged() -> bool:
        seen = {(e["type"], e["request"]["path"]) for e in agent_entries()}
        return all(("response", p) in seen and ("request", p) in seen for p in expected_paths)

    await wait_until(all_paths_logged, timeout=5, what="agent requests in the audit log")
    entries = agent_entries()
    assert len(entries) >= 2 * len(expected_paths)
    for entry in entries:
        assert entry["auth"]["metadata"][layout.META_INVESTIGATION] == investigation, entry
    # The raw token never appears in the log (the file device HMACs it)
    assert agent.token not in bao.audit_log_path.read_text()
