"""Tests of the coarse-to-exact page backend (`memorizing_hf.retrieval_pages`): its exact mode against naive search
and against the exact backend through the ring buffer; its approximate mode returns valid (not necessarily best)
results. Recall is a benchmark figure (benchmarks/bench_retrieval_approx.py), never asserted here."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memorizing_hf import retrieval_pages
from memorizing_hf.memory import KNNMemory
from memorizing_hf.retrieval import ExactBackend
from memorizing_hf.retrieval_pages import PageBackend
from tests.conftest import tiny_memorizing
from tests.test_retrieval import check, random_case
from tests.test_retrieval_faiss import _ops, run_ops


@pytest.fixture(autouse=True)
def lists_from_few_entries(monkeypatch):
    """Lists are trained from 4 entries per list (instead of 39): tiny memories have lists."""
    monkeypatch.setattr(retrieval_pages, "MIN_PER_LIST", 4)


def small(budget: float | None = None, **kwargs) -> PageBackend:
    """Up to 8 lists in pages of 8 slots."""
    return PageBackend(budget=budget, **{"lists": 8, "page_size": 8, **kwargs})


def check_valid(queries, keys, lengths, k, scores, indices):
    """A valid result, best or not: distinct valid slots, their true scores, sorted, -1 only where the row is short."""
    R, H, M, _ = queries.shape
    assert scores.shape == indices.shape == (R, H, M, k)
    valid_count = lengths.clamp(max=keys.shape[2])[:, None, None, None]
    assert torch.equal(indices == -1, (torch.arange(k) >= valid_count).expand_as(indices))
    assert (indices < valid_count).all()
    assert (scores[..., 1:] <= scores[..., :-1]).all()
    found = indices >= 0
    true = torch.einsum(
        "rhmd,rhmkd->rhmk",
        queries,
        keys[torch.arange(R)[:, None, None, None], torch.arange(H)[None, :, None, None], indices.clamp(min=0)],
    )
    assert torch.allclose(scores[found], true[found], atol=1e-4)
    slots = torch.where(found, indices, -1 - torch.arange(k)).sort(dim=-1).values
    assert (slots[..., 1:] != slots[..., :-1]).all()


@pytest.mark.parametrize(
    "R,H,M,D,C,lengths,k",
    [
        (1, 3, 48, 16, 640, [640], 32),
        (2, 2, 17, 32, 700, [700, 333], 16),
        (3, 1, 9, 8, 300, [0, 299, 20], 5),  # an empty row, a row too small for lists
        (2, 3, 4, 64, 512, [7, 512], 32),  # k larger than a row's length
        (1, 2, 33, 16, 2500, [2049], 1),
    ],
)
@pytest.mark.parametrize("page_size", [4, 8, 64])
def test_exact_mode_matches_naive(R, H, M, D, C, lengths, k, page_size):
    gen = torch.Generator().manual_seed(R * 1000 + M * 10 + k)
    queries, keys, lengths = random_case(gen, R, H, M, D, C, lengths)  # NaN / huge keys past each row's length
    scores, indices = small(page_size=page_size).search(queries, keys, lengths, k)
    check(queries, keys, lengths, k, scores, indices)


def test_exact_mode_with_clusters_and_ties():
    """Keys in a few tight clusters (near-ties) plus exact duplicates, queries near the clusters."""
    gen = torch.Generator().manual_seed(1)
    R, H, M, D, C, k = 1, 2, 24, 16, 1024, 10
    centres = torch.randn(H, 6, D, generator=gen)
    keys = centres[:, torch.randint(0, 6, (C,), generator=gen)] + 1e-3 * torch.randn(H, C, D, generator=gen)
    keys[:, 512:] = keys[:, :512].round(decimals=1)  # exact duplicates and ties
    keys = keys[None]
    queries = centres[:, torch.randint(0, 6, (M,), generator=gen)][None] + 0.1 * torch.randn(R, H, M, D, generator=gen)
    lengths = torch.tensor([C])
    scores, indices = small().search(queries, keys, lengths, k)
    check(queries, keys, lengths, k, scores, indices)


@pytest.mark.parametrize("budget", [0.05, 0.3, 1.0])
def test_approximate_mode_returns_valid_results(budget):
    gen = torch.Generator().manual_seed(2)
    queries, keys, lengths = random_case(gen, 2, 3, 40, 16, 900, [900, 450])
    scores, indices = small(budget).search(queries, keys, lengths, 16)
    check_valid(queries, keys, lengths, 16, scores, indices)


def test_whole_budget_is_exact():
    """Visiting every page is exact too (the budget only limits which pages are visited)."""
    gen = torch.Generator().manual_seed(3)
    queries, keys, lengths = random_case(gen, 1, 2, 30, 16, 1000, [1000])
    scores, indices = small(1.0).search(queries, keys, lengths, 8)
    check(queries, keys, lengths, 8, scores, indices)


def test_rows_and_heads_are_independent():
    gen = torch.Generator().manual_seed(4)
    queries, keys, lengths = random_case(gen, 2, 3, 20, 16, 512, [512, 300])
    for budget in (None, 0.2):
        scores, indices = small(budget).search(queries, keys, lengths, 8)
        alone = small(budget).search(queries[1:], keys[1:], lengths[1:], 8)
        assert torch.equal(indices[1], alone[1][0]) and torch.equal(scores[1], alone[0][0])
        flipped = small(budget).search(queries.flip(1), keys.flip(1), lengths, 8)
        assert torch.equal(indices, flipped[1].flip(1)) and torch.equal(scores, flipped[0].flip(1))


@settings(max_examples=40, deadline=None)
@given(capacity=st.integers(1, 12), heads=st.integers(1, 2), seed=st.integers(0, 2**16), data=st.data())
def test_exact_mode_under_fifo_writes_resets_and_new_rows(capacity, heads, seed, data):
    """Against an independent ring buffer: wrap-arounds (also several in one call), resets, new rows."""
    ops = data.draw(_ops(max_size=3 * capacity))
    run_ops(PageBackend(budget=None, lists=2, page_size=2), capacity, heads, ops, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("budget", [None, 0.1])
def test_through_the_store_after_wrap_around(dtype, budget):
    """Through `KNNMemory`: more than the capacity written in segments, a row reset. Exact mode returns the exact
    backend's top-k; both modes return only slots that hold the scored keys now."""
    gen = torch.Generator().manual_seed(0)
    R, H, D, T, k, capacity = 2, 2, 16, 48, 8, 200
    pages = KNNMemory(capacity, H, D, small(budget), dtype=dtype)
    exact = KNNMemory(capacity, H, D, ExactBackend(), dtype=dtype)
    for step in range(14):
        keys = torch.randn(R, H, T, D, generator=gen)
        store = torch.rand(R, T, generator=gen) < 0.9
        positions = torch.arange(step * T, (step + 1) * T).expand(R, T)
        for memory in (pages, exact):
            memory.write(keys, keys, store, positions)
            if step == 8:
                memory.reset(torch.tensor([1]))
        queries = torch.randn(R, H, 6, D, generator=gen)
        got_s, got_i = pages.search(queries, k)
        ref_s, ref_i = exact.search(queries, k)
        check_valid(queries, pages.keys.float(), pages.lengths, k, got_s, got_i)
        if budget is None:
            torch.testing.assert_close(got_s, ref_s, atol=1e-4, rtol=0)
            assert torch.equal(got_i.sort(-1).values, ref_i.sort(-1).values)


def test_lists_follow_writes_and_resets():
    """Lists are trained once a row holds enough entries; every later write assigns its slots (an overwritten slot
    takes its new key's list); a reset forgets the row's lists."""
    backend = small(0.5, lists=4)
    memory = KNNMemory(64, 1, 8, backend)
    gen = torch.Generator().manual_seed(5)

    def write(tokens: int) -> None:
        keys = torch.randn(1, 1, tokens, 8, generator=gen)
        memory.write(keys, keys, torch.ones(1, tokens, dtype=torch.bool), torch.zeros(1, tokens, dtype=torch.long))

    write(12)
    memory.search(torch.randn(1, 1, 3, 8), 4)
    assert backend._rows == {}  # 12 < 4 lists x 4 entries: searched exactly
    write(40)
    memory.search(torch.randn(1, 1, 3, 8), 4)
    lists = backend._rows[0]
    assert (lists.assign[:, :52] >= 0).all()
    write(30)  # wraps: slots 52-63 and 0-17 hold new keys, assigned as they are written
    augmented = retrieval_pages._augment(memory.keys[0].float(), lists.max_norm)
    assert torch.equal(lists.assign, torch.cdist(augmented, lists.centroids).argmin(-1))
    memory.reset(torch.tensor([0]))
    assert backend._rows == {}


def test_bad_arguments():
    with pytest.raises(ValueError, match="budget"):
        PageBackend(budget=0.0)
    with pytest.raises(ValueError, match="lists"):
        PageBackend(lists=0)
    with pytest.raises(ValueError, match="iterations"):
        PageBackend(iterations=-1)


def test_no_queries_and_k_zero():
    keys = torch.randn(1, 1, 128, 8)
    scores, _ = small().search(torch.randn(1, 1, 0, 8), keys, torch.tensor([128]), 4)
    assert scores.shape == (1, 1, 0, 4)
    scores, _ = small().search(torch.randn(1, 1, 3, 8), keys, torch.tensor([128]), 0)
    assert scores.shape == (1, 1, 3, 0)


def test_the_model_config_selects_the_page_backend(token_ids):
    """`retrieval="pages"` builds a `PageBackend` with `page_budget`; with `page_budget=None` (exact) a model reads the
    same logits as with exact retrieval, across FIFO wrap-arounds of its memory."""
    pages = tiny_memorizing(memory_size=96, memory_top_k=8, retrieval="pages", page_budget=None)
    exact = tiny_memorizing(memory_size=96, memory_top_k=8)
    assert isinstance(pages.memory.layers[1].backend, PageBackend) and pages.memory.layers[1].backend.budget is None
    assert tiny_memorizing(retrieval="pages", page_budget=0.2).memory.layers[1].backend.budget == 0.2
    for step in range(8):  # 8 x 16 tokens per row: the memory of 96 wraps around
        ids = token_ids(seed=step)
        out_pages = pages(ids, update_memory=True).logits
        out_exact = exact(ids, update_memory=True).logits
        torch.testing.assert_close(out_pages, out_exact, atol=1e-5, rtol=1e-4)
    assert pages.memory.layers[1].backend._rows  # lists were trained and used
