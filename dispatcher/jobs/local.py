"""``LocalRuntime``: the embedded-default ``JobRuntime`` — one contained subprocess per Job.

Runs the first container of a ``batch/v1`` Job manifest as a local process (see
``process.py`` for limits, deadline kill and OOM classification), so the
dispatcher works on a laptop or a single VM without Kubernetes.

**Layout under ``state_dir``** (the "cluster" every LocalRuntime sharing it sees)::

    jobs/<name>/record.json   durable record (like the Job object): state, pid, times, outcome
    jobs/<name>/owner.lock    flock held by the runtime supervising the process
    jobs/<name>/pid           "<pid> <start ticks>", written by the child before exec
    jobs/<name>/std{out,err}.log  the container's output (kept with the record, like pod logs)
    jobs/<name>/cancel        marker: a cancel requested by another runtime instance (holds its reason)
    work/<name>-<rand>/       the Job's clean temporary directory, removed when it ends:
        home/ (HOME, default cwd)  tmp/ (TMPDIR)  mounts/ (AGENTJOBS_MOUNT_ROOT)

**Exactly one process per Job name**, also across runtimes in different processes:
a claim is a fully written staging directory renamed onto ``jobs/<name>`` (rename
fails if the name exists), so there is never a half-written record. The record
stays after the Job ends — like a finished Job object — until its ending is
acknowledged and ``spec.ttlSecondsAfterFinished`` has passed (forever without
it); *while it exists launching the same name answers ALREADY_EXISTS*, afterwards
the name is free again (expired records are removed lazily by
``launch``/``active``). ``cancel`` removes the record as soon as the CANCELLED
ending is acknowledged, as deleting the Job does on Kubernetes; its ``reason``
is the CANCELLED event's message. ``status(name)`` reads the record (adopting
crash leftovers first), so a restarted dispatcher learns that a Job ended.

**Ownership and crashes.** The runtime that launched a Job holds an exclusive
``flock`` on its ``owner.lock`` from launch until the Job's ending is
acknowledged; the kernel drops it when that process dies. A runtime that finds
an unacknowledged record with a free lock (its owner crashed or closed) takes
the lock and, if the Job had ended, emits its terminal event again; if it was
running, it either *adopts* the still-running process (``pid`` + start time
match: it keeps counting in ``active()``, its deadline is enforced and
``cancel``/``close`` stop it; a non-parent cannot learn an exit status, so its
end is reported as LOST) or, if the process is gone, reports LOST. State changes
are written under the lock, so two runtimes never report the same ending.

**Events.** ``events()`` yields RUNNING after the spawn and one terminal event
per Job this instance supervises: SUCCEEDED (exit 0), FAILED with
DEADLINE_EXCEEDED / OOM_KILLED / AGENT_ERROR (the message carries the exit code
and at most 2 KB of stderr tail with secret values masked), CANCELLED after
``cancel()``/``close()``, LOST for crash leftovers. Like a Kubernetes finalizer,
an ending is emitted again by the next runtime until ``acknowledge(event)`` marks
it reported; only then do TTL expiry and a cancel's removal happen. Events carry
the Job's annotations plus ``uid`` (the incarnation of the name). ``active()``
lists every non-terminal Job in ``state_dir``, including ones another live
runtime supervises (their events go to that runtime). One consumer per stream.

**Environment.** Nothing of the dispatcher's environment is passed. The process
gets ``PATH`` (the usual container default), ``HOME``, ``TMPDIR``, the container's
``envFrom``/``env`` (value with ``$(VAR)`` expansion; ``valueFrom`` fieldRef,
resourceFieldRef and secretKeyRef, all Secrets being served from the ``secret``
mapping passed to ``launch``), then ``AGENTJOBS_MOUNT_ROOT``. Volume mounts are
re-rooted under it: ``secret`` volumes become files ``<root><mountPath>/<key>``
(mode 0400 unless the manifest sets one), ``emptyDir`` a directory,
``downwardAPI`` files of field values. The pod's ``metadata.name`` is the Job
name (there is exactly one pod). Local divergences: the image is ignored (the
command must be explicit), ``backoffLimit`` retries are not made (one attempt),
ConfigMaps and ServiceAccount token projections are rejected as invalid.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import math
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import structlog

from schemas import FailureReason
from schemas.errors import PermanentError, TemporaryError

from dispatcher.jobs import process
from dispatcher.jobs.process import Cgroup2, Limits, ProcessResult, ProcessSpec, RunningProcess
from schemas.redaction import MASK, mask_text
from dispatcher.jobs.runtime import CANCEL_REASON, JobState, JobStatus, LaunchOutcome, RuntimeEvent

log = structlog.stdlib.get_logger(__name__)

INVESTIGATION_LABEL = "agentjobs.dev/investigation-id"
UID_KEY = "uid"  # in RuntimeEvent.annotations: which incarnation of the name the event is about
MOUNT_ROOT_ENV = "AGENTJOBS_MOUNT_ROOT"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
STDERR_TAIL_BYTES = 2048  # bytes of stderr quoted in a failure message
SECRET_FILE_MODE = 0o400
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?$")
_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
_PENDING = "pending"  # claimed, process not started yet
_LIVE_STATES = frozenset({_PENDING, JobState.RUNNING.value})


def _utcnow() -> datetime:
    return datetime.now(UTC)


# --- the durable record ---------------------------------------------------------------------


class JobRecord(msgspec.Struct, kw_only=True):
    """What survives a runtime restart about one Job (``jobs/<name>/record.json``)."""

    name: str
    uid: str
    investigation_id: str
    state: str  # "pending" or a JobState value
    created_at: datetime
    owner_pid: int  # the runtime process that launched it
    work_dir: str
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}
    deadline_seconds: int | None = None
    ttl_seconds: int | None = None  # spec.ttlSecondsAfterFinished; None: kept forever
    grace_seconds: float = 30.0
    pid: int | None = None
    pid_start_ticks: int | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    reason: FailureReason | None = None
    message: str = ""
    exit_code: int | None = None
    cpu_seconds: float | None = None
    limiter: str = ""
    reported: bool = False  # the terminal event was acknowledged (the finalizer is gone)
    deleted: bool = False  # cancel() asked to remove the Job: gone once its ending is reported


_encode = msgspec.json.Encoder().encode
_decode_record = msgspec.json.Decoder(JobRecord).decode


def _write_record(job_dir: Path, record: JobRecord) -> None:
    tmp = job_dir / f"record.json.{uuid.uuid4().hex[:8]}"
    tmp.write_bytes(_encode(record))
    os.replace(tmp, job_dir / "record.json")


def _read_record(job_dir: Path) -> JobRecord | None:
    try:
        return _decode_record((job_dir / "record.json").read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, msgspec.DecodeError) as exc:
        log.warning("local_job_record_unreadable", job_dir=str(job_dir), error=str(exc))
        return None


def read_records(state_dir: Path) -> list[JobRecord]:
    """Every Job record under ``state_dir`` — read only, for ``agentjobs status``."""
    jobs = state_dir / "jobs"
    if not jobs.is_dir():
        return []
    return [r for d in sorted(jobs.iterdir()) if d.is_dir() and (r := _read_record(d)) is not None]


def is_live(record: JobRecord) -> bool:
    """True while the record's Job has not ended."""
    return record.state in _LIVE_STATES


# --- manifest → plan (pure) -----------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class JobPlan:
    """Everything needed to start one Job locally, derived from the manifest without I/O."""

    name: str
    investigation_id: str
    labels: dict[str, str]
    annotations: dict[str, str]
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    dirs: list[Path]  # created (0700) before the files
    files: list[tuple[Path, bytes, int]]  # (path, content, mode)
    read_only_dirs: list[Path]
    limits: Limits
    memory_limit: str  # as written in the manifest, for messages
    deadline_seconds: int | None
    ttl_seconds: int | None
    grace_seconds: float
    secret_values: list[bytes] = field(default_factory=list)  # masked in messages


def _invalid(message: str) -> PermanentError:
    return PermanentError("invalid_job", message)


def _dict(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _invalid(f"{where} must be an object")
    return dict(value)


def _str_map(value: Any, where: str) -> dict[str, str]:
    return {str(k): str(v) for k, v in _dict(value, where).items()}


def _positive_int(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _invalid(f"{where} must be a non-negative integer, got {value!r}")
    return value


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion; ``$$`` escapes; unknown references stay as written."""

    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR_REF.sub(repl, text)


def build_plan(
    job: Mapping[str, Any],
    secret: Mapping[str, bytes] | None,
    work_dir: Path,
    *,
    default_grace: float = 30.0,
) -> JobPlan:
    """Translate a batch/v1 Job manifest into a local plan; raises PermanentError("invalid_job")."""
    meta = _dict(job.get("metadata"), "metadata")
    name = meta.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise _invalid(f"metadata.name must be a DNS-1123 label of ≤ 63 characters: {name!r}")
    labels = _str_map(meta.get("labels"), "metadata.labels")
    annotations = _str_map(meta.get("annotations"), "metadata.annotations")
    spec = _dict(job.get("spec"), "spec")
    template = _dict(spec.get("template"), "spec.template")
    tmeta = _dict(template.get("metadata"), "spec.template.metadata")
    pod_spec = _dict(template.get("spec"), "spec.template.spec")
    pod_labels = _str_map(tmeta.get("labels"), "spec.template.metadata.labels")
    investigation_id = labels.get(INVESTIGATION_LABEL)
    if not investigation_id:
        raise _invalid(f"metadata.labels[{INVESTIGATION_LABEL!r}] is missing")
    containers = pod_spec.get("containers")
    if not isinstance(containers, list) or not containers:
        raise _invalid("spec.template.spec.containers must hold one container")
    container = _dict(containers[0], "containers[0]")
    deadline = _positive_int(spec.get("activeDeadlineSeconds"), "spec.activeDeadlineSeconds")
    if deadline == 0:
        raise _invalid("spec.activeDeadlineSeconds must be positive")
    ttl = _positive_int(spec.get("ttlSecondsAfterFinished"), "spec.ttlSecondsAfterFinished")
    grace_raw = _positive_int(pod_spec.get("terminationGracePeriodSeconds"),
                              "terminationGracePeriodSeconds")
    grace = float(grace_raw) if grace_raw is not None else default_grace

    resources = _dict(container.get("resources"), "resources")
    limits_spec = _dict(resources.get("limits"), "resources.limits")
    try:
        mem = process.memory_bytes(limits_spec["memory"]) if "memory" in limits_spec else None
        cores = process.cpu_cores(limits_spec["cpu"]) if "cpu" in limits_spec else None
    except ValueError as exc:
        raise _invalid(f"resources.limits: {exc}") from None
    # A pod throttled to `cores` for the whole deadline can use at most cores × deadline
    # CPU-seconds; RLIMIT_CPU enforces that budget as a backstop (no CPU-rate limit without
    # cgroups).
    cpu_budget = math.ceil(cores * deadline) + 1 if cores is not None and deadline else None
    limits = Limits(memory_bytes=mem, cpu_cores=cores, cpu_seconds=cpu_budget)

    mount_root = work_dir / "mounts"
    home, tmp = work_dir / "home", work_dir / "tmp"
    pod = {
        "metadata.name": name,
        "metadata.namespace": str(meta.get("namespace") or "default"),
        "metadata.uid": "",
        "spec.serviceAccountName": str(pod_spec.get("serviceAccountName") or "default"),
        "spec.nodeName": "localhost",
        "status.podIP": "127.0.0.1",
        "status.hostIP": "127.0.0.1",
    }
    pod_labels = {**pod_labels, "job-name": name, "batch.kubernetes.io/job-name": name}
    pod_annotations = _str_map(tmeta.get("annotations"), "spec.template.metadata.annotations")
    secret = dict(secret or {})
    used_secrets: list[bytes] = []

    def field_value(path: str) -> str:
        if m := re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path):
            source = pod_labels if m.group(1) == "labels" else pod_annotations
            return source.get(m.group(2), "")
        if path in pod:
            return pod[path]
        raise _invalid(f"unsupported fieldRef fieldPath {path!r}")

    def secret_key(ref: Mapping[str, Any], what: str) -> bytes | None:
        key = ref.get("key")
        if key in secret:
            used_secrets.append(secret[key])
            return secret[key]
        if ref.get("optional"):
            return None
        raise _invalid(f"{what}: key {key!r} not in the Job's secret")

    env: dict[str, str] = {"PATH": DEFAULT_PATH, "HOME": str(home), "TMPDIR": str(tmp)}
    for src in container.get("envFrom") or []:
        src = _dict(src, "envFrom[]")
        if "secretRef" not in src:
            raise _invalid("envFrom supports secretRef only in the local runtime")
        for key, value in secret.items():
            used_secrets.append(value)
            env[str(src.get("prefix", "")) + key] = value.decode("utf-8", "replace")
    for var in container.get("env") or []:
        var = _dict(var, "env[]")
        var_name = var.get("name")
        if not isinstance(var_name, str) or not var_name:
            raise _invalid("env[].name is required")
        if "valueFrom" not in var:
            env[var_name] = expand(str(var.get("value", "")), env)
            continue
        source = _dict(var["valueFrom"], f"env {var_name}.valueFrom")
        if "fieldRef" in source:
            env[var_name] = field_value(str(_dict(source["fieldRef"], "fieldRef").get("fieldPath")))
        elif "secretKeyRef" in source:
            value = secret_key(_dict(source["secretKeyRef"], "secretKeyRef"), f"env {var_name}")
            if value is not None:
                env[var_name] = value.decode("utf-8", "replace")
        elif "resourceFieldRef" in source:
            env[var_name] = _resource_value(_dict(source["resourceFieldRef"], "resourceFieldRef"),
                                            limits_spec)
        else:
            raise _invalid(f"env {var_name}: unsupported valueFrom {sorted(source)}")
    env[MOUNT_ROOT_ENV] = str(mount_root)

    command = [str(c) for c in container.get("command") or []]
    args = [str(a) for a in container.get("args") or []]
    if not command:
        raise _invalid("the local runtime needs an explicit container command (images are "
                       "not run locally)")
    argv = [expand(part, env) for part in command + args]

    dirs = [work_dir / "home", work_dir / "tmp", mount_root]
    files: list[tuple[Path, bytes, int]] = []
    read_only: list[Path] = []
    volumes = {str(v.get("name")): _dict(v, "volumes[]") for v in pod_spec.get("volumes") or []}
    for mount in container.get("volumeMounts") or []:
        mount = _dict(mount, "volumeMounts[]")
        volume = volumes.get(str(mount.get("name")))
        if volume is None:
            raise _invalid(f"volumeMount {mount.get('name')!r} names no volume")
        if mount.get("subPath"):
            raise _invalid("volumeMounts[].subPath is not supported by the local runtime")
        target = _under(mount_root, str(mount.get("mountPath") or ""))
        dirs.append(target)
        if "emptyDir" in volume:
            continue
        if "secret" in volume:
            spec_ = _dict(volume["secret"], "volumes[].secret")
            mode = int(spec_.get("defaultMode", SECRET_FILE_MODE))
            items = spec_.get("items") or [{"key": k, "path": k} for k in sorted(secret)]
            for item in items:
                item = _dict(item, "secret.items[]")
                value = secret_key({"key": item.get("key"), "optional": spec_.get("optional")},
                                   f"secret volume {mount.get('name')}")
                if value is not None:
                    files.append((_under(target, str(item.get("path"))), value,
                                  int(item.get("mode", mode))))
            read_only.append(target)
        elif "downwardAPI" in volume:
            spec_ = _dict(volume["downwardAPI"], "volumes[].downwardAPI")
            mode = int(spec_.get("defaultMode", 0o444))
            for item in spec_.get("items") or []:
                item = _dict(item, "downwardAPI.items[]")
                path = str(_dict(item.get("fieldRef"), "fieldRef").get("fieldPath"))
                files.append((_under(target, str(item.get("path"))),
                              field_value(path).encode(), int(item.get("mode", mode))))
            read_only.append(target)
        else:
            kinds = sorted(k for k in volume if k != "name")
            raise _invalid(f"volume {mount.get('name')!r}: {kinds} not supported by the local "
                           "runtime (secret, emptyDir, downwardAPI are)")
    working_dir = container.get("workingDir")
    cwd = _under(mount_root, str(working_dir)) if working_dir else home
    if working_dir:
        dirs.append(cwd)
    return JobPlan(
        name=name, investigation_id=investigation_id, labels=labels, annotations=annotations,
        argv=argv, env=env, cwd=cwd, dirs=dirs, files=files, read_only_dirs=read_only,
        limits=limits, memory_limit=str(limits_spec.get("memory", "")),
        deadline_seconds=deadline, ttl_seconds=ttl, grace_seconds=grace,
        secret_values=[v for v in used_secrets if v],
    )


def _under(root: Path, path: str) -> Path:
    """``root`` + an absolute container path, refusing escapes ("..")."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise _invalid(f"invalid path {path!r}")
    return root.joinpath(*parts)


def _resource_value(ref: Mapping[str, Any], limits: Mapping[str, Any]) -> str:
    resource = str(ref.get("resource", ""))
    kind, _, what = resource.partition(".")
    if kind != "limits" or what not in ("cpu", "memory"):
        raise _invalid(f"resourceFieldRef {resource!r}: only limits.cpu/limits.memory locally")
    value = limits.get(what, str(os.cpu_count() or 1) if what == "cpu" else "0")
    try:
        amount = process.parse_quantity(value) / process.parse_quantity(ref.get("divisor") or "1")
    except (ValueError, ArithmeticError) as exc:
        raise _invalid(f"resourceFieldRef {resource!r}: {exc}") from None
    return str(math.ceil(amount))


def redact_text(text: str, secrets: list[bytes]) -> str:
    """Mask secret values (whole, and each long line of multi-line ones) and token shapes."""
    needles: set[str] = set()
    for value in secrets:
        decoded = value.decode("utf-8", "replace").strip()
        if len(decoded) >= 4:
            needles.add(decoded)
        needles.update(line.strip() for line in decoded.splitlines() if len(line.strip()) >= 8)
    for needle in sorted(needles, key=len, reverse=True):
        text = text.replace(needle, MASK)
    return mask_text(text)


def stderr_tail(path: Path, secrets: list[bytes], limit: int = STDERR_TAIL_BYTES) -> str:
    """The redacted last ``limit`` bytes of a log file."""
    text = redact_text(process.read_tail(path), secrets).rstrip()
    encoded = text.encode()
    if len(encoded) > limit:
        text = "…" + encoded[-limit:].decode("utf-8", "ignore")
    return text


# --- the runtime ----------------------------------------------------------------------------


@dataclass(eq=False)
class _Supervised:
    """A Job this runtime instance is responsible for reporting."""

    name: str
    job_dir: Path
    record: JobRecord
    lock_fd: int
    proc: RunningProcess | process.ForeignProcess | None = None
    secrets: list[bytes] = field(default_factory=list)
    memory_limit: str = ""
    task: asyncio.Task[None] | None = None
    cancel_requested: bool = False
    cancel_reason: str = CANCEL_REASON
    close_requested: bool = False
    finished: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)


class LocalRuntime:
    """JobRuntime that runs each Job as a contained local subprocess (see module docstring)."""

    def __init__(
        self,
        state_dir: Path | str,
        *,
        clock: Callable[[], datetime] = _utcnow,
        grace_seconds: float = 30.0,
        cgroup_parent: Path | str | None = None,
        use_cgroup: bool = True,
    ) -> None:
        self.state_dir = Path(state_dir).absolute()
        self._jobs = self.state_dir / "jobs"
        self._work = self.state_dir / "work"
        self._staging = self.state_dir / "staging"
        self._trash = self.state_dir / "trash"
        for d in (self._jobs, self._work, self._staging, self._trash):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._clock = clock
        self._grace = grace_seconds
        self._cgroup_parent = Path(cgroup_parent) if cgroup_parent else None
        self._use_cgroup = use_cgroup
        self._cgroup: Cgroup2 | None = None
        self._supervised: dict[str, _Supervised] = {}
        self._queue: asyncio.Queue[RuntimeEvent | None] = asyncio.Queue()
        self._started = False
        self._closed = False

    # -- JobRuntime ----------------------------------------------------------------------------

    @property
    def where(self) -> str:
        return f"local/{self.state_dir}"

    async def launch(
        self, job: Mapping[str, Any], *, secret: Mapping[str, bytes] | None = None
    ) -> LaunchOutcome:
        """Start the Job unless its name exists (ALREADY_EXISTS); raises Permanent/Temporary."""
        if self._closed:
            raise TemporaryError("local runtime is closed")
        self._ensure_started()
        name = str(_dict(job.get("metadata"), "metadata").get("name", ""))
        work_dir = self._work / f"{name}-{uuid.uuid4().hex[:8]}"
        plan = build_plan(job, secret, work_dir, default_grace=self._grace)
        _check_executable(plan)
        job_dir = self._jobs / name
        self._collect_if_expired(job_dir)
        try:
            claimed = self._claim(plan, work_dir)
        except OSError as exc:
            raise TemporaryError(f"cannot record Job {name}: {exc.strerror or exc}") from exc
        if claimed is None:
            log.info("local_job_exists", job_name=name, investigation_id=plan.investigation_id)
            return LaunchOutcome.ALREADY_EXISTS
        try:
            self._materialise(plan, work_dir)
            proc = await process.spawn(
                ProcessSpec(
                    argv=plan.argv, env=plan.env, cwd=plan.cwd,
                    stdout_path=job_dir / "stdout.log", stderr_path=job_dir / "stderr.log",
                    limits=plan.limits, deadline=plan.deadline_seconds,
                    grace=plan.grace_seconds, pid_file=job_dir / "pid",
                ),
                cgroup=self._cgroup, name=name,
            )
        except OSError as exc:
            _remove_tree(work_dir)
            self._delete_job_dir(job_dir)  # before unlocking: no one may take it for a crash
            self._release(claimed)
            raise _map_spawn_error(plan, exc) from exc
        claimed.proc = proc
        claimed.secrets = plan.secret_values
        claimed.memory_limit = plan.memory_limit
        record = claimed.record
        record.state = JobState.RUNNING.value
        record.pid, record.pid_start_ticks = proc.pid, proc.start_ticks
        record.started_at = self._clock()
        record.limiter = proc.limiter
        try:
            _write_record(job_dir, record)
        except OSError as exc:  # the process runs but nothing durable says so: undo
            proc.kill()
            await proc.wait()
            _remove_tree(work_dir)
            self._delete_job_dir(job_dir)  # before unlocking: no one may take it for a crash
            self._release(claimed)
            raise TemporaryError(f"cannot record Job {name}: {exc.strerror or exc}") from exc
        self._supervised[name] = claimed
        log.info("local_job_started", job_name=name, investigation_id=plan.investigation_id,
                 pid=proc.pid, limiter=proc.limiter, deadline_seconds=plan.deadline_seconds,
                 memory_limit=plan.memory_limit or None)
        self._emit(record, JobState.RUNNING)
        self._start_supervisor(claimed)
        if (job_dir / "cancel").exists():  # another runtime cancelled it while we started
            claimed.cancel_requested = True
            claimed.cancel_reason = _cancel_marker(job_dir)
            proc.terminate(plan.grace_seconds)
        return LaunchOutcome.CREATED

    async def status(self, job_name: str) -> JobStatus | None:
        """The Job's record as it stands (crash leftovers adopted or reported first); None if absent."""
        self._ensure_started()
        if not _NAME.match(job_name):
            return None
        sup = self._supervised.get(job_name)
        if sup is None and not self._closed:
            self._recover(self._jobs / job_name)
            sup = self._supervised.get(job_name)
        record = sup.record if sup is not None else _read_record(self._jobs / job_name)
        if record is None:
            return None
        state = JobState.RUNNING if record.state in _LIVE_STATES else JobState(record.state)
        return JobStatus(job_name=record.name, investigation_id=record.investigation_id, state=state,
                         created_at=record.created_at, finished_at=record.finished_at,
                         exit_code=record.exit_code, reported=record.reported, labels=dict(record.labels),
                         annotations=dict(record.annotations))

    async def cancel(self, job_name: str, *, reason: str = CANCEL_REASON) -> bool:
        """Stop the Job (SIGTERM, SIGKILL after the grace); removed once its end is reported."""
        self._ensure_started()
        if not _NAME.match(job_name):
            return False
        sup = self._supervised.get(job_name)
        if sup is None and not self._closed:
            self._recover(self._jobs / job_name)  # adopt it if its owner is gone
            sup = self._supervised.get(job_name)
        if sup is not None:
            sup.record.deleted = True
            if not sup.finished:
                sup.cancel_requested = True
                sup.cancel_reason = reason or CANCEL_REASON
                if sup.proc is not None:
                    sup.proc.terminate(sup.record.grace_seconds)
                await sup.done.wait()
            else:
                self._write(sup)
            log.info("local_job_cancelled", job_name=job_name)
            return True
        job_dir = self._jobs / job_name
        record = _read_record(job_dir)
        if record is None:
            return False
        if record.state in _LIVE_STATES:
            await self._cancel_foreign(job_dir, record, reason or CANCEL_REASON)
        elif record.reported:
            self._delete_job_dir(job_dir)
        else:  # ended, another runtime still reporting it: removed when that is acknowledged
            with contextlib.suppress(OSError):
                (job_dir / "cancel").write_text(reason or CANCEL_REASON)
        log.info("local_job_cancelled", job_name=job_name)
        return True

    def events(self) -> AsyncIterator[RuntimeEvent]:
        """RUNNING and terminal events of the Jobs this instance supervises; ends after close()."""
        return self._events()

    async def acknowledge(self, event: RuntimeEvent) -> None:
        """The terminal ``event`` is reported: stop re-emitting it; remove the Job if cancelled."""
        if not event.state.terminal or not _NAME.match(event.job_name):
            return
        uid = event.annotations.get(UID_KEY)
        sup = self._supervised.get(event.job_name)
        if sup is not None and sup.finished and (uid is None or uid == sup.record.uid):
            del self._supervised[event.job_name]
            self._settle(sup.job_dir, sup.record)
            self._release(sup)
            return
        # Not held here (e.g. acknowledged through another runtime): settle the record on disk.
        job_dir = self._jobs / event.job_name
        record = _read_record(job_dir)
        if (record is not None and record.state not in _LIVE_STATES and not record.reported
                and (uid is None or uid == record.uid)):
            self._settle(job_dir, record)

    async def active(self) -> list[str]:
        """Non-terminal Jobs in ``state_dir`` (any runtime's); also recovers crash leftovers."""
        return sorted(await self.active_annotations())

    async def active_annotations(self) -> dict[str, dict[str, str]]:
        """Annotations of the non-terminal Jobs in ``state_dir``, by name; recovers crash leftovers."""
        self._ensure_started()
        live: dict[str, dict[str, str]] = {}
        for job_dir in self._job_dirs():
            if job_dir.name not in self._supervised and not self._closed:
                self._recover(job_dir)
            sup = self._supervised.get(job_dir.name)
            if sup is not None:
                if not sup.finished:
                    live[job_dir.name] = dict(sup.record.annotations)
                continue
            record = _read_record(job_dir)
            if record is not None and record.state in _LIVE_STATES:
                live[job_dir.name] = dict(record.annotations)
        return live

    async def close(self) -> None:
        """Stop every process this instance supervises (reported CANCELLED); end events()."""
        if self._closed:
            return
        self._closed = True
        running = [s for s in self._supervised.values() if not s.finished]
        for sup in running:
            sup.close_requested = True
            if sup.proc is not None:
                sup.proc.terminate(sup.record.grace_seconds)
        for sup in running:
            await sup.done.wait()
        # Unacknowledged endings stay unreported on disk: the next runtime emits them again.
        for sup in list(self._supervised.values()):
            self._release(sup)
        self._supervised.clear()
        self._queue.put_nowait(None)

    # -- internals -----------------------------------------------------------------------------

    async def _events(self) -> AsyncIterator[RuntimeEvent]:
        self._ensure_started()
        while True:
            event = await self._queue.get()
            if event is None:
                self._queue.put_nowait(None)  # later iterators end too
                return
            yield event

    def _ensure_started(self) -> None:
        if self._started:
            return
        self._started = True
        if self._use_cgroup:
            self._cgroup = process.select_cgroup(self._cgroup_parent)
        for job_dir in self._job_dirs():
            self._recover(job_dir)
        # Leftovers of interrupted claims and deletions (old enough not to be in progress).
        horizon = time.time() - 60
        for leftover in list(self._staging.iterdir()) + list(self._trash.iterdir()):
            with contextlib.suppress(OSError):
                if leftover.stat().st_mtime < horizon and not _locked_by_someone(
                    leftover / "owner.lock"
                ):
                    _remove_tree(leftover)

    def _job_dirs(self) -> list[Path]:
        try:
            return sorted(p for p in self._jobs.iterdir() if p.is_dir())
        except FileNotFoundError:
            return []

    def _claim(self, plan: JobPlan, work_dir: Path) -> _Supervised | None:
        staging = self._staging / f"{plan.name}.{uuid.uuid4().hex[:8]}"
        staging.mkdir(mode=0o700)
        record = JobRecord(
            name=plan.name, uid=str(uuid.uuid4()), investigation_id=plan.investigation_id,
            state=_PENDING, created_at=self._clock(), owner_pid=os.getpid(),
            work_dir=str(work_dir), labels=plan.labels, annotations=plan.annotations,
            deadline_seconds=plan.deadline_seconds, ttl_seconds=plan.ttl_seconds,
            grace_seconds=plan.grace_seconds,
        )
        fd = -1
        try:
            _write_record(staging, record)
            fd = os.open(staging / "owner.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(staging, self._jobs / plan.name)  # the claim: fails if the name exists
        except OSError as exc:
            if fd >= 0:
                os.close(fd)
            _remove_tree(staging)
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                return None
            raise
        return _Supervised(name=plan.name, job_dir=self._jobs / plan.name, record=record,
                           lock_fd=fd)

    def _materialise(self, plan: JobPlan, work_dir: Path) -> None:
        work_dir.mkdir(mode=0o700)
        for d in plan.dirs:
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        for path, content, mode in plan.files:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(content)
            os.chmod(path, mode)
        for d in plan.read_only_dirs:
            os.chmod(d, 0o500)

    def _start_supervisor(self, sup: _Supervised) -> None:
        sup.task = asyncio.create_task(self._supervise(sup), name=f"agentjobs-local-{sup.name}")
        sup.task.add_done_callback(lambda t: self._supervisor_done(sup, t))

    async def _supervise(self, sup: _Supervised) -> None:
        assert sup.proc is not None
        result = await sup.proc.wait()
        if isinstance(result, ProcessResult):
            sup.record.cpu_seconds = result.cpu_seconds
        self._finish(sup, *self._outcome(sup, result))

    def _supervisor_done(self, sup: _Supervised, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        # A bug must not leave a Job without a terminal state: report it, loudly.
        log.error("local_job_supervisor_crashed", job_name=sup.name, exc_info=task.exception())
        with contextlib.suppress(Exception):
            self._finish(sup, JobState.FAILED, FailureReason.INTERNAL,
                         f"local runtime supervisor crashed: {task.exception()!r}", None)

    def _outcome(
        self, sup: _Supervised, result: ProcessResult | process.ForeignExit
    ) -> tuple[JobState, FailureReason | None, str, int | None]:
        if sup.cancel_requested or (sup.job_dir / "cancel").exists():
            sup.record.deleted = True
            reason = sup.cancel_reason if sup.cancel_requested else _cancel_marker(sup.job_dir)
            return JobState.CANCELLED, None, reason, _exit_code(result)
        if sup.close_requested:
            return JobState.CANCELLED, None, "stopped: the local runtime closed", \
                _exit_code(result)
        deadline = sup.record.deadline_seconds
        if isinstance(result, process.ForeignExit):
            if result.timed_out:
                return (JobState.FAILED, FailureReason.DEADLINE_EXCEEDED,
                        f"DeadlineExceeded: activeDeadlineSeconds ({deadline} s) passed", None)
            return (JobState.LOST, FailureReason.JOB_LOST,
                    f"process {result.pid} ended after the runtime that started it "
                    f"(pid {sup.record.owner_pid}) had exited; its exit status is unknown", None)
        code = result.exit_code
        if result.timed_out:
            return (JobState.FAILED, FailureReason.DEADLINE_EXCEEDED,
                    f"DeadlineExceeded: activeDeadlineSeconds ({deadline} s) passed; "
                    f"stopped (exit {code})", code)
        if result.cpu_limit_exceeded:
            return (JobState.FAILED, FailureReason.DEADLINE_EXCEEDED,
                    f"DeadlineExceeded: {result.why} (limits.cpu × activeDeadlineSeconds; "
                    f"exit {code})", code)
        if result.returncode == 0:
            return JobState.SUCCEEDED, None, "completed (exit 0)", 0
        tail = stderr_tail(sup.job_dir / "stderr.log", sup.secrets)
        tail_note = f"; stderr tail:\n{tail}" if tail else ""
        if result.oom_suspected:
            limit = f" {sup.memory_limit}" if sup.memory_limit else ""
            return (JobState.FAILED, FailureReason.OOM_KILLED,
                    f"OOMKilled (exit {code}): memory limit{limit} exceeded "
                    f"({result.why}, {result.limiter}){tail_note}", code)
        return (JobState.FAILED, FailureReason.AGENT_ERROR,
                f"agent exited with code {code} ({result.why}){tail_note}", code)

    def _finish(
        self, sup: _Supervised, state: JobState, reason: FailureReason | None, message: str,
        exit_code: int | None,
    ) -> None:
        """Record the ending durably, clean the work dir, emit the terminal event (once)."""
        if sup.finished:
            return
        sup.finished = True
        record = sup.record
        record.state = state.value
        record.finished_at = self._clock()
        record.reason, record.message, record.exit_code = reason, message, exit_code
        self._write(sup)
        self._remove_work_dir(record)
        log.info("local_job_finished", job_name=sup.name,
                 investigation_id=record.investigation_id, state=state.value,
                 reason=reason.value if reason else None, exit_code=exit_code,
                 cpu_seconds=record.cpu_seconds)
        # The lock stays held until the ending is acknowledged (or this runtime closes).
        self._emit_terminal(record)
        sup.done.set()

    def _emit_terminal(self, record: JobRecord) -> None:
        self._emit(record, JobState(record.state), reason=record.reason, message=record.message,
                   exit_code=record.exit_code)

    def _write(self, sup: _Supervised) -> None:
        try:
            _write_record(sup.job_dir, sup.record)
        except OSError as exc:
            log.error("local_job_record_write_failed", job_name=sup.name, error=str(exc))

    def _settle(self, job_dir: Path, record: JobRecord) -> None:
        """Mark an ending reported; a cancelled (deleted) Job goes away now."""
        record.reported = True
        if record.deleted or (job_dir / "cancel").exists():
            self._delete_job_dir(job_dir)
            return
        try:
            _write_record(job_dir, record)
        except OSError as exc:
            log.error("local_job_record_write_failed", job_name=record.name, error=str(exc))

    def _release(self, sup: _Supervised) -> None:
        if sup.lock_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(sup.lock_fd)  # closing the only descriptor drops the flock
            sup.lock_fd = -1

    def _emit(
        self, record: JobRecord, state: JobState, *, reason: FailureReason | None = None,
        message: str = "", exit_code: int | None = None,
    ) -> None:
        self._queue.put_nowait(RuntimeEvent(
            job_name=record.name, investigation_id=record.investigation_id, state=state,
            at=self._clock(), reason=reason, message=message, exit_code=exit_code,
            labels=dict(record.labels), annotations={**record.annotations, UID_KEY: record.uid},
        ))

    def _remove_work_dir(self, record: JobRecord) -> None:
        work_dir = Path(record.work_dir)
        if work_dir.parent == self._work:  # never follow a record outside our state dir
            _remove_tree(work_dir)

    def _delete_job_dir(self, job_dir: Path) -> None:
        # Rename first so the name is free at once and no one sees a half-deleted record.
        target = self._trash / f"{job_dir.name}.{uuid.uuid4().hex[:8]}"
        try:
            os.rename(job_dir, target)
        except FileNotFoundError:
            return
        _remove_tree(target)

    def _collect_if_expired(self, job_dir: Path) -> None:
        record = _read_record(job_dir)
        if (record is None or record.state in _LIVE_STATES or not record.reported
                or record.ttl_seconds is None):
            return
        finished = record.finished_at or record.created_at
        if self._clock() >= finished + timedelta(seconds=record.ttl_seconds):
            log.info("local_job_expired", job_name=record.name, ttl_seconds=record.ttl_seconds)
            self._delete_job_dir(job_dir)

    def _recover(self, job_dir: Path) -> None:
        """Adopt or report a Job whose supervising runtime is gone; GC expired records."""
        record = _read_record(job_dir)
        if record is None:
            return
        if record.reported:
            self._collect_if_expired(job_dir)
            return
        try:
            fd = os.open(job_dir / "owner.lock", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # a live runtime supervises it
            return
        record = _read_record(job_dir)  # re-read under the lock
        if record is None or record.reported:
            os.close(fd)
            return
        sup = _Supervised(name=record.name, job_dir=job_dir, record=record, lock_fd=fd)
        self._supervised[record.name] = sup
        if record.state not in _LIVE_STATES:  # ended, but nobody acknowledged it: tell again
            sup.finished = True
            sup.done.set()
            log.info("local_job_ending_reemitted", job_name=record.name, state=record.state)
            self._emit_terminal(record)
            return
        pid, ticks = record.pid, record.pid_start_ticks
        if pid is None:  # crashed between spawn and record: the child wrote its pid itself
            pid, ticks = _read_pid_file(job_dir / "pid")
        if pid is not None and process.is_alive(pid, ticks):
            remaining = None
            if record.deadline_seconds is not None:
                started = record.started_at or record.created_at
                elapsed = (self._clock() - started).total_seconds()
                remaining = max(0.0, record.deadline_seconds - elapsed)
            sup.proc = process.ForeignProcess(pid, ticks, deadline=remaining,
                                              grace=record.grace_seconds)
            record.pid, record.pid_start_ticks = pid, ticks
            record.state = JobState.RUNNING.value
            record.owner_pid = os.getpid()
            with contextlib.suppress(OSError):
                _write_record(job_dir, record)
            log.warning("local_job_adopted", job_name=record.name, pid=pid,
                        investigation_id=record.investigation_id)
            self._start_supervisor(sup)
            return
        log.warning("local_job_lost", job_name=record.name,
                    investigation_id=record.investigation_id)
        self._finish(
            sup, JobState.LOST, FailureReason.JOB_LOST,
            f"left behind by a crash: the runtime that started it (pid {record.owner_pid}) "
            f"exited before the Job finished and the process "
            f"{'was never started' if pid is None else f'{pid} is gone'}; "
            "its exit status is unknown",
            None,
        )

    async def _cancel_foreign(self, job_dir: Path, record: JobRecord, reason: str = CANCEL_REASON) -> None:
        """Cancel a Job another live runtime supervises: mark it (with the reason), then stop its process."""
        with contextlib.suppress(OSError):
            (job_dir / "cancel").write_text(reason)
        pid, ticks = record.pid, record.pid_start_ticks
        if pid is None:
            pid, ticks = _read_pid_file(job_dir / "pid")
        if pid is None or not process.is_alive(pid, ticks):
            return
        foreign = process.ForeignProcess(pid, ticks, deadline=None, grace=record.grace_seconds)
        foreign.terminate()
        await foreign.wait()


# --- helpers --------------------------------------------------------------------------------


def _cancel_marker(job_dir: Path) -> str:
    """The reason another runtime wrote into the cancel marker (bounded; default when unreadable)."""
    try:
        return (job_dir / "cancel").read_text(errors="replace")[:256].strip() or CANCEL_REASON
    except OSError:
        return CANCEL_REASON


def _exit_code(result: ProcessResult | process.ForeignExit) -> int | None:
    return result.exit_code if isinstance(result, ProcessResult) else None


def _check_executable(plan: JobPlan) -> None:
    """Reject a command that cannot start before claiming the name (like a 422 on create)."""
    argv0 = plan.argv[0]
    if "/" in argv0 and not os.path.isabs(argv0):
        return  # relative to the working dir, which exists only once the Job is set up
    try:
        process.resolve_executable(argv0, plan.env, plan.cwd)
    except OSError as exc:
        raise _invalid(f"cannot run {argv0!r}: {exc.strerror or exc}") from None


def _map_spawn_error(plan: JobPlan, exc: OSError) -> Exception:
    if exc.errno in (errno.ENOENT, errno.EACCES, errno.ENOEXEC, errno.E2BIG, errno.ENOTDIR,
                     errno.EISDIR, errno.ELOOP, errno.ENAMETOOLONG):
        return _invalid(f"cannot run {plan.argv[0]!r}: {exc.strerror or exc}")
    return TemporaryError(f"cannot start Job {plan.name}: {exc.strerror or exc}")


def _read_pid_file(path: Path) -> tuple[int | None, int | None]:
    try:
        pid, ticks = path.read_text().split()
        return int(pid), int(ticks)
    except (OSError, ValueError):
        return None, None


def _locked_by_someone(lock: Path) -> bool:
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def _remove_tree(path: Path) -> None:
    """Remove a directory tree, including read-only dirs (secret mounts are 0500)."""

    def onerror(func: Callable[..., Any], target: str, _exc: Any) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(target), stat.S_IRWXU)
            if os.path.isdir(target) and not os.path.islink(target):
                os.chmod(target, stat.S_IRWXU)
            func(target)

    if path.exists():
        shutil.rmtree(path, onerror=onerror)
