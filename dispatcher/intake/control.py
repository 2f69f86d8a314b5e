"""Handlers for the dispatcher's side queues: operator commands and the dead-letter log.

``ControlHandler`` executes ``CancelInvestigation`` commands (the Job is
deleted / the process killed; the watcher then reports ``cancelled``).
``DeadLetterRecorder`` reads a copy of every dead letter and publishes its
``DeadLetter`` record to the results exchange, so an operator learns why a
message died — including messages the broker dead-lettered on its own.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from schemas import CancelInvestigation, CredentialsIssued, decode, utcnow
from schemas.errors import DecodeError, PermanentError

from dispatcher.jobs import jobspec
from dispatcher.plumbing.amqp import Publisher
from dispatcher.credentials.tokens import Credentials
from dispatcher.intake.deadletters import HEADER_RECORD, Delivery, dead_letter, explain, from_error
from dispatcher.intake.incidents import Outcome
from schemas.logs import get_logger
from dispatcher.plumbing.metrics import Metrics
from dispatcher.intake.reporting import Reporter
from dispatcher.plumbing.retry import Backoff, RetriesExhausted, retry
from dispatcher.jobs.runtime import JobRuntime

log = get_logger("agentjobs.control")


async def reject(
    publisher: Publisher, delivery: Delivery, error: PermanentError, *, backoff: Backoff, at: datetime,
    component: str,
) -> Outcome:
    """Dead-letter an invalid message with its reason (ACK), or hand it back if that fails."""
    record = from_error(delivery, error, at=at, component=component)
    try:
        await retry(lambda: dead_letter(publisher, delivery, record), backoff)
    except RetriesExhausted:
        return Outcome.REQUEUE
    log.warning("message_dead_lettered", component=component, reason=error.reason, detail=error.message)
    return Outcome.ACK


class ControlHandler:
    def __init__(
        self, *, runtime: JobRuntime, publisher: Publisher, backoff: Backoff | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.runtime = runtime
        self.publisher = publisher
        self.backoff = backoff or Backoff()
        self.clock = clock

    async def handle(self, delivery: Delivery) -> Outcome:
        try:
            command = decode(delivery.body, CancelInvestigation)
        except DecodeError as exc:
            return await reject(self.publisher, delivery, exc, backoff=self.backoff,
                                at=self.clock(), component="dispatcher.intake.control")
        try:
            existed = await retry(lambda: self.runtime.cancel(command.job_name), self.backoff)
        except RetriesExhausted:
            return Outcome.REQUEUE
        log.info("investigation_cancel_requested", job_name=command.job_name, existed=existed,
                 reason=command.reason, requested_by=command.requested_by)
        return Outcome.ACK


class LoginTokenRecorder:
    """Kubernetes auth: records each agent's login-token accessor on its Job, for revocation.

    The accessor goes on the Job (so a restarted dispatcher still revokes it) unless the
    Job's ending was already reported — then the token is revoked right here.
    """

    def __init__(
        self, *, runtime: Any, credentials: Credentials, publisher: Publisher, backoff: Backoff | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.runtime = runtime  # KubernetesRuntime (kubernetes auth needs it; see settings)
        self.credentials = credentials
        self.publisher = publisher
        self.backoff = backoff or Backoff()
        self.clock = clock

    async def handle(self, delivery: Delivery) -> Outcome:
        try:
            issued = decode(delivery.body, CredentialsIssued)
        except DecodeError as exc:
            return await reject(self.publisher, delivery, exc, backoff=self.backoff,
                                at=self.clock(), component="dispatcher.credentials.tokens")
        note = {jobspec.ANN_LOGIN_ACCESSOR: issued.token_accessor}
        try:
            recorded = await retry(lambda: self.runtime.annotate_unless_reported(issued.job_name, note),
                                   self.backoff)
            if not recorded:  # the Job already ended (or is gone): nothing may outlive it
                await retry(lambda: self.credentials.revoke(issued.token_accessor), self.backoff)
        except RetriesExhausted:
            return Outcome.REQUEUE
        log.info("login_token_recorded" if recorded else "login_token_revoked_late", job_name=issued.job_name,
                 token_accessor=issued.token_accessor)
        return Outcome.ACK


class DeadLetterRecorder:
    def __init__(
        self, *, reporter: Reporter, metrics: Metrics, backoff: Backoff | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.reporter = reporter
        self.metrics = metrics
        self.backoff = backoff or Backoff()
        self.clock = clock

    async def handle(self, delivery: Delivery) -> Outcome:
        record = explain(delivery, at=self.clock())
        if HEADER_RECORD not in delivery.headers:  # ours are counted where they are rejected
            self.metrics.dead_lettered.labels(reason=record.reason).inc()
        message_id = f"dead:{delivery.message_id or record.preview[:64]}:{record.reason}"
        try:
            await retry(lambda: self.reporter.dead_letter(record, message_id=message_id), self.backoff)
        except RetriesExhausted:
            return Outcome.REQUEUE
        log.warning("dead_letter_recorded", reason=record.reason, error_kind=record.error_kind.value,
                    original_routing_key=record.original_routing_key, detail=record.message[:300])
        return Outcome.ACK
