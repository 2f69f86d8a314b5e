"""The resource types the emulator serves and the discovery documents describing them.

One table drives routing, RBAC messages, Status details and discovery, so a
resource is added in exactly one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    verbs: tuple[str, ...] = ("create", "delete", "deletecollection", "get", "list", "patch",
                              "update", "watch")
    subresources: tuple[str, ...] = ()
    short_names: tuple[str, ...] = field(default=())

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        """`jobs.batch` / `pods`: how apiserver messages name a resource."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


JOBS = ResourceType("batch", "v1", "jobs", "Job", True, subresources=("status",))
PODS = ResourceType("", "v1", "pods", "Pod", True, subresources=("status", "log"),
                    short_names=("po",))
SECRETS = ResourceType("", "v1", "secrets", "Secret", True)
CONFIGMAPS = ResourceType("", "v1", "configmaps", "ConfigMap", True, short_names=("cm",))
EVENTS = ResourceType("", "v1", "events", "Event", True, short_names=("ev",))
SERVICEACCOUNTS = ResourceType("", "v1", "serviceaccounts", "ServiceAccount", True,
                               subresources=("token",), short_names=("sa",))
RESOURCEQUOTAS = ResourceType("", "v1", "resourcequotas", "ResourceQuota", True,
                              subresources=("status",), short_names=("quota",))
NAMESPACES = ResourceType("", "v1", "namespaces", "Namespace", False,
                          verbs=("create", "delete", "get", "list", "patch", "update", "watch"),
                          subresources=("status",), short_names=("ns",))
TOKENREVIEWS = ResourceType("authentication.k8s.io", "v1", "tokenreviews", "TokenReview", False,
                            verbs=("create",))

# Stored and served (read by the agent's kubernetes tool); no controller rolls them out. A Deployment
# has the scale subresource (autoscaling/v1 Scale: what `kubectl scale` and the agent's executor use).
DEPLOYMENTS = ResourceType("apps", "v1", "deployments", "Deployment", True, subresources=("status", "scale"),
                           short_names=("deploy",))
REPLICASETS = ResourceType("apps", "v1", "replicasets", "ReplicaSet", True, subresources=("status",),
                           short_names=("rs",))

ALL = (JOBS, PODS, SECRETS, CONFIGMAPS, EVENTS, SERVICEACCOUNTS, RESOURCEQUOTAS, NAMESPACES,
       TOKENREVIEWS, DEPLOYMENTS, REPLICASETS)
BY_PATH = {(rt.group, rt.version, rt.plural): rt for rt in ALL}
BY_KIND = {(rt.api_version, rt.kind): rt for rt in ALL}


def group_versions() -> dict[str, list[ResourceType]]:
    out: dict[str, list[ResourceType]] = {}
    for rt in ALL:
        out.setdefault(rt.api_version, []).append(rt)
    return out


def api_resource_list(api_version: str) -> dict:
    """`GET /api/v1` or `/apis/GROUP/VERSION` (APIResourceList)."""
    resources = []
    for rt in group_versions().get(api_version, []):
        entry = {"name": rt.plural, "singularName": rt.kind.lower(), "namespaced": rt.namespaced,
                 "kind": rt.kind, "verbs": list(rt.verbs)}
        if rt.short_names:
            entry["shortNames"] = list(rt.short_names)
        resources.append(entry)
        for sub in rt.subresources:
            verbs = {"status": ["get", "patch", "update"], "log": ["get"],
                     "token": ["create"], "scale": ["get", "patch", "update"]}[sub]
            kind = {"log": "Pod", "token": "TokenRequest", "scale": "Scale"}.get(sub, rt.kind)
            entry = {"name": f"{rt.plural}/{sub}", "singularName": "",
                     "namespaced": rt.namespaced, "kind": kind, "verbs": verbs}
            if sub == "scale":
                entry.update(group="autoscaling", version="v1")
            resources.append(entry)
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": api_version,
            "resources": resources}


def api_versions(server_address: str) -> dict:
    """`GET /api` (APIVersions)."""
    return {"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0",
                                            "serverAddress": server_address}]}


def api_group_list() -> dict:
    """`GET /apis` (APIGroupList)."""
    groups = []
    for api_version in group_versions():
        if "/" not in api_version:
            continue
        group, version = api_version.split("/")
        gv = {"groupVersion": api_version, "version": version}
        groups.append({"name": group, "versions": [gv], "preferredVersion": gv})
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


VERSION_INFO = {
    "major": "1",
    "minor": "33",
    "gitVersion": "v1.33.0-agentjobs-emulator",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2025-04-23T00:00:00Z",
    "goVersion": "go1.24.2",
    "compiler": "gc",
    "platform": "linux/amd64",
}
