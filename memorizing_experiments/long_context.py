"""Long-context recall: does a model answer about something it read long ago? Passkey and definition recall.

    python training/long_context.py configs/long_context.yaml                      # the whole suite, then the report
    python training/long_context.py configs/long_context.yaml lengths=[4096,8192] settings=[memory] trials=1
    python training/long_context.py configs/long_context.yaml --report-only        # table and heat maps so far

Tasks (every cell: a task, a setting, a prompt length, a depth, a trial):

* passkey: `memorizing_experiments.passkey` (a 5-digit key at `depth` of repeated filler, asked for at the end);
  right when the greedy answer (12 tokens) states the key.
* definition: real text. The CPython standard library (modules concatenated in a fixed order until `length`
  tokens), a top-level `def name(` with a docstring at about `depth` of it, then at the end the lead-in
  "# Recall: the definition of name, read earlier\\ndef name(" and 24 greedy tokens; right when the first 8 equal
  the real text after `def name(` (the share of the 24 that match is recorded too).

Settings (YAML `settings: {name: {kind, ...}}`):

* full: the base model on the whole prompt (skipped beyond its positions);
* window: the base model on the first token (an attention sink) and the last `window` tokens: what local attention
  alone sees;
* memory: `MemorizingForCausalLM.from_base_pretrained(base, **memory)` and `generate(window=...)` with a fresh
  memory: the prompt streams through the window and what leaves it is retrieved.

Results go to `<output_dir>/results.json` after every cell (a rerun skips the cells already there), then
`table.md` (accuracy per setting and length, over depths and trials) and one heat map per task and setting
(`heatmap_<task>_<setting>.png`: length x depth, accuracy as colour).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

import matplotlib
import torch
import yaml
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from memorizing_hf import MemorizingForCausalLM

from . import sources
from .passkey import found, passkey_prompt

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DEFAULTS: dict[str, Any] = {
    "tasks": ["passkey", "definition"],
    "lengths": [4096, 8192, 16384, 32768, 65536, 131072],
    "depths": [0.1, 0.3, 0.5, 0.7, 0.9],
    "trials": 2,
    "window": 1024,
    "modules": ["typing", "inspect", "argparse", "subprocess", "threading", "dataclasses", "enum", "pathlib"],
    "output_dir": "docs/results/long_context",
    "settings": {
        "window": {"kind": "window"},
        "memory": {"kind": "memory", "memory": {"memory_layers": "16-24", "combine": "joint"}},
    },
}
KINDS = ("full", "window", "memory")
ANSWER_TOKENS = {"passkey": 12, "definition": 24}
DEFINITION_MATCH = 8  # leading tokens that must equal the real text


def load_suite(path: str | Path, overrides: list[str] = ()) -> dict[str, Any]:
    """The suite at `path` over DEFAULTS, with `key=value` overrides (YAML values); `settings=[a,b]` keeps only
    those settings. Unknown keys, kinds, tasks or values raise a ValueError that names them."""
    suite = {**DEFAULTS, **(yaml.safe_load(Path(path).read_text()) or {})}
    keep = None
    for override in overrides:
        key, equals, value = override.partition("=")
        if not equals:
            raise ValueError(f"Override {override!r} is not of the form key=value.")
        if key == "settings":
            keep = yaml.safe_load(value)
            keep = [keep] if isinstance(keep, str) else keep
            continue
        suite[key] = yaml.safe_load(value)
    unknown = sorted(set(suite) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"Unknown suite keys {unknown}; the keys are {sorted(DEFAULTS)}.")
    if keep is not None:
        missing = sorted(set(keep) - set(suite["settings"]))
        if missing:
            raise ValueError(f"No setting {missing} in the suite; it has {sorted(suite['settings'])}.")
        suite["settings"] = {name: suite["settings"][name] for name in keep}
    for name, setting in suite["settings"].items():
        if setting.get("kind") not in KINDS:
            raise ValueError(f"Setting {name!r}: kind must be one of {KINDS}, got {setting.get('kind')!r}.")
    bad_tasks = sorted(set(suite["tasks"]) - set(ANSWER_TOKENS))
    if bad_tasks:
        raise ValueError(f"Unknown tasks {bad_tasks}; the tasks are {sorted(ANSWER_TOKENS)}.")
    if not all(isinstance(n, int) and n >= 256 for n in suite["lengths"]):
        raise ValueError(f"lengths must be integers >= 256, got {suite['lengths']!r}.")
    if not all(isinstance(d, (int, float)) and 0 <= d <= 1 for d in suite["depths"]):
        raise ValueError(f"depths must lie in [0, 1], got {suite['depths']!r}.")
    if not isinstance(suite["trials"], int) or suite["trials"] < 1:
        raise ValueError(f"trials must be an integer >= 1, got {suite['trials']!r}.")
    return suite


def definition_prompt(tokenizer, text: str, length: int, depth: float) -> tuple[list[int], str, list[int]] | None:
    """Token ids of the first `length` tokens of `text` (minus room for the question), the name of the documented
    top-level function nearest `depth` of them, and the real tokens after its `def name(`; None if there is none."""
    room = 48
    encoding = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    ids, offsets = encoding["input_ids"][: length - room], encoding["offset_mapping"][: length - room]
    end = offsets[-1][1]
    best = None
    for match in re.finditer(r'^def (\w+)\(.*\n(?:.*\n)?\s+"""', text[:end], flags=re.MULTILINE):
        at = next(i for i, (_, stop) in enumerate(offsets) if stop > match.end(1))
        if best is None or abs(at / len(ids) - depth) < abs(best[0] / len(ids) - depth):
            best = (at, match)
    if best is None:
        return None
    match = best[1]
    name = match.group(1)
    after = text[match.end(1) + 1 :]
    truth = tokenizer(after, add_special_tokens=False)["input_ids"][: ANSWER_TOKENS["definition"]]
    question = tokenizer(f"\n\n# Recall: the definition of {name}, read earlier\ndef {name}(", add_special_tokens=False)
    return ids + question["input_ids"], name, truth


def stdlib_text(modules: list[str], tokens: int, tokenizer) -> str:
    """CPython modules concatenated in order until the text holds at least `tokens` tokens (about 3 chars each)."""
    parts, size = [], 0
    for module in modules * 8:
        part = sources.stdlib_path(module).read_text(encoding="utf-8")
        parts.append(part)
        size += len(part)
        if size > 5 * tokens and len(tokenizer("\n".join(parts))["input_ids"]) >= tokens:
            break
    return "\n".join(parts)


class Runner:
    """The models of a suite (one base, a memorizing wrapper per memory setting) and how each answers a prompt."""

    def __init__(self, suite: dict[str, Any], folder: Path | None = None) -> None:
        folder = folder or sources.smollm2_path()
        self.suite = suite
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.positions = getattr(self.base.config, "max_position_embeddings", None)
        self.models: dict[str, MemorizingForCausalLM] = {}

    def answer(self, setting: str, ids: list[int], new_tokens: int) -> list[int] | None:
        """The greedy answer's token ids, or None where the setting cannot read a prompt this long."""
        spec = self.suite["settings"][setting]
        window = spec.get("window", self.suite["window"])
        options = {"max_new_tokens": new_tokens, "do_sample": False, "pad_token_id": self.tokenizer.eos_token_id}
        prompt = torch.tensor([ids])
        if spec["kind"] == "full":
            if self.positions and len(ids) + new_tokens > self.positions:
                return None
            model = self.base
        elif spec["kind"] == "window":
            prompt = torch.cat([prompt[:, :1], prompt[:, -window + 1 :]], dim=1) if len(ids) > window else prompt
            model = self.base
        else:
            model = self._memorizing(setting, spec.get("memory", {}))
            options.update(window=window, memory=model.new_memory())
        with torch.no_grad():
            output = model.generate(prompt, attention_mask=torch.ones_like(prompt), **options)
        return output[0, prompt.shape[1] :].tolist()

    def _memorizing(self, setting: str, memory: dict[str, Any]) -> MemorizingForCausalLM:
        if setting not in self.models:
            memory = dict(memory)
            if isinstance(memory.get("memory_layers"), str):
                first, _, last = memory["memory_layers"].partition("-")
                memory["memory_layers"] = list(range(int(first), int(last or first) + 1))
            memory.setdefault("memory_size", max(self.suite["lengths"]) + 1024)
            self.models[setting] = MemorizingForCausalLM.from_base_pretrained(self.base, **memory).eval()
        return self.models[setting]


def run_cell(runner: Runner, task: str, setting: str, length: int, depth: float, trial: int) -> dict[str, Any]:
    """One cell's record: the answer, whether it is right, and the seconds it took."""
    tokenizer = runner.tokenizer
    record: dict[str, Any] = {"task": task, "setting": setting, "length": length, "depth": depth, "trial": trial}
    if task == "passkey":
        prompt = passkey_prompt(tokenizer, length, depth, seed=1000 * trial + length + int(100 * depth))
        ids = prompt.ids
        record.update(key=prompt.key, distance=prompt.distance())

        def check(answer: list[int]) -> bool:
            return found(tokenizer.decode(answer), prompt.key)

    else:
        modules = runner.suite["modules"]
        text = stdlib_text(modules[trial % len(modules) :] + modules[: trial % len(modules)], length, tokenizer)
        built = definition_prompt(tokenizer, text, length, depth)
        if built is None:
            return {**record, "skipped": "no documented function"}
        ids, name, truth = built
        record.update(name=name)

        def check(answer: list[int]) -> bool:
            record["matched"] = sum(a == b for a, b in zip(answer, truth)) / len(truth)
            return answer[:DEFINITION_MATCH] == truth[:DEFINITION_MATCH]

    start = time.perf_counter()
    answer = runner.answer(setting, ids, ANSWER_TOKENS[task])
    if answer is None:
        return {**record, "skipped": "beyond the model's positions"}
    record.update(
        tokens=len(ids), answer=tokenizer.decode(answer), right=bool(check(answer)), seconds=time.perf_counter() - start
    )
    return record


def cell_key(record: dict[str, Any]) -> str:
    return f"{record['task']}/{record['setting']}/{record['length']}/{record['depth']}/{record['trial']}"


def report(suite: dict[str, Any], records: list[dict[str, Any]], folder: Path) -> str:
    """Write `table.md` and the heat maps; return the table."""
    scored = [r for r in records if "right" in r]
    lengths = sorted({r["length"] for r in scored})
    lines = []
    for task in suite["tasks"]:
        lines += [f"**{task}** (accuracy over depths and trials; cells: right / run)", ""]
        lines += ["| setting | " + " | ".join(f"{n // 1024}K" for n in lengths) + " |"]
        lines += ["|---|" + "---:|" * len(lengths)]
        for setting in suite["settings"]:
            row = []
            for n in lengths:
                cell = [r["right"] for r in scored if (r["task"], r["setting"], r["length"]) == (task, setting, n)]
                row.append(f"{sum(cell)}/{len(cell)}" if cell else "–")
            lines.append(f"| {setting} | " + " | ".join(row) + " |")
            heatmap(scored, task, setting, folder / f"heatmap_{task}_{setting}.png")
        lines.append("")
    table = "\n".join(lines)
    (folder / "table.md").write_text(table)
    return table


def heatmap(records: list[dict[str, Any]], task: str, setting: str, path: Path) -> None:
    """Length x depth, accuracy as colour (the usual needle-in-a-haystack figure)."""
    cells = [r for r in records if r["task"] == task and r["setting"] == setting]
    if not cells:
        return
    lengths, depths = sorted({r["length"] for r in cells}), sorted({r["depth"] for r in cells})
    grid = torch.full((len(depths), len(lengths)), float("nan"))
    for i, depth in enumerate(depths):
        for j, length in enumerate(lengths):
            hits = [r["right"] for r in cells if r["depth"] == depth and r["length"] == length]
            if hits:
                grid[i, j] = sum(hits) / len(hits)
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2, 0.6 * len(depths) + 1.5))
    image = ax.imshow(grid.numpy(), cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("depth of the fact")
    ax.set_title(f"{task}: {setting}")
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("suite", help="the suite (YAML), e.g. configs/long_context.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. lengths=[4096,8192] settings=[memory]")
    parser.add_argument("--report-only", action="store_true", help="table and heat maps from the results so far")
    args = parser.parse_args(argv)
    try:
        suite = load_suite(args.suite, args.overrides)
    except (OSError, ValueError, yaml.YAMLError) as error:
        parser.exit(1, f"long_context: {error}\n")
    folder = Path(suite["output_dir"])
    folder.mkdir(parents=True, exist_ok=True)
    results_file = folder / "results.json"
    records = json.loads(results_file.read_text())["records"] if results_file.is_file() else []
    done = {cell_key(r) for r in records}
    cells = [
        {"task": task, "setting": setting, "length": length, "depth": depth, "trial": trial}
        for task in suite["tasks"]
        for length in suite["lengths"]
        for depth in suite["depths"]
        for trial in range(suite["trials"])
        for setting in suite["settings"]
    ]
    todo = [] if args.report_only else [c for c in cells if cell_key(c) not in done]
    runner = Runner(suite) if todo else None
    for cell in tqdm(todo, desc="cells", unit="cell"):
        record = run_cell(runner, **cell)
        records.append(record)
        tqdm.write(
            f"{cell_key(record)}: {'right' if record.get('right') else record.get('skipped', 'wrong')} "
            f"{record.get('answer', '')!r}"
        )
        results_file.write_text(json.dumps({"suite": suite, "records": records}, indent=1))
    table = report(suite, records, folder)
    print(table)
    return {"suite": suite, "records": records}
