"""Validation of request bodies: every mistake becomes a 4xx with a sentence, never a crash."""

from __future__ import annotations

import json
from typing import Any

from rbee_tui.worker.engines import Request

EXECUTE_FIELDS = {"job_id", "prompt", "max_tokens", "temperature", "seed", "top_k", "top_p", "stop"}
MAX_DEPTH = 64  # deeper JSON is no request anyone writes, and would recurse through templates and grammars
# Parameters accepted and ignored (params.py says why each is harmless): only their type is checked.
_IGNORED_TYPES: dict[str, type] = {
    "model": str,
    "user": str,
    "metadata": dict,
    "store": bool,
    "service_tier": str,
    "safety_identifier": str,
    "prompt_cache_key": str,
}
_JSON_TYPES = {str: "a string", dict: "an object", bool: "true or false"}
_TEXT_ONLY = {"image_url": "images", "input_audio": "audio", "file": "files", "input_file": "files"}
ROLES = ("system", "developer", "user", "assistant", "tool")


class BadRequest(Exception):
    """A request the worker refuses with `status` (400 unless said) and this message; `param` names the field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.status = status


def _no_constant(name: str) -> Any:
    raise BadRequest(f"the body is not valid JSON: {name} is not a JSON number")


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object of valid Unicode, at most MAX_DEPTH levels deep."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"the body is not valid JSON: it is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        body = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise BadRequest(f"the body nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:  # JSONDecodeError, and ints past Python's digit limit
        raise BadRequest(f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    _check_tree(body)
    return body


def _check_tree(body: Any) -> None:
    stack = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise BadRequest(f"the body nests deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            stack.extend((k, depth) for k in value)
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                # JSON lets "\ud800" through; it is no character, and llama.cpp's tokenizer cannot take it.
                raise BadRequest(
                    "the body holds a lone surrogate escape (\\ud800-\\udfff): not valid Unicode"
                ) from None


def _int(body: dict[str, Any], key: str, default: int | None, lo: int | None = None, hi: int | None = None) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRequest(f"{key} must be an integer, got {type(value).__name__}", key)
    if lo is not None and value < lo:
        raise BadRequest(f"{key} must be at least {lo}, got {value}", key)
    if hi is not None and value > hi:
        raise BadRequest(f"{key} must be at most {hi}, got {value}", key)
    return value


def _float(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise BadRequest(f"{key} must be a number, got {type(value).__name__}", key)
    if not lo <= value <= hi:
        raise BadRequest(f"{key} must be between {lo} and {hi}, got {value}", key)
    return float(value)


def bool_field(body: dict[str, Any], key: str, default: bool) -> bool:
    """A true/false field (null: the default)."""
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadRequest(f"{key} must be true or false, got {type(value).__name__}", key)
    return value


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,) if stop else ()
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        return tuple(s for s in stop if s)
    raise BadRequest("stop must be a string or a list of up to 4 strings", "stop")


def _prompt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str):
        raise BadRequest(f"prompt must be a string, got {type(value).__name__}", "prompt")
    if not value.strip():
        raise BadRequest("prompt is empty", "prompt")
    return value


def check_ignored_types(body: dict[str, Any]) -> None:
    """Even a parameter the worker ignores must have its OpenAI type."""
    for key, kind in _IGNORED_TYPES.items():
        value = body.get(key)
        if value is not None and not isinstance(value, kind):
            raise BadRequest(f"{key} must be {_JSON_TYPES[kind]}, got {type(value).__name__}", key)


def build_request(
    body: dict[str, Any], n_ctx: int, *, openai: bool, prompt: str | None = None, max_tokens: int | None = None
) -> Request:
    """A validated Request from a `/execute` (strict) or OpenAI body (whose parameters params.py has checked)."""
    if not openai:
        unknown = sorted(set(body) - EXECUTE_FIELDS)
        if unknown:
            raise BadRequest(f"unknown field(s): {', '.join(unknown)}; known: {', '.join(sorted(EXECUTE_FIELDS))}")
        if "prompt" not in body:
            raise BadRequest("prompt is required")
    elif _int(body, "n", 1, 1, 1) != 1:
        raise BadRequest("n must be 1", "n")
    text = prompt if prompt is not None else _prompt(body.get("prompt"))
    key = "max_completion_tokens" if openai and body.get("max_completion_tokens") is not None else "max_tokens"
    default_max = max_tokens if max_tokens is not None else 16 if openai else 100
    return Request(
        prompt=text,
        max_tokens=_int(body, key, default_max, 1, n_ctx),
        temperature=_float(body, "temperature", 1.0 if openai else 0.0, 0.0, 5.0),
        seed=_int(body, "seed", None, 0, 2**32 - 1),
        top_k=_int(body, "top_k", 40, 0, 100_000),
        top_p=_float(body, "top_p", 0.95 if not openai else 1.0, 0.0, 1.0),
        stop=_stop(body),
        min_p=_float(body, "min_p", 0.05, 0.0, 1.0),
        repeat_penalty=_float(body, "repeat_penalty", 1.0, 0.0, 10.0),
        frequency_penalty=_float(body, "frequency_penalty", 0.0, -2.0, 2.0),
        presence_penalty=_float(body, "presence_penalty", 0.0, -2.0, 2.0),
    )


def job_id(body: dict[str, Any], fallback: str) -> str:
    """The caller's job id, or a generated one."""
    value = body.get("job_id", fallback)
    if not isinstance(value, str) or not value or len(value) > 128:
        raise BadRequest("job_id must be a non-empty string of at most 128 characters")
    return value


def _content(value: Any, where: str, role: str) -> str | None:
    """A message's content as text: a string, null, or text parts joined with newlines (as llama-server does)."""
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise BadRequest(f"{where}.content must be a string or a list of content parts", "messages")
    texts = []
    for j, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(kind, str):
            raise BadRequest(f"{where}.content[{j}] must be an object with a string type", "messages")
        if kind == "text" or (kind == "refusal" and role == "assistant"):
            text = part.get(kind)
            if not isinstance(text, str):
                raise BadRequest(f"{where}.content[{j}] of type {kind!r} needs a string {kind}", "messages")
            texts.append(text)
        elif kind in _TEXT_ONLY:
            raise BadRequest(
                f"{where}.content[{j}] is of type {kind!r}: this model takes text only, not {_TEXT_ONLY[kind]}",
                "messages",
            )
        else:
            raise BadRequest(f"{where}.content[{j}] has an unknown content part type {kind!r}", "messages")
    return "\n".join(texts)


def _tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise BadRequest(f"{where}.tool_calls must be a list", "messages")
    calls = []
    for j, call in enumerate(value):
        fn = call.get("function") if isinstance(call, dict) else None
        if (
            not isinstance(fn, dict)
            or not isinstance(fn.get("name"), str)
            or not isinstance(fn.get("arguments"), str)
            or call.get("type", "function") != "function"
        ):
            raise BadRequest(
                f"{where}.tool_calls[{j}] must be a function call with a string name and string arguments", "messages"
            )
        calls.append(
            {
                "id": str(call.get("id") or f"call_{j}"),
                "type": "function",
                "function": {k: fn[k] for k in ("name", "arguments")},
            }
        )
    return calls


def chat_messages(messages: Any) -> list[dict[str, Any]]:
    """OpenAI chat messages as the plain dicts chat templates read: string content, known fields only."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"{where} needs a string role and a string content", "messages")
        role = m["role"]
        if role not in ROLES:
            hint = "; use tool" if role == "function" else ""
            raise BadRequest(f"{where}.role {role!r} is not one of {', '.join(ROLES)}{hint}", "messages")
        msg: dict[str, Any] = {
            # Templates know system, not developer (the newer name for the same thing): llama-server maps it too.
            "role": "system" if role == "developer" else role,
            "content": _content(m.get("content"), where, role),
        }
        if role == "assistant" and m.get("tool_calls"):
            msg["tool_calls"] = _tool_calls(m["tool_calls"], where)
        elif msg["content"] is None:
            raise BadRequest(f"{where} needs a string role and a string content", "messages")
        if role == "assistant" and msg["content"] is None:
            msg["content"] = ""  # templates concatenate content; a call-only answer has none
        if role == "tool":
            if not isinstance(m.get("tool_call_id"), str):
                raise BadRequest(f"{where} (role tool) needs a string tool_call_id", "messages")
            msg["tool_call_id"] = m["tool_call_id"]
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        out.append(msg)
    if not any(m["content"].strip() or m.get("tool_calls") for m in out):
        raise BadRequest("every message is empty", "messages")
    return out
