"""rbee-tui: a terminal dashboard for a home lab of LLM inference machines."""

from rbee_tui.llama_build import point_llama_cpp_at_build as _point_llama_cpp_at_build

__version__ = "0.1.0"
PROTOCOL = 2  # the `rbee-hive --json` protocol (docs/protocol.md): a mismatch refuses to connect

# Before anything imports llama_cpp: a llama-cpp-python installed without its own llama.cpp (scripts/install.sh)
# loads the node's one build (rbee_tui/llama_build.py).
_point_llama_cpp_at_build()
