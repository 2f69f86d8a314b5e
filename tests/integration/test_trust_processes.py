"""Two `agentjobs trust` processes: one tallies (single active consumer), the other takes over.

The processes run as the trust identity; verdicts come from an operator, on investigations the
dispatcher reported and a finding was published for (``tests/support/trust_records.py``).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from dispatcher.plumbing.settings import load_settings
from dispatcher.trust.policy import TrustLedger
from schemas import Verdict
from tests.integration.dispatcher_harness import declare_topology
from tests.integration.test_dispatcher_processes import DispatcherProcess, _killed_on_exit
from tests.integration.test_trust import FAST_TRUST, _feedback, _send_feedback
from tests.support.identities import url_for

pytestmark = pytest.mark.integration
SCOPES = ("database", "network", "kubernetes")


async def _metrics(port: int) -> dict[str, float]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for match in re.finditer(r"^(agentjobs_(?:feedback_total|trust_samples)\{[^}]*\}) (\S+)$", text, re.MULTILINE):
        out[match.group(1)] = float(match.group(2))
    return out


async def _tallied(port: int) -> float:
    return sum(v for k, v in (await _metrics(port)).items() if k.startswith("agentjobs_feedback_total"))


async def test_killing_the_active_trust_replica_hands_over_without_double_counting(amqp_vhost, tmp_path):
    url = amqp_vhost.amqp_url
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "AGENTJOBS_AMQP__URL": url_for(url, "trust"),
           "AGENTJOBS_LOGGING__FORMAT": "json", **FAST_TRUST}
    settings = load_settings(None, env)
    await declare_topology(url, settings)
    feedbacks = [_feedback(i, scope, Verdict.MODIFIED if i % 3 == 0 else Verdict.ACCEPTED)
                 for i in range(20) for scope in SCOPES]
    first = DispatcherProcess(env, tmp_path / "trust-a.log", command="trust")
    second = DispatcherProcess(env, tmp_path / "trust-b.log", command="trust")
    async with _killed_on_exit([first, second]):
        # Given two replicas; the first to subscribe is the active one
        await first.start()
        await second.start()
        # When feedback flows and the active replica is SIGKILLed part-way
        sending = asyncio.create_task(_send_feedback(url, feedbacks))
        async with asyncio.timeout(60):
            while await _tallied(first.port) < 15:
                await asyncio.sleep(0.02)
        await first.kill()
        await sending
        # Then the other one takes over and every feedback counts exactly once
        async with asyncio.timeout(60):
            while await _tallied(second.port) < len(feedbacks):
                await asyncio.sleep(0.05)
        await asyncio.sleep(1)  # anything counted twice would show up now
        survivor = await _metrics(second.port)
        # and a replica started afterwards replays the same tallies
        third = DispatcherProcess(env, tmp_path / "trust-c.log", command="trust")
        await third.start()
        replayed = await _metrics(third.port)
        await third.stop()
        assert await second.stop() == 0
    assert sum(v for k, v in survivor.items() if k.startswith("agentjobs_feedback_total")) == len(feedbacks)
    assert survivor == replayed
    expected = TrustLedger(settings.trust)
    for fb in feedbacks:
        expected.apply_feedback(fb)
    for scope in SCOPES:
        assert survivor[f'agentjobs_trust_samples{{scope="{scope}"}}'] == expected.explain(scope).samples
    # and the CLI, replaying the log itself, agrees (as trust: `phase show` declares the topology,
    # which the operator identity may not)
    shown = subprocess.run([str(Path(sys.executable).with_name("agentjobs")), "phase", "show", "--json"],
                           env=env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    scopes = json.loads(shown.stdout)["scopes"]
    assert {s: (v["phase"], v["samples"]) for s, v in scopes.items()} == \
        {s: (expected.phase_for(s).value, expected.explain(s).samples) for s in SCOPES}
