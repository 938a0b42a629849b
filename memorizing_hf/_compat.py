"""Everything memorizing-hf takes from transformers that transformers may rename or move, in one place.

Supported releases: transformers 5.3 up to the cap in setup.cfg (README, "Supported versions"). Each shim below
names the release that made it necessary. Nothing else in the package touches a private transformers name or
imports from a transformers submodule; `tests/test_compat.py` checks that and holds the list of the private names
used here (`PRIVATE_NAMES`), so a new one is a conscious decision.

This file is shipped as Hugging Face remote code with the model: it imports only torch, transformers and the
standard library.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, MutableMapping
from typing import Any

import torch
from torch import nn
from transformers import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    AttentionInterface,
    AttentionMaskInterface,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.utils import ModelOutput  # noqa: F401  (exported by `transformers.utils` only)

# The private transformers names this module uses, and why each cannot be avoided.
PRIVATE_NAMES = {
    "_attn_implementation": "config attribute naming a model's attention function; read only, to follow the base "
    "model's choice (transformers has no public getter; setting goes through the public set_attn_implementation)",
    "_experts_implementation": "config attribute naming a mixture-of-experts model's expert kernels; read only, so "
    "that wrapping keeps the base model's choice (its public getter exists from 5.16 only)",
    "_supports_attention_backend": "class flag transformers reads to route attention through AttentionInterface; we "
    "read it on the base class (a model without it cannot be patched) and set it on ours",
    "_supports_sdpa": "class flag: our wrapper accepts attn_implementation='sdpa' when built from a config",
    "_skip_keys_device_placement": "class attribute: accelerate's device hooks must not move the cache arguments",
    "_init_weights": "the per-module initialisation hook PreTrainedModel calls for weights missing from a checkpoint",
    "_get_num_items_in_batch": "Trainer method that counts the tokens a loss is normalised by; releases before 5.10 "
    "counted every row's first label, which a causal LM never predicts",
    "_loss_shifts_labels": "Trainer attribute that tells releases which count shifted labels (5.10+) from older ones",
    "_scaled_dot_product_flash_attention_for_cpu": "torch's fused CPU attention, which returns each query's "
    "log-sum-exp beside the output (public sdpa does not): joint mode merges the retrieved entries into it",
    "_raise_exceptions_for_missing_entries": "cached_file argument: None for a file the checkpoint does not have, "
    "where the public default raises an error that does not say which file was looked for",
}

# ---------------------------------------------------------------------------------------------------- cache keyword
# 5.24 renamed the cache argument of forward, generate and the model outputs from `past_key_values` to `cache`; the
# old name goes through a deprecation shim. We read both and pass the name this release uses.
_GENERATION_INPUTS = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
CACHE_ARGUMENT = "cache" if "cache" in _GENERATION_INPUTS else "past_key_values"
CACHE_ARGUMENTS = ("cache", "past_key_values")


def pop_cache(kwargs: MutableMapping[str, Any], cache: Any = None) -> Any:
    """The cache argument, whichever name it came under: `cache`, or either name in `kwargs` (removed from it)."""
    given = [value for value in (cache, *(kwargs.pop(name, None) for name in CACHE_ARGUMENTS)) if value is not None]
    if any(value is not given[0] for value in given):
        raise ValueError("Pass the cache once: `cache` and `past_key_values` name the same argument.")
    return given[0] if given else None


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """`{name: cache}` for calling a transformers model or `generate` of this release."""
    return {CACHE_ARGUMENT: cache}


def set_output_cache(outputs: Any, cache: Any) -> None:
    """Put `cache` in a model output under this release's name."""
    outputs[CACHE_ARGUMENT] = cache


def tokens_to_crop(argument: int, length: int) -> int:
    """How many tokens `Cache.crop(argument)` removes from a cache holding `length`: 5.16 made it `crop(-n)`, remove n
    (and `crop(0)` a no-op); before, a positive argument was the length to keep."""
    return -argument if argument <= 0 else max(length - argument, 0)


# ---------------------------------------------------------------------------------------------------- attention
def attention_implementation(config: PretrainedConfig) -> str | None:
    """The attention implementation a model (config) was built with: "sdpa", "eager", "flash_attention_2", ...
    (a private config attribute, the same in 5.3-5.25; no public getter)."""
    return config._attn_implementation


def implementations(config: PretrainedConfig) -> dict[str, Any]:
    """The attention and experts implementations a config names (see `set_implementations`)."""
    return {name: getattr(config, name, None) for name in ("_attn_implementation", "_experts_implementation")}


def set_implementations(config: PretrainedConfig, chosen: dict[str, Any]) -> None:
    """Give `config` back the implementations `implementations` read: `PretrainedConfig.__init__` (5.0) resets them
    on every sub-config, so a config that nests a built model's config would otherwise switch that model's kernels."""
    for name, value in chosen.items():
        if value is not None:
            setattr(config, name, value)


def attention_function(name: str) -> Callable:
    """The attention function registered under `name` (5.0: `AttentionInterface`)."""
    return AttentionInterface()[name]


def register_attention(name: str, function: Callable, masks_like: str) -> None:
    """Register `function` as attention `name`, building its masks as attention `masks_like` does (the mask
    interface is unchanged 5.3-5.25)."""
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, AttentionMaskInterface()[masks_like])


def attention_scaling(module: nn.Module, scaling: float | None, head_dim: int) -> float:
    """The softmax scale of an attention call: GPT-2 before 5.4 left it to the attention function."""
    if scaling is None:
        scaling = getattr(module, "scaling", None) or head_dim**-0.5
    return scaling


# torch (2.3+), not transformers: the fused CPU attention kernel behind sdpa, which also returns the log-sum-exp.
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def attention_with_logsumexp(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Softmax attention `[B, H, T, D]` (keys and values with H heads; `mask` additive `[B or 1, 1, T, S]`) and each
    query's log-sum-exp of its scaled, masked scores `[B, H, T]` (fp32; -inf where the mask hides every key), without
    materialising the scores; None where torch's fused kernel does not apply (not CPU, other dtypes, autograd on)."""
    usable = _FLASH_CPU is not None and query.device.type == "cpu" and query.dtype in _FLASH_CPU_DTYPES
    if not usable or torch.is_grad_enabled():
        return None
    output, logsumexp = _FLASH_CPU(query, key, value, 0.0, False, attn_mask=mask.to(query.dtype), scale=scale)
    seen = (mask > float("-inf")).any(-1)  # the kernel reports 0, not -inf, for a query that sees no key
    return output, logsumexp.float().masked_fill(~seen, float("-inf"))


def supports_attention_interface(model_class: type) -> bool:
    """Whether a model class routes its attention through `AttentionInterface` (so that we can patch it); a private
    class flag, the same in 5.3-5.25."""
    return bool(getattr(model_class, "_supports_attention_backend", False))


def causal_lm_class(config: PretrainedConfig) -> type | None:
    """The transformers causal-LM class for `config`, or None."""
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except (KeyError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------- model classes
class WrapperPreTrainedModel(PreTrainedModel):
    """`PreTrainedModel` for a model that wraps another: the flags and hook transformers reads under private names
    (the same names in 5.3-5.25)."""

    _supports_attention_backend = True
    _supports_sdpa = True
    _skip_keys_device_placement = list(CACHE_ARGUMENTS)

    def _init_weights(self, module: nn.Module) -> None:
        if not self.init_own_weights(module):
            self.language_model._init_weights(module)

    def init_own_weights(self, module: nn.Module) -> bool:
        """Initialise `module` if it belongs to the wrapper (not the base model); return whether it did."""
        raise NotImplementedError


def tie_weights_left_unloaded(model: PreTrainedModel) -> None:
    """Tie the output embedding of a nested model that loading left on the meta device. 5.3 does not count a tied
    weight of a sub-model as missing from the checkpoint, so it neither loads nor ties it (seen with GPT-2, Gemma and
    Cohere under our wrapper; 5.23 ties it)."""
    if any(parameter.is_meta for parameter in model.parameters()):
        model.tie_weights()


def constant_(parameter: nn.Parameter, value: float) -> None:
    """Fill a parameter, unless it was loaded from a checkpoint (5.0: `transformers.initialization`)."""
    init.constant_(parameter, value)


# ---------------------------------------------------------------------------------------------------- trainer
def counts_predicted_labels(trainer_class: type) -> type:
    """Class decorator for a Trainer subclass: normalise the loss by the labels a causal LM predicts, `labels[..., 1:]`.

    Releases before 5.10 counted every row's first label too, which scaled every loss by (tokens - rows) / tokens and
    made evaluation and gradient accumulation differ from the plain mean.
    """
    counted = trainer_class._get_num_items_in_batch

    def _get_num_items_in_batch(self: Any, batch_samples: list, device: torch.device) -> torch.Tensor | int | None:
        if not hasattr(self, "_loss_shifts_labels") and batch_samples and "labels" in batch_samples[0]:
            batch_samples = [{**batch, "labels": batch["labels"][..., 1:]} for batch in batch_samples]
        return counted(self, batch_samples, device)

    trainer_class._get_num_items_in_batch = _get_num_items_in_batch
    return trainer_class


def checkpoint_folder_prefix() -> str:
    """Prefix of the Trainer's checkpoint folders, `checkpoint` in `checkpoint-<step>` (`transformers.trainer_utils`,
    a submodule; unchanged 5.3-5.25)."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    return PREFIX_CHECKPOINT_DIR


def last_checkpoint(folder: str) -> str | None:
    """The Trainer's latest checkpoint folder in `folder`, or None (`transformers.trainer_utils`, unchanged
    5.3-5.25)."""
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(folder)


def cached_file(name_or_path: str, filename: str, **hub_kwargs: Any) -> str | None:
    """A file of a checkpoint folder or Hub repo, found like the weights; None if the checkpoint has no such file
    (`transformers.utils.cached_file` with a private argument, unchanged 5.3-5.25)."""
    from transformers.utils import cached_file as find

    return find(name_or_path, filename, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
