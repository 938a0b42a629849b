"""One suite over every decoder architecture of `conftest.TINY_CONFIGS`: what must hold whatever the base model.

Each architecture is checked on: empty memory gives the base model's logits, filled memory changes them (and a
reset gives them back), training reaches the memory layer's parameters but never the stored tensors, generate
streams a prompt of several windows through a bounded cache and stores every token it reads exactly once, and a
save/load round trip of model and memory gives the same logits.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from memorizing_hf import MemorizingForCausalLM
from memorizing_hf._compat import causal_lm_class, supports_attention_interface

from .conftest import TINY_CONFIGS, read_positions, stored_positions, tiny_base, tiny_memorizing

ARCHITECTURES = sorted(TINY_CONFIGS)


@pytest.fixture(params=ARCHITECTURES)
def arch(request: pytest.FixtureRequest) -> str:
    """An architecture name; one whose attention this transformers release does not route through AttentionInterface
    (GPT-BigCode before 5.4) must be refused at conversion, and the test is skipped after checking that."""
    name = request.param
    if not supports_attention_interface(causal_lm_class(TINY_CONFIGS[name]())):
        with pytest.raises(ValueError, match="does not route its attention through transformers' AttentionInterface"):
            tiny_memorizing(name)
        pytest.skip(f"{name} is refused on transformers {transformers.__version__} (checked)")
    return name


def test_the_suite_covers_a_dozen_architectures() -> None:
    assert len(ARCHITECTURES) >= 12 and {"gemma2", "cohere", "opt", "gpt_bigcode"} <= set(ARCHITECTURES)


@pytest.mark.parametrize("combine", ["gate", "joint"])
def test_empty_memory_gives_the_base_models_logits(arch: str, combine: str, token_ids) -> None:
    base = tiny_base(arch)
    ids = token_ids()
    with torch.no_grad():
        expected = base(ids).logits
    model = MemorizingForCausalLM.from_base_pretrained(
        base, memory_layers=[-2], memory_size=64, memory_top_k=4, combine=combine
    )
    with torch.no_grad():
        logits = model(ids).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def test_filled_memory_changes_the_logits_and_a_reset_restores_them(arch: str, token_ids) -> None:
    base = tiny_base(arch)
    first, second = token_ids(seed=1), token_ids(seed=2)
    with torch.no_grad():
        expected = base(second).logits
        model = MemorizingForCausalLM.from_base_pretrained(base, memory_layers=[1], memory_size=64, combine="joint")
        model(first, update_memory=True)
        with_memory = model(second).logits
        model.reset_memory()
        after_reset = model(second).logits
    assert (with_memory - expected).abs().max() > 1e-3
    torch.testing.assert_close(after_reset, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("combine", ["gate", "joint"])
def test_loss_and_backward_with_memory(arch: str, combine: str, token_ids) -> None:
    model = tiny_memorizing(arch, combine=combine).train()
    first, second = token_ids(seed=1), token_ids(seed=2)
    model(first, labels=first, memory_reset=torch.ones(2, dtype=torch.bool))
    assert not model.memory.is_empty()
    output = model(second, labels=second, memory_reset=torch.zeros(2, dtype=torch.bool))
    assert torch.isfinite(output.loss)
    output.loss.backward()
    grads = {name: param.grad for name, param in model.named_parameters()}
    assert all(g is not None for name, g in grads.items() if name.startswith("knn_attention"))
    if combine == "gate":
        assert grads["knn_attention.1.gate_bias"].abs().sum() > 0
        assert grads["knn_attention.1.memory_scale"].abs().sum() > 0
    for memory in model.memory.layers.values():
        assert memory.keys.grad_fn is None and not memory.keys.requires_grad
        assert memory.values.grad_fn is None and not memory.values.requires_grad


def test_generate_streams_a_long_prompt_through_a_bounded_cache(arch: str, token_ids) -> None:
    window = 8
    model = tiny_memorizing(arch, combine="joint", local_window=window, memory_size=256)
    prompt = token_ids(batch=1, length=5 * window, seed=3)
    cache = model.new_cache(window)
    columns, append = [], cache.append
    cache.append = lambda **parts: (append(**parts), columns.append(cache.num_columns))
    output = model.generate(prompt, cache=cache, max_new_tokens=4, do_sample=False, update_memory=True)
    assert max(columns) <= model.config.sink_tokens + window + cache.evict_every + window
    assert stored_positions(model) == read_positions(model, output[0])


def test_save_and_load_round_trip_of_model_and_memory(arch: str, tmp_path, token_ids) -> None:
    model = tiny_memorizing(arch, combine="gate")
    with torch.no_grad():
        model.knn_attention["1"].gate_bias.copy_(torch.linspace(-1.0, 2.0, model.knn_attention["1"].num_heads))
    model(token_ids(seed=1), update_memory=True)
    model.save_pretrained(tmp_path, save_memory=True)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, memory_file="memory.safetensors").eval()
    assert isinstance(loaded, MemorizingForCausalLM)
    assert loaded.config.local_attn_implementation == model.config.local_attn_implementation
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    second = token_ids(seed=2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(second).logits, model(second).logits, atol=0, rtol=0)
