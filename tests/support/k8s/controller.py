"""The Job controller and TTL-after-finished controller, on the emulated clock.

Moves Job status the way Kubernetes 1.31+ does: `startTime`, `active`,
`ready`, `terminating`, `succeeded`/`failed`; the interim conditions
`SuccessCriteriaMet` / `FailureTarget` as soon as the outcome is decided,
then — once no pod is still running — the terminal `Complete` (with
`completionTime`) or `Failed`, reasons `CompletionsReached`,
`BackoffLimitExceeded`, `DeadlineExceeded`. Pod retries wait the real
exponential backoff (10 s doubling, capped at 6 min); `activeDeadlineSeconds`
and `ttlSecondsAfterFinished` are measured on the cluster clock, so a test
advances the clock instead of sleeping.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from . import status as st_
from .clock import parse_rfc3339, rfc3339
from .jsoncopy import clone
from .resources import JOBS, PODS, SERVICEACCOUNTS

if TYPE_CHECKING:
    from .cluster import Cluster

log = logging.getLogger(__name__)
TERMINAL = ("Succeeded", "Failed")
COMPONENT = "job-controller"


def _controller_ref(obj: dict) -> dict | None:
    return next((r for r in obj["metadata"].get("ownerReferences") or []
                 if r.get("controller") and r.get("kind") == "Job"), None)


def _cond(conds: list[dict], type_: str) -> dict | None:
    return next((c for c in conds if c["type"] == type_ and c["status"] == "True"), None)


class JobController:
    def __init__(self, cluster: "Cluster") -> None:
        self.cluster = cluster
        self.store, self.clock = cluster.store, cluster.clock
        self.backoff_base, self.backoff_max = 10.0, 360.0  # seconds (kube defaults)
        self._queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self._pending: set[tuple[str, str]] = set()
        self._timers: dict[tuple[str, str], tuple[float, asyncio.Task]] = {}
        self._counted: dict[str, set[str]] = {}  # job uid -> pod uids already in status
        self._lost: dict[str, int] = {}  # job uid -> pods deleted before finishing
        self._last_failure: dict[str, float] = {}
        self._task: asyncio.Task | None = None
        self.store.subscribe(self._on_event)

    # -- plumbing ------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="emulator-job-controller")

    async def stop(self) -> None:
        for _, task in self._timers.values():
            task.cancel()
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def enqueue(self, ns: str, name: str) -> None:
        if (ns, name) not in self._pending:
            self._pending.add((ns, name))
            self._queue.put_nowait((ns, name))

    def _on_event(self, ev) -> None:
        if ev.rt is JOBS:
            self.enqueue(ev.obj["metadata"]["namespace"], ev.obj["metadata"]["name"])
        elif ev.rt is PODS:
            ref = _controller_ref(ev.obj)
            if ref is None:
                return
            if ev.type == "DELETED":
                counted = self._counted.setdefault(ref["uid"], set())
                pod_uid = ev.obj["metadata"]["uid"]
                if pod_uid not in counted and ev.obj.get("status", {}).get("phase") not in TERMINAL:
                    counted.add(pod_uid)
                    self._lost[ref["uid"]] = self._lost.get(ref["uid"], 0) + 1
                    self._last_failure[ref["uid"]] = self.clock.time()
            self.enqueue(ev.obj["metadata"]["namespace"], ref["name"])
        elif ev.rt is SERVICEACCOUNTS and ev.type == "ADDED":
            for job in self.store.list(JOBS, ev.obj["metadata"]["namespace"]):
                self.enqueue(job["metadata"]["namespace"], job["metadata"]["name"])

    async def _run(self) -> None:
        while True:
            key = await self._queue.get()
            self._pending.discard(key)
            try:
                self.reconcile(*key)
            except Exception:  # a controller bug must not stop the cluster
                log.exception("job_reconcile_failed", extra={"job": key})

    def _wake_at(self, key: tuple[str, str], when: float) -> None:
        existing = self._timers.get(key)
        if existing and existing[0] <= when and not existing[1].done():
            return
        if existing:
            existing[1].cancel()

        async def fire() -> None:
            await self.clock.sleep_until(when)
            self._timers.pop(key, None)
            self.enqueue(*key)

        self._timers[key] = (when, asyncio.create_task(fire(), name=f"job-timer-{key[1]}"))

    # -- reconcile -----------------------------------------------------------------------
    def reconcile(self, ns: str, name: str) -> None:
        job = self.store.get(JOBS, ns, name)
        if job is None:
            timer = self._timers.pop((ns, name), None)
            if timer:
                timer[1].cancel()
            return
        uid = job["metadata"]["uid"]
        spec = job["spec"]
        status = clone(job.get("status") or {})
        conds: list[dict] = status.setdefault("conditions", [])
        now = self.clock.time()

        if _cond(conds, "Complete") or _cond(conds, "Failed"):
            self._ttl(job, status)
            return
        if job["metadata"].get("deletionTimestamp") or spec.get("suspend"):
            return

        status.setdefault("startTime", rfc3339(now))
        pods = self.store.list(PODS, ns, where=lambda p: (_controller_ref(p) or {}).get("uid") == uid)
        counted = self._counted.setdefault(uid, set())
        for p in pods:
            phase = p.get("status", {}).get("phase")
            if phase in TERMINAL and p["metadata"]["uid"] not in counted:
                counted.add(p["metadata"]["uid"])
                fld = "succeeded" if phase == "Succeeded" else "failed"
                status[fld] = status.get(fld, 0) + 1
                if phase == "Failed":
                    self._last_failure[uid] = now
        if self._lost.get(uid):
            status["failed"] = status.get("failed", 0) + self._lost.pop(uid)

        running = [p for p in pods if p.get("status", {}).get("phase") not in TERMINAL]
        active = [p for p in running if not p["metadata"].get("deletionTimestamp")]
        terminating = [p for p in running if p["metadata"].get("deletionTimestamp")]
        restarts = sum(cs.get("restartCount", 0) for p in pods
                       for cs in p.get("status", {}).get("containerStatuses") or [])

        completions = spec.get("completions") or 1
        started = parse_rfc3339(status["startTime"])
        deadline = spec.get("activeDeadlineSeconds")
        target = _cond(conds, "SuccessCriteriaMet") or _cond(conds, "FailureTarget")
        decided_now = target is None
        if target is None:
            if status.get("succeeded", 0) >= completions:
                target = self._add(conds, "SuccessCriteriaMet", "CompletionsReached",
                                   "Reached expected number of succeeded pods", now)
            elif status.get("failed", 0) + restarts > spec.get("backoffLimit", 6):
                target = self._add(conds, "FailureTarget", "BackoffLimitExceeded",
                                   "Job has reached the specified backoff limit", now)
            elif deadline is not None and now >= started + deadline:
                target = self._add(conds, "FailureTarget", "DeadlineExceeded",
                                   "Job was active longer than specified deadline", now)

        if target is not None:
            for p in active:
                self._delete_pod(job, p)
            terminating += active
            active = []
            if decided_now:
                # The interim condition is its own status write; the terminal one follows.
                self.enqueue(ns, name)
            elif not terminating:
                terminal = "Complete" if target["type"] == "SuccessCriteriaMet" else "Failed"
                self._add(conds, terminal, target["reason"], target["message"], now)
                if terminal == "Complete":
                    status["completionTime"] = rfc3339(now)
                    self._event(job, "Normal", "Completed", "Job completed")
                else:
                    self._event(job, "Warning", target["reason"], target["message"])
        else:
            want = min(spec.get("parallelism", 1), completions - status.get("succeeded", 0))
            missing = want - len(active)
            if missing > 0:
                failures = status.get("failed", 0)
                ready_at = self._last_failure.get(uid, 0) + (
                    min(self.backoff_base * 2 ** (failures - 1), self.backoff_max)
                    if failures else 0)
                if now < ready_at:
                    self._wake_at((ns, name), ready_at)
                else:
                    for _ in range(missing):
                        self._create_pod(job)
            if deadline is not None:
                self._wake_at((ns, name), started + deadline)

        status["active"] = len(active)
        status["ready"] = sum(1 for p in active if any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in p.get("status", {}).get("conditions") or []))
        status["terminating"] = len(terminating)
        status["uncountedTerminatedPods"] = {}
        for fld in ("active", "succeeded", "failed"):
            if not status.get(fld):
                status.pop(fld, None)
        if not conds:
            status.pop("conditions")
        if status != (job.get("status") or {}):
            job["status"] = status
            try:
                self.cluster.api.save(JOBS, self.store.get(JOBS, ns, name) or job, job, "status")
            except st_.ApiError:
                self.enqueue(ns, name)
            if target is not None and not terminating and not decided_now:
                self._ttl(self.store.get(JOBS, ns, name) or job, status)

    def _add(self, conds: list[dict], type_: str, reason: str, message: str, now: float) -> dict:
        cond = {"type": type_, "status": "True", "lastProbeTime": rfc3339(now),
                "lastTransitionTime": rfc3339(now), "reason": reason, "message": message}
        conds.append(cond)
        return cond

    def _event(self, job: dict, type_: str, reason: str, message: str) -> None:
        self.cluster.recorder.record(job, type_, reason, message, COMPONENT)

    def _create_pod(self, job: dict) -> None:
        meta, template = job["metadata"], clone(job["spec"]["template"])
        tmeta = template.get("metadata") or {}
        pod = {"metadata": {"generateName": f"{meta['name']}-", "namespace": meta["namespace"],
                            "labels": tmeta.get("labels") or {},
                            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job",
                                                 "name": meta["name"], "uid": meta["uid"],
                                                 "controller": True,
                                                 "blockOwnerDeletion": True}]},
               "spec": template.get("spec") or {}}
        if tmeta.get("annotations"):
            pod["metadata"]["annotations"] = tmeta["annotations"]
        try:
            created = self.cluster.api.create(PODS, meta["namespace"], pod)
        except st_.ApiError as exc:
            self._event(job, "Warning", "FailedCreate", f"Error creating: {exc.body['message']}")
            return
        self._event(job, "Normal", "SuccessfulCreate", f"Created pod: {created['metadata']['name']}")

    def _delete_pod(self, job: dict, pod: dict) -> None:
        try:
            self.cluster.gc.delete(PODS, pod["metadata"]["namespace"], pod["metadata"]["name"],
                                   "Background")
        except st_.ApiError:
            return
        self._event(job, "Normal", "SuccessfulDelete", f"Deleted pod: {pod['metadata']['name']}")

    def _ttl(self, job: dict, status: dict) -> None:
        ttl = job["spec"].get("ttlSecondsAfterFinished")
        if ttl is None:
            return
        finished = status.get("completionTime") or next(
            (c["lastTransitionTime"] for c in status.get("conditions") or []
             if c["type"] in ("Complete", "Failed") and c["status"] == "True"), None)
        if finished is None:
            return
        expires = parse_rfc3339(finished) + ttl
        ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
        if self.clock.time() >= expires:
            try:  # the TTL controller deletes in the foreground, guarded by uid
                self.cluster.gc.delete(JOBS, ns, name, "Foreground",
                                       preconditions={"uid": job["metadata"]["uid"]})
            except st_.ApiError:
                pass
        else:
            self._wake_at((ns, name), expires)
