"""After a dispatcher restart an investigation that already ended stays ended.

Real RabbitMQ and OpenBao, the emulated Kubernetes API; the restarted dispatcher
has no memory, so it can only learn the ending from the Job itself.
"""

from __future__ import annotations

import contextlib
import json
import sys

import pytest

from dispatcher.intake.service import DispatcherService
from dispatcher.jobs.local import LocalRuntime, read_records
from schemas import LifecycleState, decode_incident, identify
from tests.integration.dispatcher_harness import PodDriver, Results, lifecycle_ids, publish
from tests.integration.lifecycle_helpers import dispatcher, firing, outcomes, resolved
from tests.integration.k8s_helpers import settings_for
from tests.integration.test_dispatcher import _until, env  # noqa: F401 - the fixture
from tests.integration.test_dispatcher_credentials import world  # noqa: F401 - the fixture
from tests.support.identities import url_for
from tests.support.k8s.resources import JOBS

pytestmark = pytest.mark.integration


def _vault_env(vault) -> dict[str, str]:
    return {k: v for k, v in vault.env.items() if k.startswith("AGENTJOBS_VAULT")}


async def test_a_restarted_dispatcher_neither_redispatches_nor_mints_for_an_ended_investigation(world):  # noqa: F811
    handle, url, vault = world
    body = firing("Ended", "db-1")
    inv = identify(decode_incident(body)).investigation_id
    async with PodDriver(handle, decide=lambda pod: 0).running_(), Results(url) as results:
        # Given an investigation that was dispatched and succeeded
        async with dispatcher(handle, url, counting=True, **_vault_env(vault)) as first:
            await publish(url, [body])
            await results.wait_for(lambda: lifecycle_ids(results, "succeeded") == [inv])
        assert first.credentials.minted == [inv]  # the count sees what a launch mints
        # When a restarted dispatcher gets the group's next re-send, then its resolution (twice)
        async with dispatcher(handle, url, counting=True, **_vault_env(vault)) as again:
            await publish(url, [body])
            await _until(lambda: outcomes(again).get("duplicate") == 1)
            await publish(url, [resolved("Ended", "db-1"), resolved("Ended", "db-1")])
            await _until(lambda: outcomes(again).get("resolved_after_finish") == 2)
            await results.wait_for(lambda: len(results.keys("lifecycle.resolved")) == 2)
            minted = again.credentials.minted
    # Then: one dispatched, no token minted for it, no cancel, and the ending is reported as resolved
    assert lifecycle_ids(results, "dispatched") == [inv]
    assert minted == []
    assert results.keys("lifecycle.cancelled") == []
    resolved_events = results.keys("lifecycle.resolved")
    assert {m[1] for m in resolved_events} == {f"{inv}:resolved"}  # a re-sent resolve is a duplicate
    assert all(m[2].state is LifecycleState.RESOLVED and m[2].investigation_id == inv for m in resolved_events)
    # and the finished Job was not deleted by the resolve
    assert len(handle.cluster.store.list(JOBS, handle.namespace)) == 1


async def test_a_restarted_dispatcher_reannounces_a_running_job_without_minting(world):  # noqa: F811
    handle, url, vault = world
    body = firing("Running", "db-1")
    inv = identify(decode_incident(body)).investigation_id
    async with PodDriver(handle, decide=lambda pod: None).running_(), Results(url) as results:
        async with dispatcher(handle, url, **_vault_env(vault)):
            await publish(url, [body])
            await results.wait_for(lambda: lifecycle_ids(results, "started") == [inv])
        async with dispatcher(handle, url, counting=True, **_vault_env(vault)) as again:
            await publish(url, [body])
            await _until(lambda: outcomes(again).get("already_dispatched") == 1)
            minted = again.credentials.minted
    # The same dispatched message again (consumers drop it by its id), and no fresh token
    assert {m[1] for m in results.keys("lifecycle.dispatched")} == {f"{inv}:dispatched"}
    assert minted == []
    assert len(handle.cluster.store.list(JOBS, handle.namespace)) == 1


async def test_with_the_local_runtime_a_restart_keeps_the_finished_job_and_reports_the_resolution(
        env, tmp_path):  # noqa: F811
    # Given a LocalRuntime whose Job ended (exit 0) under a dispatcher that then stopped
    handle, url = env
    body = firing("LocalEnded", "db-1")
    ident = identify(decode_incident(body))
    settings = settings_for(handle.namespace, AGENTJOBS_AMQP__URL=url_for(url, "dispatcher"),
                            AGENTJOBS_K8S__AGENT_COMMAND=json.dumps([sys.executable, "-c", "pass"]))

    @contextlib.asynccontextmanager
    async def local_dispatcher():
        service = DispatcherService(settings, LocalRuntime(tmp_path / "local", use_cgroup=False), health_port=0)
        await service.start()
        try:
            yield service
        finally:
            await service.stop(drain_timeout=5)

    async with Results(url) as results:
        async with local_dispatcher():
            await publish(url, [body])
            await results.wait_for(lambda: lifecycle_ids(results, "succeeded") == [ident.investigation_id])
        # When a new dispatcher with a new runtime on the same state gets a re-send and the resolution
        async with local_dispatcher() as again:
            await publish(url, [body])
            await _until(lambda: outcomes(again).get("duplicate") == 1)
            await publish(url, [resolved("LocalEnded", "db-1")])
            await results.wait_for(lambda: results.keys("lifecycle.resolved"))
    # Then no second dispatched, no false cancel, and the Job's record is still there
    assert lifecycle_ids(results, "dispatched") == [ident.investigation_id]
    assert results.keys("lifecycle.cancelled") == []
    assert [r.name for r in read_records(tmp_path / "local")] == [ident.job_name]
