"""Investigation cost becomes metrics labelled by domain."""

from __future__ import annotations

from dispatcher.intake.costs import record
from dispatcher.plumbing.metrics import Metrics
from schemas import Cost, Finding, Phase


def _finding(domain: str, reasoner: str, **cost: float) -> Finding:
    return Finding(investigation_id="i", incident_key="k", idempotency_key="i:finding", summary="s",
                   probable_cause="c", confidence=0.5, phase=Phase.SHADOW, domain=domain, reasoner=reasoner,
                   cost=Cost(**cost))


def _value(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_agent_cost_is_added_per_domain_and_the_dispatchers_own_results_are_not() -> None:
    metrics = Metrics()
    record(metrics, _finding("database", "openai", tool_calls=4, llm_prompt_tokens=700, llm_completion_tokens=160,
                             llm_price_usd=0.00335, cpu_seconds=0.2, wall_seconds=3.0))
    record(metrics, _finding("database", "rules", tool_calls=3, cpu_seconds=0.1, wall_seconds=1.0))
    record(metrics, _finding("database", "dispatcher"))  # a failure result: no agent ran

    assert _value(metrics, "agentjobs_investigation_tool_calls_total", domain="database", reasoner="openai") == 4
    assert _value(metrics, "agentjobs_investigation_tool_calls_total", domain="database", reasoner="rules") == 3
    assert _value(metrics, "agentjobs_investigation_llm_tokens_total", domain="database", kind="prompt") == 700
    assert _value(metrics, "agentjobs_investigation_llm_cost_usd_total", domain="database") == 0.00335
    assert abs(_value(metrics, "agentjobs_investigation_cpu_seconds_total", domain="database") - 0.3) < 1e-9
    assert _value(metrics, "agentjobs_investigation_wall_seconds_count", domain="database") == 2
    assert _value(metrics, "agentjobs_investigations_costed_total", domain="database", reasoner="dispatcher") == 0
