"""Executors for the Kubernetes actions: ``restart_deployment``, ``delete_pod``, ``scale_deployment``.

They act through the ``kubernetes`` tool's own ``ApiClient`` — the Job's phase
ServiceAccount token, never anything the dispatcher holds — so the phase's RBAC
(k8s/base/rbac/agents.yaml) and the admission policy
(k8s/base/rbac/deployment-patches.yaml) are a second, independent layer besides
the gate: what the ServiceAccount may not do, the API server refuses (403), and
the executor reports ``failed`` with that answer. Answers are read raw and
bounded, like the tool's; every call is bounded by ``timeout``.

Targets are ``<kind>/<name> in namespace <ns>`` (``ProposedAction.target``) and/or the
params ``namespace`` and ``deployment`` / ``pod``; when both are given they must agree.

**restart_deployment** (params: ``pods`` — comma-separated pod names the finding saw
unready — ``observed_at``, ``uid``). Precondition: the Deployment exists (the same uid if
given), is not paused, was not restarted since the observation, and still shows the
condition: one of the named pods still exists unready, or (no pods named) some replica
is unavailable or not ready. Act: a strategic-merge patch of the pod-template annotation
``kubectl.kubernetes.io/restartedAt`` (what ``kubectl rollout restart`` does, and the only
change the admission policy lets an agent make). Verify: the rollout completed within the
wait — ``observedGeneration`` reached the patched generation and all replicas are updated
and available (``kubectl rollout status``). Undo: none.

**delete_pod** (params: ``uid``, ``restarts`` — the restart count seen — ``observed_at``).
Precondition: the pod exists with the uid the finding saw (if given), is not being deleted,
has a controller to replace it, its restart count is not below the one seen (else it is
another pod), and it still crash-loops or is not ready. Act: DELETE with
``preconditions.uid`` (a pod replaced in between is never deleted). Verify: the pod is gone
(or terminating) and a new pod of the same controller is Ready. Undo: none.

**scale_deployment** (params: ``replicas``, ``from_replicas`` — the count the finding saw).
Precondition: the Deployment exists, its replica count is still ``from_replicas`` (if
given) and differs from the target, and no HorizontalPodAutoscaler manages it (it would
undo a manual scale). Act: a JSON patch of the ``deployments/scale`` subresource that tests
the replica count the precondition read and replaces it (compare-and-set: a change in
between fails the act). Verify: the spec and the ready (and current) replicas reach the
target. Undo: ``kubectl -n NS scale deployment/NAME --replicas=<previous>``.

**rollout_undo**, **raise_memory_limit**: both change a Deployment's pod template, which
the agentjobs admission policy forbids every agent ServiceAccount (only ``restartedAt`` may
change). Their executors do not pretend: they make no API call and fail with that reason
and the command an operator can run instead.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, ClassVar

from kubernetes_asyncio.client import AppsV1Api, AutoscalingV1Api, CoreV1Api

from schemas import ProposedAction

from ..tools.kubernetes import ApiFailure, selector_string, summarize_pod
from ..tools.toolbox import read_capped
from .protocol import Execution, no_undo

RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"
POLICY = "agentjobs-agent-deployment-patches"  # k8s/base/rbac/deployment-patches.yaml
VERIFY_S = 30.0  # default bounded wait for a rollout / a replacement pod
POLL_S = 0.5
MAX_BYTES = 4 * 1024 * 1024
LIST_LIMIT = 500
MAX_REPLICAS = 100  # scale_deployment never goes above this in one action
PER_POD_LABELS = ("statefulset.kubernetes.io/pod-name", "apps.kubernetes.io/pod-index")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")  # DNS-1123 subdomain
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")  # DNS-1123 label
_TARGET = re.compile(r"^\s*(?:(?P<kind>[A-Za-z.]+)/)?(?P<name>[^\s/]+)(?:\s+in\s+namespace\s+(?P<ns>\S+))?\s*$")


# --- pure parts -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Ref:
    """One object the action names."""

    kind: str  # "deployment" | "pod"
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind}/{self.name} in namespace {self.namespace}"


def target_of(action: ProposedAction, kind: str, *, default_namespace: str) -> Ref | str:
    """The object ``action`` names (from ``target`` and/or params), or why it names none (pure)."""
    p = action.params
    name, namespace = p.get(kind, "") or "", p.get("namespace", "") or ""
    if action.target.strip():
        m = _TARGET.match(action.target)
        if m is None:
            return f"target {action.target[:120]!r} is not '{kind}/<name> in namespace <namespace>'"
        if m["kind"] and m["kind"].lower() not in (kind, f"{kind}s", f"{kind}s.apps", f"{kind}.apps"):
            return f"target {action.target[:120]!r} is not a {kind}"
        if name and name != m["name"]:
            return f"the target names {kind} {m['name']!r} but params.{kind} is {name!r}"
        if namespace and m["ns"] and namespace != m["ns"]:
            return f"the target is in namespace {m['ns']!r} but params.namespace is {namespace!r}"
        name, namespace = m["name"], namespace or m["ns"] or ""
    namespace = namespace or default_namespace
    if not name:
        return f"the proposal names no {kind}"
    if not _NAME.match(name):
        return f"{kind} name {name[:120]!r} is not a valid Kubernetes name"
    if not _NAMESPACE.match(namespace):
        return f"namespace {namespace[:80]!r} is not a valid Kubernetes namespace"
    return Ref(kind, namespace, name)


def parse_time(raw: str | None) -> datetime | None:
    """An RFC 3339 timestamp with a time zone, else None (pure)."""
    if not raw:
        return None
    try:
        t = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo is not None else None


def count(raw: str | None) -> int | None:
    """A non-negative integer param, else None (pure)."""
    try:
        value = int(str(raw).strip()) if raw not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and value >= 0 else None


def rfc3339(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def controller_of(obj: Mapping[str, Any]) -> dict[str, Any] | None:
    """The controller ownerReference of an object, if any (pure)."""
    return next((dict(o) for o in (obj.get("metadata") or {}).get("ownerReferences") or [] if o.get("controller")),
                None)


def pod_ready(pod: Mapping[str, Any]) -> bool:
    """The pod's Ready condition is True (pure)."""
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def describe_pod(pod: Mapping[str, Any]) -> str:
    s = summarize_pod(pod)
    return (f"pod {s['name']} (uid {(pod.get('metadata') or {}).get('uid', '?')}, owner {s['owner'] or 'none'}): "
            f"{s['phase'] or '?'}, ready={str(s['ready']).lower()}, restarts={s['restarts']}"
            + (f", waiting {s['waiting_reason']}" if s["waiting_reason"] else "")
            + (f", last {s['last_termination']['reason']}" if s["last_termination"] else ""))


def stale_pod(action: ProposedAction, pod: Mapping[str, Any] | None, ref: Ref) -> str | None:
    """Why ``pod`` is no longer the crash-looping pod the finding asked to delete, or None (pure)."""
    p = action.params
    if pod is None:
        return f"pod {ref.name} in namespace {ref.namespace} no longer exists (already replaced or deleted)"
    meta = pod.get("metadata") or {}
    if p.get("uid") and p["uid"] != meta.get("uid"):
        return (f"pod {ref.name} is now uid {meta.get('uid')}, not the {p['uid']} the finding saw: "
                "it was replaced already")
    if meta.get("deletionTimestamp"):
        return f"pod {ref.name} is already being deleted (since {meta['deletionTimestamp']})"
    owner = controller_of(pod)
    if owner is None:
        return f"pod {ref.name} has no controller: deleting it would not replace it"
    s = summarize_pod(pod)
    seen = count(p.get("restarts"))
    if p.get("restarts") and seen is None:
        return f"restarts {p['restarts']!r} is not a count"
    if seen is not None and s["restarts"] < seen:
        return (f"pod {ref.name} has restarted {s['restarts']} times, fewer than the {seen} the finding saw: "
                "it is not the same pod")
    crash_looping = (s["waiting_reason"] or "") == "CrashLoopBackOff"
    if not crash_looping and pod_ready(pod) and s["phase"] == "Running":
        return f"pod {ref.name} is running and ready again ({s['restarts']} restarts): it recovered"
    return None


@dataclass(frozen=True)
class Replicas:
    """A Deployment's spec and status counts as the executors compare them."""

    generation: int
    observed_generation: int
    spec: int
    current: int  # status.replicas: pods of every ReplicaSet
    updated: int
    ready: int
    available: int
    unavailable: int
    paused: bool
    restarted_at: str
    uid: str
    stalled: str  # the Progressing condition's message when its reason is ProgressDeadlineExceeded

    @classmethod
    def of(cls, d: Mapping[str, Any]) -> Replicas:
        meta, spec, st = d.get("metadata") or {}, d.get("spec") or {}, d.get("status") or {}
        want = int(spec["replicas"]) if spec.get("replicas") is not None else 1
        progressing = next((c for c in st.get("conditions") or [] if c.get("type") == "Progressing"), {})
        available = int(st.get("availableReplicas") or 0)
        return cls(generation=int(meta.get("generation") or 0),
                   observed_generation=int(st.get("observedGeneration") or 0),
                   spec=want, current=int(st.get("replicas") or 0), updated=int(st.get("updatedReplicas") or 0),
                   ready=int(st.get("readyReplicas") or 0), available=available,
                   unavailable=int(st["unavailableReplicas"]) if st.get("unavailableReplicas") is not None
                   else max(0, want - available),
                   paused=bool(spec.get("paused")),
                   restarted_at=str((((spec.get("template") or {}).get("metadata") or {}).get("annotations")
                                     or {}).get(RESTARTED_AT, "")),
                   uid=str(meta.get("uid") or ""),
                   stalled=str(progressing.get("message") or "ProgressDeadlineExceeded")
                   if progressing.get("reason") == "ProgressDeadlineExceeded" else "")

    def describe(self) -> str:
        return (f"generation {self.generation} (observed {self.observed_generation}), {self.spec} replicas: "
                f"{self.current} current, {self.updated} updated, {self.ready} ready, {self.available} available, "
                f"{self.unavailable} unavailable" + (f"; restartedAt {self.restarted_at}" if self.restarted_at else "")
                + ("; paused" if self.paused else ""))


def rolled_out(r: Replicas, generation: int) -> bool:
    """The rollout of ``generation`` completed: what ``kubectl rollout status`` waits for (pure)."""
    return (r.observed_generation >= generation and r.updated == r.spec and r.current == r.updated
            and r.available == r.updated)


def scaled(r: Replicas, target: int, generation: int) -> bool:
    """The Deployment runs ``target`` replicas, all ready (pure)."""
    return (r.observed_generation >= generation and r.spec == target and r.ready == target and r.current == target
            and r.available == target)


def stale_restart(action: ProposedAction, d: Mapping[str, Any] | None, ref: Ref,
                  pods: Mapping[str, Mapping[str, Any] | None]) -> str | None:
    """Why the Deployment no longer needs the restart the finding proposed, or None (pure).

    ``pods``: the pods the finding named (params ``pods``), by name, None where gone.
    """
    p = action.params
    if d is None:
        return f"deployment {ref.name} in namespace {ref.namespace} no longer exists"
    r = Replicas.of(d)
    if p.get("uid") and p["uid"] != r.uid:
        return f"deployment {ref.name} is now uid {r.uid}, not the {p['uid']} the finding saw: it was recreated"
    if r.paused:
        return f"deployment {ref.name} is paused: a restart would not roll out"
    observed = parse_time(p.get("observed_at"))
    if p.get("observed_at") and observed is None:
        return f"observed_at {p['observed_at']!r} is not a timestamp with a time zone"
    restarted = parse_time(r.restarted_at)
    if observed is not None and restarted is not None and restarted > observed:
        return f"deployment {ref.name} was restarted at {r.restarted_at}, after the finding observed it"
    if pods:
        unready = [n for n, pod in pods.items() if pod is not None and not pod_ready(pod)]
        if not unready:
            return (f"none of the pods the finding named ({', '.join(sorted(pods))}) is still there and unready: "
                    "they were replaced or recovered")
        return None
    if r.unavailable == 0 and r.ready >= r.spec and r.available >= r.spec:
        return f"all {r.spec} replicas of deployment {ref.name} are ready and available again"
    return None


def named_pods(action: ProposedAction) -> list[str] | str:
    """The params' ``pods`` (comma-separated names), or why they are invalid (pure)."""
    names = [n.strip() for n in (action.params.get("pods") or "").split(",") if n.strip()]
    bad = [n for n in names if not _NAME.match(n)]
    if bad:
        return f"pod name {bad[0][:120]!r} is not a valid Kubernetes name"
    return names[:50]


def restart_patch(at: datetime) -> dict[str, Any]:
    """The strategic-merge patch ``kubectl rollout restart`` sends (pure)."""
    return {"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: rfc3339(at)}}}}}


def scale_target(action: ProposedAction, *, max_replicas: int = MAX_REPLICAS) -> tuple[int, int | None] | str:
    """(target replicas, the count the finding saw or None), or why the params are invalid (pure)."""
    p = action.params
    target = count(p.get("replicas"))
    if target is None:
        return f"replicas {p.get('replicas', '')!r} is not a replica count"
    if target > max_replicas:
        return f"replicas {target} is above the {max_replicas} one action may scale to"
    seen = count(p.get("from_replicas"))
    if p.get("from_replicas") and seen is None:
        return f"from_replicas {p['from_replicas']!r} is not a replica count"
    return target, seen


def stale_scale(d: Mapping[str, Any] | None, ref: Ref, target: int, seen: int | None,
                autoscalers: list[str]) -> str | None:
    """Why the scale the finding proposed no longer applies, or None (pure)."""
    if d is None:
        return f"deployment {ref.name} in namespace {ref.namespace} no longer exists"
    r = Replicas.of(d)
    if seen is not None and r.spec != seen:
        return f"deployment {ref.name} now has {r.spec} replicas, not the {seen} the finding saw"
    if r.spec == target:
        return f"deployment {ref.name} already has {target} replicas"
    if autoscalers:
        return (f"deployment {ref.name} is scaled by HorizontalPodAutoscaler {', '.join(autoscalers)}: "
                "a manual scale would be undone")
    return None


def scale_ops(current: int, target: int) -> list[dict[str, Any]]:
    """JSON patch of a Scale: compare-and-set of spec.replicas (pure)."""
    return [{"op": "test", "path": "/spec/replicas", "value": current},
            {"op": "replace", "path": "/spec/replicas", "value": target}]


# --- the API, as the Job's ServiceAccount -------------------------------------------------------

class Kube:
    """Raw, bounded calls through an ``ApiClient`` (the kubernetes tool's: the Job's ServiceAccount).

    Non-2xx answers raise ``ApiFailure`` (404 on a GET of one object is ``None``).
    """

    def __init__(self, api_client: Any, *, timeout: float = 10.0, max_bytes: int = MAX_BYTES) -> None:
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.core = CoreV1Api(api_client)
        self.apps = AppsV1Api(api_client)
        self.autoscaling = AutoscalingV1Api(api_client)

    async def _call(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        async with asyncio.timeout(self.timeout):
            resp = await call(*args, _preload_content=False, _request_timeout=self.timeout, **kwargs)
            try:
                raw = await read_capped(resp, self.max_bytes)
            finally:
                resp.release()
        body = json.loads(raw) if raw else None
        if not 200 <= resp.status < 300:
            raise ApiFailure(resp.status, body)
        return body

    async def _get(self, call: Callable[..., Any], *args: Any) -> dict[str, Any] | None:
        try:
            return await self._call(call, *args)
        except ApiFailure as exc:
            if exc.status == 404:
                return None
            raise

    async def deployment(self, ref: Ref) -> dict[str, Any] | None:
        return await self._get(self.apps.read_namespaced_deployment, ref.name, ref.namespace)

    async def pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._get(self.core.read_namespaced_pod, name, namespace)

    async def pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        kwargs: dict[str, Any] = {"limit": LIST_LIMIT}
        if selector:
            kwargs["label_selector"] = selector
        body = await self._call(self.core.list_namespaced_pod, namespace, **kwargs)
        return list((body or {}).get("items") or [])

    async def autoscalers_of(self, ref: Ref) -> list[str]:
        """HorizontalPodAutoscalers targeting the Deployment (none if the API does not serve them)."""
        try:
            body = await self._call(self.autoscaling.list_namespaced_horizontal_pod_autoscaler, ref.namespace,
                                    limit=LIST_LIMIT)
        except ApiFailure as exc:
            if exc.status == 404:  # not served (e.g. a minimal API server): nothing can autoscale it
                return []
            raise
        return [h["metadata"]["name"] for h in (body or {}).get("items") or []
                if ((h.get("spec") or {}).get("scaleTargetRef") or {}).get("kind") == "Deployment"
                and ((h.get("spec") or {}).get("scaleTargetRef") or {}).get("name") == ref.name]

    async def restart(self, ref: Ref, at: datetime) -> dict[str, Any]:
        return await self._call(self.apps.patch_namespaced_deployment, ref.name, ref.namespace, restart_patch(at),
                                _content_type="application/strategic-merge-patch+json")

    async def scale(self, ref: Ref, current: int, target: int) -> dict[str, Any]:
        return await self._call(self.apps.patch_namespaced_deployment_scale, ref.name, ref.namespace,
                                scale_ops(current, target), _content_type="application/json-patch+json")

    async def delete_pod(self, namespace: str, name: str, uid: str) -> dict[str, Any]:
        return await self._call(self.core.delete_namespaced_pod, name, namespace,
                                body={"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": {"uid": uid}})


def _failure(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "the API server did not answer in time"
    if isinstance(exc, ApiFailure) and exc.status == 403:
        return f"refused by the API server (the ServiceAccount's RBAC or an admission policy): {exc}"
    return f"{type(exc).__name__}: {str(exc)[:400]}"


async def _until(check: Callable[[], Any], timeout: float) -> bool:
    deadline = time.monotonic() + max(0.0, timeout)
    while True:
        if await check():
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))


# --- the executors ---------------------------------------------------------------------------------

class _Executor:
    action: ClassVar[str]
    kind: ClassVar[str] = "deployment"

    def __init__(self, kube: Kube, *, namespace: str = "default", verify_timeout: float = VERIFY_S,
                 clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)) -> None:
        self.kube = kube
        self.namespace = namespace
        self.verify_timeout = verify_timeout
        self.clock = clock
        self._after: dict[Ref, str] = {}

    def ref(self, action: ProposedAction) -> Ref | str:
        return target_of(action, self.kind, default_namespace=self.namespace)

    def observed_after(self, action: ProposedAction) -> str:
        ref = self.ref(action)
        return self._after.get(ref, "") if isinstance(ref, Ref) else ""


class RestartDeployment(_Executor):
    """``restart_deployment`` through the protocol (see the module docstring)."""

    action: ClassVar[str] = "restart_deployment"
    volatile_params: frozenset[str] = frozenset({"observed_at", "pods", "unavailable"})

    def __init__(self, kube: Kube, **kwargs: Any) -> None:
        super().__init__(kube, **kwargs)
        self._checked: dict[Ref, Replicas] = {}
        self._patched: dict[Ref, int] = {}  # the generation the restart made

    async def precondition(self, action: ProposedAction) -> str | None:
        ref = self.ref(action)
        if isinstance(ref, str):
            return ref
        names = named_pods(action)
        if isinstance(names, str):
            return names
        d = await self.kube.deployment(ref)
        pods = {n: await self.kube.pod(ref.namespace, n) for n in names} if d is not None else {}
        why = stale_restart(action, d, ref, pods)
        if why is None and d is not None:
            self._checked[ref] = Replicas.of(d)
        return why

    async def act(self, action: ProposedAction) -> Execution:
        ref = self.ref(action)
        seen = self._checked.get(ref) if isinstance(ref, Ref) else None
        if not isinstance(ref, Ref) or seen is None:
            return Execution(ok=False, error="the precondition was not checked; not acting")
        at = self.clock()
        before = f"deployment {ref.name}: {seen.describe()}"
        try:
            d = await self.kube.restart(ref, at)
        except (ApiFailure, TimeoutError, OSError, ValueError) as exc:
            return Execution(ok=False, before=before, error=_failure(exc))
        generation = int((d.get("metadata") or {}).get("generation") or 0)
        self._patched[ref] = generation
        return Execution(ok=True, before=before,
                         after=f"annotated the pod template {RESTARTED_AT}={rfc3339(at)} (generation {generation})")

    async def verify(self, action: ProposedAction, *, timeout: float) -> bool:
        ref = self.ref(action)
        if not isinstance(ref, Ref) or ref not in self._patched:
            return False
        generation = self._patched[ref]

        async def done() -> bool:
            d = await self.kube.deployment(ref)
            if d is None:
                self._after[ref] = f"deployment {ref.name} is gone"
                return False
            r = Replicas.of(d)
            ok = rolled_out(r, generation)
            self._after[ref] = (f"deployment {ref.name}: {r.describe()}"
                                + ("; rolled out" if ok else f"; the rollout of generation {generation} "
                                   + (f"stalled: {r.stalled}" if r.stalled else "has not completed")))
            return ok

        return await _until(done, timeout)

    def undo(self, action: ProposedAction, done: Execution) -> str:
        return no_undo("a restart cannot be undone; pods are replaced")


class DeletePod(_Executor):
    """``delete_pod`` through the protocol (see the module docstring)."""

    action: ClassVar[str] = "delete_pod"
    kind: ClassVar[str] = "pod"
    volatile_params: frozenset[str] = frozenset({"observed_at", "restarts"})

    def __init__(self, kube: Kube, **kwargs: Any) -> None:
        super().__init__(kube, **kwargs)
        self._checked: dict[Ref, dict[str, Any]] = {}
        self._siblings: dict[Ref, set[str]] = {}  # uids of the controller's pods before the delete
        self._deleted: dict[Ref, str] = {}

    async def precondition(self, action: ProposedAction) -> str | None:
        ref = self.ref(action)
        if isinstance(ref, str):
            return ref
        pod = await self.kube.pod(ref.namespace, ref.name)
        why = stale_pod(action, pod, ref)
        if why is None and pod is not None:
            self._checked[ref] = pod
        return why

    def _selector(self, pod: Mapping[str, Any]) -> str:
        labels = {k: v for k, v in ((pod.get("metadata") or {}).get("labels") or {}).items()
                  if k not in PER_POD_LABELS}
        return selector_string({"matchLabels": labels})

    async def _of_owner(self, ref: Ref, pod: Mapping[str, Any]) -> list[dict[str, Any]]:
        owner = controller_of(pod) or {}
        found = await self.kube.pods(ref.namespace, self._selector(pod))
        return [p for p in found if (controller_of(p) or {}).get("uid") == owner.get("uid")]

    async def act(self, action: ProposedAction) -> Execution:
        ref = self.ref(action)
        pod = self._checked.get(ref) if isinstance(ref, Ref) else None
        if not isinstance(ref, Ref) or pod is None:
            return Execution(ok=False, error="the precondition was not checked; not acting")
        uid = pod["metadata"]["uid"]
        before = describe_pod(pod)
        try:
            self._siblings[ref] = {p["metadata"]["uid"] for p in await self._of_owner(ref, pod)}
            await self.kube.delete_pod(ref.namespace, ref.name, uid)
        except ApiFailure as exc:
            if exc.status == 409:
                return Execution(ok=False, before=before, error=f"pod {ref.name} was replaced between the check "
                                 f"and the act (uid precondition {uid}): nothing deleted")
            if exc.status == 404:
                return Execution(ok=False, before=before,
                                 error=f"pod {ref.name} disappeared between the check and the act: nothing deleted")
            return Execution(ok=False, before=before, error=_failure(exc))
        except (TimeoutError, OSError, ValueError) as exc:
            return Execution(ok=False, before=before, error=_failure(exc))
        self._deleted[ref] = uid
        return Execution(ok=True, before=before, after=f"deleted pod {ref.name} (uid {uid})")

    async def verify(self, action: ProposedAction, *, timeout: float) -> bool:
        ref = self.ref(action)
        if not isinstance(ref, Ref) or ref not in self._deleted:
            return False
        old, uid = self._checked[ref], self._deleted[ref]
        owner = controller_of(old) or {}

        async def done() -> bool:
            now = await self.kube.pod(ref.namespace, ref.name)
            still = now is not None and now["metadata"].get("uid") == uid
            gone = "is terminating" if still else "is gone"
            if still and not now["metadata"].get("deletionTimestamp"):
                gone = "still exists"
            new = [p for p in await self._of_owner(ref, old)
                   if p["metadata"]["uid"] not in self._siblings.get(ref, set()) | {uid}
                   and not p["metadata"].get("deletionTimestamp")]
            ready = [p for p in new if pod_ready(p)]
            self._after[ref] = (f"pod {ref.name} (uid {uid}) {gone}; {owner.get('kind')}/{owner.get('name')} has "
                                f"{len(new)} new pod(s), {len(ready)} ready"
                                + (": " + ", ".join(describe_pod(p) for p in new[:3]) if new else ""))
            return gone != "still exists" and bool(ready)

        return await _until(done, timeout)

    def undo(self, action: ProposedAction, done: Execution) -> str:
        return no_undo("its controller replaced it")


class ScaleDeployment(_Executor):
    """``scale_deployment`` through the protocol (see the module docstring)."""

    action: ClassVar[str] = "scale_deployment"
    volatile_params: frozenset[str] = frozenset({"observed_at", "from_replicas"})

    def __init__(self, kube: Kube, *, max_replicas: int = MAX_REPLICAS, **kwargs: Any) -> None:
        super().__init__(kube, **kwargs)
        self.max_replicas = max_replicas
        self._checked: dict[Ref, Replicas] = {}
        self._scaled: dict[Ref, tuple[int, int, int]] = {}  # (previous, target, generation)

    async def precondition(self, action: ProposedAction) -> str | None:
        ref = self.ref(action)
        if isinstance(ref, str):
            return ref
        want = scale_target(action, max_replicas=self.max_replicas)
        if isinstance(want, str):
            return want
        d = await self.kube.deployment(ref)
        hpas = await self.kube.autoscalers_of(ref) if d is not None else []
        why = stale_scale(d, ref, want[0], want[1], hpas)
        if why is None and d is not None:
            self._checked[ref] = Replicas.of(d)
        return why

    async def act(self, action: ProposedAction) -> Execution:
        ref = self.ref(action)
        seen = self._checked.get(ref) if isinstance(ref, Ref) else None
        want = scale_target(action, max_replicas=self.max_replicas)
        if not isinstance(ref, Ref) or seen is None or isinstance(want, str):
            return Execution(ok=False, error="the precondition was not checked; not acting")
        target = want[0]
        before = f"deployment {ref.name}: replicas={seen.spec} ({seen.ready} ready)"
        undo = f"kubectl -n {ref.namespace} scale deployment/{ref.name} --replicas={seen.spec}"
        try:
            await self.kube.scale(ref, seen.spec, target)
            d = await self.kube.deployment(ref)
        except ApiFailure as exc:
            if exc.status == 422:  # the JSON patch's test failed, or the count was refused
                now = await self._replicas(ref)
                if now is not None and now != seen.spec:
                    return Execution(ok=False, before=before, error=(
                        f"deployment {ref.name}'s replica count changed from {seen.spec} to {now} between the "
                        "check and the act: not scaled"))
            return Execution(ok=False, before=before, error=_failure(exc))
        except (TimeoutError, OSError, ValueError) as exc:
            return Execution(ok=False, before=before, error=_failure(exc))
        generation = int(((d or {}).get("metadata") or {}).get("generation") or 0)
        self._scaled[ref] = (seen.spec, target, generation)
        return Execution(ok=True, before=before, after=f"scaled deployment {ref.name} from {seen.spec} to {target} "
                         f"replicas (generation {generation})", undo=undo)

    async def _replicas(self, ref: Ref) -> int | None:
        try:
            d = await self.kube.deployment(ref)
        except (ApiFailure, TimeoutError, OSError, ValueError):
            return None
        return Replicas.of(d).spec if d is not None else None

    async def verify(self, action: ProposedAction, *, timeout: float) -> bool:
        ref = self.ref(action)
        if not isinstance(ref, Ref) or ref not in self._scaled:
            return False
        _, target, generation = self._scaled[ref]

        async def done() -> bool:
            d = await self.kube.deployment(ref)
            if d is None:
                self._after[ref] = f"deployment {ref.name} is gone"
                return False
            r = Replicas.of(d)
            ok = scaled(r, target, generation)
            self._after[ref] = f"deployment {ref.name}: {r.describe()}" + (
                f"; {target} replicas ready" if ok else f"; not yet {target} ready replicas")
            return ok

        return await _until(done, timeout)

    def undo(self, action: ProposedAction, done: Execution) -> str:
        ref = self.ref(action)
        if isinstance(ref, Ref) and ref in self._scaled:
            return f"kubectl -n {ref.namespace} scale deployment/{ref.name} --replicas={self._scaled[ref][0]}"
        return done.undo


class ForbiddenByPolicy(_Executor):
    """An action the agentjobs admission policy refuses every agent: fails, naming why and what to run instead."""

    volatile_params: frozenset[str] = frozenset({"observed_at"})
    verify_timeout = 0.0
    what: ClassVar[str]

    def instead(self, ref: Ref, action: ProposedAction) -> str:
        raise NotImplementedError

    async def precondition(self, action: ProposedAction) -> str | None:
        ref = self.ref(action)
        return ref if isinstance(ref, str) else None  # nothing to re-check: it will not act

    async def act(self, action: ProposedAction) -> Execution:
        ref = self.ref(action)
        where = f" ({ref})" if isinstance(ref, Ref) else ""
        command = f"; an operator can run: {self.instead(ref, action)}" if isinstance(ref, Ref) else ""
        return Execution(ok=False, error=(
            f"not allowed by the agentjobs admission policy ({POLICY}): {self.what} changes the Deployment's pod "
            f"template{where}, and agents may change only the annotation {RESTARTED_AT}; nothing was sent "
            f"to the API server{command}"))

    async def verify(self, action: ProposedAction, *, timeout: float) -> bool:
        return False

    def undo(self, action: ProposedAction, done: Execution) -> str:
        return ""


class RolloutUndo(ForbiddenByPolicy):
    action: ClassVar[str] = "rollout_undo"
    what: ClassVar[str] = "a rollback"

    def instead(self, ref: Ref, action: ProposedAction) -> str:
        revision = count(action.params.get("to_revision"))
        return (f"kubectl -n {ref.namespace} rollout undo deployment/{ref.name}"
                + (f" --to-revision={revision}" if revision else ""))


class RaiseMemoryLimit(ForbiddenByPolicy):
    action: ClassVar[str] = "raise_memory_limit"
    what: ClassVar[str] = "raising a memory limit"

    def instead(self, ref: Ref, action: ProposedAction) -> str:
        container = action.params.get("container", "")
        container = container if _NAME.match(container or "-") else ""
        memory = action.params.get("memory", "")
        memory = memory if re.fullmatch(r"[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|K|M|G|T)?", memory or "") else "<limit>"
        return (f"kubectl -n {ref.namespace} set resources deployment/{ref.name}"
                + (f" -c {container}" if container else "") + f" --limits=memory={memory}")


EXECUTORS = (RestartDeployment, DeletePod, ScaleDeployment, RolloutUndo, RaiseMemoryLimit)


def executors(api_client: Any, *, namespace: str = "default", timeout: float = 10.0,
              verify_timeout: float = VERIFY_S) -> dict[str, Any]:
    """The Kubernetes executors, by action name, acting through ``api_client`` (the kubernetes tool's)."""
    kube = Kube(api_client, timeout=timeout)
    return {cls.action: cls(kube, namespace=namespace, verify_timeout=verify_timeout) for cls in EXECUTORS}
