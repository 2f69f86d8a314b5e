"""Run one command as a contained, killable process tree — the local stand-in for a pod.

Owns the mechanics ``LocalRuntime`` (and anything else that needs a sandboxed
child) relies on:

* **Spawn** with ``os.posix_spawn`` in a new session (so the child is the leader
  of its own process group), stdin from ``/dev/null``, stdout/stderr to files and
  exactly the environment passed in — nothing of the parent's leaks through.
* **Limits** are applied in the child by a tiny Python trampoline (``_TRAMPOLINE``)
  that runs between spawn and ``exec``: it joins a cgroup v2 leaf when one is used,
  sets rlimits, changes directory, records its pid and execs the real program.
  A trampoline instead of ``preexec_fn``: ``preexec_fn`` runs Python in a forked
  copy of a multi-threaded parent and can deadlock; the trampoline is a fresh
  interpreter (``-I -S``, ~15 ms).
* **Which limiter** (logged once as ``process_limiter_selected``): a writable,
  delegated cgroup v2 with the ``memory`` and ``cpu`` controllers gets
  ``memory.max`` (+ ``memory.swap.max=0``) and ``cpu.max`` — the same accounting
  a kubelet uses — and ``RLIMIT_AS`` is then left alone. Otherwise ``RLIMIT_AS``
  stands in for the memory limit (it counts *virtual* memory, so it is stricter
  than a cgroup: size limits with headroom) and there is no CPU-rate limit, only
  the ``RLIMIT_CPU`` budget. ``RLIMIT_CORE=0`` and ``RLIMIT_NOFILE`` always.
* **Deadline** → SIGTERM to the whole process group, SIGKILL after a grace
  (``cgroup.kill`` too when a cgroup is used, which also catches processes that
  left the group). When the leader exits, survivors of its group are killed, as a
  container's are when its main process ends.
* **Result** (``ProcessResult``): exit code as Kubernetes reports it, signal,
  ``timed_out``, ``cancelled``, ``oom_suspected``, ``cpu_limit_exceeded``,
  CPU seconds from ``wait4`` resource usage (or the cgroup's ``cpu.stat``).

OOM heuristic (``classify``): a cgroup ``memory.events`` ``oom_kill`` count > 0
is certain. Under ``RLIMIT_AS`` nobody is OOM-killed; allocations fail instead,
so — only when a memory limit was set and the process did not exit 0 — we call
it OOM when (a) the stderr tail names an allocation failure (Python
``MemoryError``, C++ ``std::bad_alloc``, Go/JVM/Node "out of memory" /
``OutOfMemoryError``, ``Cannot allocate memory``), or (b) the process died of
SIGKILL, SIGSEGV, SIGABRT or SIGBUS that we did not send (a failed ``mmap`` often
ends as an abort or a segfault; a SIGKILL from outside is most likely the
kernel's OOM killer). Signals we sent (deadline, cancel) and an exhausted CPU
budget take precedence. An OOM is reported with exit code 137 like Kubernetes'
``OOMKilled``, whatever the real status was (kept in ``returncode``). It is a
heuristic: a program that prints "out of memory" and exits 1 for another reason
is misclassified, and one that swallows ``MemoryError`` silently is not caught.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import math
import os
import re
import resource
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

import structlog

log = structlog.stdlib.get_logger(__name__)

OOM_EXIT_CODE = 137  # what Kubernetes reports for OOMKilled (128 + SIGKILL)
DEFAULT_OPEN_FILES = 4096
_STDERR_WINDOW = 64 * 1024  # bytes of stderr read for the tail (redaction sees whole secrets)

# --- Kubernetes quantities ------------------------------------------------------------------

_QUANTITY = re.compile(
    r"^(?P<num>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))"
    r"(?:(?P<exp>[eE][+-]?[0-9]+)|(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?)$"
)
_MULTIPLIER: dict[str, Decimal] = {
    "": Decimal(1),
    "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"),
    "k": Decimal(10**3), "M": Decimal(10**6), "G": Decimal(10**9),
    "T": Decimal(10**12), "P": Decimal(10**15), "E": Decimal(10**18),
    "Ki": Decimal(2**10), "Mi": Decimal(2**20), "Gi": Decimal(2**30),
    "Ti": Decimal(2**40), "Pi": Decimal(2**50), "Ei": Decimal(2**60),
}


def parse_quantity(value: str | int | float) -> Decimal:
    """A Kubernetes quantity ("512Mi", "1Gi", "500m", "2", "1e3") as an exact number."""
    if isinstance(value, bool):
        raise ValueError(f"not a quantity: {value!r}")
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"not a quantity: {value!r}")
        return Decimal(str(value))
    match = _QUANTITY.match(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    try:
        number = Decimal(match["num"])
    except InvalidOperation:  # pragma: no cover - the regex admits only valid numbers
        raise ValueError(f"not a Kubernetes quantity: {value!r}") from None
    if match["exp"]:
        exponent = int(match["exp"][1:])
        if abs(exponent) > 64:
            raise ValueError(f"quantity exponent out of range: {value!r}")
        return number.scaleb(exponent)
    return number * _MULTIPLIER[match["suffix"] or ""]


def memory_bytes(value: str | int | float) -> int:
    """A memory quantity in bytes, rounded up (Kubernetes rounds fractional bytes up)."""
    amount = parse_quantity(value)
    if amount <= 0:
        raise ValueError(f"memory quantity must be positive: {value!r}")
    return int(amount.to_integral_value(rounding="ROUND_CEILING"))


def cpu_cores(value: str | int | float) -> float:
    """A CPU quantity in cores ("500m" → 0.5), at Kubernetes' millicore resolution."""
    amount = parse_quantity(value)
    if amount <= 0:
        raise ValueError(f"cpu quantity must be positive: {value!r}")
    millis = (amount * 1000).to_integral_value(rounding="ROUND_CEILING")
    return float(millis / 1000)


# --- limits and results ---------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Limits:
    """What the process may use; None means unlimited."""

    memory_bytes: int | None = None  # bytes (cgroup memory.max, else RLIMIT_AS)
    cpu_cores: float | None = None  # cores (cgroup cpu.max only; rlimits cannot rate-limit)
    cpu_seconds: int | None = None  # CPU-seconds budget (RLIMIT_CPU soft; hard = soft + 5)
    open_files: int = DEFAULT_OPEN_FILES  # RLIMIT_NOFILE


@dataclass(frozen=True, kw_only=True)
class ProcessSpec:
    """One command to run: argv, exact environment, directory, output files, limits, deadline."""

    argv: Sequence[str]
    env: Mapping[str, str]  # the complete environment; nothing is inherited
    cwd: Path
    stdout_path: Path
    stderr_path: Path
    limits: Limits = field(default_factory=Limits)
    deadline: float | None = None  # seconds after spawn before SIGTERM
    grace: float = 30.0  # seconds between SIGTERM and SIGKILL
    pid_file: Path | None = None  # the child writes "<pid> <start ticks>" here before exec


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """Pure classification of how a process ended (see module docstring for the OOM rule)."""

    exit_code: int  # as Kubernetes reports it: status, 128 + signal, 137 for OOM
    signal: int | None
    oom_suspected: bool
    cpu_limit_exceeded: bool
    why: str  # short human explanation, e.g. "MemoryError under a 128 MiB limit"


@dataclass(frozen=True, kw_only=True)
class ProcessResult:
    """How a process ended and what it used."""

    pid: int
    returncode: int  # raw: exit status, or -signal
    exit_code: int  # Kubernetes-style, see Outcome
    signal: int | None
    timed_out: bool  # we signalled it because the deadline passed
    cancelled: bool  # we signalled it because terminate() was called
    oom_suspected: bool
    cpu_limit_exceeded: bool
    cpu_seconds: float  # user + system CPU of the process and its reaped children
    wall_seconds: float
    limiter: str  # "cgroup2" or "rlimit"
    why: str


_OOM_TEXT = re.compile(
    r"MemoryError|std::bad_alloc|out of memory|OutOfMemoryError|Cannot allocate memory"
    r"|failed to allocate|memory allocation (?:of \d+ bytes )?failed",
    re.IGNORECASE,
)
_OOM_SIGNALS = frozenset({signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS})


def classify(
    returncode: int,
    *,
    stderr_tail: str = "",
    memory_limited: bool = False,
    cgroup_oom_kills: int = 0,
    cpu_budget: int | None = None,
    cpu_seconds: float = 0.0,
    signalled_by_us: bool = False,
) -> Outcome:
    """Classify an exit status: OOM, CPU budget exhausted, or plain exit/signal."""
    sig = -returncode if returncode < 0 else None
    plain = returncode if sig is None else 128 + sig
    sig_name = _signal_name(sig) if sig is not None else ""
    if cgroup_oom_kills > 0:
        return Outcome(exit_code=OOM_EXIT_CODE, signal=sig, oom_suspected=True,
                       cpu_limit_exceeded=False, why="cgroup memory.events reports oom_kill")
    if signalled_by_us:
        return Outcome(exit_code=plain, signal=sig, oom_suspected=False,
                       cpu_limit_exceeded=False, why=f"stopped by {sig_name or 'exit'}")
    if cpu_budget is not None and (
        sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_seconds >= cpu_budget)
    ):
        return Outcome(exit_code=plain, signal=sig, oom_suspected=False, cpu_limit_exceeded=True,
                       why=f"CPU budget of {cpu_budget} cpu-seconds exhausted ({sig_name})")
    if memory_limited and returncode != 0:
        found = _OOM_TEXT.search(stderr_tail)
        if found:
            return Outcome(exit_code=OOM_EXIT_CODE, signal=sig, oom_suspected=True,
                           cpu_limit_exceeded=False,
                           why=f"{found.group(0)!r} on stderr under a memory limit")
        if sig in _OOM_SIGNALS:
            return Outcome(exit_code=OOM_EXIT_CODE, signal=sig, oom_suspected=True,
                           cpu_limit_exceeded=False, why=f"{sig_name} under a memory limit")
    why = f"killed by {sig_name}" if sig is not None else f"exited with {returncode}"
    return Outcome(exit_code=plain, signal=sig, oom_suspected=False, cpu_limit_exceeded=False,
                   why=why)


def _signal_name(sig: int | None) -> str:
    if sig is None:
        return ""
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def read_tail(path: Path, limit: int = _STDERR_WINDOW) -> str:
    """The last ``limit`` bytes of a file as text ('' if missing)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - limit))
            data = fh.read(limit)
    except OSError:
        return ""
    return data.decode("utf-8", errors="replace")


# --- /proc helpers --------------------------------------------------------------------------


def process_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (None if it does not exist).

    Together with the pid it identifies one process across pid reuse.
    """
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    # Field 2 (comm) may contain spaces and parentheses; fields after the last ')' are fixed.
    rest = raw[raw.rfind(")") + 2 :].split()
    try:
        if rest[0] == "Z":  # a zombie has finished; only its parent can still reap it
            return None
        return int(rest[19])  # field 22 overall
    except (IndexError, ValueError):
        return None


def is_alive(pid: int, start_ticks: int | None) -> bool:
    """True if the process ``pid`` that started at ``start_ticks`` is still running."""
    if pid <= 0:
        return False
    ticks = process_start_ticks(pid)
    return ticks is not None and (start_ticks is None or ticks == start_ticks)


# --- cgroup v2 ------------------------------------------------------------------------------

_CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class Cgroup2:
    """A delegated cgroup v2 directory whose children we may create and limit."""

    parent: Path

    @classmethod
    def detect(cls, parent: Path | None = None) -> tuple[Cgroup2 | None, str]:
        """The usable cgroup (or None) and why; never raises.

        ``parent``: a cgroup delegated to us for Job leaves (e.g. a systemd unit with
        ``Delegate=yes``); its ``memory``/``cpu`` controllers are enabled for children if
        needed. Without it we try our own cgroup, but only use it if the controllers are
        already enabled there — we never reconfigure a cgroup nobody handed us.
        """
        explicit = parent is not None
        try:
            parent = parent or _own_cgroup2()
            if parent is None:
                return None, "no cgroup v2 hierarchy mounted"
            controllers = (parent / "cgroup.controllers").read_text().split()
            missing = {"memory", "cpu"} - set(controllers)
            if missing:
                return None, f"{parent}: controllers {sorted(missing)} not delegated"
            enabled = set((parent / "cgroup.subtree_control").read_text().split())
            if not {"memory", "cpu"} <= enabled:
                if not explicit:
                    return None, f"{parent}: memory/cpu not enabled for child cgroups"
                # Fails with EBUSY when processes live in `parent` itself (no-internal-process
                # rule): the delegated parent must hold no processes of its own.
                (parent / "cgroup.subtree_control").write_text("+memory +cpu")
            probe = parent / f"agentjobs-probe-{uuid.uuid4().hex[:8]}"
            probe.mkdir()
            probe.rmdir()
        except OSError as exc:
            return None, f"{parent}: {exc.strerror or exc}"
        return cls(parent), f"{parent}: memory and cpu controllers writable"

    def create(self, name: str, limits: Limits) -> Path:
        """A new leaf cgroup for one process tree, with memory.max / cpu.max set."""
        leaf = self.parent / f"agentjobs-{name}-{uuid.uuid4().hex[:8]}"
        leaf.mkdir()
        try:
            if limits.memory_bytes is not None:
                (leaf / "memory.max").write_text(str(limits.memory_bytes))
                with contextlib.suppress(OSError):  # absent without swap accounting
                    (leaf / "memory.swap.max").write_text("0")
            if limits.cpu_cores is not None:
                period = 100_000
                quota = max(1000, int(limits.cpu_cores * period))
                (leaf / "cpu.max").write_text(f"{quota} {period}")
        except OSError:
            self.remove(leaf)
            raise
        return leaf

    @staticmethod
    def oom_kills(leaf: Path) -> int:
        """Processes the kernel OOM-killed in this cgroup."""
        return _keyed(leaf / "memory.events").get("oom_kill", 0)

    @staticmethod
    def cpu_seconds(leaf: Path) -> float | None:
        """CPU time used by everything that ran in this cgroup."""
        usec = _keyed(leaf / "cpu.stat").get("usage_usec")
        return None if usec is None else usec / 1e6

    @staticmethod
    def kill(leaf: Path) -> bool:
        """SIGKILL every process in the cgroup (``cgroup.kill``, Linux ≥ 5.14)."""
        try:
            (leaf / "cgroup.kill").write_text("1")
        except OSError:
            return False
        return True

    @staticmethod
    def remove(leaf: Path) -> None:
        """Remove an empty leaf; best effort."""
        with contextlib.suppress(OSError):
            leaf.rmdir()


def _own_cgroup2() -> Path | None:
    mount = None
    try:
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            if right.split(" ", 1)[0] == "cgroup2":
                mount = Path(left.split()[4])
                break
        if mount is None:
            return None
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return mount / line[3:].strip().lstrip("/")
    except OSError:
        return None
    return None


def _keyed(path: Path) -> dict[str, int]:
    try:
        text = path.read_text()
    except OSError:
        return {}
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            out[key] = int(value)
    return out


_selected: dict[Path | None, tuple[Cgroup2 | None, str]] = {}


def select_cgroup(parent: Path | None = None) -> Cgroup2 | None:
    """Detect (once per parent) whether cgroup v2 limits can be used; logs the choice."""
    if parent not in _selected:
        cgroup, why = Cgroup2.detect(parent)
        _selected[parent] = (cgroup, why)
        log.info("process_limiter_selected", limiter="cgroup2" if cgroup else "rlimit", detail=why)
    return _selected[parent][0]


# --- spawning -------------------------------------------------------------------------------

# Runs in the child between spawn and exec: cgroup, rlimits, cwd, pid file, then exec.
_TRAMPOLINE = r"""
import json, os, resource, sys
c = json.loads(sys.argv[1])
try:
    if c["cgroup"]:
        with open(os.path.join(c["cgroup"], "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    for name, soft, hard in c["rlimits"]:
        resource.setrlimit(getattr(resource, name), (soft, hard))
    os.chdir(c["cwd"])
    if c["pid_file"]:
        with open("/proc/self/stat") as f:
            stat = f.read()
        ticks = stat[stat.rfind(")") + 2:].split()[19]
        tmp = c["pid_file"] + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()} {ticks}\n")
        os.replace(tmp, c["pid_file"])
    # Our own interpreter may have coerced the C locale (PEP 538): give back the env as passed.
    if c["lc_ctype"] is None:
        os.environ.pop("LC_CTYPE", None)
    else:
        os.environ["LC_CTYPE"] = c["lc_ctype"]
    os.execve(sys.argv[2], sys.argv[3:], os.environ)
except OSError as e:
    sys.stderr.write(f"agentjobs: cannot start {sys.argv[2]}: {e.strerror or e}\n")
    os._exit(127 if e.errno == 2 else 126)
"""


def resolve_executable(argv0: str, env: Mapping[str, str], cwd: Path) -> str:
    """Absolute path of the program, looked up in the child's PATH; raises OSError."""
    if not argv0:
        raise FileNotFoundError(errno.ENOENT, "empty command")
    if "/" in argv0:
        path = argv0 if os.path.isabs(argv0) else str(cwd / argv0)
        if not os.path.exists(path):
            raise FileNotFoundError(errno.ENOENT, "executable not found", argv0)
        if os.path.isdir(path) or not os.access(path, os.X_OK):
            raise PermissionError(errno.EACCES, "not an executable file", argv0)
        return path
    found = shutil.which(argv0, path=env.get("PATH", os.defpath))
    if found is None:
        raise FileNotFoundError(errno.ENOENT, "executable not found in PATH", argv0)
    return os.path.abspath(found)


def _rlimits(limits: Limits, *, use_as: bool) -> list[tuple[str, int, int]]:
    wanted = [("RLIMIT_CORE", 0, 0), ("RLIMIT_NOFILE", limits.open_files, limits.open_files)]
    if use_as and limits.memory_bytes is not None:
        wanted.append(("RLIMIT_AS", limits.memory_bytes, limits.memory_bytes))
    if limits.cpu_seconds is not None:
        # SIGXCPU at the soft limit (catchable, lets the program report), SIGKILL at hard.
        wanted.append(("RLIMIT_CPU", limits.cpu_seconds, limits.cpu_seconds + 5))
    out = []
    for name, soft, hard in wanted:
        # An unprivileged child cannot raise a hard limit above ours: cap at it.
        ceiling = resource.getrlimit(getattr(resource, name))[1]
        if ceiling != resource.RLIM_INFINITY:
            soft, hard = min(soft, ceiling), min(hard, ceiling)
        out.append((name, soft, hard))
    return out


class RunningProcess:
    """A spawned process tree: wait for it, or stop it."""

    def __init__(self, spec: ProcessSpec, pid: int, cgroup_leaf: Path | None) -> None:
        self.spec = spec
        self.pid = pid  # also the process group id (the child is a session leader)
        self.start_ticks = process_start_ticks(pid)
        self.cgroup_leaf = cgroup_leaf
        self.limiter = "cgroup2" if cgroup_leaf is not None else "rlimit"
        self.timed_out = False
        self.cancelled = False
        self._started = time.monotonic()
        self._loop = asyncio.get_running_loop()
        self._done: asyncio.Future[ProcessResult] = self._loop.create_future()
        self._exited = False
        self._kill_timer: asyncio.TimerHandle | None = None
        self._deadline_timer: asyncio.TimerHandle | None = None
        if spec.deadline is not None:
            self._deadline_timer = self._loop.call_later(spec.deadline, self._on_deadline)
        self._watch()

    @property
    def done(self) -> bool:
        """True once the process has exited and been reaped."""
        return self._done.done()

    async def wait(self) -> ProcessResult:
        """The result, once the process has exited (safe to call many times)."""
        return await asyncio.shield(self._done)

    def terminate(self, grace: float | None = None) -> None:
        """SIGTERM the group now, SIGKILL after ``grace`` (default: the spec's); marks cancelled."""
        if self._exited:
            return
        if not self.timed_out:
            self.cancelled = True
        self._stop(self.spec.grace if grace is None else grace)

    def kill(self) -> None:
        """SIGKILL the group now (the SIGKILL of a SIGTERM → SIGKILL sequence)."""
        if self._exited:
            return
        self._signal_group(signal.SIGKILL)
        if self.cgroup_leaf is not None:
            Cgroup2.kill(self.cgroup_leaf)

    # -- internals ---------------------------------------------------------------------------

    def _on_deadline(self) -> None:
        if self._exited or self.cancelled:
            return
        self.timed_out = True
        log.info("process_deadline_exceeded", pid=self.pid, deadline_seconds=self.spec.deadline)
        self._stop(self.spec.grace)

    def _stop(self, grace: float) -> None:
        self._signal_group(signal.SIGTERM)
        if self._kill_timer is None:
            self._kill_timer = self._loop.call_later(max(0.0, grace), self.kill)

    def _signal_group(self, sig: int) -> None:
        # Until we reap the leader its pid stays reserved, so the group id cannot be reused.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def _watch(self) -> None:
        try:
            pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            thread = threading.Thread(target=self._wait_in_thread, daemon=True,
                                      name=f"agentjobs-wait-{self.pid}")
            thread.start()
            return

        def readable() -> None:
            self._loop.remove_reader(pidfd)
            os.close(pidfd)
            self._reap()

        self._loop.add_reader(pidfd, readable)

    def _wait_in_thread(self) -> None:
        # Fallback without pidfd: wait without reaping so survivors can still be killed.
        with contextlib.suppress(ChildProcessError):
            os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            self._loop.call_soon_threadsafe(self._reap)

    def _reap(self) -> None:
        # The leader is a zombie now: kill what is left of its group before reaping it.
        self._signal_group(signal.SIGKILL)
        if self.cgroup_leaf is not None:
            Cgroup2.kill(self.cgroup_leaf)
        try:
            _, status, usage = os.wait4(self.pid, 0)
            returncode = os.waitstatus_to_exitcode(status)
            cpu = usage.ru_utime + usage.ru_stime
        except ChildProcessError:  # reaped by someone else (a global SIGCHLD handler)
            returncode, cpu = 255, 0.0
        self._exited = True
        for timer in (self._deadline_timer, self._kill_timer):
            if timer is not None:
                timer.cancel()
        self._done.set_result(self._result(returncode, cpu))

    def _result(self, returncode: int, cpu: float) -> ProcessResult:
        oom_kills = 0
        if self.cgroup_leaf is not None:
            oom_kills = Cgroup2.oom_kills(self.cgroup_leaf)
            cpu = Cgroup2.cpu_seconds(self.cgroup_leaf) or cpu
            Cgroup2.remove(self.cgroup_leaf)
        outcome = classify(
            returncode,
            stderr_tail=read_tail(self.spec.stderr_path, 4096),
            memory_limited=self.spec.limits.memory_bytes is not None,
            cgroup_oom_kills=oom_kills,
            cpu_budget=self.spec.limits.cpu_seconds,
            cpu_seconds=cpu,
            signalled_by_us=self.timed_out or self.cancelled,
        )
        return ProcessResult(
            pid=self.pid, returncode=returncode, exit_code=outcome.exit_code,
            signal=outcome.signal, timed_out=self.timed_out, cancelled=self.cancelled,
            oom_suspected=outcome.oom_suspected, cpu_limit_exceeded=outcome.cpu_limit_exceeded,
            cpu_seconds=round(cpu, 3), wall_seconds=round(time.monotonic() - self._started, 3),
            limiter=self.limiter, why=outcome.why,
        )


async def spawn(
    spec: ProcessSpec, *, cgroup: Cgroup2 | None = None, name: str = "proc"
) -> RunningProcess:
    """Start ``spec`` in its own session; raises OSError (FileNotFoundError, PermissionError…)."""
    exe = resolve_executable(spec.argv[0], spec.env, spec.cwd)
    if not spec.cwd.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "working directory does not exist", str(spec.cwd))
    leaf = cgroup.create(name, spec.limits) if cgroup is not None else None
    config = {
        "cgroup": str(leaf) if leaf is not None else "",
        "rlimits": _rlimits(spec.limits, use_as=leaf is None),
        "cwd": str(spec.cwd),
        "pid_file": str(spec.pid_file) if spec.pid_file is not None else "",
        "lc_ctype": spec.env.get("LC_CTYPE"),
    }
    argv = [sys.executable, "-I", "-S", "-c", _TRAMPOLINE, json.dumps(config), exe, *spec.argv]
    out_flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    file_actions = [
        (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, str(spec.stdout_path), out_flags & ~os.O_CLOEXEC, 0o600),
        (os.POSIX_SPAWN_OPEN, 2, str(spec.stderr_path), out_flags & ~os.O_CLOEXEC, 0o600),
    ]
    try:
        pid = os.posix_spawn(sys.executable, argv, dict(spec.env), file_actions=file_actions,
                             setsid=True)
    except OSError:
        if leaf is not None:
            Cgroup2.remove(leaf)
        raise
    return RunningProcess(spec, pid, leaf)


# --- processes we did not spawn ---------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ForeignExit:
    """How a non-child process ended, as far as a non-parent can tell (no exit status)."""

    pid: int
    timed_out: bool
    cancelled: bool


class ForeignProcess:
    """A process group started by another (crashed) runtime: watch it, enforce a deadline, stop it.

    Only the parent can learn an exit status, so ``wait`` says only *whether* we stopped it.
    """

    def __init__(
        self, pid: int, start_ticks: int | None, *, deadline: float | None, grace: float
    ) -> None:
        self.pid = pid
        self.start_ticks = start_ticks
        self.grace = grace
        self.timed_out = False
        self.cancelled = False
        self._loop = asyncio.get_running_loop()
        self._done: asyncio.Future[ForeignExit] = self._loop.create_future()
        self._kill_timer: asyncio.TimerHandle | None = None
        self._deadline_timer = (
            self._loop.call_later(deadline, self._on_deadline) if deadline is not None else None
        )
        self._poller: asyncio.Task[None] | None = None
        try:
            pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            self._poller = self._loop.create_task(self._poll(), name=f"agentjobs-watch-{pid}")
        else:
            def readable() -> None:
                self._loop.remove_reader(pidfd)
                os.close(pidfd)
                self._exited()

            self._loop.add_reader(pidfd, readable)

    @property
    def done(self) -> bool:
        """True once the process has ended."""
        return self._done.done()

    async def wait(self) -> ForeignExit:
        """Wait for the process to end."""
        return await asyncio.shield(self._done)

    def terminate(self, grace: float | None = None) -> None:
        """SIGTERM the group, SIGKILL after the grace; marks cancelled."""
        if self.done:
            return
        if not self.timed_out:
            self.cancelled = True
        self._stop(self.grace if grace is None else grace)

    def kill(self) -> None:
        """SIGKILL the group now."""
        if not self.done:
            self._signal_group(signal.SIGKILL)

    def _on_deadline(self) -> None:
        if self.done or self.cancelled:
            return
        self.timed_out = True
        self._stop(self.grace)

    def _stop(self, grace: float) -> None:
        self._signal_group(signal.SIGTERM)
        if self._kill_timer is None:
            self._kill_timer = self._loop.call_later(max(0.0, grace), self.kill)

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    async def _poll(self) -> None:
        # Only without pidfd (old kernels): there is no other way to notice a non-child's exit.
        while is_alive(self.pid, self.start_ticks):
            await asyncio.sleep(1.0)
        self._exited()

    def _exited(self) -> None:
        if self.done:
            return
        self._signal_group(signal.SIGKILL)  # survivors of the group go with the leader
        for timer in (self._deadline_timer, self._kill_timer):
            if timer is not None:
                timer.cancel()
        self._done.set_result(
            ForeignExit(pid=self.pid, timed_out=self.timed_out, cancelled=self.cancelled)
        )
