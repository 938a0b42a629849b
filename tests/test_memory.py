"""The ring-buffer memory: FIFO order against a reference queue, resets, batch layout, memory files."""

from __future__ import annotations

import dataclasses
from collections import deque

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memorizing_hf.memory import KNNMemory, MemoryBank, MemoryGeometry
from memorizing_hf.retrieval import ExactBackend

HEADS, DIM = 2, 4
GEOMETRY = MemoryGeometry(
    layers=(0, 2), num_kv_heads=HEADS, head_dim=DIM, memory_size=8, combine="joint", rotary_placement="fixed"
)


def entries(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values `[rows, heads, tokens, dim]` that encode entry ids (key = id, value = -id)."""
    keys = ids.float().view(*ids.shape[:1], 1, ids.shape[1], 1).expand(-1, HEADS, -1, DIM).clone()
    return keys, -keys


def ring_contents(memory: KNNMemory, row: int) -> list[int]:
    """The row's entries from oldest to newest, read from storage in ring order."""
    written, length = int(memory.written[row]), int(memory.lengths[row])
    start = written % memory.capacity if written >= memory.capacity else 0
    order = [(start + i) % memory.capacity for i in range(length)]
    return [int(memory.keys[row, 0, slot, 0]) for slot in order]


@settings(max_examples=60, deadline=None)
@given(
    capacity=st.integers(1, 9),
    rows=st.integers(1, 3),
    operations=st.lists(
        st.one_of(
            st.tuples(st.just("write"), st.integers(1, 12), st.integers(0, 2**31 - 1)),
            st.tuples(st.just("reset"), st.integers(0, 7), st.just(0)),
        ),
        max_size=25,
    ),
)
def test_fifo_matches_a_reference_queue(capacity: int, rows: int, operations: list) -> None:
    memory = KNNMemory(capacity, HEADS, DIM, ExactBackend())
    reference = [deque(maxlen=capacity) for _ in range(rows)]
    next_id = 1
    for kind, size, seed in operations:
        if kind == "reset":
            mask = torch.tensor([bool(size >> r & 1) for r in range(rows)])
            memory.reset(mask)
            for r in range(rows):
                if mask[r]:
                    reference[r].clear()
            continue
        store = torch.rand(rows, size, generator=torch.Generator().manual_seed(seed)) < 0.7
        ids = torch.arange(next_id, next_id + rows * size).view(rows, size)
        next_id += rows * size
        keys, values = entries(ids)
        memory.write(keys, values, store, positions=ids)
        for r in range(rows):
            reference[r].extend(int(i) for i, keep in zip(ids[r], store[r]) if keep)
    for r in range(rows):
        if memory.written is None:
            assert not reference[r]
            continue
        assert ring_contents(memory, r) == list(reference[r])
        length = int(memory.lengths[r])
        # storage and positions never drift apart
        assert torch.equal(memory.positions[r, :length], memory.keys[r, 0, :length, 0].long())
        assert torch.equal(memory.values[r, :, :length], -memory.keys[r, :, :length])
        # retrieval sees exactly the valid entries
        if length:
            query = torch.ones(memory.num_rows, HEADS, 1, DIM)
            slots = memory.search(query, capacity)[1][r, 0, 0]
            found = sorted(int(memory.keys[r, 0, s, 0]) for s in slots if s >= 0)
            assert found == sorted(reference[r])


def test_storage_grows_only_as_needed_and_never_exceeds_capacity() -> None:
    memory = KNNMemory(5000, HEADS, DIM, ExactBackend())
    ids = torch.arange(1, 11).view(1, 10)
    memory.write(*entries(ids), torch.ones(1, 10, dtype=torch.bool), ids)
    assert memory.keys.shape[2] == 1024
    big = torch.arange(1, 3001).view(1, 3000)
    memory.write(*entries(big), torch.ones(1, 3000, dtype=torch.bool), big)
    assert memory.keys.shape[2] == 4096
    memory.write(*entries(big), torch.ones(1, 3000, dtype=torch.bool), big)
    assert memory.keys.shape[2] == 5000
    assert int(memory.lengths[0]) == 5000


def test_a_write_larger_than_the_capacity_keeps_its_last_entries() -> None:
    memory = KNNMemory(4, HEADS, DIM, ExactBackend())
    ids = torch.arange(1, 11).view(1, 10)
    memory.write(*entries(ids), torch.ones(1, 10, dtype=torch.bool), ids)
    assert ring_contents(memory, 0) == [7, 8, 9, 10]


def test_stored_tensors_are_detached() -> None:
    memory = KNNMemory(8, HEADS, DIM, ExactBackend())
    keys = torch.randn(1, HEADS, 3, DIM, requires_grad=True)
    memory.write(keys * 2, keys * 3, torch.ones(1, 3, dtype=torch.bool), torch.arange(3).view(1, 3))
    assert not memory.keys.requires_grad and memory.keys.grad_fn is None
    assert not memory.values.requires_grad


def test_memory_dtype_is_respected() -> None:
    memory = KNNMemory(8, HEADS, DIM, ExactBackend(), dtype=torch.bfloat16)
    memory.write(*entries(torch.ones(1, 3, dtype=torch.long)), torch.ones(1, 3, dtype=torch.bool), torch.zeros(1, 3))
    assert memory.keys.dtype == torch.bfloat16


def filled_bank(rows: int = 2, seed: int = 0, geometry: MemoryGeometry = GEOMETRY) -> MemoryBank:
    bank = MemoryBank(geometry, backend_factory=ExactBackend)
    generator = torch.Generator().manual_seed(seed)
    for memory in bank.layers.values():
        keys = torch.randn(rows, HEADS, 11, DIM, generator=generator)
        store = torch.rand(rows, 11, generator=generator) < 0.8
        memory.write(keys, -keys, store, torch.arange(11).expand(rows, -1))
    bank.advance(torch.ones(rows, 11, dtype=torch.bool))
    return bank


def snapshot(bank: MemoryBank) -> dict[str, torch.Tensor]:
    return {
        f"{layer}.{name}": tensor.clone()
        for layer, memory in bank.layers.items()
        for name, tensor in memory.state_tensors().items()
    }


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_batch_size_change_is_refused_and_changes_nothing() -> None:
    bank = filled_bank(rows=2)
    before = snapshot(bank)
    with pytest.raises(ValueError, match="holds entries for 2 batch rows but this batch has 3 rows"):
        bank.check_batch_size(3)
    with pytest.raises(ValueError, match="model.new_memory"):
        bank.check_batch_size(3, reset=torch.tensor([True, False, True]))
    assert_same(before, snapshot(bank))
    bank.check_batch_size(3, reset=torch.ones(3, dtype=torch.bool))  # every row starts a new document: allowed
    assert bank.is_empty()


def test_reset_of_one_row_leaves_the_others_intact() -> None:
    bank = filled_bank(rows=3)
    before = snapshot(bank)
    bank.reset(torch.tensor([False, True, False]))
    for layer, memory in bank.layers.items():
        assert int(memory.lengths[1]) == 0
        for row in (0, 2):
            length = int(memory.lengths[row])
            assert length == int(before[f"{layer}.written"][row].clamp(max=8))
            assert torch.equal(memory.keys[row, :, :length], before[f"{layer}.keys"][row, :, :length])
    assert bank.tokens_seen.tolist() == [11, 0, 11]


def test_memory_file_round_trip_is_exact(tmp_path) -> None:
    bank = filled_bank()
    bank.save(tmp_path / "memory.safetensors")
    other = bank.new()
    other.load(tmp_path / "memory.safetensors")
    assert_same(snapshot(bank), snapshot(other))
    assert torch.equal(bank.tokens_seen, other.tokens_seen)


def test_a_loaded_state_dict_is_a_copy() -> None:
    """As `nn.Module.load_state_dict` copies into its parameters, the memory keeps its own tensors."""
    bank = filled_bank()
    state = bank.state_dict()
    other = bank.new()
    other.load_state_dict(state)
    expected = snapshot(other)
    for value in state.values():
        if torch.is_tensor(value):
            value.zero_()
    assert_same(snapshot(other), expected)


def test_memory_file_for_another_geometry_is_refused_and_changes_nothing(tmp_path) -> None:
    wide = dataclasses.replace(GEOMETRY, head_dim=8)
    MemoryBank(wide, ExactBackend).save(tmp_path / "memory.safetensors")
    bank = filled_bank(seed=2)
    before = snapshot(bank)
    with pytest.raises(ValueError, match="different memory geometry.*head_dim: file has 8, model has 4"):
        bank.load(tmp_path / "memory.safetensors")
    assert_same(before, snapshot(bank))


@pytest.mark.parametrize("damage", ["truncate", "flip", "not_safetensors", "missing"])
def test_damaged_memory_files_are_refused_and_change_nothing(tmp_path, damage: str) -> None:
    path = tmp_path / "memory.safetensors"
    filled_bank(seed=1).save(path)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        header = int.from_bytes(data[:8], "little")
        path.write_bytes(data[:8] + data[8 : 8 + header].replace(b'"shape"', b'"shapf"') + data[8 + header :])
    elif damage == "not_safetensors":
        path.write_text("hello")
    else:
        path.unlink()
    bank = filled_bank(seed=2)
    before = snapshot(bank)
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        bank.load(path)
    assert str(path) in str(error.value)
    assert_same(before, snapshot(bank))


def test_gather_into_a_scratch_buffer_equals_a_fresh_gather_and_reuses_it() -> None:
    memory = filled_bank().layers[0]
    generator = torch.Generator().manual_seed(3)
    scratch: dict = {}
    pointers = []
    for queries in (5, 2, 9):  # the buffer is kept, then grown
        slots = torch.randint(-1, int(memory.lengths.min()), (2, HEADS, queries, 4), generator=generator)
        keys, values = memory.gather(slots, with_keys=True, scratch=scratch)
        fresh_keys, fresh_values = memory.gather(slots, with_keys=True)
        assert torch.equal(values, fresh_values) and torch.equal(keys, fresh_keys)
        rows, heads = torch.arange(2).view(2, 1, 1, 1), torch.arange(HEADS).view(1, HEADS, 1, 1)
        assert torch.equal(values, memory.values[rows, heads, slots.clamp(min=0)])  # an independent indexing
        pointers.append(values.data_ptr())
    assert pointers[0] == pointers[1] != pointers[2]
