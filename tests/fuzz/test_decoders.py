"""Every decoder, fed 10,000+ hostile payloads: it returns a message or a classified DecodeError, nothing else."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatcher.intake.deadletters import Delivery, from_error
from schemas import IncidentEvent, WireMessage, decode, decode_incident, encode, identify, k8snames, utcnow
from schemas.errors import DecodeError
from tests.fuzz.strategies import BATCH, PAYLOADS, random_payloads

pytestmark = pytest.mark.fuzz
EXAMPLES = int(os.environ.get("AGENTJOBS_FUZZ_EXAMPLES", "10000"))
# Bulk: each example is a hypothesis-drawn Random that yields BATCH payloads (EXAMPLES in all);
# structured: hypothesis builds (and on failure shrinks) each payload itself, fewer of them.
BULK = settings(max_examples=max(1, EXAMPLES // BATCH), deadline=None, suppress_health_check=list(HealthCheck),
                database=None)
STRUCTURED = settings(max_examples=max(1, EXAMPLES // 10), deadline=None,
                      suppress_health_check=list(HealthCheck), database=None)
REASONS = {
    "empty_body", "too_large", "not_utf8", "invalid_json", "too_deep", "not_an_object", "unknown_kind",
    "missing_field", "invalid_field", "invalid_label", "invalid_cloudevent", "invalid_base64", "missing_data",
    "nested_cloudevent", "unsupported_version", "unknown_format", "inconsistent_status", "unsupported_specversion",
    "unsupported_content_type",
}


def _classified(exc: DecodeError) -> None:
    assert exc.reason and exc.reason == exc.reason.strip() and " " not in exc.reason, exc.reason
    assert exc.message, exc.reason


SEEN: dict[str, set[str]] = {"intake": set(), "wire": set()}


@BULK
@given(st.randoms(use_true_random=False))
def test_decoders_on_10000_payloads_return_a_message_or_a_classified_rejection(rng: random.Random) -> None:
    for body in random_payloads(rng, BATCH):
        try:
            _check(body)
        except Exception as exc:  # name the payload: the Random alone is hard to read
            raise AssertionError(f"payload {body[:300]!r}: {exc!r}") from exc


@STRUCTURED
@given(PAYLOADS)
def test_decoders_on_shrinkable_payloads_return_a_message_or_a_classified_rejection(body: bytes) -> None:
    _check(body)


def _check(body: bytes) -> None:
    # intake: Alertmanager v4, CloudEvents, our IncidentEvent
    try:
        event = decode_incident(body, max_bytes=64 * 1024)
    except DecodeError as exc:
        _classified(exc)
        SEEN["intake"].add(exc.reason)
        # and its dead-letter record can always be written (preview of arbitrary bytes included)
        record = from_error(Delivery(body, routing_key="fuzz"), exc, at=utcnow(), component="fuzz")
        assert encode(record)
    else:
        assert isinstance(event, IncidentEvent)
        ident = identify(event)  # every accepted incident has an identity and a valid Job name
        assert k8snames.is_dns1123_label(ident.job_name) and len(ident.investigation_id) == 40
    # wire: every tagged message kind (feedback, pins, lifecycle, findings, ...)
    try:
        message = decode(body)
    except DecodeError as exc:
        _classified(exc)
        SEEN["wire"].add(exc.reason)
    else:
        assert isinstance(message, WireMessage.__args__)  # type: ignore[attr-defined]
        assert decode(encode(message)) == message  # what we accept, we can send again unchanged


def test_rejections_use_only_the_documented_reasons() -> None:
    """Runs after the fuzzing above (same module, in order): the vocabulary dashboards rely on."""
    seen = SEEN["intake"] | SEEN["wire"]
    print(f"rejection reasons seen: {sorted(seen)}")
    assert len(seen) >= 10, seen  # the payloads reached deep enough to hit many different checks
    assert seen <= REASONS, seen - REASONS
