"""Watch semantics: event types, resume from a resourceVersion, timeouts, bookmarks, 410 Expired."""

from __future__ import annotations

import asyncio

import pytest
from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client import ApiException

from tests.support.k8s.resources import SECRETS

from .helpers import job_body


async def _collect(func, n: int, **kwargs) -> list[tuple[str, str]]:
    out = []
    async with asyncio.timeout(10), watch.Watch() as w:
        async for ev in w.stream(func, **kwargs):
            out.append((ev["type"], ev["raw_object"]["metadata"]["name"]))
            if len(out) == n:
                break
    return out


async def test_watch_streams_added_modified_deleted(k8s_emulator):
    core = client.CoreV1Api(k8s_emulator.api_client)
    ns = k8s_emulator.namespace
    start = (await core.list_namespaced_secret(ns)).metadata.resource_version
    task = asyncio.create_task(_collect(core.list_namespaced_secret, 3, namespace=ns,
                                        resource_version=start, timeout_seconds=10))
    await core.create_namespaced_secret(ns, {"metadata": {"name": "s"}})
    await core.patch_namespaced_secret("s", ns, {"metadata": {"labels": {"x": "y"}}})
    await core.delete_namespaced_secret("s", ns)
    assert await task == [("ADDED", "s"), ("MODIFIED", "s"), ("DELETED", "s")]


async def test_watch_without_resource_version_starts_with_current_objects(k8s_emulator):
    core = client.CoreV1Api(k8s_emulator.api_client)
    ns = k8s_emulator.namespace
    for n in ("a", "b"):
        await core.create_namespaced_secret(ns, {"metadata": {"name": n}})
    assert await _collect(core.list_namespaced_secret, 2, namespace=ns, timeout_seconds=5) == [
        ("ADDED", "a"), ("ADDED", "b")]


async def test_watch_resumes_after_a_resource_version(k8s_emulator):
    # Given a watcher that saw the first write and then disconnected
    core = client.CoreV1Api(k8s_emulator.api_client)
    ns = k8s_emulator.namespace
    first = await core.create_namespaced_secret(ns, {"metadata": {"name": "one"}})
    # When more writes happen while nobody watches
    await core.create_namespaced_secret(ns, {"metadata": {"name": "two"}})
    await core.delete_namespaced_secret("one", ns)
    # Then resuming from the last seen resourceVersion replays exactly the missed events
    events = await _collect(core.list_namespaced_secret, 2, namespace=ns,
                            resource_version=first.metadata.resource_version,
                            timeout_seconds=5)
    assert events == [("ADDED", "two"), ("DELETED", "one")]


async def test_watch_accepts_lowercase_and_capitalised_true(k8s_emulator):
    ns = k8s_emulator.namespace
    session = k8s_emulator.api_client.rest_client.pool_manager
    headers = {"Authorization": k8s_emulator.configuration.api_key_prefix["BearerToken"] + " "
               + k8s_emulator.configuration.api_key["BearerToken"]}
    for flag in ("true", "True"):
        url = f"{k8s_emulator.url}/api/v1/namespaces/{ns}/serviceaccounts?watch={flag}" \
              "&timeoutSeconds=1"
        async with session.get(url, headers=headers) as resp:
            line = await resp.content.readline()
        assert b'"type": "ADDED"' in line


async def test_timeout_seconds_ends_the_stream(k8s_emulator):
    core = client.CoreV1Api(k8s_emulator.api_client)
    seen = []
    async with asyncio.timeout(10), watch.Watch() as w:
        async for ev in w.stream(core.list_namespaced_secret, k8s_emulator.namespace,
                                 timeout_seconds=1):
            seen.append(ev)
    assert seen == []  # the iterator ended by itself: the server closed the stream


async def test_bookmarks_when_allowed(k8s_emulator):
    core = client.CoreV1Api(k8s_emulator.api_client)
    ns = k8s_emulator.namespace
    created = await core.create_namespaced_secret(ns, {"metadata": {"name": "b"}})
    async with asyncio.timeout(10), watch.Watch() as w:
        stream = w.stream(core.list_namespaced_secret, ns, allow_watch_bookmarks=True,
                          resource_version=created.metadata.resource_version, timeout_seconds=10)
        first = asyncio.create_task(stream.__anext__())
        await k8s_emulator.cluster.watch_opened(SECRETS)
        k8s_emulator.cluster.bookmark()
        ev = await first
    assert ev["type"] == "BOOKMARK"
    assert int(ev["raw_object"]["metadata"]["resourceVersion"]) >= int(
        created.metadata.resource_version)
    assert w.resource_version == ev["raw_object"]["metadata"]["resourceVersion"]


async def test_expired_resource_version_gets_410_then_relist_recovers(k8s_emulator):
    core = client.CoreV1Api(k8s_emulator.api_client)
    ns = k8s_emulator.namespace
    old = (await core.create_namespaced_secret(ns, {"metadata": {"name": "old"}}))
    await core.create_namespaced_secret(ns, {"metadata": {"name": "newer"}})
    k8s_emulator.cluster.compact()
    # a resumed watch on a compacted resourceVersion fails with 410 Expired ...
    with pytest.raises(ApiException) as err:
        await _collect(core.list_namespaced_secret, 1, namespace=ns,
                       resource_version=old.metadata.resource_version, timeout_seconds=5)
    assert err.value.status == 410 and "Expired" in err.value.reason
    # ... the client without timeout_seconds retries the 410 once, then raises too
    with pytest.raises(ApiException) as err:
        await _collect(core.list_namespaced_secret, 1, namespace=ns,
                       resource_version=old.metadata.resource_version)
    assert err.value.status == 410
    # ... and re-listing gives a fresh resourceVersion to watch from
    listing = await core.list_namespaced_secret(ns)
    assert {s.metadata.name for s in listing.items} == {"old", "newer"}
    task = asyncio.create_task(_collect(core.list_namespaced_secret, 1, namespace=ns,
                                        resource_version=listing.metadata.resource_version,
                                        timeout_seconds=5))
    await core.create_namespaced_secret(ns, {"metadata": {"name": "after"}})
    assert await task == [("ADDED", "after")]


async def test_selector_watch_sees_objects_enter_and_leave(k8s_emulator):
    core = client.CoreV1Api(k8s_emulator.api_client)
    ns = k8s_emulator.namespace
    rv = (await core.list_namespaced_secret(ns)).metadata.resource_version
    task = asyncio.create_task(_collect(core.list_namespaced_secret, 2, namespace=ns,
                                        label_selector="phase=assist", resource_version=rv,
                                        timeout_seconds=5))
    await core.create_namespaced_secret(ns, {"metadata": {"name": "s", "labels": {
        "phase": "shadow"}}})
    await core.patch_namespaced_secret("s", ns, {"metadata": {"labels": {"phase": "assist"}}})
    await core.patch_namespaced_secret("s", ns, {"metadata": {"labels": {"phase": "shadow"}}})
    assert await task == [("ADDED", "s"), ("DELETED", "s")]


async def test_job_watch_sees_status_progress(k8s_emulator):
    batch = client.BatchV1Api(k8s_emulator.api_client)
    ns = k8s_emulator.namespace
    rv = (await batch.list_namespaced_job(ns)).metadata.resource_version
    seen: list[str] = []

    async def observe():
        async with asyncio.timeout(10), watch.Watch() as w:
            async for ev in w.stream(batch.list_namespaced_job, ns, resource_version=rv,
                                     timeout_seconds=10):
                conds = [c.type for c in ev["object"].status.conditions or []]
                seen.append(",".join(conds))
                if "Complete" in conds:
                    return
    task = asyncio.create_task(observe())
    await batch.create_namespaced_job(ns, job_body("w"))
    pod = await k8s_emulator.cluster.wait_for_pod(ns, "w", phase="Running")
    k8s_emulator.kubelet.finish(ns, pod["metadata"]["name"])
    await task
    assert "SuccessCriteriaMet" in seen and seen[-1] == "SuccessCriteriaMet,Complete"
    assert seen.index("SuccessCriteriaMet") < seen.index("SuccessCriteriaMet,Complete")
