"""Chat prompts from the model's own template, and the tool-call syntax that template teaches its model.

The syntax is learned the way llama.cpp's chat code learns it: render the template with a known tool call and
read back what surrounds the call's JSON object. A template that leaves tools out of the prompt, or renders a
call as something other than a JSON object `{name, arguments}` between fixed text, has no tool syntax here.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from rbee_tui.worker.requests import BadRequest
from rbee_tui.worker.schema import gbnf_literal, schema_grammar

log = logging.getLogger("rbee-worker")
_PROBE_FN = "rbee_probe_fn"
_PROBE_ARGS = {"rbee_probe_arg": "rbee_probe_value"}
_PROBE_TOOL = {
    "type": "function",
    "function": {
        "name": _PROBE_FN,
        "description": "rbee probe",
        "parameters": {"type": "object", "properties": {"rbee_probe_arg": {"type": "string"}}},
    },
}
_PROBE_QUESTION = "rbee_probe_question"
_PROBE_ANSWER = "rbee_probe_answer"


@dataclass(frozen=True)
class ToolSyntax:
    """How a template writes tool calls: prefix, JSON objects joined by separator, suffix."""

    prefix: str
    separator: str | None  # None: the template shows no way to make two calls in one answer
    suffix: str
    name_key: str
    args_key: str
    object_args: bool  # the template takes arguments as objects (it renders them with tojson)

    @property
    def trigger(self) -> str:
        """The text that starts a call in free generation."""
        return self.prefix.strip() or f'{{"{self.name_key}"'

    @property
    def has_tag(self) -> bool:
        """Whether calls open with a tag of their own, after which a lazy grammar can take over."""
        return bool(self.prefix.strip())


@dataclass(frozen=True)
class ToolCall:
    """One call the model made."""

    name: str
    arguments: dict[str, Any]

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        """The call in the OpenAI shape (with `index` for a stream delta)."""
        call: dict[str, Any] = {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)},
        }
        return call if index is None else {"index": index, **call}


def _rename_rule(gbnf: str, old: str, new: str) -> str:
    """Rename a rule everywhere it is named, leaving string literals and character classes alone."""
    out: list[str] = []
    i = 0
    name = re.compile(r"[a-zA-Z0-9-]+")
    while i < len(gbnf):
        c = gbnf[i]
        if c in '"[':
            close = '"' if c == '"' else "]"
            j = i + 1
            while j < len(gbnf) and gbnf[j] != close:
                j += 2 if gbnf[j] == "\\" else 1
            out.append(gbnf[i : j + 1])
            i = j + 1
        elif c == "#":  # a comment runs to the end of the line
            j = gbnf.find("\n", i)
            j = len(gbnf) if j < 0 else j
            out.append(gbnf[i:j])
            i = j
        elif m := name.match(gbnf, i):
            out.append(new if m.group() == old else m.group())
            i = m.end()
        else:
            out.append(c)
            i += 1
    return "".join(out)


class ChatTemplate:
    """A model's chat template (or a plain transcript when it has none usable): prompts, stops, tool syntax."""

    def __init__(self, template: str | None, bos: str, eos: str) -> None:
        self.bos = bos
        self.eos = eos
        self._with_prompt: Any = None
        self._without_prompt: Any = None
        if template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            try:
                self._with_prompt = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
                self._without_prompt = Jinja2ChatFormatter(
                    template=template, eos_token=eos, bos_token=bos, add_generation_prompt=False
                )
            except Exception as exc:  # a template Python's Jinja cannot compile: the transcript still works
                log.warning("the model's chat template cannot be used (%s); chats use a plain transcript", exc)
                self._with_prompt = None

    def _render(self, messages: list[dict[str, Any]], generation: bool = True, **kwargs: Any) -> str:
        formatter = self._with_prompt if generation else self._without_prompt
        text = formatter(messages=messages, **kwargs).prompt
        # Tokenizing adds the model's BOS; a template that writes it too would give two.
        return text[len(self.bos) :] if self.bos and text.startswith(self.bos) else text

    @cached_property
    def turn_end(self) -> str:
        """What the template writes after an assistant's answer (a stop string for free generation)."""
        if self._with_prompt is None:
            return ""
        try:
            user = [{"role": "user", "content": _PROBE_QUESTION}]
            head = self._render(user)
            full = self._render([*user, {"role": "assistant", "content": _PROBE_ANSWER}], generation=False)
        except Exception:
            return ""
        if not full.startswith(head) or _PROBE_ANSWER not in full[len(head) :]:
            return ""
        return full[len(head) :].split(_PROBE_ANSWER, 1)[1].strip()

    @cached_property
    def tool_syntax(self) -> ToolSyntax | None:
        """The template's tool-call syntax, or None when it does not support tool calls."""
        if self._with_prompt is None:
            return None
        user = [{"role": "user", "content": _PROBE_QUESTION}]
        try:
            head = self._render(user, tools=[_PROBE_TOOL])
        except Exception:
            return None
        if _PROBE_FN not in head:
            return None  # the template never shows the model its tools
        for object_args in (True, False):
            syntax = self._learn(user, head, object_args)
            if syntax is not None:
                return syntax
        return None

    def _call_text(self, user: list[dict[str, Any]], head: str, object_args: bool, calls: int) -> str | None:
        args: Any = _PROBE_ARGS if object_args else json.dumps(_PROBE_ARGS)
        call = {"id": "call_rbee_probe", "type": "function", "function": {"name": _PROBE_FN, "arguments": args}}
        message = {"role": "assistant", "content": "", "tool_calls": [call] * calls}
        try:
            full = self._render([*user, message], generation=False, tools=[_PROBE_TOOL])
        except Exception:
            return None
        return full[len(head) :] if full.startswith(head) else None

    def _learn(self, user: list[dict[str, Any]], head: str, object_args: bool) -> ToolSyntax | None:
        one = self._call_text(user, head, object_args, 1)
        if one is None:
            return None
        found = _probe_objects(one)
        if len(found) != 1:
            return None
        start, end, name_key, args_key = found[0]
        prefix, after = one[:start], one[end:]
        # The call ends where the turn would: the model stops there on its own (EOS or the turn-end stop).
        suffix = after.rstrip()
        if self.turn_end and suffix.endswith(self.turn_end):
            suffix = suffix[: -len(self.turn_end)]
        separator = None
        two = self._call_text(user, head, object_args, 2)
        if two is not None:
            pair = _probe_objects(two)
            if len(pair) == 2 and two[: pair[0][0]] == prefix:
                separator = two[pair[0][1] : pair[1][0]]
        return ToolSyntax(prefix, separator, suffix, name_key, args_key, object_args)

    def render(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        tool_choice: Any = None,
        **template_kwargs: Any,
    ) -> tuple[str, tuple[str, ...]]:
        """The prompt for `messages` and the stop strings that end the answer."""
        if self._with_prompt is None:
            lines = [f"{m['role']}: {m.get('content') or ''}" for m in messages]
            return "\n".join(lines) + "\nassistant:", ("\nuser:",)
        syntax = self.tool_syntax if tools else None
        if syntax is not None and syntax.object_args:
            messages = [_object_arguments(m) for m in messages]
        try:
            prompt = self._render(messages, tools=tools or None, tool_choice=tool_choice, **template_kwargs)
        except ValueError as exc:  # the template's raise_exception: it refuses these messages
            raise BadRequest(f"the model's chat template refused the messages: {exc}") from None
        except Exception as exc:
            raise BadRequest(f"the model's chat template failed on these messages: {exc}") from None
        stops = tuple(s for s in (self.eos, self.turn_end) if s)
        return prompt, stops


def _object_arguments(message: dict[str, Any]) -> dict[str, Any]:
    """An assistant message whose tool-call arguments (JSON strings in the OpenAI shape) are objects."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    fixed = []
    for call in calls:
        fn = dict(call["function"])
        try:
            args = json.loads(fn["arguments"])
        except (TypeError, ValueError):
            args = None
        if isinstance(args, dict):
            fn["arguments"] = args
        fixed.append({**call, "function": fn})
    return {**message, "tool_calls": fixed}


def _probe_objects(text: str) -> list[tuple[int, int, str, str]]:
    """(start, end, name key, arguments key) of each probe call rendered in `text`."""
    decoder = json.JSONDecoder()
    found = []
    i = text.find("{")
    while i >= 0:
        try:
            obj, end = decoder.raw_decode(text, i)
        except ValueError:
            i = text.find("{", i + 1)
            continue
        keys = _call_keys(obj, _PROBE_FN)
        if keys is not None:
            found.append((i, end, *keys))
            i = text.find("{", end)
        else:
            i = text.find("{", i + 1)
    return found


def _call_keys(obj: Any, name: str) -> tuple[str, str] | None:
    """The (name key, arguments key) of a two-key call object naming `name` with object arguments."""
    if not isinstance(obj, dict) or len(obj) != 2:
        return None
    name_key = next((k for k, v in obj.items() if v == name), None)
    if name_key is None:
        return None
    args_key = next(k for k in obj if k != name_key)
    return (name_key, args_key) if _arguments(obj[args_key]) is not None else None


def _arguments(value: Any) -> dict[str, Any] | None:
    """Call arguments as an object, whether the template wrote an object or a JSON string of one."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    return value if isinstance(value, dict) else None


def tool_grammar(syntax: ToolSyntax, tools: list[dict[str, Any]], parallel: bool, lazy: bool = False) -> str:
    """A grammar that makes the answer one tool call (or several, when allowed) of `tools`, in `syntax`.

    A lazy grammar starts after the syntax's trigger, which the model writes freely.
    """
    calls = [
        {
            "type": "object",
            "properties": {
                syntax.name_key: {"const": t["function"]["name"]},
                syntax.args_key: t["function"].get("parameters") or {"type": "object"},
            },
            "required": [syntax.name_key, syntax.args_key],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    call = _rename_rule(schema_grammar(schema, [syntax.name_key, syntax.args_key]), "root", "rbee-call")
    many = parallel and syntax.separator is not None
    prefix = syntax.prefix.split(syntax.trigger, 1)[1] if lazy else syntax.prefix
    parts = [gbnf_literal(prefix)] if prefix else []
    parts.append(f"rbee-call ({gbnf_literal(syntax.separator or '')} rbee-call)*" if many else "rbee-call")
    if syntax.suffix:
        parts.append(gbnf_literal(syntax.suffix))
    return f"root ::= {' '.join(parts)}\n{call}"


def parse_tool_calls(text: str, syntax: ToolSyntax, names: set[str]) -> tuple[str, list[ToolCall]]:
    """Split an answer into its content and the tool calls it makes (none when it makes no valid one)."""
    at = text.find(syntax.trigger)
    if at < 0:
        return text, []
    decoder = json.JSONDecoder()
    calls: list[ToolCall] = []
    i = text.find("{", at)
    while i >= 0:
        try:
            obj, end = decoder.raw_decode(text, i)
        except ValueError:
            break
        name = obj.get(syntax.name_key) if isinstance(obj, dict) else None
        args = _arguments(obj.get(syntax.args_key)) if isinstance(obj, dict) else None
        if name not in names or args is None:
            break
        calls.append(ToolCall(name, args))
        i = text.find("{", end)
    if not calls:
        return text, []
    return text[:at].strip(), calls
