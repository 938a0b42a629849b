"""Peak resident memory against kNN memory size: one fresh process per size, a linear fit, the constant reported.

Each worker builds one `KNNMemory` in SmolLM2-135M's geometry (3 key/value heads x 64, fp32, one batch row), fills it
with N random unit-norm entries (as gate mode stores keys) in 512-token writes (as training does), then runs one
exact search of a 512-token segment's 1,536 queries per head, k=32, and reports its peak RSS (`ru_maxrss`) and its
RSS before the memory existed. The fit `peak = a + b N` gives the bytes per stored token `b` (raw keys + values:
2 x 3 x 64 x 4 = 1,536 B) and the constant `a` (interpreter, torch, and the search's bounded working set).

    python benchmarks/bench_memory_rss.py [--sizes 8192 ... 1048576] [--backend exact|flat]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

HEADS, DIM, QUERIES, K, SEGMENT = 3, 64, 1536, 32, 512


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(n: int, backend_name: str) -> dict:
    from memorizing_hf.memory import KNNMemory
    from memorizing_hf.retrieval import ExactBackend

    torch.set_num_threads(1)
    if backend_name == "flat":
        from memorizing_hf.retrieval_faiss import FaissBackend

        backend = FaissBackend("flat")
    else:
        backend = ExactBackend()
    before = rss_bytes()
    memory = KNNMemory(n, HEADS, DIM, backend)
    gen = torch.Generator().manual_seed(0)
    store = torch.ones(1, SEGMENT, dtype=torch.bool)
    start = time.perf_counter()
    for pos in range(0, n, SEGMENT):
        chunk = torch.nn.functional.normalize(torch.randn(1, HEADS, SEGMENT, DIM, generator=gen), dim=-1)
        memory.write(chunk, chunk, store, torch.arange(pos, pos + SEGMENT)[None])
    fill = time.perf_counter() - start
    after_fill = rss_bytes()
    queries = torch.nn.functional.normalize(torch.randn(1, HEADS, QUERIES, DIM, generator=gen), dim=-1)
    start = time.perf_counter()
    memory.search(queries, K)
    search = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    stored = sum(t.numel() * t.element_size() for t in memory.state_tensors().values())
    return {"n": n, "rss_before_memory": before, "rss_after_fill": after_fill, "peak_rss": peak,
            "storage_bytes": stored, "fill_s": fill, "search_s": search}


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 32768, 65536, 131072, 262144, 524288, 1048576])
    parser.add_argument("--backend", default="exact", choices=["exact", "flat"])
    parser.add_argument("--out", default="benchmarks/results/memory_rss.json")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.backend)))
        return
    rows = []
    for n in args.sizes:
        command = [sys.executable, __file__, "--worker", str(n), "--backend", args.backend]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"  n={n:>8}: peak RSS {r['peak_rss'] / 2**20:8.1f} MiB, storage {r['storage_bytes'] / 2**20:8.1f} MiB, "
              f"search {r['search_s']:.2f}s", flush=True)
    a, b = linear_fit([r["n"] for r in rows], [r["peak_rss"] for r in rows])
    residual = max(abs(r["peak_rss"] - (a + b * r["n"])) for r in rows)
    fit = {"constant_bytes": a, "bytes_per_token": b, "raw_kv_bytes_per_token": 2 * HEADS * DIM * 4,
           "max_abs_residual_bytes": residual}
    print(f"peak RSS = {a / 2**20:.1f} MiB + {b:.1f} B x N (raw K/V: {2 * HEADS * DIM * 4} B/token); "
          f"max residual {residual / 2**20:.1f} MiB")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "backend": args.backend,
            "geometry": {"heads": HEADS, "dim": DIM, "queries": QUERIES, "k": K, "rows": 1, "dtype": "float32"},
            "load_average": os.getloadavg(), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    out.write_text(json.dumps({"info": info, "fit": fit, "results": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
