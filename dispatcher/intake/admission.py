"""Admission: how many investigations run at once, and which waiting one goes next.

``pick_next`` is the whole policy, as a pure function: among waiting
investigations, the most severe first (critical > warning > info), FIFO
within a severity, skipping those whose class is at its cap so that one full
class never blocks the others. ``AdmissionGate`` is the async shell around it:
``admit`` waits for a slot; the slot is committed when the Job was created and
released when the investigation ends. Waiting incidents stay unacked in the
broker (bounded by prefetch), so a crash loses nothing.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterable, Mapping

import msgspec

from schemas import Severity

_SEVERITY_RANK = {s: i for i, s in enumerate(Severity)}  # critical=0 first


class Waiter(msgspec.Struct, frozen=True, kw_only=True):
    seq: int  # arrival order
    investigation_id: str
    severity: Severity
    class_name: str


def pick_next(
    waiting: Iterable[Waiter],
    *,
    active_total: int,
    active_by_class: Mapping[str, int],
    max_active: int,
    class_caps: Mapping[str, int],
) -> Waiter | None:
    """The waiter to admit now, or None (pure)."""
    if active_total >= max_active:
        return None
    ordered = sorted(waiting, key=lambda w: (_SEVERITY_RANK[w.severity], w.seq))
    for waiter in ordered:
        cap = class_caps.get(waiter.class_name, max_active)
        if active_by_class.get(waiter.class_name, 0) < cap:
            return waiter
    return None


class Slot:
    """A granted admission; ``commit`` when the Job exists, ``cancel`` otherwise."""

    def __init__(self, gate: AdmissionGate, investigation_id: str, class_name: str) -> None:
        self._gate = gate
        self.investigation_id = investigation_id
        self.class_name = class_name
        self._done = False

    def commit(self) -> None:
        """The Job was created: the slot stays taken until ``AdmissionGate.release``."""
        self._done = True

    def cancel(self) -> None:
        """Nothing was launched: give the slot back."""
        if not self._done:
            self._done = True
            self._gate.release(self.investigation_id)


class AdmissionGate:
    """Global and per-class caps with severity-ordered waiting."""

    def __init__(self, *, max_active: int, class_caps: Mapping[str, int]) -> None:
        self.max_active = max_active
        self.class_caps = dict(class_caps)
        self._active: dict[str, str] = {}  # investigation id → class
        self._by_class: dict[str, int] = {}  # kept in step with _active: O(1) admission checks
        self._waiting: dict[int, tuple[Waiter, asyncio.Future[None]]] = {}
        self._seq = itertools.count()

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def active_by_class(self) -> dict[str, int]:
        return {k: v for k, v in self._by_class.items() if v}

    def _take(self, investigation_id: str, class_name: str) -> None:
        if investigation_id not in self._active:
            self._active[investigation_id] = class_name
            self._by_class[class_name] = self._by_class.get(class_name, 0) + 1

    def is_active(self, investigation_id: str) -> bool:
        return investigation_id in self._active

    async def admit(self, investigation_id: str, severity: Severity, class_name: str) -> Slot:
        """Wait until this investigation may launch; the slot is taken when this returns."""
        waiter = Waiter(
            seq=next(self._seq), investigation_id=investigation_id, severity=severity, class_name=class_name
        )
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[waiter.seq] = (waiter, future)
        self._wake()
        try:
            await future
        except asyncio.CancelledError:
            if self._waiting.pop(waiter.seq, None) is None and future.done() and not future.cancelled():
                self.release(investigation_id)  # granted just as we were cancelled
            raise
        return Slot(self, investigation_id, class_name)

    def occupy(self, investigation_id: str, class_name: str) -> None:
        """Count an investigation found running (after a restart, or by another replica)."""
        self._take(investigation_id, class_name)

    def release(self, investigation_id: str) -> None:
        """The investigation ended (or never launched): free its slot."""
        class_name = self._active.pop(investigation_id, None)
        if class_name is not None:
            self._by_class[class_name] -= 1
            self._wake()

    def _wake(self) -> None:
        while self._waiting:
            chosen = pick_next(
                (w for w, _ in self._waiting.values()),
                active_total=len(self._active),
                active_by_class=self._by_class,
                max_active=self.max_active,
                class_caps=self.class_caps,
            )
            if chosen is None:
                return
            _, future = self._waiting.pop(chosen.seq)
            self._take(chosen.investigation_id, chosen.class_name)
            future.set_result(None)
