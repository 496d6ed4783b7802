"""Process entry of `rbee-worker`: loads llama.cpp's libraries first, then the server.

Why first: with a CUDA build of llama-cpp-python, loading libggml after aiohttp has been imported makes
llama.cpp segfault in its iostream code while it prints the model's info (seen on an H100 with
llama-cpp-python 0.3.36, CPU and CUDA backends alike). Loading it before anything else avoids that.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Import llama_cpp, then run the worker server."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as exc:  # one line, no traceback: rbee-hive shows it as the reason
        sys.stderr.write(f"rbee-worker: error: llama-cpp-python cannot be loaded: {exc}\n")
        return 2
    from rbee_tui.worker.server import main as serve

    return serve(argv)


if __name__ == "__main__":
    sys.exit(main())
