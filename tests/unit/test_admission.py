"""Admission: caps hold, criticals go first, FIFO within a severity, a full class blocks nobody else."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatcher.intake.admission import AdmissionGate, Waiter, pick_next
from schemas import Severity


def _w(seq: int, severity: str, cls: str = "default") -> Waiter:
    return Waiter(seq=seq, investigation_id=f"inv-{seq}", severity=Severity(severity), class_name=cls)


def test_most_severe_first_then_arrival_order() -> None:
    waiting = [_w(1, "info"), _w(2, "warning"), _w(3, "critical"), _w(4, "critical")]
    chosen = pick_next(waiting, active_total=0, active_by_class={}, max_active=5, class_caps={})
    assert chosen is not None and chosen.seq == 3


def test_nothing_is_admitted_at_the_global_cap() -> None:
    assert pick_next([_w(1, "critical")], active_total=2, active_by_class={}, max_active=2, class_caps={}) is None


def test_a_full_class_does_not_block_other_classes() -> None:
    waiting = [_w(1, "critical", "database"), _w(2, "info", "kubernetes")]
    chosen = pick_next(
        waiting, active_total=1, active_by_class={"database": 1}, max_active=5, class_caps={"database": 1}
    )
    assert chosen is not None and chosen.class_name == "kubernetes"


def _rank(w: Waiter) -> tuple[int, int]:
    return (list(Severity).index(w.severity), w.seq)


@given(
    st.lists(st.tuples(st.sampled_from(list(Severity)), st.sampled_from(["a", "b", "c"])), max_size=40),
    st.integers(min_value=1, max_value=6),
    st.integers(min_value=1, max_value=3),
)
def test_draining_the_queue_never_exceeds_caps_and_respects_order(items, max_active, class_cap) -> None:
    waiting = [Waiter(seq=i, investigation_id=str(i), severity=s, class_name=c) for i, (s, c) in enumerate(items)]
    caps = {"a": class_cap, "b": class_cap, "c": class_cap}
    active: dict[str, int] = {}
    while (w := pick_next(waiting, active_total=sum(active.values()), active_by_class=active,
                          max_active=max_active, class_caps=caps)) is not None:
        waiting.remove(w)
        # nobody left waiting in a class with room ranks before the one admitted
        assert all(_rank(o) > _rank(w) for o in waiting if active.get(o.class_name, 0) < class_cap)
        active[w.class_name] = active.get(w.class_name, 0) + 1
        assert sum(active.values()) <= max_active
        assert all(n <= class_cap for n in active.values())
    # it stops only when the global cap is reached or every waiter's class is full
    assert sum(active.values()) == max_active or all(active.get(o.class_name, 0) >= class_cap for o in waiting)


async def test_gate_with_cap_two_launches_criticals_first() -> None:
    # Given two running investigations at a cap of 2
    gate = AdmissionGate(max_active=2, class_caps={})
    for i in range(2):
        (await gate.admit(f"run-{i}", Severity.INFO, "default")).commit()
    # When ten incidents of mixed severity wait
    admitted: list[tuple[str, str]] = []
    severities = ["info", "warning", "critical", "info", "critical", "warning", "info", "critical", "warning", "info"]

    async def wait_and_record(i: int, severity: str) -> None:
        slot = await gate.admit(f"w-{i}", Severity(severity), "default")
        admitted.append((slot.investigation_id, severity))
        slot.commit()

    tasks = [asyncio.create_task(wait_and_record(i, s)) for i, s in enumerate(severities)]
    await asyncio.sleep(0)
    assert gate.waiting == 10 and admitted == []
    # Then, as investigations finish one by one, all criticals go first, then warnings, then infos
    finishing = ["run-0", "run-1"]
    while finishing:
        gate.release(finishing.pop(0))
        await asyncio.sleep(0)
        finishing += [inv for inv, _ in admitted if inv not in finishing and gate.is_active(inv)][:1]
        assert gate.active <= 2
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=5)
    assert [sev for _, sev in admitted] == ["critical"] * 3 + ["warning"] * 3 + ["info"] * 4


async def test_cancelled_slot_frees_capacity_for_the_next_waiter() -> None:
    gate = AdmissionGate(max_active=1, class_caps={})
    first = await gate.admit("a", Severity.WARNING, "default")
    waiting = asyncio.create_task(gate.admit("b", Severity.WARNING, "default"))
    await asyncio.sleep(0)
    assert not waiting.done()
    first.cancel()  # e.g. the Job already existed
    slot = await asyncio.wait_for(waiting, timeout=1)
    assert slot.investigation_id == "b" and gate.active == 1


async def test_a_waiter_cancelled_while_waiting_leaves_no_trace() -> None:
    gate = AdmissionGate(max_active=1, class_caps={})
    (await gate.admit("a", Severity.WARNING, "default")).commit()
    waiting = asyncio.create_task(gate.admit("b", Severity.WARNING, "default"))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert gate.waiting == 0
    gate.release("a")
    assert gate.active == 0
