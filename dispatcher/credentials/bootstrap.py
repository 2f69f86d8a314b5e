"""``agentjobs vault bootstrap``: make a Vault/OpenBao look like ``vault_layout`` says, idempotently.

It owns the *server side* of agentjobs' credentials: the per-phase ACL policies
(``k8s/vault/*.hcl``), the per-phase token roles the dispatcher mints agent
tokens through, the kubernetes auth method and its per-phase roles, the
database engine (dynamic read-only PostgreSQL users: a diagnostics role for shadow and
read-only, a remediation role that may also terminate backends for the phases that act), the rabbitmq engine
(dynamic users that may only publish results), the kv-v2 mount for static keys
and the dispatcher's own policy.

Every object is read first and written only when it is missing or differs, so
a second run writes nothing and reports no changes. Two configurations cannot
be read back with their secret (``database/config/*`` hides the password,
``rabbitmq/config/connection`` is write-only); for those a salted HMAC of the
full configuration is kept at ``agentjobs-kv/data/bootstrap`` (readable only by
the bootstrap's admin token — agent policies grant ``agentjobs-kv/data/llm``,
``rabbitmq-shared`` and the kill switch ``actions``, all read-only, and to the phases that act
create and read under ``claims/``), so a changed password is noticed without ever storing or
logging it.

The kill switch (``agentjobs-kv/data/actions``) is not written here: no document means
"never disabled"; operators write it with ``agentjobs actions disable|enable``, every
agent phase policy may read it and none may write it (the dispatcher's policy does not
grant it at all).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

import hvac
import hvac.exceptions
import requests

from schemas import Phase

from schemas import redaction
from schemas import vault_paths as layout
from schemas.logs import get_logger
from dispatcher.plumbing.settings import Settings

log = get_logger(__name__)

POLICY_DIR = Path(__file__).resolve().parents[2] / "k8s" / "vault"
KV_BOOTSTRAP = "bootstrap"  # agentjobs-kv/data/bootstrap: fingerprints of write-only configs
RESULTS_EXCHANGE = "agentjobs.results"

# OpenBao insists on a CA for the kubernetes auth method even for http:// hosts.
# This self-signed certificate's key was thrown away when it was made, so no
# server can ever present a chain to it: https hosts fail closed, http hosts work.
PLACEHOLDER_CA_PEM = """\
-----BEGIN CERTIFICATE-----
MIIB0DCCAXegAwIBAgIUBs0UWmXKikZJviNwRDFg/N1971kwCgYIKoZIzj0EAwIw
PTE7MDkGA1UEAwwyYWdlbnRqb2JzIHBsYWNlaG9sZGVyIENBIC0gbm90IHRydXN0
ZWQgYnkgYW55dGhpbmcwIBcNMjYxMTI2MTczOTM2WhgPMjEyNjExMDIxNzM5MzZa
MD0xOzA5BgNVBAMMMmFnZW50am9icyBwbGFjZWhvbGRlciBDQSAtIG5vdCB0cnVz
dGVkIGJ5IGFueXRoaW5nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEQ6eJV7HU
Js81oYhKxIltczWqiVAGr+OyC9z26VJII1/peOvrhJv+y7kAogJ3iDyrSQX1RJk0
cK2oqkAroulSSaNTMFEwHQYDVR0OBBYEFA+zGp0VxWpfbxs6noq74T/Rxrn5MB8G
A1UdIwQYMBaAFA+zGp0VxWpfbxs6noq74T/Rxrn5MA8GA1UdEwEB/wQFMAMBAf8w
CgYIKoZIzj0EAwIDRwAwRAIgHEVshZqkByCMy8LAp+SZ/YarPsgjdAhKKpc2p1LF
LYoCIBm1ubW72eNcXjyG2vyjvJSCTRAkfL/tk6kP4dkad51Y
-----END CERTIFICATE-----
"""  # subject: CN = agentjobs placeholder CA - not trusted by anything


class BootstrapError(Exception):
    """Vault is unreachable, refused a request or the settings cannot be used.

    The message names the Vault path and never contains a secret.
    """


@dataclass(frozen=True, kw_only=True)
class Change:
    """One object bootstrap created or updated."""

    action: Literal["created", "updated"]
    what: str  # e.g. "policy agentjobs-agent-shadow"
    path: str  # the Vault API path written, e.g. "sys/policies/acl/agentjobs-agent-shadow"

    def __str__(self) -> str:
        return f"{self.action} {self.what} ({self.path})"


@dataclass(kw_only=True)
class BootstrapReport:
    """What a bootstrap run changed (empty when Vault already matched) plus notes."""

    changes: list[Change] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # skipped parts and warnings, no secrets

    @property
    def changed(self) -> bool:
        return bool(self.changes)


def token_ttl(settings: Settings) -> int:
    """Seconds an agent token may live at most: the longest class deadline plus the grace."""
    return max(c.deadline for c in settings.classes.values()) + settings.vault.grace


def bootstrap(
    client: hvac.Client, settings: Settings, *, policy_dir: Path = POLICY_DIR,
    shared_broker_user: bool = False,
) -> BootstrapReport:
    """Create or update everything agentjobs needs in Vault; raises ``BootstrapError``.

    ``shared_broker_user``: the reduced mode of ``agentjobs up`` on a broker without the
    management API — no rabbitmq engine; ``amqp.url``'s user goes to KV
    (``agentjobs-kv/rabbitmq-shared``) for every agent. Without it that KV secret is removed,
    so per-investigation users are the only way a normal run hands out broker credentials.
    """
    return _Bootstrap(client, settings, policy_dir, shared_broker_user).run()


# --------------------------------------------------------------------------- #
# settings → desired Vault objects (pure)
# --------------------------------------------------------------------------- #


@dataclass(frozen=True, kw_only=True)
class DatabaseConnection:
    connection_url: str  # with {{username}}/{{password}} templates, no secret
    username: str
    password: str
    dbname: str  # database the agent's user may connect to


def database_connection(settings: Settings, target: str = "") -> DatabaseConnection:
    """Vault's view of ``postgres.admin_dsn`` (or of a named target's): a templated URL plus separate
    credentials."""
    where = f"postgres.targets.{target}.admin_dsn" if target else "postgres.admin_dsn"
    named = settings.postgres.targets.get(target) if target else None
    if target and named is None:
        raise BootstrapError(f"postgres.targets has no target {target!r}")
    dsn = named.admin_dsn if named is not None else settings.postgres.admin_dsn
    agents_dsn = named.dsn if named is not None else settings.postgres.dsn
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgresql", "postgres") or not parts.hostname:
        raise BootstrapError(f"{where} must be a postgresql://user@host:port/db URL")
    if any(k.lower() in ("user", "password") for k, _ in parse_qsl(parts.query)):
        raise BootstrapError(
            f"{where}: put the user and password before the host, not in the query"
        )
    username = unquote(parts.username or "")
    password = unquote(parts.password or "")
    host = parts.netloc.rpartition("@")[2]
    netloc = host
    if username:
        netloc = "{{username}}" + (":{{password}}" if password else "") + "@" + host
    target = urlsplit(agents_dsn) if agents_dsn else parts
    dbname = unquote(target.path.lstrip("/")) or unquote(target.username or "") or "postgres"
    return DatabaseConnection(
        connection_url=urlunsplit(parts._replace(netloc=netloc)),
        username=username,
        password=password,
        dbname=dbname,
    )


def database_role(settings: Settings, role: str = layout.DATABASE_ROLE, target: str = "") -> dict[str, Any]:
    """Body of database/roles/<role>: ``agentjobs-diagnostics`` or ``agentjobs-remediation``
    (on a named ``target``: the same kind, ``<role>`` the kind's name, on the target's connection).

    Both are read-only diagnostics users; the remediation role (limited-remediation and
    autonomous, ``layout.database_role_for``) is also a member of ``pg_signal_backend``, so it
    may cancel and terminate backends of non-superusers — what ``terminate_backend`` and
    ``terminate_idle_backends`` need, and nothing more (no writes, no superuser's backends).
    The admin in ``postgres.admin_dsn`` must be able to grant it (a superuser, or on
    PostgreSQL 16+ a CREATEROLE user holding pg_signal_backend WITH ADMIN OPTION).
    """
    if role not in layout.DATABASE_ROLES:
        raise ValueError(f"unknown database role {role!r}")
    acting = (
        # DROP ROLE in the revocation statements removes this membership with the role.
        ['GRANT pg_signal_backend TO "{{name}}";'] if role == layout.DATABASE_REMEDIATION_ROLE else []
    )
    return {
        "db_name": layout.database_connection_name(target),
        "creation_statements": [
            (
                "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' "
                "VALID UNTIL '{{expiration}}';"
            ),
            'GRANT pg_read_all_stats TO "{{name}}";',
            *acting,
            # At connection exhaustion — the incident it is sent to diagnose — the agent must still
            # get in: PostgreSQL 16+ lets non-superusers use reserved_connections slots through
            # this role (set reserved_connections >= the agents that may run at once). PostgreSQL
            # 15 and older have no such role: there the agent competes for ordinary slots.
            (
                "DO $$ BEGIN IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'pg_use_reserved_connections') "
                "THEN EXECUTE format('GRANT pg_use_reserved_connections TO %I', '{{name}}'); END IF; END $$;"
            ),
            # No per-user GRANT CONNECT ON DATABASE: it rewrites the database's ACL row, and
            # agents taking credentials at once during a storm then fail with "tuple
            # concurrently updated". Connecting relies on PUBLIC's default CONNECT (where an
            # operator revoked it: GRANT CONNECT ON DATABASE ... TO pg_read_all_stats, once).
            # Defence in depth: the role has no write privileges anyway (PostgreSQL 15
            # no longer lets PUBLIC create in schema public); sessions also start read-only,
            # which stops temporary tables and accidental writes through functions.
            'ALTER ROLE "{{name}}" SET default_transaction_read_only = on;',
        ],
        "revocation_statements": [
            # Sessions first, so a running query cannot outlive the credential.
            ("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{{name}}';"),
            # DROP ROLE also revokes the role's memberships (pg_read_all_stats, pg_signal_backend,
            # pg_use_reserved_connections) and its per-role settings: nothing blocks it.
            'DROP ROLE IF EXISTS "{{name}}";',
        ],
        "default_ttl": settings.vault.database_ttl,
        "max_ttl": settings.vault.database_max_ttl,
    }


@dataclass(frozen=True, kw_only=True)
class RabbitConnection:
    connection_uri: str  # management API base URL without credentials
    username: str
    password: str


def rabbitmq_connection(settings: Settings) -> RabbitConnection:
    """Management API URL and admin credentials from ``amqp.management_url`` (else ``amqp.url``)."""
    parts = urlsplit(settings.amqp.management_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BootstrapError("amqp.management_url must be an http(s)://user:password@host:port URL")
    creds = parts if parts.username else urlsplit(settings.amqp.url)
    if not creds.username:
        raise BootstrapError(
            "amqp.management_url (or amqp.url) must carry the management user's credentials"
        )
    uri = urlunsplit(
        (parts.scheme, parts.netloc.rpartition("@")[2], parts.path.rstrip("/"), "", "")
    )
    return RabbitConnection(
        connection_uri=uri,
        username=unquote(creds.username),
        password=unquote(creds.password or ""),
    )


def rabbitmq_vhosts(settings: Settings) -> dict[str, dict[str, str]]:
    """Permissions of the agent's dynamic RabbitMQ user: publish to the results exchange only.

    In ``vault.rabbitmq_inspect_vhosts`` it may connect and nothing else: enough for passive
    declares, which report a queue's ready messages and consumers (the queue tool).
    """
    nothing = {"configure": "", "write": "", "read": ""}
    return {
        **{vhost: dict(nothing) for vhost in settings.vault.rabbitmq_inspect_vhosts},
        settings.vault.rabbitmq_vhost: {
            "configure": "",  # declares nothing (passive declares need no permission)
            "write": "^" + RESULTS_EXCHANGE.replace(".", r"\.") + "$",
            "read": "",  # consumes nothing
        },
    }


def _same(current: Any, desired: Any) -> bool:
    if isinstance(desired, list):
        return isinstance(current, list) and sorted(map(str, current)) == sorted(map(str, desired))
    if isinstance(desired, str):
        return (current or "") == desired
    return current == desired


def _fingerprint(salt: str, value: Mapping[str, Any]) -> str:
    body = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(bytes.fromhex(salt), body, hashlib.sha256).hexdigest()


# --------------------------------------------------------------------------- #
# the run (I/O)
# --------------------------------------------------------------------------- #


class _Bootstrap:
    def __init__(self, client: hvac.Client, settings: Settings, policy_dir: Path,
                 shared_broker_user: bool = False) -> None:
        self.client = client
        self.shared_broker_user = shared_broker_user
        self.settings = settings
        self.policy_dir = policy_dir
        self.report = BootstrapReport()
        self.ttl = token_ttl(settings)
        self._fingerprints: dict[str, str] = {}
        self._fingerprints_version = 0
        self._fingerprints_dirty = False

    # -- Vault calls with errors that name the path ------------------------- #

    def _call(self, method: str, path: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except hvac.exceptions.Forbidden:
            raise BootstrapError(
                f"permission denied: {method} {path} — the token needs an admin (or root) policy"
            ) from None
        except hvac.exceptions.VaultDown:
            raise BootstrapError(f"Vault at {self.client.url} is sealed") from None
        except hvac.exceptions.VaultError as exc:
            errors = "; ".join(str(e) for e in (exc.errors or [])) or str(exc)
            raise BootstrapError(
                redaction.mask_text(f"{method} {path} failed: {errors}".strip())
            ) from None
        except requests.exceptions.RequestException as exc:
            raise BootstrapError(
                f"cannot reach Vault at {redaction.mask_text(self.client.url)}: "
                f"{type(exc).__name__}"
            ) from None

    def _read(self, path: str) -> dict[str, Any] | None:
        """The response's `data`, or None if nothing is there."""
        resp = self._call("GET", path, lambda: self.client.read(path))
        if not resp:
            return None
        return resp.get("data") if isinstance(resp, dict) else None

    def _write(self, path: str, data: Mapping[str, Any]) -> Any:
        return self._call("POST", path, lambda: self.client.write_data(path, data=dict(data)))

    def _changed(self, action: Literal["created", "updated"], what: str, path: str) -> None:
        self.report.changes.append(Change(action=action, what=what, path=path))
        log.info("vault_object_changed", action=action, what=what, path=path)

    def _note(self, message: str, event: str, **fields: Any) -> None:
        self.report.notes.append(message)
        log.warning(event, **fields)

    def _ensure(
        self,
        what: str,
        path: str,
        data: Mapping[str, Any],
        *,
        expect: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Write `data` at `path` unless what is there already matches `expect` (default: data)."""
        current = self._read(path)
        expect = data if expect is None else expect
        if (
            current is not None
            and not force
            and all(_same(current.get(k), v) for k, v in expect.items())
        ):
            return False
        self._write(path, data)
        self._changed("created" if current is None else "updated", what, path)
        return True

    def _ensure_mount(
        self,
        kind: Literal["secrets", "auth"],
        path: str,
        type_: str,
        options: Mapping[str, str] | None = None,
    ) -> bool:
        """Enable `type_` at `path` unless it is there; refuse to touch a different mount."""
        listing = "sys/mounts" if kind == "secrets" else "sys/auth"
        mounts = self._read(listing) or {}
        current = mounts.get(path + "/")
        api = f"{listing}/{path}"
        if current is not None:
            if current.get("type") != type_:
                raise BootstrapError(
                    f"{api}: a {current.get('type')!r} mount is already there, expected {type_!r}; "
                    "move it away or disable it first"
                )
            for key, value in (options or {}).items():
                if str((current.get("options") or {}).get(key)) != value:
                    raise BootstrapError(
                        f"{api}: mount option {key}={(current.get('options') or {}).get(key)!r},"
                        f" expected {value!r} (tune or move the mount first)"
                    )
            return False
        body: dict[str, Any] = {"type": type_, "description": f"agentjobs ({type_})"}
        if options:
            body["options"] = dict(options)
        self._write(api, body)
        what = "secrets engine" if kind == "secrets" else "auth method"
        self._changed("created", f"{what} {type_} at {path}/", api)
        return True

    def _needs_secret_write(self, path: str, value: Mapping[str, Any]) -> bool:
        """True if the write-only part of `path`'s config changed since the last run."""
        salt = self._fingerprints.get("salt")
        if not salt:
            salt = self._fingerprints["salt"] = secrets.token_hex(16)
            self._fingerprints_dirty = True
        digest = _fingerprint(salt, value)
        if self._fingerprints.get(path) == digest:
            return False
        self._fingerprints[path] = digest
        self._fingerprints_dirty = True
        return True

    # -- steps ---------------------------------------------------------------- #

    def run(self) -> BootstrapReport:
        self._policies()
        self._token_roles()
        self._kv()
        self._kubernetes_auth()
        self._database()
        self._rabbitmq()
        self._save_fingerprints()
        return self.report

    def _policies(self) -> None:
        names = [layout.policy(p) for p in Phase] + [layout.DISPATCHER_POLICY, layout.TICKETS_POLICY]
        for name in names:
            file = self.policy_dir / f"{name}.hcl"
            try:
                text = file.read_text()
            except OSError as exc:
                raise BootstrapError(f"cannot read policy file {file}: {exc.strerror}") from None
            self._ensure(f"policy {name}", f"sys/policies/acl/{name}", {"policy": text})

    def _token_roles(self) -> None:
        for phase in Phase:
            name = layout.token_role(phase)
            self._ensure(
                f"token role {name}",
                f"auth/token/roles/{name}",
                {
                    "allowed_policies": [layout.policy(phase)],
                    "orphan": False,  # children of the dispatcher's token
                    "renewable": True,
                    "token_explicit_max_ttl": self.ttl,  # seconds; renewals stop here
                    "token_type": "service",  # batch tokens cannot be revoked by accessor
                    "token_no_default_policy": True,  # the phase policy and nothing else
                },
            )

    def _kv(self) -> None:
        self._ensure_mount("secrets", layout.KV_MOUNT, "kv", {"version": "2"})
        llm = f"{layout.KV_MOUNT}/data/{layout.KV_LLM}"
        # metadata/ also sees soft-deleted versions: an operator's key is never replaced.
        if self._read(f"{layout.KV_MOUNT}/metadata/{layout.KV_LLM}") is None:

            def create_if_absent() -> bool:
                try:
                    self.client.write_data(llm, data={"data": {}, "options": {"cas": 0}})
                except hvac.exceptions.InvalidRequest:
                    return False  # created concurrently (cas=0 refused): leave it alone
                return True

            if self._call("POST", llm, create_if_absent):
                self._changed("created", f"empty kv secret {layout.KV_LLM}", llm)
        state = self._call(
            "GET",
            self._bootstrap_path,
            lambda: self.client.read(self._bootstrap_path),
        )
        if state and state.get("data"):
            self._fingerprints = dict(state["data"].get("data") or {})
            self._fingerprints_version = int(state["data"]["metadata"]["version"])

    @property
    def _bootstrap_path(self) -> str:
        return f"{layout.KV_MOUNT}/data/{KV_BOOTSTRAP}"

    def _save_fingerprints(self) -> None:
        if not self._fingerprints_dirty:
            return
        body = {"data": self._fingerprints, "options": {"cas": self._fingerprints_version}}
        self._write(self._bootstrap_path, body)
        action: Literal["created", "updated"] = (
            "updated" if self._fingerprints_version else "created"
        )
        self._changed(action, "fingerprints of write-only configs", self._bootstrap_path)

    def _reviewer_jwt(self) -> str | None:
        file = self.settings.vault.kubernetes_reviewer_jwt_file
        if not file:
            return None
        try:
            return Path(file).read_text().strip()
        except OSError as exc:
            raise BootstrapError(
                f"vault.kubernetes_reviewer_jwt_file: cannot read {file}: {exc.strerror}"
            ) from None

    def _kubernetes_auth(self) -> None:
        vault = self.settings.vault
        mount = layout.K8S_AUTH_MOUNT
        self._ensure_mount("auth", mount, "kubernetes")
        if vault.kubernetes_ca_cert:
            try:
                ca = Path(vault.kubernetes_ca_cert).read_text()
            except OSError as exc:
                raise BootstrapError(
                    f"vault.kubernetes_ca_cert: cannot read {vault.kubernetes_ca_cert}: "
                    f"{exc.strerror}"
                ) from None
        else:
            ca = PLACEHOLDER_CA_PEM
            self._note(
                "warning: vault.kubernetes_ca_cert is empty; configured auth/kubernetes with a "
                "placeholder CA (CN 'agentjobs placeholder CA - not trusted by anything'): "
                "only http:// API servers will work",
                "kubernetes_ca_placeholder_used",
                kubernetes_host=vault.kubernetes_host,
            )
        config = {"kubernetes_host": vault.kubernetes_host, "kubernetes_ca_cert": ca}
        reviewer = self._reviewer_jwt()
        path = f"auth/{mount}/config"
        # token_reviewer_jwt is never read back: its fingerprint says whether it changed.
        reviewer_changed = reviewer is not None and self._needs_secret_write(path, {"token_reviewer_jwt": reviewer})
        self._ensure(
            "kubernetes auth config",
            path,
            config if reviewer is None else {**config, "token_reviewer_jwt": reviewer},
            expect=config,
            force=reviewer_changed,
        )
        prefix = self.settings.k8s.service_account_prefix
        for phase in Phase:
            name = layout.kubernetes_role(phase)
            self._ensure(
                f"kubernetes auth role {name}",
                f"auth/{mount}/role/{name}",
                {
                    "bound_service_account_names": [f"{prefix}{phase.value}"],
                    "bound_service_account_namespaces": [vault.kubernetes_namespace],
                    "audience": self.settings.k8s.token_audience,
                    "token_ttl": self.ttl,  # seconds
                    "token_max_ttl": self.ttl,  # seconds
                    "token_policies": [layout.policy(phase)],
                    "token_no_default_policy": True,
                    "token_type": "service",
                },
            )

    def _database(self) -> None:
        pg = self.settings.postgres
        if not pg.admin_dsn and not pg.targets:
            self._note(
                "skipped: database engine (postgres.admin_dsn is empty; agents get no "
                "PostgreSQL credentials)",
                "database_engine_skipped",
                reason="postgres.admin_dsn is empty",
            )
            return
        for target in pg.targets:
            if not pg.targets[target].admin_dsn:
                raise BootstrapError(f"postgres.targets.{target}.admin_dsn is empty: Vault cannot create "
                                     "agent users on that target")
        fresh = self._ensure_mount("secrets", layout.DATABASE_MOUNT, "database")
        if pg.admin_dsn:
            self._database_target("", fresh=fresh)
        for target in pg.targets:
            self._database_target(target, fresh=fresh)

    def _database_target(self, target: str, *, fresh: bool) -> None:
        """One connection (the default's, or a named target's) and its two roles."""
        conn = database_connection(self.settings, target)
        mount = layout.DATABASE_MOUNT
        name = layout.database_connection_name(target)
        path = f"{mount}/config/{name}"
        body = {
            "plugin_name": "postgresql-database-plugin",
            "connection_url": conn.connection_url,
            "username": conn.username,
            "password": conn.password,
            "allowed_roles": list(layout.target_roles(target)),
            "verify_connection": True,
        }
        if not conn.password:
            del body["password"]
        current = None if fresh else self._read(path)
        readable_same = current is not None and all(
            (
                _same(current.get("plugin_name"), body["plugin_name"]),
                _same(current.get("allowed_roles"), body["allowed_roles"]),
                _same(
                    (current.get("connection_details") or {}).get("connection_url"),
                    conn.connection_url,
                ),
                _same((current.get("connection_details") or {}).get("username"), conn.username),
            )
        )
        secret_changed = self._needs_secret_write(path, body)
        if not readable_same or secret_changed:
            self._write(path, body)
            self._changed(
                "created" if current is None else "updated",
                f"database connection {name}",
                path,
            )
        # one per kind of phase (layout.database_role_for), named after the target
        for kind, role in zip(layout.DATABASE_ROLES, layout.target_roles(target), strict=True):
            self._ensure(
                f"database role {role}",
                f"{mount}/roles/{role}",
                database_role(self.settings, kind, target),
            )

    def _rabbitmq(self) -> None:
        shared = layout.kv_rabbitmq_shared_path()
        metadata = shared.replace("/data/", "/metadata/", 1)
        if self.shared_broker_user:
            parts = urlsplit(self.settings.amqp.url)
            body = {"username": unquote(parts.username or ""), "password": unquote(parts.password or "")}
            if self._needs_secret_write(shared, body):
                self._write(shared, {"data": body})
                self._changed("updated", "shared broker user (reduced mode)", shared)
            log.warning("shared_broker_user", username=body["username"])
            return
        if self._read(metadata) is not None:  # left by a reduced-mode run: never hand it out again
            self._call("DELETE", metadata, lambda: self.client.delete(metadata))
            self._fingerprints.pop(shared, None)
            self._fingerprints_dirty = True
            self._changed("updated", "removed the shared broker user", metadata)
        conn = rabbitmq_connection(self.settings)
        mount = layout.RABBITMQ_MOUNT
        fresh = self._ensure_mount("secrets", mount, "rabbitmq")
        path = f"{mount}/config/connection"
        body = {
            "connection_uri": conn.connection_uri,
            "username": conn.username,
            "password": conn.password,
            "verify_connection": True,
        }
        # Write-only in Vault and OpenBao (GET is 405): the fingerprint is all we can compare.
        secret_changed = self._needs_secret_write(path, body)
        if fresh or secret_changed:
            self._write(path, body)
            self._changed("created" if fresh else "updated", "rabbitmq connection", path)
        vault = self.settings.vault
        # No separate settings for RabbitMQ users: they live as long as PostgreSQL users.
        self._ensure(
            "rabbitmq lease",
            f"{mount}/config/lease",
            {"ttl": vault.database_ttl, "max_ttl": vault.database_max_ttl},
        )
        vhosts = rabbitmq_vhosts(self.settings)
        self._ensure(
            f"rabbitmq role {layout.RABBITMQ_ROLE}",
            f"{mount}/roles/{layout.RABBITMQ_ROLE}",
            # monitoring: the management API answers it (nodes' alarms, connections, channels; queues of
            # its vhosts only) — a management tag grants no AMQP permission beyond the vhosts map
            {"vhosts": json.dumps(vhosts, sort_keys=True), "tags": "monitoring"},
            expect={"vhosts": vhosts, "tags": "monitoring"},
        )
