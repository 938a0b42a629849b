"""memorizing_experiments.train with a recipe's peft section: LoRA adapters plus the memory layer's gate and scale
train through MemorizingTrainer, the adapter is saved, and reloading it onto the same conversion gives the same
logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from transformers import set_seed

from memorizing_experiments import train

from .test_train import ROOT, tiny_recipe

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")


def lora_recipe(tmp_path: Path, **peft_section: object) -> Path:
    """The tiny recipe of tests/test_train.py (memory layer 2 of 4, gate mode) with LoRA instead of `trainable`."""
    path = tiny_recipe(
        tmp_path,
        model={"trainable": None},
        memory={"combine": "gate", "learning_rate": 5e-2},
        training={"max_steps": 4, "save_steps": 2},
    )
    recipe = yaml.safe_load(path.read_text())
    recipe["peft"] = {"r": 8, "target_modules": ["q_proj", "v_proj"], **peft_section}
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_lora_recipe_trains_adapters_and_gates_and_reloads_exactly(tmp_path) -> None:
    recipe = lora_recipe(tmp_path)
    trainer = train.main([str(recipe)])
    model, run = trainer.model, tmp_path / "run"
    assert isinstance(model, peft.PeftModel)

    # Trained: the LoRA matrices and the memory layer's gate and scale (PEFT's trained copies), nothing else.
    trained = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    lora = [name for name in trained if ".lora_A." in name or ".lora_B." in name]
    memory = [name for name in trained if "knn_attention.2.modules_to_save." in name]
    assert sorted(trained) == sorted(lora + memory)
    assert len(lora) == 4 * 2 * 2  # 4 layers x (q_proj, v_proj) x (A, B)
    assert {name.rsplit(".", 1)[1] for name in memory} == {"gate_bias", "memory_scale"}
    knn = model.base_model.model.knn_attention["2"]
    assert not torch.equal(knn.gate_bias, knn.original_module.gate_bias)  # the gate moved off its start

    # The adapter, in output_dir and in the checkpoint (with the memory): LoRA weights, gate and scale only.
    for folder in (run, run / "checkpoint-2"):
        assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    assert (run / "checkpoint-2" / "memory.safetensors").is_file()
    assert not (run / "model.safetensors").exists()
    saved = set(peft.utils.load_peft_weights(str(run)))
    assert saved and all(
        name.endswith(("lora_A.weight", "lora_B.weight", "gate_bias", "memory_scale")) for name in saved
    )

    # Reloaded onto the same conversion (the recipe's model, rebuilt with its seed): the same logits.
    config = train.load_config(recipe)
    set_seed(config["training"]["seed"])
    base, _ = train.build_model(config["model"], config["memory"])
    reloaded = peft.PeftModel.from_pretrained(base, run).eval()
    model.eval()
    ids = torch.randint(3, 250, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for reader in (model, reloaded):
            reader.reset_memory()
            reader(ids, memory_reset=torch.ones(2, dtype=torch.bool))  # the same document in both memories
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=1e-6, rtol=1e-5)


def test_peft_section_is_validated(tmp_path) -> None:
    recipe = lora_recipe(tmp_path)
    with pytest.raises(ValueError, match=r"unknown key peft\.rank; peft takes the fields of peft\.LoraConfig"):
        train.load_config(recipe, ["peft.rank=4"])
    config = train.load_config(recipe, ["model.trainable=[lm_head]"])
    with pytest.raises(ValueError, match="model.trainable and peft exclude each other"):
        train.build_model(config["model"], config["memory"], config["peft"])


def test_shipped_lora_recipe_names_lora_fields() -> None:
    config = train.load_config(ROOT / "configs" / "smollm2_lora_gate.yaml")
    assert config["peft"]["target_modules"] == ["q_proj", "v_proj"] and config["memory"]["combine"] == "gate"
