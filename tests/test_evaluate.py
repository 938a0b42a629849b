"""training/evaluate.py: a suite of models and settings on held-out documents, resumable, with table and plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from memorizing_experiments import evaluate
from memorizing_experiments.corpora import split_record
from memorizing_hf.evaluation import Setting, setting_perplexity

from .conftest import tiny_base, tiny_memorizing, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMORIZING_HF_CACHE", str(tmp_path / "cache"))


def write_suite(tmp_path: Path) -> Path:
    """Two corpora (folders of byte-level documents), a memorizing checkpoint and a plain one."""
    for corpus in ("code", "prose"):
        for index in range(12):
            words = " ".join(f"{corpus}{(index * 7 + j) % 23}" for j in range(40 + 10 * index))
            (tmp_path / corpus).mkdir(exist_ok=True)
            (tmp_path / corpus / f"{index:02d}.txt").write_text(words)
    tiny_memorizing("llama", memory_size=128, combine="gate").save_pretrained(tmp_path / "memorizing")
    tiny_base("llama", seed=1).save_pretrained(tmp_path / "plain")
    tiny_tokenizer().save_pretrained(tmp_path / "tokenizer")
    suite = {
        "documents": {
            "source": [str(tmp_path / "code"), str(tmp_path / "prose")],
            "tokenizer": str(tmp_path / "tokenizer"),
            "min_tokens": 100,
            "max_tokens": 200,
            "documents_per_source": 1,
        },
        "segment_length": 32,
        "output_dir": str(tmp_path / "results"),
        "models": {
            "with_memory": {
                "label": "memorizing",
                "checkpoint": str(tmp_path / "memorizing"),
                "settings": [{"memory_size": 0}, {"memory_size": 64}, {"memory_size": 128, "xl_cache": True}],
            },
            "plain": {
                "checkpoint": str(tmp_path / "plain"),
                "settings": [{"memory_size": 0}, {"memory_size": 0, "xl_cache": True}, {"window": 64}],
            },
        },
    }
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


def test_suite_measures_every_setting_on_held_out_documents_and_reports(tmp_path: Path) -> None:
    summary = evaluate.main([str(write_suite(tmp_path))])
    folder = tmp_path / "results"
    assert {path.name for path in folder.iterdir()} >= {"with_memory.json", "plain.json", "results.json", "table.md"}
    assert (folder / "perplexity_vs_memory.png").stat().st_size > 0
    code, prose = (str(tmp_path / "code"), str(tmp_path / "prose"))
    held_out = {source: [d["name"] for d in docs] for source, docs in summary["documents"].items()}
    assert all(len(names) == 1 for names in held_out.values())
    for source in (code, prose):  # held-out documents only, cut to max_tokens
        assert set(held_out[source]) <= set(split_record(source)["held_out"])
        assert all(d["tokens"] == 200 for d in summary["documents"][source])
    rows = {(row["model"], row["setting"]): row for row in summary["rows"]}
    assert len(rows) == 6 and all(set(row["perplexity"]) == {code, prose} for row in rows.values())
    table = (folder / "table.md").read_text()
    assert "| memorizing | 32 / 128 / 32 |" in table and "| plain | 64 (window) / - / - |" in table

    # The same number as reading the document directly with that setting.
    model = evaluate.load_model({"checkpoint": str(tmp_path / "memorizing")})
    document = evaluate.load_documents(evaluate.load_suite(tmp_path / "suite.yaml")["documents"])[code][0]
    direct = setting_perplexity(model, torch.tensor(document["input_ids"]), Setting(64), 32, progress=False)
    assert math.isclose(rows[("with_memory", "32 / 64 / -")]["perplexity"][code], direct.perplexity, rel_tol=1e-6)
    # The memorizing model without memory and the plain model are different weights: different numbers.
    assert rows[("with_memory", "32 / - / -")]["perplexity"] != rows[("plain", "32 / - / -")]["perplexity"]


def test_an_interrupted_suite_measures_only_what_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_suite(tmp_path)
    evaluate.main([str(path), "--models", "plain"])
    measured = json.loads((tmp_path / "results" / "plain.json").read_text())
    assert len(measured) == 6  # 3 settings x 2 corpora
    calls = []
    monkeypatch.setattr(evaluate, "setting_perplexity", lambda *args, **kwargs: calls.append(args) or None)
    summary = evaluate.main([str(path), "--models", "plain"])
    assert calls == [] and json.loads((tmp_path / "results" / "plain.json").read_text()) == measured
    assert all(not row["perplexity"] for row in summary["rows"] if row["model"] == "with_memory")  # not run yet


def test_unknown_document_keys_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({"documents": {"source": "x", "segment_length": 8}, "models": {}}))
    with pytest.raises(ValueError, match=r"unknown documents keys \['segment_length'\]"):
        evaluate.load_suite(path)


def test_documents_can_be_named(tmp_path: Path) -> None:
    suite = yaml.safe_load(write_suite(tmp_path).read_text())
    code = str(tmp_path / "code")
    spec = {**evaluate.DOCUMENT_DEFAULTS, **suite["documents"]}
    name = split_record(code)["held_out"][0]
    documents = evaluate.load_documents({**spec, "min_tokens": 2, "names": {code: [name]}})
    assert [d["name"] for d in documents[code]] == [name] and len(documents[str(tmp_path / "prose")]) == 1
    with pytest.raises(ValueError, match="not documents of"):
        evaluate.load_documents({**spec, "names": {code: ["no_such_file.txt"]}})


def test_the_shipped_table4_suite_loads() -> None:
    suite = evaluate.load_suite(ROOT / "configs" / "eval_table4.yaml")
    assert {"fine_tuned_memory", "fine_tuned_no_memory", "zero_shot"} <= set(suite["models"])
