"""Admission the dispatcher must cope with: an RBAC allow list and ResourceQuota counts.

RBAC here is a flat allow list per user or group instead of Roles and
RoleBindings: tests state "this ServiceAccount may create jobs in ns X" and
everything else is 403 with the apiserver's message. Quota is read from real
ResourceQuota objects (so the same test can create one on k3s) and enforces
object-count quotas (`count/jobs.batch`, `pods`, `secrets`, …) at admission
time. A rejected create stores nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import quantity, status
from .resources import PODS, RESOURCEQUOTAS, ResourceType
from .store import Store
from .tokens import Identity, sa_username


@dataclass(frozen=True)
class Rule:
    verbs: frozenset[str]
    group: str
    resources: frozenset[str]  # "jobs", "jobs/status", "pods/log", "*"
    namespace: str | None  # None: every namespace and cluster scope
    names: frozenset[str] | None

    def allows(self, verb: str, rt: ResourceType, namespace: str | None, name: str | None,
               subresource: str | None) -> bool:
        resource = rt.plural + (f"/{subresource}" if subresource else "")
        return (
            ("*" in self.verbs or verb in self.verbs)
            and self.group in ("*", rt.group)
            and ("*" in self.resources or resource in self.resources)
            and (self.namespace is None or self.namespace == namespace)
            and (self.names is None or name in self.names)
        )


class Rbac:
    """Off by default (everyone may do everything); `enable()` turns on the allow list."""

    def __init__(self) -> None:
        self.enabled = False
        self._rules: dict[str, list[Rule]] = {}

    def enable(self) -> "Rbac":
        self.enabled = True
        return self

    def allow(self, subject: str, verbs: list[str], resources: list[str], group: str = "",
              namespace: str | None = None, names: list[str] | None = None) -> None:
        """Allow a user or group (`system:serviceaccounts:NS`) these verbs on these resources."""
        self._rules.setdefault(subject, []).append(
            Rule(frozenset(verbs), group, frozenset(resources), namespace,
                 frozenset(names) if names is not None else None))

    def allow_service_account(self, namespace: str, name: str, verbs: list[str],
                              resources: list[str], group: str = "",
                              in_namespace: str | None = None) -> None:
        """Like a RoleBinding in `in_namespace` (default: the SA's own namespace)."""
        self.allow(sa_username(namespace, name), verbs, resources, group,
                   in_namespace or namespace)

    def check(self, ident: Identity, verb: str, rt: ResourceType, namespace: str | None,
              name: str | None, subresource: str | None) -> None:
        if not self.enabled or ident.is_admin:
            return
        for subject in [ident.username, *ident.groups]:
            for rule in self._rules.get(subject, []):
                if rule.allows(verb, rt, namespace, name, subresource):
                    return
        raise status.forbidden(rt, None if verb in ("create", "list", "watch",
                                                    "deletecollection") else name,
                               ident.username, verb, namespace, subresource)


def quota_key(rt: ResourceType) -> list[str]:
    keys = [f"count/{rt.qualified}"]
    if rt.group == "" and rt.plural in ("pods", "secrets", "configmaps", "services",
                                        "resourcequotas", "persistentvolumeclaims"):
        keys.append(rt.plural)
    return keys


def _counted(store: Store, rt: ResourceType, namespace: str) -> int:
    objs = store.list(rt, namespace)
    if rt is PODS:  # terminal pods do not count against pod quota
        objs = [p for p in objs if p.get("status", {}).get("phase") not in ("Succeeded", "Failed")]
    return len(objs)


def check_quota(store: Store, rt: ResourceType, namespace: str, name: str) -> None:
    """Raise 403 'exceeded quota' if creating one more `rt` breaks a ResourceQuota."""
    for quota in store.list(RESOURCEQUOTAS, namespace):
        hard = (quota.get("spec") or {}).get("hard") or {}
        for key in quota_key(rt):
            if key not in hard:
                continue
            limited = int(quantity.parse(hard[key]))
            used = _counted(store, rt, namespace)
            if used + 1 > limited:
                raise status.quota_exceeded(rt, name, quota["metadata"]["name"], key, 1, used,
                                            limited)


def quota_status(store: Store, quota: dict) -> dict:
    """What the quota controller would write to status (hard + used)."""
    from .resources import BY_PATH

    hard = (quota.get("spec") or {}).get("hard") or {}
    used = {}
    ns = quota["metadata"]["namespace"]
    for key in hard:
        name = key.removeprefix("count/")
        plural, _, group = name.partition(".")
        rt = next((r for (g, _, p), r in BY_PATH.items() if p == plural and g == group), None)
        used[key] = str(_counted(store, rt, ns)) if rt else "0"
    return {"hard": dict(hard), "used": used}
