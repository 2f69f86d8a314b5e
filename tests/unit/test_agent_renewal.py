"""Lease renewal: after two thirds of a lease, and never past the agent token's end."""

from __future__ import annotations

import pytest

from agent.renewal import LeaseState, next_check, renewal_increment


def lease(*, duration: float = 900, expires_at: float = 900, renewable: bool = True) -> LeaseState:
    return LeaseState(lease_id="database/creds/x/1", renewable=renewable, duration=duration, expires_at=expires_at)


def test_not_due_before_two_thirds_of_the_lease() -> None:
    assert renewal_increment(lease(), token_expires_at=3600, now=100) is None
    assert renewal_increment(lease(), token_expires_at=3600, now=599) is None


def test_due_after_two_thirds_asks_for_at_most_the_tokens_remaining_ttl() -> None:
    assert renewal_increment(lease(), token_expires_at=3600, now=601) == 2999
    assert renewal_increment(lease(), token_expires_at=1500.7, now=700) == 800  # floor: never beyond


def test_a_lease_that_already_outlives_the_token_is_left_alone() -> None:
    assert renewal_increment(lease(expires_at=900), token_expires_at=900, now=800) is None
    assert renewal_increment(lease(expires_at=900), token_expires_at=850, now=800) is None


@pytest.mark.parametrize(
    ("item", "token_end", "now"),
    [
        (lease(renewable=False), 3600, 800),  # not renewable
        (lease(), 800.5, 800),  # token has < 1 s left
        (lease(), 700, 800),  # token already expired
        (lease(expires_at=790), 3600, 800),  # lease already expired
        (lease(duration=0, expires_at=900), 3600, 800),  # no duration
    ],
)
def test_never_renews_when_it_cannot_help(item: LeaseState, token_end: float, now: float) -> None:
    assert renewal_increment(item, token_expires_at=token_end, now=now) is None


def test_renewed_lease_restarts_its_clock() -> None:
    renewed = lease().renewed(now=700, duration=800)
    assert renewed.expires_at == 1500 and renewed.duration == 800
    assert renewal_increment(renewed, token_expires_at=3600, now=800) is None


def test_next_check_is_the_earliest_due_time() -> None:
    leases = [lease(duration=900, expires_at=900), lease(duration=300, expires_at=400)]
    assert next_check(leases, token_expires_at=3600, now=0) == pytest.approx(300)
    assert next_check([lease(expires_at=900)], token_expires_at=900, now=0) is None
    assert next_check([], token_expires_at=900, now=0) is None
