"""Two `agentjobs dispatcher` processes on one queue, one of them SIGKILLed mid-run.

The processes are the real console script; the Kubernetes API is the emulator,
reached over HTTP through a kubeconfig file, exactly as a cluster would be.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

from schemas.routing import DEAD, INCIDENTS
from schemas import decode_incident, identify
from tests.integration.dispatcher_harness import (
    Results,
    declare_topology,
    lifecycle_ids,
    publish,
    ready_messages,
)
from tests.integration.k8s_helpers import prepare_cluster, settings_for
from tests.support.k8s.resources import JOBS
from tests.support.payloads import storm
from tests.support.services import free_port

pytestmark = pytest.mark.integration


class DispatcherProcess:
    """An `agentjobs dispatcher` (or another service command) process, ready when /readyz says so."""

    def __init__(self, env: dict[str, str], log_path: Path, *, command: str = "dispatcher") -> None:
        self.command = command
        self.env = env
        self.log_path = log_path
        self.port = free_port()
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        script = Path(sys.executable).with_name("agentjobs")
        self._log = open(self.log_path, "ab")
        self.proc = await asyncio.create_subprocess_exec(
            str(script), self.command, "--health-port", str(self.port),
            env=self.env, stdout=self._log, stderr=self._log,
        )
        async with asyncio.timeout(30), aiohttp.ClientSession() as http:
            while True:
                if self.proc.returncode is not None:
                    raise AssertionError(f"{self.command} exited {self.proc.returncode}: {self.log_path.read_text()[-3000:]}")
                try:
                    async with http.get(f"http://127.0.0.1:{self.port}/readyz") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)

    async def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def stop(self) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(30):
                await self.proc.wait()
        self._log.close()
        return self.proc.returncode


@contextlib.asynccontextmanager
async def _killed_on_exit(processes: list[DispatcherProcess]):
    try:
        yield
    finally:
        for p in processes:
            if p.proc is not None and p.proc.returncode is None:
                await p.kill()


async def test_two_dispatchers_one_killed_and_restarted_make_exactly_one_job_per_group(
    k8s_emulator, amqp_vhost, tmp_path
):
    handle = k8s_emulator
    prepare_cluster(handle)
    url = amqp_vhost.amqp_url
    settings = settings_for(handle.namespace)
    await declare_topology(url, settings)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps(handle.kubeconfig))
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "AGENTJOBS_AMQP__URL": amqp_vhost.url("dispatcher"),
        "AGENTJOBS_AMQP__PREFETCH": "20",
        "AGENTJOBS_RUNTIME__KIND": "kubernetes",
        "AGENTJOBS_K8S__KUBECONFIG": str(kubeconfig),
        "AGENTJOBS_K8S__NAMESPACE": handle.namespace,
        "AGENTJOBS_LOGGING__FORMAT": "json",
        "AGENTJOBS_VAULT__AUTH_MODE": "none",
        "AGENTJOBS_ADMISSION__MAX_ACTIVE": "200",
        **{f"AGENTJOBS_CLASSES__{c}__MAX_ACTIVE": "200" for c in ("DEFAULT", "DATABASE", "KUBERNETES")},
    }
    bodies = storm(groups=50, notifications=500, seed=7)
    expected = sorted({identify(decode_incident(b)).job_name for b in bodies})
    a = DispatcherProcess(env, tmp_path / "a.log")
    b = DispatcherProcess(env, tmp_path / "b.log")
    # Job creation takes a while (as on a busy API server), so a kill catches work in flight
    handle.faults.inject("POST", r"/jobs$", delay=0.1, times=None)
    started = [a, b]
    async with Results(url, binding="lifecycle.dispatched") as results, _killed_on_exit(started):
        await a.start()
        await b.start()
        # When a storm arrives and one dispatcher is SIGKILLed mid-run, then restarted
        await publish(url, bodies[:250])
        await results.wait_for(lambda: len(set(lifecycle_ids(results, "dispatched"))) >= 5)
        await a.kill()
        await publish(url, bodies[250:])
        a = DispatcherProcess(env, tmp_path / "a2.log")
        started.append(a)
        await a.start()
        await results.wait_for(lambda: len(set(lifecycle_ids(results, "dispatched"))) == 50, timeout=60)
        # Then, once both drained and stopped, every notification was acked and nothing died
        assert await b.stop() == 0
        assert await a.stop() == 0
    # the kill really interrupted work: some deliveries were handled a second time
    logs = "".join((tmp_path / f).read_text() for f in ("a.log", "a2.log", "b.log"))
    assert '"attempt": 2' in logs
    jobs = sorted(j["metadata"]["name"] for j in handle.cluster.store.list(JOBS, handle.namespace))
    assert jobs == expected
    creates = [r for r in handle.cluster.requests if r.method == "POST" and r.path.endswith("/jobs")]
    assert len(creates) >= 50
    assert await ready_messages(url, INCIDENTS) == 0
    assert await ready_messages(url, DEAD) == 0


async def test_sigterm_stops_a_dispatcher_whose_broker_went_away(k8s_emulator, amqp_vhost, rabbitmq_management,
                                                                  tmp_path):
    # Given a running dispatcher whose vhost disappears (it keeps trying to reconnect)
    handle = k8s_emulator
    prepare_cluster(handle)
    await declare_topology(amqp_vhost.amqp_url, settings_for(handle.namespace))
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps(handle.kubeconfig))
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "AGENTJOBS_AMQP__URL": amqp_vhost.url("dispatcher"),
           "AGENTJOBS_RUNTIME__KIND": "kubernetes", "AGENTJOBS_K8S__KUBECONFIG": str(kubeconfig),
           "AGENTJOBS_K8S__NAMESPACE": handle.namespace, "AGENTJOBS_VAULT__AUTH_MODE": "none"}
    process = DispatcherProcess(env, tmp_path / "d.log")
    async with _killed_on_exit([process]):
        await process.start()
        await rabbitmq_management.delete_vhost(amqp_vhost.name)
        # When it is asked to stop, Then it exits promptly and cleanly instead of hanging
        assert await process.stop() == 0
    await rabbitmq_management.create_vhost(amqp_vhost.name)  # the module's fixture deletes it afterwards
    await rabbitmq_management.set_permissions(amqp_vhost.name, "guest")
