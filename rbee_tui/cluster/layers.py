"""What a GGUF file's header says about memory: bytes per repeating layer, the non-repeating tensors, KV shape.

The tensors are grouped the way llama.cpp places them (src/llama-arch.cpp's tensor info table): the input
layer (token embeddings) stays on the coordinator's CPU, `blk.N.*` goes to whichever device holds layer N,
and the output layer (output norm and output matrix) goes to the device of the last layer.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rbee_tui import gguf_file
from rbee_tui.errors import RbeeError
from rbee_tui.gguf_file import GGUFFile

_BLOCK = re.compile(r"^blk\.(\d+)\.")
# Tensors of llama.cpp's LLM_TENSOR_LAYER_INPUT class (src/llama-arch.cpp): read with get_rows on the CPU.
_INPUT_PREFIXES = ("token_embd.", "pos_embd.", "token_types.", "per_layer_token_embd.", "masked_embd_")
_OUTPUT_PREFIXES = ("output.", "output_norm.", "cls.", "cls_out.", "enc.output_norm.", "dec.output_norm.")

# llama.cpp's default sliding-window patterns (src/models/<arch>.cpp: load_swa_pattern(ml, N[, dense_first])),
# used when the file does not carry `<arch>.attention.sliding_window_pattern` itself.
_SWA_PATTERNS: dict[str, tuple[int, bool]] = {
    "gemma2": (2, False),
    "gemma3": (6, False),
    "gemma3n": (5, False),
    "gemma-embedding": (6, False),
    "cohere2": (4, False),
    "llama4": (4, False),
    "gpt-oss": (2, False),
    "exaone4": (4, False),
    "olmo2": (4, False),
    "afmoe": (4, False),
    "smallthinker": (4, True),
}


def swa_pattern(n_layer: int, n_pattern: int, dense_first: bool = False) -> tuple[bool, ...]:
    """Which layers use the sliding window, as llama_hparams::set_swa_pattern decides (src/llama-hparams.cpp)."""
    if dense_first:
        return tuple(n_pattern == 0 or il % n_pattern != 0 for il in range(n_layer))
    return tuple(n_pattern == 0 or il % n_pattern < n_pattern - 1 for il in range(n_layer))


@dataclass(frozen=True)
class ModelShape:
    """The facts about a model that decide how much memory each machine needs for its share of the layers."""

    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    layer_bytes: tuple[int, ...]  # weights of blk.N.* for every N, in file order
    input_bytes: int  # token embeddings: held by the coordinator's CPU
    output_bytes: int  # output norm and output matrix (the token embeddings again when they are tied)
    shared_bytes: int = 0  # any other tensor (rope factors...): llama.cpp duplicates them per layer device
    sliding_window: int = 0  # tokens a sliding-window layer attends to; 0 when the model has none
    swa_layers: tuple[bool, ...] = ()  # per layer: uses the sliding window
    layer_kv_heads: tuple[int, ...] = ()  # per layer KV heads where the file gives an array (0: no KV cache)
    tied_output: bool = False  # no output.weight: the output layer reuses token_embd, a second copy

    def __post_init__(self) -> None:
        if len(self.layer_bytes) != self.n_layer:
            raise RbeeError(f"model shape has {len(self.layer_bytes)} layer sizes for {self.n_layer} layers")
        if self.n_layer < 1:
            raise RbeeError("model shape has no layers")

    @property
    def weight_bytes(self) -> int:
        """Every weight llama.cpp allocates (the tied output counted a second time, as llama.cpp does)."""
        return sum(self.layer_bytes) + self.input_bytes + self.output_bytes + self.shared_bytes

    @property
    def non_repeating_bytes(self) -> int:
        """Token embeddings, output norm and output matrix, and anything else outside `blk.N`."""
        return self.input_bytes + self.output_bytes + self.shared_bytes

    def kv_heads(self, layer: int) -> int:
        """KV heads of one layer."""
        return self.layer_kv_heads[layer] if self.layer_kv_heads else self.n_head_kv

    def is_swa(self, layer: int) -> bool:
        """Whether one layer attends only to the last `sliding_window` tokens."""
        return bool(self.sliding_window) and bool(self.swa_layers) and self.swa_layers[layer]


def read_shape(path: Path) -> ModelShape:
    """Read a GGUF file's header (every part of a split model) into a ModelShape; a clear error if it cannot."""
    return shape_of(gguf_file.read(path, parts=True))


def shape_of(model: GGUFFile) -> ModelShape:
    """Build a ModelShape from a GGUF file's metadata and the tensor table of all its parts."""
    arch = model.get("general.architecture")
    if not isinstance(arch, str):
        raise RbeeError("the GGUF header has no general.architecture")
    n_layer = _int(model, f"{arch}.block_count")
    n_embd = _int(model, f"{arch}.embedding_length")
    heads = model.get(f"{arch}.attention.head_count")
    n_head = max(heads) if isinstance(heads, list) else int(heads or 0)
    kv = model.get(f"{arch}.attention.head_count_kv")
    layer_kv: tuple[int, ...] = ()
    if isinstance(kv, list):
        layer_kv = tuple(int(x) for x in kv)
        n_head_kv = max(layer_kv)
    else:
        n_head_kv = int(kv) if kv is not None else n_head
    head_default = n_embd // n_head if n_head else 0
    head_k = model.get(f"{arch}.attention.key_length")
    head_v = model.get(f"{arch}.attention.value_length")
    ff = model.get(f"{arch}.feed_forward_length")
    n_ff = max(ff) if isinstance(ff, list) else int(ff or 0)

    layer_bytes = [0] * n_layer
    input_bytes = output_bytes = shared_bytes = 0
    names = set()
    n_vocab = 0
    for tensor in model.tensors:
        name, nbytes, ne = tensor.name, tensor.n_bytes, tensor.shape
        names.add(name)
        m = _BLOCK.match(name)
        if m:
            il = int(m.group(1))
            if il >= n_layer:
                raise RbeeError(f"tensor {name} is past the model's {n_layer} layers")
            layer_bytes[il] += nbytes
        elif name.startswith(_INPUT_PREFIXES):
            input_bytes += nbytes
            if name == "token_embd.weight" and len(ne) >= 2:
                n_vocab = ne[1]
        elif name.startswith(_OUTPUT_PREFIXES):
            output_bytes += nbytes
        else:
            shared_bytes += nbytes
    tied = "output.weight" not in names and "token_embd.weight" in names
    if tied:
        # llama.cpp creates `output` from token_embd (TENSOR_DUPLICATED) on the output layer's device.
        output_bytes += next(t.n_bytes for t in model.tensors if t.name == "token_embd.weight")
    if not n_vocab:
        n_vocab = model.count("tokenizer.ggml.tokens")

    window = int(model.get(f"{arch}.attention.sliding_window") or 0)
    swa: tuple[bool, ...] = ()
    if window:
        pattern = model.get(f"{arch}.attention.sliding_window_pattern")
        if isinstance(pattern, list):
            swa = tuple(bool(x) for x in pattern[:n_layer])
        elif pattern is not None:
            swa = swa_pattern(n_layer, int(pattern), _SWA_PATTERNS.get(arch, (0, False))[1])
        elif arch in _SWA_PATTERNS:
            swa = swa_pattern(n_layer, *_SWA_PATTERNS[arch])
        # Any other architecture: llama.cpp keeps a full-size cache for every layer, so the planner does too.
    return ModelShape(
        arch=arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=int(head_k) if head_k else head_default,
        head_dim_v=int(head_v) if head_v else head_default,
        n_ff=n_ff,
        n_vocab=n_vocab,
        n_ctx_train=int(model.get(f"{arch}.context_length") or 0),
        layer_bytes=tuple(layer_bytes),
        input_bytes=input_bytes,
        output_bytes=output_bytes,
        shared_bytes=shared_bytes,
        sliding_window=window,
        swa_layers=swa,
        layer_kv_heads=layer_kv,
        tied_output=tied,
    )


def _int(model: GGUFFile, key: str) -> int:
    value = model.get(key)
    if value is None:
        raise RbeeError(f"the GGUF header has no {key}")
    return int(value)


def shape_to_json(shape: ModelShape) -> dict[str, Any]:
    """A ModelShape as plain JSON (what `rbee-hive rpc shape` prints)."""
    out = asdict(shape)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def shape_from_json(doc: dict[str, Any]) -> ModelShape:
    """The ModelShape `shape_to_json` wrote; a clear error when a field is missing."""
    try:
        return ModelShape(**{k: tuple(v) if isinstance(v, list) else v for k, v in doc.items()})
    except TypeError as exc:
        raise RbeeError(f"the node sent a model shape this version cannot read: {exc}") from None
