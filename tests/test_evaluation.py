"""Streaming perplexity, and the zero-shot finding on a real model: joint memory at layers 16-24 helps SmolLM2."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from memorizing_hf.evaluation import Setting, setting_perplexity, streaming_perplexity, with_setting

from .conftest import tiny_base, tiny_memorizing


def _manual_nll(model: nn.Module, ids: torch.Tensor, context: int, segment: int) -> tuple[float, int]:
    """Independent reference: score token t (t not first of its segment) from the `context` tokens before it,
    restricted to tokens in the window that `streaming_perplexity` gives that segment."""
    total, count = 0.0, 0
    for start in range(segment, ids.numel() - 1, segment):
        end = min(start + segment, ids.numel())
        window = ids[max(0, end - context) : end] if context > segment else ids[start:end]
        logits = model(window.unsqueeze(0)).logits[0].log_softmax(-1)
        offset = end - window.numel()
        for position in range(start + 1, end):
            total -= float(logits[position - offset - 1, ids[position]])
            count += 1
    return total, count


@torch.no_grad()
@pytest.mark.parametrize("mode,context", [("segment", 8), ("window", 16)])
def test_no_memory_modes_match_a_manual_reference(mode: str, context: int) -> None:
    base = tiny_base("llama")
    ids = torch.randint(3, 96, (45,), generator=torch.Generator().manual_seed(0))
    result = streaming_perplexity(base, ids, segment_length=8, mode=mode, window=context, progress=False)
    nll, count = _manual_nll(base, ids, context, 8)
    assert result.tokens == count
    assert math.isclose(result.nll, nll, rel_tol=1e-5)


@torch.no_grad()
def test_memory_mode_reads_a_fresh_memory_unless_given_one() -> None:
    model = tiny_memorizing("llama", memory_size=256)
    ids = torch.randint(3, 96, (64,), generator=torch.Generator().manual_seed(0))
    model(ids[:16].unsqueeze(0), update_memory=True)  # another document in the model's memory must not be read
    with_memory = streaming_perplexity(model, ids, segment_length=16, progress=False)
    segment_only = streaming_perplexity(model, ids, segment_length=16, mode="segment", progress=False)
    base_only = streaming_perplexity(tiny_base("llama"), ids, segment_length=16, mode="segment", progress=False)
    assert model.memory.entries() == {1: [15]}  # untouched
    assert math.isclose(segment_only.nll, base_only.nll, rel_tol=1e-6)
    assert with_memory.tokens == segment_only.tokens == 3 * 15

    memory = model.new_memory()
    kept = streaming_perplexity(model, ids, segment_length=16, progress=False, memory=memory)
    assert kept.nll == with_memory.nll
    # every token of the 4 segments but each segment's first (an attention sink, never stored)
    assert memory.entries() == {1: [4 * 15]}
    assert with_memory.nll != segment_only.nll


@torch.no_grad()
def test_correct_marks_the_scored_positions_whose_token_was_the_top_prediction() -> None:
    base = tiny_base("llama")
    ids = torch.randint(3, 96, (40,), generator=torch.Generator().manual_seed(0))
    result = streaming_perplexity(base, ids, segment_length=16, mode="segment", progress=False)
    assert sorted(result.correct) == [p for p in range(16, 40) if p % 16 != 0]
    top = base(ids[16:32].unsqueeze(0)).logits[0].argmax(-1)
    assert [result.correct[p] for p in range(17, 32)] == (top[:-1] == ids[17:32]).tolist()


def test_setting_labels_follow_table_4() -> None:
    assert Setting().label(512) == "512 / - / -"
    assert Setting(8192, xl_cache=True).label(512) == "512 / 8192 / 512"
    assert Setting(window=1024).label(512) == "1024 (window) / - / -"


@torch.no_grad()
def test_settings_share_the_weights_and_memory_size_0_is_the_xl_cache_alone() -> None:
    model = tiny_memorizing("llama", memory_size=64, combine="gate").eval()
    ids = torch.randint(3, 96, (80,), generator=torch.Generator().manual_seed(0))
    xl_only = with_setting(model, Setting(0, xl_cache=True))
    assert xl_only.language_model is model.language_model and xl_only.config.xl_cache and not model.config.xl_cache
    result = setting_perplexity(model, ids, Setting(0, xl_cache=True), 16, progress=False)
    # Reference: the same model with real memory but its gates shut (sigmoid(-1e4) = 0): local attention + XL only.
    shut = with_setting(model, Setting(64, xl_cache=True))
    shut.knn_attention["1"].gate_bias.fill_(-1e4)
    reference = streaming_perplexity(shut, ids, 16, progress=False)
    assert math.isclose(result.nll, reference.nll, rel_tol=1e-6)
    assert result.nll != setting_perplexity(model, ids, Setting(), 16, progress=False).nll  # XL changes something
    # Memory sizes: the same as reading with a model built with that size.
    sized = tiny_memorizing("llama", memory_size=32, combine="gate").eval()
    assert math.isclose(
        setting_perplexity(model, ids, Setting(32), 16, progress=False).nll,
        streaming_perplexity(sized, ids, 16, progress=False).nll,
        rel_tol=1e-6,
    )


def test_bad_modes_are_refused() -> None:
    base = tiny_base("llama")
    with pytest.raises(ValueError, match="Unknown mode"):
        streaming_perplexity(base, torch.arange(3, 40), mode="cache")
    with pytest.raises(ValueError, match="window >= segment_length"):
        streaming_perplexity(base, torch.arange(3, 40), segment_length=16, mode="window", window=8)


@pytest.mark.slow
def test_smollm2_joint_memory_at_layers_16_to_24_beats_no_memory_on_a_stdlib_module() -> None:
    """zero-shot-findings.md: layers 16-24, "fixed" rotation, sinks skipped gave 8.52 vs 10.49 on typing.py."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from memorizing_experiments.sources import smollm2_path, stdlib_path
    from memorizing_hf import MemorizingForCausalLM

    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = MemorizingForCausalLM.from_base_pretrained(base, memory_layers=list(range(16, 25)), combine="joint")
    ids = torch.tensor(tokenizer(stdlib_path("typing").read_text())["input_ids"][:6144])
    alone = streaming_perplexity(model, ids, 512, mode="segment", progress=False)
    memory = streaming_perplexity(model, ids, 512, mode="memory", progress=False)
    print(f"typing.py, 6144 tokens: segment alone {alone.perplexity:.3f}, with memory {memory.perplexity:.3f}")
    assert memory.perplexity < 0.95 * alone.perplexity
