"""External kNN memory: a FIFO ring buffer of (key, value) pairs per batch row and key/value head.

The memory is not part of the autograd graph: stored tensors are detached constants. Each batch row holds the
entries of its own document; `reset` clears rows when a new document starts. Once a row holds `capacity` entries,
new entries overwrite the oldest ones in ring order, so storage slots, positions and the retrieval backend's ids
always describe the same entry (there is never a full reset on overflow).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

import torch

MEMORY_FILE_FORMAT = "memorizing-hf-memory"
MEMORY_FILE_VERSION = "1"
_MIN_ALLOCATION = 1024  # slots allocated at the first write; storage then doubles up to the capacity


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

    def check_batch_size(self, batch_size: int) -> None:
        """Raise if the memory holds entries laid out for a different number of rows."""
        if self.num_rows not in (0, batch_size) and not self.is_empty():
            raise ValueError(
                f"The kNN memory holds entries for {self.num_rows} batch rows but this batch has {batch_size} rows. "
                "Each row's memory belongs to the document streamed in that row: keep the batch size while "
                "reading documents, or clear the memory first with model.reset_memory()."
            )

    def reset(self, rows: torch.Tensor | None = None) -> None:
        """Clear all rows (`rows=None`) or the rows where the boolean mask / index tensor `rows` points."""
        if self.written is None:
            return
        if rows is None:
            rows = torch.arange(self.num_rows, device=self.written.device)
        elif rows.dtype == torch.bool:
            rows = rows.to(self.written.device).nonzero().flatten()
        else:
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
        slots = allocated
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
        """Append entries in token order.

        Args:
            keys, values: `[rows, heads, tokens, head_dim]` (detached here).
            store: `[rows, tokens]` bool, which tokens to write.
            positions: `[rows, tokens]` token positions in the document, kept with each entry.
        """
        batch_size = keys.shape[0]
        self.check_batch_size(batch_size)
        store = store.to(keys.device)
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
    def search(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """Slots of the top-k entries for each query, `[rows, heads, M, k]`, -1 where a row has fewer than k."""
        self._follow(queries.device)
        return self.backend.search(queries.detach(), self.keys, self.lengths, k)[1]

    def gather(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `[rows, heads, M, k, head_dim]` at `slots` (missing slots, -1, give slot 0)."""
        rows, heads, allocated, dim = self.keys.shape
        base = torch.arange(rows * heads, device=slots.device).view(rows, heads, 1, 1) * allocated
        flat = (base + slots.clamp(min=0)).flatten()
        keys = self.keys.view(-1, dim).index_select(0, flat).view(*slots.shape, dim)
        values = self.values.view(-1, dim).index_select(0, flat).view(*slots.shape, dim)
        return keys, values

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
        """Replace the memory's content by `tensors` (as produced by `state_tensors`), and rebuild the backend."""
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


class MemoryBank:
    """The memories of all memory layers of a model, plus each row's count of document tokens read so far.

    All layers see the same batch rows, so row layout, resets, batch-size checks and files are handled here once.
    """

    def __init__(
        self,
        layers: list[int],
        capacity: int,
        num_heads: int,
        head_dim: int,
        backend_factory: Callable[[], RetrievalBackend],
        dtype: torch.dtype | None = None,
    ) -> None:
        self.capacity, self.num_heads, self.head_dim = capacity, num_heads, head_dim
        self.layers = {layer: KNNMemory(capacity, num_heads, head_dim, backend_factory(), dtype) for layer in layers}
        self.tokens_seen: torch.Tensor | None = None

    def is_empty(self) -> bool:
        return all(memory.is_empty() for memory in self.layers.values())

    def entries(self) -> dict[int, list[int]]:
        """Valid entries per row, per layer."""
        return {layer: memory.lengths.tolist() for layer, memory in self.layers.items()}

    def check_batch_size(self, batch_size: int, reset: torch.Tensor | None = None) -> None:
        """Raise (changing nothing) if the memory holds entries for another number of rows, unless every row of the
        batch starts a new document, in which case the old memory is simply dropped."""
        rows = {memory.num_rows for memory in self.layers.values() if not memory.is_empty()}
        if not rows or rows == {batch_size}:
            return
        if reset is not None and bool(reset.all()):
            self.reset()
            return
        next(memory for memory in self.layers.values() if not memory.is_empty()).check_batch_size(batch_size)

    def reset(self, rows: torch.Tensor | None = None) -> None:
        """Clear the rows given as indices or a boolean mask; `None` clears everything, row layout included, so that
        batches of any size may follow."""
        if rows is None:
            for memory in self.layers.values():
                memory.load_state_tensors({})
            self.tokens_seen = None
            return
        for memory in self.layers.values():
            memory.reset(rows)
        if self.tokens_seen is not None:
            self.tokens_seen[rows.to(self.tokens_seen.device)] = 0

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

    def save(
        self, path: str | Path, geometry: Mapping[str, object], extra: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        """Write all layers (and `extra` tensors, e.g. the XL cache, stored under `extra.`) to a safetensors file
        whose metadata records the model's memory geometry."""
        from safetensors.torch import save_file

        tensors = {f"extra.{name}": tensor.detach().contiguous().cpu() for name, tensor in (extra or {}).items()}
        for layer, memory in self.layers.items():
            for name, tensor in memory.state_tensors().items():
                tensors[f"layer.{layer}.{name}"] = tensor.detach().contiguous().cpu()
        if self.tokens_seen is not None:
            tensors["tokens_seen"] = self.tokens_seen.cpu()
        metadata = {
            "format": MEMORY_FILE_FORMAT,
            "version": MEMORY_FILE_VERSION,
            "geometry": json.dumps(dict(geometry), sort_keys=True),
        }
        save_file(tensors, str(path), metadata=metadata)

    def load(self, path: str | Path, geometry: Mapping[str, object], device: torch.device) -> dict[str, torch.Tensor]:
        """Load a file written by `save` and return its `extra` tensors. Everything is checked before anything is
        replaced, so a file that does not match (or is truncated or corrupted) raises and leaves the memory as it was.
        """
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No memory file at {path}.")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                metadata = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
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
        expected = json.loads(json.dumps(dict(geometry)))
        mismatched = {key: (stored.get(key), value) for key, value in expected.items() if stored.get(key) != value}
        if mismatched:
            details = "; ".join(f"{key}: file has {a!r}, model has {b!r}" for key, (a, b) in mismatched.items())
            raise ValueError(f"{path} was written for a different memory geometry ({details}). Memory left unchanged.")

        staged = {layer: self._staged_layer(path, layer, memory, tensors) for layer, memory in self.layers.items()}
        extra = {name[len("extra.") :]: t.to(device) for name, t in tensors.items() if name.startswith("extra.")}
        row_counts = {parts["written"].shape[0] for parts in staged.values() if parts}
        row_counts |= {tensor.shape[0] for tensor in extra.values()}
        seen = tensors.get("tokens_seen")
        if seen is not None:
            row_counts.add(seen.shape[0])
        if len(row_counts) > 1:
            raise ValueError(f"{path} holds different numbers of batch rows per tensor (corrupted file?).")
        for layer, memory in self.layers.items():
            memory.load_state_tensors({name: tensor.to(device) for name, tensor in staged[layer].items()})
        self.tokens_seen = seen.to(device) if seen is not None else None
        return extra

    @staticmethod
    def _staged_layer(
        path: Path, layer: int, memory: KNNMemory, tensors: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """One layer's tensors from a memory file, checked for consistency with the memory they will replace."""
        parts = {name: tensors.get(f"layer.{layer}.{name}") for name in ("keys", "values", "positions", "written")}
        if all(tensor is None for tensor in parts.values()):
            return {}
        if any(tensor is None for tensor in parts.values()):
            raise ValueError(f"{path} is incomplete: layer {layer} lacks some of keys/values/positions/written.")
        keys, values, positions, written = parts["keys"], parts["values"], parts["positions"], parts["written"]
        rows, heads, slots, dim = keys.shape
        consistent = (
            values.shape == keys.shape
            and positions.shape == (rows, slots)
            and written.shape == (rows,)
            and heads == memory.num_heads
            and dim == memory.head_dim
            and slots <= memory.capacity
            and bool((written >= 0).all())
            and bool((written.clamp(max=memory.capacity) <= slots).all())
        )
        if not consistent:
            raise ValueError(f"{path} has inconsistent tensors for layer {layer} (corrupted file?). Memory unchanged.")
        return parts
