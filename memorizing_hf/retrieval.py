"""Exact top-k inner-product retrieval over the kNN memory of a Memorizing Transformer layer.

The memory of one attention layer is a ring buffer `keys[R, H, C, D]` (batch rows, key/value heads, allocated
slots, head dim) where row `r` holds valid entries in slots `[0, lengths[r])`. For every query
`queries[R, H, M, D]` (M = query heads per key/value head x tokens) we want the `k` slots of its own (row, head)
with the largest inner product.

A naive search computes the full score matrix and calls `topk` on it. On CPU that `topk` costs as much as the
matmul, and the score matrix is large (1.2 GB for 4,608 queries x 65,536 keys). `exact_topk` never materialises it
and spends almost all its time in one kind of matmul. On CPU it makes two passes:

1. Pass 1 scores the memory block by block, in bf16 where the CPU multiplies bf16 natively (2-3x faster than fp32;
   each fp32 key as two bf16 parts, its rounding and the rounding of the rest, so that the error comes from the
   query's rounding only), and keeps only the maximum score of every query over every group of `sub` (32 or 64)
   consecutive slots: one `amax` per block, over a layout `[keys, queries]` whose reduction runs along contiguous
   memory, taken over the scores' bits read as integers (3x faster than a bf16 `amax`; exact for positive maxima, so
   every query's scores are shifted by a constant that makes its threshold positive, through an extra key dimension
   of ones). The k-th largest of these maxima is reached by k slots, so, after subtracting the shift and a rigorous
   bound of the bf16 error (from the actual rounding error of each query and the largest key norm), it is a lower
   bound `low` of the query's k-th best fp32 score.
2. Pass 2 scores in fp32 only the (query, group) pairs whose pass-1 maximum can reach `low` (at 65,536 keys and
   k=32: 40-50 of 1,024 groups per query), batched per group (each group's keys meet all the queries that selected
   it in one small matmul; groups taken in order of their number of queries, so that padding them to equal size in
   a batch costs little), and keeps the scores >= `low`. Their top-k is the exact top-k of the fp32 scores (one
   integer sort of (query, score) keys). A query that collects many candidates (text that repeats itself gives
   many near-equal scores) keeps only its best k so far, and its threshold rises to the k-th of them.

On CUDA, data-dependent shapes would need host synchronisations, so the GPU path keeps a running top-k with one
`topk` per block instead (`_search_dense`, also the CPU path for small memories and few queries).

Extra memory stays bounded: the score block (`BLOCK_BYTES`), the table of group maxima (about `2 / sub` bytes per
query and slot, i.e. a tenth of the stored keys and values at 1,536 queries per head), and the pass-2 working set
(`PASS2_BYTES`). Queries are tiled so that none of these grows without bound.

Threads: every op runs with torch's intra-op threads; the search makes few, large ops (a few hundred per call at
65,536 entries) and never changes the process's thread settings.

This file is also shipped as Hugging Face remote code: it imports only torch and the standard library.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator

import torch

# Bytes of one pass-1 score block `[heads, slots, queries]`: small enough to stay in cache, large enough that the
# matmuls run at full speed and the number of ops per call stays small.
BLOCK_BYTES = 4 * 2**20
# Smallest number of memory slots per block (queries are tiled when even this block would exceed BLOCK_BYTES).
MIN_BLOCK = 256
# Bytes of one pass-2 window: the padded queries, the gathered keys and the scores of a batch of groups.
PASS2_BYTES = 16 * 2**20
# Most queries per (head) searched at once: bounds the table of group maxima to a fraction of the stored keys.
TILE_QUERIES = 4096
# Fewest queries per (row, head) for the two-pass search; fewer (e.g. one token while generating) are searched
# densely, where a single pass over the fp32 keys is cheaper than converting them for a bf16 pass.
MIN_QUERIES = 64
# When a (row, head) has at most FEW_QUERIES queries (one decoding step of a grouped-query model) and a block's keys
# take at least STREAM_BYTES, the dense search on CPU streams the keys from beyond cache, and the order of its matmul
# decides how fast: `keys @ q.T` was 1.5x faster than `q @ keys.T` on an AMD EPYC, 1.2-1.5x slower on an Intel Xeon
# (docs/performance.md, "Decoding"). KEYS_MAJOR: None = time both orders once per process, True / False = force.
FEW_QUERIES = 4
STREAM_BYTES = 16 * 2**20
KEYS_MAJOR: bool | None = None
# Slots per group: pass 1 keeps every query's maximum over each group. Aim for at least 8 k groups (a tight
# threshold) with groups of at most SUB_BLOCK slots (cheap pass 2) and at least MIN_SUB_BLOCK (a small table).
SUB_BLOCK = 64
MIN_SUB_BLOCK = 32
# The pass-1 threshold is ranked among about THRESHOLD_SUB_BLOCKS * k coarser maxima (cheaper to rank).
THRESHOLD_SUB_BLOCKS = 8
# Slots scored (in fp32) before pass 1 to choose every query's shift of its pass-1 scores (see `_pass1_bound`).
SHIFT_SAMPLE = 256
# Candidates per query collected by pass 2, in multiples of k, before every query's are cut to its best k so far
# (text that repeats a passage many times, like the passkey's filler, gives many near-equal scores within pass 1's
# error bound). At most 16 k x 13 bytes are kept per query, plus one pass-2 window's.
CANDIDATES = 16
# Columns of a bf16 pass 1's matmul (the keys' parts, the shift's column of ones) are padded with zeros to a multiple
# of PASS1_WIDTH: AMX multiplies bf16 in tiles of 32 columns, and 160 columns run 1.4x faster than 130 (an fp32 pass
# 1 is not padded: no faster there; docs/performance.md).
PASS1_WIDTH = 32
# Pass 1 on CPU scores in bf16 where the CPU has native bf16 dot products (avx512_bf16 / amx_bf16), else in fp32.
# None = detect, True / False = force (pass 2 is always fp32, so the result is exact either way).
APPROX_BF16: bool | None = None
# A bf16 pass 1 multiplies every fp32 (or fp16) key as two bf16 parts, its rounding and the rounding of the rest
# (twice the columns): the pass-1 error then comes from the query's rounding alone, and pass 2 rescores about half
# as many keys on real keys, for a matmul 1.2x longer on AMX (160 columns instead of 96; docs/performance.md).
SPLIT_KEYS = True

_BF16_UNIT = 2.0**-8  # unit roundoff of bf16 (8 significant bits)
_FP32_UNIT = 2.0**-24


@functools.cache
def bf16_matmul_is_fast() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (then 2-3x faster than fp32), read from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@functools.cache
def keys_major_is_faster() -> bool:
    """Whether `keys @ q.T` streams keys from beyond cache faster than `q @ keys.T` for a decoding step's few queries
    on this CPU: six runs of each order, interleaved, over 48 MB of keys (3 heads x 65,536 slots x 64 dims), the best
    of the last four (about 0.1 s, once)."""
    keys = torch.full((3, 65536, 64), 0.5)
    q = torch.full((3, 3, 64), 0.5)
    times = {True: [], False: []}
    for keys_major in (True, False) * 6:
        start = time.perf_counter()
        torch.bmm(keys, q.transpose(1, 2)) if keys_major else torch.bmm(q, keys.transpose(1, 2))
        times[keys_major].append(time.perf_counter() - start)
    return min(times[True][2:]) < min(times[False][2:])


def choose_block_size(num_queries: int, budget_bytes: int | None = None, element_size: int = 4) -> int:
    """Memory slots per block such that a score block of `num_queries` rows fits in `budget_bytes`.

    At least `MIN_BLOCK` (the caller then tiles the queries so that the block still fits the budget).
    """
    budget = BLOCK_BYTES if budget_bytes is None else budget_bytes
    return max(budget // (element_size * max(num_queries, 1)), MIN_BLOCK)


def choose_sub_block(n: int, k: int) -> int:
    """Slots per group (a power of two) for a memory of `n` slots: about 8 k groups, within
    `[MIN_SUB_BLOCK, SUB_BLOCK]` (small groups make pass 2 cheap, many of them make the table of maxima large)."""
    size = 1 << max(int(n // (8 * k)).bit_length() - 1, 0)  # largest power of two <= n / 8k
    return min(max(size, MIN_SUB_BLOCK), SUB_BLOCK)


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
        block_size: memory slots per block of the dense search; by default derived from `BLOCK_BYTES`.

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
    lengths = lengths.to(device=device, dtype=torch.long).clamp(max=C)  # no slot lies past the allocated ones
    lo, hi = torch.stack([lengths.min(), lengths.max()]).tolist()  # the only host synchronisation on CUDA
    n = hi
    if n <= 0:
        return scores, indices

    flat_keys = keys.reshape(R * H, C, D)
    row_len = lengths.repeat_interleave(H)  # valid slots of every (row, head)
    sub = choose_sub_block(n, k)
    two_pass = device.type == "cpu" and -(-n // sub) >= k and M >= MIN_QUERIES
    if two_pass:
        approx = bf16_matmul_is_fast() if APPROX_BF16 is None else APPROX_BF16
        element_size = 2 if approx else 4
        tile = min(M, TILE_QUERIES, max(1, BLOCK_BYTES // (element_size * R * H * MIN_BLOCK)))
    else:
        block = min(block_size or choose_block_size(R * H * M), n)
        tile = max(1, min(M, BLOCK_BYTES // (4 * R * H * block)))
    tile = -(-M // -(-M // tile))  # equal tiles
    dense_dtype = keys.dtype if device.type == "cuda" else torch.float32  # CUDA: native-dtype matmuls
    for m0 in range(0, M, tile):
        q = queries[:, :, m0 : m0 + tile].reshape(R * H, -1, D)
        if two_pass:
            s, i = _search_two_pass(q.float(), flat_keys, row_len, n, lo, k, sub, approx)
        else:
            s, i = _search_dense(q.to(dense_dtype), flat_keys, row_len, n, lo, k, block)
        scores[:, :, m0 : m0 + tile] = s.view(R, H, -1, k)
        indices[:, :, m0 : m0 + tile] = i.view(R, H, -1, k)
    return scores, indices


def _invalid_slots(row_len: torch.Tensor, j0: int, width: int, lo: int) -> torch.Tensor | None:
    """`[RH, width]` bool: which of the slots `[j0, j0 + width)` lie past their head's row length (None: none do)."""
    if j0 + width <= lo:
        return None
    return torch.arange(j0, j0 + width, device=row_len.device) >= row_len[:, None]


def _search_dense(
    q: torch.Tensor, keys: torch.Tensor, row_len: torch.Tensor, n: int, lo: int, k: int, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Running top-k of `q [RH, T, D]` with one `topk` per block of slots: no data-dependent shapes (no host
    synchronisation on CUDA). Returns fp32 scores and slots, `[RH * T, k]`."""
    RH, T, D = q.shape
    top_s = torch.full((RH * T, k), float("-inf"), device=q.device)
    top_i = torch.full((RH * T, k), -1, dtype=torch.long, device=q.device)
    block_bytes = RH * min(block, n) * D * q.element_size()
    keys_major = q.device.type == "cpu" and T <= FEW_QUERIES and block_bytes >= STREAM_BYTES  # see FEW_QUERIES
    keys_major = keys_major and (keys_major_is_faster() if KEYS_MAJOR is None else KEYS_MAJOR)
    for j0 in range(0, n, block):
        width = min(block, n - j0)
        block_keys = keys[:, j0 : j0 + width].to(q.dtype)
        if keys_major:
            s = torch.bmm(block_keys, q.transpose(1, 2)).transpose(1, 2)  # [RH, T, width], a strided view
        else:
            s = torch.bmm(q, block_keys.transpose(1, 2))  # [RH, T, width]
        invalid = _invalid_slots(row_len, j0, width, lo)
        if invalid is not None:
            s.masked_fill_(invalid[:, None, :], float("-inf"))
        block_s, block_i = s.float().topk(min(k, width), dim=2)
        block_s, block_i = block_s.reshape(RH * T, -1), block_i.reshape(RH * T, -1)
        top_s, pos = torch.cat([top_s, block_s], dim=1).topk(k, dim=1)
        top_i = torch.cat([top_i, block_i + j0], dim=1).gather(1, pos)
    top_i.masked_fill_(top_s == float("-inf"), -1)
    return top_s, top_i


def _search_two_pass(
    q: torch.Tensor,
    keys: torch.Tensor,
    row_len: torch.Tensor,
    n: int,
    lo: int,
    k: int,
    sub: int,
    approx: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-pass exact search of fp32 queries `q [RH, T, D]` in `keys [RH, C, D]` (see the module docstring).

    Returns fp32 scores and slots, `[RH * T, k]`.
    """
    RH, T, D = q.shape
    low, selected, short = _pass1_bound(q, keys, row_len, n, lo, k, sub, approx)
    hit_q, hit_s, hit_i = score_groups(q, keys, row_len, lo, k, sub, low, selected)
    scores, indices = top_k_per_query(hit_q, hit_s, hit_i, RH * T, k)
    redo_dense(q, keys, row_len, n, lo, k, short, scores, indices)
    return scores, indices


def redo_dense(
    q: torch.Tensor,
    keys: torch.Tensor,
    row_len: torch.Tensor,
    n: int,
    lo: int,
    k: int,
    redo: torch.Tensor,
    scores: torch.Tensor,
    indices: torch.Tensor,
) -> None:
    """Search the queries `redo` (`[RH * T]` bool) of `q [RH, T, D]` densely, into `scores`/`indices [RH * T, k]`:
    the queries pass 1 could not bound. They are packed per head, padded with copies of a query."""
    RH, T, D = q.shape
    redo = redo.nonzero().squeeze(1)
    if not redo.numel():
        return
    redo_head, redo_token = redo // T, redo % T
    per_head = torch.bincount(redo_head, minlength=RH)
    slot = torch.arange(redo.numel(), device=q.device) - (per_head.cumsum(0) - per_head)[redo_head]
    redo_q = q[:, :1].expand(RH, int(per_head.max()), D).clone()
    redo_q[redo_head, slot] = q[redo_head, redo_token]
    n_redo = min(n, int(row_len[redo_head].max()))  # often short rows: scan only their length
    block = max(min(choose_block_size(redo_q.shape[0] * redo_q.shape[1]), n_redo), 1)  # n_redo 0: empty rows
    s, i = _search_dense(redo_q, keys, row_len, n_redo, lo, k, block)
    scores[redo] = s.view(RH, -1, k)[redo_head, slot]
    indices[redo] = i.view(RH, -1, k)[redo_head, slot]


def score_groups(
    q: torch.Tensor,
    keys: torch.Tensor,
    row_len: torch.Tensor,
    lo: int,
    k: int,
    sub: int,
    low: torch.Tensor,
    selected: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pass 2 of `_search_two_pass`: the candidates' queries, fp32 scores and slots (1-D, unordered), a superset of
    every query's top-k among the selected (head, group, query) triples.

    A candidate's score reaches its query's threshold, which starts at `low` and, once the query has collected more
    than `CANDIDATES * k` candidates (many near-equal scores), rises to the k-th best of them: k scores at least that
    high are found, so nothing below it can enter the top-k, and the query's candidates shrink to those k.
    """
    Q = q.shape[0] * q.shape[1]
    cap = CANDIDATES * k
    count = torch.zeros(Q, dtype=torch.long, device=q.device)
    empty = torch.zeros(0, dtype=torch.long, device=q.device)
    found = [(empty, torch.zeros(0, device=q.device), empty)]
    head, group, token = selected.nonzero(as_tuple=True)  # sorted by (head, group): each group's pairs contiguous
    num_groups = selected.shape[1]
    del selected
    pairs = (head * num_groups + group, head * q.shape[1] + token)
    for row_query, valid, window_slots, s in scored_groups(q, keys, row_len, lo, sub, pairs, num_groups):
        found.append(hits(row_query, torch.where(valid, low[row_query], float("inf")), window_slots, s))
        count += torch.bincount(found[-1][0], minlength=Q)
        crowded = count > cap
        if bool(crowded.any()):  # those queries keep their best k so far, and their thresholds rise to the k-th
            hit_q, hit_s, hit_i = (torch.cat(part) for part in zip(*found))
            cut = crowded[hit_q]
            scores, indices = top_k_per_query(hit_q[cut], hit_s[cut], hit_i[cut], Q, k)  # -inf, -1 for the others
            low = torch.maximum(low, scores[:, -1])
            kept = indices >= 0
            best_q = torch.arange(Q, device=q.device)[:, None].expand(Q, k)[kept]
            found = [(hit_q[~cut], hit_s[~cut], hit_i[~cut]), (best_q, scores[kept], indices[kept])]
            count = torch.where(crowded, kept.sum(dim=1), count)
    hit_q, hit_s, hit_i = (torch.cat(part) for part in zip(*found))
    return hit_q, hit_s, hit_i


def scored_groups(
    q: torch.Tensor,
    keys: torch.Tensor,
    row_len: torch.Tensor,
    lo: int,
    sub: int,
    pairs: tuple[torch.Tensor, torch.Tensor],
    num_groups: int,
    group_slots: torch.Tensor | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The fp32 scores of the (group, query) pairs `pairs` of queries `q [RH, T, D]`, window by window: the groups as
    head * num_groups + group, in non-decreasing order, and the queries as head * T + token.

    Each group's keys are scored against the queries that selected it in one small matmul, batched over windows of
    groups. Groups are taken in order of falling query count, so that padding every group of a window to the count
    of its first one costs little. A group is `sub` consecutive slots, or, given `group_slots [RH, groups, sub]`,
    the slots it lists (-1: none; `retrieval_pages` groups similar keys this way).

    Yields `(row_query [rows], valid [rows], slots [groups, sub], scores [groups, size, sub])`, rows = groups x size:
    each row's query (as head * T + token), whether it is a real row (padding rows repeat one), the groups' slots,
    and the scores (-inf for slots past their row's length or -1).
    """
    RH, T, D = q.shape
    C, device = keys.shape[1], q.device
    groups, query = pairs
    per_group = torch.bincount(groups, minlength=RH * num_groups)
    first_pair = per_group.cumsum(0) - per_group
    per_group, order = per_group.sort(descending=True)
    order = order[: int((per_group > 0).sum())]
    per_group, first_pair = per_group[: order.numel()].tolist(), first_pair[order]
    group_head, listed = order // num_groups, group_slots is not None
    if listed:
        group_slots = group_slots.view(-1, sub)[order]
    else:
        group_slots = (order % num_groups)[:, None] * sub + torch.arange(sub, device=device)

    flat_q, flat_keys = q.reshape(RH * T, D), keys.reshape(-1, D)
    g0 = 0
    while g0 < len(per_group):  # windows of groups whose padded queries, keys and scores fit PASS2_BYTES
        size = per_group[g0]
        g1 = min(g0 + max(1, PASS2_BYTES // (4 * (size * D + sub * D + size * sub))), len(per_group))
        rank = torch.arange(size, device=device)
        valid = rank < torch.tensor(per_group[g0:g1], device=device)[:, None]  # [groups, size]: real rows, not padding
        row_query = query[torch.where(valid, first_pair[g0:g1, None] + rank, first_pair[g0:g1, None])].view(-1)
        window_heads, window_slots = group_head[g0:g1, None], group_slots[g0:g1]  # [groups, 1], [groups, sub]
        window_keys = flat_keys.index_select(0, (window_heads * C + window_slots.clamp(0, C - 1)).view(-1))
        window_q = flat_q.index_select(0, row_query).view(-1, size, D)
        s = torch.bmm(window_q, window_keys.float().view(-1, sub, D).transpose(1, 2))  # [groups, size, sub]
        if listed or int(window_slots[:, -1].max()) >= lo:  # listed slots may be -1; consecutive ones past a row end
            invalid = (window_slots >= row_len[window_heads]) | (window_slots < 0)
            s.masked_fill_(invalid[:, None, :], float("-inf"))
        yield row_query, valid.view(-1), window_slots, s
        g0 = g1


def hits(
    row_query: torch.Tensor, row_low: torch.Tensor, slots: torch.Tensor, scores: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The queries, scores and slots (1-D) of the entries of one `scored_groups` window whose score reaches its row's
    threshold `row_low [rows]`."""
    sub = slots.shape[1]
    size = scores.shape[1]
    hit = (scores.view(-1, sub) >= row_low[:, None]).view(-1).nonzero().squeeze(1)  # flat (row, slot) positions
    return row_query[hit // sub], scores.view(-1)[hit], slots.view(-1)[hit // (size * sub) * sub + hit % sub]


def top_k_per_query(
    hit_q: torch.Tensor, hit_s: torch.Tensor, hit_i: torch.Tensor, num_queries: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k of every query's candidates: `[num_queries, k]` scores and slots, -inf and -1 where a query has
    fewer.

    One sort of an int64 key (the query in the high 32 bits; in the low 32, the score's bits as an unsigned integer
    that falls as the score rises) puts every query's candidates together, best first (two float sorts cost 3x more).
    """
    bits = hit_s.view(torch.int32).long()
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed integers in the order of the floats
    key, order = (hit_q * 2**32 + (2**31 - 1 - ordered)).sort()
    hit_q = key >> 32
    per_query = torch.bincount(hit_q, minlength=num_queries)
    rank = torch.arange(hit_q.numel(), device=hit_q.device) - (per_query.cumsum(0) - per_query)[hit_q]
    keep = (rank < k).nonzero().squeeze(1)
    place = hit_q[keep] * k + rank[keep]
    scores = torch.full((num_queries, k), float("-inf"), device=hit_q.device)
    indices = torch.full((num_queries, k), -1, dtype=torch.long, device=hit_q.device)
    order = order[keep]
    scores.view(-1)[place] = hit_s[order]
    indices.view(-1)[place] = hit_i[order]
    return scores, indices


def _pass1_bound(
    q: torch.Tensor,
    keys: torch.Tensor,
    row_len: torch.Tensor,
    n: int,
    lo: int,
    k: int,
    sub: int,
    approx: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pass 1 of `_search_two_pass`: every query's lower bound `low` `[RH * T]` of its k-th best fp32 score, the
    groups to rescore (`[RH, groups, T]` bool) and the queries to search densely instead (`[RH * T]` bool: fewer
    than k non-empty groups, or a threshold that is not positive).

    The group maxima are taken over the scores' bits read as integers, 3x faster than a bf16 `amax`. Integers order
    positive floats as the floats, and put every negative float (and -0, -inf) below them: the integer maximum of a
    group is its true maximum whenever that is positive, and a score of the group otherwise, so that both the
    threshold's rank and the selection of groups stay exact for queries whose threshold is positive. To make it
    positive, every query's pass-1 scores are shifted by `beta` (an extra key dimension of ones, free in the matmul):
    the k-th best score among the first `SHIFT_SAMPLE` slots, a lower bound of the k-th best overall, is moved to
    the distance between it and the sample's best."""
    RH, T, D = q.shape
    dtype, bits = (torch.bfloat16, torch.int16) if approx else (torch.float32, torch.int32)
    beta = torch.zeros(RH, T)
    sample = min(SHIFT_SAMPLE, lo)  # slots valid in every row
    if sample >= k:
        top = torch.bmm(q, keys[:, :sample].float().transpose(1, 2)).topk(k, dim=2).values
        beta = top[..., 0] - 2 * top[..., -1]
    parts = 2 if approx and SPLIT_KEYS and keys.dtype != torch.bfloat16 else 1  # columns per key dimension
    width = parts * D  # the keys (or their two bf16 parts), then the shift's column of ones, then zeros
    cols = -(-(width + 1) // PASS1_WIDTH) * PASS1_WIDTH if approx else width + 1
    q1 = torch.cat([q] * parts + [beta[..., None], q.new_zeros(RH, T, cols - width - 1)], dim=2).to(dtype)
    beta = q1[..., width].float().view(RH * T)  # as rounded to dtype: exact in pass 1
    num_groups = -(-n // sub)
    coarse = max(num_groups // (THRESHOLD_SUB_BLOCKS * k), 1)  # groups per coarse maximum
    maxima = torch.empty(RH, -(-num_groups // coarse) * coarse, T, dtype=bits)
    maxima[:, num_groups:] = torch.iinfo(bits).min
    block = max(choose_block_size(RH * T, element_size=q1.element_size()) // sub, 1) * sub
    buffer = torch.empty(RH * min(block, num_groups * sub) * T, dtype=dtype)  # reused: no page faults per block
    block_keys = torch.zeros(RH, min(block, num_groups * sub), cols, dtype=dtype)
    block_keys[..., width] = 1  # the shift's column; the columns after it stay 0
    key_norm = torch.zeros(RH)  # the largest norm of the valid keys of every head (stale slots may hold anything)
    for j0 in range(0, n, block):
        slots = min(block, n - j0)
        padded = -(-slots // sub) * sub
        invalid = _invalid_slots(row_len, j0, padded, lo)
        norms = torch.linalg.vector_norm(keys[:, j0 : j0 + slots], dim=-1).float()  # while the block is in cache
        if invalid is not None:
            norms.masked_fill_(invalid[:, :slots], 0.0)
        key_norm = torch.maximum(key_norm, norms.amax(dim=1))
        block_keys[:, :slots, :D] = keys[:, j0 : j0 + slots]
        if parts == 2:  # the rest of each key (exact in fp32), rounded in its turn
            block_keys[:, :slots, D:width] = keys[:, j0 : j0 + slots] - block_keys[:, :slots, :D]
        if padded > slots:  # last block: zero keys up to whole groups (they lie past every row's end: masked)
            block_keys[:, slots:padded, :width] = 0
        if invalid is not None:  # stale slots may hold NaN or inf, and native bf16 kernels spread those to the
            block_keys[:, :padded, :width].masked_fill_(invalid[..., None], 0)  # scores of neighbouring slots
        s = torch.bmm(block_keys[:, :padded], q1.transpose(1, 2), out=buffer[: RH * padded * T].view(RH, padded, T))
        if invalid is not None:
            s.masked_fill_(invalid[:, :, None], float("-inf"))
        torch.amax(s.view(bits).view(RH, padded // sub, sub, T), dim=2, out=maxima[:, j0 // sub : (j0 + padded) // sub])
    del buffer
    # An upper bound of the true norms: the norms' output rounding (to the keys' dtype) and fp32 accumulation.
    key_norm = key_norm * (1 + 2 * (torch.finfo(keys.dtype).eps + D * _FP32_UNIT))

    # k groups have a (shifted) pass-1 score >= g (the k-th largest group maximum), and so, for each, some slot whose
    # fp32 score s is >= low = g - beta - c|g| - e. Here c|g| bounds the rounding of the bf16 output and e bounds
    # |s - (pass-1 score before that rounding - beta)|: the rounding of the query q to q' (|q - q'| |k|) and of the
    # key (|q'| |k| u, or u^2 with split keys), the fp32 accumulation of both passes' exact products (at most
    # `cols` terms each: gamma times the sum of their magnitudes, |q| |k| in pass 2 and |q'| |k| (1 + u)^parts +
    # |beta| in pass 1) and denormals flushed by bf16 dot products. The threshold is ranked among coarser maxima
    # (cheaper): their k-th largest is a lower bound too.
    coarse_max = maxima.view(RH, -1, coarse, T).amax(dim=2) if coarse > 1 else maxima
    g = coarse_max.topk(k, dim=1, sorted=False).values.amin(dim=1).view(dtype).float().view(RH * T)  # not kthvalue: 2x
    key_norm = key_norm.repeat_interleave(T)
    q_norm = torch.linalg.vector_norm(q, dim=-1).view(RH * T)
    q1 = q1[..., :D].float()  # q' (q itself in an fp32 pass 1)
    q1_norm = torch.linalg.vector_norm(q1, dim=-1).view(RH * T)
    q_error = torch.linalg.vector_norm(q - q1, dim=-1).view(RH * T)
    unit = _BF16_UNIT if approx and keys.dtype != torch.bfloat16 else 0.0  # rounding of a key to pass 1's dtype
    gamma = cols * _FP32_UNIT / (1 - cols * _FP32_UNIT)
    e = gamma * (q_norm * key_norm + q1_norm * (1 + unit) ** parts * key_norm + beta.abs())
    e = e + key_norm * (q_error + unit**parts * q1_norm) + cols * 2.0**-120 * (1 + q1_norm + key_norm)
    c = _BF16_UNIT / (1 - _BF16_UNIT) if approx else 0.0
    slack = 2.0**-20  # covers the fp32 rounding of the few operations below
    low = g - beta - c * g.abs() - e
    low = low - slack * (g.abs() + beta.abs() + e)
    # A slot with s >= low has a pass-1 score >= round(low + beta - e) (rounding is monotonic): select its group.
    threshold = low + beta - e
    threshold = threshold - slack * (threshold.abs() + beta.abs() + low.abs() + e)
    threshold = threshold.to(dtype)
    short = ~(threshold > 0)  # also where g is -inf (fewer than k non-empty coarse groups) and low is nan
    selected = maxima[:, :num_groups] >= threshold.view(bits).view(RH, 1, T)
    if bool(short.any()):
        selected.masked_fill_(short.view(RH, 1, T), False)
    return low, selected, short


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
