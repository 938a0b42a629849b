"""Streaming perplexity: read a long document segment by segment, as the paper evaluates.

Every segment of `segment_length` tokens (but its first token) is scored given (a) nothing but itself, (b) itself
plus the kNN memory of all earlier segments, or (c) a longer window of recomputed earlier tokens (the strong
no-memory baseline). The first segment is read (so memory holds it) but not scored by default, so every variant
scores the same tokens.

`Setting` names one row of the paper's Table 4 (local context / memory size / XL cache, or a recomputed window) and
`setting_perplexity` reads a document with it, using the same weights with another memory size or XL cache.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm


@dataclass
class PerplexityResult:
    """Summed negative log-likelihood and token count; `perplexity` = exp(nll / tokens)."""

    nll: float = 0.0
    tokens: int = 0
    segments: list[float] = field(default_factory=list)  # per scored segment perplexity
    correct: dict[int, bool] = field(default_factory=dict)  # scored position -> was its token the top prediction

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / max(self.tokens, 1))

    def add(self, nll: float, tokens: int) -> None:
        self.nll += nll
        self.tokens += tokens
        self.segments.append(math.exp(nll / max(tokens, 1)))


def _segment_nll(model: nn.Module, ids: torch.Tensor, scored: int, **kwargs: object) -> tuple[float, int, list[bool]]:
    """Summed NLL of the last `scored` tokens of `ids` `[1, n]` (each predicted from everything before it in ids),
    their count, and whether each was the model's top prediction."""
    logits = model(ids, logits_to_keep=scored + 1, **kwargs).logits[0, :-1].float()
    targets = ids[0, -scored:]
    nll = nn.functional.cross_entropy(logits, targets, reduction="sum")
    return float(nll), int(targets.numel()), (logits.argmax(-1) == targets).tolist()


@torch.no_grad()
def streaming_perplexity(
    model: nn.Module,
    token_ids: torch.Tensor,
    segment_length: int = 512,
    mode: str = "memory",
    window: int | None = None,
    score_first_segment: bool = False,
    progress: bool | str = True,
    memory: Any = None,
) -> PerplexityResult:
    """Perplexity of one document `token_ids` `[n]` read in segments.

    Args:
        model: a `MemorizingForCausalLM` for `mode="memory"`; any causal LM otherwise.
        mode: `"memory"` (every segment read then written to a memory cleared at the start), `"segment"` (each
            segment alone; on a memorizing model no memory is read or written) or `"window"` (each segment scored
            with up to `window` tokens of context recomputed, e.g. 1024 = previous + current segment).
        score_first_segment: also score segment 0 (which has no earlier context in any mode).
        memory: the memory to read the document into (`mode="memory"`); default: a fresh one, discarded at the end.
            Pass `model.memory` to keep what was read in the model.
    """
    if mode not in ("memory", "segment", "window"):
        raise ValueError(f"Unknown mode {mode!r}: choose 'memory', 'segment' or 'window'.")
    if mode == "window" and (window is None or window < segment_length):
        raise ValueError(f"mode='window' needs window >= segment_length ({segment_length}), got {window!r}.")
    ids = token_ids.reshape(-1).to(model.device)
    memorizing = hasattr(model, "new_memory")
    if memorizing:
        memory = (memory if memory is not None else model.new_memory()) if mode == "memory" else model.new_memory()
    starts = range(0, ids.numel() - 1, segment_length)
    result = PerplexityResult()
    description = progress if isinstance(progress, str) else f"perplexity ({mode})"
    for index, start in enumerate(tqdm(starts, desc=description, disable=not progress, unit="segment")):
        end = min(start + segment_length, ids.numel())
        kwargs: dict[str, object] = {}
        if memorizing:
            kwargs = {"memory": memory, "update_memory": mode == "memory"}
            if mode == "memory":
                kwargs["memory_reset"] = torch.tensor([index == 0], device=model.device)
        if mode == "window":
            context_start = max(0, end - window)
            segment = ids[context_start:end].unsqueeze(0)
        else:
            segment = ids[start:end].unsqueeze(0)
        scored = end - start - 1  # the segment's first token has no in-segment context: scored by no variant
        nll, count, correct = _segment_nll(model, segment, scored, **kwargs)
        if (index > 0 or score_first_segment) and count > 0:
            result.add(nll, count)
            result.correct.update(zip(range(start + 1, end), correct))
    return result


@dataclass(frozen=True)
class Setting:
    """One way of reading a document: a row of the paper's Table 4.

    Attributes:
        memory_size: kNN memory entries per layer (0: no memory; the model's memory layers read nothing).
        xl_cache: local attention also sees the previous segment (Transformer-XL cache).
        window: instead, score each segment with this many tokens of context recomputed (no memory, no XL).
    """

    memory_size: int = 0
    xl_cache: bool = False
    window: int | None = None

    def label(self, segment_length: int) -> str:
        """`local context / memory / XL` as in Table 4, e.g. "512 / 8192 / 512"; "1024 (window) / - / -"."""
        if self.window is not None:
            return f"{self.window} (window) / - / -"
        xl = str(segment_length) if self.xl_cache else "-"
        return f"{segment_length} / {self.memory_size or '-'} / {xl}"


def with_setting(model: nn.Module, setting: Setting) -> nn.Module:
    """`model` (a `MemorizingForCausalLM`) with the setting's memory size and XL cache, sharing its weights.

    Memory size 0 is a memory into which nothing is written (every token counts as a never-stored sink), so the
    memory layers attend locally only, to the XL cache too when it is on.
    """
    changes = {"memory_size": setting.memory_size or model.config.memory_size, "xl_cache": setting.xl_cache}
    if not setting.memory_size:
        changes["sink_tokens"] = model.config.text_config.max_position_embeddings
    if all(getattr(model.config, name) == value for name, value in changes.items()):
        return model
    config = copy.deepcopy(model.config)
    for name, value in changes.items():
        setattr(config, name, value)
    other = type(model)(config, language_model=model.language_model)
    other.knn_attention.load_state_dict(model.knn_attention.state_dict())
    return other.to(model.device).train(model.training)


def setting_perplexity(
    model: nn.Module, token_ids: torch.Tensor, setting: Setting, segment_length: int = 512, progress: bool | str = True
) -> PerplexityResult:
    """Perplexity of one document read with `setting` (see `Setting`); `model` is a `MemorizingForCausalLM`, or
    any causal LM for settings without memory and XL cache."""
    if setting.window is not None:
        return streaming_perplexity(model, token_ids, segment_length, "window", setting.window, progress=progress)
    if not setting.memory_size and not setting.xl_cache:
        return streaming_perplexity(model, token_ids, segment_length, "segment", progress=progress)
    return streaming_perplexity(with_setting(model, setting), token_ids, segment_length, "memory", progress=progress)
