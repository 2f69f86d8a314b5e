"""Vault behind a private CA: `vault.ca_cert` for the dispatcher, the same CA handed to every Job.

A real OpenBao in dev-TLS mode (its own CA, a certificate for 127.0.0.1): nothing trusts it
unless told to.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import subprocess
from pathlib import Path

import aiohttp
import hvac
import pytest

from agent.credentials import CredentialsUnavailable, VaultSession
from dispatcher.jobs import jobspec
from schemas import vault_paths as vault_layout
from dispatcher.credentials.tokens import VaultCredentials, vault_ca
from dispatcher.credentials.embedded_openbao import bao_binary
from dispatcher.plumbing.settings import SettingsError, load_settings
from schemas import Phase, decode_incident, identify
from schemas.errors import TemporaryError
from tests.integration.dispatcher_harness import declare_topology, publish
from tests.integration.k8s_helpers import prepare_cluster
from tests.integration.test_dispatcher import _until, running_dispatcher
from tests.support.k8s.resources import SECRETS
from tests.support.payloads import am_alert, dumps, group
from tests.support.services import free_port

pytestmark = pytest.mark.integration
ROOT = "root-private-ca-test"


@pytest.fixture
async def tls_bao(tmp_path):
    """OpenBao over https with a CA of its own; a shadow token role as bootstrap makes it."""
    port = free_port()
    addr = f"https://127.0.0.1:{port}"
    log = open(tmp_path / "bao.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([bao_binary(), "server", "-dev", "-dev-tls", f"-dev-tls-cert-dir={tmp_path}",
                             f"-dev-listen-address=127.0.0.1:{port}", "-dev-no-store-token"],
                            env={"HOME": str(tmp_path), "PATH": os.environ.get("PATH", ""),
                                 "BAO_DEV_ROOT_TOKEN_ID": ROOT},
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    ca = tmp_path / "vault-ca.pem"
    try:
        async with asyncio.timeout(30):
            while True:
                if ca.exists():
                    try:
                        root = hvac.Client(url=addr, token=ROOT, verify=str(ca))
                        if root.sys.is_initialized():
                            break
                    except Exception:  # not listening yet
                        pass
                await asyncio.sleep(0.1)
        policy = vault_layout.policy(Phase.SHADOW)
        root.sys.create_or_update_policy(policy, 'path "sys/tools/random" { capabilities = ["update"] }')
        root.write(f"auth/token/roles/{vault_layout.token_role(Phase.SHADOW)}", allowed_policies=[policy],
                   orphan=False, renewable=True, token_type="service")
        yield addr, ca
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
        log.close()


def _vault_env(addr: str, ca: Path | None) -> dict[str, str]:
    return {"AGENTJOBS_VAULT__ADDR": addr, "AGENTJOBS_VAULT__TOKEN": ROOT,
            "AGENTJOBS_VAULT__AUTH_MODE": "per-investigation", "AGENTJOBS_VAULT__REQUEST_TIMEOUT": "5",
            **({"AGENTJOBS_VAULT__CA_CERT": str(ca)} if ca else {})}


async def _mint(creds: VaultCredentials):
    return await creds.mint(phase=Phase.SHADOW, investigation_id="c" * 40, incident_key="k", job_name="aj-ca",
                            ttl=300)


async def test_the_dispatcher_trusts_vault_through_the_configured_ca_and_only_then(tls_bao, tmp_path):
    addr, ca = tls_bao
    trusting = VaultCredentials(load_settings(None, _vault_env(addr, ca)).vault)
    untrusting = VaultCredentials(load_settings(None, _vault_env(addr, None)).vault)
    try:
        wrapped = await _mint(trusting)
        with pytest.raises(TemporaryError, match="(?i)certificate"):
            await _mint(untrusting)
        # And the agent, given the same CA, unwraps it; without it, it fails closed
        (tmp_path / "wrapped").write_text(wrapped.wrapping_token)
        with pytest.raises(CredentialsUnavailable) as refused:
            await VaultSession(addr, timeout=5).unwrap(tmp_path / "wrapped")
        assert refused.value.reason == "vault_unavailable"
        identity = await VaultSession(addr, timeout=5, verify=str(ca)).unwrap(tmp_path / "wrapped")
        assert identity.accessor == wrapped.accessor
    finally:
        await trusting.close()
        await untrusting.close()


async def test_every_job_gets_the_ca_beside_its_wrapped_token(tls_bao, k8s_emulator, amqp_vhost, rabbitmq_management):
    addr, ca = tls_bao
    prepare_cluster(k8s_emulator)
    await rabbitmq_management.delete_vhost(amqp_vhost.name)
    await rabbitmq_management.create_vhost(amqp_vhost.name)
    await rabbitmq_management.set_permissions(amqp_vhost.name, "guest")
    url = amqp_vhost.amqp_url
    await declare_topology(url, load_settings(None, {}))
    body = dumps(group([am_alert(starts_at="2026-11-27T02:00:00Z", alertname="PrivateCa")], group_key="ca-1"))
    name = identify(decode_incident(body)).job_name
    async with running_dispatcher(k8s_emulator, amqp_vhost.url("dispatcher"), **_vault_env(addr, ca)):
        await publish(url, [body])
        await _until(lambda: k8s_emulator.cluster.store.get(SECRETS, k8s_emulator.namespace,
                                                            jobspec.secret_name(name)))
    secret = k8s_emulator.cluster.store.get(SECRETS, k8s_emulator.namespace, jobspec.secret_name(name))
    files = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    assert files[jobspec.VAULT_CA_FILE] == ca.read_bytes()
    assert files[jobspec.WRAPPED_TOKEN_FILE]
    # (the agent finds it in its input dir: AgentEnv.vault_verify, tests/unit/test_agent_config.py)
    async with aiohttp.ClientSession() as http:  # and it is the CA that signed Vault's certificate
        import ssl

        ok = ssl.create_default_context(cafile=str(ca))
        async with http.get(f"{addr}/v1/sys/health", ssl=ok) as r:
            assert r.status == 200


def test_an_unreadable_or_wrong_ca_file_is_a_clear_settings_error(tmp_path):
    with pytest.raises(SettingsError, match="vault.ca_cert: cannot read"):
        vault_ca(load_settings(None, {"AGENTJOBS_VAULT__CA_CERT": str(tmp_path / "missing.pem")}).vault)
    (tmp_path / "not.pem").write_text("hello")
    with pytest.raises(SettingsError, match="holds no PEM certificate"):
        vault_ca(load_settings(None, {"AGENTJOBS_VAULT__CA_CERT": str(tmp_path / "not.pem")}).vault)
