"""A ledger restored from a snapshot and fed the rest of the log is the ledger fed the whole log."""

from __future__ import annotations

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.trust.policy import LedgerSnapshot, TrustLedger, replay
from tests.unit.test_trust_policy import _FAST, _ops, _run

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(LedgerSnapshot).decode


@settings(max_examples=150, deadline=None)
@given(_ops, st.floats(min_value=0.0, max_value=1.0))
def test_snapshot_then_the_rest_of_the_log_equals_the_whole_log(ops, where) -> None:
    _, _, log = _run(ops, _FAST)
    cut = int(len(log) * where)
    whole = replay(_FAST, log)
    # Given a snapshot taken after the first `cut` entries, through its wire encoding
    restored = TrustLedger.restore(_FAST, _decode(_encode(replay(_FAST, log[:cut]).snapshot())))
    # When the rest of the log is applied to it
    for event in log[cut:]:
        restored.apply(event)
    # Then it is the same ledger: state, phases, pins, explanations, remembered ids
    assert restored.snapshot() == whole.snapshot()
    for scope in ("database", "network", "unseen"):
        assert restored.phase_for(scope) is whole.phase_for(scope)
        assert restored.is_pinned(scope) == whole.is_pinned(scope)
        assert restored.explain(scope) == whole.explain(scope)
    feedback_ids = {(e.scope, e.feedback_id) for e in log if hasattr(e, "feedback_id")}
    assert all(restored.has_seen(s, f) == whole.has_seen(s, f) for s, f in feedback_ids)


def test_an_empty_ledger_round_trips() -> None:
    empty = TrustLedger(_FAST)
    assert TrustLedger.restore(_FAST, _decode(_encode(empty.snapshot()))).snapshot() == empty.snapshot()
