"""Revoke agent tokens that no Job holds: the reconciler behind "no credential outlives its Job".

Revoking a token when its Job ends covers every token whose accessor made it
onto a Job. Two ways leave a token no Job carries:

- a mint request that timed out (Vault stalled, a network blip) is still executed
  by Vault later: it creates a token whose wrapped answer nobody receives;
- the dispatcher dies between the mint and the Job's creation.

Such a token is unreachable (its wrapping token is lost), but it would live for
its whole TTL (deadline + grace, ~17 minutes by default). The sweeper lists
Vault's token accessors, looks up the ones it does not know yet and revokes
every agent token of *this* installation (metadata ``jobs_in``) that is older
than ``vault.sweep_grace``, is not being launched right now by this process, and
whose accessor no live Job carries. Revoking a token that the Job's own ending
will also revoke is harmless: revocation is idempotent. The revocation itself looks the
token up once more and revokes it only if it is still one the dispatcher minted for this
installation (``tokens.revocable``: created through an agent token role, exactly that
phase's policy, ``jobs_in`` = the scope) — a token that merely carries similar metadata
(created elsewhere with ``meta``, or with other policies) is refused and counted.

``orphans`` decides (pure); ``TokenSweeper`` does the I/O. Every replica sweeps;
they agree, and a double revocation answers "already gone".
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Iterable, Mapping
from datetime import UTC, datetime, timedelta

import msgspec

from schemas.errors import TemporaryError

from dispatcher.jobs import jobspec

from schemas import vault_paths as vault_layout
from dispatcher.credentials.tokens import Expected, Kind, Revocation, VaultCredentials
from schemas.logs import get_logger
from dispatcher.plumbing.metrics import Metrics
from dispatcher.jobs.runtime import JobRuntime

log = get_logger("agentjobs.token_sweep")
LOOKUP_CONCURRENCY = 8  # lookups in flight per sweep: Vault is on the dispatch hot path too


class AgentToken(msgspec.Struct, frozen=True, kw_only=True):
    """What a lookup by accessor tells about one token (never the token itself)."""

    accessor: str
    created_at: datetime
    policies: tuple[str, ...] = ()
    meta: dict[str, str] = {}

    @property
    def is_agent(self) -> bool:
        return any(p.startswith(vault_layout.POLICY_PREFIX) for p in self.policies)

    @classmethod
    def from_lookup(cls, accessor: str, data: Mapping[str, object]) -> AgentToken:
        created = data.get("creation_time")
        policies = data.get("policies") or ()
        meta = data.get("meta") or {}
        return cls(
            accessor=accessor,
            created_at=datetime.fromtimestamp(float(created), UTC) if isinstance(created, int | float)
            else datetime.fromtimestamp(0, UTC),
            policies=tuple(str(p) for p in policies) if isinstance(policies, list | tuple) else (),
            meta={str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {},
        )


def orphans(tokens: Iterable[AgentToken], *, scope: str, held: Collection[str], launching: Collection[str],
            now: datetime, grace: timedelta) -> list[AgentToken]:
    """The agent tokens of ``scope`` to revoke: old enough, not held by a live Job, not being launched."""
    return [
        t for t in tokens
        if t.is_agent
        and t.meta.get(vault_layout.META_JOBS_IN) == scope
        and t.accessor not in held
        and t.accessor not in launching
        and now - t.created_at >= grace
    ]


def held_accessors(active: Mapping[str, Mapping[str, str]]) -> set[str]:
    """Token accessors recorded on live Jobs (by name → annotations)."""
    return {a for annotations in active.values() if (a := annotations.get(jobspec.ANN_TOKEN_ACCESSOR))}


class SweepReport(msgspec.Struct, kw_only=True):
    listed: int = 0
    looked_up: int = 0
    unreadable: int = 0  # lookups that failed (retried next sweep)
    revoked: int = 0
    refused: int = 0  # looked like ours, but the token's record says it is not (tokens.revocable)
    failed: int = 0  # revocations that failed (retried next sweep)


class TokenSweeper:
    """Periodically revokes this installation's agent tokens that no live Job holds."""

    def __init__(self, *, credentials: VaultCredentials, runtime: JobRuntime, scope: str, grace: float,
                 interval: float, launching: Callable[[], Collection[str]] = frozenset,
                 metrics: Metrics | None = None, clock: Callable[[], datetime] | None = None) -> None:
        self.credentials = credentials
        self.runtime = runtime
        self.scope = scope
        self.grace = timedelta(seconds=grace)
        self.interval = interval
        self.launching = launching
        self.metrics = metrics
        self._clock = clock or (lambda: datetime.now(UTC))
        # Accessors that are not ours to judge (other tokens in a shared Vault): never looked up twice.
        self._foreign: set[str] = set()
        self._refused = False
        self.sweeps = 0  # completed sweeps

    async def run(self) -> None:
        """Sweep every ``interval`` seconds until cancelled; a failed sweep is retried next time."""
        while True:
            await asyncio.sleep(self.interval)
            if self._refused:
                return
            try:
                await self.sweep()
            except TemporaryError as exc:
                log.warning("token_sweep_failed", error=exc.message, retry_in_s=self.interval)

    async def sweep(self) -> SweepReport:
        """One pass: list, look up what is new, revoke the orphans. Raises TemporaryError."""
        report = SweepReport()
        accessors = await self.credentials.list_accessors()
        if accessors is None:  # the policy does not grant listing: say how to enable it, once
            self._refused = True
            log.warning("token_sweep_not_permitted",
                        hint=f"grant list+sudo on auth/token/accessors in {vault_layout.DISPATCHER_POLICY} "
                             "(k8s/vault/agentjobs-dispatcher.hcl) or set vault.sweep_interval = 0")
            return report
        report.listed = len(accessors)
        self._foreign &= set(accessors)  # forget tokens that are gone
        held = held_accessors(await self.runtime.active_annotations())
        launching = set(self.launching())
        unknown = [a for a in accessors if a not in held and a not in launching and a not in self._foreign]
        tokens = await self._lookup_all(unknown, report)
        report.looked_up = len(unknown)
        for token in tokens:
            if not token.is_agent or token.meta.get(vault_layout.META_JOBS_IN) != self.scope:
                self._foreign.add(token.accessor)
        now = self._clock()
        # (a token minted after `launching` was read is younger than the grace: never an orphan yet)
        for token in orphans(tokens, scope=self.scope, held=held, launching=launching, now=now, grace=self.grace):
            expected = Expected(scope=self.scope, kind=Kind.MINTED,
                                investigation_id=token.meta.get(vault_layout.META_INVESTIGATION, ""))
            try:
                outcome = await self.credentials.revoke(token.accessor, expected=expected)
            except TemporaryError as exc:
                report.failed += 1
                log.warning("orphan_agent_token_not_revoked", token_accessor=token.accessor, error=exc.message)
                continue
            if outcome is Revocation.REFUSED:  # logged and counted by revoke; never looked at again
                report.refused += 1
                self._foreign.add(token.accessor)
                continue
            if outcome is not Revocation.REVOKED:  # gone meanwhile (its Job ended)
                continue
            report.revoked += 1
            if self.metrics is not None:
                self.metrics.orphan_tokens_revoked.inc()
            log.warning("orphan_agent_token_revoked", token_accessor=token.accessor,
                        investigation_id=token.meta.get(vault_layout.META_INVESTIGATION, ""),
                        age_s=round((now - token.created_at).total_seconds()))
        self.sweeps += 1
        (log.info if report.revoked or report.failed else log.debug)(
            "token_sweep_done", listed=report.listed, looked_up=report.looked_up, unreadable=report.unreadable,
            revoked=report.revoked, refused=report.refused, failed=report.failed)
        return report

    async def _lookup_all(self, accessors: list[str], report: SweepReport) -> list[AgentToken]:
        """Look each accessor up; one that cannot be looked up now is left for the next sweep.

        Vault answers 403 for a token whose revocation is in progress — routine while Jobs end.
        """
        limit = asyncio.Semaphore(LOOKUP_CONCURRENCY)

        async def one(accessor: str) -> AgentToken | None:
            async with limit:
                try:
                    data = await self.credentials.lookup_accessor(accessor)
                except TemporaryError as exc:
                    report.unreadable += 1
                    log.debug("token_lookup_failed", token_accessor=accessor, error=exc.message)
                    return None
            return None if data is None else AgentToken.from_lookup(accessor, data)

        found = await asyncio.gather(*(one(a) for a in accessors))
        return [t for t in found if t is not None]
