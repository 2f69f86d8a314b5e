"""``agentjobs actions disable|enable|status``: the global kill switch, as an operator, in Vault KV.

The switch is the kv-v2 document ``agentjobs-kv/data/actions`` (``schemas.actions.KillSwitch``:
``{"enabled", "by", "reason", "at"}``). Every agent reads it with its own phase token right
before each action and acts on nothing while it says disabled or cannot be read; agent
policies may read it, never write it. Writing it takes an operator's Vault token, found in
this order: ``--token`` / ``$VAULT_TOKEN`` / ``$BAO_TOKEN``, then ``vault.token`` /
``vault.token_file``, and only when none of these is configured, the root token of the
OpenBao that ``agentjobs up`` runs from this directory (its dev server prints it into
``<runtime.state_dir>/openbao/openbao.log``, mode 0600). Each write is a new kv-v2 version,
so Vault keeps who switched what when (``vault kv metadata get agentjobs-kv/actions``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import msgspec
import requests

from schemas import KillSwitch, utcnow
from schemas import vault_paths as layout
from schemas.actions import KillSwitchUnreadable, parse_kill_switch
from schemas.redaction import mask_text

from dispatcher.credentials.tokens import dispatcher_token
from dispatcher.plumbing.settings import Settings

ROOT_TOKEN_LINE = "Root Token: "  # how the OpenBao dev server prints it


class ActionsError(Exception):
    """A clear, user-facing failure: no token, Vault unreachable, permission denied (exit 2)."""


@dataclass(frozen=True)
class OperatorToken:
    token: str
    source: str  # where it came from, for messages (never the token)


@dataclass(frozen=True, kw_only=True)
class SwitchStatus:
    switch: KillSwitch | None  # None: unreadable (agents refuse every action)
    version: int = 0  # kv-v2 version; 0: never written
    problem: str = ""  # why it is unreadable

    def as_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"path": layout.kv_actions_path(), "version": self.version}
        if self.switch is None:
            return {**body, "readable": False, "enabled": None, "problem": self.problem}
        return {**body, "readable": True, **self.switch.document()}

    def line(self) -> str:
        if self.switch is None:
            return f"kill switch unreadable ({self.problem}): agents refuse every action until it is fixed"
        where = f"{layout.kv_actions_path()} version {self.version}" if self.version else "nothing stored"
        return f"{self.switch.describe()} ({where})"


def embedded_root_token(state_dir: Path) -> str | None:
    """The root token of ``agentjobs up``'s OpenBao, from its dev server's log (the last start's)."""
    log = state_dir / "openbao" / "openbao.log"
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    found = [line.split(ROOT_TOKEN_LINE, 1)[1].strip() for line in text.splitlines() if ROOT_TOKEN_LINE in line]
    return found[-1] if found and found[-1] else None


def operator_token(explicit: str | None, settings: Settings) -> OperatorToken:
    """The token to act as (see the module docstring for the order); ``ActionsError`` if there is none."""
    if explicit:
        return OperatorToken(explicit, "--token / $VAULT_TOKEN / $BAO_TOKEN")
    try:
        configured = dispatcher_token(settings.vault)
    except OSError as exc:
        raise ActionsError(f"vault.token_file: cannot read {settings.vault.token_file}: {exc.strerror}") from None
    if configured:
        return OperatorToken(configured, "vault.token_file" if settings.vault.token_file else "vault.token")
    state = Path(settings.runtime.state_dir)
    root = embedded_root_token(state)
    if root:
        return OperatorToken(root, f"the root token of `agentjobs up`'s OpenBao ({state / 'openbao' / 'openbao.log'})")
    raise ActionsError("no Vault token: pass --token or set VAULT_TOKEN / vault.token / vault.token_file "
                       "(an operator's token that may read and write " + layout.kv_actions_path() + ")")


def client_for(settings: Settings, token: str, addr: str | None = None) -> hvac.Client:
    return hvac.Client(url=addr or settings.vault.addr, token=token, timeout=settings.vault.request_timeout,
                       verify=settings.vault.ca_cert or True)


def _failure(client: hvac.Client, verb: str, exc: BaseException, source: str) -> ActionsError:
    path = layout.kv_actions_path()
    if isinstance(exc, hvac.exceptions.Forbidden):
        return ActionsError(f"permission denied: {verb} {path} with {source} — an operator's token is needed "
                            "(the dispatcher's and the agents' policies may not write the kill switch)")
    if isinstance(exc, hvac.exceptions.VaultDown):
        return ActionsError(f"Vault at {mask_text(client.url)} is sealed")
    if isinstance(exc, hvac.exceptions.VaultError):
        errors = "; ".join(str(e) for e in (exc.errors or [])) or type(exc).__name__
        return ActionsError(mask_text(f"{verb} {path} failed: {errors}"))
    return ActionsError(f"cannot reach Vault at {mask_text(client.url)} ({type(exc).__name__}); "
                        "is it running? (see `agentjobs up`)")


_ERRORS = (hvac.exceptions.VaultError, requests.exceptions.RequestException, OSError)


def read_status(client: hvac.Client, *, source: str = "this token") -> SwitchStatus:
    """The switch as agents would read it: stored, never set, or unreadable (malformed)."""
    path = layout.kv_actions_path()
    try:
        response = client.adapter.get(f"/v1/{path}")
    except hvac.exceptions.InvalidPath as exc:
        if exc.errors:  # no such mount
            raise _failure(client, "read", exc, source) from None
        return SwitchStatus(switch=parse_kill_switch(None))
    except _ERRORS as exc:
        raise _failure(client, "read", exc, source) from None
    outer = (response or {}).get("data") if isinstance(response, dict) else None
    if not isinstance(outer, dict):
        return SwitchStatus(switch=None, problem="not a kv-v2 answer")
    version = int(((outer.get("metadata") or {}).get("version")) or 0)
    try:
        return SwitchStatus(switch=parse_kill_switch(outer.get("data")), version=version)
    except KillSwitchUnreadable as exc:
        return SwitchStatus(switch=None, version=version, problem=f"not a kill switch document: {exc}")


def set_switch(client: hvac.Client, *, enabled: bool, reason: str, operator: str,
               source: str = "this token") -> SwitchStatus:
    """Write the switch (a new kv-v2 version) and read it back as agents will."""
    switch = KillSwitch(enabled=enabled, by=operator, reason=reason, at=utcnow().isoformat())
    try:
        client.write_data(layout.kv_actions_path(), data={"data": switch.document()})
    except _ERRORS as exc:
        raise _failure(client, "write", exc, source) from None
    return read_status(client, source=source)


def status_json(status: SwitchStatus) -> str:
    return msgspec.json.encode(status.as_dict()).decode()
