"""Tests of the exact retrieval backend (`memorizing_hf.retrieval`) against an independent naive search."""

from __future__ import annotations

import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from memorizing_hf import retrieval
from memorizing_hf.retrieval import ExactBackend, choose_block_size, exact_topk

NINF = float("-inf")

# Search paths of exact_topk on CPU. "small" shrinks every size so that tiny memories still take the two-pass path
# with several blocks, partial last blocks, several pass-2 windows, query tiles, coarse threshold maxima and
# shifted pass-1 scores, and pads pass 1's columns wider; "crowded" additionally makes most queries collect more
# candidates than they may keep (their thresholds rise to their best k so far); "no_shift" leaves pass-1 scores
# unshifted, so that queries with a negative threshold are searched densely; "dense" forces the dense path (the CUDA
# one), "dense_keys_major" that path with the keys as the matmul's left operand, "dense_timed_order" with the order
# this CPU's timing chooses; "fp32" disables the bf16 first pass, "small_whole_keys" rounds every key to bf16 in one
# part instead of two.
SMALL = {
    "SUB_BLOCK": 8,
    "MIN_SUB_BLOCK": 4,
    "MIN_BLOCK": 8,
    "BLOCK_BYTES": 2**18,
    "PASS2_BYTES": 2**14,
    "TILE_QUERIES": 16,
    "MIN_QUERIES": 1,
    "SHIFT_SAMPLE": 16,
    "PASS1_WIDTH": 8,
}
PATHS = {
    "default": {},
    "fp32": {"APPROX_BF16": False},
    "bf16": {"APPROX_BF16": True},
    "small": SMALL | {"THRESHOLD_SUB_BLOCKS": 2, "APPROX_BF16": True},
    "small_fp32": SMALL | {"APPROX_BF16": False},
    "small_whole_keys": SMALL | {"APPROX_BF16": True, "SPLIT_KEYS": False},
    "crowded": SMALL | {"PASS2_BYTES": 2**11, "CANDIDATES": 1, "APPROX_BF16": True},
    "no_shift": SMALL | {"SHIFT_SAMPLE": 0, "APPROX_BF16": True},
    "dense": {"MIN_QUERIES": 2**30, "MIN_BLOCK": 8, "BLOCK_BYTES": 2**14},
    "dense_keys_major": {
        "MIN_QUERIES": 2**30,
        "MIN_BLOCK": 8,
        "BLOCK_BYTES": 2**14,
        "FEW_QUERIES": 2**30,
        "STREAM_BYTES": 0,
        "KEYS_MAJOR": True,
    },
    "dense_timed_order": {
        "MIN_QUERIES": 2**30,
        "MIN_BLOCK": 8,
        "BLOCK_BYTES": 2**14,
        "FEW_QUERIES": 2**30,
        "STREAM_BYTES": 0,
        "KEYS_MAJOR": None,
    },
}


@pytest.fixture(params=list(PATHS))
def path(request, monkeypatch):
    for name, value in PATHS[request.param].items():
        monkeypatch.setattr(retrieval, name, value)
    return request.param


def naive_topk(queries, keys, lengths, k):
    """Reference: full float64 score matrix, invalid slots at -inf, full sort."""
    R, H, M, D = queries.shape
    scores = torch.einsum("rhmd,rhcd->rhmc", queries.double(), keys.double())
    invalid = torch.arange(keys.shape[2]) >= lengths[:, None]
    scores = scores.masked_fill(invalid[:, None, None, :], NINF)
    if scores.shape[-1] < k:
        scores = torch.nn.functional.pad(scores, (0, k - scores.shape[-1]), value=NINF)
    return scores.sort(dim=-1, descending=True).values[..., :k], scores


def check(queries, keys, lengths, k, scores, indices, rtol=1e-5):
    """The result is a valid exact top-k: right shapes/dtypes, sorted, valid distinct slots, -1 exactly where the row
    has fewer than k entries, scores equal to the slots' true scores, and the top-k score set of the reference."""
    R, H, M, D = queries.shape
    assert scores.shape == indices.shape == (R, H, M, k)
    assert scores.dtype == torch.float32 and indices.dtype == torch.int64
    ref_top, ref_all = naive_topk(queries, keys, lengths, k)
    # Tolerance: fp32 rounding of a dot product, relative to |q| |k|.
    key_norms = keys.double().norm(dim=-1).masked_fill(torch.arange(keys.shape[2]) >= lengths[:, None, None], 0)
    scale = queries.double().norm(dim=-1)[..., None] * key_norms.amax(-1, keepdim=True)[..., None]
    tol = rtol * scale + 1e-30
    valid_count = lengths.clamp(max=keys.shape[2])[:, None, None, None]
    expect_missing = torch.arange(k) >= valid_count
    assert torch.equal(indices == -1, expect_missing.expand_as(indices))
    assert torch.equal(torch.isneginf(scores), expect_missing.expand_as(scores))
    assert (indices < valid_count).all()
    assert (scores[..., 1:] <= scores[..., :-1]).all()
    found = indices >= 0
    sorted_slots = torch.where(found, indices, -1 - torch.arange(k)).sort(dim=-1).values  # -1, -2, ... are unique
    assert (sorted_slots[..., 1:] != sorted_slots[..., :-1]).all(), "duplicate slots"
    true = ref_all.gather(-1, indices.clamp(min=0))
    assert torch.all(~found | ((scores.double() - true).abs() <= tol))
    assert torch.all(~found | ((scores.double() - ref_top).abs() <= tol))


def random_case(gen, R, H, M, D, C, lengths, dtype=torch.float32, garbage=True):
    queries = torch.randn(R, H, M, D, generator=gen)
    keys = torch.randn(R, H, C, D, generator=gen)
    if garbage:  # stale slots past a row's length must never matter, not even NaN or huge values
        invalid = torch.arange(C) >= torch.as_tensor(lengths)[:, None]
        fill = torch.where(torch.rand(R, 1, C, 1, generator=gen) < 0.5, float("nan"), 1e4)
        keys = torch.where(invalid[:, None, :, None], fill.expand_as(keys), keys)
    return queries, keys.to(dtype), torch.as_tensor(lengths, dtype=torch.long)


@pytest.mark.parametrize(
    "R,H,M,D,C,lengths,k",
    [
        (1, 3, 48, 64, 3000, [3000], 32),
        (1, 1, 5, 16, 700, [650], 8),
        (2, 2, 17, 32, 1200, [1200, 333], 16),
        (3, 1, 9, 8, 900, [0, 899, 40], 5),
        (2, 3, 4, 64, 512, [7, 512], 32),
        (1, 2, 33, 16, 2500, [2049], 1),
    ],
)
def test_random_matches_naive(path, R, H, M, D, C, lengths, k):
    gen = torch.Generator().manual_seed(R * 1000 + M * 10 + k)
    queries, keys, lengths = random_case(gen, R, H, M, D, C, lengths)
    scores, indices = exact_topk(queries, keys, lengths, k)
    check(queries, keys.float(), lengths, k, scores, indices)


def test_clustered_and_tied(path):
    """Queries near a few cluster centres, keys tightly clustered (near-ties), plus exact ties from integer data."""
    gen = torch.Generator().manual_seed(1)
    R, H, M, D, C, k = 2, 2, 24, 16, 1500, 10
    centres = torch.randn(4, D, generator=gen) * 3
    keys = centres[torch.randint(0, 4, (R, H, C), generator=gen)] + 0.01 * torch.randn(R, H, C, D, generator=gen)
    queries = centres[torch.randint(0, 4, (R, H, M), generator=gen)] + 0.1 * torch.randn(R, H, M, D, generator=gen)
    lengths = torch.tensor([C, 1000])
    check(queries, keys, lengths, k, *exact_topk(queries, keys, lengths, k))
    int_keys = torch.randint(-2, 3, (R, H, C, D), generator=gen).float()  # many exactly equal scores
    int_queries = torch.randint(-2, 3, (R, H, M, D), generator=gen).float()
    check(int_queries, int_keys, lengths, k, *exact_topk(int_queries, int_keys, lengths, k), rtol=0.0)


@pytest.mark.parametrize("approx,noise", [(True, 1e-4), (False, 1e-4), (False, 0.0)])
def test_a_repeated_passage_is_searched_without_a_dense_pass(monkeypatch, approx, noise):
    """Keys of a passage repeated 2,048 times (the passkey's filler): thousands of equal or near-equal scores per
    query. The result stays exact, and no query falls back to a dense search of the whole memory."""
    monkeypatch.setattr(retrieval, "APPROX_BF16", approx)
    dense_calls = []
    search_dense = retrieval._search_dense
    monkeypatch.setattr(retrieval, "_search_dense", lambda *args: dense_calls.append(1) or search_dense(*args))
    gen = torch.Generator().manual_seed(11)
    R, H, M, D, C, k, period = 1, 2, 96, 64, 32768, 32, 16
    passage = torch.randn(H, period, D, generator=gen)
    keys = passage.repeat(1, C // period, 1)[None] + noise * torch.randn(R, H, C, D, generator=gen)
    queries = passage[:, torch.randint(0, period, (M,), generator=gen)][None] + 0.1 * torch.randn(R, H, M, D)
    lengths = torch.tensor([C])
    check(queries, keys, lengths, k, *exact_topk(queries, keys, lengths, k))
    assert not dense_calls


def negative_case(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries with positive and keys with negative coordinates: every score is negative."""
    gen = torch.Generator().manual_seed(seed)
    queries = torch.rand(2, 2, 80, 16, generator=gen) + 0.1
    keys = -torch.rand(2, 2, 3000, 16, generator=gen) - 0.1
    return queries, keys, torch.tensor([3000, 2100])


def test_negative_scores(path):
    queries, keys, lengths = negative_case(8)
    check(queries, keys, lengths, 8, *exact_topk(queries, keys, lengths, 8))


@pytest.mark.parametrize("shift_sample,redone", [(256, False), (0, True)])
def test_shift_keeps_negative_scores_in_the_two_pass_search(monkeypatch, shift_sample, redone):
    """Pass-1 maxima are integer maxima of the scores' bits, exact only above zero: shifted scores keep queries whose
    scores are all negative in the two-pass search; unshifted, they are searched again densely (still exact)."""
    monkeypatch.setattr(retrieval, "SHIFT_SAMPLE", shift_sample)
    dense_calls = []
    search_dense = retrieval._search_dense
    monkeypatch.setattr(retrieval, "_search_dense", lambda *args: dense_calls.append(1) or search_dense(*args))
    queries, keys, lengths = negative_case(9)
    check(queries, keys, lengths, 8, *exact_topk(queries, keys, lengths, 8))
    assert bool(dense_calls) == redone


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_storage(path, dtype):
    gen = torch.Generator().manual_seed(2)
    queries, keys, lengths = random_case(gen, 2, 3, 20, 64, 2000, [2000, 1500], dtype=dtype)
    scores, indices = exact_topk(queries, keys, lengths, 16)
    check(queries, keys.float(), lengths, 16, scores, indices)


def test_queries_in_low_precision(path):
    gen = torch.Generator().manual_seed(3)
    queries, keys, lengths = random_case(gen, 1, 2, 10, 32, 1000, [1000])
    queries = queries.bfloat16()
    check(queries.float(), keys, lengths, 8, *exact_topk(queries, keys, lengths, 8))


@pytest.mark.parametrize("lengths,k", [([0], 4), ([0, 0], 1), ([3, 0], 8), ([5, 2], 5), ([1], 64)])
def test_short_memories(path, lengths, k):
    """Rows with fewer than k entries give -1 / -inf in the missing places; empty memories give only those."""
    gen = torch.Generator().manual_seed(4)
    queries, keys, lengths = random_case(gen, len(lengths), 2, 6, 8, 16, lengths)
    scores, indices = exact_topk(queries, keys, lengths, k)
    check(queries, keys, lengths, k, scores, indices)


def test_degenerate_shapes():
    queries, keys = torch.randn(1, 2, 0, 8), torch.randn(1, 2, 10, 8)
    scores, indices = exact_topk(queries, keys, torch.tensor([10]), 3)
    assert scores.shape == indices.shape == (1, 2, 0, 3)
    scores, indices = exact_topk(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 0, 8), torch.tensor([0]), 3)
    assert (indices == -1).all() and torch.isneginf(scores).all()


def test_backend_and_lengths_on_other_device_types():
    gen = torch.Generator().manual_seed(5)
    queries, keys, lengths = random_case(gen, 2, 1, 4, 8, 100, [100, 60])
    backend = ExactBackend()
    backend.add(torch.tensor([0]), torch.tensor([3]), torch.randn(1, 1, 8))
    backend.reset(torch.tensor([1]))
    scores, indices = backend.search(queries, keys, lengths.int(), 7)
    check(queries, keys, lengths, 7, scores, indices)


@settings(max_examples=40, deadline=None)
@given(
    R=st.integers(1, 3),
    H=st.integers(1, 3),
    M=st.integers(1, 12),
    D=st.sampled_from([4, 8, 32]),
    C=st.integers(1, 300),
    k=st.integers(1, 40),
    seed=st.integers(0, 2**16),
    path=st.sampled_from(list(PATHS)),
    data=st.data(),
)
def test_property_matches_naive(R, H, M, D, C, k, seed, path, data):
    lengths = data.draw(st.lists(st.integers(0, C), min_size=R, max_size=R))
    gen = torch.Generator().manual_seed(seed)
    queries, keys, lengths = random_case(gen, R, H, M, D, C, lengths)
    with pytest.MonkeyPatch.context() as mp:
        for name, value in PATHS[path].items():
            mp.setattr(retrieval, name, value)
        scores, indices = exact_topk(queries, keys, lengths, k)
    check(queries, keys, lengths, k, scores, indices)


class Bf16MatmulOperands(TorchDispatchMode):
    """Counts the bf16 `bmm` calls inside the context, and those given a NaN or infinite operand."""

    def __init__(self):
        super().__init__()
        self.calls = self.non_finite = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten.bmm and args[0].dtype == torch.bfloat16:
            self.calls += 1
            self.non_finite += int(not (args[0].isfinite().all() and args[1].isfinite().all()))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("fill", [float("nan"), float("inf")])
def test_stale_slots_never_reach_the_bf16_first_pass(monkeypatch, fill):
    """Native bf16 kernels (AMX, AVX512-BF16) pair neighbouring slots: a NaN or inf in a stale slot made the score of
    the valid slot beside it NaN, and the search lost that slot (found by the property test on such a CPU). Stale
    slots are zeroed before pass 1's matmul, which this checks on any CPU; exactness is checked too."""
    for name, value in PATHS["small"].items():
        monkeypatch.setattr(retrieval, name, value)
    gen = torch.Generator().manual_seed(140)
    queries, keys, lengths = random_case(gen, 2, 1, 4, 4, 161, [97, 93], garbage=False)
    keys[0, :, 97:], keys[1, :, 93:] = fill, fill  # the last valid slots, 96 and 92, sit beside stale ones
    with Bf16MatmulOperands() as operands:
        scores, indices = exact_topk(queries, keys, lengths, 1)
    check(queries, keys, lengths, 1, scores, indices)
    assert operands.calls > 0 and operands.non_finite == 0


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


def test_block_size_follows_budget():
    for queries, budget in [(4608, 16 * 2**20), (100, 2**20), (10**6, 2**20)]:
        block = choose_block_size(queries, budget)
        assert block == max(budget // (4 * queries), retrieval.MIN_BLOCK)
    assert choose_block_size(4608) == choose_block_size(4608, retrieval.BLOCK_BYTES)


@pytest.mark.parametrize("approx", [True, False])
def test_peak_memory_is_bounded(monkeypatch, approx):
    """Never the full score matrix: the extra memory stays far below it and shrinks with the block budget."""
    monkeypatch.setattr(retrieval, "APPROX_BF16", approx)
    gen = torch.Generator().manual_seed(6)
    R, H, M, D, C, k = 1, 3, 256, 64, 16384, 32
    queries, keys, lengths = random_case(gen, R, H, M, D, C, [C], garbage=False)
    full_matrix = R * H * M * C * 4
    kv_bytes = 2 * keys.numel() * keys.element_size()
    peaks = []
    for budget in [2**20, 4 * 2**20]:
        monkeypatch.setattr(retrieval, "BLOCK_BYTES", budget)
        monkeypatch.setattr(retrieval, "PASS2_BYTES", budget)
        with PeakMemory(exclude=[queries, keys, lengths]) as mem:
            exact_topk(queries, keys, lengths, k)
        peaks.append(mem.peak)
        # pass 1: score block (bf16 + fp32 copy, or fp32); pass 2: its window (PASS2_BYTES) and the gathered pairs;
        # both: the sub-block maxima (fp32 + bool, C / 64 per query) and the candidate buffers (fp32 + int64)
        bound = 5 * budget + R * H * M * ((C // 64) * 5 + retrieval.CANDIDATES * k * 13) + 2**20
        assert mem.peak <= bound, (budget, mem.peak, bound)
    assert peaks[0] < peaks[1] < full_matrix / 2
    assert peaks[1] <= 1.2 * kv_bytes


def test_thread_count_is_left_alone():
    """exact_topk never changes the process's torch thread count."""
    before = torch.get_num_threads()
    gen = torch.Generator().manual_seed(7)
    queries, keys, lengths = random_case(gen, 1, 2, 8, 16, 4096, [4096])
    exact_topk(queries, keys, lengths, 4)
    assert torch.get_num_threads() == before


def test_an_empty_row_beside_a_one_entry_row(path):
    """Queries of an empty row may fall to the dense re-search with nothing to scan (found by hypothesis)."""
    gen = torch.Generator().manual_seed(0)
    queries, keys, lengths = random_case(gen, 2, 1, 1, 4, 1, [0, 1])
    check(queries, keys, lengths, 1, *exact_topk(queries, keys, lengths, 1))
