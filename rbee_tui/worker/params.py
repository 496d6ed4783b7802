"""The OpenAI request parameters, one row each: what a worker does with it, on either engine.

A worker takes a parameter only if its row says so: a supported one is honoured, one listed as harmless to
ignore is accepted and ignored, and anything else (a refused row or a name not in the table) is a 400 that
names it. A llama-server worker checks requests against the same table (its own column, which differs only
where llama-server does more), so a client meets one API. docs/openai.md shows this table;
tests/unit/test_openai_params.py keeps the two the same.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from rbee_tui.worker.client import ENGINE_EMBEDDED as EMBEDDED
from rbee_tui.worker.client import ENGINE_SERVER as SERVER

SUPPORTED = "supported"
REFUSED = "refused"
IGNORED = "ignored"
CHAT = "chat"
COMPLETIONS = "completions"
ROUTES = {CHAT: "/v1/chat/completions", COMPLETIONS: "/v1/completions"}

_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Rome"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


# Where the engines differ, llama-server does more and the note says so: a refusal quotes it.
_LOGPROBS = "only the llama-server engine computes token log probabilities"


@dataclass(frozen=True)
class Param:
    """One request parameter of one route, as the embedded worker and llama-server treat it."""

    name: str
    route: str
    status: str  # the embedded worker: SUPPORTED, REFUSED (400) or IGNORED (accepted, harmless)
    server: str  # a llama-server worker (rbee-worker in front of llama-server): the same unless it does more
    note: str
    example: dict[str, Any]  # the fields of a request that uses it (walked by the tests)
    neutral: tuple[Any, ...] = ()  # values of a refused parameter that ask for nothing, so are accepted


def _p(
    name: str,
    route: str,
    status: str,
    server: str,
    note: str,
    example: Any,
    neutral: tuple[Any, ...] = (),
    extra: dict[str, Any] | None = None,
) -> Param:
    return Param(name, route, status, server, note, {name: example, **(extra or {})}, neutral)


def _both(name: str, status: str, server: str, note: str, example: Any, neutral: tuple[Any, ...] = ()) -> list[Param]:
    return [_p(name, route, status, server, note, example, neutral) for route in (CHAT, COMPLETIONS)]


PARAMS: tuple[Param, ...] = (
    # -- /v1/chat/completions ------------------------------------------------------------------------------
    _p(
        "messages",
        CHAT,
        SUPPORTED,
        SUPPORTED,
        "string content or text parts (joined with newlines); image, audio and file parts: 400",
        [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
    ),
    _p("audio", CHAT, REFUSED, REFUSED, "no audio output", {"voice": "alloy", "format": "wav"}, (None,)),
    _p("function_call", CHAT, REFUSED, REFUSED, "deprecated: use tool_choice", "auto", (None,)),
    _p("functions", CHAT, REFUSED, REFUSED, "deprecated: use tools", [_TOOL["function"]], (None,)),
    _p("logprobs", CHAT, REFUSED, SUPPORTED, _LOGPROBS, True, (None, False)),
    _p("max_completion_tokens", CHAT, SUPPORTED, SUPPORTED, "default: the rest of the context", 8),
    _p("metadata", CHAT, IGNORED, IGNORED, "nothing is stored", {"k": "v"}),
    _p("modalities", CHAT, SUPPORTED, SUPPORTED, 'only ["text"]; "audio" is a 400', ["text"]),
    _p("n", CHAT, SUPPORTED, SUPPORTED, "1 only; more choices is a 400", 1),
    _p("parallel_tool_calls", CHAT, SUPPORTED, SUPPORTED, "false: at most one tool call", False),
    _p("prediction", CHAT, REFUSED, REFUSED, "no predicted outputs", {"type": "content", "content": "x"}, (None,)),
    _p(
        "prompt_cache_key",
        CHAT,
        IGNORED,
        IGNORED,
        "both start each request from a clean cache (the proxy turns llama-server's prompt cache off)",
        "k",
    ),
    _p("reasoning_effort", CHAT, SUPPORTED, SUPPORTED, "passed to the chat template, as llama-server does", "low"),
    _p(
        "response_format",
        CHAT,
        SUPPORTED,
        SUPPORTED,
        "text, json_object, json_schema: generation follows a grammar",
        {"type": "json_object"},
    ),
    _p("safety_identifier", CHAT, IGNORED, IGNORED, "an identifier for the provider's abuse checks", "u1"),
    _p("service_tier", CHAT, IGNORED, IGNORED, "one tier", "auto"),
    _p("store", CHAT, IGNORED, IGNORED, "nothing is stored", False),
    _p(
        "tool_choice",
        CHAT,
        SUPPORTED,
        SUPPORTED,
        "none, auto, required or a named function",
        "auto",
        extra={"tools": [_TOOL]},
    ),
    _p(
        "tools",
        CHAT,
        SUPPORTED,
        SUPPORTED,
        "function tools, where the chat template supports tool calls; otherwise a 400",
        [_TOOL],
    ),
    _p(
        "top_logprobs",
        CHAT,
        REFUSED,
        SUPPORTED,
        _LOGPROBS,
        2,
        (None,),
        {"logprobs": True},
    ),
    _p("verbosity", CHAT, REFUSED, REFUSED, "the model cannot be told how long to answer", "low", (None,)),
    _p("web_search_options", CHAT, REFUSED, REFUSED, "no web search", {}, (None,)),
    # -- /v1/completions -----------------------------------------------------------------------------------
    _p("prompt", COMPLETIONS, SUPPORTED, SUPPORTED, "a string, or a list of one string", "Hi"),
    _p("best_of", COMPLETIONS, REFUSED, REFUSED, "one completion per request", 2, (None, 1)),
    _p("echo", COMPLETIONS, REFUSED, REFUSED, "the prompt is not echoed", True, (None, False)),
    _p("logprobs", COMPLETIONS, REFUSED, REFUSED, "no log probabilities in this route's shape", 2, (None,)),
    _p("n", COMPLETIONS, SUPPORTED, SUPPORTED, "1 only; more choices is a 400", 1),
    _p("suffix", COMPLETIONS, REFUSED, REFUSED, "no insertion (fill-in-the-middle)", "end", (None, "")),
    _p("max_tokens", COMPLETIONS, SUPPORTED, SUPPORTED, "default 16", 8),
    # -- both routes -----------------------------------------------------------------------------------------
    _p("max_tokens", CHAT, SUPPORTED, SUPPORTED, "default: the rest of the context", 8),
    *_both("model", IGNORED, IGNORED, "the worker serves one model; answers name it", "any-model"),
    *_both("frequency_penalty", SUPPORTED, SUPPORTED, "-2 to 2", 0.5),
    *_both("presence_penalty", SUPPORTED, SUPPORTED, "-2 to 2", 0.5),
    *_both("logit_bias", REFUSED, SUPPORTED, "only the llama-server engine biases tokens", {"42": -100}, (None, {})),
    *_both("seed", SUPPORTED, SUPPORTED, "0 to 2**32-1", 7),
    *_both("stop", SUPPORTED, SUPPORTED, "up to 4 strings; the answer ends before the first", ["\n\n"]),
    *_both("stream", SUPPORTED, SUPPORTED, "server-sent events, ending with data: [DONE]", False),
    *_both("temperature", SUPPORTED, SUPPORTED, "0 to 5 (0: greedy)", 0.5),
    *_both("top_p", SUPPORTED, SUPPORTED, "0 to 1", 0.9),
    *_both("user", IGNORED, IGNORED, "an end-user id for the provider's abuse checks", "u1"),
    # llama.cpp's own sampling parameters, which llama-server takes too.
    *_both("top_k", SUPPORTED, SUPPORTED, "llama.cpp extension", 20),
    *_both("min_p", SUPPORTED, SUPPORTED, "llama.cpp extension", 0.1),
    *_both("repeat_penalty", SUPPORTED, SUPPORTED, "llama.cpp extension", 1.1),
    *[
        _p(
            "stream_options",
            route,
            SUPPORTED,
            SUPPORTED,
            "include_usage: a last chunk with usage and no choices",
            {"include_usage": True},
            extra={"stream": True},
        )
        for route in (CHAT, COMPLETIONS)
    ],
)
TABLE: dict[str, dict[str, Param]] = {route: {p.name: p for p in PARAMS if p.route == route} for route in ROUTES}


class ParamError(Exception):
    """A parameter the worker refuses; `param` names it."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def status(row: Param, engine: str) -> str:
    """What a worker of `engine` does with the row's parameter."""
    return row.server if engine == SERVER else row.status


def check_params(body: dict[str, Any], route: str, engine: str = EMBEDDED) -> None:
    """Raise ParamError for the first parameter of `body` that the table does not let through on `engine`."""
    table = TABLE[route]
    for name, value in body.items():
        row = table.get(name)
        if row is None:
            raise ParamError(f"unknown parameter {name!r}: the worker does not implement it", name)
        if status(row, engine) == REFUSED and not any(value == n and type(value) is type(n) for n in row.neutral):
            raise ParamError(f"{name} is not supported: {row.note}", name)


def rows(route: str) -> Iterator[Param]:
    """The rows of one route as the docs list them: the input first, then by name."""
    return iter(sorted(TABLE[route].values(), key=lambda p: (p.name not in ("messages", "prompt"), p.name)))


def markdown(route: str) -> str:
    """The route's table as docs/openai.md shows it."""
    lines = [f"| parameter | {EMBEDDED} | {SERVER} | notes |", "|---|---|---|---|"]
    lines += [f"| `{p.name}` | {p.status} | {p.server} | {p.note} |" for p in rows(route)]
    return "\n".join(lines)
