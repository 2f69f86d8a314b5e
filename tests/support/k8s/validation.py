"""Field validation that answers 422 Invalid with apiserver's causes and wording.

Covers what our code can get wrong when building objects: names, labels,
missing containers or images, restartPolicy, negative counts, resource
quantities, dangling volume mounts, secret data, and Job spec immutability.
"""

from __future__ import annotations

import base64
import binascii
import json
import re

from . import quantity, status
from .resources import JOBS, NAMESPACES, PODS, SECRETS, ResourceType

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")

SUBDOMAIN_MSG = ("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric "
                 "characters, '-' or '.', and must start and end with an alphanumeric character "
                 "(e.g. 'example.com', regex used for validation is "
                 "'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')")
LABEL_MSG = ("a lowercase RFC 1123 label must consist of lower case alphanumeric characters or "
             "'-', and must start and end with an alphanumeric character (e.g. 'my-name',  or "
             "'123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')")
LABEL_VALUE_MSG = ("a valid label must be an empty string or consist of alphanumeric characters, "
                   "'-', '_' or '.', and must start and end with an alphanumeric character (e.g. "
                   "'MyValue',  or 'my_value',  or '12345', regex used for validation is "
                   "'(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')")


def _q(value) -> str:
    return json.dumps(value) if isinstance(value, str) else str(value)


class Errors:
    def __init__(self) -> None:
        self.causes: list[dict[str, str]] = []

    def invalid(self, field: str, value, detail: str) -> None:
        self.causes.append({"field": field, "reason": "FieldValueInvalid",
                            "message": f"Invalid value: {_q(value)}: {detail}"})

    def required(self, field: str, detail: str = "") -> None:
        self.causes.append({"field": field, "reason": "FieldValueRequired",
                            "message": "Required value" + (f": {detail}" if detail else "")})

    def not_supported(self, field: str, value, supported: list[str]) -> None:
        opts = ", ".join(f'"{s}"' for s in supported)
        self.causes.append({"field": field, "reason": "FieldValueNotSupported",
                            "message": f"Unsupported value: {_q(value)}: supported values: {opts}"})

    def not_found(self, field: str, value) -> None:
        self.causes.append({"field": field, "reason": "FieldValueNotFound",
                            "message": f"Not found: {_q(value)}"})

    def raise_if_any(self, rt: ResourceType, name: str) -> None:
        if self.causes:
            raise status.invalid(rt, name, self.causes)


def _meta(rt: ResourceType, obj: dict, e: Errors) -> None:
    meta = obj.get("metadata") or {}
    name = meta.get("name")
    if not name:
        e.required("metadata.name", "name or generateName is required")
        return
    if rt is NAMESPACES:
        if len(name) > 63 or not _DNS1123_LABEL.match(name):
            e.invalid("metadata.name", name, LABEL_MSG)
    elif len(name) > 253 or not _DNS1123_SUBDOMAIN.match(name):
        e.invalid("metadata.name", name, SUBDOMAIN_MSG)
    for key, value in (meta.get("labels") or {}).items():
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value):
            e.invalid("metadata.labels", value, LABEL_VALUE_MSG)


def _resources(path: str, res: dict, e: Errors) -> None:
    for kind in ("limits", "requests"):
        for rname, value in (res.get(kind) or {}).items():
            if not quantity.is_valid(value):
                e.invalid(f"{path}.{kind}[{rname}]", value,
                          "must be a valid quantity")
    limits, requests = res.get("limits") or {}, res.get("requests") or {}
    for rname, req in requests.items():
        if rname in limits and quantity.is_valid(req) and quantity.is_valid(limits[rname]):
            if quantity.parse(req) > quantity.parse(limits[rname]):
                e.invalid(f"{path}.requests", req,
                          f"must be less than or equal to {rname} limit of {limits[rname]}")


def pod_spec(path: str, spec: dict, e: Errors, restart_policies: list[str]) -> None:
    containers = spec.get("containers") or []
    if not containers:
        e.required(f"{path}.containers")
    volumes = {v.get("name") for v in spec.get("volumes") or []}
    seen: set[str] = set()
    for i, c in enumerate(containers):
        cpath = f"{path}.containers[{i}]"
        name = c.get("name")
        if not name:
            e.required(f"{cpath}.name")
        elif len(name) > 63 or not _DNS1123_LABEL.match(name):
            e.invalid(f"{cpath}.name", name, LABEL_MSG)
        elif name in seen:
            e.causes.append({"field": f"{cpath}.name", "reason": "FieldValueDuplicate",
                             "message": f"Duplicate value: {_q(name)}"})
        seen.add(name or "")
        if not c.get("image"):
            e.required(f"{cpath}.image")
        _resources(f"{cpath}.resources", c.get("resources") or {}, e)
        for j, m in enumerate(c.get("volumeMounts") or []):
            if m.get("name") not in volumes:
                e.not_found(f"{cpath}.volumeMounts[{j}].name", m.get("name"))
    policy = spec.get("restartPolicy")
    if policy not in restart_policies:
        e.not_supported(f"{path}.restartPolicy", policy, restart_policies)
    ads = spec.get("activeDeadlineSeconds")
    if ads is not None and ads <= 0:
        e.invalid(f"{path}.activeDeadlineSeconds", ads,
                  "must be between 1 and 2147483647, inclusive")


def job(obj: dict) -> None:
    e = Errors()
    _meta(JOBS, obj, e)
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    name = meta.get("name", "")
    tlabels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
    if name and len(name) > 63 and tlabels.get("job-name") == name:
        # The job-name label on the pod template must be a valid label value.
        e.invalid("spec.template.labels", name, "must be no more than 63 characters")
    for fld in ("backoffLimit", "parallelism", "completions", "ttlSecondsAfterFinished"):
        v = spec.get(fld)
        if v is not None and v < 0:
            e.invalid(f"spec.{fld}", v, "must be greater than or equal to 0")
    ads = spec.get("activeDeadlineSeconds")
    if ads is not None and ads <= 0:
        e.invalid("spec.activeDeadlineSeconds", ads, "must be greater than or equal to 0")
    pod_spec("spec.template.spec", (spec.get("template") or {}).get("spec") or {}, e,
             ["OnFailure", "Never"])
    e.raise_if_any(JOBS, name)


def job_update(old: dict, new: dict) -> None:
    """Job spec fields that cannot change after creation."""
    e = Errors()
    for fld in ("template", "selector", "completionMode"):
        if old["spec"].get(fld) != new["spec"].get(fld):
            e.invalid(f"spec.{fld}", new["spec"].get(fld), "field is immutable")
    e.raise_if_any(JOBS, new["metadata"]["name"])
    job(new)


def pod(obj: dict) -> None:
    e = Errors()
    _meta(PODS, obj, e)
    pod_spec("spec", obj.get("spec") or {}, e, ["Always", "OnFailure", "Never"])
    e.raise_if_any(PODS, (obj.get("metadata") or {}).get("name", ""))


def secret(obj: dict) -> None:
    e = Errors()
    _meta(SECRETS, obj, e)
    for key, value in (obj.get("data") or {}).items():
        if not _SECRET_KEY.match(key):
            e.invalid(f"data[{key}]", key, "a valid config key must consist of alphanumeric "
                      "characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or "
                      "'key-name', regex used for validation is '[-._a-zA-Z0-9]+')")
        try:
            base64.b64decode(value, validate=True)
        except (binascii.Error, TypeError):
            e.invalid(f"data[{key}]", "<secret contents redacted>", "illegal base64 data")
    e.raise_if_any(SECRETS, (obj.get("metadata") or {}).get("name", ""))


def generic(rt: ResourceType, obj: dict) -> None:
    e = Errors()
    _meta(rt, obj, e)
    e.raise_if_any(rt, (obj.get("metadata") or {}).get("name", ""))
