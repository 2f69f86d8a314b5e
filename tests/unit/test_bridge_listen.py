"""Where the bridge may listen without credentials (pure): loopback only; empty credentials are none."""

from __future__ import annotations

import pytest

from dispatcher.bridge.webhook import has_credentials, is_loopback, listen_refusal
from dispatcher.plumbing.settings import BridgeSettings, load_settings

NONE = BridgeSettings()
TOKEN = BridgeSettings(bearer_token="s3cret")


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "127.255.255.254", "::1", "[::1]", "localhost",
                                  "LOCALHOST", "localhost.", "::ffff:127.0.0.1", " 127.0.0.1 "])
def test_loopback_without_credentials_is_allowed(host: str) -> None:
    assert is_loopback(host)
    assert listen_refusal(host, 9095, NONE) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "", "::", "[::]", "10.0.0.5", "192.168.1.10", "::ffff:10.0.0.1",
                                  "fe80::1", "bridge.example", "localhost.example", "128.0.0.1", "0.0.0.0 "])
def test_any_other_address_without_credentials_is_refused(host: str) -> None:
    assert not is_loopback(host)
    refusal = listen_refusal(host, 9095, NONE)
    assert refusal is not None
    assert "\n" not in refusal  # one line
    assert "bridge.bearer_token" in refusal and "AGENTJOBS_BRIDGE__BEARER_TOKEN" in refusal
    assert "127.0.0.1" in refusal  # the other way out


def test_the_refusal_names_address_and_port() -> None:
    assert listen_refusal("0.0.0.0", 9095, NONE) == (
        "refusing to listen on 0.0.0.0:9095 without bridge.bearer_token "
        "(set AGENTJOBS_BRIDGE__BEARER_TOKEN, or bind 127.0.0.1)")
    assert (listen_refusal("::", 80, NONE) or "").startswith("refusing to listen on [::]:80 ")
    assert (listen_refusal("", 80, NONE) or "").startswith("refusing to listen on *:80 ")


@pytest.mark.parametrize("bridge", [TOKEN, BridgeSettings(basic_username="am", basic_password="pw"),
                                    BridgeSettings(bearer_token="t", basic_username="am", basic_password="pw")])
def test_credentials_allow_any_address(bridge: BridgeSettings) -> None:
    assert has_credentials(bridge)
    assert listen_refusal("0.0.0.0", 9095, bridge) is None
    assert listen_refusal("::", 9095, bridge) is None


@pytest.mark.parametrize("bridge", [
    NONE,
    BridgeSettings(bearer_token=""),
    BridgeSettings(bearer_token="   "),  # blank is no token
    BridgeSettings(basic_username="am"),  # a user without a password is no credential
    BridgeSettings(basic_password="pw"),
])
def test_empty_credentials_are_no_credentials(bridge: BridgeSettings) -> None:
    assert not has_credentials(bridge)
    assert listen_refusal("0.0.0.0", 9095, bridge) is not None


def test_an_empty_token_from_the_environment_is_no_credentials() -> None:
    # AGENTJOBS_BRIDGE__BEARER_TOKEN= (set, but empty) must never mean "auth off" on 0.0.0.0
    settings = load_settings(None, {"AGENTJOBS_BRIDGE__BEARER_TOKEN": "", "AGENTJOBS_BRIDGE__HOST": "0.0.0.0"})
    assert listen_refusal(settings.bridge.host, settings.bridge.port, settings.bridge) is not None


def test_the_defaults_listen_on_loopback_and_are_allowed() -> None:
    # what `agentjobs up` and a bare `agentjobs bridge` use
    assert is_loopback(NONE.host)
    assert listen_refusal(NONE.host, NONE.port, NONE) is None


def test_slow_client_limits_have_sensible_defaults_and_come_from_the_environment() -> None:
    assert (NONE.header_timeout, NONE.body_timeout, NONE.max_connections) == (10.0, 30.0, 256)
    settings = load_settings(None, {"AGENTJOBS_BRIDGE__HEADER_TIMEOUT": "1.5", "AGENTJOBS_BRIDGE__BODY_TIMEOUT": "2",
                                    "AGENTJOBS_BRIDGE__MAX_CONNECTIONS": "3"})
    assert (settings.bridge.header_timeout, settings.bridge.body_timeout, settings.bridge.max_connections) == (
        1.5, 2.0, 3)
