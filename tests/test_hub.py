"""Hub-ready checkpoints: the pushed folder loads with remote code alone and generates identically; the model card."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import ModelCard

from memorizing_hf import hub

from .conftest import tiny_memorizing, tiny_tokenizer

DOCUMENT = "def area(width, height):\n    return width * height\n\n" * 3 + "class Point:\n    x: int\n    y: int\n" * 2
PROMPT = "def area(w"
RESULTS = {
    "dataset": "CPython standard library",
    "documents": ["typing.py"],
    "segment_length": 512,
    "tokens": 11776,
    "results": [{"memory_size": 65536, "perplexity": 8.514}, {"memory_size": 0, "perplexity": 10.471}],
}


class FakeHfApi:
    """Stands in for `huggingface_hub.HfApi` (no Hub here): uploads copy the folder into `remote`."""

    remote: Path
    calls: list[tuple[str, dict]] = []

    def __init__(self, token: str | None = None) -> None:
        self.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id: str, **kwargs: object) -> SimpleNamespace:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, repo_id: str, folder_path: str, **kwargs: object) -> str:
        self.calls.append(("upload_folder", {"repo_id": repo_id, **kwargs}))
        shutil.copytree(folder_path, self.remote)
        return f"https://huggingface.co/{repo_id}/commit/0"


@pytest.fixture
def fake_hub(tmp_path, monkeypatch) -> type[FakeHfApi]:
    FakeHfApi.remote, FakeHfApi.calls = tmp_path / "remote", []
    monkeypatch.setattr(hub, "HfApi", FakeHfApi)
    return FakeHfApi


def _model_with_memory():
    model = tiny_memorizing("llama", combine="joint", local_window=16, memory_size=256)
    model.memorize([DOCUMENT], tokenizer=tiny_tokenizer(), progress=False)
    return model


REMOTE_GENERATE = """
import json, sys
sys.modules["memorizing_hf"] = None  # the package must not be importable: only the repo's own code may run
import transformers
folder = sys.argv[1]
tokenizer = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=True)  # (the config has remote code)
model = transformers.AutoModelForCausalLM.from_pretrained(
    folder, trust_remote_code=True, memory_file="memory.safetensors"
)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
inputs = tokenizer(sys.argv[2], return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=24, do_sample=False, update_memory=False)
print(json.dumps({"ids": output[0].tolist(), "entries": {str(k): v for k, v in model.memory.entries().items()}}))
"""


def test_pushed_repo_loads_with_remote_code_alone_and_generates_identically(tmp_path, fake_hub) -> None:
    model = _model_with_memory()
    tokenizer = tiny_tokenizer()
    hub.push_to_hub(model, "someone/tiny-memorizing", tokenizer=tokenizer, save_memory=True, private=True)

    assert [name for name, _ in fake_hub.calls] == ["init", "create_repo", "upload_folder"]
    assert fake_hub.calls[1][1]["private"] is True
    files = {path.name for path in fake_hub.remote.iterdir()}
    expected = {"model.safetensors", "config.json", "generation_config.json", "modeling_memorizing.py", "README.md"}
    assert expected | {"tokenizer.json", "tokenizer_config.json", "memory.safetensors"} <= files

    inputs = tokenizer(PROMPT, return_tensors="pt")
    local = model.generate(**inputs, max_new_tokens=24, do_sample=False, update_memory=False)
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin"}
    remote = subprocess.run(
        [sys.executable, "-c", REMOTE_GENERATE, str(fake_hub.remote), PROMPT],
        check=True,
        cwd=tmp_path,  # no memory.safetensors here: the name resolves beside the weights
        env=env,
        capture_output=True,
        text=True,
    )
    result = json.loads(remote.stdout.strip().splitlines()[-1])
    assert result["entries"] == {str(k): v for k, v in model.memory.entries().items()}
    assert result["ids"] == local[0].tolist()
    model.reset_memory()  # the memory matters for this prompt: without it the model says something else
    assert model.generate(**inputs, max_new_tokens=24, do_sample=False)[0].tolist() != result["ids"]


def test_model_card_carries_the_hub_metadata_settings_evaluation_and_usage(tmp_path) -> None:
    model = _model_with_memory()
    hub.save_for_hub(
        model,
        tmp_path / "tiny",
        tokenizer=tiny_tokenizer(),
        save_memory=True,
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        datasets=["cpython-stdlib"],
        license="apache-2.0",
        results=RESULTS,
    )
    card = ModelCard.load(tmp_path / "tiny" / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation"
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "memorizing-transformers" in card.data.tags and "llama" in card.data.tags
    assert card.data.datasets == ["cpython-stdlib"]
    assert card.data.license == "apache-2.0"
    assert card.text.startswith("\n# tiny\n")
    entries = model.memory.entries()[1][0]
    assert f"`memory.safetensors` ({entries} entries per memory layer" in card.text
    assert "| memory layers | 1 (of 3) |" in card.text
    assert "| memory size | 256 tokens" in card.text
    assert "`joint`" in card.text
    assert "| 0 | 10.471 | – |\n| 65536 | 8.514 | -18.7% |" in card.text  # rows sorted by memory size
    assert 'trust_remote_code=True, memory_file="memory.safetensors")' in card.text
    assert 'from_pretrained("your-name/tiny"' in card.text


def test_model_card_without_extras_has_no_evaluation_or_memory_file_and_guesses_nothing() -> None:
    model = tiny_memorizing("gpt2", memory_layers=[-1])
    card = hub.model_card(model, repo_id="someone/plain")
    assert card.data.base_model is None and card.data.license is None and card.data.datasets is None
    assert "## Evaluation" not in card.text and "memory file" not in card.text
    assert "| memory layers | 2 (of 3) |" in card.text
    assert "| rotary placement of memory | `absolute` |" in card.text  # GPT-2 has no rotary embedding
    assert 'from_pretrained("someone/plain", trust_remote_code=True)' in card.text


def test_a_results_file_in_another_format_is_refused_clearly(tmp_path) -> None:
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"perplexity": 3.0}))
    with pytest.raises(ValueError, match="results file needs 'results'"):
        hub.model_card(tiny_memorizing("llama"), results=path)
    with pytest.raises(ValueError, match="Cannot read the results file"):
        hub.model_card(tiny_memorizing("llama"), results=tmp_path / "missing.json")
