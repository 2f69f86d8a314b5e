"""Blast-radius limits outside the model: the agent's judge and the dispatcher's allowance (both pure)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import msgspec
import pytest

from agent import config
from agent.reasoning.actions import gate
from agent.remediation.limits import (
    LIMIT_TARGET,
    ActionLimits,
    counts,
    database_of,
    for_job,
    judge,
    limited,
)
from agent.remediation.protocol import Entry, Execution, MemoryLedger, Outcome, Result
from dispatcher.intake import actions_log
from dispatcher.intake.actions_log import ActionLog, Executed, allowance, exhausted, grant_for
from dispatcher.jobs import jobspec
from dispatcher.plumbing.settings import ActionsSettings, IdentitySettings, ScopeActions, load_settings
from schemas import ActionRecord, Finding, Phase, ProposedAction, RiskClass, encode, identify
from schemas.actions import records_for
from tests.unit.test_jobspec import SAMPLE

NOW = datetime(2026, 11, 26, 2, 0, tzinfo=timezone.utc)
OPEN = ActionLimits(allowance=1, namespaces=frozenset({"shop"}), databases=frozenset({"app"}), database="app",
                    namespace="shop")


def delete_pod(name: str = "checkout-7f9c", ns: str = "shop") -> ProposedAction:
    return ProposedAction(action="delete_pod", target=f"pod/{name} in namespace {ns}", risk=RiskClass.LOW)


def terminate(pid: int = 4242, app: str = "checkout-api") -> ProposedAction:
    return ProposedAction(action="terminate_backend", target=f"pid {pid} on 'pg-0:9187'", risk=RiskClass.MEDIUM,
                          params={"pid": str(pid), "application_name": app})


# --- the agent: judge ---------------------------------------------------------------------------

def test_within_every_limit_nothing_stops_the_action_and_the_target_is_resolved() -> None:
    assert judge(delete_pod(), OPEN) == judge(delete_pod(), OPEN)
    verdict = judge(delete_pod(), OPEN)
    assert verdict.refusal is None and verdict.target == "pod/checkout-7f9c in namespace shop"
    db = judge(terminate(), OPEN)
    assert db.refusal is None and db.target == "application_name 'checkout-api' on database app"


def test_an_allowance_of_zero_refuses_with_a_reason() -> None:
    verdict = judge(terminate(), ActionLimits(**{**OPEN.__dict__, "allowance": 0}))
    assert verdict.refusal.outcome is Outcome.REFUSED_LIMIT
    assert "hourly allowance is used up" in verdict.refusal.reason


def test_one_destructive_execution_per_investigation_unless_the_job_is_allowed_more() -> None:
    assert judge(delete_pod(), OPEN, spent=1).refusal.outcome is Outcome.REFUSED_LIMIT
    assert "at most 1 allowed" in judge(delete_pod(), OPEN, spent=1).refusal.reason
    two = ActionLimits(**{**OPEN.__dict__, "max_per_investigation": 2, "allowance": 2})
    assert judge(delete_pod(), two, spent=1).refusal is None
    assert judge(delete_pod(), two, spent=2).refusal.outcome is Outcome.REFUSED_LIMIT
    # the scope's allowance for this Job bounds it too
    scarce = ActionLimits(**{**OPEN.__dict__, "max_per_investigation": 3, "allowance": 1})
    assert "allowance for this Job is 1" in judge(delete_pod(), scarce, spent=1).refusal.reason


@pytest.mark.parametrize(("namespaces", "ns", "why"), [
    (None, "shop", "gave this Job no namespace allow-list"),
    (frozenset(), "shop", "allow-list is empty"),
    (frozenset({"shop"}), "kube-system", "namespace 'kube-system' is outside"),
])
def test_a_namespace_outside_the_allow_list_is_refused_target(namespaces, ns, why) -> None:
    limits = ActionLimits(**{**OPEN.__dict__, "namespaces": namespaces})
    verdict = judge(delete_pod(ns=ns), limits)
    assert verdict.refusal.outcome is Outcome.REFUSED_TARGET and why in verdict.refusal.reason


def test_a_target_naming_no_namespace_is_in_the_tools_namespace() -> None:
    action = ProposedAction(action="restart_deployment", target="deployment/checkout-api", risk=RiskClass.LOW)
    assert judge(action, OPEN).target == "deployment/checkout-api in namespace shop"
    assert judge(action, OPEN.at(namespace="default")).refusal.outcome is Outcome.REFUSED_TARGET


@pytest.mark.parametrize(("databases", "db", "why"), [
    (None, "app", "gave this Job no database allow-list"),
    (frozenset(), "app", "allow-list is empty"),
    (frozenset({"app"}), "billing", "database 'billing' is outside"),
    (frozenset({"app"}), "", "its DSN names none"),
])
def test_a_database_outside_the_allow_list_is_refused_target(databases, db, why) -> None:
    limits = ActionLimits(**{**OPEN.__dict__, "databases": databases, "database": db})
    verdict = judge(terminate(), limits)
    assert verdict.refusal.outcome is Outcome.REFUSED_TARGET and why in verdict.refusal.reason


def test_the_database_is_the_jobs_not_what_the_proposal_says() -> None:
    # the alert (untrusted) names pg-0:9187; the executor acts on the Job's DSN's database
    action = ProposedAction(action="terminate_backend", target="pid 1 on database app", risk=RiskClass.MEDIUM,
                            params={"pid": "1"})
    assert judge(action, OPEN.at(database="billing")).refusal.outcome is Outcome.REFUSED_TARGET
    assert judge(action, OPEN).target == "database app"


def test_a_proposal_naming_another_database_than_the_jobs_is_refused_target() -> None:
    action = msgspec.structs.replace(terminate(), params={**terminate().params, "datname": "billing"})
    verdict = judge(action, OPEN)
    assert verdict.refusal.outcome is Outcome.REFUSED_TARGET and "names database 'billing'" in verdict.refusal.reason


def test_a_star_allows_any_namespace_or_database() -> None:
    anything = ActionLimits(allowance=1, namespaces=frozenset({"*"}), databases=frozenset({"*"}), database="x")
    assert judge(delete_pod(ns="anywhere"), anything).refusal is None
    assert judge(terminate(), anything).refusal is None


def test_an_exhausted_target_is_refused_limit() -> None:
    limits = ActionLimits(**{**OPEN.__dict__, "exhausted_targets": frozenset({"pod/checkout-7f9c in namespace shop"})})
    verdict = judge(delete_pod(), limits)
    assert verdict.refusal.outcome is Outcome.REFUSED_LIMIT and "per-target limit" in verdict.refusal.reason
    assert judge(delete_pod("other"), limits).refusal is None


def test_an_unparseable_target_is_refused_target() -> None:
    action = ProposedAction(action="delete_pod", target="every pod, please", risk=RiskClass.LOW)
    assert judge(action, OPEN).refusal.outcome is Outcome.REFUSED_TARGET


@pytest.mark.parametrize(("dsn", "db"), [
    ("postgresql://127.0.0.1:5432/app", "app"),
    ("postgresql://host/app%20db?sslmode=require", "app db"),
    ("postgresql://host/?dbname=app", "app"),
    ("host=pg port=5432 dbname=app", "app"),
    ("host=pg dbname = 'my app'", "my app"),
    ("postgresql://host", ""),
    ("", ""),
])
def test_database_of_a_dsn(dsn: str, db: str) -> None:
    assert database_of(dsn) == db


def test_what_counts_against_the_investigation() -> None:
    a = delete_pod()
    assert counts(a, Result(outcome=Outcome.EXECUTED_VERIFIED, key="k"))
    assert counts(a, Result(outcome=Outcome.FAILED, key="k", execution=Execution(ok=False, error="403")))
    assert not counts(a, Result(outcome=Outcome.FAILED, key="k"))  # failed before acting
    assert not counts(a, Result(outcome=Outcome.SKIPPED_STALE, key="k"))
    assert counts(a, Result(outcome=Outcome.ALREADY_EXECUTED, key="k", previous=Entry(key="k")))  # unknown
    assert not counts(a, Result(outcome=Outcome.ALREADY_EXECUTED, key="k",
                                previous=Entry(key="k", outcome=Outcome.SKIPPED_STALE)))


# --- the agent: the gate applies them and records them -----------------------------------------

class Acts:
    verify_timeout = 0.0
    volatile_params: frozenset[str] = frozenset()

    def __init__(self) -> None:
        self.acted: list[ProposedAction] = []

    async def precondition(self, action: ProposedAction) -> str | None:
        return None

    async def act(self, action: ProposedAction) -> Execution:
        self.acted.append(action)
        return Execution(ok=True, before="there")

    async def verify(self, action: ProposedAction, *, timeout: float) -> bool:
        return True

    def undo(self, action: ProposedAction, done: Execution) -> str:
        return "none (test)"


async def test_the_second_destructive_proposal_of_an_investigation_is_refused_limit_and_recorded() -> None:
    executor = Acts()
    first, second = delete_pod("a"), delete_pod("b")
    gated = await gate([first, second], Phase.AUTONOMOUS, executors={"delete_pod": executor}, investigation_id="i",
                       limits=OPEN)
    assert [a.target for a in executor.acted] == [first.target]
    assert [(a.executed, a.params["outcome"]) for a in gated] == [(True, "executed_verified"),
                                                                 (False, "refused_limit")]
    assert gated[1].params["decision"] == "execute" and "at most 1 allowed" in gated[1].params["reason"]
    assert gated[0].params[LIMIT_TARGET] == "pod/a in namespace shop"
    finding = Finding(investigation_id="i", incident_key="k", idempotency_key="i:finding", summary="s",
                      probable_cause="c", confidence=0.5, phase=Phase.AUTONOMOUS, domain="kubernetes",
                      reasoner="rules", proposed_actions=gated, produced_at=NOW)
    records = records_for(finding)
    assert [r.outcome for r in records] == ["executed_verified", "refused_limit"]
    assert records[0].params[LIMIT_TARGET] == "pod/a in namespace shop"  # what the dispatcher counts per target


async def test_installed_limits_apply_and_a_gate_without_any_applies_none() -> None:
    executor = Acts()
    with limited(OPEN.at(namespace="default")):
        [a] = await gate([delete_pod(ns="kube-system")], Phase.AUTONOMOUS, executors={"delete_pod": executor})
    assert (a.executed, a.params["outcome"]) == (False, "refused_target") and executor.acted == []
    [b] = await gate([delete_pod(ns="kube-system")], Phase.AUTONOMOUS, executors={"delete_pod": executor})
    assert b.executed and LIMIT_TARGET not in b.params


async def test_a_proposer_cannot_write_the_limit_target() -> None:
    forged = msgspec.structs.replace(delete_pod(), params={LIMIT_TARGET: "nothing"})
    [a] = await gate([forged], Phase.READ_ONLY, limits=OPEN)
    assert LIMIT_TARGET not in a.params


async def test_a_retried_job_reports_already_executed_and_still_cannot_act_twice() -> None:
    ledger, executor = MemoryLedger(), Acts()
    await gate([delete_pod("a")], Phase.AUTONOMOUS, executors={"delete_pod": executor}, investigation_id="i",
               ledger=ledger, limits=OPEN)
    again = await gate([delete_pod("a"), delete_pod("b")], Phase.AUTONOMOUS, executors={"delete_pod": executor},
                       investigation_id="i", ledger=ledger, limits=OPEN)
    assert [a.params["outcome"] for a in again] == ["already_executed", "refused_limit"]
    assert len(executor.acted) == 1


# --- the agent: what the Job's environment says ------------------------------------------------

BASE = {"AGENTJOBS_INVESTIGATION_ID": "i", "AGENTJOBS_PHASE": "autonomous", "AGENTJOBS_INPUT_DIR": "/in",
        "AGENTJOBS_AMQP__URL": "amqp://127.0.0.1/", "AGENTJOBS_VAULT__AUTH_MODE": "none"}


def test_what_the_dispatcher_did_not_give_allows_nothing() -> None:
    limits = config.load(BASE).actions
    assert (limits.allowance, limits.max_per_investigation, limits.namespaces, limits.databases) == (0, 1, None, None)
    assert judge(delete_pod(), limits.at(namespace="shop")).refusal.outcome is Outcome.REFUSED_TARGET


def test_the_jobs_limits_are_read_from_its_environment() -> None:
    env = config.load({**BASE, "AGENTJOBS_ACTIONS__ALLOWANCE": "2", "AGENTJOBS_ACTIONS__MAX_PER_INVESTIGATION": "3",
                       "AGENTJOBS_ACTIONS__NAMESPACES": '["shop"]', "AGENTJOBS_ACTIONS__DATABASES": "[]",
                       "AGENTJOBS_ACTIONS__EXHAUSTED_TARGETS": '["database app"]',
                       "AGENTJOBS_POSTGRES__DSN": "postgresql://127.0.0.1/app"})
    assert env.actions == ActionLimits(allowance=2, max_per_investigation=3, namespaces=frozenset({"shop"}),
                                       databases=frozenset(), exhausted_targets=frozenset({"database app"}))
    assert for_job(env.actions, postgres_dsn=env.postgres_dsn).database == "app"


@pytest.mark.parametrize(("name", "value"), [("AGENTJOBS_ACTIONS__ALLOWANCE", "-1"),
                                             ("AGENTJOBS_ACTIONS__ALLOWANCE", "lots"),
                                             ("AGENTJOBS_ACTIONS__NAMESPACES", "shop"),
                                             ("AGENTJOBS_ACTIONS__DATABASES", '{"app": 1}'),
                                             ("AGENTJOBS_ACTIONS__EXHAUSTED_TARGETS", "[1]")])
def test_a_malformed_limit_is_a_configuration_error(name: str, value: str) -> None:
    with pytest.raises(config.ConfigError, match=name):
        config.load({**BASE, name: value})


def test_what_the_jobspec_passes_is_what_the_agent_reads() -> None:
    s = load_settings(None, {})
    grant = jobspec.ActionGrant(allowance=1, max_per_investigation=1, namespaces=("shop",), databases=("app",),
                                exhausted_targets=("pod/x in namespace shop",))
    plan = jobspec.JobPlan(identity=identify(SAMPLE), event=SAMPLE, class_name="default", phase=Phase.AUTONOMOUS,
                           actions=grant)
    env = {e["name"]: e["value"] for e in jobspec.build_job(plan, s)["spec"]["template"]["spec"]["containers"][0]["env"]
           if "value" in e}
    assert config._actions(env) == ActionLimits(allowance=1, namespaces=frozenset({"shop"}),
                                                databases=frozenset({"app"}),
                                                exhausted_targets=frozenset({"pod/x in namespace shop"}))
    # a plan nobody computed limits for grants nothing
    bare = msgspec.structs.replace(plan, actions=jobspec.ActionGrant())
    env = {e["name"]: e["value"] for e in jobspec.build_job(bare, s)["spec"]["template"]["spec"]["containers"][0]["env"]
           if "value" in e}
    assert config._actions(env) == ActionLimits(allowance=0, max_per_investigation=0, namespaces=frozenset(),
                                                databases=frozenset())


# --- the dispatcher: allowance ------------------------------------------------------------------

ACTIONS = ActionsSettings(scopes={"default": ScopeActions(), "database": ScopeActions(databases=["app"])})


def executed(n: int, scope: str = "database", ago: timedelta = timedelta(minutes=5), target: str = "") -> list[Executed]:
    return [Executed(scope=scope, at=NOW - ago, target=target or f"t{i}") for i in range(n)]


@pytest.mark.parametrize(("done", "reserved", "expected"), [(0, 0, 1), (2, 0, 1), (3, 0, 0), (2, 1, 0), (5, 0, 0)])
def test_the_allowance_is_what_is_left_of_the_scopes_hourly_cap(done: int, reserved: int, expected: int) -> None:
    assert allowance(ACTIONS, scope="database", phase=Phase.AUTONOMOUS, executed=executed(done), reserved=reserved,
                     now=NOW) == expected


def test_only_the_last_hour_and_the_same_scope_count() -> None:
    old = executed(3, ago=timedelta(minutes=61))
    other = executed(3, scope="kubernetes")
    assert allowance(ACTIONS, scope="database", phase=Phase.AUTONOMOUS, executed=old + other, now=NOW) == 1


def test_max_per_investigation_bounds_the_allowance() -> None:
    more = ActionsSettings(max_per_investigation=2, max_per_scope_per_hour=10)
    assert allowance(more, scope="s", phase=Phase.LIMITED_REMEDIATION, executed=executed(7, scope="s"),
                     now=NOW) == 2
    assert allowance(more, scope="s", phase=Phase.LIMITED_REMEDIATION, executed=executed(9, scope="s"),
                     now=NOW) == 1


@pytest.mark.parametrize("phase", [Phase.SHADOW, Phase.READ_ONLY])
def test_phases_that_run_nothing_get_nothing(phase: Phase) -> None:
    assert allowance(ACTIONS, scope="database", phase=phase, executed=[], now=NOW) == 0
    g = grant_for(ACTIONS, scope="database", phase=phase, executed=[], now=NOW)
    assert (g.allowance, g.namespaces, g.databases, g.exhausted_targets) == (0, (), (), ())


def test_the_grant_carries_the_scopes_allow_lists_or_the_default_ones() -> None:
    g = grant_for(ACTIONS, scope="database", phase=Phase.AUTONOMOUS, executed=[], now=NOW)
    assert (g.allowance, g.max_per_investigation, g.databases, g.namespaces) == (1, 1, ("app",), ())
    assert grant_for(ACTIONS, scope="payments", phase=Phase.AUTONOMOUS, executed=[], now=NOW).databases == ()


def test_a_target_executed_on_within_the_hour_is_exhausted() -> None:
    done = executed(1, target="database app", scope="a") + executed(1, target="pod/x in namespace shop", scope="b",
                                                                    ago=timedelta(minutes=90))
    assert exhausted(ACTIONS, done, NOW) == ("database app",)
    assert exhausted(ActionsSettings(max_per_target_per_hour=2), done, NOW) == ()
    g = grant_for(ACTIONS, scope="database", phase=Phase.AUTONOMOUS, executed=done, now=NOW)
    assert g.exhausted_targets == ("database app",)


def test_settings_define_the_limits_with_a_default_scope() -> None:
    s = load_settings(None, {"AGENTJOBS_ACTIONS__SCOPES": '{"database": {"databases": ["app"]}}',
                             "AGENTJOBS_ACTIONS__MAX_PER_SCOPE_PER_HOUR": "5"})
    assert s.actions.max_per_scope_per_hour == 5 and s.actions.max_per_target_per_hour == 1
    assert s.actions.scope("database").databases == ["app"]
    assert s.actions.scope("elsewhere") == s.actions.scopes["default"] == ScopeActions()
    with pytest.raises(ValueError, match="default"):
        ActionsSettings(scopes={"database": ScopeActions()})


# --- the dispatcher: the action log and reservations --------------------------------------------

@dataclass
class Message:
    body: bytes
    user_id: str | None


def record(investigation_id: str = "inv-1", *, outcome: str = "executed_verified", domain: str = "database",
           at: datetime = NOW, target: str = "database app") -> ActionRecord:
    return ActionRecord(investigation_id=investigation_id, action="terminate_backend", target="pid 1",
                        risk=RiskClass.MEDIUM, decision="execute", outcome=outcome, executed=True,
                        params={"pid": "1", LIMIT_TARGET: target}, phase=Phase.AUTONOMOUS, domain=domain, at=at,
                        idempotency_key=f"{investigation_id}:terminate_backend:abc")


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


def log_of(clock: Clock | None = None, running: set[str] | None = None) -> ActionLog:
    return ActionLog(settings=ACTIONS, identities=IdentitySettings(), clock=clock or Clock(),
                     running=(lambda inv: inv in running) if running is not None else (lambda inv: True))


def test_records_from_agent_users_count_and_from_anyone_else_never() -> None:
    log = log_of()
    agent = "token-aj-inv-1-0f0e3b8c-1d2e-4c5b-9a8f-7e6d5c4b3a21"
    for sender in (None, "", "agentjobs-dispatcher", "agentjobs-operator", "guest", "token-"):
        log.on_log_entry(Message(encode(record(f"forged-{sender}")), sender))
    assert log.executed() == [] and log.refused == 6
    log.on_log_entry(Message(encode(record()), agent))
    log.on_log_entry(Message(encode(record()), agent))  # a duplicate (same record id)
    log.on_log_entry(Message(b"", agent))  # a marker
    assert [(e.scope, e.target) for e in log.executed()] == [("database", "database app")]
    log.on_log_entry(Message(encode(record("k8s", domain="kubernetes")), "kubernetes-agentjobs-agent-autonomous"))
    assert len(log.executed()) == 2


def test_records_older_than_an_hour_or_not_executions_are_not_counted() -> None:
    log = log_of()
    assert not log.apply(record(at=NOW - timedelta(minutes=61)))
    assert not log.apply(record(outcome="refused_limit"))
    assert not log.apply(record(outcome="already_executed"))
    assert log.apply(record())


def test_three_executions_within_the_hour_leave_nothing_and_an_hour_later_the_cap_is_back() -> None:
    clock = Clock()
    log = log_of(clock)
    for i in range(3):
        log.apply(record(f"inv-{i}", target=f"t{i}"))
    assert log.grant("next", scope="database", phase=Phase.AUTONOMOUS).allowance == 0
    clock.now = NOW + timedelta(minutes=61)
    assert log.grant("later", scope="database", phase=Phase.AUTONOMOUS).allowance == 1


def test_concurrent_jobs_of_a_scope_cannot_exceed_the_hourly_cap_together() -> None:
    clock, running = Clock(), set()
    log = log_of(clock, running)
    grants = []
    for i in range(5):
        grants.append(log.grant(f"j{i}", scope="database", phase=Phase.AUTONOMOUS).allowance)
        log.launched(f"j{i}", created=True)
        running.add(f"j{i}")
    assert grants == [1, 1, 1, 0, 0]
    # j0 reports its execution: it is counted as one, its reservation released; still nothing left
    log.apply(record("j0", target="a"))
    assert log.grant("j5", scope="database", phase=Phase.AUTONOMOUS).allowance == 0
    # j1 ends without acting: after the grace its reservation is released
    running.discard("j1")
    assert log.grant("j6", scope="database", phase=Phase.AUTONOMOUS).allowance == 0  # within the grace
    clock.now += actions_log.ENDED_GRACE
    assert log.grant("j7", scope="database", phase=Phase.AUTONOMOUS).allowance == 1
    # another scope is not affected, a shadow Job reserves nothing
    assert log.grant("k0", scope="kubernetes", phase=Phase.AUTONOMOUS).allowance == 1
    assert log.grant("s0", scope="database", phase=Phase.SHADOW).allowance == 0


def test_a_launch_that_did_not_create_the_job_holds_no_reservation() -> None:
    log = log_of()
    assert log.grant("a", scope="database", phase=Phase.AUTONOMOUS).allowance == 1
    log.launched("a", created=False)
    assert log.reserved("database") == 0
    # a launch still in progress holds its reservation
    log.grant("b", scope="database", phase=Phase.AUTONOMOUS)
    assert log.reserved("database") == 1


def test_a_records_scope_is_its_launch_scope_when_known() -> None:
    log = log_of()
    log.grant("inv-9", scope="payments", phase=Phase.AUTONOMOUS)
    log.apply(record("inv-9", domain="database"))
    assert [e.scope for e in log.executed()] == ["payments"]
