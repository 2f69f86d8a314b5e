"""Deletion and garbage collection: propagation policies, finalizers, graceful pod deletion.

Real semantics worth being faithful to: deleting a batch/v1 Job through the
API *orphans* its pods unless propagationPolicy says otherwise (and warns);
Background deletes the owner at once and its dependents soon after;
Foreground keeps the owner (deletionTimestamp + `foregroundDeletion`) until
its dependents are gone; an object created with an ownerReference to an
owner that no longer exists is collected. Pods on the node get a grace
period for the kubelet to stop their containers.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from . import status
from .clock import rfc3339
from .resources import ALL, JOBS, PODS, ResourceType

if TYPE_CHECKING:
    from .cluster import Cluster

JOB_ORPHAN_WARNING = ('299 - "child pods are preserved by default when jobs are deleted; '
                      'set propagationPolicy=Background to remove them or set '
                      'propagationPolicy=Orphan to suppress this warning"')


class GarbageCollector:
    def __init__(self, cluster: "Cluster") -> None:
        self.cluster = cluster
        self.store = cluster.store
        self.store.subscribe(self._on_event)

    # -- helpers ---------------------------------------------------------------------------
    def dependents(self, owner: dict) -> list[tuple[ResourceType, dict]]:
        uid, ns = owner["metadata"]["uid"], owner["metadata"].get("namespace")
        out = []
        for rt in ALL:
            if not rt.namespaced or rt.plural == "tokenreviews":
                continue
            for obj in self.store.list(rt, ns):
                if any(r.get("uid") == uid for r in obj["metadata"].get("ownerReferences") or []):
                    out.append((rt, obj))
        return out

    def _finish_if_done(self, rt: ResourceType, obj: dict) -> dict | None:
        """Remove an object marked for deletion whose finalizers are all gone."""
        meta = obj["metadata"]
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            if rt is PODS and self.cluster.kubelet.is_running(obj):
                return None  # the kubelet removes it once containers stopped
            return self.store.remove(rt, meta.get("namespace"), meta["name"])
        return None

    # -- API delete ----------------------------------------------------------------------
    def delete(self, rt: ResourceType, namespace: str | None, name: str,
               propagation: str | None = None, grace: int | None = None,
               preconditions: dict | None = None) -> tuple[int, dict, dict[str, str]]:
        """Returns (http status, body, extra headers)."""
        obj = self.store.get(rt, namespace, name)
        if obj is None:
            raise status.not_found(rt, name)
        meta = obj["metadata"]
        pre = preconditions or {}
        if pre.get("uid") and pre["uid"] != meta["uid"]:
            raise status.ApiError(status.status(
                409, "Conflict", f"Operation cannot be fulfilled on {rt.qualified} \"{name}\": "
                f"Precondition failed: UID in precondition: {pre['uid']}, UID in object meta: "
                f"{meta['uid']}", {"name": name, "group": rt.group, "kind": rt.plural}))
        if pre.get("resourceVersion") and pre["resourceVersion"] != meta["resourceVersion"]:
            raise status.conflict(rt, name)
        headers: dict[str, str] = {}
        if propagation is None:
            propagation = "Orphan" if rt is JOBS else "Background"
            if rt is JOBS:
                headers["Warning"] = JOB_ORPHAN_WARNING
        if propagation not in ("Orphan", "Background", "Foreground"):
            raise status.ApiError(status.status(
                422, "Invalid", f'DeleteOptions.meta.k8s.io "" is invalid: propagationPolicy: '
                f'Unsupported value: "{propagation}": supported values: "Foreground", '
                f'"Background", "Orphan", "nil"'))
        if meta.get("deletionTimestamp"):
            return 202 if meta.get("finalizers") else 200, obj, headers

        if rt is PODS and self.cluster.kubelet.is_running(obj):
            if grace is None:
                grace = obj["spec"].get("terminationGracePeriodSeconds", 30)
            meta["deletionTimestamp"] = rfc3339(self.store.clock.time() + grace)
            meta["deletionGracePeriodSeconds"] = grace
            obj = self.store.update(rt, obj)
            return 200, obj, headers

        if propagation == "Orphan":
            self._orphan(obj)
        elif propagation == "Foreground":
            meta["deletionTimestamp"] = rfc3339(self.store.clock.time())
            meta["deletionGracePeriodSeconds"] = 0
            meta["finalizers"] = list(meta.get("finalizers") or []) + ["foregroundDeletion"]
            obj = self.store.update(rt, obj)
            self._schedule(self._foreground, obj)
            return 202, obj, headers

        if meta.get("finalizers"):
            meta["deletionTimestamp"] = rfc3339(self.store.clock.time())
            meta["deletionGracePeriodSeconds"] = 0
            obj = self.store.update(rt, obj)
            return 202, obj, headers
        removed = self.store.remove(rt, namespace, name)
        if propagation == "Background":
            self._schedule(self._collect_dependents, removed)
        if rt is PODS:
            return 200, removed, headers
        return 200, status.success(rt, name, meta["uid"]), headers

    def _orphan(self, owner: dict) -> None:
        uid = owner["metadata"]["uid"]
        for rt, dep in self.dependents(owner):
            dep["metadata"]["ownerReferences"] = [
                r for r in dep["metadata"]["ownerReferences"] if r.get("uid") != uid]
            if not dep["metadata"]["ownerReferences"]:
                del dep["metadata"]["ownerReferences"]
            self.store.update(rt, dep)

    def _schedule(self, fn, obj: dict) -> None:
        asyncio.get_running_loop().call_soon(fn, obj)

    def _collect_dependents(self, owner: dict) -> None:
        for rt, dep in self.dependents(owner):
            try:
                self.delete(rt, dep["metadata"]["namespace"], dep["metadata"]["name"],
                            "Background", None)
            except status.ApiError:
                pass

    def _foreground(self, owner: dict) -> None:
        for rt, dep in self.dependents(owner):
            try:
                self.delete(rt, dep["metadata"]["namespace"], dep["metadata"]["name"],
                            "Foreground", None)
            except status.ApiError:
                pass
        self._check_foreground(owner)

    def _check_foreground(self, owner: dict) -> None:
        rt = next(r for r in ALL if r.kind == owner["kind"] and r.api_version == owner["apiVersion"])
        current = self.store.get(rt, owner["metadata"].get("namespace"), owner["metadata"]["name"])
        if current is None or current["metadata"]["uid"] != owner["metadata"]["uid"]:
            return
        if "foregroundDeletion" not in (current["metadata"].get("finalizers") or []):
            return
        if self.dependents(current):
            return
        current["metadata"]["finalizers"].remove("foregroundDeletion")
        current = self.store.update(rt, current)
        self._finish_if_done(rt, current)

    # -- reacting to writes ------------------------------------------------------------------
    def _on_event(self, ev) -> None:
        refs = ev.obj["metadata"].get("ownerReferences") or []
        if ev.type == "DELETED":
            for ref in refs:
                found = self.store.find_by_uid(ref["uid"])
                if found is not None and found[1]["metadata"].get("deletionTimestamp"):
                    self._schedule(self._check_foreground, found[1])
        elif ev.type == "ADDED" and refs:
            self._schedule(self._collect_if_orphaned, ev.obj)

    def _collect_if_orphaned(self, obj: dict) -> None:
        """An object whose owners are all gone is garbage (the GC checks owner uids)."""
        refs = obj["metadata"].get("ownerReferences") or []
        if any(self.store.find_by_uid(r["uid"]) is not None for r in refs):
            return
        rt = next(r for r in ALL if r.kind == obj["kind"] and r.api_version == obj["apiVersion"])
        if self.store.get(rt, obj["metadata"].get("namespace"), obj["metadata"]["name"]):
            try:
                self.delete(rt, obj["metadata"]["namespace"], obj["metadata"]["name"],
                            "Background", None)
            except status.ApiError:
                pass
