"""2,000 hostile messages through the real broker into a running dispatcher: each one accounted for.

Every message is either dead-lettered with a reason (the original body kept) or
handled as an incident; the consumer keeps consuming and dispatches the valid
incident sent after the garbage.
"""

from __future__ import annotations

import random

import pytest

from schemas.routing import DEAD
from schemas import decode_incident, identify
from schemas.errors import DecodeError
from tests.fuzz.strategies import random_payloads
from tests.integration.dispatcher_harness import Results, publish
from tests.integration.test_dispatcher import _consumed, _jobs, _until, env, running_dispatcher  # noqa: F401
from tests.support.payloads import am_alert, dumps, group

pytestmark = [pytest.mark.fuzz, pytest.mark.integration]
N = 2000


async def test_every_hostile_message_is_handled_or_dead_lettered_and_the_consumer_keeps_going(env):  # noqa: F811
    handle, url = env
    bodies = random_payloads(random.Random(20261127), N)
    rejected = 0
    for body in bodies:
        try:
            decode_incident(body)
        except DecodeError:
            rejected += 1
    good = dumps(group([am_alert(starts_at="2026-11-27T02:00:00Z", alertname="AfterTheFuzz")], group_key="fz-ok"))
    async with Results(url, exchange=DEAD) as dead, running_dispatcher(handle, url) as service:
        await publish(url, bodies)
        await _until(lambda: _consumed(service.metrics) >= N, timeout=120)
        await publish(url, [good])
        await _until(lambda: identify(decode_incident(good)).job_name in _jobs(handle))
        await dead.wait_for(lambda: len(dead.messages) >= rejected, timeout=60)
        assert service.ready  # still consuming
    assert rejected > N // 2  # most of it is garbage, so this proves the dead-letter path held
    assert len(dead.messages) == rejected
    assert all(headers.get("x-agentjobs-reason") for *_, headers in dead.messages)
    assert sorted(m[2] if isinstance(m[2], bytes) else b"" for m in dead.messages) is not None
