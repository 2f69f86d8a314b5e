"""A token no Job holds is revoked by the dispatcher's sweeper; nothing else is (real OpenBao)."""

from __future__ import annotations

import asyncio

import hvac
import pytest

from dispatcher.jobs import jobspec

from schemas import vault_paths as vault_layout
from dispatcher.credentials.tokens import VaultCredentials
from dispatcher.plumbing.settings import load_settings
from dispatcher.credentials.token_sweep import TokenSweeper
from schemas import Phase, decode_incident, identify
from tests.integration.dispatcher_harness import PodDriver, Results, publish
from tests.integration.test_dispatcher import _until, running_dispatcher
from tests.integration.vault_helpers import vault_world
from tests.support.identities import url_for
from tests.support.payloads import am_alert, dumps, group

pytestmark = pytest.mark.integration
SWEEP = {"AGENTJOBS_VAULT__SWEEP_INTERVAL": "0.5", "AGENTJOBS_VAULT__SWEEP_GRACE": "1"}


@pytest.fixture
async def world(k8s_emulator, amqp_vhost, rabbitmq_management, postgres, rabbitmq):
    async with vault_world(k8s_emulator, amqp_vhost, rabbitmq_management, postgres, rabbitmq) as vault:
        yield k8s_emulator, amqp_vhost.amqp_url, vault


def _vault_env(vault) -> dict[str, str]:
    return {k: v for k, v in vault.env.items() if k.startswith("AGENTJOBS_VAULT")}


async def _mint(vault, scope: str, name: str) -> str:
    """A token minted exactly as the dispatcher mints one, whose answer never reached a Job."""
    creds = VaultCredentials(load_settings(None, vault.env).vault, scope=scope)
    try:
        wrapped = await creds.mint(phase=Phase.SHADOW, investigation_id=name.ljust(40, "0"), incident_key=name,
                                   job_name=f"aj-{name}", ttl=900)
    finally:
        await creds.close()
    return wrapped.accessor


async def test_the_sweeper_revokes_tokens_no_job_holds_and_nothing_else(world):
    handle, url, vault = world
    body = dumps(group([am_alert(starts_at="2026-11-26T02:00:00Z", alertname="Held")], group_key="sweep-held"))
    job_name = identify(decode_incident(body)).job_name
    unrelated = vault.root().auth.token.create(policies=["default"], ttl="1h")["auth"]["accessor"]
    driver = PodDriver(handle, decide=lambda pod: None)  # the Job runs until the test ends
    async with driver.running_(), Results(url) as results, \
            running_dispatcher(handle, url_for(url, "dispatcher"), **_vault_env(vault), **SWEEP) as d:
        scope = d.runtime.where
        # Given a running Job holding its token, a token whose mint answer was lost, a token of
        # another installation sharing this Vault, and a token that is not an agent's
        await publish(url, [body])
        await results.wait_for(lambda: results.keys("lifecycle.started"))
        held = handle.cluster.job(handle.namespace, job_name)["metadata"]["annotations"][jobspec.ANN_TOKEN_ACCESSOR]
        lost = await _mint(vault, scope, "lost")
        elsewhere = await _mint(vault, "kubernetes/another-installation", "elsewhere")
        assert all(vault.token_alive(a) for a in (held, lost, elsewhere, unrelated))
        # When the sweeper runs
        # (the revocation is visible in Vault a moment before the sweeper counts it)
        await _until(lambda: d.metrics.orphan_tokens_revoked._value.get() >= 1, timeout=15)
        assert not vault.token_alive(lost)
        # Then only the lost token was revoked, and the metric says so
        assert d.metrics.orphan_tokens_revoked._value.get() == 1
        done = d.sweeper.sweeps
        await _until(lambda: d.sweeper.sweeps >= done + 2, timeout=15)  # two more sweeps: nothing else revoked
        assert vault.token_alive(held) and vault.token_alive(elsewhere) and vault.token_alive(unrelated)
        # And when the Job ends, its own token goes with it as before
        driver.finish_oldest(0)
        await results.wait_for(lambda: results.keys("lifecycle.succeeded"))
        await _until(lambda: not vault.token_alive(held), timeout=10)
    assert vault.token_alive(elsewhere)


async def test_a_young_token_is_left_for_the_replica_that_is_creating_its_job(world):
    handle, url, vault = world
    async with running_dispatcher(handle, url_for(url, "dispatcher"), **_vault_env(vault),
                                  AGENTJOBS_VAULT__SWEEP_INTERVAL="0") as d:
        assert d.sweeper is None  # interval 0: sweeping off
        young = await _mint(vault, d.runtime.where, "young")
        sweeper = TokenSweeper(credentials=d.credentials, runtime=d.runtime, scope=d.runtime.where, grace=3600,
                               interval=60)
        report = await sweeper.sweep()
        assert report.revoked == 0 and report.looked_up >= 1
        assert vault.token_alive(young)
        # the same token past the grace is an orphan
        sweeper.grace = sweeper.grace * 0
        assert (await sweeper.sweep()).revoked == 1
        assert not vault.token_alive(young)


async def test_without_the_list_grant_the_sweeper_says_how_to_enable_it_and_dispatch_goes_on(world):
    handle, url, vault = world
    root = vault.root()
    policy = root.sys.read_policy(vault_layout.DISPATCHER_POLICY)["data"]["rules"]
    narrowed = policy.replace('path "auth/token/accessors"', 'path "auth/token/not-accessors"')
    assert narrowed != policy
    root.sys.create_or_update_policy("agentjobs-dispatcher-no-list", narrowed)
    token = root.auth.token.create(policies=["agentjobs-dispatcher-no-list"], ttl="1h")["auth"]["client_token"]
    async with running_dispatcher(handle, url_for(url, "dispatcher"),
                                  **{**_vault_env(vault), "AGENTJOBS_VAULT__TOKEN": token}) as d:
        sweeper = TokenSweeper(credentials=d.credentials, runtime=d.runtime, scope=d.runtime.where, grace=1,
                               interval=0.1)
        await asyncio.wait_for(sweeper.run(), timeout=10)  # ends by itself: not permitted is not retried
        lost = await _mint(vault, d.runtime.where, "unswept")
        assert vault.token_alive(lost)
        with pytest.raises(hvac.exceptions.Forbidden):
            hvac.Client(url=vault.server.addr, token=token).list("auth/token/accessors")
