"""`agentjobs up`, as a newcomer runs it: the whole product on one machine."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.alertmanager import ALERTMANAGER, MISSING, running_alertmanager
from tests.support.lines import Lines
from tests.support.pipelines import agents_under, no_vault_users
from tests.support.services import free_port, wait_until
from tests.support.identities import seed_up_credentials

pytestmark = pytest.mark.e2e
AGENTJOBS = str(Path(sys.executable).with_name("agentjobs"))
TOKEN = "up-bridge-token"
ALERT = "UpEndToEndConnectionsExhausted"


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


async def _stopped(proc: asyncio.subprocess.Process, sig: signal.Signals, timeout: float, what: str) -> int:
    """Send ``sig`` and wait for the exit code; on timeout kill the process (no leak) and fail."""
    if proc.returncode is None:
        proc.send_signal(sig)
    try:
        async with asyncio.timeout(timeout):
            return await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"{what} still running {timeout} s after {sig.name}") from None


def _kill_openbao_left_by(env: dict[str, str]) -> list[str]:
    """Kill any OpenBao dev server still listening where ``up`` put its own; their pids (none, normally)."""
    listen = env["AGENTJOBS_VAULT__ADDR"].removeprefix("http://")
    found = subprocess.run(["pgrep", "-f", f"dev-listen-address={listen}"], capture_output=True, text=True)
    pids = found.stdout.split()
    for pid in pids:
        os.kill(int(pid), signal.SIGKILL)
    return pids


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    if "AGENTJOBS_AMQP__URL" in extra:
        seed_up_credentials(tmp_path / "state", extra["AGENTJOBS_AMQP__URL"])
    return {**os.environ, "AGENTJOBS_RUNTIME__STATE_DIR": str(tmp_path / "state"),
            "AGENTJOBS_VAULT__ADDR": f"http://127.0.0.1:{free_port()}",
            "AGENTJOBS_METRICS__PORT": str(free_port()), "AGENTJOBS_BRIDGE__PORT": str(free_port()), **extra}


async def test_up_demo_exit_runs_the_storm_and_leaves_nothing_behind(amqp_vhost, rabbitmq_management, tmp_path):
    env = _env(tmp_path, AGENTJOBS_AMQP__URL=amqp_vhost.amqp_url, AGENTJOBS_VAULT__RABBITMQ_VHOST=amqp_vhost.name)
    proc = await asyncio.create_subprocess_exec(AGENTJOBS, "up", "--demo", "--exit", env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=240)
    text = out.decode()
    assert proc.returncode == 0, text[-3000:]
    assert "demo: 3 investigations for 60 notifications" in text
    assert "findings published to exchange agentjobs.results" in text
    assert "bridge: Alertmanager webhook at http://127.0.0.1:" in text
    assert "Traceback" not in text
    # no OpenBao, agent or dispatcher process outlives `up`, and no Vault-issued broker user survives
    vault_listen = env["AGENTJOBS_VAULT__ADDR"].removeprefix("http://")
    for pattern in (f"dev-listen-address={vault_listen}", f"{tmp_path}"):
        assert subprocess.run(["pgrep", "-f", pattern], capture_output=True).returncode == 1, pattern
    assert not agents_under(tmp_path)
    assert await no_vault_users(rabbitmq_management, amqp_vhost.name)


def test_up_without_rabbitmq_says_how_to_get_one_and_exits_2(tmp_path):
    env = _env(tmp_path, AGENTJOBS_AMQP__URL="amqp://guest:guest@127.0.0.1:1/")
    done = subprocess.run([AGENTJOBS, "up"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:1/" in done.stdout + done.stderr
    assert "apt-get install rabbitmq-server" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr


@pytest.mark.skipif(ALERTMANAGER is None, reason=MISSING)
async def test_up_with_real_alertmanager_findings_reach_tail_and_sigterm_leaves_nothing_behind(
    amqp_vhost, rabbitmq_management, tmp_path,
):
    # Given `agentjobs up` with its bridge behind a bearer token, and a `tail` of the findings
    bridge_port = free_port()
    env = _env(tmp_path, AGENTJOBS_AMQP__URL=amqp_vhost.amqp_url, AGENTJOBS_VAULT__RABBITMQ_VHOST=amqp_vhost.name,
               AGENTJOBS_BRIDGE__PORT=str(bridge_port), AGENTJOBS_BRIDGE__BEARER_TOKEN=TOKEN)
    up = await asyncio.create_subprocess_exec(AGENTJOBS, "up", env=env, stdout=asyncio.subprocess.PIPE,
                                              stderr=asyncio.subprocess.STDOUT)
    tail = None
    try:
        out = Lines(up.stdout)
        await out.wait_for(lambda line: line.startswith("running"), 90, "`running` from up")
        tail = await asyncio.create_subprocess_exec(AGENTJOBS, "tail", "findings", "--json", "--follow", env=env,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        findings, said = Lines(tail.stdout), Lines(tail.stderr)
        await said.wait_for(lambda line: line.startswith("tail: findings"), 30, "tail's ready line")

        # When real Alertmanager notifies the bridge of a two-alert group
        async with running_alertmanager(tmp_path / "am", bridge_port, token=TOKEN) as am:
            await am.post_alerts([
                {"labels": {"alertname": ALERT, "instance": f"db-{i}:9187", "severity": "critical",
                            "service": "payments-db", "domain": "database"},
                 "annotations": {"summary": f"connections exhausted on db-{i}"}}
                for i in (1, 2)
            ])
            # Then its finding reaches `tail --json`, and the investigation succeeded
            line = await findings.wait_for(lambda line: ALERT in line, 120, f"a finding about {ALERT}")
        finding = json.loads(line)
        assert finding["kind"] == "finding" and finding["routing_key"] == "finding.shadow.database"
        assert finding["phase"] == "shadow" and finding["reasoner"] != "dispatcher"
        ended = await out.wait_for(lambda line: line.strip().startswith(("succeeded", "failed")), 60, "its ending")
        assert ended.split()[0] == "succeeded", ended
        # and an operator's verdict on it is tallied by the trust consumer that `up` runs
        verdict = await asyncio.to_thread(subprocess.run, [
            AGENTJOBS, "publish", "feedback", "--investigation", finding["investigation_id"], "--scope", "database",
            "--phase", "shadow", "--verdict", "accepted"], env=env, capture_output=True, timeout=60)
        assert verdict.returncode == 0, verdict.stderr

        async def tallied() -> bool:
            shown = await asyncio.to_thread(subprocess.run, [AGENTJOBS, "phase", "explain", "database", "--json"],
                                            env=env, capture_output=True, timeout=60)
            return shown.returncode == 0 and json.loads(shown.stdout)["samples"] == 1

        await wait_until(tallied, timeout=30, what="the feedback tallied for scope database")
        # and the agent's broker credentials did not outlive its Job (OpenBao still running)
        await wait_until(lambda: no_vault_users(rabbitmq_management, amqp_vhost.name), timeout=30,
                         what="the agent's Vault-issued broker user revoked after its Job")
    finally:
        # When SIGTERM arrives (and Ctrl-C at the tail); whatever does not stop is killed, not leaked
        try:
            code = await _stopped(up, signal.SIGTERM, 60, "up")
        finally:
            if tail is not None:
                tail_code = await _stopped(tail, signal.SIGINT, 30, "tail")
    # Then up exits cleanly, leaving no process and no credential behind
    text = await out.finished()
    assert code == 0, text[-3000:]
    assert tail_code == 0
    assert "stopped" in text.splitlines()[-1] and "Traceback" not in text
    vault_listen = env["AGENTJOBS_VAULT__ADDR"].removeprefix("http://")
    for pattern in (f"dev-listen-address={vault_listen}", f"{tmp_path}/state"):
        assert subprocess.run(["pgrep", "-f", pattern], capture_output=True).returncode == 1, pattern
    assert not agents_under(tmp_path)
    assert await no_vault_users(rabbitmq_management, amqp_vhost.name)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
async def test_up_started_with_sigint_ignored_stops_on_a_signal_while_starting(
    amqp_vhost, rabbitmq_management, tmp_path, sig,
):
    # Given `agentjobs up` started with SIGINT ignored (nohup, a shell without job control),
    # part-way through its start: OpenBao configured, the services still to come
    env = _env(tmp_path, AGENTJOBS_AMQP__URL=amqp_vhost.amqp_url, AGENTJOBS_VAULT__RABBITMQ_VHOST=amqp_vhost.name)
    up = await asyncio.create_subprocess_exec(AGENTJOBS, "up", env=env, preexec_fn=_ignore_sigint,
                                              stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out = Lines(up.stdout)
        await out.wait_for(lambda line: line.startswith("OpenBao "), 90, "OpenBao configured")
    finally:
        # When SIGINT or SIGTERM arrives
        try:
            code = await _stopped(up, sig, 60, "up")
        finally:
            left = _kill_openbao_left_by(env)  # a hung or killed `up` leaves its OpenBao running
    # Then up stops what it had started and exits 0, leaving no process and no credential behind
    text = await out.finished()
    assert code == 0, text[-3000:]
    assert text.splitlines()[-1] == "stopped" and "Traceback" not in text, text[-3000:]
    assert not left, f"OpenBao left running: {left}"
    assert subprocess.run(["pgrep", "-f", f"{tmp_path}/state"], capture_output=True).returncode == 1
    assert not agents_under(tmp_path)
    assert await no_vault_users(rabbitmq_management, amqp_vhost.name)


async def test_up_whose_output_pipe_closes_still_stops_everything(amqp_vhost, tmp_path):
    # `agentjobs up --demo --exit | head -1`: the reader goes away after the first line
    env = _env(tmp_path, AGENTJOBS_AMQP__URL=amqp_vhost.amqp_url, AGENTJOBS_VAULT__RABBITMQ_VHOST=amqp_vhost.name)
    proc = await asyncio.create_subprocess_exec(AGENTJOBS, "up", "--demo", "--exit", env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    assert proc.stdout is not None
    await asyncio.wait_for(proc.stdout.readline(), timeout=60)
    proc._transport.get_pipe_transport(1).close()  # type: ignore[attr-defined]  # close our read end
    await asyncio.wait_for(proc.wait(), timeout=120)
    vault_listen = env["AGENTJOBS_VAULT__ADDR"].removeprefix("http://")
    assert subprocess.run(["pgrep", "-f", f"dev-listen-address={vault_listen}"], capture_output=True).returncode == 1
    assert not agents_under(tmp_path)
