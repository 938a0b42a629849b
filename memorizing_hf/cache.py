"""Local attention caches of a memorizing model: the XL cache (training, segment by segment) and the streaming cache
(long inputs and generation).

`XLCache` is the Transformer-XL cache of the paper's best configurations: while a document is read segment by
segment, every layer's local attention also sees the keys and values of the previous segment (detached, so no
gradient flows into the past). It is per batch row and part of the memory (`MemoryBank.xl`): cleared with the row's
memory when a new document starts, and saved in memory files with the kNN memory.

The cache is applied inside the registered attention function (it prepends the previous segment to every layer's
keys and values) rather than through transformers' cache argument, so it is idempotent: a recomputation under
gradient checkpointing sees the same previous segment and records the same new one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

from ._compat import tokens_to_crop
from .rotary import Rotary

if TYPE_CHECKING:
    from .memory import MemoryBank


def finite_tokens(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`[rows, tokens]` bool: the tokens whose keys and values `[rows, heads, tokens, head_dim]` are finite in every
    head (one NaN key or value, once attended to or retrieved, spreads NaN through a zero weight)."""
    return torch.isfinite(keys).all(dim=(1, 3)) & torch.isfinite(values).all(dim=(1, 3))


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
        as the previous segment, moved to positions 0, 1, ... for the next call.

        A token whose key or value is not finite in any layer is kept as an invalid, zeroed column: masked out, and
        unable to spread NaN through a zero attention weight (0 * NaN) into the next segment.
        """
        valid = real.clone()
        for key, value in new.values():
            valid &= finite_tokens(key, value)
        for layer, (key, value) in new.items():
            if rotary is not None and start:
                key = rotary.rotate(key, torch.full(real.shape, -start, device=key.device))
            keep = valid.to(key.device)[:, None, :, None]
            self.keys[layer] = torch.where(keep, key.detach(), 0.0)
            self.values[layer] = torch.where(keep, value.detach(), 0.0)
        self.valid = valid

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
    """Bounded local cache for streaming long inputs and generation, and the memory of what left it.

    Local attention sees a few attention-sink tokens that never leave, then a sliding window of recent tokens. Tokens
    leaving the window are written to the cache's own `overflow` memory (one row per batch row), which the memory
    layers read beside the model's memory: the cost per token stays bounded while everything the call read stays
    retrievable. The cache also names the memory it reads (`memory`, the model's by default), so that every call
    continuing it reads the same one. What the overflow holds reaches that memory only when the caller commits it
    (`generate(..., update_memory=True)`, `memorize`). When tokens leave, the keys behind them are rotated back so that
    positions stay within the window (as in StreamingLLM); models without rotary embeddings keep absolute positions.

    Besides the keys/values (kept by `DynamicCache`), `columns` tracks per cached column: whether it is a real token
    (not padding), whether it may be stored (not BOS), its position in what this cache read, and the rotary position
    its key was rotated at. Every operation on columns (append, evict, crop, reorder) goes through `_edit_columns`, so
    they stay in step with the keys and values.
    """

    def __init__(
        self,
        window: int,
        sink_tokens: int,
        overflow: MemoryBank,
        memory: MemoryBank | None = None,
        per_prompt: int = 1,
        evict_every: int = 64,
    ) -> None:
        super().__init__()
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an integer >= 1, got {window!r}.")
        self.window, self.sink_tokens, self.evict_every = window, sink_tokens, evict_every
        self.overflow = overflow
        self.memory = memory  # the memory this cache reads besides its overflow (None: the model's)
        self.per_prompt = per_prompt  # sequences per prompt (beams, num_return_sequences): they share its memory row
        self.sink_columns: int | None = None  # fixed by the first call: leading padding + sink tokens
        self.columns: dict[str, torch.Tensor] = {}  # real, storable, doc_positions, positions: [B, S] each
        self.offset: torch.Tensor | None = None  # [B] long, positions skipped by evictions (models without rotary)
        self.read = 0  # columns read so far, evicted ones included: the sequence length generate() sees

    @property
    def num_columns(self) -> int:
        return self.columns["real"].shape[1] if self.columns else 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens this cache has read (what `generate` slices a resent prompt by); the window holds the last ones."""
        return self.read

    def start(self, real: torch.Tensor) -> None:
        """Fix the sink columns from the first input's padding: every row keeps its padding plus `sink_tokens` real
        tokens in front of the window (left-padded rows of a batch differ in where their first token is)."""
        leading_padding = (real.long().cumsum(dim=1) == 0).sum(dim=1)
        self.sink_columns = int(leading_padding.max()) + self.sink_tokens
        self.offset = torch.zeros(real.shape[0], dtype=torch.long, device=real.device)

    def next_positions(self, real: torch.Tensor) -> torch.Tensor:
        """Rotary positions `[B, T]` for new tokens: real tokens continue each row's count; padding repeats it."""
        cached = self.columns["real"].sum(dim=1) if self.columns else torch.zeros_like(self.offset)
        return ((cached + self.offset).unsqueeze(1) + real.long().cumsum(dim=1) - 1).clamp(min=0)

    def attention_mask(self, real: torch.Tensor) -> torch.Tensor:
        """Bool mask `[B, 1, T, S + T]` for new tokens: real cached tokens, and new tokens causally. A token always
        sees itself, so padding queries never have an empty softmax."""
        batch, tokens = real.shape
        causal = torch.ones(tokens, tokens, dtype=torch.bool, device=real.device).tril()
        new = causal & real.unsqueeze(1) | torch.eye(tokens, dtype=torch.bool, device=real.device)
        old = (self.columns["real"] if self.columns else real[:, :0]).unsqueeze(1).expand(batch, tokens, -1)
        return torch.cat((old, new), dim=-1).unsqueeze(1)

    def append(self, **columns: torch.Tensor) -> None:
        """Record the columns (real, storable, doc_positions, positions `[B, T]`) of the tokens just added to the
        keys/values."""
        self.read += columns["real"].shape[1]
        if not self.columns:
            self.columns = dict(columns)
            return
        self.columns = {name: torch.cat((self.columns[name], columns[name]), dim=1) for name in self.columns}

    def _edit_columns(self, edit: Callable[[torch.Tensor, int], torch.Tensor]) -> None:
        """Apply `edit(tensor, column_dim)` to every cached key/value tensor (dim 2) and column tensor (dim 1)."""
        for layer in self.layers:
            if layer.keys is not None and layer.keys.numel():
                layer.keys, layer.values = edit(layer.keys, 2), edit(layer.values, 2)
        self.columns = {name: edit(tensor, 1) for name, tensor in self.columns.items()}

    def excess(self, force: bool = False) -> int:
        """Columns to evict now: everything beyond sinks + window, once that is at least `evict_every` (any amount
        if `force`)."""
        excess = self.num_columns - (self.sink_columns or 0) - self.window
        return max(excess, 0) if force or excess >= self.evict_every else 0

    @torch.no_grad()
    def evict(self, count: int, rotary: Rotary | None, write: bool = True) -> None:
        """Remove `count` columns after the sinks, writing their storable tokens to `overflow` (if `write`); the keys
        behind them are rotated back by the number of real tokens removed in their row."""
        if count <= 0:
            return
        start, end = self.sink_columns, self.sink_columns + count
        removed = {name: tensor[:, start:end] for name, tensor in self.columns.items()}
        if write:
            store = removed["storable"] & removed["real"]
            for index, layer in enumerate(self.layers):
                if index in self.overflow.layers:
                    keys, values = layer.keys[:, :, start:end], layer.values[:, :, start:end]
                    positions, documents = removed["positions"], removed["doc_positions"]
                    self.overflow.write(index, keys, values, positions, rotary, store, documents)
        self._edit_columns(lambda tensor, dim: _without(tensor, dim, start, end))
        shift = removed["real"].sum(dim=1)
        if rotary is None:
            self.offset = self.offset + shift
            return
        for layer in self.layers:  # the keys behind the removed ones move back by `shift` positions
            tail = layer.keys[:, :, start:]
            layer.keys = torch.cat(
                (layer.keys[:, :, :start], rotary.rotate(tail, -shift.unsqueeze(1).expand(-1, tail.shape[2]))), dim=2
            )
        positions = self.columns["positions"]
        self.columns["positions"] = torch.cat((positions[:, :start], positions[:, start:] - shift.unsqueeze(1)), dim=1)

    def crop(self, tokens: int) -> None:
        """Forget the last tokens read (assisted decoding rejecting drafted tokens): `crop(-n)` removes n tokens
        (transformers 5.16+); a positive value is the length to keep (older releases). The tokens must still be in
        the local window, never evicted: drafts are shorter than the window."""
        count = tokens_to_crop(tokens, self.read)
        if count <= 0:
            return
        if count > self.num_columns - (self.sink_columns or 0):
            raise ValueError(f"Cannot crop {count} tokens: only the {self.window}-token window can be taken back.")
        dropped = self.columns["real"][:, -count:].sum(dim=1)
        self._edit_columns(lambda tensor, dim: tensor.narrow(dim, 0, tensor.shape[dim] - count))
        self.read -= count
        if self.overflow.tokens_seen is not None:
            self.overflow.tokens_seen = self.overflow.tokens_seen - dropped.to(self.overflow.tokens_seen.device)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: rows follow their beams (keys/values, columns and the overflow memory alike)."""
        self._select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select_rows(
            torch.arange(self.offset.shape[0] if self.offset is not None else 0).repeat_interleave(repeats)
        )

    def _select_rows(self, index: torch.Tensor) -> None:
        for layer in self.layers:
            if layer.keys is not None and layer.keys.numel():
                rows = index.to(layer.keys.device)
                layer.keys, layer.values = layer.keys.index_select(0, rows), layer.values.index_select(0, rows)
        self.columns = {name: tensor.index_select(0, index.to(tensor.device)) for name, tensor in self.columns.items()}
        if self.offset is not None:
            self.offset = self.offset.index_select(0, index.to(self.offset.device))
        self.overflow.select_rows(index)


def _without(tensor: torch.Tensor, dim: int, start: int, end: int) -> torch.Tensor:
    """`tensor` without the indices `[start, end)` of dimension `dim`."""
    return torch.cat((tensor.narrow(dim, 0, start), tensor.narrow(dim, end, tensor.shape[dim] - end)), dim)
