"""New alerts joining a group after its investigation ended: one follow-up, linked, and bounded.

Real RabbitMQ, the emulated Kubernetes API; pods succeed as soon as they start.
"""

from __future__ import annotations

import base64

import msgspec
import pytest

from dispatcher.intake.followups import follow_up_investigation_id
from dispatcher.jobs import jobspec
from schemas import IncidentEvent, decode_incident, identify
from tests.integration.dispatcher_harness import PodDriver, Results, lifecycle_ids, publish
from tests.integration.lifecycle_helpers import dispatcher, firing, outcomes
from tests.integration.test_dispatcher import _until, env  # noqa: F401 - the fixture
from tests.support.k8s.resources import JOBS, SECRETS

pytestmark = pytest.mark.integration
NOW = {"AGENTJOBS_ADMISSION__FOLLOW_UP_MIN_INTERVAL": "0"}


def _jobs(handle) -> list[dict]:
    return handle.cluster.store.list(JOBS, handle.namespace)


def _incident_of(handle, job_name: str) -> IncidentEvent:
    """The incident the Job was given: in its Secret, or (nothing secret to carry) in the Job itself."""
    secret = handle.cluster.store.get(SECRETS, handle.namespace, jobspec.secret_name(job_name))
    if secret is not None:
        body = base64.b64decode(secret["data"][jobspec.INCIDENT_FILE])
    else:
        job = handle.cluster.job(handle.namespace, job_name)
        body = job["spec"]["template"]["metadata"]["annotations"][jobspec.ANN_INPUT_INCIDENT].encode()
    return msgspec.json.decode(body, type=IncidentEvent)


async def test_a_new_alert_after_the_end_starts_exactly_one_linked_follow_up(env):  # noqa: F811
    handle, url = env
    first = identify(decode_incident(firing("Lock", "db-1"))).investigation_id
    follow_up = follow_up_investigation_id(first, 1)
    async with PodDriver(handle, decide=lambda pod: 0).running_(), Results(url) as results:
        async with dispatcher(handle, url, **NOW) as d:
            # Given the group's investigation ended
            await publish(url, [firing("Lock", "db-1")])
            await results.wait_for(lambda: lifecycle_ids(results, "succeeded") == [first])
            # When a new alert joins the group, in a notification delivered twice
            await publish(url, [firing("Lock", "db-1", "db-2")] * 2)
            await results.wait_for(lambda: lifecycle_ids(results, "succeeded") == [first, follow_up])
            await _until(lambda: sum(outcomes(d).values()) == 3)
            handled = outcomes(d)
        # and once more to a restarted dispatcher, which knows nothing but the Jobs
        async with dispatcher(handle, url, **NOW) as again:
            await publish(url, [firing("Lock", "db-1", "db-2")])
            await _until(lambda: outcomes(again).get("duplicate") == 1)
    # Then exactly one follow-up Job, announced as following the first investigation
    assert handled == {"dispatched": 1, "follow_up_dispatched": 1, "duplicate": 1}
    assert len(_jobs(handle)) == 2
    dispatched = {m[2].investigation_id: m[2] for m in results.keys("lifecycle.dispatched")}
    assert set(dispatched) == {first, follow_up}
    assert dispatched[follow_up].follows == first and dispatched[first].follows == ""
    assert dispatched[follow_up].incident_key == dispatched[first].incident_key  # the same ticket's group
    # and its Job's incident says so too
    assert _incident_of(handle, dispatched[follow_up].job_name).follows == first
    assert results.keys("lifecycle.attached") == []


async def test_a_flapping_group_gets_at_most_the_configured_follow_ups_and_is_told_why(env):  # noqa: F811
    handle, url = env
    first = identify(decode_incident(firing("Flappy", "a"))).investigation_id
    follow_up = follow_up_investigation_id(first, 1)
    async with PodDriver(handle, decide=lambda pod: 0).running_(), Results(url) as results, \
            dispatcher(handle, url, AGENTJOBS_ADMISSION__MAX_FOLLOW_UPS="1", **NOW) as d:
        await publish(url, [firing("Flappy", "a")])
        await results.wait_for(lambda: lifecycle_ids(results, "succeeded") == [first])
        await publish(url, [firing("Flappy", "a", "b")])
        await results.wait_for(lambda: lifecycle_ids(results, "succeeded") == [first, follow_up])
        # When yet another alert joins, again and again
        await publish(url, [firing("Flappy", "a", "b", "c")] * 3)
        await _until(lambda: sum(outcomes(d).values()) == 5)
        handled = outcomes(d)
    # Then no second follow-up: the new alert is reported once, attached to the last one, with the reason
    assert len(_jobs(handle)) == 2
    assert handled == {"dispatched": 1, "follow_up_dispatched": 1, "follow_up_held": 1, "duplicate": 2}
    (attached,) = [m[2] for m in results.keys("lifecycle.attached")]
    assert attached.investigation_id == follow_up and attached.follows == first
    assert "max_follow_ups" in attached.message


async def test_a_new_alert_soon_after_the_end_waits_for_the_minimum_interval(env):  # noqa: F811
    handle, url = env
    first = identify(decode_incident(firing("Soon", "a"))).investigation_id
    async with PodDriver(handle, decide=lambda pod: 0).running_(), Results(url) as results, \
            dispatcher(handle, url, AGENTJOBS_ADMISSION__FOLLOW_UP_MIN_INTERVAL="3600") as d:
        await publish(url, [firing("Soon", "a")])
        await results.wait_for(lambda: lifecycle_ids(results, "succeeded") == [first])
        await publish(url, [firing("Soon", "a", "b")])
        await _until(lambda: outcomes(d).get("follow_up_held") == 1)
    assert len(_jobs(handle)) == 1
    (attached,) = [m[2] for m in results.keys("lifecycle.attached")]
    assert attached.investigation_id == first and "follow_up_min_interval" in attached.message
