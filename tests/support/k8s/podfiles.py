"""What a container sees: environment and mounted files, resolved from the pod spec.

Resolves `env` (value, `valueFrom` fieldRef / secretKeyRef / configMapKeyRef /
resourceFieldRef, `$(VAR)` expansion), `envFrom`, and materialises Secret,
ConfigMap, downward API and projected ServiceAccount token volumes as files
under a per-pod root. Absolute mount paths are re-rooted there; the agent
honours `AGENTJOBS_MOUNT_ROOT` to find them.
"""

from __future__ import annotations

import base64
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from . import quantity
from .resources import CONFIGMAPS, SECRETS, SERVICEACCOUNTS

if TYPE_CHECKING:
    from .cluster import Cluster

MOUNT_ROOT_ENV = "AGENTJOBS_MOUNT_ROOT"
NODE_ALLOCATABLE = {"cpu": "2", "memory": "8Gi", "ephemeral-storage": "20Gi"}


class ConfigError(Exception):
    """Container cannot start yet: (waiting reason, message), e.g. a missing Secret."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


def field_value(pod: dict, path: str) -> str:
    meta, spec, status = pod["metadata"], pod["spec"], pod.get("status") or {}
    if m := re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path):
        return (meta.get(m.group(1)) or {}).get(m.group(2), "")
    simple = {
        "metadata.name": meta.get("name"), "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"), "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.hostIP": status.get("hostIP", "127.0.0.1"),
        "status.hostIPs": status.get("hostIP", "127.0.0.1"),
        "status.podIP": status.get("podIP", "127.0.0.1"),
        "status.podIPs": status.get("podIP", "127.0.0.1"),
    }
    if path in simple:
        return simple[path] or ""
    if path in ("metadata.labels", "metadata.annotations"):
        items = meta.get(path.split(".")[1]) or {}
        return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
    raise ConfigError("CreateContainerConfigError", f"unsupported fieldPath: {path}")


def resource_value(pod: dict, container: dict, ref: dict) -> str:
    target = container
    if ref.get("containerName"):
        target = next(c for c in pod["spec"]["containers"] if c["name"] == ref["containerName"])
    kind, _, res = ref["resource"].partition(".")
    value = ((target.get("resources") or {}).get(kind) or {}).get(res) or NODE_ALLOCATABLE.get(res, "0")
    divisor = quantity.parse(ref.get("divisor") or "1")
    return str(math.ceil(quantity.parse(value) / divisor))


class PodFiles:
    def __init__(self, cluster: "Cluster", pod: dict, root: Path) -> None:
        self.cluster, self.pod, self.root = cluster, pod, root
        self.ns = pod["metadata"]["namespace"]

    def _secret(self, name: str, optional: bool) -> dict[str, bytes] | None:
        obj = self.cluster.store.get(SECRETS, self.ns, name)
        if obj is None:
            if optional:
                return None
            raise ConfigError("CreateContainerConfigError", f'secret "{name}" not found')
        return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}

    def _configmap(self, name: str, optional: bool) -> dict[str, bytes] | None:
        obj = self.cluster.store.get(CONFIGMAPS, self.ns, name)
        if obj is None:
            if optional:
                return None
            raise ConfigError("CreateContainerConfigError", f'configmap "{name}" not found')
        return {k: v.encode() for k, v in (obj.get("data") or {}).items()}

    # -- environment ---------------------------------------------------------------------
    def env(self, container: dict, base: dict[str, str]) -> dict[str, str]:
        env = dict(base)
        for src in container.get("envFrom") or []:
            prefix = src.get("prefix", "")
            if "secretRef" in src:
                data = self._secret(src["secretRef"]["name"], src["secretRef"].get("optional", False))
            else:
                data = self._configmap(src["configMapRef"]["name"],
                                       src["configMapRef"].get("optional", False))
            for k, v in (data or {}).items():
                env[prefix + k] = v.decode()
        for var in container.get("env") or []:
            if "valueFrom" not in var:
                env[var["name"]] = expand(var.get("value", ""), env)
                continue
            vf = var["valueFrom"]
            if "fieldRef" in vf:
                env[var["name"]] = field_value(self.pod, vf["fieldRef"]["fieldPath"])
            elif "resourceFieldRef" in vf:
                env[var["name"]] = resource_value(self.pod, container, vf["resourceFieldRef"])
            else:
                ref = vf.get("secretKeyRef") or vf.get("configMapKeyRef")
                is_secret = "secretKeyRef" in vf
                data = (self._secret if is_secret else self._configmap)(
                    ref["name"], ref.get("optional", False))
                if data is None:
                    continue
                if ref["key"] not in data:
                    if ref.get("optional"):
                        continue
                    kind = "Secret" if is_secret else "ConfigMap"
                    raise ConfigError("CreateContainerConfigError",
                                      f"couldn't find key {ref['key']} in {kind} "
                                      f"{self.ns}/{ref['name']}")
                env[var["name"]] = data[ref["key"]].decode()
        return env

    # -- volumes -------------------------------------------------------------------------
    def mount_path(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    def _volume_files(self, vol: dict) -> dict[str, tuple[bytes, int]] | None:
        """{relative path: (content, mode)} for a volume, or None for an empty dir."""
        mode = 0o644
        if "secret" in vol:
            s = vol["secret"]
            mode = s.get("defaultMode", mode)
            data = self._secret(s["secretName"], s.get("optional", False))
            if data is None:
                return {}
            return self._items(data, s.get("items"), mode, f'secret "{s["secretName"]}"')
        if "configMap" in vol:
            c = vol["configMap"]
            data = self._configmap(c["name"], c.get("optional", False))
            return self._items(data or {}, c.get("items"), c.get("defaultMode", mode),
                               f'configmap "{c["name"]}"')
        if "projected" in vol:
            files: dict[str, tuple[bytes, int]] = {}
            dmode = vol["projected"].get("defaultMode", mode)
            for src in vol["projected"].get("sources") or []:
                if "serviceAccountToken" in src:
                    files[src["serviceAccountToken"]["path"]] = (self._token(
                        src["serviceAccountToken"]), dmode)
                elif "secret" in src:
                    data = self._secret(src["secret"]["name"], src["secret"].get("optional", False))
                    files.update(self._items(data or {}, src["secret"].get("items"), dmode, ""))
                elif "configMap" in src:
                    data = self._configmap(src["configMap"]["name"],
                                           src["configMap"].get("optional", False))
                    files.update(self._items(data or {}, src["configMap"].get("items"), dmode, ""))
                elif "downwardAPI" in src:
                    files.update(self._downward(src["downwardAPI"].get("items") or [], dmode))
            return files
        if "downwardAPI" in vol:
            return self._downward(vol["downwardAPI"].get("items") or [],
                                  vol["downwardAPI"].get("defaultMode", mode))
        return None  # emptyDir and friends: just a directory

    def _items(self, data: dict[str, bytes], items: list | None, mode: int,
               what: str) -> dict[str, tuple[bytes, int]]:
        if not items:
            return {k: (v, mode) for k, v in data.items()}
        out = {}
        for item in items:
            if item["key"] not in data:
                raise ConfigError("ContainerCreating",
                                  f"couldn't find key {item['key']} in {what}")
            out[item["path"]] = (data[item["key"]], item.get("mode", mode))
        return out

    def _downward(self, items: list, mode: int) -> dict[str, tuple[bytes, int]]:
        return {i["path"]: (field_value(self.pod, i["fieldRef"]["fieldPath"]).encode(),
                            i.get("mode", mode)) for i in items if "fieldRef" in i}

    def _token(self, src: dict) -> bytes:
        spec = self.pod["spec"]
        sa_name = spec.get("serviceAccountName", "default")
        sa = self.cluster.store.get(SERVICEACCOUNTS, self.ns, sa_name)
        if sa is None:
            raise ConfigError("ContainerCreating", f'serviceaccount "{sa_name}" not found')
        token, _ = self.cluster.tokens.mint(
            self.ns, sa_name, sa["metadata"]["uid"],
            [src["audience"]] if src.get("audience") else None,
            src.get("expirationSeconds", 3600), pod=self.pod)
        return token.encode()

    def materialise(self, container: dict) -> None:
        """Write every volume mounted by `container` under the pod root."""
        volumes = {v["name"]: v for v in self.pod["spec"].get("volumes") or []}
        for mount in container.get("volumeMounts") or []:
            vol = volumes[mount["name"]]
            try:
                files = self._volume_files(vol)
            except ConfigError as exc:
                raise ConfigError("ContainerCreating", f'MountVolume.SetUp failed for volume '
                                  f'"{mount["name"]}" : {exc.message}') from exc
            target = self.mount_path(mount["mountPath"])
            target.mkdir(parents=True, exist_ok=True)
            for rel, (content, mode) in (files or {}).items():
                if mount.get("subPath") and rel != mount["subPath"]:
                    continue
                path = target / rel if not mount.get("subPath") else target
                if mount.get("subPath"):
                    target.rmdir()
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content)
                os.chmod(path, mode)


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion; `$$` escapes; unknown references stay as written."""
    def repl(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return _VAR_REF.sub(repl, text)
