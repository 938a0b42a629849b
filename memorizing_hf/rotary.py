"""Rotary position helpers: move keys and queries of rotary models to other positions.

Rotary embeddings rotate each pair of dimensions by an angle proportional to the token's position. Rotations
compose, so a key rotated at position p can be moved to position q by rotating it by q - p. Memory attention uses
this to store keys without position and to put queries at a fixed distance from them; local caches use it to
shift cached keys when old tokens leave the window.

Models pair dimensions in one of two layouts: the two halves of the head dimension (Llama, Qwen2, GPT-NeoX, ...)
or interleaved neighbours (x0, x1), (x2, x3), ... (Cohere, GPT-J, ...). `Rotary.of` reads which one a model uses
from its own rotary embedding, so no table of model types is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate_interleaved(x: torch.Tensor) -> torch.Tensor:
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def rotate_by(
    x: torch.Tensor, offsets: torch.Tensor, inv_freq: torch.Tensor, interleaved: bool = False
) -> torch.Tensor:
    """Rotate `x` `[batch, heads, tokens, head_dim]` by `offsets` `[batch, tokens]` positions.

    Rotating by -p removes the rotation a token received at position p; rotating a query by (w - p) moves it to
    position w. Only the first `2 * len(inv_freq)` dims rotate (partial rotary, as in GPT-NeoX); the rest pass through.
    """
    rot_dim = 2 * inv_freq.shape[0]
    angles = offsets.to(torch.float32).unsqueeze(-1) * inv_freq.to(device=x.device, dtype=torch.float32)
    if interleaved:
        angles = angles.repeat_interleave(2, dim=-1).unsqueeze(1)  # [batch, 1, tokens, rot_dim]
    else:
        angles = torch.cat((angles, angles), dim=-1).unsqueeze(1)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    rotated, rest = x[..., :rot_dim], x[..., rot_dim:]
    rotated = rotated * cos + (_rotate_interleaved(rotated) if interleaved else _rotate_half(rotated)) * sin
    return torch.cat((rotated, rest), dim=-1) if rest.shape[-1] else rotated


@dataclass(frozen=True, eq=False)
class Rotary:
    """A model's rotary embedding as memory attention needs it: inverse frequencies and the pairing layout."""

    inv_freq: torch.Tensor
    interleaved: bool = False

    def rotate(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """`rotate_by` with this model's frequencies and layout."""
        return rotate_by(x, offsets, self.inv_freq, self.interleaved)

    @classmethod
    def of(cls, embedding: nn.Module) -> Rotary:
        """Read the layout from the cos table `embedding` (a transformers `*RotaryEmbedding`) gives position 1:
        the half layout repeats it as [f, f], the interleaved one as [f0, f0, f1, f1, ...]."""
        inv_freq = embedding.inv_freq
        probe = torch.zeros(1, 1, 1, dtype=torch.float32, device=inv_freq.device)
        cos = embedding(probe, torch.ones(1, 1, dtype=torch.long, device=inv_freq.device))[0].flatten()
        half = inv_freq.shape[0]
        if cos.numel() != 2 * half:
            raise ValueError(
                f"{type(embedding).__name__} gives {cos.numel()} rotary dims for {half} frequencies; memory placement "
                "needs two dims per frequency. Use rotary_placement='absolute'."
            )
        if half == 1 or torch.allclose(cos[:half], cos[half:]):
            return cls(inv_freq, interleaved=False)
        if torch.allclose(cos[0::2], cos[1::2]):
            return cls(inv_freq, interleaved=True)
        raise ValueError(
            f"{type(embedding).__name__} pairs rotary dims in a layout memorizing-hf does not know (neither halves nor "
            "interleaved pairs). Use rotary_placement='absolute'."
        )
