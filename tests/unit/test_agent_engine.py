"""What the agent builds from its Job's environment: tools, reasoner, time budget."""

from __future__ import annotations

import pytest

from agent import config, engine
from agent.reasoning.llm import LlmReasoner
from agent.reasoning.rules import RulesReasoner

BASE = {"AGENTJOBS_INVESTIGATION_ID": "inv", "AGENTJOBS_PHASE": "read-only", "AGENTJOBS_INPUT_DIR": "/in",
        "AGENTJOBS_AMQP__URL": "amqp://broker/", "AGENTJOBS_VAULT__AUTH_MODE": "none"}


def test_only_configured_tools_are_opened() -> None:
    env = config.load(BASE)
    assert env.llm is None and not env.tools.prometheus_url

    async def opened(e: config.AgentEnv) -> list[str]:
        tools, unavailable = await engine.open_tools(e, db_user=None, db_password=None, postgres_available=True)
        await engine.close_tools(tools)
        assert unavailable == []
        return [t.name for t in tools]

    import asyncio

    assert asyncio.run(opened(env)) == []
    full = config.load({**BASE, "AGENTJOBS_POSTGRES__DSN": "postgresql://db:5432/app",
                        "AGENTJOBS_TOOLS__PROMETHEUS_URL": "http://prom:9090",
                        "AGENTJOBS_TOOLS__LOKI_URL": "http://loki:3100"})
    assert asyncio.run(opened(full)) == ["postgres", "prometheus", "logs"]


def test_refused_database_credentials_mean_no_postgres_tool() -> None:
    import asyncio

    env = config.load({**BASE, "AGENTJOBS_POSTGRES__DSN": "postgresql://db:5432/app"})
    tools, _ = asyncio.run(engine.open_tools(env, db_user=None, db_password=None, postgres_available=False))
    assert tools == []


def test_a_kubeconfig_that_cannot_be_loaded_is_evidence_not_a_crash(tmp_path) -> None:
    import asyncio

    (tmp_path / "kubeconfig").write_text("not: [a kubeconfig")
    env = config.load({**BASE, "AGENTJOBS_TOOLS__KUBERNETES": "true",
                       "AGENTJOBS_TOOLS__KUBECONFIG": str(tmp_path / "kubeconfig"),
                       "AGENTJOBS_MOUNT_ROOT": str(tmp_path / "mounts")})
    assert env.tools.kubeconfig == tmp_path / "kubeconfig"  # a node path, never re-rooted under mounts
    tools, unavailable = asyncio.run(engine.open_tools(env, db_user=None, db_password=None, postgres_available=True))
    assert tools == []
    (why,) = unavailable
    assert why.source == "kubernetes" and not why.ok and "kubernetes tool unavailable" in why.excerpt


def test_the_reasoner_is_rules_unless_a_model_endpoint_is_configured() -> None:
    assert isinstance(engine.reasoner_for(config.load(BASE), api_key=""), RulesReasoner)
    env = config.load({**BASE, "AGENTJOBS_LLM__BASE_URL": "http://vllm:8000/v1", "AGENTJOBS_LLM__MODEL": "qwen",
                       "AGENTJOBS_LLM__PRICES": '{"qwen": {"prompt_per_mtok": 0.5}}'})
    reasoner = engine.reasoner_for(env, api_key="sk-x")
    assert isinstance(reasoner, LlmReasoner)
    assert env.llm is not None and env.llm.prices == {"qwen": {"prompt_per_mtok": 0.5}}


def test_the_reasoning_budget_ends_before_the_jobs_deadline() -> None:
    assert engine.budget_for(config.load({**BASE, "AGENTJOBS_DEADLINE_SECONDS": "120"})).wall_seconds == 105
    assert engine.budget_for(config.load({**BASE, "AGENTJOBS_DEADLINE_SECONDS": "3600"})).wall_seconds == 600
    assert engine.budget_for(config.load({**BASE, "AGENTJOBS_TOOLS__MAX_TOOL_CALLS": "7"})).max_tool_calls == 7


@pytest.mark.parametrize(("name", "value", "says"), [
    ("AGENTJOBS_TOOLS__MAX_ROWS", "lots", "AGENTJOBS_TOOLS__MAX_ROWS='lots' is not a positive whole number"),
    ("AGENTJOBS_TOOLS__TIMEOUT", "-1", "AGENTJOBS_TOOLS__TIMEOUT must be positive"),
    ("AGENTJOBS_LLM__PRICES", "[1]", "is not a JSON object"),
])
def test_bad_tool_settings_name_the_variable(name: str, value: str, says: str) -> None:
    env = {**BASE, name: value}
    if name.startswith("AGENTJOBS_LLM"):
        env |= {"AGENTJOBS_LLM__BASE_URL": "http://vllm/v1", "AGENTJOBS_LLM__MODEL": "m"}
    with pytest.raises(config.ConfigError, match=says.replace("[", r"\[").replace("(", r"\(")):
        config.load(env)


def test_the_queue_tool_is_on_by_default_whenever_the_agent_has_a_broker_user() -> None:
    import asyncio

    async def opened(e: config.AgentEnv, **creds: str | None) -> list[str]:
        tools, _ = await engine.open_tools(e, db_user=None, db_password=None, postgres_available=True, **creds)
        await engine.close_tools(tools)
        return [t.name for t in tools]

    env = config.load(BASE)
    assert env.tools.rabbitmq is True
    # the agent's own (Vault-issued) user, or the credentials in the URL (auth mode none)
    assert asyncio.run(opened(env, amqp_user="agent-inv-1", amqp_password="pw-secret")) == ["rabbitmq"]
    assert asyncio.run(opened(config.load({**BASE, "AGENTJOBS_AMQP__URL": "amqp://u:p@broker/"}))) == ["rabbitmq"]
    # never as a default user: without credentials it stays closed
    assert asyncio.run(opened(env)) == []
    off = config.load({**BASE, "AGENTJOBS_TOOLS__RABBITMQ": "false"})
    assert asyncio.run(opened(off, amqp_user="agent-inv-1", amqp_password="pw-secret")) == []
    with pytest.raises(config.ConfigError, match="AGENTJOBS_TOOLS__RABBITMQ"):
        config.load({**BASE, "AGENTJOBS_TOOLS__RABBITMQ": "maybe"})


def test_the_queue_tool_connects_to_the_asked_vhost_on_the_jobs_broker() -> None:
    from agent.tools.rabbitmq import vhost_of, vhost_url

    base = "amqps://broker.example:5671/agentjobs?heartbeat=30"
    assert vhost_of(base) == "agentjobs"
    assert vhost_of("amqp://broker") == vhost_of("amqp://broker/") == vhost_of("amqp://broker/%2F") == "/"
    assert vhost_of("amqp://broker/demo%2Forders") == "demo/orders"
    assert vhost_url(base, "/") == "amqps://broker.example:5671/%2F?heartbeat=30"
    assert vhost_url(base, "demo/orders q") == "amqps://broker.example:5671/demo%2Forders%20q?heartbeat=30"
    assert vhost_url(base, "demo", username="agent@x", password="p:w/d") == \
        "amqps://agent%40x:p%3Aw%2Fd@broker.example:5671/demo?heartbeat=30"
