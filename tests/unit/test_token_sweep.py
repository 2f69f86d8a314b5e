"""Which agent tokens the sweeper revokes: only this installation's, old enough, held by no live Job."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from dispatcher.jobs import jobspec
from dispatcher.credentials.token_sweep import AgentToken, held_accessors, orphans

NOW = datetime(2026, 11, 27, 2, 0, tzinfo=UTC)
SCOPE = "kubernetes/agentjobs-runs"
GRACE = timedelta(seconds=300)


def token(accessor: str, *, age: float = 3600, scope: str = SCOPE, policies=("agentjobs-agent-shadow",)) -> AgentToken:
    return AgentToken(accessor=accessor, created_at=NOW - timedelta(seconds=age), policies=tuple(policies),
                      meta={"investigation_id": "i" * 40, "jobs_in": scope} if scope else {})


def sweep(tokens, *, held=(), launching=()) -> list[str]:
    return [t.accessor for t in orphans(tokens, scope=SCOPE, held=set(held), launching=set(launching), now=NOW,
                                        grace=GRACE)]


def test_a_token_no_job_holds_is_an_orphan():
    assert sweep([token("lost")]) == ["lost"]


def test_a_token_a_live_job_holds_is_kept():
    assert sweep([token("held")], held={"held"}) == []


def test_a_token_being_launched_by_this_process_is_kept():
    assert sweep([token("minted")], launching={"minted"}) == []


def test_a_token_younger_than_the_grace_is_kept_another_replica_may_be_creating_its_job():
    assert sweep([token("young", age=299), token("old", age=300)]) == ["old"]


def test_tokens_of_other_installations_and_other_tokens_are_never_touched():
    tokens = [
        token("other-install", scope="kubernetes/someone-else"),
        token("pre-sweeper", scope=""),  # minted before tokens carried their scope
        token("not-an-agent", policies=("default", "ops")),
        token("no-policies", policies=()),
    ]
    assert sweep(tokens) == []


def test_held_accessors_come_from_the_jobs_annotation():
    active = {"aj-a": {jobspec.ANN_TOKEN_ACCESSOR: "a1", "other": "x"}, "aj-b": {}, "aj-c": {jobspec.ANN_TOKEN_ACCESSOR: ""}}
    assert held_accessors(active) == {"a1"}


def test_a_lookup_answer_becomes_an_agent_token():
    data = {"creation_time": NOW.timestamp(), "policies": ["agentjobs-agent-read-only"],
            "meta": {"jobs_in": SCOPE, "investigation_id": "x"}, "id": ""}
    parsed = AgentToken.from_lookup("acc", data)
    assert parsed == AgentToken(accessor="acc", created_at=NOW, policies=("agentjobs-agent-read-only",),
                                meta={"jobs_in": SCOPE, "investigation_id": "x"})
    assert parsed.is_agent


def test_a_strange_lookup_answer_is_never_an_orphan():
    # a token Vault describes oddly (no meta, no policies) is not ours to revoke
    parsed = AgentToken.from_lookup("odd", {"creation_time": "yesterday", "policies": None, "meta": None})
    assert sweep([parsed]) == []


async def test_a_revocation_the_credentials_refuse_is_counted_and_never_tried_again():
    from dispatcher.credentials.token_sweep import TokenSweeper
    from dispatcher.credentials.tokens import Kind, Revocation

    data = {"creation_time": (NOW - timedelta(seconds=3600)).timestamp(), "policies": ["agentjobs-agent-shadow"],
            "meta": {"jobs_in": SCOPE, "investigation_id": "i" * 40}, "path": "auth/token/create"}

    class Credentials:  # what Vault would say of a token created by hand to look like ours
        def __init__(self) -> None:
            self.asked: list = []
            self.looked_up = 0

        async def list_accessors(self):
            return ["lookalike"]

        async def lookup_accessor(self, accessor):
            self.looked_up += 1
            return data

        async def revoke(self, accessor, *, expected=None):
            self.asked.append((accessor, expected))
            return Revocation.REFUSED

    class Runtime:
        async def active_annotations(self):
            return {}

    creds = Credentials()
    sweeper = TokenSweeper(credentials=creds, runtime=Runtime(), scope=SCOPE, grace=300, interval=60,
                           clock=lambda: NOW)
    report = await sweeper.sweep()
    assert (report.revoked, report.refused) == (0, 1)
    ((accessor, expected),) = creds.asked
    assert accessor == "lookalike" and expected.scope == SCOPE and expected.kind is Kind.MINTED
    assert expected.investigation_id == "i" * 40
    again = await sweeper.sweep()
    assert (again.looked_up, again.refused, creds.looked_up) == (0, 0, 1)  # not ours: left alone for good
