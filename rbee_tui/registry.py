"""The models every new catalog starts with: the seeds' four as GGUF repos, and the bundled tiny-test."""

from __future__ import annotations

from typing import Any

from rbee_tui.tinymodel import TINY_TEST, TINY_TEST_FILE, TINY_TEST_ID

# Sizes are the hub's for these files; they are replaced by the real size once a file is downloaded.
DEFAULT_MODELS: tuple[dict[str, Any], ...] = (
    {
        "id": "qwen-0.5b",
        "name": "Qwen2.5 0.5B Instruct",
        "architecture": "qwen2",
        "backends": ["cpu", "cuda", "metal"],
        "size_bytes": 491400032,
        "metadata": {
            "repo": "Qwen/Qwen2.5-0.5B-Instruct-GGUF",
            "file": "qwen2.5-0.5b-instruct-q4_k_m.gguf",
            "context_length": 32768,
            "vocab_size": 151936,
        },
    },
    {
        "id": "tinyllama",
        "name": "TinyLlama 1.1B Chat",
        "architecture": "llama",
        "backends": ["cpu", "cuda", "metal"],
        "size_bytes": 668788096,
        "metadata": {
            "repo": "TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF",
            "file": "tinyllama-1.1b-chat-v1.0.Q4_K_M.gguf",
            "context_length": 2048,
            "vocab_size": 32000,
        },
    },
    {
        "id": "phi3",
        "name": "Phi-3 Mini 4K Instruct",
        "architecture": "phi3",
        "backends": ["cpu", "cuda", "metal"],
        "size_bytes": 2393231072,
        "metadata": {
            "repo": "microsoft/Phi-3-mini-4k-instruct-gguf",
            "file": "Phi-3-mini-4k-instruct-q4.gguf",
            "context_length": 4096,
            "vocab_size": 32064,
        },
    },
    {
        "id": "mistral",
        "name": "Mistral 7B Instruct v0.2",
        "architecture": "llama",
        "backends": ["cpu", "cuda", "metal"],
        "size_bytes": 4368439584,
        "metadata": {
            "repo": "TheBloke/Mistral-7B-Instruct-v0.2-GGUF",
            "file": "mistral-7b-instruct-v0.2.Q4_K_M.gguf",
            "context_length": 32768,
            "vocab_size": 32000,
        },
    },
)

TINY_TEST_MODEL: dict[str, Any] = {
    "id": TINY_TEST_ID,
    "name": "rbee tiny test model (random weights)",
    "architecture": TINY_TEST.arch,
    "backends": ["cpu", "cuda", "metal"],
    "metadata": {
        "repo": None,
        "file": TINY_TEST_FILE,
        "context_length": TINY_TEST.n_ctx,
        "vocab_size": None,
        "generated": True,
    },
}
