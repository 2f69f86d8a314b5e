"""Per-investigation Vault identity: mint a wrapped agent token, revoke it by accessor.

Every investigation gets its own token, created through the token role of its
phase (so the phase, not the model, decides its policies), with the
investigation's ids as metadata (they appear in the audit log of every request
the agent makes), a TTL of deadline + grace, and response-wrapped: the Job
receives only the single-use wrapping token. The dispatcher keeps the wrapped
token's accessor — never the token — on the Job, and revokes by accessor when
the Job ends, which revokes every lease (database user, RabbitMQ user)
issued under it.

Vault/OpenBao is spoken to over its HTTP API with aiohttp (async, with
timeouts, on the dispatcher's hot path). Errors become ``TemporaryError``:
an incident waits for Vault rather than launching without credentials.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import msgspec

from schemas import Phase
from schemas.errors import TemporaryError

from schemas import vault_paths as vault_layout
from schemas.logs import get_logger
from dispatcher.plumbing.settings import SettingsError, VaultSettings

log = get_logger("agentjobs.credentials")
PERMISSION_RETRY_AFTER = 30.0  # seconds; a 403 means our own token or policy needs fixing


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

    async def revoke(self, accessor: str) -> None:
        """Revoke the token with ``accessor`` and all its leases; already gone is fine."""
        ...

    async def close(self) -> None:
        ...


class NoCredentials:
    """``vault.auth_mode = "none"``: development only; Jobs get no Vault identity."""

    async def mint(self, **_: Any) -> WrappedToken | None:
        return None

    async def revoke(self, accessor: str) -> None:
        return None

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

    def __init__(self, settings: VaultSettings, *, token: str | None = None, scope: str = "") -> None:
        self.settings = settings
        self.scope = scope  # where this installation's Jobs live: token metadata the sweeper matches
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
        return WrappedToken(wrapping_token=wrap["token"], accessor=wrap["wrapped_accessor"], ttl=ttl)

    async def revoke(self, accessor: str) -> None:
        status, data = await self._post("auth/token/revoke-accessor", {"accessor": accessor},
                                        doing="revoke agent token")
        if status in (200, 204):
            log.info("agent_token_revoked", token_accessor=accessor)
            return
        errors = " ".join(str(e) for e in data.get("errors", []))
        if status == 400 and "invalid accessor" in errors:
            log.info("agent_token_already_gone", token_accessor=accessor)
            return
        raise TemporaryError(f"revoke agent token: Vault answered {status} {errors}")

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


def open_credentials(settings: VaultSettings, *, scope: str = "") -> Credentials:
    """Credentials for the configured mode (``scope``: stamped on minted tokens, see token_sweep)."""
    if settings.auth_mode == "per-investigation":
        return VaultCredentials(settings, scope=scope)
    if settings.auth_mode == "kubernetes":
        return LoginRevoker(settings)
    return NoCredentials()
