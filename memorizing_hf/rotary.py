"""Rotary position helpers: move keys and queries of rotary models to other positions.

Rotary embeddings rotate each pair of dimensions by an angle proportional to the token's position. Rotations
compose, so a key rotated at position p can be moved to position q by rotating it by q - p. Memory attention uses
this to store keys without position and to put queries at a fixed distance from them; local caches use it to
shift cached keys when old tokens leave the window.
"""

from __future__ import annotations

import torch


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_by(x: torch.Tensor, offsets: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate `x` `[batch, heads, tokens, head_dim]` by `offsets` `[batch, tokens]` positions (rotate-half layout).

    Rotating by -p removes the rotation a token received at position p; rotating a query by (w - p) moves it to
    position w. Only the first `2 * len(inv_freq)` dims rotate (partial rotary, as in GPT-NeoX); the rest pass through.
    """
    rot_dim = 2 * inv_freq.shape[0]
    angles = offsets.to(torch.float32).unsqueeze(-1) * inv_freq.to(device=x.device, dtype=torch.float32)
    angles = torch.cat((angles, angles), dim=-1).unsqueeze(1)  # [batch, 1, tokens, rot_dim]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    rotated, rest = x[..., :rot_dim], x[..., rot_dim:]
    rotated = rotated * cos + _rotate_half(rotated) * sin
    return torch.cat((rotated, rest), dim=-1) if rest.shape[-1] else rotated
