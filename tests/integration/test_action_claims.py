"""Action claims shared across pods and Jobs, against a real OpenBao bootstrapped by ``vault bootstrap``.

Phase tokens are minted as the dispatcher mints them (``VaultCredentials``) and used through the
agent's own ``VaultSession``; a claim lives at ``agentjobs-kv/data/claims/<investigation>/<digest>``
and is created at most once (create-only, cas=0), by a policy that may create and read but never
update or delete. What must hold: a retried pod — a fresh working directory, so an empty local
ledger — or a relaunched Job of the same investigation answers ``already_executed``.

The must-show test runs ``agentjobs agent`` as a Job's pod runs it (the environment the dispatcher
gives it, a wrapping token minted as the dispatcher mints it, its own RabbitMQ user, the kubernetes
tool as the phase's ServiceAccount, the rules reasoner, the gate, the executors) against the
Kubernetes API emulator with the deployed RBAC and admission policy (``test_remediation_kubernetes``'s
world). The emulator applies the restart's PATCH and, in the same instant — before it even answers —
the test SIGKILLs the agent: the side effect happened, the agent never settled or published. A
second agent of the same investigation in another working directory (the retried pod) then
answers ``already_executed`` (its ActionRecord on ``agentjobs.results``) with the Deployment still
unhealthy, and the emulator saw one PATCH. A third run, without the shared claims (the local
ledger only, as before), does patch again: the retry was stopped by the claim, not by a precondition.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import pytest
import pytest_asyncio

from agent import config as agent_config
from agent import credentials, engine
from agent.credentials import AlreadyExists, Created, Denied, VaultSession
from agent.remediation.claims import ClaimsUnavailable, VaultClaims
from agent.remediation.kubernetes import RESTARTED_AT, RestartDeployment
from agent.reasoning import Tally
from agent.remediation.protocol import FileLedger, Outcome, execute, idempotency_key
from dispatcher.credentials.tokens import VaultCredentials
from dispatcher.jobs.jobspec import without_credentials
from dispatcher.plumbing.settings import load_settings
from schemas import Phase, ProposedAction, RiskClass, encode
from schemas import vault_paths as layout
from tests.integration.dispatcher_harness import declare_topology
from tests.integration.test_remediation_kubernetes import (  # noqa: F401 - manifests and world are fixtures
    APP,
    RUNS,
    SA,
    WORKLOADS,
    World,
    manifests,
    world,
)
from tests.integration.vault_helpers import Vault, bootstrapped_vault
from tests.support.action_records import action_records
from tests.support.fake_tools import incident
from tests.support.k8s.fixtures import kubeconfig
from tests.support.k8s.resources import DEPLOYMENTS, PODS
from tests.support.services import Postgres, RabbitMQ, Vhost, free_port
from tests.unit.test_remediation_protocol import Scripted

pytestmark = pytest.mark.integration

ACTING = (Phase.LIMITED_REMEDIATION, Phase.AUTONOMOUS)
_SCRIPT = Path(sys.executable).with_name("agentjobs")
AGENT_ARGV = [str(_SCRIPT), "agent"] if _SCRIPT.exists() else [sys.executable, "-m", "dispatcher.cli.main", "agent"]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def vault(postgres: Postgres, rabbitmq: RabbitMQ, amqp_vhost: Vhost) -> AsyncIterator[Vault]:
    await declare_topology(amqp_vhost.amqp_url, load_settings(None, {}))
    async with bootstrapped_vault(postgres, rabbitmq, amqp_vhost.name) as vault:
        yield vault


async def mint(vault: Vault, phase: Phase, investigation_id: str) -> str:
    """A wrapping token for a Job of ``investigation_id`` in ``phase``, as the dispatcher mints it."""
    minter = VaultCredentials(load_settings(None, vault.env).vault)
    try:
        wrapped = await minter.mint(phase=phase, investigation_id=investigation_id,
                                    incident_key=f"incident-{investigation_id[:8]}",
                                    job_name=f"aj-{investigation_id[:12]}-{uuid.uuid4().hex[:4]}", ttl=600)
    finally:
        await minter.close()
    assert wrapped is not None
    return wrapped.wrapping_token


def job_environ(vault: Vault, phase: Phase, investigation_id: str, input_dir: Path, **extra: str) -> dict[str, str]:
    return {"AGENTJOBS_INVESTIGATION_ID": investigation_id, "AGENTJOBS_PHASE": phase.value,
            "AGENTJOBS_INPUT_DIR": str(input_dir), "AGENTJOBS_VAULT__ADDR": vault.server.addr,
            "AGENTJOBS_VAULT__AUTH_MODE": "per-investigation", "AGENTJOBS_AMQP__URL": "amqp://127.0.0.1:5672/",
            **extra}


@contextlib.asynccontextmanager
async def session_of(vault: Vault, phase: Phase, investigation_id: str, tmp_path: Path) -> AsyncIterator[VaultSession]:
    """One Job (or pod) of ``investigation_id``: its own wrapping token, unwrapped by the agent's code."""
    input_dir = tmp_path / f"input-{uuid.uuid4().hex[:8]}"
    input_dir.mkdir()
    env = agent_config.load(job_environ(vault, phase, investigation_id, input_dir))
    env.wrapped_token_file.write_text(await mint(vault, phase, investigation_id))
    session = await credentials.start(env)
    try:
        yield session
    finally:
        await session.revoke_self()


async def raw_token(vault: Vault, phase: Phase, investigation_id: str) -> hvac.Client:
    """An hvac client holding a phase token (to call Vault directly, past the agent's code)."""
    wrapping = await mint(vault, phase, investigation_id)
    unwrapper = hvac.Client(url=vault.server.addr, token=wrapping)
    token = (await asyncio.to_thread(unwrapper.sys.unwrap))["auth"]["client_token"]
    return hvac.Client(url=vault.server.addr, token=token)


def root_session(vault: Vault) -> VaultSession:
    """The agent's client holding the root token: an operator looking at what is stored."""
    session = VaultSession(vault.server.addr, timeout=5)
    session._client.token = vault.server.root_token  # noqa: SLF001 - an operator's token, not an agent's
    return session


def restart_action() -> ProposedAction:
    return ProposedAction(action="restart_deployment", target=f"deployment/{APP} in namespace {WORKLOADS}",
                          risk=RiskClass.LOW, params={"deployment": APP, "namespace": WORKLOADS})


def new_investigation() -> str:
    return f"inv-claims-{uuid.uuid4().hex[:12]}"


# --- the claim store ------------------------------------------------------------------------------

async def test_a_claim_is_created_once_and_settled_once(vault: Vault, tmp_path: Path):
    inv = new_investigation()
    key = idempotency_key(inv, restart_action())
    async with session_of(vault, Phase.AUTONOMOUS, inv, tmp_path) as first, \
            session_of(vault, Phase.AUTONOMOUS, inv, tmp_path) as relaunched:
        mine, theirs = VaultClaims(first), VaultClaims(relaunched)
        assert await mine.seen(key) is None
        assert await mine.claim(key, action="restart_deployment", target="deployment/web in namespace default")
        assert await mine.claim(key, action="restart_deployment") is False  # the same token: once
        assert await theirs.claim(key, action="restart_deployment") is False  # another Job of it: once

        pending = await theirs.seen(key)
        assert pending is not None and pending.outcome is None and pending.claimed_at

        await mine.settle(key, Outcome.EXECUTED_NOT_VERIFIED, reason="the rollout had not completed")
        await theirs.settle(key, Outcome.FAILED, reason="a second opinion")  # create-only: the first stands
        settled = await theirs.seen(key)
        assert settled is not None and settled.outcome is Outcome.EXECUTED_NOT_VERIFIED
        assert settled.reason == "the rollout had not completed" and settled.claimed_at == pending.claimed_at

        stored = await asyncio.to_thread(vault.root().secrets.kv.v2.read_secret_version,
                                         layout.kv_claim_path(key).split("/data/", 1)[1],
                                         mount_point=layout.KV_MOUNT, raise_on_deleted_version=True)
        assert stored["data"]["metadata"]["version"] == 1
        assert stored["data"]["data"] == {"key": key, "action": "restart_deployment",
                                          "target": "deployment/web in namespace default",
                                          "claimed_at": pending.claimed_at, "holder": first.identity.accessor}


async def test_concurrent_claims_of_one_key_have_exactly_one_winner(vault: Vault, tmp_path: Path):
    inv = new_investigation()
    key = idempotency_key(inv, restart_action())
    async with contextlib.AsyncExitStack() as stack:
        stores = [VaultClaims(await stack.enter_async_context(session_of(vault, Phase.LIMITED_REMEDIATION, inv,
                                                                           tmp_path))) for _ in range(4)]
        won = await asyncio.gather(*(s.claim(key, action="restart_deployment") for s in stores))
    assert sorted(won) == [False, False, False, True]


async def test_create_only_reports_exists_distinctly_from_denied(vault: Vault, tmp_path: Path):
    inv = new_investigation()
    path = layout.kv_claim_path(f"{inv}:probe:0")
    async with session_of(vault, Phase.AUTONOMOUS, inv, tmp_path) as session:
        created = await session.create_kv(path, {"n": "1"})
        again = await session.create_kv(path, {"n": "2"})
        outside = await session.create_kv(f"{layout.KV_MOUNT}/data/not-claims/{inv}", {"n": "1"})
    assert isinstance(created, Created) and created.version == 1
    assert isinstance(again, AlreadyExists) and again.data == {"n": "1"}  # a 403 for update, read back: exists
    assert isinstance(outside, Denied) and "(403)" in outside.reason
    # an admin token (it may update) gets the check-and-set mismatch instead: the same answer
    assert isinstance(await root_session(vault).create_kv(path, {"n": "3"}), AlreadyExists)


@pytest.mark.parametrize("phase", [Phase.SHADOW, Phase.READ_ONLY], ids=lambda p: p.value)
async def test_shadow_and_read_only_tokens_cannot_create_a_claim(vault: Vault, tmp_path: Path, phase: Phase):
    inv = new_investigation()
    key = idempotency_key(inv, restart_action())
    client = await raw_token(vault, phase, inv)
    with pytest.raises(hvac.exceptions.Forbidden):  # 403, straight from Vault
        await asyncio.to_thread(client.adapter.post, f"/v1/{layout.kv_claim_path(key)}",
                                json={"options": {"cas": 0}, "data": {"key": key}})
    with pytest.raises(hvac.exceptions.Forbidden):
        await asyncio.to_thread(client.adapter.get, f"/v1/{layout.kv_claim_path(key)}")

    executor = Scripted()
    async with session_of(vault, phase, inv, tmp_path) as session:
        store = VaultClaims(session)
        with pytest.raises(ClaimsUnavailable, match=r"permission denied \(403\)"):
            await store.claim(key, action="restart_deployment")
        # through the protocol: it cannot even read the claims, so it does not act (fail closed)
        result = await execute(restart_action(), executor, done=FileLedger(tmp_path / "pod" / "ledger"),
                               investigation_id=inv, shared=store)
    assert result.outcome is Outcome.FAILED and "shared action claims are unreadable" in result.reason
    assert executor.acts == 0
    # and a remediation-phase token of the same investigation can
    async with session_of(vault, Phase.LIMITED_REMEDIATION, inv, tmp_path) as session:
        assert await VaultClaims(session).claim(key, action="restart_deployment") is True


@pytest.mark.parametrize("phase", ACTING, ids=lambda p: p.value)
async def test_an_acting_token_can_neither_rewrite_nor_delete_a_claim(vault: Vault, phase: Phase):
    inv = new_investigation()
    key = idempotency_key(inv, restart_action())
    name = layout.kv_claim_path(key).split("/data/", 1)[1]
    client = await raw_token(vault, phase, inv)
    kv = client.secrets.kv.v2
    await asyncio.to_thread(kv.create_or_update_secret, name, {"key": key}, cas=0, mount_point=layout.KV_MOUNT)
    attempts = {
        "update": lambda: kv.create_or_update_secret(name, {"key": "forged"}, mount_point=layout.KV_MOUNT),
        "cas update": lambda: kv.create_or_update_secret(name, {"key": "forged"}, cas=1, mount_point=layout.KV_MOUNT),
        "delete": lambda: kv.delete_latest_version_of_secret(name, mount_point=layout.KV_MOUNT),
        "destroy": lambda: kv.destroy_secret_versions(name, [1], mount_point=layout.KV_MOUNT),
        "metadata delete": lambda: kv.delete_metadata_and_all_versions(name, mount_point=layout.KV_MOUNT),
    }
    for what, attempt in attempts.items():
        with pytest.raises(hvac.exceptions.Forbidden):
            await asyncio.to_thread(attempt)
            pytest.fail(f"{what} was allowed")
    stored = await asyncio.to_thread(vault.root().secrets.kv.v2.read_secret_version, name,
                                     mount_point=layout.KV_MOUNT, raise_on_deleted_version=True)
    assert stored["data"]["data"] == {"key": key} and stored["data"]["metadata"]["version"] == 1


# --- through the protocol ---------------------------------------------------------------------------

async def test_a_fresh_ledger_in_a_new_pod_with_the_claims_answers_already_executed(vault: Vault, tmp_path: Path):
    inv = new_investigation()
    action = restart_action()
    executor = Scripted()
    async with session_of(vault, Phase.AUTONOMOUS, inv, tmp_path) as pod1:
        first = await execute(action, executor, done=FileLedger(tmp_path / "pod-1" / "ledger"),
                              investigation_id=inv, shared=VaultClaims(pod1))
    async with session_of(vault, Phase.AUTONOMOUS, inv, tmp_path) as pod2:
        fresh = FileLedger(tmp_path / "pod-2" / "ledger")
        second = await execute(action, executor, done=fresh, investigation_id=inv, shared=VaultClaims(pod2))
    assert first.outcome is Outcome.EXECUTED_VERIFIED
    assert second.outcome is Outcome.ALREADY_EXECUTED and second.executed
    assert second.previous is not None and second.previous.outcome is Outcome.EXECUTED_VERIFIED
    assert "shared claims" in second.reason and "not acting twice" in second.reason
    assert (executor.checks, executor.acts) == (1, 1)  # the new pod did not even re-check
    assert fresh.seen(first.key) is None  # it knew from Vault, not from its own ledger


async def test_unreachable_vault_means_nothing_is_done(tmp_path: Path):
    nowhere = VaultSession(f"http://127.0.0.1:{free_port()}", timeout=2)
    executor = Scripted()
    result = await execute(restart_action(), executor, done=FileLedger(tmp_path / "ledger"),
                           investigation_id="inv-offline", shared=VaultClaims(nowhere, holder=""))
    assert result.outcome is Outcome.FAILED and "shared action claims are unreadable" in result.reason
    assert executor.acts == 0 and FileLedger(tmp_path / "ledger").seen(result.key) is None


# --- the retried pod: killed right after it acted ----------------------------------------------------

def make_unready(w: World, name: str) -> None:
    """A pod running but failing its readiness probe, without restarts (what the kubelet reports)."""
    p = w.store.get(PODS, WORKLOADS, name)
    p["status"]["containerStatuses"][0].update(ready=False)
    for cond in p["status"]["conditions"]:
        if cond["type"] in ("Ready", "ContainersReady"):
            cond.update(status="False", reason="ContainersNotReady", message="containers with unready status: [app]")
    p = w.store.update(PODS, p)
    w.handle.cluster.recorder.record(p, "Warning", "Unhealthy",
                                     "Readiness probe failed: HTTP probe failed with statuscode: 503", "kubelet")


def patches(w: World) -> list[Any]:
    return [r for r in w.handle.cluster.requests
            if r.method == "PATCH" and r.path.endswith(f"/namespaces/{WORKLOADS}/deployments/{APP}")]


class Agent:
    """``agentjobs agent`` as one pod of the Job: the environment the dispatcher gives it, its own working directory."""

    def __init__(self, w: World, vault: Vault, vhost: Vhost, investigation_id: str, tmp_path: Path, pod: str) -> None:
        self.w, self.vault, self.vhost, self.inv = w, vault, vhost, investigation_id
        self.dir = tmp_path / pod
        for sub in ("in", "work", "home"):
            (self.dir / sub).mkdir(parents=True)
        self.proc: asyncio.subprocess.Process | None = None

    def environ(self) -> dict[str, str]:
        kube = self.dir / "kubeconfig.json"
        kube.write_text(json.dumps(kubeconfig(self.w.handle.url, self.w.tokens[Phase.AUTONOMOUS],
                                              namespace=WORKLOADS)))
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.dir / "home"),
            **job_environ(self.vault, Phase.AUTONOMOUS, self.inv, self.dir / "in"),
            "AGENTJOBS_JOB_NAME": f"aj-{self.inv[:20]}", "AGENTJOBS_CLASS": "kubernetes",
            "AGENTJOBS_AMQP__URL": without_credentials(self.vhost.amqp_url),
            "AGENTJOBS_TOOLS__RABBITMQ": "false", "AGENTJOBS_TOOLS__KUBERNETES": "true",
            "AGENTJOBS_TOOLS__KUBECONFIG": str(kube), "AGENTJOBS_WORK_DIR": str(self.dir / "work"),
            "AGENTJOBS_ACTIONS__ALLOWANCE": "1", "AGENTJOBS_ACTIONS__MAX_PER_INVESTIGATION": "1",
            "AGENTJOBS_ACTIONS__NAMESPACES": json.dumps([WORKLOADS]), "AGENTJOBS_ACTIONS__DATABASES": "[]",
            "AGENTJOBS_ACTIONS__EXHAUSTED_TARGETS": "[]",
        }

    async def start(self) -> asyncio.subprocess.Process:
        environ = self.environ()
        env = agent_config.load(environ)
        env.incident_file.write_bytes(encode(target_down()))
        env.wrapped_token_file.write_text(await mint(self.vault, Phase.AUTONOMOUS, self.inv))
        self.proc = await asyncio.create_subprocess_exec(
            *AGENT_ARGV, env=environ, cwd=self.dir / "home", stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        return self.proc

    async def finish(self, timeout: float = 90.0) -> tuple[int, str]:
        assert self.proc is not None
        out, _ = await asyncio.wait_for(self.proc.communicate(), timeout)
        assert self.proc.returncode is not None
        return self.proc.returncode, out.decode(errors="replace")

    @property
    def ledger(self) -> FileLedger:
        return FileLedger(self.dir / "work" / agent_config.ACTION_LEDGER_FILE)


def target_down() -> Any:
    return incident("TargetDown", expr=f'up{{job="{APP}"}} == 0', namespace=WORKLOADS, app=APP)


async def test_a_retried_pod_does_not_restart_the_deployment_again(world: World, vault: Vault, amqp_vhost: Vhost,
                                                                   tmp_path: Path):
    for p in await world.settled(3):  # the endpoint is down: every pod fails its readiness probe
        make_unready(world, p["metadata"]["name"])
    await world.handle.cluster.wait_for(DEPLOYMENTS, WORKLOADS, lambda items: any(
        d["metadata"]["name"] == APP and (d.get("status") or {}).get("readyReplicas") == 0 for d in items), 10)
    # The rollout will not progress while the retry arrives (the Deployment controller stays out of it),
    # so the Deployment still looks exactly as unhealthy as when the first pod decided to restart it.
    world.store._listeners.remove(world.controllers._on_event)  # noqa: SLF001
    inv = new_investigation()
    key = idempotency_key(inv, restart_action(), volatile=RestartDeployment.volatile_params)
    first = Agent(world, vault, amqp_vhost, inv, tmp_path, "pod-1")
    killed: list[int] = []

    def kill_when_restarted(ev: Any) -> None:
        if ev.rt is not DEPLOYMENTS or ev.type != "MODIFIED" or ev.obj["metadata"]["name"] != APP:
            return
        was = (((ev.old or {}).get("spec") or {}).get("template", {}).get("metadata", {}).get("annotations") or {})
        now = ev.obj["spec"]["template"]["metadata"].get("annotations") or {}
        if now.get(RESTARTED_AT) and now.get(RESTARTED_AT) != was.get(RESTARTED_AT) and not killed:
            # The PATCH is applied and stored; its answer is not even written yet: kill the agent now.
            assert first.proc is not None
            os.kill(first.proc.pid, signal.SIGKILL)
            killed.append(ev.rv)

    world.store.subscribe(kill_when_restarted)
    async with action_records(amqp_vhost.amqp_url) as records:
        await first.start()
        code, out = await first.finish()
        assert code == -signal.SIGKILL and killed, out
        assert records.now(inv) == []  # it published nothing (checked again below: one record in all)
        [patch] = patches(world)
        assert patch.user == f"system:serviceaccount:{RUNS}:{SA[Phase.AUTONOMOUS]}"  # the agent did it
        assert world.deployment()["metadata"]["generation"] == 2
        pending = first.ledger.seen(key)
        assert pending is not None and pending.outcome is None  # claimed locally too, never settled
        in_vault = await VaultClaims(root_session(vault)).seen(key)
        assert in_vault is not None and in_vault.outcome is None  # claimed in Vault before acting, never settled

        retried = Agent(world, vault, amqp_vhost, inv, tmp_path, "pod-2")  # a new emptyDir: an empty ledger
        await retried.start()
        code, out = await retried.finish()
        assert code == 0, out
        await records.of(inv, timeout=30)
        [(routing_key, again)] = records.now(inv)

    assert routing_key.startswith("action.already_executed.")
    assert (again.action, again.decision, again.outcome, again.executed) == (
        "restart_deployment", "execute", "already_executed", False)
    assert again.idempotency_key == key
    assert "shared claims" in again.reason and "outcome was never recorded" in again.reason
    assert len(patches(world)) == 1 and world.deployment()["metadata"]["generation"] == 2  # acted exactly once
    status = world.deployment()["status"]
    assert status["readyReplicas"] == 0 and status["observedGeneration"] == 1  # and it still looks unhealthy
    assert retried.ledger.seen(key) is None  # it knew from Vault

    # Did the claim do it? The same retry with the local ledger only (how it was before) restarts again.
    world.store.subscribe(world.controllers._on_event)  # noqa: SLF001 - let this rollout complete
    control = Agent(world, vault, amqp_vhost, inv, tmp_path, "pod-3")
    env = agent_config.load({**control.environ(), "AGENTJOBS_VAULT__AUTH_MODE": "none"})
    tools, _ = await engine.open_tools(env, db_user=None, db_password=None, postgres_available=False)
    try:
        finding = await engine.investigate(target_down(), env, tools=tools, tally=Tally())  # no claims, no guard
    finally:
        await engine.close_tools(tools)
    [restart] = [a for a in finding.proposed_actions if a.action == "restart_deployment"]
    assert restart.params["outcome"] == "executed_verified" and restart.params["idempotency_key"] == key
    assert len(patches(world)) == 2
