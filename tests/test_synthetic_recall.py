"""training/synthetic_recall.py: the documents' layout (training the models is the script's own, long run)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
import synthetic_recall as recall  # noqa: E402


def test_held_out_documents_ask_key_i_in_segment_i_plus_one():
    text, queries = recall.document(np.random.default_rng(0), held_out=True)
    assert len(text) == recall.SEGMENT * recall.SEGMENTS
    assert [position // recall.SEGMENT - previous // recall.SEGMENT for position, previous in queries] == list(
        range(1, recall.SEGMENTS)
    )
    for position, previous in queries:
        assert text[position - 2] == "?" and text[previous - 2] == "="
        assert text[position - 1] == text[previous - 1] and text[position] == text[previous]  # same key, same value


def test_training_documents_ask_again_within_a_segment():
    text, queries = recall.document(np.random.default_rng(0), held_out=False)
    assert len(queries) == (recall.SEGMENTS - 1) * recall.ACTIVE * recall.REPEATS
    distances = [position // recall.SEGMENT - previous // recall.SEGMENT for position, previous in queries]
    assert distances.count(0) == (recall.SEGMENTS - 1) * recall.ACTIVE * (recall.REPEATS - 1)
    for position, previous in queries:
        assert position % 4 == 3 and previous < position  # a value, never at a segment's first position
        assert text[position - 1] == text[previous - 1] and text[position] == text[previous]
