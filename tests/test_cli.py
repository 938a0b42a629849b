"""The `memorizing-hf` command line on tiny models saved to temporary folders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from memorizing_hf import MemorizingForCausalLM
from memorizing_hf.cli import main, parse_layers
from memorizing_hf.evaluation import streaming_perplexity

from .conftest import tiny_base, tiny_tokenizer

DOCUMENTS = {
    "shapes.py": "def area(width, height):\n    return width * height\n\n" * 3,
    "point.py": "class Point:\n    x: int\n    y: int\n\n    def norm(self):\n        return abs(self.x)\n" * 2,
}


@pytest.fixture
def workspace(tmp_path) -> Path:
    """A tiny Llama with its tokenizer in `base/`, two documents, and `ckpt/` converted from `base/` by the CLI."""
    tiny_base("llama").save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    for name, text in DOCUMENTS.items():
        (tmp_path / name).write_text(text)
    options = "--memory-layers 1 --memory-size 1024 --top-k 4 --combine joint --local-window 16 --license mit"
    assert main(["convert", str(tmp_path / "base"), str(tmp_path / "ckpt"), *options.split()]) == 0
    return tmp_path


def _run(capsys, *argv: object) -> tuple[int, str, str]:
    capsys.readouterr()
    status = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_parse_layers() -> None:
    assert parse_layers("16-18") == [16, 17, 18]
    assert parse_layers("3,7") == [3, 7]
    assert parse_layers("-4") == [-4]


def test_convert_writes_a_hub_ready_checkpoint(workspace) -> None:
    folder = workspace / "ckpt"
    names = {path.name for path in folder.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "modeling_memorizing.py"} <= names
    assert {"tokenizer.json", "README.md"} <= names
    config = json.loads((folder / "config.json").read_text())
    assert (config["memory_layers"], config["memory_size"], config["combine"]) == ([1], 1024, "joint")
    assert ModelCard.load(folder / "README.md").data.license == "mit"
    model = MemorizingForCausalLM.from_pretrained(folder)
    base = tiny_base("llama")
    for (name, a), (_, b) in zip(base.state_dict().items(), model.language_model.state_dict().items()):
        assert torch.equal(a, b), name


def test_memorize_then_generate_matches_the_python_api(workspace, capsys) -> None:
    folder, memory = workspace / "ckpt", workspace / "memory.safetensors"
    status, _, err = _run(capsys, "memorize", folder, workspace / "shapes.py", workspace / "point.py", "-o", memory)
    assert status == 0, err

    tokenizer = tiny_tokenizer()
    model = MemorizingForCausalLM.from_pretrained(folder)
    for text in DOCUMENTS.values():  # one file after the other, into row 0
        model.memorize([text], tokenizer=tokenizer, progress=False)
    from_file = MemorizingForCausalLM.from_pretrained(folder, memory_file=memory)
    for name, tensor in model.memory.layers[1].state_tensors().items():
        assert torch.equal(tensor, from_file.memory.layers[1].state_tensors()[name]), name

    status, out, err = _run(capsys, "generate", folder, "--prompt", "def area(w", "--memory", memory)
    assert status == 0, err
    inputs = tokenizer("def area(w", return_tensors="pt")
    expected = model.generate(**inputs, max_new_tokens=64, do_sample=False, update_memory=False)
    assert out == tokenizer.decode(expected[0, inputs.input_ids.shape[1] :], skip_special_tokens=True) + "\n"

    status, _, err = _run(capsys, "generate", folder, "--prompt", "x = ", "--memory", memory, "--save-memory", memory)
    assert status == 0, err
    grown = MemorizingForCausalLM.from_pretrained(folder, memory_file=memory).memory.entries()[1][0]
    assert grown > model.memory.entries()[1][0]  # the prompt and the output were written too


def test_eval_writes_results_that_the_card_renders(workspace, capsys) -> None:
    folder, results = workspace / "ckpt", workspace / "results.json"
    status, out, err = _run(
        capsys, "eval", folder, workspace / "shapes.py", "--memory-sizes", 0, 64, "--segment-length", 16, "-o", results
    )
    assert status == 0, err
    written = json.loads(results.read_text())
    assert [row["memory_size"] for row in written["results"]] == [0, 64]
    ids = torch.tensor(tiny_tokenizer()(DOCUMENTS["shapes.py"])["input_ids"])
    alone = streaming_perplexity(MemorizingForCausalLM.from_pretrained(folder), ids, 16, mode="segment", progress=False)
    assert written["results"][0]["perplexity"] == pytest.approx(alone.perplexity, rel=1e-6)
    assert written["tokens"] == alone.tokens

    status, out, err = _run(capsys, "card", folder, "--results", results, "--repo-id", "someone/tiny", "-o", "-")
    assert status == 0, err
    assert "| 0 | " in out and "| 64 | " in out and 'from_pretrained("someone/tiny"' in out
    status, out, _ = _run(capsys, "card", folder, "--results", results)
    assert status == 0 and "## Evaluation" in (folder / "README.md").read_text()


def test_user_errors_are_one_clear_line(workspace, capsys) -> None:
    folder = workspace / "ckpt"
    status, _, err = _run(capsys, "memorize", folder, workspace / "missing.txt")
    assert status == 1 and err.strip() == f"memorizing-hf memorize: error: no such file: {workspace / 'missing.txt'}"

    status, _, err = _run(capsys, "generate", workspace / "base", "--prompt", "x")
    assert status == 1 and "is a 'llama' checkpoint, not a memorizing one: convert it first" in err

    other = MemorizingForCausalLM.from_base_pretrained(tiny_base("llama"), memory_layers=[2], memory_size=256)
    other.memorize([[5, 6, 7, 8]], progress=False)
    other.save_memory(workspace / "other.safetensors")
    status, _, err = _run(capsys, "generate", folder, "--prompt", "x", "--memory", workspace / "other.safetensors")
    assert status == 1 and "different memory geometry (layers: file has [2], model has [1];" in err

    (workspace / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    status, _, err = _run(
        capsys, "memorize", folder, workspace / "shapes.py", "--append", workspace / "broken.safetensors"
    )
    assert status == 1 and "not a readable memory file (truncated or corrupted?)" in err

    status, _, err = _run(capsys, "generate", folder, "--memory", "nowhere.safetensors", "--prompt", "x")
    assert status == 1 and "No memory file 'nowhere.safetensors'" in err

    status, _, err = _run(capsys, "generate", folder)
    assert status == 1 and "give exactly one of --prompt and --prompt-file" in err

    status, _, err = _run(capsys, "eval", folder, workspace / "shapes.py", "--memory-sizes", 2)
    assert status == 1 and "memory sizes [2] are below the model's memory_top_k (4): use 0 or >= 4" in err


def test_help_lists_the_commands_and_runs_as_a_module() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "memorizing_hf.cli", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("convert", "memorize", "generate", "eval", "card", "train"):
        assert command in result.stdout
    with pytest.raises(SystemExit) as exit_info:
        main(["generate"])  # the model argument is missing: argparse's usage error
    assert exit_info.value.code == 2


def test_train_runs_a_recipe_and_explains_a_missing_script(tmp_path, capsys, monkeypatch) -> None:
    repository = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repository)  # training/train.py of the clone
    overrides = [f"training.output_dir={tmp_path / 'run'}", "training.max_steps=2", "training.eval_strategy='no'"]
    overrides += ["training.save_strategy='no'", "data.max_documents=12", "data.eval_documents=0"]
    status, out, err = _run(capsys, "train", "configs/tiny_smoke.yaml", *overrides)
    assert status == 0, err
    assert json.loads((tmp_path / "run" / "step_times.json").read_text())  # the run's own output: two timed steps

    status, _, err = _run(capsys, "train", "configs/tiny_smoke.yaml", "--script", tmp_path / "nowhere.py")
    assert status == 1 and f"no training script at {tmp_path / 'nowhere.py'}: the recipes run training/train.py" in err
    status, _, err = _run(capsys, "train", tmp_path / "missing.yaml")
    assert status == 1 and f"no such file: {tmp_path / 'missing.yaml'}" in err
