"""Real HTTP endpoint problems on a local aiohttp server (tests/support/endpoints.py FlakyService):
nothing listening (refused), 503 answers, and slow answers.

The agent's http probe may GET only under the operator's targets (``AGENTJOBS_TOOLS__HTTP_TARGETS``):
each problem allows exactly its service's base URL.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from agent.tools.base import Limits, Tool
from tests.scenarios.harness import Sources
from tests.support.endpoints import FlakyService
from tests.support.services import free_port

SLOW_S = 2.5  # how long /svc/slow takes to answer (the probe's own timeout is 5 s)
LIMITS = Limits(timeout=5, max_rows=50, max_bytes=64 * 1024)


@contextlib.asynccontextmanager
async def flaky_service() -> AsyncIterator[FlakyService]:
    """The http group's world: one real service whose routes misbehave."""
    async with FlakyService(slow_s=SLOW_S) as service:
        yield service


def _probe(base: str) -> Any:
    async def tools() -> list[Tool]:
        from agent.tools.probe import ProbeTool

        return [ProbeTool([f"{base}/"], limits=LIMITS)]

    return tools


@contextlib.asynccontextmanager
async def refused(_: Any) -> AsyncIterator[Sources]:
    """The checkout web process died: nothing listens on its port any more."""
    port = free_port()  # bound and released: nothing listens there
    base = f"http://127.0.0.1:{port}"
    yield Sources(tools=_probe(base), facts={"instance": f"127.0.0.1:{port}", "url": f"{base}/svc/ok",
                                             "base": base})


@contextlib.asynccontextmanager
async def server_errors(service: FlakyService) -> AsyncIterator[Sources]:
    """The payments endpoint answers 503: its upstream database is unavailable."""
    yield Sources(tools=_probe(service.base), facts={"instance": service.target, "url": service.url("fail"),
                                                     "base": service.base})


@contextlib.asynccontextmanager
async def slow_answers(service: FlakyService) -> AsyncIterator[Sources]:
    """The search endpoint answers, correctly, after 2.5 s."""
    yield Sources(tools=_probe(service.base), facts={"instance": service.target, "url": service.url("slow"),
                                                     "base": service.base})
