"""The emulated node: binds pods to it and either lets tests drive them or really runs them.

`manual` mode (default): pods start Running at once and tests decide how
each container ends (`finish`, `oom`, `write_log`). `process` mode: every
container's `command`+`args` runs as a local subprocess with the pod's
environment and mounted files (see podfiles.py), a clean working directory,
stdout/stderr captured for `pods/log`, memory limit as RLIMIT_AS (an
allocation failure is reported as OOMKilled, exit code 137), pod
`activeDeadlineSeconds` and pod deletion as SIGTERM → grace → SIGKILL.
This is what lets end-to-end tests run the real agent "inside" a Job.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import resource
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from . import quantity
from .clock import parse_rfc3339, rfc3339
from .logs import LogBuffer
from .podfiles import MOUNT_ROOT_ENV, ConfigError, PodFiles, expand
from .resources import CONFIGMAPS, PODS, SECRETS, SERVICEACCOUNTS
from .tokens import NODE_NAME

if TYPE_CHECKING:
    from .cluster import Cluster

log = logging.getLogger(__name__)
POD_IP = "127.0.0.1"
OOM_MARKERS = (b"MemoryError", b"Cannot allocate memory", b"std::bad_alloc", b"out of memory")


def _container_id(uid: str, name: str, restart: int = 0) -> str:
    return "containerd://" + hashlib.sha256(f"{uid}/{name}/{restart}".encode()).hexdigest()


def _image_id(image: str) -> str:
    repo = image.split("@")[0].rsplit(":", 1)[0] if ":" in image.split("/")[-1] else image
    if "/" not in repo:
        repo = f"docker.io/library/{repo}"
    return f"{repo}@sha256:" + hashlib.sha256(image.encode()).hexdigest()


@dataclass
class PodRun:
    uid: str
    ns: str
    name: str
    tmp: Path
    procs: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)
    stderr_tail: dict[str, bytes] = field(default_factory=dict)
    task: asyncio.Task | None = None
    terminating: bool = False
    kill_reason: str | None = None
    finished: bool = False


class Kubelet:
    def __init__(self, cluster: "Cluster", mode: str = "manual", auto_start: bool = True,
                 extra_env: dict[str, str] | None = None, work_dir: Path | None = None) -> None:
        self.cluster, self.store, self.clock = cluster, cluster.store, cluster.clock
        self.mode, self.auto_start = mode, auto_start
        self.extra_env = dict(extra_env or {})
        self.work_dir = work_dir
        self._runs: dict[str, PodRun] = {}
        self._waiting: set[tuple[str, str]] = set()
        self.logs: dict[tuple[str, str], LogBuffer] = {}  # (pod uid, container)
        self.store.subscribe(self._on_event)

    # -- lifecycle -----------------------------------------------------------------------
    def is_running(self, pod: dict) -> bool:
        run = self._runs.get(pod["metadata"]["uid"])
        return run is not None and not run.finished

    async def stop(self) -> None:
        for run in list(self._runs.values()):
            self._signal(run, signal.SIGKILL)
            if run.task:
                run.task.cancel()
        await asyncio.gather(*(r.task for r in self._runs.values() if r.task),
                             return_exceptions=True)
        for run in list(self._runs.values()):
            shutil.rmtree(run.tmp, ignore_errors=True)
        self._runs.clear()

    def _soon(self, fn: Callable, *args) -> None:
        asyncio.get_running_loop().call_soon(fn, *args)

    def _on_event(self, ev) -> None:
        if ev.rt is PODS:
            meta, uid = ev.obj["metadata"], ev.obj["metadata"]["uid"]
            if ev.type == "ADDED" and not ev.obj["spec"].get("nodeName"):
                self._soon(self._bind, meta["namespace"], meta["name"], uid)
            elif ev.type == "MODIFIED" and meta.get("deletionTimestamp") and uid in self._runs:
                run = self._runs[uid]
                if not run.terminating:
                    run.terminating = True
                    grace = meta.get("deletionGracePeriodSeconds", 30)
                    asyncio.get_running_loop().create_task(self._terminate(run, grace))
            elif ev.type == "DELETED":
                self._waiting.discard((meta["namespace"], meta["name"]))
                run = self._runs.pop(uid, None)
                if run is not None:
                    self._signal(run, signal.SIGKILL)
                for key in [k for k in self.logs if k[0] == uid]:
                    self.logs.pop(key).close()
        elif ev.rt in (SECRETS, CONFIGMAPS, SERVICEACCOUNTS) and ev.type != "DELETED":
            ns = ev.obj["metadata"]["namespace"]
            for pod_ns, name in list(self._waiting):
                if pod_ns == ns:
                    self._waiting.discard((pod_ns, name))
                    self._soon(self._start, pod_ns, name)

    def _bind(self, ns: str, name: str, uid: str) -> None:
        """The scheduler's job: put the pod on our single node."""
        pod = self.store.get(PODS, ns, name)
        if pod is None or pod["metadata"]["uid"] != uid or pod["spec"].get("nodeName"):
            return
        now = rfc3339(self.clock.time())
        pod["spec"]["nodeName"] = NODE_NAME
        pod["status"] = {
            "phase": "Pending",
            "conditions": [
                {"type": "PodReadyToStartContainers", "status": "False", "lastProbeTime": None,
                 "lastTransitionTime": now},
                {"type": "Initialized", "status": "True", "lastProbeTime": None,
                 "lastTransitionTime": now},
                {"type": "Ready", "status": "False", "lastProbeTime": None,
                 "lastTransitionTime": now, "reason": "ContainersNotReady",
                 "message": "containers with unready status: ["
                 + " ".join(c["name"] for c in pod["spec"]["containers"]) + "]"},
                {"type": "ContainersReady", "status": "False", "lastProbeTime": None,
                 "lastTransitionTime": now, "reason": "ContainersNotReady"},
                {"type": "PodScheduled", "status": "True", "lastProbeTime": None,
                 "lastTransitionTime": now},
            ],
            "hostIP": POD_IP, "hostIPs": [{"ip": POD_IP}],
            "startTime": now,
            "qosClass": pod.get("status", {}).get("qosClass", "BestEffort"),
            "containerStatuses": [self._cs(pod, c, {"waiting": {"reason": "ContainerCreating"}})
                                  for c in pod["spec"]["containers"]],
        }
        self.store.update(PODS, pod)
        self.cluster.recorder.record(pod, "Normal", "Scheduled",
                                     f"Successfully assigned {ns}/{name} to {NODE_NAME}",
                                     "default-scheduler")
        self._start(ns, name)

    def _start(self, ns: str, name: str) -> None:
        pod = self.store.get(PODS, ns, name)
        if pod is None or pod["metadata"].get("deletionTimestamp"):
            return
        if self.mode == "process":
            uid = pod["metadata"]["uid"]
            if uid in self._runs:
                return
            tmp = Path(tempfile.mkdtemp(prefix=f"pod-{name}-", dir=self.work_dir))
            run = PodRun(uid, ns, name, tmp)
            self._runs[uid] = run
            run.task = asyncio.get_running_loop().create_task(self._run(run),
                                                              name=f"kubelet-{name}")
        elif self.auto_start:
            self.start(ns, name)

    # -- status helpers ------------------------------------------------------------------
    def _cs(self, pod: dict, c: dict, state: dict, ready: bool = False, restarts: int = 0,
            last: dict | None = None) -> dict:
        cs = {"name": c["name"], "image": c.get("image", ""), "imageID": "",
              "ready": ready, "restartCount": restarts, "state": state, "lastState": last or {},
              "started": "running" in state}
        if "waiting" not in state:
            cs["imageID"] = _image_id(c.get("image", ""))
            cs["containerID"] = _container_id(pod["metadata"]["uid"], c["name"], restarts)
        return cs

    def _update(self, ns: str, name: str, uid: str, mutate: Callable[[dict], None]) -> dict | None:
        pod = self.store.get(PODS, ns, name)
        if pod is None or pod["metadata"]["uid"] != uid:
            return None
        mutate(pod)
        return self.store.update(PODS, pod)

    @staticmethod
    def _set_conditions(pod: dict, ready: bool, now: str, reason: str | None = None) -> None:
        for cond in pod["status"].get("conditions") or []:
            if cond["type"] in ("Ready", "ContainersReady"):
                new = "True" if ready else "False"
                if cond["status"] != new:
                    cond["lastTransitionTime"] = now
                cond["status"] = new
                cond.pop("message", None)
                if ready:
                    cond.pop("reason", None)
                elif reason:
                    cond["reason"] = reason
            if cond["type"] == "PodReadyToStartContainers" and ready:
                cond["status"] = "True"
                cond["lastTransitionTime"] = now

    def _set_phase_if_done(self, pod: dict, now: str) -> None:
        statuses = pod["status"].get("containerStatuses") or []
        if statuses and all("terminated" in cs["state"] for cs in statuses):
            ok = all(cs["state"]["terminated"]["exitCode"] == 0 for cs in statuses)
            pod["status"]["phase"] = "Succeeded" if ok else "Failed"
            self._set_conditions(pod, False, now, "PodCompleted" if ok else "PodFailed")
            for cond in pod["status"]["conditions"]:
                if cond["type"] == "PodReadyToStartContainers":
                    cond["status"] = "False"
            pod["status"].pop("podIP", None)

    def _mark_running(self, ns: str, name: str, uid: str, started: float) -> None:
        now = rfc3339(started)

        def mutate(pod: dict) -> None:
            pod["status"]["phase"] = "Running"
            pod["status"]["podIP"] = POD_IP
            pod["status"]["podIPs"] = [{"ip": POD_IP}]
            pod["status"]["containerStatuses"] = [
                self._cs(pod, c, {"running": {"startedAt": now}}, ready=True)
                for c in pod["spec"]["containers"]]
            self._set_conditions(pod, True, now)
        if self._update(ns, name, uid, mutate):
            pod = self.store.get(PODS, ns, name)
            for c in pod["spec"]["containers"]:
                self.logs.setdefault((uid, c["name"]), LogBuffer())
                self.cluster.recorder.record(pod, "Normal", "Started",
                                             f"Started container {c['name']}", "kubelet")

    def _mark_terminated(self, ns: str, name: str, uid: str, container: str, exit_code: int,
                         reason: str, message: str | None = None) -> dict | None:
        now = rfc3339(self.clock.time())

        def mutate(pod: dict) -> None:
            for cs in pod["status"].get("containerStatuses") or []:
                if cs["name"] != container or "terminated" in cs["state"]:
                    continue
                started = (cs["state"].get("running") or {}).get("startedAt", now)
                term = {"exitCode": exit_code, "reason": reason, "startedAt": started,
                        "finishedAt": now, "containerID": cs.get("containerID")
                        or _container_id(uid, container)}
                if message:
                    term["message"] = message
                cs.update(state={"terminated": term}, ready=False, started=False)
                cs.setdefault("containerID", term["containerID"])
                cs["imageID"] = cs["imageID"] or _image_id(cs["image"])
            self._set_phase_if_done(pod, now)
        buf = self.logs.get((uid, container))
        if buf:
            buf.close()
        return self._update(ns, name, uid, mutate)

    # -- manual mode ---------------------------------------------------------------------
    def _pod(self, ns: str, name: str) -> dict:
        pod = self.store.get(PODS, ns, name)
        if pod is None:
            raise KeyError(f"pod {ns}/{name} not found")
        return pod

    def start(self, ns: str, name: str) -> None:
        """Manual mode: containers are running and ready."""
        pod = self._pod(ns, name)
        self._mark_running(ns, name, pod["metadata"]["uid"], self.clock.time())

    def write_log(self, ns: str, name: str, text: str, container: str | None = None) -> None:
        pod = self._pod(ns, name)
        c = container or pod["spec"]["containers"][0]["name"]
        buf = self.logs.setdefault((pod["metadata"]["uid"], c), LogBuffer())
        for line in text.encode().splitlines(keepends=True):
            buf.write(self.clock.time(), line)

    def finish(self, ns: str, name: str, exit_code: int = 0, reason: str | None = None,
               message: str | None = None, container: str | None = None) -> None:
        """Manual mode: the container(s) exit with this code."""
        pod = self._pod(ns, name)
        reason = reason or ("Completed" if exit_code == 0 else "Error")
        for c in pod["spec"]["containers"]:
            if container in (None, c["name"]):
                self._mark_terminated(ns, name, pod["metadata"]["uid"], c["name"], exit_code,
                                      reason, message)

    def oom(self, ns: str, name: str, container: str | None = None) -> None:
        """Manual mode: the kernel OOM killer ends the container."""
        self.finish(ns, name, 137, "OOMKilled", container=container)

    # -- process mode --------------------------------------------------------------------
    def _base_env(self, pod: dict, root: Path) -> dict[str, str]:
        port = str(self.cluster.port or 443)
        env = {
            "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get(
                "PATH", "/usr/local/bin:/usr/bin:/bin"),
            "HOSTNAME": pod["metadata"]["name"],
            "KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": port,
            MOUNT_ROOT_ENV: str(root),
        }
        if pod["spec"].get("enableServiceLinks", True):
            env.update({"KUBERNETES_PORT": f"tcp://127.0.0.1:{port}",
                        "KUBERNETES_SERVICE_PORT_HTTPS": port})
        env.update(self.extra_env)
        return env

    @staticmethod
    def _limits(container: dict) -> Callable[[], None] | None:
        mem = ((container.get("resources") or {}).get("limits") or {}).get("memory")
        if not mem:
            return None
        limit = int(quantity.parse(mem))

        def apply() -> None:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        return apply

    async def _run(self, run: PodRun) -> None:
        pod = self.store.get(PODS, run.ns, run.name)
        if pod is None:
            return
        root, uid = run.tmp / "root", run.uid
        files = PodFiles(self.cluster, pod, root)
        try:
            envs = {}
            for c in pod["spec"]["containers"]:
                files.materialise(c)
                envs[c["name"]] = files.env(c, self._base_env(pod, root))
        except ConfigError as exc:
            self._runs.pop(uid, None)
            shutil.rmtree(run.tmp, ignore_errors=True)
            self._waiting.add((run.ns, run.name))
            self._set_waiting(pod, exc)
            return
        started = self.clock.time()
        pumps: list[asyncio.Task] = []
        failures: dict[str, tuple[int, str, str]] = {}
        for c in pod["spec"]["containers"]:
            env = envs[c["name"]]
            argv = [expand(a, env) for a in (c.get("command") or []) + (c.get("args") or [])]
            cwd = (files.mount_path(c["workingDir"]) if c.get("workingDir")
                   else run.tmp / "work" / c["name"])
            cwd.mkdir(parents=True, exist_ok=True)
            buf = self.logs.setdefault((uid, c["name"]), LogBuffer())
            try:
                if not argv:
                    raise FileNotFoundError("container has no command (images are not run)")
                proc = await asyncio.create_subprocess_exec(
                    *argv, cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                    start_new_session=True, preexec_fn=self._limits(c), limit=2**20)
            except OSError as exc:
                failures[c["name"]] = (128, "StartError", f"failed to create containerd task: "
                                       f"exec: {argv[:1]}: {exc}")
                continue
            run.procs[c["name"]] = proc
            pumps.append(asyncio.create_task(self._pump(proc.stdout, buf, None, "")))
            pumps.append(asyncio.create_task(self._pump(proc.stderr, buf, run, c["name"])))
        self._mark_running(run.ns, run.name, uid, started)
        for name, (code, reason, msg) in failures.items():
            self._mark_terminated(run.ns, run.name, uid, name, code, reason, msg)
        deadline = pod["spec"].get("activeDeadlineSeconds")
        watchdog = (asyncio.create_task(self._deadline(run, started + deadline))
                    if deadline else None)
        try:
            await asyncio.gather(*(self._wait(run, pod, name, proc, pumps)
                                   for name, proc in run.procs.items()))
        finally:
            if watchdog:
                watchdog.cancel()
            run.finished = True
        if run.kill_reason == "DeadlineExceeded":
            def mark(p: dict) -> None:
                p["status"].update(phase="Failed", reason="DeadlineExceeded", message=(
                    "Pod was active on the node longer than the specified deadline"))
            self._update(run.ns, run.name, uid, mark)
        if run.terminating:
            pod_now = self.store.get(PODS, run.ns, run.name)
            if pod_now is not None and pod_now["metadata"]["uid"] == uid:
                self.store.remove(PODS, run.ns, run.name)
        self._runs.pop(uid, None)
        shutil.rmtree(run.tmp, ignore_errors=True)

    async def _pump(self, stream: asyncio.StreamReader, buf: LogBuffer, run: PodRun | None,
                    container: str) -> None:
        while line := await stream.readline():
            buf.write(self.clock.time(), line)
            if run is not None:
                run.stderr_tail[container] = (run.stderr_tail.get(container, b"") + line)[-8192:]

    async def _wait(self, run: PodRun, pod: dict, name: str, proc: asyncio.subprocess.Process,
                    pumps: list[asyncio.Task]) -> None:
        rc = await proc.wait()
        await asyncio.gather(*pumps, return_exceptions=True)
        container = next(c for c in pod["spec"]["containers"] if c["name"] == name)
        limited = ((container.get("resources") or {}).get("limits") or {}).get("memory")
        exit_code = 128 - rc if rc < 0 else rc
        tail = run.stderr_tail.get(name, b"")
        if limited and rc != 0 and not run.terminating and run.kill_reason is None and (
                rc in (-signal.SIGKILL, -signal.SIGSEGV, -signal.SIGABRT)
                or any(m in tail for m in OOM_MARKERS)):
            exit_code, reason = 137, "OOMKilled"
        else:
            reason = "Completed" if exit_code == 0 else "Error"
        self._mark_terminated(run.ns, run.name, run.uid, name, exit_code, reason)

    def _signal(self, run: PodRun, sig: int) -> None:
        for proc in run.procs.values():
            if proc.returncode is None:
                try:
                    os.killpg(proc.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass

    async def _terminate(self, run: PodRun, grace: int) -> None:
        """Pod deletion: SIGTERM, then SIGKILL once the grace period (cluster clock) ends."""
        pod = self.store.get(PODS, run.ns, run.name)
        if pod:
            for c in pod["spec"]["containers"]:
                self.cluster.recorder.record(pod, "Normal", "Killing",
                                             f"Stopping container {c['name']}", "kubelet")
        if not run.procs:
            if run.task:
                run.task.cancel()
            run.finished = True
            if pod is not None:
                self.store.remove(PODS, run.ns, run.name)
            return
        self._signal(run, signal.SIGTERM)
        await self.clock.sleep(grace)
        self._signal(run, signal.SIGKILL)

    async def _deadline(self, run: PodRun, when: float) -> None:
        await self.clock.sleep_until(when)
        run.kill_reason = "DeadlineExceeded"
        pod = self.store.get(PODS, run.ns, run.name)
        if pod:
            self.cluster.recorder.record(pod, "Normal", "DeadlineExceeded", "Pod was active on "
                                         "the node longer than the specified deadline", "kubelet")
        self._signal(run, signal.SIGTERM)
        await self.clock.sleep(pod["spec"].get("terminationGracePeriodSeconds", 30) if pod else 0)
        self._signal(run, signal.SIGKILL)

    def _set_waiting(self, pod: dict, exc: ConfigError) -> None:
        def mutate(p: dict) -> None:
            for cs in p["status"].get("containerStatuses") or []:
                cs["state"] = {"waiting": {"reason": exc.reason, "message": exc.message}}
        self._update(pod["metadata"]["namespace"], pod["metadata"]["name"],
                     pod["metadata"]["uid"], mutate)
        event_reason = "FailedMount" if exc.reason == "ContainerCreating" else "Failed"
        self.cluster.recorder.record(pod, "Warning", event_reason, exc.message, "kubelet")

    # -- logs ----------------------------------------------------------------------------
    def log_buffer(self, pod: dict, container: str) -> LogBuffer | None:
        return self.logs.get((pod["metadata"]["uid"], container))

    @staticmethod
    def started_at(pod: dict) -> float | None:
        start = (pod.get("status") or {}).get("startTime")
        return parse_rfc3339(start) if start else None
