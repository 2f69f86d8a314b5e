"""The real server speaks the OpenAI chat-completions protocol the ``llm`` reasoner uses.

The model is small: these assert the protocol (shapes, usage, streaming), never what it decides.
"""

from __future__ import annotations

import json

import aiohttp
import pytest

from tests.support.llm_server import LlamaServer

# the first test's setup may build llama.cpp (minutes on two cores): beyond the 300 s default
pytestmark = [pytest.mark.llm, pytest.mark.timeout(3600)]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name"}},
            "required": ["city"],
        },
    },
}
TIMEOUT = aiohttp.ClientTimeout(total=240)
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant. Use tools when they help."},
    {"role": "user", "content": "What is the weather in Paris right now?"},
]


async def test_server_reports_its_model(llama_server: LlamaServer) -> None:
    async with aiohttp.ClientSession() as http, http.get(f"{llama_server.base_url}/models") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert [m["id"] for m in body["data"]] == [llama_server.model]


async def test_chat_completion_with_tools(llama_server: LlamaServer) -> None:
    request = {"model": llama_server.model, "messages": MESSAGES, "tools": [WEATHER_TOOL],
               "tool_choice": "auto", "max_tokens": 128, "temperature": 0}
    async with (aiohttp.ClientSession(timeout=TIMEOUT) as http,
                http.post(f"{llama_server.base_url}/chat/completions", json=request) as resp):
        assert resp.status == 200, await resp.text()
        body = await resp.json()
    assert body["object"] == "chat.completion"
    (choice,) = body["choices"]
    message = choice["message"]
    assert message["role"] == "assistant"
    calls = message.get("tool_calls") or []
    assert calls or message.get("content"), body
    for call in calls:  # whatever it called, it is shaped like an OpenAI tool call
        assert call["type"] == "function"
        assert isinstance(call["id"], str) and call["id"]
        assert isinstance(call["function"]["name"], str)
        assert isinstance(call["function"]["arguments"], str)
    assert choice["finish_reason"] in {"stop", "length", "tool_calls"}
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0
    assert usage["completion_tokens"] >= 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_streaming_chat_completion(llama_server: LlamaServer) -> None:
    request = {"model": llama_server.model, "stream": True, "max_tokens": 32, "temperature": 0,
               "messages": [{"role": "user", "content": "Say hello in one short sentence."}]}
    chunks = []
    done = False
    async with (aiohttp.ClientSession(timeout=TIMEOUT) as http,
                http.post(f"{llama_server.base_url}/chat/completions", json=request) as resp):
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                done = True
                break
            chunks.append(json.loads(data))
    assert chunks, "no chunk streamed"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all("delta" in c["choices"][0] for c in chunks if c["choices"])
    assert done, "stream did not end with [DONE]"
