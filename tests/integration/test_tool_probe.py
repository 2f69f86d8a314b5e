"""The ``http`` probe tool against a real HTTP service, a closed port and URLs it must refuse.

The service (``tests.support.endpoints.FlakyService``) is a real aiohttp server
on a free loopback port; only its ``/svc/`` prefix is an allowed target, so
``/admin`` on the same port stands for what the agent must never reach.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from agent import config, engine
from agent.tools.base import Limits
from agent.tools.probe import BODY_EXCERPT_BYTES, ProbeTool
from tests.support.endpoints import SECRET_HEADER_VALUE, FlakyService
from tests.support.services import free_port
from tests.unit.test_agent_config import BASE

pytestmark = pytest.mark.integration


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def service() -> AsyncIterator[FlakyService]:
    async with FlakyService() as svc:
        yield svc


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def closed_port() -> int:
    return free_port()  # nothing listens there


@pytest_asyncio.fixture(loop_scope="session")
async def probe(service: FlakyService, closed_port: int) -> AsyncIterator[ProbeTool]:
    tool = ProbeTool([f"{service.base}/svc/", f"http://127.0.0.1:{closed_port}/",
                      "http://no-such-service.invalid:8080/"], limits=Limits(timeout=2.0))
    yield tool
    await tool.close()


async def test_a_healthy_endpoint_answers_its_status_latency_and_a_body_excerpt_but_no_headers(probe, service):
    obs = await probe.run("probe", {"url": service.url("ok")})

    assert obs.ok, obs.excerpt
    assert (obs.tool, obs.operation, obs.query) == ("http", "probe", f"GET {service.url('ok')}")
    assert obs.data["url"] == service.url("ok")
    assert (obs.data["status"], obs.data["reason"], obs.data["error_kind"]) == (200, "OK", "")
    assert obs.data["body_excerpt"] == "all good: 3 orders pending"
    assert obs.data["latency_s"] >= 0
    assert "200 OK" in obs.excerpt
    # Then neither the response's headers nor its cookie appear anywhere in the observation
    shown = repr(obs.data) + obs.excerpt
    assert SECRET_HEADER_VALUE not in shown and "leaked-by-headers" not in shown
    assert "cookie-secret-value" not in shown


async def test_a_failing_endpoint_is_observed_answering_503(probe, service):
    obs = await probe.run("probe", {"url": service.url("fail")})

    assert obs.ok
    assert (obs.data["status"], obs.data["error_kind"]) == (503, "")
    assert obs.data["body_excerpt"] == "upstream database unavailable"
    assert "503 Service Unavailable" in obs.excerpt


async def test_a_closed_port_is_an_observation_of_a_refused_connection(probe, closed_port):
    url = f"http://127.0.0.1:{closed_port}/health"

    obs = await probe.run("probe", {"url": url})

    # Then the tool worked: it observed that nothing listens there
    assert obs.ok
    assert obs.data["status"] is None and obs.data["error_kind"] == "refused"
    assert "refused" in obs.excerpt
    assert obs.evidence().ok


async def test_an_endpoint_that_never_answers_is_observed_timing_out_within_the_limit(service):
    tool = ProbeTool([f"{service.base}/svc/"], limits=Limits(timeout=0.5))
    try:
        obs = await tool.run("probe", {"url": service.url("hang")})
    finally:
        await tool.close()

    assert obs.ok
    assert (obs.data["status"], obs.data["error_kind"]) == (None, "timeout")
    assert service.hits.get("/svc/hang") == 1


async def test_a_host_name_that_does_not_resolve_is_a_dns_observation(probe):
    obs = await probe.run("probe", {"url": "http://no-such-service.invalid:8080/health"})

    assert obs.ok
    assert obs.data["error_kind"] == "dns", obs.excerpt


async def test_a_url_outside_the_allowed_targets_is_refused_and_never_requested(probe, service):
    before = service.hits.get("/admin", 0)

    outside = [f"{service.base}/admin",  # same host and port, another path
               f"{service.base}/svc/../admin",  # dot segments climbing out of the prefix
               f"{service.base}/svc/%2e%2e/admin",  # ... encoded
               f"http://127.0.0.1:{service.port}@169.254.169.254/svc/ok",  # userinfo trick
               f"http://127.0.0.1:{service.port}0/svc/ok",  # a port that merely starts like the allowed one
               "http://169.254.169.254/latest/meta-data/",
               "file:///etc/passwd"]
    for url in outside:
        obs = await probe.run("probe", {"url": url})
        assert not obs.ok, url
        assert obs.excerpt.startswith("not probed"), obs.excerpt
        assert obs.data is None

    assert "outside the allowed HTTP targets" in (await probe.run("probe", {"url": outside[0]})).excerpt
    assert service.hits.get("/admin", 0) == before


async def test_invalid_parameters_and_unknown_operations_are_failed_observations(probe):
    assert not (await probe.run("probe", {})).ok
    extra = await probe.run("probe", {"url": "http://127.0.0.1:1/", "method": "DELETE"})
    assert not extra.ok and "method" in extra.excerpt
    unknown = await probe.run("post", {"url": "http://127.0.0.1:1/"})
    assert not unknown.ok and "unknown operation" in unknown.excerpt


async def test_redirects_within_the_targets_are_followed_and_the_final_answer_reported(probe, service):
    obs = await probe.run("probe", {"url": service.url("redirect")})

    assert obs.ok
    assert obs.data["status"] == 200 and obs.data["url"] == service.url("ok")
    assert obs.data["requested_url"] == service.url("redirect")


async def test_a_redirect_out_of_the_targets_is_not_followed_and_its_location_not_echoed(probe, service):
    obs = await probe.run("probe", {"url": service.url("away")})

    assert obs.ok
    assert obs.data["status"] == 302
    assert "outside the allowed HTTP targets" in obs.data["note"]
    assert "internal-admin" not in repr(obs.data) + obs.excerpt


async def test_at_most_three_redirects_are_followed(probe, service):
    before = service.hits.get("/svc/loop", 0)

    obs = await probe.run("probe", {"url": service.url("loop")})

    assert obs.ok and obs.data["status"] == 302
    assert "more than 3 redirects" in obs.data["note"]
    assert service.hits["/svc/loop"] - before == 4  # the first request and three redirects


async def test_a_large_body_is_read_only_to_max_bytes_and_only_an_excerpt_is_kept(service):
    tool = ProbeTool([f"{service.base}/svc/"], limits=Limits(timeout=5.0, max_bytes=64 * 1024))
    try:
        obs = await tool.run("probe", {"url": service.url("big")})
    finally:
        await tool.close()

    assert obs.ok and obs.truncated
    assert obs.data["status"] == 200
    assert len(obs.data["body_excerpt"].encode()) == BODY_EXCERPT_BYTES


async def test_the_job_environment_opens_the_probe_on_exactly_its_targets(service):
    env = config.load(BASE | {"AGENTJOBS_TOOLS__HTTP_TARGETS": json.dumps([f"{service.base}/svc/"])})
    tools, unavailable = await engine.open_tools(env, db_user=None, db_password=None, postgres_available=False)
    try:
        (probe,) = [t for t in tools if t.name == "http"]
        assert unavailable == []
        assert (await probe.run("probe", {"url": service.url("ok")})).data["status"] == 200
        assert not (await probe.run("probe", {"url": f"{service.base}/admin"})).ok
    finally:
        await engine.close_tools(tools)


async def test_a_target_prefix_the_probe_cannot_honour_leaves_it_out_and_says_why():
    env = config.load(BASE | {"AGENTJOBS_TOOLS__HTTP_TARGETS": json.dumps(["http://svc:8080/a/../"])})
    tools, unavailable = await engine.open_tools(env, db_user=None, db_password=None, postgres_available=False)
    await engine.close_tools(tools)

    assert not [t for t in tools if t.name == "http"]
    assert [e.source for e in unavailable] == ["http"] and "dot segments" in unavailable[0].excerpt
