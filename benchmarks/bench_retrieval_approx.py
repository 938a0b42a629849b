"""Approximate retrieval that keeps recall, on real keys: MIPS-augmented faiss IVF / HNSW and the page backend.

Keys and queries as in `bench_retrieval_scale.py` (SmolLM2-135M's memory layer 21 reading the CPython standard
library: 3 key/value heads x 64 dims, 1,536 queries per head, k=32; for every size N the first N keys and the
queries recorded when the memory held N). Every method is a retrieval backend as the memory calls it
(`search(queries [1, 3, 1536, 64], keys [1, 3, N, 64], lengths, 32)`):

* exact: `memorizing_hf.retrieval.ExactBackend` (the reference for recall, and for speed).
* faiss IVF / HNSW: `memorizing_hf.retrieval_faiss.FaissBackend("ivf" | "hnsw")`, both over the MIPS -> L2
  augmented keys (one index per head), at several nprobe / efSearch.
* pages: `memorizing_hf.retrieval_pages.PageBackend` (lists of MIPS-augmented keys, as many as IVF's, cut into
  pages) at several budgets (share of the lists each query visits) and page sizes; `--exact-pages` adds its
  exact mode.

Indexes are built first (build time reported), then every method is timed once per round, in interleaved rounds, so
that all of them see the same load; reported: median search time, the median of the per-round ratios exact time /
method time ("speed-up"), and recall@32 (tied scores count as found, as in `bench_retrieval_scale.py`).

    python benchmarks/bench_retrieval_approx.py [--sizes 65536 262144 1048576] [--reps 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from memorizing_experiments.benchmarks import ivf_nlist, recall, retrieval_approx_markdown, write_results
from memorizing_experiments.real_keys import largest_cached
from memorizing_hf.retrieval import ExactBackend
from memorizing_hf.retrieval_faiss import FaissBackend
from memorizing_hf.retrieval_pages import PageBackend

K = 32  # entries retrieved per query, as bench_retrieval_scale.py


def settings(args: argparse.Namespace, n: int) -> dict[str, tuple[str, str, object, Callable[[], None]]]:
    """`{name: (method, setting, backend, apply)}` for memory size `n`. Settings that differ only at search time
    share one backend (one index, built once): `apply()` switches it to the setting (IVF nprobe, HNSW efSearch,
    page budget)."""
    out: dict[str, tuple[str, str, object, Callable[[], None]]] = {
        "exact": ("exact (ours)", "two-pass", ExactBackend(), lambda: None)
    }
    nlist = ivf_nlist(n)
    ivf = FaissBackend("ivf", nlist=nlist, train_points_per_list=64, train_iterations=10)
    for nprobe in args.nprobe:
        out[f"ivf{nprobe}"] = ("faiss IVF, MIPS->L2", f"nlist {nlist}, nprobe {nprobe}", ivf, _nprobe(ivf, nprobe))
    for links in args.hnsw_m:
        hnsw = FaissBackend("hnsw", hnsw_links=links)
        for ef in args.ef:
            out[f"hnsw{links}_{ef}"] = (
                "faiss HNSW, MIPS->L2",
                f"M {links}, efSearch {ef}",
                hnsw,
                functools.partial(setattr, hnsw, "ef_search", ef),
            )
    for page in args.page:
        pages = PageBackend(lists=nlist, page_size=page)
        for budget in args.budget + ([None] if args.exact_pages else []):
            setting = f"{nlist} lists, page {page}, "
            setting += "exact" if budget is None else f"budget {budget}"
            out[f"pages{page}_{budget}"] = (
                "pages (ours), MIPS->L2",
                setting,
                pages,
                functools.partial(setattr, pages, "budget", budget),
            )
    return out


def _nprobe(backend: FaissBackend, nprobe: int) -> Callable[[], None]:
    def apply() -> None:
        backend.nprobe = nprobe
        for row in backend._rows.values():
            for index in row.indexes:
                if index is not None:
                    index.nprobe = min(nprobe, index.nlist)

    return apply


def measure(n: int, keys_all: torch.Tensor, queries: torch.Tensor, args: argparse.Namespace) -> dict:
    keys = keys_all[:, :n].contiguous()[None]  # [1, H, n, D]
    q = queries[None].contiguous()  # [1, H, M, D]
    lengths = torch.tensor([n])
    methods = settings(args, n)
    row: dict = {"n": n, "load_average_before": os.getloadavg(), "methods": {}}
    built: dict[int, float] = {}
    for name, (method, setting, backend, apply) in methods.items():
        build = None
        if id(backend) not in built:
            apply()
            start = time.perf_counter()
            backend.search(q[:, :, :1], keys, lengths, K)  # builds the index
            build = built[id(backend)] = time.perf_counter() - start
            print(f"  n={n} {method}: built in {build:.1f} s", flush=True)
        row["methods"][name] = {"method": method, "setting": setting, "build_s": build, "times_s": []}
    ref_s, ref_i = ExactBackend().search(q, keys, lengths, K)
    for name, (_, _, backend, apply) in methods.items():
        apply()
        row["methods"][name].update(recall(backend.search(q, keys, lengths, K)[1], q, keys, ref_s, ref_i))
    for round_ in range(args.warmup + args.reps):
        for name, (_, _, backend, apply) in methods.items():
            apply()
            start = time.perf_counter()
            backend.search(q, keys, lengths, K)
            if round_ >= args.warmup:
                row["methods"][name]["times_s"].append(time.perf_counter() - start)
        print(f"  n={n} round {round_ + 1}: load {os.getloadavg()[0]:.1f}", flush=True)
    exact_times = row["methods"]["exact"]["times_s"]
    for entry in row["methods"].values():
        entry["median_s"] = statistics.median(entry["times_s"])
        entry["speedup_vs_exact"] = statistics.median(e / t for e, t in zip(exact_times, entry["times_s"]))
        print(
            f"  n={n} {entry['method']} {entry['setting']}: recall {entry['recall']:.4f}, "
            f"{entry['speedup_vs_exact']:.2f}x exact",
            flush=True,
        )
    row["load_average_after"] = os.getloadavg()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[65536, 262144, 1048576])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--hnsw-m", type=int, nargs="*", default=[32], help="HNSW links (none: no HNSW)")
    parser.add_argument("--ef", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--page", type=int, nargs="+", default=[64])
    parser.add_argument("--budget", type=float, nargs="+", default=[0.0025, 0.005, 0.01, 0.02])
    parser.add_argument("--exact-pages", action="store_true", help="also time the page backend's exact mode")
    parser.add_argument("--out", default="benchmarks/results/retrieval_approx.json")
    parser.add_argument("--markdown", help="print the tables of an existing results file and exit")
    args = parser.parse_args()
    if args.markdown:
        import json

        print(retrieval_approx_markdown(json.loads(Path(args.markdown).read_text())))
        return
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    tensors, path = largest_cached()
    sizes = [n for n in args.sizes if f"queries.{n}" in tensors]
    info = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "threads": args.threads,
        "reps": args.reps,
        "warmup": args.warmup,
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "keys": f"SmolLM2-135M layer 21 reading the CPython stdlib ({path.name}), raw (joint mode)",
        "skipped_sizes_no_real_keys": [n for n in args.sizes if n not in sizes],
        "load_average_before": os.getloadavg(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    results = [measure(n, tensors["keys"], tensors[f"queries.{n}"], args) for n in sizes]
    info["load_average_after"] = os.getloadavg()
    write_results(args.out, info, results)
    print(retrieval_approx_markdown({"info": info, "results": results}))


if __name__ == "__main__":
    main()
