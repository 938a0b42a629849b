"""Latency and recall of the faiss retrieval backend at the paper's memory size (CPU).

One row, 3 heads, 65,536 entries per (row, head), 1,536 queries, D=64, k=32. Reports exact torch
search (matmul + topk), faiss flat, and faiss IVF (default nlist = 4*sqrt(65536) = 1024) for several
nprobe values with recall@32 against exact search, plus IVF training time and the cost of one
512-entry FIFO overwrite (remove old ids + add) into the full memory.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_faiss_backend.py [--data clustered|random]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from memorizing_hf.retrieval_faiss import FaissBackend

H, L, D, M, K = 3, 65_536, 64, 1_536, 32


def make_keys(kind: str, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm keys [1, H, L, D] (the memory layer L2-normalises keys) and unit-norm queries, each
    a stored key plus noise of half its norm. "clustered": keys around 1,024 centres, with noise as
    large as the centre; "random": uniform on the sphere, the worst case for IVF."""

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    if kind == "clustered":
        centres = unit(rng.standard_normal((1024, D)))
        x = unit(centres[rng.integers(0, 1024, (1, H, L))] + unit(rng.standard_normal((1, H, L, D))))
    else:
        x = unit(rng.standard_normal((1, H, L, D)))
    q = unit(x[:, :, rng.integers(0, L, M)] + 0.5 * unit(rng.standard_normal((1, H, M, D))))
    return torch.tensor(x, dtype=torch.float32), torch.tensor(q, dtype=torch.float32)


def timed(fn, repeat: int = 3) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def recall(got: torch.Tensor, exact: torch.Tensor) -> float:
    hits = (got.unsqueeze(-1) == exact.unsqueeze(-2)).any(-1).sum().item()
    return hits / exact.numel()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", choices=("clustered", "random"), default="clustered")
    args = parser.parse_args()
    torch.manual_seed(0)
    keys, queries = make_keys(args.data, np.random.default_rng(0))
    lengths = torch.tensor([L])
    rows, slots = torch.zeros(L, dtype=torch.long), torch.arange(L)
    print(f"data={args.data} heads={H} entries={L} queries={M} D={D} k={K} threads={torch.get_num_threads()}")

    t, exact = timed(lambda: torch.topk(queries @ keys.transpose(-1, -2), K))
    exact = exact.indices
    print(f"torch exact matmul+topk : search {t * 1e3:8.1f} ms")

    new = torch.nn.functional.normalize(torch.randn(512, H, D), dim=-1)
    overwrite = (torch.zeros(512, dtype=torch.long), torch.arange(512), new)

    flat = FaissBackend("flat")
    t_add, _ = timed(lambda: flat.add(rows, slots, keys[0].transpose(0, 1)), repeat=1)
    t, (_, got) = timed(lambda: flat.search(queries, keys, lengths, K))
    t_w, _ = timed(lambda: flat.add(*overwrite))
    print(
        f"faiss flat              : search {t * 1e3:8.1f} ms  recall {recall(got, exact):.3f}"
        f"  (fill {t_add:.2f} s, 512 overwrites {t_w * 1e3:.1f} ms)"
    )

    ivf = FaissBackend("ivf")
    ivf.add(rows, slots, keys[0].transpose(0, 1))
    t_train, _ = timed(lambda: ivf.search(queries[:, :, :1], keys, lengths, K), repeat=1)
    t_w, _ = timed(lambda: ivf.add(*overwrite))
    ivf.add(overwrite[0], overwrite[1], keys[0, :, :512].transpose(0, 1))  # restore the originals
    print(f"faiss ivf nlist={ivf._nlist(L)}    : train+add {t_train:.2f} s, 512 overwrites {t_w * 1e3:.1f} ms")
    for nprobe in (1, 4, 8, 16, 32, 64):
        for index in ivf._rows[0].indexes:
            index.nprobe = nprobe
        t, (_, got) = timed(lambda: ivf.search(queries, keys, lengths, K))
        print(f"faiss ivf nprobe={nprobe:<3}     : search {t * 1e3:8.1f} ms  recall@{K} {recall(got, exact):.3f}")


if __name__ == "__main__":
    main()
