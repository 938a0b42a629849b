"""Property-based tests: random sequences of calls (with random capacities and segment lengths) against a naive model
of the memory, random damage to saved memory files, and hand-written memory files of random dtypes, shapes and values.
After any refused call or file the memory equals its snapshot and the next forward works; after any accepted one it
equals the naive model (searches: a naive top-k) or exactly what the file holds. The number of examples comes from the
Hypothesis profile (tests/conftest.py: "ci" by default, HYPOTHESIS_PROFILE=thorough for more)."""

from __future__ import annotations

import json
import math
from collections import deque

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from memorizing_hf.memory import MEMORY_FILE_FORMAT, MEMORY_FILE_VERSION

from .conftest import VOCAB, tiny_memorizing

CAPACITY, SEGMENT = 12, 6  # of the damaged-file test; call sequences draw theirs
BOS = 1  # the tiny Llama's BOS: never stored
TOP_K = 4


def model_under_test(capacity: int = CAPACITY, xl_cache: bool = False):
    return tiny_memorizing("llama", combine="joint", memory_size=capacity, memory_top_k=TOP_K, xl_cache=xl_cache)


def memory_state(model) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n, t in model.memory.state_dict().items() if isinstance(t, torch.Tensor)}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def fifo_positions(model, row: int) -> list[int]:
    memory = model.memory.layers[1]
    return memory.positions[row, memory.in_order(row)].tolist() if memory.written is not None else []


def forward_works(model, rows: int, segment: int = SEGMENT) -> None:
    """A read-only forward of a batch that fits the memory runs and gives finite logits, changing nothing."""
    before = memory_state(model)
    with torch.no_grad():
        logits = model(torch.randint(3, VOCAB, (max(rows, 1), segment))).logits
    assert torch.isfinite(logits).all()
    assert same(memory_state(model), before)


class NaiveMemory:
    """What the memory must hold: per row, the document positions of its stored tokens (oldest first, at most
    `capacity`), and its count of tokens read. `entries` holds the key and value written for (row, position), as the
    memory layer handed them to its memory (recorded by `record`), for a naive search."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.rows: list[deque] = []
        self.seen: list[int] = []
        self.entries: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def record(self, keys: torch.Tensor, values: torch.Tensor, store: torch.Tensor, positions: torch.Tensor) -> None:
        """The arguments of one `KNNMemory.write`: keep every finite stored token's key/value `[heads, head_dim]`."""
        finite = torch.isfinite(keys).all(dim=(1, 3)) & torch.isfinite(values).all(dim=(1, 3))
        for row, token in (store & finite).nonzero().tolist():
            key = (row, int(positions[row, token]))
            self.entries[key] = (keys[row, :, token].float().clone(), values[row, :, token].float().clone())

    def live(self, row: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values of the row's entries, oldest first."""
        return [self.entries[(row, position)] for position in self.rows[row]]

    def read(self, ids: torch.Tensor, mask: torch.Tensor, reset: torch.Tensor) -> bool:
        """A segment read with reset flags; False if the model must refuse it."""
        batch = ids.shape[0]
        if self.rows and len(self.rows) != batch:
            if not bool(reset.all()):
                return False
            self.rows, self.seen = [], []
        if not self.rows:
            self.rows, self.seen = [deque(maxlen=self.capacity) for _ in range(batch)], [0] * batch
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


def check_search(model, naive: NaiveMemory, queries: torch.Tensor, k: int) -> None:
    """`MemoryBank.search` against a naive top-k over the entries the naive memory holds: the scores of the best k
    (-inf where a row has fewer), each returned entry one of the row's live entries with that score, never a reset,
    overwritten or stale one."""
    scores, keys, values = model.memory.search(1, queries, k)
    rows, heads, count, _ = queries.shape
    assert scores.shape == (rows, heads, count, k) and keys.shape == values.shape == (*scores.shape, queries.shape[-1])
    for r in range(rows):
        live = naive.live(r)
        for h in range(heads):
            entry_keys = torch.stack([key[h] for key, _ in live]) if live else queries.new_zeros(0, queries.shape[-1])
            naive_scores = entry_keys @ queries[r, h].float().T  # [entries, queries]
            for m in range(count):
                best = naive_scores[:, m].sort(descending=True).values[:k].tolist()
                expected = torch.tensor(best + [-math.inf] * (k - len(best)))
                torch.testing.assert_close(scores[r, h, m], expected, rtol=1e-5, atol=1e-5)
                for j in range(len(best)):
                    ties = (naive_scores[:, m] - scores[r, h, m, j]).abs() <= 1e-5 * (
                        1 + abs(float(scores[r, h, m, j]))
                    )
                    assert any(
                        torch.equal(keys[r, h, m, j], live[i][0][h]) and torch.equal(values[r, h, m, j], live[i][1][h])
                        for i in ties.nonzero().flatten().tolist()
                    ), (r, h, m, j)


operations = st.lists(
    st.one_of(
        st.tuples(st.just("read"), st.integers(1, 3), st.integers(0, 2**31 - 1)),
        st.tuples(st.just("plain"), st.integers(1, 4), st.integers(0, 2**31 - 1)),
        st.tuples(st.just("reset"), st.integers(0, 7), st.integers(0, 2)),
        st.tuples(st.just("bad"), st.integers(0, 3), st.integers(0, 2**31 - 1)),
        st.tuples(st.just("save_load"), st.just(0), st.just(0)),
        st.tuples(st.just("search"), st.integers(1, 3), st.integers(0, 2**31 - 1)),
    ),
    min_size=4,
    max_size=12,
)


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    capacity=st.integers(TOP_K, 20),
    segment=st.integers(2, 10),
    xl_cache=st.booleans(),
    operations=operations,
)
def test_call_sequences_match_a_naive_memory_and_refusals_change_nothing(
    tmp_path, one_thread, capacity: int, segment: int, xl_cache: bool, operations
) -> None:
    model, naive = model_under_test(capacity, xl_cache), NaiveMemory(capacity)
    layer = model.memory.layers[1]
    write = layer.write

    def recorded_write(keys, values, store, positions) -> None:
        naive.record(keys, values, store, positions)
        write(keys, values, store, positions)

    layer.write = recorded_write  # the naive memory sees every key/value handed to the memory layer's memory
    for kind, size, seed in operations:
        generator = torch.Generator().manual_seed(seed)
        before = memory_state(model)
        refused = False
        if kind == "read":
            ids = torch.randint(1, VOCAB, (size, segment), generator=generator)
            mask = torch.ones(size, segment, dtype=torch.long)
            for r, pad in enumerate(torch.randint(0, 3, (size,), generator=generator).tolist()):
                mask[r, :pad] = 0  # left padding
            reset = torch.rand(size, generator=generator) < 0.4
            if naive.read(ids, mask, reset):
                model(ids, attention_mask=mask, memory_reset=reset)
            else:
                with pytest.raises(ValueError, match="holds entries for"):
                    model(ids, attention_mask=mask, memory_reset=reset)
                refused = True
        elif kind == "plain":  # a read-only call of any batch size: nothing changes (or a clear refusal)
            ids = torch.randint(3, VOCAB, (size, segment), generator=generator)
            try:
                model(ids)
            except ValueError as error:
                assert "rows (documents)" in str(error)
                refused = True
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
                refused = True
        elif kind == "bad":  # refused before anything is written
            ids = torch.randint(3, VOCAB, (max(len(naive.rows), 1), segment), generator=generator)
            wrong = [
                {"labels": ids[:, : segment - 1]},
                {"memory_reset": torch.ones(ids.shape[0] + 1, dtype=torch.bool)},
                {"attention_mask": torch.ones(ids.shape[0] + 1, segment)},
                {"memory_reset": torch.ones(ids.shape[0], dtype=torch.long)},
            ][size]
            with pytest.raises(ValueError):
                model(ids, **wrong)
            refused = True
        elif kind == "search":
            if naive.rows:
                queries = torch.randn(len(naive.rows), layer.num_heads, size, layer.head_dim, generator=generator)
                k = int(torch.randint(1, capacity + 3, (), generator=generator))
                check_search(model, naive, queries, k)
                event("search compared" + (" (k > entries of a row)" if k > min(map(len, naive.rows)) else ""))
            assert same(memory_state(model), before)
        else:
            path = tmp_path / "memory.safetensors"
            model.save_memory(path)
            model.reset_memory()
            model.load_memory(path)
            assert same(memory_state(model), before)
        if refused:  # nothing changed, and the next forward works
            assert same(memory_state(model), before)
            forward_works(model, len(naive.rows), segment)
            event(f"refused {kind}, then a forward")
        if any(len(row) == capacity for row in naive.rows):
            event("a row's ring buffer is full")
        assert model.memory.entries()[1] == [len(row) for row in naive.rows] or (
            not naive.rows and all(n == 0 for n in model.memory.entries()[1])
        )
        for r, row in enumerate(naive.rows):
            assert fifo_positions(model, r) == list(row)
    forward_works(model, len(naive.rows), segment)


damage = st.one_of(
    st.tuples(st.just("flip"), st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True), st.just(0)),
    st.tuples(st.just("append"), st.just(0.0), st.integers(1, 64)),
)


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damages=st.lists(damage, min_size=1, max_size=3))
def test_a_damaged_memory_file_is_refused_or_loads_exactly_what_was_saved(tmp_path, one_thread, damages) -> None:
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


# ---------------------------------------------------------------------------------------------------- written files
# Well-formed safetensors files without a checksum (as written by hand, or before checksums), for the model under test
# with the XL cache: layer 1's kNN memory, tokens_seen and every layer's XL cache, each tensor of a random dtype, shape
# and content, then a few faults. The loader must load exactly what was written (cast to the memory's dtype) or refuse
# with a ValueError, changing nothing; either way the next forward works.
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
ANY_DTYPES = [*FLOAT_DTYPES, torch.int64, torch.int32, torch.uint8, torch.bool]
HEADS, HEAD_DIM, MODEL_LAYERS = 2, 8, 3  # the tiny Llama's key/value heads, head size and layers
BAD_NUMBERS = [math.nan, math.inf, -math.inf, 1e300, -1, -(2**63), 2**62 + 1, 2**63 - 1]
EXTRA_NAMES = ["extra.keys.3", "extra.values.7", "extra.keys.01", "extra.bogus", "layer.0.keys", "layer.1.bogus"]
counts = st.one_of(st.integers(0, 40), st.sampled_from([2**31, 2**62]))
faults = st.lists(
    st.tuples(
        st.sampled_from(["missing", "dtype", "shape", "number", "extra"]),
        st.integers(0, 2**16),  # which tensor (modulo the ones written)
        st.floats(0, 1, exclude_max=True),  # where in it
        st.sampled_from(ANY_DTYPES),
        st.sampled_from(BAD_NUMBERS),
    ),
    max_size=3,
)


@st.composite
def memory_files(draw) -> tuple[int, dict[str, torch.Tensor], list]:
    """(capacity, tensors, faults): tensors a model of that capacity must accept, then the faults to apply."""
    capacity = draw(st.integers(TOP_K, 16))
    rows, slots = draw(st.integers(0, 3)), draw(st.integers(0, capacity))
    tokens = draw(st.integers(0, 12)) if rows else 0  # an XL cache holds tokens of rows
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))

    def floats(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=generator) * scale).to(draw(st.sampled_from(FLOAT_DTYPES)))

    tensors: dict[str, torch.Tensor] = {}
    if draw(st.booleans()):  # layer 1's kNN memory
        written = [draw(counts if slots == capacity else st.integers(0, slots)) for _ in range(rows)]
        tensors["layer.1.written"] = torch.tensor(written, dtype=torch.long)
        tensors["layer.1.keys"], tensors["layer.1.values"] = (
            floats(rows, HEADS, slots, HEAD_DIM),
            floats(rows, HEADS, slots, HEAD_DIM),
        )
        valid = torch.arange(slots) < torch.tensor(written, dtype=torch.long).clamp(max=capacity).unsqueeze(1)
        positions = torch.randint(0, 10**6, (rows, slots), generator=generator)
        tensors["layer.1.positions"] = torch.where(valid, positions, -1)
    if draw(st.booleans()):
        tensors["tokens_seen"] = torch.tensor([draw(counts) for _ in range(rows)], dtype=torch.long)
    if draw(st.booleans()):  # the XL cache of every layer
        tensors["extra.valid"] = torch.rand(rows, tokens, generator=generator) < 0.7
        for layer in range(MODEL_LAYERS):
            tensors[f"extra.keys.{layer}"] = floats(rows, HEADS, tokens, HEAD_DIM)
            tensors[f"extra.values.{layer}"] = floats(rows, HEADS, tokens, HEAD_DIM)
    return capacity, tensors, draw(faults)


def damaged(tensors: dict[str, torch.Tensor], faults: list) -> dict[str, torch.Tensor]:
    tensors = dict(tensors)
    for kind, which, where, dtype, number in faults:
        names = sorted(tensors)
        if kind == "extra":
            tensors[EXTRA_NAMES[which % len(EXTRA_NAMES)]] = (
                tensors[names[which % len(names)]] if names else torch.ones(2)
            )
            continue
        if not names:
            continue
        name = names[which % len(names)]
        tensor = tensors[name]
        if kind == "missing":
            del tensors[name]
        elif kind == "dtype":
            tensors[name] = tensor.to(dtype)
        elif kind == "shape":  # one dimension one longer or shorter, or one more or one fewer dimension
            dim = int(where * tensor.dim()) if tensor.dim() else 0
            change = which % 4
            if change == 0 and tensor.dim():
                tensors[name] = torch.cat([tensor, tensor.narrow(dim, 0, min(1, tensor.shape[dim]))], dim)
            elif change == 1 and tensor.dim() and tensor.shape[dim]:
                tensors[name] = tensor.narrow(dim, 0, tensor.shape[dim] - 1)
            elif change == 2:
                tensors[name] = tensor.unsqueeze(0)
            else:
                tensors[name] = tensor.flatten()
        elif tensor.numel():  # one number out of range: NaN/Inf/huge in floats, negative or huge in counters
            flat = tensor.flatten().clone()
            if flat.dtype == torch.bool:
                continue
            if flat.is_floating_point():
                flat = flat.double() if number == 1e300 else flat
                flat[int(where * flat.numel())] = float(number)
            elif isinstance(number, int) and torch.iinfo(flat.dtype).min <= number <= torch.iinfo(flat.dtype).max:
                flat[int(where * flat.numel())] = number
            tensors[name] = flat.view(tensor.shape)
    return tensors


def identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and numbers (NaN equal to NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bool(((a == b) | (a != a) & (b != b)).all())


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(file=memory_files())
def test_a_written_memory_file_loads_exactly_cast_to_the_memory_dtype_or_is_refused(tmp_path, one_thread, file) -> None:
    capacity, tensors, file_faults = file
    tensors = damaged(tensors, file_faults)
    model = model_under_test(capacity, xl_cache=True)
    geometry = json.dumps(model.memory.geometry.as_metadata(), sort_keys=True)
    path = tmp_path / "memory.safetensors"
    metadata = {"format": MEMORY_FILE_FORMAT, "version": MEMORY_FILE_VERSION, "geometry": geometry}
    save_file({name: tensor.contiguous().clone() for name, tensor in tensors.items()}, str(path), metadata=metadata)
    model(torch.randint(3, VOCAB, (2, SEGMENT), generator=torch.Generator().manual_seed(1)), update_memory=True)
    before = memory_state(model)
    try:
        model.load_memory(path)
    except ValueError as error:
        assert file_faults, f"a well-formed file was refused: {error}"
        assert same(memory_state(model), before)
        event("refused")
    else:
        cast = {
            name: tensor.float()
            if name.endswith(("keys", "values")) or ".keys." in name or ".values." in name
            else tensor
            for name, tensor in tensors.items()
        }
        loaded = memory_state(model)
        assert loaded.keys() == cast.keys() and all(identical(loaded[name], cast[name]) for name in cast)
        assert all(t.dtype == torch.float32 for n, t in loaded.items() if t.is_floating_point())  # never switched
        other = model_under_test(capacity, xl_cache=True)
        model.save_memory(tmp_path / "again.safetensors")
        other.load_memory(tmp_path / "again.safetensors")
        assert same(memory_state(other), loaded)  # and saves as it loaded
        event("loaded" + (" despite faults" if file_faults else ""))
    rows = model.memory.num_rows or 2
    forward_works(model, rows)
    with torch.no_grad():  # a call that writes, continuing every row's document
        logits = model(
            torch.randint(3, VOCAB, (rows, SEGMENT)), memory_reset=torch.zeros(rows, dtype=torch.bool)
        ).logits
    assert torch.isfinite(logits).all()
