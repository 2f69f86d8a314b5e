"""Autonomy phase changes, as logged on the phase stream and replayed on start."""

from __future__ import annotations

from typing import Annotated

import msgspec

from .base import NonNegativeInt, Phase, Timestamp, UnitInterval, Wire

Short = Annotated[str, msgspec.Meta(max_length=512)]


class PhaseChanged(Wire, tag="phase_changed", kw_only=True):
    """A scope moved (or was pinned) to a phase; the next Job in that scope gets its grants."""

    scope: Short
    from_phase: Phase | None  # None for the first assignment
    to_phase: Phase
    at: Timestamp  # timestamp of the event that caused the change
    reason: Short  # promoted, demoted, harmful_action, pinned, unpinned
    policy_version: Short = ""
    pinned: bool = False
    samples: NonNegativeInt = 0  # n in the window when decided
    modification_rate: UnitInterval | None = None
    wilson_lower: UnitInterval | None = None
    wilson_upper: UnitInterval | None = None
    operator: Short = ""  # who pinned/unpinned


class PhasePin(Wire, tag="phase_pin", kw_only=True):
    """An operator's command to hold a scope at a phase (``phase`` set) or to let it go (``None``).

    Sent on ``agentjobs.feedback`` so it is ordered with the feedback it interrupts; the trust
    consumer logs it and publishes the resulting ``PhaseChanged``.
    """

    command_id: Annotated[str, msgspec.Meta(min_length=1, max_length=512)]  # repeats apply once
    scope: Short
    phase: Phase | None  # None: unpin
    reason: Short = ""  # required to pin
    operator: Short = ""
    at: Timestamp
