"""Local attention caches of a memorizing model: the XL cache (training, segment by segment) and the streaming cache
(long inputs and generation).

`XLCache` is the Transformer-XL cache of the paper's best configurations: while a document is read segment by
segment, every layer's local attention also sees the keys and values of the previous segment (detached, so no
gradient flows into the past). It is kept per batch row, cleared with the row's memory when a new document starts,
and saved in memory files with the kNN memory.

The cache is applied inside the registered attention function (it prepends the previous segment to every layer's
keys and values) rather than through transformers' cache argument, so it is idempotent: a recomputation under
gradient checkpointing sees the same previous segment and records the same new one.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import DynamicCache

from .rotary import Rotary


class XLCache:
    """Previous-segment keys/values per layer, `[rows, kv_heads, tokens, head_dim]`, and which of them are real."""

    def __init__(self, sink_tokens: int = 0) -> None:
        self.sink_tokens = sink_tokens  # first tokens of a segment that do not see the cache (they stay sinks)
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.valid: torch.Tensor | None = None  # [rows, tokens] bool: real tokens of the row's current document

    @property
    def length(self) -> int:
        """Tokens held per row (0 when empty)."""
        return 0 if self.valid is None else self.valid.shape[1]

    def is_empty(self) -> bool:
        return self.valid is None or not bool(self.valid.any())

    def check_batch_size(self, batch_size: int, reset: torch.Tensor | None = None) -> None:
        """Raise if the cache holds another number of rows, unless every row starts a new document."""
        if self.valid is None or self.valid.shape[0] == batch_size or self.is_empty():
            return
        if reset is not None and bool(reset.all()):
            self.clear()
            return
        raise ValueError(
            f"The XL cache holds the previous segment of {self.valid.shape[0]} batch rows but this batch has "
            f"{batch_size} rows: keep the batch size while reading documents, or call model.reset_memory() first."
        )

    def snapshot(self) -> XLCache:
        """A copy sharing the tensors: what one forward call reads, even when recomputed (gradient checkpointing)
        after `advance` has moved the cache on."""
        copy = XLCache(self.sink_tokens)
        copy.keys, copy.values, copy.valid = dict(self.keys), dict(self.values), self.valid
        return copy

    def clear(self) -> None:
        self.keys, self.values, self.valid = {}, {}, None

    def reset(self, rows: torch.Tensor | None = None) -> None:
        """Forget the previous segment of all rows, or of the rows given as indices or a boolean mask."""
        if self.valid is None:
            return
        if rows is not None:
            self.valid = self.valid.clone()  # snapshots taken by earlier calls keep what they read
            self.valid[rows.to(self.valid.device)] = False
        if rows is None or not bool(self.valid.any()):
            self.clear()  # nothing left: the next segment starts at position 0, as in a fresh model

    def extend(
        self, layer: int, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Put the previous segment in front of this layer's keys/values, and widen the mask to match.

        `mask` is the local mask transformers built for the current segment (bool or additive `[B, 1, T, T]`, or None
        for plain causal); the result is a bool mask `[B, 1, T, S + T]` (True = attend). The segment's first
        `sink_tokens` do not see the previous segment.
        """
        batch, _, tokens, _ = key.shape
        previous = self.valid.to(key.device).view(batch, 1, 1, -1).expand(batch, 1, tokens, -1)
        if self.sink_tokens:
            sees = torch.arange(tokens, device=key.device) >= self.sink_tokens
            previous = previous & sees.view(1, 1, tokens, 1)
        if mask is None:
            current = torch.ones(tokens, tokens, dtype=torch.bool, device=key.device).tril().expand(batch, 1, -1, -1)
        elif mask.dtype == torch.bool:
            current = mask[..., -tokens:].expand(batch, 1, tokens, tokens)
        else:
            current = (mask[..., -tokens:] == 0).expand(batch, 1, tokens, tokens)
        key = torch.cat((self.keys[layer].to(key.dtype), key), dim=2)
        value = torch.cat((self.values[layer].to(value.dtype), value), dim=2)
        return key, value, torch.cat((previous, current), dim=-1)

    @torch.no_grad()
    def advance(
        self,
        new: Mapping[int, tuple[torch.Tensor, torch.Tensor]],
        real: torch.Tensor,
        start: int,
        rotary: Rotary | None,
    ) -> None:
        """Keep the segment just read (`new`: layer -> its keys/values, rotated at positions `start`, `start + 1`, ...)
        as the previous segment, moved to positions 0, 1, ... for the next call."""
        for layer, (key, value) in new.items():
            if rotary is not None and start:
                key = rotary.rotate(key, torch.full(real.shape, -start, device=key.device))
            self.keys[layer], self.values[layer] = key.detach(), value.detach()
        self.valid = real.clone()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors that describe the cache exactly."""
        if self.valid is None:
            return {}
        tensors = {"valid": self.valid}
        for layer in self.keys:
            tensors[f"keys.{layer}"], tensors[f"values.{layer}"] = self.keys[layer], self.values[layer]
        return tensors

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Replace the cache by `tensors` (as produced by `state_tensors`)."""
        self.clear()
        if not tensors:
            return
        self.valid = tensors["valid"].bool()
        for name, tensor in tensors.items():
            kind, _, layer = name.partition(".")
            if kind == "keys":
                self.keys[int(layer)] = tensor
            elif kind == "values":
                self.values[int(layer)] = tensor


class MemorizingCache(DynamicCache):
    """Bounded local cache for streaming long inputs and generation: a few attention-sink tokens that never leave,
    then a sliding window of recent tokens. Tokens leaving the window are handed back by `evict`, and the model
    writes them to its kNN memory, so the cost per token stays bounded while everything read stays retrievable.

    Besides the keys/values (kept by `DynamicCache`), it tracks per column: whether it is a real token (not padding),
    whether it may be stored (not BOS), its position in the document, and the rotary position its key was rotated
    at. When tokens leave, the keys behind them are rotated back so that positions stay within the window (as in
    StreamingLLM); models without rotary embeddings keep absolute positions instead.
    """

    def __init__(self, window: int, sink_tokens: int, evict_every: int = 64, beams: int = 1) -> None:
        super().__init__()
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}.")
        self.window, self.sink_tokens, self.evict_every, self.beams = window, sink_tokens, evict_every, beams
        self.sink_columns: int | None = None  # fixed by the first call: leading padding + sink tokens
        self.real: torch.Tensor | None = None  # [B, S] bool
        self.storable: torch.Tensor | None = None  # [B, S] bool
        self.doc_positions: torch.Tensor | None = None  # [B, S] long
        self.positions: torch.Tensor | None = None  # [B, S] long, rotary position of each cached key
        self.offset: torch.Tensor | None = None  # [B] long, positions skipped by evictions (models without rotary)

    @property
    def columns(self) -> int:
        return 0 if self.real is None else self.real.shape[1]

    def start(self, real: torch.Tensor) -> None:
        """Fix the sink columns from the first input's padding: every row keeps its padding plus `sink_tokens` real
        tokens in front of the window (left-padded rows of a batch differ in where their first token is)."""
        leading_padding = (real.long().cumsum(dim=1) == 0).sum(dim=1)
        self.sink_columns = int(leading_padding.max()) + self.sink_tokens
        self.offset = torch.zeros(real.shape[0], dtype=torch.long, device=real.device)

    def next_positions(self, real: torch.Tensor) -> torch.Tensor:
        """Rotary positions `[B, T]` for new tokens: real tokens continue each row's count; padding repeats it."""
        cached = self.real.sum(dim=1) if self.real is not None else torch.zeros_like(self.offset)
        return ((cached + self.offset).unsqueeze(1) + real.long().cumsum(dim=1) - 1).clamp(min=0)

    def attention_mask(self, real: torch.Tensor) -> torch.Tensor:
        """Bool mask `[B, 1, T, S + T]` for new tokens: real cached tokens, and new tokens causally. A token always
        sees itself, so padding queries never have an empty softmax."""
        batch, tokens = real.shape
        causal = torch.ones(tokens, tokens, dtype=torch.bool, device=real.device).tril()
        new = causal & real.unsqueeze(1) | torch.eye(tokens, dtype=torch.bool, device=real.device)
        old = (self.real if self.real is not None else real[:, :0]).unsqueeze(1).expand(batch, tokens, -1)
        return torch.cat((old, new), dim=-1).unsqueeze(1)

    def append(self, real: torch.Tensor, storable: torch.Tensor, doc_positions: torch.Tensor, positions: torch.Tensor):
        """Record the columns of the tokens just added to the keys/values."""
        if self.real is None:
            self.real, self.storable, self.doc_positions, self.positions = real, storable, doc_positions, positions
            return
        self.real = torch.cat((self.real, real), dim=1)
        self.storable = torch.cat((self.storable, storable), dim=1)
        self.doc_positions = torch.cat((self.doc_positions, doc_positions), dim=1)
        self.positions = torch.cat((self.positions, positions), dim=1)

    def overflow(self, force: bool = False) -> int:
        """Columns to evict now: everything beyond sinks + window, once that is at least `evict_every` (any amount
        if `force`)."""
        excess = self.columns - (self.sink_columns or 0) - self.window
        return max(excess, 0) if force or excess >= self.evict_every else 0

    @torch.no_grad()
    def evict(self, count: int, rotary: Rotary | None) -> dict[str, object]:
        """Remove `count` columns after the sinks. Returns their keys/values per layer and their column data; the
        keys behind them are rotated back by the number of real tokens removed in their row."""
        start, end = self.sink_columns, self.sink_columns + count
        removed = {
            "layers": {
                i: (layer.keys[:, :, start:end], layer.values[:, :, start:end]) for i, layer in enumerate(self.layers)
            },
            "real": self.real[:, start:end],
            "storable": self.storable[:, start:end],
            "doc_positions": self.doc_positions[:, start:end],
            "positions": self.positions[:, start:end],
        }
        shift = removed["real"].sum(dim=1)
        for layer in self.layers:
            kept = layer.keys[:, :, end:]
            if rotary is not None and kept.shape[2]:
                kept = rotary.rotate(kept, -shift.unsqueeze(1).expand(-1, kept.shape[2]))
            layer.keys = torch.cat((layer.keys[:, :, :start], kept), dim=2)
            layer.values = torch.cat((layer.values[:, :, :start], layer.values[:, :, end:]), dim=2)
        kept_positions = self.positions[:, end:] - (shift.unsqueeze(1) if rotary is not None else 0)
        self.positions = torch.cat((self.positions[:, :start], kept_positions), dim=1)
        if rotary is None:
            self.offset = self.offset + shift
        for name in ("real", "storable", "doc_positions"):
            tensor = getattr(self, name)
            setattr(self, name, torch.cat((tensor[:, :start], tensor[:, end:]), dim=1))
        return removed

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: rows follow their beams (keys/values and column data alike)."""
        super().reorder_cache(beam_idx)
        for name in ("real", "storable", "doc_positions", "positions", "offset"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.index_select(0, beam_idx.to(tensor.device)))
