"""The API verbs over stored objects — create, get, list, replace, patch, delete — free of HTTP.

The server parses requests and calls these; the Job controller and kubelet
use the same paths (so pods the controller creates get the same defaulting
and admission as pods a client creates).
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import TYPE_CHECKING, Any

import yaml

from . import admission, defaults, status, validation
from . import patch as patching
from .jsoncopy import clone
from .resources import (
    CONFIGMAPS,
    DEPLOYMENTS,
    EVENTS,
    JOBS,
    NAMESPACES,
    PODS,
    REPLICASETS,
    RESOURCEQUOTAS,
    SECRETS,
    SERVICEACCOUNTS,
    ResourceType,
)
from .selectors import FieldSelector, LabelSelector, labels_of

if TYPE_CHECKING:
    from .cluster import Cluster

SERVER_SET_META = ("uid", "resourceVersion", "creationTimestamp", "deletionTimestamp",
                   "deletionGracePeriodSeconds", "generation", "managedFields", "selfLink")
HAS_STATUS = {JOBS.plural, PODS.plural, NAMESPACES.plural, RESOURCEQUOTAS.plural, DEPLOYMENTS.plural,
              REPLICASETS.plural}
GENERATED = (JOBS, DEPLOYMENTS, REPLICASETS)  # metadata.generation counts their spec changes
PLACEHOLDER_CA = ("-----BEGIN CERTIFICATE-----\n"
                  "TUlJQkVtdWxhdG9yUGxhY2Vob2xkZXJOb3RBUmVhbENlcnRpZmljYXRl\n"
                  "-----END CERTIFICATE-----\n")


class Api:
    def __init__(self, cluster: "Cluster") -> None:
        self.cluster = cluster
        self.store = cluster.store

    # -- create --------------------------------------------------------------------------
    def _check_type(self, rt: ResourceType, obj: Any) -> dict:
        if not isinstance(obj, dict):
            raise status.bad_request("the object provided is unrecognized (must be of type "
                                     f"{rt.kind})")
        if obj.get("apiVersion") not in (None, rt.api_version) or obj.get("kind") not in (
                None, rt.kind):
            raise status.bad_request(
                f"the API version in the data ({obj.get('apiVersion')}) does not match the "
                f"expected API version ({rt.api_version})"
                if obj.get("apiVersion") != rt.api_version else
                f"the kind in the data ({obj.get('kind')}) does not match the expected kind "
                f"({rt.kind})")
        return clone(obj)

    def require_namespace(self, namespace: str) -> None:
        if self.store.get(NAMESPACES, None, namespace) is None:
            raise status.not_found(NAMESPACES, namespace)

    def create(self, rt: ResourceType, namespace: str | None, body: Any,
               dry_run: bool = False) -> dict:
        obj = self._check_type(rt, body)
        meta = obj.setdefault("metadata", {})
        if rt.namespaced:
            if meta.get("namespace") and meta["namespace"] != namespace:
                raise status.bad_request("the namespace of the provided object does not match "
                                         "the namespace sent on the request")
            meta["namespace"] = namespace
            self.require_namespace(namespace)
        else:
            meta.pop("namespace", None)
        for f in SERVER_SET_META:
            meta.pop(f, None)
        defaults.generate_name(meta)
        if rt.plural in HAS_STATUS:
            obj.pop("status", None)
        meta["uid"] = str(uuid.uuid4())
        self._default_and_validate(rt, obj)
        if rt in GENERATED:
            meta["generation"] = 1
        if rt.plural in HAS_STATUS:
            obj.setdefault("status", {})
        if rt.namespaced:
            admission.check_quota(self.store, rt, namespace, meta.get("name", ""))
        if dry_run:
            return obj
        created = self.store.create(rt, obj)
        if rt is NAMESPACES:
            self._populate_namespace(meta["name"])
        return created

    def _default_and_validate(self, rt: ResourceType, obj: dict) -> None:
        meta = obj["metadata"]
        if rt is JOBS:
            if meta.get("name"):
                defaults.job(obj)
            validation.job(obj)
        elif rt is PODS:
            sa_name = (obj.get("spec") or {}).get("serviceAccountName") or (
                obj.get("spec") or {}).get("serviceAccount") or "default"
            sa = self.store.get(SERVICEACCOUNTS, meta["namespace"], sa_name)
            if sa is None:
                raise status.ApiError(status.status(
                    403, "Forbidden", f'pods "{meta.get("name", "")}" is forbidden: error looking '
                    f'up service account {meta["namespace"]}/{sa_name}: serviceaccount '
                    f'"{sa_name}" not found', {"name": meta.get("name", ""), "kind": "pods"}))
            defaults.pod(obj, sa.get("automountServiceAccountToken", True))
            validation.pod(obj)
        elif rt is SECRETS:
            defaults.secret(obj)
            validation.secret(obj)
        elif rt is NAMESPACES:
            if meta.get("name"):
                defaults.namespace(obj)
            validation.generic(rt, obj)
        elif rt is EVENTS:
            defaults.event(obj, self.store.clock.time())
            validation.generic(rt, obj)
        elif rt is RESOURCEQUOTAS:
            validation.generic(rt, obj)
            obj["status"] = admission.quota_status(self.store, {**obj, "metadata": meta})
        else:
            validation.generic(rt, obj)

    def _populate_namespace(self, ns: str) -> None:
        """What the SA and root-CA controllers create in every namespace."""
        if self.store.get(SERVICEACCOUNTS, ns, "default") is None:
            self.store.create(SERVICEACCOUNTS, {"metadata": {"name": "default", "namespace": ns}})
        if self.store.get(CONFIGMAPS, ns, "kube-root-ca.crt") is None:
            self.store.create(CONFIGMAPS, {
                "metadata": {"name": "kube-root-ca.crt", "namespace": ns, "annotations": {
                    "kubernetes.io/description": "Contains a CA bundle that can be used to "
                    "verify the kube-apiserver when using internal endpoints such as the "
                    "internal service IP or kubernetes.default.svc. No other usage is "
                    "guaranteed across distributions of Kubernetes clusters."}},
                "data": {"ca.crt": PLACEHOLDER_CA}})

    # -- read ----------------------------------------------------------------------------
    def get(self, rt: ResourceType, namespace: str | None, name: str) -> dict:
        obj = self.store.get(rt, namespace, name)
        if obj is None:
            raise status.not_found(rt, name)
        return obj

    def list(self, rt: ResourceType, namespace: str | None, labels: LabelSelector,
             fields: FieldSelector, limit: int | None = None,
             continue_token: str | None = None) -> dict:
        if namespace is not None and rt.namespaced:
            pass  # listing in a missing namespace is an empty list, as in real clusters
        items = [o for o in self.store.list(rt, namespace)
                 if labels.matches(labels_of(o)) and fields.matches(o)]
        rv = self.store.resource_version
        start = 0
        if continue_token:
            try:
                token = json.loads(base64.urlsafe_b64decode(continue_token))
                start, rv = int(token["start"]), int(token["rv"])
            except (ValueError, KeyError, TypeError):
                raise status.bad_request("continue key is not valid: illegal base64 data")
            if rv < self.store.oldest_resumable:
                raise status.ApiError(status.status(
                    410, "Expired", "The provided continue parameter is too old to display a "
                    "consistent list result. You can start a new list without the continue "
                    "parameter."))
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        page = items[start:]
        if limit and limit > 0 and len(page) > limit:
            page = page[:limit]
            meta["continue"] = base64.urlsafe_b64encode(json.dumps(
                {"start": start + limit, "rv": rv}).encode()).decode()
            meta["remainingItemCount"] = len(items) - start - limit
        for item in page:  # list items carry no kind/apiVersion, as from a real apiserver
            item.pop("kind", None)
            item.pop("apiVersion", None)
        return {"kind": f"{rt.kind}List", "apiVersion": rt.api_version, "metadata": meta,
                "items": page}

    # -- update --------------------------------------------------------------------------
    def replace(self, rt: ResourceType, namespace: str | None, name: str, body: Any,
                subresource: str | None = None) -> dict:
        current = self.get(rt, namespace, name)
        new = self._check_type(rt, body)
        new_meta = new.setdefault("metadata", {})
        if new_meta.get("name") and new_meta["name"] != name:
            raise status.bad_request(f"the name of the object ({new_meta['name']}) does not "
                                     f"match the name on the URL ({name})")
        expect = new_meta.get("resourceVersion") or None
        return self.save(rt, current, new, subresource, expect)

    def save(self, rt: ResourceType, current: dict, new: dict, subresource: str | None = None,
             expect_rv: str | None = None) -> dict:
        """Write `new` over `current`, honouring the status subresource split."""
        new = clone(new)
        if subresource == "status":
            merged = clone(current)
            merged["status"] = new.get("status") or {}
        else:
            merged = new
            merged["metadata"] = {**new.get("metadata", {})}
            for f in SERVER_SET_META:
                if f in current["metadata"]:
                    merged["metadata"][f] = current["metadata"][f]
                else:
                    merged["metadata"].pop(f, None)
            merged["metadata"]["name"] = current["metadata"]["name"]
            if current["metadata"].get("namespace"):
                merged["metadata"]["namespace"] = current["metadata"]["namespace"]
            if rt.plural in HAS_STATUS:
                if "status" in current:
                    merged["status"] = current["status"]
                else:
                    merged.pop("status", None)
            if rt in GENERATED and merged.get("spec") != current.get("spec"):
                merged["metadata"]["generation"] = current["metadata"].get("generation", 1) + 1
            if rt is JOBS:
                validation.job_update(current, merged)
            elif rt is SECRETS:
                defaults.secret(merged)
                validation.secret(merged)
            else:
                validation.generic(rt, merged)
        updated = self.store.update(rt, merged, expect_rv=expect_rv)
        done = self.cluster.gc._finish_if_done(rt, updated)
        return done or updated

    def patch(self, rt: ResourceType, namespace: str | None, name: str, raw: bytes,
              content_type: str, subresource: str | None, field_manager: str | None,
              dry_run: bool = False) -> tuple[int, dict]:
        ctype = content_type.split(";")[0].strip().lower()
        try:
            body = (yaml.safe_load(raw) if ctype == "application/apply-patch+yaml"
                    else json.loads(raw or b"null"))
        except (ValueError, yaml.YAMLError) as exc:
            raise status.bad_request(f"error decoding patch: {exc}")
        current = self.store.get(rt, namespace, name)
        # Like the real server: a resourceVersion inside a merge/strategic patch is a precondition.
        wanted_rv = (body.get("metadata") or {}).get("resourceVersion") if isinstance(body, dict) else None
        if (current is not None and wanted_rv is not None and ctype != "application/apply-patch+yaml"
                and str(wanted_rv) != current["metadata"]["resourceVersion"]):
            raise status.conflict(rt, name)
        if ctype == "application/apply-patch+yaml":
            if not field_manager:
                raise status.ApiError(status.status(
                    422, "Invalid", 'PatchOptions.meta.k8s.io "" is invalid: fieldManager: '
                    'Required value: is required for apply patch'))
            if current is None:
                body = self._check_type(rt, body)
                body.setdefault("metadata", {})["name"] = name
                return 201, self.create(rt, namespace, body, dry_run)
            patched = patching.strategic_merge(current, body)
        elif current is None:
            raise status.not_found(rt, name)
        else:
            patched = apply_patch(current, body, ctype, PATCH_TYPES)
        if dry_run:
            return 200, patched
        return 200, self.save(rt, current, patched, subresource)

    # -- the scale subresource (autoscaling/v1 Scale of a Deployment) -----------------------
    def scale(self, rt: ResourceType, namespace: str | None, name: str) -> dict:
        return scale_of(self.get(rt, namespace, name))

    def replace_scale(self, rt: ResourceType, namespace: str | None, name: str, body: Any) -> dict:
        """PUT .../scale (also the end of a PATCH): only spec.replicas reaches the Deployment."""
        current = self.get(rt, namespace, name)
        if not isinstance(body, dict):
            raise status.bad_request("the object provided is unrecognized (must be of type Scale)")
        meta = body.get("metadata") or {}
        if meta.get("name") and meta["name"] != name:
            raise status.bad_request(f"the name of the object ({meta['name']}) does not match the name on "
                                     f"the URL ({name})")
        replicas = (body.get("spec") or {}).get("replicas", 0)
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            raise status.invalid(SCALE, name, [{
                "field": "spec.replicas", "reason": "FieldValueInvalid",
                "message": f"Invalid value: {json.dumps(replicas)}: must be greater than or equal to 0"}])
        new = clone(current)
        new.setdefault("spec", {})["replicas"] = replicas
        return scale_of(self.save(rt, current, new, expect_rv=meta.get("resourceVersion") or None))

    def patch_scale(self, rt: ResourceType, namespace: str | None, name: str, raw: bytes,
                    content_type: str) -> dict:
        ctype = content_type.split(";")[0].strip().lower()
        try:
            body = json.loads(raw or b"null")
        except ValueError as exc:
            raise status.bad_request(f"error decoding patch: {exc}")
        current = self.scale(rt, namespace, name)
        patched = apply_patch(current, body, ctype, SCALE_PATCH_TYPES)
        wanted_rv = (body.get("metadata") or {}).get("resourceVersion") if isinstance(body, dict) else None
        if wanted_rv is not None and str(wanted_rv) != current["metadata"]["resourceVersion"]:
            raise status.conflict(rt, name)
        patched.setdefault("metadata", {})["resourceVersion"] = None  # checked above, not again
        return self.replace_scale(rt, namespace, name, patched)


SCALE = ResourceType("autoscaling", "v1", "scale", "Scale", True)  # how errors about a Scale name it

# The media types a PATCH accepts, in the order the real server's 415 lists them; the scale
# subresource takes no server-side apply.
PATCH_TYPES = ("application/json-patch+json", "application/merge-patch+json",
               "application/apply-patch+yaml", "application/strategic-merge-patch+json")
SCALE_PATCH_TYPES = tuple(t for t in PATCH_TYPES if t != "application/apply-patch+yaml")


def apply_patch(current: dict, body: Any, ctype: str, accepted: tuple[str, ...]) -> dict:
    """``current`` patched by a JSON, merge or strategic-merge patch ``body`` (pure; server-side
    apply is the caller's); any other media type is a 415 naming ``accepted``."""
    if ctype == "application/json-patch+json":
        if not isinstance(body, list):
            raise status.bad_request("json patch must be a list of operations")
        return patching.json_patch(current, body)
    if ctype == "application/merge-patch+json":
        return patching.merge_patch(current, body)
    if ctype == "application/strategic-merge-patch+json":
        return patching.strategic_merge(current, body)
    raise status.ApiError(status.status(
        415, "UnsupportedMediaType", "the body of the request was in an unknown format - accepted "
        f"media types include: {', '.join(accepted)}"))


def scale_of(obj: dict) -> dict:
    """The autoscaling/v1 Scale the API server serves for a Deployment (pure)."""
    meta, spec, st = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
    selector = spec.get("selector") or {}
    terms = [f"{k}={v}" for k, v in sorted((selector.get("matchLabels") or {}).items())]
    for expr in selector.get("matchExpressions") or []:
        op, values = expr.get("operator"), ",".join(expr.get("values") or [])
        terms.append({"In": f"{expr['key']} in ({values})", "NotIn": f"{expr['key']} notin ({values})",
                      "Exists": expr["key"], "DoesNotExist": f"!{expr['key']}"}.get(op, ""))
    return {"kind": "Scale", "apiVersion": "autoscaling/v1",
            "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                         if k in meta},
            "spec": {"replicas": spec.get("replicas", 1)},
            "status": {"replicas": st.get("replicas", 0), "selector": ",".join(t for t in terms if t)}}
