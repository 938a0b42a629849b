"""Exact retrieval as a fraction of the machine's dense matmul rate, both timed in the same interleaved rounds.

On a shared machine the matmul rate moves with the load, so each round times one dense 2048^3 matmul (fp32 and bf16)
and one exact search right after each other. Search: `exact_topk` of 3 heads x 1,536 real queries against N real keys
per head (SmolLM2-135M layer 21, `real_keys.py`; raw and L2-normalised), k=32. Its rate counts the brute-force flops
2 N M D per head, so more than 100% of the fp32 rate is possible (bf16 first pass, pruned second pass).

    python benchmarks/bench_matmul_fraction.py [--sizes 65536 262144] [--reps 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from memorizing_experiments.benchmarks import write_results
from memorizing_experiments.real_keys import largest_cached
from memorizing_hf.retrieval import exact_topk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[65536, 262144])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/matmul_fraction.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tensors, _ = largest_cached()
    a32, b32 = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    results = []
    for n in [n for n in args.sizes if f"queries.{n}" in tensors]:
        for kind in ("raw", "normalised"):
            keys, queries = tensors["keys"][:, :n].contiguous(), tensors[f"queries.{n}"]
            if kind == "normalised":
                keys = torch.nn.functional.normalize(keys, dim=-1)
                queries = torch.nn.functional.normalize(queries, dim=-1)
            keys, queries, lengths = keys[None], queries[None].contiguous(), torch.tensor([n])
            flops = 2 * keys.shape[1] * queries.shape[2] * n * keys.shape[3]
            rounds = []
            for i in range(args.reps + 1):
                t0 = time.perf_counter()
                a32 @ b32
                t1 = time.perf_counter()
                a16 @ b16
                t2 = time.perf_counter()
                exact_topk(queries, keys, lengths, 32)
                t3 = time.perf_counter()
                if i:
                    rounds.append({"fp32_gflops": 2 * 2048**3 / (t1 - t0) / 1e9,
                                   "bf16_gflops": 2 * 2048**3 / (t2 - t1) / 1e9,
                                   "exact_s": t3 - t2, "exact_gflops": flops / (t3 - t2) / 1e9})
            row = {"n": n, "keys": kind, "rounds": rounds, "load_average": os.getloadavg()}
            for key in ("fp32_gflops", "bf16_gflops", "exact_s", "exact_gflops"):
                row[key] = statistics.median(r[key] for r in rounds)
            row["fraction_of_fp32"] = statistics.median(r["exact_gflops"] / r["fp32_gflops"] for r in rounds)
            row["fraction_of_bf16"] = statistics.median(r["exact_gflops"] / r["bf16_gflops"] for r in rounds)
            results.append(row)
            print(f"n={n} {kind}: exact {row['exact_s']:.2f}s = {row['exact_gflops']:.1f} GFLOP/s; matmul fp32 "
                  f"{row['fp32_gflops']:.1f}, bf16 {row['bf16_gflops']:.1f}; fraction of fp32 "
                  f"{100 * row['fraction_of_fp32']:.0f}%, of bf16 {100 * row['fraction_of_bf16']:.0f}%", flush=True)
    info = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "threads": args.threads,
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    write_results(args.out, info, results)


if __name__ == "__main__":
    main()
