"""MemorizingTrainer and MemoryCallback against independent references: uninterrupted runs, a hand-written training
loop, and the batches themselves."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from transformers import TrainerCallback, TrainingArguments

from memorizing_hf.callbacks import MemorizingTrainer
from memorizing_hf.data import DocumentStreams, collate_segments

from .conftest import tiny_base, tiny_memorizing

SEGMENT = 16


pytestmark = pytest.mark.usefixtures("one_thread")


def documents(lengths: list[int], seed: int = 0) -> list[list[int]]:
    generator = np.random.default_rng(seed)
    return [generator.integers(3, 96, size=n).tolist() for n in lengths]


TRAIN_DOCS = documents([70, 40, 100, 55, 30, 90, 64, 45])
EVAL_DOCS = documents([50, 20, 35], seed=1)


def make_trainer(
    output_dir: Path, model=None, streams=None, callbacks=(), collator=collate_segments, **overrides
) -> MemorizingTrainer:
    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=2,
        per_device_eval_batch_size=1,
        max_steps=6,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        prediction_loss_only=True,
    )
    settings.update(overrides)
    args = TrainingArguments(**settings)
    return MemorizingTrainer(
        model=model if model is not None else tiny_memorizing().train(),
        args=args,
        train_dataset=streams if streams is not None else DocumentStreams(TRAIN_DOCS, SEGMENT, args.train_batch_size),
        eval_dataset=DocumentStreams(EVAL_DOCS, SEGMENT, args.per_device_eval_batch_size),
        data_collator=collator,
        callbacks=list(callbacks),
    )


def memory_tensors(model, path: Path) -> dict[str, torch.Tensor]:
    """Everything the memory holds, as written to its file."""
    model.save_memory(path)
    return load_file(path)


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], exact: bool = False):
    assert actual.keys() == expected.keys()
    for name in expected:
        if exact or not expected[name].is_floating_point():
            assert torch.equal(actual[name], expected[name]), name
        else:
            torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def losses(trainer: MemorizingTrainer) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


class BatchRecorder:
    """Records the batches the model reads in training mode (a forward pre-hook)."""

    def __init__(self, model) -> None:
        self.batches: list[dict[str, torch.Tensor]] = []
        model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        if module.training:
            self.batches.append({key: kwargs[key].clone() for key in ("input_ids", "attention_mask", "memory_reset")})


@pytest.mark.parametrize(
    ("checkpoint", "shuffle", "resume", "xl_cache"), [(3, False, "path", False), (8, True, "last", True)]
)
def test_resuming_mid_document_continues_exactly(
    tmp_path, checkpoint: int, shuffle: bool, resume: str, xl_cache: bool
) -> None:
    docs = documents([48, 32, 40, 40]) if shuffle else TRAIN_DOCS  # 6 steps per epoch: step 8 is inside epoch 2
    streams = DocumentStreams(docs, SEGMENT, 2, shuffle=shuffle, seed=1)
    model = tiny_memorizing(xl_cache=xl_cache).train()
    recorder = BatchRecorder(model)
    first = make_trainer(tmp_path / "a", model, streams, max_steps=10, save_strategy="steps", save_steps=checkpoint)
    first.train()
    folder = tmp_path / "a" / f"checkpoint-{checkpoint}"
    saved = load_file(folder / "memory.safetensors")
    following = recorder.batches[checkpoint]
    assert any(not reset and mask.any() for reset, mask in zip(following["memory_reset"], following["attention_mask"]))
    assert saved["layer.1.written"].gt(0).any(), "the checkpoint was taken with memory to restore"

    model = tiny_memorizing(xl_cache=xl_cache).train()
    resumed_recorder = BatchRecorder(model)
    second = make_trainer(
        tmp_path / "b",
        model,
        DocumentStreams(docs, SEGMENT, 2, shuffle=shuffle, seed=1),
        max_steps=10,
        save_strategy="steps",
        save_steps=checkpoint,
    )
    if resume == "last":
        shutil.copytree(folder, tmp_path / "b" / folder.name)
    second.train(resume_from_checkpoint=str(folder) if resume == "path" else True)

    assert len(resumed_recorder.batches) == 10 - checkpoint
    for got, expected in zip(resumed_recorder.batches, recorder.batches[checkpoint:]):
        assert_same_tensors(got, expected, exact=True)
    assert losses(second).keys() == losses(first).keys()  # the resumed log continues the checkpoint's
    np.testing.assert_allclose(list(losses(second).values()), list(losses(first).values()), rtol=1e-5)
    assert_same_tensors(dict(second.model.named_parameters()), dict(first.model.named_parameters()))
    assert_same_tensors(memory_tensors(second.model, tmp_path / "b.st"), memory_tensors(first.model, tmp_path / "a.st"))


def test_checkpoints_hold_the_memory_of_their_step(tmp_path) -> None:
    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            model.save_memory(tmp_path / f"step-{state.global_step}.st")

    trainer = make_trainer(tmp_path / "run", callbacks=[Snapshot()], max_steps=4, save_strategy="steps", save_steps=2)
    trainer.train()
    for step in (2, 4):
        saved = load_file(tmp_path / "run" / f"checkpoint-{step}" / "memory.safetensors")
        assert_same_tensors(saved, load_file(tmp_path / f"step-{step}.st"), exact=True)


@pytest.mark.parametrize(("xl_cache", "eval_rows"), [(False, 1), (True, 3)])
def test_evaluation_uses_its_own_memory_and_restores_the_training_memory(
    tmp_path, xl_cache: bool, eval_rows: int
) -> None:
    plain = make_trainer(tmp_path / "plain", tiny_memorizing(xl_cache=xl_cache).train())
    plain.train()
    evaluated = make_trainer(
        tmp_path / "evaluated",
        tiny_memorizing(xl_cache=xl_cache).train(),
        eval_strategy="steps",
        eval_steps=2,
        per_device_eval_batch_size=eval_rows,  # training batches have 2 rows
    )
    evaluated.train()
    assert sum("eval_loss" in entry for entry in evaluated.state.log_history) == 3
    assert losses(evaluated) == losses(plain)
    assert_same_tensors(dict(evaluated.model.named_parameters()), dict(plain.model.named_parameters()), exact=True)
    before = memory_tensors(evaluated.model, tmp_path / "before.st")
    assert_same_tensors(before, memory_tensors(plain.model, tmp_path / "plain.st"), exact=True)

    metrics = evaluated.evaluate()
    assert_same_tensors(memory_tensors(evaluated.model, tmp_path / "after.st"), before, exact=True)
    evaluated.predict(DocumentStreams(EVAL_DOCS, SEGMENT, eval_rows))
    assert_same_tensors(memory_tensors(evaluated.model, tmp_path / "predicted.st"), before, exact=True)

    reference = tiny_memorizing(xl_cache=xl_cache).eval()
    reference.load_state_dict(evaluated.model.state_dict())
    with torch.no_grad():
        batch_losses = [
            reference(**batch).loss
            for batch in DataLoader(
                DocumentStreams(EVAL_DOCS, SEGMENT, eval_rows), batch_size=eval_rows, collate_fn=collate_segments
            )
        ]
    assert metrics["eval_loss"] == pytest.approx(torch.stack(batch_losses).mean().item(), rel=1e-5)


@pytest.mark.parametrize("combine", ["gate", "joint"])
def test_memory_statistics_reach_the_loggers(tmp_path, combine: str) -> None:
    class LogRecorder(TrainerCallback):  # what TensorBoard / W&B callbacks receive
        logs: list[dict] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs))

    model = tiny_memorizing(combine=combine).train()
    batches = BatchRecorder(model).batches
    trainer = make_trainer(tmp_path, model, callbacks=[LogRecorder()], max_steps=3)
    trainer.train()
    logged = [logs for logs in LogRecorder.logs if "loss" in logs]
    assert len(logged) == 3
    # entries per row: every real token but each segment's first (an attention sink), since the row's last reset
    stored = torch.zeros(2)
    for step, batch in enumerate(batches):
        stored = torch.where(batch["memory_reset"], 0, stored) + (batch["attention_mask"].sum(1) - 1).clamp(min=0)
        expected_fill = stored.clamp(max=model.config.memory_size).mean().item() / model.config.memory_size
        assert logged[step]["memory/layer_1/fill"] == pytest.approx(expected_fill)
    heads = model.config.text_config.num_attention_heads
    if combine == "gate":
        gates = torch.sigmoid(model.knn_attention["1"].gate_bias).tolist()
        assert [logged[-1][f"memory/layer_1/gate_head_{h}"] for h in range(heads)] == pytest.approx(gates)
    else:
        shares = [logged[-1][f"memory/layer_1/memory_share_head_{h}"] for h in range(heads)]
        assert all(0 < share < 1 for share in shares)
    assert all(key in trainer.state.log_history[-2] for key in logged[-1])


def test_memory_is_cleared_when_training_and_every_epoch_begin(tmp_path) -> None:
    class EmptyAtStart(TrainerCallback):
        seen: list[tuple[str, bool]] = []

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.seen.append(("train", model.memory.is_empty()))

        def on_epoch_begin(self, args, state, control, model=None, **kwargs):
            self.seen.append(("epoch", model.memory.is_empty()))

        def on_epoch_end(self, args, state, control, model=None, **kwargs):
            self.seen.append(("end", model.memory.is_empty()))

    model = tiny_memorizing().train()
    model(torch.randint(3, 96, (3, SEGMENT)))  # memory left over from earlier use, for another batch size
    trainer = make_trainer(tmp_path, model, max_steps=8, streams=DocumentStreams(documents([40, 50, 30]), SEGMENT, 2))
    trainer.add_callback(EmptyAtStart())  # after the MemoryCallback
    trainer.train()
    assert EmptyAtStart.seen[:5] == [("train", True), ("epoch", True), ("end", False), ("epoch", True), ("end", False)]


def test_gradient_accumulation_reads_and_writes_memory_micro_batch_by_micro_batch(tmp_path) -> None:
    accumulation, steps, lr = 2, 3, 1e-2
    trainer = make_trainer(tmp_path, gradient_accumulation_steps=accumulation, max_steps=steps, learning_rate=lr)
    # transformers 5.3 (not later releases) hands the accumulation steps to accelerate, whose backward() divides every
    # micro-batch's loss by them; the reference follows whatever the accelerator does.
    scale = trainer.accelerator.gradient_accumulation_steps
    trainer.train()

    # Reference: micro-batches are consecutive segments of the same streams; each reads all earlier ones from memory
    # and is written after it is read; one optimizer step per `accumulation` micro-batches, loss summed over tokens.
    model = tiny_memorizing().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    loader = iter(DataLoader(DocumentStreams(TRAIN_DOCS, SEGMENT, 2), batch_size=2, collate_fn=collate_segments))
    for _ in range(steps):
        micro_batches = [next(loader) for _ in range(accumulation)]
        targets = sum(int(batch["labels"][:, 1:].ne(-100).sum()) for batch in micro_batches)
        for batch in micro_batches:
            logits = model(
                batch["input_ids"], attention_mask=batch["attention_mask"], memory_reset=batch["memory_reset"]
            ).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="sum")
            (loss / targets / scale).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    assert_same_tensors(dict(trainer.model.named_parameters()), dict(model.named_parameters()))
    assert_same_tensors(memory_tensors(trainer.model, tmp_path / "t.st"), memory_tensors(model, tmp_path / "r.st"))


def test_gradient_checkpointing_gives_the_same_run(tmp_path) -> None:
    plain = make_trainer(tmp_path / "plain", max_steps=4)
    plain.train()
    # transformers renamed gradient_checkpointing to activation_checkpointing after 5.3 (the old name is deprecated)
    renamed = "activation_checkpointing" in {field.name for field in dataclasses.fields(TrainingArguments)}
    flag = "activation_checkpointing" if renamed else "gradient_checkpointing"
    checkpointed = make_trainer(tmp_path / "checkpointed", max_steps=4, **{flag: True})
    checkpointed.train()
    assert getattr(checkpointed.model, f"is_{flag}")
    np.testing.assert_allclose(list(losses(checkpointed).values()), list(losses(plain).values()), rtol=1e-5)
    assert_same_tensors(dict(checkpointed.model.named_parameters()), dict(plain.model.named_parameters()))
    assert_same_tensors(
        memory_tensors(checkpointed.model, tmp_path / "c.st"), memory_tensors(plain.model, tmp_path / "p.st")
    )


def test_bf16_mixed_precision_on_cpu(tmp_path) -> None:
    fp32 = make_trainer(tmp_path / "fp32", max_steps=6, learning_rate=3e-3)
    fp32.train()
    bf16 = make_trainer(tmp_path / "bf16", max_steps=6, learning_rate=3e-3, bf16=True)
    bf16.train()
    bf16_losses, fp32_losses = list(losses(bf16).values()), list(losses(fp32).values())
    assert np.isfinite(bf16_losses).all()
    assert bf16_losses != fp32_losses, "autocast was in effect"
    np.testing.assert_allclose(bf16_losses, fp32_losses, rtol=2e-2)


def test_bad_setups_are_refused_with_clear_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"segment_length \(300\) exceeds the 256 positions"):
        make_trainer(tmp_path, streams=DocumentStreams(TRAIN_DOCS, 300, 2))
    with pytest.raises(ValueError, match=r"segment_length \(200\) exceeds the 128 positions .* with xl_cache=True"):
        make_trainer(tmp_path, model=tiny_memorizing(xl_cache=True), streams=DocumentStreams(TRAIN_DOCS, 200, 2))
    with pytest.raises(ValueError, match="batch_size=3 rows per process but per_device_train_batch_size=2"):
        make_trainer(tmp_path, streams=DocumentStreams(TRAIN_DOCS, SEGMENT, 3))
    with pytest.raises(ValueError, match="laid out for 2 process"):
        make_trainer(tmp_path, streams=DocumentStreams(TRAIN_DOCS, SEGMENT, 2, num_processes=2))
    with pytest.raises(TypeError, match="trains a MemorizingForCausalLM"):
        make_trainer(tmp_path, model=tiny_base())

    ids = torch.randint(3, 96, (4, SEGMENT))
    no_flags = datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    with pytest.raises(ValueError, match="no 'memory_reset' flags, but the model has kNN memory layers"):
        make_trainer(tmp_path, streams=no_flags.with_format("torch"), collator=None).train()


def test_resuming_without_the_memory_file_is_refused(tmp_path) -> None:
    make_trainer(tmp_path / "a", max_steps=2, save_strategy="steps", save_steps=2).train()
    (tmp_path / "a" / "checkpoint-2" / "memory.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="memory.safetensors"):
        make_trainer(tmp_path / "b", max_steps=4).train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
