"""The kNN memory of a memorizing model: the state that lets it keep what it read.

`MemoryBank` is the memory as users hold it: every memory layer's entries for every batch row (one document stream
per row), each row's count of tokens read, and the Transformer-XL cache of each row's previous segment. A model has
one (`model.memory`) and makes more with `model.new_memory()`; every entry point (`forward`, `generate`, `memorize`,
evaluation, the Trainer) takes `memory=` to say which one it reads and writes. Memories are copied only on purpose
(`copy()`), saved to and loaded from files (`save` / `load`, format version 1), and checkpointed with
`state_dict` / `load_state_dict` (e.g. `accelerator.register_for_checkpointing(model.memory)`).

`KNNMemory` is one layer's FIFO ring buffer of (key, value) pairs per row and key/value head. Its `write` is the only
code that stores entries; `MemoryBank.write` places keys for retrieval (removes their rotary position, normalises them
in gate mode) and calls it. Stored tensors are detached constants, outside the autograd graph. Once a row holds
`capacity` entries, new entries overwrite the oldest ones in ring order, so storage slots, positions and the retrieval
backend's ids always describe the same entry (there is never a full reset on overflow).

This file is also shipped as Hugging Face remote code: it imports only torch, safetensors and the standard library.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from .cache import XLCache, finite_tokens
from .rotary import Rotary

MEMORY_FILE_FORMAT = "memorizing-hf-memory"
MEMORY_FILE_VERSION = "1"
_MIN_ALLOCATION = 1024  # slots allocated at the first write; storage then doubles up to the capacity
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_MAX_COUNT = 2**62  # entries written / tokens read per row: far beyond any document, and no int64 overflow after it
_XL_TENSOR = re.compile(r"^extra\.(keys|values)\.(0|[1-9][0-9]*)$")  # the XL cache of one layer of the model


class RetrievalBackend(Protocol):
    """What a retrieval backend implements (see `retrieval.ExactBackend` and `retrieval_faiss.FaissBackend`)."""

    def add(self, rows: torch.Tensor, slots: torch.Tensor, keys: torch.Tensor) -> None: ...

    def reset(self, rows: torch.Tensor) -> None: ...

    def search(
        self, queries: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class KNNMemory:
    """Ring-buffer memory of one attention layer.

    Storage: `keys`/`values` `[rows, heads, slots, head_dim]`, `positions` `[rows, slots]` (each entry's token position
    in its document) and `written` `[rows]` (entries written since the row's last reset). Valid entries of row r are
    the slots `[0, min(written[r], capacity))`; the next write goes to slot `written[r] % capacity`.
    """

    def __init__(
        self,
        capacity: int,
        num_heads: int,
        head_dim: int,
        backend: RetrievalBackend,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.capacity = capacity
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.backend = backend
        self.dtype = dtype
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.written: torch.Tensor | None = None

    # ------------------------------------------------------------------ state
    @property
    def num_rows(self) -> int:
        """Batch rows the memory is laid out for (0 before the first write)."""
        return 0 if self.written is None else self.written.shape[0]

    @property
    def lengths(self) -> torch.Tensor:
        """Valid entries per row, `[rows]`."""
        if self.written is None:
            return torch.zeros(0, dtype=torch.long)
        return self.written.clamp(max=self.capacity)

    def is_empty(self) -> bool:
        return self.written is None or not bool(self.written.any())

    def reset(self, rows: torch.Tensor | None = None) -> None:
        """Clear all rows (`rows=None`) or the rows of the index tensor `rows`."""
        if self.written is None:
            return
        if rows is None:
            rows = torch.arange(self.num_rows, device=self.written.device)
        rows = rows.to(self.written.device)
        if rows.numel() == 0:
            return
        self.written[rows] = 0
        self.backend.reset(rows)

    def _allocate(self, batch_size: int, needed: int, like: torch.Tensor) -> None:
        """Lay the storage out for `batch_size` rows with room for `needed` slots (grows by doubling)."""
        dtype = self.dtype or like.dtype
        if self.written is None or self.num_rows != batch_size:
            slots = min(self.capacity, max(_MIN_ALLOCATION, needed))
            shape = (batch_size, self.num_heads, slots, self.head_dim)
            self.keys = torch.zeros(shape, dtype=dtype, device=like.device)
            self.values = torch.zeros(shape, dtype=dtype, device=like.device)
            self.positions = torch.full((batch_size, slots), -1, dtype=torch.long, device=like.device)
            self.written = torch.zeros(batch_size, dtype=torch.long, device=like.device)
            return
        allocated = self.keys.shape[2]
        if needed <= allocated:
            return
        slots = max(allocated, 1)  # a memory loaded with no slots grows too (doubling 0 never would)
        while slots < needed:
            slots *= 2
        slots = min(self.capacity, slots)
        grow = slots - allocated
        pad = self.keys.new_zeros(batch_size, self.num_heads, grow, self.head_dim)
        self.keys = torch.cat([self.keys, pad], dim=2)
        self.values = torch.cat([self.values, pad], dim=2)
        self.positions = torch.cat([self.positions, self.positions.new_full((batch_size, grow), -1)], dim=1)

    # ------------------------------------------------------------------ write / read
    @torch.no_grad()
    def write(self, keys: torch.Tensor, values: torch.Tensor, store: torch.Tensor, positions: torch.Tensor) -> None:
        """Append entries in token order: the one place where entries are stored.

        Args:
            keys, values: `[rows, heads, tokens, head_dim]` (detached here).
            store: `[rows, tokens]` bool, which tokens to write. Tokens whose key or value is not finite are never
                written: one NaN entry would be retrieved by every query of its row.
            positions: `[rows, tokens]` token positions in the document, kept with each entry.
        """
        batch_size = keys.shape[0]
        if self.num_rows not in (0, batch_size) and not self.is_empty():
            raise ValueError(f"This memory holds {self.num_rows} rows; a write of {batch_size} rows cannot go to it.")
        store = store.to(keys.device) & finite_tokens(keys, values)
        counts = store.sum(dim=1)
        if self.written is None or self.num_rows != batch_size:
            self._allocate(batch_size, int(counts.max()), keys)
        self.written = self.written.to(keys.device)
        needed = int((self.written + counts).max().clamp(max=self.capacity))
        self._allocate(batch_size, needed, keys)
        rank = store.cumsum(dim=1) - 1
        # A write larger than the capacity keeps only its last `capacity` entries.
        keep = store & (rank >= (counts - self.capacity).unsqueeze(1))
        rows, tokens = keep.nonzero(as_tuple=True)
        slots = (self.written[rows] + rank[rows, tokens]) % self.capacity
        new_keys = keys[rows, :, tokens].to(self.keys.dtype)
        self.keys[rows, :, slots] = new_keys
        self.values[rows, :, slots] = values[rows, :, tokens].to(self.values.dtype)
        self.positions[rows, slots] = positions.to(keys.device, torch.long)[rows, tokens]
        self.written += counts
        self.backend.add(rows, slots, new_keys)

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and slots of the top-k entries for each query, `[rows, heads, M, k]`; slot -1 (score -inf) where a
        row has fewer than k."""
        self._follow(queries.device)
        return self.backend.search(queries.detach(), self.keys, self.lengths, k)

    def gather(
        self, slots: torch.Tensor, with_keys: bool = True, scratch: dict[tuple, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Keys (None unless `with_keys`) and values `[rows, heads, M, k, head_dim]` at `slots` (missing slots, -1,
        give slot 0). With `scratch`, the values go to a buffer kept there (per dtype and device, grown as needed)
        and overwritten by the next gather that uses it: fresh allocations of tens of MB cost a page fault per 4 KB
        on CPU, more than the gather itself (docs/performance.md, "Reading: page faults")."""
        rows, heads, allocated, dim = self.keys.shape
        base = torch.arange(rows * heads, device=slots.device).view(rows, heads, 1, 1) * allocated
        flat = (base + slots.clamp(min=0)).flatten()
        keys = self.keys.view(-1, dim).index_select(0, flat).view(*slots.shape, dim) if with_keys else None
        out = None
        if scratch is not None:
            place = (self.values.dtype, self.values.device)
            if place not in scratch or scratch[place].numel() < flat.numel() * dim:
                scratch[place] = self.values.new_empty(flat.numel() * dim)
            out = scratch[place][: flat.numel() * dim].view(-1, dim)
        values = torch.index_select(self.values.view(-1, dim), 0, flat, out=out).view(*slots.shape, dim)
        return keys, values

    def in_order(self, row: int) -> torch.Tensor:
        """The slots of a row's valid entries from oldest to newest."""
        written, length = int(self.written[row]), int(self.lengths[row])
        start = written % self.capacity if written > self.capacity else 0
        return (torch.arange(length, device=self.written.device) + start) % self.capacity

    def _follow(self, device: torch.device) -> None:
        """Move the storage to `device` if the model moved."""
        if self.keys is not None and self.keys.device != device:
            self.keys, self.values = self.keys.to(device), self.values.to(device)
            self.positions, self.written = self.positions.to(device), self.written.to(device)

    # ------------------------------------------------------------------ (de)serialisation
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors that describe the memory exactly (only the allocated slots)."""
        if self.written is None:
            return {}
        return {"keys": self.keys, "values": self.values, "positions": self.positions, "written": self.written}

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Replace the memory's content by `tensors` (as produced by `state_tensors`, already checked), and rebuild
        the backend."""
        old_rows = self.num_rows
        if not tensors:
            if old_rows:
                self.backend.reset(torch.arange(old_rows, device=self.written.device))
            self.keys = self.values = self.positions = self.written = None
            return
        self.keys, self.values = tensors["keys"], tensors["values"]
        self.positions, self.written = tensors["positions"], tensors["written"]
        device = self.keys.device
        self.backend.reset(torch.arange(max(old_rows, self.num_rows), device=device))
        lengths = self.lengths
        slots = torch.arange(self.keys.shape[2], device=device)
        rows, slots = (slots.unsqueeze(0) < lengths.unsqueeze(1)).nonzero(as_tuple=True)
        if rows.numel():
            self.backend.add(rows, slots, self.keys[rows, :, slots])

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep the rows `index` `[n]` (in that order, repeats allowed): beam search reordering its beams."""
        if self.written is None:
            return
        index = index.to(self.written.device)
        self.load_state_tensors({name: tensor.index_select(0, index) for name, tensor in self.state_tensors().items()})


@dataclass(frozen=True)
class MemoryGeometry:
    """What a memory must match to be read by a model; written into memory files."""

    layers: tuple[int, ...]
    num_kv_heads: int
    head_dim: int
    memory_size: int
    combine: str
    rotary_placement: str
    base_model_type: str | None = None

    def as_metadata(self) -> dict[str, Any]:
        return {**asdict(self), "layers": list(self.layers)}


class MemoryBank:
    """The memory of a model: every memory layer's entries for every batch row, each row's tokens read, and the XL
    cache of each row's previous segment (see the module docstring).

    Rows are laid out by the first call that writes; resetting every row (`reset()`) lets a batch of any size follow.
    """

    def __init__(
        self,
        geometry: MemoryGeometry,
        backend_factory: Callable[[], RetrievalBackend],
        dtype: torch.dtype | None = None,
        xl_sink_tokens: int = 1,
        xl_layers: int | None = None,
    ) -> None:
        self.geometry = geometry
        self.backend_factory = backend_factory
        self.dtype = dtype
        # Layers of the model whose XL cache a memory file may hold (every decoder layer: 0 .. xl_layers - 1).
        self.xl_layers = xl_layers
        self.layers = {
            layer: KNNMemory(geometry.memory_size, geometry.num_kv_heads, geometry.head_dim, backend_factory(), dtype)
            for layer in geometry.layers
        }
        self.tokens_seen: torch.Tensor | None = None
        self.xl = XLCache(xl_sink_tokens)

    # ------------------------------------------------------------------ state
    @property
    def num_rows(self) -> int:
        """Rows (documents) the memory is laid out for; 0 before anything was read into it."""
        counts = {memory.num_rows for memory in self.layers.values() if not memory.is_empty()}
        if self.tokens_seen is not None:
            counts.add(self.tokens_seen.shape[0])
        if self.xl.length:
            counts.add(self.xl.valid.shape[0])
        return max(counts, default=0)

    def is_empty(self) -> bool:
        """No kNN entries and no XL cache. An XL cache of padding only (a segment without a real token) counts: the
        next segment of its rows still meets it, so a batch of another size must not."""
        return all(memory.is_empty() for memory in self.layers.values()) and not self.xl.length

    def entries(self) -> dict[int, list[int]]:
        """Valid entries per row, per layer."""
        return {layer: memory.lengths.tolist() for layer, memory in self.layers.items()}

    def __repr__(self) -> str:
        entries = {layer: memory.lengths.tolist() for layer, memory in self.layers.items()}
        per_row = next(iter(entries.values()), [])
        device = next((m.keys.device for m in self.layers.values() if m.keys is not None), "not allocated")
        return (
            f"MemoryBank(rows={self.num_rows}, entries per row={per_row}, layers={list(self.geometry.layers)}, "
            f"capacity={self.geometry.memory_size}, kv_heads={self.geometry.num_kv_heads}, "
            f"head_dim={self.geometry.head_dim}, dtype={self.dtype or 'as the model'}, device={device}, "
            f"xl_cache_tokens={self.xl.length})"
        )

    def new(self) -> MemoryBank:
        """An empty memory of the same geometry."""
        return MemoryBank(self.geometry, self.backend_factory, self.dtype, self.xl.sink_tokens, self.xl_layers)

    def copy(self) -> MemoryBank:
        """An independent copy (tensors cloned, retrieval indexes rebuilt)."""
        other = self.new()
        other.load_state_dict(self.state_dict())
        return other

    def check_batch_size(self, batch_size: int, reset: torch.Tensor | None = None) -> None:
        """Raise (changing nothing) if the memory holds rows for another number of rows, unless every row of the
        batch starts a new document, in which case the old memory is dropped."""
        if self.num_rows in (0, batch_size):
            return
        if reset is not None and bool(reset.all()):
            self.reset()
            return
        raise ValueError(
            f"The kNN memory holds entries for {self.num_rows} batch rows but this batch has {batch_size} rows. "
            "Each row's memory belongs to the document streamed in that row: keep the batch size while reading "
            "documents, pass another memory (memory=model.new_memory()), or clear it with model.reset_memory()."
        )

    def rows_index(self, rows: torch.Tensor | list[int] | list[bool] | None) -> torch.Tensor | None:
        """`rows` as a validated index tensor (None: all rows). A bool mask needs one flag per row; indices must be
        integers within the rows; anything else raises, before anything changes."""
        if rows is None:
            return None
        tensor = rows if isinstance(rows, torch.Tensor) else torch.as_tensor(rows)
        count = self.num_rows
        if tensor.dtype == torch.bool:
            if tensor.dim() != 1 or (count and tensor.shape[0] != count):
                raise ValueError(
                    f"A bool row mask needs one flag per memory row ({count}), got shape {tuple(tensor.shape)}."
                )
            return tensor.nonzero().flatten()
        if tensor.is_floating_point() or tensor.is_complex() or tensor.dim() > 1:
            raise ValueError(f"Rows are given as indices (integers) or a bool mask, got {tensor.dtype} {rows!r}.")
        tensor = tensor.reshape(-1).long()
        if tensor.numel() and (int(tensor.min()) < -count or int(tensor.max()) >= max(count, 1)):
            raise ValueError(f"Row index out of range: the memory has {count} rows, got {tensor.tolist()}.")
        return tensor % max(count, 1)

    def reset(self, rows: torch.Tensor | list[int] | list[bool] | None = None) -> None:
        """Clear the rows given as indices or a bool mask; `None` clears everything, row layout included, so that
        batches of any size may follow."""
        index = self.rows_index(rows)
        if index is None:
            for memory in self.layers.values():
                memory.load_state_tensors({})
            self.tokens_seen = None
            self.xl.clear()
            return
        for memory in self.layers.values():
            memory.reset(index)
        if self.tokens_seen is not None:
            self.tokens_seen[index.to(self.tokens_seen.device)] = 0
        self.xl.reset(index)

    def document_positions(self, real: torch.Tensor) -> torch.Tensor:
        """Positions in their documents `[rows, tokens]` of the non-padding tokens `real` about to be read."""
        offsets = self._seen(real)
        return offsets.unsqueeze(1) + real.long().cumsum(dim=1) - 1

    def advance(self, real: torch.Tensor) -> None:
        """Count the non-padding tokens `real` `[rows, tokens]` as read."""
        self.tokens_seen = self._seen(real) + real.sum(dim=1)

    def _seen(self, real: torch.Tensor) -> torch.Tensor:
        if self.tokens_seen is None or self.tokens_seen.shape[0] != real.shape[0]:
            return torch.zeros(real.shape[0], dtype=torch.long, device=real.device)
        return self.tokens_seen.to(real.device)

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep the rows `index` `[n]`, in that order (beam search reordering its beams)."""
        for memory in self.layers.values():
            memory.select_rows(index)
        if self.tokens_seen is not None:
            self.tokens_seen = self.tokens_seen.index_select(0, index.to(self.tokens_seen.device))

    # ------------------------------------------------------------------ placement, write, search
    def place_keys(self, keys: torch.Tensor, positions: torch.Tensor, rotary: Rotary | None) -> torch.Tensor:
        """Keys `[B, Hkv, T, D]` as local attention saw them (rotated at `positions` `[B, T]`) as memory stores them:
        without rotary position ("fixed" / "none" placement), L2-normalised in gate mode."""
        if rotary is not None and self.geometry.rotary_placement in ("fixed", "none"):
            keys = rotary.rotate(keys, -positions)
        return F.normalize(keys, dim=-1) if self.geometry.combine == "gate" else keys

    def place_queries(
        self, queries: torch.Tensor, positions: torch.Tensor, distance: torch.Tensor | int, rotary: Rotary | None
    ) -> torch.Tensor:
        """Queries `[B, H, T, D]` (rotated at `positions`) placed to meet stored keys: "fixed" rotates them to the
        relative `distance` (every entry looks just outside the local window), "none" removes their rotation."""
        if rotary is not None and self.geometry.rotary_placement == "fixed":
            queries = rotary.rotate(queries, distance - positions)
        elif rotary is not None and self.geometry.rotary_placement == "none":
            queries = rotary.rotate(queries, -positions)
        return F.normalize(queries, dim=-1) if self.geometry.combine == "gate" else queries

    @torch.no_grad()
    def write(
        self,
        layer: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        rotary: Rotary | None,
        store: torch.Tensor,
        doc_positions: torch.Tensor,
    ) -> None:
        """Store the tokens `store` `[B, T]` of one layer's keys/values `[B, Hkv, T, D]` (keys rotated at `positions`),
        with their document positions."""
        self.layers[layer].write(self.place_keys(keys, positions, rotary), values, store, doc_positions)

    @torch.no_grad()
    def search(
        self,
        layer: int,
        queries: torch.Tensor,
        k: int,
        group: int = 1,
        with_keys: bool = True,
        scratch: dict[tuple, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Top-k scores, keys (None unless `with_keys`) and values `[B, Hkv, M, k(, D)]` for placed queries
        `[B, Hkv, M, D]`. Each memory row serves `group` consecutive batch rows (the sequences of one prompt, or every
        prompt of a one-row memory). `scratch`: see `KNNMemory.gather` (the values are then valid until the next
        search given the same scratch)."""
        memory = self.layers[layer]
        batch, heads, queries_per_row, dim = queries.shape
        rows = batch // group
        shared = queries.view(rows, group, heads, queries_per_row, dim).transpose(1, 2)
        scores, slots = memory.search(shared.reshape(rows, heads, group * queries_per_row, dim), k)
        keys, values = memory.gather(slots, with_keys, scratch)

        def per_row(x: torch.Tensor) -> torch.Tensor:
            x = x.view(rows, heads, group, queries_per_row, *x.shape[3:]).transpose(1, 2)
            return x.reshape(batch, heads, queries_per_row, *x.shape[4:])

        keys = per_row(keys) if with_keys else None
        return per_row(scores.masked_fill(slots < 0, -math.inf)), keys, per_row(values)

    @torch.no_grad()
    def extend(self, other: MemoryBank, rows: torch.Tensor) -> None:
        """Append what `other` holds in its rows `rows` `[n]` to this memory's n rows, in the order it was read, its
        document positions continuing each row's count (a generate call committing what it read)."""
        count = rows.numel()
        if self.num_rows not in (0, count):
            raise ValueError(f"This memory holds {self.num_rows} rows; {count} rows cannot be added to it.")
        seen = self.tokens_seen.clone() if self.tokens_seen is not None else torch.zeros(count, dtype=torch.long)
        for layer, memory in self.layers.items():
            source = other.layers[layer]
            if source.written is None:
                continue
            order = [source.in_order(int(row)) for row in rows]
            width = max((len(slots) for slots in order), default=0)
            if width == 0:
                continue
            slots = torch.stack([F.pad(s, (0, width - len(s))) for s in order])  # [n, width]
            lengths = torch.tensor([len(s) for s in order], device=slots.device)
            store = torch.arange(width, device=slots.device) < lengths.unsqueeze(1)
            index = rows.to(slots.device).unsqueeze(1)
            keys = source.keys[index, :, slots].transpose(1, 2)  # [n, H, width, D]
            values = source.values[index, :, slots].transpose(1, 2)
            positions = source.positions[index, slots] + seen.to(slots.device).unsqueeze(1)
            memory.write(keys, values, store, positions)
        read = other.tokens_seen[rows.to(other.tokens_seen.device)] if other.tokens_seen is not None else 0
        self.tokens_seen = seen.to(rows.device) + torch.as_tensor(read, device=rows.device)

    # ------------------------------------------------------------------ state dict and files
    def state_dict(self) -> dict[str, Any]:
        """Everything the memory is: its tensors (as in memory files) and its geometry. Cloned: later reading does
        not change a state dict taken now."""
        tensors = {name: tensor.detach().clone() for name, tensor in self._tensors().items()}
        return {"geometry": json.dumps(self.geometry.as_metadata(), sort_keys=True), **tensors}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the memory by a copy of a `state_dict` (later changes to its tensors do not reach the memory);
        checked completely before anything changes."""
        state = {name: value.detach().clone() if torch.is_tensor(value) else value for name, value in state.items()}
        geometry = state.pop("geometry", None)
        stored = json.loads(geometry) if isinstance(geometry, str) else None
        self._replace(self._checked("state dict", stored, state))

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"extra.{name}": tensor for name, tensor in self.xl.state_tensors().items()}
        for layer, memory in self.layers.items():
            for name, tensor in memory.state_tensors().items():
                tensors[f"layer.{layer}.{name}"] = tensor
        if self.tokens_seen is not None:
            tensors["tokens_seen"] = self.tokens_seen
        return tensors

    def save(self, path: str | Path) -> None:
        """Write the memory to a safetensors file whose metadata records its geometry."""
        from safetensors.torch import save_file

        tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in self._tensors().items()}
        geometry = json.dumps(self.geometry.as_metadata(), sort_keys=True)
        metadata = {
            "format": MEMORY_FILE_FORMAT,
            "version": MEMORY_FILE_VERSION,
            "geometry": geometry,
            "checksum": _checksum(geometry, tensors),
        }
        save_file(tensors, str(path), metadata=metadata)

    def load(
        self, path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        """Load a file written by `save`. Everything is checked before anything is replaced (names, dtypes, shapes,
        counters, finiteness, geometry), so a file that does not fit, or is truncated or corrupted, raises and leaves
        the memory as it was. The tensors are read into memory of their own (the file is not kept mapped). Keys and
        values are cast to the memory's dtype (`dtype` for a memory that has none yet)."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No memory file at {path}.")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                metadata = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name).clone() for name in handle.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise ValueError(f"{path} is not a readable memory file (truncated or corrupted?): {error}") from error
        if metadata.get("format") != MEMORY_FILE_FORMAT:
            raise ValueError(f"{path} is a safetensors file but not a memorizing-hf memory file.")
        if metadata.get("version") != MEMORY_FILE_VERSION:
            raise ValueError(f"{path} has memory file version {metadata.get('version')!r}; this code reads version 1.")
        try:
            stored = json.loads(metadata.get("geometry", ""))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} has unreadable geometry metadata (corrupted file?).") from error
        checksum = metadata.get("checksum")  # files written before checksums were added have none
        if checksum is not None and checksum != _checksum(metadata.get("geometry", ""), tensors):
            raise ValueError(f"{path} does not match its checksum (corrupted file?). Memory left unchanged.")
        checked = self._checked(str(path), stored, tensors, dtype)
        self._replace({name: tensor.to(device) if device is not None else tensor for name, tensor in checked.items()})

    def _checked(
        self, source: str, stored: Any, tensors: Mapping[str, Any], dtype: torch.dtype | None = None
    ) -> dict[str, torch.Tensor]:
        """`tensors` of a file or state dict, checked against this memory and cast to its dtype (or `dtype` for a
        memory that has none yet); raises naming the problem."""
        if not isinstance(stored, dict):
            raise ValueError(f"{source} has no geometry describing the memory (corrupted?). Memory left unchanged.")
        expected = self.geometry.as_metadata()
        mismatched = {key: (stored.get(key), value) for key, value in expected.items() if stored.get(key) != value}
        if mismatched:
            details = "; ".join(f"{key}: file has {a!r}, model has {b!r}" for key, (a, b) in mismatched.items())
            raise ValueError(
                f"{source} was written for a different memory geometry ({details}). Memory left unchanged."
            )
        known = {"tokens_seen", "extra.valid"} | {
            f"layer.{layer}.{name}" for layer in self.layers for name in ("keys", "values", "positions", "written")
        }
        unknown = sorted(name for name in tensors if name not in known and not _XL_TENSOR.match(name))
        if unknown:
            raise ValueError(f"{source} holds tensors a memory does not have: {unknown}. Memory left unchanged.")
        for name, tensor in tensors.items():
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"{source}: {name} is not a tensor. Memory left unchanged.")
        checked: dict[str, torch.Tensor] = {}
        rows: set[int] = set()
        for layer, memory in self.layers.items():
            parts = {name: tensors.get(f"layer.{layer}.{name}") for name in ("keys", "values", "positions", "written")}
            if all(tensor is None for tensor in parts.values()):
                continue
            self._check_layer(source, layer, memory, parts, dtype)
            rows.add(parts["written"].shape[0])
            checked.update({f"layer.{layer}.{name}": tensor for name, tensor in parts.items()})
        seen = tensors.get("tokens_seen")
        if seen is not None:
            if seen.dim() != 1 or seen.dtype != torch.long or bool((seen < 0).any()) or bool((seen > _MAX_COUNT).any()):
                raise ValueError(
                    f"{source}: tokens_seen must be int64 counts per row in [0, 2**62]. Memory left unchanged."
                )
            rows.add(seen.shape[0])
            checked["tokens_seen"] = seen
        xl = {name: tensor for name, tensor in tensors.items() if name.startswith("extra.")}
        if xl:
            rows.add(self._check_xl(source, xl, dtype))
            checked.update(xl)
        if len(rows) > 1:
            raise ValueError(f"{source} holds different numbers of rows per tensor (corrupted?). Memory unchanged.")
        return checked

    def _check_layer(
        self,
        source: str,
        layer: int,
        memory: KNNMemory,
        parts: dict[str, torch.Tensor | None],
        dtype: torch.dtype | None,
    ) -> None:
        def refuse(problem: str) -> None:
            raise ValueError(f"{source}: layer {layer} {problem}. Memory left unchanged.")

        if any(tensor is None for tensor in parts.values()):
            refuse("lacks some of keys/values/positions/written")
        keys, values, positions, written = parts["keys"], parts["values"], parts["positions"], parts["written"]
        if keys.dim() != 4 or keys.shape[1:2] != (memory.num_heads,) or keys.shape[3] != memory.head_dim:
            refuse(f"keys have shape {tuple(keys.shape)}, not [rows, {memory.num_heads}, slots, {memory.head_dim}]")
        rows, _, slots, _ = keys.shape
        if values.shape != keys.shape or positions.shape != (rows, slots) or written.shape != (rows,):
            refuse("has tensors of inconsistent shapes")
        if slots > memory.capacity:
            refuse(f"holds {slots} slots, more than the capacity {memory.capacity}")
        for name, tensor in (("keys", keys), ("values", values)):
            if tensor.dtype not in _FLOAT_DTYPES:
                refuse(f"{name} have dtype {tensor.dtype}, not a floating point dtype")
        if positions.dtype != torch.long or written.dtype != torch.long:
            refuse("positions and written must be int64")
        if bool((written < 0).any()) or bool((written > _MAX_COUNT).any()):
            refuse("has entry counts out of range")
        lengths = written.clamp(max=memory.capacity)
        if bool((lengths > slots).any()):
            refuse("counts more entries than it stores")
        valid = torch.arange(slots).unsqueeze(0) < lengths.unsqueeze(1)  # [rows, slots]
        dtype = memory.dtype or (memory.keys.dtype if memory.keys is not None else dtype)
        if dtype is not None:  # cast to the memory's dtype, never switch it
            keys, values = parts["keys"], parts["values"] = keys.to(dtype), values.to(dtype)
        # Every slot, not only the valid ones: a row without entries still gathers slot 0 (weighted 0, but 0 * NaN is
        # NaN). Checked as stored: a cast may overflow (fp64 1e300).
        for name, tensor in (("keys", keys), ("values", values)):
            if not bool(torch.isfinite(tensor).all()):
                refuse(f"{name} hold non-finite numbers (in the memory's dtype)")
        if bool((positions[valid] < 0).any()):
            refuse("has negative positions for stored entries")

    def _check_xl(self, source: str, xl: dict[str, torch.Tensor], dtype: torch.dtype | None) -> int:
        """Check the XL cache tensors `extra.*` of a file or state dict (and cast its keys/values, in `xl`, to the
        cache's dtype); returns their number of rows. The cache holds `extra.keys.N` and `extra.values.N`
        `[rows, kv_heads, tokens, head_dim]` for every layer N of the model, and `extra.valid` `[rows, tokens]`."""

        def refuse(problem: str) -> None:
            raise ValueError(f"{source}: the XL cache {problem}. Memory left unchanged.")

        valid = xl.get("extra.valid")
        if valid is None or valid.dtype != torch.bool or valid.dim() != 2:
            refuse("lacks a bool 'extra.valid' [rows, tokens]")
        rows, tokens = valid.shape
        if tokens and not rows:
            refuse(f"holds {tokens} tokens for no rows")  # a forward of any batch would meet a cache of 0 rows
        shape = (rows, self.geometry.num_kv_heads, tokens, self.geometry.head_dim)
        held = {int(_XL_TENSOR.match(name).group(2)) for name in xl if name != "extra.valid"}
        if self.xl_layers is not None:
            expected = set(range(self.xl_layers))
        elif self.xl.keys:  # a model of unknown depth: the layers its own cache holds, else every layer up to the last
            expected = set(self.xl.keys)
        else:
            expected = set(range(max(held | set(self.geometry.layers), default=-1) + 1))
        cast = next((tensor.dtype for tensor in self.xl.keys.values()), dtype)
        beyond = sorted(held - expected)
        if beyond:
            refuse(f"holds layers {beyond} that the model does not have (its layers are 0-{max(expected, default=-1)})")
        for layer in sorted(expected):
            for kind in ("keys", "values"):
                name = f"extra.{kind}.{layer}"
                tensor = xl.get(name)
                if tensor is None:
                    refuse(f"lacks {name}: every layer 0-{max(expected)} needs its keys and values")
                if tuple(tensor.shape) != shape:
                    refuse(
                        f"tensor {name} has shape {tuple(tensor.shape)}, not [rows, kv_heads, tokens, head_dim] = "
                        f"{list(shape)}"
                    )
                if tensor.dtype not in _FLOAT_DTYPES:
                    refuse(f"tensor {name} has dtype {tensor.dtype}, not a floating point dtype")
                # Cast to the dtype the cache holds (the model's: `dtype` for an empty cache), never switch it; checked
                # as stored, since a cast may overflow (fp64 1e300).
                tensor = xl[name] = tensor.to(cast) if cast is not None else tensor
                if not bool(torch.isfinite(tensor).all()):
                    refuse(f"tensor {name} holds non-finite numbers (in the cache's dtype)")
        return rows

    def _replace(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Replace everything by checked tensors."""
        for layer, memory in self.layers.items():
            prefix = f"layer.{layer}."
            memory.load_state_tensors({n[len(prefix) :]: t for n, t in tensors.items() if n.startswith(prefix)})
        self.tokens_seen = tensors.get("tokens_seen")
        self.xl.load_state_tensors({n[len("extra.") :]: t for n, t in tensors.items() if n.startswith("extra.")})


def _checksum(geometry: str, tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a memory file's geometry and tensors (names, dtypes, shapes and bytes), to detect damaged files."""
    digest = hashlib.sha256(geometry.encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
