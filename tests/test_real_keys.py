"""The real-key recorder of the retrieval benchmarks: it must store what the memory layer writes while reading."""

from __future__ import annotations

import torch

from memorizing_experiments.real_keys import record

from .conftest import VOCAB, tiny_memorizing


def test_record_keeps_the_keys_the_memory_stores_and_the_queries_at_the_checkpoint():
    entries, segment = 48, 16
    model = tiny_memorizing(memory_size=entries + segment, combine="joint")
    stream = iter(torch.randint(3, VOCAB, (4096,), generator=torch.Generator().manual_seed(0)).tolist())
    out = record(model, stream, entries, segment=segment)
    memory = model.memory.layers[1]
    assert int(memory.written[0]) >= entries  # reading wrote the memory
    heads, head_dim = memory.num_heads, memory.head_dim
    assert out["keys"].shape == (heads, entries, head_dim)
    assert torch.equal(out["keys"], memory.keys[0, :, :entries])
    assert bool(out["keys"].abs().amax(dim=-1).gt(0).all())  # every slot holds a written key
    group = model.config.text_config.num_attention_heads // heads
    assert set(out) == {"keys", f"queries.{entries}"}
    assert out[f"queries.{entries}"].shape == (heads, group * segment, head_dim)
