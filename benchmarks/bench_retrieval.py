"""Benchmark of the exact retrieval backend against plain matmul + topk and faiss IndexFlatIP.

One memory-attention layer of SmolLM2-135M reading one 512-token segment: R=1 batch row, H=3 key/value heads,
9 query heads x 512 tokens (M=1536 queries per key/value head), D=64, fp32, k=32, at 8,192 / 65,536 / 262,144
stored entries; `--queries 3` is one decoding step instead (3 query heads per key/value head, one token). Prints a
table and writes JSON (`--out`).

    python benchmarks/bench_retrieval.py [--sizes 8192 65536 262144] [--queries 1536] [--repeats 5]
        [--keys repeated|real] [--out ...] [--profile]

`--keys real`: the real keys of `real_keys.py` (SmolLM2-135M's layer 21 reading the standard library; the largest
cache built so far), the first N of them, and the 1,536 queries recorded at the smallest checkpoint >= N. Besides
the default search, every row times the search with an fp32 first pass and, where the first pass is bf16, with
whole keys (`SPLIT_KEYS = False`), and counts the keys pass 2 rescores per query.

faiss runs in a subprocess: faiss and torch ship different OpenMP runtimes, and after faiss has run in a process
torch's multi-threaded ops there become up to ~30x slower (the spinning faiss workers starve torch's).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from memorizing_experiments.real_keys import largest_cached
from memorizing_hf import retrieval
from memorizing_hf.retrieval import exact_topk

R, H, D = 1, 3, 64
READING_QUERIES = 9 // 3 * 512


PASSAGE = 40  # keys of the repeated passage (`--keys repeated`)


def make_data(
    n: int, m: int = READING_QUERIES, seed: int = 0, keys: str = "random"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`m` random queries per (row, head) and `n` random keys, or (`keys="repeated"`) keys of a 40-token passage
    repeated to `n` entries with noise of 1e-6 (as text repeating itself, like the passkey's filler, stores them) and
    queries near the passage's keys: every query then has thousands of near-equal top scores; or (`keys="real"`)
    real keys and queries (the module docstring)."""
    if keys == "real":
        tensors, _ = largest_cached()
        recorded = sorted(int(name.split(".")[1]) for name in tensors if name.startswith("queries."))
        at = min((c for c in recorded if c >= n), default=None)
        if at is None or tensors["keys"].shape[1] < n:
            raise SystemExit(f"the real-key cache holds {tensors['keys'].shape[1]} entries, fewer than {n}")
        return tensors[f"queries.{at}"][None, :, :m], tensors["keys"][None, :, :n].contiguous(), torch.tensor([n])
    gen = torch.Generator().manual_seed(seed + n)
    if keys == "repeated":
        passage = torch.randn(R, H, PASSAGE, D, generator=gen)
        stored = passage.repeat(1, 1, -(-n // PASSAGE), 1)[:, :, :n] + 1e-6 * torch.randn(R, H, n, D, generator=gen)
        pick = torch.randint(0, PASSAGE, (m,), generator=gen)
        queries = passage[:, :, pick] + 0.3 * torch.randn(R, H, m, D, generator=gen)
        return queries, stored, torch.tensor([n] * R)
    queries = torch.randn(R, H, m, D, generator=gen)
    stored = torch.randn(R, H, n, D, generator=gen)
    return queries, stored, torch.tensor([n] * R)


def interleaved_times(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Wall times of every function over `repeats` rounds (one call of each per round, after one warm-up round).

    Interleaving spreads any interference from other processes over all the functions alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            start, cpu = time.perf_counter(), time.process_time()
            fn()
            if round_:
                times[name].append((time.perf_counter() - start, time.process_time() - cpu))
    return times


def summary(times: list[tuple[float, float]]) -> dict:
    """Median and min wall time, and median process CPU time (all threads; robust to other processes only with
    one thread)."""
    wall = [t for t, _ in times]
    return {
        "median_s": statistics.median(wall),
        "min_s": min(wall),
        "times_s": wall,
        "cpu_median_s": statistics.median(c for _, c in times),
    }


def plain_topk(queries: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.matmul(queries, keys.transpose(-1, -2)).topk(k, dim=-1)


class PeakMemory(TorchDispatchMode):
    """Peak bytes of the tensor storages created by torch ops inside the context (views counted once)."""

    def __init__(self, exclude: list[torch.Tensor]):
        super().__init__()
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.live: dict[int, list[int]] = {}
        self.current = self.peak = 0

    def _release(self, ptr: int) -> None:
        self.live[ptr][1] -= 1
        if self.live[ptr][1] == 0:
            self.current -= self.live.pop(ptr)[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.exclude:
                ptr = t.untyped_storage().data_ptr()
                if ptr not in self.live:
                    self.live[ptr] = [t.untyped_storage().nbytes(), 0]
                    self.current += self.live[ptr][0]
                    self.peak = max(self.peak, self.current)
                self.live[ptr][1] += 1
                weakref.finalize(t, self._release, ptr)
        return out


def faiss_time(n: int, m: int, k: int, repeats: int, keys: str) -> dict:
    """Search time of one IndexFlatIP per head (built beforehand, not timed), in this process."""
    import faiss

    faiss.omp_set_num_threads(torch.get_num_threads())
    queries, keys, _ = make_data(n, m, keys=keys)
    indexes = []
    for h in range(H):
        indexes.append(faiss.IndexFlatIP(D))
        indexes[h].add(keys[0, h].numpy())
    qs = [queries[0, h].contiguous().numpy() for h in range(H)]
    times = interleaved_times({"faiss": lambda: [indexes[h].search(qs[h], k) for h in range(H)]}, repeats)
    return summary(times["faiss"]) | {"faiss_threads": faiss.omp_get_max_threads()}


def faiss_times_in_subprocess(sizes: list[int], m: int, k: int, repeats: int, keys: str) -> tuple[dict[int, dict], str]:
    """faiss timings from a fresh process (see the module docstring), or ({}, why not)."""
    command = [sys.executable, __file__, "--faiss-worker", "--k", str(k), "--repeats", str(repeats), "--keys", keys]
    command += ["--queries", str(m)]
    command += ["--threads", str(torch.get_num_threads()), "--sizes"]
    try:
        worker = subprocess.run(command + [str(n) for n in sizes], capture_output=True, text=True, check=True)
        result = json.loads(worker.stdout.strip().splitlines()[-1])
    except (subprocess.CalledProcessError, json.JSONDecodeError, IndexError) as error:
        return {}, f"faiss skipped: {getattr(error, 'stderr', '') or error}".strip()[:300]
    return {int(n): v for n, v in result.items()}, "faiss: IndexFlatIP per head, search only, in a subprocess"


def with_settings(fn: Callable[[], object], **settings: object) -> Callable[[], object]:
    """`fn`, called with the module constants of `retrieval` set to `settings` (restored after)."""

    def call() -> object:
        saved = {name: getattr(retrieval, name) for name in settings}
        for name, value in settings.items():
            setattr(retrieval, name, value)
        try:
            return fn()
        finally:
            for name, value in saved.items():
                setattr(retrieval, name, value)

    return call


def rescored_per_query(search: Callable[[], object], queries: int) -> float:
    """Keys that pass 2 of one call of `search` rescores, per query (0 where it searches densely)."""
    counted = []
    score_groups = retrieval.score_groups

    def counting(q, keys, row_len, lo, k, sub, low, selected):  # noqa: ANN001, ANN202
        counted.append(int(selected.sum()) * sub)
        return score_groups(q, keys, row_len, lo, k, sub, low, selected)

    retrieval.score_groups = counting
    try:
        search()
    finally:
        retrieval.score_groups = score_groups
    return sum(counted) / queries


def measure(n: int, m: int, k: int, repeats: int, keys: str) -> dict:
    """exact_topk (bf16 first pass with split and whole keys, where the CPU has one, and fp32 first pass) and plain
    matmul + topk at n entries and m queries per head, pass 2's rescored keys, and exact_topk's peak memory."""
    queries, keys, lengths = make_data(n, m, keys=keys)
    row: dict = {"n": n, "kv_bytes": 2 * keys.numel() * keys.element_size()}
    exact = {"exact": lambda: exact_topk(queries, keys, lengths, k)}
    exact["exact_fp32_pass1"] = with_settings(exact["exact"], APPROX_BF16=False)
    if retrieval.bf16_matmul_is_fast():
        exact["exact_whole_keys"] = with_settings(exact["exact"], SPLIT_KEYS=False)
    times = interleaved_times(exact | {"plain": lambda: plain_topk(queries, keys, k)}, repeats)
    row |= {name: summary(t) for name, t in times.items()}
    row["rescored_per_query"] = {name: rescored_per_query(fn, queries.shape[:3].numel()) for name, fn in exact.items()}
    with PeakMemory(exclude=[queries, keys, lengths]) as mem:
        exact_topk(queries, keys, lengths, k)
    row["exact_peak_bytes"] = mem.peak
    row["exact_gflops"] = 2 * R * H * m * n * D / row["exact"]["median_s"] / 1e9
    exact_scores, _ = exact_topk(queries, keys, lengths, k)  # sanity check: the same scores as the plain search
    row["max_score_diff_vs_plain"] = float((exact_scores - plain_topk(queries, keys, k)[0]).abs().max())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 65536, 262144])
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--queries", type=int, default=READING_QUERIES, help="queries per key/value head")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/retrieval.json")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's top ops of exact_topk")
    parser.add_argument("--threads", type=int, help="torch (and faiss) threads; default: torch's default")
    parser.add_argument("--keys", choices=["random", "repeated", "real"], default="random", help="see make_data")
    parser.add_argument("--faiss-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.faiss_worker:
        print(json.dumps({n: faiss_time(n, args.queries, args.k, args.repeats, args.keys) for n in args.sizes}))
        return

    threads = torch.get_num_threads()
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    matmul_s = summary(interleaved_times({"matmul": lambda: a @ b}, args.repeats)["matmul"])["min_s"]
    machine_gflops = 2 * 2048**3 / matmul_s / 1e9
    info = {
        "threads": threads,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "bf16_first_pass": retrieval.bf16_matmul_is_fast(),
        "load_average_before": os.getloadavg(),
        "matmul_2048_gflops": machine_gflops,
        "shape": {"R": R, "H": H, "M": args.queries, "D": D, "k": args.k, "dtype": "float32"},
        "keys": args.keys,
    }
    print(
        f"torch {torch.__version__}, {threads} threads, bf16 first pass: {info['bf16_first_pass']}, "
        f"load average {info['load_average_before'][0]:.2f}"
    )
    print(f"dense fp32 matmul 2048^3: {machine_gflops:.1f} GFLOP/s")

    results = []
    for n in args.sizes:
        results.append(measure(n, args.queries, args.k, args.repeats, args.keys))
        print(f"  measured n={n}", flush=True)
    faiss_result, faiss_note = faiss_times_in_subprocess(args.sizes, args.queries, args.k, args.repeats, args.keys)
    nan = {"median_s": float("nan"), "min_s": float("nan")}
    for row in results:
        row["faiss"] = faiss_result.get(row["n"], nan)
        for stat in ("median_s", "min_s"):
            row[f"plain_over_exact_{stat[:-2]}"] = row["plain"][stat] / row["exact"][stat]
            row[f"faiss_over_exact_{stat[:-2]}"] = row["faiss"][stat] / row["exact"][stat]

    header = (
        f"{'entries':>8} | {'exact s':>13} | {'exact fp32-p1':>13} | {'plain s':>13} | {'faiss s':>13} | "
        f"{'plain/exact x':>13} | {'faiss/exact x':>13} | {'GFLOP/s':>7} | {'% matmul':>8} | "
        f"{'peak MiB':>8} | {'peak/KV':>7}"
    )
    print(header)
    print("-" * len(header))
    both = lambda d, f="8.3f": f"{d['median_s']:{f}}/{d['min_s']:<{f}}"  # noqa: E731
    for row in results:
        print(
            f"{row['n']:>8} | {both(row['exact'], '.3f'):>13} | {both(row['exact_fp32_pass1'], '.3f'):>13} | "
            f"{both(row['plain'], '.3f'):>13} | {both(row['faiss'], '.3f'):>13} | "
            f"{row['plain_over_exact_median']:>6.2f}/{row['plain_over_exact_min']:<6.2f} | "
            f"{row['faiss_over_exact_median']:>6.2f}/{row['faiss_over_exact_min']:<6.2f} | "
            f"{row['exact_gflops']:>7.1f} | {100 * row['exact_gflops'] / machine_gflops:>7.1f}% | "
            f"{row['exact_peak_bytes'] / 2**20:>8.1f} | {row['exact_peak_bytes'] / row['kv_bytes']:>7.2f}"
        )
    for row in results:
        whole = f", whole keys {row['exact_whole_keys']['median_s']:.3f} s" if "exact_whole_keys" in row else ""
        print(f"n={row['n']}: keys rescored by pass 2 per query {row['rescored_per_query']}{whole}")
    print(
        "process CPU s (median):  "
        + "; ".join(
            f"n={row['n']}: exact {row['exact']['cpu_median_s']:.3f}, plain {row['plain']['cpu_median_s']:.3f}"
            + (f", faiss {row['faiss']['cpu_median_s']:.3f}" if "cpu_median_s" in row["faiss"] else "")
            for row in results
        )
    )
    print(
        f"(times: median/min of {args.repeats} interleaved runs after a warm-up; {faiss_note}; exact fp32-p1 = "
        "exact_topk with its first pass in fp32 instead of bf16; GFLOP/s = 2 R H M n D / median exact time; "
        "peak = tensors allocated by exact_topk; KV = stored keys + values bytes)"
    )
    info["load_average_after"] = os.getloadavg()
    print(f"load average after: {info['load_average_after'][0]:.2f}")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        queries, keys, lengths = make_data(65536)
        exact_topk(queries, keys, lengths, args.k)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            exact_topk(queries, keys, lengths, args.k)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"info": info, "faiss": faiss_note, "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
