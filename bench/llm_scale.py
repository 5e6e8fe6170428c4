"""Block-by-block compression of a Llama-3-8B-shaped checkpoint: peak memory against depth.

A checkpoint of random Llama-3-8B blocks (hidden 4096, MLP 14336, 32 query / 8 key-value heads, vocabulary
128,256, untied head; bfloat16 safetensors, one shard per block and one for the tables) is written once. For each
depth a folder names its first N blocks (config and index; the shards are shared), and a fresh process compresses it
with `edgekit.families.llm_lazy.compress_lazily` to int4 (groups of 64, GPTQ unless `--method rtn`, EoRA rank
`--rank`; the head and embedding table 8-bit, as the LLM family's defaults) on random calibration tokens, writing
the prefill/decode ONNX graph and its external data. The process reports its peak resident memory (VmHWM), the
memory before it started (imports), and each block's seconds. Random weights: this measures memory and time, not
accuracy (tests/test_llm_lazy.py checks the graph against the model compressed in memory).

    .venv/bin/python bench/llm_scale.py [--blocks 2 4 8] [--method gptq] [--rank 0] [--tokens 512] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

SHAPE = {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
         "num_key_value_heads": 8, "max_position_embeddings": 8192, "rope_theta": 500000.0,
         "tie_word_embeddings": False, "rms_norm_eps": 1e-5}


def write_shards(root: Path, blocks: int) -> dict[str, str]:
    """bfloat16 shards of `blocks` random blocks and the tables (existing ones kept); the weight map."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPE, num_hidden_layers=1)
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in LlamaForCausalLM(config).named_parameters()}
    generator = torch.Generator().manual_seed(0)
    weight_map = {}

    def shard(file: str, names: list[str]) -> None:
        weight_map.update(dict.fromkeys(names, file))
        if (root / file).is_file():
            return
        tensors = {}
        for name in names:
            shape = shapes[".".join(["model", "layers", "0", *name.split(".")[3:]]) if ".layers." in name else name]
            values = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=generator)
            tensors[name] = (values if name.endswith("norm.weight") else values * 0.02).to(torch.bfloat16)
            del values
        save_file(tensors, str(root / f"{file}.partial"))
        (root / f"{file}.partial").rename(root / file)

    shard("tables.safetensors", ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"])
    for index in range(blocks):
        names = [name.replace(".0.", f".{index}.", 1) for name in shapes if name.startswith("model.layers.0.")]
        shard(f"block-{index:03d}.safetensors", names)
    return weight_map


def checkpoint(root: Path, depth: int, weight_map: dict[str, str]) -> Path:
    """A folder for the first `depth` blocks: config, index, and links to the shared shards."""
    from transformers import LlamaConfig

    folder = root / f"depth-{depth}"
    folder.mkdir(exist_ok=True)
    LlamaConfig(**SHAPE, num_hidden_layers=depth).save_pretrained(folder)
    kept = {name: file for name, file in weight_map.items()
            if ".layers." not in name or int(name.split(".")[2]) < depth}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": kept}))
    for file in set(kept.values()):
        if not (folder / file).exists():
            (folder / file).symlink_to(root / file)
    return folder


def child(folder: Path, out: Path, method: str, rank: int, tokens: int, threads: int) -> None:
    """Compress one checkpoint; print one JSON line with memory and times."""
    import torch

    from edgekit.families.llm_lazy import compress_lazily
    from edgekit.passes.sequential import WeightScheme
    from edgekit.recipe import DEFAULT_OPSET

    torch.set_num_threads(threads)
    before = _status("VmRSS")
    start = time.perf_counter()
    windows = max(1, tokens // 256)
    calibration = torch.randint(0, SHAPE["vocab_size"], (windows, tokens // windows),
                                generator=torch.Generator().manual_seed(1))
    after_blocks: list[int] = []

    def track(blocks: Iterable[int], _count: int) -> Iterator[int]:
        for index in blocks:
            yield index
            after_blocks.append(_status("VmRSS"))  # resident memory once each block is written

    found = compress_lazily(folder, out, calibration, WeightScheme(4, 64, True, method, rank=rank), 8, 8,  # type: ignore[arg-type]
                            DEFAULT_OPSET, 0, track)
    print(json.dumps({"peak_rss": _status("VmHWM"), "rss_before": before, "seconds": time.perf_counter() - start,
                      "block_seconds": found["block_seconds"], "rss_after_blocks": after_blocks,
                      "bytes": sum(f.stat().st_size for f in out.iterdir())}), flush=True)


def _status(field: str) -> int:
    """A /proc/self/status memory figure, in bytes."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1]) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, nargs="+", default=[2, 4, 8], help="depths to compress")
    parser.add_argument("--method", choices=["gptq", "rtn"], default="gptq")
    parser.add_argument("--rank", type=int, default=0, help="EoRA rank (0: none)")
    parser.add_argument("--tokens", type=int, default=512, help="calibration tokens (windows of 256)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    parser.add_argument("--work", type=Path, help="folder for shards and outputs (default: a new temporary one)")
    parser.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        folder, out = args.child
        child(folder, out, args.method, args.rank, args.tokens, args.threads)
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="edgekit-llm-scale-"))
    (work / "shards").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    weight_map = write_shards(work / "shards", max(args.blocks))
    print(f"shards of {max(args.blocks)} blocks in {work / 'shards'} ({time.perf_counter() - start:.0f} s)",
          flush=True)
    rows = []
    for depth in args.blocks:
        folder = checkpoint(work / "shards", depth, weight_map)
        out = work / f"out-{depth}"
        run = subprocess.run([sys.executable, __file__, "--child", str(folder), str(out), "--method", args.method,
                              "--rank", str(args.rank), "--tokens", str(args.tokens),
                              "--threads", str(args.threads)],
                             capture_output=True, text=True, check=False)
        if run.returncode:
            raise SystemExit(f"depth {depth} failed:\n{run.stderr[-3000:]}")
        rows.append({"depth": depth, **json.loads(run.stdout.strip().splitlines()[-1])})
        row = rows[-1]
        print(f"{depth} blocks: peak RSS {row['peak_rss'] / 2**30:.2f} GiB (imports {row['rss_before'] / 2**30:.2f}; "
              f"after each block {' '.join(f'{r / 2**30:.2f}' for r in row['rss_after_blocks'])}); "
              f"{row['seconds']:.0f} s; {sum(row['block_seconds']) / depth:.1f} s per block; "
              f"{row['bytes'] / 1e9:.2f} GB written", flush=True)
    print(f"\n{args.method} int4, EoRA rank {args.rank}, {args.tokens} calibration tokens, {args.threads} threads")
    print("| blocks | peak RSS GiB | s per block | total s | artifact GB |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['depth']} | {row['peak_rss'] / 2**30:.2f} | {sum(row['block_seconds']) / row['depth']:.1f} | "
              f"{row['seconds']:.0f} | {row['bytes'] / 1e9:.2f} |")


if __name__ == "__main__":
    main()
