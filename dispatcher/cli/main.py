"""``agentjobs``: one console script, one click group; each subcommand lives near its code.

Exit codes: 0 success, 1 a check found a problem (e.g. stale schemas),
2 bad usage or bad configuration (with a message naming file, key and problem).
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import click
import msgspec

from schemas import OperatorFeedback, Phase, PhasePin, ShadowComparison, Verdict, encode, utcnow

from schemas import redaction
from dispatcher.plumbing.settings import ENV_CONFIG_FILE, Settings, SettingsError, load_settings

EXIT_PROBLEM = 1
EXIT_USAGE = 2


def _fail(message: str, code: int = EXIT_USAGE) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def settings_from(ctx: click.Context) -> Settings:
    """Load settings for a subcommand (``--config`` or ``AGENTJOBS_CONFIG``, then env)."""
    try:
        return load_settings(ctx.obj.get("config"), os.environ)
    except SettingsError as exc:
        _fail(str(exc))
        raise  # unreachable; keeps type checkers content


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar=ENV_CONFIG_FILE,
    help="TOML settings file (default: $AGENTJOBS_CONFIG, else built-in defaults).",
)
@click.version_option(package_name="agentjobs")
@click.pass_context
def app(ctx: click.Context, config: Path | None) -> None:
    """Run AI incident-investigation agents as Kubernetes Jobs, safely."""
    from schemas import logs
    from dispatcher.plumbing.settings import LoggingSettings

    # One-shot commands log only warnings, to stderr (stdout is their output); services
    # reconfigure from settings when they start.
    logs.configure(LoggingSettings(level="warning"))
    ctx.ensure_object(dict)
    ctx.obj["config"] = config


@app.group()
def schemas() -> None:
    """Wire message schemas (JSON Schema files under schemas/json/)."""


@schemas.command("export")
@click.option("--check", is_flag=True, help="Exit 1 if the committed files are stale; write nothing.")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Target directory (default: the schemas/json/ directory of this checkout).",
)
def schemas_export(check: bool, directory: Path | None) -> None:
    """Write a JSON Schema file for every wire type."""
    from schemas import export

    directory = directory or export.SCHEMA_DIR
    if check:
        problems = export.stale(directory)
        for problem in problems:
            click.echo(f"stale: {problem}", err=True)
        if problems:
            click.echo("run `agentjobs schemas export` and commit the result", err=True)
            sys.exit(EXIT_PROBLEM)
        click.echo(f"schemas in {directory} are up to date")
        return
    for name in export.write(directory):
        click.echo(f"wrote {directory / name}")


@app.group()
def config() -> None:
    """Inspect settings."""


@config.command("check")
@click.argument("file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.pass_context
def config_check(ctx: click.Context, file: Path | None) -> None:
    """Print the effective settings (FILE + AGENTJOBS_* variables) with secrets masked."""
    path = file if file is not None else ctx.obj.get("config")
    try:
        settings = load_settings(path, os.environ)
    except SettingsError as exc:
        _fail(str(exc))
        return
    click.echo(json.dumps(redaction.redact(settings), indent=2))


@app.command("dispatcher")
@click.option("--health-port", type=int, default=None, help="Port for /healthz, /readyz, /metrics (default: metrics.port).")
@click.pass_context
def dispatcher_cmd(ctx: click.Context, health_port: int | None) -> None:
    """Consume incidents and run one Job per investigation (until SIGTERM)."""
    from schemas import logs
    from dispatcher.plumbing import tasks
    from dispatcher.jobs.runtimes import open_runtime
    from dispatcher.intake.service import DispatcherService

    settings = settings_from(ctx)
    logs.configure(settings.logging)

    async def run() -> int:
        runtime = await open_runtime(settings)
        try:
            service = DispatcherService(settings, runtime, health_port=health_port)
        except SettingsError as exc:  # e.g. vault.ca_cert unreadable: say so, do not start
            await runtime.close()
            click.echo(f"error: {exc}", err=True)
            return 2
        return await service.run()

    sys.exit(tasks.run(run()))


@app.command("up")
@click.option("--demo", is_flag=True, help="Also publish a realistic alert storm and show what happens to it.")
@click.option("--exit", "exit_after", is_flag=True, help="With --demo: stop once the storm's investigations ended.")
@click.option("--json-logs", is_flag=True, help="JSON log lines (for machines) instead of the console format.")
@click.pass_context
def up_cmd(ctx: click.Context, demo: bool, exit_after: bool, json_logs: bool) -> None:
    """Run everything on this machine: OpenBao, the dispatcher with local Jobs, metrics (until Ctrl-C)."""

    from schemas import logs

    from dispatcher.plumbing import tasks
    from dispatcher.cli.up import run_up

    settings = settings_from(ctx)
    # Readable by default: the status lines tell the story, log lines only warnings and errors.
    logging_settings = (
        msgspec.structs.replace(settings.logging, format="json") if json_logs
        else msgspec.structs.replace(settings.logging, level="warning")
    )
    logs.configure(logging_settings)
    live = sys.stdout.isatty() and not json_logs  # a table redrawn in place; else one line per event
    sys.exit(tasks.run(run_up(settings, demo=demo, exit_after_demo=exit_after, echo=click.echo, live=live)))


@app.command("bridge")
@click.option("--host", default=None, help="Listen address (default: bridge.host).")
@click.option("--port", type=int, default=None, help="Listen port, 0 for any free one (default: bridge.port).")
@click.pass_context
def bridge_cmd(ctx: click.Context, host: str | None, port: int | None) -> None:
    """Receive Alertmanager webhooks on POST /alerts and publish them with confirms (until SIGTERM)."""
    from schemas import logs
    from dispatcher.plumbing import tasks
    from dispatcher.bridge.webhook import BridgeService, listen_refusal

    settings = settings_from(ctx)
    # Before anything starts: beyond loopback, no credentials means no bridge (never "auth off").
    refusal = listen_refusal(settings.bridge.host if host is None else host,
                             settings.bridge.port if port is None else port, settings.bridge)
    if refusal:
        click.echo(f"agentjobs bridge: {refusal}", err=True)
        sys.exit(2)
    logs.configure(settings.logging)
    sys.exit(tasks.run(BridgeService(settings, host=host, port=port).run()))


@app.group()
def publish() -> None:
    """Publish messages into agentjobs (with broker confirms)."""


@publish.command("incident")
@click.argument("file", type=click.File("rb"))
@click.pass_context
def publish_incident_cmd(ctx: click.Context, file: Any) -> None:
    """Publish an incident from FILE (or - for stdin): Alertmanager v4, CloudEvents or our event."""
    from dispatcher.plumbing import tasks
    from dispatcher.cli.ops import OpsError, publish_incident

    settings = settings_from(ctx)
    try:
        published = tasks.run(publish_incident(settings, file.read()))
    except OpsError as exc:
        _fail(str(exc))
        return
    click.echo(json.dumps(published))


@publish.command("feedback")
@click.argument("file", type=click.File("rb"), required=False)
@click.option("--investigation", "investigation_id", help="The investigation the finding came from.")
@click.option("--scope", help="Trust scope (by default the incident's domain).")
@click.option("--phase", type=click.Choice([p.value for p in Phase]), help="Phase the finding was produced in.")
@click.option("--verdict", type=click.Choice([v.value for v in Verdict]))
@click.option("--changed", "changed_fields", multiple=True, metavar="FIELD", help="For `modified`: e.g. cause.")
@click.option("--harmful", is_flag=True, help="An executed or proposed action would have hurt.")
@click.option("--action", default="", help="The action the verdict is about (registry name, e.g. terminate_backend): "
              "counted per action.")
@click.option("--action-key", default="", help="One execution: its ActionRecord's idempotency_key.")
@click.option("--shadow-agreed/--shadow-disagreed", "shadow_agreed", default=None,
              help="Shadow phase: did your own resolution agree with the agent's finding?")
@click.option("--operator", default="", help="Who gives this feedback.")
@click.option("--comment", default="")
@click.option("--feedback-id", default=None, help="Idempotency key (default: a new one); repeats count once.")
@click.pass_context
def publish_feedback_cmd(ctx: click.Context, file: Any, **fields: Any) -> None:
    """Publish an operator's verdict on a finding: from FILE (JSON, - for stdin) or from the options."""
    from dispatcher.plumbing import tasks
    from dispatcher.cli.ops import OpsError, publish_feedback

    settings = settings_from(ctx)
    if file is not None:
        body = file.read()
    else:
        required = {"investigation_id": "--investigation", "scope": "--scope", "phase": "--phase",
                    "verdict": "--verdict"}
        missing = [option for name, option in required.items() if not fields[name]]
        if missing:
            _fail(f"publish feedback: give FILE, or {', '.join(missing)} (see --help)")
        body = encode(feedback_from_options(**fields))
    try:
        published = tasks.run(publish_feedback(settings, body))
    except OpsError as exc:
        _fail(str(exc))
        return
    click.echo(json.dumps(published))


def feedback_from_options(
    *, investigation_id: str, scope: str, phase: str, verdict: str, changed_fields: tuple[str, ...], harmful: bool,
    shadow_agreed: bool | None, operator: str, comment: str, feedback_id: str | None, action: str = "",
    action_key: str = "",
) -> OperatorFeedback:
    """The feedback the ``publish feedback`` options describe, stamped now."""
    return OperatorFeedback(
        feedback_id=feedback_id or uuid.uuid4().hex, investigation_id=investigation_id, scope=scope,
        phase=Phase(phase), verdict=Verdict(verdict), at=utcnow(), operator=operator,
        changed_fields=tuple(changed_fields), harmful=harmful, comment=comment, action=action, action_key=action_key,
        shadow=None if shadow_agreed is None else ShadowComparison(agreed=shadow_agreed),
    )


@app.command("tail")
@click.argument("stream", type=click.Choice(["findings", "lifecycle", "actions", "dead", "phases", "feedback",
                                             "all"]),
                default="all")
@click.option("--follow", "-f", is_flag=True, help="Keep listening (default: stop after 2 s without messages).")
@click.option("--json", "as_json", is_flag=True, help="JSON lines for scripts.")
@click.option("--filter", "filters", multiple=True, metavar="KEY=VALUE", help="e.g. --filter domain=database")
@click.pass_context
def tail_cmd(ctx: click.Context, stream: str, follow: bool, as_json: bool, filters: tuple[str, ...]) -> None:
    """Show results, lifecycle events or dead letters as they arrive (never takes them from consumers).

    Ctrl-C, SIGINT or SIGTERM stops it with exit 0, even when started with SIGINT ignored.
    """
    from dispatcher.plumbing import tasks
    from dispatcher.cli.ops import OpsError, tail
    from dispatcher.plumbing.signals import stop_event, until_stopped

    parsed: dict[str, str] = {}
    for item in filters:
        key, sep, value = item.partition("=")
        if not sep or not key:
            _fail(f"--filter {item!r}: expected KEY=VALUE")
        parsed[key] = value
    settings = settings_from(ctx)
    echo = click.echo
    if not as_json:  # readable: rich highlights states, numbers and ids on a terminal, plain text elsewhere
        from rich.console import Console

        console = Console(soft_wrap=True)
        echo = lambda line: console.print(line, markup=False, highlight=True)  # noqa: E731

    async def run() -> None:
        # Our own handlers, not KeyboardInterrupt: Python never raises it when SIGINT came in ignored.
        await until_stopped(tail(settings, stream, follow=follow, as_json=as_json, filters=parsed, echo=echo,
                                 status=lambda line: click.echo(line, err=True)), stop_event())

    try:
        tasks.run(run())
    except OpsError as exc:
        _fail(str(exc))


@app.command("trust")
@click.option("--health-port", type=int, default=None, help="Port for /healthz, /readyz, /metrics (default: metrics.port).")
@click.pass_context
def trust_cmd(ctx: click.Context, health_port: int | None) -> None:
    """Tally operator feedback and move scopes between phases (single active consumer; until SIGTERM)."""
    from schemas import logs
    from dispatcher.plumbing import tasks
    from dispatcher.trust.service import TrustService

    settings = settings_from(ctx)
    logs.configure(settings.logging)
    sys.exit(tasks.run(TrustService(settings, health_port=health_port).run()))


@app.command("tickets")
@click.option("--health-port", type=int, default=None, help="Port for /healthz, /readyz, /metrics (default: metrics.port).")
@click.pass_context
def tickets_cmd(ctx: click.Context, health_port: int | None) -> None:
    """Keep one ticket per investigation (Redmine or a webhook) and read operators' verdicts back."""
    from schemas import logs
    from schemas.errors import TemporaryError
    from dispatcher.plumbing import tasks
    from dispatcher.tickets.service import TicketsService, open_backend

    settings = settings_from(ctx)
    logs.configure(settings.logging)
    try:
        backend = open_backend(settings)
    except (ValueError, TemporaryError) as exc:
        _fail(f"tickets: {getattr(exc, 'message', exc)}", code=2)
        return
    sys.exit(tasks.run(TicketsService(settings, backend=backend, health_port=health_port).run()))


@app.group()
def phase() -> None:
    """Autonomy phases per scope: show, explain, pin, unpin."""


@phase.command("show")
@click.option("--json", "as_json", is_flag=True, help="One JSON object for scripts.")
@click.pass_context
def phase_show_cmd(ctx: click.Context, as_json: bool) -> None:
    """Every scope's phase, as replayed from the trust logs."""
    from dispatcher.plumbing import tasks
    from dispatcher.cli.ops import OpsError, trust_state

    settings = settings_from(ctx)
    try:
        state = tasks.run(trust_state(settings))
    except OpsError as exc:
        _fail(str(exc))
        return
    rows = [state.ledger.explain(scope) for scope in state.ledger.phases()]
    if as_json:
        click.echo(json.dumps({"default": settings.trust.initial_phase.value,
                               "scopes": {e.scope: {"phase": e.phase.value, "pinned": e.pinned, "samples": e.samples,
                                                    "modification_rate": e.modification_rate} for e in rows}}))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="autonomy phases", caption=f"other scopes: {settings.trust.initial_phase.value}")
    for column in ("scope", "phase", "pinned", "n", "modification rate"):
        table.add_column(column)
    for e in rows:
        rate = "-" if e.modification_rate is None else f"{e.modification_rate:.2f}"
        table.add_row(e.scope, e.phase.value, f"yes ({e.pin_reason})" if e.pinned else "", str(e.samples), rate)
    Console().print(table)


@phase.command("explain")
@click.argument("scope")
@click.option("--json", "as_json", is_flag=True, help="One JSON object for scripts.")
@click.pass_context
def phase_explain_cmd(ctx: click.Context, scope: str, as_json: bool) -> None:
    """SCOPE's phase, figures, thresholds, and what is still needed to promote or would demote."""
    from dispatcher.plumbing import tasks
    from dispatcher.cli.ops import OpsError, trust_state

    settings = settings_from(ctx)
    try:
        state = tasks.run(trust_state(settings))
    except OpsError as exc:
        _fail(str(exc))
        return
    explained = state.ledger.explain(scope)
    if as_json:
        click.echo(msgspec.json.encode(explained).decode())
        return
    rate = "-" if explained.modification_rate is None else f"{explained.modification_rate:.3f}"
    click.echo(f"{scope}: {explained.phase.value}{' (pinned)' if explained.pinned else ''} "
               f"[policy {explained.policy_version}]")
    click.echo(f"  n={explained.samples} modified={explained.modifications} rate={rate} "
               f"wilson=[{explained.wilson_lower:.3f}, {explained.wilson_upper:.3f}] "
               f"promote<= {explained.promote_threshold} demote>= {explained.demote_threshold}")
    for note in explained.notes:
        click.echo(f"  - {note}")


@phase.command("pin")
@click.argument("scope")
@click.argument("to_phase", metavar="PHASE", type=click.Choice([p.value for p in Phase]))
@click.option("--reason", required=True, help="Why (kept in the phase log).")
@click.option("--operator", default=lambda: os.environ.get("USER", ""), help="Who pins (default: $USER).")
@click.option("--wait", type=float, default=10.0, help="Seconds to wait for the trust consumer to apply it.")
@click.pass_context
def phase_pin_cmd(ctx: click.Context, scope: str, to_phase: str, reason: str, operator: str, wait: float) -> None:
    """Hold SCOPE at PHASE (no automatic changes until unpinned)."""
    _send_pin(ctx, PhasePin(command_id=uuid.uuid4().hex, scope=scope, phase=Phase(to_phase), reason=reason,
                            operator=operator or "operator", at=utcnow()), wait)


@phase.command("unpin")
@click.argument("scope")
@click.option("--operator", default=lambda: os.environ.get("USER", ""), help="Who unpins (default: $USER).")
@click.option("--wait", type=float, default=10.0, help="Seconds to wait for the trust consumer to apply it.")
@click.pass_context
def phase_unpin_cmd(ctx: click.Context, scope: str, operator: str, wait: float) -> None:
    """Let SCOPE's phase follow the policy again."""
    _send_pin(ctx, PhasePin(command_id=uuid.uuid4().hex, scope=scope, phase=None, operator=operator or "operator",
                            at=utcnow()), wait)


def _send_pin(ctx: click.Context, pin: PhasePin, wait: float) -> None:
    from dispatcher.plumbing import tasks
    from dispatcher.cli.ops import OpsError, request_pin

    settings = settings_from(ctx)
    try:
        change = tasks.run(request_pin(settings, pin, wait=wait))
    except OpsError as exc:
        _fail(str(exc))
        return
    verb = "unpin" if pin.phase is None else f"pin at {pin.phase.value}"
    if change is None:
        click.echo(f"{pin.scope}: {verb} queued (command {pin.command_id}); no trust consumer applied it within "
                   f"{wait:g} s — is `agentjobs trust` running? (`agentjobs tail phases` shows when it lands)")
        return
    click.echo(f"{pin.scope}: {change.from_phase or '-'} → {change.to_phase.value} ({change.reason})")


@app.group()
def actions() -> None:
    """Remediation actions: the global kill switch (Vault KV agentjobs-kv/actions) and approvals.

    Every agent reads the switch right before each action, also Jobs already running: disabled, or
    unreadable, nothing runs (the action is recorded refused_kill_switch). `list` shows proposals
    their phase did not allow; `approve` runs one, once, in a follow-up Job.
    """


_TOKEN_HELP = ("An operator's Vault token (default: $VAULT_TOKEN, $BAO_TOKEN, vault.token, vault.token_file; only if "
               "none of these is configured, the root token of the OpenBao that `agentjobs up` runs from this "
               "directory, read from <runtime.state_dir>/openbao/openbao.log).")


def _vault_options(fn: Any) -> Any:
    fn = click.option("--token", default=None, envvar=["VAULT_TOKEN", "BAO_TOKEN"], help=_TOKEN_HELP)(fn)
    return click.option("--addr", default=None, help="Vault/OpenBao address (default: vault.addr).")(fn)


def _switch_client(ctx: click.Context, addr: str | None, token: str | None) -> tuple[Any, str]:
    from dispatcher.cli.actions import ActionsError, client_for, operator_token

    settings = settings_from(ctx)
    try:
        found = operator_token(token, settings)
    except ActionsError as exc:
        _fail(str(exc))
        raise
    return client_for(settings, found.token, addr), found.source


def _switch_command(name: str, *, enabled: bool, doc: str, reason_help: str, after: str) -> Any:
    """``actions disable`` and ``actions enable``: one code path; direction and words are data."""

    @actions.command(name, help=doc)
    @click.option("--reason", required=True, help=reason_help)
    @click.option("--operator", default=lambda: os.environ.get("USER", ""),
                  help="Who (default: $USER).")
    @_vault_options
    @click.pass_context
    def command(ctx: click.Context, reason: str, operator: str, addr: str | None,
                token: str | None) -> None:
        from dispatcher.cli.actions import ActionsError, set_switch

        client, source = _switch_client(ctx, addr, token)
        try:
            status = set_switch(client, enabled=enabled, reason=reason,
                                operator=operator or "operator", source=source)
        except ActionsError as exc:
            _fail(str(exc))
            return
        click.echo(status.line())
        click.echo(after)

    return command


actions_disable_cmd = _switch_command(
    "disable", enabled=False,
    doc="Stop every remediation action: new Jobs and running agents act on nothing.",
    reason_help="Why (kept in the switch and in every refusal it causes).",
    after=("running agents refuse from their next action on, new Jobs from their first "
           "(recorded refused_kill_switch)"),
)
actions_enable_cmd = _switch_command(
    "enable", enabled=True,
    doc="Let agents act again, each within what its phase allows.",
    reason_help="Why (kept in the switch).",
    after="agents act again from their next action on, within what their phase allows",
)


@actions.command("list")
@click.option("--all", "show_all", is_flag=True, help="Also approved and expired proposals of the last hour.")
@click.option("--json", "as_json", is_flag=True, help="One JSON array for scripts.")
@click.pass_context
def actions_list_cmd(ctx: click.Context, show_all: bool, as_json: bool) -> None:
    """Proposals their phase did not allow, awaiting an operator: what, where, why, until when."""
    from datetime import timedelta

    from dispatcher.cli import approvals
    from dispatcher.cli.ops import OpsError
    from dispatcher.plumbing import tasks

    settings = settings_from(ctx)
    try:
        view = tasks.run(approvals.action_log(settings))
    except OpsError as exc:
        _fail(str(exc))
        return
    now, ttl = utcnow(), timedelta(seconds=settings.actions.proposal_ttl)
    rows = [approvals.row(p, now=now, ttl=ttl) for p in view.proposals()]
    rows = rows if show_all else [r for r in rows if r["state"] == "pending"]
    if as_json:
        click.echo(approvals.as_json(rows))
        return
    if not rows:
        click.echo("no proposals awaiting approval" + ("" if show_all else " (--all shows approved and expired ones)"))
    for item in rows:
        click.echo(approvals.render(item))


@actions.command("approve")
@click.argument("investigation_id")
@click.argument("action")
@click.option("--reason", required=True, help="Why (kept in the approval record and the follow-up Job).")
@click.option("--operator", default=lambda: os.environ.get("USER", ""), help="Who (default: $USER; the broker "
              "user is what counts).")
@click.option("--wait", type=float, default=15.0, help="Seconds to wait for the dispatcher's answer.")
@click.pass_context
def actions_approve_cmd(ctx: click.Context, investigation_id: str, action: str, reason: str, operator: str,
                        wait: float) -> None:
    """Run ACTION (a registry name, or a proposal's key) that INVESTIGATION_ID proposed, once, in a follow-up Job.

    The proposal is the agent's own record; the follow-up Job runs it with the credentials of the
    phase that action needs, through the same protocol (precondition, kill switch, limits, at most
    once), and not after the approval expires (actions.approval_ttl). Exit 1 if it was refused.
    """
    from schemas import ApproveAction

    from dispatcher.cli import approvals
    from dispatcher.cli.ops import OpsError
    from dispatcher.plumbing import tasks

    settings = settings_from(ctx)
    command = ApproveAction(approval_id=uuid.uuid4().hex, investigation_id=investigation_id, action=action,
                            reason=reason, requested_by=operator or "operator", at=utcnow())
    try:
        view = tasks.run(approvals.action_log(settings))
        approvals.check(view, command, settings=settings.actions, now=utcnow())
        got = tasks.run(approvals.approve(settings, command, wait=wait))
    except OpsError as exc:
        _fail(str(exc))
        return
    line, accepted = approvals.answer_line(got, command, wait)
    click.echo(line)
    if not accepted:
        sys.exit(EXIT_PROBLEM)


@actions.command("status")
@click.option("--json", "as_json", is_flag=True, help="One JSON object for scripts.")
@_vault_options
@click.pass_context
def actions_status_cmd(ctx: click.Context, as_json: bool, addr: str | None, token: str | None) -> None:
    """Show the kill switch as agents read it. Exit 1 if it is unreadable (agents then refuse every action)."""
    from dispatcher.cli.actions import ActionsError, read_status, status_json

    client, source = _switch_client(ctx, addr, token)
    try:
        status = read_status(client, source=source)
    except ActionsError as exc:
        _fail(str(exc))
        return
    click.echo(status_json(status) if as_json else status.line())
    if status.switch is None:
        sys.exit(EXIT_PROBLEM)


@app.command("status")
@click.option("--json", "as_json", is_flag=True, help="One JSON object for scripts.")
@click.pass_context
def status_cmd(ctx: click.Context, as_json: bool) -> None:
    """Active investigations, phases per scope and queue depths."""
    from schemas import utcnow

    from dispatcher.plumbing import tasks
    from dispatcher.cli.ops import OpsError, active_investigations, queue_depths, trust_state

    settings = settings_from(ctx)

    async def gather() -> dict[str, Any]:
        return {
            "investigations": await active_investigations(settings, utcnow()),
            "phases": {"*": settings.trust.initial_phase.value,
                       **{scope: p.value for scope, p in (await trust_state(settings)).ledger.phases().items()}},
            "queues": await queue_depths(settings),
        }

    try:
        status = tasks.run(gather())
    except OpsError as exc:
        _fail(str(exc))
        return
    if as_json:
        click.echo(json.dumps(status))
        return
    click.echo(f"{len(status['investigations'])} active investigation(s)")
    for inv in status["investigations"]:
        click.echo(f"  {inv['job_name']:<48} {inv['state']:<8} class={inv['class']} phase={inv['phase']} "
                   f"domain={inv['domain']} age={inv['age_s']}s")
    click.echo("phases: " + ", ".join(f"{k}={v}" for k, v in status["phases"].items()))
    for name, depth in status["queues"].items():
        click.echo(f"queue {name:<24} ready={depth['ready']} consumers={depth['consumers']}")


@app.command("agent")
def agent_cmd() -> None:
    """Run one investigation inside its Job (AGENTJOBS_* environment, input files).

    Exit codes: 0 finding published, 1 error, 3 credentials unavailable, 4 finding not published.
    """
    import logging

    from agent.main import main as agent_main

    code = agent_main(os.environ)
    # A Job's process has nothing left to tear down once its finding is published and its
    # credentials revoked: skip the interpreter's teardown of ~1,600 modules (~0.5 CPU-s each
    # investigation, benchmarks/investigation.py). Output is flushed first.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@app.group()
def vault() -> None:
    """Vault/OpenBao layout for agent credentials."""


@vault.command("bootstrap")
@click.option("--addr", default=None, help="Vault/OpenBao address (default: vault.addr).")
@click.option(
    "--token",
    default=None,
    envvar=["VAULT_TOKEN", "BAO_TOKEN"],
    help="Admin token (default: $VAULT_TOKEN, $BAO_TOKEN, vault.token, vault.token_file).",
)
@click.option(
    "--policy-dir",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=None,
    help="Directory of the agentjobs-*.hcl policies (default: k8s/vault of this checkout; in a "
    "container, mount the agentjobs-vault-policies ConfigMap and point here).",
)
@click.pass_context
def vault_bootstrap_cmd(ctx: click.Context, addr: str | None, token: str | None, policy_dir: Path | None) -> None:
    """Idempotently create policies, token roles, auth and secrets engines; print changes."""
    import hvac

    from schemas import logs
    from dispatcher.credentials.tokens import dispatcher_token, vault_ca
    from dispatcher.credentials.bootstrap import POLICY_DIR, BootstrapError, bootstrap

    settings = settings_from(ctx)
    logs.configure(settings.logging)
    try:
        vault_ca(settings.vault)  # a private CA that cannot be read: say so before connecting
    except SettingsError as exc:
        _fail(str(exc))
    if not token:
        try:
            token = dispatcher_token(settings.vault)
        except OSError as exc:
            _fail(f"vault.token_file: cannot read {settings.vault.token_file}: {exc.strerror}")
    if not token:
        _fail("no Vault token: pass --token or set VAULT_TOKEN / vault.token / vault.token_file")
    client = hvac.Client(
        url=addr or settings.vault.addr, token=token, timeout=settings.vault.request_timeout,
        verify=settings.vault.ca_cert or True,
    )
    try:
        report = bootstrap(client, settings, policy_dir=policy_dir or POLICY_DIR)
    except BootstrapError as exc:
        _fail(str(exc))
        return
    for change in report.changes:
        click.echo(str(change))
    if not report.changes:
        click.echo("no changes")
    for note in report.notes:
        click.echo(note)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="agentjobs")


if __name__ == "__main__":
    main()
