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
