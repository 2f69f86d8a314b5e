"""How `agentjobs up` and the ops commands pick each component's broker identity (pure parts)."""

from __future__ import annotations

from pathlib import Path

from dispatcher.cli.up import component_identities, shared_identities
from dispatcher.plumbing.identities import credentials_path, same_broker, store_credentials, url_for_component
from dispatcher.plumbing.settings import IdentitySettings, load_settings

URL = "amqp://guest:guest@127.0.0.1:5672/agentjobs"


def test_reduced_mode_collapses_every_identity_onto_the_one_broker_user() -> None:
    ids = shared_identities(IdentitySettings(), "guest")
    assert (ids.bridge, ids.dispatcher, ids.trust, ids.operators, ids.admins) == (
        "guest", "guest", "guest", ["guest"], ["guest"])
    assert ids.agent_prefix == IdentitySettings().agent_prefix  # agents keep theirs


async def test_reduced_mode_runs_everything_as_amqp_url_and_forgets_stale_credentials(tmp_path: Path) -> None:
    store_credentials(tmp_path, {"operator": {"user": "u", "password": "p", "url": "amqp://u:p@127.0.0.1/agentjobs"}})
    settings, urls, note = await component_identities(load_settings(None, {"AGENTJOBS_AMQP__URL": URL}), tmp_path,
                                                      managed=False)
    assert set(urls.values()) == {URL}
    assert settings.identities.trust == "guest" and "reduced mode" in note
    assert not credentials_path(tmp_path).exists()


def test_ops_use_the_stored_identity_only_for_the_same_broker_and_vhost(tmp_path: Path) -> None:
    stored = "amqp://agentjobs-operator:pw@127.0.0.1:5672/agentjobs"
    store_credentials(tmp_path, {"operator": {"user": "agentjobs-operator", "password": "pw", "url": stored}})
    assert url_for_component(URL, tmp_path, "operator") == stored
    assert url_for_component(URL, tmp_path, "admin") == URL  # none stored: amqp.url's own user
    other_vhost = "amqp://guest:guest@127.0.0.1:5672/other"
    assert url_for_component(other_vhost, tmp_path, "operator") == other_vhost
    assert url_for_component(URL, tmp_path / "nothing-here", "operator") == URL


def test_same_broker_ignores_credentials_but_not_host_port_or_vhost() -> None:
    assert same_broker("amqp://a:b@h:5672/v", "amqp://c:d@h/v")
    assert not same_broker("amqp://a:b@h:5672/v", "amqp://a:b@h:5673/v")
    assert not same_broker("amqp://a:b@h/v", "amqp://a:b@h/w")
    assert same_broker("amqp://h/", "amqp://x:y@h")
