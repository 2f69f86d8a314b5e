"""Small builders and awaiters shared by the emulator tests (no sleeps: watches with timeouts)."""

from __future__ import annotations

import asyncio
import copy
import json

from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client import ApiException


def job_body(name: str, command: list[str] | None = None, **spec) -> dict:
    container = {"name": "agent", "image": "busybox:1.36",
                 "command": command or ["sh", "-c", "echo hello"]}
    pod_spec = {"restartPolicy": "Never", "containers": [container]}
    pod_spec.update(spec.pop("pod", {}))
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
            "spec": {"template": {"spec": pod_spec}, **spec}}


def status_of(exc: ApiException) -> dict:
    return json.loads(exc.body)


async def wait_job(api: client.BatchV1Api, ns: str, name: str, predicate, timeout: float = 20):
    """Watch the Job until predicate(V1Job) holds; returns the Job."""
    current = await api.read_namespaced_job(name, ns)
    if predicate(current):
        return current
    w = watch.Watch()
    async with asyncio.timeout(timeout):
        async with w:
            async for ev in w.stream(api.list_namespaced_job, ns,
                                     field_selector=f"metadata.name={name}",
                                     resource_version=current.metadata.resource_version,
                                     timeout_seconds=int(timeout) + 1):
                if ev["type"] != "DELETED" and predicate(ev["object"]):
                    return ev["object"]
    raise AssertionError(f"job {name} never matched")


def condition(job, type_: str):
    return next((c for c in (job.status.conditions or []) if c.type == type_
                 and c.status == "True"), None)


def finished(job) -> bool:
    return bool(condition(job, "Complete") or condition(job, "Failed"))


def strip_status(obj: dict) -> dict:
    obj = copy.deepcopy(obj)
    obj.pop("status", None)
    return obj
