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

    def param_count(self) -> int:
        """Parameters in the generated model (embeddings and output counted once each)."""
        head_dim = self.n_embd // self.n_head
        kv = self.n_head_kv * head_dim
        per_layer = 2 * self.n_embd + self.n_embd * (2 * self.n_embd + 2 * kv) + 3 * self.n_embd * self.n_ff
        if self.arch == "qwen2":
            per_layer += self.n_embd + 2 * kv
        return len(vocabulary()[0]) * self.n_embd * 2 + self.n_embd + self.n_layer * per_layer


TINY_TEST = TinySpec()


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary: control tokens, 256 byte tokens, printable characters and `▁x` pieces.

    Byte fallback means any text, emoji included, tokenizes; the pieces keep ordinary text short.
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
    return tokens, scores, [int(t) for t in types]


def write_model(path: Path, spec: TinySpec = TINY_TEST) -> Path:
    """Write a GGUF model of `spec` to `path` atomically; the same spec always gives the same bytes."""
    import gguf
    import numpy as np  # here, not at the top: the dashboard imports this module and must start fast

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    dtype = np.float16 if spec.f16 else np.float32
    tokens, scores, types = vocabulary()
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

    # numpy shapes are ggml's ne reversed: (rows=out, cols=in).
    writer.add_tensor("token_embd.weight", rand(n_vocab, spec.n_embd))
    writer.add_tensor("output_norm.weight", ones(spec.n_embd))
    writer.add_tensor("output.weight", rand(n_vocab, spec.n_embd))
    for i in range(spec.n_layer):
        p = f"blk.{i}."
        writer.add_tensor(p + "attn_norm.weight", ones(spec.n_embd))
        writer.add_tensor(p + "attn_q.weight", rand(spec.n_embd, spec.n_embd))
        writer.add_tensor(p + "attn_k.weight", rand(kv, spec.n_embd))
        writer.add_tensor(p + "attn_v.weight", rand(kv, spec.n_embd))
        if spec.arch == "qwen2":
            writer.add_tensor(p + "attn_q.bias", np.zeros(spec.n_embd, dtype=np.float32))
            writer.add_tensor(p + "attn_k.bias", np.zeros(kv, dtype=np.float32))
            writer.add_tensor(p + "attn_v.bias", np.zeros(kv, dtype=np.float32))
        writer.add_tensor(p + "attn_output.weight", rand(spec.n_embd, spec.n_embd))
        writer.add_tensor(p + "ffn_norm.weight", ones(spec.n_embd))
        writer.add_tensor(p + "ffn_gate.weight", rand(spec.n_ff, spec.n_embd))
        writer.add_tensor(p + "ffn_up.weight", rand(spec.n_ff, spec.n_embd))
        writer.add_tensor(p + "ffn_down.weight", rand(spec.n_embd, spec.n_ff))
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
