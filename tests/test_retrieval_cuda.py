"""Retrieval on CUDA gives what it gives on CPU (skipped without a GPU; `benchmarks/gpu_check.sh` runs these)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from memorizing_hf.memory import KNNMemory
from memorizing_hf.retrieval import ExactBackend, exact_topk
from memorizing_hf.retrieval_pages import PageBackend
from tests.test_retrieval import check, random_case
from tests.test_retrieval_pages import check_valid

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def same_top_k(got: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor], atol: float) -> None:
    """Same scores; same slots wherever the k-th and (k+1)-th scores are not (nearly) tied."""
    torch.testing.assert_close(got[0].cpu(), ref[0].cpu(), atol=atol, rtol=0)
    gap = (ref[0][..., :-1] - ref[0][..., 1:]).abs().amin(-1).cpu() > atol
    assert torch.equal(got[1].cpu().sort(-1).values[gap], ref[1].cpu().sort(-1).values[gap])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_topk_on_cuda_equals_cpu(dtype):
    gen = torch.Generator().manual_seed(0)
    queries, keys, lengths = random_case(gen, 2, 3, 70, 64, 5000, [5000, 1234], dtype=dtype)
    ref = exact_topk(queries, keys, lengths, 32)
    got = exact_topk(queries.cuda(), keys.cuda(), lengths.cuda(), 32)
    assert got[0].device.type == "cuda"
    check(
        queries, keys.float(), lengths, 32, got[0].cpu(), got[1].cpu(), rtol=1e-3 if dtype == torch.bfloat16 else 1e-5
    )
    same_top_k(got, ref, atol=1e-2 if dtype == torch.bfloat16 else 1e-4)


@pytest.mark.parametrize("budget", [None, 0.1])
def test_page_backend_on_cuda(budget):
    gen = torch.Generator().manual_seed(1)
    queries, keys, lengths = random_case(gen, 2, 2, 40, 32, 3000, [3000, 900])
    backend = PageBackend(budget=budget, lists=16, page_size=16)
    got = backend.search(queries.cuda(), keys.cuda(), lengths.cuda(), 16)
    assert got[0].device.type == "cuda"
    if budget is None:
        same_top_k(got, exact_topk(queries, keys, lengths, 16), atol=1e-4)
    else:
        check_valid(queries, keys, lengths, 16, got[0].cpu(), got[1].cpu())


@pytest.mark.parametrize("backend", [ExactBackend, lambda: PageBackend(budget=None, lists=4, page_size=8)])
def test_bf16_memory_on_cuda_matches_cpu(backend):
    """A bf16 memory written and searched on CUDA holds and returns what the same memory does on CPU."""
    gen = torch.Generator().manual_seed(2)
    memories = {device: KNNMemory(300, 2, 32, backend(), dtype=torch.bfloat16) for device in ("cpu", "cuda")}
    for step in range(6):
        keys = torch.randn(2, 2, 80, 32, generator=gen)
        store = torch.rand(2, 80, generator=gen) < 0.9
        positions = torch.arange(step * 80, (step + 1) * 80).expand(2, 80)
        for device, memory in memories.items():
            memory.write(keys.to(device), keys.to(device), store.to(device), positions.to(device))
    assert memories["cuda"].keys.dtype == torch.bfloat16
    assert torch.equal(memories["cuda"].keys.cpu(), memories["cpu"].keys)
    queries = torch.randn(2, 2, 7, 32, generator=gen)
    same_top_k(memories["cuda"].search(queries.cuda(), 8), memories["cpu"].search(queries, 8), atol=1e-3)


@pytest.mark.skipif(importlib.util.find_spec("faiss") is None, reason="faiss not installed")
def test_faiss_on_cuda_storage():
    """faiss-gpu searches the CUDA storage (flat: exactly); faiss-cpu copies it to the host (with a warning)."""
    import faiss

    from memorizing_hf.retrieval_faiss import FaissBackend

    gen = torch.Generator().manual_seed(3)
    queries, keys, lengths = random_case(gen, 1, 2, 30, 32, 2000, [2000], garbage=False)
    backend = FaissBackend("flat")
    backend.add(torch.zeros(2000, dtype=torch.long), torch.arange(2000), keys[0].transpose(0, 1))
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        got = backend.search(queries.cuda(), keys.cuda(), lengths.cuda(), 16)
    else:
        with pytest.warns(UserWarning, match="copied to the host"):
            got = backend.search(queries.cuda(), keys.cuda(), lengths.cuda(), 16)
    same_top_k(got, exact_topk(queries, keys, lengths, 16), atol=1e-3)
