"""Per-investigation Vault identity: mint a wrapped agent token, revoke it by accessor.

Every investigation gets its own token, created through the token role of its
phase (so the phase, not the model, decides its policies), with the
investigation's ids as metadata (they appear in the audit log of every request
the agent makes), a TTL of deadline + grace, and response-wrapped: the Job
receives only the single-use wrapping token. The dispatcher keeps the wrapped
token's accessor — never the token — on the Job, and revokes by accessor when
the Job ends, which revokes every lease (database user, RabbitMQ user)
issued under it.

Revocation only of what we issued: the dispatcher's Vault policy can revoke *any* accessor
(Vault's ACL cannot narrow ``auth/token/revoke-accessor`` to our own tokens, see
``k8s/vault/agentjobs-dispatcher.hcl``), so every revocation first looks the accessor up and
revokes only a token whose own record says it is ours — an agent token of this installation
(and, when the caller knows it, this investigation, Job and phase) — as ``revocable`` decides.
Anything else is refused: logged at warning, counted, never revoked.

Vault/OpenBao is spoken to over its HTTP API with aiohttp (async, with
timeouts, on the dispatcher's hot path). Errors become ``TemporaryError``:
an incident waits for Vault rather than launching without credentials.

Every mint and revocation passes here, so this is where they are counted
(``agentjobs_credentials_minted_total``, ``agentjobs_credentials_revoked_total``,
``agentjobs_credential_revocation_failures_total``): a failed revocation attempt is
counted whichever caller retries it (the watcher until it sticks, the sweeper next sweep).
"""

from __future__ import annotations

import asyncio
import enum
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import msgspec

from schemas import Phase
from schemas.errors import TemporaryError

from schemas import vault_paths as vault_layout
from schemas.logs import get_logger
from dispatcher.plumbing.metrics import Metrics
from dispatcher.plumbing.settings import SettingsError, VaultSettings

log = get_logger("agentjobs.credentials")
PERMISSION_RETRY_AFTER = 30.0  # seconds; a 403 means our own token or policy needs fixing
META_JOB = "job_name"  # token metadata: the Job the token was minted for (beside vault_paths' META_*)
TOKEN_DISPLAY_PREFIX = "token-"  # Vault prefixes the display name of tokens created through the token store
KUBERNETES_LOGIN_PATH = f"auth/{vault_layout.K8S_AUTH_MOUNT}/login"
KUBERNETES_SCOPE = "kubernetes/"  # KubernetesRuntime.where: "kubernetes/<namespace>"
_ROLE_PHASE = {vault_layout.token_role(p): p for p in Phase}  # token roles and kubernetes roles share names
assert _ROLE_PHASE == {vault_layout.kubernetes_role(p): p for p in Phase}


class Kind(enum.Enum):
    """Which of our two kinds of agent token."""

    MINTED = "minted"  # created by the dispatcher through the phase's token role (per-investigation)
    LOGIN = "login"  # the agent logged in itself with kubernetes auth


@dataclass(frozen=True, kw_only=True)
class Expected:
    """What a token must be for the dispatcher to revoke it; empty fields are not checked."""

    scope: str  # this installation: "kubernetes/<namespace>" or "local/<dir>" (minted tokens' jobs_in)
    investigation_id: str = ""
    job_name: str = ""
    phase: Phase | None = None
    service_account: str = ""  # kubernetes auth: the Job's ServiceAccount
    kind: Kind | None = None  # None: either kind


# Why a token is not ours to revoke (bounded: the refusal counter's label).
NOT_AN_AGENT_TOKEN = "not_an_agent_token"  # no policy, or one that is not an agent phase policy (root, …)
UNKNOWN_ORIGIN = "unknown_origin"  # neither created through our token roles nor by our kubernetes login
OTHER_INSTALLATION = "other_installation"  # another jobs_in / namespace
OTHER_INVESTIGATION = "other_investigation"
OTHER_JOB = "other_job"
OTHER_PHASE = "other_phase"
OTHER_SERVICE_ACCOUNT = "other_service_account"
WRONG_KIND = "wrong_kind"


def _str_map(value: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, Mapping) else {}


def revocable(metadata: Mapping[str, Any], expected: Expected) -> str | None:
    """None if the token Vault describes as ``metadata`` (a lookup-accessor answer's ``data``) is
    ours to revoke as ``expected`` says; otherwise why not (one of the reason codes above). Pure.

    Ours means: its policies are exactly the agent policy of one phase (never ``root``, never
    anything else), and either it was created through that phase's token role with this
    installation's ``jobs_in`` (and the investigation/Job/phase asked for), or it came from a
    kubernetes-auth login to that phase's role by a ServiceAccount of this installation's
    namespace (and the Job's ServiceAccount/phase, when asked for). A login token carries no
    investigation: what ties it to one is checked where its accessor is recorded (``control.py``).
    """
    raw = metadata.get("policies")
    policies = sorted({str(p) for p in raw}) if isinstance(raw, list | tuple) else []
    if len(policies) != 1 or not policies[0].startswith(vault_layout.POLICY_PREFIX):
        return NOT_AN_AGENT_TOKEN
    meta = _str_map(metadata.get("meta"))
    path = str(metadata.get("path") or "")
    if path.startswith("auth/token/create/"):
        kind, role = Kind.MINTED, path.removeprefix("auth/token/create/")
        if str(metadata.get("role") or "") != role:
            return UNKNOWN_ORIGIN
    elif path == KUBERNETES_LOGIN_PATH:
        kind, role = Kind.LOGIN, meta.get("role", "")
    else:
        return UNKNOWN_ORIGIN
    phase = _ROLE_PHASE.get(role)
    if phase is None or policies != [vault_layout.policy(phase)]:
        return UNKNOWN_ORIGIN
    if expected.kind is not None and kind is not expected.kind:
        return WRONG_KIND
    if expected.phase is not None and phase is not expected.phase:
        return OTHER_PHASE
    if kind is Kind.MINTED:
        if meta.get(vault_layout.META_JOBS_IN, "") != expected.scope:
            return OTHER_INSTALLATION
        if meta.get(vault_layout.META_PHASE, "") != phase.value:
            return UNKNOWN_ORIGIN
        if expected.investigation_id and meta.get(vault_layout.META_INVESTIGATION, "") != expected.investigation_id:
            return OTHER_INVESTIGATION
        if expected.job_name and (
                meta.get(META_JOB, expected.job_name) != expected.job_name  # (tokens minted before job_name)
                or str(metadata.get("display_name") or "") != TOKEN_DISPLAY_PREFIX + expected.job_name):
            return OTHER_JOB
        return None
    if not expected.scope.startswith(KUBERNETES_SCOPE) or \
            meta.get("service_account_namespace", "") != expected.scope.removeprefix(KUBERNETES_SCOPE):
        return OTHER_INSTALLATION
    if not meta.get("service_account_name") or (
            expected.service_account and meta["service_account_name"] != expected.service_account):
        return OTHER_SERVICE_ACCOUNT
    return None


class Revocation(enum.Enum):
    REVOKED = "revoked"
    GONE = "gone"  # already revoked or expired
    REFUSED = "refused"  # not ours (``revocable``): left alone
    DISABLED = "disabled"  # no credentials in this mode


class PermissionDenied(TemporaryError):
    """Vault answered 403: our own token or policy needs fixing (retried slowly, never dropped)."""


class WrappedToken(msgspec.Struct, frozen=True, kw_only=True):
    """What the Job gets (``wrapping_token``) and what we keep (``accessor``)."""

    wrapping_token: str  # single use; only ever written into the Job's Secret / file
    accessor: str  # accessor of the wrapped agent token: revoke by it when the Job ends
    ttl: int  # seconds the agent token lives at most


class Credentials(Protocol):
    async def mint(self, *, phase: Phase, investigation_id: str, incident_key: str, job_name: str,
                   ttl: int) -> WrappedToken | None:
        """A wrapped token for one investigation (None: credentials disabled)."""
        ...

    async def revoke(self, accessor: str, *, expected: Expected | None = None) -> Revocation:
        """Revoke the token with ``accessor`` and all its leases — only if it is ours
        (``revocable``; ``expected`` None: any agent token of this installation); gone is fine."""
        ...

    async def close(self) -> None:
        ...


class NoCredentials:
    """``vault.auth_mode = "none"``: development only; Jobs get no Vault identity."""

    async def mint(self, **_: Any) -> WrappedToken | None:
        return None

    async def revoke(self, accessor: str, *, expected: Expected | None = None) -> Revocation:
        return Revocation.DISABLED

    async def close(self) -> None:
        return None


def vault_ca(settings: VaultSettings) -> bytes | None:
    """The PEM of ``vault.ca_cert`` (None: the system trust store); ``SettingsError`` if unusable."""
    if not settings.ca_cert:
        return None
    try:
        pem = Path(settings.ca_cert).read_bytes()
    except OSError as exc:
        raise SettingsError("settings", "vault.ca_cert", f"cannot read {settings.ca_cert}: {exc.strerror}") from None
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise SettingsError("settings", "vault.ca_cert", f"{settings.ca_cert} holds no PEM certificate")
    return pem


def dispatcher_token(settings: VaultSettings) -> str:
    """The dispatcher's own Vault token: from ``vault.token_file`` or ``vault.token``."""
    if settings.token_file:
        return Path(settings.token_file).read_text().strip()
    return settings.token


class VaultCredentials:
    """Mints and revokes agent tokens through Vault's HTTP API."""

    def __init__(self, settings: VaultSettings, *, token: str | None = None, scope: str = "",
                 metrics: Metrics | None = None) -> None:
        self.settings = settings
        # where this installation's Jobs live: token metadata the sweeper matches, and what a
        # token must carry (or, kubernetes auth, the namespace it must come from) to be revoked
        self.scope = scope
        self.metrics = metrics  # counts mints, revocations (done, refused, failed)
        ca = vault_ca(settings)
        self._ssl: ssl.SSLContext | None = ssl.create_default_context(cadata=ca.decode()) if ca else None
        self._token = token if token is not None else dispatcher_token(settings)
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                base_url=self.settings.addr.rstrip("/") + "/",
                timeout=aiohttp.ClientTimeout(total=self.settings.request_timeout),
                connector=aiohttp.TCPConnector(ssl=self._ssl) if self._ssl is not None else None,
            )
        return self._session

    async def _post(self, path: str, body: dict[str, Any], *, doing: str,
                    headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        return await self._request("POST", path, body, doing=doing, headers=headers)

    async def _request(self, method: str, path: str, body: dict[str, Any] | None, *, doing: str,
                       headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        try:
            async with self._http().request(
                method, f"v1/{path}", json=body, headers={"X-Vault-Token": self._token, **(headers or {})}
            ) as response:
                text = await response.text()
                status = response.status
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise TemporaryError(f"{doing}: Vault unreachable ({exc!r})") from exc
        data: dict[str, Any] = {}
        if text:
            try:
                data = msgspec.json.decode(text)
            except msgspec.DecodeError:
                data = {"errors": [text[:200]]}
        if status == 403:
            raise PermissionDenied(f"{doing}: permission denied — check the dispatcher's Vault token and "
                                 f"policy {vault_layout.DISPATCHER_POLICY}", delay=PERMISSION_RETRY_AFTER)
        if status == 429 or status >= 500:
            raise TemporaryError(f"{doing}: Vault answered {status} {data.get('errors', '')}")
        return status, data

    async def mint(self, *, phase: Phase, investigation_id: str, incident_key: str, job_name: str,
                   ttl: int) -> WrappedToken:
        role = vault_layout.token_role(phase)
        body = {
            "meta": {
                vault_layout.META_INVESTIGATION: investigation_id,
                vault_layout.META_INCIDENT: incident_key,
                vault_layout.META_PHASE: phase.value,
                META_JOB: job_name,
                **({vault_layout.META_JOBS_IN: self.scope} if self.scope else {}),
            },
            "ttl": f"{ttl}s",
            "explicit_max_ttl": f"{ttl}s",
            "display_name": job_name,
            "renewable": True,
        }
        status, data = await self._post(
            f"auth/token/create/{role}", body, doing=f"create agent token ({role})",
            headers={"X-Vault-Wrap-TTL": f"{self.settings.wrap_ttl}s"},
        )
        wrap = data.get("wrap_info") or {}
        if status != 200 or not wrap.get("token") or not wrap.get("wrapped_accessor"):
            raise TemporaryError(f"create agent token ({role}): unexpected answer {status} {data.get('errors', '')}")
        log.info("agent_token_minted", role=role, wrapped_accessor=wrap["wrapped_accessor"], ttl_s=ttl)
        if self.metrics is not None:
            self.metrics.credentials_minted.labels(phase=phase.value).inc()
        return WrappedToken(wrapping_token=wrap["token"], accessor=wrap["wrapped_accessor"], ttl=ttl)

    def expected(self, **fields: Any) -> Expected:
        """What a token of this installation must be (``fields``: investigation_id, job_name, …)."""
        return Expected(scope=self.scope, **fields)

    async def revoke(self, accessor: str, *, expected: Expected | None = None) -> Revocation:
        """Look ``accessor`` up, then revoke it only if ``revocable`` says it is ours.

        Raises TemporaryError if Vault cannot answer (the caller retries); a refusal is final.
        """
        try:
            outcome = await self._revoke(accessor, expected or self.expected())
        except PermissionDenied:
            self._count_failure("permission_denied")
            raise
        except TemporaryError:
            self._count_failure("vault_error")
            raise
        if self.metrics is not None and outcome in (Revocation.REVOKED, Revocation.GONE):
            self.metrics.credentials_revoked.labels(outcome=outcome.value).inc()
        return outcome

    def _count_failure(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.revocation_failures.labels(reason=reason).inc()

    async def _revoke(self, accessor: str, expected: Expected) -> Revocation:
        try:
            data = await self.lookup_accessor(accessor)
        except PermissionDenied as exc:  # also Vault's answer while a revocation is in progress
            raise TemporaryError(f"look up token before revoking it: {exc.message}") from None
        if data is None:
            log.info("agent_token_already_gone", token_accessor=accessor)
            return Revocation.GONE
        reason = revocable(data, expected)
        if reason is not None:
            self._refused(accessor, reason, data, expected)
            return Revocation.REFUSED
        status, data = await self._post("auth/token/revoke-accessor", {"accessor": accessor},
                                        doing="revoke agent token")
        if status in (200, 204):
            log.info("agent_token_revoked", token_accessor=accessor)
            return Revocation.REVOKED
        errors = " ".join(str(e) for e in data.get("errors", []))
        if status == 400 and "invalid accessor" in errors:
            log.info("agent_token_already_gone", token_accessor=accessor)
            return Revocation.GONE
        raise TemporaryError(f"revoke agent token: Vault answered {status} {errors}")

    def _refused(self, accessor: str, reason: str, data: Mapping[str, Any], expected: Expected) -> None:
        if self.metrics is not None:
            self.metrics.revocations_refused.labels(reason=reason).inc()
        meta = _str_map(data.get("meta"))
        log.warning("token_revocation_refused", token_accessor=accessor, reason=reason,
                    path=str(data.get("path") or "")[:128], policies=[str(p) for p in data.get("policies") or []][:8],
                    token_investigation_id=meta.get(vault_layout.META_INVESTIGATION, ""),
                    token_jobs_in=meta.get(vault_layout.META_JOBS_IN, ""),
                    token_service_account=meta.get("service_account_name", ""),
                    expected_investigation_id=expected.investigation_id, expected_job_name=expected.job_name,
                    scope=expected.scope)

    async def list_accessors(self) -> list[str] | None:
        """Every token accessor in Vault (None: our policy does not grant it; see token_sweep)."""
        try:
            status, data = await self._request("LIST", "auth/token/accessors", None, doing="list token accessors")
        except PermissionDenied:  # not granted: not a passing failure
            return None
        if status == 404:  # no tokens with accessors at all
            return []
        if status != 200:
            raise TemporaryError(f"list token accessors: Vault answered {status} {data.get('errors', '')}")
        return [str(k) for k in (data.get("data") or {}).get("keys") or []]

    async def lookup_accessor(self, accessor: str) -> dict[str, Any] | None:
        """What Vault knows about the token with ``accessor`` (None: it is gone)."""
        status, data = await self._post("auth/token/lookup-accessor", {"accessor": accessor},
                                        doing=f"look up token by accessor {accessor}")
        if status == 200:
            return dict(data.get("data") or {})
        errors = " ".join(str(e) for e in data.get("errors", []))
        if status == 400 and "invalid accessor" in errors:
            return None
        raise TemporaryError(f"look up token by accessor: Vault answered {status} {errors}")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class LoginRevoker(VaultCredentials):
    """Kubernetes auth: agents log in themselves; the dispatcher only revokes their tokens."""

    async def mint(self, **_: Any) -> WrappedToken | None:
        return None


def open_credentials(settings: VaultSettings, *, scope: str = "", metrics: Metrics | None = None) -> Credentials:
    """Credentials for the configured mode (``scope``: stamped on minted tokens, see token_sweep;
    for kubernetes auth, the namespace login tokens must come from)."""
    if settings.auth_mode == "per-investigation":
        return VaultCredentials(settings, scope=scope, metrics=metrics)
    if settings.auth_mode == "kubernetes":
        return LoginRevoker(settings, scope=scope, metrics=metrics)
    return NoCredentials()
