"""Memory adapters: the memory layers' own trained parameters (gates and scales, or joint mode's memory biases) with
the memory settings they were trained for, kept apart from the base weights.

An adapter is a folder with `memory_adapter.json` (the memory settings and the base model's shape) and
`memory_adapter.safetensors` (the `knn_attention.*` parameters): a few KB, so trained ones ship with the package,
under `memorizing_hf/adapters/<name>/`, and load by name:

    model = MemorizingForCausalLM.from_base_pretrained(base, memory_adapter="smollm2-135m-recall")
    model.save_memory_adapter("my_adapter")

Everything is checked before a parameter changes: the base model's shape, every tensor's name, shape, dtype and
finiteness.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

CONFIG_NAME = "memory_adapter.json"
WEIGHTS_NAME = "memory_adapter.safetensors"
PACKAGED = Path(__file__).parent / "adapters"
# The base model's shape an adapter was trained on: a base that differs in any of these cannot use it.
BASE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")


def packaged_adapters() -> list[str]:
    """Names of the adapters that ship with the package."""
    return sorted(path.parent.name for path in PACKAGED.glob(f"*/{CONFIG_NAME}"))


def adapter_folder(name_or_path: str | Path) -> Path:
    """The folder of a packaged adapter (by name) or of an adapter saved by `save_memory_adapter` (a path)."""
    if str(name_or_path) in packaged_adapters():
        return PACKAGED / str(name_or_path)
    folder = Path(name_or_path).expanduser()
    if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(
            f"No memory adapter {str(name_or_path)!r}: give a packaged name ({', '.join(packaged_adapters())}) or a "
            f"folder holding {CONFIG_NAME} and {WEIGHTS_NAME} (model.save_memory_adapter(folder))."
        )
    return folder


def base_shape(text_config: Any) -> dict[str, Any]:
    """The fields of a base model's config that an adapter depends on."""
    return {name: getattr(text_config, name, None) for name in BASE_FIELDS}


def read_adapter(name_or_path: str | Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """(memory settings, base shape, parameters) of an adapter, checked for form but not yet against a model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = adapter_folder(name_or_path)
    try:
        record = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{folder / CONFIG_NAME} is not a readable memory adapter config: {error}") from error
    if (
        not isinstance(record, dict)
        or not isinstance(record.get("memory"), dict)
        or not isinstance(record.get("base"), dict)
    ):
        raise ValueError(f"{folder / CONFIG_NAME} must be a JSON object with the objects 'memory' and 'base'.")
    try:
        weights = {name: tensor.clone() for name, tensor in load_file(folder / WEIGHTS_NAME).items()}
    except (OSError, SafetensorError) as error:
        raise ValueError(f"{folder / WEIGHTS_NAME} is not a readable safetensors file: {error}") from error
    for name, tensor in weights.items():
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise ValueError(f"{folder / WEIGHTS_NAME}: {name} must hold finite floating-point numbers.")
    return record["memory"], record["base"], weights


def check_base(base: dict[str, Any], text_config: Any, source: str) -> None:
    """Refuse a base model whose shape differs from the one the adapter was trained on."""
    differing = {name: (value, getattr(text_config, name, None)) for name, value in base.items()}
    differing = {name: pair for name, pair in differing.items() if pair[0] != pair[1]}
    if differing:
        details = ", ".join(f"{name} {want!r} (this model: {have!r})" for name, (want, have) in differing.items())
        raise ValueError(f"The memory adapter {source} was trained on another base model: {details}.")


def apply_adapter(model: nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Copy `weights` into the model's memory parameters: all of them, or none if any name or shape differs."""
    own = {name: parameter for name, parameter in model.named_parameters() if name.startswith("knn_attention.")}
    if set(own) != set(weights):
        missing, unknown = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
        raise ValueError(
            f"The memory adapter {source} does not fit this model's memory layers: missing {missing}, unknown "
            f"{unknown}. Build the model with the adapter's own settings (memory_adapter=..., no memory_layers or "
            "combine override)."
        )
    for name, tensor in weights.items():
        if tensor.shape != own[name].shape:
            raise ValueError(
                f"The memory adapter {source}: {name} has shape {tuple(tensor.shape)}, the model "
                f"{tuple(own[name].shape)}."
            )
    with torch.no_grad():
        for name, tensor in weights.items():
            own[name].copy_(tensor.to(own[name].dtype))


def save_adapter(model: nn.Module, folder: str | Path) -> None:
    """Write the model's memory parameters and memory settings to `folder` (created if needed)."""
    from safetensors.torch import save_file

    config = model.config
    weights = {
        name: parameter.detach().to("cpu", torch.float32).contiguous()
        for name, parameter in model.named_parameters()
        if name.startswith("knn_attention.")
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    memory = {name: getattr(config, name) for name in config.memory_fields()}
    record = {"memory": memory, "base": base_shape(config.text_config)}
    save_file(weights, folder / WEIGHTS_NAME, metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
