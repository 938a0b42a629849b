"""Property-based tests: random damage to memory files and random sequences of calls, against a naive model of the
memory. After any refused call or file the memory equals its snapshot and the next forward works; after any accepted
one it equals the naive model."""

from __future__ import annotations

from collections import deque

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import VOCAB, tiny_memorizing

CAPACITY, SEGMENT = 12, 6
BOS = 1  # the tiny Llama's BOS: never stored


def model_under_test():
    return tiny_memorizing("llama", combine="joint", memory_size=CAPACITY, memory_top_k=4)


def memory_state(model) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n, t in model.memory.state_dict().items() if isinstance(t, torch.Tensor)}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def fifo_positions(model, row: int) -> list[int]:
    memory = model.memory.layers[1]
    return memory.positions[row, memory.in_order(row)].tolist() if memory.written is not None else []


class NaiveMemory:
    """What the memory must hold: per row, the document positions of its stored tokens (oldest first, at most
    CAPACITY), and its count of tokens read."""

    def __init__(self) -> None:
        self.rows: list[deque] = []
        self.seen: list[int] = []

    def read(self, ids: torch.Tensor, mask: torch.Tensor, reset: torch.Tensor) -> bool:
        """A segment read with reset flags; False if the model must refuse it."""
        batch = ids.shape[0]
        if self.rows and len(self.rows) != batch:
            if not bool(reset.all()):
                return False
            self.rows, self.seen = [], []
        if not self.rows:
            self.rows, self.seen = [deque(maxlen=CAPACITY) for _ in range(batch)], [0] * batch
        for r in range(batch):
            if reset[r]:
                self.rows[r].clear()
                self.seen[r] = 0
            count = self.seen[r]
            for column in range(ids.shape[1]):
                if not mask[r, column]:
                    continue
                if column >= 1 and int(ids[r, column]) != BOS:  # the segment's first column is its attention sink
                    self.rows[r].append(count)
                count += 1
            self.seen[r] = count
        return True

    def reset(self, rows: list[int] | None) -> None:
        if rows is None:
            self.rows, self.seen = [], []
            return
        for r in rows:
            self.rows[r].clear()
            self.seen[r] = 0


operations = st.lists(
    st.one_of(
        st.tuples(st.just("read"), st.integers(1, 3), st.integers(0, 2**31 - 1)),
        st.tuples(st.just("plain"), st.integers(1, 4), st.integers(0, 2**31 - 1)),
        st.tuples(st.just("reset"), st.integers(0, 7), st.integers(0, 2)),
        st.tuples(st.just("bad"), st.integers(0, 3), st.integers(0, 2**31 - 1)),
        st.tuples(st.just("save_load"), st.just(0), st.just(0)),
    ),
    max_size=12,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations=operations)
def test_call_sequences_match_a_naive_memory_and_refusals_change_nothing(tmp_path, operations) -> None:
    torch.set_num_threads(1)
    model, naive = model_under_test(), NaiveMemory()
    for kind, size, seed in operations:
        generator = torch.Generator().manual_seed(seed)
        before = memory_state(model)
        if kind == "read":
            ids = torch.randint(1, VOCAB, (size, SEGMENT), generator=generator)
            mask = torch.ones(size, SEGMENT, dtype=torch.long)
            for r, pad in enumerate(torch.randint(0, 3, (size,), generator=generator).tolist()):
                mask[r, :pad] = 0  # left padding
            reset = torch.rand(size, generator=generator) < 0.4
            if naive.read(ids, mask, reset):
                model(ids, attention_mask=mask, memory_reset=reset)
            else:
                with pytest.raises(ValueError, match="holds entries for"):
                    model(ids, attention_mask=mask, memory_reset=reset)
                assert same(memory_state(model), before)
        elif kind == "plain":  # a read-only call of any batch size: nothing changes (or a clear refusal)
            ids = torch.randint(3, VOCAB, (size, SEGMENT), generator=generator)
            try:
                model(ids)
            except ValueError as error:
                assert "rows (documents)" in str(error)
            assert same(memory_state(model), before)
        elif kind == "reset":
            rows = len(naive.rows)
            if seed == 0:
                model.reset_memory()
                naive.reset(None)
            elif seed == 1 and rows:
                mask = [bool(size >> r & 1) for r in range(rows)]
                model.reset_memory(mask)
                naive.reset([r for r in range(rows) if mask[r]])
            else:  # invalid: floats, a mask of the wrong length (for a laid-out memory), an index out of range
                bad = [[0.5], [True] * (rows + 1) if rows else [0.5], [rows + size]][size % 3]
                with pytest.raises(ValueError):
                    model.reset_memory(bad)
                assert same(memory_state(model), before)
        elif kind == "bad":  # refused before anything is written
            ids = torch.randint(3, VOCAB, (max(len(naive.rows), 1), SEGMENT), generator=generator)
            wrong = [
                {"labels": ids[:, :2]},
                {"memory_reset": torch.ones(ids.shape[0] + 1, dtype=torch.bool)},
                {"attention_mask": torch.ones(ids.shape[0] + 1, SEGMENT)},
                {"memory_reset": torch.ones(ids.shape[0], dtype=torch.long)},
            ][size]
            with pytest.raises(ValueError):
                model(ids, **wrong)
            assert same(memory_state(model), before)
        else:
            path = tmp_path / "memory.safetensors"
            model.save_memory(path)
            model.reset_memory()
            model.load_memory(path)
            assert same(memory_state(model), before)
        assert model.memory.entries()[1] == [len(row) for row in naive.rows] or (
            not naive.rows and all(n == 0 for n in model.memory.entries()[1])
        )
        for r, row in enumerate(naive.rows):
            assert fifo_positions(model, r) == list(row)
    with torch.no_grad():  # and the model still works
        assert torch.isfinite(model(torch.randint(3, VOCAB, (max(len(naive.rows), 1), SEGMENT))).logits).all()


damage = st.one_of(
    st.tuples(st.just("flip"), st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True), st.just(0)),
    st.tuples(st.just("append"), st.just(0.0), st.integers(1, 64)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damages=st.lists(damage, min_size=1, max_size=3))
def test_a_damaged_memory_file_is_refused_or_loads_exactly_what_was_saved(tmp_path, damages) -> None:
    source = model_under_test()
    source(torch.randint(3, VOCAB, (2, SEGMENT), generator=torch.Generator().manual_seed(0)), update_memory=True)
    path = tmp_path / "memory.safetensors"
    source.save_memory(path)
    saved = memory_state(source)
    data = bytearray(path.read_bytes())
    for kind, where, value in damages:
        index = int(where * len(data))
        if kind == "flip" and data:
            data[index] ^= value
        elif kind == "truncate":
            del data[index:]
        else:
            data += bytes(range(value))
    path.write_bytes(bytes(data))
    model = model_under_test()
    model(torch.randint(3, VOCAB, (2, SEGMENT), generator=torch.Generator().manual_seed(1)), update_memory=True)
    before = memory_state(model)
    try:
        model.load_memory(path)
    except (ValueError, FileNotFoundError):
        assert same(memory_state(model), before)
    else:
        assert same(memory_state(model), saved)
    assert torch.isfinite(model(torch.randint(3, VOCAB, (2, SEGMENT))).logits).all()
