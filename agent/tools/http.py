"""What the tools that speak JSON over HTTP share: one session, headers, secrets, a capped read.

``PrometheusTool`` and ``LogsTool`` differ in their API and their answers, not
in how they reach it: each talks to one base URL with optional extra headers
(``Authorization`` values are secrets, masked in every answer), opens its
session on first use, reads at most ``Limits.max_bytes`` of an answer within
``Limits.timeout``, and closes its session with the toolbox.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import aiohttp

from .base import Limits, OperationSpec
from .toolbox import clock_or_default, read_capped


def number(text: Any) -> float:
    """A JSON/PromQL number as a float; NaN for anything else."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


class HttpTool:
    """Base of one HTTP API tool; subclasses set ``name`` and ``OPERATIONS`` and implement ``run``."""

    name: ClassVar[str]
    credential_domain: ClassVar[str | None] = None
    OPERATIONS: ClassVar[Mapping[str, OperationSpec]]

    def __init__(self, base_url: str, *, limits: Limits | None = None,
                 headers: Mapping[str, str] | None = None, now: Callable[[], float] | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.limits = limits or Limits()
        self._headers = dict(headers or {})
        self._now = clock_or_default(now)
        self._session: aiohttp.ClientSession | None = None

    @property
    def _secrets(self) -> list[str]:
        """Credentials in our headers: never shown in an observation."""
        return [v.split(" ", 1)[-1] for k, v in self._headers.items() if k.lower() == "authorization"]

    def operations(self) -> Mapping[str, OperationSpec]:
        return self.OPERATIONS

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _fetch(self, method: str, path: str, **request: Any) -> tuple[int, bytes]:
        """(status, body) of one request to ``base_url + path``; raises ``BodyTooLarge``, aiohttp errors."""
        if self._session is None:
            self._session = aiohttp.ClientSession(headers=self._headers)
        async with self._session.request(method, self.base_url + path,
                                         timeout=aiohttp.ClientTimeout(total=self.limits.timeout),
                                         **request) as resp:
            return resp.status, await read_capped(resp, self.limits.max_bytes)
