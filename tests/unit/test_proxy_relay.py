"""A llama-server worker's translations, on answers llama-server gave (recorded from the llama-server the tests
build): what it forwards, how answers and streams come back in the embedded worker's shape, `/execute` events."""

from __future__ import annotations

from rbee_tui.worker.openai_check import check_chat, check_completion
from rbee_tui.worker.params import CHAT, COMPLETIONS, SERVER
from rbee_tui.worker.relay import Answers, Tokens, execute_body, openai_body, upstream_error
from rbee_tui.worker.schema import INT_LIMIT

ASK = [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


def _chat(body: dict) -> dict:
    return openai_body(check_chat(body, 2048, True, SERVER), body)


def test_every_sampling_parameter_is_spelled_out() -> None:
    # Both engines sample with the worker's defaults, not llama-server's own (temperature 0.8, top_p 0.95).
    out = _chat({"messages": ASK, "user": "u", "metadata": {"k": "v"}})
    assert out["temperature"] == 1.0 and out["top_p"] == 1.0 and out["top_k"] == 40 and out["min_p"] == 0.05
    assert out["max_tokens"] == 2048 and "seed" not in out and "stop" not in out
    assert out["messages"] == [{"role": "user", "content": "Hi\nthere"}]  # checked and normalised
    assert "user" not in out and "metadata" not in out  # ignored parameters stay here
    # Always streamed, usage and all (a stream is what llama-server stops when the worker closes it).
    assert out["stream"] is True and out["stream_options"] == {"include_usage": True}
    text = openai_body(check_completion({"prompt": ["Hello"]}, 512, SERVER), {})
    assert text["prompt"] == "Hello" and text["max_tokens"] == 16 and text["stream"] is True
    passed = {"messages": ASK, "logprobs": True, "top_logprobs": 2, "logit_bias": {"5": -100}}
    assert {k: _chat(passed)[k] for k in ("logprobs", "top_logprobs", "logit_bias")} == {
        "logprobs": True,
        "top_logprobs": 2,
        "logit_bias": {"5": -100},
    }


def test_a_named_tool_choice_becomes_one_required_call() -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    out = _chat({"messages": ASK, "tools": [WEATHER, TIME], "tool_choice": named})
    assert out["tools"] == [TIME] and out["tool_choice"] == "required" and out["parallel_tool_calls"] is False
    auto = _chat({"messages": ASK, "tools": [WEATHER, TIME]})
    assert auto["tools"] == [WEATHER, TIME] and auto["tool_choice"] == "auto"


def test_integer_bounds_go_two_sided() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 105}}}
    out = _chat({"messages": ASK, "response_format": {"type": "json_schema", "json_schema": {"schema": schema}}})
    sent = out["response_format"]["json_schema"]["schema"]
    assert sent["properties"]["n"] == {"type": "integer", "minimum": 105, "maximum": INT_LIMIT}


def test_execute_asks_for_a_clean_cache_and_token_ids() -> None:
    from rbee_tui.worker.requests import build_request

    body = execute_body(build_request({"prompt": "Hi", "max_tokens": 5, "seed": 3}, 512, openai=False))
    assert body["n_predict"] == 5 and body["seed"] == 3 and body["temperature"] == 0.0
    assert body["cache_prompt"] is False and body["return_tokens"] is True and body["stream"] is True


def test_errors_in_the_workers_words() -> None:
    context = (
        b'{"error":{"code":400,"message":"request (12002 tokens) exceeds the available context size (2048 tokens)",'
    )
    context += b'"type":"exceed_context_size_error","n_prompt_tokens":12002,"n_ctx":2048}}'
    err = upstream_error(400, context)
    assert str(err) == "the prompt is 12002 tokens; the context holds 2048" and err.status == 400
    other = upstream_error(500, b'{"error":{"code":500,"message":"The model produced output\\nthat does not match"}}')
    assert other.status == 500 and str(other) == "The model produced output that does not match"
    assert upstream_error(502, b"").status == 502


def test_a_whole_answer_in_the_embedded_shape() -> None:
    doc = {
        "choices": [
            {
                "finish_reason": "tool_calls",
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {"type": "function", "function": {"name": "get_time", "arguments": "{}"}, "id": "Xu"}
                    ],
                },
            }
        ],
        "created": 1795482452,
        "model": "/tmp/tiny-tools.gguf",
        "system_fingerprint": "b0-unknown",
        "object": "chat.completion",
        "usage": {"completion_tokens": 48, "prompt_tokens": 634, "total_tokens": 682, "prompt_tokens_details": {}},
        "id": "chatcmpl-cNS8",
        "timings": {"prompt_n": 620},
    }
    out = Answers(CHAT, "chatcmpl-ours", "tiny-tools").answer(doc)
    assert set(out) == {"id", "object", "created", "model", "choices", "usage"}
    assert out["id"] == "chatcmpl-ours" and out["model"] == "tiny-tools" and out["created"] == 1795482452
    message = out["choices"][0]["message"]
    assert message["content"] is None and message["tool_calls"][0]["id"].startswith("call_")
    assert out["usage"] == {"prompt_tokens": 634, "completion_tokens": 48, "total_tokens": 682}
    assert out["choices"][0]["logprobs"] is None


def test_a_whole_answer_from_a_stream() -> None:
    # A tool call streamed the way llama-server streams it: the name first, the arguments in pieces.
    head = {"created": 7, "model": "x", "object": "chat.completion.chunk", "id": "theirs"}
    deltas = [
        {"role": "assistant", "content": None},
        {
            "tool_calls": [
                {"index": 0, "id": "a1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
            ]
        },
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"city"'}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": ':"Rome"}'}}]},
    ]
    chunks = [{**head, "choices": [{"index": 0, "finish_reason": None, "delta": d}]} for d in deltas]
    chunks.append({**head, "choices": [{"index": 0, "finish_reason": "tool_calls", "delta": {}}]})
    chunks.append({**head, "choices": [], "usage": {"completion_tokens": 9, "prompt_tokens": 50, "total_tokens": 59}})
    out = Answers(CHAT, "chatcmpl-ours", "m").whole(chunks)
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["logprobs"] is None
    assert choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city":"Rome"}'} and call["id"].startswith(
        "call_"
    )
    assert out["usage"] == {"prompt_tokens": 50, "completion_tokens": 9, "total_tokens": 59} and out["created"] == 7
    text = [{"choices": [{"index": 0, "text": t, "finish_reason": f}]} for t, f in (("Hel", None), ("lo", "length"))]
    assert Answers(COMPLETIONS, "cmpl-x", "m").whole(text)["choices"][0] == {
        "index": 0,
        "finish_reason": "length",
        "logprobs": None,
        "text": "Hello",
    }


def test_a_completion_stream_ends_with_a_usage_chunk_of_its_own() -> None:
    head = {"created": 1, "model": "x", "object": "text_completion", "id": "chatcmpl-theirs"}
    chunks = [
        {**head, "choices": [{"text": ";", "index": 0, "logprobs": None, "finish_reason": None}]},
        {
            **head,
            "choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": "length"}],
            "usage": {"completion_tokens": 3, "prompt_tokens": 3, "total_tokens": 6},
            "timings": {},
        },
    ]
    for include in (True, False):
        answers = Answers(COMPLETIONS, "cmpl-ours", "m", include_usage=include)
        out = [answers.chunk(c) for c in chunks]
        assert all(c is not None and c["id"] == "cmpl-ours" and "timings" not in c for c in out)
        assert [c.get("usage", "absent") for c in out if c] == ([None, None] if include else ["absent", "absent"])
        last = answers.last()
        assert (last is not None) == include
        if last is not None:
            assert last["choices"] == [] and last["usage"] == {
                "prompt_tokens": 3,
                "completion_tokens": 3,
                "total_tokens": 6,
            }


def test_a_chat_stream_starts_with_empty_content_and_keeps_call_ids() -> None:
    answers = Answers(CHAT, "chatcmpl-ours", "m")
    first = answers.chunk({"choices": [{"index": 0, "delta": {"role": "assistant", "content": None}}]})
    assert first is not None and first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    call = {"index": 0, "id": "abc", "type": "function", "function": {"name": "f", "arguments": ""}}
    a = answers.chunk({"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]})
    b = answers.chunk({"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]})
    assert a is not None and b is not None
    assert a["choices"][0]["delta"]["tool_calls"][0]["id"] == b["choices"][0]["delta"]["tool_calls"][0]["id"]
    assert answers.chunk({"choices": [], "usage": {"prompt_tokens": 1}}) is None  # sent by last(), if asked


def test_one_token_event_per_generated_token() -> None:
    # llama-server holds the first bytes of 🐝 (tokens 1-3) and sends the character with the 4th token; the
    # limit (13) cut the next character after its first byte, which it never sends.
    tokens = Tokens()
    stream = [
        {"content": "🐝", "tokens": [160], "stop": False, "tokens_predicted": 4, "tokens_evaluated": 9},
        {"content": "é", "tokens": [172], "stop": False, "tokens_predicted": 6, "tokens_evaluated": 9},
        {"content": "", "tokens": [], "stop": True, "stop_type": "limit", "tokens_predicted": 7, "tokens_evaluated": 9},
    ]
    events = [e for doc in stream for e in tokens.feed(doc)]
    assert events == [("", None), ("", None), ("", None), ("🐝", 160), ("", None), ("é", 172), ("", None)]
    summary = tokens.summary(cancelled=False)
    assert summary.tokens_generated == 7 and summary.text == "🐝é" and summary.prompt_tokens == 9
    assert summary.finish_reason == "length"


def test_the_end_of_generation_token_is_not_an_event() -> None:
    # The end-of-generation token comes as an empty piece; only the final chunk says it was one.
    eos = Tokens()
    for doc in (
        {"content": "x", "tokens": [347], "stop": False, "tokens_predicted": 1},
        {"content": "", "tokens": [2], "stop": False, "tokens_predicted": 2},
        {"content": "", "stop": True, "stop_type": "eos", "tokens_predicted": 2},
    ):
        eos.feed(doc)
    assert eos.pieces == ["x"] and eos.summary(cancelled=False).finish_reason == "stop"
    # An empty piece followed by more is a token like any other (a stop string held back, say).
    held = Tokens()
    for doc in (
        {"content": "", "tokens": [5], "stop": False, "tokens_predicted": 1},
        {"content": "y", "tokens": [6], "stop": False, "tokens_predicted": 2},
    ):
        held.feed(doc)
    assert held.pieces == ["", "y"]
    assert held.summary(cancelled=True).finish_reason == "cancelled"
