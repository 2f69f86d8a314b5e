"""The one settings object: a frozen tree loaded once and passed explicitly.

Sources, later wins: built-in defaults (which work on a developer machine),
a TOML file, then ``AGENTJOBS_<SECTION>__<KEY>`` environment variables
(``__`` separates nesting levels, e.g. ``AGENTJOBS_CLASSES__DATABASE__MEMORY``).
Nothing else in the code base reads the environment for configuration.
Every field says its unit. Unknown keys are errors: a typo in a config file
at 2 AM must not silently fall back to a default.
"""

from __future__ import annotations

import enum
import json
import re
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from schemas import Phase
from schemas import vault_paths
from schemas.logs import LoggingSettings

ENV_PREFIX = "AGENTJOBS_"
ENV_CONFIG_FILE = "AGENTJOBS_CONFIG"  # path of the TOML file when --config is not given

Positive = Annotated[int, msgspec.Meta(gt=0)]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]
SecondsOrOff = Annotated[float, msgspec.Meta(ge=0)]  # 0: off
Fraction = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]


class Section(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base of every settings section (unknown keys are errors)."""


class AmqpSettings(Section):
    url: str = "amqp://guest:guest@127.0.0.1:5672/"  # broker URL incl. vhost
    management_url: str = "http://guest:guest@127.0.0.1:15672/"  # RabbitMQ management API
    prefetch: Positive = 100  # unacked messages per consumer
    reconnect_interval: Seconds = 1.0  # seconds between reconnect attempts
    heartbeat: NonNegative = 30  # seconds; 0 disables
    publish_timeout: Seconds = 10.0  # seconds to wait for a publisher confirm
    delivery_limit: Positive = 20  # deliveries before the broker dead-letters a message


class IdentitySettings(Section):
    """Who may say what: the broker users (RabbitMQ's validated ``user_id``) of each component.

    Every component connects as its own user and stamps ``user_id`` on what it publishes (the
    broker refuses a ``user_id`` that is not the connection's user); every consumer checks it
    against these (``dispatcher/intake/senders.py``). Agents' users are Vault-issued:
    ``<agent_prefix><job name>-<uuid>`` — the token's display name is its Job's name.
    """

    bridge: str = "agentjobs-bridge"  # incidents
    dispatcher: str = "agentjobs-dispatcher"  # lifecycle, failure results, dead letters
    trust: str = "agentjobs-trust"  # PhaseChanged, the feedback log, trust snapshots
    operators: list[str] = msgspec.field(default_factory=lambda: ["agentjobs-operator"])  # incidents, feedback, cancel
    admins: list[str] = msgspec.field(default_factory=lambda: ["agentjobs-admin"])  # pins, and what operators may
    ticketing: str = "agentjobs-ticketing"  # `agentjobs tickets`: reads results, sends operators' verdicts from tickets
    agent_prefix: str = "token-"  # Vault token display names: token-<display name>
    kubernetes_agent_prefix: str = "kubernetes-"  # users issued to agents that logged in with kubernetes auth


class RetrySettings(Section):
    """Backoff for temporary errors while a message is held (see dispatcher/plumbing/retry.py)."""

    base: Seconds = 0.1  # seconds before the first retry
    cap: Seconds = 15.0  # seconds; longest single wait
    max_elapsed: Seconds = 60.0  # seconds of retrying in place before the message goes back


class KubernetesSettings(Section):
    namespace: str = "agentjobs-runs"  # where investigation Jobs run
    kubeconfig: str = ""  # path; empty: in-cluster config, then ~/.kube/config
    context: str = ""  # kubeconfig context; empty: current
    image: str = "ghcr.io/agentjobs/agent:0.1.0"  # agent container image
    agent_command: list[str] = msgspec.field(default_factory=lambda: ["agentjobs", "agent"])
    service_account_prefix: str = "agentjobs-agent-"  # + phase, e.g. agentjobs-agent-shadow
    token_audience: str = "vault"  # audience of the projected SA token (kubernetes auth)
    token_expiration: Annotated[int, msgspec.Meta(ge=600)] = 600  # seconds (API minimum 600)
    request_timeout: Seconds = 10.0  # seconds per API request
    watch_timeout: Positive = 300  # seconds a watch stays open before it is renewed
    # seconds a watch may stay silent — no event, no bookmark — before it is dropped and resumed
    # (a half-open connection would hide every Job ending until watch_timeout; the API server
    # sends a bookmark about every minute to watches that ask for them, as ours do)
    watch_idle_timeout: Seconds = 90.0
    # seconds before another replica may report a Job ending that a replica claimed but did not
    # report (it died): the longest an ending waits when its claimer is gone
    claim_timeout: Seconds = 60.0


class RuntimeSettings(Section):
    kind: Literal["local", "kubernetes"] = "local"  # local: a subprocess per investigation
    state_dir: str = ".agentjobs"  # local runtime work dirs, OpenBao data for `up`


class VaultSettings(Section):
    addr: str = "http://127.0.0.1:8200"  # Vault/OpenBao API address
    token: str = ""  # the dispatcher's own token (prefer token_file)
    token_file: str = ""  # path to a file holding the dispatcher's token
    # per-investigation: a token per Job from the phase's token role, response-wrapped;
    # kubernetes: the agent logs in with its projected ServiceAccount token;
    # none: no credentials at all (development and tests only)
    auth_mode: Literal["per-investigation", "kubernetes", "none"] = "per-investigation"
    wrap_ttl: Positive = 60  # seconds a wrapped agent token may wait to be unwrapped
    grace: NonNegative = 120  # seconds added to the Job deadline for the agent token TTL
    request_timeout: Seconds = 10.0  # seconds per Vault request
    # PEM file of the CA that signed Vault's TLS certificate (a private CA); empty: the system
    # trust store. The dispatcher also hands it to every Job (input file vault-ca.pem).
    ca_cert: str = ""
    # Revoke agent tokens no live Job holds (a mint Vault executed after we gave up on it, a
    # dispatcher killed between mint and Job): every sweep_interval seconds (0: never; needs
    # list+sudo on auth/token/accessors), tokens older than sweep_grace seconds — longer than any
    # mint-to-Job-created window of another replica (retry.max_elapsed of the launch).
    sweep_interval: SecondsOrOff = 60.0
    sweep_grace: Seconds = 300.0
    database_ttl: Positive = 900  # seconds a dynamic PostgreSQL user lives by default
    database_max_ttl: Positive = 3600  # seconds at most (renewals stop there)
    rabbitmq_vhost: str = "/"  # vhost where the agent's dynamic user may publish results
    # vhosts where that user may only connect: passive declares read queue depth and consumers
    rabbitmq_inspect_vhosts: list[str] = msgspec.field(default_factory=list)
    kubernetes_host: str = "https://kubernetes.default.svc"  # for the kubernetes auth method
    kubernetes_ca_cert: str = ""  # PEM file; required by OpenBao even for http hosts
    kubernetes_namespace: str = "agentjobs-runs"  # where agent ServiceAccounts live
    # JWT file of the ServiceAccount Vault reviews agent logins with (TokenReview; bound to
    # system:auth-delegator, k8s/base/kubernetes-auth/). Empty: Vault runs in the cluster and
    # reviews with its own pod's token. Agents' audience-bound tokens cannot review themselves.
    kubernetes_reviewer_jwt_file: str = ""


class InvestigationClass(Section):
    """Resources and limits for one class of investigation (chosen by the alert's labels)."""

    cpu: str = "500m"  # Kubernetes quantity
    memory: str = "512Mi"  # Kubernetes quantity
    deadline: Positive = 900  # seconds (activeDeadlineSeconds)
    backoff_limit: NonNegative = 0  # Job retries; investigations are not retried blindly
    ttl_after_finished: NonNegative = 3600  # seconds before a finished Job is deleted
    max_active: Positive = 10  # concurrent investigations of this class
    image: str = ""  # empty: k8s.image
    command: list[str] = []  # empty: k8s.agent_command


class ClassRule(Section):
    """First matching rule picks the class; all given conditions must hold."""

    use: str  # class name
    severities: list[str] = []  # any of these severities (empty: any)
    domains: list[str] = []  # any of these domains (empty: any)
    labels: dict[str, str] = {}  # all these label values


def _default_classes() -> dict[str, InvestigationClass]:
    return {
        "default": InvestigationClass(),
        "database": InvestigationClass(memory="768Mi", deadline=1200),
        "kubernetes": InvestigationClass(),
    }


class AdmissionSettings(Section):
    max_active: Positive = 20  # concurrent investigations in total
    class_label: str = "agentjobs_class"  # alert label naming the class; else the domain label
    domain_label: str = "domain"  # alert label naming the domain (trust scope, routing)
    cancel_on_resolve: bool = True  # a resolved group cancels its running investigation
    storm_window: Seconds = 30.0  # seconds over which a group's notifications are coalesced
    # New alerts joining a group whose investigation ended start a follow-up investigation,
    # at most this many per investigation (0: never; past it they are reported attached) …
    max_follow_ups: NonNegative = 3
    # … and not sooner than this many seconds after the previous one ended: a flapping group cannot loop.
    follow_up_min_interval: SecondsOrOff = 300.0
    rules: list[ClassRule] = []  # class selection rules, before class_label and domain


class TrustSettings(Section):
    policy_version: str = "2026-11-2"  # bump when thresholds change
    initial_phase: Phase = Phase.SHADOW
    scope_label: str = "domain"  # feedback is tallied per value of this label
    window: Positive = 100  # feedbacks in the sliding window
    max_age: Seconds = 30 * 86400.0  # seconds; older feedback leaves the window
    min_samples: Positive = 20  # feedbacks before any promotion
    promote_threshold: Fraction = 0.10  # upper Wilson bound of modification rate to promote
    demote_threshold: Fraction = 0.30  # lower Wilson bound of modification rate to demote
    # Wilson interval z. 99 %, not 95 %: the bound is re-tested after every feedback for weeks,
    # and at 95 % an agent slightly worse than the threshold was promoted 12 % of the time
    # (benchmarks/trust.py: 1.3 % at 99 % with window 100; a good agent still ~7 days).
    confidence_z: Annotated[float, msgspec.Meta(gt=0)] = 2.576
    min_dwell: NonNegative = 7 * 86400  # seconds in a phase before promotion
    cooldown: NonNegative = 86400  # seconds after any change without promotion
    harmful_demotes_to: Phase = Phase.READ_ONLY
    # Write the ledger to agentjobs.trust-snapshots after this many feedback-log entries (0:
    # never): a restart reads the newest snapshot and replays only the log after it.
    snapshot_every: NonNegative = 10_000

    def __post_init__(self) -> None:
        if self.promote_threshold >= self.demote_threshold:
            raise ValueError(
                "trust.promote_threshold must be below trust.demote_threshold (hysteresis)"
            )


class PostgresTarget(Section):
    """A further PostgreSQL server (or database) agents query when an alert's labels name it."""

    dsn: str  # the agents' address, e.g. postgresql://pg-ledger.db:5432/ledger (credentials: Vault)
    # Alert labels that select it, all of them, e.g. {datname = "ledger"} or {server = "pg-ledger:5432"}
    match: dict[str, str]
    # Vault's database engine connects with this to create this target's agent users (as admin_dsn)
    admin_dsn: str = ""


class PostgresSettings(Section):
    dsn: str = ""  # diagnostics target for agents, without credentials; empty: not configured
    # Vault's database engine connects with this to create and drop agent users (needs
    # CREATEROLE); only `agentjobs vault bootstrap` reads it.
    admin_dsn: str = ""
    # Labels that select the default target (dsn); empty: it serves every alert no target matches.
    match: dict[str, str] = {}
    # More servers, by name (1-40 of a-z, 0-9, inner '-'): an alert whose labels match a target's
    # `match` is investigated there, with a user from the target's own Vault roles
    # (agentjobs-diagnostics-<name>, agentjobs-remediation-<name>); one naming no target says so.
    targets: dict[str, PostgresTarget] = {}

    def __post_init__(self) -> None:
        for name, target in self.targets.items():
            try:
                vault_paths.check_target_name(name)
            except ValueError as exc:
                raise ValueError(f"postgres.targets: {exc}") from None
            if not target.match:
                raise ValueError(f"postgres.targets.{name}.match is empty: no alert could select it")
            if not target.dsn:
                raise ValueError(f"postgres.targets.{name}.dsn is empty")


class BridgeSettings(Section):
    host: str = "127.0.0.1"  # anything but loopback needs credentials (a token or basic auth)
    port: Port = 9095
    bearer_token: str = ""  # require `Authorization: Bearer …` when set; empty: no credentials
    basic_username: str = ""  # require HTTP basic auth when set
    basic_password: str = ""
    max_body_bytes: Positive = 1024 * 1024  # bytes per webhook request
    # Slow clients: a request's line and headers must arrive within header_timeout seconds of
    # the connection (or of the previous answer on a kept-alive one), its body within
    # body_timeout seconds of the headers (else 408); then the connection is closed (a body
    # still coming is drained at most min(2, header_timeout / 2) seconds first).
    header_timeout: Seconds = 10.0
    body_timeout: Seconds = 30.0
    max_connections: Positive = 256  # open connections; more are answered 503 and closed at once


class ToolsSettings(Section):
    """The data sources agents investigate with (addresses only; credentials come from Vault)."""

    prometheus_url: str = ""  # Prometheus HTTP API, e.g. http://prometheus.monitoring:9090; empty: no tool
    loki_url: str = ""  # Loki HTTP API, e.g. http://loki.monitoring:3100; empty: no logs tool
    kubernetes: bool = False  # read-only cluster tool with the Job's own ServiceAccount (in-cluster)
    kubeconfig: str = ""  # instead of in-cluster config (tests, local runtime)
    # queue depth and consumers of an alert's queue (passive declares as the agent's own broker
    # user; its vhost must be in vault.rabbitmq_inspect_vhosts unless it is the results vhost)
    rabbitmq: bool = True
    timeout: Seconds = 5.0  # seconds per tool call
    max_rows: Positive = 200  # rows/series/lines/objects kept from one answer
    max_tool_calls: Positive = 40  # per investigation
    # URL prefixes the agent's http probe may GET, e.g. ["http://checkout.shop:8080/"]; empty: no probe
    http_targets: list[str] = []
    # RabbitMQ management API the agent's rabbitmq tool asks (as its own Vault-issued user, tagged
    # monitoring), e.g. http://rabbitmq.messaging:15672; empty: no management operations
    rabbitmq_management_url: str = ""


class ModelPrice(Section):
    prompt_per_mtok: Annotated[float, msgspec.Meta(ge=0)] = 0.0  # USD per million prompt tokens
    completion_per_mtok: Annotated[float, msgspec.Meta(ge=0)] = 0.0  # USD per million completion tokens


class LlmSettings(Section):
    base_url: str = ""  # OpenAI-compatible endpoint (…/v1); empty: the rules reasoner only
    model: str = ""
    api_key: str = ""  # prefer Vault KV (agentjobs-kv/llm); here only for local experiments
    max_steps: Positive = 8  # model turns before falling back to rules
    max_tokens: Positive = 40000  # prompt + completion tokens per investigation
    wall_seconds: Seconds = 90.0  # seconds for the model's part
    # "tools": the model investigates with the tools; "hybrid": the rules' sweep first, its evidence and
    # ranking handed to the model. Either way its answer is grounded in the rules' scoring afterwards.
    mode: Literal["tools", "hybrid"] = "tools"
    stream: bool = False  # ask for streamed answers (server-sent events); either kind is read
    prices: dict[str, ModelPrice] = {}  # model name or prefix → price


class ScopeActions(Section):
    """Where the agents of one scope may act: targets outside these lists are refused (refused_target)."""

    namespaces: list[str] = []  # Kubernetes namespaces; empty: none; "*": any
    databases: list[str] = []  # database names (of the Job's PostgreSQL DSN); empty: none; "*": any


def _default_scopes() -> dict[str, ScopeActions]:
    return {"default": ScopeActions()}


class ActionsSettings(Section):
    """Blast-radius limits on remediation, decided by the dispatcher and handed to each Job.

    Executions are learnt from the agents' ``action.executed_*`` ActionRecords (the stream
    agentjobs.action-log); a Job in a phase that may act gets what is left of its scope's hourly
    cap (minus what running Jobs of the scope hold in reserve), at most ``max_per_investigation``.
    """

    max_per_scope_per_hour: NonNegative = 3  # executions per scope in any hour
    max_per_target_per_hour: NonNegative = 1  # executions per target (object, application on a database)
    max_per_investigation: NonNegative = 1  # destructive executions one investigation may carry out
    # Approvals (`agentjobs actions approve`): a proposal may be approved this long after it was made
    # (what its agent saw gets old), and an accepted approval must run within approval_ttl seconds.
    proposal_ttl: Seconds = 3600.0
    approval_ttl: Seconds = 900.0
    # per scope (the trust scope label's value); scopes without an entry get "default"
    scopes: dict[str, ScopeActions] = msgspec.field(default_factory=_default_scopes)

    def __post_init__(self) -> None:
        if "default" not in self.scopes:
            raise ValueError("actions.scopes must define a 'default' entry")

    def scope(self, name: str) -> ScopeActions:
        return self.scopes.get(name) or self.scopes["default"]


class RedmineSettings(Section):
    """A Redmine project the tickets connector writes to (REST API, ``X-Redmine-API-Key``)."""

    url: str = ""  # e.g. https://redmine.example.com; empty: not configured
    project: str = "agentjobs"  # project identifier; make it private (a wrong key then gets 401, not data)
    api_key: str = ""  # development only: prefer tickets.secret_path (key redmine_api_key)
    tracker: str = ""  # tracker name; empty: the project's default
    # issue custom fields, by name (the API user must be an administrator to resolve them)
    key_field: str = "agentjobs key"  # string, "used as a filter": one ticket per investigation
    cause_field: str = "Root cause"  # long text: the agent's cause, which the operator corrects
    actions_field: str = "Actions taken"  # long text, one action per line
    # set when the alert group resolves: "Resolved" leaves closing to the operator; a closed status
    # ("Closed") closes it, and an operator's later edit of its cause or actions is the verdict
    resolved_status: str = "Resolved"
    # our severities → Redmine priorities (names)
    priorities: dict[str, str] = msgspec.field(
        default_factory=lambda: {"critical": "Urgent", "warning": "High", "info": "Normal"})
    request_timeout: Seconds = 10.0  # seconds per request


class WebhookSettings(Section):
    """A generic outbound webhook: every ticket operation POSTed as JSON, signed (HMAC-SHA256)."""

    url: str = ""  # empty: not configured
    secret: str = ""  # development only: prefer tickets.secret_path (key webhook_secret)
    request_timeout: Seconds = 10.0  # seconds per request


class TicketsSettings(Section):
    """``agentjobs tickets``: one ticket per investigation, and operators' verdicts read back."""

    backend: Literal["redmine", "webhook"] = "redmine"
    # shadow findings: a private note (visible to whoever may see private notes, and scored
    # against the operator's own cause) or nothing at all — never the visible diagnosis
    shadow: Literal["private", "omit"] = "private"
    secret_path: str = "agentjobs-kv/data/tickets"  # kv-v2 data path read with vault.token(_file)
    poll_interval: Seconds = 30.0  # seconds between looks for tickets operators closed
    lookback: Seconds = 7 * 86400.0  # seconds of closed tickets the first look after a start reads
    prefetch: Positive = 20  # results handled at once (one investigation at a time)
    redmine: RedmineSettings = RedmineSettings()
    webhook: WebhookSettings = WebhookSettings()


class MetricsSettings(Section):
    host: str = "127.0.0.1"
    port: Port = 9464  # Prometheus scrape port; 0 disables


class Settings(Section):
    """Root of the settings tree."""

    amqp: AmqpSettings = AmqpSettings()
    identities: IdentitySettings = IdentitySettings()
    retry: RetrySettings = RetrySettings()
    k8s: KubernetesSettings = KubernetesSettings()
    runtime: RuntimeSettings = RuntimeSettings()
    vault: VaultSettings = VaultSettings()
    admission: AdmissionSettings = AdmissionSettings()
    classes: dict[str, InvestigationClass] = msgspec.field(default_factory=_default_classes)
    tools: ToolsSettings = ToolsSettings()
    trust: TrustSettings = TrustSettings()
    postgres: PostgresSettings = PostgresSettings()
    bridge: BridgeSettings = BridgeSettings()
    llm: LlmSettings = LlmSettings()
    actions: ActionsSettings = ActionsSettings()
    logging: LoggingSettings = LoggingSettings()
    metrics: MetricsSettings = MetricsSettings()
    tickets: TicketsSettings = TicketsSettings()

    def __post_init__(self) -> None:
        if "default" not in self.classes:
            raise ValueError("classes must define a 'default' class")
        if self.vault.auth_mode == "kubernetes" and self.runtime.kind != "kubernetes":
            raise ValueError("vault.auth_mode 'kubernetes' needs runtime.kind 'kubernetes' "
                             "(agents log in with their pod's ServiceAccount token)")
        for rule in self.admission.rules:
            if rule.use not in self.classes:
                raise ValueError(f"admission.rules: class {rule.use!r} is not defined in classes")


class SettingsError(Exception):
    """Settings could not be loaded; the message names the origin, the key and the problem."""

    def __init__(self, origin: str, key: str, problem: str) -> None:
        where = f"{origin}: {key}" if key else origin
        super().__init__(f"{where}: {problem}")
        self.origin = origin  # file path or environment variable
        self.key = key  # dotted key, e.g. amqp.prefetch
        self.problem = problem


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _env_value(raw: str) -> Any:
    # Strings are converted to the field's type by msgspec (lax mode); JSON for lists/tables.
    if raw[:1] in "[{":
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw
    return raw


def env_overrides(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Nested overrides from ``AGENTJOBS_A__B=…`` variables, and dotted key → variable name."""
    tree: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        if not all(path):
            raise SettingsError(name, "", "empty key segment (use single '__' between levels)")
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SettingsError(name, ".".join(path), "conflicts with another variable")
        node[path[-1]] = _env_value(raw)
        origins[".".join(path)] = name
    return tree, origins


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise SettingsError(str(path), "", "file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(str(path), "", f"cannot read: {exc}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(str(path), "", f"invalid TOML: {exc}") from None


_AT = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<field>[^`]+)`")
_MISSING = re.compile(r"^Object missing required field `(?P<field>[^`]+)`")


def _explain(exc: msgspec.ValidationError) -> tuple[str, str]:
    """(dotted key, problem) from a msgspec validation message."""
    text = str(exc)
    match = _AT.search(text)
    path = match.group("path") if match else ""
    problem = text[: match.start()] if match else text
    # msgspec writes list indexes as [3] and hides dict keys as [...]
    key = re.sub(r"\[(\d+)\]", r".\1", path).replace("[...]", ".*").lstrip(".")
    for pattern, what in ((_UNKNOWN, "unknown key"), (_MISSING, "missing required key")):
        found = pattern.match(problem)
        if found:
            key = f"{key}.{found.group('field')}" if key else found.group("field")
            problem = what
    if problem.startswith("Invalid enum value"):
        choices = _choices(key)
        if choices:
            problem = f"{problem[len('Invalid enum value '):]} is not one of {', '.join(choices)}"
    problem = problem.replace("Expected", "expected").replace("`", "")
    return key, problem


def _choices(key: str) -> list[str]:
    """Allowed values of the Literal/enum field at dotted ``key`` (empty if not one)."""
    type_: Any = Settings
    for part in key.split("."):
        if part == "*" and typing.get_origin(type_) is dict:
            type_ = typing.get_args(type_)[1]
            continue
        hints = typing.get_type_hints(type_, include_extras=True) if isinstance(type_, type) else {}
        if part not in hints:
            return []
        type_ = hints[part]
    if typing.get_origin(type_) is Literal:
        return [str(a) for a in typing.get_args(type_)]
    if isinstance(type_, type) and issubclass(type_, enum.Enum):
        return [str(m.value) for m in type_]
    return []


def load_settings(
    path: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Defaults ← TOML file ← ``AGENTJOBS_*`` variables; raises ``SettingsError``."""
    environ = {} if environ is None else environ
    if path is None and environ.get(ENV_CONFIG_FILE):
        path = environ[ENV_CONFIG_FILE]
    data: dict[str, Any] = msgspec.to_builtins(Settings())
    file_data = _read_toml(Path(path)) if path is not None else {}
    overrides, env_origins = env_overrides(environ)
    data = _merge(_merge(data, file_data), overrides)
    try:
        return msgspec.convert(data, Settings, strict=False)
    except msgspec.ValidationError as exc:
        key, problem = _explain(exc)
        raise SettingsError(_origin(key, env_origins, path), key, problem) from None


def _origin(key: str, env_origins: Mapping[str, str], path: str | Path | None) -> str:
    """The variable or file a failing key came from (env wins, as in loading)."""
    pattern = re.compile("^" + re.escape(key).replace(r"\*", "[^.]+") + r"(\.|$)")
    for env_key, var in env_origins.items():
        if pattern.match(env_key) or key.startswith(env_key + "."):
            return var
    return str(path) if path is not None else "settings"
