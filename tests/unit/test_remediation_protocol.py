"""The execution protocol: re-check, act at most once per idempotency key, verify, record — without I/O.

A scripted executor stands in for the real ones; the ledger is in memory or a file in
``tmp_path`` (what a restarted agent process of the same Job reads back).
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from agent import config
from agent.reasoning.actions import Execution, gate
from agent.remediation.postgres import Backend, TerminateIdleBackends, blocked_by, lock_waits, stale_backend
from agent.remediation.protocol import (
    FileLedger,
    MemoryLedger,
    Outcome,
    execute,
    follows_protocol,
    idempotency_key,
    no_undo,
)
from schemas import Phase, ProposedAction, RiskClass


class Scripted:
    """An executor following the protocol whose answers are set by the test; counts what it was asked."""

    verify_timeout = 0.5
    volatile_params = frozenset({"observed_at"})

    def __init__(self, *, stale: str | None = None, act: Execution | Exception | None = None,
                 verified: bool | Exception = True, precondition_error: Exception | None = None,
                 act_blocks: asyncio.Event | None = None) -> None:
        self.stale = stale
        self.act_result = act if act is not None else Execution(ok=True, before="pid 4242 blocked 10 session(s)",
                                                                after="signalled")
        self.verified = verified
        self.precondition_error = precondition_error
        self.act_blocks = act_blocks
        self.checks = self.acts = self.verifies = 0
        self.timeouts: list[float] = []

    async def precondition(self, action: ProposedAction) -> str | None:
        self.checks += 1
        if self.precondition_error is not None:
            raise self.precondition_error
        return self.stale

    async def act(self, action: ProposedAction) -> Execution:
        self.acts += 1
        if self.act_blocks is not None:
            await self.act_blocks.wait()
        if isinstance(self.act_result, Exception):
            raise self.act_result
        return self.act_result

    async def verify(self, action: ProposedAction, *, timeout: float) -> bool:
        self.verifies += 1
        self.timeouts.append(timeout)
        if isinstance(self.verified, Exception):
            raise self.verified
        return self.verified

    def observed_after(self, action: ProposedAction) -> str:
        return "pid 4242 is gone; 0 session(s) wait on it"

    def undo(self, action: ProposedAction, done: Execution) -> str:
        return no_undo("a terminated session cannot be restored; its transaction was rolled back")


def terminate(pid: int = 4242, **params: str) -> ProposedAction:
    return ProposedAction(action="terminate_backend", target=f"pid {pid} on \"pg-0\"", risk=RiskClass.MEDIUM,
                          params={"pid": str(pid), "application_name": "orders-batch", **params})


# --- the protocol ----------------------------------------------------------------------------

async def test_a_holding_precondition_is_acted_on_once_verified_and_recorded() -> None:
    executor, ledger = Scripted(), MemoryLedger()
    result = await execute(terminate(), executor, done=ledger, investigation_id="inv-1")

    assert result.outcome is Outcome.EXECUTED_VERIFIED and result.executed
    assert (executor.checks, executor.acts, executor.verifies) == (1, 1, 1)
    assert executor.timeouts == [0.5]  # the executor's own bounded wait
    params = result.params()
    assert params["outcome"] == "executed_verified"
    assert params["before"] == "pid 4242 blocked 10 session(s)"
    assert params["after"] == "pid 4242 is gone; 0 session(s) wait on it"  # what verify saw last
    assert params["undo"] == "none (a terminated session cannot be restored; its transaction was rolled back)"
    assert params["reason"].startswith("executed and verified")
    assert params["idempotency_key"] == result.key and result.key.startswith("inv-1:terminate_backend:")
    assert ledger.seen(result.key).outcome is Outcome.EXECUTED_VERIFIED


async def test_the_same_key_twice_acts_once_and_answers_already_executed() -> None:
    executor, ledger = Scripted(), MemoryLedger()
    first = await execute(terminate(), executor, done=ledger, investigation_id="inv-1")
    second = await execute(terminate(), executor, done=ledger, investigation_id="inv-1")

    assert first.outcome is Outcome.EXECUTED_VERIFIED
    assert second.outcome is Outcome.ALREADY_EXECUTED and second.key == first.key
    assert executor.acts == 1 and executor.checks == 1  # not even re-checked
    assert second.executed  # by the first attempt, whose outcome is known
    assert second.params()["previous_outcome"] == "executed_verified"
    assert "not acting twice" in second.params()["reason"]


async def test_a_plain_set_serves_as_the_ledger() -> None:
    executor, done = Scripted(), set()
    await execute(terminate(), executor, done=done, investigation_id="inv-1")
    again = await execute(terminate(), executor, done=done, investigation_id="inv-1")

    assert again.outcome is Outcome.ALREADY_EXECUTED and executor.acts == 1 and len(done) == 1
    assert not again.executed  # a set keeps no outcome: it is not claimed as executed


async def test_a_stale_precondition_skips_without_acting_or_claiming() -> None:
    executor, ledger = Scripted(stale="pid 4242 no longer exists"), MemoryLedger()
    result = await execute(terminate(), executor, done=ledger, investigation_id="inv-1")

    assert result.outcome is Outcome.SKIPPED_STALE and not result.executed
    assert executor.acts == 0 and executor.verifies == 0
    assert result.params()["reason"] == "pid 4242 no longer exists"
    assert ledger.seen(result.key) is None  # nothing was done, so nothing blocks a later, valid attempt


async def test_an_unverified_effect_is_executed_not_verified() -> None:
    result = await execute(terminate(), Scripted(verified=False), done=MemoryLedger(), investigation_id="inv-1")

    assert result.outcome is Outcome.EXECUTED_NOT_VERIFIED and result.executed
    assert result.params()["reason"] == "the effect was not observed within 0.5 s"


async def test_a_verification_that_fails_is_not_verified_but_still_executed() -> None:
    result = await execute(terminate(), Scripted(verified=ConnectionError("server closed the connection")),
                           done=MemoryLedger(), investigation_id="inv-1", verify_timeout=2.0)

    assert result.outcome is Outcome.EXECUTED_NOT_VERIFIED and result.executed
    assert result.params()["reason"] == "verification failed: ConnectionError: server closed the connection"


async def test_a_failed_act_is_failed_and_never_retried() -> None:
    executor, ledger = Scripted(act=PermissionError("must be a member of pg_signal_backend")), MemoryLedger()
    result = await execute(terminate(), executor, done=ledger, investigation_id="inv-1")
    again = await execute(terminate(), executor, done=ledger, investigation_id="inv-1")

    assert result.outcome is Outcome.FAILED and not result.executed and executor.verifies == 0
    assert result.params()["error"] == "PermissionError: must be a member of pg_signal_backend"
    assert "undo" not in result.params()
    # at most once: a failure may have half-happened, so the claim stands
    assert again.outcome is Outcome.ALREADY_EXECUTED and not again.executed and executor.acts == 1


async def test_an_act_reporting_failure_is_failed() -> None:
    result = await execute(terminate(), Scripted(act=Execution(ok=False, before="b", error="returned false")),
                           done=MemoryLedger(), investigation_id="inv-1")

    assert result.outcome is Outcome.FAILED
    assert result.params()["reason"] == "the action failed: returned false"
    assert result.params()["before"] == "b"


async def test_a_precondition_that_cannot_be_checked_means_do_not_act() -> None:
    executor, ledger = Scripted(precondition_error=TimeoutError("timed out")), MemoryLedger()
    result = await execute(terminate(), executor, done=ledger, investigation_id="inv-1")

    assert result.outcome is Outcome.FAILED and executor.acts == 0 and ledger.seen(result.key) is None
    assert result.params()["reason"] == "could not check the precondition: TimeoutError: timed out"


async def test_killed_while_acting_the_claim_stays_and_a_restart_does_not_act_again(tmp_path: Path) -> None:
    # Given an agent process killed (cancelled) in the middle of acting
    path = tmp_path / "work" / "agentjobs-actions.jsonl"
    blocked = Scripted(act_blocks=asyncio.Event())
    task = asyncio.create_task(execute(terminate(), blocked, done=FileLedger(path), investigation_id="inv-1"))
    while blocked.acts == 0:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # When the restarted process (a new ledger over the same file) gets the same action
    executor = Scripted()
    result = await execute(terminate(), executor, done=FileLedger(path), investigation_id="inv-1")
    # Then it does not act: the earlier attempt's outcome is unknown, so it is not claimed as executed either
    assert result.outcome is Outcome.ALREADY_EXECUTED and executor.acts == 0 and executor.checks == 0
    assert not result.executed and "never recorded" in result.reason


# --- the idempotency key and the file ledger -----------------------------------------------------

def test_the_key_is_investigation_action_target_and_identifying_params() -> None:
    key = idempotency_key("inv-1", terminate(), volatile=frozenset({"observed_at"}))

    assert key == idempotency_key("inv-1", terminate(observed_at="2026-11-26T02:06:00+00:00"),
                                  volatile=frozenset({"observed_at"}))  # a re-observation: the same action
    assert key != idempotency_key("inv-2", terminate(), volatile=frozenset({"observed_at"}))
    assert key != idempotency_key("inv-1", terminate(4243), volatile=frozenset({"observed_at"}))
    assert key != idempotency_key("inv-1", terminate(application_name="other"), volatile=frozenset({"observed_at"}))
    assert key != idempotency_key("inv-1", terminate(observed_at="x"))  # volatile only when the executor says so


async def test_a_restarted_process_reads_the_file_ledger_back_and_does_not_act_twice(tmp_path: Path) -> None:
    path = tmp_path / "agentjobs-actions.jsonl"
    first = await execute(terminate(), Scripted(), done=FileLedger(path), investigation_id="inv-1")
    executor = Scripted()
    second = await execute(terminate(), executor, done=FileLedger(path), investigation_id="inv-1")

    assert first.outcome is Outcome.EXECUTED_VERIFIED
    assert second.outcome is Outcome.ALREADY_EXECUTED and second.executed and executor.acts == 0
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["event"], r["key"]) for r in lines] == [("claimed", first.key), ("settled", first.key)]
    assert lines[1]["outcome"] == "executed_verified"
    assert path.stat().st_mode & 0o777 == 0o600


def test_the_file_ledger_claims_once_and_survives_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    ledger = FileLedger(path)
    assert ledger.claim("k1") and not ledger.claim("k1") and not FileLedger(path).claim("k1")
    with path.open("ab") as f:
        f.write(b'{"key": "k2", "ev')  # a crash mid-write
    assert FileLedger(path).seen("k2") is None
    assert ledger.claim("k2")  # appended on a fresh line, not glued to the torn one
    assert {e for e in ("k1", "k2") if FileLedger(path).seen(e)} == {"k1", "k2"}


async def test_an_unwritable_ledger_means_do_not_act(tmp_path: Path) -> None:
    (tmp_path / "work").write_text("a file where the work dir should be")
    executor = Scripted()
    result = await execute(terminate(), executor, done=FileLedger(tmp_path / "work" / "ledger.jsonl"),
                           investigation_id="inv-1")

    assert result.outcome is Outcome.FAILED and executor.acts == 0
    assert "idempotency ledger" in result.reason and "not acting" in result.reason


def test_the_ledger_lives_in_the_jobs_work_dir() -> None:
    base = {"AGENTJOBS_INVESTIGATION_ID": "inv-1", "AGENTJOBS_PHASE": "autonomous", "AGENTJOBS_INPUT_DIR": "/in",
            "AGENTJOBS_AMQP__URL": "amqp://127.0.0.1/", "AGENTJOBS_VAULT__AUTH_MODE": "none"}

    assert config.load(base).action_ledger_file is None
    assert config.load({**base, "TMPDIR": "/tmp"}).action_ledger_file == Path("/tmp/agentjobs-actions.jsonl")
    rooted = config.load({**base, "TMPDIR": "/tmp", "AGENTJOBS_MOUNT_ROOT": "/srv/job"})
    assert rooted.action_ledger_file == Path("/srv/job/tmp/agentjobs-actions.jsonl")  # the scratch emptyDir
    assert config.load({**base, "TMPDIR": "/tmp", "AGENTJOBS_WORK_DIR": "/w"}).work_dir == Path("/w")


# --- through the gate ------------------------------------------------------------------------

def test_the_scripted_executor_follows_the_protocol() -> None:
    assert follows_protocol(Scripted())


async def test_the_gate_runs_a_protocol_executor_only_where_the_phase_allows_it() -> None:
    executor = Scripted()
    [ro] = await gate([terminate()], Phase.READ_ONLY, executors={"terminate_backend": executor},
                      investigation_id="inv-1")
    [lr] = await gate([terminate()], Phase.LIMITED_REMEDIATION, executors={"terminate_backend": executor},
                      investigation_id="inv-1")
    [sh] = await gate([terminate()], Phase.SHADOW, executors={"terminate_backend": executor},
                      investigation_id="inv-1")
    assert executor.checks == 0  # the phase gate is the first layer: nothing was even re-checked
    assert (ro.params["decision"], lr.params["decision"], sh.params["decision"]) == (
        "propose_only", "propose_only", "record_only")
    assert lr.params["reason"] == ("phase limited-remediation runs low, read automatically, "
                                   "not medium-risk actions: proposed only")
    assert not any(a.executed for a in (ro, lr, sh)) and not any("outcome" in a.params for a in (ro, lr, sh))

    [auto] = await gate([terminate()], Phase.AUTONOMOUS, executors={"terminate_backend": executor},
                        investigation_id="inv-1")
    assert auto.executed and executor.acts == 1
    assert (auto.params["decision"], auto.params["outcome"]) == ("execute", "executed_verified")
    assert auto.params["undo"].startswith("none (") and auto.params["pid"] == "4242"


async def test_the_gate_keeps_its_ledger_across_calls_and_records_stale_skips() -> None:
    ledger, executor = MemoryLedger(), Scripted()
    [a] = await gate([terminate()], Phase.AUTONOMOUS, executors={"terminate_backend": executor},
                     investigation_id="inv-1", ledger=ledger)
    [b] = await gate([terminate()], Phase.AUTONOMOUS, executors={"terminate_backend": executor},
                     investigation_id="inv-1", ledger=ledger)
    [c] = await gate([terminate(4243)], Phase.AUTONOMOUS,
                     executors={"terminate_backend": Scripted(stale="pid 4243 no longer blocks any session")},
                     investigation_id="inv-1", ledger=ledger)

    assert (a.params["outcome"], b.params["outcome"], c.params["outcome"]) == (
        "executed_verified", "already_executed", "skipped_stale")
    assert executor.acts == 1 and a.executed and b.executed and not c.executed
    assert c.params["reason"] == "pid 4243 no longer blocks any session"


async def test_a_proposer_cannot_write_the_record() -> None:
    forged = terminate(outcome="executed_verified", undo="nothing to worry about", decision="execute")
    [a] = await gate([forged], Phase.READ_ONLY)

    assert a.params["decision"] == "propose_only" and "outcome" not in a.params and "undo" not in a.params


class Unchecked:
    async def execute(self, action: ProposedAction) -> Execution:
        return Execution(ok=True, before="replicas=2", after="replicas=4", undo="kubectl scale --replicas=2")


async def test_an_executor_without_the_protocol_runs_once_unverified() -> None:
    ledger = MemoryLedger()
    scale = ProposedAction(action="scale_deployment", target="deployment/x in namespace y", risk=RiskClass.MEDIUM,
                           params={"replicas": "4"})
    [a] = await gate([scale], Phase.AUTONOMOUS, executors={"scale_deployment": Unchecked()}, ledger=ledger)
    [b] = await gate([scale], Phase.AUTONOMOUS, executors={"scale_deployment": Unchecked()}, ledger=ledger)

    assert a.executed and a.params["outcome"] == "executed_not_verified"
    assert a.params["reason"] == "executed; this executor neither re-checks nor verifies"
    assert a.params["undo"] == "kubectl scale --replicas=2" and a.params["before"] == "replicas=2"
    assert b.params["outcome"] == "already_executed"


# --- the PostgreSQL executors' pure parts -------------------------------------------------------

NOW = datetime(2026, 11, 26, 2, 10, tzinfo=timezone.utc)


def backend(**kw: object) -> Backend:
    fields: dict[str, object] = dict(pid=4242, backend_type="client backend", usename="orders",
                                     application_name="orders-batch", backend_start=NOW - timedelta(seconds=600),
                                     backend_age_s=600.0, xact_age_s=400.0, ours=False,
                                     state="idle in transaction", waiters=(11, 12, 13))
    fields.update(kw)
    return Backend(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(("seen", "params", "elapsed", "why"), [
    (backend(), {}, 5.0, None),
    (backend(), {"usename": "orders", "xact_age_s": "390.0", "observed_at": "x"}, 10.0, None),
    (None, {}, 5.0, "pid 4242 no longer exists"),
    (backend(waiters=()), {}, 5.0, "pid 4242 no longer blocks any session"),
    (backend(application_name="billing"), {}, 5.0, "now belongs to application 'billing'"),
    (backend(usename="postgres"), {"usename": "orders"}, 5.0, "now belongs to user 'postgres'"),
    (backend(backend_age_s=3.0), {}, 5.0, "after the finding observed it"),  # a reused pid
    (backend(), {"backend_start": (NOW - timedelta(seconds=30)).isoformat()}, 5.0, "the pid was reused"),
    (backend(xact_age_s=2.0), {"xact_age_s": "390.0", "observed_at": "x"}, 10.0, "that transaction ended"),
    (backend(xact_age_s=None), {"xact_age_s": "390.0", "observed_at": "x"}, 10.0, "no open transaction"),
    (backend(backend_type="autovacuum worker"), {}, 5.0, "not a client session"),
    (backend(ours=True), {}, 5.0, "the executor's own session"),
    (backend(application_name="agentjobs-agent inv-1"), {"application_name": "agentjobs-agent inv-1"}, 5.0,
     "an agentjobs agent session"),
    (backend(usename=None), {}, 5.0, "needs pg_read_all_stats"),
])
def test_a_blocker_is_stale_unless_it_is_still_the_session_the_finding_named(
        seen: Backend | None, params: dict[str, str], elapsed: float, why: str | None) -> None:
    action = terminate(**params)
    got = stale_backend(action, seen, pid=4242, elapsed_s=elapsed)

    assert (got is None) if why is None else (got is not None and why in got), got


def test_the_exact_backend_start_matches() -> None:
    start = NOW - timedelta(seconds=600)
    assert stale_backend(terminate(backend_start=start.isoformat()), backend(), pid=4242, elapsed_s=1.0) is None
    assert "not a timestamp" in stale_backend(terminate(backend_start="yesterday"), backend(), pid=4242,
                                              elapsed_s=1.0)


@pytest.mark.parametrize(("params", "expected"), [
    ({"application_name": "checkout-api", "min_idle_s": "120"}, ("application_name", "checkout-api", 120.0)),
    ({"client_addr": "10.0.3.7"}, ("client_addr", "10.0.3.7", 60.0)),
    ({}, "exactly one of"),
    ({"application_name": "a", "client_addr": "10.0.0.1"}, "exactly one of"),
    ({"application_name": "a", "min_idle_s": "soon"}, "not a number"),
    ({"application_name": "agentjobs-agent x"}, "cannot be targeted"),
    ({"application_name": "(none)"}, "cannot be targeted"),
])
def test_terminate_idle_backends_names_exactly_one_set_of_sessions(params: dict[str, str],
                                                                   expected: object) -> None:
    action = ProposedAction(action="terminate_idle_backends", target="t", risk=RiskClass.MEDIUM, params=params)
    got = TerminateIdleBackends.selector(action)
    assert got == expected if isinstance(expected, tuple) else (isinstance(got, str) and expected in got)


def test_who_a_blocker_blocks_directly_and_through_others() -> None:
    # 4242 holds the row; 11 waits on it; 12 and 13 queue behind 11's tuple lock; 14 waits on 13; 99 elsewhere
    waits = lock_waits([[11, [4242]], [12, [11]], [13, [11]], [14, [13]], [99, [7]], ["bad"]])

    assert blocked_by(4242, waits) == ((11,), (11, 12, 13, 14))
    assert blocked_by(13, waits) == ((14,), (14,))
    assert blocked_by(5, waits) == ((), ())
