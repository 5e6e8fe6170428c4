"""SmolLM2-135M-Instruct for android-arm64, at the size of uniform GPTQ int4 + EoRA r32: that uniform build beside
a budget build (`--budget bytes=<its size>`: each decoder block's attention and MLP linears at int8, int4+EoRA r32
or int4, chosen by the EvoPress search), side by side in one run.

    .venv/bin/python bench/search_llm.py [--generations 50] [--offspring 16] [--images 16] [--seconds 900]
    .venv/bin/python bench/search_llm.py --uniform dist/uniform-eora32   # reuse a uniform build made before

Both are verified the same way (edgekit's verification: perplexity of the exported graph in onnxruntime on the
32 x 512 held-out Wikipedia windows, never seen by calibration or fitness), from the same 64 x 256 calibration
windows; the search's fitness reads the first `--images` of them.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

MODEL, TARGET = "smollm2-135m", "android-arm64"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=32, help="EoRA rank of the uniform build (and of the level)")
    parser.add_argument("--generations", type=int, default=50)
    parser.add_argument("--offspring", type=int, default=16)
    parser.add_argument("--images", type=int, default=16, help="calibration windows fitness reads")
    parser.add_argument("--seconds", type=float, default=900, help="the search's wall-time bound")
    parser.add_argument("--uniform", type=Path, help="a uniform build folder made before with the same settings")
    parser.add_argument("--out", type=Path, default=Path("dist/bench-search-llm"))
    args = parser.parse_args()

    import edgekit

    rows: list[dict[str, Any]] = []
    if args.uniform:
        uniform = json.loads((args.uniform / "report.json").read_text())
        uniform_seconds = sum(stage["seconds"] for stage in uniform["stages"])
    else:
        start = time.perf_counter()
        uniform = edgekit.build(MODEL, TARGET, precision="int4", out=args.out / "uniform", quiet=True,
                                overrides={"lowrank.rank": args.rank}).report
        uniform_seconds = time.perf_counter() - start
    rows.append(_row(f"uniform gptq int4 + eora r{args.rank}", uniform, uniform_seconds))
    budget = f"bytes={uniform['size_bytes']}B"
    print(f"budget: {budget} (the uniform build's file)", flush=True)
    start = time.perf_counter()
    searched = edgekit.build(MODEL, TARGET, out=args.out / "searched", quiet=False, overrides={
        "search.budget": budget, "search.weight_levels": ["int8", f"int4+eora{args.rank}", "int4"],
        "search.generations": args.generations, "search.offspring": args.offspring, "search.images": args.images,
        "search.seconds": args.seconds}).report
    rows.append(_row("searched (int8 / int4+eora / int4 per unit)", searched, time.perf_counter() - start))
    _print(rows, searched["search"])


def _row(name: str, report: dict[str, Any], seconds: float) -> dict[str, Any]:
    return {"variant": name, "bytes": report["size_bytes"], "ppl": report["ppl_artifact"],
            "reference": report["ppl_reference"], "ratio": report["ppl_ratio"],
            "estimated_tok_s": report["latency_ms"]["estimated_target"]["tokens_per_s"],
            "host_tok_s": report["latency_ms"]["measured_host"]["tokens_per_s"], "seconds": seconds}


def _print(rows: list[dict[str, Any]], search: dict[str, Any]) -> None:
    print(f"\nSmolLM2-135M, {TARGET}, original ppl {rows[0]['reference']:.3f} (32 x 512 held-out Wikipedia tokens)")
    print(f"{'variant':<46}{'bytes':>12}{'ppl':>9}{'x orig':>8}{'est tok/s':>11}{'host tok/s':>12}{'build s':>9}")
    for row in rows:
        print(f"{row['variant']:<46}{row['bytes']:>12,}{row['ppl']:>9.3f}{row['ratio']:>8.3f}"
              f"{row['estimated_tok_s']:>11.1f}{row['host_tok_s']:>12.1f}{row['seconds']:>9.0f}")
    chosen, uniform = search["chosen"], search["uniform"]
    print(f"\nsearch: {search['generations']} generations, {search['candidates']} candidates, "
          f"{search['evaluations']} fitness evaluations, {search['seconds']:.0f} s; fitness (KL per token on "
          f"calibration windows) {chosen['fitness']:.5f}"
          + (f" vs {uniform['fitness']:.5f} for the uniform {uniform['level']} configuration in the same space"
             if uniform else ""))
    for group in ("self_attn", "mlp"):
        counts = Counter(unit["level"] for unit in search["units"] if unit["name"].endswith(group))
        print(f"  {group}: " + ", ".join(f"{level} x{count}" for level, count in counts.most_common()))
    print("  per block: " + " ".join(f"{unit['level']}" for unit in search["units"]))


if __name__ == "__main__":
    main()
