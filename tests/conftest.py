"""Shared fixtures: tiny random decoders of every supported architecture, built from configs (no downloads)."""

from __future__ import annotations

import os
import string
from collections.abc import Callable

import pytest
import torch
import transformers
from hypothesis import settings

import memorizing_hf  # noqa: F401  (registers the Auto classes and attention functions)

VOCAB = 96

# Property-based tests run a bounded number of examples: "ci" by default, HYPOTHESIS_PROFILE=thorough for a long run.
# (Tests that pin max_examples in their own @settings keep that number.)
settings.register_profile("ci", max_examples=60, deadline=None)
settings.register_profile("thorough", max_examples=1000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _llama_like(config_class: type, **extra: object) -> Callable[[], transformers.PretrainedConfig]:
    def build() -> transformers.PretrainedConfig:
        return config_class(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            **extra,
        )

    return build


TINY_CONFIGS: dict[str, Callable[[], transformers.PretrainedConfig]] = {
    "llama": _llama_like(transformers.LlamaConfig),
    "qwen2": _llama_like(transformers.Qwen2Config),
    "qwen3": _llama_like(transformers.Qwen3Config, head_dim=8),
    "mistral": _llama_like(transformers.MistralConfig, sliding_window=None),
    "mixtral": _llama_like(transformers.MixtralConfig, num_local_experts=2, num_experts_per_tok=1),
    "starcoder2": _llama_like(transformers.Starcoder2Config, residual_dropout=0.0, embedding_dropout=0.0),
    "olmo2": _llama_like(transformers.Olmo2Config, pad_token_id=0),
    "granite": _llama_like(transformers.GraniteConfig, attention_multiplier=0.2, pad_token_id=0),
    "phi3": _llama_like(transformers.Phi3Config, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    # partial rotary: only half of each head's dims rotate
    "phi": _llama_like(transformers.PhiConfig, partial_rotary_factor=0.5, resid_pdrop=0.0, embd_pdrop=0.0),
    # interleaved rotary pairs (x0, x1), (x2, x3), ...
    "cohere": _llama_like(transformers.CohereConfig, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "gemma": lambda: transformers.GemmaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=256,
    ),
    # logit soft-capping (eager attention only) and alternating sliding-window layers
    "gemma2": _llama_like(transformers.Gemma2Config, head_dim=8, sliding_window=64, query_pre_attn_scalar=8),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=3,
        n_head=4,
        n_positions=256,
        bos_token_id=0,
        eos_token_id=0,
        attn_pdrop=0.0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
    ),
    # multi-query attention, no rotary
    "gpt_bigcode": lambda: transformers.GPTBigCodeConfig(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=3,
        n_head=4,
        n_positions=256,
        multi_query=True,
        bos_token_id=0,
        eos_token_id=0,
        attn_pdrop=0.0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
    ),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=256,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    ),
    # no rotary; the config carries num_key_value_heads, which OPT ignores (it builds 4 key/value heads)
    "opt": lambda: transformers.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        word_embed_proj_dim=32,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        dropout=0.0,
    ),
}
# Base models whose own default attention is not sdpa (Gemma2's soft-capping needs eager).
TINY_ATTENTION = {"gemma2": "eager"}


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A character-level tokenizer for the tiny models: ids 0-2 are <unk>, <s> and </s> (the tiny Llama's BOS and EOS),
    ids 3-95 are whitespace, letters, digits and punctuation. It saves and loads like any Hub tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    characters = " \n" + string.ascii_letters + string.digits + "()[]{}:.,_=+-*/'\"#<>!?@%&;|~"
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({character: 3 + index for index, character in enumerate(characters[: VOCAB - 3])})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def tiny_base(arch: str = "llama", seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny randomly initialised base causal LM in eval mode."""
    torch.manual_seed(seed)
    attention = TINY_ATTENTION.get(arch, "sdpa")
    return transformers.AutoModelForCausalLM.from_config(TINY_CONFIGS[arch](), attn_implementation=attention).eval()


def tiny_memorizing(arch: str = "llama", seed: int = 0, **memory_kwargs: object) -> memorizing_hf.MemorizingForCausalLM:
    """A tiny memorizing model built around `tiny_base(arch)`."""
    memory_kwargs.setdefault("memory_layers", [1])
    memory_kwargs.setdefault("memory_size", 64)
    memory_kwargs.setdefault("memory_top_k", 4)
    return memorizing_hf.MemorizingForCausalLM.from_base_pretrained(tiny_base(arch, seed), **memory_kwargs)


def stored_positions(model: memorizing_hf.MemorizingForCausalLM, row: int = 0) -> list[int]:
    """Document positions held by the first memory layer's row, sorted (duplicates kept)."""
    memory = next(iter(model.memory.layers.values()))
    return sorted(memory.positions[row, : int(memory.lengths[row])].tolist())


def read_positions(model: memorizing_hf.MemorizingForCausalLM, sequence: torch.Tensor) -> list[int]:
    """Positions `generate` fed to the model (all but the last output token) that memory must hold: not a sink,
    not a never-stored id such as BOS."""
    never = set(model.config.never_store_token_ids)
    fed = sequence[:-1].tolist()
    return [p for p, token in enumerate(fed) if p >= model.config.sink_tokens and token not in never]


@pytest.fixture
def token_ids() -> Callable[..., torch.Tensor]:
    """Random token ids above 2, so none is a BOS id of the tiny configs (BOS is never stored)."""

    def make(batch: int = 2, length: int = 16, seed: int = 1) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(3, VOCAB, (batch, length), generator=generator)

    return make


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and a shared CPU makes two threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
