"""What operators did with a finding: the only input to earned autonomy.

Trust is measured by operator behaviour, not by the agent's confidence:
``accepted`` / ``modified`` / ``rejected`` / ``action_overridden`` verdicts,
a ``harmful`` flag, and in shadow phase a comparison of the operator's own
resolution with the agent's finding.

``action`` (optional) names the one proposed action the verdict is about — its registry
name, e.g. ``terminate_backend`` — and ``action_key`` (optional, with ``action``) one
execution of it: the ``idempotency_key`` of its ``ActionRecord``. Without them the verdict
is about the finding as a whole, as before.
"""

from __future__ import annotations

import enum
from typing import Annotated

import msgspec

from .base import Id, Phase, Timestamp, Wire

Short = Annotated[str, msgspec.Meta(max_length=512)]


class Verdict(enum.StrEnum):
    ACCEPTED = "accepted"  # nothing material changed
    MODIFIED = "modified"  # see changed_fields
    REJECTED = "rejected"  # the cause was replaced
    ACTION_OVERRIDDEN = "action_overridden"  # an operator undid or blocked a proposed action


class ShadowComparison(msgspec.Struct, frozen=True, kw_only=True):
    """In shadow phase: did the operator's own resolution agree with the agent?"""

    agreed: bool
    operator_cause: Annotated[str, msgspec.Meta(max_length=16384)] = ""


class OperatorFeedback(Wire, tag="feedback", kw_only=True):
    """One operator's verdict on one finding."""

    feedback_id: Id  # duplicates (same id) count once
    investigation_id: Id
    scope: Short  # what trust is tallied over, by default the incident's domain
    phase: Phase  # the phase the finding was produced in
    verdict: Verdict
    at: Timestamp  # decisions use this, never the wall clock
    operator: Short = ""
    changed_fields: tuple[Short, ...] = ()
    harmful: bool = False  # an executed or proposed action would have hurt
    shadow: ShadowComparison | None = None
    # The proposed action this verdict is about (registry name); "": the finding as a whole.
    action: Short = ""
    action_key: Short = ""  # with ``action``: the ActionRecord's idempotency_key (one execution)
    comment: Annotated[str, msgspec.Meta(max_length=16384)] = ""
