"""Run under `accelerate launch` with an FSDP or DeepSpeed configuration by tests/test_train_sharded.py: trains a
recipe with memorizing_experiments.train (resuming when the recipe says so) and writes, for this process,
`<output_dir>/process_<index>.pt`: the batches its model read, the loss of each of its training steps, its memory's
entries, how its parameters were sharded and their full values afterwards.

accelerate (1.16) turns FSDP and DeepSpeed on only for accelerator devices. On CPU (`use_cpu`) the processes run as
MULTI_CPU, i.e. plain DDP, and the plugin is dropped: AcceleratorState.__init__ sets FSDP only when `distributed_type
in [MULTI_GPU, MULTI_NPU, ...]` (no MULTI_CPU there) and DeepSpeed only when `not cpu`. Without `use_cpu` no process
group is formed (no accelerator, no default backend), so every process trains alone. torch's FSDP2 and DeepSpeed's CPU
accelerator (DS_ACCELERATOR=cpu) both run on CPU with gloo, so on a machine without accelerators this worker puts the
plugin back into accelerate's state, with the same assignments accelerate makes for GPUs; nothing else is changed."""

import sys
from pathlib import Path

import torch
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType

_accelerator_state_init = AcceleratorState.__init__


def _sharded_on_cpu(self, *args, fsdp_plugin=None, deepspeed_plugin=None, **kwargs):
    _accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, deepspeed_plugin=deepspeed_plugin, **kwargs)
    if self.distributed_type != DistributedType.MULTI_CPU:
        return
    # AcceleratorState is shared and re-read from PartialState at every construction: keep the plugin across them
    fsdp_plugin = fsdp_plugin or self.__dict__.get("_cpu_fsdp_plugin")
    deepspeed_plugin = deepspeed_plugin or self.__dict__.get("_cpu_deepspeed_plugin")
    if fsdp_plugin is not None:
        self._cpu_fsdp_plugin = fsdp_plugin
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
    elif deepspeed_plugin is not None:
        self._cpu_deepspeed_plugin = deepspeed_plugin
        self.distributed_type = DistributedType.DEEPSPEED
        deepspeed_plugin.set_mixed_precision(self._mixed_precision)
        deepspeed_plugin.select(_from_accelerator_state=True)
        self.deepspeed_plugins = deepspeed_plugin


if torch.accelerator.current_accelerator() is None:
    AcceleratorState.__init__ = _sharded_on_cpu

from memorizing_experiments import train  # noqa: E402
from memorizing_hf.callbacks import memorizing_model  # noqa: E402

batches, losses = [], []


def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    if module.training:
        batches.append({key: kwargs[key].clone() for key in ("input_ids", "attention_mask", "labels", "memory_reset")})


trainer = train.build_trainer(train.load_config(sys.argv[1], sys.argv[2:]))
compute_loss = trainer.compute_loss


def recording_loss(model, inputs, *args, **kwargs):
    loss = compute_loss(model, inputs, *args, **kwargs)
    if model.training:
        losses.append((trainer.state.global_step + 1, float(loss.detach())))
    return loss


trainer.compute_loss = recording_loss
trainer.model.register_forward_pre_hook(record, with_kwargs=True)
trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
trainer.save_model()
trainer.save_state()
model = memorizing_model(trainer.model)
parameters = dict(model.named_parameters())
torch.save(
    {
        "distributed_type": str(trainer.accelerator.distributed_type),
        "batches": batches,
        "losses": losses,
        "entries": model.memory.entries(),
        "local_shapes": {
            name: tuple(getattr(parameter, "_local_tensor", parameter).shape) for name, parameter in parameters.items()
        },
        "sharded": {name: type(parameter).__name__ == "DTensor" for name, parameter in parameters.items()},
        # full_tensor() gathers a shard from every process: each process calls it for every parameter
        "parameters": {
            name: (parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter).detach().clone()
            for name, parameter in parameters.items()
        },
    },
    Path(trainer.args.output_dir) / f"process_{trainer.args.process_index}.pt",
)
