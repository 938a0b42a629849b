"""Configuration of a memorizing causal language model.

A `MemorizingConfig` nests the configuration of an ordinary Hugging Face decoder (`text_config`) and adds the
settings of the kNN memory of Memorizing Transformers (Wu et al., ICLR 2022): which layers read and write an
external memory of (key, value) pairs, how large the memory is, how many entries each query retrieves and how the
retrieved entries are mixed with local attention.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

from transformers import AutoConfig, PretrainedConfig, logging

from ._compat import (
    attention_implementation,
    causal_lm_class,
    implementations,
    set_implementations,
    supports_attention_interface,
)

logger = logging.get_logger(__name__)

COMBINE_MODES = ("gate", "joint")
RETRIEVAL_BACKENDS = ("exact", "faiss", "pages")
FAISS_INDEX_KINDS = ("flat", "ivf", "hnsw")
ROTARY_PLACEMENTS = ("fixed", "absolute", "none")
MEMORY_DTYPES = ("float32", "bfloat16", "float16")
LOCAL_ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


class MemorizingConfig(PretrainedConfig):
    r"""
    Configuration of [`MemorizingForCausalLM`]: a base decoder plus kNN memory on some of its attention layers.

    Args:
        text_config (`PretrainedConfig` or `dict`):
            Configuration of the base decoder-only model (Llama, Qwen2, Mistral, GPT-2, GPT-NeoX, Gemma, ...). It is
            named `text_config` so that transformers' generation utilities find it with `get_text_config()`.
        memory_layers (`list[int]`, *optional*):
            Indices of the layers that get kNN memory; negative indices count from the end. Defaults to one layer at
            about 3/4 of the depth (layer 9 of 12 in the paper).
        memory_size (`int`, *optional*, defaults to 65536):
            Capacity of the memory in tokens, per memory layer and batch row (FIFO: the oldest entries are
            overwritten when it is full).
        memory_top_k (`int`, *optional*, defaults to 32):
            Number of entries each query retrieves from memory (not `top_k`, which generation uses for sampling).
        memory_dtype (`str`, *optional*):
            Dtype of the stored keys and values (`"float32"`, `"bfloat16"`, `"float16"`); defaults to the dtype of
            the keys the layer computes.
        retrieval (`str`, *optional*, defaults to `"exact"`):
            `"exact"` (blocked exact top-k in torch, CPU or CUDA), `"faiss"` (one faiss index per row and head; needs
            the `faiss-cpu` or `faiss-gpu` extra) or `"pages"` (coarse-to-exact in torch, CPU or CUDA: pages of
            similar keys ranked by centroid, the visited pages' keys re-ranked exactly; see `retrieval_pages.py`).
        faiss_index (`str`, *optional*, defaults to `"flat"`):
            Kind of faiss index when `retrieval="faiss"`: `"flat"` (exact), `"ivf"` or `"hnsw"` (approximate, over
            MIPS-augmented keys).
        faiss_nprobe (`int`, *optional*, defaults to 8):
            Number of IVF lists searched per query when `faiss_index="ivf"`.
        page_budget (`float`, *optional*, defaults to 0.05):
            Share of the pages each query visits when `retrieval="pages"`; `None` visits every page that could hold
            a top-k entry (exact).
        combine (`str`, *optional*, defaults to `"gate"`):
            How retrieved entries are mixed with local attention. `"gate"` is the paper: memory attention has its own
            softmax over the retrieved keys, queries and keys are L2-normalised and scaled by a learned per-head
            factor, and a learned per-head sigmoid gate mixes memory and local attention. `"joint"`: the retrieved
            keys join the local softmax; it adds no parameters, so a pretrained model can use memory before any
            fine-tuning.
        gate_init (`float`, *optional*, defaults to 0.0):
            Initial gate bias b (gate = sigmoid(b)); 0 is the paper's choice, a negative value starts fine-tuning
            of a pretrained model closer to its original behaviour.
        memory_scale_init (`float`, *optional*):
            Initial value of the learned per-head scale of the normalised memory scores (gate mode). Defaults to
            `sqrt(head_dim)`.
        memory_score_bias (`float`, *optional*, defaults to 0.0):
            Joint mode: added to the scaled scores of the retrieved entries in the shared softmax, i.e. multiplies
            their weight against the local keys by exp(bias). Zero-shot, a few retrieved entries compete with a
            whole window of local keys; a bias of about 1 lets a retrieved fact win, at a small cost in perplexity
            (docs/results.md, long-context recall). Read at every call: `model.config.memory_score_bias = 1.0` applies
            at once.
        memory_sharpness (`float`, *optional*, defaults to 1.0):
            Joint mode: the retrieved entries' logits are spread around the best one's by this factor (a temperature
            of 1 / sharpness among them), leaving the best entry's weight against the local keys as it was. A long
            memory holds many more near-matches than a window (every token that followed a `(` in a long module):
            the right entry, retrieved first, shares its weight with them; 2 concentrates it (docs/results.md,
            definition recall). Read at every call, like `memory_score_bias`.
        sink_tokens (`int`, *optional*, defaults to 1):
            Number of tokens at the start of every segment (and so of every document) that are never written to
            memory. These are attention sinks: stored, every query retrieves them and memory hurts.
        never_store_token_ids (`list[int]`, *optional*):
            Token ids never written to memory (padding is never written either). Defaults to the base model's
            `bos_token_id`, if it has one.
        rotary_placement (`str`, *optional*, defaults to `"fixed"`):
            Where memory attention places keys and queries in a rotary model. `"fixed"`: keys are stored unrotated
            and each query is rotated to the offset `memory_query_offset`, so every memory entry looks "just outside
            the local window" whatever its true position (best zero-shot). `"absolute"`: keys are stored rotated at
            their true positions. `"none"`: neither is rotated. Ignored by models without rotary embeddings.
        memory_query_offset (`int`, *optional*):
            The relative distance at which `"fixed"` placement puts every memory entry; defaults to the number of
            keys local attention sees: the segment (and XL cache) when reading segments, each token's window when
            streaming (`generate`, `memorize`), so that the result does not depend on how the input is chunked.
        local_attn_implementation (`str`, *optional*):
            Attention implementation used for local attention and for every layer without memory: `"sdpa"` or
            `"eager"`. Defaults to the base model's own choice (eager for Gemma2, whose logit soft-capping sdpa cannot
            do; sdpa for a base that chose another implementation, e.g. flash attention, since streaming and the XL
            cache need explicit masks).
        local_window (`int`, *optional*, defaults to 1024):
            Tokens of local attention when streaming long inputs and generating (besides the `sink_tokens`, which
            never leave); tokens leaving the window are written to memory.
        xl_cache (`bool`, *optional*, defaults to `False`):
            Transformer-XL cache: when a document is read segment by segment, local attention of every layer also
            sees the previous segment's keys and values (detached), as in the paper's best configurations.
        xl_sink_tokens (`int`, *optional*, defaults to 1):
            Number of tokens at the start of every segment that do not see the XL cache, so that they stay attention
            sinks as in a segment read alone. A pretrained model leans on a first token that saw no context; with
            none in its window, XL reading raised perplexity by a quarter (docs/results.md). 0: every token sees the
            previous segment, as in the paper (whose models were trained with the cache).
    """

    model_type = "memorizing"
    sub_configs = {"text_config": AutoConfig}
    has_no_defaults_at_init = True  # transformers 4.x: there is no sensible default base model

    def __init__(
        self,
        text_config: PretrainedConfig | dict | None = None,
        memory_layers: list[int] | None = None,
        memory_size: int = 65536,
        memory_top_k: int = 32,
        memory_dtype: str | None = None,
        retrieval: str = "exact",
        faiss_index: str = "flat",
        faiss_nprobe: int = 8,
        page_budget: float | None = 0.05,
        combine: str = "gate",
        gate_init: float = 0.0,
        memory_scale_init: float | None = None,
        memory_score_bias: float = 0.0,
        memory_sharpness: float = 1.0,
        sink_tokens: int = 1,
        never_store_token_ids: list[int] | None = None,
        rotary_placement: str = "fixed",
        memory_query_offset: int | None = None,
        local_attn_implementation: str | None = None,
        local_window: int = 1024,
        xl_cache: bool = False,
        xl_sink_tokens: int = 1,
        **kwargs: Any,
    ) -> None:
        if text_config is None:
            raise ValueError(
                "MemorizingConfig needs the base decoder's configuration: pass "
                "text_config=AutoConfig.from_pretrained(...) or use MemorizingForCausalLM.from_base_pretrained(...)."
            )
        if isinstance(text_config, dict):
            text_config = dict(text_config)
            if "model_type" not in text_config:
                raise ValueError("text_config dict has no 'model_type'; cannot tell which decoder it describes.")
            text_config = AutoConfig.for_model(**text_config)
        self.text_config = text_config
        _check_decoder(text_config)

        num_layers = text_config.num_hidden_layers
        if memory_layers is None:
            memory_layers = [max(0, (3 * num_layers) // 4 - 1)]
        if isinstance(memory_layers, int):
            memory_layers = [memory_layers]
        normalized = []
        for layer in memory_layers:
            if not isinstance(layer, int) or not -num_layers <= layer < num_layers:
                raise ValueError(
                    f"memory_layers contains {layer!r}, but the base model has {num_layers} layers: use indices in "
                    f"[{-num_layers}, {num_layers - 1}]."
                )
            normalized.append(layer % num_layers)
        if not normalized:
            raise ValueError("memory_layers is empty: give at least one layer index, e.g. memory_layers=[-3].")
        self.memory_layers = sorted(set(normalized))

        if not isinstance(memory_top_k, int) or memory_top_k < 1:
            raise ValueError(f"memory_top_k must be an integer >= 1, got {memory_top_k!r}.")
        if not isinstance(memory_size, int) or memory_size < memory_top_k:
            raise ValueError(f"memory_size ({memory_size!r}) must be an integer >= memory_top_k ({memory_top_k}).")
        _check_choice("memory_dtype", memory_dtype, MEMORY_DTYPES, allow_none=True)
        _check_choice("retrieval", retrieval, RETRIEVAL_BACKENDS)
        _check_choice("faiss_index", faiss_index, FAISS_INDEX_KINDS)
        _check_choice("combine", combine, COMBINE_MODES)
        _check_choice("rotary_placement", rotary_placement, ROTARY_PLACEMENTS)
        if local_attn_implementation is None:
            local_attn_implementation = _base_attention(text_config)
        _check_choice("local_attn_implementation", local_attn_implementation, LOCAL_ATTN_IMPLEMENTATIONS)
        for name, value in (("sink_tokens", sink_tokens), ("xl_sink_tokens", xl_sink_tokens)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}.")
        if not isinstance(local_window, int) or local_window < 1:
            raise ValueError(f"local_window must be an integer >= 1, got {local_window!r}.")
        if not isinstance(memory_score_bias, (int, float)) or not math.isfinite(memory_score_bias):
            raise ValueError(f"memory_score_bias must be a finite number, got {memory_score_bias!r}.")
        if not isinstance(memory_sharpness, (int, float)) or not 0 < memory_sharpness < math.inf:
            raise ValueError(f"memory_sharpness must be a finite number > 0 (1: off), got {memory_sharpness!r}.")
        if faiss_nprobe < 1:
            raise ValueError(f"faiss_nprobe must be >= 1, got {faiss_nprobe!r}.")
        if page_budget is not None and not 0 < page_budget <= 1:
            raise ValueError(f"page_budget must be in (0, 1] or None (exact), got {page_budget!r}.")
        if memory_query_offset is not None and memory_query_offset < 0:
            raise ValueError(f"memory_query_offset must be >= 0 or None, got {memory_query_offset!r}.")
        if never_store_token_ids is None:
            bos = getattr(text_config, "bos_token_id", None)
            never_store_token_ids = [bos] if isinstance(bos, int) else []

        self.memory_size = memory_size
        self.memory_top_k = memory_top_k
        self.memory_dtype = memory_dtype
        self.retrieval = retrieval
        self.faiss_index = faiss_index
        self.faiss_nprobe = faiss_nprobe
        self.page_budget = page_budget
        self.combine = combine
        self.gate_init = float(gate_init)
        self.memory_scale_init = memory_scale_init
        self.memory_score_bias = float(memory_score_bias)
        self.memory_sharpness = float(memory_sharpness)
        self.sink_tokens = sink_tokens
        self.never_store_token_ids = list(never_store_token_ids)
        self.rotary_placement = rotary_placement
        self.memory_query_offset = memory_query_offset
        self.local_attn_implementation = local_attn_implementation
        self.local_window = local_window
        self.xl_cache = bool(xl_cache)
        self.xl_sink_tokens = xl_sink_tokens
        for name in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings"):
            kwargs.setdefault(name, getattr(text_config, name, None))
        chosen = implementations(text_config)
        super().__init__(**kwargs)
        set_implementations(text_config, chosen)  # PretrainedConfig.__init__ reset them: keep the base model's

    @classmethod
    def memory_fields(cls) -> tuple[str, ...]:
        """The names of the memory settings this config adds to the base model's (its constructor's arguments)."""
        ignored = ("self", "text_config", "kwargs")
        return tuple(name for name in inspect.signature(cls.__init__).parameters if name not in ignored)

    def with_memory_settings(self, **changes: Any) -> MemorizingConfig:
        """A copy with some memory settings changed, validated as the constructor validates them."""
        unknown = sorted(set(changes) - set(self.memory_fields()))
        if unknown:
            raise ValueError(f"Unknown memory settings {unknown}; the settings are {list(self.memory_fields())}.")
        return type(self)(**{**self.to_dict(), **changes})

    @property
    def memory_attn_implementation(self) -> str:
        """Name under which the memorizing attention function is registered for this local implementation."""
        return f"memorizing_{self.local_attn_implementation}"


def _check_choice(name: str, value: Any, choices: tuple[str, ...], allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}: choose one of {', '.join(repr(c) for c in choices)}.")


def _base_attention(text_config: PretrainedConfig) -> str:
    """The local attention implementation that follows the base model's own: eager or sdpa as it chose; sdpa for
    anything else (flash and flex attention take masks in other forms than the explicit ones streaming needs)."""
    chosen = (attention_implementation(text_config) or "sdpa").removeprefix("memorizing_")
    if chosen not in LOCAL_ATTN_IMPLEMENTATIONS:
        logger.warning(
            f"The base model uses {chosen!r} attention; memorizing-hf runs its local attention with 'sdpa' (streaming "
            "and the XL cache pass explicit masks). Set local_attn_implementation='eager' or 'sdpa' to choose."
        )
        chosen = "sdpa"
    return chosen


def _check_decoder(text_config: PretrainedConfig) -> None:
    """Refuse base models that are not decoder-only LMs whose attention goes through the attention interface."""
    model_type = getattr(text_config, "model_type", None)
    if getattr(text_config, "is_encoder_decoder", False):
        raise ValueError(
            f"text_config is an encoder-decoder model ({model_type!r}); memorizing-hf wraps decoder-only causal "
            "language models (Llama, Qwen2, Mistral, GPT-2, GPT-NeoX, Gemma, ...)."
        )
    model_class = causal_lm_class(text_config)
    if model_class is None:
        raise ValueError(
            f"text_config has model_type {model_type!r}, which has no causal language model in transformers; "
            "memorizing-hf wraps decoder-only causal language models (Llama, Qwen2, Mistral, GPT-2, GPT-NeoX, ...)."
        )
    if not supports_attention_interface(model_class):
        raise ValueError(
            f"{model_class.__name__} does not route its attention through transformers' AttentionInterface, which "
            "memorizing-hf patches; pick a model whose attention does (Llama, Qwen2, Mistral, GPT-2, GPT-NeoX, "
            "Gemma, ...)."
        )
    if not hasattr(text_config, "num_hidden_layers"):
        raise ValueError(f"text_config ({model_type!r}) has no num_hidden_layers; cannot place memory layers.")
