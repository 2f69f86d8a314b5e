"""What every reasoner works with and what it hands back.

``Investigation`` is the context of one run: the incident, the tools, the
phase, the budget and the cost tally. Its ``call`` is the single choke point
for tool calls — bounded by the budget and the wall-clock deadline, counted,
cached per (tool, operation, params) so a fallback reasoner does not ask twice,
and never raising: a missing tool, an exhausted budget or a crashing tool all
become ``ok=False`` observations, because a failed query is evidence too. Give
it ``run_tool=toolbox.run`` to send the calls through the ``Toolbox`` (spans).

A reasoner returns an ``Assessment``: summary, probable cause, confidence,
conclusion, ranked ``Hypothesis`` objects with the evidence for and against
each, and the actions it proposes. Proposing is all a reasoner can do: the
phase, decided outside the model, gates execution (``actions.gate``).

Alert text and tool output are untrusted data. ``quote_untrusted`` makes such
text safe to put into a sentence: one line, bounded, in quotes.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.tools.base import Observation, Tool, bounded
from schemas import Conclusion, Cost, Evidence, IncidentEvent, Phase, ProposedAction, utcnow

ALERT_TEXT_CHARS = 120  # how much untrusted text is quoted into a sentence
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]+")


def quote_untrusted(text: str, limit: int = ALERT_TEXT_CHARS) -> str:
    """Untrusted text made safe to quote: one line, bounded, in JSON quotes (pure)."""
    clean = _CONTROL.sub(" ", str(text)).strip()
    if len(clean) > limit:
        clean = clean[: limit - 1] + "…"
    return json.dumps(clean, ensure_ascii=False)


@dataclass(frozen=True, kw_only=True)
class Budget:
    """Bounds of one investigation's tool use (the LLM has its own token/step budget on top)."""

    max_tool_calls: int = 40  # tool calls actually sent to data sources
    wall_seconds: float = 60.0  # seconds for the whole reasoning, tool calls included


@dataclass(frozen=True, kw_only=True)
class Price:
    """What one model costs."""

    prompt_per_mtok: float = 0.0  # USD per million prompt tokens
    completion_per_mtok: float = 0.0  # USD per million completion tokens

    def of(self, prompt_tokens: int, completion_tokens: int) -> float:
        """USD for these token counts (pure)."""
        return (prompt_tokens * self.prompt_per_mtok + completion_tokens * self.completion_per_mtok) / 1e6


@dataclass(kw_only=True)
class Tally:
    """Cost accounting of one run: tool calls, LLM tokens and price, CPU and wall time."""

    started_wall: float = field(default_factory=time.monotonic)
    started_cpu: float = field(default_factory=time.process_time)
    tool_calls: int = 0
    llm_requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    llm_model: str = ""
    llm_price_usd: float = 0.0  # accumulated with the price of the model that answered

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add_llm_usage(self, model: str, prompt_tokens: int, completion_tokens: int, price: Price | None) -> None:
        """Count one chat-completions response."""
        self.llm_requests += 1
        self.prompt_tokens += max(0, prompt_tokens)
        self.completion_tokens += max(0, completion_tokens)
        self.llm_model = model or self.llm_model
        if price is not None:
            self.llm_price_usd += price.of(max(0, prompt_tokens), max(0, completion_tokens))

    def cost(self) -> Cost:
        return Cost(
            llm_prompt_tokens=self.prompt_tokens,
            llm_completion_tokens=self.completion_tokens,
            tool_calls=self.tool_calls,
            cpu_seconds=round(max(0.0, time.process_time() - self.started_cpu), 6),
            wall_seconds=round(max(0.0, time.monotonic() - self.started_wall), 6),
            llm_requests=self.llm_requests,
            llm_model=self.llm_model[:512],
            llm_price_usd=round(self.llm_price_usd, 8),
        )


@dataclass(frozen=True, kw_only=True)
class Hypothesis:
    """One candidate explanation, scored from the evidence for and against it."""

    cause: str  # stable identifier, e.g. connection_exhaustion
    statement: str  # one sentence for humans (untrusted values quoted)
    score: float  # 0..1, comparable between hypotheses of one investigation
    evidence_for: tuple[Evidence, ...] = ()
    evidence_against: tuple[Evidence, ...] = ()
    actions: tuple[ProposedAction, ...] = ()  # what would remedy it, if it is the cause
    # The unbounded weight of the evidence (log-odds) behind ``score``, where the reasoner keeps one: two
    # hypotheses both at the score ceiling are still told apart by it. None: compare scores only.
    log_odds: float | None = None


@dataclass(frozen=True, kw_only=True)
class Assessment:
    """A reasoner's conclusion (the ``Finding`` is assembled from it in ``finding.py``)."""

    reasoner: str  # rules, llm, or e.g. "rules (llm fallback: token budget exhausted)"
    summary: str
    probable_cause: str
    confidence: float
    conclusion: Conclusion
    hypotheses: tuple[Hypothesis, ...] = ()  # ranked, most probable first
    actions: tuple[ProposedAction, ...] = ()  # proposed only; the phase gates execution
    notes: tuple[str, ...] = ()  # what the reasoner wants operators to know (fallbacks, dropped actions)


class Reasoner(Protocol):
    """Turns an investigation into an assessment; never raises for a tool failure."""

    name: str

    async def investigate(self, inv: Investigation) -> Assessment:
        ...


def _params_text(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(v, ensure_ascii=False, default=str)}" for k, v in sorted(params.items()))


@dataclass(kw_only=True)
class Investigation:
    """One run's context: incident, tools, phase, budget, tally and everything observed so far."""

    incident: IncidentEvent
    tools: Mapping[str, Tool]
    phase: Phase
    budget: Budget = field(default_factory=Budget)
    tally: Tally = field(default_factory=Tally)
    clock: Callable[[], float] = time.monotonic
    # How a call reaches a tool, e.g. ``Toolbox.run`` (one span per call); default: ``tool.run`` directly.
    run_tool: Callable[[str, str, Mapping[str, Any]], Awaitable[Observation]] | None = None
    observations: list[Observation] = field(default_factory=list)
    started: float = -1.0  # clock() at creation unless given
    _cache: dict[str, Observation] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.started < 0:
            self.started = self.clock()

    def remaining(self) -> float:
        """Seconds left of the wall-clock budget (never negative)."""
        return max(0.0, self.budget.wall_seconds - (self.clock() - self.started))

    def offers(self, tool: str, operation: str) -> bool:
        """Whether a tool with this operation is available."""
        t = self.tools.get(tool)
        if t is None:
            return False
        try:
            return operation in t.operations()
        except Exception:  # noqa: BLE001 - a broken tool offers nothing
            return False

    def _failed(self, tool: str, operation: str, params: Mapping[str, Any], why: str) -> Observation:
        return Observation(tool=tool, operation=operation, query=f"{operation}({_params_text(params)})",
                           ok=False, at=utcnow(), excerpt=bounded(why))

    async def call(self, tool: str, operation: str, params: Mapping[str, Any] | None = None) -> Observation:
        """Run one tool operation within the budget; failures come back as ``ok=False`` observations."""
        params = dict(params or {})
        key = f"{tool}\x00{operation}\x00{json.dumps(params, sort_keys=True, default=str)}"
        if key in self._cache:
            return self._cache[key]
        t = self.tools.get(tool)
        if t is None:
            obs = self._failed(tool, operation, params, f"tool {tool!r} is not available to this investigation")
        elif not self.offers(tool, operation):
            obs = self._failed(tool, operation, params, f"tool {tool!r} has no operation {operation!r}")
        elif self.tally.tool_calls >= self.budget.max_tool_calls:
            obs = self._failed(tool, operation, params,
                               f"not run: tool-call budget of {self.budget.max_tool_calls} calls exhausted")
        elif self.remaining() <= 0:
            obs = self._failed(tool, operation, params,
                               f"not run: wall-clock budget of {self.budget.wall_seconds:g} s exhausted")
        else:
            self.tally.tool_calls += 1
            try:
                # The tool bounds itself (Limits.timeout); this bounds a tool that does not.
                running = (self.run_tool(tool, operation, params) if self.run_tool is not None
                           else t.run(operation, params))
                obs = await asyncio.wait_for(running, timeout=self.remaining())
            except TimeoutError:
                obs = self._failed(tool, operation, params, "timed out: the investigation's wall-clock budget ran out")
            except Exception as exc:  # noqa: BLE001 - a tool bug is evidence, not a crash
                obs = self._failed(tool, operation, params, f"tool failed: {type(exc).__name__}: {str(exc)[:300]}")
        self.observations.append(obs)  # failures too: "not available" belongs in the finding
        self._cache[key] = obs
        return obs
