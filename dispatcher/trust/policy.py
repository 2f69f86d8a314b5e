"""Earned autonomy as a pure decision core: per-scope tallies and the phase policy.

Trust is measured by what operators do with findings, not by the agent's
confidence. This module owns the arithmetic and the rules; it does no I/O and
never reads the wall clock, so the same sequence of events always yields the
same phases (the trust consumer and the dispatcher replay logs through it).

Choices, so that an SRE reading ``agentjobs phase explain`` is not surprised:

- **Window.** Per scope, the newest ``window`` counted feedbacks (by event time,
  ties by arrival) whose ``at`` is within ``max_age`` of the scope's clock.
  The scope's clock is the newest event time seen for that scope; it never
  moves backwards, so a late feedback cannot undo dwell or cool-down.
- **What counts.** Only feedback on findings produced in the scope's current
  phase, after that phase was entered: findings from an earlier phase say
  nothing about what the new phase may do. Stale feedback still advances the
  clock and is remembered for de-duplication.
- **Modification.** ``modified``, ``rejected`` and ``action_overridden`` count.
  For a shadow-phase finding that carries a shadow comparison, the comparison
  decides instead (disagreed = modification, agreed = accepted): in shadow the
  operator never saw the finding, so the verdict says little.
- **Duplicates.** A feedback id counts once. Each scope remembers its last
  ``dedup_capacity`` distinct ids (default 4096, never fewer than ``window``),
  so memory is O(scopes x capacity); an id older than that is long out of
  the window.
- **One verdict per investigation.** A feedback with a new id for an
  investigation that already has a verdict in the window *replaces* it (the
  earlier one leaves the window, the correction is tallied as any feedback):
  an operator's correction, or a flood of verdicts on one finding, counts as
  one sample. Each scope remembers the window entry of its last
  ``dedup_capacity`` investigations.
- **Harmful.** A harmful flag demotes at once to ``harmful_demotes_to`` when
  the scope is above it, whatever the feedback's phase or age (safety first),
  and blocks promotion while it is in the window.
- **Per action.** A feedback naming an action (``OperatorFeedback.action``) counts like any
  other in the window and, besides, for that action: ``Explanation.actions`` has, per action,
  the verdicts in the window, how many were modifications, ``action_overridden`` and harmful
  (``action_tallies``). A harmful flag on an action demotes exactly as any harmful flag.
- **Pin.** A pinned scope makes no automatic change at all, harmful included;
  tallies go on. After unpin the policy resumes on the next feedback (a
  harmful flag still in the window then demotes).
- **Changes.** Every ``PhaseChanged`` (automatic, pin or unpin) starts the
  cool-down. A change to a different phase empties the window and restarts the
  dwell: the new phase earns its own evidence.
- **Initial phase.** A scope starts in ``initial_phase``; its dwell counts from
  the earliest event seen for it, and no event is emitted for it.
- **Event time.** A change's ``at`` is the scope's clock when it was decided
  (the triggering feedback's ``at``, unless that feedback arrived late). A pin's
  ``reason`` is ``"pinned: <operator's reason>"``; ``reason_of`` strips it.

Replay: ``apply_phase_changed`` adopts a logged change through the same code
path that made it, so re-applying a change the ledger just emitted is a no-op.
Feeding feedbacks and changes in the order the live ledger saw them (``replay``)
rebuilds the full state; the phase log alone rebuilds phases and pins.
"""

from __future__ import annotations

import bisect
import enum
import math
from collections import deque
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta

import msgspec

from schemas import OperatorFeedback, Phase, PhaseChanged, Verdict

from dispatcher.plumbing.settings import TrustSettings

AUTO = "auto"  # PhaseChanged.operator of automatic changes
DEFAULT_DEDUP_CAPACITY = 4096  # feedback ids remembered per scope
MODIFYING = frozenset({Verdict.MODIFIED, Verdict.REJECTED, Verdict.ACTION_OVERRIDDEN})

_LADDER: tuple[Phase, ...] = tuple(Phase)  # shadow → read-only → limited-remediation → autonomous
_RANK = {p: i for i, p in enumerate(_LADDER)}
_PIN_PREFIX = "pinned: "


class Reason(enum.StrEnum):
    """Why a phase changed (``PhaseChanged.reason``; a pin appends the operator's reason)."""

    PROMOTED = "promoted"
    DEMOTED = "demoted"
    HARMFUL_ACTION = "harmful_action"
    PINNED = "pinned"
    UNPINNED = "unpinned"


class Blocker(enum.StrEnum):
    """One unmet condition for promotion."""

    PINNED = "pinned"
    TOP_PHASE = "top_phase"  # already autonomous
    SAMPLES = "samples"  # n < min_samples
    RATE = "rate"  # upper Wilson bound > promote_threshold
    DWELL = "dwell"  # time in phase < min_dwell
    HARMFUL = "harmful"  # a harmful flag in the window
    COOLDOWN = "cooldown"  # a change less than `cooldown` ago


def reason_of(event: PhaseChanged) -> Reason:
    """The machine-readable reason of a change (a pin's free text stripped)."""
    return Reason(event.reason.split(":", 1)[0])


def wilson_bounds(k: int, n: int, z: float) -> tuple[float, float]:
    """Wilson score interval of k successes in n trials; (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z2 / (4 * n * n)) / denom
    lower = 0.0 if k <= 0 else max(0.0, centre - half)
    upper = 1.0 if k >= n else min(1.0, centre + half)
    return lower, upper


def is_modification(fb: OperatorFeedback) -> bool:
    """Whether this feedback counts towards the modification rate."""
    if fb.phase is Phase.SHADOW and fb.shadow is not None:
        return not fb.shadow.agreed
    return fb.verdict in MODIFYING


def promotion_blockers(
    settings: TrustSettings,
    *,
    phase: Phase,
    samples: int,
    wilson_upper: float,
    harmful_in_window: int,
    in_phase_s: float,
    since_change_s: float | None,
    pinned: bool,
) -> tuple[Blocker, ...]:
    """The unmet promotion conditions, in a fixed order (empty: promote now)."""
    out: list[Blocker] = []
    if pinned:
        out.append(Blocker.PINNED)
    if _RANK[phase] == len(_LADDER) - 1:
        out.append(Blocker.TOP_PHASE)
    if samples < settings.min_samples:
        out.append(Blocker.SAMPLES)
    if wilson_upper > settings.promote_threshold:
        out.append(Blocker.RATE)
    if in_phase_s < settings.min_dwell:
        out.append(Blocker.DWELL)
    if harmful_in_window:
        out.append(Blocker.HARMFUL)
    if since_change_s is not None and since_change_s < settings.cooldown:
        out.append(Blocker.COOLDOWN)
    return tuple(out)


def decide(
    settings: TrustSettings,
    *,
    phase: Phase,
    samples: int,
    modifications: int,
    harmful: bool,
    in_phase_s: float,
    since_change_s: float | None,
    pinned: bool,
) -> tuple[Phase, Reason] | None:
    """The policy (pure): the phase to move to and why, or None to stay.

    ``harmful`` is true when a harmful flag is in the window or just arrived.
    Harmful beats demotion beats promotion; a promotion or demotion moves one step.
    """
    if pinned:
        return None
    rank = _RANK[phase]
    target = settings.harmful_demotes_to
    if harmful and rank > _RANK[target]:
        return target, Reason.HARMFUL_ACTION
    lower, upper = wilson_bounds(modifications, samples, settings.confidence_z)
    if samples and rank > 0 and lower >= settings.demote_threshold:
        return _LADDER[rank - 1], Reason.DEMOTED  # allowed during cool-down
    blockers = promotion_blockers(
        settings,
        phase=phase,
        samples=samples,
        wilson_upper=upper,
        harmful_in_window=int(harmful),
        in_phase_s=in_phase_s,
        since_change_s=since_change_s,
        pinned=False,
    )
    if not blockers:
        return _LADDER[rank + 1], Reason.PROMOTED
    return None


class ActionTally(msgspec.Struct, frozen=True, kw_only=True):
    """The window's verdicts naming one action."""

    action: str
    feedbacks: int
    modifications: int
    overridden: int  # action_overridden verdicts
    harmful: int


# What a window entry said about its action: (action, modified, overridden, harmful).
_ActionNote = tuple[str, bool, bool, bool]


def action_note(fb: OperatorFeedback, modified: bool) -> _ActionNote | None:
    """What a counted feedback says about the action it names; None when it names none (pure)."""
    if not fb.action:
        return None
    return fb.action, modified, fb.verdict is Verdict.ACTION_OVERRIDDEN, fb.harmful


def action_tallies(notes: Iterable[_ActionNote]) -> tuple[ActionTally, ...]:
    """Per-action counts of the window's verdicts that name an action, by action name (pure)."""
    by: dict[str, list[int]] = {}
    for action, modified, overridden, harmful in notes:
        c = by.setdefault(action, [0, 0, 0, 0])
        c[0] += 1
        c[1] += modified
        c[2] += overridden
        c[3] += harmful
    return tuple(ActionTally(action=a, feedbacks=n, modifications=m, overridden=o, harmful=h)
                 for a, (n, m, o, h) in sorted(by.items()))


class Explanation(msgspec.Struct, frozen=True, kw_only=True):
    """Where a scope stands and why: what ``agentjobs phase explain`` prints."""

    scope: str
    phase: Phase
    policy_version: str
    at: datetime | None  # time the figures are evaluated at (None: nothing seen yet)
    pinned: bool
    pin_reason: str
    pinned_by: str
    samples: int  # n in the window
    modifications: int
    harmful_in_window: int
    modification_rate: float | None  # None when n is 0
    wilson_lower: float
    wilson_upper: float
    window: int
    min_samples: int
    promote_threshold: float
    demote_threshold: float
    confidence_z: float
    time_in_phase_s: float  # seconds
    # promotion
    next_phase: Phase | None  # None when autonomous
    promote_blockers: tuple[Blocker, ...]
    samples_missing: int
    dwell_remaining_s: float  # seconds
    cooldown_remaining_s: float  # seconds
    accepts_to_promote: int | None  # further accepted feedbacks meeting samples+rate; None: never
    # demotion
    previous_phase: Phase | None  # None when shadow
    modifications_to_demote: int | None  # consecutive modifications that would demote; None: never
    harmful_demotes_to: Phase | None  # where a harmful flag sends this scope; None: nowhere lower
    notes: tuple[str, ...]  # the same, in sentences
    actions: tuple[ActionTally, ...] = ()  # the window's verdicts naming an action, per action


# One counted feedback: (at, arrival seq, modified, harmful); the window is sorted on it.
_Entry = tuple[datetime, int, bool, bool]


class _Scope:
    """Mutable state of one scope (owned by TrustLedger)."""

    __slots__ = (
        "clock",
        "entered_at",
        "first_seen",
        "harmful",
        "actions",
        "last_change_at",
        "modifications",
        "phase",
        "pin_reason",
        "pinned",
        "pinned_by",
        "seen",
        "seen_order",
        "seq",
        "verdicts",
        "window",
    )

    def __init__(self, phase: Phase, at: datetime) -> None:
        self.phase = phase
        self.entered_at: datetime | None = None  # None: the initial phase, never changed
        self.first_seen = at
        self.last_change_at: datetime | None = None
        self.clock = at  # newest event time seen for this scope
        self.pinned = False
        self.pin_reason = ""
        self.pinned_by = ""
        self.window: list[_Entry] = []
        self.modifications = 0
        self.harmful = 0
        self.seq = 0
        self.seen: set[str] = set()
        self.seen_order: deque[str] = deque()
        # investigation id -> (at, seq) of its counted verdict; insertion order = oldest first
        self.verdicts: dict[str, tuple[datetime, int]] = {}
        # seq of a window entry naming an action -> what it said about it (see action_note)
        self.actions: dict[int, _ActionNote] = {}

    def in_phase_s(self, now: datetime) -> float:
        return (now - (self.entered_at or self.first_seen)).total_seconds()

    def since_change_s(self, now: datetime) -> float | None:
        return None if self.last_change_at is None else (now - self.last_change_at).total_seconds()

    def drop_oldest(self) -> None:
        _, seq, modified, harmful = self.window.pop(0)
        self.actions.pop(seq, None)
        self.modifications -= modified
        self.harmful -= harmful

    def withdraw(self, key: tuple[datetime, int]) -> bool:
        """Take the window entry ``key`` (at, seq) out, if it is still there."""
        i = bisect.bisect_left(self.window, key)
        if i < len(self.window) and self.window[i][:2] == key:
            _, seq, modified, harmful = self.window.pop(i)
            self.actions.pop(seq, None)
            self.modifications -= modified
            self.harmful -= harmful
            return True
        return False

    def evict(self, cutoff: datetime) -> None:
        while self.window and self.window[0][0] < cutoff:
            self.drop_oldest()

    def reset_window(self) -> None:
        self.window.clear()
        self.verdicts.clear()
        self.actions.clear()
        self.modifications = 0
        self.harmful = 0


class ScopeSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """One scope's state, exactly (``TrustLedger.snapshot``)."""

    phase: Phase
    entered_at: datetime | None
    first_seen: datetime
    last_change_at: datetime | None
    clock: datetime
    pinned: bool
    pin_reason: str
    pinned_by: str
    window: list[tuple[datetime, int, bool, bool]]
    modifications: int
    harmful: int
    seq: int
    seen: list[str]  # remembered feedback ids, oldest first
    # investigation id, at, seq of each investigation's counted verdict, oldest first
    verdicts: list[tuple[str, datetime, int]] = []
    # seq, action, modified, overridden, harmful of each window entry naming an action
    actions: list[tuple[int, str, bool, bool, bool]] = []


class LedgerSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a ledger knows: restoring it and applying the rest of the log gives the same
    ledger as applying the whole log (``tests/unit/test_trust_snapshot.py``)."""

    dedup_capacity: int
    scopes: dict[str, ScopeSnapshot]


class TrustLedger:
    """Every scope's tallies and phase; feed it events in log order.

    Deterministic: it reads time only from events, so the same event sequence
    gives the same ``PhaseChanged`` list and the same phases. Satisfies
    ``dispatcher.intake.phases.PhaseSource``.
    """

    def __init__(
        self, settings: TrustSettings, *, dedup_capacity: int = DEFAULT_DEDUP_CAPACITY
    ) -> None:
        self.settings = settings
        self.dedup_capacity = max(dedup_capacity, settings.window)
        self._max_age = timedelta(seconds=settings.max_age)
        self._scopes: dict[str, _Scope] = {}

    # --- reading -----------------------------------------------------------------

    def snapshot(self) -> LedgerSnapshot:
        """The whole state, for a restart that replays only what came after it."""
        return LedgerSnapshot(dedup_capacity=self.dedup_capacity, scopes={
            name: ScopeSnapshot(
                phase=s.phase, entered_at=s.entered_at, first_seen=s.first_seen, last_change_at=s.last_change_at,
                clock=s.clock, pinned=s.pinned, pin_reason=s.pin_reason, pinned_by=s.pinned_by,
                window=list(s.window), modifications=s.modifications, harmful=s.harmful, seq=s.seq,
                seen=list(s.seen_order), verdicts=[(inv, at, seq) for inv, (at, seq) in s.verdicts.items()],
                actions=[(seq, *note) for seq, note in s.actions.items()])
            for name, s in self._scopes.items()})

    @classmethod
    def restore(cls, settings: TrustSettings, snapshot: LedgerSnapshot) -> TrustLedger:
        """A ledger in the state ``snapshot`` was taken in (under the same settings)."""
        ledger = cls(settings, dedup_capacity=snapshot.dedup_capacity)
        for name, snap in snapshot.scopes.items():
            s = _Scope(snap.phase, snap.first_seen)
            s.entered_at, s.last_change_at, s.clock = snap.entered_at, snap.last_change_at, snap.clock
            s.pinned, s.pin_reason, s.pinned_by = snap.pinned, snap.pin_reason, snap.pinned_by
            s.window = [tuple(entry) for entry in snap.window]  # type: ignore[misc]
            s.modifications, s.harmful, s.seq = snap.modifications, snap.harmful, snap.seq
            s.seen_order = deque(snap.seen)
            s.seen = set(snap.seen)
            s.verdicts = {inv: (at, seq) for inv, at, seq in snap.verdicts}
            s.actions = {seq: (action, m, o, h) for seq, action, m, o, h in snap.actions}
            ledger._scopes[name] = s
        return ledger

    def phase_for(self, scope: str) -> Phase:
        """The phase the next Job in ``scope`` runs with."""
        s = self._scopes.get(scope)
        return self.settings.initial_phase if s is None else s.phase

    def phases(self) -> dict[str, Phase]:
        """Every known scope's phase, sorted by scope."""
        return {name: self._scopes[name].phase for name in sorted(self._scopes)}

    def has_seen(self, scope: str, feedback_id: str) -> bool:
        """True if this feedback id was already tallied in ``scope`` (within the dedup memory)."""
        s = self._scopes.get(scope)
        return s is not None and feedback_id in s.seen

    def is_pinned(self, scope: str) -> bool:
        s = self._scopes.get(scope)
        return s is not None and s.pinned

    # --- events ------------------------------------------------------------------

    def apply(self, event: OperatorFeedback | PhaseChanged) -> PhaseChanged | None:
        """Apply one logged event; a feedback may yield a change to publish."""
        if isinstance(event, PhaseChanged):
            self.apply_phase_changed(event)
            return None
        return self.apply_feedback(event)

    def apply_feedback(self, fb: OperatorFeedback) -> PhaseChanged | None:
        """Tally one feedback and apply the policy; returns the change it caused, if any."""
        s = self._scope(fb.scope, fb.at)
        if not self._remember(s, fb.feedback_id):
            return None  # duplicate: counts once
        self._advance(s, fb.at)
        now = s.clock
        cutoff = now - self._max_age
        counted = (
            fb.phase is s.phase
            and (s.entered_at is None or fb.at >= s.entered_at)
            and fb.at >= cutoff
        )
        earlier = s.verdicts.pop(fb.investigation_id, None)
        if earlier is not None:
            s.withdraw(earlier)  # a later verdict on the same investigation replaces, never adds
        if counted:
            s.seq += 1
            modified = is_modification(fb)
            bisect.insort(s.window, (fb.at, s.seq, modified, fb.harmful))
            s.modifications += modified
            s.harmful += fb.harmful
            s.verdicts[fb.investigation_id] = (fb.at, s.seq)
            note = action_note(fb, modified)
            if note is not None:
                s.actions[s.seq] = note
            if len(s.verdicts) > self.dedup_capacity:
                del s.verdicts[next(iter(s.verdicts))]
            if len(s.window) > self.settings.window:
                s.drop_oldest()
        decision = decide(
            self.settings,
            phase=s.phase,
            samples=len(s.window),
            modifications=s.modifications,
            harmful=fb.harmful or s.harmful > 0,
            in_phase_s=s.in_phase_s(now),
            since_change_s=s.since_change_s(now),
            pinned=s.pinned,
        )
        if decision is None:
            return None
        to_phase, reason = decision
        event = self._event(fb.scope, s, to_phase=to_phase, at=now, reason=reason, operator=AUTO)
        self._transition(s, event)
        return event

    def apply_phase_changed(self, ev: PhaseChanged) -> None:
        """Adopt a logged change (idempotent: re-applying our own event changes nothing)."""
        s = self._scope(ev.scope, ev.at)
        self._advance(s, ev.at)
        self._transition(s, ev)

    def pin(
        self, scope: str, phase: Phase, *, reason: str, operator: str, at: datetime
    ) -> PhaseChanged:
        """Hold ``scope`` at ``phase``: no automatic change until unpinned."""
        if not reason.strip():
            raise ValueError("a pin needs a reason")
        s = self._scope(scope, at)
        self._advance(s, max(at, s.clock))  # the event carries the scope's time, as replay sees it
        text = f"{_PIN_PREFIX}{' '.join(reason.split())}"[:512]
        event = self._event(
            scope, s, to_phase=phase, at=s.clock, reason=text, operator=operator, pinned=True
        )
        self._transition(s, event)
        return event

    def unpin(self, scope: str, *, operator: str, at: datetime) -> PhaseChanged | None:
        """Resume automatic changes; None when the scope was not pinned (idempotent)."""
        s = self._scopes.get(scope)
        if s is None or not s.pinned:
            return None
        self._advance(s, max(at, s.clock))
        event = self._event(
            scope, s, to_phase=s.phase, at=s.clock, reason=Reason.UNPINNED, operator=operator
        )
        self._transition(s, event)
        return event

    # --- explaining --------------------------------------------------------------

    def explain(self, scope: str, now: datetime | None = None) -> Explanation:
        """Current phase, figures, and what is still needed to promote or would demote."""
        st = self.settings
        s = self._scopes.get(scope)
        if s is None:
            phase, pinned, pin_reason, pinned_by = st.initial_phase, False, "", ""
            at = now
            flags: list[tuple[bool, bool]] = []
            action_notes: list[_ActionNote] = []
            in_phase = 0.0
            since_change: float | None = None
        else:
            phase, pinned, pin_reason, pinned_by = s.phase, s.pinned, s.pin_reason, s.pinned_by
            at = s.clock if now is None or now < s.clock else now
            cutoff = at - self._max_age
            flags = [(m, h) for (t, _, m, h) in s.window if t >= cutoff]
            action_notes = [s.actions[seq] for (t, seq, _, _) in s.window if t >= cutoff and seq in s.actions]
            in_phase = s.in_phase_s(at)
            since_change = s.since_change_s(at)
        n = len(flags)
        k = sum(m for m, _ in flags)
        harmful = sum(h for _, h in flags)
        lower, upper = wilson_bounds(k, n, st.confidence_z)
        rank = _RANK[phase]
        blockers = promotion_blockers(
            st,
            phase=phase,
            samples=n,
            wilson_upper=upper,
            harmful_in_window=harmful,
            in_phase_s=in_phase,
            since_change_s=since_change,
            pinned=pinned,
        )
        mods = [m for m, _ in flags]
        next_phase = _LADDER[rank + 1] if rank + 1 < len(_LADDER) else None
        previous_phase = _LADDER[rank - 1] if rank > 0 else None
        explanation = Explanation(
            scope=scope,
            phase=phase,
            policy_version=st.policy_version,
            at=at,
            pinned=pinned,
            pin_reason=pin_reason,
            pinned_by=pinned_by,
            samples=n,
            modifications=k,
            harmful_in_window=harmful,
            modification_rate=k / n if n else None,
            wilson_lower=lower,
            wilson_upper=upper,
            window=st.window,
            min_samples=st.min_samples,
            promote_threshold=st.promote_threshold,
            demote_threshold=st.demote_threshold,
            confidence_z=st.confidence_z,
            time_in_phase_s=in_phase,
            next_phase=next_phase,
            promote_blockers=blockers,
            samples_missing=max(0, st.min_samples - n),
            dwell_remaining_s=max(0.0, st.min_dwell - in_phase),
            cooldown_remaining_s=0.0
            if since_change is None
            else max(0.0, st.cooldown - since_change),
            accepts_to_promote=_accepts_to_promote(st, mods),
            previous_phase=previous_phase,
            modifications_to_demote=_modifications_to_demote(st, mods) if rank > 0 else None,
            harmful_demotes_to=st.harmful_demotes_to
            if rank > _RANK[st.harmful_demotes_to]
            else None,
            notes=(),
            actions=action_tallies(action_notes),
        )
        return msgspec.structs.replace(explanation, notes=_notes(explanation))

    # --- internals ---------------------------------------------------------------

    def _scope(self, scope: str, at: datetime) -> _Scope:
        s = self._scopes.get(scope)
        if s is None:
            s = self._scopes[scope] = _Scope(self.settings.initial_phase, at)
        return s

    def _remember(self, s: _Scope, feedback_id: str) -> bool:
        """Record an id; False when it was already seen (bounded FIFO memory)."""
        if feedback_id in s.seen:
            return False
        s.seen.add(feedback_id)
        s.seen_order.append(feedback_id)
        if len(s.seen_order) > self.dedup_capacity:
            s.seen.discard(s.seen_order.popleft())
        return True

    def _advance(self, s: _Scope, at: datetime) -> None:
        """Move the scope's clock forward (never back) and age out old feedback."""
        s.first_seen = min(s.first_seen, at)
        if at > s.clock:
            s.clock = at
            s.evict(at - self._max_age)

    def _event(
        self,
        scope: str,
        s: _Scope,
        *,
        to_phase: Phase,
        at: datetime,
        reason: str,
        operator: str,
        pinned: bool = False,
    ) -> PhaseChanged:
        n, k = len(s.window), s.modifications
        lower, upper = wilson_bounds(k, n, self.settings.confidence_z)
        return PhaseChanged(
            scope=scope,
            from_phase=s.phase,
            to_phase=to_phase,
            at=at,
            reason=str(reason),
            policy_version=self.settings.policy_version,
            pinned=pinned,
            samples=n,
            modification_rate=k / n if n else None,
            wilson_lower=lower,
            wilson_upper=upper,
            operator=operator,
        )

    @staticmethod
    def _transition(s: _Scope, ev: PhaseChanged) -> None:
        """The one place state follows a change, live or replayed."""
        if ev.to_phase is not s.phase:
            s.phase = ev.to_phase
            s.entered_at = ev.at
            s.reset_window()  # the new phase earns its own evidence
        if s.last_change_at is None or ev.at > s.last_change_at:
            s.last_change_at = ev.at
        s.pinned = ev.pinned
        if ev.pinned:
            s.pin_reason = ev.reason.removeprefix(_PIN_PREFIX).removeprefix(Reason.PINNED)
            s.pinned_by = ev.operator
        else:
            s.pin_reason = s.pinned_by = ""


def replay(
    settings: TrustSettings,
    events: Iterable[OperatorFeedback | PhaseChanged],
    *,
    dedup_capacity: int = DEFAULT_DEDUP_CAPACITY,
) -> TrustLedger:
    """A ledger rebuilt from logged events in log order (changes they imply are re-derived)."""
    ledger = TrustLedger(settings, dedup_capacity=dedup_capacity)
    for event in events:
        ledger.apply(event)
    return ledger


def _accepts_to_promote(st: TrustSettings, mods: Sequence[bool]) -> int | None:
    """Further accepted feedbacks until n >= min_samples and upper <= threshold (None: never)."""
    window = deque(mods)
    k = sum(window)
    for extra in range(st.window + st.min_samples + 1):
        n = len(window)
        if n >= st.min_samples and wilson_bounds(k, n, st.confidence_z)[1] <= st.promote_threshold:
            return extra
        window.append(False)
        if len(window) > st.window:
            k -= window.popleft()
    return None


def _modifications_to_demote(st: TrustSettings, mods: Sequence[bool]) -> int | None:
    """Further consecutive modifications until the lower bound reaches the demote threshold."""
    window = deque(mods)
    k = sum(window)
    for extra in range(st.window + 1):
        n = len(window)
        if n and wilson_bounds(k, n, st.confidence_z)[0] >= st.demote_threshold:
            return extra
        window.append(True)
        k += 1
        if len(window) > st.window:
            k -= window.popleft()
    return None


def _notes(e: Explanation) -> tuple[str, ...]:
    """The explanation in sentences."""
    rate = "no samples" if e.modification_rate is None else f"rate {e.modification_rate:.3f}"
    out = [
        (
            f"{e.scope}: {e.phase}; n={e.samples}, {e.modifications} modified, {rate}, "
            f"Wilson [{e.wilson_lower:.3f}, {e.wilson_upper:.3f}] at z={e.confidence_z}"
        ),
    ]
    if e.next_phase is not None:
        if not e.promote_blockers:
            out.append(f"promotes to {e.next_phase} on the next feedback")
        for b in e.promote_blockers:
            out.append(_BLOCKER_TEXT[b](e))
    if e.previous_phase is not None and e.modifications_to_demote is not None:
        out.append(
            f"demotes to {e.previous_phase} after {e.modifications_to_demote} more consecutive "
            f"modifications (lower bound {e.wilson_lower:.3f} vs {e.demote_threshold})"
        )
    for a in e.actions:
        out.append(f"action {a.action}: {a.feedbacks} verdict(s) in the window, {a.overridden} overridden, "
                   f"{a.harmful} harmful, {a.modifications} modified")
    if e.harmful_demotes_to is not None:
        out.append(f"a harmful flag demotes at once to {e.harmful_demotes_to}")
    if e.pinned:
        out.append(
            f"pinned by {e.pinned_by or '?'} ({e.pin_reason}): no automatic change until unpinned"
        )
    return tuple(out)


_BLOCKER_TEXT = {
    Blocker.PINNED: lambda e: "promotion suspended: pinned",
    Blocker.TOP_PHASE: lambda e: "already autonomous",
    Blocker.SAMPLES: lambda e: (
        f"needs {e.samples_missing} more samples ({e.samples}/{e.min_samples})"
    ),
    Blocker.RATE: lambda e: (
        f"upper bound {e.wilson_upper:.3f} > promote threshold {e.promote_threshold}"
        + (
            f"; {e.accepts_to_promote} more accepted feedbacks would do"
            if e.accepts_to_promote is not None
            else "; not reachable with this window"
        )
    ),
    Blocker.DWELL: lambda e: f"dwell: {e.dwell_remaining_s:.0f} s left in {e.phase}",
    Blocker.HARMFUL: lambda e: f"{e.harmful_in_window} harmful flag(s) in the window",
    Blocker.COOLDOWN: lambda e: f"cool-down: {e.cooldown_remaining_s:.0f} s left",
}
