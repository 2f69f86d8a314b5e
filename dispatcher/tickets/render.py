"""What a ticket shows, as text (pure).

Plain lines and ``*`` lists read well in Redmine's Textile and CommonMark alike. Everything an
alert's sender or a tool wrote (alert text, evidence excerpts, the agent's prose, which may quote
them) is untrusted: it goes inside ``<pre>`` blocks with ``<``, ``>`` and ``&`` escaped, so no
markup, link or image in an alert is ever rendered by the ticketing system.

A finding's *record* — what the connector compares an operator's closing fields against — is a
separate private note: one line ``agentjobs-record: <JSON>``. It holds the agent's cause,
summary, severity and proposed actions, plus the scope and phase of our own record, nothing else.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable

import msgspec

from schemas import Finding, LifecycleEvent, LifecycleState, Phase, Severity

RECORD_PREFIX = "agentjobs-record: "
_MARKER = re.compile(r"\(agentjobs op ([A-Za-z0-9:._@-]{1,300})\)\s*$")
_EXCERPT = 600  # characters of one evidence excerpt a ticket shows
_EVIDENCE_PER_HYPOTHESIS = 3


class FindingRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What the ticket's verdict is compared against: the finding as the agent gave it."""

    investigation_id: str
    idempotency_key: str
    probable_cause: str
    summary: str = ""
    severity: Severity = Severity.WARNING
    domain: str = ""
    scope: str = ""  # the trust scope (our record); the domain when the dispatcher named none
    phase: Phase = Phase.SHADOW
    actions: tuple[str, ...] = ()  # "action target"
    confidence: float = 0.0


_record_encoder = msgspec.json.Encoder()
_record_decoder = msgspec.json.Decoder(FindingRecord)


def record_of(finding: Finding, *, scope: str = "") -> FindingRecord:
    return FindingRecord(
        investigation_id=finding.investigation_id, idempotency_key=finding.idempotency_key,
        probable_cause=finding.probable_cause, summary=finding.summary, severity=finding.severity,
        domain=finding.domain, scope=scope or finding.domain, phase=finding.phase,
        actions=action_lines(finding), confidence=finding.confidence,
    )


def record_text(record: FindingRecord) -> str:
    return RECORD_PREFIX + _record_encoder.encode(record).decode()


def parse_record(text: str) -> FindingRecord | None:
    """The record in a note's text, or None (not a record, or not one we can read)."""
    for line in text.splitlines():
        if line.startswith(RECORD_PREFIX):
            try:
                return _record_decoder.decode(line[len(RECORD_PREFIX):])
            except (msgspec.DecodeError, msgspec.ValidationError):
                return None
    return None


def with_marker(text: str, op_id: str) -> str:
    """``text`` with the operation's id on its last line: written once, found again after a crash."""
    return f"{text.rstrip()}\n\n(agentjobs op {op_id})"


def marker_of(text: str) -> str | None:
    found = _MARKER.search(text or "")
    return found.group(1) if found else None


def untrusted(text: str) -> str:
    """Text from alerts or tools, shown verbatim and never as markup."""
    return f"<pre>{html.escape(text.strip(), quote=False)}</pre>" if text.strip() else ""


def action_lines(finding: Finding) -> tuple[str, ...]:
    """Proposed actions as the ticket's actions field holds them: ``action target``, one per line."""
    return tuple(f"{a.action} {a.target}".strip() for a in finding.proposed_actions)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def opening_description(event: LifecycleEvent) -> str:
    """The ticket's description when the dispatcher opens it (``dispatched``)."""
    lines = [
        f"agentjobs investigation {event.investigation_id} (Job {event.job_name or '?'}), "
        f"phase {event.phase.value if event.phase else '?'}, scope {event.scope or event.domain or '?'}.",
        f"Severity: {event.severity.value if event.severity else '?'}; domain: {event.domain or '?'}; "
        f"alerts: {event.alert_count}.",
    ]
    if event.follows:
        lines.append(f"A follow-up of investigation {event.follows} (new alerts joined the group after it ended).")
    if event.alerts:
        lines += ["", "Alerts (as their sender wrote them):", untrusted(alert_text(event))]
        if event.alert_count > len(event.alerts):
            lines.append(f"… and {event.alert_count - len(event.alerts)} more.")
    lines += ["", "The finding follows as a note when the agent concludes."]
    return "\n".join(lines)


def alert_text(event: LifecycleEvent) -> str:
    out = []
    for a in event.alerts:
        labels = " ".join(f"{k}={v}" for k, v in a.labels.items() if k != "alertname")
        since = f" since {a.starts_at.isoformat()}" if a.starts_at else ""
        out.append(f"[{a.status}] {a.name}{since} {labels}".rstrip())
        if a.summary:
            out.append(f"    {a.summary}")
    return "\n".join(out)


def finding_note(finding: Finding) -> str:
    """The finding as a ticket note: ranked hypotheses with evidence, actions, cost."""
    head = (f"Finding ({finding.reasoner or 'agent'}, {finding.conclusion.value}, confidence "
            f"{finding.confidence:.2f}, phase {finding.phase.value})")
    lines = [head, "", "Summary and probable cause (the agent's words):",
             untrusted(f"{finding.summary}\n\nProbable cause: {finding.probable_cause}")]
    if finding.hypotheses:
        lines += ["", "Hypotheses, most probable first:"]
        for rank, h in enumerate(finding.hypotheses, 1):
            lines.append(f"{rank}. {h.cause} (score {h.score:.2f})")
            body = [h.statement] if h.statement else []
            body += [f"for: [{e.source}] {_cut(e.query, 200)} → {_cut(e.excerpt, _EXCERPT)}"
                     for e in h.evidence_for[:_EVIDENCE_PER_HYPOTHESIS]]
            body += [f"against: [{e.source}] {_cut(e.query, 200)} → {_cut(e.excerpt, _EXCERPT)}"
                     for e in h.evidence_against[:_EVIDENCE_PER_HYPOTHESIS]]
            if body:
                lines.append(untrusted("\n".join(body)))
    elif finding.evidence:
        lines += ["", "Evidence:", untrusted("\n".join(
            f"[{e.source}] {_cut(e.query, 200)} → {_cut(e.excerpt, _EXCERPT)}" for e in finding.evidence[:5]))]
    if finding.proposed_actions:
        lines += ["", "Actions:"]
        for a in finding.proposed_actions:
            state = "EXECUTED" if a.executed else "proposed"
            lines.append(f"* {state}: {a.action} {a.target} (risk {a.risk.value})".rstrip())
    lines += ["", cost_line(finding)]
    if finding.supersedes:
        lines.append(f"Supersedes finding {finding.supersedes}.")
    return "\n".join(lines)


def cost_line(finding: Finding) -> str:
    c = finding.cost
    parts = [f"{c.tool_calls} tool calls", f"{c.cpu_seconds:.2f} CPU-s", f"{c.wall_seconds:.1f} s wall"]
    tokens = c.llm_prompt_tokens + c.llm_completion_tokens
    if tokens or c.llm_model:
        parts.insert(0, f"{tokens} LLM tokens ({c.llm_model or 'model'}, ${c.llm_price_usd:.4f})")
    return "Cost: " + ", ".join(parts) + "."


def lifecycle_note(event: LifecycleEvent) -> str:
    """A lifecycle event as a ticket note (failed, cancelled, resolved, attached)."""
    state = event.state
    if state is LifecycleState.FAILED:
        text = f"Investigation failed: {event.reason.value if event.reason else 'unknown reason'}."
    elif state is LifecycleState.CANCELLED:
        text = (f"Investigation cancelled ({event.reason.value})." if event.reason
                else "Investigation cancelled.")
    elif state is LifecycleState.RESOLVED:
        text = "The alert group resolved. An operator closes the ticket, with the root cause they found."
    elif state is LifecycleState.ATTACHED:
        text = f"{event.alert_count} alerts in the group now; the running investigation takes them in."
    else:
        text = f"Investigation {state.value}."
    details = [untrusted(event.message)] if event.message else []
    if state is LifecycleState.ATTACHED and event.alerts:
        details.append(untrusted(alert_text(event)))
    return "\n".join([text, *details])


def lines_of(field: str | None) -> tuple[str, ...] | None:
    """A multi-line ticket field as lines (None: not recorded)."""
    if field is None:
        return None
    return tuple(line.strip(" *-\t") for line in field.splitlines() if line.strip(" *-\t"))


def join_lines(items: Iterable[str]) -> str:
    return "\n".join(items)
