"""Streaming replication, part of the database sweep: standbys behind, and slots that hoard WAL.

An SRE asks a PostgreSQL server about replication whatever the alert is called — a stale read replica
shows up as "reports are out of date", a forgotten slot as "the primary's disk is filling up". Two
causes, scored from one ``postgres.replication`` observation of whichever server the Job queries:

* ``replication_lag`` — a standby is far behind. On a primary: the standby that replays (or writes)
  the most WAL behind; the primary's ``replay_lag`` interval only moves when the standby replays, so
  bytes decide, and a standby that receives everything but replays nothing is named as such. On a
  standby: WAL received but not replayed, how long ago it last replayed, and whether replay is paused.
* ``replication_slot_retains_wal`` — an inactive slot holds WAL back: ``pg_wal`` grows until the
  disk is full (on PostgreSQL 13+ unless ``max_slot_wal_keep_size`` caps it: ``wal_status`` says).

Reading and scoring are pure; the one tool call is the only I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from agent.tools.base import Observation
from agent.tools.postgres import mib

from .base import Investigation
from .rules import AlertFacts, Draft, _q

LAG_BYTES = 128 * 1048576  # a standby this far behind (replay or write) lags, whatever its lag interval says
LAG_SECONDS = 30.0  # a standby's last replayed transaction this old, with WAL waiting, lags
SLOT_RETAINED_BYTES = 256 * 1048576  # an inactive slot holding this much WAL is filling the disk
CAUSES = ("replication_lag", "replication_slot_retains_wal")
_ABOUT_REPLICATION = re.compile(r"replica|replication|standby|wal\b|wal_|pg_wal|slot|hot.?standby|lag")


@dataclass(frozen=True)
class Standby:
    name: str
    client: str
    state: str
    write_behind: int
    replay_behind: int
    replay_lag_s: float | None


@dataclass(frozen=True)
class Slot:
    name: str
    kind: str
    active: bool
    retained: int | None
    wal_status: str


@dataclass(frozen=True)
class Replication:
    in_recovery: bool
    standbys: tuple[Standby, ...]
    slots: tuple[Slot, ...]
    unreplayed: int  # standby: received, not replayed (bytes)
    replay_age_s: float | None  # standby: age of the last replayed transaction
    paused: bool  # standby: replay paused (or pausing)
    receiving: bool  # standby: the WAL receiver streams


def _int(value: Any) -> int:
    try:
        return max(0, int(value or 0))
    except (TypeError, ValueError):
        return 0


def _float(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def read_replication(obs: Observation) -> Replication | None:
    """postgres.replication, or None when it failed or said nothing readable (pure)."""
    data = obs.data if obs.ok and isinstance(obs.data, dict) else None
    if data is None:
        return None
    standbys = tuple(Standby(name=str(r.get("application_name") or "(none)"), client=str(r.get("client_addr") or ""),
                             state=str(r.get("state") or ""), write_behind=_int(r.get("write_behind_bytes")),
                             replay_behind=_int(r.get("replay_behind_bytes")),
                             replay_lag_s=_float(r.get("replay_lag_s")))
                     for r in data.get("standbys") or () if isinstance(r, dict))
    slots = tuple(Slot(name=str(s.get("slot_name") or ""), kind=str(s.get("slot_type") or ""),
                       active=bool(s.get("active")),
                       retained=None if s.get("retained_bytes") is None else _int(s.get("retained_bytes")),
                       wal_status=str(s.get("wal_status") or ""))
                  for s in data.get("slots") or () if isinstance(s, dict))
    pause = str(data.get("replay_pause_state") or "")
    return Replication(in_recovery=bool(data.get("in_recovery")), standbys=standbys, slots=slots,
                       unreplayed=_int(data.get("received_not_replayed_bytes")),
                       replay_age_s=_float(data.get("last_replay_age_s")),
                       paused=pause in ("paused", "pause requested"),
                       receiving=str(data.get("wal_receiver_status") or "") == "streaming")


def about_replication(alert: AlertFacts) -> bool:
    """Whether the alert's name, expression or text speak of replication (pure)."""
    name = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", alert.name).lower()
    return any(_ABOUT_REPLICATION.search(text) for text in (name, alert.expression.lower(), alert.text))


def assess(obs: Observation, alert: AlertFacts) -> list[Draft]:
    """The replication hypotheses one observation supports or rules out (pure).

    Nothing when the server has no replication at all and the alert does not speak of it: a
    hypothesis nobody could have suspected is noise in the finding.
    """
    seen = read_replication(obs)
    if seen is None:
        return []
    if not (seen.in_recovery or seen.standbys or seen.slots or about_replication(alert)):
        return []
    lag = Draft(cause="replication_lag", statement="replication lag")
    if seen.in_recovery:
        _assess_standby(lag, obs, seen)
    else:
        _assess_primary(lag, obs, seen)
    drafts = [lag]
    slot = _assess_slots(obs, seen)
    if slot is not None:
        drafts.append(slot)
    return drafts


def _assess_primary(h: Draft, obs: Observation, seen: Replication) -> None:
    if not seen.standbys:
        h.contradicts(obs, "no standby is connected to this server (and it is not a standby itself)", 2.0)
        return
    worst = max(seen.standbys, key=lambda s: (max(s.replay_behind, s.write_behind), s.name))
    behind = max(worst.replay_behind, worst.write_behind)
    lag_s = worst.replay_lag_s or 0.0
    if behind < LAG_BYTES and lag_s < LAG_SECONDS:
        h.contradicts(obs, f"{len(seen.standbys)} standby(s) connected, the furthest behind "
                           f"({_q(worst.name)}) by {mib(behind)}", 2.0)
        return
    receives = worst.write_behind < LAG_BYTES <= worst.replay_behind
    how = ("receives the WAL but does not replay it (replay paused, or held by a conflicting query on the "
           "standby)" if receives else "does not receive the WAL fast enough (network, or the standby's disk)")
    h.statement = (f"replication lag: standby {_q(worst.name)} ({worst.client}) replays "
                   f"{mib(worst.replay_behind)} behind the primary and {how}")
    h.supports(obs, f"standby {_q(worst.name)} replays {mib(worst.replay_behind)} and writes "
                    f"{mib(worst.write_behind)} behind", 2.5)
    if lag_s >= LAG_SECONDS:
        h.supports(obs, f"its last reported replay_lag is {lag_s:.0f} s", 0.5)
    if worst.state and worst.state != "streaming":
        h.supports(obs, f"it is {worst.state}, not streaming", 0.5)


def _assess_standby(h: Draft, obs: Observation, seen: Replication) -> None:
    age = seen.replay_age_s
    waiting = seen.unreplayed > 0
    if seen.paused:
        h.statement = (f"replication lag: replay is paused on this standby ({mib(seen.unreplayed)} received and "
                       "waiting; pg_wal_replay_resume() continues it)")
        h.supports(obs, f"replay is paused with {mib(seen.unreplayed)} received but not replayed", 3.0)
    elif seen.unreplayed >= LAG_BYTES or (waiting and age is not None and age >= LAG_SECONDS):
        h.statement = (f"replication lag: this standby has {mib(seen.unreplayed)} of WAL received but not replayed"
                       + (f", last replayed {age:.0f} s ago" if age is not None else ""))
        h.supports(obs, f"{mib(seen.unreplayed)} received but not replayed", 2.5)
    elif not seen.receiving:
        h.statement = "replication lag: this standby receives no WAL from its primary (WAL receiver not streaming)"
        h.supports(obs, "the WAL receiver is not streaming", 2.0)
    else:
        h.contradicts(obs, f"this standby streams and has replayed all but {mib(seen.unreplayed)} it received", 2.0)
        return
    if age is not None and age >= LAG_SECONDS and (waiting or not seen.receiving):
        h.supports(obs, f"its last replayed transaction is {age:.0f} s old", 1.0)


def _assess_slots(obs: Observation, seen: Replication) -> Draft | None:
    inactive = [s for s in seen.slots if not s.active and s.retained is not None]
    if not seen.slots:
        return None
    h = Draft(cause="replication_slot_retains_wal", statement="a replication slot retains WAL")
    worst = max(inactive, key=lambda s: (s.retained or 0, s.name), default=None)
    if worst is None or (worst.retained or 0) < SLOT_RETAINED_BYTES:
        held = f"; the most an inactive one holds is {mib(worst.retained or 0)}" if worst is not None else ""
        h.contradicts(obs, f"no inactive replication slot holds {mib(SLOT_RETAINED_BYTES)} of WAL{held}", 2.0)
        return h
    capped = f", wal_status {worst.wal_status}" if worst.wal_status else ""
    h.statement = (f"replication slot {_q(worst.name)} ({worst.kind}, inactive{capped}) retains "
                   f"{mib(worst.retained or 0)} of WAL: pg_wal grows until its consumer returns or the slot is dropped")
    h.supports(obs, f"inactive slot {_q(worst.name)} retains {mib(worst.retained or 0)} of WAL", 3.0)
    if worst.wal_status in ("extended", "unreserved"):
        h.supports(obs, f"its wal_status is {worst.wal_status}: beyond max_wal_size", 0.5)
    return h


async def sweep(inv: Investigation, alert: AlertFacts) -> list[Draft]:
    """Ask the server about replication once, when the Job's postgres tool can."""
    if not inv.offers("postgres", "replication"):
        return []
    return assess(await inv.call("postgres", "replication", {}), alert)
