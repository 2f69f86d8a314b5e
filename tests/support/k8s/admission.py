"""Admission the dispatcher must cope with: an RBAC allow list and ResourceQuota counts.

RBAC here is a flat allow list per user or group instead of Roles and
RoleBindings: tests state "this ServiceAccount may create jobs in ns X" and
everything else is 403 with the apiserver's message. `Rbac.load` turns real
(Cluster)Roles and (Cluster)RoleBindings — e.g. the ones k8s/ renders — into
that list, as the API server would read them. Quota is read from real
ResourceQuota objects (so the same test can create one on k3s) and enforces
object-count quotas (`count/jobs.batch`, `pods`, `secrets`, …) at admission
time. A rejected create stores nothing. `ValidatingPolicy` stands in for a
ValidatingAdmissionPolicy: the emulator has no CEL, so a test gives the check
as a function of the UPDATE (old and new object, user), and a denial is the
apiserver's 403.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
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

    def load(self, objects: Iterable[dict]) -> "Rbac":
        """Allow what these Roles/ClusterRoles grant through these RoleBindings/ClusterRoleBindings.

        A RoleBinding grants its role's rules in the binding's namespace, a ClusterRoleBinding
        everywhere; subjects are ServiceAccounts, Users or Groups. Aggregated roles and
        nonResourceURLs are refused (nothing here would enforce them).
        """
        objects = list(objects)
        roles = {(o["kind"], (o["metadata"].get("namespace") if o["kind"] == "Role" else None),
                  o["metadata"]["name"]): o for o in objects if o.get("kind") in ("Role", "ClusterRole")}
        for binding in objects:
            if binding.get("kind") not in ("RoleBinding", "ClusterRoleBinding"):
                continue
            where = binding["metadata"].get("namespace") if binding["kind"] == "RoleBinding" else None
            ref = binding["roleRef"]
            role = roles.get((ref["kind"], where if ref["kind"] == "Role" else None, ref["name"]))
            if role is None:
                raise ValueError(f"{binding['kind']} {binding['metadata']['name']}: {ref['kind']} "
                                 f"{ref['name']} is not among the objects")
            if "aggregationRule" in role:
                raise ValueError(f"{ref['name']}: aggregated roles are not supported")
            for subject in binding.get("subjects") or []:
                who = (sa_username(subject["namespace"], subject["name"])
                       if subject["kind"] == "ServiceAccount" else subject["name"])
                for rule in role.get("rules") or []:
                    if rule.get("nonResourceURLs"):
                        raise ValueError(f"{ref['name']}: nonResourceURLs are not supported")
                    for group in rule.get("apiGroups") or []:
                        self.allow(who, list(rule["verbs"]), list(rule.get("resources") or []), group, where,
                                   list(rule["resourceNames"]) if rule.get("resourceNames") else None)
        return self

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


@dataclass(frozen=True)
class AdmissionRequest:
    """What a validating admission policy sees of an UPDATE (a PUT or a PATCH is an UPDATE)."""

    operation: str
    rt: ResourceType
    subresource: str | None
    namespace: str | None
    name: str
    username: str
    object: dict
    old_object: dict


@dataclass(frozen=True)
class ValidatingPolicy:
    """A ValidatingAdmissionPolicy with its binding (validationActions Deny), evaluated by ``check``.

    ``check`` returns None to admit, or the message of the validation that denies the request.
    """

    name: str
    check: Callable[[AdmissionRequest], str | None]
    binding: str = ""

    def validate(self, request: AdmissionRequest) -> None:
        message = self.check(request)
        if message is None:
            return
        rt = request.rt
        raise status.ApiError(status.status(
            403, "Forbidden", f'{rt.qualified} "{request.name}" is forbidden: ValidatingAdmissionPolicy '
            f"'{self.name}' with binding '{self.binding or self.name}' denied request: {message}",
            {"name": request.name, **({"group": rt.group} if rt.group else {}), "kind": rt.plural}))


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
