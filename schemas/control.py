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
