"""The embedded inference engine: llama-cpp-python, one model, one generation at a time, clean cache each time."""

from __future__ import annotations

import codecs
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rbee_tui.errors import RbeeError
from rbee_tui.llama_build import gpu_offload


@dataclass(frozen=True)
class GenerationSummary:
    """The numbers every finished generation reports (the `/execute` summary event)."""

    tokens_generated: int
    prompt_tokens: int
    ttft_ms: float
    tokens_per_sec: float
    prompt_tokens_per_sec: float
    total_ms: float
    finish_reason: str
    text: str

    def to_json(self) -> dict[str, Any]:
        """The summary as JSON."""
        return dict(self.__dict__)


@dataclass(frozen=True)
class Request:
    """One validated generation request."""

    prompt: str
    max_tokens: int
    temperature: float = 0.0
    seed: int | None = None
    top_k: int = 40
    top_p: float = 0.95
    stop: tuple[str, ...] = ()
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    grammar: str | None = None  # GBNF text; its rule `root` constrains every sampled token
    # With a trigger the grammar is lazy, as llama.cpp's are: sampling is free until the text shows the trigger,
    # and the grammar constrains what follows it.
    grammar_trigger: str | None = None


_LLAMA_ERRORS: list[str] = []
_LOG_HOOK: Any = None


def _capture_llama_errors() -> None:
    """Keep llama.cpp's error lines (its Python binding hides them when not verbose) to say why a load failed."""
    global _LOG_HOOK
    if _LOG_HOOK is not None:
        return
    import ctypes

    import llama_cpp

    @llama_cpp.llama_log_callback
    def hook(level: int, text: bytes, user_data: Any) -> None:
        if level == 4:  # GGML_LOG_LEVEL_ERROR
            _LLAMA_ERRORS.append(text.decode("utf-8", "replace").strip())
            del _LLAMA_ERRORS[:-20]

    _LOG_HOOK = hook  # referenced for as long as llama.cpp may call it
    llama_cpp.llama_log_set(hook, ctypes.c_void_p(0))


class LlamaCppEngine:
    """llama-cpp-python in process. Not thread-safe: the server calls it from one thread at a time."""

    name = "llama-cpp-python"

    def __init__(
        self, model_path: str, backend: str, gpu: int, n_ctx: int | None = None, verbose: bool = False
    ) -> None:
        self.model_path = model_path
        self.verbose = verbose
        self.backend = backend
        self.gpu = gpu
        self.requested_ctx = n_ctx
        self.llm: Any = None

    def load(self) -> None:
        """Load the model; raises RbeeError with a one-line reason when llama.cpp cannot."""
        import llama_cpp

        # llama-cpp-python defaults to half the CPUs; a worker owns its machine's cores while it generates.
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        kwargs: dict[str, Any] = {
            "verbose": self.verbose,
            "n_ctx": self.requested_ctx or 0,
            "n_threads": threads,
            "n_threads_batch": threads,
        }
        if self.backend in ("cuda", "metal"):
            if not gpu_offload(llama_cpp):
                raise RbeeError(f"this llama-cpp-python was built without {self.backend} support")
            kwargs.update(n_gpu_layers=-1, main_gpu=self.gpu, split_mode=llama_cpp.LLAMA_SPLIT_MODE_NONE)
        else:
            # llama.cpp itself (llama-server, llama-bench) turns flash attention on where the backend has it, and
            # the CPU backend always does; the binding defaults to off, which costs ~20% of decode on CPU. GPU
            # backends keep the binding's default: it cannot ask for llama.cpp's per-device "auto".
            kwargs.update(n_gpu_layers=0, flash_attn=True)
        if not self.verbose:
            _capture_llama_errors()
        _LLAMA_ERRORS.clear()
        try:
            self.llm = llama_cpp.Llama(self.model_path, **kwargs)
        except (ValueError, RuntimeError, OSError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            why = next(
                (e for e in _LLAMA_ERRORS if "error loading model" in e), _LLAMA_ERRORS[0] if _LLAMA_ERRORS else ""
            )
            if why:
                reason = why.split("error loading model:", 1)[-1].strip()
            raise RbeeError(f"llama.cpp could not load {self.model_path}: {reason}") from None
        if self.requested_ctx is None and self.llm.n_ctx() > 4096:
            # A model's training context (32k for Qwen) would reserve gigabytes of KV cache; 4k is plenty here.
            self.llm.close()
            self.requested_ctx = 4096
            self.load()

    @property
    def n_ctx(self) -> int:
        """The context size in tokens."""
        return int(self.llm.n_ctx())

    @property
    def chat_template(self) -> str | None:
        """The model's own chat template, if it has one."""
        return self.llm.metadata.get("tokenizer.chat_template")

    def special_tokens(self) -> tuple[str, str]:
        """The text of the model's BOS and EOS tokens, as chat templates name them."""
        model = self.llm._model
        bos, eos = self.llm.token_bos(), self.llm.token_eos()
        return (model.token_get_text(bos) if bos != -1 else "", model.token_get_text(eos) if eos != -1 else "")

    def grammar_error(self, grammar: str) -> str | None:
        """Why llama.cpp cannot parse a GBNF grammar for this vocabulary, or None when it can."""
        import llama_cpp

        _LLAMA_ERRORS.clear()
        sampler = llama_cpp.llama_sampler_init_grammar(self.llm._model.vocab, grammar.encode("utf-8"), b"root")
        if sampler:
            llama_cpp.llama_sampler_free(sampler)
            return None
        # A grammar llama.cpp cannot parse gives a NULL sampler; adding that to a chain would crash the worker.
        return _LLAMA_ERRORS[-1] if _LLAMA_ERRORS else "llama.cpp could not parse it"

    def tokenize(self, text: str) -> list[int]:
        """Tokens of a prompt, with the model's BOS."""
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True))

    def generate(
        self,
        req: Request,
        on_token: Callable[[str, int], None],
        cancel: threading.Event,
        tokens: list[int] | None = None,
    ) -> GenerationSummary:
        """Generate up to `req.max_tokens` tokens, calling `on_token(text, id)` for each, from a clean cache."""
        llm = self.llm
        tokens = tokens if tokens is not None else self.tokenize(req.prompt)
        llm.reset()  # start from position 0: no prefix reuse, so no earlier request can leak into this one
        if req.seed is not None:
            llm.set_seed(req.seed)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        import llama_cpp

        vocab = llm._model.vocab

        def is_end(tok: int) -> bool:
            return bool(llama_cpp.llama_vocab_is_eog(vocab, tok))

        grammar = None
        if req.grammar is not None:
            from llama_cpp.llama_grammar import LlamaGrammar

            grammar = LlamaGrammar.from_string(req.grammar, verbose=False)
        # Stop strings and the trigger are matched on the text's tail, long enough for the longest plus a token.
        window = max((len(s) for s in (*req.stop, req.grammar_trigger or "")), default=0) + 32
        recent = ""
        room = self.n_ctx - len(tokens)
        limit = min(req.max_tokens, room)
        pieces: list[str] = []
        n = 0
        finish = "length"
        started = time.perf_counter()
        first = last = started
        lazy = req.grammar_trigger is not None

        def start(reset: bool, constrained: bool) -> Any:
            return llm.generate(
                list(tokens),
                top_k=req.top_k,
                top_p=req.top_p,
                min_p=req.min_p,
                temp=req.temperature,
                reset=reset,
                repeat_penalty=req.repeat_penalty,
                frequency_penalty=req.frequency_penalty,
                presence_penalty=req.presence_penalty,
                grammar=grammar if constrained else None,
            )

        gen = start(False, not lazy)
        try:
            while (tok := next(gen, None)) is not None:
                now = time.perf_counter()
                if n == 0:
                    first = now
                if is_end(tok):
                    finish = "stop"
                    break
                text = decoder.decode(llm.detokenize([tok], prev_tokens=tokens))
                tokens.append(tok)
                n += 1
                last = now
                pieces.append(text)
                on_token(text, tok)
                recent = (recent + text)[-window:]
                if req.stop and any(s in recent for s in req.stop):
                    finish = "stop"
                    break
                if cancel.is_set():
                    finish = "cancelled"
                    break
                if n >= limit:
                    break
                if lazy and recent.endswith(req.grammar_trigger or ""):
                    # The trigger is out: go on from here with the grammar. The binding keeps the evaluated
                    # tokens, so only the last one is evaluated again.
                    lazy = False
                    gen.close()
                    gen = start(True, True)
        finally:
            gen.close()
        tail = decoder.decode(b"", final=True)
        if tail:
            pieces.append(tail)
        end = time.perf_counter()
        ttft = (first - started) * 1000.0
        decode_s = last - first
        return GenerationSummary(
            tokens_generated=n,
            prompt_tokens=len(tokens) - n,
            ttft_ms=round(ttft, 3),
            tokens_per_sec=round((n - 1) / decode_s, 2) if n > 1 and decode_s > 0 else 0.0,
            prompt_tokens_per_sec=round((len(tokens) - n) / (ttft / 1000.0), 2) if ttft > 0 else 0.0,
            total_ms=round((end - started) * 1000.0, 3),
            finish_reason=finish,
            text="".join(pieces),
        )

    def close(self) -> None:
        """Free the model."""
        if self.llm is not None:
            self.llm.close()
            self.llm = None


def llama_cpp_version() -> str:
    """The llama-cpp-python version (its vendored llama.cpp goes with it)."""
    try:
        import llama_cpp

        return str(llama_cpp.__version__)
    except Exception:
        return "unknown"
