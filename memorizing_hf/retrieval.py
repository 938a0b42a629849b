"""Exact top-k inner-product retrieval over the kNN memory of a Memorizing Transformer layer.

The memory of one attention layer is a ring buffer `keys[R, H, C, D]` (batch rows, key/value heads, allocated
slots, head dim) where row `r` holds valid entries in slots `[0, lengths[r])`. For every query
`queries[R, H, M, D]` (M = query heads per key/value head x tokens) we want the `k` slots of its own (row, head)
with the largest inner product.

A naive search computes the full score matrix and calls `topk` on it. On CPU the `topk` costs as much as the
matmul (~10 ns per score on short rows), and the score matrix is large (1.2 GB for 4,608 queries x 65,536 keys).
`exact_topk` never materialises it and spends almost all its time in matmuls. On CPU it makes two passes:

1. Pass 1 scores the memory block by block (in bf16 where the CPU has native bf16 dot products, ~2.5x faster than
   fp32) and keeps, per query, only the maximum score of every sub-block of `sub` (<= 64) contiguous slots: one
   cheap `amax` per block. The k-th largest of these maxima is a score that k slots reach, so it gives a lower
   bound `low` of the query's k-th best fp32 score, after subtracting a rigorous bound of the bf16 error (computed
   from the actual rounding errors of the query and the keys); in practice `low` is close to that score.
2. Pass 2 recomputes in fp32 only the (query, sub-block) pairs whose pass-1 maximum can reach `low` (at 65,536
   random keys and k=32: ~48 of 1,024 sub-blocks per query with a bf16 pass 1, ~34 with fp32), batched per
   (head, sub-block), and collects the scores >= `low` (~41, resp. ~34 per query). Their top-k is the exact top-k
   of the fp32 scores; queries with too many candidates (e.g. many equal scores) are searched again densely.

Only the matmuls use torch's intra-op threads; the cheap bookkeeping ops run single-threaded (see
`_search_two_pass`). On CUDA, data-dependent shapes would need host synchronisations, so the GPU path keeps a
running top-k with one `topk` per block instead (`_search_dense`, also the CPU fallback). Peak extra memory is
bounded by the score block (`BLOCK_BYTES`) plus O(queries x memory / sub) for the sub-block maxima (at most
`MAX_SUB_BLOCKS` per query).

This file is also shipped as Hugging Face remote code: it imports only torch and the standard library.
"""

from __future__ import annotations

import contextlib
import functools

import torch

# Byte budget of one fp32 score block [queries, block slots], from which the block size in slots is derived: large
# enough for efficient matmuls and few (multi-threaded) ops per call, small enough to stay near the L3 cache.
BLOCK_BYTES = 16 * 2**20
# Smallest number of memory slots per block (queries are tiled when even this block would exceed the budget).
MIN_BLOCK = 256
# Sub-blocks: pass 1 keeps the maximum score of every query over every sub-block of SUB_BLOCK contiguous slots.
# Aim for at least 8 k sub-blocks (a tight threshold), at most MAX_SUB_BLOCKS of them (bounded memory).
SUB_BLOCK = 64
MIN_SUB_BLOCK = 32  # torch reduces shorter contiguous runs slowly
MAX_SUB_BLOCKS = 1024
# The pass-1 threshold is ranked among THRESHOLD_SUB_BLOCKS * k coarser maxima.
THRESHOLD_SUB_BLOCKS = 8
# Pass 2 scores windows of at most PASS2_SUB_BLOCKS sub-blocks, each for only the queries that selected it.
PASS2_SUB_BLOCKS = 64
# Candidates per query collected by pass 2, in multiples of k; a query with more is searched again densely.
CANDIDATES = 4
# Pass 1 on CPU scores in bf16 where the CPU has native bf16 dot products (avx512_bf16 / amx_bf16), else in fp32.
# None = detect, True / False = force (pass 2 is always fp32, so the result is exact either way).
APPROX_BF16: bool | None = None


@functools.cache
def bf16_matmul_is_fast() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (then ~2.5x faster than fp32), read from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@contextlib.contextmanager
def _threads(num: int):
    """Run torch ops with `num` intra-op threads (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(num)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def choose_block_size(num_queries: int, budget_bytes: int | None = None) -> int:
    """Memory slots per block such that the fp32 score block `[num_queries, block]` fits in `budget_bytes`.

    At least `MIN_BLOCK` (the caller then tiles the queries so that the block still fits the budget).
    """
    budget = BLOCK_BYTES if budget_bytes is None else budget_bytes
    return max(budget // (4 * max(num_queries, 1)), MIN_BLOCK)


def choose_sub_block(n: int, k: int) -> int:
    """Sub-block size (a power of two) for a memory of `n` slots: about 8 k sub-blocks within the bounds above
    (small sub-blocks make pass 2 cheap, many of them make the pass-1 table large)."""
    size = 1 << max(int(n // (8 * k)).bit_length() - 1, 0)  # largest power of two <= n / 8k
    size = min(max(size, MIN_SUB_BLOCK), SUB_BLOCK)
    while -(-n // size) > MAX_SUB_BLOCKS:
        size *= 2
    return size


def exact_topk(
    queries: torch.Tensor,
    keys: torch.Tensor,
    lengths: torch.Tensor,
    k: int,
    block_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k inner-product search of every query in the memory of its own (row, head).

    Args:
        queries: `[R, H, M, D]`, any float dtype.
        keys: `[R, H, C, D]` memory keys (fp32, bf16 or fp16), on the same device as `queries`.
        lengths: `[R]` long, number of valid slots of every row (slots `[0, lengths[r])` are valid), any device.
        k: number of neighbours per query.
        block_size: memory slots per block; by default derived from `BLOCK_BYTES` by `choose_block_size`.

    Returns:
        `(scores, indices)`, both `[R, H, M, k]`: fp32 scores sorted in descending order and int64 slot indices.
        Where a row has fewer than `k` valid slots the missing places hold score `-inf` and index `-1`; slots
        `>= lengths[r]` are never returned. Ties are broken arbitrarily.
    """
    R, H, M, D = queries.shape
    C = keys.shape[2]
    device = queries.device
    scores = torch.full((R, H, M, k), float("-inf"), dtype=torch.float32, device=device)
    indices = torch.full((R, H, M, k), -1, dtype=torch.long, device=device)
    if k <= 0 or R * H * M == 0 or C == 0:
        return scores, indices
    lengths = lengths.to(device=device, dtype=torch.long)
    lo, hi = torch.stack([lengths.min(), lengths.max()]).tolist()  # the only host synchronisation on CUDA
    n = min(hi, C)
    if n <= 0:
        return scores, indices

    flat_keys = keys.reshape(R * H, C, D)
    block = min(block_size or choose_block_size(R * H * M), n)
    search, dtype = _search_dense, keys.dtype  # CUDA: native-dtype matmul with fp32 accumulation
    if device.type == "cpu":
        dtype = torch.float32
        sub = choose_sub_block(n, k)
        if -(-n // sub) >= k:  # else the memory is so small that the dense search is as fast
            block = -(-block // sub) * sub
            approx = bf16_matmul_is_fast() if APPROX_BF16 is None else APPROX_BF16
            search = functools.partial(_search_two_pass, sub=sub, approx=approx, threads=torch.get_num_threads())
    tile = max(1, min(M, BLOCK_BYTES // (4 * R * H * block)))
    tile = -(-M // -(-M // tile))  # equal tiles
    for m0 in range(0, M, tile):
        q = queries[:, :, m0 : m0 + tile].reshape(R * H, -1, D).to(dtype)
        with _threads(1) if search is not _search_dense else contextlib.nullcontext():  # see _search_two_pass
            s, i = search(q, flat_keys, lengths, n, lo, k, block)
        scores[:, :, m0 : m0 + tile] = s.view(R, H, -1, k)
        indices[:, :, m0 : m0 + tile] = i.view(R, H, -1, k)
    return scores, indices


def _key_norms(keys: torch.Tensor, lengths: torch.Tensor, n: int, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest norm of the valid keys of every head, and of their bf16 rounding errors (0 unless `bf16`): `[R*H]`
    each, computed in chunks of keys of at most a quarter of `BLOCK_BYTES` in fp32."""
    R, RH = lengths.shape[0], keys.shape[0]
    norm = torch.zeros(RH, device=keys.device)
    error = torch.zeros(RH, device=keys.device)
    step = max(1, BLOCK_BYTES // (16 * RH * keys.shape[2]))
    for j0 in range(0, n, step):
        block_keys = keys[:, j0 : min(j0 + step, n)].float()
        invalid = torch.arange(j0, j0 + block_keys.shape[1], device=keys.device) >= lengths[:, None]  # [R, width]
        invalid = invalid.repeat_interleave(RH // R, dim=0)  # [RH, width]
        norms = torch.linalg.vector_norm(block_keys, dim=-1).masked_fill_(invalid, 0.0)  # also clears stale NaN
        norm = torch.maximum(norm, norms.amax(dim=1))
        if bf16:
            errors = torch.linalg.vector_norm(block_keys - block_keys.bfloat16().float(), dim=-1)
            error = torch.maximum(error, errors.masked_fill_(invalid, 0.0).amax(dim=1))
    return norm, error


def _score_block(
    q: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor, j0: int, width: int, lo: int, out: torch.Tensor
) -> torch.Tensor:
    """Scores `[R*H, T, width]` (in `q.dtype`) of queries `q [R*H, T, D]` against slots `[j0, j0 + width)`.

    Written into `out` (a preallocated buffer, to avoid page faults of fresh large allocations) when it has the
    right width. Slots past a row's length get `-inf`.
    """
    block_keys = keys[:, j0 : j0 + width].to(q.dtype)
    if out.shape[-1] == width:
        s = torch.bmm(q, block_keys.transpose(1, 2), out=out)
    else:
        s = torch.bmm(q, block_keys.transpose(1, 2))
    if j0 + width > lo:  # some row ends inside this block
        invalid = torch.arange(j0, j0 + width, device=q.device) >= lengths[:, None]  # [R, width]
        s.view(lengths.shape[0], -1, width).masked_fill_(invalid[:, None, :], float("-inf"))
    return s


def _search_dense(
    q: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor, n: int, lo: int, k: int, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Running top-k with one `topk` per block: no data-dependent control flow (no host synchronisation)."""
    RH, T, _ = q.shape
    top_s = torch.full((RH * T, k), float("-inf"), device=q.device)
    top_i = torch.full((RH * T, k), -1, dtype=torch.long, device=q.device)
    buffer = torch.empty(RH, T, block, dtype=q.dtype, device=q.device)
    for j0 in range(0, n, block):
        width = min(block, n - j0)
        s = _score_block(q, keys, lengths, j0, width, lo, buffer).view(RH * T, width).float()
        block_s, block_i = s.topk(min(k, width), dim=1)
        cat_s = torch.cat([top_s, block_s], dim=1)
        cat_i = torch.cat([top_i, block_i + j0], dim=1)
        top_s, pos = cat_s.topk(k, dim=1)
        top_i = cat_i.gather(1, pos)
    top_i.masked_fill_(top_s == float("-inf"), -1)
    return top_s, top_i


def _search_two_pass(
    q: torch.Tensor,
    keys: torch.Tensor,
    lengths: torch.Tensor,
    n: int,
    lo: int,
    k: int,
    block: int,
    sub: int,
    approx: bool,
    threads: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-pass search of fp32 queries `q [R*H, T, D]` (see the module docstring); `block % sub == 0`.

    Called with one intra-op thread: only the matmuls use `threads` threads. The other ops are cheap, and each
    multi-threaded op pays a thread synchronisation, which dominates for small ops and becomes very slow when the
    cores are shared with other processes (measured: 2-10x slower calls on a busy 2-core machine).

    Pass 1 scores everything (in bf16 if `approx`, else fp32) and keeps every query's maximum over every
    sub-block of `sub` slots. The k-th largest of these maxima gives a lower bound `low` of the query's k-th best
    fp32 score. Pass 2 scores in fp32 only the (query, sub-block) pairs whose maximum can reach `low`, collects
    the scores >= `low` (typically little more than k per query) and returns their top-k.
    """
    RH, T, D = q.shape
    Q, R, device, ninf = RH * T, lengths.shape[0], q.device, float("-inf")
    ninf_t = torch.tensor(ninf, device=device)
    q1 = q.to(torch.bfloat16) if approx else q

    key_norm, key_error = _key_norms(keys, lengths, n, approx)

    # Pass 1: maximum score of every query over every sub-block.
    num_sub = -(-n // sub)
    sub_max = torch.empty(Q, num_sub, device=device)
    buffer = torch.empty(RH, T, block, dtype=q1.dtype, device=device)
    buffer32 = torch.empty(Q, block, device=device) if approx else None  # amax of bf16 is slow: convert first
    for j0 in range(0, n, block):
        width = min(block, n - j0)
        with _threads(threads):
            s = _score_block(q1, keys, lengths, j0, width, lo, buffer).view(Q, width)
        if approx:
            s = buffer32[:, :width].copy_(s)
        if width % sub:  # last block: pad with -inf to whole sub-blocks
            s = torch.nn.functional.pad(s, (0, sub - width % sub), value=ninf)
        sub_max[:, j0 // sub : j0 // sub + -(-width // sub)] = s.reshape(Q, -1, sub).amax(dim=2)

    del buffer, buffer32, s

    # k sub-blocks have a pass-1 score >= g (the k-th largest maximum), so k fp32 scores are >= low = g - u|g| - e,
    # u = 2^-8 the relative rounding of the bf16 output and e a bound of |pass-1 score before that rounding - fp32
    # score|: q.k - q'.k' = (q - q').k + q'.(k - k') for the bf16-rounded q', k', plus fp32 accumulation errors
    # (<= D 2^-24 |q| |k| each). A pass-2 score s >= low needs a pass-1 score >= rn(low - e) in its sub-block.
    q_norm = torch.linalg.vector_norm(q, dim=-1).view(Q)
    e = 3 * D * 2.0**-24 * q_norm * key_norm.repeat_interleave(T) + D * 2.0**-120  # (+ underflows)
    if approx:
        q_error = torch.linalg.vector_norm(q - q1.float(), dim=-1).view(Q)
        e += q_error * key_norm.repeat_interleave(T) + (q_norm + q_error) * key_error.repeat_interleave(T)
    # The threshold comes from coarser maxima (over THRESHOLD_SUB_BLOCKS * k sub-blocks, cheaper to rank): their
    # k-th largest is a (slightly lower) lower bound too, as the k largest are maxima of disjoint sets.
    coarse = max(num_sub // (THRESHOLD_SUB_BLOCKS * k), 1)
    coarse_max = torch.nn.functional.pad(sub_max, (0, -num_sub % coarse), value=ninf).view(Q, -1, coarse).amax(2)
    g = coarse_max.kthvalue(coarse_max.shape[1] - k + 1, dim=1).values.float()
    low = g - e - (2.0**-8 * g.abs() if approx else 0.0)  # -inf where fewer than k sub-blocks are non-empty
    threshold = (low - e).to(q1.dtype).float() if approx else low - e  # rn(low - e)
    selected = sub_max >= threshold[:, None]  # [Q, num_sub]: sub-blocks to score in pass 2
    short = torch.isneginf(low)  # rows with fewer than k non-empty coarse sub-blocks: searched densely below
    selected.masked_fill_(short[:, None], False)
    low = torch.nextafter(low, ninf_t)  # "> low" is now ">= the bound", and never admits -inf

    # Pass 2: fp32 scores of the selected (query, sub-block) pairs, a window of sub-blocks at a time: one batched
    # matmul whose batch is (head, sub-block), each with the queries that selected it, padded to the most. Windows
    # are planned so that the padded queries and scores fit the byte budget (at most PASS2_SUB_BLOCKS sub-blocks).
    cap = CANDIDATES * k
    cand_s = torch.full((Q, cap), ninf, device=device)
    cand_i = torch.full((Q, cap), -1, dtype=torch.long, device=device)
    count = torch.zeros(Q, dtype=torch.long, device=device)
    overflow = short  # queries to search densely
    flat_q = q.reshape(Q, D)
    most = selected.view(RH, T, num_sub).sum(dim=1).amax(dim=0).tolist()  # most queries of a head per sub-block
    windows, first, pad = [], 0, 0
    for b, p in enumerate(most):
        size = RH * (b - first + 1) * (max(pad, p) * (D + sub) + 2 * sub * D) * 4  # padded queries, scores, keys
        if b > first and (b - first == PASS2_SUB_BLOCKS or size > BLOCK_BYTES):
            windows.append((first, b))
            first, pad = b, 0
        pad = max(pad, p)
    windows.append((first, num_sub))
    for first, last in windows:
        j0, nb = first * sub, last - first
        width = min(nb * sub, n - j0)
        r, c = selected[:, first:last].nonzero(as_tuple=True)  # pairs, sorted by query
        if r.numel() == 0:
            continue
        group = (r // T) * nb + c  # (head, sub-block) of every pair
        order = group.argsort(stable=True)
        per_group = torch.bincount(group, minlength=RH * nb)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=device) - (per_group.cumsum(0) - per_group)[group[order]]
        # Groups with many queries are split into chunks of `size` queries (each with a copy of its keys), so that
        # padding every chunk to `size` wastes little.
        size = -(-r.numel() // int((per_group > 0).sum()))  # mean queries per non-empty group
        chunks = -(-per_group // size)
        chunk = (chunks.cumsum(0) - chunks)[group] + rank // size  # chunk of every pair
        place = chunk * size + rank % size  # row of every pair in the padded batch
        packed = torch.zeros(int(chunks.sum()) * size, D, device=device)
        packed.index_copy_(0, place, flat_q.index_select(0, r))
        block_keys = keys[:, j0 : j0 + width].float()
        if width % sub:  # last block: pad with zero keys to whole sub-blocks (masked below)
            block_keys = torch.nn.functional.pad(block_keys, (0, 0, 0, nb * sub - width))
        chunk_keys = block_keys.reshape(RH * nb, sub, D).repeat_interleave(chunks, dim=0)
        with _threads(threads):
            s = torch.bmm(packed.view(-1, size, D), chunk_keys.transpose(1, 2))  # [chunks, size, sub]
        seg = s.view(-1, sub).index_select(0, place)  # [pairs, sub]
        if j0 + nb * sub > lo:  # mask slots past each pair's row length
            slot = j0 + c[:, None] * sub + torch.arange(sub, device=device)
            seg.masked_fill_(slot >= lengths[r // (T * RH // R), None], ninf)
        a, m = (seg > low[r, None]).nonzero(as_tuple=True)
        rows, vals, slots = r[a], seg[a, m], j0 + c[a] * sub + m  # rows come out sorted
        new = torch.bincount(rows, minlength=Q)
        full = count + new > cap
        if bool(full.any()):  # too many candidates (e.g. many equal scores): such queries are searched densely
            overflow |= full
            new.masked_fill_(overflow, 0)
            keep = ~overflow[rows]
            rows, vals, slots = rows[keep], vals[keep], slots[keep]
        pos = count[rows] + torch.arange(rows.numel(), device=device) - (new.cumsum(0) - new)[rows]
        cand_s[rows, pos], cand_i[rows, pos] = vals, slots
        count += new

    width = max(int(count.max()), 1)
    scores = torch.full((Q, k), ninf, device=device)
    indices = torch.full((Q, k), -1, dtype=torch.long, device=device)
    top_s, pos = cand_s[:, :width].topk(min(k, width), dim=1)
    scores[:, : pos.shape[1]], indices[:, : pos.shape[1]] = top_s, cand_i.gather(1, pos)
    indices.masked_fill_(scores == ninf, -1)

    redo = overflow.nonzero().squeeze(1)
    if redo.numel():  # dense search of these queries, packed per head, padded with copies of a query
        head, tok = redo // T, redo % T
        per_head = torch.bincount(head, minlength=RH)
        slot = torch.arange(redo.numel(), device=device) - (per_head.cumsum(0) - per_head)[head]
        sub_q = q[:, :1].expand(RH, int(per_head.max()), D).clone()
        sub_q[head, slot] = q[head, tok]
        n_redo = min(n, int(lengths[head // (RH // R)].max()))  # often short rows: scan only their length
        s, i = _search_dense(sub_q, keys, lengths, n_redo, lo, k, block)
        scores[redo] = s.view(RH, -1, k)[head, slot]
        indices[redo] = i.view(RH, -1, k)[head, slot]
    return scores, indices


class ExactBackend:
    """Stateless exact retrieval backend: searches the memory's storage tensors directly with `exact_topk`."""

    def add(self, rows: torch.Tensor, slots: torch.Tensor, keys: torch.Tensor) -> None:
        """No-op hook (an index-based backend would insert `keys [N, H, D]` at `(rows [N], slots [N])`)."""

    def reset(self, rows: torch.Tensor) -> None:
        """No-op hook (an index-based backend would forget the entries of `rows`)."""

    def search(
        self, queries: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k slots `(scores, indices)`, both `[R, H, M, k]`, of `queries [R, H, M, D]` in `keys [R, H, C, D]`."""
        return exact_topk(queries, keys, lengths, k)
