"""The passkey prompt of the demo and the recall suite: length, where the key sits, and how answers are scored."""

from __future__ import annotations

import pytest

from memorizing_experiments.passkey import HEADER, KEY_LINE, QUESTION, found, passkey_prompt

from .conftest import tiny_tokenizer


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_prompt_fits_its_length_and_holds_the_key_line_at_its_depth(depth: float) -> None:
    tokenizer = tiny_tokenizer()  # one token per character
    prompt = passkey_prompt(tokenizer, 3000, depth, seed=7)
    assert 3000 - 100 < len(prompt.ids) <= 3000  # within one filler sentence of the target
    text = tokenizer.decode(prompt.ids)
    line = KEY_LINE.format(key=prompt.key)
    assert text.count(prompt.key) == 2 and text[prompt.key_start :].startswith(line)
    filler_before = prompt.key_start - len(HEADER)
    assert abs(filler_before / (len(text) - len(HEADER) - len(line) - len(QUESTION)) - depth) < 0.05
    assert text.endswith("The pass key is") and prompt.distance() == len(prompt.ids) - prompt.key_start


def test_the_key_depends_on_the_seed_only() -> None:
    tokenizer = tiny_tokenizer()
    keys = {passkey_prompt(tokenizer, 1000, 0.5, seed=seed).key for seed in range(5)}
    assert len(keys) == 5 and all(len(key) == 5 and key.isdigit() for key in keys)
    assert passkey_prompt(tokenizer, 1000, 0.5, seed=3).key == passkey_prompt(tokenizer, 2000, 0.1, seed=3).key


def test_answers_count_when_they_state_the_key_even_spaced_apart() -> None:
    assert found(" 29048.\nThe pass", "29048")
    assert found(" 2 9 0 4 8", "29048")
    assert not found(" 2904 is it", "29048")


@pytest.mark.parametrize(("length", "depth"), [(100, 0.5), (3000, 1.5), (3000, -0.1)])
def test_bad_arguments_raise(length: int, depth: float) -> None:
    with pytest.raises(ValueError):
        passkey_prompt(tiny_tokenizer(), length, depth, seed=0)
