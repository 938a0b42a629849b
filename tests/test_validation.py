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
    save_file({name: tensor.contiguous().clone() for name, tensor in tensors.items()}, str(path), metadata=metadata)


def big(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in fp64 with one number that is finite there but not in the memory's fp32."""
    tensor = tensor.double()
    tensor.view(-1)[5] = 1e300
    return tensor


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
        (lambda t, m: t.__setitem__("tokens_seen", torch.full((2,), 2**63 - 5)), r"tokens_seen .*\[0, 2\*\*62\]"),
        # The XL cache (every layer's previous segment, [rows, kv_heads, tokens, head_dim] = [2, 2, 16, 8]).
        (
            lambda t, m: t.__setitem__("extra.keys.1", t["extra.keys.1"][:, :1]),
            r"extra.keys.1 has shape \(2, 1, 16, 8\), not .*\[2, 2, 16, 8\]",
        ),
        (
            lambda t, m: t.__setitem__("extra.keys.0", t["extra.keys.0"].repeat(1, 2, 1, 1)),
            r"extra.keys.0 has shape \(2, 4, 16, 8\)",
        ),
        (
            lambda t, m: t.__setitem__("extra.values.2", t["extra.values.2"][..., :4]),
            r"extra.values.2 has shape \(2, 2, 16, 4\), not .*\[2, 2, 16, 8\]",
        ),
        (lambda t, m: t.pop("extra.values.0"), "lacks extra.values.0: every layer 0-2 needs its keys and values"),
        (lambda t, m: [t.pop("extra.keys.2"), t.pop("extra.values.2")], "lacks extra.keys.2"),
        (
            lambda t, m: t.update({"extra.keys.999": t["extra.keys.0"], "extra.values.999": t["extra.values.0"]}),
            r"holds layers \[999\] that the model does not have \(its layers are 0-2\)",
        ),
        (lambda t, m: t.__setitem__("extra.keys.3", t["extra.keys.0"]), r"holds layers \[3\]"),
        (lambda t, m: t.__setitem__("extra.keys.01", t["extra.keys.0"]), "tensors a memory does not have"),
        (lambda t, m: t.__setitem__("extra.keys.1", t["extra.keys.1"].long()), "extra.keys.1 has dtype torch.int64"),
        (lambda t, m: t["extra.values.1"].view(-1).__setitem__(9, math.nan), "extra.values.1 holds non-finite"),
        (lambda t, m: t.__setitem__("extra.valid", t["extra.valid"].long()), "lacks a bool 'extra.valid'"),
        (lambda t, m: t.__setitem__("extra.valid", t["extra.valid"][:, :8]), r"extra.keys.0 has shape \(2, 2, 16, 8\)"),
        (
            lambda t, m: t.update({n: x[:1] for n, x in t.items() if n.startswith("extra.")}),
            "different numbers of rows",
        ),
        (lambda t, m: t.update({n: x[:0] for n, x in t.items()}), "the XL cache holds 16 tokens for no rows"),
        (lambda t, m: t.update({"extra.keys.0": big(t["extra.keys.0"])}), "extra.keys.0 holds non-finite numbers"),
        (lambda t, m: t.update({"layer.1.values": big(t["layer.1.values"])}), "values hold non-finite numbers"),
        # An unused slot (row 0 holds 15 of 64): a row without entries still gathers slot 0, weighted 0 (0 * NaN = NaN).
        (lambda t, m: t["layer.1.keys"][0, 1, 40].__setitem__(2, math.nan), "keys hold non-finite numbers"),
    ],
)
def test_a_damaged_memory_file_is_refused_before_anything_changes(tmp_path, change, message: str) -> None:
    path = tmp_path / "memory.safetensors"
    filled(xl_cache=True).save_memory(path)  # kNN memory, counters and the XL cache of every layer
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
    source = filled(xl_cache=True)
    source.save_memory(path)
    rewrite(path, lambda t, m: t.update({name: t[name].to(dtype) for name in ("layer.1.keys", "extra.values.2")}))
    for model in (filled(), filled(xl_cache=True)):  # an empty XL cache takes the model's dtype, a filled one keeps its
        model.load_memory(path)
        assert model.memory.layers[1].keys.dtype == model.memory.xl.values[2].dtype == torch.float32
        torch.testing.assert_close(model.memory.layers[1].keys, source.memory.layers[1].keys.to(dtype).float())
        torch.testing.assert_close(model.memory.xl.values[2], source.memory.xl.values[2].to(dtype).float())
        assert torch.equal(model.memory.xl.keys[2], source.memory.xl.keys[2])


def test_a_memory_of_unknown_depth_still_refuses_an_incomplete_xl_cache(tmp_path) -> None:
    from memorizing_hf.memory import MemoryBank
    from memorizing_hf.retrieval import ExactBackend

    path = tmp_path / "memory.safetensors"
    model = filled(xl_cache=True)
    model.save_memory(path)
    assert model.memory.xl_layers == 3  # known from the model: its decoder layers
    bank = MemoryBank(model.memory.geometry, ExactBackend)  # built by hand: no model to tell its layers
    assert bank.xl_layers is None
    bank.load(path)  # every layer up to the last is there
    assert bank.xl.keys.keys() == {0, 1, 2}
    rewrite(path, lambda t, m: t.update({"extra.keys.9": t["extra.keys.0"], "extra.values.9": t["extra.values.0"]}))
    for memory, message in (
        (bank, r"holds layers \[9\] that the model does not have \(its layers are 0-2\)"),  # those its cache holds
        (bank.new(), "lacks extra.keys.3: every layer 0-9 needs its keys and values"),  # empty: every one to the last
        (model.memory, r"holds layers \[9\] that the model does not have \(its layers are 0-2\)"),
    ):
        with pytest.raises(ValueError, match=message):
            memory.load(path)


def test_a_loaded_memory_does_not_depend_on_its_file_afterwards(tmp_path) -> None:
    path = tmp_path / "memory.safetensors"
    filled().save_memory(path)
    model = tiny_memorizing("llama", combine="joint")
    model.load_memory(path)
    before = snapshot(model)
    path.write_bytes(path.read_bytes()[:100])  # overwritten in place, shorter: a mapped view would now crash
    assert_unchanged(model, before)


def memory_layer_outputs(model: MemorizingForCausalLM, *args: object, **kwargs: object) -> torch.Tensor:
    """The memory layer's own output `[B, T, heads, head_dim]` in a forward of `model(*args, **kwargs)`."""
    captured = []
    hook = model.knn_attention["1"].register_forward_hook(lambda module, inputs, output: captured.append(output[0]))
    try:
        model(*args, **kwargs)
    finally:
        hook.remove()
    assert len(captured) == 1
    return captured[0].detach()


def test_non_finite_keys_are_never_stored_and_do_not_silence_the_row() -> None:
    model, clean = filled(), filled()  # the same weights and memory; `clean` reads the segment without the NaN
    first = torch.randint(3, 96, (2, 16), generator=torch.Generator().manual_seed(3))
    embeddings = model.get_input_embeddings()(first).detach()
    clean(inputs_embeds=embeddings.clone(), update_memory=True)
    embeddings[0, 5] = math.nan  # one token of row 0 becomes NaN (and every later token of the row in later layers)
    during = memory_layer_outputs(model, inputs_embeds=embeddings, update_memory=True)
    assert torch.isfinite(during[1]).all()  # the NaN stays in its row
    memory, reference = model.memory.layers[1], clean.memory.layers[1]
    for name in ("keys", "values"):
        assert torch.isfinite(getattr(memory, name)[:, :, : int(memory.lengths.max())]).all()
    # Row 0 keeps its 15 entries and at most the tokens before the NaN (on CPU sdpa spreads the NaN to every token of
    # the row already in layer 0, so it stores none of this segment); row 1 stores all 15 storable tokens.
    kept = int(memory.lengths[0])
    assert 15 <= kept <= 19 and memory.lengths[1] == 30 and reference.lengths.tolist() == [30, 30]
    for name in ("keys", "values", "positions"):
        stored, expected = getattr(memory, name), getattr(reference, name)
        assert torch.equal(stored[1], expected[1]), name  # row 1: bit-identical to a run without the NaN
        first = (slice(None), slice(0, kept)) if stored.dim() == 4 else (slice(0, kept),)
        assert torch.equal(stored[0][first], expected[0][first]), name  # row 0: what it held, and nothing else
    ids = torch.randint(3, 96, (2, 16), generator=torch.Generator().manual_seed(4))
    after = memory_layer_outputs(model, ids)
    # The memory layer's output for the NaN row is finite and not zero for any token (the bug made it exactly 0).
    assert torch.isfinite(after).all() and bool((after[0].abs().sum(dim=(1, 2)) > 0).all())
    assert torch.equal(after[1], memory_layer_outputs(clean, ids)[1])  # row 1 reads exactly what it would have
    output = model(ids).logits
    assert torch.isfinite(output).all() and output[0].abs().sum() > 0


def test_a_non_finite_token_in_the_xl_cache_does_not_reach_the_next_segment() -> None:
    model, clean = filled(xl_cache=True), filled(xl_cache=True)
    first = torch.randint(3, 96, (2, 16), generator=torch.Generator().manual_seed(3))
    embeddings = model.get_input_embeddings()(first).detach()
    clean(inputs_embeds=embeddings.clone(), update_memory=True)
    embeddings[0, 5] = math.nan
    model(inputs_embeds=embeddings, update_memory=True)
    xl = model.memory.xl
    assert not bool(xl.valid[0, 5]) and bool(xl.valid[1].all())
    assert all(torch.isfinite(tensor).all() for tensor in xl.state_tensors().values() if tensor.is_floating_point())
    ids = torch.randint(3, 96, (2, 16), generator=torch.Generator().manual_seed(4))
    logits, reference = model(ids).logits, clean(ids).logits
    assert torch.isfinite(logits).all()  # row 0 reads what was finite in its previous segment
    assert torch.equal(logits[1], reference[1])  # row 1 reads exactly what it would have


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


def test_a_memory_file_is_found_locally_and_a_missing_one_is_never_looked_up_on_the_hub(tmp_path, monkeypatch) -> None:
    source = filled()
    source.save_pretrained(tmp_path / "checkpoint", save_memory=True)

    def no_hub(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a Hub lookup: {args} {kwargs}")

    for target in (
        "huggingface_hub.hf_hub_download",
        "huggingface_hub.file_download.hf_hub_download",
        "transformers.utils.hub.hf_hub_download",
        "transformers.utils.hub.cached_file",
        "transformers.utils.cached_file",
        "memorizing_hf.modeling_memorizing.cached_file",
    ):
        monkeypatch.setattr(target, no_hub)
    monkeypatch.chdir(tmp_path)
    for missing, message in (
        ("does/not/exist.safetensors", "No memory file at does/not/exist.safetensors"),
        ("missing.safetensors", "not a file here, nor beside the weights in"),
    ):
        with pytest.raises(FileNotFoundError, match=message):
            MemorizingForCausalLM.from_pretrained(tmp_path / "checkpoint", memory_file=missing)
    expected = snapshot(source)
    for folder, memory_file in (
        (tmp_path / "checkpoint", "checkpoint/memory.safetensors"),  # a relative path, from the working directory
        ("checkpoint", "memory.safetensors"),  # a bare name, beside weights in a relative folder
    ):
        loaded = MemorizingForCausalLM.from_pretrained(folder, memory_file=memory_file)
        assert_unchanged(loaded, expected)  # exactly the saved memory, and a working model


class Deadline:
    """Fail (instead of hanging) if the block runs longer than `seconds`."""

    def __init__(self, seconds: int) -> None:
        self.seconds = seconds

    def __enter__(self) -> None:
        import signal

        def expire(signum: int, frame: object) -> None:
            raise TimeoutError(f"still running after {self.seconds} s")

        self.previous = signal.signal(signal.SIGALRM, expire)
        signal.alarm(self.seconds)

    def __exit__(self, *exc: object) -> None:
        import signal

        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.previous)


def test_a_memory_loaded_with_no_slots_grows_when_written(tmp_path) -> None:
    path = tmp_path / "memory.safetensors"
    filled().save_memory(path)
    empty = {"layer.1.written": torch.zeros(2, dtype=torch.long), "layer.1.positions": torch.zeros(2, 0).long()}
    rewrite(
        path,
        lambda t, m: t.update({**empty, **{f"layer.1.{n}": t[f"layer.1.{n}"][:, :, :0] for n in ("keys", "values")}}),
    )
    model = tiny_memorizing("llama", combine="joint")
    model.load_memory(path)
    assert model.memory.layers[1].keys.shape == (2, 2, 0, 8)
    ids = torch.randint(3, 96, (2, 16), generator=torch.Generator().manual_seed(5))
    with Deadline(60):  # the storage doubled from 0 slots: forever
        model(ids, memory_reset=torch.tensor([False, False]))
    assert model.memory.entries() == {1: [15, 15]}


def test_an_xl_cache_of_padding_only_keeps_its_rows_and_the_next_forward_works(tmp_path) -> None:
    model = tiny_memorizing("llama", combine="joint", xl_cache=True)
    ids = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(6))
    model(ids, attention_mask=torch.zeros(1, 6, dtype=torch.long), memory_reset=torch.tensor([True]))  # padding only
    path = tmp_path / "memory.safetensors"
    model.save_memory(path)
    for memory in (model.memory, model.new_memory()):
        memory.load(path)
        assert memory.xl.length == 6 and not memory.xl.valid.any() and memory.num_rows == 1
        before = memory.state_dict()
        # A read-only call of two prompts reads the one-row memory (it met the 1-row cache of padding and crashed).
        assert torch.isfinite(model(torch.randint(3, 96, (2, 6)), memory=memory).logits).all()
        with pytest.raises(ValueError, match="holds entries for 1 batch rows but this batch has 3 rows"):
            model(torch.randint(3, 96, (3, 6)), memory=memory, update_memory=True)
        after = memory.state_dict()
        assert all(
            torch.equal(after[n], t) if isinstance(t, torch.Tensor) else after[n] == t for n, t in before.items()
        )
        model(
            torch.randint(3, 96, (3, 6)), memory=memory, memory_reset=torch.ones(3, dtype=torch.bool)
        )  # new documents
        assert memory.num_rows == 3
