"""SIGTERM while reasoning: the agent keeps what it had observed as a partial, inconclusive finding."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest

from agent import config, engine, main
from agent.reasoning.base import Tally
from agent.tools.base import Observation
from schemas import AgentExit, Conclusion
from tests.support.fake_tools import FakeTool, connection_alert, postgres

ENV = {"AGENTJOBS_INVESTIGATION_ID": "c" * 40, "AGENTJOBS_PHASE": "read-only", "AGENTJOBS_INPUT_DIR": "/in",
       "AGENTJOBS_AMQP__URL": "amqp://broker/", "AGENTJOBS_VAULT__AUTH_MODE": "none"}


class HangsAfterFirstCall:
    """Answers its first call like ``inner``, then never answers again (a slow source at SIGTERM time)."""

    def __init__(self, inner: FakeTool) -> None:
        self.inner, self.name, self.credential_domain = inner, inner.name, None
        self.hanging = asyncio.Event()

    def operations(self) -> Any:
        return self.inner.operations()

    async def run(self, operation: str, params: Mapping[str, Any]) -> Observation:
        if self.inner.calls:
            self.hanging.set()
            await asyncio.Event().wait()
        return await self.inner.run(operation, params)

    async def close(self) -> None:
        pass


async def test_a_cancelled_investigation_yields_its_observations_as_an_inconclusive_finding():
    env = config.load(ENV)
    tool = HangsAfterFirstCall(postgres())
    # Given an investigation that has made one observation and waits on its next call
    task = asyncio.create_task(engine.investigate(connection_alert(), env, tools=[tool], tally=Tally()))
    await asyncio.wait_for(tool.hanging.wait(), 10)
    # When it is cancelled (what agent.main does on SIGTERM)
    task.cancel()
    with pytest.raises(engine.Stopped) as stopped:
        await task
    # Then the partial finding carries that observation and says it was stopped, concluding nothing
    finding = stopped.value.finding
    assert finding.conclusion is Conclusion.INCONCLUSIVE and finding.confidence == 0.0
    assert "stopped" in finding.summary and finding.idempotency_key == f"{'c' * 40}:finding"
    assert [e.source for e in finding.evidence] == ["postgres"] and finding.evidence[0].ok
    assert not finding.proposed_actions


def test_a_partial_finding_published_after_sigterm_has_its_own_exit_code():
    stopped = main.StoppedWithPartial("published")
    assert main.exit_code_for(stopped) == AgentExit.PARTIAL and AgentExit.PARTIAL.published
    assert main.stderr_line(stopped).startswith("stopped_with_partial_finding:")
    assert not AgentExit.UNPUBLISHED.published
