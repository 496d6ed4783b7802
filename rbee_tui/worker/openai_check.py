"""The checks every OpenAI request goes through, whichever engine answers it: one validation, one set of errors.

`check_chat` and `check_completion` turn a body into a `Checked` request or raise BadRequest (a 400 naming
the parameter). The embedded engine then renders a prompt and builds grammars from it (openai_api.py); a
llama-server worker forwards it (proxy.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from rbee_tui.worker.engines import Request
from rbee_tui.worker.params import CHAT, COMPLETIONS, EMBEDDED, ParamError, check_params
from rbee_tui.worker.requests import BadRequest, bool_field, build_request, chat_messages, check_ignored_types
from rbee_tui.worker.schema import check_schema

_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_TOOL_CHOICES = ("none", "auto", "required")
ANY_OBJECT = "json_object"  # response_format asks for any JSON object
TOOLS_UNSUPPORTED = "tools are not supported by this model: its chat template does not support tool calls"


@dataclass(frozen=True)
class Schema:
    """The JSON schema a response_format asks for, and where in the body it was (for error messages)."""

    schema: Any
    where: str


@dataclass(frozen=True)
class Checked:
    """An OpenAI request that passed every check: what it asks for, validated."""

    kind: str  # CHAT or COMPLETIONS
    stream: bool
    include_usage: bool
    request: Request  # sampling parameters; for a chat, the prompt is rendered later
    messages: list[dict[str, Any]] = field(default_factory=list)  # as chat templates read them
    tools: list[dict[str, Any]] = field(default_factory=list)  # empty: no tools, or tool_choice "none"
    tool_choice: Any = None  # "none", "auto", "required" or a named function (None without tools)
    parallel_tool_calls: bool = True
    reasoning_effort: str | None = None
    response_format: Schema | str | None = None  # None: free text; ANY_OBJECT; or a schema
    shown_tools: list[dict[str, Any]] = field(default_factory=list)  # given to the template, even with "none"


def _common(body: dict[str, Any], route: str, engine: str) -> tuple[bool, bool]:
    """Parameters both routes check first; returns (stream, include_usage)."""
    try:
        check_params(body, route, engine)
    except ParamError as exc:
        raise BadRequest(str(exc), exc.param) from None
    check_ignored_types(body)
    stream = bool_field(body, "stream", False)
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise BadRequest("stream_options must be an object", "stream_options")
    if not stream:
        raise BadRequest("stream_options is only allowed when stream is true", "stream_options")
    unknown = sorted(set(options) - {"include_usage", "include_obfuscation"})
    if unknown:
        raise BadRequest(f"unknown stream_options field(s): {', '.join(unknown)}", "stream_options")
    bool_field(options, "include_obfuscation", False)  # padding against length side channels: nothing to pad
    return stream, bool_field(options, "include_usage", False)


def _tools(body: dict[str, Any]) -> tuple[list[dict[str, Any]], Any]:
    """The validated tools and tool_choice (no tools: an empty list)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise BadRequest("tool_choice needs tools", "tool_choice")
        return [], None
    if not isinstance(tools, list):
        raise BadRequest("tools must be a list", "tools")
    names: set[str] = set()
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise BadRequest(f"tools[{i}] is of type {kind!r}: only function tools are supported", "tools")
        fn = tool.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not _TOOL_NAME.match(fn["name"]):
            raise BadRequest(f"tools[{i}].function needs a name of 1 to 64 letters, digits, _ or -", "tools")
        if not isinstance(fn.get("parameters", {}), dict | None):
            raise BadRequest(f"tools[{i}].function.parameters must be a JSON schema object", "tools")
        if not isinstance(fn.get("description", ""), str | None):
            raise BadRequest(f"tools[{i}].function.description must be a string", "tools")
        if fn["name"] in names:
            raise BadRequest(f"tools[{i}]: two tools are named {fn['name']!r}", "tools")
        names.add(fn["name"])
    choice = "auto" if choice is None else choice
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise BadRequest('tool_choice must be "none", "auto", "required" or a named function', "tool_choice")
        if name not in names:
            raise BadRequest(f"tool_choice names {name!r}, which is not in tools", "tool_choice")
    elif choice not in _TOOL_CHOICES:
        raise BadRequest('tool_choice must be "none", "auto", "required" or a named function', "tool_choice")
    return tools, choice


def _schema(schema: Any, where: str) -> Schema:
    if not isinstance(schema, dict | bool):
        raise BadRequest(f"{where} must be a JSON schema object", "response_format")
    try:
        check_schema(schema)
    except BadRequest as exc:
        raise BadRequest(f"{where}: {exc}", "response_format") from None
    return Schema(schema, where)


def _response_format(value: Any) -> Schema | str | None:
    """What a response_format asks for: None (free text), ANY_OBJECT or a checked schema."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        # llama-server's extension: a json_object may carry its schema.
        schema = value.get("schema")
        return ANY_OBJECT if schema is None else _schema(schema, "response_format.schema")
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise BadRequest("response_format.json_schema must be an object", "response_format")
        schema = spec.get("schema")
        return ANY_OBJECT if schema is None else _schema(schema, "response_format.json_schema.schema")
    raise BadRequest("response_format.type must be text, json_object or json_schema", "response_format")


def _modalities(body: dict[str, Any]) -> None:
    value = body.get("modalities")
    if value is None:
        return
    if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
        raise BadRequest("modalities must be a list of strings", "modalities")
    if set(value) - {"text"}:
        raise BadRequest(f"modalities {sorted(set(value) - {'text'})} are not supported: text only", "modalities")


def check_chat(body: dict[str, Any], n_ctx: int, tools_supported: bool, engine: str = EMBEDDED) -> Checked:
    """Validate a chat request for a model of context `n_ctx` whose template does (or not) take tools."""
    stream, include_usage = _common(body, CHAT, engine)
    _modalities(body)
    messages = chat_messages(body.get("messages"))
    shown, choice = _tools(body)
    parallel = bool_field(body, "parallel_tool_calls", True)
    effort = body.get("reasoning_effort")
    if effort is not None and not isinstance(effort, str):
        raise BadRequest("reasoning_effort must be a string", "reasoning_effort")
    response_format = _response_format(body.get("response_format"))
    tools: list[dict[str, Any]] = []
    if shown and choice != "none":
        if not tools_supported:
            raise BadRequest(TOOLS_UNSUPPORTED, "tools")
        if response_format is not None:
            raise BadRequest("response_format and tools cannot be used together", "response_format")
        named = choice["function"]["name"] if isinstance(choice, dict) else None
        tools = [t for t in shown if named is None or t["function"]["name"] == named]
        for t in tools:  # the calls follow the tools' parameter schemas: refuse what they could break
            try:
                check_schema(t["function"].get("parameters") or {"type": "object"})
            except BadRequest as exc:
                raise BadRequest(f"tools: {exc}", "tools") from None
    req = build_request(body, n_ctx, openai=True, prompt="", max_tokens=n_ctx)
    return Checked(
        CHAT,
        stream,
        include_usage,
        req,
        messages,
        tools,
        choice,
        parallel,
        effort,
        response_format,
        shown,
    )


def check_completion(body: dict[str, Any], n_ctx: int, engine: str = EMBEDDED) -> Checked:
    """Validate a text completion request for a model of context `n_ctx`."""
    stream, include_usage = _common(body, COMPLETIONS, engine)
    return Checked(COMPLETIONS, stream, include_usage, build_request(body, n_ctx, openai=True))
