"""Chaos: the trust consumer SIGKILLed while it replays the feedback log → identical phases after restart.

Issue 10's fifth chaos bullet. ``ENTRIES`` operator feedbacks (admission times spread over
the last few days, a few re-appended duplicates as at-least-once delivery leaves them) and
a pin plus an unpin are appended straight to the stream ``agentjobs.feedback-log`` as the
trust identity writes them (default exchange; replay reads the log, not the intake queue):
each investigation's ``lifecycle.dispatched`` and finding records first, then the verdict,
admitted at its time (``tests/support/trust_records.py``). Then ``agentjobs trust`` is started as a process and SIGKILLed
``KILLS`` times while it is replaying — its AMQP connection is open and it has not
logged ``trust_replayed`` (its health server, and so ``/readyz``, only comes up after
replay). A last start runs to ready, and its phases and tallies (``/metrics``: phase,
samples, modification rate per scope, feedback counted by verdict) must equal those
of a pure ``TrustLedger`` fed the same entries in the same order, and
``agentjobs phase show --json`` must agree too.

Bounded, loopback only. ``pytest -s`` prints the figures.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import random
import re
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import msgspec
import pytest

from dispatcher.plumbing.settings import load_settings
from dispatcher.trust.policy import TrustLedger
from dispatcher.trust.records import AdmittedFeedback, AdmittedPin, LogEntry
from schemas import OperatorFeedback, Phase, PhasePin, ShadowComparison, Verdict
from tests.integration.dispatcher_harness import declare_topology
from tests.integration.test_dispatcher_processes import DispatcherProcess, _killed_on_exit
from tests.support.identities import url_for
from tests.support.trust_records import append_log, log_entries

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

ENTRIES = 6_000  # feedbacks appended (plus duplicates and two pin commands)
SCOPES = 24
DUPLICATE_RATE = 0.01
KILLS = 3  # SIGKILLs during replay before the run that is allowed to finish
KILL_ATTEMPTS = 12  # bound: starts tried to land KILLS kills inside the replay
TRUST_ENV = {  # phases must move within the log's few days
    "AGENTJOBS_TRUST__MIN_SAMPLES": "20",
    "AGENTJOBS_TRUST__WINDOW": "100",
    "AGENTJOBS_TRUST__MIN_DWELL": "3600",
    "AGENTJOBS_TRUST__COOLDOWN": "600",
    "AGENTJOBS_METRICS__PORT": "0",
}
MODIFYING = (Verdict.MODIFIED, Verdict.REJECTED, Verdict.ACTION_OVERRIDDEN)
AGREED, DISAGREED = ShadowComparison(agreed=True), ShadowComparison(agreed=False, operator_cause="another cause")


def _entries(trust, now: datetime, seed: int = 7) -> list[OperatorFeedback | PhasePin]:
    """A realistic log: mostly good agents, a tail of poor ones, each feedback tagged with its scope's phase."""
    rng = random.Random(seed)
    scopes = [f"domain-{i:02d}" for i in range(SCOPES)]
    rates = [0.01 + 0.40 * (i / (SCOPES - 1)) ** 2 for i in range(SCOPES)]
    span = timedelta(days=4)
    start = now - span - timedelta(hours=1)
    gap = span.total_seconds() / ENTRIES
    ledger = TrustLedger(trust)  # follows the log as it is written: the phase a finding ran in
    out: list[OperatorFeedback | PhasePin] = []
    t = 0.0
    for n in range(ENTRIES):
        if out and rng.random() < DUPLICATE_RATE:
            dup = rng.choice([e for e in out[-50:] if isinstance(e, OperatorFeedback)])
            out.append(dup)
            ledger.apply_feedback(dup)
        i = rng.randrange(SCOPES)
        scope = scopes[i]
        t += rng.expovariate(1.0 / gap)
        at = start + timedelta(seconds=t)
        modified = rng.random() < rates[i]
        phase = ledger.phase_for(scope)
        if phase is Phase.SHADOW:
            verdict = Verdict.MODIFIED if modified else Verdict.ACCEPTED
            shadow = DISAGREED if modified else AGREED
        else:
            verdict, shadow = (rng.choice(MODIFYING) if modified else Verdict.ACCEPTED), None
        fb = OperatorFeedback(
            feedback_id=f"fb-{n:06d}", investigation_id=f"inv-{n:06d}", scope=scope, phase=phase,
            verdict=verdict, at=at, operator=f"oncall-{i % 5}",
            changed_fields=("cause",) if verdict is Verdict.MODIFIED else (),
            harmful=modified and rng.random() < 0.003, shadow=shadow,
        )
        out.append(fb)
        ledger.apply_feedback(fb)
        if n == ENTRIES // 3:  # an operator pins a scope ...
            pin = PhasePin(command_id="pin-1", scope=scopes[0], phase=Phase.READ_ONLY, reason="chaos test pin",
                           operator="alice", at=at + timedelta(seconds=1))
            out.append(pin)
            ledger.pin(pin.scope, Phase.READ_ONLY, reason=pin.reason, operator=pin.operator, at=pin.at)
        if n == 2 * ENTRIES // 3:  # ... and lets it go later
            unpin = PhasePin(command_id="unpin-1", scope=scopes[0], phase=None, operator="alice",
                             at=at + timedelta(seconds=1))
            out.append(unpin)
            ledger.unpin(unpin.scope, operator=unpin.operator, at=unpin.at)
    assert all(e.at < now for e in out)
    return out


def _expected(trust, entries: list[LogEntry]) -> TrustLedger:
    """A pure replay of the verdicts and pins, in log order at their admission times, as TrustState
    applies them (pins de-duplicated by command id; every investigation here is a recorded one)."""
    ledger = TrustLedger(trust)
    commands: set[str] = set()
    for e in entries:
        if isinstance(e, AdmittedFeedback):
            ledger.apply_feedback(msgspec.structs.replace(e.feedback, at=e.admitted_at))
        elif isinstance(e, AdmittedPin) and e.pin.command_id not in commands:
            commands.add(e.pin.command_id)
            if e.pin.phase is None:
                ledger.unpin(e.pin.scope, operator=e.pin.operator, at=e.admitted_at)
            else:
                ledger.pin(e.pin.scope, e.pin.phase, reason=e.pin.reason, operator=e.pin.operator, at=e.admitted_at)
    return ledger


async def _append(url: str, entries: list[LogEntry]) -> float:
    t0 = time.monotonic()
    await append_log(url, entries)  # as the trust identity
    return time.monotonic() - t0


async def _metrics(port: int) -> dict[str, float]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as r:
        text = await r.text()
    pattern = r"^(agentjobs_(?:feedback_total|trust_samples|trust_phase|trust_modification_rate)\{[^}]*\}) (\S+)$"
    return {m.group(1): float(m.group(2)) for m in re.finditer(pattern, text, re.MULTILINE)}


def _expected_metrics(ledger: TrustLedger, entries: list[LogEntry]) -> dict[str, float]:
    out: dict[str, float] = {}
    seen: set[tuple[str, str]] = set()
    verdicts: collections.Counter[str] = collections.Counter()
    for entry in entries:
        if not isinstance(entry, AdmittedFeedback):
            continue
        e = entry.feedback
        if (e.scope, e.feedback_id) not in seen:
            seen.add((e.scope, e.feedback_id))
            verdicts[e.verdict.value] += 1
    for verdict, n in verdicts.items():
        out[f'agentjobs_feedback_total{{verdict="{verdict}"}}'] = float(n)
    for scope, phase in ledger.phases().items():
        explained = ledger.explain(scope)
        out[f'agentjobs_trust_samples{{scope="{scope}"}}'] = float(explained.samples)
        out[f'agentjobs_trust_modification_rate{{scope="{scope}"}}'] = float(explained.modification_rate or 0.0)
        for p in Phase:
            out[f'agentjobs_trust_phase{{phase="{p.value}",scope="{scope}"}}'] = 1.0 if p is phase else 0.0
    return out


def _normalise(metrics: dict[str, float]) -> dict[str, float]:
    """Label order as prometheus_client writes it may differ from ours: sort the labels."""
    out = {}
    for key, value in metrics.items():
        name, _, labels = key.partition("{")
        parts = sorted(labels.rstrip("}").split(","))
        out[f"{name}{{{','.join(parts)}}}"] = round(value, 9)
    return out


def _amqp_connected(pid: int, port: int) -> bool:
    """True once process ``pid`` holds an ESTABLISHED TCP connection to ``port`` (Linux /proc, no polling lag)."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    except OSError:
        return False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == "01" and int(cols[2].rsplit(":", 1)[1], 16) == port and cols[9] in inodes:
                    return True
    return False


async def test_trust_consumer_killed_during_replay_restarts_with_identical_phases(
    amqp_vhost, rabbitmq_management, tmp_path
):
    # Given a feedback log of a few thousand entries (and two pin commands), written straight to the stream
    url = amqp_vhost.amqp_url
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "AGENTJOBS_AMQP__URL": url_for(url, "trust"),
           "AGENTJOBS_LOGGING__FORMAT": "json", **TRUST_ENV}
    settings = load_settings(None, env)
    await declare_topology(url, settings)
    story = _entries(settings.trust, datetime.now(UTC))
    entries = log_entries(story)
    append_s = await _append(url, entries)
    expected = _expected(settings.trust, entries)
    changes = sum(1 for p in expected.phases().values() if p is not Phase.SHADOW)

    rng = random.Random(3)
    amqp_port = urlsplit(url).port or 5672
    window = 0.5  # seconds after connecting that a kill may land at (halved after each late one)
    kills, attempts, kill_points = 0, 0, []
    started: list[DispatcherProcess] = []
    async with _killed_on_exit(started):
        # When it is SIGKILLed while replaying, several times
        while kills < KILLS:
            attempts += 1
            assert attempts <= KILL_ATTEMPTS, f"only {kills} kills landed inside the replay in {attempts - 1} starts"
            process = DispatcherProcess(env, tmp_path / f"trust-{attempts}.log", command="trust")
            started.append(process)
            script = Path(sys.executable).with_name("agentjobs")
            process._log = open(process.log_path, "ab")  # noqa: ASYNC230, SIM115 - closed after the kill
            t0 = time.monotonic()
            process.proc = await asyncio.create_subprocess_exec(
                str(script), "trust", "--health-port", str(process.port), env=env,
                stdout=process._log, stderr=process._log)
            async with asyncio.timeout(30):  # its AMQP connection is up: replay starts within milliseconds
                while not _amqp_connected(process.proc.pid, amqp_port):
                    assert process.proc.returncode is None, process.log_path.read_text()[-2000:]
                    await asyncio.sleep(0.002)
            connected = time.monotonic()
            await asyncio.sleep(rng.uniform(0.3, 1.0) * window)  # somewhere inside the replay
            await process.kill()
            process._log.close()
            if "trust_replayed" in process.log_path.read_text():
                window /= 2  # too late: replay was already done; aim earlier
            else:
                kills += 1
                kill_points.append(round(time.monotonic() - connected, 3))
        # Then a restart replays to ready ...
        final = DispatcherProcess(env, tmp_path / "trust-final.log", command="trust")
        started.append(final)
        t0 = time.monotonic()
        await final.start()
        ready_s = time.monotonic() - t0
        metrics = await _metrics(final.port)
        assert await final.stop() == 0, final.log_path.read_text()[-3000:]

    # ... with exactly the phases and tallies of a pure replay of the same entries
    want = _normalise(_expected_metrics(expected, entries))
    got = _normalise(metrics)
    assert {k: v for k, v in got.items() if k.startswith("agentjobs_trust_phase")} == \
        {k: v for k, v in want.items() if k.startswith("agentjobs_trust_phase")}
    assert got == want
    replayed_line = next(json.loads(line) for line in final.log_path.read_text().splitlines()
                         if "trust_replayed" in line)
    assert replayed_line["feedback_entries"] == len(entries)
    # and the CLI, replaying the log itself, agrees
    shown = await asyncio.to_thread(
        subprocess.run, [str(Path(sys.executable).with_name("agentjobs")), "phase", "show", "--json"],
        env=env, capture_output=True, text=True, timeout=60, check=False)
    assert shown.returncode == 0, shown.stderr
    scopes = json.loads(shown.stdout)["scopes"]
    assert {s: (v["phase"], v["samples"]) for s, v in scopes.items()} == \
        {s: (p.value, expected.explain(s).samples) for s, p in expected.phases().items()}

    figures = {
        "entries_in_log": len(entries),
        "distinct_feedbacks": sum(1 for k in want if k.startswith("agentjobs_feedback_total")) and
        int(sum(v for k, v in want.items() if k.startswith("agentjobs_feedback_total"))),
        "pin_commands": sum(1 for e in story if isinstance(e, PhasePin)),
        "verdicts_in_log": sum(1 for e in entries if isinstance(e, AdmittedFeedback)),
        "scopes": len(expected.phases()), "scopes_not_shadow": changes,
        "phases": collections.Counter(p.value for p in expected.phases().values()),
        "kills_during_replay": kills, "starts": attempts + 1, "kill_points_s_after_amqp_connect": kill_points,
        "append_s": round(append_s, 2), "final_replay_to_ready_s": round(ready_s, 2),
    }
    print("\nchaos trust replay kill:", json.dumps(figures, sort_keys=True))
