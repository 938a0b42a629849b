"""The long-context recall suite on a tiny random model: every cell measured once, resumable, reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memorizing_experiments import long_context, sources

from .conftest import tiny_base, tiny_tokenizer

SUITE = """
tasks: [passkey, definition]
lengths: [500, 1000]
depths: [0.2, 0.8]
trials: 1
window: 64
settings:
  full: {kind: full}
  window: {kind: window}
  memory: {kind: memory, memory: {memory_layers: "1", combine: joint, memory_top_k: 4}}
"""


@pytest.fixture
def suite_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A suite over a tiny Llama saved with a character-level tokenizer, standing in for SmolLM2."""
    folder = tmp_path / "tiny"
    tiny_base("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    monkeypatch.setattr(sources, "smollm2_path", lambda: folder)
    path = tmp_path / "suite.yaml"
    path.write_text(SUITE + f"output_dir: {tmp_path / 'out'}\n")
    return path


def test_every_cell_is_measured_once_and_reported(suite_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    long_context.main([str(suite_file)])
    out = suite_file.parent / "out"
    records = json.loads((out / "results.json").read_text())["records"]
    assert len(records) == 2 * 2 * 2 * 3  # tasks x lengths x depths x settings
    assert len({long_context.cell_key(r) for r in records}) == len(records)
    passkeys = [r for r in records if r["task"] == "passkey"]
    skipped = [r for r in passkeys if "skipped" in r]  # the tiny model has 256 positions: full attention cannot run
    assert {(r["setting"], r["skipped"]) for r in skipped} == {("full", "beyond the model's positions")}
    assert all(isinstance(r["answer"], str) and isinstance(r["right"], bool) for r in passkeys if r not in skipped)
    assert all(0 < r["distance"] <= r["length"] for r in passkeys)
    assert (out / "table.md").read_text().count("| memory |") == 2
    assert (out / "heatmap_passkey_memory.png").stat().st_size > 0

    calls = []
    monkeypatch.setattr(long_context.Runner, "__init__", lambda *args: calls.append(args))
    long_context.main([str(suite_file)])  # everything is there: nothing runs again
    assert calls == []
    assert json.loads((out / "results.json").read_text())["records"] == records


def test_an_added_length_runs_only_its_cells(suite_file: Path) -> None:
    long_context.main([str(suite_file), "lengths=[500]", "settings=[window]", "tasks=[passkey]"])
    long_context.main([str(suite_file), "lengths=[500,1000]", "settings=[window]", "tasks=[passkey]"])
    records = json.loads((suite_file.parent / "out" / "results.json").read_text())["records"]
    assert sorted((r["length"], r["depth"]) for r in records) == [(500, 0.2), (500, 0.8), (1000, 0.2), (1000, 0.8)]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lengths=[100]", "lengths must be integers >= 256"),
        ("depths=[1.5]", "depths must lie in [0, 1]"),
        ("settings=[nope]", "No setting ['nope']"),
        ("tasks=[trivia]", "Unknown tasks ['trivia']"),
        ("colour=red", "Unknown suite keys ['colour']"),
        ("trials", "is not of the form key=value"),
    ],
)
def test_bad_overrides_end_with_one_line(suite_file: Path, capsys, override: str, message: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        long_context.main([str(suite_file), override])
    assert exit_.value.code == 1
    assert message in capsys.readouterr().err
