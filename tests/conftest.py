"""Shared fixtures: tiny random decoders of every supported architecture, built from configs (no downloads)."""

from __future__ import annotations

import string
from collections.abc import Callable

import pytest
import torch
import transformers

import memorizing_hf  # noqa: F401  (registers the Auto classes and attention functions)

VOCAB = 96


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
    "mistral": _llama_like(transformers.MistralConfig, sliding_window=None),
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
}


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
    return transformers.AutoModelForCausalLM.from_config(TINY_CONFIGS[arch]()).eval()


def tiny_memorizing(arch: str = "llama", seed: int = 0, **memory_kwargs: object) -> memorizing_hf.MemorizingForCausalLM:
    """A tiny memorizing model built around `tiny_base(arch)`."""
    memory_kwargs.setdefault("memory_layers", [1])
    memory_kwargs.setdefault("memory_size", 64)
    memory_kwargs.setdefault("memory_top_k", 4)
    return memorizing_hf.MemorizingForCausalLM.from_base_pretrained(tiny_base(arch, seed), **memory_kwargs)


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
