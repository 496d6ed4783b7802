"""Benchmarks: `python -m bench` runs them all and prints each figure beside its baseline from the same run.

`python -m bench --smoke` runs the smallest sizes once (the test suite does, so the benchmarks never rot).
`python -m bench --only readiness,metrics` picks some. Results are also written to bench/results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench import cases


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--smoke", action="store_true", help="smallest sizes, one repetition")
    ap.add_argument("--only", help="comma-separated benchmark names")
    ap.add_argument("--out", default=str(Path(__file__).with_name("results.json")))
    args = ap.parse_args()
    wanted = [n for n in (args.only or "").split(",") if n] or list(cases.ALL)
    unknown = [n for n in wanted if n not in cases.ALL]
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(cases.ALL)}")
    results = []
    print(f"{'benchmark':<34}{'figure':>14}  {'baseline':>14}  {'ratio':>7}  target")
    for name in wanted:
        t0 = time.monotonic()
        for r in cases.ALL[name](smoke=args.smoke):
            r["seconds"] = round(time.monotonic() - t0, 1)
            results.append(r)
            base = f"{r['baseline']:.3g} {r['unit']}" if r.get("baseline") is not None else "-"
            ratio = f"{r['ratio']:.2f}" if r.get("ratio") is not None else "-"
            mark = "" if r.get("met") is None else (" met" if r["met"] else " MISSED")
            print(
                f"{r['name']:<34}{r['figure']:>10.3g} {r['unit']:<3}  {base:>14}  {ratio:>7}  {r['target']}{mark}",
                flush=True,
            )
    Path(args.out).write_text(json.dumps({"smoke": args.smoke, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
