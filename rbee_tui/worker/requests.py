"""Validation of request bodies: every mistake becomes a 400 with a sentence, never a crash."""

from __future__ import annotations

import json
from typing import Any

from rbee_tui.worker.engines import Request

EXECUTE_FIELDS = {"job_id", "prompt", "max_tokens", "temperature", "seed", "top_k", "top_p", "stop"}
# OpenAI clients send many optional fields; these we honour, the rest we accept and ignore.
OPENAI_FIELDS = {
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "seed",
    "top_p",
    "top_k",
    "stop",
    "stream",
    "n",
}


class BadRequest(Exception):
    """A request the worker refuses with 400 and this message."""


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def _int(body: dict[str, Any], key: str, default: int | None, lo: int | None = None, hi: int | None = None) -> Any:
    value = body.get(key, default)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRequest(f"{key} must be an integer, got {type(value).__name__}")
    if lo is not None and value < lo:
        raise BadRequest(f"{key} must be at least {lo}, got {value}")
    if hi is not None and value > hi:
        raise BadRequest(f"{key} must be at most {hi}, got {value}")
    return value


def _float(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key, default)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise BadRequest(f"{key} must be a number, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise BadRequest(f"{key} must be between {lo} and {hi}, got {value}")
    return float(value)


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,) if stop else ()
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        return tuple(s for s in stop if s)
    raise BadRequest("stop must be a string or a list of up to 4 strings")


def _prompt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str):
        raise BadRequest(f"prompt must be a string, got {type(value).__name__}")
    if not value.strip():
        raise BadRequest("prompt is empty")
    return value


def build_request(body: dict[str, Any], n_ctx: int, *, openai: bool, prompt: str | None = None) -> Request:
    """A validated Request from a `/execute` (strict) or OpenAI (lenient) body."""
    if not openai:
        unknown = sorted(set(body) - EXECUTE_FIELDS)
        if unknown:
            raise BadRequest(f"unknown field(s): {', '.join(unknown)}; known: {', '.join(sorted(EXECUTE_FIELDS))}")
        if "prompt" not in body:
            raise BadRequest("prompt is required")
    elif _int(body, "n", 1, 1, 1) != 1:
        raise BadRequest("n must be 1")
    text = prompt if prompt is not None else _prompt(body.get("prompt"))
    key = "max_completion_tokens" if openai and "max_completion_tokens" in body else "max_tokens"
    max_tokens = _int(body, key, 16 if openai else 100, 1, n_ctx)
    return Request(
        prompt=text,
        max_tokens=max_tokens,
        temperature=_float(body, "temperature", 1.0 if openai else 0.0, 0.0, 5.0),
        seed=_int(body, "seed", None, 0, 2**32 - 1),
        top_k=_int(body, "top_k", 40, 0, 100_000),
        top_p=_float(body, "top_p", 0.95 if not openai else 1.0, 0.0, 1.0),
        stop=_stop(body),
    )


def job_id(body: dict[str, Any], fallback: str) -> str:
    """The caller's job id, or a generated one."""
    value = body.get("job_id", fallback)
    if not isinstance(value, str) or not value or len(value) > 128:
        raise BadRequest("job_id must be a non-empty string of at most 128 characters")
    return value


def chat_prompt(messages: Any, template: str | None, bos: str, eos: str) -> tuple[str, tuple[str, ...]]:
    """Render chat messages with the model's template, or a plain `role: text` transcript when it has none."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise BadRequest("each message needs a string role and a string content")
    if not any(m["content"].strip() for m in messages):
        raise BadRequest("every message is empty")
    if template:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        try:
            rendered = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)(messages=messages)
            return rendered.prompt, tuple(rendered.stop or ()) if isinstance(rendered.stop, list) else (
                (rendered.stop,) if rendered.stop else ()
            )
        except Exception:
            pass
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nassistant:", ("\nuser:",)
