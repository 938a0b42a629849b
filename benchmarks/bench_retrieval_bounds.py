"""How many keys an exact coarse-to-fine search must score on real keys: the pruning power of upper bounds on q . k.

An exact search that skips whole groups of keys must score every group whose upper bound on `q . k` reaches the
query's k-th best score (below that the group cannot hold a top-k key). This measures the share of keys in such
groups, for every query, with the exact k-th best score known (the best case for any such search: it also needs a
lower bound of that score first). Groups and bounds:

* consecutive slots (groups of `--groups` slots, as the exact search's pass 1 and Quest's pages take them), with the
  box bound `sum_d max(q_d min_d, q_d max_d)` over the group's per-dimension minima and maxima (Quest) and the ball
  bound `q . c + |q| r` (c: the group's mean, r: its largest distance to it);
* the page backend's lists (`memorizing_hf.retrieval_pages.PageBackend`: k-means over the MIPS -> L2 augmented keys,
  as many lists as `bench_retrieval_approx.py` gives it, IVF's nlist), with the same two bounds; its exact mode
  visits lists by the ball bound;
* single keys, with the bound a cheaper pass 1 would give: scores in the top `--dims` principal directions of the
  keys, plus `|q_r| |k_r|` (Cauchy-Schwarz) for the remaining directions: the share of keys it leaves to rescore,
  one by one and in groups of `--groups` consecutive slots.

Keys and queries as in `bench_retrieval_approx.py` (SmolLM2-135M's memory layer 21 reading the CPython standard
library, raw keys as joint mode stores them, 3 key/value heads, 1,536 queries per head, k=32). No timing: shares of
keys, which decide whether such a search can be faster than scoring every key.

    python benchmarks/bench_retrieval_bounds.py [--sizes 8192 65536] [--groups 16 64] [--dims 16 32 48]

Writes `benchmarks/results/retrieval_bounds.json` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from memorizing_experiments.benchmarks import ivf_nlist, size_label, write_results
from memorizing_experiments.real_keys import largest_cached
from memorizing_hf.retrieval_pages import PageBackend, _Lists

TOP_K = 32
RESULTS = Path(__file__).parent / "results"


def box_bound(q: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """`[Q, G]` upper bounds of `q [Q, D] . k` over every k inside the boxes `[low, high]` (`[G, D]` each)."""
    return q.clamp(min=0) @ high.T + q.clamp(max=0) @ low.T


def ball_bound(q: torch.Tensor, centre: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """`[Q, G]` upper bounds of `q [Q, D] . k` over every k within `radius [G]` of `centre [G, D]`."""
    return q @ centre.T + q.norm(dim=1, keepdim=True) * radius


def share_scored(bound: torch.Tensor, kth: torch.Tensor, sizes: torch.Tensor) -> float:
    """Mean over queries of the share of keys in groups whose bound `[Q, G]` reaches the query's k-th best `[Q]`."""
    return float(((bound >= kth[:, None]).float() @ sizes.float()).mean() / sizes.sum())


def consecutive(keys: torch.Tensor, q: torch.Tensor, kth: torch.Tensor, size: int) -> dict[str, float]:
    """Both bounds over groups of `size` consecutive slots of `keys [N, D]`."""
    groups = keys.view(-1, size, keys.shape[1])
    centre = groups.mean(1)
    radius = (groups - centre[:, None]).norm(dim=-1).amax(1)
    sizes = torch.full((groups.shape[0],), size)
    return {
        "box": share_scored(box_bound(q, groups.amin(1), groups.amax(1)), kth, sizes),
        "ball": share_scored(ball_bound(q, centre, radius), kth, sizes),
    }


def projection(
    keys: torch.Tensor, q: torch.Tensor, kth: torch.Tensor, dims: list[int], group_sizes: list[int]
) -> dict[str, dict[str, float]]:
    """Per number of directions `d`: the share of keys of `keys [N, D]` whose bound from a `d`-dimensional projection
    (exact scores in the keys' top `d` principal directions, Cauchy-Schwarz in the others) reaches the k-th best,
    alone and in groups of consecutive slots (a group is rescored when any of its keys' bounds reaches it)."""
    moments, directions = torch.linalg.eigh(keys.T @ keys)
    moments, directions = moments.flip(0), directions.flip(1)  # largest second moment first
    shares = {}
    for d in dims:
        basis = directions[:, :d]
        keys_d, q_d = keys @ basis, q @ basis
        keys_rest = (keys - keys_d @ basis.T).norm(dim=1)
        q_rest = (q - q_d @ basis.T).norm(dim=1)
        bound = q_d @ keys_d.T + q_rest[:, None] * keys_rest
        shares[str(d)] = {
            "second_moment": float(moments[:d].sum() / moments.sum()),
            "keys": share_scored(bound, kth, torch.ones(bound.shape[1])),
        }
        for size in group_sizes:
            groups = bound.view(q.shape[0], -1, size).amax(2)  # a group's bound: the largest of its keys'
            shares[str(d)][f"consecutive_{size}"] = share_scored(groups, kth, torch.full((groups.shape[1],), size))
    return shares


def page_lists(lists: _Lists, keys: torch.Tensor, q: torch.Tensor, kth: torch.Tensor, head: int) -> dict[str, float]:
    """Both bounds over the page backend's `lists` of `keys [H, N, D]`, for the queries of `head`."""
    assign, distance = lists.assign[head], lists.distance[head]
    count, D = lists.centroids.shape[1], keys.shape[2]
    sizes = torch.bincount(assign, minlength=count)
    index = assign[:, None].expand(-1, D)
    high = torch.full((count, D), float("-inf")).scatter_reduce(0, index, keys[head], "amax")
    low = torch.full((count, D), float("inf")).scatter_reduce(0, index, keys[head], "amin")
    radius = torch.zeros(count).scatter_reduce(0, assign, distance, "amax")
    centre = lists.centroids[head, :, :D]
    return {
        "lists": count,
        "box": share_scored(box_bound(q, low, high), kth, sizes),
        "ball": share_scored(ball_bound(q, centre, radius), kth, sizes),
    }


def measure(keys: torch.Tensor, queries: torch.Tensor, group_sizes: list[int], dims: list[int]) -> list[dict]:
    """One row per head: the shares of keys scored, for `keys [H, N, D]` and `queries [H, M, D]`."""
    backend = PageBackend(lists=ivf_nlist(keys.shape[1]))
    lists = backend._lists(0, keys, keys.shape[1])  # the lists its search would use (trained and assigned)
    rows = []
    for head in range(keys.shape[0]):
        q = queries[head]
        kth = (q @ keys[head].T).topk(TOP_K, dim=1).values[:, -1]
        row: dict = {"head": head, "pages": page_lists(lists, keys, q, kth, head)}
        for size in group_sizes:
            row[f"consecutive_{size}"] = consecutive(keys[head], q, kth, size)
        row["projection"] = projection(keys[head], q, kth, dims, group_sizes)
        rows.append(row)
        print(f"  N={keys.shape[1]} head {head}: {row}", flush=True)
    return rows


def markdown(data: dict) -> str:
    lines = [
        "| entries | head | groups | box bound: keys scored | ball bound: keys scored |",
        "|---:|---:|---|---:|---:|",
    ]
    for result in data["results"]:
        for row in result["rows"]:
            for name, shares in row.items():
                if name in ("head", "projection"):
                    continue
                label = f"page lists ({shares['lists']})" if name == "pages" else name.replace("_", " ") + " slots"
                lines.append(
                    f"| {size_label(result['n'])} | {row['head']} | {label} | {shares['box']:.1%} | "
                    f"{shares['ball']:.1%} |"
                )
    lines += [
        "",
        "| entries | head | directions | their share of the keys' second moment | keys left: single keys |"
        " in groups of consecutive slots |",
    ]
    lines.append("|---:|---:|---:|---:|---:|---|")
    for result in data["results"]:
        for row in result["rows"]:
            for d, shares in row["projection"].items():
                groups = ", ".join(
                    f"{name.split('_')[1]}: {share:.1%}"
                    for name, share in shares.items()
                    if name.startswith("consecutive")
                )
                lines.append(
                    f"| {size_label(result['n'])} | {row['head']} | {d} | {shares['second_moment']:.1%} | "
                    f"{shares['keys']:.1%} | {groups} |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 65536])
    parser.add_argument("--groups", type=int, nargs="+", default=[16, 64], help="consecutive slots per group")
    parser.add_argument("--dims", type=int, nargs="+", default=[16, 32, 48], help="directions of the projection bound")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "retrieval_bounds.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tensors, path = largest_cached()
    sizes = [n for n in args.sizes if f"queries.{n}" in tensors]
    if any(n % size for n in sizes for size in args.groups):
        parser.error("every size must be a multiple of every group size")
    info = {
        "command": " ".join(["python", *sys.argv]),
        "keys": f"SmolLM2-135M layer 21 reading the CPython stdlib ({path.name}), raw",
        "k": TOP_K,
        "skipped_sizes_no_real_keys": [n for n in args.sizes if n not in sizes],
    }
    results = [
        {"n": n, "rows": measure(tensors["keys"][:, :n].contiguous(), tensors[f"queries.{n}"], args.groups, args.dims)}
        for n in sizes
    ]
    write_results(args.out, info, results)
    print(markdown({"info": info, "results": results}))


if __name__ == "__main__":
    main()
