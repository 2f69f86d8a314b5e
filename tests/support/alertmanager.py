"""A private Prometheus Alertmanager (Debian's ``prometheus-alertmanager``) for end-to-end tests.

Sends its webhook to a bridge on ``127.0.0.1:<bridge_port>/alerts`` with bearer auth,
groups by ``alertname`` with short waits; clustering is off so it is ready at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from .services import free_port, wait_until

ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
MISSING = "Alertmanager binary not found (install the Debian package prometheus-alertmanager; .ci/run does)"


class Alertmanager:
    """A private Alertmanager process: own config, storage, port; clustering off."""

    def __init__(self, workdir: Path, bridge_port: int, *, token: str, receiver: str = "agentjobs") -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "alertmanager.log"
        self.config_path = workdir / "alertmanager.yml"
        # JSON is YAML: no PyYAML needed, and quoting is exact.
        config = {
            "route": {
                "receiver": receiver,
                "group_by": ["alertname"],
                "group_wait": "1s",
                "group_interval": "2s",
                "repeat_interval": "1h",
            },
            "receivers": [{
                "name": receiver,
                "webhook_configs": [{
                    "url": f"http://127.0.0.1:{bridge_port}/alerts",
                    "send_resolved": True,
                    "http_config": {"authorization": {"type": "Bearer", "credentials": token}},
                }],
            }],
        }
        self.config_path.write_text(json.dumps(config, indent=2))
        self._proc: subprocess.Popen[bytes] | None = None

    def _spawn(self) -> None:
        storage = self.workdir / "data"
        storage.mkdir(exist_ok=True)
        argv = [
            str(ALERTMANAGER),
            f"--config.file={self.config_path}",
            f"--storage.path={storage}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--cluster.listen-address=",  # no gossip: no port 9094, ready at once
            "--log.level=debug",
        ]
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          cwd=self.workdir, start_new_session=True)

    async def start(self, timeout: float = 15.0) -> None:
        await asyncio.to_thread(self._spawn)

        async def ready() -> bool:
            if self._proc is not None and self._proc.poll() is not None:
                raise AssertionError(f"alertmanager exited early:\n{self.log_tail()}")
            try:
                async with (
                    aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http,
                    http.get(f"{self.url}/-/ready") as resp,
                ):
                    return resp.status == 200
            except (aiohttp.ClientError, TimeoutError):
                return False

        await wait_until(ready, timeout=timeout, what=f"Alertmanager /-/ready at {self.url}")

    def stop(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._proc = None

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    async def post_alerts(self, alerts: list[dict[str, Any]]) -> None:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
            http.post(f"{self.url}/api/v2/alerts", json=alerts) as resp,
        ):
            assert resp.status == 200, await resp.text()

    async def metric(self, name: str) -> float:
        """Sum of `name` over the webhook integration's series (0 when absent)."""
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
            http.get(f"{self.url}/metrics") as resp,
        ):
            text = await resp.text()
        total = 0.0
        for match in re.finditer(rf"^{re.escape(name)}\{{([^}}]*)\}} (\S+)$", text, re.MULTILINE):
            if 'integration="webhook"' in match.group(1):
                total += float(match.group(2))
        return total


@contextlib.asynccontextmanager
async def running_alertmanager(
    workdir: Path, bridge_port: int, *, token: str, receiver: str = "agentjobs",
) -> AsyncIterator[Alertmanager]:
    workdir.mkdir(parents=True, exist_ok=True)
    am = Alertmanager(workdir, bridge_port, token=token, receiver=receiver)
    try:
        await am.start()
        yield am
    finally:
        await asyncio.to_thread(am.stop)
