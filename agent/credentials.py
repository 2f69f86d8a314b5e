"""The agent's Vault identity: unwrap (or log in) once, fetch dynamic secrets, renew, revoke.

The Job receives a single-use wrapping token. Unwrapping it is the first thing
the agent does and happens exactly once: if Vault says the wrapping token is
not valid, somebody else unwrapped it (or it expired) — the agent fails closed
with ``CredentialsUnavailable`` and the dispatcher reports the possible
interception. With the unwrapped token the agent asks for what its phase's
policy may grant: a PostgreSQL user from its phase's database role (diagnostics
in shadow and read-only, remediation — which may also terminate backends — in
the phases that act; a refusal is evidence for the finding, not a crash) and a
RabbitMQ user for publishing results (required). In the phases that act, the same token creates
the action claims (``create_kv``: create-only, ``agent.remediation.claims``) that keep a retried
pod or Job from acting twice.
Leases are renewed only within the token's own lifetime (``renewal.py``), and
``revoke_self`` at the end revokes the token and, with it, every lease.

hvac is synchronous; each call runs in a thread. Tokens and passwords live in
the hvac client and in ``DynamicSecret.password`` (hidden from ``repr``) —
never in a log line or an exception message.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import requests

from schemas import Phase
from schemas import vault_paths as vault_layout
from schemas.logs import get_logger
from schemas.redaction import mask_text

from .config import AgentEnv
from .renewal import LeaseState, next_check, renewal_increment

log = get_logger("agentjobs.agent.credentials")
Clock = Callable[[], float]

INTERCEPTED = "wrapping token already used or invalid: possible interception"


class CredentialsUnavailable(Exception):
    """The agent cannot get the credentials it needs; it must fail closed (exit 3)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # stable code: wrapping_token_invalid, vault_unavailable, ...


@dataclass(frozen=True, kw_only=True)
class DynamicSecret:
    """A username/password pair Vault issued under a lease."""

    username: str
    password: str = field(repr=False)
    lease: LeaseState


@dataclass(frozen=True, kw_only=True)
class Denied:
    """Why a credential the phase might allow was not issued (evidence for the finding)."""

    path: str
    reason: str  # e.g. "permission denied (403)"


@dataclass(frozen=True, kw_only=True)
class Created:
    """A create-only KV write that created the secret (``version`` 1: nobody had written it)."""

    path: str
    version: int


@dataclass(frozen=True, kw_only=True)
class AlreadyExists:
    """A create-only KV write refused because the secret is already there: not an error, an answer.

    ``data``: what is stored there, when it could be read back (None: the write was refused as a
    check-and-set mismatch by a token that may not read it).
    """

    path: str
    data: dict[str, Any] | None = None


CAS_MISMATCH = "check-and-set parameter did not match"


def judge_refused_create(path: str, refused: str, stored: dict[str, Any] | None | Denied) -> AlreadyExists | Denied:
    """A create-only write got 403 ``refused``; what a read of ``path`` returned decides what it means (pure).

    A policy with ``create`` but no ``update`` makes Vault answer 403 — not a check-and-set
    mismatch — for a secret that exists (kv-v2 checks existence first: a write to an existing
    secret is an update). So: stored data → ``AlreadyExists``; nothing readable (no such secret,
    a deleted version whose metadata remains, or the read refused too) → ``Denied``: cannot know,
    and a caller that must fail closed does not act.
    """
    if isinstance(stored, dict):
        return AlreadyExists(path=path, data=stored)
    if stored is None:
        return Denied(path=path, reason=f"{refused}: not permitted to create it (or a deleted version remains)")
    return Denied(path=path, reason=refused)


@dataclass(frozen=True, kw_only=True)
class Identity:
    """Who the agent is in Vault (no token in here)."""

    accessor: str
    policies: tuple[str, ...]
    metadata: dict[str, str]
    expires_at: float  # monotonic seconds: the token's end (never extended by the agent)


def _describe(exc: BaseException) -> str:
    """A short, secret-free description of a Vault client error."""
    if isinstance(exc, hvac.exceptions.VaultError):
        status = {
            hvac.exceptions.Forbidden: 403, hvac.exceptions.InvalidRequest: 400,
            hvac.exceptions.InvalidPath: 404, hvac.exceptions.RateLimitExceeded: 429,
            hvac.exceptions.InternalServerError: 500, hvac.exceptions.VaultDown: 503,
        }.get(type(exc))
        errors = "; ".join(str(e) for e in (exc.errors or []))[:300] if exc.errors else ""
        # Vault's multi-error text ("1 error occurred:\n\t* permission denied\n") on one line
        text = " ".join(errors.replace("1 error occurred:", "").replace("* ", "").split()) or type(exc).__name__
        return mask_text(f"{text} ({status})" if status else text)
    return mask_text(" ".join(f"{type(exc).__name__}: {str(exc)[:200]}".split()))


_TRANSPORT_ERRORS = (requests.RequestException, OSError)


class VaultSession:
    """One agent identity in Vault: created by ``unwrap`` or ``login_kubernetes``."""

    def __init__(self, addr: str, *, timeout: float, clock: Clock = time.monotonic,
                 verify: str | bool = True, phase: Phase | None = None) -> None:
        self._addr = addr
        # The Job's phase (AGENTJOBS_PHASE), decided outside the model: picks the database role.
        # None: the read-only role, the least a phase may get (a remediation policy refuses it).
        self.phase = phase
        self._timeout = timeout  # seconds per request
        self._verify = verify  # a CA bundle path for a Vault behind a private CA, or the system's (True)
        # token="" (not None): hvac would otherwise pick up $VAULT_TOKEN or ~/.vault-token
        self._client = hvac.Client(url=addr, token="", timeout=timeout, verify=verify)
        self._clock = clock
        self.identity: Identity | None = None
        self.leases: dict[str, LeaseState] = {}  # lease id -> state
        self._revoked = False

    async def _call(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.to_thread(fn)

    # -- becoming someone ---------------------------------------------------------------

    async def unwrap(self, wrapped_token_file: Path) -> Identity:
        """Exchange the Job's wrapping token for the agent token, exactly once."""
        try:
            wrapping_token = wrapped_token_file.read_text().strip()
        except OSError as exc:
            raise CredentialsUnavailable(
                "wrapped_token_missing", f"cannot read the wrapping token file ({type(exc).__name__})"
            ) from None
        if not wrapping_token:
            raise CredentialsUnavailable("wrapped_token_missing", "the wrapping token file is empty")
        try:
            # The wrapping token authenticates its own unwrap; it is never sent anywhere else.
            unwrapper = hvac.Client(url=self._addr, token=wrapping_token, timeout=self._timeout,
                                    verify=self._verify)
            response = await self._call(unwrapper.sys.unwrap)
        except (hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden, hvac.exceptions.InvalidPath):
            # Vault answers 400 "wrapping token is not valid or does not exist" (or 403 for
            # an unknown token): used before — by us or by someone who intercepted it — or expired.
            raise CredentialsUnavailable("wrapping_token_invalid", INTERCEPTED) from None
        except (hvac.exceptions.VaultError, *_TRANSPORT_ERRORS) as exc:
            raise CredentialsUnavailable("vault_unavailable", f"cannot unwrap: {_describe(exc)}") from None
        finally:
            wrapping_token = ""
        auth = (response or {}).get("auth") or {}
        if not auth.get("client_token"):
            raise CredentialsUnavailable("wrapping_token_invalid", "the wrapping token did not wrap a token")
        self._client.token = auth["client_token"]
        return await self._become(auth)

    async def login_kubernetes(self, role: str, sa_token_file: Path) -> Identity:
        """Log in with the projected ServiceAccount token to the phase's kubernetes role."""
        try:
            jwt = sa_token_file.read_text().strip()
        except OSError as exc:
            raise CredentialsUnavailable(
                "sa_token_missing", f"cannot read the ServiceAccount token file ({type(exc).__name__})"
            ) from None
        try:
            response = await self._call(
                lambda: self._client.auth.kubernetes.login(role, jwt, mount_point=vault_layout.K8S_AUTH_MOUNT)
            )
        except (hvac.exceptions.VaultError, *_TRANSPORT_ERRORS) as exc:
            raise CredentialsUnavailable("login_failed", f"kubernetes login as {role}: {_describe(exc)}") from None
        finally:
            jwt = ""
        auth = (response or {}).get("auth") or {}
        if not auth.get("client_token"):
            raise CredentialsUnavailable("login_failed", f"kubernetes login as {role} returned no token")
        return await self._become(auth)

    async def _become(self, auth: dict[str, Any]) -> Identity:
        now = self._clock()
        ttl = float(auth.get("lease_duration") or 0)
        try:
            # The token's real remaining TTL (capped by its max TTL) — renewals stop there.
            looked = await self._call(self._client.auth.token.lookup_self)
            ttl = float((looked or {}).get("data", {}).get("ttl", ttl))
        except (hvac.exceptions.VaultError, *_TRANSPORT_ERRORS) as exc:
            log.warning("token_lookup_failed", error=_describe(exc))
        self.identity = Identity(
            accessor=str(auth.get("accessor", "")),
            policies=tuple(auth.get("token_policies") or auth.get("policies") or ()),
            metadata={str(k): str(v) for k, v in (auth.get("metadata") or {}).items()},
            expires_at=now + ttl,
        )
        log.info("vault_identity_acquired", token_accessor=self.identity.accessor,
                 policies=list(self.identity.policies), token_ttl=int(ttl))
        return self.identity

    # -- dynamic secrets --------------------------------------------------------------

    async def read_secret(self, path: str) -> DynamicSecret | Denied:
        """Ask for a dynamic username/password at ``path``; a refusal comes back as ``Denied``."""
        try:
            response = await self._call(lambda: self._client.read(path))
        except (hvac.exceptions.VaultError, *_TRANSPORT_ERRORS) as exc:
            denied = Denied(path=path, reason=_describe(exc))
            log.info("credentials_denied", path=path, reason=denied.reason)
            return denied
        if not response:
            return Denied(path=path, reason="no such path (404)")
        data = response.get("data") or {}
        if not data.get("username") or not data.get("password"):
            return Denied(path=path, reason="response has no username/password")
        now = self._clock()
        duration = float(response.get("lease_duration") or 0)
        lease = LeaseState(lease_id=str(response.get("lease_id", "")), renewable=bool(response.get("renewable")),
                           duration=duration, expires_at=now + duration)
        if lease.lease_id:
            self.leases[lease.lease_id] = lease
        log.info("credentials_issued", path=path, username=data["username"], lease_ttl=int(duration))
        return DynamicSecret(username=str(data["username"]), password=str(data["password"]), lease=lease)

    async def database(self, target: str = "") -> DynamicSecret | Denied:
        """A PostgreSQL user on ``target`` ("": the default one) from the role of this session's phase."""
        return await self.read_secret(vault_layout.database_creds_path(self.phase, target))

    async def llm_api_key(self) -> str | Denied:
        """The LLM endpoint's API key from KV (``agentjobs-kv/llm``, field ``api_key``)."""
        path = vault_layout.kv_llm_path()
        try:
            response = await self._call(lambda: self._client.read(path))
        except (hvac.exceptions.VaultError, *_TRANSPORT_ERRORS) as exc:
            return Denied(path=path, reason=_describe(exc))
        key = (((response or {}).get("data") or {}).get("data") or {}).get("api_key")
        if not isinstance(key, str):
            return Denied(path=path, reason="no api_key stored")
        return key

    async def read_kv(self, path: str) -> dict[str, Any] | None | Denied:
        """The data of the kv-v2 secret at ``path`` (``<mount>/data/<name>``), read fresh.

        None: Vault says there is no such secret (404 without errors; also a deleted version).
        ``Denied``: it could not be read — 403, Vault down or sealed, no such mount (a 404 *with*
        errors, "no handler for route"), or not a kv-v2 answer. Callers that must fail closed
        (the kill switch) can tell "nothing stored" from "cannot know".
        """
        try:
            response = await self._call(lambda: self._client.adapter.get(f"/v1/{path}"))
        except hvac.exceptions.InvalidPath as exc:
            if exc.errors:
                return Denied(path=path, reason=_describe(exc))
            return None
        except (hvac.exceptions.VaultError, *_TRANSPORT_ERRORS) as exc:
            return Denied(path=path, reason=_describe(exc))
        body = response if isinstance(response, dict) else {}
        outer = body.get("data")
        if not isinstance(outer, dict):
            return Denied(path=path, reason="not a kv-v2 secret (no data)")
        data = outer.get("data")
        if data is None:
            return None
        if not isinstance(data, dict):
            return Denied(path=path, reason="not a kv-v2 secret (data is not an object)")
        return data

    async def create_kv(self, path: str, data: Mapping[str, Any]) -> Created | AlreadyExists | Denied:
        """Write the kv-v2 secret at ``path`` only if it does not exist yet (``options: {"cas": 0}``).

        ``Created``: this call created it. ``AlreadyExists``: somebody did before — a check-and-set
        mismatch (a token that may update), or a 403 followed by a read that finds it (a create-only
        policy; see ``judge_refused_create``). ``Denied``: refused for another reason, or Vault down —
        the caller cannot know whether it exists.
        """
        body = {"options": {"cas": 0}, "data": dict(data)}
        try:
            response = await self._call(lambda: self._client.adapter.post(f"/v1/{path}", json=body))
        except hvac.exceptions.InvalidRequest as exc:
            if any(CAS_MISMATCH in str(e) for e in (exc.errors or [])):
                stored = await self.read_kv(path)
                return AlreadyExists(path=path, data=stored if isinstance(stored, dict) else None)
            return Denied(path=path, reason=_describe(exc))
        except hvac.exceptions.Forbidden as exc:
            return judge_refused_create(path, _describe(exc), await self.read_kv(path))
        except (hvac.exceptions.VaultError, *_TRANSPORT_ERRORS) as exc:
            return Denied(path=path, reason=_describe(exc))
        meta = (response if isinstance(response, dict) else {}).get("data")
        version = meta.get("version") if isinstance(meta, dict) else None
        if not isinstance(version, int):
            return Denied(path=path, reason="not a kv-v2 answer (no version)")
        return Created(path=path, version=version)

    async def rabbitmq(self) -> DynamicSecret:
        """The RabbitMQ user for publishing results; without it there is nothing to do.

        Its own dynamic user; only where the installation has no rabbitmq engine (``agentjobs up``
        on a broker without the management API) the shared user from KV, with a warning.
        """
        got = await self.read_secret(vault_layout.rabbitmq_creds_path())
        if isinstance(got, Denied):
            shared = await self._shared_broker_user()
            if shared is None:
                raise CredentialsUnavailable("rabbitmq_credentials", f"no RabbitMQ user: {got.reason}")
            log.warning("shared_broker_user", username=shared.username,
                        reason=f"no per-investigation user: {got.reason}")
            return shared
        return got

    async def _shared_broker_user(self) -> DynamicSecret | None:
        path = vault_layout.kv_rabbitmq_shared_path()
        try:
            response = await self._call(lambda: self._client.read(path))
        except (hvac.exceptions.VaultError, *_TRANSPORT_ERRORS):
            return None
        data = (((response or {}).get("data") or {}).get("data") or {})
        if not data.get("username"):
            return None
        no_lease = LeaseState(lease_id="", renewable=False, duration=0.0, expires_at=self._clock())
        return DynamicSecret(username=str(data["username"]), password=str(data.get("password", "")), lease=no_lease)

    # -- renewal ----------------------------------------------------------------------

    async def renew_due(self) -> float | None:
        """Renew every lease that is due; returns when to look again (monotonic) or None."""
        if self.identity is None or self._revoked:
            return None
        token_end = self.identity.expires_at
        for lease_id, lease in list(self.leases.items()):
            now = self._clock()
            increment = renewal_increment(lease, token_expires_at=token_end, now=now)
            if increment is None:
                continue
            try:
                answer = await self._call(
                    lambda lease_id=lease_id, increment=increment: self._client.sys.renew_lease(lease_id, increment)
                )
            except (hvac.exceptions.VaultError, *_TRANSPORT_ERRORS) as exc:
                # Not fatal: the lease lives on until it expires; no retry storm either.
                log.warning("lease_renewal_failed", lease_id=lease_id, error=_describe(exc))
                self.leases[lease_id] = LeaseState(lease_id=lease_id, renewable=False,
                                                   duration=lease.duration, expires_at=lease.expires_at)
                continue
            granted = float((answer or {}).get("lease_duration") or 0)
            self.leases[lease_id] = lease.renewed(now=now, duration=granted)
            log.info("lease_renewed", lease_id=lease_id, lease_ttl=int(granted))
        return next_check(list(self.leases.values()), token_expires_at=token_end, now=self._clock())

    async def renew_until(self, stop: asyncio.Event) -> None:
        """Renew due leases until ``stop`` is set (run as a named background task)."""
        try:
            while not stop.is_set():
                at = await self.renew_due()
                delay = None if at is None else max(0.0, at - self._clock())
                try:
                    await asyncio.wait_for(stop.wait(), timeout=delay)
                except TimeoutError:
                    continue
        except Exception:
            # Not fatal to the investigation (leases live until they expire), but never silent.
            log.exception("lease_renewer_crashed")

    # -- the end ----------------------------------------------------------------------

    async def revoke_self(self) -> bool:
        """Revoke the agent token and every lease issued under it; True if Vault confirmed."""
        if self.identity is None or self._revoked:
            return False
        try:
            await self._call(self._client.auth.token.revoke_self)
        except (hvac.exceptions.VaultError, *_TRANSPORT_ERRORS) as exc:
            # The dispatcher revokes by accessor when the Job ends; this is the early exit.
            log.warning("token_revoke_failed", token_accessor=self.identity.accessor, error=_describe(exc))
            return False
        self._revoked = True
        self.leases.clear()
        self._client.token = None
        log.info("token_revoked", token_accessor=self.identity.accessor)
        return True


async def start(env: AgentEnv, *, clock: Clock = time.monotonic) -> VaultSession:
    """A Vault session for the Job's auth mode (not for mode ``none``)."""
    session = VaultSession(env.vault_addr, timeout=env.vault_timeout, clock=clock, verify=env.vault_verify,
                           phase=env.phase)
    if env.auth_mode == "kubernetes":
        assert env.sa_token_file is not None  # config.load guarantees it
        identity = await session.login_kubernetes(vault_layout.kubernetes_role(env.phase), env.sa_token_file)
    else:
        identity = await session.unwrap(env.wrapped_token_file)
    claimed = identity.metadata.get(vault_layout.META_INVESTIGATION)
    if claimed is not None and claimed != env.investigation_id:
        # A token minted for another investigation: wrong attribution at best, a swap at worst.
        await session.revoke_self()
        raise CredentialsUnavailable(
            "token_mismatch", f"the Vault token belongs to investigation {claimed}, not {env.investigation_id}"
        )
    return session
