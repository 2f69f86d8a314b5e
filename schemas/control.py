"""Commands to the dispatcher, on exchange ``agentjobs.control``."""

from __future__ import annotations

from typing import Annotated

import msgspec

from .base import Timestamp, Wire

Short = Annotated[str, msgspec.Meta(max_length=512)]


class CancelInvestigation(Wire, tag="cancel", kw_only=True):
    """Stop an investigation: its Job is deleted (Kubernetes) or its process killed (local)."""

    job_name: Annotated[str, msgspec.Meta(min_length=1, max_length=63)]
    reason: Short = "cancelled by operator"
    requested_by: Short = ""
    at: Timestamp | None = None


class ApproveAction(Wire, tag="approve_action", kw_only=True):
    """An operator approves one proposed action of one investigation (``agentjobs actions approve``).

    Only the broker-validated sender (an operator or admin user) says who approved; ``requested_by``
    is informational. What runs is the proposal as the dispatcher recorded it from the agent's own
    ``ActionRecord`` — never anything this command says about target or params: ``action`` only
    picks it, by registry name (when the investigation proposed that action once) or by the
    record's ``idempotency_key``.
    """

    approval_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]  # one per approval; redeliveries share it
    investigation_id: Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
    action: Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
    reason: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
    requested_by: Short = ""
    at: Timestamp | None = None
