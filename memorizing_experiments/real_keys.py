"""Real memory keys for the retrieval benchmarks: what SmolLM2-135M writes to memory while it reads real code.

The benchmarks of retrieval at scale must not run on random vectors: real keys are clustered and their neighbours
come in runs of consecutive tokens, which is what makes approximate indexes work (or not) and what decides how many
candidates the exact search rescores. `real_keys()` returns the keys that a memorizing SmolLM2-135M (joint mode,
memory on the default layer for its depth, 21 of 30, keys stored unrotated as "fixed" placement stores them) writes
while reading the CPython standard library as one long stream of 512-token segments, files in sorted order, plus
the memory queries of the segment read when the memory first holds 8K, 65K, 262K and 1M entries.

Only the layers up to the memory layer run (the keys of a layer do not depend on later layers), retrieval is
switched off while reading (a segment's keys do not depend on what its memory layer retrieves), and only the last
position's logits are computed. Still, reading 1M tokens takes 20-60 minutes on a 2-core CPU; the result is cached
(`sources.cache_dir()/bench/`, about 0.8 GB) and later calls load it in seconds.
`benchmarks/real_keys.py [--entries 1048576]` builds the cache ahead of `make bench`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from memorizing_hf import MemorizingForCausalLM
from memorizing_hf.data import read_text

from .sources import cache_dir, smollm2_path, stdlib_files

MEMORY_LAYER = 21  # MemorizingConfig's default for a 30-layer model: about 3/4 of the depth
SEGMENT = 512
CHECKPOINTS = (8192, 65536, 262144, 1048576)  # memory sizes at which a segment's queries are recorded


class _RecordingBackend:
    """A retrieval backend that retrieves nothing and, when `record` is set, keeps the queries it is asked for."""

    def __init__(self) -> None:
        self.record = False
        self.queries: torch.Tensor | None = None

    def add(self, rows: torch.Tensor, slots: torch.Tensor, keys: torch.Tensor) -> None:
        """Nothing to index: the keys live in the memory's storage."""

    def reset(self, rows: torch.Tensor) -> None:
        """Nothing to forget."""

    def search(
        self, queries: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.record:
            self.queries = queries.detach().clone()
        shape = (*queries.shape[:3], k)
        return torch.full(shape, float("-inf")), torch.full(shape, -1, dtype=torch.long)


def cache_file(entries: int) -> Path:
    return cache_dir() / "bench" / f"smollm2_stdlib_layer{MEMORY_LAYER}_{entries}.safetensors"


def real_keys(entries: int = CHECKPOINTS[-1]) -> dict[str, torch.Tensor]:
    """`{"keys": [heads, entries, head_dim] fp32, "queries.<n>": [heads, queries, head_dim] fp32 for n in
    CHECKPOINTS below entries and for entries}`: memory keys and queries of SmolLM2-135M reading the standard
    library."""
    path = cache_file(entries)
    if path.is_file():
        return load_file(path)
    tensors = _read_stdlib(entries)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file(tensors, partial)
    partial.rename(path)
    return tensors


def largest_cached() -> tuple[dict[str, torch.Tensor], Path]:
    """The tensors of the largest real-key cache built so far (the benchmarks take their sizes from it) and its file;
    exits with the command that builds one when there is none."""
    available = [n for n in CHECKPOINTS if cache_file(n).is_file()]
    if not available:
        raise SystemExit("no real keys cached: run `python benchmarks/real_keys.py --entries 1048576` first")
    return real_keys(max(available)), cache_file(max(available))


def _read_stdlib(entries: int) -> dict[str, torch.Tensor]:
    folder = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, num_hidden_layers=MEMORY_LAYER + 1)
    # One segment of room beyond `entries`: the segment read last (for its queries) must not overwrite the first keys.
    model = MemorizingForCausalLM.from_base_pretrained(
        base.eval(), memory_layers=[MEMORY_LAYER], memory_size=entries + SEGMENT, combine="joint"
    )
    return record(model, _token_stream(tokenizer), entries)


def record(
    model: MemorizingForCausalLM, stream: Iterator[int], entries: int, segment: int = SEGMENT
) -> dict[str, torch.Tensor]:
    """What `model`'s (single) memory layer stores while reading `stream` into its own memory, `segment` tokens at a
    time, until it holds `entries` keys (the `real_keys` layout), with the queries of the segment read when it first
    holds each checkpoint."""
    (layer,) = model.config.memory_layers
    memory = model.memory.layers[layer]
    backend = memory.backend = _RecordingBackend()
    targets = sorted({n for n in CHECKPOINTS if n < entries} | {entries})
    recorded: dict[str, torch.Tensor] = {}
    start = time.perf_counter()
    with torch.no_grad():
        while targets:
            stored = 0 if memory.written is None else int(memory.written[0])
            backend.record = stored >= targets[0]
            model(torch.tensor([[next(stream) for _ in range(segment)]]), update_memory=True, logits_to_keep=1)
            if backend.record:
                recorded[f"queries.{targets.pop(0)}"] = backend.queries[0].float()
            if stored // 16384 != int(memory.written[0]) // 16384:
                rate = int(memory.written[0]) / (time.perf_counter() - start)
                print(f"  {int(memory.written[0]):>9,} entries stored ({rate:.0f} tokens/s)", flush=True)
    return {"keys": memory.keys[0, :, :entries].float().contiguous(), **recorded}


def _token_stream(tokenizer: AutoTokenizer) -> Iterator[int]:
    """Token ids of the standard library's files, in sorted order, as one stream."""
    for path in stdlib_files():
        yield from tokenizer(read_text(path))["input_ids"]
