"""Snapshots of the trust state, so a restart replays only the feedback log after the newest one.

The feedback log stays the single source of truth; a snapshot is a cache of
"the state after applying the log up to offset N". It is used only when it
provably belongs to this log and this policy:

- the entry at its offset in ``agentjobs.feedback-log`` still carries the
  message id the snapshot recorded (a recreated or truncated log does not);
- it was taken under the same trust settings (a changed threshold must be
  re-derived from the whole log) and the same snapshot format.

Otherwise the consumer says why and replays the whole log, as without snapshots.
Snapshots are msgpack, appended to the stream ``agentjobs.trust-snapshots``;
the newest one wins.
"""

from __future__ import annotations

import hashlib
from datetime import datetime

import msgspec
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from schemas import PhaseChanged

from schemas.logs import get_logger
from dispatcher.plumbing.settings import TrustSettings
from dispatcher.plumbing.streamlog import StreamFollower
from schemas.routing import TRUST_SNAPSHOTS
from dispatcher.trust.policy import LedgerSnapshot
from dispatcher.trust.records import InvestigationsSnapshot

log = get_logger("agentjobs.trust.snapshots")
FORMAT = 3  # bump when TrustSnapshot or LedgerSnapshot change shape (2: investigations, verdicts, admission
# clock; 3: the actions each finding proposed, the window's per-action verdicts)
CONTENT_TYPE = "application/msgpack"
SNAPSHOT_TYPE = "agentjobs.trust-snapshot"


class TrustSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    format: int
    policy: str  # policy_fingerprint() of the settings it was taken under
    log_offset: int  # the last feedback-log offset applied
    log_entry_id: str  # the message id at that offset
    applied: int  # entries applied since the beginning of the log
    taken_at: datetime
    ledger: LedgerSnapshot
    decided: dict[str, PhaseChanged]  # scope -> the ledger's latest decision
    commands: list[str]  # pin command ids remembered, oldest first
    investigations: InvestigationsSnapshot  # the investigations (and early findings) trust has seen
    last_admitted: datetime | None = None  # the admission clock: it never goes back across a restart


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(TrustSnapshot).decode


def policy_fingerprint(trust: TrustSettings) -> str:
    """Identifies the settings a ledger's state depends on (pure)."""
    return hashlib.sha256(msgspec.json.encode(trust)).hexdigest()[:24]


def encode_snapshot(snapshot: TrustSnapshot) -> bytes:
    return _encode(snapshot)


def unusable(snapshot: TrustSnapshot, trust: TrustSettings, entry_id_at_offset: str | None) -> str | None:
    """Why ``snapshot`` cannot stand for the log up to its offset (None: it can). Pure."""
    if snapshot.format != FORMAT:
        return f"format {snapshot.format}, this version reads {FORMAT}"
    if snapshot.policy != policy_fingerprint(trust):
        return "taken under other trust settings"
    if entry_id_at_offset is None:
        return f"feedback log has no entry at offset {snapshot.log_offset} any more"
    if entry_id_at_offset != snapshot.log_entry_id:
        return f"feedback log entry at offset {snapshot.log_offset} is not the one the snapshot followed"
    return None


class _Newest:
    def __init__(self, writers: frozenset[str] | None) -> None:
        self.body: bytes | None = None
        self.writers = writers

    def __call__(self, message: AbstractIncomingMessage) -> None:
        if message.type != SNAPSHOT_TYPE:
            return
        if self.writers is not None and (message.user_id or "") not in self.writers:
            log.warning("trust_snapshot_refused", reason="forbidden_sender", sender=message.user_id or "")
            return  # only trust's own snapshots: anyone else's would be a forged state
        self.body = message.body  # decoded only if it is the last one


async def newest(connection: AbstractRobustConnection, *, timeout: float, writers: frozenset[str] | None = None,
                 read_only: bool = False) -> TrustSnapshot | None:
    """The newest snapshot in the stream written by one of ``writers`` (None: any) — None: there is
    none, or it cannot be read. ``read_only``: for readers that may not write markers (operators)."""
    newest_body = _Newest(writers)
    reader = StreamFollower(TRUST_SNAPSHOTS, newest_body, name="trust-snapshots")
    try:
        await reader.start(connection)
        await reader.catch_up(connection, timeout=timeout, read_only=read_only)
    finally:
        await reader.stop()
    if newest_body.body is None:
        return None
    try:
        return _decode(newest_body.body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.warning("trust_snapshot_unreadable", error=str(exc)[:200])
        return None
