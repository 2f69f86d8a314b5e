"""From an incident and the Job's environment to a ``Finding``: tools, reasoner, phase gate.

The tools are the ones the Job was given addresses (and credentials) for; the
reasoner is ``rules`` unless an OpenAI-compatible endpoint is configured, in
which case ``llm`` runs with ``rules`` as its fallback. The agent's time budget
ends well before the Job's deadline, so a finding — conclusive or honestly
inconclusive — is always published. Whatever the phase does not allow is
proposed, never executed. In the phases that may act (limited remediation,
autonomous) the executors for the Job's tools are built — the PostgreSQL ones
when the postgres tool is open, connecting as the same (phase's) database user —
and the gate hands them what the phase allows; each execution follows the
protocol of ``agent.remediation.protocol`` under the idempotency ledger in the
Job's working directory (``AgentEnv.work_dir``), so a restarted agent process of
the same Job does not act twice.

Stopped while reasoning (SIGTERM: the alert resolved, an operator cancelled,
eviction), ``investigate`` raises ``Stopped`` carrying a partial, inconclusive
finding from the observations made so far, for ``agent.main`` to publish.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from schemas import Conclusion, Evidence, Finding, IncidentEvent, utcnow

from . import tracing
from .config import AgentEnv
from .reasoning.actions import allowed_risks
from .reasoning.base import Assessment, Budget, Investigation, Price, Reasoner, Tally
from .reasoning.finding import assemble, conclude
from .reasoning.rules import RulesReasoner
from .tools.base import Limits, Tool
from .remediation import limits as blast_radius
from .remediation.protocol import (
    ClaimStore,
    FileLedger,
    Guard,
    Ledger,
    MemoryLedger,
    RemediationExecutor,
    guarded,
    shared_claims,
)
from .tools.toolbox import Toolbox

PUBLISH_RESERVE = 15.0  # seconds of the Job's deadline kept for publishing and revoking


def budget_for(env: AgentEnv) -> Budget:
    """The reasoning budget: the deadline minus what publishing needs, at most 10 minutes (pure)."""
    wall = max(5.0, min(600.0, env.deadline_seconds - PUBLISH_RESERVE))
    return Budget(max_tool_calls=env.tools.max_tool_calls, wall_seconds=wall)


async def open_tools(env: AgentEnv, *, db_user: str | None, db_password: str | None,
                     postgres_available: bool, amqp_user: str | None = None,
                     amqp_password: str | None = None) -> tuple[list[Tool], list[Evidence]]:
    """The tools this Job may use (only the configured ones), and why any configured one is not there.

    ``amqp_user``/``amqp_password``: the agent's own broker user (the one it publishes with); the queue
    tool inspects the Job's broker as that user, or with the credentials in ``AGENTJOBS_AMQP__URL``
    (auth mode none). Without either it is not opened: it never connects as a default user.
    """
    limits = Limits(timeout=env.tools.timeout, max_rows=env.tools.max_rows)
    tools: list[Tool] = []
    unavailable: list[Evidence] = []
    # Each tool's module (and its client library) is imported only when the Job has that tool.
    if env.postgres_dsn and postgres_available:
        from .tools.postgres import PostgresTool

        tools.append(PostgresTool(env.postgres_dsn, user=db_user, password=db_password, limits=limits,
                                  application_name=f"agentjobs-agent {env.investigation_id[:16]}",
                                  target=env.postgres_target or "default"))
    if env.tools.prometheus_url:
        from .tools.prometheus import PrometheusTool

        tools.append(PrometheusTool(env.tools.prometheus_url, limits=limits))
    if env.tools.loki_url:
        from .tools.logs import LogsTool

        tools.append(LogsTool(env.tools.loki_url, limits=limits))
    if env.tools.http_targets:
        from .tools.probe import ProbeTool, TargetError

        try:
            tools.append(ProbeTool(env.tools.http_targets, limits=limits))
        except TargetError as exc:  # a prefix the probe cannot honour: say so, never probe around it
            unavailable.append(Evidence(source="http", query="AGENTJOBS_TOOLS__HTTP_TARGETS", at=utcnow(), ok=False,
                                        excerpt=f"http probe tool unavailable: {exc}"[:2000]))
    if env.tools.rabbitmq and env.amqp_url and (amqp_user is not None or _has_user(env.amqp_url)):
        from .tools.rabbitmq import RabbitMQTool

        tools.append(RabbitMQTool(env.amqp_url, username=amqp_user, password=amqp_password, limits=limits,
                                  connection_name=f"agentjobs-agent {env.investigation_id[:16]} rabbitmq tool",
                                  management_url=env.tools.rabbitmq_management_url))
    if env.tools.kubernetes:
        # Imported only here: kubernetes_asyncio is ~0.7 s of a Job's start-up on its own.
        from kubernetes_asyncio import client as k8s_client
        from kubernetes_asyncio import config as k8s_config

        from .tools.kubernetes import KubernetesTool

        cfg = k8s_client.Configuration()
        where = f"kubeconfig {env.tools.kubeconfig}" if env.tools.kubeconfig is not None else "in-cluster config"
        try:
            if env.tools.kubeconfig is not None:
                await k8s_config.load_kube_config(config_file=str(env.tools.kubeconfig), client_configuration=cfg)
            else:
                k8s_config.load_incluster_config(client_configuration=cfg)
        except Exception as exc:  # noqa: BLE001 - unreadable or invalid config (YAML, keys, files): evidence
            unavailable.append(Evidence(source="kubernetes", query=f"load {where}", at=utcnow(), ok=False,
                                        excerpt=f"kubernetes tool unavailable: {type(exc).__name__}: {exc}"[:2000]))
        else:
            tools.append(KubernetesTool(k8s_client.ApiClient(cfg), limits=limits, owns_client=True))
    return tools, unavailable


def _has_user(url: str) -> bool:
    from urllib.parse import urlsplit

    try:
        return bool(urlsplit(url).username)
    except ValueError:
        return False


def ledger_for(env: AgentEnv) -> Ledger:
    """The Job's idempotency ledger: a file in its working directory, else this process's memory."""
    path = env.action_ledger_file
    return FileLedger(path) if path is not None else MemoryLedger()


def executors_for(env: AgentEnv, tools: Sequence[Tool]) -> tuple[dict[str, RemediationExecutor], list[Any]]:
    """(executors by action, what to close afterwards) for the tools this Job has open.

    None in a phase that may run nothing (shadow, read-only): the gate would not call them,
    and the phase's database role could not signal a backend anyway. They act with the
    credentials the tool was given — the Vault-issued user of this Job's phase; the
    Kubernetes ones through the kubernetes tool's own ApiClient (the Job's phase
    ServiceAccount, whose RBAC and admission policy still apply), which the tool closes.
    """
    if not allowed_risks(env.phase):
        return {}, []
    found: dict[str, RemediationExecutor] = {}
    closers: list[Any] = []
    for tool in tools:
        if tool.name == "postgres":
            from .remediation import postgres as pg_remediation
            from .tools.postgres import PostgresTool

            if not isinstance(tool, PostgresTool):
                continue
            db = pg_remediation.Database(
                tool.dsn, user=tool._user, password=tool._password, timeout=tool.limits.timeout,  # noqa: SLF001
                application_name=f"agentjobs-agent {env.investigation_id[:16]} remediation",
                before_connect=tool.close)  # its slot, on a server with none to spare
            found |= pg_remediation.executors(db)
            closers.append(db)
        if tool.name == "kubernetes":
            from .remediation import kubernetes as k8s_remediation
            from .tools.kubernetes import KubernetesTool

            if not isinstance(tool, KubernetesTool):
                continue
            found |= k8s_remediation.executors(tool.api_client, namespace=tool.namespace,
                                               timeout=tool.limits.timeout)
    return found, closers


def reasoner_for(env: AgentEnv, *, api_key: str) -> Reasoner:
    if env.llm is None:
        return RulesReasoner()
    from .reasoning.llm import LlmConfig, LlmReasoner

    prices = {model: Price(prompt_per_mtok=float(p.get("prompt_per_mtok", 0.0)),
                           completion_per_mtok=float(p.get("completion_per_mtok", 0.0)))
              for model, p in env.llm.prices.items()}
    config = LlmConfig(base_url=env.llm.base_url, model=env.llm.model, api_key=api_key,
                       max_steps=env.llm.max_steps, max_tokens=env.llm.max_tokens,
                       wall_seconds=env.llm.wall_seconds, mode=env.llm.mode, stream=env.llm.stream,
                       prices=prices)
    return LlmReasoner(config, fallback=RulesReasoner())


async def investigate(
    incident: IncidentEvent,
    env: AgentEnv,
    *,
    tools: Sequence[Tool],
    tally: Tally,
    prior_evidence: Sequence[Evidence] = (),
    api_key: str = "",
    executors: Mapping[str, RemediationExecutor] | None = None,
    ledger: Ledger | None = None,
    guard: Guard | None = None,
    claims: ClaimStore | None = None,
) -> Finding:
    """Reason over the tools and conclude; never raises for a tool failure (that is evidence).

    ``executors``: by default the ones ``executors_for`` builds for the Job's tools and phase
    (closed before returning); ``ledger``: by default ``ledger_for(env)``; ``guard``: asked right
    before each action runs — the kill switch (``agent.main`` always passes one; None: unchecked);
    ``claims``: the investigation's claim store shared by its pods and Jobs
    (``agent.remediation.claims.VaultClaims``), consulted besides ``ledger`` (None: the local ledger only).

    One trace: the investigation span continues the Job's TRACEPARENT; the reasoner and every
    tool call are spans below it; the Finding carries the trace id.
    """
    closers: list[Any] = []
    if executors is None:  # made now, before any observation: a session younger than them was never seen
        executors, closers = executors_for(env, tools)
    try:
        finding = await _investigate(incident, env, tools=tools, tally=tally, api_key=api_key,
                                     executors=executors, ledger=ledger if ledger is not None else ledger_for(env),
                                     guard=guard, claims=claims)
    finally:
        await close_tools(closers)
    if prior_evidence:  # e.g. Vault refusing a credential the phase does not grant
        finding = msgspec.structs.replace(finding, evidence=(*prior_evidence, *finding.evidence))
    return finding


async def _investigate(incident: IncidentEvent, env: AgentEnv, *, tools: Sequence[Tool], tally: Tally,
                       api_key: str, executors: Mapping[str, RemediationExecutor], ledger: Ledger,
                       guard: Guard | None = None, claims: ClaimStore | None = None) -> Finding:
    with tracing.investigation_span(env.traceparent, **{"agentjobs.investigation_id": env.investigation_id,
                                                        "agentjobs.phase": env.phase.value}) as span:
        toolbox = Toolbox(tools)
        inv = Investigation(incident=incident, tools=toolbox.tools, phase=env.phase, budget=budget_for(env),
                            tally=tally, run_tool=toolbox.run)
        reasoner = reasoner_for(env, api_key=api_key)
        with tracing.tracer.start_as_current_span(f"reason {reasoner.name}") as reasoning:
            try:
                assessment = await reasoner.investigate(inv)
            except asyncio.CancelledError:  # SIGTERM (agent.main cancels the run): keep what was seen
                raise stopped_early(inv, env) from None
            reasoning.set_attribute("agentjobs.conclusion", assessment.conclusion.value)
            reasoning.set_attribute("agentjobs.reasoner", assessment.reasoner)
        job_limits = blast_radius.for_job(env.actions, postgres_dsn=env.postgres_dsn, tools=tools)
        with (tracing.tracer.start_as_current_span("conclude"), guarded(guard), shared_claims(claims),
              blast_radius.limited(job_limits)):
            finding = await conclude(inv, assessment, investigation_id=env.investigation_id,
                                     domain_label=env.domain_label, executors=executors, ledger=ledger)
        trace_id = format(span.get_span_context().trace_id, "032x") if span.get_span_context().is_valid else ""
    return msgspec.structs.replace(finding, trace_id=trace_id or tracing.trace_id_of(env.traceparent))


class Stopped(Exception):
    """The investigation was stopped (SIGTERM) while reasoning; ``finding`` holds what it had observed."""

    def __init__(self, finding: Finding) -> None:
        super().__init__(f"stopped with {len(finding.evidence)} observations")
        self.finding = finding


def stopped_early(inv: Investigation, env: AgentEnv) -> Stopped:
    """A partial, inconclusive finding from the observations so far; the cancellation is consumed so
    that publishing it (bounded by ``agent.main``) can still await."""
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()
    seen = len(inv.observations)
    assessment = Assessment(
        reasoner="agentjobs (stopped)", conclusion=Conclusion.INCONCLUSIVE, confidence=0.0,
        summary=f"the investigation was stopped (SIGTERM) before it concluded; the {seen} observation(s) "
                "it had made are attached as evidence",
        probable_cause="unknown: the investigation was stopped before it concluded")
    return Stopped(assemble(inv, assessment, investigation_id=env.investigation_id, domain_label=env.domain_label))


async def close_tools(tools: Sequence[Any]) -> None:
    """Close each of ``tools`` (tools, executors' sessions): every one tried, none may raise."""
    for tool in tools:
        try:
            await tool.close()
        except Exception:  # noqa: BLE001 - closing must never hide the finding
            pass
