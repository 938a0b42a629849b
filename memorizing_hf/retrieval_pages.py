"""Coarse-to-exact retrieval over the kNN memory: pages of similar keys ranked by their list's centroid, exact re-rank.

The memory of a layer is a FIFO ring buffer `keys[R, H, C, D]` (see `retrieval.py`). `PageBackend` gives every row
and head a few `lists` of similar keys: k-means centroids trained on the row's keys once it holds `MIN_PER_LIST`
entries per list, and every slot assigned to its nearest centroid when it is written (the only work per write). Both
use the MIPS -> L2 reduction of Bachrach et al. (2014), as the augmented faiss indexes do (`retrieval_faiss.py`):
keys get an extra coordinate sqrt(M^2 - |k|^2) and queries a 0, so that the nearest centroid in L2 is the one that
ranks a query's best keys: a query ranks the lists by `q . c - |c~|^2 / 2` (c~: the augmented centroid). Pages of
consecutive slots would not do: neighbouring tokens' keys differ about as much as any two keys, and bounds or
centroids over consecutive slots rank almost nothing out.

A search sorts every head's valid slots by list and cuts each list into pages of at most `page_size` slots. Then:

* approximate (`budget` a fraction): every query visits the `budget` share of the lists it ranks highest (at least
  one) and gets the exact top-k of their keys.
* exact (`budget=None`): after that approximate search with `EXACT_FIRST_BUDGET`, whose k-th best score is a lower
  bound L of the true k-th best, every query visits every list whose upper bound `q . c + |q| radius` (radius: the
  largest distance of a member to the centroid) reaches L. No key that could be in the top-k is skipped: the result
  is the exact backend's top-k (up to the order of tied scores). On attention keys the bound is loose, so this mode
  checks correctness rather than saves time.

Re-rank: each visited page's keys are scored in fp32 against all the queries that visit it in one small matmul
(`retrieval.scored_groups`, the second pass of the exact search). The k-th largest of a query's page maxima is a
lower bound of its k-th best score (k pages hold a key that reaches it), so only the scores that reach it are sorted.

FIFO: an overwritten slot is assigned again when written; a slot's list is never stale (a slot written while no list
existed is assigned from storage at the next search), and the centroids stay those of training until the row is
reset. A key longer than the reduction's M is assigned with a zero extra coordinate: its list may rank it lower than
its score, never wrongly (the re-rank is exact). A row with fewer entries than training needs is searched exactly.

Devices: CPU and CUDA (the same ops; a search synchronises with the host a few times per row and query tile, never
per page). This file is also shipped as Hugging Face remote code: it imports only torch and the standard library.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .retrieval import TILE_QUERIES, exact_topk, hits, redo_dense, scored_groups, top_k_per_query

# Entries per list a row needs before its lists are trained (faiss' minimum for k-means); fewer: exact search.
MIN_PER_LIST = 39
# Training sample: at most this many keys per list.
SAMPLE_PER_LIST = 64
# Headroom of the MIPS -> L2 reduction: M is this times the largest norm at training.
NORM_HEADROOM = 1.1
# Share of the lists visited by the approximate search that starts the exact mode.
EXACT_FIRST_BUDGET = 0.02
# Bytes of the per-tile (list, query) rank table: bounds the queries searched at once.
TILE_BYTES = 64 * 2**20
# Bytes of the (key, list) distances of one block of keys assigned at once.
ASSIGN_BYTES = 64 * 2**20


@dataclass
class _Lists:
    """One row's lists: per head the augmented centroids `[H, L, D + 1]` and the reduction's M `[H]`; per slot its list
    `[H, C]` (-1: not assigned) and its distance to that list's centroid in the keys' space."""

    centroids: torch.Tensor
    max_norm: torch.Tensor
    assign: torch.Tensor
    distance: torch.Tensor
    pages: _Pages | None = None  # the last search's pages, while no slot was assigned since


class PageBackend:
    """Coarse-to-exact retrieval (see the module docstring): lists of similar keys per row and head, cut into pages
    at search time; the visited lists' keys are re-ranked exactly."""

    def __init__(
        self,
        budget: float | None = 0.01,
        lists: int | None = None,
        page_size: int = 64,
        iterations: int = 10,
    ) -> None:
        """`budget`: share of the lists each query visits (None: exact); `lists`: lists per row and head (default
        about 2 sqrt(entries) at training, a power of two); `page_size`: slots scored together; `iterations`: k-means
        iterations of training."""
        if budget is not None and not 0 < budget <= 1:
            raise ValueError(f"budget must be in (0, 1] or None (exact), got {budget!r}")
        if lists is not None and lists < 1:
            raise ValueError("lists must be positive")
        if page_size < 1 or iterations < 0:
            raise ValueError("page_size must be positive and iterations >= 0")
        self.budget, self.lists, self.page_size, self.iterations = budget, lists, page_size, iterations
        self._rows: dict[int, _Lists] = {}

    # ------------------------------------------------------------------ hooks called by the store
    def add(self, rows: torch.Tensor, slots: torch.Tensor, keys: torch.Tensor) -> None:
        """Assign the new keys `[N, H, D]` of `(rows, slots)` to their lists (rows whose lists exist)."""
        for r in rows.unique().tolist() if rows.numel() else []:
            lists = self._rows.get(r)
            if lists is None:
                continue
            mine = rows == r
            row_slots = slots[mine].to(lists.assign.device)
            if int(row_slots.max()) >= lists.assign.shape[1]:
                _grow(lists, int(row_slots.max()) + 1)
            assign, distance = _assign(lists, keys[mine].transpose(0, 1).to(lists.assign.device))
            lists.assign[:, row_slots], lists.distance[:, row_slots] = assign, distance
            lists.pages = None

    def reset(self, rows: torch.Tensor) -> None:
        """Forget these rows' lists (trained again once the rows hold enough entries)."""
        for r in rows.tolist():
            self._rows.pop(int(r), None)

    def search(
        self, queries: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k slots `(scores, indices)`, both `[R, H, M, k]`, of `queries [R, H, M, D]` in `keys [R, H, C, D]`
        (the slots `[0, lengths[r])` of row r); -inf and -1 where a row has fewer than k entries."""
        R, H, M, D = queries.shape
        C = keys.shape[2]
        scores = torch.full((R, H, M, k), float("-inf"), device=queries.device)
        indices = torch.full((R, H, M, k), -1, dtype=torch.long, device=queries.device)
        if k <= 0 or M == 0 or C == 0:
            return scores, indices
        for r, n in enumerate(lengths.clamp(max=C).tolist()):
            lists = self._lists(r, keys[r], n)
            if lists is None:  # too few entries for lists: exact
                row = slice(r, r + 1)
                scores[row], indices[row] = exact_topk(queries[row], keys[row], lengths[row], k)
            else:
                scores[r], indices[r] = self._search_row(lists, queries[r].float(), keys[r], n, k)
        return scores, indices

    # ------------------------------------------------------------------ lists
    def _lists(self, r: int, keys: torch.Tensor, n: int) -> _Lists | None:
        """Row `r`'s lists for its storage `keys [H, C, D]` with `n` valid slots: trained if needed and possible,
        every valid slot assigned. None where the row holds too few entries."""
        lists = self._rows.get(r)
        H, C, D = keys.shape
        if lists is not None and (lists.centroids.shape[::2] != (H, D + 1) or lists.centroids.device != keys.device):
            lists = None  # another layout or device: train again
        if lists is None:
            count = self.lists or 1 << max(round(math.log2(2 * math.sqrt(max(n, 1)))), 0)
            if n < MIN_PER_LIST * count:
                return None
            lists = self._rows[r] = self._train(keys[:, :n], count)
        if lists.assign.shape[1] < C:
            _grow(lists, C)
        for head in range(H):  # slots written before the lists existed (or before this backend was attached)
            missing = (lists.assign[head, :n] < 0).nonzero().squeeze(1)
            if missing.numel():
                assign, distance = _assign(lists, keys[head, missing][None], head)
                lists.assign[head, missing], lists.distance[head, missing] = assign[0], distance[0]
                lists.pages = None
        if lists.pages is None or lists.pages.n != n or lists.pages.keys.data_ptr() != keys.data_ptr():
            lists.pages = _Pages.cut(lists.assign[:, :n], lists.centroids.shape[1], self.page_size, keys, n)
        return lists

    @torch.no_grad()
    def _train(self, keys: torch.Tensor, count: int) -> _Lists:
        """Lists trained on `keys [H, n, D]` (a strided sample of at most `SAMPLE_PER_LIST` per list): k-means over
        the augmented keys, from evenly spaced sample keys."""
        H, n, D = keys.shape
        max_norm = NORM_HEADROOM * keys.float().norm(dim=-1).amax(dim=1)  # [H]
        sample = _augment(keys[:, :: max(1, n // (SAMPLE_PER_LIST * count))].float(), max_norm)  # [H, s, D + 1]
        centroids = sample[:, torch.linspace(0, sample.shape[1] - 1, count, device=keys.device).long()]
        for _ in range(self.iterations):
            nearest = _nearest(sample, centroids)
            total = torch.zeros_like(centroids).scatter_add_(1, nearest[..., None].expand(-1, -1, D + 1), sample)
            size = torch.zeros(H, count, device=keys.device).scatter_add_(1, nearest, torch.ones_like(sample[..., 0]))
            centroids = torch.where(size[..., None] > 0, total / size.clamp(min=1)[..., None], centroids)
        empty = torch.full((H, 0), -1, dtype=torch.long, device=keys.device)
        return _Lists(centroids, max_norm, empty, empty.float())

    # ------------------------------------------------------------------ search
    def _search_row(
        self, lists: _Lists, q: torch.Tensor, keys: torch.Tensor, n: int, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Search fp32 queries `q [H, M, D]` in one row (`keys [H, C, D]`, `n` valid slots). Returns `[H, M, k]`."""
        H, M, D = q.shape
        L, pages = lists.centroids.shape[1], lists.pages
        centroids = lists.centroids[..., :D]
        rank_keys = torch.cat([centroids, lists.centroids.square().sum(-1, keepdim=True)], dim=2)  # q.c - |c~|^2 / 2
        radius = torch.zeros(H, L, device=q.device).scatter_reduce_(
            1, lists.assign[:, :n], lists.distance[:, :n], "amax"
        )
        bound_keys = torch.cat([centroids, radius[..., None] * (1 + 1e-5) + 1e-30], dim=2)  # q . c + |q| r
        key_norm = (centroids.norm(dim=-1) + radius).amax(dim=1)  # bounds every key's norm
        rounding = 4 * (D + 1) * 2.0**-24 * key_norm[:, None]  # x |q|: the rounding of a score in any kernel
        budget = EXACT_FIRST_BUDGET if self.budget is None else self.budget
        visits = min(L, max(1, math.ceil(budget * L)))

        scores = torch.empty(H, M, k, device=q.device)
        indices = torch.empty(H, M, k, dtype=torch.long, device=q.device)
        tile = max(1, min(M, TILE_QUERIES, TILE_BYTES // (4 * H * L)))
        for m0 in range(0, M, tile):
            qt = q[:, m0 : m0 + tile]
            T = qt.shape[1]
            q_norm = qt.norm(dim=-1)  # [H, T]
            rank = torch.bmm(rank_keys, torch.cat([qt, torch.full_like(q_norm[..., None], -0.5)], dim=2).mT)
            best = rank.topk(visits, dim=1).indices  # [H, visits, T]
            head = torch.arange(H, device=q.device)[:, None, None].expand_as(best)
            token = torch.arange(T, device=q.device).expand_as(best)
            s, i = pages.visit(qt, (head * L + best).reshape(-1), (head * T + token).reshape(-1), visits, k)
            if self.budget is None:  # every list that could hold a key reaching the approximate k-th best
                low = s.view(H, T, k)[..., -1] - rounding * q_norm
                bound = torch.bmm(bound_keys, torch.cat([qt, q_norm[..., None]], dim=2).mT)  # [H, L, T]
                head, best, token = (bound >= low[:, None, :]).nonzero(as_tuple=True)
                s, i = pages.visit(qt, head * L + best, head * T + token, visits, k, low)
            short = (i >= 0).sum(dim=1) < min(k, n)  # fewer keys visited than asked for
            if bool(short.any()):
                redo_dense(qt, keys, torch.full((H,), n, device=q.device), n, n, k, short, s, i)
            scores[:, m0 : m0 + tile] = s.view(H, T, k)
            indices[:, m0 : m0 + tile] = i.view(H, T, k)
        return scores, indices


@dataclass
class _Pages:
    """One row's valid slots sorted by list and cut into pages: `slots [H, NP, page_size]` (-1: none), each list's
    first page and page count `[H, L]`, the storage `keys [H, C, D]` and its `n` valid slots."""

    slots: torch.Tensor
    first: torch.Tensor
    count: torch.Tensor
    keys: torch.Tensor
    n: int

    @classmethod
    def cut(cls, assign: torch.Tensor, L: int, page_size: int, keys: torch.Tensor, n: int) -> _Pages:
        """The pages of the slots `[0, n)` whose lists (of `L`) are `assign [H, n]`."""
        H = assign.shape[0]
        order = assign.argsort(dim=1, stable=True)  # [H, n]: slots grouped by list
        size = torch.zeros(H, L, dtype=torch.long, device=assign.device).scatter_add_(
            1, assign, torch.ones_like(assign)
        )
        start = size.cumsum(1) - size
        count = -(-size // page_size)
        first = count.cumsum(1) - count
        page = torch.arange(int(count.sum(1).max()), device=assign.device).expand(H, -1).contiguous()
        owner = torch.searchsorted(count.cumsum(1), page, right=True).clamp(max=L - 1)  # [H, NP]: the page's list
        offset = ((page - first.gather(1, owner)) * page_size)[..., None] + torch.arange(page_size, device=page.device)
        valid = (page < count.sum(1, keepdim=True))[..., None] & (offset < size.gather(1, owner)[..., None])
        place = (start.gather(1, owner)[..., None] + offset).clamp(max=n - 1)
        slots = torch.where(valid, order.gather(1, place.view(H, -1)).view(place.shape), -1)
        return cls(slots, first, count, keys, n)

    def visit(
        self,
        q: torch.Tensor,
        lists: torch.Tensor,
        query: torch.Tensor,
        visits: int,
        k: int,
        low: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-k `[H * T, k]` of the keys of the (list, query) pairs `lists` (head * L + list) and `query`
        (head * T + token), at least `visits` lists per query, for queries `q [H, T, D]`; only scores >= `low [H, T]`
        (if given) are sorted."""
        H, T, _ = q.shape
        L, page_size = self.first.shape[1], self.slots.shape[2]
        order = (lists * (H * T) + query).argsort()  # by (head, list): each list's queries together
        lists, query = lists[order], query[order]
        # Every pair becomes one pair per page of its list, grouped by page: a list's pages take its queries in turn.
        boundary = torch.ones_like(lists, dtype=torch.bool)
        boundary[1:] = lists[1:] != lists[:-1]
        run_start = boundary.nonzero().squeeze(1)
        run_list = lists[run_start]
        run_size = torch.diff(run_start, append=torch.tensor([lists.numel()], device=q.device))
        pages = self.count.view(-1)[run_list]
        block = run_size * pages
        block_start = block.cumsum(0) - block
        out = torch.arange(int(block.sum()), device=q.device)
        run = torch.searchsorted(block.cumsum(0), out, right=True)
        local = out - block_start[run]
        head = run_list[run] // L
        page = self.first.view(-1)[run_list[run]] + local // run_size[run]
        pair_query = query[run_start[run] + local % run_size[run]]
        num_pages = self.slots.shape[1]
        row_len = torch.full((H,), self.n, device=q.device)
        pairs = (head * num_pages + page, pair_query)
        windows = list(scored_groups(q, self.keys, row_len, self.n, page_size, pairs, num_pages, self.slots))
        # A query's k-th best score is at least the k-th largest of the `best` best scores of each of its pages: a
        # query visits at least `visits` pages, so at least k such scores exist.
        best = min(page_size, -(-k // visits))
        empty = torch.zeros(0, dtype=torch.long, device=q.device)
        row_query = torch.cat([w[0][w[1]].repeat_interleave(best) for w in windows] + [empty])
        row_best = torch.cat(
            [w[3].topk(best, dim=2).values.view(-1, best)[w[1]].view(-1) for w in windows] + [empty.float()]
        )
        page_low = top_k_per_query(row_query, row_best, row_query, H * T, k)[0][:, -1]
        if low is not None:
            page_low = torch.maximum(page_low, low.reshape(-1))
        found = [hits(w[0], torch.where(w[1], page_low[w[0]], math.inf), w[2], w[3]) for w in windows]
        found.append((empty, empty.float(), empty))
        hit_q, hit_s, hit_i = (torch.cat(part) for part in zip(*found))
        return top_k_per_query(hit_q, hit_s, hit_i, H * T, k)


def _augment(keys: torch.Tensor, max_norm: torch.Tensor) -> torch.Tensor:
    """`[H, N, D] -> [H, N, D + 1]`: the extra coordinate sqrt(M^2 - |k|^2) of the MIPS -> L2 reduction (0 past M)."""
    extra = (max_norm[:, None, None].square() - keys.square().sum(-1, keepdim=True)).clamp(min=0).sqrt()
    return torch.cat([keys, extra], dim=-1)


def _nearest(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """`[H, N]`: the nearest of `centroids [H, L, E]` to every one of `points [H, N, E]` (L2), in blocks of points."""
    sq_norms = centroids.square().sum(-1)[:, None]
    block = max(1, ASSIGN_BYTES // (4 * centroids.shape[0] * centroids.shape[1]))
    return torch.cat(
        [
            torch.baddbmm(sq_norms, points[:, b : b + block], centroids.mT, alpha=-2).argmin(-1)
            for b in range(0, points.shape[1], block)
        ],
        dim=1,
    )


def _assign(lists: _Lists, keys: torch.Tensor, head: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lists and distances to their centroid (raw space) `[H, N]` of `keys [H, N, D]` (or `[1, N, D]` of `head`)."""
    heads = slice(None) if head is None else slice(head, head + 1)
    centroids, keys = lists.centroids[heads], keys.float()
    nearest = _nearest(_augment(keys, lists.max_norm[heads]), centroids)
    raw = centroids[..., :-1].gather(1, nearest[..., None].expand(-1, -1, keys.shape[-1]))
    return nearest, (keys - raw).norm(dim=-1)


def _grow(lists: _Lists, slots: int) -> None:
    """Room for `slots` slots in the per-slot tables (new slots not assigned)."""
    H, old = lists.assign.shape
    lists.assign = torch.cat([lists.assign, lists.assign.new_full((H, slots - old), -1)], dim=1)
    lists.distance = torch.cat([lists.distance, lists.distance.new_zeros(H, slots - old)], dim=1)
