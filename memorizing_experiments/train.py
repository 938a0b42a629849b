"""Train a memorizing model on long documents with the Hugging Face Trainer, from a YAML recipe.

    python training/train.py configs/tiny_smoke.yaml [section.key=value ...]
    accelerate launch --config_file configs/accelerate/ddp.yaml training/train.py configs/smollm2_stdlib.yaml

A recipe has four sections, and an optional fifth (training/README.md explains them with the recipes in configs/):

    model:    pretrained: smollm2 or a local checkpoint folder  |  config: a transformers config, trained from scratch
              tokenizer: bytes, smollm2 or a folder (default: the pretrained model's)
              trainable: regexes of the parameter names to train (default: all)
    memory:   MemorizingConfig fields (memory_layers, memory_size, memory_top_k, combine, gate_init, ...), and
              learning_rate: of the memory layers' own parameters (gate, scale); memory_layers: [] trains the base
              model without memory (the fair baseline: same data, steps and seed)
    data:     source: stdlib, hol_light, austen, latex, python_docs or a folder (with pattern: a glob), or a list
              split: train or held_out (of the corpora prepared by memorizing_experiments.corpora), or none: all
              documents
              segment_length; max_documents, min_tokens, max_tokens, documents_per_source; eval_documents (held out,
              by document); shuffle
    training: TrainingArguments fields (output_dir, max_steps, per_device_train_batch_size, learning_rate, ...)
    peft:     peft.LoraConfig fields (r, target_modules, lora_alpha, ...): LoRA adapters added to the memorizing model
              after conversion; modules_to_save defaults to the memory layers' modules (their gates and scales),
              everything else is frozen. The adapter is saved in output_dir (and in every checkpoint).

Overrides on the command line use the same names: `training.max_steps=10 data.source=./my_texts`.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import datasets
import torch
import yaml
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    ByT5Tokenizer,
    PreTrainedModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from memorizing_hf import MemorizingConfig, MemorizingForCausalLM
from memorizing_hf.callbacks import MemorizingTrainer, memorizing_model
from memorizing_hf.data import DocumentStreams, collate_segments, tokenize_documents

from . import sources
from .corpora import CORPORA, load_documents, load_split

DEFAULTS = {
    "model": {"pretrained": None, "config": None, "tokenizer": None, "trainable": None},
    "memory": {},
    "data": {
        "source": None,
        "split": None,
        "pattern": "**/*",
        "segment_length": 512,
        "max_documents": None,
        "min_tokens": 2,
        "max_tokens": None,
        "documents_per_source": None,
        "eval_documents": 0,
        "shuffle": True,
    },
    "training": {"report_to": "none", "prediction_loss_only": True},
    "peft": {},
}
ALLOWED = {
    "model": set(DEFAULTS["model"]),
    "memory": set(inspect.signature(MemorizingConfig.__init__).parameters) - {"self", "text_config", "kwargs"}
    | {"learning_rate"},
    "data": set(DEFAULTS["data"]),
    "training": {field.name for field in dataclasses.fields(TrainingArguments) if field.init},
    "peft": None,  # the fields of peft.LoraConfig, read when a recipe has a peft section (peft is optional)
}


def load_config(path: str | Path, overrides: list[str] = ()) -> dict[str, dict[str, Any]]:
    """The recipe at `path` with `section.key=value` overrides, on top of DEFAULTS; unknown keys raise."""
    recipe = yaml.safe_load(Path(path).read_text()) or {}
    for override in overrides:
        key, equals, value = override.partition("=")
        section, dot, name = key.partition(".")
        if not equals or not dot:
            raise ValueError(f"Override {override!r} is not of the form section.key=value.")
        recipe.setdefault(section, {})[name] = parse_value(value)
    config = {section: dict(values) for section, values in DEFAULTS.items()}
    for section, values in recipe.items():
        if section not in ALLOWED:
            raise ValueError(f"{path}: unknown section {section!r}; the sections are {', '.join(ALLOWED)}.")
        allowed = ALLOWED[section] if section != "peft" or not values else lora_fields()
        for key, value in (values or {}).items():
            if key not in allowed:
                raise ValueError(f"{path}: unknown key {section}.{key}{_suggestion(key, allowed, section)}")
            config[section][key] = value
    return config


def parse_value(value: str) -> Any:
    """A command-line value read as YAML (`[4096, 8192]`, `1e-4`, `null`), except that the words YAML 1.1 reads as
    booleans (no/yes/on/off) stay words (eval_strategy=no)."""
    parsed = yaml.safe_load(value)
    keep_word = isinstance(parsed, bool) and value.strip().lower() not in ("true", "false")
    return value.strip() if keep_word else parsed


def _suggestion(key: str, allowed: set[str], section: str) -> str:
    close = difflib.get_close_matches(key, allowed, n=3)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    if section == "training":
        return f"{hint}; training takes the fields of transformers.TrainingArguments."
    if section == "peft":
        return f"{hint}; peft takes the fields of peft.LoraConfig."
    return f"{hint}; allowed in {section}: {', '.join(sorted(allowed))}."


def lora_fields() -> set[str]:
    """The keys a recipe's peft section may have: the fields of peft.LoraConfig."""
    try:
        import peft
    except ImportError as error:
        raise ValueError("A recipe with a peft section needs the peft package: pip install peft.") from error
    return {field.name for field in dataclasses.fields(peft.LoraConfig) if field.init}


def add_lora(model: PreTrainedModel, spec: dict[str, Any]):
    """`model` wrapped by peft with LoRA adapters (`spec`: peft.LoraConfig fields); unless `spec` says otherwise,
    the memory layers' own modules (gates, scales) are in modules_to_save, so they train beside the adapters. PEFT
    freezes every other parameter."""
    import peft

    spec = dict(spec)
    if isinstance(model, MemorizingForCausalLM):
        spec.setdefault("modules_to_save", model.memory_module_names())
    return peft.get_peft_model(model, peft.LoraConfig(**spec))


def load_tokenizer(name: str):
    """`bytes` (a byte-level tokenizer that needs no files), `smollm2`, or a local tokenizer folder."""
    if name == "bytes":
        return ByT5Tokenizer(extra_ids=0)
    return AutoTokenizer.from_pretrained(sources.smollm2_path() if name == "smollm2" else name)


def build_model(
    spec: dict[str, Any], memory: dict[str, Any], lora: dict[str, Any] | None = None
) -> tuple[PreTrainedModel, Any]:
    """The memorizing model (pretrained or from scratch, then partly frozen) and its tokenizer; with
    `memory_layers: []`, the base model itself (no memory); with `lora` (a recipe's peft section), the model with
    LoRA adapters (a peft.PeftModel)."""
    pretrained, config = spec["pretrained"], spec["config"]
    if (pretrained is None) == (config is None):
        raise ValueError("model: give exactly one of pretrained (smollm2 or a folder) or config (from scratch).")
    if lora and spec["trainable"] is not None:
        raise ValueError("model.trainable and peft exclude each other: with LoRA, PEFT decides what trains.")
    tokenizer = load_tokenizer(spec["tokenizer"] or pretrained)
    if pretrained is not None:
        path = sources.smollm2_path() if pretrained == "smollm2" else pretrained
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    else:
        config = dict(config)
        defaults = {name: getattr(tokenizer, name) for name in ("pad_token_id", "bos_token_id", "eos_token_id")}
        defaults["vocab_size"] = len(tokenizer)
        text_config = AutoConfig.for_model(config.pop("model_type"), **{**defaults, **config})
        base = AutoModelForCausalLM.from_config(text_config)
    memory = {key: value for key, value in memory.items() if key != "learning_rate"}
    trainable = spec["trainable"]
    if memory.get("memory_layers") == []:
        model = base.train()
        if trainable is not None:  # the same recipe without memory: patterns of memory parameters match nothing here
            trainable = [pattern for pattern in trainable if not re.search(pattern, "knn_attention.0.gate_bias")]
    else:
        model = MemorizingForCausalLM.from_base_pretrained(base, **memory).train()
    if trainable is not None:
        freeze_all_but(model, trainable)
    if lora:
        model = add_lora(model, lora)
    return model, tokenizer


def freeze_all_but(model: torch.nn.Module, patterns: list[str]) -> None:
    """Train only the parameters whose name matches one of the regexes `patterns`."""
    unused = set(patterns)
    for name, parameter in model.named_parameters():
        matches = {pattern for pattern in patterns if re.search(pattern, name)}
        parameter.requires_grad_(bool(matches))
        unused -= matches
    if unused:
        raise ValueError(f"model.trainable: {sorted(unused)} match no parameter name (e.g. {name!r}).")


def build_data(
    spec: dict[str, Any], tokenizer, args: TrainingArguments
) -> tuple[DocumentStreams, DocumentStreams | None, list[str]]:
    """Training streams, evaluation streams (held-out documents, or None) and the held-out documents' names."""
    if spec["source"] is None:
        raise ValueError(f"data.source is required: one of {', '.join(CORPORA)}, a folder, or a list of them.")
    seed = args.data_seed if args.data_seed is not None else args.seed
    names = spec["source"] if isinstance(spec["source"], list) else [spec["source"]]
    tokenized = datasets.concatenate_datasets([load_tokenized(name, spec, tokenizer, seed) for name in names])
    held_out_names: list[str] = []
    held_out = None
    if spec["eval_documents"]:
        split = tokenized.train_test_split(test_size=spec["eval_documents"], seed=seed)
        tokenized, held_out = split["train"], split["test"]
        held_out_names = list(held_out["name"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train = DocumentStreams(
        tokenized,
        spec["segment_length"],
        args.per_device_train_batch_size,
        shuffle=spec["shuffle"],
        seed=seed,
        pad_token_id=pad,
    )
    evaluation = None
    if held_out is not None:
        evaluation = DocumentStreams(
            held_out, spec["segment_length"], args.per_device_eval_batch_size, pad_token_id=pad
        )
    return train, evaluation, held_out_names


def load_tokenized(source: str, spec: dict[str, Any], tokenizer, seed: int) -> datasets.Dataset:
    """The tokenized documents of one source: a split of its prepared corpus or all its documents, the first
    `max_documents`, filtered and cut by length, then `documents_per_source` of them drawn with `seed`."""
    if spec["split"] is not None:
        documents = load_split(source, spec["split"])
    else:
        documents = load_documents(source, spec["pattern"])
    if spec["max_documents"] is not None:
        documents = documents.select(range(min(spec["max_documents"], len(documents))))
    documents = documents.select_columns(["name", "text"])
    tokenized = tokenize_documents(documents, tokenizer, min_tokens=spec["min_tokens"], max_tokens=spec["max_tokens"])
    count = spec["documents_per_source"]
    if count is not None and count < len(tokenized):
        tokenized = tokenized.shuffle(seed=seed).select(range(count))
    return tokenized


class StepTimes(TrainerCallback):
    """Seconds of every optimizer step (forward, backward, update), written to `step_times.json` at the end."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            (Path(args.output_dir) / "step_times.json").write_text(json.dumps(self.seconds))


def build_trainer(config: dict[str, dict[str, Any]]) -> Trainer:
    """The model, the data and the trainer a recipe describes (a plain `Trainer` for a model without memory)."""
    args = TrainingArguments(**config["training"])
    set_seed(args.seed)
    with args.main_process_first(desc="fetching the model and the documents"):
        model, tokenizer = build_model(config["model"], config["memory"], config["peft"])
        train, evaluation, held_out = build_data(config["data"], tokenizer, args)
    if args.should_save:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.output_dir) / "held_out_documents.json").write_text(json.dumps(held_out, indent=1))
    if args.process_index == 0:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(
            f"{train.num_documents} training documents ({len(held_out)} held out), {train.steps_per_epoch} steps "
            f"per epoch; {trainable:,} of {model.num_parameters():,} parameters trained",
            flush=True,
        )
    kwargs = {
        "model": model,
        "args": args,
        "train_dataset": train,
        "eval_dataset": evaluation,
        "data_collator": collate_segments,
        "callbacks": [StepTimes()],
    }
    if not isinstance(memorizing_model(model), MemorizingForCausalLM):
        return Trainer(**kwargs)
    return MemorizingTrainer(**kwargs, memory_learning_rate=config["memory"].get("learning_rate"))


def main(argv: list[str] | None = None) -> Trainer:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        raise SystemExit(__doc__)
    trainer = build_trainer(load_config(argv[0], argv[1:]))
    trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
    trainer.save_model()
    trainer.save_state()
    return trainer


if __name__ == "__main__":
    main()
