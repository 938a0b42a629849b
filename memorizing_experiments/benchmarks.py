"""What the benchmark scripts (benchmarks/) share: timing, recall against exact search, IVF sizing, writing results."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def write_results(path: str | Path, info: dict[str, Any], results: Any) -> None:
    """Write `{"info": ..., "results": ...}` as JSON to `path` (folders created) and say where."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"info": info, "results": results}, indent=2))
    print(f"wrote {out}")


def median_time(fn: Callable[[], Any], reps: int, warmup: int = 1) -> tuple[float, list[float], Any]:
    """Median wall time of `reps` calls of `fn` after `warmup` calls, every time, and the last result."""
    out = None
    times = []
    for i in range(warmup + reps):
        start = time.perf_counter()
        out = fn()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times), times, out


def recall(
    got: torch.Tensor,
    queries: torch.Tensor,
    keys: torch.Tensor,
    ref_scores: torch.Tensor,
    ref_ids: torch.Tensor | None = None,
) -> dict[str, float]:
    """Recall@k of the slots `got [R, H, M, k]` of `queries [R, H, M, D]` in `keys [R, H, N, D]` against exact search
    (`ref_scores`, `ref_ids`, same shape as `got`).

    `recall` counts a returned entry as found when its exact score reaches the k-th best score: real text repeats
    itself (the standard library holds near-identical files), so many keys are exact duplicates and the k-th score
    is often tied, and which of the tied ids a search returns is arbitrary. `recall_ids` (given `ref_ids`) is the
    plain share of exact's own ids found, which counts such ties as misses."""
    index = got.clamp(min=0)[..., None].expand(*got.shape, keys.shape[-1])
    found = keys[:, :, None].expand(-1, -1, got.shape[2], -1, -1).gather(3, index)
    scores = torch.einsum("rhmd,rhmkd->rhmk", queries.float(), found.float())
    tolerance = 1e-5 * ref_scores.abs().amax(-1, keepdim=True)  # fp32 rounding of a score of this size
    out = {"recall": float(((scores >= ref_scores[..., -1:] - tolerance) & (got >= 0)).float().mean())}
    if ref_ids is not None:
        out["recall_ids"] = float((got.unsqueeze(-1) == ref_ids.unsqueeze(-2)).any(-1).float().mean())
    return out


def ivf_nlist(n: int) -> int:
    """IVF lists for `n` entries: the power of two at or below 2 sqrt(n), at least 16."""
    return 1 << max(int(2 * n**0.5).bit_length() - 1, 4)


def load_label(load: list[float] | None) -> str:
    """A load average triple as `1.0/1.2/1.3`."""
    return "/".join(f"{x:.1f}" for x in load) if load else "?"


def size_label(n: int) -> str:
    """Entries as `8K`, `256K`, `1M`."""
    return f"{n // 1024}K" if n < 2**20 else f"{n / 2**20:g}M"


def retrieval_approx_markdown(data: dict) -> str:
    """The tables of `docs/performance.md`'s approximate-recall section, from this script's JSON."""
    info = data["info"]
    lines = [
        f"Command: `{info['command']}` — {info['threads']} thread(s), faiss {info['faiss']}, keys: {info['keys']}; "
        f"started {info['started']}, load average before {load_label(info['load_average_before'])}, after "
        f"{load_label(info['load_average_after'])}. Every method timed once per round in {info['reps']} interleaved "
        f"rounds (after {info['warmup']} warm-up); speed-up = median over rounds of exact time / method time.",
        "",
        "| entries | method | setting | recall@32 | same ids | speed-up vs exact | build s | load (before/after) |",
        "|---:|---|---|---:|---:|---:|---:|---|",
    ]
    best = []
    for row in data["results"]:
        size = size_label(row["n"])
        load = f"{load_label(row['load_average_before'])} / {load_label(row['load_average_after'])}"
        ok = []
        for entry in row["methods"].values():
            build = "" if entry["build_s"] is None else f"{entry['build_s']:.1f}"
            lines.append(
                f"| {size} | {entry['method']} | {entry['setting']} | {entry['recall']:.4f} | "
                f"{entry['recall_ids']:.4f} | {entry['speedup_vs_exact']:.2f} | {build} | {load} |"
            )
            if entry["recall"] >= 0.95 and "exact" not in (entry["method"] + entry["setting"]):
                ok.append(entry)
        if ok:
            top = max(ok, key=lambda e: e["speedup_vs_exact"])
            best.append(
                f"- {size}: fastest setting with recall@32 ≥ 0.95: {top['method']} {top['setting']} "
                f"({top['speedup_vs_exact']:.2f}x exact, recall {top['recall']:.4f})"
            )
        else:
            best.append(f"- {size}: no measured setting reaches recall@32 ≥ 0.95")
    return "\n".join(lines + [""] + best) + "\n"


def reading_markdown(data: dict) -> str:
    """`bench_reading.py`'s results as a markdown table (rows: configurations; ratios: time / the baseline's, per
    round, median)."""
    info = data["info"]
    segment = info.get("segment", 512)
    lines = [
        f"Command: `{info['command']}` — {info['threads']} thread(s), torch {info['torch']}, transformers "
        f"{info['transformers']}; {info['reps']} interleaved rounds per N (after {info['warmup']} warm-up), "
        f"{segment}-token segments; load average before {load_label(info['load_average_before'])}, after "
        f"{load_label(info['load_average_after'])}. × = time / baseline time of the same round (median over rounds): "
        f"window = base model on the previous {segment} + the segment's {segment} tokens (same local context), "
        f"bare = base model on the segment alone.",
        "",
        "| layers | combine | backend | N | s/segment | tokens/s | × no-memory (window) | × bare segment | load |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for group in data["results"]:
        load = f"{load_label(group['load_average_before'])} / {load_label(group['load_average_after'])}"
        for row in group["rows"]:
            lines.append(
                f"| {row['layers']} | {row['combine']} | {row['backend']} | {row['n']:,} | {row['median_s']:.3f} | "
                f"{row['tokens_per_s']:.0f} | {row['x_window']:.2f} | {row['x_bare']:.2f} | {load} |"
            )
    return "\n".join(lines) + "\n"
