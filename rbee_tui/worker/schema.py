"""JSON schemas as grammars: which constraints a worker can enforce, and the GBNF the embedded engine samples with.

Both engines take the same schemas: llama-server converts them with llama.cpp's own converter, the embedded
engine with llama-cpp-python's, fixed here where it falls short of llama.cpp's (integer bounds, string
constants with quotes, backslashes or characters outside the BMP). A constraint neither can enforce is
refused by `check_schema`, so an answer never breaks the schema it was asked to fit.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from rbee_tui.worker.requests import BadRequest

# The binding's converter lets raw control characters into strings, which strict JSON parsers refuse;
# llama.cpp's own converter excludes them. Same rule, taken from there.
_CHAR_RULE = r'char ::= [^"\\\x7F\x00-\x1F] | [\\] (["\\bfnrt] | "u" [0-9a-fA-F]{4})'
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
# Constraints neither converter turns into grammar rules (bounds are enforced on integers only, as llama.cpp's
# converter does): a schema using one is refused, since the answer could break it.
_UNENFORCED = (
    "multipleOf",
    "uniqueItems",
    "not",
    "if",
    "then",
    "else",
    "minProperties",
    "maxProperties",
    "patternProperties",
    "propertyNames",
    "dependentRequired",
    "dependentSchemas",
    "contains",
    "unevaluatedProperties",
    "unevaluatedItems",
)
# An unbounded side of an integer range: llama.cpp's integers have at most 16 digits too.
INT_LIMIT = 10**16 - 1
_SURROGATE_PAIR = re.compile(r"\\u(d[89ab][0-9a-f]{2})\\u(d[c-f][0-9a-f]{2})", re.I)


def gbnf_literal(text: str) -> str:
    """`text` as a GBNF string literal."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return '"' + escaped.replace("\t", "\\t") + '"'


def _unenforced(schema: Any) -> str | None:
    """Why `schema` (or a schema inside it) uses a constraint the grammar would not enforce, or None."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            continue
        if found := next((k for k in _UNENFORCED if k in node), None):
            return f"the JSON schema uses {found!r}, which the worker's grammar cannot enforce"
        if node.get("type") != "integer" and (found := next((k for k in _BOUNDS if k in node), None)):
            return (
                f'the JSON schema uses {found!r} on a schema whose type is not "integer": the worker\'s grammar '
                "enforces bounds on integers only"
            )
        for key in ("properties", "$defs", "definitions"):
            if isinstance(node.get(key), dict):
                stack.extend(node[key].values())
        for key in ("anyOf", "oneOf", "allOf", "prefixItems", "items"):
            if isinstance(node.get(key), list):
                stack.extend(node[key])
        stack.extend(node[key] for key in ("items", "additionalProperties") if isinstance(node.get(key), dict))
    return None


def _bound(node: dict[str, Any], key: str, up: bool) -> int | None:
    """An integer bound, a fractional one rounded inwards to the integers it still admits (as llama.cpp does)."""
    value = node.get(key)
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise BadRequest(f"the JSON schema's {key} must be a number, got {json.dumps(value)}")
    return math.ceil(value) if up else math.floor(value)


def integer_bounds(node: dict[str, Any]) -> tuple[int, int]:
    """The (lowest, highest) integer an integer schema admits; a missing bound is the longest 16-digit number."""
    lo = _bound(node, "minimum", True)
    if lo is None and (ex := _bound(node, "exclusiveMinimum", False)) is not None:
        lo = ex + 1
    hi = _bound(node, "maximum", False)
    if hi is None and (ex := _bound(node, "exclusiveMaximum", True)) is not None:
        hi = ex - 1
    lo = -INT_LIMIT if lo is None else lo
    hi = INT_LIMIT if hi is None else hi
    if lo > hi:
        raise BadRequest(f"the JSON schema admits no integer: nothing lies between {lo} and {hi}")
    return lo, hi


def check_schema(schema: Any) -> None:
    """BadRequest when a schema asks for something the grammar would not enforce (both engines refuse the same)."""
    if (why := _unenforced(schema)) is not None:
        raise BadRequest(why)
    stack = [schema]
    while stack:  # bounds that cannot be read, or that admit nothing, are the client's mistake
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("type") == "integer":
                integer_bounds(node)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def int_range_gbnf(lo: int, hi: int, out: list[str]) -> None:
    """GBNF for the integers from `lo` to `hi`, appended to `out`.

    llama.cpp's build_min_max_int (common/json-schema-to-grammar.cpp) for two bounds, line for line. Its
    one-sided branches let wrong numbers through (a minimum of 105 admits 15), so a one-sided range is made
    two-sided first (`bounded`), here and for llama-server alike.
    """

    def digits(a: str, b: str) -> None:
        out.append(f"[{a}]" if a == b else f"[{a}-{b}]")

    def more(n: int) -> None:
        out.append("[0-9]" if n == 1 else f"[0-9]{{{n}}}")

    def uniform(frm: str, to: str) -> None:
        i = 0
        while i < len(frm) and i < len(to) and frm[i] == to[i]:
            i += 1
        if i > 0:
            out.append(f'"{frm[:i]}"')
        if i >= len(frm) or i >= len(to):
            return
        if i > 0:
            out.append(" ")
        sub = len(frm) - i - 1
        if sub <= 0:
            out.append(f"[{frm[i]}-{to[i]}]")
            return
        frm_sub, to_sub, zeros, nines = frm[i + 1 :], to[i + 1 :], "0" * sub, "9" * sub
        reached = False
        out.append("(")
        if frm_sub == zeros:
            digits(frm[i], chr(ord(to[i]) - 1))
            out.append(" ")
            more(sub)
        else:
            out.append(f"[{frm[i]}] (")
            uniform(frm_sub, nines)
            out.append(")")
            if ord(frm[i]) < ord(to[i]) - 1:
                out.append(" | ")
                if to_sub == nines:
                    digits(chr(ord(frm[i]) + 1), to[i])
                    reached = True
                else:
                    digits(chr(ord(frm[i]) + 1), chr(ord(to[i]) - 1))
                out.append(" ")
                more(sub)
        if not reached:
            out.append(" | ")
            digits(to[i], to[i])
            out.append(" ")
            uniform(zeros, to_sub)
        out.append(")")

    if lo < 0 and hi < 0:
        out.append('"-" (')
        int_range_gbnf(-hi, -lo, out)
        out.append(")")
        return
    if lo < 0:
        out.append('"-" (')
        int_range_gbnf(0, -lo, out)
        out.append(") | ")
        lo = 0
    low, high = str(lo), str(hi)
    for n in range(len(low), len(high)):
        uniform(low, "9" * n)
        low = "1" + "0" * n
        out.append(" | ")
    uniform(low, high)


def bounded(schema: Any) -> Any:
    """`schema` with every bounded integer given both bounds, as integers (the form both converters get right)."""
    if isinstance(schema, list):
        return [bounded(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: bounded(v) for k, v in schema.items()}
    if out.get("type") == "integer" and any(k in out for k in _BOUNDS):
        lo, hi = integer_bounds(out)
        for key in _BOUNDS:
            out.pop(key, None)
        out.update(minimum=lo, maximum=hi)
    return out


def _converter(prop_order: list[str] | None) -> Any:
    """llama-cpp-python's schema converter, with integer bounds and exact string constants."""
    from llama_cpp.llama_grammar import RESERVED_NAMES, SchemaConverter

    class Converter(SchemaConverter):  # type: ignore[misc]
        def _format_literal(self, literal: str) -> str:
            # json.dumps writes a character outside the BMP as a surrogate pair of \u escapes, which GBNF reads
            # as two code points (invalid UTF-8, U+FFFD in the answer): one \U escape is the character itself.
            literal = _SURROGATE_PAIR.sub(
                lambda m: f"\\U{0x10000 + ((int(m[1], 16) - 0xD800) << 10) + int(m[2], 16) - 0xDC00:08X}", literal
            )
            return str(super()._format_literal(literal))

        def _generate_constant_rule(self, value: Any) -> str:
            # The binding leaves backslashes unescaped, so a constant holding a quote or a backslash broke the
            # grammar or changed the value; the JSON text is produced exactly as json.dumps writes it.
            return gbnf_literal(json.dumps(value, ensure_ascii=False))

        def visit(self, schema: Any, name: str) -> str:
            if isinstance(schema, dict) and schema.get("type") == "integer" and any(k in schema for k in _BOUNDS):
                lo, hi = integer_bounds(schema)
                out = ["("]
                int_range_gbnf(lo, hi, out)
                out.append(") space")
                return str(self._add_rule(name + "-" if name in RESERVED_NAMES else name or "root", "".join(out)))
            return str(super().visit(schema, name))

    order = {key: i for i, key in enumerate(prop_order or [])}
    return Converter(prop_order=order, allow_fetch=False, dotall=False, raw_pattern=False)


def schema_grammar(schema: Any, prop_order: list[str] | None = None) -> str:
    """A GBNF grammar (rule `root`) for JSON that fits `schema`; BadRequest when it cannot be converted."""
    check_schema(schema)
    try:
        converter = _converter(prop_order)
        converter.visit(converter.resolve_refs(schema, "request"), "")
        gbnf = converter.format_grammar()
    except BadRequest:
        raise
    except Exception as exc:  # the converter raises bare Exceptions and KeyErrors on schemas it cannot take
        raise BadRequest(f"the JSON schema cannot be turned into a grammar: {exc}") from None
    return re.sub(r"(?m)^char ::= .*$", lambda _: _CHAR_RULE, gbnf)


def json_object_grammar() -> str:
    """llama.cpp's grammar for any JSON object."""
    from llama_cpp.llama_grammar import JSON_GBNF

    return JSON_GBNF
