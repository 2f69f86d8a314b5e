"""Helpers for the incident pipelines end to end (``tests/e2e/test_lock_contention.py``, ``test_oom.py``).

The same pipeline as the "2 AM" scenario (``tests/e2e/test_two_am.py``): an alert
reaches the bridge of ``agentjobs up`` (bearer token), the dispatcher runs one
Job with the LocalRuntime, the agent (rules reasoner) publishes one finding,
``agentjobs tail findings --json --follow`` shows it. What differs is the
incident and the data sources the agent's tools reach.

* :class:`UpRun` — ``agentjobs up`` plus a ``tail`` of the findings, both stopped
  on the way out; waits for one finding and the Job's ending; SIGTERM at the end.
* :func:`post_webhook` — an Alertmanager webhook (v4) POSTed to the bridge.
* :func:`agents_under` / :func:`no_vault_users` — leftovers of *this* test only: other test
  runs on the machine (CI, benchmarks) may have agents and Vault-issued broker users of their own.
* :func:`oom_killed_workload` — a Deployment in the Kubernetes API emulator whose
  pods are OOM-killed and crash-looping, written as a cluster would show it.

Plain Python (no pytest), like the rest of ``tests/support``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp

from .k8s.clock import rfc3339
from .k8s.resources import DEPLOYMENTS, PODS, REPLICASETS
from .identities import seed_up_credentials
from .lines import Lines
from .services import free_port

AGENTJOBS = str(Path(sys.executable).with_name("agentjobs"))


def no_process(pattern: str) -> bool:
    """True when no process's command line contains ``pattern``."""
    return subprocess.run(["pgrep", "-f", pattern], capture_output=True, check=False).returncode == 1


async def stop(proc: asyncio.subprocess.Process, sig: int, timeout: float) -> int:
    """Signal ``proc`` (if still running) and wait for it; killed when it does not end in time."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            await asyncio.wait_for(proc.wait(), timeout=timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    return proc.returncode  # type: ignore[return-value]


def agents_under(root: Path) -> list[int]:
    """Pids of ``agentjobs agent`` processes working under ``root`` (a LocalRuntime Job's cwd is in its
    state dir). Other test runs on the machine may have agents of their own: those are not ours."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(proc / "cwd")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if "agentjobs agent" in cmdline and cwd.startswith(str(root)):
            found.append(int(proc.name))
    return found


async def no_vault_users(management: Any, vhost: str) -> bool:
    """No Vault-issued RabbitMQ user (``token-…``) has permissions on ``vhost`` (ours: other test runs on
    the machine may hold Vault-issued users of their own meanwhile)."""
    granted = await management.vhost_permissions(vhost)
    return not [p["user"] for p in granted if str(p.get("user", "")).startswith("token-")]


def up_env(tmp_path: Path, *, amqp_vhost: Any, bridge_port: int, token: str, **settings: str) -> dict[str, str]:
    """The environment of ``agentjobs up``: private state, OpenBao and ports; ``settings`` on top."""
    seed_up_credentials(tmp_path / "state", amqp_vhost.amqp_url)
    return {
        **os.environ,
        "AGENTJOBS_RUNTIME__STATE_DIR": str(tmp_path / "state"),
        "AGENTJOBS_VAULT__ADDR": f"http://127.0.0.1:{free_port()}",
        "AGENTJOBS_METRICS__PORT": str(free_port()),
        "AGENTJOBS_AMQP__URL": amqp_vhost.amqp_url,
        "AGENTJOBS_VAULT__RABBITMQ_VHOST": amqp_vhost.name,
        "AGENTJOBS_BRIDGE__PORT": str(bridge_port),
        "AGENTJOBS_BRIDGE__BEARER_TOKEN": token,
        "AGENTJOBS_TRUST__INITIAL_PHASE": "read-only",
        **settings,
    }


class UpRun:
    """``agentjobs up`` and ``agentjobs tail findings --json --follow`` as subprocesses."""

    def __init__(self, env: Mapping[str, str], tmp_path: Path) -> None:
        self.env = dict(env)
        self.tmp_path = tmp_path
        self.up: asyncio.subprocess.Process | None = None
        self.tail: asyncio.subprocess.Process | None = None
        self.out: Lines | None = None
        self.findings: Lines | None = None

    async def start(self, stack: contextlib.AsyncExitStack) -> UpRun:
        """Start both (stopped by ``stack`` on failure); returns when ``up`` runs and ``tail`` listens."""
        self.up = await asyncio.create_subprocess_exec(AGENTJOBS, "up", env=self.env, stdout=asyncio.subprocess.PIPE,
                                                       stderr=asyncio.subprocess.STDOUT)
        stack.push_async_callback(stop, self.up, signal.SIGTERM, 60)  # on failure; normally stopped by `finish`
        self.out = Lines(self.up.stdout)  # type: ignore[arg-type]
        await self.out.wait_for(lambda line: line.startswith("running"), 90, "`running` from up")
        self.tail = await asyncio.create_subprocess_exec(
            AGENTJOBS, "tail", "findings", "--json", "--follow", env=self.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        stack.push_async_callback(stop, self.tail, signal.SIGINT, 30)
        self.findings, said = Lines(self.tail.stdout), Lines(self.tail.stderr)  # type: ignore[arg-type]
        await said.wait_for(lambda line: line.startswith("tail: findings"), 30, "tail's ready line")
        return self

    @property
    def bridge_url(self) -> str:
        return f"http://127.0.0.1:{self.env['AGENTJOBS_BRIDGE__PORT']}/alerts"

    async def finding(self, alertname: str, timeout: float = 60) -> tuple[dict[str, Any], str]:
        """The finding about ``alertname`` and a report for assertion messages; the Job must have succeeded."""
        assert self.findings is not None and self.out is not None
        # The first finding: one incident is in flight, and a failed Job's outcome (published by the
        # dispatcher, without the alert's name) should fail the test at once, with the agent's stderr.
        line = await self.findings.wait_for(lambda line: line.startswith("{"), timeout, f"a finding about {alertname}")
        finding = json.loads(line)
        ended = await self.out.wait_for(lambda line: line.strip().startswith(("succeeded", "failed")), 60,
                                        "the investigation's ending")
        report = "\n".join(self.out.lines) + "\n\n" + json.dumps(finding, indent=1)[:8000]
        assert ended.split()[0] == "succeeded", report
        assert f'alert "{alertname}"' in finding["summary"], report
        return finding, report

    def dispatched(self) -> list[str]:
        assert self.out is not None
        return [line for line in self.out.lines if line.strip().startswith("dispatched")]

    async def finish(self) -> str:
        """SIGTERM ``up``: it exits 0, says ``stopped``, with one Job only and no agent or OpenBao left."""
        assert self.up is not None and self.out is not None
        code = await stop(self.up, signal.SIGTERM, 60)
        text = await self.out.finished()
        assert code == 0, text[-3000:]
        assert "stopped" in text.splitlines()[-1] and "Traceback" not in text, text[-3000:]
        assert len([line for line in text.splitlines() if line.strip().startswith("dispatched")]) == 1, text
        vault_listen = self.env["AGENTJOBS_VAULT__ADDR"].removeprefix("http://")
        for pattern in (f"dev-listen-address={vault_listen}", f"{self.tmp_path}/state"):
            assert no_process(pattern), pattern
        assert not agents_under(self.tmp_path), agents_under(self.tmp_path)
        return text


async def post_webhook(url: str, token: str, payload: Mapping[str, Any]) -> None:
    """POST an Alertmanager webhook to the bridge as Alertmanager does (bearer token); expects 200."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http,
        http.post(url, json=payload, headers={"Authorization": f"Bearer {token}"}) as resp,
    ):
        body = await resp.text()
        assert resp.status == 200, f"bridge answered {resp.status}: {body}"


# --------------------------------------------------------------------------- #
# Kubernetes (the API emulator)
# --------------------------------------------------------------------------- #

DAY = 86400.0


async def oom_killed_workload(handle: Any, name: str, *, replicas: int = 3, image: str, memory: str = "256Mi",
                              template_hash: str = "5d8f7c9b6d") -> list[str]:
    """Deployment ``name`` (rolled out days ago) whose pods keep being OOM-killed; returns the pod names.

    The Deployment and its ReplicaSets are written to the emulator's store as a cluster shows
    them (the emulator runs no Deployment controller); the pods are created through its API,
    started by its kubelet, and then given the status a kubelet with ``restartPolicy: Always``
    reports for a container the kernel OOM-kills over and over: ``lastState.terminated``
    OOMKilled (exit 137), waiting in CrashLoopBackOff, a BackOff event per restart.
    """
    ns, now = handle.namespace, handle.clock.time()
    labels = {"app": name}
    container = {"name": "app", "image": image,
                 "resources": {"requests": {"memory": memory}, "limits": {"memory": memory}}}
    deployment = handle.cluster.store.create(DEPLOYMENTS, {
        "metadata": {"name": name, "namespace": ns, "generation": 4, "labels": labels,
                     "creationTimestamp": rfc3339(now - 40 * DAY),
                     "annotations": {"deployment.kubernetes.io/revision": "4"}},
        "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels}, "spec": {"containers": [container]}}},
        "status": {"observedGeneration": 4, "replicas": replicas, "updatedReplicas": replicas, "readyReplicas": 0,
                   "availableReplicas": 0, "unavailableReplicas": replicas,
                   "conditions": [{"type": "Available", "status": "False", "reason": "MinimumReplicasUnavailable",
                                   "message": "Deployment does not have minimum availability."}]},
    })
    owner = {"apiVersion": "apps/v1", "kind": "Deployment", "name": name,
             "uid": deployment["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}
    current = None
    for revision, rs_hash, age_days, tag in ((3, "6f7d8c9b5c", 12, "2.3.0"), (4, template_hash, 3, "2.3.1")):
        rs_labels = {**labels, "pod-template-hash": rs_hash}
        rs_image = image.rsplit(":", 1)[0] + f":{tag}" if revision == 3 else image
        current = handle.cluster.store.create(REPLICASETS, {
            "metadata": {"name": f"{name}-{rs_hash}", "namespace": ns, "labels": rs_labels,
                         "creationTimestamp": rfc3339(now - age_days * DAY),
                         "annotations": {"deployment.kubernetes.io/revision": str(revision)},
                         "ownerReferences": [owner]},
            "spec": {"replicas": replicas if revision == 4 else 0,
                     "selector": {"matchLabels": rs_labels},
                     "template": {"metadata": {"labels": rs_labels},
                                  "spec": {"containers": [{**container, "image": rs_image}]}}},
            "status": {"replicas": replicas if revision == 4 else 0, "readyReplicas": 0, "availableReplicas": 0},
        })
    assert current is not None
    rs_owner = {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": current["metadata"]["name"],
                "uid": current["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}
    pods = [f"{name}-{template_hash}-{suffix}" for suffix in ("x2x4z", "q7k9m", "b5n8t", "r4w2p", "h6j3c")[:replicas]]
    for pod in pods:
        handle.cluster.api.create(PODS, ns, {
            "metadata": {"name": pod, "labels": {**labels, "pod-template-hash": template_hash},
                         "ownerReferences": [rs_owner]},
            "spec": {"restartPolicy": "Always", "containers": [container]}})
    await handle.cluster.wait_for(PODS, ns, lambda items: sum(
        1 for p in items if p["metadata"]["name"] in pods and (p.get("status") or {}).get("phase") == "Running"
    ) == len(pods))
    for i, pod in enumerate(pods):
        _oom_crash_loop(handle, pod, restarts=4 + i)
    return pods


def _oom_crash_loop(handle: Any, name: str, *, restarts: int) -> None:
    """What a kubelet reports for a container the kernel keeps OOM-killing (restartPolicy Always)."""
    store, now = handle.cluster.store, handle.clock.time()
    pod = store.get(PODS, handle.namespace, name)
    cs = pod["status"]["containerStatuses"][0]
    cs.update(ready=False, started=False, restartCount=restarts,
              state={"waiting": {"reason": "CrashLoopBackOff",
                                 "message": f"back-off 2m40s restarting failed container=app pod={name}"
                                            f"_{handle.namespace}({pod['metadata']['uid']})"}},
              lastState={"terminated": {"exitCode": 137, "reason": "OOMKilled", "startedAt": rfc3339(now - 45),
                                        "finishedAt": rfc3339(now - 5), "containerID": cs.get("containerID")}})
    for cond in pod["status"]["conditions"]:
        if cond["type"] in ("Ready", "ContainersReady"):
            cond.update(status="False", reason="ContainersNotReady",
                        message="containers with unready status: [app]")
    store.update(PODS, pod)
    handle.cluster.recorder.record(pod, "Warning", "BackOff", "Back-off restarting failed container app in pod "
                                   f"{name}_{handle.namespace}({pod['metadata']['uid']})", "kubelet")
