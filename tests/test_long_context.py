"""The long-context recall suite on a tiny random Llama with a character-level tokenizer (one token per character):
prompts, scoring, resumable runs, the report, and one-line errors for bad overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from memorizing_experiments import long_context, sources
from memorizing_experiments.passkey import FILLER, HEADER, KEY_LINE, QUESTION

from .conftest import tiny_base, tiny_tokenizer

SUITE = """
tasks: [passkey, definition]
lengths: [200, 500]
depths: [0.0, 1.0]
trials: 1
window: 64
sinks: 2
modules: [fake]
settings:
  full: {kind: full}
  window: {kind: window}
  memory: {kind: memory, memory_layers: "1", combine: joint, memory_size: 1024, memory_top_k: 4}
"""
CELLS = 2 * 2 * 2 * 3  # tasks x lengths x depths x settings


def fake_module(names: list[str]) -> str:
    """Python source with a documented top-level function per name, a comment between them."""
    return "".join(
        f'# part {i}\ndef {name}(x, y=1):\n    """Doc {i}."""\n    return x\n\n' for i, name in enumerate(names)
    )


@pytest.fixture
def suite_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None) -> Path:
    """A suite over a tiny Llama saved with the character-level tokenizer, standing in for SmolLM2, and a fake
    standard library of one module; short answers, so that it runs in seconds."""
    monkeypatch.setattr(long_context, "ANSWER_TOKENS", {"passkey": 4, "definition": 10})
    folder = tmp_path / "tiny"
    tiny_base("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    module = tmp_path / "fake.py"
    module.write_text(fake_module([f"f{i}" for i in range(20)]))
    monkeypatch.setattr(sources, "smollm2_path", lambda: folder)
    monkeypatch.setattr(sources, "stdlib_path", lambda name: module)
    monkeypatch.setattr(sources, "stdlib_files", lambda min_bytes=0: [])
    path = tmp_path / "suite.yaml"
    path.write_text(SUITE)
    return path


def records_in(folder: Path) -> list[dict]:
    return json.loads((folder / "results.json").read_text())["records"]


def test_definition_prompt_asks_for_a_function_defined_once_at_its_depth() -> None:
    tokenizer = tiny_tokenizer()
    names = [f"f{i}" for i in range(12)]
    names[1] = names[5] = "twice"  # defined twice in the prompt: ambiguous, never asked
    text = fake_module(names)
    document = long_context.make_document(tokenizer, text, 400)
    assert len(document.ids) == 400 and len(document.cuts) == 7
    for depth in (0.0, 0.5, 1.0):
        prompt = long_context.definition_prompt(tokenizer, document, 400, depth)
        question = f"\n\n# Recall: the definition of {prompt.name} read earlier\ndef {prompt.name}("
        read = prompt.ids[: -len(question)]  # one token per character
        assert len(prompt.ids) == 400 and tokenizer.decode(prompt.ids).endswith(question)
        assert prompt.name != "twice" and tokenizer.decode(prompt.truth) == text.split(f"def {prompt.name}(")[1][:24]
        assert prompt.cut + len(prompt.truth) <= len(read)  # the definition was read in full before the question
        once = [c for i, c in enumerate(document.cuts) if names[i] != "twice"]
        others = [c / len(read) for c in once if c + 24 <= len(read)]
        assert abs(prompt.at - depth) <= min(abs(o - depth) for o in others) + 0.02  # the nearest one
    assert long_context.definition_prompt(tokenizer, document, 60, 0.5) is None  # no whole definition fits


def test_definition_scores_the_leading_tokens_and_the_share_matched() -> None:
    truth = list(range(24))
    assert long_context.definition_score(truth, truth) == (True, 1.0)
    assert long_context.definition_score(truth[:8] + [99] * 16, truth) == (True, 8 / 24)
    assert long_context.definition_score([99] + truth[1:], truth) == (False, 23 / 24)
    assert long_context.definition_score(truth[:3], truth) == (False, 3 / 24)  # stopped early


def test_every_cell_is_measured_once_reported_and_never_again(suite_file: Path, monkeypatch, tmp_path: Path) -> None:
    out = tmp_path / "out"
    long_context.main([str(suite_file), "--out", str(out)])
    records = records_in(out)
    assert len(records) == CELLS and len({long_context.cell_key(r) for r in records}) == CELLS
    skipped = {(r["task"], r["setting"], r["length"]) for r in records if "skipped" in r}
    assert ("passkey", "full", 500) in skipped and ("definition", "full", 500) in skipped  # 256 positions
    assert all(r["skipped"] == "beyond positions" for r in records if r["setting"] == "full" and r["length"] == 500)
    assert {r["setting"] for r in records if r["task"] == "passkey" and r["length"] == 200} == {
        "full",
        "window",
        "memory",
    }
    assert all("too short" in r["skipped"] for r in records if r["task"] == "passkey" and r["length"] == 200)
    scored = [r for r in records if "right" in r]
    assert {(r["task"], r["setting"]) for r in scored} >= {("passkey", "memory"), ("definition", "full")}
    for record in scored:
        assert isinstance(record["answer"], str) and isinstance(record["right"], bool) and record["seconds"] >= 0
        assert record["length"] - len(FILLER) < record["tokens"] <= record["length"]  # within one filler sentence
        if record["task"] == "passkey":  # the key line first or last of the filler
            after = len(KEY_LINE.format(key=record["key"])) + len(QUESTION)
            before = record["tokens"] - len(HEADER)
            assert record["distance"] == (after if record["depth"] == 1.0 else before)
    table = (out / "table.md").read_text()
    assert "**passkey**" in table and "**definition**" in table and table.count("| memory |") == 2
    assert "| full | " in table and "skipped" in table
    assert (out / "heatmap_passkey_memory.png").stat().st_size > 0
    assert (out / "heatmap_definition_full.png").stat().st_size > 0
    assert not (out / "heatmap_passkey_full.png").exists()  # nothing scored: no figure

    built = []
    monkeypatch.setattr(long_context.Runner, "__init__", lambda *args: built.append(args))
    long_context.main([str(suite_file), "--out", str(out)])  # everything is there: nothing runs again
    assert built == [] and records_in(out) == records


def test_new_lengths_and_changed_settings_add_only_their_cells(suite_file: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    common = [str(suite_file), "--out", out, "tasks=passkey", "depths=0.5"]
    long_context.main([*common, "lengths=500", "settings=memory"])
    long_context.main([*common, "lengths=[500,600]", "settings=[memory]"])
    long_context.main([*common, "lengths=500", "settings=memory", "settings.memory.memory_top_k=2"])
    records = records_in(Path(out))
    assert [(r["length"], r["spec"]["memory_top_k"]) for r in records] == [(500, 4), (600, 4), (500, 2)]
    assert records[0]["spec"] == {
        "kind": "memory",
        "window": 64,
        "memory_layers": [1],
        "combine": "joint",
        "memory_size": 1024,
        "memory_top_k": 4,
    }


def test_the_window_setting_reads_the_sinks_and_the_last_tokens(suite_file: Path, monkeypatch) -> None:
    suite = long_context.load_suite(suite_file)
    runner = long_context.Runner(suite)
    seen = []

    def generate(prompt: torch.Tensor, **kwargs) -> torch.Tensor:
        seen.append(prompt[0].tolist())
        return torch.cat([prompt, torch.tensor([[7, 8, 9]])], dim=1)

    monkeypatch.setattr(runner.base, "generate", generate)
    ids = list(range(3, 93)) * 2  # 180 tokens
    assert runner.answer("window", ids, 3) == [7, 8, 9]
    assert seen[-1] == ids[:2] + ids[-64:]  # 2 sinks, a window of 64
    runner.answer("window", ids[:66], 3)
    assert seen[-1] == ids[:66]  # it all fits: nothing is cut
    assert runner.answer("full", list(range(257)), 3) is None  # beyond the tiny model's 256 positions


def test_a_memory_setting_can_name_a_memory_adapter(suite_file: Path, tmp_path: Path) -> None:
    from memorizing_hf import MemorizingForCausalLM

    trained = MemorizingForCausalLM.from_base_pretrained(tiny_base("llama"), memory_layers=[1], combine="joint")
    with torch.no_grad():
        trained.knn_attention["1"].memory_bias.fill_(0.75)
    trained.save_memory_adapter(tmp_path / "adapter")
    setting = f"settings.adapted={{kind: memory, memory_adapter: {tmp_path / 'adapter'}, memory_size: 512}}"
    suite = long_context.load_suite(suite_file, [setting])
    model = long_context.Runner(suite)._memorizing("adapted")
    assert model.config.memory_size == 512 and model.config.memory_layers == [1]
    assert torch.equal(model.knn_attention["1"].memory_bias, trained.knn_attention["1"].memory_bias)


def test_overrides_select_change_and_add_settings_over_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("trials: 1\n")
    overrides = [
        "settings.memory.memory_top_k=8",
        "settings.k64={kind: memory, memory_layers: 16-17, memory_top_k: 64}",
    ]
    suite = long_context.load_suite(path, [*overrides, "settings=[memory,k64,window]", "depths=0.5", "window=512"])
    assert list(suite["settings"]) == ["memory", "k64", "window"] and suite["depths"] == [0.5]
    assert suite["settings"]["memory"]["memory_top_k"] == 8 and suite["settings"]["memory"]["window"] == 512
    assert suite["settings"]["k64"] == {"kind": "memory", "window": 512, "memory_layers": [16, 17], "memory_top_k": 64}
    assert suite["settings"]["window"] == {"kind": "window", "window": 512, "sinks": 4}
    assert long_context.DEFAULTS["settings"]["memory"]["memory_top_k"] == 32  # the defaults are left as they were


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lengths=[100]", "lengths must be integers >= 128"),
        ("lengths=[4096,big]", "lengths must be integers >= 128"),
        ("depths=1.5", "depths must be numbers in [0, 1]"),
        ("trials=0", "trials must be an integer >= 1"),
        ("settings=nope", "no setting 'nope'; the suite has full, window, memory"),
        ("tasks=trivia", "unknown task 'trivia'"),
        ("lenghts=[4096]", "unknown suite key 'lenghts' (did you mean lengths?)"),
        ("trials", "is not of the form key=value"),
        ("settings.memory.memory_topk=4", "unknown key 'memory_topk' (did you mean memory_top_k or"),
        ("settings.memory.memory_layers=x-y", "invalid layers 'x-y'"),
        ("settings.memory.xl_cache=true", "xl_cache applies to reading segments one by one"),
        ("settings.window.kind=sliding", "kind must be one of full, window, memory"),
        ("lengths=[4096", "while parsing a flow sequence"),
    ],
)
def test_bad_overrides_end_with_one_line(suite_file: Path, capsys, override: str, message: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        long_context.main([str(suite_file), override])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
