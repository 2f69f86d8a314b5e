"""A RabbitMQ node of the test's own, for faults that take a whole broker down.

The machine's broker is shared with every test tier; ``rabbitmqctl stop_app`` on
it would stop everyone's messages. This starts a second node from the same
Debian installation — own node name, ports, data, log and Erlang cookie under
a temporary directory, loopback only, no plugins — and stops it afterwards
whatever happened. Starting takes about 5 s here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

SBIN = Path("/usr/lib/rabbitmq/bin")


def available() -> str | None:
    """None if a private node can be started here, else why not."""
    if not (SBIN / "rabbitmq-server").exists() or not (SBIN / "rabbitmqctl").exists():
        return f"no RabbitMQ installation in {SBIN}"
    if os.geteuid() != 0 and not os.access(SBIN / "rabbitmq-server", os.X_OK):
        return "cannot run rabbitmq-server"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PrivateNode:
    name: str
    port: int
    home: Path
    env: dict[str, str]
    management_port: int = 0  # 0: started without the management plugin

    @property
    def amqp_url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def management_url(self) -> str:
        """The management API (only with ``private_rabbitmq(management=True)``)."""
        return f"http://127.0.0.1:{self.management_port}" if self.management_port else ""

    async def ctl(self, *args: str, timeout: float = 60.0) -> str:
        proc = await asyncio.create_subprocess_exec(
            str(SBIN / "rabbitmqctl"), "-n", self.name, *args, env=self.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed ({proc.returncode}): {out.decode()[-2000:]}")
        return out.decode()

    async def stop_app(self) -> None:
        """Stop the RabbitMQ application (every connection is closed); the Erlang node stays."""
        await self.ctl("stop_app")

    async def start_app(self) -> None:
        await self.ctl("start_app")
        await self.ctl("await_startup")


async def _started(node: PrivateNode, server: subprocess.Popen[bytes], *, timeout: float) -> None:
    """Until the node answers ``await_startup`` (it fails at once while the node is not registered yet)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            await node.ctl("await_startup", timeout=timeout)
            return
        except RuntimeError as exc:
            if server.poll() is not None or asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(f"private RabbitMQ node did not start: {exc}; "
                                   f"log: {(node.home / 'server.log').read_text()[-2000:]}") from exc
        await asyncio.sleep(0.5)


async def _grant_identities(node: PrivateNode) -> None:
    """Every component identity on the node, as ``temporary_vhost`` gives each test vhost (one call:
    the node has no management API)."""
    import json

    from tests.support.identities import definitions_with_passwords

    path = node.home / "identities.json"
    path.write_text(json.dumps(definitions_with_passwords("/")))
    await node.ctl("import_definitions", str(path))


@contextlib.asynccontextmanager
async def private_rabbitmq(prefix: str = "agentjobs-chaos", *, management: bool = False
                          ) -> AsyncIterator[PrivateNode]:
    """Start a private node (with the management plugin on a loopback port if asked); stop it (and
    everything it wrote) when the block ends."""
    home = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
    port, dist_port = _free_port(), _free_port()
    management_port = _free_port() if management else 0
    name = f"{prefix}-{port}@localhost"
    conf = f"listeners.tcp.local = 127.0.0.1:{port}\n"
    if management:
        conf += f"management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {management_port}\n"
    (home / "rabbitmq.conf").write_text(conf)
    (home / "enabled_plugins").write_text("[rabbitmq_management].\n" if management else "[].\n")
    (home / "env.conf").write_text("")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),  # HOME: its own Erlang cookie
        "RABBITMQ_NODENAME": name, "RABBITMQ_CONF_ENV_FILE": str(home / "env.conf"),
        "RABBITMQ_CONFIG_FILE": str(home / "rabbitmq.conf"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(home / "enabled_plugins"),
        "RABBITMQ_MNESIA_BASE": str(home / "mnesia"), "RABBITMQ_LOG_BASE": str(home / "log"),
        "RABBITMQ_PID_FILE": str(home / "pid"), "RABBITMQ_PLUGINS_EXPAND_DIR": str(home / "plugins"),
        "RABBITMQ_DIST_PORT": str(dist_port), "ERL_EPMD_ADDRESS": "127.0.0.1",
        "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
    }
    node = PrivateNode(name=name, port=port, home=home, env=env, management_port=management_port)
    log = open(home / "server.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen([str(SBIN / "rabbitmq-server")], env=env, stdout=log, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        await _started(node, server, timeout=90)
        await _grant_identities(node)
        yield node
    finally:
        with contextlib.suppress(Exception):
            await node.ctl("stop", timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)  # whatever is left of its process group
        server.wait(timeout=30)
        log.close()
        shutil.rmtree(home, ignore_errors=True)
