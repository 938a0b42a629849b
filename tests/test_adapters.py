"""Memory adapters: save, load by folder or packaged name, and refuse what does not fit before any parameter changes."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from memorizing_hf import MemorizingForCausalLM
from memorizing_hf.adapters import CONFIG_NAME, WEIGHTS_NAME, packaged_adapters, read_adapter

from .conftest import tiny_base, tiny_memorizing


def trained_joint_model() -> MemorizingForCausalLM:
    """A tiny joint-mode model whose memory biases differ per head and layer, as a trained adapter's would."""
    model = tiny_memorizing("llama", memory_layers=[1, 2], combine="joint", memory_size=96, memory_top_k=8)
    with torch.no_grad():
        for index, module in enumerate(model.knn_attention.values()):
            module.memory_bias.copy_(torch.linspace(-1.0, 2.0, module.num_heads) + index)
    return model


def memory_parameters(model: MemorizingForCausalLM) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if name.startswith("knn_attention.")}


@pytest.mark.parametrize("combine", ["joint", "gate"])
def test_saved_adapter_rebuilds_the_same_model_on_a_fresh_base(combine: str, tmp_path, token_ids) -> None:
    trained = trained_joint_model() if combine == "joint" else tiny_memorizing("llama", memory_layers=[2])
    if combine == "gate":
        with torch.no_grad():
            trained.knn_attention["2"].gate_bias.copy_(torch.tensor([-1.0, 0.5, 1.0, 2.0]))
    trained.save_memory_adapter(tmp_path / "adapter")
    rebuilt = MemorizingForCausalLM.from_base_pretrained(tiny_base("llama"), memory_adapter=tmp_path / "adapter")
    assert rebuilt.config.memory_layers == trained.config.memory_layers
    assert rebuilt.config.combine == combine
    for name, tensor in memory_parameters(trained).items():
        torch.testing.assert_close(memory_parameters(rebuilt)[name], tensor, rtol=0, atol=0)
    first, second = token_ids(seed=1)[:1], token_ids(seed=2)[:1]
    for model in (trained, rebuilt):
        model.eval()(first, update_memory=True)
    torch.testing.assert_close(rebuilt(second).logits, trained(second).logits)


def test_memory_bias_changes_what_memory_contributes(token_ids) -> None:
    plain = tiny_memorizing("llama", memory_layers=[1, 2], combine="joint", memory_size=96, memory_top_k=8)
    biased = trained_joint_model()
    first, second = token_ids(seed=1)[:1], token_ids(seed=2)[:1]
    torch.testing.assert_close(plain(second).logits, biased(second).logits)  # empty memory: the bias reads nothing
    for model in (plain, biased):
        model(first, update_memory=True)
    assert not torch.allclose(plain(second).logits, biased(second).logits)


def test_adapter_settings_can_be_overridden_but_not_its_layers(tmp_path) -> None:
    trained_joint_model().save_memory_adapter(tmp_path / "adapter")
    larger = MemorizingForCausalLM.from_base_pretrained(
        tiny_base("llama"), memory_adapter=tmp_path / "adapter", memory_size=512
    )
    assert larger.config.memory_size == 512 and larger.config.memory_layers == [1, 2]
    with pytest.raises(ValueError, match=r"does not fit this model's memory layers: missing \[\], unknown"):
        MemorizingForCausalLM.from_base_pretrained(
            tiny_base("llama"), memory_adapter=tmp_path / "adapter", memory_layers=[1]
        )


def test_adapter_of_another_base_is_refused(tmp_path) -> None:
    trained_joint_model().save_memory_adapter(tmp_path / "adapter")
    config = tiny_base("llama").config
    config.num_key_value_heads = 1
    other = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match=r"trained on another base model: num_key_value_heads 2 \(this model: 1\)"):
        MemorizingForCausalLM.from_base_pretrained(other, memory_adapter=tmp_path / "adapter")


def _damage(folder, kind: str) -> None:
    weights = load_file(folder / WEIGHTS_NAME)
    name = next(iter(weights))
    if kind == "nan":
        weights[name][0] = float("nan")
    elif kind == "int":
        weights[name] = weights[name].long()
    elif kind == "shape":
        weights[name] = weights[name][:-1].clone()
    elif kind == "unknown":
        weights["knn_attention.1.surprise"] = torch.zeros(3)
    elif kind == "config":
        (folder / CONFIG_NAME).write_text(json.dumps([1, 2]))
        return
    save_file(weights, folder / WEIGHTS_NAME)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("nan", "must hold finite floating-point numbers"),
        ("int", "must hold finite floating-point numbers"),
        ("shape", "has shape"),
        ("unknown", r"unknown \['knn_attention.1.surprise'\]"),
        ("config", "must be a JSON object with the objects 'memory' and 'base'"),
    ],
)
def test_damaged_adapter_is_refused_with_its_problem(kind: str, message: str, tmp_path) -> None:
    trained_joint_model().save_memory_adapter(tmp_path / "adapter")
    _damage(tmp_path / "adapter", kind)
    with pytest.raises(ValueError, match=message):
        MemorizingForCausalLM.from_base_pretrained(tiny_base("llama"), memory_adapter=tmp_path / "adapter")


def test_unknown_adapter_names_the_packaged_ones(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="give a packaged name"):
        MemorizingForCausalLM.from_base_pretrained(tiny_base("llama"), memory_adapter=tmp_path / "nothing")


@pytest.mark.parametrize("name", packaged_adapters())
def test_packaged_adapter_fits_its_base_shape(name: str) -> None:
    """Each packaged adapter loads onto a random model of its base's shape (no weights need fetching)."""
    memory, base, weights = read_adapter(name)
    config = transformers.AutoConfig.for_model(
        base["model_type"], **{key: value for key, value in base.items() if key != "model_type"},
        intermediate_size=64, vocab_size=64,
    )  # fmt: skip
    model = MemorizingForCausalLM.from_base_pretrained(
        transformers.AutoModelForCausalLM.from_config(config), memory_adapter=name
    )
    assert model.config.memory_layers == memory["memory_layers"]
    for parameter_name, tensor in weights.items():
        torch.testing.assert_close(memory_parameters(model)[parameter_name], tensor, rtol=0, atol=0)


def test_at_least_one_adapter_is_packaged() -> None:
    assert packaged_adapters()
