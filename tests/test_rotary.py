"""Rotary against transformers' own rotary embeddings: half and interleaved layouts, full and partial rotary."""

from __future__ import annotations

import pytest
import torch
from transformers.models.cohere.modeling_cohere import apply_rotary_pos_emb as cohere_rotary
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb as neox_rotary
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_rotary
from transformers.models.phi.modeling_phi import apply_rotary_pos_emb as phi_rotary

from memorizing_hf.rotary import Rotary

from .conftest import tiny_base


def _partial(apply):
    """Phi rotates the first dims with `apply` and passes the rest through (its attention does the split)."""

    def rotate(q, k, cos, sin):
        dims = cos.shape[-1]
        q_rot, k_rot = apply(q[..., :dims], k[..., :dims], cos, sin)
        return torch.cat((q_rot, q[..., dims:]), -1), torch.cat((k_rot, k[..., dims:]), -1)

    return rotate


@pytest.mark.parametrize(
    ("arch", "apply", "interleaved"),
    [
        ("llama", llama_rotary, False),
        ("gpt_neox", neox_rotary, False),
        ("phi", _partial(phi_rotary), False),
        ("cohere", cohere_rotary, True),
    ],
)
def test_rotating_by_a_position_difference_moves_a_key_there(arch: str, apply, interleaved: bool) -> None:
    model = tiny_base(arch)
    embedding = next(m for n, m in model.named_modules() if n.endswith("rotary_emb"))
    rotary = Rotary.of(embedding)
    assert rotary.interleaved == interleaved
    x = torch.randn(2, 3, 5, 8)
    start = torch.tensor([[0, 1, 2, 3, 4], [7, 9, 20, 21, 100]])
    target = torch.tensor([[40, 3, 2, 0, 9], [1, 2, 3, 4, 5]])
    at_start, _ = apply(x, x, *embedding(x, start))
    at_target, _ = apply(x, x, *embedding(x, target))
    torch.testing.assert_close(rotary.rotate(at_start, target - start), at_target, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rotary.rotate(at_start, -start), x, atol=1e-5, rtol=1e-5)


def test_an_unknown_rotary_layout_is_refused() -> None:
    class Shuffled(torch.nn.Module):
        inv_freq = torch.tensor([1.0, 0.1, 0.01])

        def forward(self, x, position_ids):
            angles = position_ids[..., None].float() * self.inv_freq
            cos = torch.cat((angles, angles.flip(-1)), -1).cos()
            return cos, cos

    with pytest.raises(ValueError, match="layout memorizing-hf does not know"):
        Rotary.of(Shuffled())
