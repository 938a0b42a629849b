"""PEFT adapters on a memorizing model: LoRA plus the memory layers' gates, trained with MemorizingTrainer, saved,
reloaded and merged; the memory is never copied into an adapter."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainingArguments

from memorizing_hf.callbacks import MemorizingTrainer
from memorizing_hf.data import DocumentStreams, collate_segments
from memorizing_hf.memory import KNNMemory, MemoryBank

from .conftest import VOCAB, stored_positions, tiny_memorizing
from .test_callbacks import SEGMENT, TRAIN_DOCS

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")


def memory_tensors(memory: MemoryBank) -> dict[str, torch.Tensor]:
    """Everything a memory holds (its state dict without the geometry)."""
    return {name: tensor for name, tensor in memory.state_dict().items() if name != "geometry"}


def document(length: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def lora(model):
    """LoRA on the attention projections; the memory layers' own modules (gates, scales) trained whole."""
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=model.memory_module_names())
    return peft.get_peft_model(model, config)


def test_lora_and_gates_train_through_memorizing_trainer_and_reload_exactly(tmp_path) -> None:
    model = lora(tiny_memorizing("llama", combine="gate").train())
    gates_before = model.base_model.model.knn_attention["1"].gate_bias.detach().clone()
    args = TrainingArguments(
        str(tmp_path / "run"), per_device_train_batch_size=2, max_steps=4, learning_rate=5e-2, report_to="none",
        use_cpu=True, disable_tqdm=True, save_strategy="no", logging_steps=1,
    )  # fmt: skip
    trainer = MemorizingTrainer(
        model=model, args=args, train_dataset=DocumentStreams(TRAIN_DOCS, SEGMENT, 2), data_collator=collate_segments
    )
    trainer.train()
    knn = model.base_model.model.knn_attention["1"]
    assert not torch.equal(knn.gate_bias.detach(), gates_before)  # the active (trained) copy moved
    assert not model.base_model.model.memory.is_empty()  # training wrote the model's memory through PEFT

    model.save_pretrained(tmp_path / "adapter")
    saved = {name for name in peft.utils.load_peft_weights(str(tmp_path / "adapter"))}
    assert any("lora_A" in name for name in saved) and any("gate_bias" in name for name in saved)
    assert all(name.endswith(("lora_A.weight", "lora_B.weight", "gate_bias", "memory_scale")) for name in saved)

    reloaded = peft.PeftModel.from_pretrained(tiny_memorizing("llama", combine="gate"), tmp_path / "adapter").eval()
    model.eval()
    ids = torch.randint(3, 96, (2, SEGMENT), generator=torch.Generator().manual_seed(5))
    # the same memorize call: the same entries at the same positions, keys and values alike (LoRA changes them)
    text = document(50, seed=7)
    for reader in (model, reloaded):
        reader.reset_memory()
        reader.memorize([text], progress=False)
    trained, again = model.base_model.model, reloaded.base_model.model
    assert trained.memory.entries() == again.memory.entries() == {1: [len(text) - 1]}  # all but the sink
    assert stored_positions(trained) == stored_positions(again) == list(range(1, len(text)))
    torch.testing.assert_close(memory_tensors(again.memory), memory_tensors(trained.memory), atol=1e-6, rtol=1e-5)
    without = tiny_memorizing("llama", combine="gate")
    without.memorize([text], progress=False)
    assert not torch.allclose(without.memory.layers[1].values, trained.memory.layers[1].values, atol=1e-4)
    for reader in (model, reloaded):
        reader.reset_memory()
        reader(ids, memory_reset=torch.ones(2, dtype=torch.bool))  # the same document in both memories
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=1e-6, rtol=1e-5)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(ids).logits, reloaded(ids).logits, atol=1e-5, rtol=1e-4)


def test_memory_reset_after_peft_wrapping_clears_everything() -> None:
    base = tiny_memorizing("llama", combine="gate")
    model = lora(base)
    ids = torch.randint(3, 96, (2, SEGMENT), generator=torch.Generator().manual_seed(6))
    model(ids, update_memory=True)
    assert not base.memory.is_empty()
    model.reset_memory()
    assert base.memory.is_empty()
    # no module (the copies PEFT made of the memory layers' modules included) holds a memory of its own
    owners = [m for m in model.modules() for v in vars(m).values() if isinstance(v, (MemoryBank, KNNMemory))]
    assert owners == [base]


def test_save_memory_after_peft_wrapping_writes_the_memory_and_it_loads_back(tmp_path) -> None:
    base = tiny_memorizing("llama", combine="gate")
    model = lora(base)
    model.memorize([document(40, seed=8), document(25, seed=9)], progress=False)
    assert base.memory.entries() == {1: [39, 24]}  # all but each row's sink
    path = tmp_path / "memory.safetensors"
    model.save_memory(path)
    assert path.stat().st_size > 0
    for loaded in (base.new_memory(), tiny_memorizing("llama", combine="gate").memory):
        loaded.load(path)
        assert loaded.entries() == base.memory.entries()
        saved, back = memory_tensors(base.memory), memory_tensors(loaded)
        assert saved.keys() == back.keys() and all(torch.equal(saved[name], back[name]) for name in saved)
    fresh = lora(tiny_memorizing("llama", combine="gate"))
    fresh.load_memory(path)  # through the PEFT wrapper too
    assert fresh.base_model.model.memory.entries() == base.memory.entries()
    assert stored_positions(fresh.base_model.model, row=1) == list(range(1, 25))
