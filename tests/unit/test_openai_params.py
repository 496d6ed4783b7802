"""The OpenAI parameter table, request validation, chat templates' tool syntax, and the stream gate."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from rbee_tui.tinymodel import TINY_TOOLS, TOOL_CHAT_TEMPLATE, write_model
from rbee_tui.worker.chat import ChatTemplate, ToolCall, parse_tool_calls, tool_grammar
from rbee_tui.worker.openai_api import Gate
from rbee_tui.worker.params import (
    CHAT,
    COMPLETIONS,
    IGNORED,
    REFUSED,
    ROUTES,
    SERVER,
    SUPPORTED,
    TABLE,
    ParamError,
    check_params,
    markdown,
    status,
)
from rbee_tui.worker.requests import MAX_DEPTH, BadRequest, chat_messages, parse_json
from rbee_tui.worker.schema import INT_LIMIT, bounded, int_range_gbnf, schema_grammar
from tests.conftest import REPO_ROOT

# Every parameter of the OpenAI API reference for the two routes (create chat completion, create completion).
OPENAI_CHAT = {
    "messages", "model", "audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs",
    "max_completion_tokens", "max_tokens", "metadata", "modalities", "n", "parallel_tool_calls", "prediction",
    "presence_penalty", "prompt_cache_key", "reasoning_effort", "response_format", "safety_identifier", "seed",
    "service_tier", "stop", "store", "stream", "stream_options", "temperature", "tool_choice", "tools",
    "top_logprobs", "top_p", "user", "verbosity", "web_search_options",
}  # fmt: skip
OPENAI_COMPLETIONS = {
    "model", "prompt", "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "n",
    "presence_penalty", "seed", "stop", "stream", "stream_options", "suffix", "temperature", "top_p", "user",
}  # fmt: skip
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]},
    },
}


def test_the_table_covers_every_openai_parameter() -> None:
    assert set(TABLE[CHAT]) >= OPENAI_CHAT, sorted(OPENAI_CHAT - set(TABLE[CHAT]))
    assert set(TABLE[COMPLETIONS]) >= OPENAI_COMPLETIONS, sorted(OPENAI_COMPLETIONS - set(TABLE[COMPLETIONS]))
    for route in ROUTES:
        for p in TABLE[route].values():
            assert p.status in (SUPPORTED, REFUSED, IGNORED) and p.server in (SUPPORTED, REFUSED, IGNORED)
            assert p.note and p.name in p.example
            # A refused row's example asks for something, or walking the table would prove nothing.
            assert p.status != REFUSED or p.example[p.name] not in p.neutral


def test_the_docs_show_the_table() -> None:
    doc = (REPO_ROOT / "docs" / "openai.md").read_text()
    for route in ROUTES:
        shown = re.search(rf"<!-- params:{route} -->\n(.*?)\n<!-- /params:{route} -->", doc, re.S)
        assert shown is not None, f"docs/openai.md has no table for {route}"
        assert shown.group(1) == markdown(route)


def test_check_params_lets_through_only_what_the_table_says() -> None:
    check_params({"messages": [], "user": "u", "store": True, "logprobs": False, "logit_bias": {}}, CHAT)
    check_params({"prompt": "x", "best_of": 1, "echo": False, "suffix": None}, COMPLETIONS)
    for body, name in (
        ({"colour": "blue"}, "colour"),
        ({"logprobs": True}, "logprobs"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"audio": {"voice": "x"}}, "audio"),
        ({"functions": []}, "functions"),  # an empty list still asks for the deprecated API
    ):
        with pytest.raises(ParamError) as err:
            check_params(body, CHAT)
        assert err.value.param == name and name in str(err.value)
    with pytest.raises(ParamError, match="echo"):
        check_params({"echo": True}, COMPLETIONS)
    with pytest.raises(ParamError, match="'messages'"):  # a chat parameter on the completions route
        check_params({"messages": []}, COMPLETIONS)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nests deeper"),
        (b'{"a":' + b'{"a":' * MAX_DEPTH + b"1" + b"}" * (MAX_DEPTH + 1), f"deeper than {MAX_DEPTH}"),
        (b'{"a": "\\ud800"}', "lone surrogate"),
        (b'{"a": "\xff"}', "not UTF-8"),
        (b'{"a": NaN}', "NaN is not a JSON number"),
        (b'{"a": ' + b"9" * 5000 + b"}", "not valid JSON"),
        (b"", "not valid JSON"),
        (b'"text"', "must be a JSON object"),
    ],
    ids=["deep-array", "deep-object", "surrogate", "not-utf8", "nan", "huge-int", "empty", "not-object"],
)
def test_malformed_bodies_are_bad_requests(raw: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=message) as err:
        parse_json(raw)
    assert err.value.status == 400


def test_a_body_just_inside_the_depth_limit_parses() -> None:
    deep = b'{"a":' * (MAX_DEPTH - 1) + b"1" + b"}" * (MAX_DEPTH - 1)
    assert parse_json(deep)["a"]


def test_content_parts_are_joined_and_media_refused() -> None:
    [msg] = chat_messages(
        [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "you"}]}]
    )
    assert msg == {"role": "user", "content": "Hello\nyou"}
    [dev] = chat_messages([{"role": "developer", "content": "Be brief."}])
    assert dev["role"] == "system"
    for part, kind in (
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}, "image_url"),
        ({"type": "input_audio", "input_audio": {"data": "AA", "format": "wav"}}, "input_audio"),
        ({"type": "file", "file": {"file_id": "f"}}, "file"),
    ):
        with pytest.raises(BadRequest, match=rf"content\[1\] is of type '{kind}': this model takes text only"):
            chat_messages([{"role": "user", "content": [{"type": "text", "text": "see"}, part]}])
    with pytest.raises(BadRequest, match="unknown content part type 'video'"):
        chat_messages([{"role": "user", "content": [{"type": "video"}]}])
    with pytest.raises(BadRequest, match="needs a string tool_call_id"):
        chat_messages([{"role": "tool", "content": "42"}])
    with pytest.raises(BadRequest, match="role 'function' is not one of"):
        chat_messages([{"role": "function", "content": "42", "name": "f"}])
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    turn = chat_messages(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [call]}]
    )
    assert turn[1] == {"role": "assistant", "content": "", "tool_calls": [call]}


def test_the_tool_syntax_is_learned_from_the_template() -> None:
    chat = ChatTemplate(TOOL_CHAT_TEMPLATE, "<s>", "</s>")
    syntax = chat.tool_syntax
    assert syntax is not None
    assert (syntax.prefix, syntax.suffix, syntax.name_key, syntax.args_key) == (
        "<tool_call>\n",
        "\n</tool_call>",
        "name",
        "arguments",
    )
    assert syntax.separator == "\n</tool_call>\n<tool_call>\n" and syntax.object_args and syntax.has_tag
    assert chat.turn_end == "<|im_end|>"
    prompt, stops = chat.render([{"role": "user", "content": "Weather?"}], tools=[TOOL])
    assert '"name": "get_weather"' in prompt and prompt.endswith("<|im_start|>assistant\n")
    assert stops == ("</s>", "<|im_end|>")
    # History: an earlier call's arguments (a JSON string in the OpenAI shape) reach the template as an object.
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}
    history = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
    ]
    prompt, _ = chat.render(history, tools=[TOOL])
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>' in prompt
    assert "<tool_response>\nsunny\n</tool_response>" in prompt


def test_other_call_shapes_and_templates_without_tools() -> None:
    # Calls as bare JSON with "parameters", the way some model families write them.
    bare = (
        "{% if tools %}tools: {{ tools | tojson }}\n{% endif %}"
        "{% for m in messages %}{{ m.role }}: {% if m.tool_calls %}{% for c in m.tool_calls %}"
        '{"name": "{{ c.function.name }}", "parameters": {{ c.function.arguments | tojson }}}'
        "{% endfor %}{% else %}{{ m.content }}{% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    syntax = ChatTemplate(bare, "", "").tool_syntax
    assert syntax is not None and (syntax.prefix, syntax.name_key, syntax.args_key) == ("", "name", "parameters")
    assert not syntax.has_tag and syntax.trigger == '{"name"'
    content, calls = parse_tool_calls(
        'ok {"name": "get_weather", "parameters": {"city": "Rome"}}', syntax, {"get_weather"}
    )
    assert content == "ok" and calls == [ToolCall("get_weather", {"city": "Rome"})]
    chatml = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    assert ChatTemplate(chatml, "", "").tool_syntax is None  # it never shows the model its tools
    assert ChatTemplate(None, "", "").tool_syntax is None
    assert ChatTemplate("{% if %}", "", "").tool_syntax is None  # a template Jinja cannot compile


def test_tool_calls_are_parsed_only_when_valid() -> None:
    syntax = ChatTemplate(TOOL_CHAT_TEMPLATE, "<s>", "</s>").tool_syntax
    assert syntax is not None
    two = (
        'Let me see. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}\n</tool_call>'
    )
    content, calls = parse_tool_calls(two, syntax, {"get_weather"})
    assert content == "Let me see." and [c.arguments["city"] for c in calls] == ["Paris", "Rome"]
    openai = calls[0].to_openai(0)
    assert openai["index"] == 0 and openai["type"] == "function" and openai["id"].startswith("call_")
    assert json.loads(openai["function"]["arguments"]) == {"city": "Paris"}
    for text in ("no call here", '<tool_call>\n{"name": "other", "arguments": {}}', "<tool_call>\n{broken"):
        assert parse_tool_calls(text, syntax, {"get_weather"}) == (text, [])


def test_grammars_compile_in_llama_cpp(tmp_path: Path) -> None:
    from rbee_tui.worker.engines import LlamaCppEngine

    engine = LlamaCppEngine(str(write_model(tmp_path / "tools.gguf", TINY_TOOLS)), "cpu", 0, 512)
    engine.load()
    try:
        syntax = ChatTemplate(TOOL_CHAT_TEMPLATE, "<s>", "</s>").tool_syntax
        assert syntax is not None
        other = {"type": "function", "function": {"name": "now"}}  # no parameters: any object
        for grammar in (
            tool_grammar(syntax, [TOOL], parallel=True),
            tool_grammar(syntax, [TOOL, other], parallel=False),
            tool_grammar(syntax, [TOOL], parallel=True, lazy=True),
            schema_grammar({"type": "object", "properties": {"root": {"type": "string"}, "s": {"const": 'a]"#'}}}),
            schema_grammar({"enum": ["é你好🐝", 'a "q" \\ b\n', 7, None]}),
            schema_grammar(
                {"type": "object", "properties": {"n": {"type": "integer", "minimum": -5, "maximum": 1234}}}
            ),
            schema_grammar({"type": "integer", "exclusiveMinimum": 99}),
        ):
            assert engine.grammar_error(grammar) is None, grammar
        assert tool_grammar(syntax, [TOOL], parallel=False, lazy=True).startswith('root ::= "\\n" rbee-call')
        assert engine.grammar_error("root ::= nowhere") is not None
    finally:
        engine.close()


def test_schemas_with_constraints_a_grammar_cannot_enforce_are_refused() -> None:
    for schema, keyword in (
        ({"type": "number", "minimum": 0}, "minimum"),
        ({"minimum": 0}, "minimum"),  # no type: llama.cpp's converter enforces bounds on integers only
        ({"type": ["integer", "null"], "maximum": 3}, "maximum"),
        ({"type": "object", "properties": {"n": {"type": "number", "maximum": 3}}}, "maximum"),
        ({"type": "array", "items": {"type": "integer", "multipleOf": 2}}, "multipleOf"),
        ({"anyOf": [{"type": "string"}, {"not": {"type": "null"}}]}, "not"),
        ({"$defs": {"a": {"type": "array", "uniqueItems": True}}, "$ref": "#/$defs/a"}, "uniqueItems"),
    ):
        with pytest.raises(BadRequest, match=f"'{keyword}'"):
            schema_grammar(schema)
    # A property that happens to be named like a keyword is no constraint.
    assert "minimum" in schema_grammar({"type": "object", "properties": {"minimum": {"type": "boolean"}}})
    with pytest.raises(BadRequest, match="admits no integer"):
        schema_grammar({"type": "integer", "minimum": 5, "exclusiveMaximum": 5})
    with pytest.raises(BadRequest, match="minimum must be a number"):
        schema_grammar({"type": "integer", "minimum": "5"})


def _gbnf_regex(gbnf: str) -> re.Pattern[str]:
    """The regular expression of a GBNF rule made of literals, classes, groups, alternatives and counts."""
    out, i = [], 0
    while i < len(gbnf):
        c = gbnf[i]
        if c == '"':
            j = gbnf.index('"', i + 1)
            out.append(re.escape(gbnf[i + 1 : j]))
        elif c in "[{":
            j = gbnf.index("]" if c == "[" else "}", i)
            out.append(gbnf[i : j + 1])
        else:
            j = i
            out.append({"(": "(?:", " ": ""}.get(c, c))
        i = j + 1
    return re.compile("".join(out))


@pytest.mark.parametrize(
    ("lo", "hi"),
    [(105, None), (None, -250), (-12, 7), (0, None), (None, 0), (7, 1234), (99, 100), (-999, -100), (3, 3), (-5, 5)],
)
def test_integer_ranges_admit_exactly_their_integers(lo: int | None, hi: int | None) -> None:
    # llama.cpp's own one-sided ranges let 15 through for a minimum of 105; the two-sided form does not.
    low, high = -INT_LIMIT if lo is None else lo, INT_LIMIT if hi is None else hi
    out: list[str] = []
    int_range_gbnf(low, high, out)
    rule = _gbnf_regex("".join(out))
    for n in range(-1500, 1501):
        assert bool(rule.fullmatch(str(n))) == (low <= n <= high), (lo, hi, n)
    assert rule.fullmatch(str(high if hi is not None else INT_LIMIT))
    assert not rule.fullmatch("007") and not rule.fullmatch("1e3")


def test_bounded_makes_integer_ranges_two_sided() -> None:
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "integer", "minimum": 105},
            "b": {"type": "integer", "exclusiveMinimum": -12.5, "exclusiveMaximum": 7},
            "c": {"type": "string", "maxLength": 3},
        },
    }
    props = bounded(schema)["properties"]
    assert props["a"] == {"type": "integer", "minimum": 105, "maximum": INT_LIMIT}
    assert props["b"] == {"type": "integer", "minimum": -12, "maximum": 6}
    assert props["c"] == {"type": "string", "maxLength": 3}


def test_the_llama_server_column_differs_only_where_it_does_more() -> None:
    differ = {(p.route, p.name) for route in ROUTES for p in TABLE[route].values() if p.status != p.server}
    assert differ == {(CHAT, "logprobs"), (CHAT, "top_logprobs"), (CHAT, "logit_bias"), (COMPLETIONS, "logit_bias")}
    assert all(status(TABLE[r][n], SERVER) == SUPPORTED for r, n in differ)
    check_params({"messages": [], "logprobs": True, "top_logprobs": 2, "logit_bias": {"1": 5}}, CHAT, SERVER)
    for body, route in (({"audio": {}}, CHAT), ({"colour": 1}, CHAT), ({"logprobs": 2}, COMPLETIONS)):
        with pytest.raises(ParamError):
            check_params(body, route, SERVER)


def test_the_gate_holds_back_what_may_start_a_stop_string() -> None:
    gate = Gate(("<|im_end|>", "<tool_call>"))
    assert gate.feed("Hello <") == "Hello "
    assert gate.feed("|im") == ""
    assert gate.feed("!") == "<|im!"  # not a stop string after all
    assert gate.feed(" ok<|im_") == " ok"
    assert gate.feed("end|> more") == ""  # the stop string: nothing after it is streamed
    assert gate.streamed == "Hello <|im! ok" and gate.closed
    closed = Gate(("x",), closed=True)
    assert closed.feed("anything") == "" and closed.streamed == ""
