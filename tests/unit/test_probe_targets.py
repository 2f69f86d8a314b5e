"""Which URLs the http probe may GET, and how the allowed targets travel from settings to the agent."""

from __future__ import annotations

import json

import pytest

from agent.config import ConfigError, load
from agent.tools.probe import Targets, TargetError, error_kind, excerpt_of, parse_target, shown
from dispatcher.jobs import jobspec
from dispatcher.plumbing.settings import load_settings
from schemas import Phase, decode_incident, identify
from tests.support.payloads import SAMPLE_WEBHOOK, dumps
from tests.unit.test_agent_config import BASE

TARGETS = Targets(["http://checkout.shop:8080/", "https://Payments.shop/api", "http://10.0.0.7:9000/health/"])


@pytest.mark.parametrize("url", [
    "http://checkout.shop:8080/",
    "http://checkout.shop:8080/orders?id=7",
    "http://CHECKOUT.shop:8080/x",
    "https://payments.shop/api",
    "https://payments.shop:443/api/v1/charge",
    "http://10.0.0.7:9000/health/live",
])
def test_urls_under_an_allowed_prefix_may_be_probed(url: str) -> None:
    assert TARGETS.allows(url)


@pytest.mark.parametrize("url", [
    "http://checkout.shop:8081/",  # another port
    "https://checkout.shop:8080/",  # another scheme
    "http://checkout.shop/",  # the default port is another port
    "http://checkout.shop.evil.example:8080/",  # a host that merely starts like the allowed one
    "http://checkout.shop:8080@evil.example/",  # userinfo: the real host is evil.example
    "http://user:pw@checkout.shop:8080/",  # credentials are never sent
    "https://payments.shop/apiary",  # not on a path-segment boundary
    "https://payments.shop/admin",
    "http://10.0.0.7:9000/health",  # the prefix's directory, not the prefix
    "http://10.0.0.7:9000/health/../admin",
    "http://10.0.0.7:9000/health/%2E%2E/admin",
    "http://10.0.0.7:9000/health/..%2fadmin",
    "http://10.0.0.7:9000/health/a\\..\\admin",
    "http://10.0.0.7:9000/health/ x",
    "gopher://checkout.shop:8080/",
    "file:///etc/passwd",
    "//checkout.shop:8080/",
    "",
])
def test_urls_outside_the_prefixes_or_with_tricks_are_refused(url: str) -> None:
    assert not TARGETS.allows(url)


def test_the_refusal_names_the_allowed_targets_but_not_the_credentials_of_the_url() -> None:
    with pytest.raises(TargetError) as refused:
        TARGETS.check("http://admin:hunter22@169.254.169.254/latest/")

    assert "hunter22" not in str(refused.value)
    with pytest.raises(TargetError) as outside:
        TARGETS.check("http://169.254.169.254/latest/")
    assert "http://checkout.shop:8080/" in str(outside.value)


def test_a_prefix_with_credentials_a_query_or_another_scheme_cannot_be_a_target() -> None:
    for prefix in ("http://u:p@svc:80/", "http://svc:80/?x=1", "ftp://svc/", "svc:8080"):
        with pytest.raises(TargetError):
            parse_target(prefix)


def test_shown_urls_never_carry_userinfo() -> None:
    assert shown("http://u:secret@svc:8080/x") == "http://svc:8080/x"


def test_connection_errors_are_classified_by_what_failed() -> None:
    import aiohttp
    from aiohttp.client_reqrep import ConnectionKey

    key = ConnectionKey("svc", 80, False, True, None, None, None)
    assert error_kind(aiohttp.ClientConnectorError(key, ConnectionRefusedError(111, "refused"))) == "refused"
    assert error_kind(aiohttp.ClientConnectorDNSError(key, OSError(-2, "Name does not resolve"))) == "dns"
    assert error_kind(TimeoutError()) == "timeout"
    assert error_kind(aiohttp.ServerDisconnectedError()) == "reset"
    assert error_kind(aiohttp.ClientResponseError(None, (), status=400, message="bad status line")) == "protocol"


def test_the_body_excerpt_is_one_line_of_at_most_512_bytes() -> None:
    text = excerpt_of(("é" * 400 + "\n\x00tail").encode())

    assert len(text.encode()) <= 512 and "\n" not in text and text.startswith("é")


def test_the_http_targets_travel_from_settings_through_the_job_to_the_agent() -> None:
    prefixes = ["http://checkout.shop:8080/", "https://payments.shop/api"]
    s = load_settings(None, {"AGENTJOBS_TOOLS__HTTP_TARGETS": json.dumps(prefixes)})
    event = decode_incident(dumps(SAMPLE_WEBHOOK))
    plan = jobspec.JobPlan(identity=identify(event), event=event, class_name=jobspec.choose_class(event, s),
                           phase=Phase.SHADOW, domain=jobspec.domain_of(event, s))
    containers = jobspec.build_job(plan, s)["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value", "") for e in containers[0]["env"]}

    assert load(BASE | {"AGENTJOBS_TOOLS__HTTP_TARGETS": env["AGENTJOBS_TOOLS__HTTP_TARGETS"]}).tools.http_targets \
        == tuple(prefixes)


def test_without_http_targets_the_job_is_told_none_and_the_agent_has_no_probe() -> None:
    s = load_settings(None, {})
    assert s.tools.http_targets == []
    assert load(BASE).tools.http_targets == ()


@pytest.mark.parametrize("raw", ['"http://svc/"', "[1]", "not json", '["svc:8080"]', '["http://u:p@svc/"]'])
def test_http_targets_that_are_not_a_list_of_url_prefixes_are_a_config_error(raw: str) -> None:
    with pytest.raises(ConfigError, match="AGENTJOBS_TOOLS__HTTP_TARGETS"):
        load(BASE | {"AGENTJOBS_TOOLS__HTTP_TARGETS": raw})
