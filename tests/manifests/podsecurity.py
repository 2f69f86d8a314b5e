"""The Pod Security Standards' ``restricted`` profile as explicit checks over a pod spec.

Written from the published standard (baseline + restricted controls, latest
version) so that a test can say which control a pod breaks, without an API
server's Pod Security Admission. ``violations`` returns one line per broken
control; an empty list means the pod is admitted under ``enforce: restricted``.
"""

from __future__ import annotations

from typing import Any

# Restricted: only these volume types.
ALLOWED_VOLUME_TYPES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
    "projected", "secret",
}
# Baseline: sysctls that may be set.
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        *pod.get("initContainers", []), *pod.get("containers", []), *pod.get("ephemeralContainers", []),
    ]


def violations(pod: dict[str, Any], annotations: dict[str, str] | None = None) -> list[str]:
    """Every ``restricted`` control the pod spec breaks (empty: admitted)."""
    annotations = annotations or {}
    found: list[str] = []
    psc = pod.get("securityContext") or {}
    containers = _containers(pod)

    # -- baseline ------------------------------------------------------------------------
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            found.append(f"host namespaces: {field} is true")
    if (psc.get("windowsOptions") or {}).get("hostProcess"):
        found.append("HostProcess: pod windowsOptions.hostProcess is true")
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if "hostPath" in kinds:
            found.append(f"hostPath volumes: volume {volume['name']!r}")
        if not kinds <= ALLOWED_VOLUME_TYPES:
            found.append(f"volume types: volume {volume['name']!r} is {sorted(kinds)}")
    for sysctl in psc.get("sysctls", []):
        if sysctl.get("name") not in SAFE_SYSCTLS:
            found.append(f"sysctls: {sysctl.get('name')} is not a safe sysctl")
    for key, value in annotations.items():
        if key.startswith("container.apparmor.security.beta.kubernetes.io/") and not (
            value == "runtime/default" or value.startswith("localhost/")
        ):
            found.append(f"AppArmor: annotation {key}={value}")
    for where, sc in [("pod", psc)] + [(f"container {c['name']!r}", c.get("securityContext") or {})
                                        for c in containers]:
        if (sc.get("appArmorProfile") or {}).get("type") == "Unconfined":
            found.append(f"AppArmor: {where} appArmorProfile Unconfined")
        selinux = sc.get("seLinuxOptions") or {}
        if selinux.get("type", "") not in SELINUX_TYPES or selinux.get("user") or selinux.get("role"):
            found.append(f"SELinux: {where} seLinuxOptions {selinux}")
        if (sc.get("seccompProfile") or {}).get("type") == "Unconfined":
            found.append(f"seccomp: {where} seccompProfile Unconfined")
        if sc.get("runAsUser") == 0:
            found.append(f"running as non-root user: {where} runAsUser 0")

    # -- per container (baseline and restricted) -----------------------------------------
    pod_nonroot = psc.get("runAsNonRoot") is True
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type") in ("RuntimeDefault", "Localhost")
    for c in containers:
        name = c["name"]
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            found.append(f"privileged: container {name!r}")
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            found.append(f"HostProcess: container {name!r}")
        if sc.get("procMount", "Default") != "Default":
            found.append(f"/proc mount: container {name!r} procMount {sc['procMount']}")
        for port in c.get("ports", []):
            if port.get("hostPort"):
                found.append(f"host ports: container {name!r} hostPort {port['hostPort']}")
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"privilege escalation: container {name!r} must set allowPrivilegeEscalation false")
        if sc.get("runAsNonRoot") is False or not (pod_nonroot or sc.get("runAsNonRoot") is True):
            found.append(f"running as non-root: container {name!r} is not runAsNonRoot")
        seccomp = (sc.get("seccompProfile") or {}).get("type")
        if not (seccomp in ("RuntimeDefault", "Localhost") or (seccomp is None and pod_seccomp)):
            found.append(f"seccomp: container {name!r} needs RuntimeDefault or Localhost")
        caps = sc.get("capabilities") or {}
        if "ALL" not in caps.get("drop", []):
            found.append(f"capabilities: container {name!r} must drop ALL")
        extra = set(caps.get("add", [])) - {"NET_BIND_SERVICE"}
        if extra:
            found.append(f"capabilities: container {name!r} adds {sorted(extra)}")
    return found
