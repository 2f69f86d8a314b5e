"""Which tokens the dispatcher may revoke: only agent tokens it issued (``tokens.revocable``, pure).

The lookup answers below have the shape OpenBao 2 gives for ``auth/token/lookup-accessor``
(measured: a token minted through a phase's token role, and a kubernetes-auth login).
"""

from __future__ import annotations

import pytest

from dispatcher.credentials import tokens
from dispatcher.credentials.tokens import Expected, Kind, revocable
from schemas import Phase

SCOPE = "kubernetes/agentjobs-runs"
INV = "a" * 40
JOB = "aj-highcpu-31c262921e5a6d04"


def minted(**changes) -> dict:
    data = {
        "accessor": "6p9sqFk3b0buaItRgSPuUBxy", "creation_time": 1796345628, "display_name": f"token-{JOB}",
        "meta": {"incident_key": "k", "investigation_id": INV, "jobs_in": SCOPE, "phase": "shadow", "job_name": JOB},
        "orphan": False, "path": "auth/token/create/agentjobs-agent-shadow", "policies": ["agentjobs-agent-shadow"],
        "role": "agentjobs-agent-shadow", "type": "service",
    }
    meta = changes.pop("meta", None)
    data |= changes
    if meta is not None:
        data["meta"] = {**data["meta"], **meta}
    return data


def login(**changes) -> dict:
    data = {
        "accessor": "tBUevLxg9Fg9sSDnhKbef7S3", "creation_time": 1796345628,
        "display_name": "kubernetes-agentjobs-runs-agentjobs-agent-shadow",
        "meta": {"role": "agentjobs-agent-shadow", "service_account_name": "agentjobs-agent-shadow",
                 "service_account_namespace": "agentjobs-runs", "service_account_secret_name": "",
                 "service_account_uid": "20ac4851-8119-4c00-b111-8be341b66460"},
        "orphan": True, "path": "auth/kubernetes/login", "policies": ["agentjobs-agent-shadow"], "type": "service",
    }
    meta = changes.pop("meta", None)
    data |= changes
    if meta is not None:
        data["meta"] = {**data["meta"], **meta}
    return data


def test_a_token_we_minted_for_this_investigation_is_revocable():
    assert revocable(minted(), Expected(scope=SCOPE)) is None
    assert revocable(minted(), Expected(scope=SCOPE, investigation_id=INV, job_name=JOB, phase=Phase.SHADOW,
                                        kind=Kind.MINTED)) is None


def test_a_token_minted_before_tokens_carried_their_job_name_is_still_ours():
    old = minted()
    del old["meta"]["job_name"]
    assert revocable(old, Expected(scope=SCOPE, investigation_id=INV, job_name=JOB)) is None


@pytest.mark.parametrize(("data", "reason"), [
    ({"policies": ["root"], "path": "auth/token/root", "meta": None}, tokens.NOT_AN_AGENT_TOKEN),
    (minted(policies=["root"]), tokens.NOT_AN_AGENT_TOKEN),
    (minted(policies=["agentjobs-agent-shadow", "root"]), tokens.NOT_AN_AGENT_TOKEN),
    (minted(policies=["agentjobs-agent-shadow", "default"]), tokens.NOT_AN_AGENT_TOKEN),
    (minted(policies=[]), tokens.NOT_AN_AGENT_TOKEN),
    (minted(policies=None), tokens.NOT_AN_AGENT_TOKEN),
    (minted(policies=["agentjobs-dispatcher"]), tokens.NOT_AN_AGENT_TOKEN),
    (minted(policies=["agentjobs-agent-made-up"]), tokens.UNKNOWN_ORIGIN),  # the prefix alone is not enough
    # created by hand with our metadata and policy, not through our token role
    (minted(path="auth/token/create", role=""), tokens.UNKNOWN_ORIGIN),
    (minted(path="auth/token/create-orphan", role=""), tokens.UNKNOWN_ORIGIN),
    (minted(path="auth/token/create/someone-elses-role", role="someone-elses-role"), tokens.UNKNOWN_ORIGIN),
    (minted(path="auth/userpass/login/alice"), tokens.UNKNOWN_ORIGIN),
    # a role and a policy of different phases
    (minted(policies=["agentjobs-agent-autonomous"]), tokens.UNKNOWN_ORIGIN),
    (minted(meta={"phase": "autonomous"}), tokens.UNKNOWN_ORIGIN),
    (minted(meta={"jobs_in": "kubernetes/another-installation"}), tokens.OTHER_INSTALLATION),
    (minted(meta={"jobs_in": ""}), tokens.OTHER_INSTALLATION),
    (minted(meta={"investigation_id": "b" * 40}), tokens.OTHER_INVESTIGATION),
    (minted(meta={"job_name": "aj-other"}), tokens.OTHER_JOB),
    (minted(display_name="token-aj-other"), tokens.OTHER_JOB),
])
def test_anything_else_is_refused_with_its_reason(data, reason):
    assert revocable(data, Expected(scope=SCOPE, investigation_id=INV, job_name=JOB)) == reason


def test_the_phase_and_kind_asked_for_must_match():
    assert revocable(minted(), Expected(scope=SCOPE, phase=Phase.AUTONOMOUS)) == tokens.OTHER_PHASE
    assert revocable(minted(), Expected(scope=SCOPE, kind=Kind.LOGIN)) == tokens.WRONG_KIND
    assert revocable(login(), Expected(scope=SCOPE, kind=Kind.MINTED)) == tokens.WRONG_KIND


def test_a_kubernetes_login_of_our_service_account_in_our_namespace_is_revocable():
    assert revocable(login(), Expected(scope=SCOPE)) is None
    assert revocable(login(), Expected(scope=SCOPE, kind=Kind.LOGIN, phase=Phase.SHADOW,
                                       service_account="agentjobs-agent-shadow")) is None


@pytest.mark.parametrize(("data", "expected", "reason"), [
    (login(meta={"service_account_namespace": "elsewhere"}), Expected(scope=SCOPE), tokens.OTHER_INSTALLATION),
    (login(), Expected(scope="local/tmp/state"), tokens.OTHER_INSTALLATION),  # a local install has no logins
    (login(), Expected(scope=SCOPE, service_account="agentjobs-agent-read-only"), tokens.OTHER_SERVICE_ACCOUNT),
    (login(meta={"service_account_name": ""}), Expected(scope=SCOPE), tokens.OTHER_SERVICE_ACCOUNT),
    (login(meta={"role": "someone-elses-role"}), Expected(scope=SCOPE), tokens.UNKNOWN_ORIGIN),
    (login(meta={"role": "agentjobs-agent-autonomous"}), Expected(scope=SCOPE), tokens.UNKNOWN_ORIGIN),
    (login(path="auth/kubernetes-other/login"), Expected(scope=SCOPE), tokens.UNKNOWN_ORIGIN),
    (login(policies=["agentjobs-agent-shadow", "admin"]), Expected(scope=SCOPE), tokens.NOT_AN_AGENT_TOKEN),
    (login(), Expected(scope=SCOPE, phase=Phase.READ_ONLY), tokens.OTHER_PHASE),
])
def test_a_login_token_of_anyone_else_is_refused(data, expected, reason):
    assert revocable(data, expected) == reason


def test_garbage_lookup_answers_are_never_revocable():
    for data in ({}, {"policies": "agentjobs-agent-shadow"}, {"policies": [None]},
                 minted(meta=None) | {"meta": "x"}):
        assert revocable(data, Expected(scope=SCOPE)) is not None


# --------------------------------------------------------------------------- #
# who may report a login token (dispatcher/intake/control.py, pure)
# --------------------------------------------------------------------------- #

UUID = "05aacd2a-191c-3131-dacc-99395809fad6"


def test_the_login_user_of_a_service_account_is_exactly_the_shape_vault_issues():
    from dispatcher.intake.control import login_user_of
    from dispatcher.plumbing.settings import IdentitySettings

    ids = IdentitySettings()
    ok = {"namespace": "agentjobs-runs", "service_account": "agentjobs-agent-shadow"}
    # measured: Vault's RabbitMQ engine names it after the login token's display name
    assert login_user_of(ids, f"kubernetes-agentjobs-runs-agentjobs-agent-shadow-{UUID}", **ok)
    for user in (
        f"kubernetes-agentjobs-runs-agentjobs-agent-read-only-{UUID}",  # another phase's ServiceAccount
        f"kubernetes-elsewhere-agentjobs-agent-shadow-{UUID}",  # another namespace
        f"kubernetes-agentjobs-runs-agentjobs-agent-shadow-{UUID}-x",  # not exactly the shape
        f"kubernetes-agentjobs-runs-agentjobs-agent-shadow-{UUID.upper()}",
        "kubernetes-agentjobs-runs-agentjobs-agent-shadow-",
        f"token-aj-x-{UUID}", "agentjobs-dispatcher", "guest", "",
    ):
        assert not login_user_of(ids, user, **ok), user
    assert not login_user_of(ids, f"kubernetes--{UUID}", namespace="", service_account="")
