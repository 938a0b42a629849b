"""Streaming perplexity: read a long document segment by segment, as the paper evaluates.

Every segment of `segment_length` tokens (but its first token) is scored given (a) nothing but itself, (b) itself
plus the kNN memory of all earlier segments, or (c) a longer window of recomputed earlier tokens (the strong
no-memory baseline). The first segment is read (so memory holds it) but not scored by default, so every variant
scores the same tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm


@dataclass
class PerplexityResult:
    """Summed negative log-likelihood and token count; `perplexity` = exp(nll / tokens)."""

    nll: float = 0.0
    tokens: int = 0
    segments: list[float] = field(default_factory=list)  # per scored segment perplexity

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / max(self.tokens, 1))

    def add(self, nll: float, tokens: int) -> None:
        self.nll += nll
        self.tokens += tokens
        self.segments.append(math.exp(nll / max(tokens, 1)))


def _segment_nll(model: nn.Module, ids: torch.Tensor, scored: int, **kwargs: object) -> tuple[float, int]:
    """Summed NLL of the last `scored` tokens of `ids` `[1, n]` (each predicted from everything before it in ids)."""
    logits = model(ids, **kwargs).logits[0, -scored - 1 : -1].float()
    targets = ids[0, -scored:]
    nll = nn.functional.cross_entropy(logits, targets, reduction="sum")
    return float(nll), int(targets.numel())


@torch.no_grad()
def streaming_perplexity(
    model: nn.Module,
    token_ids: torch.Tensor,
    segment_length: int = 512,
    mode: str = "memory",
    window: int | None = None,
    score_first_segment: bool = False,
    progress: bool | str = True,
) -> PerplexityResult:
    """Perplexity of one document `token_ids` `[n]` read in segments.

    Args:
        model: a `MemorizingForCausalLM` for `mode="memory"`; any causal LM otherwise.
        mode: `"memory"` (memory cleared at the start, every segment read then written), `"segment"` (each segment
            alone; on a memorizing model the memory is neither read nor written) or `"window"` (each segment scored
            with up to `window` tokens of context recomputed, e.g. 1024 = previous + current segment).
        score_first_segment: also score segment 0 (which has no earlier context in any mode).
    """
    if mode not in ("memory", "segment", "window"):
        raise ValueError(f"Unknown mode {mode!r}: choose 'memory', 'segment' or 'window'.")
    if mode == "window" and (window is None or window < segment_length):
        raise ValueError(f"mode='window' needs window >= segment_length ({segment_length}), got {window!r}.")
    ids = token_ids.reshape(-1).to(model.device)
    memorizing = hasattr(model, "reset_memory")
    if memorizing:
        model.reset_memory()
    starts = range(0, ids.numel() - 1, segment_length)
    result = PerplexityResult()
    description = progress if isinstance(progress, str) else f"perplexity ({mode})"
    for index, start in enumerate(tqdm(starts, desc=description, disable=not progress, unit="segment")):
        end = min(start + segment_length, ids.numel())
        kwargs: dict[str, object] = {}
        if memorizing:
            kwargs = {"memory_reset": torch.tensor([index == 0], device=model.device)} if mode == "memory" else {}
            kwargs["update_memory"] = mode == "memory"
        if mode == "window":
            context_start = max(0, end - window)
            segment = ids[context_start:end].unsqueeze(0)
        else:
            segment = ids[start:end].unsqueeze(0)
        scored = end - start - 1  # the segment's first token has no in-segment context: scored by no variant
        nll, count = _segment_nll(model, segment, scored, **kwargs)
        if (index > 0 or score_first_segment) and count > 0:
            result.add(nll, count)
    if memorizing:
        model.reset_memory()
    return result
