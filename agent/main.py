"""``agentjobs agent``: one investigation, start to end, inside its Job.

bootstrap (unwrap or log in, dynamic credentials) → investigate (``engine``: tools,
reasoner, phase gate; the kill switch read from Vault right before each action, and without
a Vault identity — auth mode none — nothing acts) → publish the
finding with confirms, then one ``ActionRecord`` per gated action (best effort: the finding
carries the same facts) → revoke-self. The exit code tells the dispatcher how it
ended — it maps them to lifecycle reasons:

====  ===========================================================================
0     the finding was published and confirmed by the broker
1     anything else (bad environment, unreadable incident, SIGTERM, a bug)
3     credentials unavailable: failed closed (e.g. the wrapping token was used)
4     the finding could not be published (not confirmed)
5     stopped by SIGTERM while investigating; a partial finding (what it had
      observed, inconclusive) was published and confirmed within
      ``PARTIAL_PUBLISH_SECONDS``, well inside the termination grace
====  ===========================================================================

So an investigation cancelled because its alert resolved still gives its
ticket the evidence it had gathered, and the dispatcher, seeing exit 5 (or 0),
publishes no placeholder finding of its own.

For exit codes other than 0 the last line on stderr is one plain sentence,
``<reason>: <what happened>``, for the pod's termination message and humans.
Logs are structlog JSON on stderr, redacted; no token, password or wrapping
token is ever written anywhere.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import sys
import time
from collections.abc import Callable, Mapping
from typing import TextIO

import msgspec

from schemas import logs
from schemas.logs import LoggingSettings
from schemas.routing import CREDENTIALS_KEY
from schemas import (
    AgentExit,
    CredentialsIssued,
    DecodeError,
    Evidence,
    IncidentEvent,
    decode,
    utcnow,
)

from . import approved, config, credentials, engine, publish, tracing
from .config import AgentEnv, ConfigError
from .credentials import CredentialsUnavailable, Denied, VaultSession
from .remediation import killswitch
from .remediation.claims import VaultClaims
from .reasoning.base import Tally

log = logs.get_logger("agentjobs.agent")

EXIT_OK = AgentExit.OK
EXIT_ERROR = AgentExit.ERROR
EXIT_CREDENTIALS = AgentExit.CREDENTIALS_UNAVAILABLE
EXIT_UNPUBLISHED = AgentExit.UNPUBLISHED
EXIT_PARTIAL = AgentExit.PARTIAL
PARTIAL_PUBLISH_SECONDS = 5.0  # at most, for the partial finding after SIGTERM (the grace is ~30 s)


class IncidentUnreadable(Exception):
    """incident.json is missing or not an IncidentEvent."""


class Terminated(Exception):
    """SIGTERM (deadline, cancel, eviction): stopped early, credentials revoked on the way out."""


class StoppedWithPartial(Exception):
    """SIGTERM while investigating: the partial finding was published; credentials revoked on the way out."""


def exit_code_for(exc: BaseException | None) -> int:
    """The process exit code for how the run ended (pure)."""
    if exc is None:
        return EXIT_OK
    if isinstance(exc, CredentialsUnavailable):
        return EXIT_CREDENTIALS
    if isinstance(exc, publish.PublishFailed):
        return EXIT_UNPUBLISHED
    if isinstance(exc, StoppedWithPartial):
        return EXIT_PARTIAL
    return EXIT_ERROR


def stderr_line(exc: BaseException) -> str:
    """The one clear line for a failed run (pure; messages are secret-free by construction)."""
    if isinstance(exc, CredentialsUnavailable):
        return f"credentials_unavailable: {exc}"
    if isinstance(exc, publish.PublishFailed):
        return f"finding_unpublished: {exc}"
    if isinstance(exc, ConfigError):
        return f"bad_environment: {exc}"
    if isinstance(exc, IncidentUnreadable):
        return f"incident_unreadable: {exc}"
    if isinstance(exc, approved.ApprovalUnreadable):
        return f"approval_unreadable: {exc}"
    if isinstance(exc, Terminated):
        return f"terminated: {exc}"
    if isinstance(exc, StoppedWithPartial):
        return f"stopped_with_partial_finding: {exc}"
    return f"agent_error: {type(exc).__name__}"


def read_incident(env: AgentEnv) -> IncidentEvent:
    try:
        body = env.incident_file.read_bytes()
    except OSError as exc:
        raise IncidentUnreadable(f"cannot read {env.incident_file.name} ({type(exc).__name__})") from None
    try:
        return decode(body, IncidentEvent)
    except DecodeError as exc:
        raise IncidentUnreadable(f"{env.incident_file.name} is not an incident ({exc.reason})") from None


async def _database_access(
    env: AgentEnv, session: VaultSession | None
) -> tuple[str | None, str | None, list[Evidence], str | None]:
    """(user, password, evidence, why unavailable) for the diagnostics database."""
    if session is None or not env.postgres_dsn:
        return None, None, [], None  # mode none: the DSN carries its own credentials, if any
    got = await session.database(env.postgres_target)
    if isinstance(got, Denied):
        # The phase's policy may not grant it: that is evidence for the finding, not a crash.
        refusal = Evidence(source="vault", query=f"read {got.path}", excerpt=got.reason, at=utcnow(), ok=False)
        return None, None, [refusal], got.reason
    return got.username, got.password, [], None


async def run(env: AgentEnv, *, clock: Callable[[], float] = time.monotonic) -> None:
    """One investigation; raises what ``exit_code_for`` maps (returns on success)."""
    tally = Tally()
    session: VaultSession | None = None
    stop = asyncio.Event()
    renewer: asyncio.Task[None] | None = None
    try:
        if env.auth_mode != "none":
            session = await credentials.start(env, clock=clock)
        incident = read_incident(env)
        # The server the alert's labels name (agent.targets): its address and its Vault role from here on.
        choice = env.postgres_choice(incident)
        env = dataclasses.replace(env, postgres_dsn=choice.dsn, postgres_target=choice.name)
        approval = approved.read_approval(env)  # a follow-up Job runs one approved action, nothing else
        amqp_user = amqp_password = None
        if session is not None:
            rabbit = await session.rabbitmq()  # required: without it a finding cannot leave the Job
            amqp_user, amqp_password = rabbit.username, rabbit.password
            if env.auth_mode == "kubernetes" and session.identity is not None:
                # We logged in ourselves: tell the dispatcher our token's accessor at once, so it
                # revokes the token when the Job ends even if we never get further than this.
                await publish.publish_message(
                    CredentialsIssued(investigation_id=env.investigation_id, job_name=env.job_name,
                                      token_accessor=session.identity.accessor, at=utcnow()),
                    routing_key=CREDENTIALS_KEY, message_id=f"{env.investigation_id}:credentials",
                    amqp_url=env.amqp_url, username=amqp_user, password=amqp_password,
                    timeout=env.publish_timeout, connection_name=f"agentjobs-agent {env.job_name}",
                )
        db_user, db_password, prior, db_unavailable = await _database_access(env, session)
        api_key = ""
        if env.llm is not None and session is not None:
            got = await session.llm_api_key()
            if isinstance(got, Denied):
                prior.append(Evidence(source="vault", query=f"read {got.path}", excerpt=got.reason, at=utcnow(),
                                      ok=False))
            else:
                api_key = got
        if session is not None:  # every lease is known now
            renewer = asyncio.create_task(session.renew_until(stop), name="agentjobs-lease-renewer")
        if choice.evidence is not None:
            prior.append(choice.evidence)
        elif not env.postgres_dsn:
            prior.append(Evidence(source="postgres", excerpt="PostgreSQL is not configured "
                                  "(AGENTJOBS_POSTGRES__DSN is empty)", at=utcnow(), ok=False))
        tools, unavailable = await engine.open_tools(env, db_user=db_user, db_password=db_password,
                                                     postgres_available=db_unavailable is None,
                                                     amqp_user=amqp_user, amqp_password=amqp_password)
        prior.extend(unavailable)
        # Read fresh right before each action: a switch flipped while this Job investigates still holds.
        guard = (killswitch.VaultKillSwitch(session) if session is not None
                 else killswitch.without_vault("no Vault identity in auth mode none"))
        # Claims every pod and Job of the investigation see (a retried pod has a fresh work dir).
        claims = VaultClaims(session) if session is not None else None
        if approval is not None:
            try:
                done = await approved.run(approval, env, tools=tools, guard=guard, claims=claims)
            finally:
                await engine.close_tools(tools)
            await publish.publish_all(  # required: these records are all a follow-up Job reports
                publish.action_messages(done, {"investigation_id": env.investigation_id, "job_name": env.job_name}),
                amqp_url=env.amqp_url, username=amqp_user, password=amqp_password, timeout=env.publish_timeout,
                connection_name=f"agentjobs-agent {env.job_name}")
            log.info("approved_action_records_published", outcome=[r.outcome for r in done])
            return
        stopped: engine.Stopped | None = None
        try:
            finding = await engine.investigate(incident, env, tools=tools, tally=tally, prior_evidence=prior,
                                               api_key=api_key, guard=guard, claims=claims)
        except engine.Stopped as exc:  # SIGTERM while reasoning: publish what was observed, briefly
            stopped = exc
            finding = msgspec.structs.replace(exc.finding, evidence=(*prior, *exc.finding.evidence))
        finally:
            await engine.close_tools(tools)
        finding = msgspec.structs.replace(finding, cost=tally.cost())
        if stopped is not None:
            await publish.publish_finding(
                finding, amqp_url=env.amqp_url, username=amqp_user, password=amqp_password,
                timeout=min(env.publish_timeout, PARTIAL_PUBLISH_SECONDS),
                connection_name=f"agentjobs-agent {env.job_name}",
                headers={"investigation_id": env.investigation_id, "job_name": env.job_name})
            log.info("partial_finding_published", evidence=len(finding.evidence))
            raise StoppedWithPartial(f"SIGTERM received while investigating; published a partial finding "
                                     f"with {len(finding.evidence)} evidence item(s) and revoked its credentials")
        headers = {"investigation_id": env.investigation_id, "job_name": env.job_name}
        if session is not None and session.identity is not None:
            # Lets the dispatcher revoke a kubernetes-login token by accessor (not a secret).
            headers["token_accessor"] = session.identity.accessor
        routing_key = await publish.publish_finding(
            finding, amqp_url=env.amqp_url, username=amqp_user, password=amqp_password,
            timeout=env.publish_timeout, connection_name=f"agentjobs-agent {env.job_name}", headers=headers,
        )
        log.info("finding_published", routing_key=routing_key, conclusion=finding.conclusion.value,
                 confidence=finding.confidence, tool_calls=finding.cost.tool_calls)
        try:
            keys = await publish.publish_action_records(
                finding, amqp_url=env.amqp_url, username=amqp_user, password=amqp_password,
                timeout=env.publish_timeout, connection_name=f"agentjobs-agent {env.job_name}",
                headers={"investigation_id": env.investigation_id, "job_name": env.job_name},
            )
        except publish.PublishFailed as exc:  # the finding, confirmed, carries the same facts
            log.error("action_records_unpublished", error=str(exc))
        else:
            if keys:
                log.info("action_records_published", routing_keys=keys)
    finally:
        stop.set()
        if renewer is not None:
            await renewer  # returns promptly once stopped; it logs its own crash
        if session is not None:
            await session.revoke_self()


async def _run_until_terminated(env: AgentEnv) -> None:
    """``run``, cancelled by SIGTERM so that its cleanup (revoke-self) still happens."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    terminated = False

    def on_sigterm() -> None:
        nonlocal terminated
        terminated = True
        task.cancel()

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    try:
        await run(env)
    except asyncio.CancelledError:
        if terminated:
            raise Terminated("SIGTERM received; stopped and revoked its credentials") from None
        raise
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def main(environ: Mapping[str, str], *, stderr: TextIO | None = None) -> int:
    """Entry point of ``agentjobs agent``; returns the exit code."""
    stderr = stderr or sys.stderr
    try:
        env = config.load(environ)
    except ConfigError as exc:
        logs.configure(LoggingSettings(format="json"), stream=stderr)
        log.error("agent_failed", outcome="bad_environment", error=str(exc), exit_code=EXIT_ERROR)
        print(stderr_line(exc), file=stderr, flush=True)
        return EXIT_ERROR
    logs.configure(LoggingSettings(format="json", level=env.log_level), stream=stderr)  # type: ignore[arg-type]
    failure: BaseException | None = None
    flush_spans = tracing.configure_export(environ)
    with logs.bound(investigation_id=env.investigation_id, job_name=env.job_name, phase=env.phase.value):
        log.info("agent_started", auth_mode=env.auth_mode, job_class=env.class_name)
        try:
            asyncio.run(_run_until_terminated(env))
        except (CredentialsUnavailable, publish.PublishFailed, IncidentUnreadable, approved.ApprovalUnreadable,
                Terminated, StoppedWithPartial) as exc:
            failure = exc
            log.error("agent_failed", outcome=type(exc).__name__, reason=getattr(exc, "reason", ""), error=str(exc))
        except Exception as exc:
            failure = exc
            log.exception("agent_failed", outcome="error")
        code = exit_code_for(failure)
        log.info("agent_finished", exit_code=code)
    flush_spans()
    if failure is not None:
        print(stderr_line(failure), file=stderr, flush=True)
    return code
