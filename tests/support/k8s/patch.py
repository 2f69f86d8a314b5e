"""PATCH bodies: JSON merge patch, strategic merge patch, JSON patch (RFC 6902).

Strategic merge is approximated by merge keys for the list fields our
objects use (containers by name, conditions by type, ownerReferences by uid,
finalizers as a set) plus the `$patch` and `$deleteFromPrimitiveList`
directives; server-side apply is treated as a merge without field ownership.
"""

from __future__ import annotations

from typing import Any

from . import status
from .jsoncopy import clone

MERGE_KEYS = {
    "containers": "name", "initContainers": "name", "ephemeralContainers": "name",
    "volumes": "name", "env": "name", "volumeMounts": "mountPath", "ports": "containerPort",
    "conditions": "type", "ownerReferences": "uid", "imagePullSecrets": "name",
    "containerStatuses": "name", "hostAliases": "ip", "secrets": "name",
}
PRIMITIVE_SETS = {"finalizers"}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return clone(patch)
    result = clone(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            result.pop(k, None)
        else:
            result[k] = merge_patch(result.get(k), v)
    return result


def strategic_merge(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return clone(patch)
    if patch.get("$patch") == "replace":
        return {k: clone(v) for k, v in patch.items() if k != "$patch"}
    result = clone(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if k.startswith("$deleteFromPrimitiveList/"):
            fld = k.split("/", 1)[1]
            result[fld] = [x for x in result.get(fld) or [] if x not in v]
            continue
        if k.startswith("$"):
            continue
        if v is None:
            result.pop(k, None)
        elif k in MERGE_KEYS and isinstance(v, list) and isinstance(result.get(k), list):
            result[k] = _merge_list(result[k], v, MERGE_KEYS[k])
        elif k in PRIMITIVE_SETS and isinstance(v, list):
            merged = list(result.get(k) or [])
            merged += [x for x in v if x not in merged]
            result[k] = merged
        else:
            result[k] = strategic_merge(result.get(k), v)
    return result


def _merge_list(current: list, patch: list, key: str) -> list:
    out = clone(current)
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            return clone(patch)
        idx = next((i for i, x in enumerate(out) if isinstance(x, dict)
                    and x.get(key) == item[key]), None)
        if item.get("$patch") == "delete":
            if idx is not None:
                out.pop(idx)
        elif idx is None:
            out.append({k: v for k, v in item.items() if k != "$patch"})
        else:
            out[idx] = strategic_merge(out[idx], item)
    return out


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise status.bad_request(f"the server rejected our request due to an error in our "
                                 f"request: invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _parent(doc: Any, parts: list[str]) -> tuple[Any, str]:
    node = doc
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node[p]
    return node, parts[-1]


def json_patch(doc: Any, ops: list[dict]) -> Any:
    """RFC 6902 add/remove/replace/move/copy/test."""
    doc = clone(doc)
    try:
        for op in ops:
            kind, parts = op["op"], _pointer(op["path"])
            if kind == "test":
                node = doc
                for p in parts:
                    node = node[int(p)] if isinstance(node, list) else node[p]
                if node != op["value"]:
                    raise status.ApiError(status.status(
                        422, "Invalid", f"the server rejected our request due to an error in "
                        f"our request: testing value {op['path']} failed"))
                continue
            if kind in ("move", "copy"):
                src_parent, src_key = _parent(doc, _pointer(op["from"]))
                value = (src_parent[int(src_key)] if isinstance(src_parent, list)
                         else src_parent[src_key])
                if kind == "move":
                    if isinstance(src_parent, list):
                        src_parent.pop(int(src_key))
                    else:
                        del src_parent[src_key]
                op = {"op": "add", "path": op["path"], "value": clone(value)}
                kind = "add"
            parent, key = _parent(doc, parts)
            if kind == "add":
                if isinstance(parent, list):
                    parent.insert(len(parent) if key == "-" else int(key), op["value"])
                else:
                    parent[key] = op["value"]
            elif kind == "remove":
                if isinstance(parent, list):
                    parent.pop(int(key))
                else:
                    del parent[key]
            elif kind == "replace":
                if isinstance(parent, list):
                    parent[int(key)] = op["value"]
                else:
                    if key not in parent:
                        raise KeyError(key)
                    parent[key] = op["value"]
            else:
                raise status.bad_request(f"Unexpected kind: {kind}")
    except (KeyError, IndexError, ValueError, TypeError) as exc:
        raise status.ApiError(status.status(
            422, "Invalid", f"the server rejected our request due to an error in our request: "
            f"jsonpatch failed: {exc!r}")) from exc
    return doc
