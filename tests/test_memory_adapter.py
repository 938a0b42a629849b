"""The memory adapter's training examples (character-level tokenizer: one token per character): every answer was
planted or defined far enough back, and only answers and the document's tail are labelled."""

from __future__ import annotations

import random
import re

from memorizing_experiments import memory_adapter
from memorizing_experiments.memory_adapter import LM_TAIL, MIN_DISTANCE, NEW_TOKENS, example

from .conftest import tiny_tokenizer


def code(functions: int = 12) -> str:
    """Python-like text with a function every few hundred characters."""
    body = "".join(f"# comment {j} about nothing much\n" for j in range(9))
    return "".join(f"def f{i}(x, y):\n    return x + {i}\n\n{body}\n" for i in range(functions))


def labelled_spans(chunk: list[int], labels: list[int]) -> list[list[int]]:
    """The runs of labelled tokens after the document's tail."""
    spans, current = [], []
    for token, label in zip(chunk[LM_TAIL:], labels[LM_TAIL:]):
        if label == -100:
            if current:
                spans.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return spans + ([current] if current else [])


def test_examples_ask_only_what_lies_far_back_and_label_only_answers_and_the_tail() -> None:
    tokenizer = tiny_tokenizer()
    text = code()
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    document = ("fake.py", encoding["input_ids"], encoding["offset_mapping"], text)
    copies = 0
    for seed in range(20):
        prefix, chunk, labels = example(tokenizer, document, len(document[1]), random.Random(seed))
        assert len(chunk) == len(labels) and labels[:LM_TAIL] == chunk[:LM_TAIL]
        read = tokenizer.decode(prefix + chunk[:LM_TAIL])
        spans = labelled_spans(chunk, labels)
        assert 2 <= len(spans) <= 4
        for span in spans:
            answer = tokenizer.decode(span)
            if len(span) == NEW_TOKENS:  # a copied definition: it follows `def name(` far back
                copies += 1
                at = read.index(answer)
                assert re.search(r"def \w+\($", read[:at]) and len(read) - at >= MIN_DISTANCE
            else:  # a fact: " <number>." stated once, far back
                number = re.fullmatch(r" (\d+)\.", answer).group(1)
                statement = re.search(rf"\n[^\n]*\b{number}\.?\n", read)
                assert statement and len(read) - statement.start() >= MIN_DISTANCE - 64
    assert copies >= 10  # every example of a long enough code document copies a definition


def test_held_out_modules_are_those_the_demo_and_the_suite_report_on() -> None:
    assert {"typing", "inspect"} <= memory_adapter.HELD_OUT_MODULES


def test_the_band_and_sharpness_come_from_the_command_line() -> None:
    default = memory_adapter.memory_settings(memory_adapter.parse_args([]))
    assert default == {**memory_adapter.MEMORY, "memory_sharpness": 1.0}
    wide = memory_adapter.memory_settings(memory_adapter.parse_args(["--layers", "8-24", "--memory-sharpness", "2"]))
    assert wide["memory_layers"] == list(range(8, 25)) and wide["memory_sharpness"] == 2.0
    assert {key: wide[key] for key in ("combine", "memory_size", "memory_top_k")} == {
        key: memory_adapter.MEMORY[key] for key in ("combine", "memory_size", "memory_top_k")
    }
