"""The ``kubernetes`` tool: read-only views of a workload — pods, events, rollouts.

Uses a given kubernetes_asyncio ``ApiClient`` (the agent's ServiceAccount, whose
RBAC is the real limit of what it can read) and only ever GETs. Answers are read
raw (``_preload_content=False``) so the byte bound is real and no model objects
are built: at most ``max_bytes`` per answer, list requests carry ``limit``, and
each call is bounded by ``Limits.timeout``. A 403 or 404 is a failed
observation naming the object, which is evidence too (e.g. the phase's RBAC
does not reach that namespace).

How a workload name finds its pods: the Deployment's ``spec.selector`` when a
Deployment of that name exists, else pods labelled ``app.kubernetes.io/name``,
``app``, ``app.kubernetes.io/instance`` or ``job-name`` equal to the name, or
whose name starts with ``<name>-``.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.parse import quote

import aiohttp
from kubernetes_asyncio.client import ApiClient, AppsV1Api, CoreV1Api

from schemas import utcnow

from .base import Limits, Observation, OperationSpec, bounded
from .toolbox import (
    BodyTooLarge,
    ParamError,
    describe_error,
    failure,
    read_capped,
    require,
    unknown_operation,
)

LIST_LIMIT = 500  # objects asked for per list request when the tool filters or sorts them itself
MESSAGE_CHARS = 300  # characters of an event/termination message kept
REVISION = "deployment.kubernetes.io/revision"
_OBJECT_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._:-]{0,251}[A-Za-z0-9])?$")
WORKLOAD_LABELS = ("app.kubernetes.io/name", "app", "app.kubernetes.io/instance", "job-name")

_NS = {"type": "string", "description": "namespace (default: the tool's namespace)"}
OPERATIONS: dict[str, OperationSpec] = {
    "pods": OperationSpec(
        name="pods",
        description="Pods of a workload (by label selector or workload/Deployment name; neither: the whole "
                    "namespace, failing pods first): phase, readiness, "
                    "restarts, waiting reason such as CrashLoopBackOff, last termination such as OOMKilled "
                    "with exit code.",
        parameters={"type": "object", "additionalProperties": False,
                    "properties": {"namespace": _NS,
                                   "selector": {"type": "string", "description": "label selector, e.g. app=checkout"},
                                   "workload": {"type": "string", "description": "workload (Deployment) name"}}},
    ),
    "events": OperationSpec(
        name="events",
        description="Recent events in a namespace, newest first, optionally only those about one object "
                    "(exact name) or objects whose name starts with a prefix, or only Warnings.",
        parameters={"type": "object", "additionalProperties": False,
                    "properties": {"namespace": _NS,
                                   "involved_object": {"type": "string", "description": "exact object name"},
                                   "name_prefix": {"type": "string", "description": "object name prefix"},
                                   "kind": {"type": "string", "description": "object kind, e.g. Pod"},
                                   "type": {"type": "string", "enum": ["Normal", "Warning"]}}},
    ),
    "rollouts": OperationSpec(
        name="rollouts",
        description="A Deployment's status and its ReplicaSets by revision, newest first, with creation time "
                    "and images: what was rolled out recently.",
        parameters={"type": "object", "required": ["deployment"], "additionalProperties": False,
                    "properties": {"namespace": _NS, "deployment": {"type": "string"}}},
    ),
}


class ApiFailure(Exception):
    """A non-2xx answer; the message is the Status reason and message."""

    def __init__(self, status: int, body: Any) -> None:
        self.status = status
        reason = message = ""
        if isinstance(body, dict):
            reason, message = str(body.get("reason", "")), str(body.get("message", ""))
        super().__init__(f"HTTP {status} {reason}: {message}".strip(": "))


def _unhealthy_first(pod: Mapping[str, Any]) -> tuple[bool, int]:
    """Sort key of raw pods: not ready before ready, more restarts first (pure)."""
    status = pod.get("status") or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    restarts = sum(int(c.get("restartCount") or 0) for c in status.get("containerStatuses") or [])
    return ready, -restarts


def selector_string(selector: Mapping[str, Any] | None) -> str:
    """A ``metav1.LabelSelector`` (matchLabels/matchExpressions) as a label selector string."""
    selector = selector or {}
    terms = [f"{k}={v}" for k, v in sorted((selector.get("matchLabels") or {}).items())]
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key", ""), expr.get("operator", ""), expr.get("values") or []
        if op == "In":
            terms.append(f"{key} in ({','.join(values)})")
        elif op == "NotIn":
            terms.append(f"{key} notin ({','.join(values)})")
        elif op == "Exists":
            terms.append(key)
        elif op == "DoesNotExist":
            terms.append(f"!{key}")
    return ",".join(terms)


def summarize_pod(pod: Mapping[str, Any]) -> dict[str, Any]:
    """What an SRE reads off a pod's status (pure)."""
    meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
    containers = []
    last: dict[str, Any] | None = None
    for cs in status.get("containerStatuses") or []:
        state, last_state = cs.get("state") or {}, cs.get("lastState") or {}
        current = next(iter(state), "")
        detail = state.get(current) or {}
        entry = {"name": cs.get("name"), "image": cs.get("image"), "ready": bool(cs.get("ready")),
                 "restarts": int(cs.get("restartCount") or 0), "state": current,
                 "reason": detail.get("reason"), "exit_code": detail.get("exitCode"),
                 "last_reason": (last_state.get("terminated") or {}).get("reason"),
                 "last_exit_code": (last_state.get("terminated") or {}).get("exitCode")}
        containers.append(entry)
        for term in (state.get("terminated"), last_state.get("terminated")):
            if term and (last is None or (term.get("finishedAt") or "") > (last.get("finished_at") or "")):
                last = {"container": cs.get("name"), "reason": term.get("reason"), "exit_code": term.get("exitCode"),
                        "finished_at": term.get("finishedAt"),
                        "message": (term.get("message") or "")[:MESSAGE_CHARS] or None}
    waiting = next((c["reason"] for c in containers if c["state"] == "waiting" and c["reason"]), None)
    owner = next((f"{o.get('kind')}/{o.get('name')}" for o in meta.get("ownerReferences") or []
                  if o.get("controller")), None)
    return {
        "name": meta.get("name"), "uid": meta.get("uid"), "phase": status.get("phase"),
        "reason": status.get("reason"),
        "ready": bool(containers) and all(c["ready"] for c in containers),
        "restarts": sum(c["restarts"] for c in containers), "waiting_reason": waiting,
        "last_termination": last, "node": spec.get("nodeName"), "started_at": status.get("startTime"),
        "owner": owner, "deleting": bool(meta.get("deletionTimestamp")), "containers": containers,
    }


def _event_time(ev: Mapping[str, Any]) -> str:
    return (ev.get("lastTimestamp") or (ev.get("series") or {}).get("lastObservedTime") or ev.get("eventTime")
            or (ev.get("metadata") or {}).get("creationTimestamp") or "")


def _images(template_or_pod_spec: Mapping[str, Any]) -> list[str]:
    return [c.get("image", "") for c in template_or_pod_spec.get("containers") or []]


def _revision(obj: Mapping[str, Any]) -> int:
    try:
        return int(((obj.get("metadata") or {}).get("annotations") or {}).get(REVISION, 0))
    except (TypeError, ValueError):
        return 0


class KubernetesTool:
    """Read-only pods/events/rollouts through ``api_client``."""

    name: ClassVar[str] = "kubernetes"
    credential_domain: ClassVar[str | None] = None

    def __init__(self, api_client: ApiClient, *, limits: Limits | None = None, namespace: str = "default",
                 owns_client: bool = False) -> None:
        self.limits = limits or Limits()
        self.namespace = namespace
        self._client = api_client
        self._owns_client = owns_client
        self._core = CoreV1Api(api_client)
        self._apps = AppsV1Api(api_client)

    @property
    def api_client(self) -> ApiClient:
        """The ApiClient this tool reads with (the Job's ServiceAccount); the remediation executors act
        through it too. Closed by ``close`` when the tool owns it: never close it elsewhere."""
        return self._client

    def operations(self) -> Mapping[str, OperationSpec]:
        return OPERATIONS

    async def close(self) -> None:
        """Close the ApiClient if this tool was given it to own (else its owner closes it)."""
        if self._owns_client:
            await self._client.close()

    async def run(self, operation: str, params: Mapping[str, Any]) -> Observation:
        if operation not in OPERATIONS:
            return unknown_operation(self.name, operation, OPERATIONS)
        asked: list[str] = []  # the API requests made, for the observation's query
        try:
            namespace = _name(params, "namespace") or self.namespace
            async with asyncio.timeout(self.limits.timeout):
                data, excerpt, truncated = await getattr(self, f"_{operation}")(asked, namespace, params)
        except ParamError as exc:
            return failure(self.name, operation, "; ".join(asked), f"invalid parameters: {exc}")
        except (TimeoutError, ApiFailure, BodyTooLarge, aiohttp.ClientError, OSError, ValueError) as exc:
            return failure(self.name, operation, "; ".join(asked), describe_error(exc, self.limits.timeout))
        return Observation(tool=self.name, operation=operation, query="; ".join(asked), ok=True, at=utcnow(),
                           data=data, excerpt=bounded(excerpt), truncated=truncated)

    # -- HTTP ------------------------------------------------------------------------------

    async def _get(self, asked: list[str], shown: str, call: Any, *args: Any, **kwargs: Any) -> Any:
        """Call a kubernetes_asyncio GET method raw; JSON body or ``ApiFailure``/``BodyTooLarge``."""
        asked.append(shown)
        resp = await call(*args, _preload_content=False, _request_timeout=self.limits.timeout, **kwargs)
        try:
            raw = await read_capped(resp, self.limits.max_bytes)
        finally:
            resp.release()
        body = json.loads(raw) if raw else None
        if not 200 <= resp.status < 300:
            raise ApiFailure(resp.status, body)
        return body

    async def _list(self, asked: list[str], path: str, call: Any, namespace: str, *, limit: int,
                    label_selector: str = "", field_selector: str = "") -> tuple[list[dict[str, Any]], bool]:
        query = "&".join(f"{k}={quote(v)}" for k, v in (("labelSelector", label_selector),
                                                       ("fieldSelector", field_selector)) if v)
        kwargs: dict[str, Any] = {"limit": limit}
        if label_selector:
            kwargs["label_selector"] = label_selector
        if field_selector:
            kwargs["field_selector"] = field_selector
        body = await self._get(asked, f"GET {path}" + (f"?{query}" if query else ""), call, namespace, **kwargs)
        more = bool((body.get("metadata") or {}).get("continue"))
        return list(body.get("items") or []), more

    async def _deployment(self, asked: list[str], namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self._get(asked, f"GET /apis/apps/v1/namespaces/{namespace}/deployments/{name}",
                                   self._apps.read_namespaced_deployment, name, namespace)
        except ApiFailure as exc:
            if exc.status == 404:
                return None
            raise

    # -- operations: each returns (data, excerpt, truncated) ------------------------------

    async def _pods(self, asked: list[str], namespace: str, params: Mapping[str, Any]) -> tuple[Any, str, bool]:
        selector, workload = params.get("selector"), params.get("workload")
        path = f"/api/v1/namespaces/{namespace}/pods"
        rows = self.limits.max_rows
        matched_by = "selector"
        if not selector and not workload:  # the whole namespace: whichever pods in it are failing come first
            matched_by = "namespace"
            pods, more = await self._list(asked, path, self._core.list_namespaced_pod, namespace, limit=LIST_LIMIT)
            pods.sort(key=_unhealthy_first)
            more = more or len(pods) > rows
            pods = pods[:rows]
        elif selector:
            pods, more = await self._list(asked, path, self._core.list_namespaced_pod, namespace, limit=rows,
                                          label_selector=str(selector))
        else:
            workload = _name(params, "workload")
            deployment = await self._deployment(asked, namespace, workload)
            selector = selector_string(((deployment or {}).get("spec") or {}).get("selector"))
            if deployment is not None and selector:
                matched_by = "deployment"
                pods, more = await self._list(asked, path, self._core.list_namespaced_pod, namespace, limit=rows,
                                              label_selector=selector)
            else:
                matched_by, selector = "labels-or-name", None
                everything, more = await self._list(asked, path, self._core.list_namespaced_pod, namespace,
                                                    limit=LIST_LIMIT)
                pods = [p for p in everything if _belongs(p, workload)]
                more = more or len(pods) > rows
                pods = pods[:rows]
        summaries = [summarize_pod(p) for p in pods]
        summaries.sort(key=lambda p: (p["ready"], -p["restarts"], p["name"] or ""))
        data = {"namespace": namespace, "selector": selector, "matched_by": matched_by,
                "total": len(summaries), "pods": summaries}
        not_ready = sum(not p["ready"] for p in summaries)
        reasons: dict[str, int] = {}
        for p in summaries:
            for why in {p["waiting_reason"], (p["last_termination"] or {}).get("reason"), p["reason"]} - {None}:
                reasons[why] = reasons.get(why, 0) + 1
        lines = [f"{len(summaries)} pods in {namespace} ({matched_by}: {selector or workload or 'all'}); "
                 f"not ready {not_ready}; "
                 f"restarts {sum(p['restarts'] for p in summaries)}"
                 + ("; " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())) if reasons else "")]
        for p in summaries[:30]:
            term = p["last_termination"]
            lines.append(f"{p['name']} {p['phase']} ready={str(p['ready']).lower()} restarts={p['restarts']}"
                         + (f" waiting={p['waiting_reason']}" if p["waiting_reason"] else "")
                         + (f" last={term['reason']} exit {term['exit_code']} at {term['finished_at']}"
                            if term else ""))
        return data, "\n".join(lines), more

    async def _events(self, asked: list[str], namespace: str, params: Mapping[str, Any]) -> tuple[Any, str, bool]:
        fields = []
        for key in ("involved_object", "kind", "type"):  # these go into the field selector
            _name(params, key)
        if params.get("involved_object"):
            fields.append(f"involvedObject.name={params['involved_object']}")
        if params.get("kind"):
            fields.append(f"involvedObject.kind={params['kind']}")
        if params.get("type"):
            fields.append(f"type={params['type']}")
        items, more = await self._list(asked, f"/api/v1/namespaces/{namespace}/events",
                                       self._core.list_namespaced_event, namespace, limit=LIST_LIMIT,
                                       field_selector=",".join(fields))
        prefix = params.get("name_prefix")
        if prefix:
            items = [e for e in items if str((e.get("involvedObject") or {}).get("name", "")).startswith(str(prefix))]
        items.sort(key=_event_time, reverse=True)
        kept = items[: self.limits.max_rows]
        events = [{
            "type": e.get("type"), "reason": e.get("reason"), "message": (e.get("message") or "")[:MESSAGE_CHARS],
            "object": f"{(e.get('involvedObject') or {}).get('kind')}/{(e.get('involvedObject') or {}).get('name')}",
            "count": int(e.get("count") or (e.get("series") or {}).get("count") or 1),
            "last_seen": _event_time(e), "first_seen": e.get("firstTimestamp") or e.get("eventTime"),
            "source": (e.get("source") or {}).get("component") or e.get("reportingComponent"),
        } for e in kept]
        data = {"namespace": namespace, "total": len(items), "events": events}
        warnings = sum(e["type"] == "Warning" for e in events)
        lines = [f"{len(items)} events in {namespace}" + (f", {warnings} Warning among the newest {len(events)}"
                                                          if events else "")]
        lines += [f"{e['last_seen']} {e['type']} {e['reason']} {e['object']} x{e['count']}: {e['message']}"
                  for e in events[:30]]
        return data, "\n".join(lines), more or len(items) > len(kept)

    async def _rollouts(self, asked: list[str], namespace: str, params: Mapping[str, Any]) -> tuple[Any, str, bool]:
        name = _name(params, "deployment") or str(require(params, "deployment"))
        deployment = await self._deployment(asked, namespace, name)
        if deployment is None:
            raise ApiFailure(404, {"reason": "NotFound", "message": f'deployments.apps "{name}" not found'})
        spec, status, meta = deployment.get("spec") or {}, deployment.get("status") or {}, deployment["metadata"]
        selector = selector_string(spec.get("selector"))
        items, more = await self._list(asked, f"/apis/apps/v1/namespaces/{namespace}/replicasets",
                                       self._apps.list_namespaced_replica_set, namespace, limit=LIST_LIMIT,
                                       label_selector=selector)
        uid = meta.get("uid")
        owned = [rs for rs in items if any(o.get("uid") == uid for o in (rs["metadata"].get("ownerReferences") or []))]
        owned.sort(key=lambda rs: (_revision(rs), rs["metadata"].get("creationTimestamp") or ""), reverse=True)
        current = _revision(deployment)
        replica_sets = [{
            "name": rs["metadata"]["name"], "revision": _revision(rs),
            "created": rs["metadata"].get("creationTimestamp"),
            "images": _images(((rs.get("spec") or {}).get("template") or {}).get("spec") or {}),
            "replicas": int((rs.get("spec") or {}).get("replicas") or 0),
            "ready_replicas": int((rs.get("status") or {}).get("readyReplicas") or 0),
            "available_replicas": int((rs.get("status") or {}).get("availableReplicas") or 0),
            "current": _revision(rs) == current and current > 0,
        } for rs in owned[: self.limits.max_rows]]
        summary = {
            "name": name, "namespace": namespace, "revision": current, "generation": meta.get("generation"),
            "observed_generation": status.get("observedGeneration"),
            "replicas": int(spec.get("replicas") if spec.get("replicas") is not None else 1),
            "updated_replicas": int(status.get("updatedReplicas") or 0),
            "ready_replicas": int(status.get("readyReplicas") or 0),
            "available_replicas": int(status.get("availableReplicas") or 0),
            "unavailable_replicas": int(status.get("unavailableReplicas") or 0),
            "images": _images(((spec.get("template") or {}).get("spec")) or {}),
            "conditions": [{"type": c.get("type"), "status": c.get("status"), "reason": c.get("reason"),
                            "message": (c.get("message") or "")[:MESSAGE_CHARS],
                            "last_update": c.get("lastUpdateTime") or c.get("lastTransitionTime")}
                           for c in status.get("conditions") or []],
        }
        data = {"deployment": summary, "total": len(owned), "replica_sets": replica_sets}
        lines = [f"deployment {namespace}/{name} revision {current}: {summary['ready_replicas']}/{summary['replicas']} "
                 f"ready, {summary['updated_replicas']} updated, {summary['unavailable_replicas']} unavailable; "
                 f"images {', '.join(summary['images'])}"]
        lines += [f"revision {rs['revision']} {rs['name']} created {rs['created']} replicas {rs['replicas']} "
                  f"ready {rs['ready_replicas']}{' (current)' if rs['current'] else ''}: {', '.join(rs['images'])}"
                  for rs in replica_sets[:20]]
        return data, "\n".join(lines), more or len(owned) > len(replica_sets)


def _name(params: Mapping[str, Any], key: str) -> str:
    """An object name/kind parameter, checked: alert labels are untrusted and end up in paths and selectors."""
    value = params.get(key)
    if value is None or value == "":
        return ""
    text = str(value)
    if not _OBJECT_NAME.match(text):
        raise ParamError(f"{key} {text[:80]!r} is not a valid Kubernetes name")
    return text


def _belongs(pod: Mapping[str, Any], workload: str) -> bool:
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    return any(labels.get(k) == workload for k in WORKLOAD_LABELS) or str(meta.get("name", "")).startswith(
        workload + "-")
