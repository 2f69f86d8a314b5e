"""Handlers for the dispatcher's side queues: operator commands and the dead-letter log.

``ControlHandler`` executes ``CancelInvestigation`` commands (the Job is
deleted / the process killed; the watcher then reports ``cancelled``) — from operators,
admins or the dispatcher only (``senders.control_sender``) — and hands ``ApproveAction``
commands to ``dispatcher.intake.approvals`` (operators and admins only).
``LoginTokenRecorder`` records the login-token accessor an agent reports (kubernetes auth),
only from that Job's own agent and only for a token that is that Job's login.
``DeadLetterRecorder`` reads a copy of every dead letter and publishes its
``DeadLetter`` record to the results exchange, so an operator learns why a
message died — including messages the broker dead-lettered on its own.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from schemas import ApproveAction, CancelInvestigation, CredentialsIssued, Phase, decode, utcnow
from schemas.errors import DecodeError, PermanentError, TemporaryError

from dispatcher.jobs import jobspec
from dispatcher.plumbing.amqp import Publisher
from dispatcher.credentials.tokens import Credentials, Expected, Kind, Revocation, revocable
from dispatcher.intake import senders
from dispatcher.intake.approvals import Approvals
from dispatcher.intake.deadletters import HEADER_RECORD, Delivery, dead_letter, explain, from_error
from dispatcher.intake.incidents import Outcome
from schemas.logs import get_logger
from dispatcher.plumbing.metrics import Metrics
from dispatcher.intake.reporting import Reporter
from dispatcher.plumbing.retry import Backoff, RetriesExhausted, retry
from dispatcher.jobs.runtime import JobRuntime
from dispatcher.plumbing.settings import IdentitySettings

log = get_logger("agentjobs.control")
_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
LOGINS = "dispatcher.credentials.tokens"  # the component named in the login recorder's dead letters


async def reject(
    publisher: Publisher, delivery: Delivery, error: PermanentError, *, backoff: Backoff, at: datetime,
    component: str, metrics: Metrics | None = None,
) -> Outcome:
    """Dead-letter an invalid message with its reason (ACK), or hand it back if that fails."""
    record = from_error(delivery, error, at=at, component=component)
    try:
        await retry(lambda: dead_letter(publisher, delivery, record), backoff)
    except RetriesExhausted:
        return Outcome.REQUEUE
    if metrics is not None:
        metrics.dead_lettered.labels(reason=error.reason).inc()
    log.warning("message_dead_lettered", component=component, reason=error.reason, detail=error.message)
    return Outcome.ACK


def _forbidden(refusal: senders.Refusal) -> PermanentError:
    return PermanentError(refusal.reason, refusal.detail)


class ControlHandler:
    def __init__(
        self, *, runtime: JobRuntime, publisher: Publisher, identities: IdentitySettings,
        metrics: Metrics | None = None, backoff: Backoff | None = None, clock: Callable[[], datetime] = utcnow,
        approvals: Approvals | None = None,
    ) -> None:
        self.runtime = runtime
        self.publisher = publisher
        self.identities = identities
        self.approvals = approvals
        self.metrics = metrics
        self.backoff = backoff or Backoff()
        self.clock = clock

    async def handle(self, delivery: Delivery) -> Outcome:
        refused = senders.control_sender(self.identities, delivery.user_id)
        if refused is not None:  # before decoding: nothing of what it says is looked at
            return await reject(self.publisher, delivery, _forbidden(refused), backoff=self.backoff,
                                at=self.clock(), component="dispatcher.intake.control", metrics=self.metrics)
        try:
            command = decode(delivery.body, CancelInvestigation | ApproveAction)
        except DecodeError as exc:
            return await reject(self.publisher, delivery, exc, backoff=self.backoff,
                                at=self.clock(), component="dispatcher.intake.control", metrics=self.metrics)
        if isinstance(command, ApproveAction):
            return await self._approve(command, delivery)
        try:
            existed = await retry(lambda: self.runtime.cancel(command.job_name), self.backoff)
        except RetriesExhausted:
            return Outcome.REQUEUE
        log.info("investigation_cancel_requested", job_name=command.job_name, existed=existed,
                 reason=command.reason, requested_by=command.requested_by, sender=delivery.user_id)
        return Outcome.ACK

    async def _approve(self, command: ApproveAction, delivery: Delivery) -> Outcome:
        if self.approvals is None:
            error = PermanentError("approvals_unavailable", "this dispatcher runs no action log: approvals are off")
        else:
            try:
                await self.approvals.handle(command, delivery.user_id)
                return Outcome.ACK
            except PermanentError as exc:  # forbidden sender, no such proposal, a launch refused
                error = exc
            except (TemporaryError, RetriesExhausted):
                return Outcome.REQUEUE
        return await reject(self.publisher, delivery, error, backoff=self.backoff, at=self.clock(),
                            component="dispatcher.intake.approvals", metrics=self.metrics)


def login_user_of(ids: IdentitySettings, user_id: str, *, namespace: str, service_account: str) -> bool:
    """True if ``user_id`` is a broker user Vault's RabbitMQ engine issues under a kubernetes-auth
    login of ``namespace``/``service_account``: ``kubernetes-<namespace>-<service account>-<uuid>``
    (the login token's display name, measured against OpenBao, plus the engine's uuid). Pure.

    Every Job of one phase shares its ServiceAccount, so this names the phase's agents, not one
    Job's: the rest of the tie is the token itself (``LoginTokenRecorder``).
    """
    if not namespace or not service_account:
        return False
    pattern = re.escape(f"{ids.kubernetes_agent_prefix}{namespace}-{service_account}-") + _UUID
    return re.fullmatch(pattern, user_id) is not None


class _Refused(Exception):
    """A CredentialsIssued that is not recorded (dead-lettered with this reason)."""

    def __init__(self, detail: str, reason: str = senders.FORBIDDEN) -> None:
        super().__init__(detail)
        self.error = PermanentError(reason, detail)


class LoginTokenRecorder:
    """Kubernetes auth: records each agent's login-token accessor on its Job, for revocation.

    The accessor goes on the Job (so a restarted dispatcher still revokes it) unless the
    Job's ending was already reported — then the token is revoked right here.

    Only what that Job's own agent says counts (issue 17): the sender must be an agent user of
    the installation (checked before decoding), the named Job must be one of ours carrying that
    investigation id, the sender the broker user of a login by *that Job's* ServiceAccount in its
    namespace (or the Job's own per-investigation user), the accessor a kubernetes-auth login
    token of that ServiceAccount and phase (looked up in Vault, ``tokens.revocable``) that no
    other live Job holds, and the Job must not hold a login accessor already — one recorded is
    never overwritten. Anything else is dead-lettered ``forbidden_sender``, nothing is revoked.
    """

    def __init__(
        self, *, runtime: Any, credentials: Credentials, publisher: Publisher, identities: IdentitySettings,
        metrics: Metrics | None = None, backoff: Backoff | None = None, clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.runtime = runtime  # KubernetesRuntime (kubernetes auth needs it; see settings)
        self.credentials = credentials  # LoginRevoker: lookup_accessor, revoke, scope
        self.publisher = publisher
        self.identities = identities
        self.metrics = metrics
        self.backoff = backoff or Backoff()
        self.clock = clock
        # One report at a time: "not recorded yet" and the recording must not interleave in here.
        self._lock = asyncio.Lock()

    async def _reject(self, delivery: Delivery, error: PermanentError) -> Outcome:
        return await reject(self.publisher, delivery, error, backoff=self.backoff, at=self.clock(),
                            component=LOGINS, metrics=self.metrics)

    async def handle(self, delivery: Delivery) -> Outcome:
        ids, user = self.identities, delivery.user_id
        agent_prefixes = (ids.kubernetes_agent_prefix, ids.agent_prefix)
        if not any(user.startswith(p) and len(user) > len(p) for p in agent_prefixes):
            # before decoding: only an agent user of this installation may say anything here
            who = repr(user) if user else "a sender without user_id"
            return await self._reject(delivery, PermanentError(
                senders.FORBIDDEN, f"{who} may not send credentials.issued (allowed: the agent of that Job, "
                                   f"{ids.kubernetes_agent_prefix}<namespace>-<service account>-<uuid>)"))
        try:
            issued = decode(delivery.body, CredentialsIssued)
        except DecodeError as exc:
            return await self._reject(delivery, exc)
        try:
            async with self._lock:
                return await self._record(delivery, issued)
        except _Refused as refusal:
            log.warning("login_token_refused", job_name=issued.job_name, token_accessor=issued.token_accessor,
                        sender=delivery.user_id, detail=refusal.error.message)
            return await self._reject(delivery, refusal.error)
        except RetriesExhausted:
            return Outcome.REQUEUE

    async def _record(self, delivery: Delivery, issued: CredentialsIssued) -> Outcome:
        job = await retry(lambda: self._job(issued.job_name), self.backoff)
        if job is None:
            raise _Refused(f"no Job {issued.job_name!r} of ours: credentials.issued names a Job this "
                           "installation did not launch (or that is gone)")
        meta = job.get("metadata") or {}
        labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
        if labels.get(jobspec.LABEL_INVESTIGATION) != issued.investigation_id:
            raise _Refused(f"Job {issued.job_name} is not investigation {issued.investigation_id}")
        namespace = str(meta.get("namespace") or "")
        pod = ((job.get("spec") or {}).get("template") or {}).get("spec") or {}
        service_account = str(pod.get("serviceAccountName") or "")
        if not (login_user_of(self.identities, delivery.user_id, namespace=namespace,
                              service_account=service_account)
                or senders.is_agent_of(self.identities, delivery.user_id, issued.job_name)):
            raise _Refused(f"{delivery.user_id!r} is not the agent of Job {issued.job_name} (allowed: "
                           f"{self.identities.kubernetes_agent_prefix}{namespace}-{service_account}-<uuid>)")
        recorded = annotations.get(jobspec.ANN_LOGIN_ACCESSOR)
        if recorded == issued.token_accessor:  # the same report again (a redelivery)
            log.info("login_token_already_recorded", job_name=issued.job_name)
            return Outcome.ACK
        if recorded:
            raise _Refused(f"Job {issued.job_name} already holds a login-token accessor; one recorded is "
                           "never replaced")
        try:
            phase = Phase(labels.get(jobspec.LABEL_PHASE, ""))
        except ValueError:
            raise _Refused(f"Job {issued.job_name} carries no phase of ours") from None
        expected = Expected(scope=getattr(self.credentials, "scope", ""), kind=Kind.LOGIN, phase=phase,
                            service_account=service_account, job_name=issued.job_name,
                            investigation_id=issued.investigation_id)
        data = await retry(lambda: self.credentials.lookup_accessor(issued.token_accessor), self.backoff)
        if data is None:  # revoked or expired already: nothing to record, nothing can outlive the Job
            log.info("login_token_already_gone", job_name=issued.job_name, token_accessor=issued.token_accessor)
            return Outcome.ACK
        why = revocable(data, expected)
        if why is not None:
            if self.metrics is not None:
                self.metrics.revocations_refused.labels(reason=why).inc()
            raise _Refused(f"accessor is not a login token of Job {issued.job_name}'s ServiceAccount "
                           f"{namespace}/{service_account} ({why})")
        held = await retry(self._held_elsewhere, self.backoff)
        if issued.token_accessor in held.get_others(issued.job_name):
            raise _Refused(f"accessor is recorded on another Job ({held.owner(issued.token_accessor)})")
        note = {jobspec.ANN_LOGIN_ACCESSOR: issued.token_accessor}
        ok = await retry(lambda: self.runtime.annotate_unless_reported(issued.job_name, note), self.backoff)
        if not ok:  # the Job already ended (or is gone): nothing may outlive it
            outcome = await retry(lambda: self.credentials.revoke(issued.token_accessor, expected=expected),
                                  self.backoff)
            log.info("login_token_revoked_late", job_name=issued.job_name, token_accessor=issued.token_accessor,
                     outcome=outcome.value if isinstance(outcome, Revocation) else str(outcome))
            return Outcome.ACK
        log.info("login_token_recorded", job_name=issued.job_name, token_accessor=issued.token_accessor)
        return Outcome.ACK

    async def _job(self, job_name: str) -> Mapping[str, Any] | None:
        """The Job ``job_name`` as the API server has it, if it is one of ours (managed-by agentjobs)."""
        return next((j for j in await self.runtime.jobs() if (j.get("metadata") or {}).get("name") == job_name),
                    None)

    async def _held_elsewhere(self) -> _Held:
        return _Held(await self.runtime.active_annotations())


class _Held:
    """Login-token accessors recorded on live Jobs."""

    def __init__(self, active: Mapping[str, Mapping[str, str]]) -> None:
        self._by_accessor = {a: name for name, ann in active.items() if (a := ann.get(jobspec.ANN_LOGIN_ACCESSOR))}

    def get_others(self, job_name: str) -> set[str]:
        return {a for a, name in self._by_accessor.items() if name != job_name}

    def owner(self, accessor: str) -> str:
        return self._by_accessor.get(accessor, "")


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
