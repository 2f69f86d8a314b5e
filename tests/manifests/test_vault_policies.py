"""The phase policies in k8s/vault/ grant each phase the database role of its phase, and no other.

The role that may terminate backends (pg_signal_backend) is the second layer besides the action
gate: a shadow or read-only Job whose gate were bypassed still cannot get a user that acts. The
phases that act may create and read action claims (``agentjobs-kv/data/claims/*``) — the only glob
in any agent policy, and never update or delete; the others may not touch them.
"""

from __future__ import annotations

import re

import pytest

from dispatcher.credentials.bootstrap import POLICY_DIR, database_role
from dispatcher.plumbing.settings import load_settings
from schemas import Phase
from schemas import vault_paths as vault_layout

PATH_BLOCK = re.compile(r'^path\s+"([^"]+)"\s*\{(.*?)^\}', re.MULTILINE | re.DOTALL)
ACTING = (Phase.LIMITED_REMEDIATION, Phase.AUTONOMOUS)


def _paths(name: str) -> dict[str, str]:
    """path -> body of every `path` block of policy `name` (comments stripped)."""
    text = "\n".join(line.split("#", 1)[0] for line in (POLICY_DIR / f"{name}.hcl").read_text().splitlines())
    return {m.group(1): m.group(2) for m in PATH_BLOCK.finditer(text)}


def test_the_phase_picks_the_database_role() -> None:
    assert {p: vault_layout.database_role_for(p) for p in Phase} == {
        Phase.SHADOW: "agentjobs-diagnostics",
        Phase.READ_ONLY: "agentjobs-diagnostics",
        Phase.LIMITED_REMEDIATION: "agentjobs-remediation",
        Phase.AUTONOMOUS: "agentjobs-remediation",
    }
    assert vault_layout.database_role_for(None) == vault_layout.DATABASE_ROLE  # the least one
    assert vault_layout.database_creds_path(Phase.AUTONOMOUS) == "database/creds/agentjobs-remediation"
    assert vault_layout.database_creds_path() == "database/creds/agentjobs-diagnostics"
    assert set(vault_layout.DATABASE_ROLES) == {vault_layout.database_role_for(p) for p in Phase}


@pytest.mark.parametrize("phase", list(Phase), ids=lambda p: p.value)
def test_each_phase_policy_reads_its_own_database_role_only(phase: Phase) -> None:
    paths = _paths(vault_layout.policy(phase))
    database = {p for p in paths if p.startswith(f"{vault_layout.DATABASE_MOUNT}/")}
    own, targets = vault_layout.database_creds_path(phase), vault_layout.database_creds_policy_glob(phase)
    assert database == {own, targets}
    for path in (own, targets):
        assert re.search(r'capabilities\s*=\s*\["read"\]', paths[path])
    assert not any(("*" in p or "+" in p) and p not in (vault_layout.kv_claims_policy_path(), targets)
                   for p in paths)  # no other globs


def _granted(paths: dict[str, str], path: str) -> bool:
    """Whether one of the policy's paths reaches ``path`` (Vault's rules: exact, or a trailing ``*`` prefix)."""
    return any(p == path or (p.endswith("*") and path.startswith(p[:-1])) for p in paths)


@pytest.mark.parametrize("phase", list(Phase), ids=lambda p: p.value)
@pytest.mark.parametrize("target", ["ledger", "a", "orders-eu-1"])
def test_each_phase_reaches_its_kind_of_role_on_every_named_target_and_never_the_other_kind(
        phase: Phase, target: str) -> None:
    paths = _paths(vault_layout.policy(phase))
    own = vault_layout.database_creds_path(phase, target)
    assert own.endswith(f"-{target}") and _granted(paths, own)
    other_kinds = {f"{vault_layout.DATABASE_MOUNT}/creds/{role}"
                   for role in vault_layout.target_roles(target)} - {own}
    assert other_kinds and not any(_granted(paths, p) for p in other_kinds)
    assert not any(_granted(paths, f"{vault_layout.DATABASE_MOUNT}/{what}/{own.rsplit('/', 1)[1]}")
                   for what in ("roles", "config", "rotate-role", "static-creds"))


@pytest.mark.parametrize("name", ["", "Ledger", "-ledger", "ledger-", "led_ger", "l" * 41, "../x", "a*"])
def test_a_target_name_that_could_bend_a_role_or_path_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="not a target name"):
        vault_layout.check_target_name(name)


def test_the_dispatcher_policy_reads_no_database_credentials() -> None:
    assert not any(p.startswith(f"{vault_layout.DATABASE_MOUNT}/") for p in _paths(vault_layout.DISPATCHER_POLICY))


def test_only_the_remediation_role_may_signal_backends() -> None:
    settings = load_settings(None, {})
    diagnostics = database_role(settings, vault_layout.DATABASE_ROLE)
    remediation = database_role(settings, vault_layout.DATABASE_REMEDIATION_ROLE)
    assert not any("pg_signal_backend" in s for s in diagnostics["creation_statements"])
    # the remediation role: the diagnostics statements and exactly one more grant
    extra = [s for s in remediation["creation_statements"] if s not in diagnostics["creation_statements"]]
    assert extra == ['GRANT pg_signal_backend TO "{{name}}";']
    assert [s for s in remediation["creation_statements"] if s in diagnostics["creation_statements"]] == \
        diagnostics["creation_statements"]
    assert remediation["revocation_statements"] == diagnostics["revocation_statements"]
    assert remediation["revocation_statements"][-1] == 'DROP ROLE IF EXISTS "{{name}}";'
    with pytest.raises(ValueError):
        database_role(settings, "agentjobs-other")


@pytest.mark.parametrize("phase", list(Phase), ids=lambda p: p.value)
def test_every_phase_may_read_the_kill_switch_and_none_may_write_it(phase: Phase) -> None:
    paths = _paths(vault_layout.policy(phase))
    switch = vault_layout.kv_actions_path()
    assert switch == "agentjobs-kv/data/actions"
    assert re.fullmatch(r'\s*capabilities\s*=\s*\["read"\]\s*', paths[switch])
    # no other grant reaches it: no metadata/, delete/, destroy/ paths and no globs over the mount
    assert not any(p.startswith(f"{vault_layout.KV_MOUNT}/") and vault_layout.KV_ACTIONS in p and p != switch
                   for p in paths)
    assert not any(p.startswith(vault_layout.KV_MOUNT) and ("*" in p or "+" in p)
                   and p != vault_layout.kv_claims_policy_path() for p in paths)
    assert not _glob_matches(vault_layout.kv_claims_policy_path(), switch)


def _glob_matches(glob: str, path: str) -> bool:
    """Vault's ACL path match for a trailing ``*`` (prefix) or an exact path (no ``+`` here)."""
    assert "+" not in glob
    return path.startswith(glob[:-1]) if glob.endswith("*") else path == glob


@pytest.mark.parametrize("phase", list(Phase), ids=lambda p: p.value)
def test_only_the_acting_phases_may_create_action_claims_and_none_may_update_or_delete_them(phase: Phase) -> None:
    paths = _paths(vault_layout.policy(phase))
    glob = vault_layout.kv_claims_policy_path()
    assert glob == "agentjobs-kv/data/claims/*"
    claims = {p for p in paths if p.startswith(f"{vault_layout.KV_MOUNT}/") and vault_layout.KV_CLAIMS in p}
    if phase in ACTING:
        assert claims == {glob}
        assert re.fullmatch(r'\s*capabilities\s*=\s*\["create",\s*"read"\]\s*', paths[glob])
    else:
        assert claims == set()
    key = "inv-1:restart_deployment:0123abcd"
    for path in (vault_layout.kv_claim_path(key), vault_layout.kv_claim_outcome_path(key)):
        assert _glob_matches(glob, path)
    # the glob reaches nothing else in the mount: not the kill switch, the LLM key, the bootstrap HMAC
    for other in (vault_layout.kv_actions_path(), vault_layout.kv_llm_path(),
                  vault_layout.kv_rabbitmq_shared_path(), f"{vault_layout.KV_MOUNT}/data/bootstrap",
                  f"{vault_layout.KV_MOUNT}/metadata/claims/inv-1/x", f"{vault_layout.KV_MOUNT}/delete/claims/x"):
        assert not _glob_matches(glob, other)


def test_the_dispatcher_policy_does_not_reach_the_kill_switch() -> None:
    assert not any(p.startswith(f"{vault_layout.KV_MOUNT}/") for p in _paths(vault_layout.DISPATCHER_POLICY))
