"""Tests of the faiss retrieval backend against an independent ring-buffer model and naive search."""

from __future__ import annotations

import importlib.util
import sys
import time
from collections import deque

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memorizing_hf import retrieval_faiss
from memorizing_hf.retrieval_faiss import FaissBackend

needs_faiss = pytest.mark.skipif(importlib.util.find_spec("faiss") is None, reason="faiss not installed")


class RingModel:
    """Reference store: per row a deque of (write number, key [H, D]) holding the newest ``capacity``
    writes; write number w lives in slot w % capacity. Also keeps the storage tensor the real store
    would hand to ``search``, and forwards writes and resets to the backend under test."""

    def __init__(self, backend: FaissBackend, rows: int, heads: int, capacity: int, dim: int) -> None:
        self.backend, self.heads, self.capacity, self.dim = backend, heads, capacity, dim
        self.rows: list[deque] = []
        self.writes: list[int] = []
        self.keys = torch.zeros(0, heads, capacity, dim)
        self.grow(rows)

    def grow(self, rows: int) -> None:
        for _ in range(rows):
            self.rows.append(deque(maxlen=self.capacity))
            self.writes.append(0)
        self.keys = torch.cat([self.keys, torch.zeros(rows, self.heads, self.capacity, self.dim)])

    def write(self, sizes: list[int], gen: torch.Generator) -> None:
        """Append ``sizes[r]`` random keys to row r, in one backend.add call for all rows."""
        rows, slots, keys = [], [], []
        for r, n in enumerate(sizes):
            for _ in range(n):
                key = torch.randn(self.heads, self.dim, generator=gen)
                slot = self.writes[r] % self.capacity
                self.rows[r].append((self.writes[r], key))
                self.keys[r, :, slot] = key
                self.writes[r] += 1
                rows.append(r), slots.append(slot), keys.append(key)
        if rows:
            self.backend.add(torch.tensor(rows), torch.tensor(slots), torch.stack(keys))

    def reset(self, rows: list[int]) -> None:
        for r in rows:
            self.rows[r].clear()
            self.writes[r] = 0
        self.backend.reset(torch.tensor(rows, dtype=torch.long))

    def lengths(self) -> torch.Tensor:
        return torch.tensor([len(d) for d in self.rows], dtype=torch.long)

    def reference(self, queries: torch.Tensor, r: int, h: int) -> tuple[np.ndarray, np.ndarray]:
        """All (slot, score) of row r, head h for each query, sorted by descending score (float64)."""
        entries = list(self.rows[r])
        if not entries:
            return np.zeros((queries.shape[2], 0)), np.zeros((queries.shape[2], 0), dtype=np.int64)
        slots = np.array([w % self.capacity for w, _ in entries])
        stored = torch.stack([key[h] for _, key in entries]).double()
        full = (queries[r, h].double() @ stored.T).numpy()
        order = np.argsort(-full, axis=1, kind="stable")
        return np.take_along_axis(full, order, 1), slots[order]


def check_against_reference(model: RingModel, queries: torch.Tensor, k: int) -> None:
    scores, indices = model.backend.search(queries, model.keys, model.lengths(), k)
    R, H, M, _ = queries.shape
    assert scores.shape == indices.shape == (R, H, M, k)
    assert scores.dtype == torch.float32 and indices.dtype == torch.int64
    for r in range(R):
        for h in range(H):
            ref_scores, ref_slots = model.reference(queries, r, h)
            kk = min(k, ref_slots.shape[1])
            got_s, got_i = scores[r, h].double().numpy(), indices[r, h].numpy()
            # missing places
            assert (got_i[:, kk:] == -1).all() and np.isneginf(got_s[:, kk:]).all()
            if kk == 0:
                continue
            # sorted, right scores, and every returned slot really holds a key with that score
            np.testing.assert_allclose(got_s[:, :kk], ref_scores[:, :kk], atol=1e-4)
            for m in range(M):
                slot_score = dict(zip(ref_slots[m].tolist(), ref_scores[m].tolist()))
                for s, i in zip(got_s[m, :kk], got_i[m, :kk]):
                    assert abs(slot_score[int(i)] - s) < 1e-4
                assert len(set(got_i[m, :kk].tolist())) == kk
                # same neighbour set unless the k-th and (k+1)-th reference scores (nearly) tie
                tie = kk < ref_scores.shape[1] and ref_scores[m, kk - 1] - ref_scores[m, kk] < 1e-4
                if not tie:
                    assert set(got_i[m, :kk].tolist()) == set(ref_slots[m, :kk].tolist())


def _ops(max_size: int) -> st.SearchStrategy:
    write = st.tuples(st.just("write"), st.lists(st.integers(0, max_size), min_size=6, max_size=6))
    reset = st.tuples(st.just("reset"), st.lists(st.integers(0, 5), min_size=1, max_size=3, unique=True))
    grow = st.tuples(st.just("grow"), st.integers(1, 2))
    search = st.tuples(st.just("search"), st.tuples(st.integers(1, 5), st.integers(1, 12)))
    return st.lists(st.one_of(write, write, reset, grow, search), min_size=1, max_size=25)


def run_ops(backend: FaissBackend, capacity: int, heads: int, ops: list, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    model = RingModel(backend, rows=2, heads=heads, capacity=capacity, dim=4)
    for op, arg in ops + [("search", (3, 7))]:
        R = len(model.rows)
        if op == "write":
            model.write(arg[:R], gen)
        elif op == "reset":
            model.reset([r for r in arg if r < R])
        elif op == "grow" and R + arg <= 6:
            model.grow(arg)
        elif op == "search":
            queries = torch.randn(R, heads, arg[0], 4, generator=gen)
            check_against_reference(model, queries, arg[1])


@needs_faiss
@settings(max_examples=50, deadline=None)
@given(capacity=st.integers(1, 12), heads=st.integers(1, 2), seed=st.integers(0, 2**16), data=st.data())
def test_flat_matches_naive_search_under_fifo_writes_and_resets(capacity, heads, seed, data):
    """Exact results after ring wrap-arounds (also several in one call), resets and row growth."""
    ops = data.draw(_ops(max_size=3 * capacity))
    run_ops(FaissBackend("flat"), capacity, heads, ops, seed)


@needs_faiss
@settings(max_examples=20, deadline=None)
@given(capacity=st.integers(70, 110), heads=st.integers(1, 2), seed=st.integers(0, 2**16), data=st.data())
def test_ivf_exhaustive_probe_is_exact_before_and_after_training(capacity, heads, seed, data):
    """nlist=2 trains at 78 entries; with nprobe=nlist IVF is exact, so it must match the reference
    through the untrained (torch) phase, training, and incremental FIFO updates afterwards."""
    ops = data.draw(_ops(max_size=2 * capacity))
    run_ops(FaissBackend("ivf", nlist=2, nprobe=2), capacity, heads, ops, seed)


@needs_faiss
@settings(max_examples=30, deadline=None)
@given(capacity=st.integers(1, 12), heads=st.integers(1, 2), seed=st.integers(0, 2**16), data=st.data())
def test_hnsw_matches_naive_search_under_fifo_writes_and_resets(capacity, heads, seed, data):
    """HNSW cannot remove: overwritten entries become tombstones (never returned) until a rebuild. On graphs this
    small every node links to every other, so the search is exhaustive and must be exact."""
    ops = data.draw(_ops(max_size=3 * capacity))
    run_ops(FaissBackend("hnsw", hnsw_links=16), capacity, heads, ops, seed)


@needs_faiss
def test_hnsw_tombstones_are_rebuilt_and_longer_keys_rebuild_the_reduction(monkeypatch):
    monkeypatch.setattr(retrieval_faiss, "_NORM_HEADROOM", 1.5)  # no rebuild for a longer key until asked below
    gen = torch.Generator().manual_seed(5)
    backend = FaissBackend("hnsw", hnsw_links=32, ef_search=64)
    model = RingModel(backend, rows=1, heads=2, capacity=40, dim=4)
    queries = torch.randn(1, 2, 6, 4, generator=gen)
    model.write([40], gen)
    check_against_reference(model, queries, 8)  # builds from storage
    model.write([30], gen)  # 30 tombstones, 40 live entries
    check_against_reference(model, queries, 8)
    assert all(index.tombstones == 30 and index.ntotal == 40 for index in backend._rows[0].indexes)
    model.write([15], gen)  # more tombstones than live entries: rebuilt from storage at the next search
    check_against_reference(model, queries, 8)
    assert all(index.tombstones == 0 for index in backend._rows[0].indexes)
    norm = max(backend._rows[0].max_norms)
    model.write([1], gen)
    slot = (model.writes[0] - 1) % model.capacity
    key = model.rows[0][-1][1]
    key.copy_(2 * norm * torch.nn.functional.normalize(key, dim=-1))  # a key longer than the reduction's M ...
    model.keys[0, :, slot] = model.rows[0][-1][1]
    backend.add(torch.tensor([0]), torch.tensor([slot]), model.keys[0, :, slot][None])
    check_against_reference(model, queries, 8)  # ... must still be found with its exact score
    assert min(backend._rows[0].max_norms) > norm


@needs_faiss
def test_ivf_before_and_after_training():
    gen = torch.Generator().manual_seed(0)
    backend = FaissBackend("ivf", nlist=4, nprobe=4)  # trains at 39 * 4 = 156 entries
    model = RingModel(backend, rows=2, heads=2, capacity=300, dim=4)
    queries = torch.randn(2, 2, 5, 4, generator=gen)

    model.write([100, 10], gen)
    check_against_reference(model, queries, 32)
    assert all(index is None for index in backend._rows[0].indexes)  # exact torch fallback

    model.write([100, 0], gen)
    check_against_reference(model, queries, 32)
    for index in backend._rows[0].indexes:
        assert index.is_trained and index.ntotal == 200 and index.nlist == 4
    assert backend._rows[1].indexes == [None, None]  # row 1 still below the threshold

    model.write([250, 0], gen)  # wraps: overwritten slots must leave the trained index
    check_against_reference(model, queries, 32)
    assert all(index.ntotal == 300 for index in backend._rows[0].indexes)

    model.reset([0])  # back to untrained
    model.write([20, 0], gen)
    check_against_reference(model, queries, 32)
    assert backend._rows[0].indexes == [None, None]


@needs_faiss
def test_ivf_training_sample_and_iterations_are_passed_to_faiss():
    """A capped training sample and fewer k-means iterations still give a trained index that holds every entry
    under its slot id, and an exhaustive probe is still exact."""
    gen = torch.Generator().manual_seed(3)
    backend = FaissBackend("ivf", nlist=4, nprobe=4, train_points_per_list=40, train_iterations=2)
    model = RingModel(backend, rows=1, heads=2, capacity=400, dim=8)
    model.write([400], gen)
    check_against_reference(model, torch.randn(1, 2, 6, 8, generator=gen), 8)
    for index in backend._rows[0].indexes:
        assert index.is_trained and index.ntotal == 400
        assert index.cp.max_points_per_centroid == 40 and index.cp.niter == 2


@needs_faiss
def test_ivf_recall_on_clustered_data():
    """IVF is approximate: print recall@32 and latency, assert only a loose bound."""
    rng = np.random.default_rng(0)
    R, H, L, D, M, k, nlist = 1, 2, 8192, 32, 256, 32, 64
    centres = rng.standard_normal((128, D))
    data = centres[rng.integers(0, 128, (R, H, L))] + rng.standard_normal((R, H, L, D))
    data /= np.linalg.norm(data, axis=-1, keepdims=True)
    keys = torch.tensor(data, dtype=torch.float32)
    noise = torch.tensor(0.05 * rng.standard_normal((R, H, M, D)), dtype=torch.float32)
    queries = keys[:, :, rng.integers(0, L, M)] + noise
    lengths = torch.tensor([L])
    rows = torch.zeros(L, dtype=torch.long)
    exact = torch.topk(queries @ keys.transpose(-1, -2), k).indices
    for nprobe in (1, 4, 16):
        backend = FaissBackend("ivf", nlist=nlist, nprobe=nprobe)
        backend.add(rows, torch.arange(L), keys[0].transpose(0, 1))
        backend.search(queries, keys, lengths, k)  # trains
        start = time.perf_counter()
        _, got = backend.search(queries, keys, lengths, k)
        elapsed = time.perf_counter() - start
        hits = sum(len(set(got[0, h, m].tolist()) & set(exact[0, h, m].tolist())) for h in range(H) for m in range(M))
        recall = hits / (H * M * k)
        print(f"\nIVF nlist={nlist} nprobe={nprobe}: recall@{k}={recall:.3f}, search {elapsed * 1e3:.1f} ms")
        assert recall > 0.5


@needs_faiss
def test_late_attach_indexes_existing_storage_and_desync_is_detected():
    gen = torch.Generator().manual_seed(1)
    model = RingModel(FaissBackend("flat"), rows=1, heads=1, capacity=8, dim=4)
    model.write([13], gen)
    model.backend = FaissBackend("flat")  # a backend that saw none of these writes ...
    model.write([3], gen)  # ... but this one: it must index the storage, not just these 3 keys
    queries = torch.randn(1, 1, 3, 4, generator=gen)
    check_against_reference(model, queries, 5)
    model.backend = FaissBackend("flat")  # first call is a search
    check_against_reference(model, queries, 5)
    # storage cleared without telling the backend: refuse to return stale ids
    with pytest.raises(RuntimeError, match="out of sync"):
        model.backend.search(queries, model.keys, torch.tensor([4]), 5)


@needs_faiss
def test_empty_rows_and_no_queries():
    backend = FaissBackend("flat")
    keys = torch.zeros(2, 1, 4, 4)
    scores, indices = backend.search(torch.randn(2, 1, 3, 4), keys, torch.tensor([0, 0]), 2)
    assert (indices == -1).all() and torch.isneginf(scores).all()
    scores, indices = backend.search(torch.randn(2, 1, 0, 4), keys, torch.tensor([0, 0]), 2)
    assert scores.shape == (2, 1, 0, 2)


@needs_faiss
def test_bad_arguments_and_gpu_selection():
    with pytest.raises(ValueError):
        FaissBackend("lsh")
    with pytest.raises(ValueError, match="ef_search"):
        FaissBackend("hnsw", ef_search=0)
    with pytest.raises(ValueError):
        FaissBackend("ivf", nprobe=0)
    with pytest.raises(ValueError, match="train_points_per_list"):
        FaissBackend("ivf", train_points_per_list=10)
    with pytest.raises(ValueError, match="train_iterations"):
        FaissBackend("ivf", train_iterations=0)
    import faiss

    if not (hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0):
        with pytest.raises(RuntimeError, match="faiss-gpu"):
            FaissBackend(use_gpu=True)
    assert not FaissBackend()._on_gpu(torch.zeros(1))  # CPU keys never take the GPU path


def test_missing_faiss_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(ImportError, match=r'pip install "memorizing-hf\[faiss-cpu\]"') as info:
        FaissBackend()
    assert "faiss-gpu" in str(info.value)


@needs_faiss
@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_through_the_store_matches_the_exact_backend(kind):
    """End to end with the real ring buffer (memory.KNNMemory): same slots and scores as ExactBackend
    across wrap-arounds, partial writes and a row reset."""
    from memorizing_hf.memory import KNNMemory
    from memorizing_hf.retrieval import ExactBackend

    gen = torch.Generator().manual_seed(0)
    R, H, D, T, k = 3, 2, 8, 40, 16
    # IVF trains at 78 entries; HNSW with efSearch >= entries visits its whole (connected) graph: both exact here
    faiss_mem = KNNMemory(100, H, D, FaissBackend(kind, nlist=2, nprobe=2, ef_search=128))
    exact_mem = KNNMemory(100, H, D, ExactBackend())
    for step in range(8):
        keys = torch.randn(R, H, T, D, generator=gen)
        store = torch.rand(R, T, generator=gen) < 0.8
        positions = torch.arange(step * T, (step + 1) * T).expand(R, T)
        for mem in (faiss_mem, exact_mem):
            mem.write(keys, keys, store, positions)
            if step == 5:
                mem.reset(torch.tensor([1]))
        queries = torch.randn(R, H, 5, D, generator=gen)
        got_s, got_i = faiss_mem.backend.search(queries, faiss_mem.keys, faiss_mem.lengths, k)
        ref_s, ref_i = exact_mem.backend.search(queries, exact_mem.keys, exact_mem.lengths, k)
        torch.testing.assert_close(got_s, ref_s, atol=1e-4, rtol=0)
        assert torch.equal(got_i.sort(-1).values, ref_i.sort(-1).values)
