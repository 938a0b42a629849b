"""The XL cache: local attention also sees the previous segment, exactly as if both were read together."""

from __future__ import annotations

import pytest
import torch

from .conftest import tiny_base, tiny_memorizing


def _silence_memory(model) -> None:
    """Gate closed: the memory layer returns local attention only, so the base model is the reference."""
    with torch.no_grad():
        for knn in model.knn_attention.values():
            knn.gate_bias.fill_(-1e4)


def _xl_mask(segments: int, length: int, sinks: int = 1) -> torch.Tensor:
    """Independent reference of XL attention over the concatenated segments: causal, and each segment sees only
    itself and the segment before it (the cache carries that segment's keys, computed with its own XL context) -
    except its first `sinks` tokens, which see their own segment only (attention sinks)."""
    position = torch.arange(segments * length)
    block = position // length
    reach = torch.where(position % length < sinks, 0, 1)  # how many segments back each query sees
    causal = position.unsqueeze(1) >= position.unsqueeze(0)
    allowed = causal & (block.unsqueeze(1) - block.unsqueeze(0) <= reach.unsqueeze(1))
    return allowed.view(1, 1, segments * length, segments * length)


@pytest.mark.parametrize(("arch", "sinks"), [("llama", 1), ("gpt_neox", 1), ("gemma", 1), ("llama", 0), ("llama", 3)])
def test_xl_cache_equals_block_local_attention_over_the_whole_document(arch: str, sinks: int, token_ids) -> None:
    model = tiny_memorizing(arch, xl_cache=True, combine="gate", xl_sink_tokens=sinks)
    _silence_memory(model)
    segments = [token_ids(seed=seed) for seed in range(4)]
    with torch.no_grad():
        logits = torch.cat([model(segment, update_memory=True).logits for segment in segments], dim=1)
        expected = tiny_base(arch)(torch.cat(segments, dim=1), attention_mask=_xl_mask(4, 16, sinks)).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)


def test_xl_sink_tokens_do_not_see_the_previous_segment(token_ids) -> None:
    """With the default one sink, the segment's first token reads as if alone; the paper's cache (0) differs there."""
    first, second = token_ids(seed=1), token_ids(seed=2)
    outputs = {}
    for sinks in (0, 1):
        model = tiny_memorizing("llama", xl_cache=True, combine="gate", xl_sink_tokens=sinks)
        _silence_memory(model)
        with torch.no_grad():
            model(first, update_memory=True)
            outputs[sinks] = model(second).logits
    alone = tiny_base("llama")(second).logits
    torch.testing.assert_close(outputs[1][:, 0], alone[:, 0], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(outputs[0][:, 0], alone[:, 0], atol=1e-3)


def test_new_document_rows_do_not_see_the_previous_segment(token_ids) -> None:
    model = tiny_memorizing("llama", xl_cache=True, combine="gate")
    _silence_memory(model)
    base = tiny_base("llama")
    first, second = token_ids(seed=1), token_ids(seed=2)
    with torch.no_grad():
        model(first, update_memory=True)
        logits = model(second, memory_reset=torch.tensor([True, False])).logits
        together = base(torch.cat([first, second], dim=1), attention_mask=_xl_mask(2, 16)).logits[:, -16:]
        # row 0 started a new document: it sees its own segment only (positions differ, rotary does not care)
        torch.testing.assert_close(logits[0], base(second).logits[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(logits[1], together[1], atol=1e-5, rtol=1e-4)


def test_xl_cache_under_gradient_checkpointing_gives_the_same_gradients(token_ids) -> None:
    grads = []
    for checkpointing in (False, True):
        model = tiny_memorizing("llama", xl_cache=True).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for seed in (1, 2, 3):
            ids = token_ids(seed=seed)
            model(ids, labels=ids, memory_reset=torch.full((2,), seed == 1)).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


def test_xl_cache_travels_in_memory_files(tmp_path, token_ids) -> None:
    model = tiny_memorizing("llama", xl_cache=True)
    model(token_ids(seed=1), update_memory=True)
    model.save_memory(tmp_path / "memory.safetensors")
    other = tiny_memorizing("llama", xl_cache=True)
    other.load_memory(tmp_path / "memory.safetensors")
    torch.testing.assert_close(other(token_ids(seed=2)).logits, model(token_ids(seed=2)).logits, atol=0, rtol=0)


def test_segments_longer_than_half_the_positions_are_refused_with_xl(token_ids) -> None:
    model = tiny_memorizing("llama", xl_cache=True)  # 256 positions
    model(token_ids(length=200), update_memory=True)
    with pytest.raises(ValueError, match="exceed the base model's 256 positions"):
        model(token_ids(length=200))
