"""``agentjobs actions list|approve``: proposals awaiting an operator, and approving one.

``list`` replays the action log (``agentjobs.action-log``, read only, as the operator) the way the
dispatcher does and shows each proposal its phase did not allow — what, where, why (the agent's
rationale), how old, until when it can be approved. ``approve`` checks the same view first (a clear
error for an unknown, ambiguous or expired proposal), publishes an ``ApproveAction`` on
``agentjobs.control`` as the operator, and waits for the dispatcher's answer: the ``approved``
record (with the follow-up Job that runs it) or the refusal (``approval_refused``, or the dead
letter saying why the command was refused).
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime, timedelta
from typing import Any

import aio_pika
import msgspec

from schemas import ActionRecord, ApproveAction, DeadLetter, DecodeError, decode, encode
from schemas.actions import APPROVAL_REFUSED, APPROVED
from schemas.routing import ACTION_LOG, CONTROL, RESULTS
from schemas.errors import TemporaryError

from dispatcher.cli.ops import OpsError, _connect, _exchange, _url
from dispatcher.intake.actions_log import ActionLog, Proposal, expired, pick
from dispatcher.intake.approvals import Verdict, decide
from dispatcher.plumbing.amqp import broker_user
from dispatcher.plumbing.settings import ActionsSettings, Settings


async def action_log(settings: Settings) -> ActionLog:
    """The dispatcher's view of proposals and approvals, replayed from the action log (read only)."""
    from dispatcher.plumbing.streamlog import StreamFollower

    view = ActionLog(settings=settings.actions, identities=settings.identities)
    connection = await _connect(settings)
    async with connection:
        await _exchange(connection, RESULTS)  # the dispatcher ran here: its log exists
        follower = StreamFollower(ACTION_LOG, view.on_log_entry, name="action-log")
        await follower.start(connection)
        try:
            await follower.catch_up(connection, timeout=30, read_only=True)
        except TemporaryError as exc:
            raise OpsError(f"could not read the action log: {exc.message}") from None
        finally:
            await follower.stop()
    return view


def row(proposal: Proposal, *, now: datetime, ttl: timedelta) -> dict[str, Any]:
    """One proposal as ``list`` shows it (pure)."""
    r = proposal.record
    state = "approved" if proposal.approval_id else ("expired" if expired(proposal, now=now, ttl=ttl) else "pending")
    return {"investigation_id": r.investigation_id, "action": r.action, "target": r.target, "risk": r.risk.value,
            "phase": r.phase.value, "domain": r.domain, "decision": r.decision, "state": state,
            "proposed_at": proposal.at.isoformat(), "age_s": int((now - proposal.at).total_seconds()),
            "approvable_until": (proposal.at + ttl).isoformat(), "rationale": r.rationale, "reason": r.reason,
            "params": dict(r.params), "key": r.idempotency_key, "approval_id": proposal.approval_id}


def render(item: dict[str, Any]) -> str:
    """Human lines for one row (pure)."""
    head = (f"{item['investigation_id'][:16]}  {item['action']} {item['target']}  [{item['risk']}, "
            f"proposed in {item['phase']}, {item['state']}, {item['age_s']} s old]")
    lines = [head]
    if item["rationale"]:
        lines.append(f"    why: {item['rationale'][:400]}")
    if item["params"]:
        lines.append("    params: " + ", ".join(f"{k}={v}" for k, v in sorted(item["params"].items()))[:400])
    lines.append(f"    approve: agentjobs actions approve {item['investigation_id']} {item['action']} --reason ...")
    return "\n".join(lines)


def check(view: ActionLog, command: ApproveAction, *, settings: ActionsSettings, now: datetime) -> Proposal:
    """The proposal ``command`` approves, or ``OpsError`` saying why not — the dispatcher's own
    ``decide`` on the same log (the dispatcher decides again when the command arrives)."""
    found = pick(view.proposals(), command.investigation_id, command.action)
    if isinstance(found, str):
        raise OpsError(found)
    decision = decide(found, command, settings=settings, now=now)
    if decision.verdict is Verdict.APPROVED_BEFORE:
        raise OpsError(f"{found.record.action} of {command.investigation_id} was approved already: {decision.reason}")
    if decision.verdict is not Verdict.RUN:
        raise OpsError(decision.reason)
    return found


def answer_to(body: bytes, approval_id: str) -> ActionRecord | DeadLetter | None:
    """The dispatcher's answer to approval ``approval_id``, if ``body`` is one (pure)."""
    with contextlib.suppress(DecodeError):
        got = decode(body, ActionRecord | DeadLetter)
        if isinstance(got, ActionRecord) and got.approval_id == approval_id and got.outcome in (APPROVED,
                                                                                               APPROVAL_REFUSED):
            return got
        if isinstance(got, DeadLetter) and got.message_id == approval_id:
            return got
    return None


async def approve(settings: Settings, command: ApproveAction, *, wait: float) -> ActionRecord | DeadLetter | None:
    """Publish the approval (confirmed) and wait up to ``wait`` s for the dispatcher's answer."""
    connection = await _connect(settings)
    async with connection:
        channel, exchange = await _exchange(connection, CONTROL, confirms=True)
        watch = await channel.declare_queue(exclusive=True, auto_delete=True)
        for key in (f"action.{APPROVED}.#", f"action.{APPROVAL_REFUSED}.#", "deadletter.#"):
            await watch.bind(RESULTS, key)
        answered: asyncio.Future[ActionRecord | DeadLetter] = asyncio.get_running_loop().create_future()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            got = answer_to(message.body, command.approval_id)
            if got is not None and not answered.done():
                answered.set_result(got)

        await watch.consume(on_message, no_ack=True)
        await exchange.publish(
            aio_pika.Message(encode(command), delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                             user_id=broker_user(_url(settings, "operator")), message_id=command.approval_id,
                             content_type="application/json", type="approve_action"),
            "approve", mandatory=True, timeout=settings.amqp.publish_timeout)
        try:
            return await asyncio.wait_for(answered, wait)
        except TimeoutError:
            return None


def answer_line(got: ActionRecord | DeadLetter | None, command: ApproveAction, wait: float) -> tuple[str, bool]:
    """(what to print, whether the approval was accepted) (pure)."""
    if got is None:
        return (f"approval {command.approval_id} sent; no dispatcher answered within {wait:g} s — is "
                "`agentjobs up` (or the dispatcher) running? `agentjobs tail actions` shows when it lands"), False
    if isinstance(got, DeadLetter):
        return f"approval refused ({got.reason}): {got.message}", False
    if got.outcome == APPROVED:
        return f"{got.action} {got.target}: {got.reason}", True
    return f"approval refused: {got.reason}", False


def as_json(items: list[dict[str, Any]]) -> str:
    return msgspec.json.encode(items).decode()
