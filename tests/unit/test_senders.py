"""Who may say what: the broker-validated sender of each kind of message (pure decisions)."""

from __future__ import annotations

import pytest

from dispatcher.intake import senders
from dispatcher.plumbing.settings import IdentitySettings

IDS = IdentitySettings()
JOB = "aj-postgreslockcontention-31c262921e5a6d04"
UUID = "807394ba-b386-6040-1e61-3bc13efb35f1"
AGENT = f"token-{JOB}-{UUID}"


@pytest.mark.parametrize(("check", "allowed", "refused"), [
    (senders.incident_sender, ["agentjobs-bridge", "agentjobs-operator", "agentjobs-admin"],
     ["guest", "agentjobs-trust", AGENT, ""]),
    (senders.feedback_sender, ["agentjobs-operator", "agentjobs-admin"], ["guest", "agentjobs-bridge", AGENT, ""]),
    (senders.pin_sender, ["agentjobs-admin"], ["agentjobs-operator", "guest", "agentjobs-bridge", AGENT, ""]),
    (senders.trust_sender, ["agentjobs-trust"], ["agentjobs-admin", "agentjobs-dispatcher", "guest", AGENT, ""]),
    (senders.control_sender, ["agentjobs-operator", "agentjobs-admin", "agentjobs-dispatcher"],
     ["guest", "agentjobs-bridge", AGENT, ""]),
])
def test_each_kind_has_its_senders_and_nobody_else(check, allowed, refused) -> None:
    for user in allowed:
        assert check(IDS, user) is None, user
    for user in refused:
        refusal = check(IDS, user)
        assert refusal is not None and refusal.reason == senders.FORBIDDEN, user


def test_a_refusal_names_the_sender_and_who_would_have_been_allowed() -> None:
    refusal = senders.pin_sender(IDS, "guest")

    assert "'guest' may not send phase pins" in refusal.detail and "agentjobs-admin" in refusal.detail
    assert "without user_id" in senders.pin_sender(IDS, "").detail


def test_an_agent_speaks_only_for_its_own_job() -> None:
    assert senders.agent_sender(IDS, AGENT, JOB, "findings") is None
    assert senders.agent_sender(IDS, AGENT, "aj-other-0000000000000000", "findings") is not None
    assert senders.agent_sender(IDS, "agentjobs-dispatcher", JOB, "findings") is not None
    assert senders.dispatcher_or_agent(IDS, "agentjobs-dispatcher", JOB, "findings") is None


def test_one_jobs_name_being_the_start_of_anothers_does_not_pass() -> None:
    # Job "aj-x-<h>" must not speak for Job "aj-x-<h>-y-<h2>" nor the other way round: exact shape only.
    longer = f"{JOB}-y-1111111111111111"

    assert not senders.is_agent_of(IDS, f"token-{longer}-{UUID}", JOB)
    assert not senders.is_agent_of(IDS, AGENT, longer)
    assert not senders.is_agent_of(IDS, f"token-{JOB}-{UUID}-extra", JOB)
    assert not senders.is_agent_of(IDS, AGENT, "")


def test_kubernetes_auth_agents_are_known_by_prefix_only_and_only_when_asked() -> None:
    login_user = f"kubernetes-agentjobs-runs-agentjobs-agent-shadow-{UUID}"

    assert senders.agent_sender(IDS, login_user, JOB, "credentials.issued", kubernetes_auth=True) is None
    assert senders.agent_sender(IDS, login_user, JOB, "credentials.issued") is not None
    assert senders.agent_sender(IDS, "kubernetes-", JOB, "x", kubernetes_auth=True) is not None


def test_costs_accept_any_agent_or_the_dispatcher() -> None:
    assert senders.any_agent_or_dispatcher(IDS, AGENT, "findings") is None
    assert senders.any_agent_or_dispatcher(IDS, "agentjobs-dispatcher", "findings") is None
    for user in ("guest", "agentjobs-operator", "token-", ""):
        assert senders.any_agent_or_dispatcher(IDS, user, "findings") is not None, user
