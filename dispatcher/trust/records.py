"""What the trust consumer writes into its feedback log, and its ledger of real investigations (pure).

Feedback counts only for investigations that happened, so the trust consumer keeps its own record
of them, fed — like everything else it knows — from the feedback log, in log order:

- ``InvestigationDispatched``: the dispatcher (its broker-validated ``user_id``) reported
  ``lifecycle.dispatched``: investigation id, Job name, phase and, when the lifecycle event carries
  one, the trust scope;
- ``FindingSeen``: a finding for that investigation arrived from its own agent (the Vault-issued
  user of that Job; with kubernetes auth, any agent user of this installation) or from the
  dispatcher (the failure result of a Job that ended without one). Its ``domain`` is the scope when
  the lifecycle event named none (the scope is the incident's domain unless ``trust.scope_label``
  says otherwise; see ``scope_of``). It lists the actions the finding proposed (``ActionSeen``:
  registry name, the idempotency key of its ``ActionRecord``, executed or not), so a verdict naming
  an action can be checked against them;
- ``AdmittedFeedback`` / ``AdmittedPin``: an operator's verdict or an admin's pin as admitted,
  with the trust consumer's own clock at admission (``admitted_at``). Dwell, cool-down and the
  window run on that time, never on the sender's ``at``: a sender cannot backdate, and a replay
  of the log is exactly the live run.

``InvestigationLedger.check`` is what admission asks: is this feedback about an investigation we
saw, with a finding, in the scope and phase we recorded? The reasons it gives are dead-letter
reasons (``unknown_investigation``, ``no_finding``, ``scope_mismatch``, ``phase_mismatch``, and
``unknown_action`` for a verdict naming an action — or one execution of it — the finding did not
propose, ``action_refusal``).

Memory is bounded and deterministic (it depends only on the log): investigations are forgotten
``trust.max_age`` after they were recorded (feedback on them could not be admitted any more) and
beyond ``MAX_INVESTIGATIONS`` (oldest first); findings that arrived before their investigation's
``lifecycle.dispatched`` wait in a small separate memory (``MAX_PENDING``), so forged findings for
made-up ids can never push real investigations out.
"""

from __future__ import annotations

from collections import OrderedDict
from datetime import UTC, datetime, timedelta

import msgspec

from schemas import Finding, OperatorFeedback, Phase, PhasePin
from schemas.actions import record_of

from dispatcher.intake import senders
from dispatcher.plumbing.settings import IdentitySettings

MAX_INVESTIGATIONS = 200_000  # investigations remembered (~30 days of a busy installation)
MAX_PENDING = 10_000  # findings remembered whose investigation was not reported yet
MAX_PENDING_SENDERS = 4  # different senders remembered per pending finding
MAX_ACTIONS = 64  # proposed actions remembered per finding

UNKNOWN = "unknown_investigation"
NO_FINDING = "no_finding"
SCOPE_MISMATCH = "scope_mismatch"
PHASE_MISMATCH = "phase_mismatch"
UNKNOWN_ACTION = "unknown_action"


# --------------------------------------------------------------------------- #
# feedback-log entries written by this version (JSON, tagged by "kind")
# --------------------------------------------------------------------------- #


class AdmittedFeedback(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="trust_feedback"):
    """An operator's verdict, admitted at ``admitted_at`` (the trust consumer's clock)."""

    feedback: OperatorFeedback  # as sent; its ``at`` is the sender's claim, never used for decisions
    admitted_at: datetime
    sender: str  # broker-validated user_id


class AdmittedPin(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="trust_pin"):
    """An admin's pin/unpin command, admitted at ``admitted_at``."""

    pin: PhasePin
    admitted_at: datetime
    sender: str


class InvestigationDispatched(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind",
                              tag="trust_dispatched"):
    """``lifecycle.dispatched`` from the dispatcher, as recorded."""

    investigation_id: str
    job_name: str
    phase: Phase
    scope: str = ""  # "" when the lifecycle event names none: the finding's domain then
    dispatched_at: datetime  # the dispatcher's time (informational)
    recorded_at: datetime  # the trust consumer's clock
    sender: str


class ActionSeen(msgspec.Struct, frozen=True, kw_only=True):
    """One action a finding proposed, as trust remembers it."""

    action: str  # registry name, e.g. terminate_backend
    key: str = ""  # the idempotency_key of its ActionRecord ("" for an action the gate never saw)
    executed: bool = False


class FindingSeen(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="trust_finding"):
    """A finding for ``investigation_id`` from ``sender`` (checked again against the Job when applied)."""

    investigation_id: str
    domain: str
    phase: Phase
    recorded_at: datetime
    sender: str
    actions: tuple[ActionSeen, ...] = ()  # what it proposed (entries written before this field: none)


def actions_of(finding: Finding) -> tuple[ActionSeen, ...]:
    """The actions ``finding`` proposed, with the keys their ``ActionRecord`` carries (pure, bounded)."""
    at = finding.produced_at or datetime(1970, 1, 1, tzinfo=UTC)  # the key does not depend on it
    out = []
    for a in finding.proposed_actions[:MAX_ACTIONS]:
        record = record_of(a, finding, at=at)
        key = a.params.get("idempotency_key") or (record.idempotency_key if record is not None else "")
        out.append(ActionSeen(action=a.action, key=key, executed=a.executed))
    return tuple(out)


def action_refusal(fb: OperatorFeedback, proposed: tuple[ActionSeen, ...]) -> tuple[str, str] | None:
    """Why a verdict naming an action may not count, as (reason, detail); None: it may (pure).

    A verdict names no action (the finding as a whole), or one the finding proposed — and, with
    ``action_key``, one execution of it: the key of that action's ``ActionRecord``.
    """
    if not fb.action:
        if fb.action_key:
            return UNKNOWN_ACTION, f"action_key {fb.action_key!r} without action: name the action it is a key of"
        return None
    names = sorted({a.action for a in proposed})
    same = [a for a in proposed if a.action == fb.action]
    if not same:
        return UNKNOWN_ACTION, (f"investigation {fb.investigation_id!r}'s finding did not propose {fb.action!r} "
                                f"(it proposed: {', '.join(names) or 'no action'})")
    if fb.action_key and all(a.key != fb.action_key for a in same):
        return UNKNOWN_ACTION, (f"investigation {fb.investigation_id!r}'s finding has no {fb.action!r} with key "
                                f"{fb.action_key!r}")
    return None


LogEntry = AdmittedFeedback | AdmittedPin | InvestigationDispatched | FindingSeen
ENTRY_TYPES = frozenset(t.__struct_config__.tag for t in (AdmittedFeedback, AdmittedPin, InvestigationDispatched,
                                                          FindingSeen))
_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(LogEntry)


def encode_entry(entry: LogEntry) -> bytes:
    return _encoder.encode(entry)


def decode_entry(body: bytes) -> LogEntry:
    """Raises ``msgspec.DecodeError`` / ``msgspec.ValidationError``."""
    return _decoder.decode(body)


def entry_type(entry: LogEntry) -> str:
    return type(entry).__struct_config__.tag  # type: ignore[return-value]


# --------------------------------------------------------------------------- #
# the lifecycle event as trust reads it
# --------------------------------------------------------------------------- #


class DispatchedView(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="lifecycle"):
    """The parts of a ``LifecycleEvent`` trust needs. ``scope`` is read if the dispatcher ever sends
    it (a newer ``LifecycleEvent``); today the scope comes from the finding's domain."""

    investigation_id: str
    state: str
    at: datetime
    job_name: str = ""
    phase: Phase | None = None
    scope: str = ""


_dispatched_decoder = msgspec.json.Decoder(DispatchedView)


def decode_dispatched(body: bytes) -> DispatchedView:
    return _dispatched_decoder.decode(body)


# --------------------------------------------------------------------------- #
# the ledger of investigations
# --------------------------------------------------------------------------- #


class Investigation(msgspec.Struct, kw_only=True):
    """One investigation as trust knows it."""

    investigation_id: str
    job_name: str
    phase: Phase
    scope: str
    dispatched_at: datetime
    recorded_at: datetime
    finding_at: datetime | None = None  # when a finding from an allowed sender was recorded
    actions: tuple[ActionSeen, ...] = ()  # what that finding proposed


class Pending(msgspec.Struct, kw_only=True):
    """Findings seen before their investigation was reported: (sender, domain, recorded_at)."""

    investigation_id: str
    findings: list[tuple[str, str, datetime]]
    actions: dict[str, tuple[ActionSeen, ...]] = {}  # sender -> what its finding proposed


class InvestigationsSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    investigations: list[Investigation]  # oldest first
    pending: list[Pending]  # oldest first


class InvestigationLedger:
    """Investigations trust has seen, fed from the feedback log in order (deterministic, no I/O)."""

    def __init__(self, identities: IdentitySettings, *, max_age: float, kubernetes_auth: bool = False,
                 capacity: int = MAX_INVESTIGATIONS, pending_capacity: int = MAX_PENDING) -> None:
        self.identities = identities
        self.kubernetes_auth = kubernetes_auth
        self.max_age = timedelta(seconds=max_age)
        self.capacity = capacity
        self.pending_capacity = pending_capacity
        self._records: OrderedDict[str, Investigation] = OrderedDict()
        self._pending: OrderedDict[str, Pending] = OrderedDict()

    def __len__(self) -> int:
        return len(self._records)

    def get(self, investigation_id: str) -> Investigation | None:
        return self._records.get(investigation_id)

    # -- what a sender may say ---------------------------------------------------------------

    def finding_refusal(self, sender: str, job_name: str) -> senders.Refusal | None:
        """None if ``sender`` may publish findings of Job ``job_name`` (its agent, or the dispatcher)."""
        return senders.dispatcher_or_agent(self.identities, sender, job_name, "findings",
                                           kubernetes_auth=self.kubernetes_auth)

    # -- applying log entries ----------------------------------------------------------------

    def dispatched(self, entry: InvestigationDispatched) -> bool:
        """Record an investigation (the first report counts; repeats change nothing). True if new."""
        self._forget_before(entry.recorded_at)
        if entry.investigation_id in self._records:
            return False
        record = Investigation(investigation_id=entry.investigation_id, job_name=entry.job_name, phase=entry.phase,
                               scope=entry.scope, dispatched_at=entry.dispatched_at, recorded_at=entry.recorded_at)
        pending = self._pending.pop(entry.investigation_id, None)
        if pending is not None:
            for sender, domain, at in pending.findings:
                if self.finding_refusal(sender, record.job_name) is None:
                    self._saw_finding(record, domain, at, pending.actions.get(sender, ()))
                    break
        self._records[entry.investigation_id] = record
        while len(self._records) > self.capacity:
            self._records.popitem(last=False)
        return True

    def finding(self, entry: FindingSeen) -> bool:
        """Mark the investigation's finding seen (if its sender may say it). True if that changed anything."""
        self._forget_before(entry.recorded_at)
        record = self._records.get(entry.investigation_id)
        if record is None:  # before its lifecycle.dispatched: wait for it
            pending = self._pending.get(entry.investigation_id)
            if pending is None:
                pending = self._pending[entry.investigation_id] = Pending(investigation_id=entry.investigation_id,
                                                                          findings=[])
                while len(self._pending) > self.pending_capacity:
                    self._pending.popitem(last=False)
            if len(pending.findings) < MAX_PENDING_SENDERS and all(s != entry.sender for s, _, _ in pending.findings):
                pending.findings.append((entry.sender, entry.domain, entry.recorded_at))
                if entry.actions:
                    pending.actions[entry.sender] = entry.actions[:MAX_ACTIONS]
                return True
            return False
        if record.finding_at is not None or self.finding_refusal(entry.sender, record.job_name) is not None:
            return False
        self._saw_finding(record, entry.domain, entry.recorded_at, entry.actions)
        return True

    def needs_finding(self, investigation_id: str) -> bool:
        """True unless the investigation is known and its finding seen (then a new finding adds nothing)."""
        record = self._records.get(investigation_id)
        return record is None or record.finding_at is None

    @staticmethod
    def _saw_finding(record: Investigation, domain: str, at: datetime, actions: tuple[ActionSeen, ...]) -> None:
        record.finding_at = at
        record.actions = tuple(actions[:MAX_ACTIONS])
        if not record.scope:
            record.scope = domain

    def _forget_before(self, now: datetime) -> None:
        cutoff = now - self.max_age
        for memory in (self._records, self._pending):
            while memory:
                oldest = next(iter(memory.values()))
                at = oldest.recorded_at if isinstance(oldest, Investigation) else oldest.findings[0][2]
                if at >= cutoff:
                    break
                memory.popitem(last=False)

    # -- admission ---------------------------------------------------------------------------

    def check(self, fb: OperatorFeedback) -> tuple[str, str] | None:
        """Why ``fb`` may not be tallied, as (reason, detail); None: it may."""
        record = self._records.get(fb.investigation_id)
        if record is None:
            return UNKNOWN, (f"investigation {fb.investigation_id!r} is not one trust has seen dispatched (or it was "
                             f"recorded longer than trust.max_age ago)")
        if record.finding_at is None:
            return NO_FINDING, f"no finding of investigation {fb.investigation_id!r} has been seen"
        if fb.scope != record.scope:
            return SCOPE_MISMATCH, (f"feedback says scope {fb.scope!r}, investigation {fb.investigation_id!r} ran in "
                                    f"scope {record.scope!r}")
        if fb.phase is not record.phase:
            return PHASE_MISMATCH, (f"feedback says phase {fb.phase.value}, investigation {fb.investigation_id!r} "
                                    f"ran in phase {record.phase.value}")
        return action_refusal(fb, record.actions)

    # -- snapshots ---------------------------------------------------------------------------

    def snapshot(self) -> InvestigationsSnapshot:
        return InvestigationsSnapshot(
            investigations=[msgspec.structs.replace(r) for r in self._records.values()],
            pending=[Pending(investigation_id=p.investigation_id, findings=list(p.findings), actions=dict(p.actions))
                     for p in self._pending.values()])

    def restore(self, snapshot: InvestigationsSnapshot) -> None:
        self._records = OrderedDict((r.investigation_id, msgspec.structs.replace(r)) for r in snapshot.investigations)
        self._pending = OrderedDict((p.investigation_id, Pending(investigation_id=p.investigation_id,
                                                                 findings=list(p.findings), actions=dict(p.actions)))
                                    for p in snapshot.pending)

