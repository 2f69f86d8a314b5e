"""Server-side defaulting, as the apiserver applies it before validation and storage.

Clients read back what the real server would have stored (backoffLimit 6,
the controller-uid selector and labels, container defaults, the injected
kube-api-access volume …), so code that reads Jobs and Pods sees real shapes.
"""

from __future__ import annotations

import secrets as _secrets
from typing import Any

from .clock import rfc3339
from .jsoncopy import clone

_NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # apimachinery's utilrand alphabet


def random_suffix(n: int = 5) -> str:
    return "".join(_secrets.choice(_NAME_ALPHABET) for _ in range(n))


def generate_name(meta: dict) -> None:
    """metadata.generateName → metadata.name with a 5-character random suffix."""
    if not meta.get("name") and meta.get("generateName"):
        meta["name"] = meta["generateName"] + random_suffix()


def _pull_policy(image: str) -> str:
    tail = image.rsplit("/", 1)[-1]
    if "@" in tail:
        return "IfNotPresent"
    if ":" not in tail or tail.endswith(":latest"):
        return "Always"
    return "IfNotPresent"


def container(c: dict) -> None:
    c.setdefault("imagePullPolicy", _pull_policy(c.get("image", "")))
    c.setdefault("terminationMessagePath", "/dev/termination-log")
    c.setdefault("terminationMessagePolicy", "File")
    res = c.setdefault("resources", {})
    if res.get("limits"):
        requests = res.setdefault("requests", {})
        for k, v in res["limits"].items():
            requests.setdefault(k, v)
    for port in c.get("ports") or []:
        port.setdefault("protocol", "TCP")
    for env in c.get("env") or []:
        ref = (env.get("valueFrom") or {}).get("fieldRef")
        if ref is not None:
            ref.setdefault("apiVersion", "v1")


def pod_spec(spec: dict) -> None:
    """Defaults shared by pod templates and pods."""
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("securityContext", {})
    spec.setdefault("terminationGracePeriodSeconds", 30)
    for c in (spec.get("initContainers") or []) + (spec.get("containers") or []):
        container(c)
    for vol in spec.get("volumes") or []:
        if "secret" in vol:
            vol["secret"].setdefault("defaultMode", 0o644)
        if "projected" in vol:
            vol["projected"].setdefault("defaultMode", 0o644)
            for src in vol["projected"].get("sources") or []:
                if "serviceAccountToken" in src:
                    src["serviceAccountToken"].setdefault("expirationSeconds", 3600)


def pod(obj: dict, automount_default: bool = True) -> None:
    """Pod defaults, plus what ServiceAccount admission adds (kube-api-access volume)."""
    spec = obj.setdefault("spec", {})
    pod_spec(spec)
    spec.setdefault("serviceAccountName", spec.get("serviceAccount") or "default")
    spec["serviceAccount"] = spec["serviceAccountName"]
    spec.setdefault("enableServiceLinks", True)
    spec.setdefault("preemptionPolicy", "PreemptLowerPriority")
    spec.setdefault("priority", 0)
    tolerations = spec.setdefault("tolerations", [])
    for key in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"):
        if not any(t.get("key") == key for t in tolerations):
            tolerations.append({"key": key, "operator": "Exists", "effect": "NoExecute",
                                "tolerationSeconds": 300})
    automount = spec.get("automountServiceAccountToken", automount_default)
    has_mount = any(m.get("mountPath") == SA_MOUNT_PATH
                    for c in spec.get("containers") or [] for m in c.get("volumeMounts") or [])
    if automount and not has_mount:
        vol_name = "kube-api-access-" + random_suffix()
        spec.setdefault("volumes", []).append(kube_api_access_volume(vol_name))
        for c in (spec.get("initContainers") or []) + (spec.get("containers") or []):
            c.setdefault("volumeMounts", []).append(
                {"name": vol_name, "readOnly": True, "mountPath": SA_MOUNT_PATH})
    obj.setdefault("status", {"phase": "Pending", "qosClass": qos_class(spec)})


SA_MOUNT_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"


def kube_api_access_volume(name: str) -> dict:
    return {"name": name, "projected": {"defaultMode": 0o644, "sources": [
        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {
            "apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
    ]}}


def qos_class(spec: dict) -> str:
    containers = spec.get("containers") or []
    any_set = False
    guaranteed = bool(containers)
    for c in containers:
        res = c.get("resources") or {}
        limits, requests = res.get("limits") or {}, res.get("requests") or {}
        any_set = any_set or bool(limits) or bool(requests)
        for r in ("cpu", "memory"):
            if r not in limits or requests.get(r, limits[r]) != limits[r]:
                guaranteed = False
    if not any_set:
        return "BestEffort"
    return "Guaranteed" if guaranteed else "Burstable"


def job(obj: dict) -> None:
    """batch/v1 Job defaults (1.30+) and the controller-uid selector/labels."""
    meta, spec = obj["metadata"], obj.setdefault("spec", {})
    uid = meta["uid"]
    if spec.get("completions") is None and spec.get("parallelism") is None:
        spec["completions"], spec["parallelism"] = 1, 1
    spec.setdefault("parallelism", 1)
    spec.setdefault("completionMode", "NonIndexed")
    if spec.get("backoffLimitPerIndex") is None:
        spec.setdefault("backoffLimit", 6)
    spec.setdefault("suspend", False)
    if not spec.get("podFailurePolicy"):
        spec.setdefault("podReplacementPolicy", "TerminatingOrFailed")
    spec.setdefault("manualSelector", None)
    if spec["manualSelector"] is None:
        del spec["manualSelector"]
    template = spec.setdefault("template", {})
    tmeta = template.setdefault("metadata", {})
    labels = tmeta.setdefault("labels", {})
    if not spec.get("manualSelector"):
        labels.update({"batch.kubernetes.io/controller-uid": uid,
                       "batch.kubernetes.io/job-name": meta["name"],
                       "controller-uid": uid, "job-name": meta["name"]})
        spec["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
    pod_spec(template.setdefault("spec", {}))
    if not meta.get("labels"):
        meta["labels"] = dict(labels)
    meta["generation"] = 1


def secret(obj: dict) -> None:
    import base64

    obj.setdefault("type", "Opaque")
    string_data = obj.pop("stringData", None) or {}
    data = obj.setdefault("data", {})
    for k, v in string_data.items():
        data[k] = base64.b64encode(v.encode()).decode()
    if not data:
        del obj["data"]


def namespace(obj: dict) -> None:
    obj["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = obj["metadata"]["name"]
    obj["spec"] = {"finalizers": ["kubernetes"]}
    obj["status"] = {"phase": "Active"}


def event(obj: dict, now: float) -> None:
    obj.setdefault("firstTimestamp", rfc3339(now))
    obj.setdefault("lastTimestamp", obj["firstTimestamp"])
    obj.setdefault("count", 1)
    obj.setdefault("type", "Normal")
    obj.setdefault("source", {})
    obj.setdefault("reportingComponent", "")
    obj.setdefault("reportingInstance", "")


def strip_status_for_create(obj: dict) -> dict[str, Any]:
    """Create ignores a client-supplied status (PrepareForCreate)."""
    obj = clone(obj)
    obj.pop("status", None)
    return obj
