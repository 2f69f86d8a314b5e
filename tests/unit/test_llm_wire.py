"""What a real model server sends, read leniently where nothing is lost (agent/reasoning/llm.py, pure parts).

The shapes are the ones llama.cpp's server (llama-cpp-python 0.3.36, Qwen2.5-Coder 0.5B) was seen sending:
tool calls written as fenced JSON in its own spelling of the function name, enum values capitalised, a second
object after the answer, event streams without usage, tool-call arguments in pieces.
"""

from __future__ import annotations

import json

from agent.reasoning.llm import json_values, parse_answer, read_stream, resolve_function, text_tool_calls

ROUTES = {"postgres__blocking_chains": ("postgres", "blocking_chains"),
          "postgres__connections": ("postgres", "connections"),
          "prometheus__query": ("prometheus", "query")}
ANSWER = {"summary": "s", "probable_cause": "p", "confidence": 0.4, "conclusion": "Inconclusive"}


def test_json_values_skip_prose_fences_and_read_each_object() -> None:
    assert json_values('Sure! ```json\n{"a": 1}\n``` and then {"b": [2]} trailing {broken') == [{"a": 1}, {"b": [2]}]
    assert json_values("no json here") == []


def test_an_answer_with_a_second_object_or_a_capitalised_enum_is_the_answer() -> None:
    answer, error = parse_answer(json.dumps(ANSWER) + '\n{"name": "postgres__connections"}')
    assert error == "" and answer is not None and answer.conclusion.value == "inconclusive"
    assert parse_answer("")[1] == "the answer is empty"
    prose, why = parse_answer("The cause is clearly {connections, checkout-api")
    assert prose is None and why.startswith("JSON is malformed")


def test_tool_calls_written_as_text_fenced_tagged_or_listed() -> None:
    [one] = text_tool_calls('```json\n{"name": "PostgresBlockingChains", "arguments": {}}\n```') or []
    assert (one.function.name, one.function.arguments) == ("PostgresBlockingChains", {})
    tagged = text_tool_calls('<tool_call>\n{"name": "prometheus__query", "arguments": {"query": "up"}}\n</tool_call>'
                             '<tool_call>{"name": "postgres__connections", "parameters": {}}</tool_call>') or []
    assert [c.function.name for c in tagged] == ["prometheus__query", "postgres__connections"]
    listed = text_tool_calls('[{"name": "a", "arguments": "{}"}, {"name": "b"}]') or []
    assert [c.function.name for c in listed] == ["a", "b"]
    assert text_tool_calls(json.dumps(ANSWER | {"name": "x"})) is None  # an answer is not a call
    assert text_tool_calls("the database is overloaded") is None


def test_a_function_name_in_the_models_own_spelling_resolves_only_when_unambiguous() -> None:
    assert resolve_function("PostgresBlockingChains", ROUTES) == ("postgres", "blocking_chains")
    assert resolve_function("postgres__connections", ROUTES) == ("postgres", "connections")
    assert resolve_function("terminate_backend", ROUTES) is None
    assert resolve_function("a_b", {"a__b": ("a", "b"), "ab": ("x", "y")}) is None


def test_an_event_stream_becomes_one_message_with_its_tool_calls_assembled() -> None:
    def event(delta: dict, finish: str | None = None) -> str:
        return "data: " + json.dumps({"model": "m", "choices": [{"index": 0, "delta": delta,
                                                                "finish_reason": finish}]}) + "\n\n"
    raw = "".join([
        ": keep-alive\n\n", event({"role": "assistant"}),
        event({"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "postgres__connections",
                                                                   "arguments": '{"a'}}]}),
        event({"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "postgres__connections",
                                                                   "arguments": '": 1}'}}]}),
        event({}, "tool_calls"), "data: [DONE]\n\n"]).encode()
    completion = read_stream(raw)
    [call] = completion.choices[0].message.tool_calls or []
    assert (call.id, call.function.name, call.function.arguments) == ("c1", "postgres__connections", '{"a": 1}')
    assert completion.usage is None and completion.choices[0].finish_reason == "tool_calls"
    text = read_stream((event({"content": "hel"}) + event({"content": "lo"}, "stop")).encode())
    assert text.choices[0].message.content == "hello" and text.choices[0].message.tool_calls is None
