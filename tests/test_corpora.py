"""Prepared corpora: a deterministic split by document name, recorded, saved in the cache, the same for any source."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest

from memorizing_experiments import corpora
from memorizing_experiments.corpora import LONG_DOCUMENT_CHARS, held_out_names, load_split, prepare_corpus


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MEMORIZING_HF_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def write_folder(folder: Path, count: int = 30, long: int = 3) -> None:
    for index in range(count):
        path = folder / f"part_{index % 3}" / f"file_{index:02d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        size = LONG_DOCUMENT_CHARS if index < long else 100
        path.write_text(f"document {index}\n" + "x" * size)


def test_held_out_names_depend_only_on_names_and_keep_long_documents_on_both_sides() -> None:
    names = [f"doc_{i}" for i in range(40)]
    lengths = [LONG_DOCUMENT_CHARS] * 5 + [10] * 35
    held_out = held_out_names(names, lengths, fraction=0.1)
    assert held_out == held_out_names(names[::-1], lengths[::-1], fraction=0.1)  # order does not matter
    long_out = [name for name in held_out if names.index(name) < 5]
    assert len(long_out) == 1 and len(held_out) == 1 + round(0.1 * 35)
    # Adding documents never moves an earlier one into or out of the held-out side of a fixed-size stratum.
    assert held_out_names(["a", "b"], [10, 10], fraction=0.1) != []
    assert held_out_names(["only"], [10], fraction=0.5) == []


def test_a_folder_is_split_recorded_saved_and_reloaded(tmp_path: Path, tmp_cache: Path) -> None:
    write_folder(tmp_path / "texts")
    corpus = prepare_corpus(tmp_path / "texts")
    train, held_out = corpus["train"], corpus["held_out"]
    assert len(train) + len(held_out) == 30 and len(held_out) == 1 + round(0.1 * 27)
    assert set(train["name"]).isdisjoint(held_out["name"])
    assert all(not Path(name).is_absolute() and name.startswith("part_") for name in train["name"])
    record = corpora.split_record(tmp_path / "texts")
    assert record["held_out"] == sorted(held_out["name"]) and record["train"] == sorted(train["name"])
    assert corpora.corpus_dir(tmp_path / "texts").parent == tmp_cache / "corpora"

    (tmp_path / "texts" / "part_0" / "file_00.txt").write_text("changed")  # prepared once: later calls load it
    assert load_split(tmp_path / "texts", "held_out")["text"] == held_out["text"]
    assert prepare_corpus(tmp_path / "texts", refresh=True)["held_out"]["name"] == held_out["name"]


def test_a_saved_dataset_is_split_like_a_folder(tmp_path: Path) -> None:
    texts = [f"text {i} " + "y" * (LONG_DOCUMENT_CHARS if i < 2 else 50) for i in range(12)]
    datasets.Dataset.from_dict({"text": texts, "other": list(range(12))}).save_to_disk(str(tmp_path / "saved"))
    corpus = prepare_corpus(tmp_path / "saved")
    assert corpus["train"].column_names == ["name", "text"]
    names = list(corpus["train"]["name"]) + list(corpus["held_out"]["name"])
    assert sorted(names) == [f"document-{i:06d}" for i in range(12)]
    assert len(corpus["held_out"]) == 2  # one of the two long ones, one of the ten short ones


def test_a_source_that_is_no_corpus_and_no_folder_is_named_with_the_corpora(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"'stdib' is neither a folder nor a corpus name \(stdlib, hol_light"):
        corpora.load_documents("stdib")
    write_folder(tmp_path / "texts", count=2, long=0)
    assert len(corpora.load_documents(tmp_path / "texts")) == 2


def test_unknown_split_is_refused(tmp_path: Path) -> None:
    write_folder(tmp_path / "texts", count=4, long=0)
    with pytest.raises(ValueError, match="Unknown split 'test'"):
        load_split(tmp_path / "texts", "test")
