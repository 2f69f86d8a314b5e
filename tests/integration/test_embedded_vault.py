"""The embedded OpenBao of `agentjobs up`: its root token is never where another local user can read it."""

from __future__ import annotations

import stat

import aiohttp
import pytest

from dispatcher.credentials.embedded_openbao import EmbeddedOpenBao
from tests.support.services import free_port

pytestmark = pytest.mark.integration


async def test_the_root_token_is_neither_on_the_command_line_nor_in_a_readable_log(tmp_path):
    bao = EmbeddedOpenBao(tmp_path / "openbao", f"http://127.0.0.1:{free_port()}")
    await bao.start()
    try:
        pid = bao._proc.pid
        cmdline = (await _read(f"/proc/{pid}/cmdline")).replace(b"\0", b" ")
        # Then `ps` shows no root token, the log that holds it is the owner's alone
        assert bao.root_token.encode() not in cmdline, cmdline
        log = tmp_path / "openbao" / "openbao.log"
        assert stat.S_IMODE(log.stat().st_mode) == 0o600
        assert stat.S_IMODE((tmp_path / "openbao").stat().st_mode) == 0o700
        # and the token still is the server's root token
        async with aiohttp.ClientSession() as http, \
                http.get(f"{bao.addr}/v1/auth/token/lookup-self", headers={"X-Vault-Token": bao.root_token}) as r:
            assert r.status == 200
            assert (await r.json())["data"]["policies"] == ["root"]
    finally:
        bao.stop_now()


async def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
