"""The interface a ticketing system implements for ``agentjobs tickets``.

Two duties: ``apply`` a plan (find the investigation's ticket by its key or create it, then
write each note not yet written), and — where the system keeps tickets operators close —
``closed_since``: the tickets closed since a point in time, with what the operator left in
them. Errors are typed: ``TemporaryError`` (unreachable, 5xx, timeouts, a key refused — the
message is held and retried, never lost) or ``PermanentError`` (the system refuses this
ticket's content: dead-lettered with the reason).
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

import msgspec

from dispatcher.tickets.plan import Plan
from dispatcher.tickets.render import FindingRecord
from dispatcher.trust.feedback_classify import TicketFields


class Applied(msgspec.Struct, frozen=True, kw_only=True):
    ticket: str  # the system's id of the ticket
    created: bool  # this call created it
    written: int  # notes written by this call (the rest were there already)


class Closed(msgspec.Struct, frozen=True, kw_only=True):
    """A ticket an operator closed, as read back."""

    ticket: str
    key: str  # the investigation id
    close_id: str  # identifies this closing (a reopened and re-closed ticket gets a new one)
    closed_at: datetime
    closed_by: str  # the operator's login or name
    final: TicketFields  # what the operator left in the ticket
    record: FindingRecord | None  # the connector's record of the finding; None: none written
    verdict_noted: bool = False  # the connector already noted a verdict for this closing


class Backend(Protocol):
    name: str
    feedback: bool  # True if closed_since reads operators' closings back

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def apply(self, plan: Plan) -> Applied: ...

    async def closed_since(self, since: datetime) -> list[Closed]: ...

    async def note_verdict(self, closed: Closed, text: str) -> None: ...
