"""Memorizing Transformers on any Hugging Face decoder.

`MemorizingForCausalLM` wraps an ordinary causal LM. Its memory layers keep an external, non-differentiable memory
of the (key, value) pairs of everything earlier in the document; each query retrieves its top-k entries and mixes
them with local attention (Wu et al., "Memorizing Transformers", ICLR 2022).

Nothing of the base model is forked or monkey-patched. The memory layers are reached through transformers'
attention interface: the base model's attention implementation is set to a registered attention function
(`memorizing_sdpa`, `memorizing_eager`) that, keyed on the attention module's `layer_idx`, runs kNN memory attention
on memory layers and the plain local implementation on every other layer. The memory layers' own parameters (gate
and scale) live in `knn_attention`; the memory itself is a `MemoryBank` (`memory.py`) that no module holds: each
call names the memory it uses (`memory=`, by default `model.memory`) and the per-call `MemoryContext` carries it to
the attention function through the model's keyword arguments.

Memory state changes only in `memory.py` (`KNNMemory.write`, resets, loading), driven from two places here: a
segment read with `memory_reset` or `update_memory=True` writes its tokens after reading them (`KNNAttention`), and a
streaming read evicts what leaves its window into its cache's own memory (`cache.py`), which `generate` / `memorize`
commit into the model's memory when asked.

File layout (top to bottom): the per-call context, the kNN attention module, the registered attention and mask
functions, the models (`MemorizingModel` for `AutoModel`, `MemorizingForCausalLM`).
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel, logging

from ._compat import (
    ModelOutput,
    WrapperPreTrainedModel,
    attention_function,
    attention_scaling,
    attention_with_logsumexp,
    cache_kwargs,
    cached_file,
    constant_,
    pop_cache,
    register_attention,
    set_output_cache,
    tie_weights_left_unloaded,
)
from .adapters import apply_adapter, check_base, read_adapter, save_adapter
from .cache import MemorizingCache, XLCache
from .configuration_memorizing import LOCAL_ATTN_IMPLEMENTATIONS, MemorizingConfig
from .generation import MemorizingGenerationMixin
from .memory import MemoryBank, MemoryGeometry, RetrievalBackend
from .retrieval import ExactBackend
from .rotary import Rotary

logger = logging.get_logger(__name__)

# Name of the memory file that travels beside the weights of a checkpoint (`from_pretrained(..., memory_file=...)`).
MEMORY_FILE_NAME = "memory.safetensors"
# `from_pretrained` arguments that say where files of a checkpoint are found; a memory file is found the same way.
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")
PROGRESS_CHUNKS = 8  # inputs of at least this many windows are read with a progress bar
# Bytes of one tile's fp32 scores in joint mode: the temporaries stay below glibc's mmap threshold (32 MiB), so they are
# reused rather than mapped and page-faulted in afresh by every op (3x faster at 1,024 queries x 2,048 local keys).
JOINT_TILE_BYTES = 8 * 2**20


# ---------------------------------------------------------------------------------------------------- per-call context
@dataclass
class MemoryContext:
    """What one forward call tells the memory layers.

    Attributes:
        knn: memory layer index -> its `KNNAttention`.
        memory: the memory this call reads (and writes, if `write`).
        group: batch rows per memory row: 1 when row b reads memory row b, n when the n sequences of a prompt share
            its row, the batch size when every prompt reads a one-row memory.
        overflow: the streaming cache's memory of what left its window (one row per batch row), or None.
        write: store this call's tokens in `memory` after reading them (segment reading).
        positions: `[batch, tokens]` rotary position ids of the new tokens.
        distance: real tokens local attention sees, the distance at which "fixed" placement puts memory entries
            (unless the config fixes `memory_query_offset`): `[batch, 1]` per segment when reading segments (XL cache
            + segment), `[batch, tokens]` per token when streaming (so that generation does not depend on how its
            input is chunked: prefill windows, decoding steps, drafted tokens verified at once).
        rotary: the base model's rotary embedding (None without rotary embeddings).
        doc_positions: `[batch, tokens]` positions of the new tokens in their documents (stored with each entry).
        store: `[batch, tokens]` bool, which new tokens may be written to memory.
        stats: filled with diagnostics when not None.
        xl: the XL cache, put in front of every layer's keys and values (None: no XL this call).
        xl_new: the keys/values of this segment per layer, recorded for the XL cache of the next call.
        stash: retrieval results per layer, so that a recomputation under gradient checkpointing sees exactly what
            the first pass saw and does not write twice.
        scratch: buffers that the memory layers of this call share in inference (no autograd), where a layer's
            retrieved values are used before the next layer retrieves: one allocation per call instead of one per
            layer (see `KNNMemory.gather`). A stash entry's values are then valid only until the next layer runs.
    """

    knn: dict[int, KNNAttention]
    memory: MemoryBank
    group: int
    overflow: MemoryBank | None
    write: bool
    positions: torch.Tensor
    distance: torch.Tensor
    rotary: Rotary | None
    doc_positions: torch.Tensor
    store: torch.Tensor
    stats: dict[str, Any] | None = None
    xl: XLCache | None = None
    xl_new: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    stash: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = field(default_factory=dict)
    scratch: dict[tuple, torch.Tensor] = field(default_factory=dict)

    def sources(self, layer: int) -> list[tuple[MemoryBank, int]]:
        """The memories holding entries for `layer`, with their batch rows per memory row: the call's memory and the
        overflow."""
        found = [(self.memory, self.group)] if not self.memory.layers[layer].is_empty() else []
        if self.overflow is not None and not self.overflow.layers[layer].is_empty():
            found.append((self.overflow, 1))
        return found


# ---------------------------------------------------------------------------------------------------- kNN attention
class KNNAttention(nn.Module):
    """kNN memory attention of one layer: retrieval, mixing with local attention, and the memory write.

    Gate mode (the paper): memory attention has its own softmax over the retrieved keys, with L2-normalised queries
    and keys scaled by a learned per-head factor; a learned per-head gate g = sigmoid(b) gives
    out = g * memory + (1 - g) * local. Joint mode: the retrieved keys join the local softmax, their scores shifted by
    `config.memory_score_bias` plus a per-head `memory_bias` (zero until trained: a memory adapter) and spread around
    each query's best entry by `config.memory_sharpness`.
    Rows whose memory is empty get exactly the local result. The module holds parameters only, never memory.
    """

    def __init__(self, config: MemorizingConfig, layer_idx: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.combine = config.combine
        self.top_k = config.memory_top_k
        self.num_heads = config.text_config.num_attention_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.query_offset = config.memory_query_offset
        self.config = config  # memory_score_bias and memory_sharpness are read at every call: they may change
        if self.combine == "gate":
            scale = config.memory_scale_init or math.sqrt(head_dim)
            self.gate_bias = nn.Parameter(torch.full((self.num_heads,), config.gate_init))
            self.memory_scale = nn.Parameter(torch.full((self.num_heads,), float(scale)))
        else:
            self.memory_bias = nn.Parameter(torch.zeros(self.num_heads))

    def extra_repr(self) -> str:
        return (
            f"layer={self.layer_idx}, combine={self.combine!r}, top_k={self.top_k}, heads={self.num_heads}, "
            f"kv_heads={self.num_kv_heads}, head_dim={self.head_dim}"
        )

    @torch.no_grad()
    def _retrieve(
        self, grouped: torch.Tensor, context: MemoryContext, with_keys: bool
    ) -> tuple[torch.Tensor | None, ...]:
        """Scores, keys (if `with_keys`), values and validity `[B, Hkv, M, k(, D)]` of the top-k entries over every
        memory the call reads, for the placed queries `[B, Hkv, M, D]`."""
        sources = context.sources(self.layer_idx)
        scratch = context.scratch if not with_keys and len(sources) == 1 else None  # a union needs both at once
        found = [
            memory.search(self.layer_idx, grouped, self.top_k, group, with_keys, scratch) for memory, group in sources
        ]
        scores, keys, values = found[0]
        if len(found) > 1:  # the best k of the union
            scores, top = torch.cat([f[0] for f in found], dim=-1).topk(self.top_k, dim=-1)
            top = top.unsqueeze(-1).expand(*top.shape, values.shape[-1])
            values = torch.cat([f[2] for f in found], dim=-2).gather(-2, top)
            keys = torch.cat([f[1] for f in found], dim=-2).gather(-2, top) if with_keys else None
        return scores, keys, values, torch.isfinite(scores)

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
        if key.shape[1] != self.num_kv_heads or key.shape[3] != self.head_dim:
            raise ValueError(
                f"Layer {self.layer_idx} computes {key.shape[1]} key/value heads of {key.shape[3]} dims, but its "
                f"memory was built for {self.num_kv_heads} of {self.head_dim}: the attention module differs from "
                "the one the memory was sized for."
            )
        scaling = attention_scaling(module, scaling, dim)
        first_pass = self.layer_idx not in context.stash
        reads = bool(context.sources(self.layer_idx)) if first_pass else context.stash[self.layer_idx] is not None
        if reads:
            distance = self.query_offset if self.query_offset is not None else context.distance
            placed = context.memory.place_queries(query, context.positions, distance, context.rotary)
            grouped = placed.reshape(batch, self.num_kv_heads, -1, dim)  # query head h*G+g reads kv head h
        if first_pass:
            # Scores that need gradients (training, or a forward under autograd) come from the gathered keys;
            # otherwise the search's own fp32 scores of the same queries are used and the keys are never gathered.
            with_keys = module.training or torch.is_grad_enabled()
            context.stash[self.layer_idx] = self._retrieve(grouped, context, with_keys) if reads else None
        retrieved = context.stash[self.layer_idx]
        if retrieved is None:
            output, weights = local_attention(
                module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
            )
        else:
            mem_scores, mem_keys, mem_values, valid = retrieved
            if mem_keys is not None:
                mem_scores = torch.matmul(grouped.unsqueeze(-2), mem_keys.to(query.dtype).transpose(-1, -2)).squeeze(-2)
            mem_values = mem_values.to(query.dtype)
            if self.combine == "gate":
                output, weights = local_attention(
                    module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
                )
                output = self._gated(output, mem_scores, mem_values, valid, context)
            else:
                output, weights = self._joint(
                    module, query, key, value, attention_mask, mem_scores, mem_values, valid, scaling,
                    dropout, kwargs.get("softcap"), context, local_attention is _eager_attention,
                )  # fmt: skip
        if context.write and first_pass:  # no autograd records: checkpoint recomputation stays identical
            context.memory.write(
                self.layer_idx,
                key[:, :, -tokens:],
                value[:, :, -tokens:],
                context.positions,
                context.rotary,
                context.store,
                context.doc_positions,
            )
        if context.stats is not None:
            entries = context.memory.layers[self.layer_idx].lengths.tolist()
            context.stats.setdefault("entries", {})[self.layer_idx] = entries
        return output, weights

    def _gated(
        self,
        local: torch.Tensor,
        mem_scores: torch.Tensor,
        mem_values: torch.Tensor,
        valid: torch.Tensor,
        context: MemoryContext,
    ) -> torch.Tensor:
        """g * softmax-attention over the retrieved entries (their scores `[B, Hkv, M, k]`) + (1 - g) * local, per
        query head."""
        batch, tokens, heads, dim = local.shape
        group = heads // self.num_kv_heads
        scale = self.memory_scale.view(1, self.num_kv_heads, group, 1, 1).to(mem_scores.dtype)
        scores = mem_scores.reshape(batch, self.num_kv_heads, group, tokens, -1) * scale
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
        mem_scores: torch.Tensor,
        mem_values: torch.Tensor,
        valid: torch.Tensor,
        scaling: float,
        dropout: float,
        softcap: float | None,
        context: MemoryContext,
        weights: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One softmax over the local keys and the retrieved keys (their scores `[B, Hkv, M, k]`): in inference on CPU
        by `_joint_fused`, else eagerly, a tile of queries at a time (`JOINT_TILE_BYTES`). `weights`: also return the
        probabilities `[B, H, T, local + k]` (as eager attention does)."""
        batch, heads, tokens, dim = query.shape
        mask = _additive_mask(attention_mask, tokens, key.shape[2], query)  # [B or 1, 1, T or 1, S]
        per_token = (mem_scores.reshape(batch, heads, tokens, -1), valid.reshape(batch, heads, tokens, -1))
        mem_values = mem_values.reshape(batch, heads, tokens, -1, dim)
        fused = None
        if not weights and softcap is None and not (dropout and module.training):
            fused = self._joint_fused(query, key, value, mask, *per_token, mem_values, scaling)
        if fused is not None:
            (output, share), probs = fused, None
        else:
            tile = max(1, JOINT_TILE_BYTES // (4 * batch * heads * key.shape[2]))
            outputs, probs, shares = [], [], []
            for t0 in range(0, tokens, tile):
                rows = slice(t0, t0 + tile)
                output, local, memory, share = self._joint_tile(
                    module, query[:, :, rows], key, value, mask if mask.shape[2] == 1 else mask[:, :, rows],
                    per_token[0][:, :, rows], mem_values[:, :, rows], per_token[1][:, :, rows], scaling, dropout,
                    softcap,
                )  # fmt: skip
                outputs.append(output)
                probs.append(torch.cat((local, memory), dim=-1) if weights else None)
                shares.append(share)
            output, share = torch.cat(outputs, dim=2), torch.cat(shares, dim=2)
            probs = torch.cat(probs, dim=2) if weights else None
        if context.stats is not None:
            context.stats.setdefault("memory_share", {})[self.layer_idx] = share.mean(dim=(0, 2)).tolist()
        return output.transpose(1, 2).contiguous(), probs

    def _joint_fused(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor,
        mem_scores: torch.Tensor,
        valid: torch.Tensor,
        mem_values: torch.Tensor,
        scaling: float,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`_joint` without its scores (inference on CPU): the local part by torch's fused attention, which also gives
        each query's log-sum-exp, merged with the retrieved entries' weights under one maximum. Returns the output
        `[B, H, T, D]` and each query's probability on memory `[B, H, T]`, or None where the kernel does not apply."""
        if mask.shape[2] != query.shape[2]:
            mask = mask.expand(-1, -1, query.shape[2], -1)
        groups = query.shape[1] // self.num_kv_heads
        local = attention_with_logsumexp(
            query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1), mask, scaling
        )
        if local is None:
            return None
        output, logsumexp = local
        # the local keys enter the shared softmax as one logit, their log-sum-exp: its probability is their total
        local_weight, memory = _shared_softmax(logsumexp.unsqueeze(-1), self._memory_logits(mem_scores, valid, scaling))
        memory_out = torch.matmul(memory.to(query.dtype).unsqueeze(-2), mem_values).squeeze(-2)
        return output * local_weight.to(query.dtype) + memory_out, memory.sum(-1)

    def _memory_logits(
        self, mem_scores: torch.Tensor, valid: torch.Tensor, scaling: float, softcap: float | None = None
    ) -> torch.Tensor:
        """The retrieved entries' logits in the joint softmax `[B, H, t, k]` (fp32): scaled, softcapped, spread around
        each query's best by `memory_sharpness`, raised by the per-head and global memory biases; -inf where no entry
        was retrieved."""
        memory = mem_scores.float() * scaling
        if softcap is not None:
            memory = torch.tanh(memory / softcap) * softcap
        memory = memory.masked_fill(~valid, float("-inf"))
        sharpness = self.config.memory_sharpness
        if sharpness != 1.0:
            best = memory.amax(-1, keepdim=True)
            best = best.masked_fill(best == float("-inf"), 0.0)  # a query that retrieved nothing
            memory = best + sharpness * (memory - best)
        return memory + (self.memory_bias.float().view(1, -1, 1, 1) + self.config.memory_score_bias)

    def _joint_tile(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor,
        mem_scores: torch.Tensor,
        mem_values: torch.Tensor,
        valid: torch.Tensor,
        scaling: float,
        dropout: float,
        softcap: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`_joint` for the queries `[B, H, t, D]` of one tile (retrieved scores `[B, H, t, k]`, values
        `[B, H, t, k, D]`): the query heads of a key/value head share one matmul (no repeated keys), the two parts
        share one maximum and one denominator (no concatenation). Returns the output `[B, H, t, D]`, the local and
        memory probabilities `[B, H, t, local]`, `[B, H, t, k]`, and each query's probability on memory `[B, H, t]`."""
        batch, heads, tokens, dim = query.shape
        kv_heads, local_keys = self.num_kv_heads, key.shape[2]
        by_kv_head = query.reshape(batch, kv_heads, -1, dim)  # query head h*G+g reads kv head h
        local = torch.matmul(by_kv_head, key.transpose(2, 3)).view(batch, heads, tokens, local_keys).float()
        local = local * scaling
        if softcap is not None:
            local = torch.tanh(local / softcap) * softcap
        local, memory = _shared_softmax(local + mask, self._memory_logits(mem_scores, valid, scaling, softcap))
        share = memory.detach().sum(-1)
        local = F.dropout(local, p=dropout, training=module.training).to(query.dtype)
        memory = F.dropout(memory, p=dropout, training=module.training).to(query.dtype)
        output = torch.matmul(local.view(batch, kv_heads, -1, local_keys), value).view(batch, heads, tokens, dim)
        output = output + torch.matmul(memory.unsqueeze(-2), mem_values).squeeze(-2)
        return output, local, memory, share


def _shared_softmax(local: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax over two sets of logits `[..., S]` and `[..., k]` (one maximum, one denominator, no
    concatenation): their probabilities, fp32. A query with every logit -inf gets probability 0 everywhere."""
    top = torch.maximum(local.amax(-1, keepdim=True), memory.amax(-1, keepdim=True)).detach()
    top = torch.where(torch.isfinite(top), top, 0.0)
    local, memory = torch.exp(local - top), torch.exp(memory - top)
    total = local.sum(-1, keepdim=True) + memory.sum(-1, keepdim=True)
    inverse = torch.where(total > 0, 1.0 / total.clamp(min=torch.finfo(total.dtype).tiny), 0.0)
    return local * inverse, memory * inverse


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
        knn = memory_context.knn.get(layer)
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
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention with grouped-query support (what transformers' model files call eager attention)."""
    scaling = attention_scaling(module, scaling, query.shape[-1])
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


def _refuse_adapters(model: nn.Module) -> None:
    """Refuse a base model that carries PEFT adapters: their weights would not survive `save_pretrained`."""
    if hasattr(model, "peft_config") or any(type(m).__module__.startswith("peft.") for m in model.modules()):
        raise ValueError(
            "The base model carries PEFT adapters (e.g. LoRA). Convert the plain base model first and add adapters "
            "to the memorizing model (peft.get_peft_model(memorizing_model, config)), or merge them into the base "
            "weights first (merge_and_unload())."
        )


class MemorizingPreTrainedModel(WrapperPreTrainedModel):
    config_class = MemorizingConfig
    base_model_prefix = "language_model"
    supports_gradient_checkpointing = True

    def init_own_weights(self, module: nn.Module) -> bool:
        if not isinstance(module, KNNAttention):
            return False
        if module.combine == "gate":  # transformers' init helpers skip parameters loaded from a checkpoint
            constant_(module.gate_bias, self.config.gate_init)
            constant_(module.memory_scale, self.config.memory_scale_init or math.sqrt(module.head_dim))
        else:
            constant_(module.memory_bias, 0.0)
        return True


class MemorizingModel(MemorizingPreTrainedModel):
    """A decoder whose memory layers read and write an external kNN memory; returns the base decoder's hidden states
    (what `AutoModel` loads). `MemorizingForCausalLM` adds the language-model head and generation.

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
        self.knn_attention = nn.ModuleDict(
            {str(i): KNNAttention(config, i, kv_heads, head_dim) for i in config.memory_layers}
        )
        self.memory_geometry = MemoryGeometry(
            layers=tuple(config.memory_layers),
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            memory_size=config.memory_size,
            combine=config.combine,
            rotary_placement=config.rotary_placement if self._rotary_embedding is not None else "absolute",
            base_model_type=config.text_config.model_type,
        )
        self.memory = self.new_memory()
        self.post_init()

    # -- construction from an existing model
    @classmethod
    def from_base_pretrained(
        cls,
        model_or_path: PreTrainedModel | str | Path,
        base_model_kwargs: dict[str, Any] | None = None,
        memory_adapter: str | Path | None = None,
        **memory_kwargs: Any,
    ) -> MemorizingModel:
        """Turn a pretrained causal LM (a loaded model or a local folder / Hub id) into a memorizing one.

        The base weights are used as they are (no second load, no copy); `memory_kwargs` are `MemorizingConfig`
        fields (memory_layers, memory_size, memory_top_k, combine, ...); `base_model_kwargs` go to
        `AutoModelForCausalLM.from_pretrained` when a path is given. `memory_adapter`: a trained memory adapter (a
        packaged name or a folder, `adapters.py`) whose settings and parameters are used; `memory_kwargs` override
        its settings.
        """
        adapter = read_adapter(memory_adapter) if memory_adapter is not None else None
        if isinstance(model_or_path, (str, Path)):
            model_or_path = AutoModelForCausalLM.from_pretrained(str(model_or_path), **(base_model_kwargs or {}))
        if isinstance(model_or_path, MemorizingModel):
            raise TypeError("The model is already a memorizing model.")
        if not isinstance(model_or_path, PreTrainedModel):
            raise TypeError(
                f"from_base_pretrained needs a PreTrainedModel or a path, got {type(model_or_path).__name__}."
            )
        _refuse_adapters(model_or_path)
        if adapter is not None:
            check_base(adapter[1], model_or_path.config, repr(str(memory_adapter)))
            memory_kwargs = {**adapter[0], **memory_kwargs}
        config = MemorizingConfig(text_config=model_or_path.config, **memory_kwargs)
        model = cls(config, language_model=model_or_path)
        if adapter is not None:
            apply_adapter(model, adapter[2], repr(str(memory_adapter)))
        model = model.to(model_or_path.device)
        if model_or_path.generation_config is not None:  # generate as the base model does (eos ids, sampling, ...)
            model.generation_config = copy.deepcopy(model_or_path.generation_config)
        return model.train(model_or_path.training)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | Path, *model_args: Any, memory_file: str | None = None, **kwargs: Any
    ) -> MemorizingModel:
        """`PreTrainedModel.from_pretrained`, plus `memory_file`: a memory file to load, by name beside the weights
        (e.g. `"memory.safetensors"`, found in the same folder or Hub repo and revision) or as a path. Memory settings
        given as keyword arguments (`memory_size=...`) go through the same validation as `MemorizingConfig`."""
        config = kwargs.get("config")
        overrides = {name: kwargs.pop(name) for name in list(kwargs) if name in MemorizingConfig.memory_fields()}
        if overrides:
            if not isinstance(config, MemorizingConfig):
                config, unused = MemorizingConfig.from_pretrained(
                    pretrained_model_name_or_path, return_unused_kwargs=True, **_hub_kwargs(kwargs)
                )
            kwargs["config"] = config.with_memory_settings(**overrides)
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True: (model, info)
        tie_weights_left_unloaded(model.language_model)
        if memory_file is not None:
            model.load_memory(memory_file, **_hub_kwargs(kwargs))
        return loaded

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

    def set_attn_implementation(self, attn_implementation: str | dict) -> None:
        """Choose the local attention (`"sdpa"` or `"eager"`): the memory layers stay attached. Other implementations
        are refused (streaming and the XL cache pass explicit masks they do not take)."""
        name = attn_implementation.get("", None) if isinstance(attn_implementation, dict) else attn_implementation
        name = (name or "").removeprefix("memorizing_")
        if name not in LOCAL_ATTN_IMPLEMENTATIONS:
            raise ValueError(
                f"A memorizing model runs its local attention with {' or '.join(LOCAL_ATTN_IMPLEMENTATIONS)}, not "
                f"{attn_implementation!r}."
            )
        self.config.local_attn_implementation = name
        self.language_model.set_attn_implementation(self.config.memory_attn_implementation)

    def memory_module_names(self) -> list[str]:
        """Names of the modules that hold the memory layers' own parameters (gates, scales): what a PEFT config lists
        in `modules_to_save` to train them beside the adapters."""
        return [f"knn_attention.{layer}" for layer in self.config.memory_layers]

    # -- memory
    def new_memory(self, memory_size: int | None = None) -> MemoryBank:
        """An empty memory for this model (the layers, heads and placement of `model.memory`), holding
        `memory_size` tokens per layer and row (default `config.memory_size`)."""
        if memory_size is not None and (not isinstance(memory_size, int) or memory_size < self.config.memory_top_k):
            raise ValueError(f"memory_size must be an integer >= memory_top_k ({self.config.memory_top_k}).")
        geometry = replace(self.memory_geometry, memory_size=memory_size or self.config.memory_size)
        dtype = getattr(torch, self.config.memory_dtype) if self.config.memory_dtype else None
        backends = functools.partial(make_backend, self.config)
        return MemoryBank(
            geometry, backends, dtype, self.config.xl_sink_tokens, xl_layers=self.config.text_config.num_hidden_layers
        )

    def new_cache(
        self, window: int | None = None, memory: MemoryBank | None = None, per_prompt: int = 1
    ) -> MemorizingCache:
        """A streaming cache: `window` tokens of local attention (default `config.local_window`) besides the sinks,
        and a memory for what leaves the window; it reads `memory` (default `model.memory`). `per_prompt`: sequences
        per prompt (beams, `num_return_sequences`), which share the prompt's memory row."""
        window = window or self.config.local_window
        return MemorizingCache(window, self.config.sink_tokens, self.new_memory(), memory, per_prompt)

    def reset_memory(self, rows: torch.Tensor | list[int] | list[bool] | None = None) -> None:
        """Clear `model.memory` (kNN memory and XL cache): all rows, or the rows given as indices or a bool mask."""
        self.memory.reset(rows)

    def save_memory(self, path: str | Path) -> None:
        """Write `model.memory` to a safetensors file (with metadata describing the memory geometry)."""
        self.memory.save(path)

    def load_memory(self, path: str | Path, **hub_kwargs: Any) -> None:
        """Load a memory file written by `save_memory` into `model.memory`; a file that does not fit raises and
        changes nothing.

        `path` is a file path or, if no such file exists, the name of a file beside the weights: relative to the
        folder the model was loaded from, or to its Hub repo (`hub_kwargs`: revision, token, cache_dir, ... as for
        `from_pretrained`) when it was loaded from the Hub.
        """
        self.memory.load(self._memory_file(path, **hub_kwargs), device=self.device, dtype=self.dtype)

    def _memory_file(self, path: str | Path, **hub_kwargs: Any) -> Path:
        """Where the memory file `path` is: a file here; else, for a bare file name, the file of that name beside the
        weights — in the local folder they came from, or in their Hub repo (and revision) when they came from the Hub,
        which is said in the log. Nothing else is ever looked up remotely."""
        path = Path(path)
        if path.is_file():
            return path
        source = str(self.name_or_path or "")
        if path.is_absolute() or len(path.parts) != 1 or not source:
            raise FileNotFoundError(f"No memory file at {path}.")
        if Path(source).is_dir():
            beside = Path(source) / path
            if not beside.is_file():
                raise FileNotFoundError(
                    f"No memory file {str(path)!r}: not a file here, nor beside the weights in {source}."
                )
            return beside
        logger.info(f"Memory file {path.name!r}: looking beside the weights in the Hub repo {source!r}.")
        found = cached_file(source, path.name, **hub_kwargs)
        if found is None:
            raise FileNotFoundError(f"No memory file {str(path)!r}: not a file here, nor in the Hub repo {source!r}.")
        return Path(found)

    def save_memory_adapter(self, folder: str | Path) -> None:
        """Write the memory layers' parameters and the memory settings to `folder`, apart from the base weights: a
        memory adapter, loaded with `from_base_pretrained(base, memory_adapter=folder)`."""
        save_adapter(self, folder)

    def save_pretrained(self, save_directory: str | Path, *args: Any, save_memory: bool = False, **kwargs: Any) -> None:
        """`PreTrainedModel.save_pretrained`; `save_memory=True` also writes `model.memory` beside the weights
        (`memory.safetensors`, loaded with `from_pretrained(..., memory_file="memory.safetensors")`). A filled memory
        that is not saved is named in a warning: it is not part of the weights."""
        wrapped = self.__class__  # FSDP2 swaps in a subclass defined in torch: save (code, auto_map) as the class below
        if wrapped.__module__.startswith("torch."):
            self.__class__ = next(cls for cls in wrapped.__mro__ if not cls.__module__.startswith("torch."))
        try:
            super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.__class__ = wrapped
        if save_memory:
            self.save_memory(Path(save_directory) / MEMORY_FILE_NAME)
        elif not self.memory.is_empty():
            logger.warning(
                f"save_pretrained: the model's memory ({self.memory.entries()} entries per layer and row) is not part "
                f"of the checkpoint. Pass save_memory=True to write it beside the weights ({MEMORY_FILE_NAME})."
            )

    # -- forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Any = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        memory: MemoryBank | None = None,
        memory_reset: torch.Tensor | None = None,
        update_memory: bool | None = None,
        output_memory_stats: bool = False,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ):
        r"""
        The base model's forward, plus:

        memory (`MemoryBank`, *optional*):
            The memory this call reads and writes; defaults to the memory of the `cache` (a `MemorizingCache`), else
            `model.memory`.
        memory_reset (`torch.BoolTensor` of shape `(batch_size,)`, *optional*):
            Rows whose memory is cleared before reading: a new document starts in that row. Giving it says that the
            batch is the next segment of each row's document: the call then writes its tokens to memory.
        update_memory (`bool`, *optional*):
            Write this segment's keys and values to memory after reading. Defaults to whether `memory_reset` is given:
            a plain call (an evaluation harness, a pipeline) reads the memory and changes nothing.
        output_memory_stats (`bool`, *optional*):
            Add `memory_stats` to the output: entries per row, and per-head gate values (gate mode) or the share of
            attention that goes to memory (joint mode), per memory layer.

        Rows: batch row b reads memory row b; a one-row memory is read by every row (read-only). With `cache` a
        `MemorizingCache` (as `generate` and `memorize` use), the input is streamed through a bounded local window
        instead, and what leaves the window goes to the cache's own memory. The cache is also accepted under its name
        before transformers 5.24, `past_key_values`.

        Returns the base model's output (e.g. `CausalLMOutputWithPast`, with `loss` when `labels` are given).
        """
        cache = pop_cache(kwargs, cache)
        if memory is None:
            memory = cache.memory if isinstance(cache, MemorizingCache) and cache.memory is not None else self.memory
        reference = input_ids if input_ids is not None else inputs_embeds
        if reference is None:
            raise ValueError("Pass input_ids or inputs_embeds.")
        batch, tokens = reference.shape[:2]
        self._check_inputs(memory, batch, tokens, attention_mask, labels)
        if memory_reset is not None:
            memory_reset = torch.as_tensor(memory_reset, device=reference.device)
            if memory_reset.dtype != torch.bool or memory_reset.shape != (batch,):
                raise ValueError(
                    f"memory_reset must be a bool tensor of shape ({batch},) (one flag per batch row), got "
                    f"{memory_reset.dtype} of shape {tuple(memory_reset.shape)}."
                )
        stats = {} if output_memory_stats else None
        if isinstance(cache, MemorizingCache):
            if labels is not None or memory_reset is not None:
                raise ValueError(
                    "labels and memory_reset are for segment-by-segment reading, not with a MemorizingCache."
                )
            outputs = self._read_streaming(
                input_ids, inputs_embeds, attention_mask, cache, memory, stats, logits_to_keep, **kwargs
            )
        else:
            write = update_memory if update_memory is not None else memory_reset is not None
            if self.training and labels is not None and not write:
                logger.warning_once(
                    "A memorizing model is training on batches without memory_reset flags: its memory is read but "
                    "never written, and no memory is reset per document. Train with MemorizingTrainer on "
                    "DocumentStreams (or pass memory_reset / update_memory=True yourself)."
                )
            outputs = self._read_segment(
                input_ids, inputs_embeds, attention_mask, position_ids, cache, labels, memory, memory_reset, write,
                stats, logits_to_keep, **kwargs,
            )  # fmt: skip
        return with_memory_stats(outputs, stats) if output_memory_stats else outputs

    def _check_inputs(
        self,
        memory: MemoryBank,
        batch: int,
        tokens: int,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None,
    ) -> None:
        """Refuse inputs that do not fit, before anything reads or writes memory."""
        if not isinstance(memory, MemoryBank):
            raise TypeError(f"memory must be a MemoryBank (model.new_memory()), got {type(memory).__name__}.")
        if replace(memory.geometry, memory_size=self.memory_geometry.memory_size) != self.memory_geometry:
            raise ValueError(f"This memory was made for another model ({memory.geometry}); use model.new_memory().")
        if labels is not None and tuple(labels.shape[:2]) != (batch, tokens):
            raise ValueError(f"labels have shape {tuple(labels.shape)} but the input is [{batch}, {tokens}].")
        if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[0] != batch:
            raise ValueError(f"attention_mask has {attention_mask.shape[0]} rows but the input has {batch}.")

    def _memory_group(self, memory: MemoryBank, batch: int, per_prompt: int = 1) -> int:
        """Batch rows per memory row for a read-only call: each prompt's row (groups of `per_prompt` sequences), or
        the single row of a one-row memory for every prompt; anything else is ambiguous and refused."""
        rows = memory.num_rows
        if rows == 0 or memory.is_empty():
            return 1
        if rows * per_prompt == batch:
            return per_prompt
        if rows == 1:
            return batch
        raise ValueError(
            f"The memory holds {rows} rows (documents) but this call has {batch // per_prompt} prompts: give one "
            "prompt per memory row, or read a one-row memory with any number of prompts (memory=...)."
        )

    def _context(self, memory: MemoryBank, group: int, positions: torch.Tensor, **fields: Any) -> MemoryContext:
        return MemoryContext(
            knn={int(i): module for i, module in self.knn_attention.items()},
            memory=memory,
            group=group,
            positions=positions,
            rotary=self._rotary(),
            **fields,
        )

    def _read_segment(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.FloatTensor | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        cache: Any,
        labels: torch.LongTensor | None,
        memory: MemoryBank,
        memory_reset: torch.Tensor | None,
        write: bool,
        stats: dict[str, Any] | None,
        logits_to_keep: int | torch.Tensor,
        **kwargs: Any,
    ):
        """Read one segment per batch row: retrieve, attend, and (if `write`) store it after reading."""
        reference = input_ids if input_ids is not None else inputs_embeds
        batch, tokens = reference.shape[:2]
        device = reference.device
        if write:
            memory.check_batch_size(batch, reset=memory_reset)
            group = 1
        else:
            group = self._memory_group(memory, batch)
        if memory_reset is not None:
            memory.reset(memory_reset)
        xl = memory.xl if self.config.xl_cache and cache is None and group == 1 else None
        offset = xl.length if xl is not None else 0
        max_positions = getattr(self.config.text_config, "max_position_embeddings", None)
        if offset and max_positions and offset + tokens > max_positions:
            raise ValueError(
                f"The XL cache ({offset} tokens) plus this segment ({tokens}) exceed the base model's "
                f"{max_positions} positions: use segments of at most {max_positions // 2} tokens with xl_cache=True."
            )
        real = _real_tokens(attention_mask, batch, tokens, device)
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            if attention_mask is not None and attention_mask.dim() == 2:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -tokens:]
            else:
                position_ids = torch.arange(past, past + tokens, device=device).expand(batch, -1)
        position_ids = position_ids + offset  # the previous segment (XL cache) occupies positions [0, offset)
        distance = real.sum(dim=1)
        if xl is not None and offset:
            distance = distance + xl.valid.to(device).sum(dim=1)
        if cache is not None:
            distance = distance + cache.get_seq_length()
        context = self._context(
            memory,
            group,
            position_ids,
            overflow=None,
            write=write,
            distance=distance.unsqueeze(1),
            doc_positions=memory.document_positions(real),
            store=self._storable(input_ids, real, sinks=self.config.sink_tokens),
            stats=stats,
            xl=xl.snapshot() if xl is not None else None,
        )
        outputs = self._run_base(
            context,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=labels,
            logits_to_keep=logits_to_keep,
            **cache_kwargs(cache),
            **kwargs,
        )
        if write:
            memory.advance(real)
            if xl is not None:
                xl.advance(context.xl_new, real, offset, context.rotary)
        return outputs

    def _read_streaming(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.FloatTensor | None,
        attention_mask: torch.Tensor | None,
        cache: MemorizingCache,
        memory: MemoryBank,
        stats: dict[str, Any] | None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ):
        """Read the new tokens in chunks of at most `cache.window`, reading `memory` and the cache's overflow memory;
        what leaves the window goes to the overflow memory."""
        reference = input_ids if input_ids is not None else inputs_embeds
        batch, tokens = reference.shape[:2]
        real = _real_tokens(attention_mask, batch, tokens, reference.device)
        if cache.sink_columns is None:
            cache.start(real)
        group = self._memory_group(memory, batch, cache.per_prompt)
        kwargs.pop("cache_position", None)  # logical positions of the full sequence: the cache is physical
        kwargs.pop("use_cache", None)
        outputs, logits = None, []
        chunks = range(0, tokens, cache.window)
        quiet = len(chunks) < PROGRESS_CHUNKS
        for start in logging.tqdm(chunks, desc="reading", unit="window", disable=quiet, leave=False):
            end = min(start + cache.window, tokens)
            chunk_real = real[:, start:end]
            chunk_ids = input_ids[:, start:end] if input_ids is not None else None
            positions = cache.next_positions(chunk_real)
            self._check_positions(positions)
            store = self._storable(chunk_ids, chunk_real, sinks=0)
            doc_positions = cache.overflow.document_positions(chunk_real)
            cached = cache.columns["real"].sum(dim=1, keepdim=True) if cache.columns else 0
            distance = cached + chunk_real.long().cumsum(dim=1)  # per token: how the input is chunked does not matter
            context = self._context(
                memory,
                group,
                positions,
                overflow=cache.overflow,
                write=False,
                distance=distance,
                doc_positions=doc_positions,
                store=store,
                stats=stats,
            )
            outputs = self._run_base(
                context,
                input_ids=chunk_ids,
                inputs_embeds=inputs_embeds[:, start:end] if inputs_embeds is not None else None,
                attention_mask=cache.attention_mask(chunk_real),
                position_ids=positions,
                use_cache=True,
                logits_to_keep=logits_to_keep if end == tokens else 1,
                **cache_kwargs(cache),
                **kwargs,
            )
            cache.append(real=chunk_real, storable=store, doc_positions=doc_positions, positions=positions)
            cache.overflow.advance(chunk_real)
            cache.evict(cache.excess(), context.rotary)
            logits.append(outputs.logits if hasattr(outputs, "logits") else outputs.last_hidden_state)
        if isinstance(logits_to_keep, int) and logits_to_keep == 0:
            if hasattr(outputs, "logits"):
                outputs.logits = torch.cat(logits, dim=1)
            else:
                outputs.last_hidden_state = torch.cat(logits, dim=1)
        set_output_cache(outputs, cache)
        return outputs

    def _run_base(self, context: MemoryContext, **inputs: Any):
        """Run the base decoder (no language-model head) with the memory context."""
        inputs.pop("labels", None)
        inputs.pop("logits_to_keep", None)
        return self.language_model.get_decoder()(memory_context=context, **inputs)

    def _rotary(self) -> Rotary | None:
        """The base model's rotary embedding (None without one), re-read when its frequencies change (loading,
        moving to another device, dynamic scaling)."""
        if self._rotary_embedding is None:
            return None
        embedding = self.language_model.get_submodule(self._rotary_embedding)
        if self._rotary_cache is None or self._rotary_cache.inv_freq is not embedding.inv_freq:
            self._rotary_cache = Rotary.of(embedding)
        return self._rotary_cache

    def _storable(self, input_ids: torch.Tensor | None, real: torch.Tensor, sinks: int) -> torch.Tensor:
        """Tokens that may be written to memory: real (not padding), not a never-stored id such as BOS, and not one of
        the segment's first `sinks` tokens (attention sinks)."""
        store = real.clone()
        if input_ids is not None and self.config.never_store_token_ids:
            never = torch.as_tensor(self.config.never_store_token_ids, device=input_ids.device)
            store &= ~torch.isin(input_ids, never)
        store[:, :sinks] = False
        return store

    def _check_positions(self, positions: torch.Tensor) -> None:
        limit = getattr(self.config.text_config, "max_position_embeddings", None)
        if limit is not None and int(positions.max()) >= limit:
            raise ValueError(
                f"Streaming needs position {int(positions.max())} but the base model has {limit} positions. Use a "
                f"smaller window (window + chunk must stay below {limit}); models without rotary embeddings cannot "
                "stream beyond their positions."
            )


class MemorizingForCausalLM(MemorizingModel, MemorizingGenerationMixin):
    """A causal LM whose memory layers read and write an external kNN memory (see `MemorizingModel`), with
    `generate` and `memorize` (`generation.py`)."""

    def _run_base(self, context: MemoryContext, **inputs: Any):
        return self.language_model(memory_context=context, **inputs)


def make_backend(config: MemorizingConfig) -> RetrievalBackend:
    """The retrieval backend `config.retrieval` names (optional backends are imported only when chosen). Backends are
    imported here, by the modeling file, because remote code of transformers 5.3 copies only its direct imports."""
    if config.retrieval == "faiss":
        from .retrieval_faiss import FaissBackend

        return FaissBackend(index_kind=config.faiss_index, nprobe=config.faiss_nprobe)
    if config.retrieval == "pages":
        from .retrieval_pages import PageBackend

        return PageBackend(budget=config.page_budget)
    return ExactBackend()


def _real_tokens(attention_mask: torch.Tensor | None, batch: int, tokens: int, device: torch.device) -> torch.Tensor:
    """`[batch, tokens]` bool: the new tokens that are not padding (from a 2D attention mask)."""
    if attention_mask is not None and attention_mask.dim() == 2:
        return attention_mask[:, -tokens:].bool()
    return torch.ones(batch, tokens, dtype=torch.bool, device=device)


def _hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {name: kwargs[name] for name in _HUB_KWARGS if name in kwargs}


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
