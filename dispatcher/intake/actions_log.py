"""What agents executed in the last hour, and what the next Job of a scope may still do.

The agents' ``action.executed_verified.*`` / ``action.executed_not_verified.*`` ActionRecords on
``agentjobs.results`` are copied into the stream ``agentjobs.action-log``; ``ActionLog`` follows it
like the phase log (a ``StreamFollower`` from the first offset, so a restarted dispatcher replays
the last hour before it launches anything), applying only records whose broker-validated
``user_id`` is an agent user of this installation — a record from anyone else is counted as
refused and never applied.

At launch, ``ActionLog.grant`` computes the Job's allowance with the pure ``allowance``:

    min(max_per_investigation, max_per_scope_per_hour − executions of the scope in the last hour
        − reservations of the scope)

where a reservation is what a launched, still-running Job of the scope in a phase that may act
(limited remediation, autonomous) was granted and has not reported as executed yet — released
when its records arrive or the Job ends (the tracker marks it finished; ``ENDED_GRACE`` later,
for a record still on its way) — so Jobs running at the same time cannot together exceed the
hourly cap. Computing and reserving are one synchronous step
(no other launch runs in between). Only phases that may act get anything: shadow and read-only
Jobs get allowance 0 and empty allow-lists. With the allowance go the scope's allow-lists
(``[actions.scopes]``) and the targets whose per-target hourly cap is reached (``exhausted``;
targets are the agents' ``limit_target`` param, see ``agent/remediation/limits.py``).

A record's scope is the one its investigation was launched in when this process launched it,
else the record's domain (the default trust scope label is the domain label). Reservations of
Jobs launched by another replica, or before a restart, are not known here: only their reported
executions count.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from aio_pika.abc import AbstractIncomingMessage

from dispatcher.intake import senders
from dispatcher.jobs.jobspec import ActionGrant
from dispatcher.plumbing.settings import ActionsSettings, IdentitySettings
from schemas import ActionRecord, DecodeError, Phase, decode, utcnow
from schemas.actions import APPROVABLE, APPROVED
from schemas.logs import get_logger

log = get_logger("agentjobs.actions_log")

ACTING = frozenset({Phase.LIMITED_REMEDIATION, Phase.AUTONOMOUS})  # the phases whose Jobs may act
EXECUTED = frozenset({"executed_verified", "executed_not_verified"})
WINDOW = timedelta(hours=1)
LIMIT_TARGET = "limit_target"  # == agent.remediation.limits.LIMIT_TARGET: the record param naming the target
# A Job's records are published before it ends, but may be read from the log after the watcher saw
# it end: its reservation outlives it by this much, so the two never both go uncounted.
ENDED_GRACE = timedelta(seconds=30)
KNOWN_SCOPES = 10_000  # investigations whose launch scope is remembered (their records may come late)


@dataclass(frozen=True, kw_only=True)
class Executed:
    """One execution an agent reported."""

    scope: str
    at: datetime
    target: str = ""
    investigation_id: str = ""


def recent(executed: Iterable[Executed], now: datetime, window: timedelta = WINDOW) -> list[Executed]:
    """The executions within ``window`` before ``now`` (pure; one dated later than now counts too)."""
    return [e for e in executed if e.at > now - window]


def allowance(actions: ActionsSettings, *, scope: str, phase: Phase, executed: Iterable[Executed],
              reserved: int = 0, now: datetime) -> int:
    """Destructive executions the next Job of ``scope`` in ``phase`` may carry out (pure)."""
    if phase not in ACTING or actions.max_per_target_per_hour <= 0:
        return 0
    done = sum(1 for e in recent(executed, now) if e.scope == scope)
    return max(0, min(actions.max_per_investigation, actions.max_per_scope_per_hour - done - reserved))


def exhausted(actions: ActionsSettings, executed: Iterable[Executed], now: datetime) -> tuple[str, ...]:
    """Targets executed on ``max_per_target_per_hour`` times or more within the last hour, sorted (pure)."""
    counts: dict[str, int] = {}
    for e in recent(executed, now):
        if e.target:
            counts[e.target] = counts.get(e.target, 0) + 1
    return tuple(sorted(t for t, n in counts.items() if n >= actions.max_per_target_per_hour))


def grant_for(actions: ActionsSettings, *, scope: str, phase: Phase, executed: Iterable[Executed],
              reserved: int = 0, now: datetime) -> ActionGrant:
    """What a Job of ``scope`` in ``phase`` is handed (pure): nothing unless its phase may act."""
    if phase not in ACTING:
        return ActionGrant(max_per_investigation=actions.max_per_investigation)
    executed = list(executed)
    lists = actions.scope(scope)
    return ActionGrant(
        allowance=allowance(actions, scope=scope, phase=phase, executed=executed, reserved=reserved, now=now),
        max_per_investigation=actions.max_per_investigation,
        namespaces=tuple(sorted(set(lists.namespaces))), databases=tuple(sorted(set(lists.databases))),
        exhausted_targets=exhausted(actions, executed, now),
    )


def agent_user(ids: IdentitySettings, user_id: str) -> senders.Refusal | None:
    """None if ``user_id`` is an agent user of this installation (not the dispatcher: it executes nothing)."""
    refused = senders.any_agent_or_dispatcher(ids, user_id, "action records")
    if refused is None and user_id == ids.dispatcher:
        return senders.Refusal(reason=senders.FORBIDDEN, detail=f"{user_id!r} may not report executions "
                                                                  "(allowed: an agent user)")
    return refused


@dataclass(frozen=True, kw_only=True)
class Proposal:
    """An action an agent proposed that its phase did not allow: an operator may approve it."""

    record: ActionRecord
    at: datetime  # when it was proposed: the record's time, never later than when it was read
    approval_id: str = ""  # once approved: which approval (the first)
    approved_at: datetime | None = None


def pick(proposals: Iterable[Proposal], investigation_id: str, action: str) -> Proposal | str:
    """The proposal ``action`` names in ``investigation_id`` — by registry name if it proposed that
    action once, else by the record's idempotency key — or why none can be picked (pure)."""
    mine = [p for p in proposals if p.record.investigation_id == investigation_id]
    if not mine:
        return f"investigation {investigation_id} has no proposal awaiting approval (in the action log's last hour)"
    by_key = [p for p in mine if p.record.idempotency_key == action]
    if by_key:
        return by_key[0]
    named = [p for p in mine if p.record.action == action]
    if len(named) == 1:
        return named[0]
    if named:
        keys = ", ".join(p.record.idempotency_key for p in named)
        return f"investigation {investigation_id} proposed {action} {len(named)} times: name one by key ({keys})"
    have = ", ".join(sorted({p.record.action for p in mine}))
    return f"investigation {investigation_id} proposed no {action} (it proposed: {have})"


def expired(proposal: Proposal, *, now: datetime, ttl: timedelta) -> bool:
    """A proposal older than ``ttl`` can no longer be approved: what it saw is too old (pure)."""
    return now - proposal.at > ttl


@dataclass(kw_only=True)
class Reservation:
    scope: str
    granted: int
    reported: int = 0  # executions of this investigation that arrived since
    launched: bool = False  # the Job exists (then it counts while it runs); before: a launch in progress
    ended: datetime | None = None  # when it was first seen not running


@dataclass(kw_only=True)
class ActionLog:
    """Executions by scope and target from the action log; reservations of the Jobs this process launched."""

    settings: ActionsSettings
    identities: IdentitySettings
    running: Callable[[str], bool] = lambda investigation_id: True  # is this investigation's Job still running?
    clock: Callable[[], datetime] = utcnow
    on_refused: Callable[[], None] | None = None
    refused: int = 0
    _executed: deque[Executed] = field(default_factory=deque)
    _seen: dict[str, datetime] = field(default_factory=dict)  # record ids applied → at (duplicates)
    _reservations: dict[str, Reservation] = field(default_factory=dict)
    _scopes: OrderedDict[str, str] = field(default_factory=OrderedDict)  # investigation → launch scope
    _proposals: dict[str, Proposal] = field(default_factory=dict)  # proposal idempotency key → proposal

    # -- the log ----------------------------------------------------------------------------

    def on_log_entry(self, message: AbstractIncomingMessage) -> None:
        try:
            record = decode(message.body, ActionRecord)
        except DecodeError:
            return  # markers and foreign messages are not records
        user = message.user_id or ""
        if record.outcome == APPROVED:  # the dispatcher's own record of an approval it accepted
            refused = senders.one_of(user, [self.identities.dispatcher], "approval records")
        else:
            refused = agent_user(self.identities, user)
        if refused is not None:
            self.refused += 1
            if self.on_refused is not None:
                self.on_refused()
            log.warning("action_record_refused", reason=refused.reason, detail=refused.detail,
                        investigation_id=record.investigation_id[:64], outcome=record.outcome[:64])
            return
        if record.outcome in APPROVABLE:
            self.propose(record)
        elif record.outcome == APPROVED:
            self.approved(record)
        else:
            self.apply(record)

    # -- proposals and approvals --------------------------------------------------------------

    def propose(self, record: ActionRecord) -> None:
        """Keep a proposal an operator may approve (the first copy of each key; newer than the window)."""
        now = self.clock()
        self._prune_proposals(now)
        at = min(record.at, now)  # a record dated ahead is as old as when it was read
        if record.idempotency_key in self._proposals or now - at > self.proposal_window:
            return
        self._proposals[record.idempotency_key] = Proposal(record=record, at=at)

    def approved(self, record: ActionRecord) -> None:
        """The dispatcher accepted an approval of this proposal (its record, replayed or just published)."""
        held = self._proposals.get(record.idempotency_key)
        if held is not None and not held.approval_id:
            self._proposals[record.idempotency_key] = Proposal(record=held.record, at=held.at,
                                                               approval_id=record.approval_id,
                                                               approved_at=record.at)

    def scope_for(self, record: ActionRecord) -> str:
        """The scope ``record``'s investigation was launched in here, else its domain."""
        return self._scopes.get(record.investigation_id) or record.domain

    def proposals(self) -> list[Proposal]:
        """Proposals of the window, approved or not, oldest first."""
        self._prune_proposals(self.clock())
        return sorted(self._proposals.values(), key=lambda p: p.at)

    def pending(self) -> list[Proposal]:
        """Proposals still awaiting approval and not expired, oldest first."""
        now = self.clock()
        ttl = timedelta(seconds=self.settings.proposal_ttl)
        return [p for p in self.proposals() if not p.approval_id and not expired(p, now=now, ttl=ttl)]

    @property
    def proposal_window(self) -> timedelta:
        """How long proposals are kept: their ttl, and an hour more to tell a late approval it expired."""
        return timedelta(seconds=self.settings.proposal_ttl) + WINDOW

    def _prune_proposals(self, now: datetime) -> None:
        window = self.proposal_window
        for key in [k for k, p in self._proposals.items() if now - p.at > window]:
            del self._proposals[key]

    def apply(self, record: ActionRecord) -> bool:
        """Count an execution (once per record id); False if it is none, a duplicate or older than the window."""
        now = self.clock()
        self._prune(now)
        if record.outcome not in EXECUTED or record.record_id in self._seen or record.at <= now - WINDOW:
            return False
        self._seen[record.record_id] = record.at
        scope = self._scopes.get(record.investigation_id) or record.domain
        self._executed.append(Executed(scope=scope, at=record.at, target=record.params.get(LIMIT_TARGET, ""),
                                       investigation_id=record.investigation_id))
        held = self._reservations.get(record.investigation_id)
        if held is not None:
            held.reported += 1
        log.info("action_execution_counted", scope=scope[:64], investigation_id=record.investigation_id[:64],
                 action=record.action[:64])
        return True

    def executed(self) -> list[Executed]:
        self._prune(self.clock())
        return list(self._executed)

    # -- launches ---------------------------------------------------------------------------

    def reserved(self, scope: str) -> int:
        """What running (or launching) Jobs of ``scope`` were granted and have not reported yet."""
        self._release_ended()
        return sum(max(0, r.granted - r.reported) for r in self._reservations.values() if r.scope == scope)

    def grant(self, investigation_id: str, *, scope: str, phase: Phase) -> ActionGrant:
        """The Job's grant, reserved at once (no other launch can be granted the same executions)."""
        self._release(investigation_id)  # a relaunch of the same investigation replaces its reservation
        g = grant_for(self.settings, scope=scope, phase=phase, executed=self.executed(),
                      reserved=self.reserved(scope), now=self.clock())
        self._scopes[investigation_id] = scope
        self._scopes.move_to_end(investigation_id)
        while len(self._scopes) > KNOWN_SCOPES:
            self._scopes.popitem(last=False)
        if g.allowance > 0:
            self._reservations[investigation_id] = Reservation(scope=scope, granted=g.allowance)
        return g

    def launched(self, investigation_id: str, *, created: bool) -> None:
        """The launch ended: the Job we built exists (its reservation holds while it runs), or not (released)."""
        held = self._reservations.get(investigation_id)
        if held is None:
            return
        if created:
            held.launched = True
        else:
            self._release(investigation_id)

    def _release(self, investigation_id: str) -> None:
        self._reservations.pop(investigation_id, None)

    def _release_ended(self) -> None:
        now = self.clock()
        for inv, held in list(self._reservations.items()):
            if not held.launched or self.running(inv):
                continue
            if held.ended is None:
                held.ended = now
            if now - held.ended >= ENDED_GRACE or held.reported >= held.granted:
                self._release(inv)

    def _prune(self, now: datetime) -> None:
        while self._executed and self._executed[0].at <= now - WINDOW:
            self._executed.popleft()
        if len(self._seen) > 4 * max(1, len(self._executed)) + 1024:
            self._seen = {k: at for k, at in self._seen.items() if at > now - WINDOW}
