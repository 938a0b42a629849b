"""Training a memorizing model with the Hugging Face Trainer: the memory's life cycle.

The kNN memory is state outside the model's parameters, so the Trainer knows nothing of it. `MemorizingTrainer` and
the `MemoryCallback` it installs take care of it:

- Training reads and writes `model.memory`, passed explicitly to every training step; it starts empty, and so does
  every epoch (whose first batch also resets every row).
- `evaluate()` and `predict()` read and write a fresh memory of their own (`model.new_memory()`), so the training
  memory is untouched.
- Every checkpoint `checkpoint-N/` gets the memory (`memory.safetensors`, or `memory_<process>.safetensors` per
  process when there are several, like the Trainer's RNG states) and `train(resume_from_checkpoint=...)` loads it
  back. The Trainer skips the batches a resumed run has already seen, and `DocumentStreams` yields the same batches
  in every run, so a resumed run continues exactly where it stopped.
- Every training log gets, per memory layer, the memory's fill (entries / capacity, averaged over this process's
  rows), the gate of each head (gate mode) and the share of attention each head gives to memory (joint mode,
  averaged over the steps since the last log), so TensorBoard / W&B see them.
- Batches without `memory_reset` flags are refused: without them every row's memory would mix documents.
- A PEFT model (e.g. LoRA, with the memory layers' gates in `modules_to_save`) trains like the model it wraps.

Gradient accumulation: each micro-batch is the next segment of the same streams. It reads the memory written by
every earlier micro-batch (of the same optimizer step too) and writes its own keys and values after reading, exactly
as without accumulation; accumulation only changes how often the parameters are updated.

Why a Trainer subclass besides the callback: callbacks have no "evaluation begins" event, and they run after the
reporting integrations, so values a callback adds to the logs never reach TensorBoard or W&B.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import extract_model_from_parallel
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ._compat import checkpoint_folder_prefix, counts_predicted_labels, last_checkpoint
from .data import DocumentStreams
from .memory import MemoryBank
from .modeling_memorizing import MemorizingForCausalLM

MEMORY_FILE = "memory.safetensors"


def memorizing_model(model: torch.nn.Module) -> torch.nn.Module:
    """The memorizing model inside `model`: unwrapped from DistributedDataParallel / FSDP and from PEFT."""
    model = extract_model_from_parallel(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def memory_file_name(args: TrainingArguments) -> str:
    """Name of this process's memory file in a checkpoint folder."""
    return MEMORY_FILE if args.world_size <= 1 else f"memory_{args.process_index}.safetensors"


class MemoryCallback(TrainerCallback):
    """Clears the memory when training and every epoch begin, saves it with every checkpoint and restores it when
    training resumes from `resume_from` (set by `MemorizingTrainer.train`)."""

    def __init__(self) -> None:
        self.resume_from: str | None = None
        self._restored = False

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        model = memorizing_model(kwargs["model"])
        self._restored = self.resume_from is not None and state.global_step > 0
        if self._restored:
            model.load_memory(Path(self.resume_from) / memory_file_name(args))
        else:
            model.reset_memory()

    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self._restored:  # resuming inside this epoch: the restored memory is where the stream stopped
            self._restored = False
        else:
            memorizing_model(kwargs["model"]).reset_memory()

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        folder = Path(args.output_dir) / f"{checkpoint_folder_prefix()}-{state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        memorizing_model(kwargs["model"]).save_memory(folder / memory_file_name(args))


@counts_predicted_labels
class MemorizingTrainer(Trainer):
    """A `Trainer` for `MemorizingForCausalLM` that manages its memory (see the module docstring).

    Use it as the Trainer, with `DocumentStreams` data and `collate_segments` (`memory_learning_rate`: a learning rate
    of its own for the memory layers' gates and scales, see `create_optimizer`). The model may be a PEFT model
    wrapping a `MemorizingForCausalLM`:

        trainer = MemorizingTrainer(model=model, args=args, train_dataset=streams, data_collator=collate_segments)
        trainer.train()   # or trainer.train(resume_from_checkpoint=True)

    On construction it checks that `DocumentStreams` data fits the model and the arguments: segments no longer
    than the model's positions, as many rows per process as `per_device_*_batch_size`, as many processes as are
    running.
    """

    def __init__(self, *args: Any, memory_learning_rate: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.memory_learning_rate = memory_learning_rate
        model = memorizing_model(self.model)
        if not isinstance(model, MemorizingForCausalLM):
            raise TypeError(f"MemorizingTrainer trains a MemorizingForCausalLM, got {type(model).__name__}.")
        self.evaluation_memory: MemoryBank | None = None  # set while evaluate() / predict() run
        if self.args.n_gpu > 1:
            raise ValueError(
                "The kNN memory cannot be shared by DataParallel replicas: run one process per GPU "
                "(accelerate launch or torchrun)."
            )
        if self.args.world_size > 1 and not self.args.average_tokens_across_devices:
            raise ValueError(
                "Set average_tokens_across_devices=True (the default): near the end of an epoch a process may "
                "hold only padding, and its loss is then only defined relative to the tokens of all processes."
            )
        evals = self.eval_dataset.values() if isinstance(self.eval_dataset, dict) else [self.eval_dataset]
        _check_streams(self.train_dataset, model, self.args.per_device_train_batch_size, self.args, "train")
        for dataset in evals:
            _check_streams(dataset, model, self.args.per_device_eval_batch_size, self.args, "eval")
        self.memory_callback = MemoryCallback()
        self.add_callback(self.memory_callback)
        self._memory_shares: dict[int, list[list[float]]] = defaultdict(list)

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """`Trainer.create_optimizer`; with `memory_learning_rate`, the memory layers' own parameters (gates, scales)
        get that learning rate. They start from scratch while the pretrained weights want a small rate, so they need a
        much larger one to move within a few hundred steps; the scheduler scales both alike."""
        if self.memory_learning_rate is None or self.optimizer is not None:
            return super().create_optimizer(model)
        model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(model))
        groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = defaultdict(list)
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                memory = "knn_attention." in name
                groups[memory, name in decay and not memory].append(parameter)
        optimizer_class, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        self.optimizer = optimizer_class(
            [
                {
                    "params": parameters,
                    "weight_decay": self.args.weight_decay if decays else 0.0,
                    **({"lr": self.memory_learning_rate} if memory else {}),
                }
                for (memory, decays), parameters in groups.items()
            ],
            **optimizer_kwargs,
        )
        return self.optimizer

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        """`Trainer.train`; when resuming, the memory saved in the checkpoint is restored too."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_checkpoint(self.args.output_dir) or True  # True: the Trainer raises
        resumes = isinstance(resume_from_checkpoint, (str, os.PathLike))
        self.memory_callback.resume_from = str(resume_from_checkpoint) if resumes else None
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """`Trainer.evaluate` on a fresh memory of its own; the training memory is not touched."""
        self.evaluation_memory = memorizing_model(self.model).new_memory()
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self.evaluation_memory = None

    def predict(self, *args: Any, **kwargs: Any):
        """`Trainer.predict` on a fresh memory of its own; the training memory is not touched."""
        self.evaluation_memory = memorizing_model(self.model).new_memory()
        try:
            return super().predict(*args, **kwargs)
        finally:
            self.evaluation_memory = None

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any):
        """`Trainer.training_step`, reading and writing the model's memory."""
        return super().training_step(model, {**inputs, "memory": memorizing_model(model).memory}, *args, **kwargs)

    def prediction_step(self, model: torch.nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any):
        """`Trainer.prediction_step`, reading and writing the evaluation memory (the model's outside evaluation)."""
        memory = self.evaluation_memory if self.evaluation_memory is not None else memorizing_model(model).memory
        return super().prediction_step(model, {**inputs, "memory": memory}, *args, **kwargs)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """`Trainer.compute_loss`, refusing batches without reset flags; in joint mode it also collects the share of
        attention that goes to memory (gate values and fill are read from the model when logging)."""
        if inputs.get("memory_reset") is None:
            raise ValueError(
                "This batch has no 'memory_reset' flags, but the model has kNN memory layers "
                f"{memorizing_model(model).config.memory_layers}: without them every row's memory would "
                "mix documents. Train on DocumentStreams with collate_segments, or give every batch a bool "
                "'memory_reset' [batch] that is True where a row starts a new document."
            )
        if not model.training or memorizing_model(model).config.combine != "joint":
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = super().compute_loss(model, {**inputs, "output_memory_stats": True}, True, num_items_in_batch)
        for layer, shares in outputs["memory_stats"].get("memory_share", {}).items():
            self._memory_shares[layer].append(shares)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """`Trainer.log`; training logs (those with "loss") also get the memory statistics."""
        if "loss" in logs:
            logs.update(self._memory_logs())
        super().log(logs, start_time)

    def _memory_logs(self) -> dict[str, float]:
        model = memorizing_model(self.model)
        logs = {}
        for layer, entries in model.memory.entries().items():
            fill = sum(entries) / (len(entries) * model.config.memory_size) if entries else 0.0
            logs[f"memory/layer_{layer}/fill"] = fill
        for layer, module in model.knn_attention.items():
            if module.combine == "gate":
                bias = module.gate_bias.detach()
                bias = bias.full_tensor() if hasattr(bias, "full_tensor") else bias  # FSDP2 shards it (a DTensor)
                for head, gate in enumerate(torch.sigmoid(bias.float()).tolist()):
                    logs[f"memory/layer_{layer}/gate_head_{head}"] = gate
        for layer, shares in self._memory_shares.items():
            for head, share in enumerate(np.mean(shares, axis=0).tolist()):
                logs[f"memory/layer_{layer}/memory_share_head_{head}"] = share
        self._memory_shares.clear()
        return logs


def _check_streams(
    dataset: Any, model: MemorizingForCausalLM, batch_size: int, args: TrainingArguments, split: str
) -> None:
    """Refuse `DocumentStreams` whose layout does not match the model or the run (other data is not checked)."""
    if not isinstance(dataset, DocumentStreams):
        return
    positions = getattr(model.config.text_config, "max_position_embeddings", None)
    if positions is not None and model.config.xl_cache:
        positions //= 2  # the XL cache's previous segment comes first
    if positions is not None and dataset.segment_length > positions:
        cache = " with xl_cache=True" if model.config.xl_cache else ""
        raise ValueError(
            f"The {split} segment_length ({dataset.segment_length}) exceeds the {positions} positions the base "
            f"model has for a segment{cache} (max_position_embeddings): use segments of at most {positions} tokens."
        )
    if dataset.batch_size != batch_size:
        raise ValueError(
            f"The {split} DocumentStreams has batch_size={dataset.batch_size} rows per process but "
            f"per_device_{split}_batch_size={batch_size}: they must be equal, or rows would switch documents."
        )
    if dataset.num_processes != args.world_size:
        raise ValueError(
            f"The {split} DocumentStreams was laid out for {dataset.num_processes} process(es) but "
            f"{args.world_size} are running: build it with num_processes={args.world_size} (the default under "
            "accelerate)."
        )
