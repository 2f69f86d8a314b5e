"""A scripted OpenAI-compatible chat-completions server: a test double speaking the real protocol.

``POST /v1/chat/completions`` answers each request with the next entry of a
script — an assistant message with ``tool_calls``, a final answer (valid or
not), an HTTP error, any of them slow — in the response shape of the OpenAI
API (``chat.completion`` object, ``choices[].message``, ``finish_reason``,
``usage``). Like the real API it rejects what a real server would: a wrong
API key (401), a body that is not JSON, a conversation whose ``tool``
messages do not answer the preceding ``tool_calls``, tools whose function
names or parameter schemas are invalid (400). Every accepted request body is
kept in ``requests`` so tests can assert on what the client sent.

Script entries are ``Reply`` objects or callables ``(request body) -> Reply``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
ROLES = {"system", "user", "assistant", "tool", "developer"}
UNANSWERED = ("An assistant message with 'tool_calls' must be followed by tool messages responding to each "
              "'tool_call_id'.")


@dataclass(frozen=True, kw_only=True)
class Reply:
    """One scripted response."""

    status: int = 200
    message: dict[str, Any] | None = None  # the assistant message (status 200)
    finish_reason: str = "stop"
    usage: tuple[int, int] | None = (100, 20)  # (prompt, completion) tokens; None: no usage field
    delay: float = 0.0  # seconds before answering (a slow model)
    error: str = ""  # error message (status != 200)
    model: str = ""  # model reported back; empty: the requested one


def answer(content: str | dict[str, Any], *, usage: tuple[int, int] | None = (400, 120), delay: float = 0.0) -> Reply:
    """A final assistant message; a dict is sent as its JSON text."""
    text = content if isinstance(content, str) else json.dumps(content)
    return Reply(message={"role": "assistant", "content": text}, usage=usage, delay=delay)


def tool_calls(*calls: tuple[str, dict[str, Any] | str], usage: tuple[int, int] | None = (300, 40),
               content: str | None = None, delay: float = 0.0) -> Reply:
    """An assistant message calling functions; arguments as a dict (encoded) or a raw string."""
    out = [{"id": f"call_{i}_{name[:20]}", "type": "function",
            "function": {"name": name, "arguments": args if isinstance(args, str) else json.dumps(args)}}
           for i, (name, args) in enumerate(calls)]
    return Reply(message={"role": "assistant", "content": content, "tool_calls": out}, finish_reason="tool_calls",
                 usage=usage, delay=delay)


def error(status: int, message: str = "The server had an error while processing your request.") -> Reply:
    return Reply(status=status, error=message)


class ScriptedOpenAI:
    """The server; ``async with ScriptedOpenAI(script) as server: server.base_url``."""

    def __init__(self, script: Iterable[Reply | Callable[[dict[str, Any]], Reply]], *,
                 api_key: str | None = None) -> None:
        self._script = iter(script)
        self._api_key = api_key
        self._ids = itertools.count(1)
        self._stopping = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.requests: list[dict[str, Any]] = []  # accepted request bodies, in order
        self.rejected: list[tuple[int, str]] = []  # (status, message) of requests refused
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def __aenter__(self) -> ScriptedOpenAI:
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._completions)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stopping.set()  # slow replies end now
        if self._runner is not None:
            await self._runner.cleanup()

    def _refuse(self, status: int, message: str, kind: str = "invalid_request_error",
                code: str | None = None) -> web.Response:
        self.rejected.append((status, message))
        return web.json_response({"error": {"message": message, "type": kind, "param": None, "code": code}},
                                 status=status)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        if self._api_key is not None and request.headers.get("Authorization") != f"Bearer {self._api_key}":
            # Like OpenAI, the message echoes the (short) key it was given.
            given = request.headers.get("Authorization", "").removeprefix("Bearer ")
            return self._refuse(401, f"Incorrect API key provided: {given}. You can find your API key at "
                                     "https://platform.openai.com/account/api-keys.", code="invalid_api_key")
        try:
            body = await request.json()
        except ValueError:
            return self._refuse(400, "We could not parse the JSON body of your request.")
        if (problem := validate(body)) is not None:
            return self._refuse(400, problem)
        self.requests.append(body)
        entry = next(self._script, None)
        if entry is None:
            return self._refuse(500, "scripted server: script exhausted", kind="server_error")
        reply = entry(body) if callable(entry) else entry
        if reply.delay:
            try:
                await asyncio.wait_for(self._stopping.wait(), reply.delay)
            except TimeoutError:
                pass
        if reply.status != 200:
            kind = "rate_limit_error" if reply.status == 429 else "server_error"
            return self._refuse(reply.status, reply.error, kind=kind)
        out: dict[str, Any] = {
            "id": f"chatcmpl-scripted-{next(self._ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": reply.model or body["model"],
            "system_fingerprint": "fp_scripted",
            "choices": [{"index": 0, "message": reply.message or {"role": "assistant", "content": ""},
                         "logprobs": None, "finish_reason": reply.finish_reason}],
        }
        if reply.usage is not None:
            prompt, completion = reply.usage
            out["usage"] = {"prompt_tokens": prompt, "completion_tokens": completion,
                            "total_tokens": prompt + completion}
        if body.get("stream"):
            return await self._stream(request, out)
        return web.json_response(out)

    async def _stream(self, request: web.Request, whole: dict[str, Any]) -> web.StreamResponse:
        """The same answer as ``chat.completion.chunk`` server-sent events, the way OpenAI streams: a role
        chunk, content in pieces, each tool call's name first and its arguments in pieces, the finish
        reason, then usage in a chunk without choices (when ``stream_options.include_usage``), then [DONE]."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        base = {k: whole[k] for k in ("id", "created", "model", "system_fingerprint")} | {
            "object": "chat.completion.chunk"}
        message, finish = whole["choices"][0]["message"], whole["choices"][0]["finish_reason"]

        async def send(delta: dict[str, Any], finish_reason: str | None = None) -> None:
            chunk = base | {"choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())

        await send({"role": "assistant", "content": ""})
        text = message.get("content") or ""
        for i in range(0, len(text), 7):
            await send({"content": text[i:i + 7]})
        for index, call in enumerate(message.get("tool_calls") or ()):
            await send({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                        "function": {"name": call["function"]["name"], "arguments": ""}}]})
            args = call["function"]["arguments"]
            for i in range(0, len(args), 5):
                await send({"tool_calls": [{"index": index, "function": {"arguments": args[i:i + 5]}}]})
        await send({}, finish)
        if "usage" in whole and (self.requests[-1].get("stream_options") or {}).get("include_usage"):
            await response.write(f"data: {json.dumps(base | {'choices': [], 'usage': whole['usage']})}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def validate(body: Any) -> str | None:
    """What the real API would reject about this request body, or None."""
    if not isinstance(body, dict):
        return "The request body must be a JSON object."
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "you must provide a model parameter"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "Invalid 'messages': empty array. Expected an array with minimum length 1."
    open_calls: set[str] = set()
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            return f"Invalid value for 'messages[{i}].role'."
        if m["role"] == "tool":
            if m.get("tool_call_id") not in open_calls:
                return ("Invalid parameter: messages with role 'tool' must be a response to a preceeding "
                        "message with 'tool_calls'.")
            open_calls.discard(m["tool_call_id"])
            continue
        if open_calls:
            return UNANSWERED
        if m["role"] == "assistant" and m.get("tool_calls"):
            open_calls = {c.get("id") for c in m["tool_calls"]}
        elif not isinstance(m.get("content"), str | list):
            return f"Invalid type for 'messages[{i}].content': expected a string."
    if open_calls:
        return UNANSWERED
    for i, tool in enumerate(body.get("tools") or []):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or tool.get("type") != "function":
            return f"Invalid value for 'tools[{i}].type'."
        if not FUNCTION_NAME.match(str(fn.get("name", ""))):
            return f"Invalid 'tools[{i}].function.name': string does not match pattern '^[a-zA-Z0-9_-]+$'."
        params = fn.get("parameters", {})
        if not isinstance(params, dict) or params.get("type", "object") != "object":
            return f"Invalid schema for function '{fn.get('name')}': schema must be of 'type: \"object\"'."
    return None
