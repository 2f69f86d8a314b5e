"""When to renew a dynamic-secret lease: a pure decision over times, no Vault in here.

A lease is renewed once two thirds of it have passed, and only while the
agent's own token lives: renewing past the token's end is pointless (revoking
the token revokes the lease) and would let a credential outlive the Job. So
the increment asked for is at most the token's remaining TTL, and a lease that
already lasts as long as the token is left alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

RENEW_AFTER = 2 / 3  # fraction of a lease's duration that passes before it is renewed


@dataclass(frozen=True, kw_only=True)
class LeaseState:
    """One lease as the agent tracks it (times on the monotonic clock, seconds)."""

    lease_id: str
    renewable: bool
    duration: float  # seconds granted by the last issue or renewal
    expires_at: float  # monotonic seconds

    def renewed(self, *, now: float, duration: float) -> LeaseState:
        """This lease after a renewal that granted ``duration`` seconds at ``now``."""
        return LeaseState(lease_id=self.lease_id, renewable=self.renewable, duration=duration,
                          expires_at=now + duration)


def renewal_increment(lease: LeaseState, *, token_expires_at: float, now: float) -> int | None:
    """Seconds to ask for if ``lease`` should be renewed now, else None (pure)."""
    if not lease.renewable or lease.duration <= 0:
        return None
    token_left = token_expires_at - now
    lease_left = lease.expires_at - now
    if token_left < 1 or lease_left <= 0:
        return None  # our identity is ending, or the lease is already gone
    if lease.expires_at >= token_expires_at:
        return None  # already lives as long as the token may: more would outlive the Job
    if lease_left > lease.duration * (1 - RENEW_AFTER):
        return None  # not due yet
    return math.floor(token_left)


def next_check(leases: list[LeaseState], *, token_expires_at: float, now: float) -> float | None:
    """Monotonic time at which some lease becomes due, or None if none ever will (pure)."""
    due: list[float] = []
    for lease in leases:
        if not lease.renewable or lease.expires_at >= token_expires_at or lease.expires_at <= now:
            continue
        due.append(max(now, lease.expires_at - lease.duration * (1 - RENEW_AFTER)))
    return min(due) if due else None
