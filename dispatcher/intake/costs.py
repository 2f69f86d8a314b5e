"""What investigations cost, as metrics labelled by domain.

Agents run in short-lived Jobs and cannot be scraped, so their cost travels in
the Finding (``Finding.cost``); ``CostRecorder`` reads a copy of every finding
(queue ``agentjobs.costs``, bound to ``finding.#`` on the results exchange) and
adds it to the dispatcher's metrics: tool calls, LLM tokens and price, CPU and
wall seconds, by domain and reasoner. With several dispatcher replicas each
counts the findings it received; Prometheus sums them. The dispatcher's own
failure results (reasoner ``dispatcher``) cost nothing and are skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from schemas import Finding, decode, utcnow
from schemas.errors import DecodeError, PermanentError

from dispatcher.plumbing.amqp import Publisher
from dispatcher.intake import senders
from dispatcher.intake.control import reject
from dispatcher.intake.deadletters import Delivery
from dispatcher.intake.incidents import Outcome
from dispatcher.plumbing.metrics import Metrics
from dispatcher.plumbing.retry import Backoff
from dispatcher.plumbing.settings import IdentitySettings

COMPONENT = "cost-recorder"


def record(metrics: Metrics, finding: Finding) -> None:
    """Add one finding's cost to the metrics (pure apart from the counters)."""
    if finding.reasoner == "dispatcher":
        return
    domain, reasoner, cost = finding.domain or "unknown", finding.reasoner or "unknown", finding.cost
    metrics.investigations_costed.labels(domain=domain, reasoner=reasoner).inc()
    metrics.tool_calls.labels(domain=domain, reasoner=reasoner).inc(cost.tool_calls)
    metrics.llm_tokens.labels(domain=domain, kind="prompt").inc(cost.llm_prompt_tokens)
    metrics.llm_tokens.labels(domain=domain, kind="completion").inc(cost.llm_completion_tokens)
    metrics.llm_cost.labels(domain=domain).inc(cost.llm_price_usd)
    metrics.agent_cpu.labels(domain=domain).inc(cost.cpu_seconds)
    metrics.agent_wall.labels(domain=domain).observe(cost.wall_seconds)


class CostRecorder:
    def __init__(self, *, metrics: Metrics, publisher: Publisher, identities: IdentitySettings,
                 backoff: Backoff | None = None, clock: Callable[[], datetime] = utcnow) -> None:
        self.metrics = metrics
        self.publisher = publisher
        self.identities = identities
        self.backoff = backoff or Backoff()
        self.clock = clock

    async def handle(self, delivery: Delivery) -> Outcome:
        # Costs are per domain, not per investigation: an agent or the dispatcher, no one else.
        refused = senders.any_agent_or_dispatcher(self.identities, delivery.user_id, "findings")
        if refused is not None:
            return await reject(self.publisher, delivery, PermanentError(refused.reason, refused.detail),
                                backoff=self.backoff, at=self.clock(), component=COMPONENT)
        try:
            finding = decode(delivery.body, Finding)
        except DecodeError as exc:
            return await reject(self.publisher, delivery, exc, backoff=self.backoff, at=self.clock(),
                                component=COMPONENT)
        record(self.metrics, finding)
        return Outcome.ACK
