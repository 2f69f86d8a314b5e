"""What ``agentjobs up`` shows: investigations, recent outcomes, findings and phases.

``Board`` is fed the messages that appear on ``agentjobs.results`` and
``agentjobs.phases`` (through an exclusive copy queue, never a real consumer's)
and keeps a small picture of them: the investigations still running, the last
outcomes, where findings went, the remediation actions decided (a line per
``ActionRecord`` — published on its own, or carried in a finding's actions) and the phase
per scope. ``observe`` returns the
readable line for a message (for logs and non-terminal output); ``table``
renders the picture for a rich live view. Both are pure over the board's state.
``action_summary`` says in one sentence what the agent did about what (executed: what it saw
before, what verification saw after, how to undo it; otherwise why not), and
``actions_summary`` closes a demo with it — or with how to let the agent act when nothing ran.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from datetime import datetime

from rich.markup import escape
from rich.table import Table

from schemas import ActionRecord, Finding, LifecycleEvent, LifecycleState, Phase, PhaseChanged
from schemas.actions import ACTED, records_for
from schemas.routing import action_key

RECENT = 8  # outcomes kept for the table
RUNNING_SHOWN = 12  # running investigations listed (the rest are counted)


@dataclass
class Row:
    job_name: str
    phase: str
    state: str
    since: datetime
    finding: str = ""


class Board:
    def __init__(self, default_phase: Phase) -> None:
        self.default_phase = default_phase
        self.running: OrderedDict[str, Row] = OrderedDict()  # investigation id → row
        self.recent: deque[Row] = deque(maxlen=RECENT)
        self.dispatched: set[str] = set()
        self.ended: dict[str, str] = {}  # investigation id → terminal state
        self.findings: dict[str, Finding] = {}
        self.phases: dict[str, str] = {}  # scope → phase
        self.finding_keys: set[str] = set()  # routing keys findings were published with
        self.actions: deque[ActionRecord] = deque(maxlen=RECENT)  # newest first
        self.action_ids: set[str] = set()  # records shown (a record and its finding's copy count once)
        self.action_outcomes: dict[str, int] = {}

    def observe(self, message: object, routing_key: str) -> str | None:
        """Take one message into the picture; the line worth printing for it, if any."""
        if isinstance(message, LifecycleEvent):
            return self._lifecycle(message)
        if isinstance(message, Finding) and message.reasoner != "dispatcher":
            self.findings[message.investigation_id] = message
            self.finding_keys.add(routing_key)
            row = self.running.get(message.investigation_id)
            if row is not None:
                row.finding = message.summary
            lines = [f"  finding     {routing_key}: {message.summary[:90]} (confidence {message.confidence:.2f})"]
            if message.produced_at is not None:
                lines += [line for r in records_for(message) if (line := self._action(r)) is not None]
            return "\n".join(lines)
        if isinstance(message, ActionRecord):
            return self._action(message)
        if isinstance(message, PhaseChanged):
            self.phases[message.scope] = message.to_phase.value
            return f"  phase       {message.scope}: {message.from_phase or '-'} → {message.to_phase} ({message.reason})"
        return None

    def _action(self, record: ActionRecord) -> str | None:
        if record.record_id in self.action_ids:
            return None
        self.action_ids.add(record.record_id)
        self.actions.appendleft(record)
        self.action_outcomes[record.outcome] = self.action_outcomes.get(record.outcome, 0) + 1
        undo = f"; undo: {record.undo[:60]}" if record.undo and record.outcome in ACTED else ""
        return (f"  action      {action_key(record.outcome, record.domain)}: {record.action} {record.target}"
                f" ({record.reason[:90]}{undo})")

    def _lifecycle(self, event: LifecycleEvent) -> str | None:
        key = event.investigation_id
        phase = event.phase.value if event.phase else "-"
        if event.state is LifecycleState.DISPATCHED and key not in self.dispatched:
            self.dispatched.add(key)
            self.running[key] = Row(event.job_name, phase, "dispatched", event.at)
            return f"  dispatched  {event.job_name}  (phase {phase})"
        if event.state is LifecycleState.STARTED and key in self.running:
            self.running[key].state = "running"
            return None
        if event.state.terminal and key not in self.ended:
            self.ended[key] = event.state.value
            row = self.running.pop(key, None) or Row(event.job_name, phase, "", event.at)
            row.state = event.state.value + (f" ({event.reason.value})" if event.reason else "")
            row.since = event.at
            finding = self.findings.get(key)
            if finding is not None:
                row.finding = finding.summary
            self.recent.appendleft(row)
            return f"  {row.state:<10}  {event.job_name}"
        return None

    def done(self, expected: int) -> bool:
        """At least ``expected`` investigations ended, and every one dispatched has ended."""
        return len(self.ended) >= expected and self.ended.keys() >= self.dispatched

    def outcomes(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for state in self.ended.values():
            counts[state] = counts.get(state, 0) + 1
        return counts

    def table(self, now: datetime) -> Table:
        """The live view: running investigations first, then recent outcomes, then phases."""
        phases = ", ".join(f"{scope}={phase}" for scope, phase in sorted(self.phases.items()))
        acted = ", ".join(f"{outcome} {n}" for outcome, n in sorted(self.action_outcomes.items()))
        table = Table(
            title=f"agentjobs — {len(self.running)} running, {len(self.ended)} ended",
            caption=f"phases: {phases or f'all scopes {self.default_phase.value}'}"
                    + (f" · findings → {', '.join(sorted(self.finding_keys))}" if self.finding_keys else "")
                    + (f" · actions: {acted}" if acted else ""),
            expand=True,
        )
        table.add_column("investigation", no_wrap=True, overflow="ellipsis", max_width=32)
        table.add_column("phase", no_wrap=True, min_width=6)
        table.add_column("state", no_wrap=True, min_width=9)
        table.add_column("age", no_wrap=True, justify="right", min_width=5)
        table.add_column("finding", no_wrap=True, overflow="ellipsis", ratio=1)
        rows = list(self.running.values())
        for row in rows[:RUNNING_SHOWN]:
            table.add_row(row.job_name, row.phase, f"[cyan]{row.state}[/]", _age(now, row.since), row.finding)
        if len(rows) > RUNNING_SHOWN:
            table.add_row(f"… {len(rows) - RUNNING_SHOWN} more running", "", "", "", "")
        for row in self.recent:
            colour = {"succeeded": "green", "failed": "red"}.get(row.state.split(" ")[0], "yellow")
            table.add_row(row.job_name, row.phase, f"[{colour}]{row.state}[/]", _age(now, row.since), row.finding)
        for record in self.actions:
            colour = "green" if record.outcome in ACTED else "red" if record.outcome.startswith(("refused",
                                                                                                "failed")) else "yellow"
            table.add_row(f"↳ {escape(record.action)}", record.phase.value, f"[{colour}]{escape(record.outcome)}[/]",
                          _age(now, record.at), escape(_action_cell(record)))
        return table

    def actions_summary(self) -> list[str]:
        """Lines closing a demo: one ``action_summary`` per action seen, executed ones first; when none
        was executed, which phase kept it so and the command that lets the agent act (pure)."""
        records = sorted(self.actions, key=lambda r: (r.outcome not in ACTED, r.at))
        lines = [action_summary(r) for r in records]
        if any(r.outcome in ACTED for r in records):
            return lines
        if any(r.outcome == "refused_kill_switch" for r in records):
            lines.append("nothing was executed: the kill switch is off (`agentjobs actions status`; "
                         "`agentjobs actions enable --reason ...` turns it back on)")
        elif held := sorted({(r.domain or "-", r.phase.value) for r in records
                             if r.outcome in ("record_only", "propose_only")}):
            phases = ", ".join(f"{scope} {phase}" for scope, phase in held)
            lines.append(f"nothing was executed (phase: {phases}): `agentjobs phase pin {held[0][0]} autonomous "
                         "--reason demo` lets the agent run medium-risk actions such as terminate_backend "
                         "(`agentjobs actions disable` stops them all)")
        return lines


def action_summary(record: ActionRecord) -> str:
    """One sentence for an operator about one ActionRecord (pure): what was done to what, in which
    phase; for an executed action what the agent saw before, what verification saw after and how
    to undo it; otherwise the outcome and why."""
    what = f"{record.action} {record.target}".strip()
    if record.outcome in ACTED:
        verified = "verified" if record.outcome == "executed_verified" else "NOT verified"
        line = f"EXECUTED {what} (phase {record.phase.value}, {verified})"
        if record.before:
            line += f" — before: {_clip(record.before, 200)}"
        line += f" — after: {_clip(record.after or record.reason, 200)}"
        return line + f" — undo: {_clip(record.undo or 'not recorded', 120)}"
    return f"not executed ({record.outcome}): {what} (phase {record.phase.value}) — {_clip(record.reason, 200)}"


def _action_cell(record: ActionRecord) -> str:
    """The table's last column: for an executed action what verification saw and the undo, else why not."""
    if record.outcome in ACTED:
        return f"{record.target}: {record.after or record.reason}" + (f" · undo: {record.undo}" if record.undo else "")
    return f"{record.target}: {record.reason}"


def _clip(text: str, n: int) -> str:
    """``text`` on one line, cut at a word boundary to at most ``n`` characters, with … when cut (pure)."""
    flat = " ".join(text.split())
    if len(flat) <= n:
        return flat
    cut = flat[: n - 1].rsplit(" ", 1)[0] if " " in flat[: n - 1] else flat[: n - 1]
    return cut.rstrip(" ,;:") + "…"


def _age(now: datetime, since: datetime) -> str:
    seconds = max(0, int((now - since).total_seconds()))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
