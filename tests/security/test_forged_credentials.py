"""Issue 17, attack 3: an agent cannot make the dispatcher revoke (or forget) any token.

Real OpenBao (bootstrapped, kubernetes auth pointed at the emulated API server: agents log in for
real), real RabbitMQ with the per-component identities, the dispatcher running as its own
identity in kubernetes-auth mode. Forged ``CredentialsIssued`` messages — from an agent-shaped
user of another Job, from a real agent of another phase, from a real agent of the same phase,
carrying another live Job's id or an unrelated ``root`` token's accessor — are dead-lettered
``forbidden_sender``; nothing is revoked or overwritten, and the victim Job's real token is still
revoked when that Job ends.
"""

from __future__ import annotations

import aio_pika
import aiormq
import pytest

from dispatcher.credentials.tokens import Expected, Kind, LoginRevoker, Revocation, VaultCredentials
from dispatcher.jobs import jobspec
from dispatcher.plumbing.metrics import Metrics
from dispatcher.plumbing.settings import load_settings
from schemas import CancelInvestigation, CredentialsIssued, Phase, decode_incident, encode, identify, utcnow
from schemas.routing import CONTROL, DEAD
from tests.integration.dispatcher_harness import PodDriver, Results, publish
from tests.integration.test_dispatcher import _until, running_dispatcher
from tests.integration.test_dispatcher_credentials import (
    GONE_WITHIN,
    KUBERNETES_AUTH,
    kubernetes_auth,
    publish_login,
)
from tests.integration.vault_helpers import vault_world
from tests.support.identities import agent_user, url_for, user
from tests.support.payloads import am_alert, dumps, group

pytestmark = pytest.mark.integration


@pytest.fixture
async def world(k8s_emulator, amqp_vhost, rabbitmq_management, postgres, rabbitmq):
    async with vault_world(k8s_emulator, amqp_vhost, rabbitmq_management, postgres, rabbitmq) as vault:
        yield k8s_emulator, amqp_vhost, vault


def _incident(name: str) -> bytes:
    return dumps(group([am_alert(starts_at="2026-11-26T02:00:00Z", alertname=name)], group_key=f"forge-{name}"))


def _vault_env(vault) -> dict[str, str]:
    return {k: v for k, v in vault.env.items() if k.startswith("AGENTJOBS_VAULT")}


def _root_token(vault) -> str:
    """An unrelated token with the root policy (an operator's break-glass token, say): its accessor."""
    return vault.root().auth.token.create(policies=["root"], ttl="1h")["auth"]["accessor"]


def _issued(job, accessor: str) -> CredentialsIssued:
    return CredentialsIssued(investigation_id=job.investigation_id, job_name=job.job_name, token_accessor=accessor,
                             at=utcnow())


def _login_accessor(handle, job_name: str) -> str | None:
    return handle.cluster.job(handle.namespace, job_name)["metadata"]["annotations"].get(jobspec.ANN_LOGIN_ACCESSOR)


async def test_forged_credentials_issued_revoke_nothing_and_the_victims_token_still_dies_with_its_job(
        world, rabbitmq_management, tmp_path):
    handle, vhost, vault = world
    url = vhost.amqp_url  # the broker administrator: only for the test's own inspection
    login = await kubernetes_auth(handle, vault, tmp_path)
    victim_body, attacker_body = _incident("Victim"), _incident("Attacker")
    victim, attacker = identify(decode_incident(victim_body)), identify(decode_incident(attacker_body))
    unrelated = _root_token(vault)
    driver = PodDriver(handle, decide=lambda pod: None)
    async with driver.running_(), Results(url) as results, Results(url, exchange=DEAD) as dead, \
            running_dispatcher(handle, url, **(_vault_env(vault) | KUBERNETES_AUTH)) as d, \
            agent_user(rabbitmq_management, vhost.name, "other-job") as (shaped, shaped_url):
        assert d.settings.amqp.url.startswith("amqp://agentjobs-dispatcher:")  # never as guest
        await publish(url, [victim_body, attacker_body])  # (as the operator identity)
        await results.wait_for(lambda: len(results.keys("lifecycle.started")) == 2)
        victims_login, attackers_login = await login(), await login()  # two shadow agents: one ServiceAccount
        other_phase = await login(Phase.READ_ONLY)
        victims_minted = VaultCredentials(load_settings(None, vault.env).vault, scope=d.runtime.where)
        try:
            # an agent token of this installation that is no Job's login token (minted, not logged in)
            minted = (await victims_minted.mint(phase=Phase.SHADOW, investigation_id=victim.investigation_id,
                                                incident_key="k", job_name=victim.job_name, ttl=600)).accessor
        finally:
            await victims_minted.close()

        forgeries = [
            # an agent-shaped user of another Job: the victim's Job id with a root token's accessor …
            (shaped_url, shaped, _issued(victim, unrelated)),
            # … or with the attacker agent's own accessor (to make the victim's token outlive its Job)
            (shaped_url, shaped, _issued(victim, attackers_login.accessor)),
            # a real agent of another phase (another ServiceAccount) speaking for the victim's Job
            (other_phase.url(url), other_phase.user, _issued(victim, other_phase.accessor)),
            # a real agent of the same phase: the root token's accessor, a minted token's accessor
            (attackers_login.url(url), attackers_login.user, _issued(victim, unrelated)),
            (attackers_login.url(url), attackers_login.user, _issued(victim, minted)),
            # … its own Job, someone else's investigation id
            (attackers_login.url(url), attackers_login.user, CredentialsIssued(
                investigation_id=victim.investigation_id, job_name=attacker.job_name,
                token_accessor=attackers_login.accessor, at=utcnow())),
            # … a Job this installation never launched
            (attackers_login.url(url), attackers_login.user, CredentialsIssued(
                investigation_id=victim.investigation_id, job_name="aj-never-launched-0000000000000000",
                token_accessor=unrelated, at=utcnow())),
        ]
        # When each forgery is published
        for sender_url, sender, issued in forgeries:
            await publish_login(sender_url, issued, user=sender)
        # Then each is dead-lettered forbidden_sender
        await dead.wait_for(lambda: len(dead.messages) == len(forgeries), timeout=30)
        assert [m[3]["x-agentjobs-reason"] for m in dead.messages] == ["forbidden_sender"] * len(forgeries)
        assert all(m[0] == "credentials.issued" for m in dead.messages)
        # ... nothing was revoked, nothing recorded on the victim's Job
        for accessor in (unrelated, minted, attackers_login.accessor, other_phase.accessor, victims_login.accessor):
            assert vault.token_alive(accessor), accessor
        assert _login_accessor(handle, victim.job_name) is None
        assert _login_accessor(handle, attacker.job_name) is None

        # When the victim's real agent reports its login, it is recorded …
        await publish_login(victims_login.url(url), _issued(victim, victims_login.accessor), user=victims_login.user)
        await _until(lambda: _login_accessor(handle, victim.job_name) == victims_login.accessor)
        # … and a later forgery from a same-phase agent never replaces it (nor is anything revoked)
        await publish_login(attackers_login.url(url), _issued(victim, attackers_login.accessor),
                            user=attackers_login.user)
        await dead.wait_for(lambda: len(dead.messages) == len(forgeries) + 1, timeout=30)
        assert "never replaced" in dead.messages[-1][3]["x-agentjobs-message"]
        assert _login_accessor(handle, victim.job_name) == victims_login.accessor
        assert vault.token_alive(attackers_login.accessor)
        await _until(lambda: d.metrics.registry.get_sample_value(  # (counted just after the dead letter is out)
            "agentjobs_dead_lettered_total", {"reason": "forbidden_sender"}) == len(forgeries) + 1)

        # When the victim's Job ends, its real login token goes with it; nothing else does
        pod = next(p for p in driver.running if p.startswith(victim.job_name))
        driver.running.remove(pod)
        driver.end(pod, 0)
        await results.wait_for(lambda: results.keys("lifecycle.succeeded"))
        await _until(lambda: not vault.token_alive(victims_login.accessor), timeout=GONE_WITHIN)
        assert vault.token_alive(unrelated) and vault.token_alive(minted) and vault.token_alive(other_phase.accessor)
        assert vault.token_alive(attackers_login.accessor)  # the attacker's Job still runs


async def test_the_dispatchers_revocation_leaves_every_token_it_did_not_issue_alone(world):
    # The dispatcher's policy can revoke any accessor (Vault cannot narrow revoke-accessor): the
    # dispatcher's own check is what keeps it to its tokens. Root tokens, tokens of another
    # installation sharing this Vault, tokens of another investigation: refused and counted.
    handle, _, vault = world
    scope = f"kubernetes/{handle.namespace}"
    settings = load_settings(None, vault.env)
    metrics = Metrics()
    ours = VaultCredentials(settings.vault, scope=scope, metrics=metrics)
    elsewhere = VaultCredentials(settings.vault, scope="kubernetes/another-installation")
    logins = LoginRevoker(settings.vault, scope=scope, metrics=metrics)
    inv, other = "f" * 40, "e" * 40
    try:
        root = _root_token(vault)
        default = vault.root().auth.token.create(policies=["default"], ttl="1h")["auth"]["accessor"]
        # a token with our metadata and an agent policy, but created by hand, not through our role
        lookalike = vault.root().auth.token.create(
            policies=["agentjobs-agent-shadow"], ttl="1h", no_parent=True, no_default_policy=True,
            meta={"investigation_id": inv, "jobs_in": scope, "phase": "shadow"})["auth"]["accessor"]
        theirs = (await elsewhere.mint(phase=Phase.SHADOW, investigation_id=inv, incident_key="k", job_name="aj-x",
                                       ttl=600)).accessor
        mine = (await ours.mint(phase=Phase.SHADOW, investigation_id=inv, incident_key="k", job_name="aj-x",
                                ttl=600)).accessor
        for accessor in (root, default, lookalike, theirs):
            assert await ours.revoke(accessor) is Revocation.REFUSED, accessor
            assert await logins.revoke(accessor) is Revocation.REFUSED, accessor
        assert await ours.revoke(mine, expected=ours.expected(investigation_id=other)) is Revocation.REFUSED
        assert await ours.revoke(mine, expected=ours.expected(kind=Kind.LOGIN)) is Revocation.REFUSED
        assert all(vault.token_alive(a) for a in (root, default, lookalike, theirs, mine))
        refused = {s.labels["reason"]: s.value for m in metrics.revocations_refused.collect() for s in m.samples
                   if s.name.endswith("_total")}
        assert refused == {"not_an_agent_token": 4, "unknown_origin": 2, "other_installation": 2,
                           "other_investigation": 1, "wrong_kind": 1}
        # ... and what it did issue, for that investigation, it revokes
        assert await ours.revoke(mine, expected=Expected(scope=scope, investigation_id=inv, job_name="aj-x",
                                                         phase=Phase.SHADOW, kind=Kind.MINTED)) is Revocation.REVOKED
        assert not vault.token_alive(mine)
        assert vault.token_alive(root)
    finally:
        for creds in (ours, elsewhere, logins):
            await creds.close()


async def test_cancel_commands_from_anyone_but_operators_admins_or_the_dispatcher_are_dead_lettered(
        world, rabbitmq_management):
    handle, vhost, vault = world
    url = vhost.amqp_url
    body = _incident("CancelTarget")
    job = identify(decode_incident(body))
    command = encode(CancelInvestigation(job_name=job.job_name, reason="forged", requested_by="mallory"))
    async with PodDriver(handle, decide=lambda pod: None).running_(), Results(url) as results, \
            Results(url, exchange=DEAD) as dead, running_dispatcher(handle, url), \
            agent_user(rabbitmq_management, vhost.name, job.job_name) as (agent, agent_url):
        await publish(url, [body])
        await results.wait_for(lambda: results.keys("lifecycle.started"))
        # an agent user cannot even reach the control exchange (the broker refuses it) …
        connection = await aio_pika.connect(agent_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(CONTROL, ensure=False)
            with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
                await exchange.publish(aio_pika.Message(command, user_id=agent), "cancel", timeout=10)
        # … and whoever can (the broker administrator, the bridge's rights allow no control at all)
        # without being an operator, admin or the dispatcher is dead-lettered, never obeyed
        connection = await aio_pika.connect(url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(CONTROL)
            await exchange.publish(aio_pika.Message(command), "cancel")
            await exchange.publish(aio_pika.Message(command, user_id="guest"), "cancel")
        await dead.wait_for(lambda: len(dead.messages) == 2)
        assert [m[3]["x-agentjobs-reason"] for m in dead.messages] == ["forbidden_sender"] * 2
        assert not results.keys("lifecycle.cancelled")
        assert handle.cluster.job(handle.namespace, job.job_name) is not None
        # Then an operator's cancel is obeyed
        connection = await aio_pika.connect(url_for(url, "operator"))
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(CONTROL, ensure=False)
            await exchange.publish(aio_pika.Message(command, user_id=user("operator")), "cancel")
        await results.wait_for(lambda: results.keys("lifecycle.cancelled"))
