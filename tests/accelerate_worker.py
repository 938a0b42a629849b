"""Run under `accelerate launch` by tests/test_train.py: trains a recipe with memorizing_experiments.train and writes,
for this process, the batches its model read, its parameters afterwards and its distributed backend
(`<output_dir>/process_<index>.pt`)."""

import sys
from pathlib import Path

import torch
from accelerate import PartialState

from memorizing_experiments import train

batches = []


def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    if module.training:
        batches.append({key: kwargs[key].clone() for key in ("input_ids", "attention_mask", "labels", "memory_reset")})


trainer = train.build_trainer(train.load_config(sys.argv[1], sys.argv[2:]))
trainer.model.register_forward_pre_hook(record, with_kwargs=True)
trainer.train()
trainer.save_model()
trainer.save_state()
parameters = {name: parameter.detach().clone() for name, parameter in trainer.model.named_parameters()}
torch.save(
    {"batches": batches, "parameters": parameters, "backend": PartialState().backend},
    Path(trainer.args.output_dir) / f"process_{trainer.args.process_index}.pt",
)
