"""Long-running commands stop on SIGINT and SIGTERM, whatever signal disposition they inherited.

A parent that ignores SIGINT (a shell without job control, ``nohup``, a supervisor) passes
SIG_IGN on to its children; Python then never raises KeyboardInterrupt, so a command that
relied on it ignored Ctrl-C and ``kill -INT`` for good. Each case here starts the real console
script with SIGINT ignored, waits for a line saying it is running, signals it and expects a
clean exit within a few seconds.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from dispatcher.plumbing.settings import load_settings
from tests.integration.dispatcher_harness import declare_topology
from tests.support.lines import Lines
from tests.support.services import free_port

pytestmark = pytest.mark.integration
AGENTJOBS = str(Path(sys.executable).with_name("agentjobs"))
STOP_WITHIN = 10  # seconds: generous for a loaded CI machine; a hung process never gets there


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


async def _exit_code_after(
    args: list[str], env: dict[str, str], sig: signal.Signals, ready: Callable[[str], bool], what: str,
) -> tuple[int, str]:
    """Start ``agentjobs ARGS`` with SIGINT ignored, wait for its ready line, send ``sig``: its exit code."""
    proc = await asyncio.create_subprocess_exec(
        AGENTJOBS, *args, env=env, preexec_fn=_ignore_sigint,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        said = Lines(proc.stderr)
        await said.wait_for(ready, 30, what)
        proc.send_signal(sig)
        try:
            async with asyncio.timeout(STOP_WITHIN):
                code = await proc.wait()
        except TimeoutError:
            raise AssertionError(f"`agentjobs {' '.join(args)}` still running {STOP_WITHIN} s after {sig.name}:\n"
                                 + "\n".join(said.lines[-20:])) from None
        return code, await said.finished()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def _env(amqp_url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "AGENTJOBS_AMQP__URL": amqp_url,
            "AGENTJOBS_LOGGING__FORMAT": "json", **extra}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
async def test_tail_follow_with_sigint_ignored_stops_on_a_signal_and_exits_0(amqp_vhost, tmp_path, sig):
    # Given `agentjobs tail all --follow`, started with SIGINT ignored, consuming its copy queue
    env = _env(amqp_vhost.url("operator"), tmp_path)
    await declare_topology(amqp_vhost.amqp_url, load_settings(None, env))
    # When it gets SIGINT or SIGTERM
    code, said = await _exit_code_after(["tail", "all", "--follow"], env, sig,
                                        lambda line: line.startswith("tail: all from exchange"), "tail's ready line")
    # Then it stops cleanly (exit 0, as after Ctrl-C), without a traceback
    assert code == 0, said
    assert "Traceback" not in said


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
@pytest.mark.parametrize("command", ["trust", "bridge"])
async def test_service_with_sigint_ignored_stops_on_a_signal_and_exits_0(amqp_vhost, tmp_path, command, sig):
    # Given a service started with SIGINT ignored, running against the broker
    env = _env(amqp_vhost.url(command), tmp_path, AGENTJOBS_METRICS__PORT=str(free_port()))
    await declare_topology(amqp_vhost.amqp_url, load_settings(None, env))
    args, running = {"trust": (["trust"], '"trust_running"'),
                     "bridge": (["bridge", "--port", "0"], '"bridge_started"')}[command]
    # When it gets SIGINT or SIGTERM
    code, said = await _exit_code_after(args, env, sig, lambda line: running in line, f"{command}'s running line")
    # Then it stops cleanly with exit 0
    assert code == 0, said
    assert "Traceback" not in said
