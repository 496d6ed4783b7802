"""Process entry of `rbee-worker`: loads llama.cpp's libraries first, then the server.

Why first: with a CUDA build of llama-cpp-python, loading libggml after aiohttp has been imported makes
llama.cpp segfault in its iostream code while it prints the model's info (seen on an H100 with
llama-cpp-python 0.3.36, CPU and CUDA backends alike). Loading it before anything else avoids that.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Import llama_cpp, then run the worker server (a llama-server worker needs no llama_cpp)."""
    if _engine(sys.argv[1:] if argv is None else argv) == "llama-server":
        from rbee_tui.worker.proxy import main as serve_proxy

        return serve_proxy(argv)
    try:
        import llama_cpp  # noqa: F401
    except Exception as exc:  # one line, no traceback: rbee-hive shows it as the reason
        hint = ""
        if "not found" in str(exc):  # installed without its own library, and this node has no build yet
            hint = " (build llama.cpp on this node: scripts/build-llama-cpp.sh, or rbee-tui pool NAME setup)"
        sys.stderr.write(f"rbee-worker: error: llama-cpp-python cannot be loaded: {exc}{hint}\n")
        return 2
    from rbee_tui.worker.server import main as serve

    return serve(argv)


def _engine(args: list[str]) -> str:
    """The --engine an argument list asks for (the full parse comes later)."""
    for i, arg in enumerate(args):
        if arg == "--engine" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--engine="):
            return arg.split("=", 1)[1]
    return "llama-cpp-python"


if __name__ == "__main__":
    sys.exit(main())
