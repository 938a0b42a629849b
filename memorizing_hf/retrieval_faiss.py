"""Optional faiss retrieval backend for the kNN memory.

The memory of a layer is a FIFO ring buffer ``keys[R, H, C, D]`` owned by the store; row ``r`` holds
valid entries in slots ``[0, lengths[r])`` and, once full, overwrites its oldest slot. This backend
mirrors that storage in one faiss index per (row, head) whose ids *are* the slot numbers:

* Writing slot ``s`` first removes id ``s`` (if present) and then adds the new key with id ``s``, so a
  returned id always names the slot whose current key produced the score. The index is never reset
  as a whole on overflow (the defect of lucidrains' implementation, where ids drifted from storage).
* ``reset(rows)`` drops those rows' indexes; they are created again lazily on the next write.

Index kinds (CPU):

* ``"flat"``: ``IndexIDMap(IndexFlatIP)``, exact. Removal scans the index once per write batch
  (O(entries), ~0.5 ms at 65K entries), cheap next to a search over the same entries.
* ``"ivf"``: ``IndexIVFFlat`` over MIPS-augmented keys (L2; see below) with a hashtable direct map,
  so removal by id is O(removed). IVF must be trained: until a (row, head) holds ``39 * nlist`` entries
  (faiss' minimum training set) it is searched exactly with a torch matmul over the storage; the
  first search after that trains on the stored keys and adds them with their slot ids. From then on
  writes update the index incrementally (remove + add). It is trained once per row lifetime (until
  the row is reset); training is a one-off stall (seconds per (row, head) at nlist=1024 on a CPU).
  ``nlist`` defaults to ``4 * sqrt(C)`` with ``C`` the slots the store has allocated when training
  happens (the capacity once storage is fully grown; a store that grows storage by doubling may train
  earlier with fewer lists, so pass ``nlist`` explicitly, e.g. from the capacity, for a fixed value).
  A row whose ``C < 39 * nlist`` is always searched exactly.
* ``"hnsw"``: ``IndexHNSWFlat`` over MIPS-augmented keys, built from storage at the first search and
  ``efSearch = max(ef_search, k)`` (fewer candidates than k cannot give k results). HNSW cannot
  remove entries: an overwritten slot's old entry stays in the graph as a tombstone (still a route
  for the graph search, never a result: searches pass a bitmap of live entries), and once the
  tombstones outnumber the live entries (one full turn of the ring) the index is rebuilt from
  storage. CPU only (keys on CUDA are copied to the host).

Inner product over unnormalised keys is not a metric, and faiss' IVF and HNSW lose most of the true
neighbours on it (faiss#1496). The approximate kinds therefore index the MIPS -> L2 reduction of
Bachrach et al. (2014): each key gets an extra coordinate sqrt(M^2 - |k|^2) and each query a 0, so
that ``|q - k|^2 = |q|^2 + M^2 - 2 q.k`` and the L2 nearest neighbours are the keys of largest inner
product. M is the largest stored norm times ``_NORM_HEADROOM`` when an index is built; a later key
longer than M makes that (row, head) rebuild from storage at the next search (the reduction stays
exact). Returned scores are recomputed from storage (exact fp32 inner products).

GPU (faiss built with GPU support, keys on CUDA; ``use_gpu`` may force it off): faiss GPU indexes do
not implement ``remove_ids``, so the GPU path keeps no per-slot index state:

* ``"flat"`` searches the storage itself with ``faiss.knn_gpu`` (brute force, no index), reading the
  CUDA tensors in place. FIFO-correct by construction; ``add``/``reset`` have nothing to do.
* ``"ivf"`` keeps a trained ``GpuIndexIVFFlat`` per (row, head) and, when the row was written since
  the last search, refills its inverted lists from storage (``reset()`` keeps the trained centroids,
  then ``add_with_ids(keys[r, h, :L], arange(L))`` on the device). That is O(entries) per search after
  a write, but ids always equal storage slots. At paper sizes (65K entries) exact GPU search is cheap
  and usually the better choice.

Row state remembers which path built it; if the store's tensors move between CPU and CUDA, the row is
re-indexed from storage on the new path.

This file is also shipped as Hugging Face remote code: it imports only torch, numpy, the standard
library and (lazily) faiss.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

_INSTALL_HINT = 'pip install "memorizing-hf[faiss-cpu]" (or "memorizing-hf[faiss-gpu]" for CUDA)'
_MIN_POINTS_PER_CENTROID = 39  # faiss warns below this many training points per IVF list
_NORM_HEADROOM = 1.1  # M of the MIPS -> L2 reduction: the largest norm at build time times this
INDEX_KINDS = ("flat", "ivf", "hnsw")


def _import_faiss() -> Any:
    """Import faiss, or raise an ImportError that says which extra to install."""
    try:
        import faiss  # noqa: PLC0415 - optional dependency, imported lazily on purpose
    except ImportError as err:
        raise ImportError(f"The faiss retrieval backend needs faiss: {_INSTALL_HINT}") from err
    return faiss


def _faiss_has_gpu(faiss: Any) -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _as_numpy(x: torch.Tensor) -> np.ndarray:
    """float32, C-contiguous host view of ``x`` (copies only when dtype, device or layout demand it)."""
    return x.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()


def augment_keys(keys: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``[..., D] -> [..., D + 1]`` fp32: the MIPS -> L2 reduction, extra coordinate sqrt(M^2 - |k|^2)."""
    keys = keys.float()
    extra = (max_norm**2 - keys.square().sum(-1, keepdim=True)).clamp(min=0).sqrt()
    return torch.cat([keys, extra], dim=-1)


def augment_queries(queries: torch.Tensor) -> torch.Tensor:
    """``[..., D] -> [..., D + 1]`` fp32: queries get a 0 in the extra coordinate."""
    return torch.nn.functional.pad(queries.float(), (0, 1))


class _HNSW:
    """One (row, head) of the "hnsw" kind: an ``IndexHNSWFlat`` over augmented keys whose internal ids
    are mapped to slots, with tombstones for overwritten entries (HNSW cannot remove)."""

    def __init__(self, faiss: Any, dim: int, links: int, ef_construction: int) -> None:
        self.faiss = faiss
        self.index = faiss.IndexHNSWFlat(dim + 1, links)
        self.index.hnsw.efConstruction = ef_construction
        self.slot_of = np.zeros(0, dtype=np.int64)  # internal id -> slot
        self.alive = np.zeros(0, dtype=bool)  # internal id -> not overwritten since
        self.internal_of = np.zeros(0, dtype=np.int64)  # slot -> internal id (-1: none)

    @property
    def ntotal(self) -> int:
        return int(self.alive.sum())

    @property
    def tombstones(self) -> int:
        return len(self.alive) - self.ntotal

    def add(self, slots: np.ndarray, augmented: torch.Tensor) -> None:
        """Distinct ``slots`` now hold the keys ``augmented [N, D + 1]``: old entries become tombstones."""
        if len(self.internal_of) <= slots.max():
            grown = np.full(int(slots.max()) + 1, -1, dtype=np.int64)
            grown[: len(self.internal_of)] = self.internal_of
            self.internal_of = grown
        old = self.internal_of[slots]
        self.alive[old[old >= 0]] = False
        first = len(self.slot_of)
        self.index.add(_as_numpy(augmented))
        self.internal_of[slots] = np.arange(first, first + len(slots))
        self.slot_of = np.concatenate([self.slot_of, slots])
        self.alive = np.concatenate([self.alive, np.ones(len(slots), dtype=bool)])

    def search(self, queries: np.ndarray, k: int, ef_search: int) -> np.ndarray:
        """Slots ``[M, k]`` of the nearest live entries of augmented ``queries [M, D + 1]`` (-1: none)."""
        bitmap = np.packbits(self.alive, bitorder="little")  # read by the selector: alive until the search ends
        selector = self.faiss.IDSelectorBitmap(len(self.alive), self.faiss.swig_ptr(bitmap))
        params = self.faiss.SearchParametersHNSW(sel=selector, efSearch=max(ef_search, k))
        _, internal = self.index.search(queries, k, params=params)
        return np.where(internal >= 0, self.slot_of[internal.clip(min=0)], -1)


@dataclass
class _Row:
    """Per-row state: which slots hold an entry, and one index per head (None: not built yet, or to be
    rebuilt from storage)."""

    occupied: np.ndarray  # bool [slots seen so far]
    indexes: list[Any]
    max_norms: list[float]  # ivf / hnsw: M of each head's MIPS -> L2 reduction
    dirty: list[bool]  # GPU IVF only: refill from storage before the next search
    gpu: bool  # built by the GPU path (the store's tensors may move between devices)


class FaissBackend:
    """kNN retrieval over the ring-buffer memory with faiss (see the module docstring)."""

    def __init__(
        self,
        index_kind: str = "flat",
        nlist: int | None = None,
        nprobe: int = 8,
        use_gpu: bool | None = None,
        train_points_per_list: int | None = None,
        train_iterations: int | None = None,
        hnsw_links: int = 32,
        ef_search: int = 128,
        ef_construction: int = 40,
    ) -> None:
        """``index_kind``: "flat" (exact), "ivf" or "hnsw"; ``nlist``: IVF lists (default 4*sqrt(slots));
        ``nprobe``: IVF lists visited per query; ``use_gpu``: None picks GPU indexes when faiss has
        GPU support and the keys are on CUDA, False never uses them, True is like None but fails
        fast if faiss lacks GPU support. ``train_points_per_list`` caps the k-means training sample
        of an IVF index at that many keys per list (faiss' default: 256) and ``train_iterations``
        sets the k-means iterations (default 25): smaller values make the one-off training stall
        shorter (e.g. 64 and 10: about 10x) at some cost in recall. ``hnsw_links`` (HNSW's M),
        ``ef_search`` (raised to k when smaller) and ``ef_construction`` configure "hnsw"."""
        if index_kind not in INDEX_KINDS:
            raise ValueError(f"index_kind must be one of {INDEX_KINDS}, got {index_kind!r}")
        if min(hnsw_links, ef_search, ef_construction) < 1:
            raise ValueError("hnsw_links, ef_search and ef_construction must be positive")
        if nlist is not None and nlist < 1:
            raise ValueError("nlist must be positive")
        if nprobe < 1:
            raise ValueError("nprobe must be positive")
        if train_points_per_list is not None and train_points_per_list < _MIN_POINTS_PER_CENTROID:
            raise ValueError(f"train_points_per_list must be >= {_MIN_POINTS_PER_CENTROID}")
        if train_iterations is not None and train_iterations < 1:
            raise ValueError("train_iterations must be positive")
        self.train_points_per_list = train_points_per_list
        self.train_iterations = train_iterations
        self.faiss = _import_faiss()
        has_gpu = _faiss_has_gpu(self.faiss)
        if use_gpu and not has_gpu:
            raise RuntimeError('use_gpu=True but faiss has no usable GPU: pip install "memorizing-hf[faiss-gpu]"')
        self.index_kind = index_kind
        self.nlist = nlist
        self.nprobe = nprobe
        self.hnsw_links, self.ef_search, self.ef_construction = hnsw_links, ef_search, ef_construction
        self.use_gpu = (has_gpu if use_gpu is None else use_gpu) and index_kind != "hnsw"
        self._rows: dict[int, _Row] = {}
        self._gpu_res: Any = None
        self._warned_host_copy = False

    # ------------------------------------------------------------------ hooks called by the store
    def add(self, rows: torch.Tensor, slots: torch.Tensor, keys: torch.Tensor) -> None:
        """rows, slots: [N] int64; keys: [N, H, D]. These slots of these rows (all heads) now hold
        these keys; an older key in the same slot is removed from the index first. If a slot repeats
        within the call, the last write wins."""
        if rows.numel() == 0:
            return
        gpu = self._on_gpu(keys)
        rows_np = rows.detach().cpu().numpy().astype(np.int64, copy=False)
        slots_np = slots.detach().cpu().numpy().astype(np.int64, copy=False)
        keys_np = None if gpu else _as_numpy(keys.transpose(0, 1))  # [H, N, D]
        num_heads = keys.shape[1]
        for r in np.unique(rows_np).tolist():
            pos = np.flatnonzero(rows_np == r)
            # keep the last write of each slot, in ascending slot order
            rev_slots = slots_np[pos][::-1]
            uniq, first_in_rev = np.unique(rev_slots, return_index=True)
            pos = pos[len(pos) - 1 - first_in_rev]
            row = self._row(r, num_heads, int(uniq.max()) + 1, gpu)
            overwritten = np.ascontiguousarray(uniq[row.occupied[uniq]])
            row.occupied[uniq] = True
            if gpu:  # GPU indexes cannot remove ids: refill from storage at the next search
                row.dirty = [True] * num_heads
                continue
            assert keys_np is not None
            for h in range(num_heads):
                index = row.indexes[h]
                if index is None:
                    if self.index_kind != "flat":  # built from storage at the next search
                        continue
                    index = row.indexes[h] = self.faiss.IndexIDMap(self.faiss.IndexFlatIP(keys.shape[2]))
                new_keys = np.ascontiguousarray(keys_np[h, pos])
                if self.index_kind != "flat" and float(np.linalg.norm(new_keys, axis=1).max()) > row.max_norms[h]:
                    row.indexes[h] = None  # longer than the reduction's M: rebuild from storage
                    continue
                if self.index_kind == "hnsw":
                    index.add(uniq, augment_keys(torch.from_numpy(new_keys), row.max_norms[h]))
                    if index.tombstones > index.ntotal:  # a full turn of the ring: rebuild from storage
                        row.indexes[h] = None
                    continue
                if overwritten.size:
                    self._remove(index, overwritten)
                if self.index_kind == "ivf":
                    new_keys = _as_numpy(augment_keys(torch.from_numpy(new_keys), row.max_norms[h]))
                index.add_with_ids(new_keys, uniq)

    def reset(self, rows: torch.Tensor) -> None:
        """rows: [n] int64. Forget these rows (all heads); their indexes are rebuilt lazily."""
        for r in rows.detach().cpu().tolist():
            self._rows.pop(int(r), None)

    def search(
        self, queries: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [R, H, M, D], storage keys [R, H, C, D], lengths [R] -> (scores [R, H, M, k]
        float32, slot indices [R, H, M, k] int64), by descending inner product; places beyond a
        row's entries have index -1 and score -inf. Results are on the queries' device."""
        num_rows, num_heads, num_queries, _ = queries.shape
        gpu = self._on_gpu(keys)
        dev = keys.device if gpu else torch.device("cpu")
        scores = torch.full((num_rows, num_heads, num_queries, k), -math.inf, device=dev)
        indices = torch.full((num_rows, num_heads, num_queries, k), -1, dtype=torch.long, device=dev)
        if k == 0 or num_queries == 0:
            return scores.to(queries.device), indices.to(queries.device)
        if gpu:
            self._search_gpu(queries, keys, lengths, k, scores, indices)
        else:
            self._search_cpu(queries, keys, lengths, k, scores, indices)
        return scores.to(queries.device), indices.to(queries.device)

    # ------------------------------------------------------------------ CPU
    def _search_cpu(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        lengths: torch.Tensor,
        k: int,
        scores: torch.Tensor,
        indices: torch.Tensor,
    ) -> None:
        """One faiss search per (row, head) over all its M queries, writing straight into the
        (numpy views of the) output tensors."""
        q_np = _as_numpy(queries)
        scores_np, indices_np = scores.numpy(), indices.numpy()
        num_heads = queries.shape[1]
        for r, length in enumerate(lengths.detach().cpu().tolist()):
            if length <= 0:
                continue
            row = self._rows.get(r)
            if row is None or row.gpu or len(row.occupied) < length or not row.occupied[:length].all():
                # entries this backend never saw written (attached late): index them from storage
                row = self._row(r, num_heads, length, gpu=False)
                row.indexes = [None] * num_heads
                row.occupied[:] = False
                row.occupied[:length] = True
            for h in range(num_heads):
                index = row.indexes[h]
                if index is None:
                    stored = keys[r, h, :length]
                    if self.index_kind == "ivf" and not self._ivf_ready(length, keys.shape[2]):
                        self._exact(queries[r, h], stored, k, scores[r, h], indices[r, h])
                        continue
                    index, row.max_norms[h] = self._build(stored, keys.shape[2])
                    row.indexes[h] = index
                if index.ntotal != length:
                    raise RuntimeError(
                        f"faiss index of row {r}, head {h} holds {index.ntotal} entries but the "
                        f"storage holds {length}: the store and the backend are out of sync"
                    )
                if self.index_kind == "flat":
                    index.search(q_np[r, h], k, D=scores_np[r, h], I=indices_np[r, h])
                    continue
                q_aug = _as_numpy(augment_queries(queries[r, h]))
                if self.index_kind == "hnsw":
                    found = torch.from_numpy(index.search(q_aug, k, self.ef_search))
                else:
                    found = torch.from_numpy(index.search(q_aug, k)[1])
                self._rescore(queries[r, h], keys[r, h], found, scores[r, h], indices[r, h])
        scores.masked_fill_(indices < 0, -math.inf)  # faiss pads with -FLT_MAX

    def _build(self, stored: torch.Tensor, allocated: int) -> tuple[Any, float]:
        """A new index for one (row, head) holding ``stored`` [L, D] with ids 0..L-1, and the M of its
        MIPS -> L2 reduction (ivf, hnsw: ``_NORM_HEADROOM`` x the largest norm; flat: inf)."""
        faiss = self.faiss
        length, dim = stored.shape
        ids = np.arange(length, dtype=np.int64)
        if self.index_kind == "flat":
            index = faiss.IndexIDMap(faiss.IndexFlatIP(dim))
            index.add_with_ids(_as_numpy(stored), ids)
            return index, math.inf
        max_norm = _NORM_HEADROOM * float(stored.float().norm(dim=-1).max())
        augmented = augment_keys(stored, max_norm)
        if self.index_kind == "hnsw":
            index = _HNSW(faiss, dim, self.hnsw_links, self.ef_construction)
            index.add(ids, augmented)
        else:
            nlist = self._nlist(allocated)
            index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim + 1), dim + 1, nlist, faiss.METRIC_L2)
            if self.train_points_per_list is not None:
                index.cp.max_points_per_centroid = self.train_points_per_list
            if self.train_iterations is not None:
                index.cp.niter = self.train_iterations
            index.train(_as_numpy(augmented))
            index.set_direct_map_type(faiss.DirectMap.Hashtable)  # O(removed) remove_ids
            index.nprobe = min(self.nprobe, nlist)
            index.add_with_ids(_as_numpy(augmented), ids)
        return index, max_norm

    def _remove(self, index: Any, ids: np.ndarray) -> None:
        """Remove ``ids`` (int64, contiguous). The IVF hashtable direct map looks each id up and
        needs an IDSelectorArray; IndexIDMap scans its entries, testing membership in a hashed
        IDSelectorBatch (an IDSelectorArray there would cost entries x ids)."""
        selector = self.faiss.IDSelectorArray if self.index_kind == "ivf" else self.faiss.IDSelectorBatch
        index.remove_ids(selector(ids.size, self.faiss.swig_ptr(ids)))

    # ------------------------------------------------------------------ GPU
    def _search_gpu(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        lengths: torch.Tensor,
        k: int,
        scores: torch.Tensor,
        indices: torch.Tensor,
    ) -> None:
        """Flat: faiss brute force over the CUDA storage. IVF: GpuIndexIVFFlat over augmented keys,
        refilled from storage whenever the row was written since the last search (GPU indexes cannot
        remove ids), retrained when a key outgrew the reduction's M."""
        import faiss.contrib.torch_utils  # noqa: F401, PLC0415 - lets faiss take CUDA tensors

        faiss = self.faiss
        if self._gpu_res is None:
            self._gpu_res = faiss.StandardGpuResources()
        device = keys.device.index if keys.device.index is not None else torch.cuda.current_device()
        queries = queries.to(device=keys.device, dtype=torch.float32)
        keys = keys.float()
        num_heads = queries.shape[1]
        for r, length in enumerate(lengths.detach().cpu().tolist()):
            if length <= 0:
                continue
            row = self._row(r, num_heads, length, gpu=True)
            for h in range(num_heads):
                q, stored = queries[r, h].contiguous(), keys[r, h, :length]
                if self.index_kind == "flat":
                    kk = min(k, length)
                    d, i = faiss.knn_gpu(self._gpu_res, q, stored, kk, metric=faiss.METRIC_INNER_PRODUCT, device=device)
                    scores[r, h, :, :kk], indices[r, h, :, :kk] = d, i
                    continue
                index = row.indexes[h]
                if not self._ivf_ready(length, keys.shape[2]):
                    self._exact(q, stored, k, scores[r, h], indices[r, h])
                    continue
                if index is not None and row.dirty[h] and float(stored.norm(dim=-1).max()) > row.max_norms[h]:
                    index = None  # a key outgrew M: retrain
                if index is None:
                    nlist = self._nlist(keys.shape[2])
                    config = faiss.GpuIndexIVFFlatConfig()
                    config.device = device
                    index = faiss.GpuIndexIVFFlat(self._gpu_res, stored.shape[1] + 1, nlist, faiss.METRIC_L2, config)
                    row.max_norms[h] = _NORM_HEADROOM * float(stored.norm(dim=-1).max())
                    index.train(augment_keys(stored, row.max_norms[h]))
                    index.nprobe = min(self.nprobe, nlist)
                    row.indexes[h], row.dirty[h] = index, True
                if row.dirty[h]:
                    index.reset()  # drops the inverted lists, keeps the trained centroids
                    augmented = augment_keys(stored, row.max_norms[h])
                    index.add_with_ids(augmented, torch.arange(length, device=keys.device))
                    row.dirty[h] = False
                _, found = index.search(augment_queries(q), k)
                self._rescore(q, stored, found, scores[r, h], indices[r, h])
        scores.masked_fill_(indices < 0, -math.inf)

    # ------------------------------------------------------------------ helpers
    def _on_gpu(self, keys: torch.Tensor) -> bool:
        """GPU path iff allowed and the keys live on CUDA; warn once about host copies otherwise."""
        if keys.device.type != "cuda":
            return False
        if self.use_gpu:
            return True
        if not self._warned_host_copy:
            self._warned_host_copy = True
            warnings.warn(
                "faiss CPU backend with CUDA memory: keys and queries are copied to the host on "
                'every call; install "memorizing-hf[faiss-gpu]" or use the torch backend',
                stacklevel=3,
            )
        return False

    def _row(self, r: int, num_heads: int, min_slots: int, gpu: bool) -> _Row:
        """State of row ``r``, grown to cover ``min_slots`` slots; created if new or if it was built
        for the other device (then the CPU path re-indexes the storage, the GPU path refills)."""
        row = self._rows.get(r)
        if row is None or row.gpu != gpu:
            row = _Row(
                np.zeros(min_slots, dtype=bool), [None] * num_heads, [math.inf] * num_heads, [True] * num_heads, gpu
            )
            self._rows[r] = row
        if len(row.occupied) < min_slots:
            grown = np.zeros(max(min_slots, 2 * len(row.occupied)), dtype=bool)
            grown[: len(row.occupied)] = row.occupied
            row.occupied = grown
        return row

    def _nlist(self, allocated: int) -> int:
        return self.nlist if self.nlist is not None else max(1, round(4 * math.sqrt(allocated)))

    def _ivf_ready(self, length: int, allocated: int) -> bool:
        """Enough entries to train an IVF index (faiss' 39 points per list)?"""
        return length >= _MIN_POINTS_PER_CENTROID * self._nlist(allocated)

    @staticmethod
    def _rescore(
        q: torch.Tensor, stored: torch.Tensor, found: torch.Tensor, scores: torch.Tensor, indices: torch.Tensor
    ) -> None:
        """Exact inner products of q [M, D] with the slots ``found`` [M, k] (-1: none) of ``stored``
        [L, D], sorted in descending order into scores/indices [M, k]."""
        found = found.to(stored.device)
        exact = torch.einsum("md,mkd->mk", q.float(), stored[found.clamp(min=0)].float())
        exact = exact.masked_fill(found < 0, -math.inf)
        exact, order = exact.sort(dim=1, descending=True)
        scores.copy_(exact)
        indices.copy_(found.gather(1, order))

    @staticmethod
    def _exact(q: torch.Tensor, stored: torch.Tensor, k: int, scores: torch.Tensor, indices: torch.Tensor) -> None:
        """Exact top-k of q [M, D] against stored [L, D] into scores/indices [M, k] (prefix)."""
        kk = min(k, stored.shape[0])
        sim = q.float() @ stored.float().T
        top = sim.topk(kk, dim=-1)
        scores[:, :kk] = top.values.to(scores.device)
        indices[:, :kk] = top.indices.to(indices.device)
