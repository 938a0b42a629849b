"""MemorizingConfig: defaults, validation with clear errors, serialisation."""

from __future__ import annotations

import pytest
import transformers

from memorizing_hf import MemorizingConfig

from .conftest import TINY_CONFIGS


def test_defaults_follow_the_paper() -> None:
    text = transformers.LlamaConfig(num_hidden_layers=12, hidden_size=64, num_attention_heads=4)
    config = MemorizingConfig(text_config=text)
    assert config.memory_layers == [8]  # layer 9 of 12, as in the paper
    assert config.memory_size == 65536
    assert config.memory_top_k == 32
    assert config.combine == "gate"
    assert config.retrieval == "exact"
    assert config.sink_tokens == 1
    assert config.rotary_placement == "fixed"
    assert config.never_store_token_ids == [text.bos_token_id]
    assert config.get_text_config() is config.text_config


def test_negative_layers_are_normalised() -> None:
    config = MemorizingConfig(text_config=TINY_CONFIGS["llama"](), memory_layers=[-1, 0, -1])
    assert config.memory_layers == [0, 2]


def test_round_trip_through_dict_and_auto_config(tmp_path) -> None:
    config = MemorizingConfig(text_config=TINY_CONFIGS["gpt2"](), memory_layers=[-2], memory_size=128, combine="joint")
    config.save_pretrained(tmp_path)
    loaded = transformers.AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, MemorizingConfig)
    assert loaded.text_config.model_type == "gpt2"
    assert loaded.text_config.n_embd == 32
    for name in ("memory_layers", "memory_size", "memory_top_k", "combine", "sink_tokens", "rotary_placement"):
        assert getattr(loaded, name) == getattr(config, name)
    assert MemorizingConfig.from_dict(config.to_dict()).memory_layers == [1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"memory_layers": [3]}, "memory_layers contains 3"),
        ({"memory_layers": [-4]}, "memory_layers contains -4"),
        ({"memory_layers": []}, "memory_layers is empty"),
        ({"memory_top_k": 0}, "memory_top_k must be an integer >= 1"),
        ({"memory_size": 8, "memory_top_k": 16}, "memory_size (8) must be an integer >= memory_top_k"),
        ({"retrieval": "annoy"}, "Unknown retrieval 'annoy'"),
        ({"combine": "sum"}, "Unknown combine 'sum'"),
        ({"faiss_index": "lsh"}, "Unknown faiss_index"),
        ({"rotary_placement": "relative"}, "Unknown rotary_placement"),
        ({"memory_dtype": "int8"}, "Unknown memory_dtype"),
        ({"sink_tokens": -1}, "sink_tokens must be"),
        ({"xl_sink_tokens": 1.5}, "xl_sink_tokens must be"),
        ({"memory_score_bias": float("nan")}, "memory_score_bias must be a finite number"),
        ({"memory_sharpness": 0.0}, "memory_sharpness must be a finite number > 0"),
        ({"memory_sharpness": float("inf")}, "memory_sharpness must be a finite number > 0"),
        ({"page_budget": 0}, "page_budget must be in (0, 1]"),
    ],
)
def test_bad_values_raise_clear_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as error:
        MemorizingConfig(text_config=TINY_CONFIGS["llama"](), **kwargs)
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("text_config", "message"),
    [
        (transformers.BartConfig(), "encoder-decoder"),
        (transformers.T5Config(), "encoder-decoder"),
        (transformers.ViTConfig(), "no causal language model"),
        (transformers.BloomConfig(n_layer=2), "AttentionInterface"),
        (transformers.MambaConfig(num_hidden_layers=2), "AttentionInterface"),
    ],
)
def test_unsupported_base_models_are_refused(text_config: transformers.PretrainedConfig, message: str) -> None:
    with pytest.raises(ValueError) as error:
        MemorizingConfig(text_config=text_config)
    assert message in str(error.value)


def test_missing_text_config_is_explained() -> None:
    with pytest.raises(ValueError, match="text_config"):
        MemorizingConfig()
