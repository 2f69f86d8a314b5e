"""The emulated cluster's state and the handle tests drive it with.

Ties the pieces together — clock, store, tokens, admission, faults, garbage
collector, Job controller, kubelet — and offers the few helpers a test needs
to set up or observe the world without going through HTTP (namespaces,
ServiceAccounts, quotas, tokens, "wait until …").
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Callable

from . import admission
from .admission import Rbac, ValidatingPolicy
from .api import Api
from .clock import Clock
from .controller import JobController
from .events import Recorder
from .faults import Faults
from .gc import GarbageCollector
from .kubelet import Kubelet
from .resources import JOBS, NAMESPACES, PODS, RESOURCEQUOTAS, SERVICEACCOUNTS, ResourceType
from .store import Store
from .tokens import Tokens


@dataclass
class RequestRecord:
    method: str
    path: str
    query: dict[str, str]
    content_type: str
    user: str
    headers: dict[str, str] = field(default_factory=dict)


class Cluster:
    def __init__(self, *, clock: Clock | None = None, kubelet_mode: str = "manual",
                 auto_start: bool = True, history_limit: int = 10_000,
                 namespaces: tuple[str, ...] = (), extra_env: dict[str, str] | None = None,
                 bookmark_interval: float = 60.0) -> None:
        self.clock = clock or Clock()
        self.store = Store(self.clock, history_limit)
        self.tokens = Tokens(self.clock, self.store)
        self.rbac = Rbac()
        self.policies: list[ValidatingPolicy] = []  # validating admission of UPDATEs (see admission.py)
        self.faults = Faults()
        self.recorder = Recorder(self.store, self.clock)
        self.api = Api(self)
        self.gc = GarbageCollector(self)
        self.kubelet = Kubelet(self, kubelet_mode, auto_start, extra_env)
        self.controller = JobController(self)
        self.requests: list[RequestRecord] = []
        self.bookmark_interval = bookmark_interval  # seconds between watch BOOKMARKs
        self.port: int | None = None
        self.closing = asyncio.Event()
        self._initial_namespaces = ("default", "kube-system", "kube-public", *namespaces)
        self.store.subscribe(self._on_event)

    async def start(self) -> None:
        for ns in self._initial_namespaces:
            self.create_namespace(ns)
        self.controller.start()

    async def stop(self) -> None:
        self.closing.set()
        self.store.close_watches()
        await self.controller.stop()
        await self.kubelet.stop()

    # -- setup helpers -------------------------------------------------------------------
    def create_namespace(self, name: str) -> dict:
        existing = self.store.get(NAMESPACES, None, name)
        return existing or self.api.create(NAMESPACES, None, {"metadata": {"name": name}})

    def add_service_account(self, namespace: str, name: str, automount: bool | None = None) -> dict:
        existing = self.store.get(SERVICEACCOUNTS, namespace, name)
        if existing:
            return existing
        body: dict = {"metadata": {"name": name, "namespace": namespace}}
        if automount is not None:
            body["automountServiceAccountToken"] = automount
        return self.api.create(SERVICEACCOUNTS, namespace, body)

    def set_quota(self, namespace: str, name: str, hard: dict[str, str | int]) -> dict:
        body = {"metadata": {"name": name}, "spec": {"hard": {k: str(v) for k, v in hard.items()}}}
        return self.api.create(RESOURCEQUOTAS, namespace, body)

    def mint_token(self, namespace: str, service_account: str, audiences: list[str] | None = None,
                   expiration_seconds: int = 3600) -> str:
        """A TokenRequest-style JWT for an existing ServiceAccount."""
        sa = self.add_service_account(namespace, service_account)
        token, _ = self.tokens.mint(namespace, service_account, sa["metadata"]["uid"], audiences,
                                    expiration_seconds)
        return token

    # -- observation helpers -------------------------------------------------------------
    def pods_of_job(self, namespace: str, job: str) -> list[dict]:
        return [p for p in self.store.list(PODS, namespace)
                if (p["metadata"].get("labels") or {}).get("job-name") == job]

    async def wait_for(self, rt: ResourceType, namespace: str | None,
                       predicate: Callable[[list[dict]], object], timeout: float = 10.0):
        """Await until predicate(objects of rt in namespace) is truthy; returns its value."""
        changed = asyncio.Event()

        def listener(ev) -> None:
            if ev.rt is rt:
                changed.set()
        self.store.subscribe(listener)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    result = predicate(self.store.list(rt, namespace))
                    if result:
                        return result
                    changed.clear()
                    await changed.wait()
        finally:
            self.store._listeners.remove(listener)

    async def wait_for_pod(self, namespace: str, job: str, timeout: float = 10.0,
                           phase: str | None = None) -> dict:
        """The first pod of `job` (optionally in `phase`)."""
        def pick(pods: list[dict]) -> dict | None:
            for p in pods:
                labels = p["metadata"].get("labels") or {}
                if labels.get("job-name") == job and (
                        phase is None or p.get("status", {}).get("phase") == phase):
                    return p
            return None
        return await self.wait_for(PODS, namespace, pick, timeout)

    def job(self, namespace: str, name: str) -> dict | None:
        return self.store.get(JOBS, namespace, name)

    def compact(self) -> int:
        """Drop watch history (etcd compaction): older resourceVersions now get 410."""
        return self.store.compact()

    async def watch_opened(self, rt: ResourceType, count: int = 1, timeout: float = 10.0) -> None:
        """Await until at least `count` watches on `rt` are open."""
        async with asyncio.timeout(timeout):
            while self.store.watch_count(rt) < count:
                await self.store.next_watch()

    def bookmark(self) -> None:
        self.store.bookmark()

    # -- quota controller ----------------------------------------------------------------
    def _on_event(self, ev) -> None:
        if ev.type == "MODIFIED" and ev.rt is not PODS or ev.rt is RESOURCEQUOTAS:
            return
        ns = ev.obj["metadata"].get("namespace")
        if ns and any(True for _ in self.store.list(RESOURCEQUOTAS, ns)):
            asyncio.get_running_loop().call_soon(self._refresh_quotas, ns)

    def _refresh_quotas(self, ns: str) -> None:
        for quota in self.store.list(RESOURCEQUOTAS, ns):
            new = admission.quota_status(self.store, quota)
            if quota.get("status") != new:
                quota["status"] = new
                self.store.update(RESOURCEQUOTAS, quota)
