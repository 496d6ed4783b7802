"""What a llama-server worker sends llama-server, and how llama-server's answers become the worker's own.

Requests arrive checked (openai_check.py) and leave as llama-server bodies with every sampling parameter
spelled out, so both engines sample alike. Answers come back in llama-server's OpenAI dialect and leave in
the embedded worker's: its ids and model name, no llama-server extras, usage in a chunk of its own at the
end of a stream when the client asked for it, and `/execute`'s token events, one per generated token.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from rbee_tui.worker.engines import GenerationSummary, Request
from rbee_tui.worker.openai_check import ANY_OBJECT, Checked, Schema
from rbee_tui.worker.params import CHAT
from rbee_tui.worker.requests import BadRequest
from rbee_tui.worker.schema import bounded

# llama-server features the worker lets through (params.py: supported on llama-server only).
_PASSED = ("logprobs", "top_logprobs", "logit_bias")
_FINISH = {"limit": "length", "eos": "stop", "word": "stop"}


def _sampling(req: Request) -> dict[str, Any]:
    out: dict[str, Any] = {
        "temperature": req.temperature,
        "top_k": req.top_k,
        "top_p": req.top_p,
        "min_p": req.min_p,
        "repeat_penalty": req.repeat_penalty,
        "frequency_penalty": req.frequency_penalty,
        "presence_penalty": req.presence_penalty,
    }
    if req.seed is not None:
        out["seed"] = req.seed
    if req.stop:
        out["stop"] = list(req.stop)
    return out


def openai_body(checked: Checked, body: dict[str, Any]) -> dict[str, Any]:
    """The body to send llama-server's /v1 route for a checked request (`body`: the client's, for pass-through)."""
    req = checked.request
    # Always a stream, with its usage (kept back unless the client asked for it too): llama-server stops a
    # generation whose stream is closed, but not one it answers whole, so a client that leaves (or a /cancel)
    # could not stop it. A whole answer is put together here (Answers.whole).
    out: dict[str, Any] = {"max_tokens": req.max_tokens, **_sampling(req), "stream": True}
    out["stream_options"] = {"include_usage": True}
    # A clean cache per request, as the embedded engine has: reusing the last prompt's prefix changes the
    # batches, so the same seeded request could answer differently (and stale state is the seeds' regression).
    out["cache_prompt"] = False
    out.update({k: body[k] for k in _PASSED if body.get(k) is not None})
    if checked.kind != CHAT:
        out["prompt"] = req.prompt
        return out
    out["messages"] = checked.messages
    choice = checked.tool_choice
    if checked.tools and isinstance(choice, dict):
        # llama-server takes a named tool_choice for "auto": one required call of that one tool is the same ask.
        out.update(tools=checked.tools, tool_choice="required", parallel_tool_calls=False)
    elif checked.shown_tools:
        out.update(tools=checked.shown_tools, tool_choice=choice, parallel_tool_calls=checked.parallel_tool_calls)
    if checked.reasoning_effort is not None:
        out["reasoning_effort"] = checked.reasoning_effort
    fmt = checked.response_format
    if fmt == ANY_OBJECT:
        out["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, Schema):
        # Integer bounds in the two-sided form: llama.cpp's converter mishandles a one-sided bound of 3+ digits.
        out["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": bounded(fmt.schema)},
        }
    return out


def execute_body(req: Request) -> dict[str, Any]:
    """The body to send llama-server's /completion for an `/execute` request: a clean cache, token ids back."""
    return {
        "prompt": req.prompt,
        "n_predict": req.max_tokens,
        **_sampling(req),
        "stream": True,
        "cache_prompt": False,
        "return_tokens": True,
    }


def upstream_error(status: int, raw: bytes) -> BadRequest:
    """llama-server's error answer as the worker's own (its context error in the embedded worker's words)."""
    try:
        err = json.loads(raw).get("error")
    except (ValueError, AttributeError):
        err = None
    if not isinstance(err, dict):
        err = {"message": raw.decode("utf-8", "replace").strip() or f"llama-server answered {status}"}
    if err.get("type") == "exceed_context_size_error" and "n_prompt_tokens" in err:
        return BadRequest(f"the prompt is {err['n_prompt_tokens']} tokens; the context holds {err.get('n_ctx')}")
    message = " ".join(str(err.get("message") or f"llama-server answered {status}").split())
    return BadRequest(message, status=status)


async def sse_data(content: Any) -> AsyncIterator[str]:
    """The `data:` payloads of a server-sent event stream, each as soon as its event is complete."""
    buf = b""
    async for piece in content.iter_any():
        buf += piece
        while (end := buf.find(b"\n\n")) >= 0:
            block, buf = buf[:end], buf[end + 2 :]
            data = [line[5:].strip() for line in block.replace(b"\r", b"").split(b"\n") if line.startswith(b"data:")]
            if data:
                yield b"\n".join(data).decode("utf-8", "replace")


def _usage(usage: Any) -> dict[str, int] | None:
    if not isinstance(usage, dict):
        return None
    return {k: int(usage.get(k) or 0) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


class Answers:
    """Turns one request's answers from llama-server into the worker's: its id and model, OpenAI's shape."""

    def __init__(self, kind: str, jid: str, model: str, include_usage: bool = False) -> None:
        self.kind = kind
        self.jid = jid
        self.model = model
        self.include_usage = include_usage
        self.usage: dict[str, int] | None = None
        self.call_ids: dict[str, str] = {}

    def _call_id(self, theirs: Any) -> str:
        # Ids of the embedded worker's form; the same call keeps its id across the chunks that carry it.
        return self.call_ids.setdefault(str(theirs), f"call_{uuid.uuid4().hex[:24]}")

    def _head(self, doc: dict[str, Any], stream: bool) -> dict[str, Any]:
        chat = self.kind == CHAT
        obj = ("chat.completion.chunk" if stream else "chat.completion") if chat else "text_completion"
        return {"id": self.jid, "object": obj, "created": int(doc.get("created") or time.time()), "model": self.model}

    def _calls(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{**c, "id": self._call_id(c["id"])} if c.get("id") else c for c in calls]

    def whole(self, chunks: list[dict[str, Any]]) -> dict[str, Any]:
        """The whole answer a stream's chunks (llama-server's) make, as llama-server would have answered it."""
        text: list[str] = []
        reasoning: list[str] = []
        calls: dict[int, dict[str, Any]] = {}
        tokens: list[Any] = []
        finish, created, usage = None, None, None
        for doc in chunks:
            created = created or doc.get("created")
            usage = doc.get("usage") or usage
            for c in doc.get("choices") or []:
                finish = c.get("finish_reason") or finish
                tokens += (c.get("logprobs") or {}).get("content") or []
                delta = c.get("delta") or {}
                text.append((delta.get("content") if self.kind == CHAT else c.get("text")) or "")
                reasoning.append(delta.get("reasoning_content") or "")
                for part in delta.get("tool_calls") or []:
                    call = calls.setdefault(part.get("index", 0), {"type": "function", "function": {}})
                    call["id"] = call.get("id") or part.get("id")
                    for key, value in (part.get("function") or {}).items():
                        call["function"][key] = call["function"].get(key, "") + (value or "")
        choice: dict[str, Any] = {
            "index": 0,
            "finish_reason": finish,
            "logprobs": {"content": tokens} if tokens else None,
        }
        if self.kind == CHAT:
            message: dict[str, Any] = {"role": "assistant", "content": "".join(text)}
            if any(reasoning):
                message["reasoning_content"] = "".join(reasoning)
            if calls:
                message["tool_calls"] = [calls[i] for i in sorted(calls)]
            choice["message"] = message
        else:
            choice["text"] = "".join(text)
        return self.answer({"created": created, "choices": [choice], "usage": usage})

    def answer(self, doc: dict[str, Any]) -> dict[str, Any]:
        """A whole (non-streamed) answer."""
        out = self._head(doc, stream=False)
        choices = []
        for c in doc.get("choices") or []:
            choice: dict[str, Any] = {"index": c.get("index", 0), "finish_reason": c.get("finish_reason")}
            choice["logprobs"] = c.get("logprobs")
            if self.kind == CHAT:
                message = dict(c.get("message") or {"role": "assistant", "content": ""})
                if message.get("tool_calls"):
                    message["tool_calls"] = self._calls(message["tool_calls"])
                    message["content"] = message.get("content") or None  # OpenAI: null beside tool calls
                choice["message"] = message
            else:
                choice["text"] = c.get("text", "")
            choices.append(choice)
        out["choices"] = choices
        out["usage"] = _usage(doc.get("usage"))
        return out

    def chunk(self, doc: dict[str, Any]) -> dict[str, Any] | None:
        """A chunk of a stream, or None for one to leave out (the usage, which `last` sends)."""
        if (usage := _usage(doc.get("usage"))) is not None:
            self.usage = usage  # a chunk of its own (chat), or on the finish chunk (completions)
        if not doc.get("choices"):
            return None
        out = self._head(doc, stream=True)
        choices = []
        for c in doc["choices"]:
            choice: dict[str, Any] = {"index": c.get("index", 0), "finish_reason": c.get("finish_reason")}
            choice["logprobs"] = c.get("logprobs")
            if self.kind == CHAT:
                delta = dict(c.get("delta") or {})
                if "role" in delta and delta.get("content") is None:
                    delta["content"] = ""  # the first chunk, as OpenAI sends it
                if delta.get("tool_calls"):
                    delta["tool_calls"] = self._calls(delta["tool_calls"])
                choice["delta"] = delta
            else:
                choice["text"] = c.get("text", "")
            choices.append(choice)
        out["choices"] = choices
        if self.include_usage:
            out["usage"] = None  # as OpenAI: every chunk has the key; only the last one, with no choices, fills it
        return out

    def last(self) -> dict[str, Any] | None:
        """The usage chunk a stream ends with, when the client asked for it."""
        if not self.include_usage or self.usage is None:
            return None
        return {**self._head({}, stream=True), "choices": [], "usage": self.usage}

    def cancelled(self, stream: bool) -> dict[str, Any]:
        """A chunk (or whole answer) that ends a request cancelled before it finished."""
        choice: dict[str, Any] = {"index": 0, "finish_reason": "cancelled", "logprobs": None}
        if self.kind == CHAT:
            choice["delta" if stream else "message"] = {} if stream else {"role": "assistant", "content": ""}
        else:
            choice["text"] = ""
        out = {**self._head({}, stream=stream), "choices": [choice]}
        if not stream:
            out["usage"] = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        elif self.include_usage:
            out["usage"] = None
        return out


@dataclass
class Tokens:
    """An `/execute` generation as llama-server streams it, turned into one event per generated token."""

    started: float = field(default_factory=time.perf_counter)
    first: float | None = None
    last: float | None = None
    count: int = 0  # tokens llama-server has reported
    prompt_tokens: int = 0
    pieces: list[str] = field(default_factory=list)
    held: tuple[str, int | None] | None = None  # an empty token: the end-of-generation token, if the next says so
    final: dict[str, Any] | None = None

    def feed(self, doc: dict[str, Any]) -> list[tuple[str, int | None]]:
        """The (text, token id) events a chunk of llama-server's /completion stream makes."""
        out: list[tuple[str, int | None]] = []
        final = bool(doc.get("stop"))
        if self.held is not None and not (final and doc.get("stop_type") == "eos"):
            out.append(self.held)
        self.held = None
        self.prompt_tokens = int(doc.get("tokens_evaluated") or self.prompt_tokens)
        total = int(doc.get("tokens_predicted") or (self.count if final else self.count + 1))
        n, self.count = total - self.count, max(total, self.count)
        if final:
            # Tokens it generated but never sent: the first bytes of a character the limit cut.
            self.final = doc
            return self._emit(out + [("", None)] * max(n, 0))
        now = time.perf_counter()
        self.first = self.first or now
        self.last = now
        n = max(n, 1)
        ids = doc.get("tokens") or []
        text = doc.get("content") or ""
        # llama-server holds a character's first bytes until it is whole and then sends the tokens' text at
        # once: the tokens before carry no text, as in the embedded worker's stream.
        out += [("", None)] * (n - 1)
        last = (text, ids[-1] if ids else None)
        if text or n > 1:
            out.append(last)
        else:
            self.held = last  # an empty token: the end of generation, unless more follows
        return self._emit(out)

    def _emit(self, events: list[tuple[str, int | None]]) -> list[tuple[str, int | None]]:
        self.pieces += [t for t, _ in events]
        return events

    @property
    def emitted(self) -> int:
        """Token events sent so far."""
        return len(self.pieces)

    def summary(self, cancelled: bool) -> GenerationSummary:
        """The generation's summary, in the embedded worker's numbers."""
        n, final = self.emitted, self.final or {}
        if self.first is None and not final:  # cancelled before it started
            return GenerationSummary(0, self.prompt_tokens, 0.0, 0.0, 0.0, 0.0, "cancelled", "")
        timings = final.get("timings") or {}
        first = self.first or time.perf_counter()
        ttft = (first - self.started) * 1000.0
        decode_s = (self.last or first) - first
        reason = "cancelled" if cancelled else _FINISH.get(str(final.get("stop_type")), "stop")
        if cancelled or not timings:  # measured here: llama-server never said
            tps = round((n - 1) / decode_s, 2) if n > 1 and decode_s > 0 else 0.0
            pps = round(self.prompt_tokens / (ttft / 1000.0), 2) if ttft > 0 else 0.0
            total = round((time.perf_counter() - self.started) * 1000.0, 3)
        else:
            tps = round(float(timings.get("predicted_per_second") or 0.0), 2)
            pps = round(float(timings.get("prompt_per_second") or 0.0), 2)
            total = round(float(timings.get("prompt_ms") or 0.0) + float(timings.get("predicted_ms") or 0.0), 3)
        return GenerationSummary(
            tokens_generated=n,
            prompt_tokens=int(timings.get("prompt_n") or self.prompt_tokens),
            ttft_ms=round(ttft, 3),
            tokens_per_sec=tps,
            prompt_tokens_per_sec=pps,
            total_ms=total,
            finish_reason=reason,
            text="".join(self.pieces),
        )
