"""Render the k8s/ kustomizations in Python, so every CI run checks the manifests.

A kustomize-compatible renderer for exactly the subset k8s/ uses: resources
(files and directories), namespace, labels (without selectors),
configMapGenerator (files, literals, the content-hash name suffix and the
rewrite of references to it), strategic-merge patches by kind/name (including
``$patch: delete``), replicas and images. Any other kustomization field is an
error, never silently ignored. Where ``kubectl`` is installed, a test renders
with ``kubectl kustomize`` too and demands the same objects.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import subprocess
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = {"dev": K8S / "overlays" / "dev", "production": K8S / "overlays" / "production"}

Obj = dict[str, Any]

SUPPORTED_FIELDS = {
    "apiVersion", "kind", "resources", "namespace", "labels", "configMapGenerator",
    "patches", "replicas", "images",
}
CLUSTER_SCOPED = {
    "Namespace", "ClusterRole", "ClusterRoleBinding", "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding", "PersistentVolume", "StorageClass", "PriorityClass",
    "CustomResourceDefinition", "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration",
}
# patchMergeKey of the list fields k8s/ patches (from the Kubernetes OpenAPI schema); other
# lists are replaced whole, as kustomize does.
MERGE_KEYS = {
    "containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
    "volumeMounts": "mountPath", "imagePullSecrets": "name",
}
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod"}


class RenderError(Exception):
    """The kustomization uses something this renderer does not implement, or is broken."""


@dataclass
class _Res:
    obj: Obj
    hashed: bool = False  # generated with a content-hash name suffix (added at the end)


def key(obj: Obj) -> tuple[str, str, str, str]:
    """(apiVersion, kind, namespace, name): what identifies an object in a render."""
    meta = obj.get("metadata") or {}
    return (obj["apiVersion"], obj["kind"], meta.get("namespace", ""), meta["name"])


def render(path: Path) -> list[Obj]:
    """The objects ``kubectl kustomize PATH`` prints, in Python."""
    resources = _build(Path(path))
    _apply_hash_suffixes(resources)
    return [r.obj for r in resources]


def _load_yaml_docs(path: Path) -> list[Obj]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _build(root: Path) -> list[_Res]:
    file = root / "kustomization.yaml"
    if not file.is_file():
        raise RenderError(f"{root}: no kustomization.yaml")
    kust = yaml.safe_load(file.read_text()) or {}
    unknown = set(kust) - SUPPORTED_FIELDS
    if unknown:
        raise RenderError(f"{file}: fields this renderer does not implement: {sorted(unknown)}")
    resources: list[_Res] = []
    for entry in kust.get("resources", []):
        target = (root / entry).resolve()
        if target.is_dir():
            resources.extend(_build(target))
        else:
            _inside(root, target, file)
            resources.extend(_Res(doc) for doc in _load_yaml_docs(target))
    for gen in kust.get("configMapGenerator", []):
        resources.append(_config_map(root, file, gen))
    if "namespace" in kust:
        for r in resources:
            if r.obj["kind"] not in CLUSTER_SCOPED:
                r.obj.setdefault("metadata", {})["namespace"] = kust["namespace"]
    for patch in kust.get("patches", []):
        resources = _patch(root, file, patch, resources)
    for rep in kust.get("replicas", []):
        matches = [r for r in resources if r.obj["metadata"]["name"] == rep["name"]
                   and r.obj["kind"] in {"Deployment", "StatefulSet", "ReplicaSet"}]
        if not matches:
            raise RenderError(f"{file}: replicas: no workload named {rep['name']}")
        for r in matches:
            r.obj["spec"]["replicas"] = rep["count"]
    for image in kust.get("images", []):
        for r in resources:
            _set_image(r.obj, image)
    for label in kust.get("labels", []):
        if label.get("includeSelectors") or label.get("includeTemplates"):
            raise RenderError(f"{file}: labels with selectors/templates are not implemented")
        for r in resources:
            r.obj.setdefault("metadata", {}).setdefault("labels", {}).update(label["pairs"])
    _unique(resources, file)
    return resources


def _inside(root: Path, target: Path, file: Path) -> None:
    # kustomize's default load restrictor: files only at or below the kustomization.
    if not target.is_relative_to(root.resolve()):
        raise RenderError(f"{file}: {target} is not in or below {root} (kustomize refuses it)")


def _unique(resources: list[_Res], file: Path) -> None:
    seen: set[tuple[str, ...]] = set()
    for r in resources:
        k = key(r.obj)
        if k in seen:
            raise RenderError(f"{file}: {k} defined twice")
        seen.add(k)


def _config_map(root: Path, file: Path, gen: Obj) -> _Res:
    unknown = set(gen) - {"name", "namespace", "files", "literals", "options"}
    if unknown:
        raise RenderError(f"{file}: configMapGenerator fields not implemented: {sorted(unknown)}")
    data: dict[str, str] = {}
    for spec in gen.get("files", []):
        name, _, rel = spec.rpartition("=")
        target = (root / rel).resolve()
        _inside(root, target, file)
        data[name or Path(rel).name] = target.read_text()
    for literal in gen.get("literals", []):
        k, _, v = literal.partition("=")
        data[k] = v
    options = gen.get("options") or {}
    meta: Obj = {"name": gen["name"]}
    if "namespace" in gen:
        meta["namespace"] = gen["namespace"]
    if options.get("labels"):
        meta["labels"] = dict(options["labels"])
    obj = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": dict(sorted(data.items()))}
    return _Res(obj, hashed=not options.get("disableNameSuffixHash", False))


def _matches(obj: Obj, patch: Obj) -> bool:
    pmeta = patch.get("metadata") or {}
    meta = obj.get("metadata") or {}
    return (
        obj["kind"] == patch.get("kind")
        and obj["apiVersion"].split("/")[0] == patch.get("apiVersion", "").split("/")[0]
        and meta.get("name") == pmeta.get("name")
        and ("namespace" not in pmeta or meta.get("namespace") == pmeta["namespace"])
    )


def _patch(root: Path, file: Path, entry: Obj, resources: list[_Res]) -> list[_Res]:
    if set(entry) != {"path"}:
        raise RenderError(f"{file}: only `patches: - path: <strategic merge patch>` is implemented")
    target = (root / entry["path"]).resolve()
    _inside(root, target, file)
    for patch in _load_yaml_docs(target):
        matches = [r for r in resources if _matches(r.obj, patch)]
        if len(matches) != 1:
            raise RenderError(f"{target}: patch matches {len(matches)} objects, expected 1")
        if patch.get("$patch") == "delete":
            resources = [r for r in resources if r is not matches[0]]
            continue
        body = {k: v for k, v in patch.items() if k not in ("apiVersion", "kind")}
        body["metadata"] = {k: v for k, v in body.get("metadata", {}).items() if k not in ("name", "namespace")}
        _merge(matches[0].obj, body)
    return resources


def _merge(base: Obj, patch: Obj) -> None:
    """Strategic merge of ``patch`` into ``base`` (in place), for the fields k8s/ patches."""
    for k, v in patch.items():
        if v is None:
            base.pop(k, None)
        elif isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        elif isinstance(v, list) and k in MERGE_KEYS and isinstance(base.get(k), list):
            mk = MERGE_KEYS[k]
            added = []  # kustomize puts items new to the list first, in the patch's order
            for item in v:
                existing = next((b for b in base[k] if b.get(mk) == item.get(mk)), None)
                if item.get("$patch") == "delete":
                    base[k] = [b for b in base[k] if b is not existing]
                elif existing is not None:
                    _merge(existing, item)
                else:
                    added.append(copy.deepcopy(item))
            base[k] = added + base[k]
        else:
            base[k] = copy.deepcopy(v)


def split_image(image: str) -> tuple[str, str, str]:
    """(name, tag, digest) of an image reference."""
    name, _, digest = image.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag = ""
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
    return name, tag, digest


def _containers(obj: Any) -> list[Obj]:
    found: list[Obj] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("containers", "initContainers") and isinstance(v, list):
                found.extend(c for c in v if isinstance(c, dict))
            else:
                found.extend(_containers(v))
    elif isinstance(obj, list):
        for v in obj:
            found.extend(_containers(v))
    return found


def _set_image(obj: Obj, image: Obj) -> None:
    for container in _containers(obj):
        name, tag, digest = split_image(container.get("image", ""))
        if name != image["name"]:
            continue
        name = image.get("newName", name)
        if "digest" in image:
            container["image"] = f"{name}@{image['digest']}"
        elif "newTag" in image:
            container["image"] = f"{name}:{image['newTag']}"
        else:
            container["image"] = f"{name}:{tag}" if tag else (f"{name}@{digest}" if digest else name)


def config_map_hash(obj: Obj) -> str:
    """kustomize's content hash of a ConfigMap (api/hasher: sha256 of a JSON encoding)."""
    # kustomize looks the name up as one path segment "metadata/name", finds nothing and
    # hashes "" instead: bug-compatible here, or our names would differ from kubectl's.
    encoded: Obj = {"kind": "ConfigMap", "name": "", "data": obj.get("data", "")}
    if obj.get("binaryData"):
        encoded["binaryData"] = obj["binaryData"]
    text = json.dumps(encoded, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    # Go's encoding/json escapes these; the hash is over Go's bytes.
    for char, escaped in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"),
                          ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escaped)
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    return digest.translate(str.maketrans({"0": "g", "1": "h", "3": "k", "a": "m", "e": "t"}))


def _apply_hash_suffixes(resources: list[_Res]) -> None:
    renamed: dict[tuple[str, str], str] = {}
    for r in resources:
        if r.hashed:
            meta = r.obj["metadata"]
            new = f"{meta['name']}-{config_map_hash(r.obj)}"
            renamed[(meta.get("namespace", ""), meta["name"])] = new
            meta["name"] = new
    for r in resources:
        if r.obj["kind"] in WORKLOADS:
            _rename_config_map_refs(r.obj, r.obj["metadata"].get("namespace", ""), renamed)


def _rename_config_map_refs(node: Any, namespace: str, renamed: dict[tuple[str, str], str]) -> None:
    if isinstance(node, dict):
        for field in ("configMap", "configMapKeyRef", "configMapRef"):
            ref = node.get(field)
            if isinstance(ref, dict) and (namespace, ref.get("name")) in renamed:
                ref["name"] = renamed[(namespace, ref["name"])]
        for v in node.values():
            _rename_config_map_refs(v, namespace, renamed)
    elif isinstance(node, list):
        for v in node:
            _rename_config_map_refs(v, namespace, renamed)


def kubectl_kustomize() -> str | None:
    """Path of a kubectl whose embedded kustomize is v5 or newer (the fields k8s/ uses), else None.

    Debian's kubernetes-client (1.20) embeds kustomize v2, which predates `labels`,
    `patches` and `replicas`: comparing against it would only measure its age.
    """
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    proc = subprocess.run(
        [kubectl, "version", "--client", "-o", "json"], check=False, capture_output=True, text=True, timeout=60
    )
    try:
        version = json.loads(proc.stdout).get("kustomizeVersion", "")
    except ValueError:
        return None
    major = version.lstrip("v").split(".")[0]
    return kubectl if major.isdigit() and int(major) >= 5 else None


def kubectl_render(path: Path) -> list[Obj] | None:
    """``kubectl kustomize PATH`` when a kubectl with kustomize v5+ is installed, else None."""
    kubectl = kubectl_kustomize()
    if kubectl is None:
        return None
    proc = subprocess.run(
        [kubectl, "kustomize", str(path)], check=False, capture_output=True, text=True, timeout=120
    )
    if proc.returncode != 0:
        raise RenderError(f"kubectl kustomize {path} failed: {proc.stderr.strip()}")
    return _docs(proc.stdout)


def _docs(text: str) -> list[Obj]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


# -- helpers for the tests ---------------------------------------------------------------------

_SUFFIXES = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"),
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
}


def quantity(value: str | float) -> Decimal:
    """A Kubernetes quantity as a number: ``"500m"`` → 0.5, ``"1Gi"`` → 1073741824."""
    text = str(value).strip()
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if text.endswith(suffix):
            return Decimal(text[: -len(suffix)]) * Decimal(_SUFFIXES[suffix])
    return Decimal(text)


def find(objs: list[Obj], kind: str, name: str | None = None, namespace: str | None = None) -> list[Obj]:
    """Objects of ``kind`` (optionally with this name / in this namespace)."""
    return [
        o for o in objs
        if o["kind"] == kind
        and (name is None or o["metadata"]["name"] == name)
        and (namespace is None or o["metadata"].get("namespace") == namespace)
    ]


def one(objs: list[Obj], kind: str, name: str, namespace: str | None = None) -> Obj:
    """The single object of ``kind``/``name`` (fails the test if there is not exactly one)."""
    found = find(objs, kind, name, namespace)
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels and matchExpressions) selects these labels."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def settings_config_map(objs: list[Obj]) -> Obj:
    """The generated settings ConfigMap (its name carries a content hash)."""
    found = [o for o in find(objs, "ConfigMap") if o["metadata"]["name"].startswith("agentjobs-settings-")]
    assert len(found) == 1, f"expected one agentjobs-settings-<hash> ConfigMap, found {len(found)}"
    return found[0]


def container(objs: list[Obj], deployment: str, name: str | None = None) -> Obj:
    """A container of a Deployment (its only one when ``name`` is None)."""
    pod = one(objs, "Deployment", deployment)["spec"]["template"]["spec"]
    containers = [c for c in pod["containers"] if name is None or c["name"] == name]
    assert len(containers) == 1, f"{deployment}: expected one container {name or ''}"
    return containers[0]


def deployed_settings(objs: list[Obj], tmp_dir: Path, deployment: str = "agentjobs-dispatcher") -> Any:
    """The Settings a Deployment's process loads: the ConfigMap's TOML plus its literal env."""
    from dispatcher.plumbing.settings import ENV_CONFIG_FILE, load_settings

    path = tmp_dir / f"{deployment}-settings.toml"
    path.write_text(settings_config_map(objs)["data"]["settings.toml"])
    environ = {e["name"]: e["value"] for e in container(objs, deployment).get("env", []) if "value" in e}
    environ.pop(ENV_CONFIG_FILE, None)  # the mount path inside the pod; we load our copy
    return load_settings(path, environ)


def sample_job(settings: Any, phase: Any = None, class_name: str | None = None) -> Obj:
    """The Job the dispatcher builds for the sample Alertmanager webhook (tests/data)."""
    from dispatcher.jobs import jobspec
    from schemas import Phase, decode_incident, identify
    from tests.support.payloads import SAMPLE_WEBHOOK, dumps

    event = decode_incident(dumps(SAMPLE_WEBHOOK))
    plan = jobspec.JobPlan(
        identity=identify(event),
        event=event,
        class_name=class_name or jobspec.choose_class(event, settings),
        phase=phase or Phase.SHADOW,
        domain=jobspec.domain_of(event, settings),
    )
    return jobspec.build_job(plan, settings)
