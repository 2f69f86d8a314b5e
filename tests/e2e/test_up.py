"""`agentjobs up`, as a newcomer runs it: the whole product on one machine."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.services import free_port

pytestmark = pytest.mark.e2e
AGENTJOBS = str(Path(sys.executable).with_name("agentjobs"))


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
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
    assert "demo: 5 investigations for 301 notifications" in text
    assert "findings published to exchange agentjobs.results" in text
    assert "bridge: Alertmanager webhook at http://127.0.0.1:" in text
    assert "Traceback" not in text
    # no OpenBao, agent or dispatcher process outlives `up`, and no Vault-issued broker user survives
    vault_listen = env["AGENTJOBS_VAULT__ADDR"].removeprefix("http://")
    for pattern in (f"dev-listen-address={vault_listen}", "agentjobs agent", f"{tmp_path}"):
        assert subprocess.run(["pgrep", "-f", pattern], capture_output=True).returncode == 1, pattern
    assert not [u for u in await rabbitmq_management.list_users() if u.startswith("token-")]


def test_up_without_rabbitmq_says_how_to_get_one_and_exits_2(tmp_path):
    env = _env(tmp_path, AGENTJOBS_AMQP__URL="amqp://guest:guest@127.0.0.1:1/")
    done = subprocess.run([AGENTJOBS, "up"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:1/" in done.stdout + done.stderr
    assert "apt-get install rabbitmq-server" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
