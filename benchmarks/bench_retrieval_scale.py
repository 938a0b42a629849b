"""Retrieval at scale on real keys: exact search vs faiss flat, IVF and HNSW, and the machine's matmul limit.

Keys and queries are what SmolLM2-135M's memory layer (21) writes and asks while reading the CPython standard library
(`real_keys.py`): 3 key/value heads x 64 dims, 1,536 queries per head (one 512-token segment, 3 query heads per
key/value head), k=32. For every memory size N (the first N keys; the queries recorded when the memory held N):

* exact: `memorizing_hf.retrieval.exact_topk` over the 3 heads at once (the default backend). Its top-32 is the
  reference for recall (checked against a plain fp32 matmul + topk: same scores).
* faiss flat / IVF / HNSW: `memorizing_hf.retrieval_faiss.FaissBackend` (one index per head; IVF and HNSW over the
  MIPS -> L2 augmented keys; IVF: nlist about 2 sqrt(N), trained on at most 64 keys per list in 10 iterations), at
  several nprobe and efSearch (efSearch below k is raised to k). Results written before the augmentation (faiss
  1.15.1 runs of 2026-11-22) used spherical IVF and `IndexHNSWFlat` on inner product.

Reported per method: median search latency (all 3 heads), recall@32 against exact (tied scores count as found; the
plain id overlap as well), insert cost (fill, training, and the FIFO overwrite of one 512-token segment), bytes per
stored token (per head: keys + values + positions for the memory's own storage; the serialized index size on top of
that for faiss). Plus a dense fp32 (and bf16) matmul GFLOP/s measured in the same run, and exact retrieval's nominal
GFLOP/s (2 N M D per head / time) as a fraction.

    python benchmarks/bench_retrieval_scale.py [--sizes 65536 262144] [--reps 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from memorizing_experiments.benchmarks import ivf_nlist, median_time, recall, write_results
from memorizing_experiments.real_keys import largest_cached
from memorizing_hf.memory import KNNMemory
from memorizing_hf.retrieval import ExactBackend, exact_topk

K = 32
SEGMENT = 512


def matmul_gflops(reps: int) -> dict:
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(2048, 2048).to(dtype), torch.randn(2048, 2048).to(dtype)
        t, _, _ = median_time(lambda a=a, b=b: a @ b, reps)
        out[str(dtype).split(".")[1]] = 2 * 2048**3 / t / 1e9
    return out


def storage_bytes_per_token(n: int, heads: int, dim: int) -> dict:
    """Bytes per stored token of a full KNNMemory (one row) against the raw keys + values."""
    memory = KNNMemory(n, heads, dim, ExactBackend())
    x = torch.zeros(1, heads, n, dim)
    memory.write(x, x, torch.ones(1, n, dtype=torch.bool), torch.arange(n)[None])
    total = sum(t.numel() * t.element_size() for t in memory.state_tensors().values())
    raw = 2 * heads * dim * 4 * n
    return {"bytes_per_token": total / n, "raw_kv_bytes_per_token": raw / n, "ratio_to_raw": total / raw}


def measure(n: int, keys_all: torch.Tensor, queries: torch.Tensor, reps: int, nprobes: list[int],
            efs: list[int], hnsw_m: list[int]) -> dict:
    import faiss

    from memorizing_hf.retrieval_faiss import FaissBackend

    heads, _, dim = keys_all.shape
    keys = keys_all[:, :n].contiguous()[None]  # [1, H, n, D]
    q = queries[None].contiguous()  # [1, H, M, D]
    lengths = torch.tensor([n])
    M = q.shape[2]
    row: dict = {"n": n, "heads": heads, "queries_per_head": M, "dim": dim}
    flops = 2 * heads * M * n * dim

    t, times, (ref_s, ref_i) = median_time(lambda: exact_topk(q, keys, lengths, K), reps)

    def against_exact(got: torch.Tensor) -> dict:
        return recall(got, q, keys, ref_s, ref_i)

    # Plain fp32 matmul + topk, one head at a time (the full score matrix of 3 heads at 262K would take 4.8 GB).
    def plain():
        return torch.stack([(q[0, h] @ keys[0, h].T).topk(K, dim=-1).values for h in range(heads)])[None]

    t_plain, times_plain, plain_s = median_time(plain, max(1, reps // 2))
    row["exact"] = {"median_s": t, "times_s": times, "gflops": flops / t / 1e9,
                    "max_score_diff_vs_plain": float((ref_s - plain_s).abs().max())}
    row["plain_matmul_topk"] = {"median_s": t_plain, "times_s": times_plain}
    print(f"  n={n}: exact {t:.3f}s, plain {t_plain:.3f}s", flush=True)

    store_rows, store_slots = torch.zeros(n, dtype=torch.long), torch.arange(n)
    new = torch.nn.functional.normalize(torch.randn(SEGMENT, heads, dim), dim=-1)
    overwrite = (torch.zeros(SEGMENT, dtype=torch.long), torch.arange(SEGMENT), new)
    restore = (overwrite[0], overwrite[1], keys[0, :, :SEGMENT].transpose(0, 1).contiguous())

    # faiss flat (exact) through the backend
    flat = FaissBackend("flat")
    start = time.perf_counter()
    flat.add(store_rows, store_slots, keys[0].transpose(0, 1))
    fill = time.perf_counter() - start
    t, times, (_, got) = median_time(lambda: flat.search(q, keys, lengths, K), reps)
    t_w, _, _ = median_time(lambda: flat.add(*overwrite), 3)
    flat.add(*restore)
    index_bytes = sum(len(faiss.serialize_index(ix)) for ix in flat._rows[0].indexes)
    row["faiss_flat"] = {"median_s": t, "times_s": times, **against_exact(got), "fill_s": fill,
                         "fill_us_per_entry": fill / (n * heads) * 1e6, "overwrite_512_s": t_w,
                         "index_bytes_per_token_per_head": index_bytes / (n * heads)}
    print(f"  n={n}: flat {t:.3f}s recall {row['faiss_flat']['recall']:.4f}", flush=True)

    # faiss IVF through the backend
    nlist = ivf_nlist(n)
    ivf = FaissBackend("ivf", nlist=nlist, nprobe=nprobes[0], train_points_per_list=64, train_iterations=10)
    ivf.add(store_rows, store_slots, keys[0].transpose(0, 1))
    start = time.perf_counter()
    ivf.search(q[:, :, :1], keys, lengths, K)  # trains and fills every head's index
    train = time.perf_counter() - start
    t_w, _, _ = median_time(lambda: ivf.add(*overwrite), 3)
    ivf.add(*restore)
    index_bytes = sum(len(faiss.serialize_index(ix)) for ix in ivf._rows[0].indexes)
    row["faiss_ivf"] = {"nlist": nlist, "train_and_fill_s": train, "train_and_fill_us_per_entry":
                        train / (n * heads) * 1e6, "overwrite_512_s": t_w,
                        "index_bytes_per_token_per_head": index_bytes / (n * heads), "nprobe": {}}
    for nprobe in nprobes:
        for index in ivf._rows[0].indexes:
            index.nprobe = min(nprobe, nlist)
        t, times, (_, got) = median_time(lambda: ivf.search(q, keys, lengths, K), reps)
        entry = {"median_s": t, "times_s": times, **against_exact(got),
                 "speedup_vs_exact": row["exact"]["median_s"] / t}
        row["faiss_ivf"]["nprobe"][nprobe] = entry
        print(f"  n={n}: ivf nlist {nlist} nprobe {nprobe}: {t:.4f}s recall {entry['recall']:.4f}", flush=True)

    # faiss HNSW through the backend (MIPS -> L2 augmented keys; overwritten entries become tombstones)
    row["faiss_hnsw"] = {}
    for m_links in hnsw_m:
        hnsw = FaissBackend("hnsw", hnsw_links=m_links)
        start = time.perf_counter()
        hnsw.search(q[:, :, :1], keys, lengths, K)  # builds every head's index from storage
        build = time.perf_counter() - start
        index_bytes = sum(len(faiss.serialize_index(ix.index)) for ix in hnsw._rows[0].indexes)
        entry = {"build_s": build, "build_us_per_entry": build / (n * heads) * 1e6,
                 "index_bytes_per_token_per_head": index_bytes / (n * heads), "efSearch": {}}
        for ef in efs:
            hnsw.ef_search = ef
            t, times, (_, got) = median_time(lambda hnsw=hnsw: hnsw.search(q, keys, lengths, K), reps)
            entry["efSearch"][ef] = {"median_s": t, "times_s": times, **against_exact(got),
                                     "speedup_vs_exact": row["exact"]["median_s"] / t}
            print(f"  n={n}: hnsw M={m_links} ef {ef}: {t:.4f}s recall {entry['efSearch'][ef]['recall']:.4f}",
                  flush=True)
        row["faiss_hnsw"][m_links] = entry
        del hnsw
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[65536, 262144, 1048576])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    parser.add_argument("--ef", type=int, nargs="+", default=[16, 64, 128, 256])
    parser.add_argument("--hnsw-m", type=int, nargs="+", default=[15, 32], help="HNSW links per node (15: lucidrains)")
    parser.add_argument("--normalize", action="store_true",
                        help="L2-normalise keys and queries, as gate mode (the default combine) stores and asks them")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/retrieval_scale[_normalized].json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    tensors, path = largest_cached()  # 1M took 47 min on one thread here: `real_keys.py --entries`
    if args.normalize:
        tensors = {name: torch.nn.functional.normalize(t, dim=-1) for name, t in tensors.items()}
    if args.out is None:
        args.out = f"benchmarks/results/retrieval_scale{'_normalized' if args.normalize else ''}.json"
    sizes = [n for n in args.sizes if f"queries.{n}" in tensors]
    skipped = [n for n in args.sizes if n not in sizes]
    info = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "keys": f"SmolLM2-135M layer 21 reading the CPython stdlib ({path.name})"
        + (", L2-normalised (gate mode)" if args.normalize else ", raw (joint mode)"),
        "skipped_sizes_no_real_keys": skipped,
        "load_average_before": os.getloadavg(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    info["matmul_gflops"] = matmul_gflops(args.reps)
    print(f"matmul GFLOP/s: {info['matmul_gflops']}; sizes {sizes}, skipped (no real keys) {skipped}", flush=True)
    heads, _, dim = tensors["keys"].shape
    results = []
    for n in sizes:
        row = measure(n, tensors["keys"], tensors[f"queries.{n}"], args.reps, args.nprobe, args.ef, args.hnsw_m)
        row["exact"]["fraction_of_fp32_matmul"] = row["exact"]["gflops"] / info["matmul_gflops"]["float32"]
        row["exact"]["fraction_of_bf16_matmul"] = row["exact"]["gflops"] / info["matmul_gflops"]["bfloat16"]
        row["storage"] = storage_bytes_per_token(n, heads, dim)
        row["load_average"] = os.getloadavg()
        results.append(row)
    info["load_average_after"] = os.getloadavg()
    info["matmul_gflops_after"] = matmul_gflops(args.reps)
    write_results(args.out, info, results)


if __name__ == "__main__":
    main()
