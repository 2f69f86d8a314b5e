"""Chaos: OpenBao stops answering for ``OUTAGE`` seconds during dispatch and during an agent's bootstrap.

Issue 10's fourth chaos bullet. The OpenBao dev server keeps its state only in
memory, so a real stop/start would lose every token and policy; the outage is a
SIGSTOP of the ``bao`` process and a SIGCONT ``OUTAGE`` seconds later — requests
hang (the realistic failure: connections are accepted by the kernel, nothing
answers) and every token survives. One in-process dispatcher mints a wrapped
token per Job (``vault.auth_mode = per-investigation``, real RabbitMQ, the
emulated Kubernetes API); the emulated kubelet runs the pods until the test ends them.

- Before the outage ``BEFORE`` groups are dispatched (each Job's token alive).
- During it ``DURING`` more groups arrive, and some running Jobs end. The new
  incidents wait (no Job without credentials, nothing dead-lettered: retry.max_elapsed
  is 90 s, longer than the outage, so they are retried in place and the delivery limit
  is not even touched); the endings wait for their revocation. An agent started
  with a wrapped token fails closed: exit 3, last stderr line
  ``credentials_unavailable: …``, reason ``vault_unavailable`` in its log, no finding.
- After it every group has exactly one Job whose token exists, the endings are
  reported and their tokens revoked, the agent's token is revoked by accessor as
  the dispatcher does; once every Job has ended no token outlives its Job (within
  ``GONE_WITHIN``), and OpenBao holds no agent token at all.

Bounded, loopback only. ``pytest -s`` prints the figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import hvac
import pytest

from dispatcher.jobs import jobspec
from dispatcher.credentials.tokens import VaultCredentials
from dispatcher.plumbing.settings import load_settings
from schemas.routing import DEAD
from schemas import Phase, decode_incident, encode, identify
from tests.integration.dispatcher_harness import (
    PodDriver,
    Results,
    lifecycle_ids,
    publish,
    ready_messages,
)
from tests.integration.test_dispatcher import running_dispatcher
from tests.integration.vault_helpers import vault_world
from tests.support.k8s.resources import JOBS, PODS
from tests.support.payloads import am_alert, dumps, group

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

OUTAGE = 30.0  # seconds OpenBao is stopped (the figure)
BEFORE, DURING = 8, 8  # groups dispatched before the outage / arriving during it
ENDED_DURING = 4  # running Jobs that end while OpenBao is stopped
GONE_WITHIN = 10.0  # seconds for a token to be revoked once its ending can be handled (issue 5)
AGENT_VAULT_TIMEOUT = 3.0  # seconds per Vault request for the agent
# Found by this test and fixed in dispatcher/credentials/token_sweep.py: a mint whose request timed out while
# OpenBao was stopped is still executed by OpenBao after the resume, and the token it creates
# belongs to no Job; the dispatcher's sweeper revokes it (here every SWEEP s, past SWEEP_GRACE s).
SWEEP, SWEEP_GRACE = 1.0, 5.0
ENV = {
    "AGENTJOBS_VAULT__REQUEST_TIMEOUT": "2",  # a hung request fails after 2 s and is retried
    "AGENTJOBS_RETRY__BASE": "0.2", "AGENTJOBS_RETRY__CAP": "2",
    "AGENTJOBS_RETRY__MAX_ELAPSED": "90",  # > OUTAGE: the incident waits in place, unacked
    "AGENTJOBS_ADMISSION__MAX_ACTIVE": "100",
    "AGENTJOBS_VAULT__SWEEP_INTERVAL": str(SWEEP), "AGENTJOBS_VAULT__SWEEP_GRACE": str(SWEEP_GRACE),
    **{f"AGENTJOBS_CLASSES__{c}__MAX_ACTIVE": "100" for c in ("DEFAULT", "DATABASE", "KUBERNETES")},
}


def _incident(name: str) -> bytes:
    return dumps(group([am_alert(starts_at="2026-11-26T02:00:00Z", alertname=name)], group_key=f"bao-{name}"))


@contextlib.contextmanager
def _stopped(server):
    """SIGSTOP the bao process; SIGCONT it however the block ends."""
    pid = server._proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _agent_tokens(vault, details: bool = False) -> list:
    """Accessors of every agent token OpenBao holds (root lookups); with details, what each is."""
    root = vault.root()
    out: list = []
    for accessor in root.list("auth/token/accessors")["data"]["keys"]:
        try:
            data = root.auth.token.lookup_accessor(accessor)["data"]
        except (hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden):  # revoked between list and lookup
            continue
        if any(p.startswith("agentjobs-agent-") for p in data.get("policies") or []):
            out.append({k: data.get(k) for k in ("accessor", "display_name", "meta", "creation_time", "ttl",
                                                 "policies")} if details else accessor)
    return out


def _wrapping_token_valid(vault, wrapping_token: str) -> bool:
    import requests

    response = requests.post(f"{vault.server.addr}/v1/sys/wrapping/lookup", json={"token": wrapping_token},
                             headers={"X-Vault-Token": vault.server.root_token}, timeout=10)
    return response.status_code == 200


async def _run_agent(env: dict[str, str], timeout: float = 60.0) -> tuple[int, str, str]:
    script = Path(sys.executable).with_name("agentjobs")
    argv = [str(script), "agent"] if script.exists() else [sys.executable, "-m", "dispatcher.cli.main", "agent"]
    proc = await asyncio.create_subprocess_exec(*argv, env=env, cwd=env["HOME"], stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, out.decode(), err.decode()


async def _until(predicate, timeout: float, interval: float = 0.1, what: str = ""):
    try:
        async with asyncio.timeout(timeout):
            while not (result := await asyncio.to_thread(predicate) if not asyncio.iscoroutinefunction(predicate)
                       else await predicate()):
                await asyncio.sleep(interval)
    except TimeoutError:
        raise AssertionError(f"not within {timeout:g} s: {what}") from None
    return result


@pytest.fixture
async def world(k8s_emulator, amqp_vhost, rabbitmq_management, postgres, rabbitmq):
    async with vault_world(k8s_emulator, amqp_vhost, rabbitmq_management, postgres, rabbitmq) as vault:
        yield k8s_emulator, amqp_vhost.amqp_url, vault


async def test_openbao_stopped_for_thirty_seconds_makes_incidents_wait_and_agents_fail_closed(world, tmp_path):
    handle, url, vault = world
    ns = handle.namespace
    env = {**{k: v for k, v in vault.env.items() if k.startswith("AGENTJOBS_VAULT")}, **ENV}
    before = {f"Before{i}": _incident(f"Before{i}") for i in range(BEFORE)}
    during = {f"During{i}": _incident(f"During{i}") for i in range(DURING)}
    job_of = {k: identify(decode_incident(b)).job_name for k, b in {**before, **during}.items()}
    investigations = {identify(decode_incident(b)).investigation_id for b in {**before, **during}.values()}

    def jobs() -> dict[str, dict]:
        return {j["metadata"]["name"]: j for j in handle.cluster.store.list(JOBS, ns)}

    def accessor(job_name: str) -> str:
        return jobs()[job_name]["metadata"]["annotations"][jobspec.ANN_TOKEN_ACCESSOR]

    # The agent's side: a wrapped token minted as the dispatcher mints it, and the Job's input
    agent_incident = decode_incident(_incident("AgentBootstrap"))
    agent_ident = identify(agent_incident)
    creds = VaultCredentials(load_settings(None, env).vault)
    wrapped = await creds.mint(phase=Phase.SHADOW, investigation_id=agent_ident.investigation_id,
                               incident_key=agent_ident.incident_key, job_name=agent_ident.job_name, ttl=600)
    input_dir = tmp_path / "input"
    input_dir.mkdir()
    (input_dir / jobspec.INCIDENT_FILE).write_bytes(encode(agent_incident))
    (input_dir / jobspec.WRAPPED_TOKEN_FILE).write_text(wrapped.wrapping_token)
    agent_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "TMPDIR": str(tmp_path),
        "AGENTJOBS_INVESTIGATION_ID": agent_ident.investigation_id, "AGENTJOBS_JOB_NAME": agent_ident.job_name,
        "AGENTJOBS_PHASE": Phase.SHADOW.value, "AGENTJOBS_CLASS": "default", "AGENTJOBS_INPUT_DIR": str(input_dir),
        "AGENTJOBS_VAULT__ADDR": vault.server.addr, "AGENTJOBS_VAULT__AUTH_MODE": "per-investigation",
        "AGENTJOBS_VAULT__REQUEST_TIMEOUT": str(AGENT_VAULT_TIMEOUT),
        "AGENTJOBS_AMQP__URL": url.replace("guest:guest@", "", 1),
    }

    driver = PodDriver(handle, decide=lambda pod: None)  # every agent runs until the test ends it
    began = time.monotonic()
    try:
        async with driver.running_(), Results(url) as results, running_dispatcher(handle, url, **env) as service:
            # Given BEFORE groups dispatched with OpenBao up, each Job's token alive
            await publish(url, list(before.values()))
            await results.wait_for(lambda: len(set(lifecycle_ids(results, "started"))) == BEFORE, timeout=60)
            assert all(vault.token_alive(accessor(job_of[k])) for k in before)
            tokens_before_outage = set(await asyncio.to_thread(_agent_tokens, vault))

            # When OpenBao stops answering for OUTAGE seconds
            with _stopped(vault.server):
                stopped_at = time.monotonic()
                # ... while new incidents arrive, some Jobs end, and an agent bootstraps
                await publish(url, list(during.values()))
                ended = []
                for name in list(driver.running)[:ENDED_DURING]:
                    driver.end(name, 0)
                    ended.append(handle.cluster.store.get(PODS, ns, name)["metadata"]["labels"]["job-name"])
                agent_t0 = time.monotonic()
                code, out, err = await _run_agent(agent_env)
                agent_s = time.monotonic() - agent_t0
                # Then the agent failed closed, with its reason, and published nothing
                assert code == 3, out + err
                last = err.strip().splitlines()[-1]
                assert last.startswith("credentials_unavailable: cannot unwrap"), err[-2000:]
                failed = [json.loads(line) for line in err.splitlines()
                          if line.startswith("{") and '"agent_failed"' in line]
                assert failed and failed[-1]["reason"] == "vault_unavailable", err[-2000:]
                # and for the whole outage: no Job without credentials, nothing dead-lettered
                while (left := OUTAGE - (time.monotonic() - stopped_at)) > 0:
                    assert not any(job_of[k] in jobs() for k in during)
                    assert not results.keys("deadletter.")
                    await asyncio.sleep(min(1.0, left))
                retries_during_outage = service.metrics.retries._value.get()
                assert len(results.keys("lifecycle.succeeded")) == 0  # endings wait for the revocation
                outage_s = time.monotonic() - stopped_at
            resumed_at = time.monotonic()

            # Then, OpenBao back: every group gets exactly one Job, and each Job's token exists
            await results.wait_for(lambda: set(lifecycle_ids(results, "dispatched")) == investigations, timeout=60)
            resume_s = time.monotonic() - resumed_at
            assert sorted(jobs()) == sorted(job_of.values())
            for k in during:
                assert vault.token_alive(accessor(job_of[k])), k
            # the endings held up by the outage are reported and their tokens revoked
            await results.wait_for(lambda: len(results.keys("lifecycle.succeeded")) >= ENDED_DURING, timeout=30)
            await _until(lambda: not any(vault.token_alive(accessor(j)) for j in ended), GONE_WITHIN,
                         what="tokens of the Jobs that ended during the outage revoked")
            # (its unwrap request, queued in the socket while bao was stopped, may have been served
            # after the resume, to nobody: the wrapped token is then alive, and only its accessor can end it)
            consumed = not await asyncio.to_thread(_wrapping_token_valid, vault, wrapped.wrapping_token)
            # the agent's token is revoked by accessor, as the dispatcher does when its Job ends
            await creds.revoke(wrapped.accessor)
            assert not vault.token_alive(wrapped.accessor)
            assert not [m for m in results.keys("finding.") if agent_ident.investigation_id in str(m[2])]

            # When every other Job ends
            await results.wait_for(lambda: len(set(lifecycle_ids(results, "started"))) == BEFORE + DURING, timeout=30)
            while driver.running:
                driver.finish_oldest(0)
            await results.wait_for(lambda: len(set(lifecycle_ids(results, "succeeded"))) == BEFORE + DURING,
                                   timeout=60)
            all_accessors = {j: j_["metadata"]["annotations"][jobspec.ANN_TOKEN_ACCESSOR] for j, j_ in jobs().items()}
            # Then no token outlives its Job
            await _until(lambda: not any(vault.token_alive(a) for a in all_accessors.values()), GONE_WITHIN,
                         what="every Job's token revoked")
            # and OpenBao holds no agent token at all: what it minted for requests the dispatcher had
            # given up on during the outage is swept (young tokens are left for SWEEP_GRACE)
            with contextlib.suppress(AssertionError):
                await _until(lambda: not _agent_tokens(vault), SWEEP_GRACE + SWEEP + GONE_WITHIN,
                             what="no agent token left")
            leftover = await asyncio.to_thread(_agent_tokens, vault, True)
            swept = service.metrics.orphan_tokens_revoked._value.get()
    finally:
        await creds.close()
    assert await ready_messages(url, DEAD) == 0 and not results.keys("deadletter.")
    succeeded = [m[1] for m in results.keys("lifecycle.succeeded")]
    assert len(set(succeeded)) == BEFORE + DURING

    figures = {
        "outage_s": round(outage_s, 1), "outage_kind": "SIGSTOP/SIGCONT of bao (dev server: in-memory state kept)",
        "groups_before": BEFORE, "groups_during": DURING, "jobs": len(all_accessors),
        "jobs_ended_during_outage": ENDED_DURING, "dispatched_after_resume_s": round(resume_s, 1),
        "agent_tokens_before_outage": len(tokens_before_outage), "agent_exit": code, "agent_runtime_s": round(agent_s, 1), "agent_last_stderr_line": last[:120],
        "agent_wrapping_token_consumed_after_resume": consumed,
        "dispatcher_retries_during_outage": retries_during_outage,
        "orphan_agent_tokens_after_all_jobs_ended": len(leftover), "orphan_tokens_swept": swept,
        "dead_lettered": 0, "total_s": round(time.monotonic() - began, 1),
    }
    print("\nchaos openbao outage:", json.dumps(figures, sort_keys=True))
    # No token outlives its Job — including tokens OpenBao minted for mint requests that the
    # dispatcher had already given up on (they sat in bao's socket while it was stopped and were
    # served after the resume: wrapped responses nobody received, so no Job carries their accessor).
    assert leftover == [], (f"{len(leftover)} agent token(s) outlive every Job (outage {stopped_at - began:.1f}-"
                            f"{resumed_at - began:.1f} s after start): " + json.dumps(leftover[:3], indent=1))
