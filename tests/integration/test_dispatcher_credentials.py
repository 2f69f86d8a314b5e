"""Every investigation's Vault identity dies with its Job, however the Job ends."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import hvac
import pytest
from kubernetes_asyncio.client import CoreV1Api

from dispatcher.credentials.bootstrap import bootstrap
from dispatcher.jobs import jobspec
from dispatcher.credentials.tokens import Revocation, VaultCredentials
from dispatcher.plumbing.identities import url_as
from dispatcher.plumbing.settings import load_settings
from schemas import Phase, decode_incident, identify
from schemas import vault_paths as vault_layout
from tests.integration.dispatcher_harness import PodDriver, Results, publish
from tests.integration.test_dispatcher import _consumed, _until, running_dispatcher
from tests.integration.vault_helpers import vault_world
from tests.support.identities import url_for
from tests.support.k8s.resources import JOBS, SECRETS, SERVICEACCOUNTS
from tests.support.payloads import am_alert, dumps, group

pytestmark = pytest.mark.integration
GONE_WITHIN = 10.0  # seconds (issue 5)


@pytest.fixture
async def world(k8s_emulator, amqp_vhost, rabbitmq_management, postgres, rabbitmq):
    async with vault_world(k8s_emulator, amqp_vhost, rabbitmq_management, postgres, rabbitmq) as vault:
        yield k8s_emulator, amqp_vhost.amqp_url, vault


def _incident(name: str) -> bytes:
    return dumps(group([am_alert(starts_at="2026-11-26T02:00:00Z", alertname=name)], group_key=f"cred-{name}"))


async def test_each_ending_revokes_the_jobs_token(world):
    handle, url, vault = world
    ns = handle.namespace
    endings = {"Ok": 0, "Crash": 2, "Oom": "oom", "Slow": None, "Cancelled": None, "Deleted": None}
    names = {k: identify(decode_incident(_incident(k))).job_name for k in endings}
    driver = PodDriver(handle, decide=lambda pod: None)  # every agent runs until the test ends it
    async with driver.running_(), Results(url) as results, \
            running_dispatcher(handle, url_for(url, "dispatcher"),
                               **{k: v for k, v in vault.env.items() if k.startswith("AGENTJOBS_VAULT")}) as d:
        await publish(url, [_incident(k) for k in endings])
        await _until(lambda: len(handle.cluster.store.list(JOBS, ns)) == len(endings))
        await _until(lambda: all(handle.cluster.store.get(SECRETS, ns, jobspec.secret_name(n)) for n in names.values()))
        # Given every Job carries only a wrapping token, and its accessor as an annotation
        accessors = {}
        for key, name in names.items():
            job = handle.cluster.job(ns, name)
            accessors[key] = job["metadata"]["annotations"][jobspec.ANN_TOKEN_ACCESSOR]
            secret = handle.cluster.store.get(SECRETS, ns, jobspec.secret_name(name))
            wrapping = base64.b64decode(secret["data"][jobspec.WRAPPED_TOKEN_FILE]).decode()
            assert wrapping and wrapping not in str(job)  # the token is never on the Job itself
            assert vault.token_alive(accessors[key])
        await results.wait_for(lambda: len(results.keys("lifecycle.started")) == len(endings))
        # When the Jobs end every way a Job can end
        for pod in list(driver.running):
            key = next(k for k, n in names.items() if pod.startswith(n))
            if endings[key] is not None:
                driver.end(pod, endings[key])
        await d.runtime.cancel(names["Cancelled"])
        await d.runtime.batch.delete_namespaced_job(names["Deleted"], ns)
        handle.clock.advance(901)
        await results.wait_for(lambda: len(results.keys("lifecycle.succeeded")) + len(results.keys("lifecycle.failed"))
                               + len(results.keys("lifecycle.cancelled")) == len(endings))
        # Then no token survives its Job
        await _until(lambda: not any(vault.token_alive(a) for a in accessors.values()), timeout=GONE_WITHIN)


async def test_a_token_minted_for_an_existing_job_is_revoked(world):
    handle, url, vault = world
    root = vault.root()

    def agent_tokens() -> int:
        keys = root.list("auth/token/accessors")["data"]["keys"]
        return sum(1 for a in keys
                   if "agentjobs-agent-" in str(root.auth.token.lookup_accessor(a)["data"].get("policies")))

    body = _incident("Twice")
    env = {k: v for k, v in vault.env.items() if k.startswith("AGENTJOBS_VAULT")}
    async with running_dispatcher(handle, url_for(url, "dispatcher"), **env) as d:
        await publish(url, [body])
        await _until(lambda: _consumed(d.metrics) >= 1)
    assert await asyncio.to_thread(agent_tokens) == 1
    # A restarted dispatcher (empty memory) sees the same incident again: 409, and a fresh token
    async with running_dispatcher(handle, url_for(url, "dispatcher"), **env) as d:
        await publish(url, [body])
        await _until(lambda: _consumed(d.metrics) >= 1)
    assert await asyncio.to_thread(agent_tokens) == 1  # the second one was revoked at once
    assert len(handle.cluster.store.list(JOBS, handle.namespace)) == 1


async def test_vault_down_at_dispatch_makes_the_incident_wait_not_vanish(world, k8s_emulator):
    handle, url, vault = world
    env = {k: v for k, v in vault.env.items() if k.startswith("AGENTJOBS_VAULT")}
    env |= {"AGENTJOBS_VAULT__ADDR": "http://127.0.0.1:9", "AGENTJOBS_RETRY__MAX_ELAPSED": "0.5",
            "AGENTJOBS_RETRY__BASE": "0.05", "AGENTJOBS_RETRY__CAP": "0.1"}
    body = _incident("Waiting")
    async with running_dispatcher(handle, url_for(url, "dispatcher"), **env) as d:
        await publish(url, [body])
        await _until(lambda: d.metrics.retries._value.get() >= 3)
        assert handle.cluster.store.list(JOBS, handle.namespace) == []  # no Job without credentials
    # When Vault is reachable again, the same (redelivered) incident is dispatched
    env["AGENTJOBS_VAULT__ADDR"] = vault.server.addr
    async with running_dispatcher(handle, url_for(url, "dispatcher"), **env):
        await _until(lambda: len(handle.cluster.store.list(JOBS, handle.namespace)) == 1)
    job = handle.cluster.store.list(JOBS, handle.namespace)[0]
    assert jobspec.ANN_TOKEN_ACCESSOR in job["metadata"]["annotations"]


async def test_revoking_an_unknown_accessor_is_not_an_error(world):
    _, _, vault = world
    creds = VaultCredentials(load_settings(None, vault.env).vault)
    try:
        assert await creds.revoke("nonexistent-accessor") is Revocation.GONE
        token = await creds.mint(phase=Phase.SHADOW, investigation_id="x" * 40, incident_key="k", job_name="aj-x", ttl=60)
        assert vault.token_alive(token.accessor)
        assert await creds.revoke(token.accessor, expected=creds.expected(
            investigation_id="x" * 40, job_name="aj-x", phase=Phase.SHADOW)) is Revocation.REVOKED
        assert not vault.token_alive(token.accessor)
        assert await creds.revoke(token.accessor) is Revocation.GONE
    finally:
        await creds.close()


@dataclass(frozen=True)
class Login:
    """What an agent holds after a kubernetes-auth login: its token's accessor and the broker user
    Vault's RabbitMQ engine issued under that token (``kubernetes-<ns>-<sa>-<uuid>``)."""

    accessor: str
    user: str
    password: str

    def url(self, vhost_url: str) -> str:
        return url_as(vhost_url, self.user, self.password)


async def kubernetes_auth(handle, vault, tmp_path) -> Callable[..., Awaitable[Login]]:
    """Point OpenBao's kubernetes auth at the emulated API server (as ``vault bootstrap`` does, with
    a reviewer ServiceAccount and the emulator's namespace); returns ``login(phase)``: a real login
    with a projected-token JWT of that phase's ServiceAccount, then its RabbitMQ user."""
    ns = handle.namespace
    core = CoreV1Api(handle.api_client)
    reviewer = await core.create_namespaced_service_account(ns, {"metadata": {"name": "token-reviewer"}})
    reviewer_jwt, _ = handle.tokens.mint(ns, "token-reviewer", reviewer.metadata.uid, expiration_seconds=3600)
    (tmp_path / "reviewer.jwt").write_text(reviewer_jwt)
    settings = load_settings(None, {**vault.env, "AGENTJOBS_VAULT__KUBERNETES_HOST": handle.url,
                                    "AGENTJOBS_VAULT__KUBERNETES_NAMESPACE": ns,
                                    "AGENTJOBS_VAULT__KUBERNETES_REVIEWER_JWT_FILE": str(tmp_path / "reviewer.jwt")})
    await asyncio.to_thread(bootstrap, vault.root(), settings)

    async def login(phase: Phase = Phase.SHADOW) -> Login:
        account = jobspec.service_account(phase, settings)
        sa = handle.cluster.store.get(SERVICEACCOUNTS, ns, account)
        jwt, _ = handle.tokens.mint(ns, account, sa["metadata"]["uid"], audiences=[settings.k8s.token_audience],
                                    expiration_seconds=600)

        def in_vault() -> Login:
            agent = hvac.Client(url=vault.server.addr)
            auth = agent.auth.kubernetes.login(vault_layout.kubernetes_role(phase), jwt)["auth"]
            agent.token = auth["client_token"]
            creds = agent.read(vault_layout.rabbitmq_creds_path())["data"]
            return Login(accessor=auth["accessor"], user=creds["username"], password=creds["password"])

        return await asyncio.to_thread(in_vault)

    return login


async def publish_login(url: str, issued, *, user: str) -> None:
    """Publish a CredentialsIssued as the agent does: to the results exchange, as ``url``'s user,
    with the broker-validated ``user_id``."""
    import aio_pika

    from schemas.routing import CREDENTIALS_KEY, RESULTS
    from schemas import encode

    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(RESULTS, ensure=False)
        await exchange.publish(aio_pika.Message(encode(issued), user_id=user), CREDENTIALS_KEY)


KUBERNETES_AUTH = {"AGENTJOBS_VAULT__AUTH_MODE": "kubernetes", "AGENTJOBS_RUNTIME__KIND": "kubernetes"}


async def test_kubernetes_auth_login_tokens_are_revoked_when_their_job_ends(world, tmp_path):
    # Given kubernetes auth: agents log in themselves (for real, against the emulated API server)
    # and report their token's accessor as their own broker user
    from schemas import CredentialsIssued, utcnow

    handle, url, vault = world
    ns = handle.namespace
    env = {k: v for k, v in vault.env.items() if k.startswith("AGENTJOBS_VAULT")} | KUBERNETES_AUTH
    login = await kubernetes_auth(handle, vault, tmp_path)

    running, late = _incident("LoginRunning"), _incident("LoginLate")
    running_job = identify(decode_incident(running))
    late_job = identify(decode_incident(late))
    driver = PodDriver(handle, decide=lambda pod: None)
    async with driver.running_(), Results(url) as results, \
            running_dispatcher(handle, url_for(url, "dispatcher"), **env):
        await publish(url, [running, late])
        await results.wait_for(lambda: len(results.keys("lifecycle.started")) == 2)
        first, second = await login(), await login()
        assert first.user.startswith(f"kubernetes-{ns}-agentjobs-agent-shadow-")  # the shape the recorder checks
        # When one agent reports its login while its Job runs, then the Job ends
        await publish_login(first.url(url), CredentialsIssued(
            investigation_id=running_job.investigation_id, job_name=running_job.job_name,
            token_accessor=first.accessor, at=utcnow()), user=first.user)
        await _until(lambda: handle.cluster.job(ns, running_job.job_name)["metadata"]["annotations"].get(
            jobspec.ANN_LOGIN_ACCESSOR) == first.accessor)
        # ... and the other's report arrives only after its Job's ending was reported
        driver.finish_oldest(0)
        driver.finish_oldest(0)
        await results.wait_for(lambda: len(results.keys("lifecycle.succeeded")) == 2)
        await publish_login(second.url(url), CredentialsIssued(
            investigation_id=late_job.investigation_id, job_name=late_job.job_name,
            token_accessor=second.accessor, at=utcnow()), user=second.user)
        # Then both login tokens are revoked
        await _until(lambda: not vault.token_alive(first.accessor) and not vault.token_alive(second.accessor),
                     timeout=GONE_WITHIN)
