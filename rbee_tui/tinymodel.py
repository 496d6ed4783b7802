"""Generates small GGUF models with random weights that llama.cpp loads in milliseconds.

They make the whole tool work offline (the `tiny-test` model) and give tests and benchmarks real models of
chosen architectures and sizes without any download.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TINY_TEST_ID = "tiny-test"
TINY_TEST_FILE = "tiny-test.gguf"

# A ChatML template that shows the model its tools and writes calls as JSON objects between <tool_call> tags,
# the way widespread tool-calling models do: what llama.cpp and the worker learn a tool-call syntax from.
TOOL_CHAT_TEMPLATE = r"""{%- if tools %}
{{- '<|im_start|>system\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\n\n' }}{%- endif %}
{{- '# Tools\n\nYou may call one or more functions. Their signatures, within <tools></tools>:\n<tools>' }}
{%- for tool in tools %}{{- '\n' + (tool | tojson) }}{%- endfor %}
{{- '\n</tools>\n\nFor each call, return a JSON object with the function name and its arguments within '
    + '<tool_call></tool_call> tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    + '</tool_call><|im_end|>\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first)
      or (message.role == 'assistant' and not message.tool_calls) %}
{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant' }}
{%- if message.content %}{{- '\n' + message.content }}{%- endif %}
{%- for call in message.tool_calls %}
{%- set call = call.function if call.function is defined else call %}
{{- '\n<tool_call>\n{"name": "' + call.name + '", "arguments": ' + (call.arguments | tojson) + '}\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"""


@dataclass(frozen=True)
class TinySpec:
    """The shape of a generated model. `arch` is a llama.cpp architecture name (llama or qwen2)."""

    name: str = "rbee tiny-test"
    arch: str = "llama"
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    n_ctx: int = 512
    seed: int = 20251009
    f16: bool = False
    chat_template: str | None = None  # tokenizer.chat_template; None writes none (tiny-test has none)
    # Added after the base vocabulary, as text: a tool-call tag is one token in tool-trained models.
    text_tokens: tuple[str, ...] = ()
    # (token, next token) pairs the model prefers by construction: see _prefer.
    prefer: tuple[tuple[str, str], ...] = ()
    # The end-of-text token never wins a greedy choice (its logit is 0, below the best of the random rest), so
    # a greedy generation runs until its limit: for tests that need one to still be running.
    endless: bool = False

    def param_count(self) -> int:
        """Parameters in the generated model (embeddings and output counted once each)."""
        head_dim = self.n_embd // self.n_head
        kv = self.n_head_kv * head_dim
        per_layer = 2 * self.n_embd + self.n_embd * (2 * self.n_embd + 2 * kv) + 3 * self.n_embd * self.n_ff
        if self.arch == "qwen2":
            per_layer += self.n_embd + 2 * kv
        return len(vocabulary(self)[0]) * self.n_embd * 2 + self.n_embd + self.n_layer * per_layer


TINY_TEST = TinySpec()
# A tool-capable chat model in miniature, for tests of tool calls without a download. Its weights are random,
# save that after a line break it opens a tool call, and after a closing brace it closes the call and ends:
# llama.cpp's grammar for tool_choice "required" lets a model write text before its call (and more calls
# after it), which random weights would never stop doing.
TINY_TOOLS = TinySpec(
    name="rbee tiny-tools",
    n_ctx=2048,
    chat_template=TOOL_CHAT_TEMPLATE,
    text_tokens=("<tool_call>", "</tool_call>"),
    prefer=(
        ("<0x0A>", "<tool_call>"),
        ("<tool_call>", "<0x0A>"),
        ("}", "</tool_call>"),
        ("<0x7D>", "</tool_call>"),  # the same brace as a byte token: the grammar lets either through
        ("</tool_call>", "</s>"),
        (">", "</s>"),
        ("<0x3E>", "</s>"),
    ),
)


# A model that answers in characters of several bytes, each written byte by byte (the vocabulary has no token
# for them): "é🐝é🐝..." after a line break, a colon or either character. Tests of streams that must never
# split a character use it.
_BYTES_CYCLE = ("<0xC3>", "<0xA9>", "<0xF0>", "<0x9F>", "<0x90>", "<0x9D>")  # é, then 🐝
TINY_BYTES = TinySpec(
    name="rbee tiny-bytes",
    prefer=(
        ("<0x0A>", "<0xC3>"),
        (":", "<0xC3>"),
        *zip(_BYTES_CYCLE, (*_BYTES_CYCLE[1:], _BYTES_CYCLE[0]), strict=True),
    ),
)


def vocabulary(spec: TinySpec = TINY_TEST) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary: control tokens, 256 byte tokens, printable characters and `▁x` pieces.

    Byte fallback means any text, emoji included, tokenizes; the pieces keep ordinary text short. A spec's own
    tokens come last, so the base vocabulary's ids never move.
    """
    from gguf import TokenType

    tokens = ["<unk>", "<s>", "</s>"]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    scores = [0.0, 0.0, 0.0]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        types.append(TokenType.BYTE)
        scores.append(0.0)
    singles = ["▁"] + [chr(c) for c in range(0x21, 0x7F)]
    for s in singles:
        tokens.append(s)
        types.append(TokenType.NORMAL)
        scores.append(-2.0)
    for c in [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]:
        tokens.append("▁" + c)
        types.append(TokenType.NORMAL)
        scores.append(-1.0)
    tokens.extend(spec.text_tokens)
    types.extend([TokenType.USER_DEFINED] * len(spec.text_tokens))
    scores.extend([0.0] * len(spec.text_tokens))
    return tokens, scores, [int(t) for t in types]


def _prefer(spec: TinySpec, tokens: list[str], tensors: dict[str, Any]) -> None:
    """Make the model follow each token of `spec.prefer` with its partner, whatever came before.

    Each pair gets an embedding dimension of its own: the first token's embedding is large there and every
    other token's is zero, no layer writes to it, and only the partner's output row reads it. The rest of the
    model stays random.
    """
    index = {t: i for i, t in enumerate(tokens)}
    embd, out = tensors["token_embd.weight"], tensors["output.weight"]
    for k, (first, then) in enumerate(spec.prefer):
        dim = spec.n_embd - 1 - k
        embd[:, dim] = 0
        embd[index[first], dim] = 1
        out[:, dim] = 0
        out[index[then], dim] = 4
        for i in range(spec.n_layer):
            tensors[f"blk.{i}.attn_output.weight"][dim, :] = 0
            tensors[f"blk.{i}.ffn_down.weight"][dim, :] = 0


def write_model(path: Path, spec: TinySpec = TINY_TEST) -> Path:
    """Write a GGUF model of `spec` to `path` atomically; the same spec always gives the same bytes."""
    import gguf
    import numpy as np  # here, not at the top: the dashboard imports this module and must start fast

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    dtype = np.float16 if spec.f16 else np.float32
    tokens, scores, types = vocabulary(spec)
    n_vocab = len(tokens)
    head_dim = spec.n_embd // spec.n_head
    kv = spec.n_head_kv * head_dim

    def rand(*shape: int) -> Any:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.05).astype(dtype)

    def ones(n: int) -> Any:
        # Norm weights stay f32: llama.cpp expects 1-d tensors in f32.
        return np.ones(n, dtype=np.float32)

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(tmp, spec.arch)
    writer.add_name(spec.name)
    writer.add_context_length(spec.n_ctx)
    writer.add_embedding_length(spec.n_embd)
    writer.add_block_count(spec.n_layer)
    writer.add_feed_forward_length(spec.n_ff)
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv(spec.n_head_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if spec.f16 else gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if spec.chat_template is not None:
        writer.add_chat_template(spec.chat_template)

    # numpy shapes are ggml's ne reversed: (rows=out, cols=in). Drawn in this order, always: same seed, same bytes.
    tensors: dict[str, Any] = {
        "token_embd.weight": rand(n_vocab, spec.n_embd),
        "output_norm.weight": ones(spec.n_embd),
        "output.weight": rand(n_vocab, spec.n_embd),
    }
    for i in range(spec.n_layer):
        p = f"blk.{i}."
        tensors[p + "attn_norm.weight"] = ones(spec.n_embd)
        tensors[p + "attn_q.weight"] = rand(spec.n_embd, spec.n_embd)
        tensors[p + "attn_k.weight"] = rand(kv, spec.n_embd)
        tensors[p + "attn_v.weight"] = rand(kv, spec.n_embd)
        if spec.arch == "qwen2":
            tensors[p + "attn_q.bias"] = np.zeros(spec.n_embd, dtype=np.float32)
            tensors[p + "attn_k.bias"] = np.zeros(kv, dtype=np.float32)
            tensors[p + "attn_v.bias"] = np.zeros(kv, dtype=np.float32)
        tensors[p + "attn_output.weight"] = rand(spec.n_embd, spec.n_embd)
        tensors[p + "ffn_norm.weight"] = ones(spec.n_embd)
        tensors[p + "ffn_gate.weight"] = rand(spec.n_ff, spec.n_embd)
        tensors[p + "ffn_up.weight"] = rand(spec.n_ff, spec.n_embd)
        tensors[p + "ffn_down.weight"] = rand(spec.n_embd, spec.n_ff)
    _prefer(spec, tokens, tensors)
    if spec.endless:
        tensors["output.weight"][tokens.index("</s>"), :] = 0
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
