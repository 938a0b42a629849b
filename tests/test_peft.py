"""PEFT adapters on a memorizing model: LoRA plus the memory layers' gates, trained with MemorizingTrainer, saved,
reloaded and merged; the memory is never copied into an adapter."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainingArguments

from memorizing_hf.callbacks import MemorizingTrainer
from memorizing_hf.data import DocumentStreams, collate_segments
from memorizing_hf.memory import KNNMemory, MemoryBank

from .conftest import tiny_memorizing
from .test_callbacks import SEGMENT, TRAIN_DOCS

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")


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
