"""The shared action claims without Vault: where a claim lives, what each answer means, and how
``execute`` consults a shared store besides the local ledger.

The decisions are pure functions (``schemas.vault_paths``, ``agent.credentials.judge_refused_create``,
``agent.remediation.claims``); the protocol is driven with a scripted executor and an in-memory
shared store that records the order of calls (the real store against OpenBao is in
tests/integration/test_action_claims.py).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.credentials import AlreadyExists, Created, Denied, judge_refused_create
from agent.reasoning.actions import gate
from agent.remediation.claims import ClaimsUnavailable, claim_document, claimed, entry_of, outcome_document
from agent.remediation.protocol import (
    Entry,
    FileLedger,
    MemoryLedger,
    Outcome,
    Refusal,
    execute,
    idempotency_key,
    shared_claims,
)
from schemas import Phase, ProposedAction
from schemas import vault_paths as layout
from tests.unit.test_remediation_protocol import Scripted, terminate

KEY = "inv-7:terminate_backend:0123456789abcdef0123456789abcdef"


# --- where a claim lives ----------------------------------------------------------------------------

def test_a_claim_lives_under_its_investigation_at_a_digest_of_the_whole_key() -> None:
    path = layout.kv_claim_path(KEY)
    assert path.startswith("agentjobs-kv/data/claims/inv-7/") and len(path.rsplit("/", 1)[1]) == 40
    assert layout.kv_claim_path(KEY) == path  # stable: every pod and Job computes the same
    assert layout.kv_claim_outcome_path(KEY) == f"{path}/outcome"
    assert layout.kv_claim_path(KEY[:-1] + "0") != path
    assert layout.kv_claim_path("inv-8" + KEY[5:]).startswith("agentjobs-kv/data/claims/inv-8/")


@pytest.mark.parametrize("investigation", ["../actions", "a/b", "*", "", "x" * 200, ".hidden"])
def test_an_investigation_id_that_is_not_a_plain_segment_becomes_a_digest(investigation: str) -> None:
    path = layout.kv_claim_path(f"{investigation}:terminate_backend:00")
    segment = path.split("/")[3]
    assert path.count("/") == 4 and path.startswith("agentjobs-kv/data/claims/")
    assert segment.startswith("x-") and ".." not in path and "*" not in path


def test_the_policy_glob_covers_claims_and_outcomes_only() -> None:
    glob = layout.kv_claims_policy_path()
    assert glob == "agentjobs-kv/data/claims/*"
    for path in (layout.kv_claim_path(KEY), layout.kv_claim_outcome_path(KEY)):
        assert path.startswith(glob[:-1])
    assert not layout.kv_actions_path().startswith(glob[:-1])


# --- what an answer means ----------------------------------------------------------------------------

def test_a_refused_create_is_already_exists_only_when_the_secret_reads_back() -> None:
    path = layout.kv_claim_path(KEY)
    assert judge_refused_create(path, "permission denied (403)", {"key": KEY}) == \
        AlreadyExists(path=path, data={"key": KEY})
    nothing = judge_refused_create(path, "permission denied (403)", None)
    assert isinstance(nothing, Denied) and nothing.reason.startswith("permission denied (403): not permitted")
    unreadable = judge_refused_create(path, "permission denied (403)", Denied(path=path, reason="also 403"))
    assert unreadable == Denied(path=path, reason="permission denied (403)")


def test_claimed_is_true_only_for_the_creator_and_raises_when_nobody_can_tell() -> None:
    path = layout.kv_claim_path(KEY)
    assert claimed(Created(path=path, version=1)) is True
    assert claimed(AlreadyExists(path=path)) is False
    with pytest.raises(ClaimsUnavailable, match=r"cannot claim .*: Vault is sealed"):
        claimed(Denied(path=path, reason="Vault is sealed"))


def test_what_the_two_reads_say() -> None:
    claim = claim_document(KEY, action="terminate_backend", target="pid 4242", at="2026-01-01T00:00:00+00:00",
                           holder="acc-1")
    assert claim == {"key": KEY, "action": "terminate_backend", "target": "pid 4242",
                     "claimed_at": "2026-01-01T00:00:00+00:00", "holder": "acc-1"}
    assert entry_of(KEY, None, None) is None  # never claimed
    with pytest.raises(ClaimsUnavailable):
        entry_of(KEY, Denied(path="p", reason="permission denied (403)"), None)
    unsettled = entry_of(KEY, claim, None)
    assert unsettled == Entry(key=KEY, claimed_at="2026-01-01T00:00:00+00:00")  # it may have died while acting
    assert entry_of(KEY, claim, Denied(path="p", reason="503")) == unsettled  # unknown outcome: still claimed
    assert entry_of(KEY, claim, {"outcome": "something new"}) == unsettled
    done = outcome_document(Outcome.EXECUTED_VERIFIED, reason="r" * 900, at="2026-01-01T00:00:05+00:00")
    assert len(done["reason"]) == 500
    assert entry_of(KEY, claim, done) == Entry(key=KEY, claimed_at="2026-01-01T00:00:00+00:00",
                                               outcome=Outcome.EXECUTED_VERIFIED, reason="r" * 500)


# --- the protocol with a shared store -----------------------------------------------------------------

class SharedStore:
    """An in-memory shared claim store; ``calls`` is shared with a ``TracedLedger`` to show the order."""

    def __init__(self, calls: list[str] | None = None, *, fail: set[str] = frozenset(),
                 lose_race: bool = False) -> None:
        self.entries: dict[str, Entry] = {}
        self.calls = calls if calls is not None else []
        self.fail, self.lose_race = set(fail), lose_race

    def _maybe_fail(self, op: str) -> None:
        self.calls.append(f"shared.{op}")
        if op in self.fail:
            raise ClaimsUnavailable(f"cannot {op}: Vault unavailable")

    async def seen(self, key: str) -> Entry | None:
        self._maybe_fail("seen")
        return self.entries.get(key)

    async def claim(self, key: str, *, action: str = "", target: str = "") -> bool:
        self._maybe_fail("claim")
        if self.lose_race:  # another pod created it between our seen and our claim
            self.entries[key] = Entry(key=key, claimed_at="2026-01-01T00:00:00+00:00")
            return False
        if key in self.entries:
            return False
        self.entries[key] = Entry(key=key, claimed_at="2026-01-01T00:00:00+00:00")
        return True

    async def settle(self, key: str, outcome: Outcome, *, reason: str = "") -> None:
        self._maybe_fail("settle")
        old = self.entries[key]
        self.entries[key] = Entry(key=key, claimed_at=old.claimed_at, outcome=outcome, reason=reason)


class TracedLedger(MemoryLedger):
    def __init__(self, calls: list[str], *, fail_claim: bool = False) -> None:
        super().__init__()
        self.calls, self.fail_claim = calls, fail_claim

    def seen(self, key: str) -> Entry | None:
        self.calls.append("local.seen")
        return super().seen(key)

    def claim(self, key: str, *, action: str = "", target: str = "") -> bool:
        self.calls.append("local.claim")
        if self.fail_claim:
            raise OSError(28, "No space left on device")
        return super().claim(key, action=action, target=target)

    def settle(self, key: str, outcome: Outcome, *, reason: str = "") -> None:
        self.calls.append("local.settle")
        super().settle(key, outcome, reason=reason)


def key_of(action: ProposedAction, inv: str = "inv-7") -> str:
    return idempotency_key(inv, action, volatile=Scripted.volatile_params)


async def test_the_shared_claim_comes_first_and_both_are_settled() -> None:
    calls: list[str] = []
    store, ledger, executor = SharedStore(calls), TracedLedger(calls), Scripted()
    result = await execute(terminate(), executor, done=ledger, investigation_id="inv-7", shared=store)
    assert result.outcome is Outcome.EXECUTED_VERIFIED
    assert calls == ["local.seen", "shared.seen", "shared.claim", "local.claim", "local.settle", "shared.settle"]
    assert store.entries[result.key].outcome is Outcome.EXECUTED_VERIFIED
    assert ledger.entries[result.key].outcome is Outcome.EXECUTED_VERIFIED


async def test_a_new_pod_with_an_empty_ledger_finds_the_shared_claim(tmp_path: Path) -> None:
    store, executor = SharedStore(), Scripted()
    first = await execute(terminate(), executor, done=FileLedger(tmp_path / "pod-1" / "ledger"),
                          investigation_id="inv-7", shared=store)
    second = await execute(terminate(), executor, done=FileLedger(tmp_path / "pod-2" / "ledger"),
                           investigation_id="inv-7", shared=store)
    assert first.outcome is Outcome.EXECUTED_VERIFIED
    assert second.outcome is Outcome.ALREADY_EXECUTED and second.executed
    assert second.params()["previous_outcome"] == "executed_verified"
    assert "in the investigation's shared claims (another pod or Job of it)" in second.reason
    assert (executor.checks, executor.acts) == (1, 1)


async def test_a_claim_that_was_never_settled_counts_as_done() -> None:
    store, executor = SharedStore(), Scripted()
    store.entries[key_of(terminate())] = Entry(key=key_of(terminate()), claimed_at="2026-01-01T00:00:00+00:00")
    result = await execute(terminate(), executor, done=MemoryLedger(), investigation_id="inv-7", shared=store)
    assert result.outcome is Outcome.ALREADY_EXECUTED and not result.executed
    assert "outcome was never recorded" in result.reason and executor.acts == 0


async def test_unreadable_shared_claims_mean_not_acting() -> None:
    store, ledger, executor = SharedStore(fail={"seen"}), MemoryLedger(), Scripted()
    result = await execute(terminate(), executor, done=ledger, investigation_id="inv-7", shared=store)
    assert result.outcome is Outcome.FAILED
    assert result.reason.startswith("the shared action claims are unreadable, not acting: ClaimsUnavailable")
    assert (executor.checks, executor.acts) == (0, 0) and ledger.entries == {}


async def test_a_shared_claim_that_cannot_be_written_means_not_acting() -> None:
    calls: list[str] = []
    store, ledger, executor = SharedStore(calls, fail={"claim"}), TracedLedger(calls), Scripted()
    result = await execute(terminate(), executor, done=ledger, investigation_id="inv-7", shared=store)
    assert result.outcome is Outcome.FAILED and "could not claim the action in the shared action claims" in result.reason
    assert executor.acts == 0 and "local.claim" not in calls and ledger.entries == {}


async def test_losing_the_race_for_the_shared_claim_is_already_executed() -> None:
    store, ledger, executor = SharedStore(lose_race=True), MemoryLedger(), Scripted()
    result = await execute(terminate(), executor, done=ledger, investigation_id="inv-7", shared=store)
    assert result.outcome is Outcome.ALREADY_EXECUTED and "shared claims" in result.reason
    assert executor.acts == 0 and ledger.entries == {}


async def test_a_local_ledger_failure_after_the_shared_claim_settles_it_failed() -> None:
    calls: list[str] = []
    store, executor = SharedStore(calls), Scripted()
    result = await execute(terminate(), executor, done=TracedLedger(calls, fail_claim=True),
                           investigation_id="inv-7", shared=store)
    assert result.outcome is Outcome.FAILED and executor.acts == 0
    assert store.entries[result.key].outcome is Outcome.FAILED  # claimed there, and said why nothing was done
    assert calls[-1] == "shared.settle"


async def test_settling_the_shared_claim_never_raises() -> None:
    store, ledger, executor = SharedStore(fail={"settle"}), MemoryLedger(), Scripted()
    result = await execute(terminate(), executor, done=ledger, investigation_id="inv-7", shared=store)
    assert result.outcome is Outcome.EXECUTED_VERIFIED and executor.acts == 1
    assert store.entries[result.key].outcome is None  # claimed, the outcome unknown: still counts as done
    assert ledger.entries[result.key].outcome is Outcome.EXECUTED_VERIFIED


async def test_nothing_is_claimed_in_the_shared_store_when_stale_refused_or_limited() -> None:
    async def refuse(action: ProposedAction) -> Refusal | None:
        return Refusal(reason="refused by the kill switch: test")

    store = SharedStore()
    stale = await execute(terminate(), Scripted(stale="the blocker ended"), done=MemoryLedger(),
                          investigation_id="inv-7", shared=store)
    refused = await execute(terminate(), Scripted(), done=MemoryLedger(), investigation_id="inv-7",
                            shared=store, guard=refuse)
    limited = await execute(terminate(), Scripted(), done=MemoryLedger(), investigation_id="inv-7", shared=store,
                            limit=Refusal(reason="limit", outcome=Outcome.REFUSED_LIMIT))
    assert [r.outcome for r in (stale, refused, limited)] == [
        Outcome.SKIPPED_STALE, Outcome.REFUSED_KILL_SWITCH, Outcome.REFUSED_LIMIT]
    assert store.entries == {} and "shared.claim" not in store.calls


async def test_cancelled_while_acting_the_shared_claim_stays_unsettled() -> None:
    store, blocker = SharedStore(), asyncio.Event()
    executor = Scripted(act_blocks=blocker)
    task = asyncio.create_task(execute(terminate(), executor, done=MemoryLedger(), investigation_id="inv-7",
                                       shared=store))
    while executor.acts == 0:
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert store.entries[key_of(terminate())].outcome is None
    again = await execute(terminate(), Scripted(), done=MemoryLedger(), investigation_id="inv-7", shared=store)
    assert again.outcome is Outcome.ALREADY_EXECUTED


async def test_without_a_shared_store_nothing_changes() -> None:
    store, executor = SharedStore(), Scripted()
    result = await execute(terminate(), executor, done=MemoryLedger(), investigation_id="inv-7")
    assert result.outcome is Outcome.EXECUTED_VERIFIED and store.calls == []


async def test_the_installed_store_reaches_every_execution_of_the_gate() -> None:
    store, executor = SharedStore(), Scripted()
    with shared_claims(store):
        [first] = await gate([terminate()], Phase.AUTONOMOUS, executors={"terminate_backend": executor},
                             investigation_id="inv-7", ledger=MemoryLedger())
        [retried] = await gate([terminate()], Phase.AUTONOMOUS, executors={"terminate_backend": executor},
                               investigation_id="inv-7", ledger=MemoryLedger())  # a new pod: an empty ledger
    [outside] = await gate([terminate()], Phase.AUTONOMOUS, executors={"terminate_backend": executor},
                           investigation_id="inv-7", ledger=MemoryLedger())
    assert first.params["outcome"] == "executed_verified" and first.executed
    assert retried.params["outcome"] == "already_executed" and retried.params["previous_outcome"] == \
        "executed_verified"
    assert outside.params["outcome"] == "executed_verified"  # no store installed: the local ledger only
    assert executor.acts == 2
