"""Earned autonomy: promotion needs every condition, demotion and harm act fast, pins freeze,
and the same events always give the same phases."""

from __future__ import annotations

import itertools
import math
from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.intake.phases import PhaseSource
from dispatcher.plumbing.settings import TrustSettings
from dispatcher.trust.policy import (
    AUTO,
    Blocker,
    Reason,
    TrustLedger,
    decide,
    reason_of,
    replay,
    wilson_bounds,
)
from schemas import OperatorFeedback, Phase, PhaseChanged, ShadowComparison, Verdict

SHADOW, READ_ONLY, LIMITED, AUTONOMOUS = Phase
T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
HOUR = 3600

# Small numbers so stories stay short: 20 clean feedbacks give an upper bound of 0.161 <= 0.2.
POLICY = TrustSettings(
    policy_version="test-1",
    window=50,
    min_samples=20,
    promote_threshold=0.2,
    demote_threshold=0.4,
    confidence_z=1.96,
    min_dwell=HOUR,
    cooldown=600,
    max_age=7 * 86400.0,
    harmful_demotes_to=READ_ONLY,
)

HOLD = msgspec.structs.replace(POLICY, min_dwell=30 * 86400)  # never promotes within a test

_ids = itertools.count()


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def fb(
    minutes: float,
    *,
    phase: Phase = SHADOW,
    verdict: Verdict = Verdict.ACCEPTED,
    scope: str = "database",
    harmful: bool = False,
    shadow: ShadowComparison | None = None,
    feedback_id: str | None = None,
) -> OperatorFeedback:
    feedback_id = feedback_id or f"fb-{next(_ids)}"
    return OperatorFeedback(
        feedback_id=feedback_id,
        investigation_id=f"inv-{feedback_id}",  # one verdict per investigation: one investigation each
        scope=scope,
        phase=phase,
        verdict=verdict,
        at=at(minutes),
        harmful=harmful,
        shadow=shadow,
    )


def feed(ledger: TrustLedger, feedbacks: list[OperatorFeedback]) -> list[PhaseChanged]:
    return [ev for f in feedbacks if (ev := ledger.apply_feedback(f)) is not None]


def clean(
    n: int, *, start: float, step: float = 5, phase: Phase = SHADOW
) -> list[OperatorFeedback]:
    return [fb(start + i * step, phase=phase) for i in range(n)]


def in_phase(phase: Phase, *, minutes: float = 0, policy: TrustSettings = POLICY) -> TrustLedger:
    """A ledger whose database scope moved to ``phase`` at ``minutes`` (replayed from the log)."""
    ledger = TrustLedger(policy)
    ledger.apply_phase_changed(
        PhaseChanged(
            scope="database",
            from_phase=None,
            to_phase=phase,
            at=at(minutes),
            reason=Reason.PROMOTED,
            operator=AUTO,
        )
    )
    return ledger


# --- Wilson bounds --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "n", "lower", "upper"),
    [
        (0, 0, 0.0, 1.0),
        (0, 20, 0.0, 0.1611),
        (5, 10, 0.2366, 0.7634),
        (20, 20, 0.8389, 1.0),
        (1, 50, 0.0035, 0.1050),
    ],
)
def test_wilson_bounds_match_known_values(k, n, lower, upper) -> None:
    lo, hi = wilson_bounds(k, n, 1.96)
    assert lo == pytest.approx(lower, abs=1e-4)
    assert hi == pytest.approx(upper, abs=1e-4)


@given(
    st.integers(min_value=1, max_value=500).flatmap(
        lambda n: st.tuples(st.integers(min_value=0, max_value=n), st.just(n))
    ),
    st.floats(min_value=0.5, max_value=4.0),
)
def test_wilson_bounds_bracket_the_observed_rate_and_are_symmetric(kn, z) -> None:
    k, n = kn
    lo, hi = wilson_bounds(k, n, z)
    assert 0.0 <= lo <= k / n <= hi <= 1.0
    mirrored_lo, mirrored_hi = wilson_bounds(n - k, n, z)
    assert math.isclose(lo, 1 - mirrored_hi, abs_tol=1e-12)
    assert math.isclose(hi, 1 - mirrored_lo, abs_tol=1e-12)


# --- promotion ------------------------------------------------------------------------


def test_twenty_clean_accepts_after_dwell_promote_shadow_to_read_only() -> None:
    ledger = TrustLedger(POLICY)
    # Given twenty accepted findings, five minutes apart (95 minutes > one hour of dwell)
    changes = feed(ledger, clean(20, start=0))
    # Then the twentieth promotes exactly one step, with the numbers that justified it
    assert len(changes) == 1
    change = changes[0]
    assert (change.from_phase, change.to_phase, change.reason) == (SHADOW, READ_ONLY, "promoted")
    assert change.at == at(95) and change.operator == AUTO and change.policy_version == "test-1"
    assert change.samples == 20 and change.modification_rate == 0.0
    assert change.wilson_upper == pytest.approx(0.1611, abs=1e-4)
    assert ledger.phase_for("database") is READ_ONLY
    assert ledger.phase_for("network") is SHADOW  # other scopes are untouched


def test_nineteen_clean_accepts_are_too_few_to_promote() -> None:
    ledger = TrustLedger(POLICY)
    assert feed(ledger, clean(19, start=0, step=10)) == []
    assert ledger.explain("database").promote_blockers == (Blocker.SAMPLES,)


def test_a_modification_rate_whose_upper_bound_is_above_the_threshold_does_not_promote() -> None:
    ledger = TrustLedger(POLICY)
    feedbacks = clean(18, start=0) + [
        fb(100, verdict=Verdict.MODIFIED),
        fb(105, verdict=Verdict.REJECTED),
    ]
    assert feed(ledger, feedbacks) == []
    explained = ledger.explain("database")
    assert explained.promote_blockers == (Blocker.RATE,)
    assert explained.modification_rate == pytest.approx(0.1)
    assert explained.wilson_upper > POLICY.promote_threshold


def test_no_promotion_before_the_minimum_dwell_then_promotion_once_it_has_passed() -> None:
    ledger = TrustLedger(POLICY)
    # Given twenty clean feedbacks within twenty minutes of the first one
    assert feed(ledger, clean(20, start=0, step=1)) == []
    assert ledger.explain("database").promote_blockers == (Blocker.DWELL,)
    # When one more arrives after the hour of dwell, then the scope is promoted
    assert [c.to_phase for c in feed(ledger, [fb(61)])] == [READ_ONLY]


def test_a_harmful_flag_in_the_window_blocks_promotion() -> None:
    ledger = TrustLedger(POLICY)
    # Given shadow (already at or below where harm demotes to) and one harmful-but-accepted finding
    feedbacks = [fb(0, harmful=True)] + clean(30, start=5)
    assert feed(ledger, feedbacks) == []
    explained = ledger.explain("database")
    assert explained.promote_blockers == (Blocker.HARMFUL,) and explained.harmful_in_window == 1


def test_no_promotion_during_the_cooldown_after_a_change() -> None:
    policy = msgspec.structs.replace(POLICY, cooldown=2 * HOUR)
    ledger = TrustLedger(policy)
    [promotion] = feed(ledger, clean(20, start=0))
    # Given twenty clean read-only findings within 80 minutes of the promotion (dwell met)
    assert feed(ledger, clean(20, start=99, step=4, phase=READ_ONLY)) == []
    assert ledger.explain("database").promote_blockers == (Blocker.COOLDOWN,)
    # When the cool-down has passed, the next feedback promotes
    later = feed(ledger, [fb(95 + 121, phase=READ_ONLY)])
    assert [(c.from_phase, c.to_phase) for c in later] == [(READ_ONLY, LIMITED)]
    assert promotion.at == at(95)


def test_autonomous_is_the_top_of_the_ladder() -> None:
    ledger = in_phase(AUTONOMOUS)
    assert feed(ledger, clean(40, start=0, phase=AUTONOMOUS)) == []
    assert Blocker.TOP_PHASE in ledger.explain("database").promote_blockers


def test_promotions_never_skip_a_phase() -> None:
    ledger = TrustLedger(POLICY)
    changes: list[PhaseChanged] = []
    minutes = 0.0
    for _ in range(200):
        minutes += 5
        changes += feed(ledger, [fb(minutes, phase=ledger.phase_for("database"))])
    assert [(c.from_phase, c.to_phase) for c in changes] == [
        (SHADOW, READ_ONLY),
        (READ_ONLY, LIMITED),
        (LIMITED, AUTONOMOUS),
    ]
    assert all(c.samples >= POLICY.min_samples for c in changes)


def test_at_default_thresholds_a_clean_record_needs_sixty_samples() -> None:
    # 0.10 as an upper Wilson bound at z=2.576 (99 %) needs n >= 60 even with no modification at all
    ledger = TrustLedger(TrustSettings())
    assert feed(ledger, [fb(i * 6 * 60) for i in range(59)]) == []
    assert [c.samples for c in feed(ledger, [fb(59 * 6 * 60)])] == [60]


# --- demotion and harm ----------------------------------------------------------------


def test_three_straight_modifications_demote_even_during_the_cooldown() -> None:
    policy = msgspec.structs.replace(POLICY, cooldown=86400)
    ledger = TrustLedger(policy)
    feed(ledger, clean(20, start=0))
    # Given read-only since minute 95, within a day-long cool-down
    bad = [fb(100 + i, phase=READ_ONLY, verdict=Verdict.MODIFIED) for i in range(3)]
    [demotion] = feed(ledger, bad)
    assert (demotion.from_phase, demotion.to_phase, demotion.reason) == (
        READ_ONLY,
        SHADOW,
        "demoted",
    )
    assert demotion.wilson_lower >= policy.demote_threshold and demotion.samples == 3


def test_shadow_is_the_floor() -> None:
    ledger = TrustLedger(POLICY)
    assert feed(ledger, [fb(i, verdict=Verdict.REJECTED) for i in range(30)]) == []
    assert ledger.phase_for("database") is SHADOW


def test_a_harmful_flag_demotes_at_once_to_the_configured_phase() -> None:
    ledger = in_phase(LIMITED)
    [change] = feed(
        ledger, clean(5, start=1, phase=LIMITED) + [fb(30, phase=LIMITED, harmful=True)]
    )
    assert (change.from_phase, change.to_phase, change.reason) == (
        LIMITED,
        READ_ONLY,
        "harmful_action",
    )
    assert change.at == at(30)

    to_shadow = in_phase(
        AUTONOMOUS, policy=msgspec.structs.replace(POLICY, harmful_demotes_to=SHADOW)
    )
    [change] = feed(to_shadow, [fb(1, phase=AUTONOMOUS, harmful=True)])
    assert change.to_phase is SHADOW


def test_a_harmful_flag_on_a_finding_from_an_earlier_phase_still_demotes() -> None:
    ledger = in_phase(LIMITED, minutes=10)
    [change] = feed(ledger, [fb(20, phase=READ_ONLY, harmful=True)])
    assert change.reason == Reason.HARMFUL_ACTION and change.to_phase is READ_ONLY


def test_hysteresis_a_rate_hovering_at_the_promote_threshold_never_flaps() -> None:
    ledger = in_phase(READ_ONLY)
    # Given a rate that swings between 0.15 and 0.25 around the promote threshold of 0.2, for days
    low = [Verdict.MODIFIED if i in (3, 10, 17) else Verdict.ACCEPTED for i in range(20)]
    high = [Verdict.MODIFIED if i % 4 == 1 else Verdict.ACCEPTED for i in range(20)]
    feedbacks = [
        fb(10 + 30 * i, phase=READ_ONLY, verdict=v) for i, v in enumerate((low + high) * 10)
    ]
    # Then the phase never moves: promotion needs the upper bound <= 0.2, demotion the lower >= 0.4
    assert feed(ledger, feedbacks) == []


@pytest.mark.parametrize("rate", [0.15, 0.2, 0.25, 0.3, 0.35])
def test_hysteresis_between_the_thresholds_the_policy_holds_still(rate) -> None:
    n = POLICY.window
    decision = decide(
        POLICY,
        phase=LIMITED,
        samples=n,
        modifications=round(rate * n),
        harmful=False,
        in_phase_s=30 * 86400,
        since_change_s=30 * 86400,
        pinned=False,
    )
    assert decision is None


# --- what counts -----------------------------------------------------------------------


def test_a_redelivered_feedback_counts_once() -> None:
    ledger = TrustLedger(POLICY)
    feedbacks = clean(19, start=0)
    # When the last one is delivered again (same id), it does not make the twentieth sample
    assert feed(ledger, feedbacks + [feedbacks[-1], feedbacks[-1]]) == []
    assert ledger.explain("database").samples == 19


def test_dedup_memory_is_bounded_and_never_smaller_than_the_window() -> None:
    assert TrustLedger(POLICY, dedup_capacity=10).dedup_capacity == POLICY.window
    ledger = TrustLedger(HOLD, dedup_capacity=POLICY.window)
    first = fb(0, verdict=Verdict.MODIFIED)
    feed(ledger, [first] + [fb(1 + i) for i in range(50)])
    # Given 51 distinct ids, the first is forgotten: re-sent now, it counts again
    feed(ledger, [msgspec.structs.replace(first, at=at(60))])
    assert ledger.explain("database").modifications == 1


def test_feedback_older_than_max_age_leaves_the_window() -> None:
    ledger = TrustLedger(POLICY)
    feed(ledger, [fb(i, verdict=Verdict.MODIFIED) for i in range(10)])
    week = 7 * 24 * 60
    feed(ledger, [fb(week + 10)])
    explained = ledger.explain("database")
    assert (explained.samples, explained.modifications) == (1, 0)
    # A late arrival already older than max_age does not enter either
    feed(ledger, [fb(5, verdict=Verdict.MODIFIED)])
    assert ledger.explain("database").samples == 1
    # explain(now) ages the window too, without changing it
    assert ledger.explain("database", now=at(2 * week + 11)).samples == 0
    assert ledger.explain("database").samples == 1


def test_the_window_keeps_the_last_n_feedbacks() -> None:
    ledger = TrustLedger(HOLD)
    feed(ledger, [fb(i, verdict=Verdict.MODIFIED) for i in range(10)] + clean(50, start=20, step=1))
    explained = ledger.explain("database")
    assert (explained.samples, explained.modifications) == (50, 0)


def test_after_a_change_only_findings_of_the_new_phase_count() -> None:
    ledger = TrustLedger(POLICY)
    feed(ledger, clean(20, start=0))
    assert ledger.explain("database").samples == 0  # the new phase earns its own evidence
    # Late feedback on shadow findings says nothing about read-only
    feed(ledger, [fb(100, verdict=Verdict.REJECTED), fb(101, verdict=Verdict.REJECTED)])
    assert ledger.explain("database").samples == 0
    feed(ledger, [fb(102, phase=READ_ONLY)])
    assert ledger.explain("database").samples == 1


def test_in_shadow_the_operators_own_resolution_decides() -> None:
    ledger = TrustLedger(POLICY)
    disagreed = ShadowComparison(agreed=False, operator_cause="disk full")
    agreed = ShadowComparison(agreed=True)
    feed(
        ledger,
        [
            fb(0, verdict=Verdict.ACCEPTED, shadow=disagreed),
            fb(1, verdict=Verdict.MODIFIED, shadow=agreed),
            fb(2, verdict=Verdict.ACTION_OVERRIDDEN),
        ],
    )
    assert ledger.explain("database").modifications == 2


# --- pins -------------------------------------------------------------------------------


def test_a_pin_holds_the_phase_against_harm_and_bad_rates() -> None:
    ledger = TrustLedger(POLICY)
    pin = ledger.pin(
        "database", LIMITED, reason="change freeze  until Monday", operator="alice", at=at(0)
    )
    assert (pin.from_phase, pin.to_phase, pin.pinned, pin.operator) == (
        SHADOW,
        LIMITED,
        True,
        "alice",
    )
    assert pin.reason == "pinned: change freeze until Monday" and reason_of(pin) is Reason.PINNED
    bad = [fb(1, phase=LIMITED, harmful=True)] + [
        fb(2 + i, phase=LIMITED, verdict=Verdict.REJECTED) for i in range(10)
    ]
    assert feed(ledger, bad) == []
    assert ledger.phase_for("database") is LIMITED
    explained = ledger.explain("database")
    assert explained.pinned and explained.pin_reason == "change freeze until Monday"
    assert explained.pinned_by == "alice" and Blocker.PINNED in explained.promote_blockers
    assert explained.samples == 11  # tallies go on while pinned


def test_a_pin_freezes_promotion_too() -> None:
    ledger = TrustLedger(POLICY)
    ledger.pin("database", SHADOW, reason="new agent version", operator="bob", at=at(0))
    assert feed(ledger, clean(40, start=1)) == []


def test_unpin_resumes_automatic_changes() -> None:
    ledger = TrustLedger(POLICY)
    ledger.pin("database", LIMITED, reason="demo", operator="alice", at=at(0))
    feed(ledger, [fb(1, phase=LIMITED, harmful=True)])
    unpin = ledger.unpin("database", operator="alice", at=at(5))
    assert unpin is not None and unpin.reason == "unpinned" and not unpin.pinned
    assert unpin.from_phase is unpin.to_phase is LIMITED
    # Then the harmful flag still in the window acts on the next feedback
    [change] = feed(ledger, [fb(6, phase=LIMITED)])
    assert change.reason == Reason.HARMFUL_ACTION and change.to_phase is READ_ONLY
    assert ledger.unpin("database", operator="alice", at=at(7)) is None  # not pinned: nothing to do


def test_unpin_starts_a_cooldown() -> None:
    ledger = TrustLedger(POLICY)
    feed(ledger, clean(19, start=0))
    ledger.pin("database", SHADOW, reason="hold", operator="alice", at=at(91))
    ledger.unpin("database", operator="alice", at=at(92))
    assert feed(ledger, [fb(93)]) == []
    assert ledger.explain("database").promote_blockers == (Blocker.COOLDOWN,)
    assert [c.to_phase for c in feed(ledger, [fb(93 + 10)])] == [READ_ONLY]


def test_a_pin_needs_a_reason() -> None:
    with pytest.raises(ValueError, match="reason"):
        TrustLedger(POLICY).pin("database", SHADOW, reason="  ", operator="alice", at=at(0))


# --- explain ----------------------------------------------------------------------------


def test_explain_says_what_is_still_needed_to_promote_and_what_would_demote() -> None:
    ledger = TrustLedger(POLICY)
    feed(ledger, clean(10, start=0, step=1))
    explained = ledger.explain("database")
    assert explained.promote_blockers == (Blocker.SAMPLES, Blocker.RATE, Blocker.DWELL)
    assert explained.samples_missing == 10 and explained.accepts_to_promote == 10
    assert explained.dwell_remaining_s == 51 * 60 and explained.cooldown_remaining_s == 0
    assert explained.next_phase is READ_ONLY and explained.previous_phase is None
    assert any("10 more samples" in line for line in explained.notes)

    feed(ledger, clean(10, start=61))
    promoted = ledger.explain("database")
    assert promoted.phase is READ_ONLY and promoted.modifications_to_demote == 3
    assert promoted.cooldown_remaining_s == 600 and promoted.harmful_demotes_to is None
    assert msgspec.json.decode(msgspec.json.encode(promoted))["phase"] == "read-only"


def test_explain_of_an_unknown_scope_shows_the_initial_phase() -> None:
    explained = TrustLedger(POLICY).explain("network")
    assert (
        explained.phase is SHADOW and explained.samples == 0 and explained.modification_rate is None
    )


def test_the_ledger_is_a_phase_source() -> None:
    source: PhaseSource = TrustLedger(POLICY)
    assert source.phase_for("anything") is POLICY.initial_phase


# --- the policy as a table --------------------------------------------------------------

_READY = {
    "phase": READ_ONLY,
    "samples": 20,
    "modifications": 0,
    "harmful": False,
    "in_phase_s": 2 * HOUR,
    "since_change_s": 2 * HOUR,
    "pinned": False,
}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({}, (LIMITED, Reason.PROMOTED)),
        ({"samples": 19}, None),
        ({"modifications": 1}, None),
        ({"in_phase_s": HOUR - 1}, None),
        ({"since_change_s": 599}, None),
        ({"since_change_s": None}, (LIMITED, Reason.PROMOTED)),
        ({"pinned": True}, None),
        ({"phase": AUTONOMOUS}, None),
        ({"harmful": True}, None),  # read-only is where harm demotes to: nothing lower to go
        ({"harmful": True, "phase": LIMITED}, (READ_ONLY, Reason.HARMFUL_ACTION)),
        ({"harmful": True, "phase": LIMITED, "pinned": True}, None),
        ({"modifications": 14, "since_change_s": 1}, (SHADOW, Reason.DEMOTED)),
        ({"modifications": 20, "phase": SHADOW}, None),
    ],
)
def test_decide(change, expected) -> None:
    assert decide(POLICY, **{**_READY, **change}) == expected


# --- determinism ------------------------------------------------------------------------

_scope = st.sampled_from(["database", "network"])
_feedback = st.tuples(
    st.just("feedback"),
    _scope,
    st.floats(min_value=0, max_value=240),  # minutes since the previous event
    st.sampled_from([Verdict.ACCEPTED] * 20 + list(Verdict)),  # mostly clean, so phases move
    st.sampled_from(["current"] * 5 + ["other"]),  # the finding's phase vs the scope's
    st.integers(min_value=0, max_value=9),  # 0: redeliver the previous id
)
_op = st.integers(min_value=0, max_value=99).flatmap(
    lambda roll: (
        _feedback
        if roll < 88
        else st.tuples(st.just("burst"), _scope, st.integers(min_value=2, max_value=8))
        if roll < 93
        else st.tuples(st.just("harmful"), _scope)
        if roll < 95
        else st.tuples(st.just("pin"), _scope, st.sampled_from(list(Phase)))
        if roll < 97
        else st.tuples(st.just("unpin"), _scope)
    )
)
_ops = st.lists(_op, min_size=20, max_size=200)


def _run(ops, policy: TrustSettings, shift: timedelta = timedelta(0)):
    """Drive a ledger through ``ops``; returns it, its changes, and the log it would write."""
    ledger = TrustLedger(policy)
    changes: list[PhaseChanged] = []
    log: list[OperatorFeedback | PhaseChanged] = []
    minutes = 0.0
    last_id = "none"
    for n, op in enumerate(ops):
        kind, scope = op[0], op[1]
        when = T0 + shift + timedelta(minutes=minutes)
        if kind == "burst":  # a run of rejections, a few minutes apart
            for i in range(op[2]):
                minutes += 3
                f = OperatorFeedback(
                    feedback_id=f"f{n}.{i}",
                    investigation_id=f"i-{n}.{i}",
                    scope=scope,
                    phase=ledger.phase_for(scope),
                    verdict=Verdict.REJECTED,
                    at=T0 + shift + timedelta(minutes=minutes),
                )
                log.append(f)
                if (ev := ledger.apply_feedback(f)) is not None:
                    changes.append(ev)
                    log.append(ev)
            continue
        if kind in ("feedback", "harmful"):
            if kind == "feedback":
                _, _, gap, verdict, which, redeliver = op
                minutes += gap
                when = T0 + shift + timedelta(minutes=minutes)
            else:
                verdict, which, redeliver = Verdict.ACCEPTED, "current", 1
            current = ledger.phase_for(scope)
            phase = current if which == "current" else Phase(list(Phase)[(current.rank + 1) % 4])
            fid = last_id if redeliver == 0 else f"f{n}"
            last_id = fid
            f = OperatorFeedback(
                feedback_id=fid,
                investigation_id=f"i-{fid}",
                scope=scope,
                phase=phase,
                verdict=verdict,
                at=when,
                harmful=kind == "harmful",
            )
            log.append(f)
            ev = ledger.apply_feedback(f)
        elif kind == "pin":
            ev = ledger.pin(scope, op[2], reason="test", operator="op", at=when)
        else:
            ev = ledger.unpin(scope, operator="op", at=when)
        if ev is not None:
            changes.append(ev)
            log.append(ev)
    return ledger, changes, log


_FAST = msgspec.structs.replace(
    POLICY,
    min_samples=6,
    promote_threshold=0.4,
    demote_threshold=0.6,
    window=16,
    min_dwell=2 * HOUR,
    cooldown=HOUR,
    max_age=3 * 86400.0,
)


@settings(max_examples=100, deadline=None)
@given(_ops)
def test_the_same_events_give_the_same_changes_and_replay_gives_the_same_state(ops) -> None:
    ledger, changes, log = _run(ops, _FAST)
    # Fed the same sequence twice: the same PhaseChanged list
    again, changes_again, _ = _run(ops, _FAST)
    assert changes_again == changes and again.phases() == ledger.phases()
    # Shifted in time (decades, another DST rule): the same decisions, so no wall clock is read
    _, shifted, _ = _run(ops, _FAST, shift=timedelta(days=9000, hours=7))
    assert [(c.scope, c.from_phase, c.to_phase, c.reason, c.samples) for c in shifted] == [
        (c.scope, c.from_phase, c.to_phase, c.reason, c.samples) for c in changes
    ]
    # The dispatcher's view: the phase log alone gives the same phases and pins
    follower = TrustLedger(_FAST)
    for ev in changes:
        follower.apply_phase_changed(ev)
    for scope in ("database", "network", "unseen"):
        assert follower.phase_for(scope) is ledger.phase_for(scope)
        assert follower.is_pinned(scope) == ledger.is_pinned(scope)
    # The trust consumer's restart: both logs in order rebuild the full state
    rebuilt = replay(_FAST, log)
    for scope in ("database", "network"):
        assert rebuilt.explain(scope) == ledger.explain(scope)


@settings(max_examples=100, deadline=None)
@given(_ops)
def test_every_change_obeys_the_policy(ops) -> None:
    _, changes, _ = _run(ops, _FAST)
    pinned: set[str] = set()
    for c in changes:
        assert c.from_phase is not None
        if c.operator == AUTO:
            assert c.scope not in pinned and not c.pinned  # a pin freezes automatic changes
        elif c.pinned:
            pinned.add(c.scope)
        else:
            pinned.discard(c.scope)
        step = c.to_phase.rank - c.from_phase.rank
        if c.reason == Reason.PROMOTED:
            assert step == 1 and c.samples >= _FAST.min_samples
            assert c.wilson_upper is not None and c.wilson_upper <= _FAST.promote_threshold
        elif c.reason == Reason.DEMOTED:
            assert step == -1 and c.wilson_lower is not None
            assert c.wilson_lower >= _FAST.demote_threshold
        elif c.reason == Reason.HARMFUL_ACTION:
            assert c.to_phase is _FAST.harmful_demotes_to and step < 0
        else:
            assert c.operator == "op"


# --- one verdict per investigation ---------------------------------------------------------


def test_a_later_verdict_on_the_same_investigation_replaces_the_earlier_one_never_adds() -> None:
    ledger = TrustLedger(HOLD)
    first = msgspec.structs.replace(fb(1), investigation_id="inv-x", feedback_id="fb-x-1")
    ledger.apply_feedback(first)
    assert (ledger.explain("database").samples, ledger.explain("database").modifications) == (1, 0)
    # When the operator corrects the verdict (a new feedback id, the same investigation)
    correction = msgspec.structs.replace(fb(2, verdict=Verdict.REJECTED), investigation_id="inv-x",
                                         feedback_id="fb-x-2")
    ledger.apply_feedback(correction)
    # Then the correction stands alone: still one sample, now a modification
    explained = ledger.explain("database")
    assert (explained.samples, explained.modifications) == (1, 1)
    # and a flood of verdicts on that one finding is still one sample
    for i in range(3, 60):
        ledger.apply_feedback(msgspec.structs.replace(fb(i), investigation_id="inv-x", feedback_id=f"fb-x-{i}"))
    explained = ledger.explain("database")
    assert (explained.samples, explained.modifications) == (1, 0)
    # while other investigations add as before
    ledger.apply_feedback(fb(61))
    assert ledger.explain("database").samples == 2


def test_many_verdicts_on_one_investigation_cannot_promote() -> None:
    ledger = TrustLedger(POLICY)
    for i in range(200):
        ledger.apply_feedback(msgspec.structs.replace(fb(i * 5), investigation_id="inv-one"))
    assert ledger.phase_for("database") is SHADOW
    assert ledger.explain("database").samples == 1


def test_verdict_replacement_survives_a_snapshot() -> None:
    ledger = TrustLedger(HOLD)
    ledger.apply_feedback(msgspec.structs.replace(fb(1), investigation_id="inv-y"))
    restored = TrustLedger.restore(HOLD, ledger.snapshot())
    restored.apply_feedback(msgspec.structs.replace(fb(2, verdict=Verdict.MODIFIED), investigation_id="inv-y"))
    assert (restored.explain("database").samples, restored.explain("database").modifications) == (1, 1)
