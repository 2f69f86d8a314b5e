"""Fault injection: 5xx, 429 with Retry-After, hangs, mid-stream watch disconnects, times=N."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client import ApiException

from tests.support.k8s.resources import SECRETS

from .helpers import job_body, status_of

JOBS_PATH = r"/apis/batch/v1/namespaces/[^/]+/jobs$"


async def test_status_fault_fires_n_times_then_requests_succeed(k8s_emulator):
    batch = client.BatchV1Api(k8s_emulator.api_client)
    fault = k8s_emulator.faults.inject("POST", JOBS_PATH, 503, times=2)
    for _ in range(2):
        with pytest.raises(ApiException) as err:
            await batch.create_namespaced_job(k8s_emulator.namespace, job_body("j"))
        assert err.value.status == 503
        assert status_of(err.value)["reason"] == "ServiceUnavailable"
    assert fault.hits == 2 and fault.exhausted
    await batch.create_namespaced_job(k8s_emulator.namespace, job_body("j"))
    # the failed attempts stored nothing; GET was never affected
    assert len((await batch.list_namespaced_job(k8s_emulator.namespace)).items) == 1


async def test_429_carries_retry_after(k8s_emulator):
    k8s_emulator.faults.inject("*", r"/secrets", 429, retry_after=7)
    with pytest.raises(ApiException) as err:
        await client.CoreV1Api(k8s_emulator.api_client).list_namespaced_secret(
            k8s_emulator.namespace)
    assert err.value.status == 429 and err.value.headers["Retry-After"] == "7"
    body = status_of(err.value)
    assert body["reason"] == "TooManyRequests" and body["details"]["retryAfterSeconds"] == 7


async def test_timeout_fault_hangs_until_the_client_gives_up(k8s_emulator):
    fault = k8s_emulator.faults.inject("GET", r"/namespaces/[^/]+$", timeout=True)
    with pytest.raises(asyncio.TimeoutError):
        await client.CoreV1Api(k8s_emulator.api_client).read_namespace(
            k8s_emulator.namespace, _request_timeout=0.5)
    assert fault.hits == 1


async def test_delay_slows_but_does_not_fail(k8s_emulator):
    fault = k8s_emulator.faults.inject("GET", r"/namespaces/[^/]+$", delay=0.05, times=None)
    ns = await client.CoreV1Api(k8s_emulator.api_client).read_namespace(k8s_emulator.namespace)
    assert ns.metadata.name == k8s_emulator.namespace and fault.hits == 1


async def test_drop_stream_cuts_a_watch_mid_stream(k8s_emulator):
    ns = k8s_emulator.namespace
    core = client.CoreV1Api(k8s_emulator.api_client)
    for n in ("a", "b", "c"):
        await core.create_namespaced_secret(ns, {"metadata": {"name": n}})
    k8s_emulator.faults.inject("GET", r"/secrets$", drop_stream=True, after_events=2)
    seen = []
    with pytest.raises(aiohttp.ClientPayloadError):
        async with asyncio.timeout(10), watch.Watch() as w:
            async for ev in w.stream(core.list_namespaced_secret, ns, timeout_seconds=5):
                seen.append(ev["raw_object"]["metadata"]["name"])
    assert seen == ["a", "b"]
    # the next watch (a reconnect) is not affected: times=1 by default
    async with asyncio.timeout(10), watch.Watch() as w:
        names = []
        async for ev in w.stream(core.list_namespaced_secret, ns, timeout_seconds=5):
            names.append(ev["raw_object"]["metadata"]["name"])
            if len(names) == 3:
                break
    assert names == ["a", "b", "c"]
    assert k8s_emulator.cluster.store.watch_count(SECRETS) <= 1


async def test_drop_on_plain_request_is_a_connection_error(k8s_emulator):
    # POST: aiohttp does not silently retry it on a fresh connection, unlike an idempotent GET
    k8s_emulator.faults.inject("POST", r"/secrets$", drop_stream=True)
    core = client.CoreV1Api(k8s_emulator.api_client)
    with pytest.raises(aiohttp.ClientError):
        await core.create_namespaced_secret(k8s_emulator.namespace, {"metadata": {"name": "x"}})
    assert (await core.list_namespaced_secret(k8s_emulator.namespace)).items == []


async def test_silent_stream_makes_a_watch_go_quiet_without_ending(k8s_emulator):
    ns = k8s_emulator.namespace
    core = client.CoreV1Api(k8s_emulator.api_client)
    await core.create_namespaced_secret(ns, {"metadata": {"name": "a"}})
    k8s_emulator.faults.inject("GET", r"/secrets$", silent_stream=True)
    seen = []
    # the stream neither sends the existing object nor ends: only the client's read timeout ends it
    with pytest.raises(aiohttp.ServerTimeoutError):
        async with asyncio.timeout(10), watch.Watch() as w:
            async for ev in w.stream(core.list_namespaced_secret, ns, timeout_seconds=60,
                                     _request_timeout=aiohttp.ClientTimeout(total=30, sock_read=0.5)):
                seen.append(ev)
    assert seen == []
