"""The official `openai` client against both engines: one API, whichever engine a worker runs.

Each test runs against rbee-worker embedding llama-cpp-python and against rbee-worker in front of llama.cpp's
llama-server (when built), both serving the generated `tiny-tools` model, whose chat template supports tools.
Its weights are random: the JSON and tool calls are valid because grammars make them so, and the answers are
parsed and checked, never taken on trust. Where the engines still differ (docs/openai.md), the test says so.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel

from rbee_tui.catalog import CatalogStore
from rbee_tui.tinymodel import TINY_TOOLS, write_model
from rbee_tui.worker.params import CHAT, IGNORED, PARAMS, REFUSED, ROUTES, Param, status
from tests.conftest import REPO_ROOT, wait_for
from tests.e2e.test_llama_server import LLAMA_SERVER, needs_binary
from tests.e2e.test_worker_api import free_port

EMBEDDED, SERVER = "llama-cpp-python", "llama-server"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Rome"]}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class Weather(BaseModel):
    """The answer shape of the structured-output test (openai's `parse` turns it into a strict JSON schema)."""

    city: Literal["Paris", "Rome", "Oslo"]
    sunny: bool
    temperature: int


def _post(url: str, body: bytes | dict[str, Any]) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw)
    except ValueError:  # a stream, or a server's plain-text answer
        return status, {"raw": raw.decode("utf-8", "replace")}


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def worker_argv(engine: str, model: Path, model_id: str, port: int) -> list[str]:
    """The worker rbee-hive runs for `engine` (rbee_tui/hive/workers.py), on a model file."""
    argv = [sys.executable, "-m", "rbee_tui.worker.launch", "--model", str(model), "--model-id", model_id]
    if engine == SERVER:
        if LLAMA_SERVER is None:
            pytest.skip("llama-server is not built: run scripts/build-llama-cpp.sh (CI does)")
        argv += ["--engine", "llama-server", "--llama-server", LLAMA_SERVER]
    return [*argv, "--port", str(port)]


def serve(argv: list[str], log: Path) -> Iterator[str]:
    """Run a worker (its argv ends with its port) until the test module is done; its base URL."""
    url = f"http://127.0.0.1:{argv[-1]}"
    # Output to a file: an unread pipe fills up, and then a chatty server blocks on its next log line.
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: proc.poll() is not None or _healthy(url), timeout=60, what=f"a worker at {url}")
        assert proc.poll() is None, log.read_text(errors="replace")
        yield url
        assert proc.poll() is None, "the worker must survive every test"
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def tools_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("models") / "tiny-tools.gguf", TINY_TOOLS)


@pytest.fixture(scope="module")
def embedded(tools_model: Path) -> Iterator[str]:
    yield from serve(worker_argv(EMBEDDED, tools_model, "tiny-tools", free_port()), tools_model.with_suffix(".e.log"))


@pytest.fixture(scope="module")
def server(tools_model: Path) -> Iterator[str]:
    yield from serve(worker_argv(SERVER, tools_model, "tiny-tools", free_port()), tools_model.with_suffix(".s.log"))


@pytest.fixture(scope="module")
def plain_embedded(tools_model: Path) -> Iterator[str]:
    """A worker on tiny-test, whose GGUF has no chat template at all."""
    model = REPO_ROOT / "fixtures" / "tiny-test.gguf"
    yield from serve(worker_argv(EMBEDDED, model, "tiny-test", free_port()), tools_model.with_suffix(".pe.log"))


@pytest.fixture(scope="module")
def plain_server(tools_model: Path) -> Iterator[str]:
    model = REPO_ROOT / "fixtures" / "tiny-test.gguf"
    yield from serve(worker_argv(SERVER, model, "tiny-test", free_port()), tools_model.with_suffix(".ps.log"))


@pytest.fixture(params=[EMBEDDED, SERVER])
def engine(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(engine, base URL): each test that takes it runs once per engine."""
    return request.param, request.getfixturevalue("embedded" if request.param == EMBEDDED else "server")


@pytest.fixture(params=[EMBEDDED, SERVER])
def plain(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(engine, base URL) of a worker on a model without a chat template, once per engine."""
    return request.param, request.getfixturevalue("plain_embedded" if request.param == EMBEDDED else "plain_server")


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def _check_call(call: Any, tool: dict[str, Any] = WEATHER) -> dict[str, Any]:
    assert call.type == "function" and call.id and call.function.name == tool["function"]["name"]
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, tool["function"]["parameters"])
    return args


# -- messages, streams, schemas ------------------------------------------------------------------------------


def test_content_parts_are_text_joined_in_order(engine: tuple[str, str]) -> None:
    _, url = engine
    c = client(url)
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]
    as_parts = c.chat.completions.create(
        model="tiny-tools", messages=[{"role": "user", "content": parts}], max_tokens=6, temperature=0
    )
    as_text = c.chat.completions.create(
        model="tiny-tools", messages=[{"role": "user", "content": "Hello\nthere"}], max_tokens=6, temperature=0
    )
    assert as_parts.usage is not None and as_text.usage is not None
    assert as_parts.usage.prompt_tokens == as_text.usage.prompt_tokens
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content


def test_parts_the_model_cannot_take(engine: tuple[str, str]) -> None:
    _, url = engine
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}]
    with pytest.raises(openai.BadRequestError) as err:
        client(url).chat.completions.create(model="m", messages=messages, max_tokens=4)
    assert "'image_url'" in err.value.message and "text only" in err.value.message
    assert err.value.body["param"] == "messages"  # type: ignore[index]


def test_a_stream_ends_with_its_usage(engine: tuple[str, str]) -> None:
    _, url = engine
    c = client(url)
    whole = c.chat.completions.create(model="m", messages=ASK, max_tokens=7, temperature=0)
    chunks = list(
        c.chat.completions.create(
            model="m",
            messages=ASK,
            max_tokens=7,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert whole.usage is not None and last.usage.model_dump(include={"prompt_tokens", "completion_tokens"}) == (
        whole.usage.model_dump(include={"prompt_tokens", "completion_tokens"})
    )
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert all(ch.usage is None for ch in chunks[:-1])
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert [ch.choices[0].finish_reason for ch in chunks[:-1] if ch.choices[0].finish_reason] == ["length"]
    assert {ch.id for ch in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks[:-1])
    assert text == whole.choices[0].message.content
    without = list(c.chat.completions.create(model="m", messages=ASK, max_tokens=3, stream=True))
    assert all(ch.usage is None and ch.choices for ch in without)


def test_completions_stream_usage_too(engine: tuple[str, str]) -> None:
    _, url = engine
    chunks = list(
        client(url).completions.create(
            model="m", prompt="Hello", max_tokens=4, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4 and chunks[-1].choices == []
    assert all(ch.usage is None and ch.choices for ch in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "length"
    without = list(client(url).completions.create(model="m", prompt="Hello", max_tokens=4, stream=True))
    assert all(ch.usage is None and ch.choices for ch in without)


def test_answers_have_one_shape(engine: tuple[str, str]) -> None:
    # The same keys whichever engine answers: its ids, the worker's model name, no engine extras.
    _, url = engine
    code, chat = _post(f"{url}/v1/chat/completions", {"messages": ASK, "max_tokens": 3, "temperature": 0})
    assert code == 200 and set(chat) == {"id", "object", "created", "model", "choices", "usage"}
    assert chat["model"] == "tiny-tools" and chat["id"].startswith("chatcmpl-") and chat["object"] == "chat.completion"
    assert set(chat["choices"][0]) == {"index", "finish_reason", "logprobs", "message"}
    assert set(chat["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    code, text = _post(f"{url}/v1/completions", {"prompt": "Hi", "max_tokens": 3})
    assert code == 200 and set(text) == {"id", "object", "created", "model", "choices", "usage"}
    assert text["id"].startswith("cmpl-") and text["object"] == "text_completion"
    assert set(text["choices"][0]) == {"index", "finish_reason", "logprobs", "text"}
    models = client(url).models.list()
    assert [m.id for m in models.data] == ["tiny-tools"]


def test_a_json_schema_answer_parses_and_fits(engine: tuple[str, str]) -> None:
    _, url = engine
    done = client(url).chat.completions.parse(model="m", messages=ASK, response_format=Weather, max_tokens=200, seed=3)
    choice = done.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Weather)
    jsonschema.validate(json.loads(choice.message.content or ""), Weather.model_json_schema())


def test_a_json_object_answer_parses(plain: tuple[str, str]) -> None:
    # On tiny-test, with a seed whose answer closes its object on both engines: random weights otherwise
    # write junk bytes inside JSON strings, which llama-server's answer parser refuses with a 500
    # (docs/openai.md); tiny-tools writes its tool-call tags there too, which that parser refuses as well.
    _, url = plain
    done = client(url).chat.completions.create(
        model="m", messages=ASK, response_format={"type": "json_object"}, max_tokens=300, seed=6
    )
    assert done.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(done.choices[0].message.content or ""), dict)


def test_integer_bounds_are_enforced(engine: tuple[str, str]) -> None:
    _, url = engine
    schema = {
        "type": "object",
        "properties": {
            "big": {"type": "integer", "minimum": 105},
            "small": {"type": "integer", "exclusiveMinimum": -12.5, "maximum": 7},
            "negative": {"type": "integer", "maximum": -250},
        },
        "required": ["big", "small", "negative"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
    for seed in range(4):
        done = client(url).chat.completions.create(
            model="m",
            messages=ASK,
            response_format=fmt,
            max_tokens=300,
            seed=seed,  # type: ignore[arg-type]
        )
        answer = json.loads(done.choices[0].message.content or "")
        jsonschema.validate(answer, schema)


def test_schemas_the_grammar_cannot_enforce_are_refused(engine: tuple[str, str]) -> None:
    _, url = engine
    schema = {"type": "object", "properties": {"n": {"type": "number", "minimum": 1}}, "required": ["n"]}
    with pytest.raises(openai.BadRequestError, match="'minimum'") as err:
        client(url).chat.completions.create(
            model="m",
            messages=ASK,
            response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
        )
    assert err.value.body["param"] == "response_format"  # type: ignore[index]
    bounded = {"type": "function", "function": {"name": "count", "parameters": schema}}
    with pytest.raises(openai.BadRequestError, match=r"tools: .*'minimum'") as err:
        client(url).chat.completions.create(model="m", messages=ASK, tools=[bounded], tool_choice="required")
    assert err.value.body["param"] == "tools"  # type: ignore[index]
    unique = {"type": "array", "items": {"type": "string"}, "uniqueItems": True}
    with pytest.raises(openai.BadRequestError, match="'uniqueItems'"):
        client(url).chat.completions.create(
            model="m",
            messages=ASK,
            response_format={"type": "json_schema", "json_schema": {"name": "u", "schema": unique}},
        )


# -- tools ----------------------------------------------------------------------------------------------------


def test_a_required_tool_call(engine: tuple[str, str]) -> None:
    _, url = engine
    done = client(url).chat.completions.create(
        model="m", messages=ASK, tools=[WEATHER, TIME], tool_choice="required", max_tokens=200, seed=1
    )
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        _check_call(call, WEATHER if call.function.name == "get_weather" else TIME)


def test_auto_tool_choice_lets_the_model_open_a_call(engine: tuple[str, str]) -> None:
    # tiny-tools opens a call after a line break, as a tool-trained model would when it wants one.
    _, url = engine
    done = client(url).chat.completions.create(model="m", messages=ASK, tools=[WEATHER], max_tokens=200, seed=2)
    assert done.choices[0].finish_reason == "tool_calls"
    [call] = done.choices[0].message.tool_calls or []
    _check_call(call)


def test_tool_calls_stream(engine: tuple[str, str]) -> None:
    _, url = engine
    stream = client(url).chat.completions.create(
        model="m", messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=200, stream=True, seed=4
    )
    calls: dict[int, dict[str, str]] = {}
    reasons = []
    for chunk in stream:
        delta = chunk.choices[0].delta
        for part in delta.tool_calls or []:
            call = calls.setdefault(part.index, {"name": "", "arguments": ""})
            assert part.function is not None
            call["name"] += part.function.name or ""
            call["arguments"] += part.function.arguments or ""
        reasons += [chunk.choices[0].finish_reason] if chunk.choices[0].finish_reason else []
    assert reasons == ["tool_calls"] and calls
    for call in calls.values():
        assert call["name"] == "get_weather"
        jsonschema.validate(json.loads(call["arguments"]), WEATHER["function"]["parameters"])


def test_a_named_tool_is_the_one_called(engine: tuple[str, str]) -> None:
    _, url = engine
    for seed in range(3):
        done = client(url).chat.completions.create(
            model="m",
            messages=ASK,
            tools=[WEATHER, TIME],
            tool_choice={"type": "function", "function": {"name": "get_time"}},
            max_tokens=200,
            seed=seed,
        )
        assert done.choices[0].finish_reason == "tool_calls"
        [call] = done.choices[0].message.tool_calls or []
        _check_call(call, TIME)
    with pytest.raises(openai.BadRequestError, match="not in tools"):
        client(url).chat.completions.create(
            model="m", messages=ASK, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "x"}}
        )


def test_tool_results_go_back_to_the_model(engine: tuple[str, str]) -> None:
    _, url = engine
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    turn = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    c = client(url)
    first = c.chat.completions.create(
        model="m", messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=1, temperature=0
    )
    then = c.chat.completions.create(
        model="m", messages=turn, tools=[WEATHER], tool_choice="none", max_tokens=1, temperature=0
    )
    assert first.usage is not None and then.usage is not None
    # The call and its result are in the prompt (some 100 characters of it).
    assert then.usage.prompt_tokens > first.usage.prompt_tokens + 30


def test_tools_on_a_model_without_tool_support(plain: tuple[str, str]) -> None:
    _, url = plain
    with pytest.raises(openai.BadRequestError, match="its chat template does not support tool calls") as err:
        client(url).chat.completions.create(model="m", messages=ASK, tools=[WEATHER], max_tokens=4)
    assert err.value.body["param"] == "tools"  # type: ignore[index]
    # tool_choice "none" asks for no call: nothing to refuse.
    done = client(url).chat.completions.create(
        model="m", messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=2
    )
    assert done.choices[0].message.content is not None


# -- the parameter table, walked ------------------------------------------------------------------------------


def _walk_body(p: Param) -> dict[str, Any]:
    base: dict[str, Any] = {"messages": ASK} if p.route == CHAT else {"prompt": "Hello"}
    # A seed: random weights write anything, and llama-server's answer parser refuses some of it (docs/openai.md).
    return {**base, "max_tokens": 8, "seed": 1, **p.example}


@pytest.mark.parametrize("row", PARAMS, ids=[f"{p.route}-{p.name}" for p in PARAMS])
def test_every_row_of_the_table(engine: tuple[str, str], row: Param) -> None:
    name, url = engine
    code, answer = _post(url + ROUTES[row.route], _walk_body(row))
    if status(row, name) == REFUSED:
        assert code == 400, answer
        assert answer["error"]["param"] == row.name and row.name in answer["error"]["message"]
    else:
        assert code == 200, answer
    if status(row, name) == IGNORED:
        # Ignored means no effect: the same request without it gets the same answer.
        body = _walk_body(row)
        body.pop(row.name)
        same = {**body, "temperature": 0}
        (c1, without), (c2, with_it) = (
            _post(url + ROUTES[row.route], same),
            _post(url + ROUTES[row.route], {**same, row.name: row.example[row.name]}),
        )
        assert c1 == c2 == 200, (without, with_it)
        assert without["choices"] == with_it["choices"]


@pytest.mark.parametrize("route", list(ROUTES))
def test_unknown_parameters_are_refused_by_name(engine: tuple[str, str], route: str) -> None:
    _, url = engine
    base: dict[str, Any] = {"messages": ASK} if route == CHAT else {"prompt": "Hello"}
    code, answer = _post(url + ROUTES[route], {**base, "colour": "blue", "max_tokens": 2})
    assert code == 400 and "'colour'" in answer["error"]["message"] and answer["error"]["param"] == "colour"


def test_llama_server_features_pass_through(server: str) -> None:
    # Where llama-server does more than the embedded engine (params.py), the worker lets it: token log
    # probabilities in OpenAI's chat shape, and per-token bias.
    done = client(server).chat.completions.create(
        model="m", messages=ASK, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2
    )
    assert done.choices[0].logprobs is not None
    content = done.choices[0].logprobs.content or []
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 for t in content)
    first = content[0]
    banned = client(server).chat.completions.create(
        model="m", messages=ASK, max_tokens=1, temperature=0, logprobs=True, logit_bias={str(_token_id(first)): -100}
    )
    assert (banned.choices[0].logprobs.content or [])[0].token != first.token  # type: ignore[union-attr]


def _token_id(logprob: Any) -> int:
    # llama-server's logprobs name the token's id beside OpenAI's fields.
    return int(logprob.model_extra["id"])


# -- malformed bodies -----------------------------------------------------------------------------------------

OK = b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2'
MALFORMED = {
    "deep": (b'{"messages": [{"role": "user", "content": "Hi"}], "metadata": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
    "deep-in-content": b'{"messages": [{"role": "user", "content": ' + b"[" * 50_000 + b"]" * 50_000 + b"}]}",
    "not-utf8": OK + b', "user": "\xff\xfe"}',
    "lone-surrogate": b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
    "nan": OK + b', "temperature": NaN}',
    "huge-int": OK + b', "seed": ' + b"9" * 5000 + b"}",
    "too-large": OK + b', "user": "' + b"a" * (9 * 1024 * 1024) + b'"}',
    "empty": b"",
    "not-an-object": b"[1, 2]",
    "truncated": OK,
    "wrong-temperature": OK + b', "temperature": "hot"}',
    "wrong-messages": b'{"messages": "hi"}',
    "wrong-content": b'{"messages": [{"role": "user", "content": 42}]}',
    "wrong-part": b'{"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}',
    "wrong-stream": OK + b', "stream": "yes"}',
    "wrong-tools": OK + b', "tools": "x"}',
    "wrong-tool": OK + b', "tools": [{"type": "function", "function": {"name": "has space"}}]}',
    "wrong-response-format": OK + b', "response_format": {"type": "xml"}}',
    "wrong-stop": OK + b', "stop": [1, 2]}',
    "wrong-user": OK + b', "user": 7}',
    "options-without-stream": OK + b', "stream_options": {"include_usage": true}}',
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_bodies_get_4xx_and_the_worker_keeps_serving(engine: tuple[str, str], case: str) -> None:
    _, url = engine
    code, answer = _post(f"{url}/v1/chat/completions", MALFORMED[case])
    assert 400 <= code < 500, answer
    message = answer["error"]["message"]
    assert isinstance(message, str) and message and "\n" not in message
    code, _ = _post(f"{url}/v1/chat/completions", OK + b"}")
    assert code == 200


# -- through rbee-hive ----------------------------------------------------------------------------------------


@needs_binary
def test_workers_spawned_by_rbee_hive_answer_alike(hive, models_dir: Path) -> None:
    hive("models", "catalog", check=True)
    hive("models", "register", "tiny-tools", "--repo", "rbee/tiny-tools", "--file", "tiny-tools.gguf", check=True)
    write_model(models_dir / "tiny-tools" / "tiny-tools.gguf", TINY_TOOLS)
    store = CatalogStore(models_dir, "local")
    with store.edit() as cat:
        cat.put(replace(cat.get("tiny-tools"), downloaded=True))
    spawned = []
    for extra in ((), ("--engine", "llama-server", "--llama-server", str(LLAMA_SERVER))):
        out = hive("worker", "spawn", "cpu", "--model", "tiny-tools", "--wait", "--json", *extra, check=True)
        spawned.append(json.loads(out.stdout.strip().splitlines()[-1]))
    try:
        for w in spawned:
            done = client(w["url"]).chat.completions.create(
                model="tiny-tools", messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=200, seed=1
            )
            assert done.choices[0].finish_reason == "tool_calls", w["engine"]
            _check_call((done.choices[0].message.tool_calls or [])[0])
    finally:
        for w in spawned:
            hive("worker", "stop", w["id"], check=True)
