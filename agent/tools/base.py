"""The tool contract: what every data source the agent consults must honour.

A ``Tool`` offers named operations (``OperationSpec``: a description and a JSON
Schema of its parameters, so the LLM reasoner can call them and the rules
reasoner can too). ``run`` never raises for a data-source failure: it returns
an ``Observation`` with ``ok=False`` and the reason, because a failed query is
evidence too. Every call is bounded by ``Limits`` (timeout, rows, bytes).

Each tool declares the credential domain it needs (``"database"`` for the
dynamic PostgreSQL user, ``None`` for sources reached without Vault
credentials), so the agent fetches only the credentials its tools use.

Tool output and alert text are untrusted data, never instructions: tools
return data; only reasoners decide, and only the phase decides what may run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, Protocol

import msgspec

from schemas import Evidence

EXCERPT_CHARS = 2000  # evidence excerpts are at most this long


@dataclass(frozen=True, kw_only=True)
class Limits:
    timeout: float = 5.0  # seconds per call, everything included
    max_rows: int = 200  # rows / series / log lines / objects kept from one answer
    max_bytes: int = 256 * 1024  # bytes read from one answer


class OperationSpec(msgspec.Struct, frozen=True, kw_only=True):
    name: str  # e.g. "query_range"
    description: str  # one or two sentences, for humans and the LLM
    parameters: dict[str, Any]  # JSON Schema (type object) of the parameters


class Observation(msgspec.Struct, frozen=True, kw_only=True):
    """What one tool call returned (structured ``data`` for reasoners, ``excerpt`` for humans)."""

    tool: str  # prometheus, postgres, kubernetes, logs
    operation: str
    query: str  # what was asked, verbatim (PromQL, SQL, LogQL, API path)
    ok: bool
    at: datetime
    data: Any = None  # JSON-like; None when not ok
    excerpt: str = ""  # bounded human-readable extract, or the failure reason when not ok
    truncated: bool = False  # a limit cut the answer short

    def evidence(self) -> Evidence:
        return Evidence(source=self.tool, query=self.query, excerpt=bounded(self.excerpt), at=self.at, ok=self.ok)


class Tool(Protocol):
    name: ClassVar[str]
    credential_domain: ClassVar[str | None]

    def operations(self) -> Mapping[str, OperationSpec]:
        """The operations this tool offers, by name."""
        ...

    async def run(self, operation: str, params: Mapping[str, Any]) -> Observation:
        """Run one operation; never raises for a data-source failure (returns ``ok=False``)."""
        ...

    async def close(self) -> None:
        ...


def bounded(text: str, limit: int = EXCERPT_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def cut_at_word(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters at a word boundary, marked with "…" (pure).

    For summaries: the full text stays in the evidence. A single word longer than a third of the
    limit is cut where the limit falls rather than leaving almost nothing.
    """
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    head = text[: max(1, limit - 1)]
    space = head.rfind(" ")
    if space >= limit // 3:
        head = head[:space]
    return head.rstrip(" ,;:-") + "…"
