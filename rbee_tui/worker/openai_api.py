"""The OpenAI routes of rbee-worker on the embedded engine: /v1/models, /v1/completions and /v1/chat/completions.

Every request is checked by openai_check.py first (params.py's table, then each parameter's value), exactly
as a llama-server worker checks it. Structured answers (response_format, tool calls) come from a grammar that
constrains sampling, so even a model of random weights answers with JSON that parses.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web

from rbee_tui.worker.chat import ToolCall, ToolSyntax, parse_tool_calls, tool_grammar
from rbee_tui.worker.engines import GenerationSummary, Request
from rbee_tui.worker.jobs import WORKER, Job, JobDone, JobFailed, TokenOut, Worker, events
from rbee_tui.worker.openai_check import ANY_OBJECT, Checked, Schema, check_chat, check_completion
from rbee_tui.worker.params import CHAT, COMPLETIONS
from rbee_tui.worker.requests import BadRequest
from rbee_tui.worker.schema import json_object_grammar, schema_grammar
from rbee_tui.worker.sse import on_client_left, open_stream, read_body, sse


@dataclass(frozen=True)
class ToolPlan:
    """Tools a chat may call: in which syntax, which names, and whether the answer must be calls."""

    syntax: ToolSyntax
    names: frozenset[str]
    forced: bool


@dataclass(frozen=True)
class Plan:
    """A validated OpenAI request: what to generate and how to shape the answer."""

    kind: str  # CHAT or COMPLETIONS
    request: Request
    stream: bool
    include_usage: bool
    ends: tuple[str, ...]  # stop strings: the answer is cut before the first one
    tools: ToolPlan | None = None


# -- planning ---------------------------------------------------------------------------------------------


def _format_grammar(checked: Checked) -> str | None:
    """The grammar a response_format asks for (None: free text)."""
    fmt = checked.response_format
    if fmt is None:
        return None
    if fmt == ANY_OBJECT:
        return json_object_grammar()
    assert isinstance(fmt, Schema)
    try:
        return schema_grammar(fmt.schema)
    except BadRequest as exc:
        raise BadRequest(f"{fmt.where}: {exc}", "response_format") from None


async def plan_chat(worker: Worker, body: dict[str, Any]) -> Plan:
    """Validate a chat request and turn it into a prompt, a grammar and an answer shape."""
    chat = worker.chat
    assert chat is not None  # set when the model loaded, and requests wait for that
    checked = check_chat(body, worker.engine.n_ctx, chat.tool_syntax is not None)
    grammar = _format_grammar(checked)
    trigger: str | None = None
    plan_tools = None
    if checked.tools:
        syntax = chat.tool_syntax
        assert syntax is not None  # check_chat refuses tools otherwise
        choice = checked.tool_choice
        forced = choice != "auto"
        if forced or syntax.has_tag:
            # "auto" lets the model choose; once it opens a call, the call follows the tools' schemas.
            try:
                grammar = tool_grammar(
                    syntax, checked.tools, checked.parallel_tool_calls and not isinstance(choice, dict), lazy=not forced
                )
            except BadRequest as exc:  # a tool's parameters schema the converter cannot take
                raise BadRequest(f"tools: {exc}", "tools") from None
            trigger = None if forced else syntax.trigger
        plan_tools = ToolPlan(syntax, frozenset(t["function"]["name"] for t in checked.tools), forced)
    kwargs = {"reasoning_effort": checked.reasoning_effort} if checked.reasoning_effort is not None else {}
    prompt, template_stops = chat.render(
        checked.messages, tools=checked.shown_tools or None, tool_choice=checked.tool_choice, **kwargs
    )
    req = replace(
        checked.request,
        prompt=prompt,
        stop=checked.request.stop + template_stops,
        grammar=grammar,
        grammar_trigger=trigger,
    )
    if grammar is not None and (error := await asyncio.to_thread(worker.engine.grammar_error, grammar)):
        where = "tools" if plan_tools is not None else "response_format"
        raise BadRequest(f"the grammar for this request's {where} does not compile: {error}", where)
    return Plan(CHAT, req, checked.stream, checked.include_usage, req.stop, plan_tools)


def plan_completion(worker: Worker, body: dict[str, Any]) -> Plan:
    """Validate a text completion request."""
    checked = check_completion(body, worker.engine.n_ctx)
    req = checked.request
    return Plan(COMPLETIONS, req, checked.stream, checked.include_usage, req.stop)


# -- answers ----------------------------------------------------------------------------------------------


def _cut(text: str, ends: tuple[str, ...]) -> str:
    """The text before the first stop string (OpenAI leaves the stop string out)."""
    at = min((i for s in ends if (i := text.find(s)) >= 0), default=-1)
    return text if at < 0 else text[:at]


def finish(plan: Plan, summary: GenerationSummary) -> tuple[str | None, list[ToolCall], str]:
    """The answer's content, its tool calls, and its finish reason."""
    text = _cut(summary.text, plan.ends)
    if plan.tools is not None:
        content, calls = parse_tool_calls(text, plan.tools.syntax, set(plan.tools.names))
        if calls:
            return content or None, calls, "tool_calls"
    return text, [], summary.finish_reason


def _usage(summary: GenerationSummary) -> dict[str, int]:
    return {
        "prompt_tokens": summary.prompt_tokens,
        "completion_tokens": summary.tokens_generated,
        "total_tokens": summary.prompt_tokens + summary.tokens_generated,
    }


class Gate:
    """Streams text as it comes, holding back what may be the start of a stop string or of a tool call.

    Once one appears, nothing more is streamed: what follows is cut (a stop) or parsed at the end (a call).
    """

    def __init__(self, markers: tuple[str, ...], closed: bool = False) -> None:
        self.markers = tuple(m for m in markers if m)
        self.text = ""
        self.sent = 0
        self.closed = closed

    def feed(self, piece: str) -> str:
        """The text that is safe to stream now."""
        self.text += piece
        if self.closed:
            return ""
        hits = [i for m in self.markers if (i := self.text.find(m, max(0, self.sent - len(m)))) >= 0]
        if hits:
            out, self.sent, self.closed = self.text[self.sent : min(hits)], min(hits), True
            return out
        keep = 0
        for m in self.markers:
            keep = max(keep, next((k for k in range(len(m) - 1, 0, -1) if self.text.endswith(m[:k])), 0))
        end = max(self.sent, len(self.text) - keep)
        out, self.sent = self.text[self.sent : end], end
        return out

    @property
    def streamed(self) -> str:
        """What has been streamed so far."""
        return self.text[: self.sent]


def _chunk(plan: Plan, jid: str, model: str, finish_reason: str | None, **delta: Any) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
    if plan.kind == CHAT:
        choice["delta"] = delta
    else:
        choice["text"] = delta.get("content", "")
    out = {
        "id": jid,
        "object": "chat.completion.chunk" if plan.kind == CHAT else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }
    if plan.include_usage:
        out["usage"] = None  # as OpenAI: every chunk has the key; only the last one, with no choices, fills it
    return out


async def _stream(request: web.Request, plan: Plan, job: Job, jid: str, model: str) -> web.StreamResponse:
    resp = await open_stream(request)
    tools = plan.tools
    trigger = (tools.syntax.trigger,) if tools is not None else ()
    gate = Gate(plan.ends + trigger, closed=tools is not None and tools.forced)
    try:
        if plan.kind == CHAT:
            await resp.write(sse(None, _chunk(plan, jid, model, None, role="assistant", content="")))
        async for event in events(job):
            if isinstance(event, TokenOut):
                if text := gate.feed(event.text):
                    await resp.write(sse(None, _chunk(plan, jid, model, None, content=text)))
            elif isinstance(event, JobDone):
                summary: GenerationSummary = event.summary
                content, calls, reason = finish(plan, summary)
                # The end of the answer the gate held back: a partial stop string that never completed, say.
                rest_text = (content or "")[len(gate.streamed) :] if (content or "").startswith(gate.streamed) else ""
                if rest_text:
                    await resp.write(sse(None, _chunk(plan, jid, model, None, content=rest_text)))
                if calls:
                    deltas = [c.to_openai(i) for i, c in enumerate(calls)]
                    await resp.write(sse(None, _chunk(plan, jid, model, None, tool_calls=deltas)))
                await resp.write(sse(None, _chunk(plan, jid, model, reason)))
                if plan.include_usage:
                    last = _chunk(plan, jid, model, None)
                    last["choices"], last["usage"] = [], _usage(summary)
                    await resp.write(sse(None, last))
            else:
                await resp.write(sse(None, {"error": {"message": event.message, "type": "server_error"}}))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
    except (ConnectionResetError, asyncio.CancelledError):
        job.cancel.set()  # the client went away: stop generating for nobody
        raise
    return resp


async def _answer(request: web.Request, plan: Plan, job: Job, jid: str, model: str) -> web.Response:
    summary: GenerationSummary | None = None
    watch = on_client_left(request, job.cancel.set)  # the client went away: stop generating for nobody
    try:
        async for event in events(job):
            if isinstance(event, JobDone):
                summary = event.summary
            elif isinstance(event, JobFailed):
                return web.json_response({"error": {"message": event.message, "type": "server_error"}}, status=500)
    finally:
        watch.cancel()
    assert summary is not None
    content, calls, reason = finish(plan, summary)
    choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
    if plan.kind == CHAT:
        choice["message"] = {"role": "assistant", "content": content}
        if calls:
            choice["message"]["tool_calls"] = [c.to_openai() for c in calls]
    else:
        choice["text"] = content
    return web.json_response(
        {
            "id": jid,
            "object": "chat.completion" if plan.kind == CHAT else "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
            "usage": _usage(summary),
        }
    )


def openai_error(exc: BadRequest) -> web.Response:
    """A refusal in the OpenAI error shape, which OpenAI clients turn into their exceptions."""
    kind = "invalid_request_error" if exc.status < 500 else "server_error"
    return web.json_response(
        {"error": {"message": str(exc), "type": kind, "param": exc.param, "code": None}}, status=exc.status
    )


async def _serve(request: web.Request, kind: str) -> web.StreamResponse:
    worker = request.app[WORKER]
    if worker.status != "ready":
        return openai_error(BadRequest(f"the model is {worker.status}", status=503))
    try:
        body = await read_body(request)
        plan = await plan_chat(worker, body) if kind == CHAT else plan_completion(worker, body)
        jid = f"{'chatcmpl' if kind == CHAT else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        job = worker.submit(plan.request, jid)
    except BadRequest as exc:
        return openai_error(exc)
    if plan.stream:
        return await _stream(request, plan, job, jid, worker.model_id)
    return await _answer(request, plan, job, jid, worker.model_id)


async def completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/completions."""
    return await _serve(request, COMPLETIONS)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions."""
    return await _serve(request, CHAT)


async def models(request: web.Request) -> web.Response:
    """GET /v1/models: the one model this worker serves."""
    worker = request.app[WORKER]
    return model_list(worker.model_id, worker.started)


def model_list(model_id: str, started: float) -> web.Response:
    """The /v1/models answer for a worker serving `model_id` since `started` (both engines)."""
    return web.json_response(
        {"object": "list", "data": [{"id": model_id, "object": "model", "created": int(started), "owned_by": "rbee"}]}
    )


def add_routes(app: web.Application) -> None:
    """Add the OpenAI routes to a worker's application."""
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
