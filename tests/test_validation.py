"""Bad input never corrupts memory: every refused file or call names the problem, leaves the memory bit-identical and
the model usable (the cases an outside review found, one test each)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from memorizing_hf import MemorizingForCausalLM

from .conftest import tiny_memorizing


def filled(**kwargs: object) -> MemorizingForCausalLM:
    model = tiny_memorizing("llama", combine="joint", **kwargs)
    ids = torch.randint(3, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    model(ids, update_memory=True)
    return model


def snapshot(model: MemorizingForCausalLM) -> dict[str, object]:
    return {
        name: value.clone() if isinstance(value, torch.Tensor) else value
        for name, value in model.memory.state_dict().items()
    }


def assert_unchanged(model: MemorizingForCausalLM, before: dict[str, object]) -> None:
    after = model.memory.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value) if isinstance(value, torch.Tensor) else after[name] == value, name
    ids = torch.randint(3, 96, (2, 16), generator=torch.Generator().manual_seed(2))
    assert torch.isfinite(model(ids).logits).all()  # and the model still works


def rewrite(path, change, checksum: bool = False) -> None:
    """Rewrite a memory file with `change(tensors, metadata)` applied, and without its checksum (as a file written
    before checksums, or by hand) unless `checksum`: then the old one stays and no longer matches."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(path)
    change(tensors, metadata)
    if not checksum:
        metadata.pop("checksum")
    save_file(tensors, str(path), metadata=metadata)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t, m: t.__setitem__("layer.1.keys", t["layer.1.keys"].long()), "keys have dtype torch.int64"),
        (lambda t, m: t.__setitem__("layer.1.keys", t["layer.1.keys"] > 0), "keys have dtype torch.bool"),
        (lambda t, m: t.__setitem__("layer.1.written", t["layer.1.written"].float()), "must be int64"),
        (lambda t, m: t.__setitem__("layer.1.positions", t["layer.1.positions"].float()), "must be int64"),
        (lambda t, m: t.__setitem__("layer.1.written", torch.full((2,), 2**63 - 5)), "counts out of range"),
        (lambda t, m: t.__setitem__("layer.1.written", torch.tensor([-1, 3])), "counts out of range"),
        (lambda t, m: t.__setitem__("extra.bogus", torch.zeros(2)), "tensors a memory does not have"),
        (lambda t, m: m.__setitem__("geometry", json.dumps([1, 2])), "no geometry"),
        (lambda t, m: t["layer.1.keys"].view(-1).__setitem__(0, math.nan), "keys hold non-finite numbers"),
        (lambda t, m: t["layer.1.values"].view(-1).__setitem__(3, math.inf), "values hold non-finite numbers"),
        (lambda t, m: t.__setitem__("tokens_seen", torch.tensor([1.5, 2.0])), "tokens_seen"),
    ],
)
def test_a_damaged_memory_file_is_refused_before_anything_changes(tmp_path, change, message: str) -> None:
    path = tmp_path / "memory.safetensors"
    filled().save_memory(path)
    rewrite(path, change)
    model = filled(xl_cache=True)
    model(torch.randint(3, 96, (2, 16)), update_memory=True)  # the XL cache holds a segment too
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        model.load_memory(path)
    assert_unchanged(model, before)


def test_a_changed_value_is_caught_by_the_checksum(tmp_path) -> None:
    path = tmp_path / "memory.safetensors"
    filled().save_memory(path)
    rewrite(path, lambda t, m: t["layer.1.values"].view(-1).__setitem__(7, 0.5), checksum=True)
    model = filled()
    before = snapshot(model)
    with pytest.raises(ValueError, match="does not match its checksum"):
        model.load_memory(path)
    assert_unchanged(model, before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.bfloat16])
def test_keys_of_another_float_dtype_are_cast_and_never_switch_the_memorys_dtype(tmp_path, dtype) -> None:
    path = tmp_path / "memory.safetensors"
    source = filled()
    source.save_memory(path)
    rewrite(path, lambda t, m: t.update({"layer.1.keys": t["layer.1.keys"].to(dtype)}))
    model = filled()
    model.load_memory(path)
    assert model.memory.layers[1].keys.dtype == torch.float32
    torch.testing.assert_close(model.memory.layers[1].keys, source.memory.layers[1].keys.to(dtype).float())


def test_a_loaded_memory_does_not_depend_on_its_file_afterwards(tmp_path) -> None:
    path = tmp_path / "memory.safetensors"
    filled().save_memory(path)
    model = tiny_memorizing("llama", combine="joint")
    model.load_memory(path)
    before = snapshot(model)
    path.write_bytes(path.read_bytes()[:100])  # overwritten in place, shorter: a mapped view would now crash
    assert_unchanged(model, before)


def test_non_finite_keys_are_never_stored_and_do_not_silence_the_row() -> None:
    model = filled()
    first = torch.randint(3, 96, (2, 16), generator=torch.Generator().manual_seed(3))
    embeddings = model.get_input_embeddings()(first).detach()
    embeddings[0, 5] = math.nan  # one token of row 0 becomes NaN (and every later token of the row in later layers)
    model(inputs_embeds=embeddings, update_memory=True)
    memory = model.memory.layers[1]
    assert torch.isfinite(memory.keys[:, :, : int(memory.lengths.max())]).all()
    assert int(memory.lengths[1]) == 30 and int(memory.lengths[0]) < 30  # row 1 untouched by row 0's NaN
    output = model(torch.randint(3, 96, (2, 16), generator=torch.Generator().manual_seed(4))).logits
    assert torch.isfinite(output).all() and output[0].abs().sum() > 0


def test_reset_takes_bool_masks_and_indices_and_refuses_the_rest() -> None:
    model = filled()
    model.reset_memory([True, False])
    assert model.memory.entries() == {1: [0, 15]}
    model = filled()
    model.reset_memory([1])
    assert model.memory.entries() == {1: [15, 0]}
    before = snapshot(model)
    for rows, message in (([0.0, 1.0], "indices"), ([True, False, True], "one flag per memory row"), ([5], "range")):
        with pytest.raises(ValueError, match=message):
            model.reset_memory(rows)
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"memory_dtype": "int8"}, "memory_dtype"),
        ({"combine": "bogus"}, "combine"),
        ({"memory_top_k": 0}, "memory_top_k"),
        ({"memory_layers": [5]}, "memory_layers"),
    ],
)
def test_from_pretrained_overrides_are_validated_like_the_config(tmp_path, override, message: str) -> None:
    filled().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        MemorizingForCausalLM.from_pretrained(tmp_path, **override)
    loaded = MemorizingForCausalLM.from_pretrained(tmp_path, memory_size=128)
    assert loaded.config.memory_size == 128 and loaded.memory.geometry.memory_size == 128


def test_inputs_of_the_wrong_shape_are_refused_before_anything_is_written() -> None:
    model = filled()
    before = snapshot(model)
    ids = torch.randint(3, 96, (2, 16))
    for kwargs, message in (
        ({"labels": ids[:, :8]}, "labels have shape"),
        ({"attention_mask": torch.ones(3, 16)}, "attention_mask has 3 rows"),
        ({"memory_reset": torch.tensor([True])}, "memory_reset must be a bool tensor of shape"),
        ({"memory": object()}, "memory must be a MemoryBank"),
    ):
        with pytest.raises((ValueError, TypeError), match=message):
            model(ids, update_memory=True, **kwargs)
    assert_unchanged(model, before)


def test_a_memory_file_name_is_looked_up_beside_local_weights_only_and_never_as_a_path_elsewhere(tmp_path) -> None:
    model = filled()
    model.save_pretrained(tmp_path / "checkpoint", save_memory=True)
    loaded = MemorizingForCausalLM.from_pretrained(tmp_path / "checkpoint")
    loaded.load_memory("memory.safetensors")  # a bare name: beside the weights
    with pytest.raises(FileNotFoundError, match="No memory file at runs/memory.safetensors"):
        loaded.load_memory("runs/memory.safetensors")  # a path: only here
    with pytest.raises(FileNotFoundError, match="nor beside the weights"):
        loaded.load_memory("other.safetensors")
