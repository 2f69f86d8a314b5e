"""One investigation is one trace: the agent continues the Job's TRACEPARENT and the Finding names it."""

from __future__ import annotations

from agent import config, engine
from agent.reasoning.base import Tally
from dispatcher.jobs import jobspec
from tests.support.fake_tools import connection_alert, postgres, prometheus
from tests.support.tracing import recorded_spans

INCOMING = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
INVESTIGATION = "a" * 24 + "b" * 16
ENV = {"AGENTJOBS_INVESTIGATION_ID": INVESTIGATION, "AGENTJOBS_PHASE": "read-only", "AGENTJOBS_INPUT_DIR": "/in",
       "AGENTJOBS_AMQP__URL": "amqp://broker/", "AGENTJOBS_VAULT__AUTH_MODE": "none"}


def test_the_job_continues_the_trace_the_incident_came_with() -> None:
    assert jobspec.traceparent(INVESTIGATION, INCOMING) == f"00-4bf92f3577b34da6a3ce929d0e0e4736-{'b' * 16}-01"
    # without one (Alertmanager sends none), or with a malformed one, the investigation makes its own
    assert jobspec.traceparent(INVESTIGATION) == f"00-{'a' * 24}{'b' * 8}-{'b' * 16}-01"
    assert jobspec.traceparent(INVESTIGATION, "00-nothex-00-01") == jobspec.traceparent(INVESTIGATION)
    assert jobspec.traceparent(INVESTIGATION, f"00-{'0' * 32}-{'1' * 16}-01") == jobspec.traceparent(INVESTIGATION)


async def test_reasoning_and_every_tool_call_are_spans_of_the_jobs_trace() -> None:
    traceparent = jobspec.traceparent(INVESTIGATION, INCOMING)
    env = config.load({**ENV, "TRACEPARENT": traceparent})
    with recorded_spans() as spans:
        finding = await engine.investigate(connection_alert(), env, tools=[postgres(), prometheus()], tally=Tally())
    recorded = {s.name: s for s in spans.get_finished_spans()}
    root = recorded["investigation"]
    assert format(root.context.trace_id, "032x") == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert root.parent is not None and format(root.parent.span_id, "016x") == "b" * 16  # the Job's span
    reasoning = recorded["reason rules"]
    assert reasoning.parent.span_id == root.context.span_id
    tool_spans = [s for s in spans.get_finished_spans() if s.name.startswith("tool ")]
    assert tool_spans and all(s.context.trace_id == root.context.trace_id for s in tool_spans)
    assert all(s.parent.span_id == reasoning.context.span_id for s in tool_spans)
    assert finding.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"


async def test_without_an_exporter_the_trace_id_still_reaches_the_finding() -> None:
    env = config.load({**ENV, "TRACEPARENT": jobspec.traceparent(INVESTIGATION)})
    finding = await engine.investigate(connection_alert(), env, tools=[postgres()], tally=Tally())
    assert finding.trace_id == f"{'a' * 24}{'b' * 8}"
