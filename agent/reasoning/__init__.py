"""How the agent reasons over what its tools find, and what it may do about it.

``base``: the ``Reasoner`` protocol, the ``Investigation`` context and the
``Assessment`` a reasoner returns. ``rules``: the deterministic default.
``llm``: an OpenAI-compatible chat-completions model with tool calling, which
falls back to ``rules``. ``actions``: the action registry and the phase gate.
``finding``: the ``Finding`` assembled from an assessment after the gate.
"""

from .actions import REGISTRY, Decision, Execution, Executor, allowed_risks, decide, gate, screen
from .base import (
    Assessment,
    Budget,
    Hypothesis,
    Investigation,
    Price,
    Reasoner,
    Tally,
    quote_untrusted,
)
from .finding import assemble, conclude
from .rules import RulesReasoner


def __getattr__(name: str) -> object:
    # ``llm`` (and aiohttp with it) is imported only when asked for: a Job with the rules
    # reasoner does not pay for it at start-up.
    if name in ("LlmConfig", "LlmReasoner"):
        from . import llm

        return getattr(llm, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "REGISTRY",
    "Assessment",
    "Budget",
    "Decision",
    "Execution",
    "Executor",
    "Hypothesis",
    "Investigation",
    "LlmConfig",
    "LlmReasoner",
    "Price",
    "Reasoner",
    "RulesReasoner",
    "Tally",
    "allowed_risks",
    "assemble",
    "conclude",
    "decide",
    "gate",
    "quote_untrusted",
    "screen",
]
