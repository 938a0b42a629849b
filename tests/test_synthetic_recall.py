"""memorizing_experiments.synthetic_recall (training/synthetic_recall.py): the documents' layout and tokenizer
(training the models is the script's own, long run)."""

from __future__ import annotations

import numpy as np

from memorizing_experiments import synthetic_recall as recall


def test_held_out_documents_ask_key_i_in_segment_i_plus_one():
    tokens, queries = recall.document(np.random.default_rng(0), held_out=True)
    assert len(tokens) == recall.SEGMENT * recall.SEGMENTS
    assert [position // recall.SEGMENT - previous // recall.SEGMENT for position, previous in queries] == list(
        range(1, recall.SEGMENTS)
    )
    for position, previous in queries:
        key = tokens[position - 1].removeprefix("?")
        assert tokens[position - 1] == f"?{key}" and tokens[previous - 1] == recall.FILLER  # a query, a definition
        assert tokens[position] == tokens[previous] and tokens[position].startswith(f"{key}=")  # same binding


def test_training_documents_ask_again_within_a_segment():
    tokens, queries = recall.document(np.random.default_rng(0), held_out=False)
    assert len(queries) == (recall.SEGMENTS - 1) * recall.ACTIVE * recall.REPEATS
    distances = [position // recall.SEGMENT - previous // recall.SEGMENT for position, previous in queries]
    assert distances.count(0) == (recall.SEGMENTS - 1) * recall.ACTIVE * (recall.REPEATS - 1)
    for position, previous in queries:
        assert position % 4 == 2 and previous < position  # a binding, never at a segment's first position
        assert tokens[position] == tokens[previous]
    assert all(token == recall.FILLER for token in tokens[:: recall.SEGMENT])  # segments open with filler (a sink)


def test_tokenizer_reads_one_token_per_word(tmp_path):
    tokenizer = recall.write_tokenizer(tmp_path / "tokenizer")
    tokens, _ = recall.document(np.random.default_rng(0), held_out=True)
    ids = tokenizer(" ".join(tokens), add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == tokens  # positions in the document are token positions
    assert tokenizer.unk_token_id not in ids
    assert len(tokenizer) == len(recall.SPECIAL) + 1 + 26 + 26 * 26
    reloaded = recall.train.load_tokenizer(str(tmp_path / "tokenizer"))
    assert reloaded(" ".join(tokens), add_special_tokens=False)["input_ids"] == ids


def test_main_trains_both_models_and_reports_every_reading(tmp_path):
    """Two training steps of each model: the plumbing from documents to recall.json/.md/.png (not the result)."""
    output = tmp_path / "results"
    argv = ["--work", str(tmp_path / "work"), "--output", str(output), "--train-documents", "16"]
    results = recall.main([*argv, "--eval-documents", "4", "--max-steps", "2"])
    assert list(results) == ["memory", "memory, switched off", "no memory"]
    for result in results.values():
        assert list(result["accuracy"]) == ["0-0", "1-1", "2-3", "4-7", "8-11", "12-16"]
        assert result["accuracy"]["12-16"]["queries"] == 4 * 5  # 4 documents ask keys 12-16 once each
        assert 0.0 <= result["accuracy"]["0-0"]["accuracy"] <= 1.0
    assert (output / "recall.json").exists() and (output / "recall.png").exists()
    assert (output / "recall.md").read_text().count("\n") == 2 + len(results)
