"""Component identities: least privilege decided purely, credentials stored privately."""

from __future__ import annotations

import re
import stat

from dispatcher.plumbing.identities import (
    NEVER, definitions, grants, load_credentials, store_credentials, url_as, vhost_of,
)
from dispatcher.plumbing.settings import IdentitySettings

IDS = IdentitySettings()


def _grant(component: str):
    return next(g for g in grants(IDS) if g.component == component)


def test_every_component_has_its_own_user() -> None:
    users = [g.user for g in grants(IDS)]
    assert len(users) == len(set(users)) == 6


def test_the_bridge_may_only_publish_incidents() -> None:
    bridge = _grant("bridge")
    assert re.fullmatch(bridge.write, "agentjobs.incidents")
    for other in ("agentjobs.phases", "agentjobs.feedback", "agentjobs.results", "amq.default"):
        assert not re.fullmatch(bridge.write, other)
    assert not re.fullmatch(bridge.configure, "agentjobs.incidents")
    assert not re.fullmatch(bridge.read, "agentjobs.results")


def test_nobody_but_trust_may_write_phase_changes_and_only_admins_pins() -> None:
    phase_writers = {g.component for g in grants(IDS)
                     if re.search(g.write, "agentjobs.phases")
                     and all(t.write != NEVER for t in g.topics if t.exchange == "agentjobs.phases")}
    assert phase_writers == {"trust"}
    pinners = {g.component for g in grants(IDS) for t in g.topics
               if t.exchange == "agentjobs.feedback" and t.write != NEVER and re.search(t.write, "pin.redteam")}
    assert pinners == {"admin"}


def test_the_ticketing_connector_reads_results_and_sends_only_verdicts() -> None:
    ticketing = _grant("ticketing")
    assert re.fullmatch(ticketing.read, "agentjobs.results") and re.fullmatch(ticketing.read, "agentjobs.tickets")
    assert re.fullmatch(ticketing.configure, "agentjobs.tickets")
    for other in ("agentjobs.incidents", "agentjobs.results", "agentjobs.phases", "agentjobs.control"):
        assert not re.fullmatch(ticketing.write, other)
        assert not re.fullmatch(ticketing.configure, other)
    topics = {t.exchange: t.write for t in ticketing.topics}
    assert re.search(topics["agentjobs.feedback"], "feedback.accepted.database")
    assert not re.search(topics["agentjobs.feedback"], "pin.database")
    assert topics["agentjobs.phases"] == NEVER


def test_never_matches_no_routing_key() -> None:
    assert all(re.search(NEVER, key) is None for key in ("", "phase.x", "#", "pin.redteam"))


def test_definitions_carry_users_without_passwords() -> None:
    defs = definitions(IDS, vhost="/")
    assert {u["name"] for u in defs["users"]} == {g.user for g in grants(IDS)}
    assert all(u["password_hash"] == "" for u in defs["users"])
    assert {p["user"] for p in defs["permissions"]} == {g.user for g in grants(IDS)}
    assert any(t["exchange"] == "agentjobs.phases" for t in defs["topic_permissions"])


def test_url_as_replaces_only_the_credentials() -> None:
    url = url_as("amqp://guest:guest@broker:5672/agent%2Fjobs", "agentjobs-bridge", "p@ss/word")
    assert url == "amqp://agentjobs-bridge:p%40ss%2Fword@broker:5672/agent%2Fjobs"
    assert vhost_of(url) == "agent/jobs"
    assert vhost_of("amqp://h:5672/") == vhost_of("amqp://h:5672") == "/"


def test_stored_credentials_are_private_and_round_trip(tmp_path) -> None:
    creds = {"operator": {"user": "agentjobs-operator", "password": "s3cret", "url": "amqp://x"}}
    path = store_credentials(tmp_path / "state", creds)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_credentials(tmp_path / "state") == creds
    assert load_credentials(tmp_path / "nowhere") == {}
