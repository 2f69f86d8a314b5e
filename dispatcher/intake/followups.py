"""Follow-up investigations: new alerts that join a group after its investigation ended.

A group's notifications always identify its *first* investigation (source,
group key, earliest firing ``startsAt``). Once that investigation has ended,
alerts with fingerprints no investigation of the group has seen start a
follow-up investigation, linked to the first by ``follows``. Follow-up number
``n`` has a deterministic id (``follow_up_investigation_id(first, n)``) and
Job name, so a redelivered notification finds the same Job (409) instead of
starting a second one, and after a restart the chain is read back from the
runtime: each Job carries the fingerprints it was launched for in the
``agentjobs.dev/fingerprints`` annotation.

Limits (``admission.max_follow_ups`` per first investigation and
``admission.follow_up_min_interval`` after the previous one ended) keep a
flapping group from looping: past them the new alerts are reported
``attached`` to the last investigation with a message saying why no
follow-up started. Everything here is pure; ``incidents.Intake`` does the I/O.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

ANN_FINGERPRINTS = "agentjobs.dev/fingerprints"  # comma-separated fingerprints the Job was launched for
ANN_FOLLOWS = "agentjobs.dev/follows"  # a follow-up Job: the group's first investigation id
MAX_FINGERPRINT_CHARS = 65_536  # of the annotation (Kubernetes allows 256 KiB of annotations in all)
_HASH_CHARS = 16  # the hash part of a Job name (schemas.identity.job_name)


def follow_up_investigation_id(first_id: str, number: int) -> str:
    """The id of follow-up ``number`` (1, 2, …) of investigation ``first_id`` (pure, 40 hex)."""
    return hashlib.sha256(f"{first_id}\x1ffollow-up\x1f{number}".encode()).hexdigest()[:40]


def follow_up_job_name(first_job_name: str, follow_up_id: str) -> str:
    """The first Job's name with the follow-up's hash: as readable, as unique, as long."""
    return f"{first_job_name[:-_HASH_CHARS]}{follow_up_id[:_HASH_CHARS]}"


def fingerprints_annotation(fingerprints: Iterable[str]) -> str:
    """The annotation value for ``fingerprints`` (sorted; bounded — an alert storm's tail is left out)."""
    out: list[str] = []
    size = 0
    for fp in sorted(set(fingerprints)):
        size += len(fp) + 1
        if size > MAX_FINGERPRINT_CHARS:
            break
        out.append(fp)
    return ",".join(out)


def fingerprints_from(annotations: Mapping[str, str]) -> set[str]:
    """The fingerprints a Job's annotations say it was launched for."""
    return {fp for fp in annotations.get(ANN_FINGERPRINTS, "").split(",") if fp}


@dataclass(frozen=True, kw_only=True)
class Member:
    """One investigation of a group's chain, as far as the decision needs it."""

    investigation_id: str
    fingerprints: frozenset[str]
    ended: bool
    ended_at: datetime | None = None


class Verdict(enum.StrEnum):
    DUPLICATE = "duplicate"  # every alert was seen by an investigation of the chain
    ATTACH = "attach"  # the last investigation is still running: the new alerts join it
    FOLLOW_UP = "follow_up"  # start follow-up ``number``
    HELD = "held"  # a limit says no follow-up (now): report the alerts attached, say why


@dataclass(frozen=True, kw_only=True)
class Decision:
    verdict: Verdict
    new: frozenset[str] = frozenset()  # fingerprints no investigation of the chain has seen
    number: int = 0  # FOLLOW_UP: which follow-up
    why: str = ""  # HELD: the message for the ticket


def decide(chain: Sequence[Member], fingerprints: Iterable[str], *, now: datetime, max_follow_ups: int,
           min_interval: float) -> Decision:
    """What a firing notification means for a chain whose first investigation ended (pure).

    ``chain`` is the first investigation followed by its follow-ups in order.
    """
    seen: set[str] = set()
    for member in chain:
        seen |= member.fingerprints
    new = frozenset(set(fingerprints) - seen)
    if not new:
        return Decision(verdict=Verdict.DUPLICATE)
    last = chain[-1]
    if not last.ended:
        return Decision(verdict=Verdict.ATTACH, new=new)
    done = len(chain) - 1
    if done >= max_follow_ups:
        return Decision(verdict=Verdict.HELD, new=new, why=(
            f"{len(new)} new alert(s) joined after the investigation ended; no follow-up investigation "
            f"started: the group already had {done} (admission.max_follow_ups = {max_follow_ups})"))
    if last.ended_at is not None:
        since = (now - last.ended_at).total_seconds()
        if since < min_interval:
            return Decision(verdict=Verdict.HELD, new=new, why=(
                f"{len(new)} new alert(s) joined after the investigation ended; no follow-up investigation "
                f"yet: the previous one ended {max(0.0, since):.0f} s ago, less than "
                f"admission.follow_up_min_interval ({min_interval:.0f} s); a later notification starts it"))
    return Decision(verdict=Verdict.FOLLOW_UP, new=new, number=done + 1)
