"""The passkey retrieval prompt of Landmark Attention, LongLLaMA and InfLLM: a 5-digit key hidden at some depth of
repeated filler, asked for at the end. Used by the demo and the long-context recall suite."""

from __future__ import annotations

import random
from dataclasses import dataclass

HEADER = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there.\n"
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass
class Passkey:
    """One prompt: its token ids, the key, and where the key line starts (token index)."""

    ids: list[int]
    key: str
    key_start: int

    def distance(self) -> int:
        """Tokens between the key line and the end of the prompt."""
        return len(self.ids) - self.key_start


def passkey_prompt(tokenizer, length: int, depth: float, seed: int) -> Passkey:
    """A prompt of about `length` tokens (never more) with the key line after a `depth` share (0: first, 1: last) of
    the filler; the key is a 5-digit number drawn from `seed`."""
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth!r}")
    key = str(random.Random(seed).randint(10000, 99999))

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    header, filler, question = encode(HEADER), encode(FILLER), encode(QUESTION)
    line = encode(KEY_LINE.format(key=key))
    fixed = len(header) + len(line) + len(question)
    repeats = (length - fixed) // len(filler)
    if repeats < 1:
        raise ValueError(f"length {length} is too short for a passkey prompt (at least {fixed + len(filler)} tokens)")
    before = round(depth * repeats)
    ids = header + filler * before + line + filler * (repeats - before) + question
    return Passkey(ids, key, len(header) + len(filler) * before)


def found(answer: str, key: str) -> bool:
    """Whether a generated answer states the key (digits may be spaced apart by the tokenizer)."""
    return key in "".join(answer.split())
