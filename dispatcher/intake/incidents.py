"""Incident intake: one notification in, one durable outcome out.

``Intake.handle`` decides what a delivery means and makes it durable before
it returns ``ACK``: a new investigation's Job exists and ``dispatched`` was
confirmed by the broker; a notification for a known investigation produced
``attached`` (new alerts) or nothing (a plain re-send); a resolved group's
investigation was cancelled; an undecodable message sits in
``agentjobs.dead`` with its reason. Temporary failures are retried in place
with backoff; when that runs out the delivery goes back to the broker
(``REQUEUE``), and on its last allowed delivery it is dead-lettered with the
last error as reason instead, so nothing dies silently.

Concurrency: notifications of one investigation are handled one at a time in
this process; across processes and replicas the runtime's "already exists"
(Kubernetes 409) guarantees a single Job.

Restarts: for an investigation it has no memory of, the intake asks the
runtime (``status``) before it mints a token or publishes anything. A Job
that already ended is remembered as ended (its fingerprints from its
annotations): a re-send gets no second ``dispatched`` and no token, a resolve
gets ``resolved`` instead of a cancel (a finished Job is never deleted by a
resolve), and alerts none of the group's Jobs were launched for start a
follow-up investigation (``followups``). A running Job gets ``dispatched``
re-published (same message id) without minting.

Resolution mid-investigation: the Job is cancelled with reason
``alert_resolved``; the agent, on SIGTERM, publishes a partial finding from
what it has observed, and the watcher reports ``cancelled`` with that reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import TypeVar

import msgspec

from schemas import (
    Alert,
    AlertStatus,
    FailureReason,
    IncidentEvent,
    LifecycleEvent,
    LifecycleState,
    decode_incident,
    encode,
    identify,
    utcnow,
)
from schemas.actions import ApprovedAction, approval_phase, follow_up_id
from schemas.errors import DecodeError, PermanentError, TemporaryError
from schemas.identity import Identity, job_name

from dispatcher.jobs import jobspec
from dispatcher.intake.actions_log import ActionLog
from dispatcher.intake.admission import AdmissionGate
from dispatcher.plumbing.amqp import Publisher
from dispatcher.credentials.tokens import Credentials, Expected, Kind, NoCredentials, WrappedToken, vault_ca
from dispatcher.intake import followups, senders
from dispatcher.intake.deadletters import Delivery, dead_letter, from_error
from schemas.logs import bound, get_logger
from dispatcher.plumbing.metrics import Metrics
from dispatcher.intake.phases import PhaseSource
from dispatcher.intake.reporting import Reporter, alert_briefs, failure_result, incident_title, resolved_after_end
from dispatcher.plumbing.retry import Backoff, RetriesExhausted, retry
from dispatcher.jobs.runtime import JobRuntime, LaunchOutcome
from dispatcher.plumbing.settings import Settings
from dispatcher.intake.tracker import Tracked, Tracker, from_job

T = TypeVar("T")
log = get_logger("agentjobs.intake")
COMPONENT = "dispatcher"


def _fingerprints(event: IncidentEvent) -> frozenset[str]:
    return frozenset(a.fingerprint or a.name for a in event.firing_alerts)


def _header(delivery: Delivery, name: str) -> str:
    value = delivery.headers.get(name)
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return value if isinstance(value, str) else ""


class Outcome(enum.StrEnum):
    ACK = "ack"  # the outcome is durable
    REQUEUE = "requeue"  # hand back to the broker (it counts deliveries)


class Intake:
    """Handles incident deliveries; owns no broker objects except a confirming publisher."""

    def __init__(
        self,
        *,
        settings: Settings,
        runtime: JobRuntime,
        publisher: Publisher,
        gate: AdmissionGate,
        tracker: Tracker,
        phases: PhaseSource,
        metrics: Metrics,
        credentials: Credentials | None = None,
        backoff: Backoff | None = None,
        clock: Callable[[], datetime] = utcnow,
        actions: ActionLog | None = None,
    ) -> None:
        self.settings = settings
        self.runtime = runtime
        self.publisher = publisher
        self.reporter = Reporter(publisher)
        self.gate = gate
        self.tracker = tracker
        self.phases = phases
        self.credentials: Credentials = credentials or NoCredentials()
        self.metrics = metrics
        self.backoff = backoff or Backoff.of(settings.retry)
        self.clock = clock
        # Blast-radius limits each Job is handed; without an action log, Jobs get nothing to spend.
        self.actions = actions
        self._locks: dict[str, asyncio.Lock] = {}
        self._pending: dict[str, frozenset[str]] = {}  # investigation id → alerts being launched
        self._launching: set[str] = set()  # accessors of tokens minted for Jobs not created yet
        # Agents verify Vault with the same private CA as the dispatcher (an input file of the Job).
        self._vault_ca = vault_ca(settings.vault) if settings.vault.auth_mode != "none" else None

    # -- entry point -------------------------------------------------------------------------

    async def handle(self, delivery: Delivery) -> Outcome:
        """Make the delivery's outcome durable; never raises except on cancellation."""
        try:
            outcome, label = await self._handle_once(delivery)
        except RetriesExhausted as exc:
            return await self._give_back(delivery, exc)
        except PermanentError as exc:  # e.g. launch rejected as invalid
            try:
                outcome, label = await self._reject(delivery, exc), f"dead_lettered:{exc.reason}"
            except RetriesExhausted as again:  # the dead-letter queue is unreachable too
                return await self._give_back(delivery, again)
        self.metrics.incidents.labels(outcome=label.split(":")[0]).inc()
        log.info("incident_handled", outcome=label)
        return outcome

    async def _durably(self, work: Callable[[], Awaitable[T]]) -> T:
        """Retry one I/O step in place; ``RetriesExhausted`` hands the delivery back."""
        return await retry(work, self.backoff, on_retry=self._on_retry)

    def _on_retry(self, attempt: int, exc: TemporaryError, wait: float) -> None:
        self.metrics.retries.inc()
        log.warning("temporary_error", attempt=attempt, error=exc.message, retry_in_s=round(wait, 3))

    async def _give_back(self, delivery: Delivery, exc: RetriesExhausted) -> Outcome:
        # The broker dead-letters on the (limit+1)th delivery; on the last one we do it ourselves
        # so the record carries the real cause instead of just "delivery_limit".
        if delivery.delivery_count + 1 >= self.settings.amqp.delivery_limit:
            error = PermanentError("retries_exhausted", exc.last.message)
            try:
                return await self._reject(delivery, error)
            except RetriesExhausted:
                pass
        self.metrics.incidents.labels(outcome="requeued").inc()
        log.warning("incident_requeued", error=exc.last.message, deliveries=delivery.delivery_count + 1)
        return Outcome.REQUEUE

    async def _reject(self, delivery: Delivery, error: PermanentError) -> Outcome:
        record = from_error(delivery, error, at=self.clock(), component=COMPONENT)
        await self._durably(lambda: dead_letter(self.publisher, delivery, record))
        self.metrics.dead_lettered.labels(reason=error.reason).inc()
        log.warning("incident_dead_lettered", reason=error.reason, detail=error.message)
        return Outcome.ACK

    async def _handle_once(self, delivery: Delivery) -> tuple[Outcome, str]:
        refused = senders.incident_sender(self.settings.identities, delivery.user_id)
        if refused is not None:  # before decoding: nothing of what it says is looked at
            return await self._reject(delivery, PermanentError(refused.reason, refused.detail)), \
                f"dead_lettered:{refused.reason}"
        try:
            event = decode_incident(delivery.body, max_bytes=self.settings.bridge.max_body_bytes)
        except DecodeError as exc:
            return await self._reject(delivery, exc), f"dead_lettered:{exc.reason}"
        ident = identify(event)
        with bound(investigation_id=ident.investigation_id, incident_key=ident.incident_key, event_id=event.event_id):
            pending = self._pending.get(ident.investigation_id)
            if event.firing_alerts and pending is not None and _fingerprints(event) <= pending:
                # Storm control: the same alerts are already on their way into a Job, held
                # unacked by another handler; this re-send adds nothing and need not wait.
                return Outcome.ACK, "coalesced"
            async with self._one_at_a_time(ident.investigation_id):
                if event.firing_alerts:
                    return await self._firing(event, ident, _header(delivery, "traceparent"))
                return await self._resolved(event, ident)

    @contextlib.asynccontextmanager
    async def _one_at_a_time(self, investigation_id: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(investigation_id, asyncio.Lock())
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and not getattr(lock, "_waiters", None):
                self._locks.pop(investigation_id, None)

    # -- firing ------------------------------------------------------------------------------

    async def _firing(self, event: IncidentEvent, ident: Identity, traceparent: str = "") -> tuple[Outcome, str]:
        fingerprints = _fingerprints(event)
        if event.follows:  # only the dispatcher links investigations; a producer's claim means nothing
            event = msgspec.structs.replace(event, follows="")
        known = await self._known(ident.investigation_id, ident.job_name)
        if known is not None and known.finished:
            return await self._after_end(event, ident, known, fingerprints, traceparent)
        if known is not None and known.dispatch_reported:
            return await self._attach(event, known, fingerprints)
        if known is not None:  # launched (maybe before a restart), but the ticket may not know yet
            self.tracker.new_fingerprints(known.investigation_id, fingerprints)
            await self._report_dispatched(known, event)
            return Outcome.ACK, "already_dispatched"

        domain = jobspec.domain_of(event, self.settings)
        class_name = jobspec.choose_class(event, self.settings)
        phase = self.phases.phase_for(self._scope(event, domain))
        plan = jobspec.JobPlan(identity=ident, event=event, class_name=class_name, phase=phase, domain=domain,
                               traceparent=traceparent)

        self._pending[ident.investigation_id] = fingerprints
        try:
            return await self._launch(event, ident, plan, fingerprints)
        finally:
            del self._pending[ident.investigation_id]

    # -- approvals ---------------------------------------------------------------------------

    async def launch_approved(self, approved: ApprovedAction) -> str:
        """Launch (once: its name is the proposal's) the follow-up Job that runs an approved action."""
        event, ident = approval_incident(approved, self.settings)
        phase = approval_phase(approved.action.risk)
        plan = jobspec.JobPlan(identity=ident, event=event, class_name=jobspec.choose_class(event, self.settings),
                               phase=phase, domain=approved.domain)
        async with self._one_at_a_time(ident.investigation_id):
            known = self.tracker.get(ident.investigation_id)
            if known is not None and known.dispatch_reported:
                return ident.job_name
            await self._launch(event, ident, plan, _fingerprints(event),
                               files={jobspec.APPROVAL_FILE: msgspec.json.encode(approved)},
                               scope=approved.scope or approved.domain)
        return ident.job_name

    async def _known(self, investigation_id: str, job_name: str) -> Tracked | None:
        """The investigation from memory, else from the runtime's durable record of its Job."""
        known = self.tracker.get(investigation_id)
        if known is not None:
            return known
        status = await self._durably(lambda: self.runtime.status(job_name))
        if status is None:
            return None
        recalled = self.tracker.add(from_job(investigation_id=investigation_id, job_name=job_name,
                                             labels=status.labels, annotations=status.annotations))
        if status.ended:
            # An acknowledged ending was reported after its `dispatched` (the watcher sees to that),
            # so the ticket had both: never re-announced. An unacknowledged one is the watcher's to
            # report, `dispatched` first if nobody confirmed it (a launcher that died in between).
            recalled.dispatch_reported = status.reported
            self.tracker.finish(investigation_id, at=status.finished_at or status.created_at)
        log.info("investigation_recalled", recalled_job=job_name, state=status.state.value)
        return recalled

    async def _chain(self, first: Tracked) -> list[Tracked]:
        """The first investigation and its follow-ups so far, in order (from memory or the runtime)."""
        chain = [first]
        for number in range(1, self.settings.admission.max_follow_ups + 1):
            fid = followups.follow_up_investigation_id(first.investigation_id, number)
            member = await self._known(fid, followups.follow_up_job_name(first.job_name, fid))
            if member is None:
                break
            chain.append(member)
        return chain

    async def _after_end(self, event: IncidentEvent, ident: Identity, first: Tracked, fingerprints: frozenset[str],
                         traceparent: str) -> tuple[Outcome, str]:
        """A firing notification for a group whose first investigation ended: nothing, attach or follow up."""
        chain = await self._chain(first)
        admission = self.settings.admission
        decision = followups.decide(
            [followups.Member(investigation_id=t.investigation_id, fingerprints=frozenset(t.fingerprints),
                              ended=t.finished, ended_at=t.ended_at) for t in chain],
            fingerprints, now=self.clock(), max_follow_ups=admission.max_follow_ups,
            min_interval=admission.follow_up_min_interval)
        last = chain[-1]
        if decision.verdict is followups.Verdict.DUPLICATE:
            if not last.finished and not last.dispatch_reported:  # a follow-up launched before a restart
                await self._report_dispatched(last, event)
                return Outcome.ACK, "already_dispatched"
            log.info("incident_for_finished_investigation", job_name=last.job_name)
            return Outcome.ACK, "duplicate"
        if decision.verdict is followups.Verdict.ATTACH:
            return await self._attach(event, last, fingerprints)
        if decision.verdict is followups.Verdict.HELD:
            return await self._hold(event, last, decision)
        fid = followups.follow_up_investigation_id(first.investigation_id, decision.number)
        fident = Identity(incident_key=first.incident_key,
                          investigation_key=f"{ident.investigation_key}\x1ffollow-up\x1f{decision.number}",
                          investigation_id=fid, job_name=followups.follow_up_job_name(first.job_name, fid),
                          started_at=ident.started_at)
        fevent = msgspec.structs.replace(event, follows=first.investigation_id)
        domain = jobspec.domain_of(fevent, self.settings)
        plan = jobspec.JobPlan(identity=fident, event=fevent, class_name=jobspec.choose_class(fevent, self.settings),
                               phase=self.phases.phase_for(self._scope(fevent, domain)), domain=domain,
                               traceparent=traceparent)
        log.info("follow_up_starting", follows=first.investigation_id, follow_up=decision.number,
                 new_alerts=len(decision.new))
        self._pending[fid] = fingerprints
        try:
            outcome, label = await self._launch(fevent, fident, plan, fingerprints, follows=first.investigation_id)
        finally:
            del self._pending[fid]
        return outcome, f"follow_up_{label}"

    async def _hold(self, event: IncidentEvent, last: Tracked, decision: followups.Decision) -> tuple[Outcome, str]:
        """A limit stops a follow-up: tell the ticket once per alert, attached to the last investigation."""
        untold = set(decision.new) - last.deferred
        if not untold:
            return Outcome.ACK, "duplicate"
        lifecycle = msgspec.structs.replace(self._lifecycle(last, event, LifecycleState.ATTACHED),
                                            message=decision.why[:4096])
        await self._durably(lambda: self.reporter.lifecycle(lifecycle, suffix=event.event_id))
        last.deferred |= untold
        log.info("follow_up_held", job_name=last.job_name, new_alerts=len(untold), why=decision.why)
        return Outcome.ACK, "follow_up_held"

    async def _launch(
        self, event: IncidentEvent, ident: Identity, plan: jobspec.JobPlan, fingerprints: frozenset[str], *,
        files: dict[str, bytes] | None = None, scope: str | None = None, follows: str = "",
    ) -> tuple[Outcome, str]:
        tracked = Tracked(
            investigation_id=ident.investigation_id,
            incident_key=ident.incident_key,
            job_name=ident.job_name,
            class_name=plan.class_name,
            phase=plan.phase,
            severity=event.severity,
            domain=plan.domain,
            follows=follows,
        )
        started = asyncio.get_running_loop().time()
        slot = await self.gate.admit(ident.investigation_id, tracked.severity, plan.class_name)
        token: WrappedToken | None = None
        launched: LaunchOutcome | None = None
        try:
            token = await self._durably(lambda: self._mint(plan, ident))
            if token is not None:
                self._launching.add(token.accessor)
                plan = msgspec.structs.replace(plan, token_accessor=token.accessor)
            if self.actions is not None:  # computed and reserved in one step, right before the manifest
                plan = msgspec.structs.replace(plan, actions=self.actions.grant(
                    ident.investigation_id, scope=scope or self._scope(event, plan.domain), phase=plan.phase))
            manifest = jobspec.build_job(plan, self.settings)
            # Durable facts a restarted dispatcher reads back from the Job (see ``followups``).
            annotations = manifest["metadata"].setdefault("annotations", {})
            annotations[followups.ANN_FINGERPRINTS] = followups.fingerprints_annotation(fingerprints)
            if follows:
                annotations[followups.ANN_FOLLOWS] = follows
            files = {**(files or {}), jobspec.INCIDENT_FILE: encode(event)}
            if token is not None:
                files[jobspec.WRAPPED_TOKEN_FILE] = token.wrapping_token.encode()
            if self._vault_ca is not None:
                files[jobspec.VAULT_CA_FILE] = self._vault_ca
            launched = await self._durably(lambda: self.runtime.launch(manifest, secret=files))
        except PermanentError as exc:
            slot.cancel()
            await self._report_rejected(tracked, event, exc)
            raise
        except BaseException:
            slot.cancel()
            raise
        finally:
            if self.actions is not None:  # a Job that was not created here holds no reservation
                self.actions.launched(ident.investigation_id, created=launched is LaunchOutcome.CREATED)
            if token is not None and launched is not LaunchOutcome.CREATED:
                await self._revoke_unused(token, ident.investigation_id)  # the Job that exists has its own token
            if token is not None:
                self._launching.discard(token.accessor)
        if launched is LaunchOutcome.CREATED:
            slot.commit()
        else:
            slot.cancel()  # launched before (restart, redelivery or another replica)
        tracked = self.tracker.add(tracked)
        self.tracker.new_fingerprints(ident.investigation_id, fingerprints)
        self.metrics.dispatch_latency.observe(asyncio.get_running_loop().time() - started)
        # Published for "already exists" too: a crash between create and publish must not
        # lose it; the deterministic message id lets consumers drop the duplicate.
        await self._report_dispatched(tracked, event)
        log.info("job_dispatched", job_name=ident.job_name, launch=launched.value, job_class=plan.class_name,
                 phase=plan.phase.value)
        return Outcome.ACK, "dispatched" if launched is LaunchOutcome.CREATED else "already_dispatched"

    def _scope(self, event: IncidentEvent, domain: str) -> str:
        """The trust scope of an incident: its phase and its action limits."""
        return event.label(self.settings.trust.scope_label) or domain

    def launching(self) -> frozenset[str]:
        """Accessors of tokens minted for Jobs being created right now (the sweeper leaves them)."""
        return frozenset(self._launching)

    async def _mint(self, plan: jobspec.JobPlan, ident: Identity) -> WrappedToken | None:
        cls = self.settings.classes[plan.class_name]
        return await self.credentials.mint(
            phase=plan.phase, investigation_id=ident.investigation_id, incident_key=ident.incident_key,
            job_name=ident.job_name, ttl=cls.deadline + self.settings.vault.grace,
        )

    async def _revoke_unused(self, token: WrappedToken, investigation_id: str) -> None:
        expected = Expected(scope=self.runtime.where, investigation_id=investigation_id, kind=Kind.MINTED)
        try:
            await self._durably(lambda: self.credentials.revoke(token.accessor, expected=expected))
        except RetriesExhausted as exc:  # it expires with its TTL; say so loudly
            log.error("unused_agent_token_not_revoked", token_accessor=token.accessor, error=exc.last.message)

    async def _report_rejected(self, tracked: Tracked, event: IncidentEvent, exc: PermanentError) -> None:
        """The Job could not be created at all (invalid, forbidden): tell the ticket, then dead-letter."""
        lifecycle = msgspec.structs.replace(
            self._lifecycle(tracked, event, LifecycleState.FAILED),
            reason=FailureReason.LAUNCH_REJECTED,
            message=f"{exc.reason}: {exc.message}"[:4096],
        )
        await self._durably(lambda: self.reporter.lifecycle(lifecycle))
        self.metrics.outcomes.labels(state="failed", reason=FailureReason.LAUNCH_REJECTED.value).inc()
        result = failure_result(lifecycle, severity=tracked.severity, domain=tracked.domain)
        await self._durably(lambda: self.reporter.finding(result))

    async def _report_dispatched(self, tracked: Tracked, event: IncidentEvent) -> None:
        lifecycle = self._lifecycle(tracked, event, LifecycleState.DISPATCHED)
        await self._durably(lambda: self.reporter.lifecycle(lifecycle))
        tracked.dispatch_reported = True

    async def _attach(self, event: IncidentEvent, known: Tracked, fingerprints: frozenset[str]) -> tuple[Outcome, str]:
        if known.finished:
            log.info("incident_for_finished_investigation", job_name=known.job_name)
            return Outcome.ACK, "duplicate"
        new = self.tracker.new_fingerprints(known.investigation_id, fingerprints)
        if not new:
            return Outcome.ACK, "duplicate"
        lifecycle = self._lifecycle(known, event, LifecycleState.ATTACHED)
        try:
            await self._durably(lambda: self.reporter.lifecycle(lifecycle, suffix=event.event_id))
        except RetriesExhausted:
            known.fingerprints -= new  # so the redelivery reports them
            raise
        log.info("alerts_attached", job_name=known.job_name, new_alerts=len(new))
        return Outcome.ACK, "attached"

    # -- resolved ----------------------------------------------------------------------------

    async def _resolved(self, event: IncidentEvent, ident: Identity) -> tuple[Outcome, str]:
        """Every investigation of the group: an ended one gets ``resolved``, a running one is cancelled."""
        first = await self._known(ident.investigation_id, ident.job_name)
        if first is None:
            log.info("group_resolved", job_name=ident.job_name, cancelled=False)
            return Outcome.ACK, "resolved_no_job"
        label = "resolved_no_job"
        for member in await self._chain(first):
            label = await self._resolve(event, member)
        return Outcome.ACK, label

    async def _resolve(self, event: IncidentEvent, member: Tracked) -> str:
        status = None
        if not member.finished:  # it may have ended a moment ago: a finished Job is never cancelled
            status = await self._durably(lambda: self.runtime.status(member.job_name))
        if member.finished or (status is not None and status.ended):
            lifecycle = resolved_after_end(member, at=self.clock(), event_id=event.event_id,
                                           alert_count=len(event.alerts),
                                           resolved_at=max((a.ends_at for a in event.alerts if a.ends_at), default=None))
            await self._durably(lambda: self.reporter.lifecycle(lifecycle))
            log.info("group_resolved_after_end", job_name=member.job_name)
            return "resolved_after_finish"
        if not self.settings.admission.cancel_on_resolve:
            log.info("group_resolved_recorded", job_name=member.job_name)
            return "resolved_recorded"
        existed = await self._durably(
            lambda: self.runtime.cancel(member.job_name, reason=FailureReason.ALERT_RESOLVED.value))
        log.info("group_resolved", job_name=member.job_name, cancelled=existed)
        return "resolved_cancelled" if existed else "resolved_no_job"

    def _lifecycle(self, tracked: Tracked, event: IncidentEvent, state: LifecycleState) -> LifecycleEvent:
        return LifecycleEvent(
            investigation_id=tracked.investigation_id,
            incident_key=tracked.incident_key,
            state=state,
            at=self.clock(),
            job_name=tracked.job_name,
            phase=tracked.phase,
            event_id=event.event_id,
            alert_count=len(event.alerts),
            follows=tracked.follows,
            title=incident_title(event, tracked.severity),
            severity=tracked.severity,
            domain=tracked.domain,
            scope=self._scope(event, tracked.domain),
            alerts=alert_briefs(event),
        )


APPROVAL_ALERT = "ApprovedAction"  # the alertname of a follow-up Job's incident


def approval_incident(approved: ApprovedAction, settings: Settings) -> tuple[IncidentEvent, Identity]:
    """The incident and identity of the follow-up Job that runs ``approved`` (pure).

    Its investigation is ``follow_up_id(proposal key)``, so approving the same proposal again
    finds the same Job; it carries the proposing incident's key, domain and scope labels, so the
    ticket, the limits and the Job's labels are the proposing incident's.
    """
    labels = {"alertname": APPROVAL_ALERT, "agentjobs_action": approved.action.action[:200],
              "agentjobs_approved_investigation": approved.investigation_id[:200]}
    if approved.domain:
        labels[settings.admission.domain_label] = approved.domain
    if approved.scope:
        labels[settings.trust.scope_label] = approved.scope
    inv = follow_up_id(approved.proposal_key)
    event = IncidentEvent(
        event_id=f"approval:{approved.approval_id}"[:512], source="agentjobs:approvals",
        group_key=f"approval/{approved.proposal_key}"[:512], status=AlertStatus.FIRING,
        alerts=(Alert(status=AlertStatus.FIRING, labels=labels, starts_at=approved.approved_at,
                      annotations={"summary": f"{approved.action.action} {approved.action.target}"[:1024],
                                   "description": f"approved by {approved.approved_by}: {approved.reason}"[:4096]},
                      fingerprint=inv[:16]),),
        common_labels=labels, received_at=approved.approved_at,
    )
    ident = Identity(incident_key=approved.incident_key or inv[:32], investigation_key=f"approval\x1f{approved.proposal_key}",
                     investigation_id=inv, job_name=job_name(inv, f"approved-{approved.action.action}"),
                     started_at=approved.approved_at)
    return event, ident
