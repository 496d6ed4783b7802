"""`python -m bench.pure --max-tokens N MODEL...`: the pure work of a matrix cell, in process, for the critical path.

For each model: load it, run the matrix's test prompt twice, close it; print the seconds each took, as JSON.
Run it pinned to the same CPUs as the pool it stands for (the matrix benchmark does).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.pure")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--n-ctx", type=int, default=1024)
    ap.add_argument("models", nargs="+")
    args = ap.parse_args()
    import llama_cpp  # noqa: F401  (loaded before timing: a worker has it loaded before it reads the model)

    from rbee_tui.matrix.scheduler import TEST_PROMPT
    from rbee_tui.worker.engines import LlamaCppEngine, Request

    out = []
    for path in args.models:
        t0 = time.perf_counter()
        engine = LlamaCppEngine(path, "cpu", 0, n_ctx=args.n_ctx)
        engine.load()
        for _ in range(2):
            engine.generate(Request(TEST_PROMPT, args.max_tokens, 0.7, 42), lambda t, i: None, threading.Event())
        engine.close()
        out.append(time.perf_counter() - t0)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
