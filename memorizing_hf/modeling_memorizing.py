"""Memorizing Transformers on any Hugging Face decoder.

`MemorizingForCausalLM` wraps an ordinary causal LM. Its memory layers keep an external, non-differentiable memory
of the (key, value) pairs of everything earlier in the document; each query retrieves its top-k entries and mixes
them with local attention (Wu et al., "Memorizing Transformers", ICLR 2022).

Nothing of the base model is forked or monkey-patched. The memory layers are reached through transformers'
attention interface: the base config's `_attn_implementation` names a registered attention function
(`memorizing_sdpa`, `memorizing_eager`) that, keyed on the attention module's `layer_idx`, runs kNN memory attention
on memory layers and the plain local implementation on every other layer. The memory layers' own parameters (gate
and scale) live in `MemorizingForCausalLM.knn_attention`; the per-call state (which layers, which tokens to store,
positions) reaches the attention function through the model's keyword arguments as a `MemoryContext`.

File layout (top to bottom): the per-call context, the kNN attention module, the
registered attention and mask functions, the model.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from ._compat import (
    ModelOutput,
    WrapperPreTrainedModel,
    attention_function,
    attention_scaling,
    cache_kwargs,
    cached_file,
    constant_,
    pop_cache,
    register_attention,
    tie_weights_left_unloaded,
)
from .cache import MemorizingCache, XLCache
from .configuration_memorizing import LOCAL_ATTN_IMPLEMENTATIONS, MemorizingConfig
from .generation import MemorizingGenerationMixin
from .memory import KNNMemory, MemoryBank
from .retrieval import make_backend
from .rotary import Rotary

# Name of the memory file that travels beside the weights of a checkpoint (`from_pretrained(..., memory_file=...)`).
MEMORY_FILE_NAME = "memory.safetensors"
# `from_pretrained` arguments that say where files of a checkpoint are found; a memory file is found the same way.
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")


# ---------------------------------------------------------------------------------------------------- per-call context
@dataclass
class MemoryContext:
    """What one forward call tells the memory layers.

    Attributes:
        layers: memory layer index -> its `KNNAttention`.
        positions: `[batch, tokens]` position ids of the new tokens (rotary placement).
        window: `[batch]` real tokens local attention sees in this call (cache + new), the default distance at
            which "fixed" placement puts memory entries.
        rotary: the base model's rotary embedding (None without rotary embeddings).
        doc_positions: `[batch, tokens]` positions of the new tokens in their documents (stored with each entry).
        store: `[batch, tokens]` bool, which new tokens to write to memory.
        write: whether this call writes to memory at all (False: read-only).
        stats: filled with diagnostics when not None.
        xl: the XL cache, put in front of every layer's keys and values (None: no XL this call).
        beams: batch rows per memory row. Beam search runs `beams` rows per prompt; they share the prompt's memory
            row (beam rows of a prompt are consecutive, as `generate` lays them out).
        xl_new: the keys/values of this segment per layer, recorded for the XL cache of the next call.
        stash: retrieval results per layer, so that a recomputation under gradient checkpointing sees exactly what
            the first pass saw and does not write twice.
    """

    layers: dict[int, KNNAttention]
    positions: torch.Tensor
    window: torch.Tensor
    rotary: Rotary | None
    doc_positions: torch.Tensor
    store: torch.Tensor
    write: bool = True
    stats: dict[str, Any] | None = None
    xl: XLCache | None = None
    beams: int = 1
    xl_new: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    stash: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------- kNN attention
class KNNAttention(nn.Module):
    """kNN memory attention of one layer: retrieval, mixing with local attention, and the memory write.

    Gate mode (the paper): memory attention has its own softmax over the retrieved keys, with L2-normalised queries
    and keys scaled by a learned per-head factor; a learned per-head gate g = sigmoid(b) gives
    out = g * memory + (1 - g) * local. Joint mode: the retrieved keys join the local softmax (no parameters).
    Rows whose memory is empty get exactly the local result.
    """

    def __init__(self, config: MemorizingConfig, layer_idx: int, memory: KNNMemory, rotary: bool):
        super().__init__()
        text = config.text_config
        self.layer_idx = layer_idx
        self.combine = config.combine
        self.top_k = config.memory_top_k
        self.num_heads = text.num_attention_heads
        self.num_kv_heads = memory.num_heads
        self.rotary_placement = config.rotary_placement if rotary else "absolute"
        self.query_offset = config.memory_query_offset
        self.memory = memory
        if self.combine == "gate":
            scale = config.memory_scale_init or math.sqrt(memory.head_dim)
            self.gate_bias = nn.Parameter(torch.full((self.num_heads,), config.gate_init))
            self.memory_scale = nn.Parameter(torch.full((self.num_heads,), float(scale)))

    # -- placement: how keys are stored and how queries meet them
    def _place_queries(self, query: torch.Tensor, context: MemoryContext) -> torch.Tensor:
        if self.rotary_placement == "fixed":
            offset = self.query_offset if self.query_offset is not None else context.window.unsqueeze(1)
            query = context.rotary.rotate(query, offset - context.positions)
        elif self.rotary_placement == "none":
            query = context.rotary.rotate(query, -context.positions)
        return F.normalize(query, dim=-1) if self.combine == "gate" else query

    @torch.no_grad()
    def write(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        positions: torch.Tensor,
        rotary: Rotary | None,
        store: torch.Tensor,
        doc_positions: torch.Tensor,
        beams: int = 1,
    ) -> None:
        """Write keys/values `[B, Hkv, T, D]` (keys as local attention saw them: rotated at `positions` `[B, T]`) to
        memory, placed for retrieval. With beams, the first beam of each prompt writes for the prompt."""
        if self.rotary_placement in ("fixed", "none"):
            key = rotary.rotate(key, -positions)
        if self.combine == "gate":
            key = F.normalize(key, dim=-1)
        self.memory.write(key[::beams], value[::beams], store[::beams], doc_positions[::beams])

    # -- retrieval
    @torch.no_grad()
    def _retrieve(self, grouped: torch.Tensor, beams: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Slots, keys and values `[B, Hkv, M, k(, D)]` retrieved for the memory queries `[B, Hkv, M, D]`; the
        `beams` consecutive rows of a prompt search its memory row together."""
        batch, heads, queries, dim = grouped.shape
        shared = grouped.view(batch // beams, beams, heads, queries, dim).transpose(1, 2)
        slots = self.memory.search(shared.reshape(batch // beams, heads, beams * queries, dim), self.top_k)
        keys, values = self.memory.gather(slots)

        def per_row(x: torch.Tensor) -> torch.Tensor:
            x = x.view(batch // beams, heads, beams, queries, *x.shape[3:]).transpose(1, 2)
            return x.reshape(batch, heads, queries, *x.shape[4:])

        return per_row(slots), per_row(keys), per_row(values)

    def forward(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        local_attention: Callable,
        context: MemoryContext,
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Same contract as a transformers attention function: returns `([B, T, H, D], weights or None)`.

        Order per call: retrieve, attend, then write the new tokens, so a segment never retrieves itself. The
        retrieval is stashed in the context: a recomputation under gradient checkpointing reuses it and does not write.
        """
        batch, _, tokens, dim = query.shape
        if key.shape[1] != self.num_kv_heads or key.shape[3] != self.memory.head_dim:
            raise ValueError(
                f"Layer {self.layer_idx} computes {key.shape[1]} key/value heads of {key.shape[3]} dims, but its "
                f"memory was built for {self.num_kv_heads} of {self.memory.head_dim}: the attention module differs "
                "from the one the memory was sized for."
            )
        scaling = attention_scaling(module, scaling, dim)
        first_pass = self.layer_idx not in context.stash
        uses_memory = not self.memory.is_empty() if first_pass else context.stash[self.layer_idx] is not None
        if not uses_memory:
            context.stash[self.layer_idx] = None
            output, weights = local_attention(
                module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
            )
        else:
            placed = self._place_queries(query, context)
            grouped = placed.reshape(batch, self.num_kv_heads, -1, dim)  # query head h*G+g reads kv head h
            if first_pass:
                context.stash[self.layer_idx] = self._retrieve(grouped, context.beams)
            slots, mem_keys, mem_values = context.stash[self.layer_idx]
            mem_keys, mem_values, valid = mem_keys.to(query.dtype), mem_values.to(query.dtype), slots >= 0
            if self.combine == "gate":
                output, weights = local_attention(
                    module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
                )
                output = self._gated(output, grouped, mem_keys, mem_values, valid, context)
            else:
                output, weights = self._joint(
                    module,
                    query,
                    key,
                    value,
                    attention_mask,
                    grouped,
                    mem_keys,
                    mem_values,
                    valid,
                    scaling,
                    dropout,
                    kwargs.get("softcap"),
                    context,
                )
        if context.write and first_pass:  # no autograd records: checkpoint recomputation stays identical
            self.write(
                key[:, :, -tokens:],
                value[:, :, -tokens:],
                context.positions,
                context.rotary,
                context.store,
                context.doc_positions,
                context.beams,
            )
        if context.stats is not None:
            context.stats.setdefault("entries", {})[self.layer_idx] = self.memory.lengths.tolist()
        return output, weights

    def _gated(
        self,
        local: torch.Tensor,
        grouped: torch.Tensor,
        mem_keys: torch.Tensor,
        mem_values: torch.Tensor,
        valid: torch.Tensor,
        context: MemoryContext,
    ) -> torch.Tensor:
        """g * softmax-attention over the retrieved entries + (1 - g) * local, per query head."""
        batch, tokens, heads, dim = local.shape
        group = heads // self.num_kv_heads
        scale = self.memory_scale.view(1, self.num_kv_heads, group, 1, 1).to(grouped.dtype)
        scores = torch.einsum("bhmd,bhmkd->bhmk", grouped, mem_keys)
        scores = scores.view(batch, self.num_kv_heads, group, tokens, -1) * scale
        scores = scores.masked_fill(~valid.view_as(scores), float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).nan_to_num(0.0).to(local.dtype)
        memory_out = torch.einsum("bhgtk,bhgtkd->bhgtd", probs, mem_values.view(*probs.shape, dim))
        memory_out = memory_out.reshape(batch, heads, tokens, dim).transpose(1, 2)  # [B, T, H, D]
        gate = torch.sigmoid(self.gate_bias).to(local.dtype).view(1, 1, heads, 1)
        gate = gate * valid.flatten(1).any(dim=1).to(local.dtype).view(batch, 1, 1, 1)  # rows with empty memory
        if context.stats is not None:
            context.stats.setdefault("gate", {})[self.layer_idx] = torch.sigmoid(self.gate_bias).tolist()
        return local + gate * (memory_out - local)

    def _joint(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        grouped: torch.Tensor,
        mem_keys: torch.Tensor,
        mem_values: torch.Tensor,
        valid: torch.Tensor,
        scaling: float,
        dropout: float,
        softcap: float | None,
        context: MemoryContext,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One softmax over the local keys and the retrieved keys (eager computation)."""
        batch, heads, tokens, dim = query.shape
        group = heads // self.num_kv_heads
        local_keys = key.shape[2]
        key = key.repeat_interleave(group, dim=1)
        value = value.repeat_interleave(group, dim=1)
        local_scores = torch.matmul(query, key.transpose(2, 3)) * scaling
        memory_scores = torch.einsum("bhmd,bhmkd->bhmk", grouped, mem_keys).reshape(batch, heads, tokens, -1) * scaling
        if softcap is not None:
            local_scores = torch.tanh(local_scores / softcap) * softcap
            memory_scores = torch.tanh(memory_scores / softcap) * softcap
        local_scores = local_scores + _additive_mask(attention_mask, tokens, local_keys, query)
        memory_scores = memory_scores.masked_fill(~valid.reshape(batch, heads, tokens, -1), float("-inf"))
        probs = torch.softmax(torch.cat((local_scores, memory_scores), dim=-1).float(), dim=-1)
        probs = probs.nan_to_num(0.0).to(query.dtype)
        if context.stats is not None:
            share = probs[..., local_keys:].sum(-1).mean(dim=(0, 2))
            context.stats.setdefault("memory_share", {})[self.layer_idx] = share.tolist()
        probs = F.dropout(probs, p=dropout, training=module.training)
        output = torch.matmul(probs[..., :local_keys], value)
        memory_values = mem_values.reshape(batch, heads, tokens, -1, dim)
        output = output + torch.einsum("bhtk,bhtkd->bhtd", probs[..., local_keys:], memory_values)
        return output.transpose(1, 2).contiguous(), probs


def _additive_mask(mask: torch.Tensor | None, tokens: int, keys: int, like: torch.Tensor) -> torch.Tensor:
    """The local attention mask as additive scores `[B or 1, 1, T, S]` (sdpa bool masks, eager float masks, or None
    for a plain causal mask whose queries are the last T of the S keys)."""
    if mask is None:
        query_pos = torch.arange(keys - tokens, keys, device=like.device).unsqueeze(1)
        allowed = torch.arange(keys, device=like.device).unsqueeze(0) <= query_pos
        mask = allowed.view(1, 1, tokens, keys)
    mask = mask[..., -keys:]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill(~mask, float("-inf"))
    return mask.to(like.dtype)


# ---------------------------------------------------------------------------------------------------- registration
def _memorizing_attention(local_name: str) -> Callable:
    """The attention function registered as `memorizing_<local_name>`: kNN memory on memory layers, `local_name`
    attention everywhere (and as the local part of memory layers)."""

    def attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        memory_context: MemoryContext | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        local = attention_function(local_name) if local_name != "eager" else _eager_attention
        if memory_context is None:
            return local(module, query, key, value, attention_mask, **kwargs)
        layer = getattr(module, "layer_idx", None)
        if memory_context.xl is not None:
            tokens = query.shape[2]
            memory_context.xl_new.setdefault(layer, (key[:, :, -tokens:].detach(), value[:, :, -tokens:].detach()))
            if memory_context.xl.length:
                key, value, attention_mask = memory_context.xl.extend(layer, key, value, attention_mask)
        knn = memory_context.layers.get(layer)
        if knn is None:
            return local(module, query, key, value, attention_mask, **kwargs)
        return knn(module, query, key, value, attention_mask, local, memory_context, **kwargs)

    return attention


def _eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention with grouped-query support (what transformers' model files call eager attention)."""
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores + _additive_mask(attention_mask, query.shape[2], key.shape[2], query)
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def register_attention_functions() -> None:
    """Register `memorizing_<local>` attention and mask functions with transformers (idempotent)."""
    for local_name in LOCAL_ATTN_IMPLEMENTATIONS:
        register_attention(f"memorizing_{local_name}", _memorizing_attention(local_name), local_name)


register_attention_functions()


# ---------------------------------------------------------------------------------------------------- model
def _find_rotary_embedding(model: nn.Module) -> str | None:
    """Name of the base model's rotary embedding module (which holds `inv_freq`), or None without rotary."""
    for name, module in model.named_modules():
        if type(module).__name__.endswith("RotaryEmbedding") and hasattr(module, "inv_freq"):
            return name
    return None


def _attention_geometry(model: nn.Module, layers: list[int]) -> tuple[int, int]:
    """Key/value heads and head dim of the memory layers' attention modules, as the base model built them (a config
    may carry fields its model ignores, e.g. num_key_value_heads on OPT)."""
    text = model.config
    found = set()
    for module in model.modules():
        if getattr(module, "layer_idx", None) not in layers or "Attention" not in type(module).__name__:
            continue
        head_dim = getattr(module, "head_dim", None) or getattr(module, "head_size", None)
        heads = getattr(module, "num_heads", None) or text.num_attention_heads
        found.add((heads // getattr(module, "num_key_value_groups", 1), head_dim or text.hidden_size // heads))
    if len(found) != 1:
        raise ValueError(
            f"Cannot tell the key/value heads of layers {layers} of {type(model).__name__} from its attention modules "
            f"(found {sorted(found) or 'none'}); memorizing-hf needs attention modules with a layer_idx."
        )
    return found.pop()


class MemorizingPreTrainedModel(WrapperPreTrainedModel):
    config_class = MemorizingConfig
    base_model_prefix = "language_model"
    supports_gradient_checkpointing = True

    def init_own_weights(self, module: nn.Module) -> bool:
        if not isinstance(module, KNNAttention):
            return False
        if module.combine == "gate":  # transformers' init helpers skip parameters loaded from a checkpoint
            constant_(module.gate_bias, self.config.gate_init)
            constant_(module.memory_scale, self.config.memory_scale_init or math.sqrt(module.memory.head_dim))
        return True


class MemorizingForCausalLM(MemorizingPreTrainedModel, MemorizingGenerationMixin):
    """A causal LM whose memory layers read and write an external kNN memory.

    Usage:
        model = MemorizingForCausalLM.from_base_pretrained("path/to/llama", memory_layers=[-4], memory_size=8192)
        for segment, new_doc in stream:                     # segments of one document per batch row, in order
            out = model(segment, labels=segment, memory_reset=new_doc)
    """

    def __init__(self, config: MemorizingConfig, language_model: PreTrainedModel | None = None) -> None:
        super().__init__(config)
        if language_model is None:
            language_model = AutoModelForCausalLM.from_config(
                config.text_config, attn_implementation=config.memory_attn_implementation
            )
        language_model.set_attn_implementation(config.memory_attn_implementation)
        self.language_model = language_model
        self.config.text_config = language_model.config
        # Looked up by name at every call: loading may replace the buffer after construction (meta-device init).
        self._rotary_embedding = _find_rotary_embedding(language_model)
        self._rotary_cache: Rotary | None = None
        if self._rotary_embedding is not None and config.rotary_placement != "absolute":
            if not self.language_model.get_submodule(self._rotary_embedding).inv_freq.is_meta:
                self._rotary()  # an unknown layout is refused now, not at the first forward
        kv_heads, head_dim = _attention_geometry(language_model, config.memory_layers)
        self.memory = MemoryBank(
            layers=config.memory_layers,
            capacity=config.memory_size,
            num_heads=kv_heads,
            head_dim=head_dim,
            backend_factory=lambda: make_backend(config),
            dtype=getattr(torch, config.memory_dtype) if config.memory_dtype else None,
        )
        self.xl_cache = XLCache(config.xl_sink_tokens)
        self.knn_attention = nn.ModuleDict(
            {
                str(i): KNNAttention(config, i, self.memory.layers[i], self._rotary_embedding is not None)
                for i in config.memory_layers
            }
        )
        self.post_init()

    # -- construction from an existing model
    @classmethod
    def from_base_pretrained(
        cls,
        model_or_path: PreTrainedModel | str | Path,
        base_model_kwargs: dict[str, Any] | None = None,
        **memory_kwargs: Any,
    ) -> MemorizingForCausalLM:
        """Turn a pretrained causal LM (a loaded model or a local folder / Hub id) into a memorizing one.

        The base weights are used as they are (no second load, no copy); `memory_kwargs` are `MemorizingConfig`
        fields (memory_layers, memory_size, memory_top_k, combine, ...); `base_model_kwargs` go to
        `AutoModelForCausalLM.from_pretrained` when a path is given.
        """
        if isinstance(model_or_path, (str, Path)):
            model_or_path = AutoModelForCausalLM.from_pretrained(str(model_or_path), **(base_model_kwargs or {}))
        if not isinstance(model_or_path, PreTrainedModel):
            raise TypeError(
                f"from_base_pretrained needs a PreTrainedModel or a path, got {type(model_or_path).__name__}."
            )
        if isinstance(model_or_path, MemorizingForCausalLM):
            raise TypeError("The model is already a MemorizingForCausalLM.")
        config = MemorizingConfig(text_config=model_or_path.config, **memory_kwargs)
        model = cls(config, language_model=model_or_path).to(model_or_path.device)
        if model_or_path.generation_config is not None:  # generate as the base model does (eos ids, sampling, ...)
            model.generation_config = copy.deepcopy(model_or_path.generation_config)
        return model.train(model_or_path.training)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | Path, *model_args: Any, memory_file: str | None = None, **kwargs: Any
    ) -> MemorizingForCausalLM:
        """`PreTrainedModel.from_pretrained`, plus `memory_file`: a memory file to load, by name beside the weights
        (e.g. `"memory.safetensors"`, found in the same folder or Hub repo and revision) or as a path."""
        model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        tie_weights_left_unloaded(model.language_model)
        if memory_file is not None:
            model.load_memory(memory_file, **{name: kwargs[name] for name in _HUB_KWARGS if name in kwargs})
        return model

    # -- the usual accessors, delegated to the base model
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.language_model.get_decoder()

    # -- memory management
    def reset_memory(self, rows: torch.Tensor | list[int] | None = None) -> None:
        """Clear the memory (and XL cache) of all rows, or of the given rows (indices or a boolean mask)."""
        if rows is not None and not isinstance(rows, torch.Tensor):
            rows = torch.as_tensor(rows, dtype=torch.long)
        self.memory.reset(rows)
        self.xl_cache.reset(rows)

    def save_memory(self, path: str | Path) -> None:
        """Write the memory and XL cache to a safetensors file (with metadata describing the memory geometry)."""
        self.memory.save(path, self._memory_geometry(), extra=self.xl_cache.state_tensors())

    def load_memory(self, path: str | Path, **hub_kwargs: Any) -> None:
        """Load a memory file written by `save_memory`; a file for another geometry raises and changes nothing.

        `path` is a file path or, if no such file exists, the name of a file beside the weights: relative to the
        folder or Hub repo the model was loaded from (`model.name_or_path`), found like the weights (`hub_kwargs`:
        revision, token, cache_dir, ... as for `from_pretrained`).
        """
        path = self._memory_file(path, **hub_kwargs)
        self.xl_cache.load_state_tensors(self.memory.load(path, self._memory_geometry(), device=self.device))

    def _memory_file(self, path: str | Path, **hub_kwargs: Any) -> Path:
        """`path` if it is a file, else the file of that name beside the weights (downloaded if in a Hub repo)."""
        path = Path(path)
        if path.is_file() or path.is_absolute() or not self.name_or_path:
            return path
        found = cached_file(self.name_or_path, path.as_posix(), **hub_kwargs)
        if found is None:
            raise FileNotFoundError(
                f"No memory file {str(path)!r}: not a file here, nor beside the weights in {self.name_or_path!r}."
            )
        return Path(found)

    def _memory_geometry(self) -> dict[str, Any]:
        """What a memory file must match to be read by this model."""
        return {
            "layers": self.config.memory_layers,
            "num_kv_heads": self.memory.num_heads,
            "head_dim": self.memory.head_dim,
            "memory_size": self.config.memory_size,
            "combine": self.config.combine,
            "rotary_placement": next(iter(self.knn_attention.values())).rotary_placement,
            "base_model_type": self.config.text_config.model_type,
        }

    # -- forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Any = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        memory_reset: torch.Tensor | None = None,
        update_memory: bool = True,
        output_memory_stats: bool = False,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ):
        r"""
        The base model's forward, plus:

        memory_reset (`torch.BoolTensor` of shape `(batch_size,)`, *optional*):
            Rows whose memory is cleared before reading: a new document starts in that row.
        update_memory (`bool`, *optional*, defaults to `True`):
            Write this segment's keys and values to memory after reading. `False` reads without writing.
        output_memory_stats (`bool`, *optional*):
            Add `memory_stats` to the output: entries per row, and per-head gate values (gate mode) or the share of
            attention that goes to memory (joint mode), per memory layer.

        With `cache` a `MemorizingCache` (as `generate` and `memorize` use), the input is streamed through a bounded
        local window instead, and what leaves the window is written to memory. The cache is also accepted under its
        name before transformers 5.24, `past_key_values`.

        Returns the base model's output (e.g. `CausalLMOutputWithPast`, with `loss` when `labels` are given).
        """
        cache = pop_cache(kwargs, cache)
        reference = input_ids if input_ids is not None else inputs_embeds
        if reference is None:
            raise ValueError("Pass input_ids or inputs_embeds.")
        batch, tokens = reference.shape[:2]
        device = reference.device
        if memory_reset is not None:
            memory_reset = torch.as_tensor(memory_reset, device=device)
            if memory_reset.dtype != torch.bool or memory_reset.shape != (batch,):
                raise ValueError(
                    f"memory_reset must be a bool tensor of shape ({batch},) (one flag per batch row), got "
                    f"{memory_reset.dtype} of shape {tuple(memory_reset.shape)}."
                )
        if isinstance(cache, MemorizingCache):
            if labels is not None or memory_reset is not None:
                raise ValueError(
                    "labels and memory_reset are for segment-by-segment reading, not with a MemorizingCache."
                )
            stats = {} if output_memory_stats else None
            outputs = self._stream_forward(
                input_ids,
                inputs_embeds,
                attention_mask,
                cache,
                update_memory,
                stats,
                logits_to_keep=logits_to_keep,
                **kwargs,
            )
            return with_memory_stats(outputs, stats) if output_memory_stats else outputs
        self.memory.check_batch_size(batch, reset=memory_reset)
        self.xl_cache.check_batch_size(batch, reset=memory_reset)
        if memory_reset is not None:
            self.memory.reset(memory_reset)
            self.xl_cache.reset(memory_reset)
        xl = self.xl_cache if self.config.xl_cache and cache is None else None
        offset = xl.length if xl is not None else 0
        max_positions = getattr(self.config.text_config, "max_position_embeddings", None)
        if offset and max_positions and offset + tokens > max_positions:
            raise ValueError(
                f"The XL cache ({offset} tokens) plus this segment ({tokens}) exceed the base model's "
                f"{max_positions} positions: use segments of at most {max_positions // 2} tokens with xl_cache=True."
            )

        if attention_mask is not None and attention_mask.dim() == 2:
            real = attention_mask[:, -tokens:].bool()
        else:
            real = torch.ones(batch, tokens, dtype=torch.bool, device=device)
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            if attention_mask is not None and attention_mask.dim() == 2:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -tokens:]
            else:
                position_ids = torch.arange(past, past + tokens, device=device).expand(batch, -1)
        position_ids = position_ids + offset  # the previous segment (XL cache) occupies positions [0, offset)
        store = self._storable(input_ids, real)
        store[:, : self.config.sink_tokens] = False  # the segment's first tokens are attention sinks
        window = real.sum(dim=1)
        if xl is not None and offset:
            window = window + xl.valid.to(device).sum(dim=1)
        if cache is not None:
            window = window + cache.get_seq_length()
        context = self._memory_context(
            position_ids,
            window,
            self.memory.document_positions(real),
            store,
            write=update_memory,
            stats={} if output_memory_stats else None,
            xl=xl.snapshot() if xl is not None else None,
        )
        outputs = self.language_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=labels,
            memory_context=context,
            **cache_kwargs(cache),
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        if update_memory:
            self.memory.advance(real)
            if xl is not None:
                xl.advance(context.xl_new, real, offset, context.rotary)
        return with_memory_stats(outputs, context.stats) if output_memory_stats else outputs

    def _memory_context(
        self,
        positions: torch.Tensor,
        window: torch.Tensor,
        doc_positions: torch.Tensor,
        store: torch.Tensor,
        write: bool,
        stats: dict[str, Any] | None,
        xl: XLCache | None = None,
        beams: int = 1,
    ) -> MemoryContext:
        return MemoryContext(
            layers={int(i): module for i, module in self.knn_attention.items()},
            positions=positions,
            window=window,
            rotary=self._rotary(),
            doc_positions=doc_positions,
            store=store,
            write=write,
            stats=stats,
            xl=xl,
            beams=beams,
        )

    def _rotary(self) -> Rotary | None:
        """The base model's rotary embedding (None without one), re-read when its frequencies change (loading,
        moving to another device, dynamic scaling)."""
        if self._rotary_embedding is None:
            return None
        embedding = self.language_model.get_submodule(self._rotary_embedding)
        if self._rotary_cache is None or self._rotary_cache.inv_freq is not embedding.inv_freq:
            self._rotary_cache = Rotary.of(embedding)
        return self._rotary_cache

    def _storable(self, input_ids: torch.Tensor | None, real: torch.Tensor) -> torch.Tensor:
        """Tokens that may be written to memory: real (not padding) and not a never-stored id such as BOS."""
        store = real.clone()
        if input_ids is not None and self.config.never_store_token_ids:
            never = torch.as_tensor(self.config.never_store_token_ids, device=input_ids.device)
            store &= ~torch.isin(input_ids, never)
        return store


@functools.cache
def _output_class_with_memory_stats(output_class: type[ModelOutput]) -> type[ModelOutput]:
    """`output_class` plus a `memory_stats` field: still the base model's output type (a subclass), and a real field,
    so that wrappers that rebuild outputs from their fields (DistributedDataParallel) keep it."""
    namespace = {
        "__annotations__": {"memory_stats": "dict | None"},
        "memory_stats": None,
        "__doc__": output_class.__doc__,
    }
    return dataclass(type(output_class.__name__, (output_class,), {**namespace, "__module__": __name__}))


def with_memory_stats(outputs: ModelOutput, stats: dict[str, Any] | None) -> ModelOutput:
    """The base model's output with `memory_stats` added."""
    return _output_class_with_memory_stats(type(outputs))(**outputs, memory_stats=stats)
