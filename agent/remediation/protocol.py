"""The execution protocol every executor follows, with its decisions kept apart from I/O.

An executor (``RemediationExecutor``) answers four questions about one
``ProposedAction`` the phase gate allowed:

``precondition(action)``  does what the finding saw still hold, right now? ``None`` if
                          so, else why it is stale (the blocker ended, the pid was
                          reused, the pod recovered) — nothing is done then;
``act(action)``           do it, once, and say what was there before (``Execution``);
``verify(action, timeout=)``  re-run the diagnostic within a bounded wait: did it work?
``undo(action, done)``    one line telling an operator how to undo it, or ``"none (why)"``.

``execute`` runs them in that order and ends in one ``Outcome``. It acts at most once
per idempotency key (investigation + action + target + the params that identify
the target): the key is claimed in a ``Ledger`` — durably, before acting — so a
retried or restarted agent finds it there and answers ``already_executed`` instead
of acting again. A claim whose outcome never got recorded (the process stopped while
acting) also counts as done: at most once, never twice.

``FileLedger`` keeps the ledger as append-only JSON lines in the Job's working
directory (fsynced before acting, ``flock``-ed so two processes in one Job cannot both
claim a key); ``MemoryLedger`` (or a plain set) serves a single process and tests.

A limit decided before — ``agent.remediation.limits`` (per investigation, the scope's hourly
allowance, per target, the namespace/database allow-lists) — is passed as ``limit=``: it ends
the execution ``refused_limit`` / ``refused_target`` after the guard, before the claim (a
retried Job still answers ``already_executed`` for what it did, a stale action is still
``skipped_stale``, a disabled switch still ``refused_kill_switch``); nothing is claimed and
nothing done.

A ``Guard`` — the global kill switch (``agent.remediation.killswitch``) — is asked right
before acting: after the precondition, before the claim. A ``Refusal`` ends the execution
``refused_kill_switch`` with nothing claimed and nothing done; a guard that raises refuses
too (fail closed). ``execute`` takes it as ``guard=``; otherwise the one the engine installed
for the conclusion with ``guarded(...)`` (a context variable, so every executor the gate
hands an action to is covered, whoever built it).

The local ledger does not outlive the pod. A ``ClaimStore`` shared by every pod and Job of the
investigation (``agent.remediation.claims.VaultClaims``: create-only claims in Vault KV) is
consulted besides it — ``shared=``, else the one installed with ``shared_claims(...)``: a key
seen in either is ``already_executed``; before acting the key is claimed in the shared store
first (the authoritative claim: if it cannot be written, ``failed`` and nothing is done — fail
closed), then in the local ledger; the outcome is settled in both (a failure to settle is never
raised: the claim alone prevents a second act). Without a shared store, nothing changes.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import fcntl
import hashlib
import json
import os
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableSet
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from schemas import ProposedAction, utcnow

FIELD_CHARS = 2000  # each recorded param (before, after, reason, ...) is at most this long


class Outcome(enum.StrEnum):
    EXECUTED_VERIFIED = "executed_verified"  # acted, and the diagnostic shows the effect
    EXECUTED_NOT_VERIFIED = "executed_not_verified"  # acted, the effect was not seen within the wait
    SKIPPED_STALE = "skipped_stale"  # the precondition no longer holds: nothing done
    FAILED = "failed"  # could not check, could not claim, or the act itself failed
    ALREADY_EXECUTED = "already_executed"  # the key was claimed before (a retry): not done again
    REFUSED_KILL_SWITCH = "refused_kill_switch"  # actions are disabled (or the switch is unreadable): not done
    REFUSED_LIMIT = "refused_limit"  # a blast-radius limit (per investigation, scope, target) is reached: not done
    REFUSED_TARGET = "refused_target"  # the target is outside the Job's allow-lists: not done
    REFUSED_EXPIRED = "refused_expired"  # an approved action whose approval expired before it could run: not done


ACTED = frozenset({Outcome.EXECUTED_VERIFIED, Outcome.EXECUTED_NOT_VERIFIED})


@dataclass(frozen=True, kw_only=True)
class Execution:
    """What an executor did: enough to check it and to undo it."""

    ok: bool
    before: str = ""  # state before, e.g. "replicas=2"
    after: str = ""
    undo: str = ""  # how to undo, e.g. "kubectl -n shop rollout undo deployment/payments"
    error: str = ""


def no_undo(why: str) -> str:
    """The undo line of an action that cannot be undone (pure)."""
    return f"none ({why})"


@runtime_checkable
class RemediationExecutor(Protocol):
    """One registered action, carried out through the protocol (see the module docstring).

    ``verify_timeout``: seconds ``verify`` may wait by default. ``volatile_params``: params
    that describe the observation rather than the target (e.g. when it was observed); they
    are left out of the idempotency key, so a re-investigation of the same target is the
    same action. Optionally ``observed_after(action) -> str``: what ``verify`` saw last,
    recorded as ``after``.
    """

    verify_timeout: float
    volatile_params: frozenset[str]

    async def precondition(self, action: ProposedAction) -> str | None:
        ...

    async def act(self, action: ProposedAction) -> Execution:
        ...

    async def verify(self, action: ProposedAction, *, timeout: float) -> bool:
        ...

    def undo(self, action: ProposedAction, done: Execution) -> str:
        ...


def follows_protocol(executor: object) -> bool:
    return all(callable(getattr(executor, m, None)) for m in ("precondition", "act", "verify", "undo"))


# --- the idempotency key and the ledger ------------------------------------------------------

def idempotency_key(investigation_id: str, action: ProposedAction, *,
                    volatile: frozenset[str] = frozenset()) -> str:
    """``<investigation>:<action>:<digest of target and identifying params>`` (pure)."""
    params = sorted((k, v) for k, v in action.params.items() if k not in volatile)
    ident = json.dumps([investigation_id, action.action, action.target, params], separators=(",", ":"))
    return f"{investigation_id}:{action.action}:{hashlib.sha256(ident.encode()).hexdigest()[:32]}"


@dataclass(frozen=True, kw_only=True)
class Entry:
    """A key in the ledger: claimed (about to act) and, once known, how it ended."""

    key: str
    claimed_at: str = ""
    outcome: Outcome | None = None  # None: claimed, the outcome was never recorded
    reason: str = ""


class Ledger(Protocol):
    def seen(self, key: str) -> Entry | None:
        """The entry for ``key``, if it was ever claimed."""
        ...

    def claim(self, key: str, *, action: str = "", target: str = "") -> bool:
        """True if ``key`` is now claimed by this caller (durably, before returning); False if it was already."""
        ...

    def settle(self, key: str, outcome: Outcome, *, reason: str = "") -> None:
        """Record how a claimed key ended."""
        ...


class MemoryLedger:
    """The ledger of one process (tests, or a Job without a working directory)."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}

    def seen(self, key: str) -> Entry | None:
        return self.entries.get(key)

    def claim(self, key: str, *, action: str = "", target: str = "") -> bool:
        if key in self.entries:
            return False
        self.entries[key] = Entry(key=key, claimed_at=utcnow().isoformat())
        return True

    def settle(self, key: str, outcome: Outcome, *, reason: str = "") -> None:
        old = self.entries.get(key) or Entry(key=key)
        self.entries[key] = Entry(key=key, claimed_at=old.claimed_at, outcome=outcome, reason=reason)


class SetLedger:
    """A plain set of keys already done, as a ledger (outcomes are not kept)."""

    def __init__(self, keys: MutableSet[str]) -> None:
        self.keys = keys

    def seen(self, key: str) -> Entry | None:
        return Entry(key=key) if key in self.keys else None

    def claim(self, key: str, *, action: str = "", target: str = "") -> bool:
        if key in self.keys:
            return False
        self.keys.add(key)
        return True

    def settle(self, key: str, outcome: Outcome, *, reason: str = "") -> None:
        pass


class FileLedger:
    """Append-only JSON lines at ``path``: ``{"key", "event": "claimed"|"settled", ...}``.

    Every call re-reads the file under an exclusive ``flock``, so claims made by an
    earlier (or concurrent) process of the same Job are seen; a claim is fsynced before
    ``claim`` returns. A torn last line (a crash mid-write) is skipped.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def seen(self, key: str) -> Entry | None:
        with self._locked() as fd:
            return _read(fd).get(key)

    def claim(self, key: str, *, action: str = "", target: str = "") -> bool:
        with self._locked() as fd:
            if key in _read(fd):
                return False
            _append(fd, {"key": key, "event": "claimed", "at": utcnow().isoformat(), "action": action,
                         "target": target})
            return True

    def settle(self, key: str, outcome: Outcome, *, reason: str = "") -> None:
        with self._locked() as fd:
            _append(fd, {"key": key, "event": "settled", "at": utcnow().isoformat(), "outcome": outcome.value,
                         "reason": reason})

    @contextlib.contextmanager
    def _locked(self) -> Iterator[int]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if created:  # the file's existence must survive a crash as well as its lines
                dirfd = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(dirfd)
                finally:
                    os.close(dirfd)
            yield fd
        finally:
            os.close(fd)  # releases the lock


def _read(fd: int) -> dict[str, Entry]:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    entries: dict[str, Entry] = {}
    for line in b"".join(chunks).splitlines():
        try:
            rec = json.loads(line)
            key = rec["key"]
            if not isinstance(key, str):
                continue
            if rec.get("event") == "claimed":
                entries.setdefault(key, Entry(key=key, claimed_at=str(rec.get("at", ""))))
            elif rec.get("event") == "settled":
                old = entries.get(key) or Entry(key=key)
                entries[key] = Entry(key=key, claimed_at=old.claimed_at, outcome=Outcome(rec["outcome"]),
                                     reason=str(rec.get("reason", "")))
        except (ValueError, KeyError, TypeError):
            continue  # a torn or foreign line
    return entries


def _append(fd: int, record: Mapping[str, Any]) -> None:
    size = os.lseek(fd, 0, os.SEEK_END)
    prefix = b""
    if size:
        os.lseek(fd, size - 1, os.SEEK_SET)
        if os.read(fd, 1) != b"\n":
            prefix = b"\n"  # do not glue a new record onto a torn one
    os.write(fd, prefix + json.dumps(record, separators=(",", ":")).encode() + b"\n")
    os.fsync(fd)


def as_ledger(done: Ledger | MutableSet[str]) -> Ledger:
    return SetLedger(done) if isinstance(done, MutableSet) else done


# --- the guard: asked right before acting -------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Refusal:
    """Why a guard stops an action that the gate allowed and whose precondition holds."""

    reason: str
    outcome: Outcome = Outcome.REFUSED_KILL_SWITCH


Guard = Callable[[ProposedAction], Awaitable[Refusal | None]]  # None: go ahead

_guard: contextvars.ContextVar[Guard | None] = contextvars.ContextVar("agentjobs_action_guard", default=None)


@contextlib.contextmanager
def guarded(guard: Guard | None) -> Iterator[None]:
    """Within this block (this task and what it awaits), ``execute`` asks ``guard`` before acting."""
    token = _guard.set(guard)
    try:
        yield
    finally:
        _guard.reset(token)


def current_guard() -> Guard | None:
    return _guard.get()


async def _ask(guard: Guard, action: ProposedAction) -> Refusal | None:
    try:
        return await guard(action)
    except Exception as exc:  # noqa: BLE001 - a guard that cannot answer stops the action
        return Refusal(reason=f"kill switch unreadable ({_error(exc)}): not acting")


# --- the shared claim store: every pod and Job of the investigation -----------------------------

class ClaimStore(Protocol):
    """The async ledger shared across pods and Jobs (``agent.remediation.claims.VaultClaims``).

    ``seen`` and ``claim`` raise when the store cannot answer (``execute`` then does not act).
    """

    async def seen(self, key: str) -> Entry | None:
        ...

    async def claim(self, key: str, *, action: str = "", target: str = "") -> bool:
        ...

    async def settle(self, key: str, outcome: Outcome, *, reason: str = "") -> None:
        ...


_shared: contextvars.ContextVar[ClaimStore | None] = contextvars.ContextVar("agentjobs_shared_claims",
                                                                            default=None)


@contextlib.contextmanager
def shared_claims(store: ClaimStore | None) -> Iterator[None]:
    """Within this block, ``execute`` also claims every action in ``store`` (None: only the local ledger)."""
    token = _shared.set(store)
    try:
        yield
    finally:
        _shared.reset(token)


def current_shared() -> ClaimStore | None:
    return _shared.get()


SHARED = "in the investigation's shared claims (another pod or Job of it)"


# --- the protocol ------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Result:
    """How one execution ended, and everything worth recording about it."""

    outcome: Outcome
    key: str
    reason: str = ""
    execution: Execution | None = None
    undo: str = ""
    previous: Entry | None = None  # already_executed: what the ledger knew

    @property
    def executed(self) -> bool:
        """The action was carried out (now, or by an earlier attempt whose outcome was recorded)."""
        if self.outcome is Outcome.ALREADY_EXECUTED:
            return self.previous is not None and self.previous.outcome in ACTED
        return self.outcome in ACTED

    def params(self) -> dict[str, str]:
        """What the ProposedAction records about this execution (pure; empty values left out)."""
        done = self.execution or Execution(ok=False)
        fields = {"outcome": self.outcome.value, "reason": self.reason, "before": done.before,
                  "after": done.after, "undo": self.undo, "error": done.error, "idempotency_key": self.key}
        if self.previous is not None and self.previous.outcome is not None:
            fields["previous_outcome"] = self.previous.outcome.value
        return {k: _bounded(v) for k, v in fields.items() if v}


RECORDED = frozenset({"decision", "outcome", "reason", "before", "after", "undo", "error", "idempotency_key",
                      "previous_outcome"})  # params the gate and the protocol write; a proposer's are dropped


def _bounded(text: str) -> str:
    return text if len(text) <= FIELD_CHARS else text[: FIELD_CHARS - 1] + "…"


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:300]}"


def outcome_of(done: Execution, verified: bool) -> Outcome:
    """The outcome once ``act`` returned (pure)."""
    if not done.ok:
        return Outcome.FAILED
    return Outcome.EXECUTED_VERIFIED if verified else Outcome.EXECUTED_NOT_VERIFIED


def already(key: str, entry: Entry, *, where: str = "") -> Result:
    """A key claimed before (pure); ``where``: which ledger knew it, when not the local one."""
    when = (f" at {entry.claimed_at}" if entry.claimed_at else "") + (f" {where}" if where else "")
    if entry.outcome is None:
        reason = (f"an earlier attempt claimed this action{when} and its outcome was never recorded "
                  "(it may have stopped while acting); not acting twice")
    else:
        reason = f"an earlier attempt{when} ended {entry.outcome.value}; not acting twice"
    return Result(outcome=Outcome.ALREADY_EXECUTED, key=key, reason=reason, previous=entry)


async def execute(action: ProposedAction, executor: RemediationExecutor, *, done: Ledger | MutableSet[str],
                  investigation_id: str = "", verify_timeout: float | None = None,
                  guard: Guard | None = None, limit: Refusal | None = None,
                  shared: ClaimStore | None = None) -> Result:
    """Re-check → guard → claim → act once → verify; never raises for the executor's failures.

    ``guard``: asked right before acting (default: the one installed with ``guarded``, if any).
    ``limit``: a blast-radius limit already decided (``agent.remediation.limits``): once the
    precondition holds and the guard let it pass, the execution ends with it; nothing is claimed or done.
    ``shared``: the investigation's claim store (default: the one installed with ``shared_claims``,
    if any), consulted besides ``done`` and claimed first (see the module docstring).
    """
    ledger = as_ledger(done)
    store = shared if shared is not None else current_shared()
    key = idempotency_key(investigation_id, action, volatile=frozenset(getattr(executor, "volatile_params", ())))
    try:
        entry = ledger.seen(key)
    except OSError as exc:
        return Result(outcome=Outcome.FAILED, key=key,
                      reason=f"the idempotency ledger is unreadable, not acting: {_error(exc)}")
    if entry is not None:
        return already(key, entry)
    if store is not None:
        try:
            entry = await store.seen(key)
        except Exception as exc:  # noqa: BLE001 - cannot tell whether another attempt acted: do not act
            return Result(outcome=Outcome.FAILED, key=key,
                          reason=f"the shared action claims are unreadable, not acting: {_error(exc)}")
        if entry is not None:
            return already(key, entry, where=SHARED)
    try:
        stale = await executor.precondition(action)
    except Exception as exc:  # noqa: BLE001 - an unchecked precondition means: do not act
        return Result(outcome=Outcome.FAILED, key=key, reason=f"could not check the precondition: {_error(exc)}")
    if stale is not None:
        return Result(outcome=Outcome.SKIPPED_STALE, key=key, reason=stale)
    check = guard if guard is not None else current_guard()
    if check is not None and (refusal := await _ask(check, action)) is not None:
        return Result(outcome=refusal.outcome, key=key, reason=refusal.reason)  # nothing claimed, nothing done
    if limit is not None:
        return Result(outcome=limit.outcome, key=key, reason=limit.reason)  # nothing claimed, nothing done
    if store is not None:  # the authoritative claim first: it is what another pod or Job sees
        try:
            won = await store.claim(key, action=action.action, target=action.target)
        except Exception as exc:  # noqa: BLE001 - unclaimed means unprotected: do not act
            return Result(outcome=Outcome.FAILED, key=key,
                          reason=f"could not claim the action in the shared action claims, not acting: {_error(exc)}")
        if not won:  # another pod or Job claimed it between seen and claim
            try:
                before = await store.seen(key)
            except Exception:  # noqa: BLE001 - it exists; what it says is extra
                before = None
            return already(key, before or Entry(key=key), where=SHARED)
    try:
        claimed = ledger.claim(key, action=action.action, target=action.target)
    except OSError as exc:
        failed = Result(outcome=Outcome.FAILED, key=key,
                        reason=f"could not record the action in the idempotency ledger, not acting: {_error(exc)}")
        await _settle_shared(store, failed)  # claimed there, not done: say so
        return failed
    if not claimed:  # another process of this Job claimed it between seen and claim
        return already(key, ledger.seen(key) or Entry(key=key))
    # Cancelled while acting (SIGTERM): the claim stays and the outcome stays unknown, so it counts as done.
    result = await _act_and_verify(action, executor, key, verify_timeout)
    with contextlib.suppress(OSError):  # the claim is what prevents a second act; the outcome is extra
        ledger.settle(key, result.outcome, reason=result.reason)
    await _settle_shared(store, result)
    return result


async def _settle_shared(store: ClaimStore | None, result: Result) -> None:
    """Record the outcome in the shared claims; never raises (the claim alone prevents a second act)."""
    if store is None:
        return
    with contextlib.suppress(Exception):
        await store.settle(result.key, result.outcome, reason=result.reason)


async def _act_and_verify(action: ProposedAction, executor: RemediationExecutor, key: str,
                          verify_timeout: float | None) -> Result:
    try:
        done = await executor.act(action)
    except Exception as exc:  # noqa: BLE001 - a failed remediation is reported, not raised
        done = Execution(ok=False, error=_error(exc))
    try:
        undo = executor.undo(action, done) if done.ok else ""
    except Exception as exc:  # noqa: BLE001
        undo = f"unknown (the executor could not say: {_error(exc)})"
    if not done.ok:
        return Result(outcome=Outcome.FAILED, key=key, execution=done,
                      reason=f"the action failed: {done.error or 'no reason given'}")
    timeout = verify_timeout if verify_timeout is not None else float(getattr(executor, "verify_timeout", 10.0))
    try:
        verified = await executor.verify(action, timeout=timeout)
        why = "" if verified else f"the effect was not observed within {timeout:g} s"
    except Exception as exc:  # noqa: BLE001 - it ran; only the check failed
        verified, why = False, f"verification failed: {_error(exc)}"
    observed = getattr(executor, "observed_after", None)
    if callable(observed):
        try:
            after = observed(action)
        except Exception:  # noqa: BLE001
            after = ""
        if after:
            done = Execution(ok=done.ok, before=done.before, after=after, undo=done.undo, error=done.error)
    outcome = outcome_of(done, verified)
    reason = why or "executed and verified: the diagnostic no longer shows the condition"
    return Result(outcome=outcome, key=key, execution=done, undo=undo or done.undo or no_undo("not reported"),
                  reason=reason)
