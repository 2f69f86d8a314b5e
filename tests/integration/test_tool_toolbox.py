"""Every tool honours the contract in ``agent.tools.base``; the ``Toolbox`` counts, traces and contains failures."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar

import msgspec
import pytest

from agent.tools.base import Limits, Observation, OperationSpec
from agent.tools.kubernetes import KubernetesTool
from agent.tools.logs import LogsTool
from agent.tools.postgres import PostgresTool
from agent.tools.prometheus import PrometheusTool
from agent.tools.rabbitmq import RabbitMQTool
from agent.tools.toolbox import Toolbox, parse_duration, parse_time
from tests.support.services import free_port

pytestmark = pytest.mark.integration

DOMAINS = {"prometheus": None, "postgres": "database", "kubernetes": None, "logs": None, "rabbitmq": "rabbitmq"}


def _tools(k8s_emulator) -> list[Any]:
    dead = f"http://127.0.0.1:{free_port()}"
    limits = Limits(timeout=2)
    return [PrometheusTool(dead, limits=limits), PostgresTool(f"postgresql://127.0.0.1:{free_port()}/x", limits=limits),
            KubernetesTool(k8s_emulator.api_client, namespace=k8s_emulator.namespace, limits=limits),
            LogsTool(dead, limits=limits),
            RabbitMQTool(f"amqp://127.0.0.1:{free_port()}/", username="agent", password="pw-1234", limits=limits)]


async def test_every_tool_declares_its_name_domain_and_operations_with_json_schemas(k8s_emulator):
    for tool in _tools(k8s_emulator):
        assert tool.credential_domain == DOMAINS[tool.name]
        ops = tool.operations()
        assert ops, tool.name
        for name, spec in ops.items():
            assert isinstance(spec, OperationSpec) and spec.name == name and spec.description
            schema = spec.parameters
            assert schema["type"] == "object" and isinstance(schema["properties"], dict)
            assert set(schema.get("required", [])) <= set(schema["properties"])
            msgspec.json.encode(spec)  # the LLM reasoner sends these as tool definitions
        await tool.close()


async def test_every_operation_of_every_tool_fails_as_an_observation_when_its_source_is_gone(k8s_emulator):
    # Given sources that refuse connections (and the emulator without the objects asked for)
    toolbox = Toolbox(_tools(k8s_emulator))
    examples = {"expr": "up", "generator_url": "http://p/graph?g0.expr=up", "query": '{app="x"}',
                "selector": '{app="x"}', "deployment": "x", "queue": "orders", "vhost": "shop"}
    try:
        for tool, ops in toolbox.operations().items():
            for op, spec in ops.items():
                params = {k: v for k, v in examples.items() if k in spec.parameters["properties"]}
                if tool == "kubernetes" and op == "pods":
                    params = {"workload": "x"}
                obs = await toolbox.run(tool, op, params)
                assert isinstance(obs, Observation) and (obs.tool, obs.operation) == (tool, op)
                if tool != "kubernetes" or op == "rollouts":
                    assert not obs.ok and obs.excerpt and obs.data is None, (tool, op, obs)
                assert obs.evidence().ok is obs.ok
    finally:
        await toolbox.close()
    assert toolbox.tool_calls == sum(len(ops) for ops in toolbox.operations().values())


class Exploding:
    name: ClassVar[str] = "exploding"
    credential_domain: ClassVar[str | None] = "database"

    def operations(self) -> Mapping[str, OperationSpec]:
        return {"boom": OperationSpec(name="boom", description="raises", parameters={"type": "object",
                                                                                        "properties": {}})}

    async def run(self, operation: str, params: Mapping[str, Any]) -> Observation:
        raise RuntimeError("bug in a tool")

    async def close(self) -> None:
        raise RuntimeError("closing failed too")


async def test_a_tool_bug_or_unknown_tool_is_a_failed_observation_and_every_call_is_counted():
    toolbox = Toolbox([Exploding()])

    bug = await toolbox.run("exploding", "boom", {})
    unknown = await toolbox.run("nope", "query", {})
    await toolbox.close()  # a failing close does not raise either

    assert not bug.ok and "tool error: RuntimeError: bug in a tool" in bug.excerpt
    assert not unknown.ok and "unknown tool 'nope'" in unknown.excerpt
    assert toolbox.tool_calls == 2 and toolbox.calls == {"exploding.boom": 1, "nope.query": 1}
    assert toolbox.credential_domains() == {"database"}


async def test_each_call_is_a_span_with_its_outcome():
    sdk = pytest.importorskip("opentelemetry.sdk.trace")
    export = pytest.importorskip("opentelemetry.sdk.trace.export")
    memory = pytest.importorskip("opentelemetry.sdk.trace.export.in_memory_span_exporter")
    exporter = memory.InMemorySpanExporter()
    provider = sdk.TracerProvider()
    provider.add_span_processor(export.SimpleSpanProcessor(exporter))
    toolbox = Toolbox([Exploding()], tracer=provider.get_tracer("test"))

    await toolbox.run("exploding", "boom", {})

    (span,) = exporter.get_finished_spans()
    assert span.name == "tool exploding.boom"
    assert span.attributes["agentjobs.tool"] == "exploding" and span.attributes["agentjobs.ok"] is False
    assert span.status.status_code.name == "ERROR"


def test_time_and_duration_arguments():
    now = 1_800_000_000.0
    assert parse_time("now", now) == now
    assert parse_time("now-15m", now) == now - 900
    assert parse_time("2027-01-15T02:00:00Z", now) == datetime(2027, 1, 15, 2, tzinfo=UTC).timestamp()
    assert parse_time("2027-01-15T02:00:00+01:00", now) == datetime(2027, 1, 15, 1, tzinfo=UTC).timestamp()
    assert parse_time(1234.5, now) == 1234.5
    assert parse_duration("1h30m") == 5400 and parse_duration(90) == 90 and parse_duration("2.5s") == 2.5
    with pytest.raises(ValueError):
        parse_duration("15 minutes")
    with pytest.raises(ValueError):
        parse_time("yesterday", now)
