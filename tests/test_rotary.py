"""rotate_by against transformers' own rotary embeddings (full and partial rotary)."""

from __future__ import annotations

import pytest
import torch
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb as neox_rotary
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_rotary

from memorizing_hf.rotary import rotate_by

from .conftest import tiny_base


@pytest.mark.parametrize(("arch", "apply"), [("llama", llama_rotary), ("gpt_neox", neox_rotary)])
def test_rotating_by_a_position_difference_moves_a_key_there(arch: str, apply) -> None:
    model = tiny_base(arch)
    rotary = next(m for n, m in model.named_modules() if n.endswith("rotary_emb"))
    x = torch.randn(2, 3, 5, 8)
    start = torch.tensor([[0, 1, 2, 3, 4], [7, 9, 20, 21, 100]])
    target = torch.tensor([[40, 3, 2, 0, 9], [1, 2, 3, 4, 5]])
    at_start, _ = apply(x, x, *rotary(x, start))
    at_target, _ = apply(x, x, *rotary(x, target))
    torch.testing.assert_close(rotate_by(at_start, target - start, rotary.inv_freq), at_target, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rotate_by(at_start, -start, rotary.inv_freq), x, atol=1e-5, rtol=1e-5)
