"""The `memorizing-hf` command line on tiny models saved to temporary folders: what each command writes, and that every
bad call ends with one line on stderr, exit status 1 and nothing written."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import save_file

from memorizing_hf import MemorizingForCausalLM, cli
from memorizing_hf.cli import main, parse_layers
from memorizing_hf.evaluation import streaming_perplexity

from .conftest import tiny_base, tiny_tokenizer

DOCUMENTS = {
    "shapes.py": "def area(width, height):\n    return width * height\n\n" * 3,
    "point.py": "class Point:\n    x: int\n    y: int\n\n    def norm(self):\n        return abs(self.x)\n" * 2,
}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def documents(tmp_path) -> Path:
    """The two documents in tmp_path (nothing else: commands refused before any work need no model)."""
    for name, text in DOCUMENTS.items():
        (tmp_path / name).write_text(text)
    return tmp_path


@pytest.fixture
def workspace(documents) -> Path:
    """A tiny Llama with its tokenizer in `base/`, two documents, and `ckpt/` converted from `base/` by the CLI."""
    tiny_base("llama").save_pretrained(documents / "base")
    tiny_tokenizer().save_pretrained(documents / "base")
    options = "--memory-layers 1 --memory-size 1024 --top-k 4 --combine joint --local-window 16 --license mit"
    assert main(["convert", str(documents / "base"), str(documents / "ckpt"), *options.split()]) == 0
    return documents


def _run(capsys, *argv: object) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        status = main([str(arg) for arg in argv])
    except SystemExit as exit_info:  # argparse: --help, and usage errors
        status = exit_info.code
    out, err = capsys.readouterr()
    return status, out, err


def _files(folder: Path) -> dict[str, float]:
    """Every path under `folder` with its modification time: what a refused call must leave as it was."""
    return {str(path): path.stat().st_mtime_ns for path in sorted(folder.rglob("*"))}


def _refused(capsys, folder: Path, *argv: object) -> str:
    """Run a call that must be refused: exit status 1, one line on stderr, nothing written under `folder`."""
    before = _files(folder)
    status, out, err = _run(capsys, *argv)
    assert status == 1, (out, err)
    lines = err.strip().splitlines()  # progress bars of what ran before the error may come first
    prefix = f"memorizing-hf {argv[0]}: error: "
    assert lines[-1].startswith(prefix) and sum(prefix in line for line in lines) == 1, err
    assert "Traceback" not in err and _files(folder) == before
    return lines[-1]


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


def test_convert_with_a_memory_adapter_takes_its_settings_and_parameters(documents) -> None:
    tiny_base("llama").save_pretrained(documents / "base")
    trained = MemorizingForCausalLM.from_base_pretrained(tiny_base("llama"), memory_layers=[1, 2], combine="joint")
    with torch.no_grad():
        trained.knn_attention["2"].memory_bias.copy_(torch.tensor([0.5, 1.0, 1.5, 2.0]))
    trained.save_memory_adapter(documents / "adapter")
    argv = ["convert", documents / "base", documents / "ckpt", "--memory-adapter", documents / "adapter"]
    assert main([str(arg) for arg in [*argv, "--memory-size", "2048"]]) == 0
    model = MemorizingForCausalLM.from_pretrained(documents / "ckpt")
    assert (model.config.memory_layers, model.config.memory_size) == ([1, 2], 2048)
    assert torch.equal(model.knn_attention["2"].memory_bias, trained.knn_attention["2"].memory_bias)


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


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["eval", "ckpt", "shapes.py", "--segment-length", "-1", "-o", "r.json"],
            "argument --segment-length: must be an integer >= 2, got -1",
        ),
        (
            ["eval", "ckpt", "shapes.py", "--max-tokens", "0", "-o", "r.json"],
            "argument --max-tokens: must be an integer >= 2, got 0",
        ),
        (
            ["eval", "ckpt", "shapes.py", "--memory-sizes", "0", "-8"],
            "argument --memory-sizes: must be an integer >= 0, got -8",
        ),
        (
            ["eval", "ckpt", "shapes.py", "--segment-length", "ten"],
            "argument --segment-length: 'ten' is not an integer",
        ),
        (["generate", "ckpt", "--prompt", "x", "--window", "0"], "argument --window: must be an integer >= 1, got 0"),
        (
            ["generate", "ckpt", "--prompt", "x", "--max-new-tokens", "0"],
            "argument --max-new-tokens: must be an integer >= 1",
        ),
        (["generate", "ckpt", "--prompt", "x", "--top-p", "1.5"], "argument --top-p: must be > 0 and <= 1"),
        (["generate", "ckpt", "--prompt", "x", "--temperature", "0"], "argument --temperature: must be > 0"),
        (["generate", "ckpt"], "one of the arguments --prompt --prompt-file is required"),
        (["generate"], "the following arguments are required: model"),
        (["memorize", "ckpt", "shapes.py", "--window", "-3"], "argument --window: must be an integer >= 1, got -3"),
        (["convert", "base", "out", "--memory-size", "0"], "argument --memory-size: must be an integer >= 1, got 0"),
        (["convert", "base", "out", "--top-k", "-1"], "argument --top-k: must be an integer >= 1, got -1"),
        (["convert", "base", "out", "--local-window", "0"], "argument --local-window: must be an integer >= 1"),
        (["convert", "base", "out", "--sink-tokens", "-1"], "argument --sink-tokens: must be an integer >= 0"),
        (["convert", "base", "out", "--memory-layers", "x-y"], "invalid layers 'x-y'"),
        (["convert", "base", "out", "--memory-adapter", "nowhere"], "No memory adapter 'nowhere': give a packaged"),
    ],
)
def test_numbers_are_checked_before_anything_is_read(documents, capsys, monkeypatch, argv, message) -> None:
    monkeypatch.chdir(documents)  # "ckpt" and "base" do not exist: the call must end before it looks for them
    assert message in _refused(capsys, documents, *argv)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["memorize", "ckpt", "shapes.py", "-o", "missing_dir/x"],
            "argument --output/-o: no folder 'missing_dir' to write x into",
        ),
        (["memorize", "ckpt", "shapes.py", "-o", "."], "argument --output/-o: . is a folder, not a file"),
        (
            ["eval", "ckpt", "shapes.py", "-o", "missing_dir/results.json"],
            "no folder 'missing_dir' to write results.json",
        ),
        (
            ["generate", "ckpt", "--prompt", "x", "--save-memory", "shapes.py/m"],
            "no folder 'shapes.py' to write m into",
        ),
        (["card", "ckpt", "-o", "missing_dir/README.md"], "no folder 'missing_dir' to write README.md into"),
        (["card", "someone/model"], "no folder 'someone/model' to write README.md into"),
        (["convert", "base", "shapes.py/ckpt"], "argument output: shapes.py is a file, not a folder"),
        (["memorize", "ckpt", "missing.txt"], "argument files: no such file or directory: missing.txt"),
        (["memorize", "ckpt", "."], "argument files: . is a folder, not a file"),
        (["generate", "ckpt", "--prompt-file", "missing.txt"], "argument --prompt-file: no such file or directory"),
        (["generate", "ckpt", "--prompt", "x", "--memory", "."], "argument --memory: . is a folder, not a file"),
        (["card", "ckpt", "--results", "missing.json"], "argument --results: no such file or directory: missing.json"),
        (["train", "missing.yaml"], "argument recipe: no such file or directory: missing.yaml"),
        (["train", "shapes.py", "--script", "nowhere.py"], "argument --script: no such file or directory: nowhere.py"),
    ],
)
def test_paths_are_checked_before_the_work_starts(documents, capsys, monkeypatch, argv, message) -> None:
    monkeypatch.chdir(documents)
    assert message in _refused(capsys, documents, *argv)


def test_permission_denied_is_said_as_such(documents, capsys, monkeypatch) -> None:
    """EACCES on a file to read, or a folder to write into, is "permission denied", not "no such file"."""
    real_open = open

    def no_access(path, *args, **kwargs):
        if str(path).endswith("shapes.py"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.chdir(documents)
    monkeypatch.setattr(cli, "open", no_access, raising=False)
    assert _refused(capsys, documents, "memorize", "ckpt", "shapes.py").endswith("permission denied: shapes.py")
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    message = _refused(capsys, documents, "memorize", "ckpt", "point.py", "-o", "memory.safetensors")
    assert message.endswith("permission denied: cannot write memory.safetensors")
    assert _refused(capsys, documents, "convert", "base", "out").endswith("permission denied: cannot write into .")


def test_eval_refuses_documents_with_nothing_to_score(workspace, capsys) -> None:
    """The first segment of a document is read, not scored: a document no longer than a segment scores 0 tokens."""
    message = _refused(capsys, workspace, "eval", workspace / "ckpt", workspace / "shapes.py", "-o", "r.json")
    assert "nothing to score: the first 512-token segment of every document is read but not scored" in message
    assert message.endswith("use a smaller --segment-length")
    args = ("--segment-length", 16, "--max-tokens", 17)
    message = _refused(capsys, workspace, "eval", workspace / "ckpt", workspace / "shapes.py", *args)
    assert message.endswith("use a smaller --segment-length or a larger --max-tokens")


def test_user_errors_are_one_clear_line(workspace, capsys) -> None:
    folder = workspace / "ckpt"
    message = _refused(capsys, workspace, "generate", workspace / "base", "--prompt", "x")
    assert "is a 'llama' checkpoint, not a memorizing one: convert it first" in message

    other = MemorizingForCausalLM.from_base_pretrained(tiny_base("llama"), memory_layers=[2], memory_size=256)
    other.memorize([[5, 6, 7, 8]], progress=False)
    other.save_memory(workspace / "other.safetensors")
    message = _refused(
        capsys, workspace, "generate", folder, "--prompt", "x", "--memory", workspace / "other.safetensors"
    )
    assert "different memory geometry (layers: file has [2], model has [1];" in message

    (workspace / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    argv = ("memorize", folder, workspace / "shapes.py", "--append", workspace / "broken.safetensors")
    assert "not a readable memory file (truncated or corrupted?)" in _refused(capsys, workspace, *argv)

    message = _refused(capsys, workspace, "generate", folder, "--memory", "nowhere.safetensors", "--prompt", "x")
    assert "No memory file 'nowhere.safetensors'" in message

    message = _refused(capsys, workspace, "eval", folder, workspace / "shapes.py", "--memory-sizes", 2)
    assert message.endswith("memory sizes [2] are below the model's memory_top_k (4): use 0 or >= 4")


def test_damaged_files_are_one_line_not_a_traceback(workspace, capsys) -> None:
    """What transformers and safetensors raise on damaged files (SafetensorError, or a config that is JSON but not an
    object) and memory files with odd metadata end as one line naming the file."""
    folder = workspace / "ckpt"
    shutil.copytree(folder, workspace / "truncated")
    weights = workspace / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    message = _refused(capsys, workspace, "generate", workspace / "truncated", "--prompt", "x")
    assert "truncated: damaged checkpoint (SafetensorError:" in message

    (workspace / "listed").mkdir()
    (workspace / "listed" / "config.json").write_text("[1, 2]")
    assert "cannot load a model from" in _refused(capsys, workspace, "generate", workspace / "listed", "--prompt", "x")

    metadata = {"format": "memorizing-hf-memory", "version": "1", "geometry": "[1, 2]"}  # JSON, but not an object
    save_file({"tokens_seen": torch.zeros(1, dtype=torch.long)}, workspace / "odd.safetensors", metadata=metadata)
    message = _refused(
        capsys, workspace, "generate", folder, "--prompt", "x", "--memory", workspace / "odd.safetensors"
    )
    assert message.endswith(
        f"{workspace / 'odd.safetensors'} has no geometry describing the memory (corrupted?). Memory left unchanged."
    )


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(workspace, capsys, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("something broke")

    monkeypatch.setattr(cli.hub, "model_card", broken)
    message = _refused(capsys, workspace, "card", workspace / "ckpt", "-o", "-")
    assert message.endswith("unexpected RuntimeError: something broke (run with --debug for the traceback)")
    with pytest.raises(RuntimeError, match="something broke"):
        main(["card", str(workspace / "ckpt"), "-o", "-", "--debug"])


def test_help_lists_the_commands_and_runs_as_a_module() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "memorizing_hf.cli", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("convert", "memorize", "generate", "eval", "card", "train"):
        assert command in result.stdout


def test_train_runs_the_installed_recipe_code_never_the_current_folders(tmp_path, capsys, monkeypatch) -> None:
    """`memorizing-hf train` runs memorizing_experiments.train, not training/train.py of the folder it is run in (which
    here would leave a file behind); --script runs the script it names."""
    planted = tmp_path / "training" / "train.py"
    planted.parent.mkdir()
    planted.write_text(f"open({str(tmp_path / 'executed')!r}, 'w').close()\ndef main(argv):\n    pass\n")
    monkeypatch.chdir(tmp_path)
    recipe = ROOT / "configs" / "tiny_smoke.yaml"
    overrides = [f"training.output_dir={tmp_path / 'run'}", "training.max_steps=2", "training.eval_strategy='no'"]
    overrides += ["training.save_strategy='no'", "data.max_documents=12", "data.eval_documents=0"]
    status, out, err = _run(capsys, "train", recipe, *overrides)
    assert status == 0, err
    assert json.loads((tmp_path / "run" / "step_times.json").read_text())  # the run's own output: two timed steps
    assert not (tmp_path / "executed").exists()

    status, _, err = _run(capsys, "train", recipe, "--script", planted)
    assert status == 0, err
    assert (tmp_path / "executed").exists()  # an explicit --script is run


EXPERIMENTS_MISSING = """
import sys
sys.modules["memorizing_experiments"] = None  # as if its dependencies were not installed
from memorizing_hf.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("argv", [["convert", "smollm2", "out"], ["train", "recipe.yaml"]])
def test_without_the_experiments_smollm2_and_train_name_the_extra(tmp_path, argv) -> None:
    (tmp_path / "recipe.yaml").write_text("{}\n")
    result = subprocess.run(
        [sys.executable, "-c", EXPERIMENTS_MISSING, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1
    assert result.stderr.strip().startswith(f"memorizing-hf {argv[0]}: error: this needs the experiments")
    assert result.stderr.strip().endswith('pip install "memorizing-hf[experiments]"')
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
