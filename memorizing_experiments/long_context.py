"""Long-context recall: does a model answer about something it read long ago? Passkey and definition recall.

    python training/long_context.py configs/long_context.yaml                        # the whole suite, then the report
    python training/long_context.py configs/long_context.yaml lengths=[4096,8192] settings=memory tasks=passkey trials=1
    python training/long_context.py configs/long_context.yaml settings.memory.memory_top_k=64 --out /tmp/k64
    python training/long_context.py configs/long_context.yaml --report-only          # table and heat maps so far

Every cell is a (task, setting, prompt length, depth, trial); `depth` is where the fact sits (0: start, 1: end).

Tasks:

* passkey: the prompt of Landmark Attention, LongLLaMA and InfLLM (`memorizing_experiments.passkey`): a 5-digit key
  (drawn from `seed + trial`) at `depth` of repeated filler, asked for at the end; right when the key's digits are in
  the 12 greedy answer tokens.
* definition: real text. CPython standard-library modules (`modules`, then the rest of the standard library in sorted
  order) concatenated to `length` tokens (each trial starts at another module); a top-level `def name(` with a
  docstring, whose name is defined once in the prompt, at about `depth` of it (`demo.definition_cuts`). At the end:
  "\\n\\n# Recall: the definition of name read earlier\\n" and the document's own tokens of `def name(`, then 24
  greedy tokens. Right when the first 8 equal the document's tokens after `def name(`; `matched` is the share of the
  24 that do (position by position). The lead-in reuses the document's tokens so that the answer and the real text
  are tokenized alike (when `(` shares a token, e.g. `(self`, the prompt ends with that token).

Settings (YAML `settings: {name: {kind, ...}}`), all on SmolLM2-135M-Instruct (`sources.smollm2_path()`):

* kind full: the base model on the whole prompt; cells whose prompt is longer than its `max_position_embeddings`
  are recorded as skipped ("beyond positions"); the answer's tokens may run a few positions past them.
* kind window (`window`, `sinks`): memory off. The base model on the first `sinks` tokens and the last `window` ones.
  Not `generate(window=...)` of a memorizing model with an empty memory: tokens leaving that window go to the
  cache's own memory, which the same call searches, so it would be the memory setting again.
* kind memory (`window` and any `MemorizingConfig` field: memory_layers ("16-24" or a list), combine, memory_size,
  memory_top_k, rotary_placement, memory_score_bias, ...; memory_adapter: a trained adapter's name or folder, whose
  settings the other keys override): `MemorizingForCausalLM.from_base_pretrained(base, ...)`
  and `generate(window=window, memory=model.new_memory())`: the prompt streams through the window, what leaves it
  stays retrievable for the rest of the call; the fresh memory stays empty (`update_memory=False`). A prompt longer
  than `memory_size` loses its oldest tokens. `xl_cache` is refused: it applies to segment-by-segment reading, not
  to generate's streaming window (which already is a sliding cache), so there is no memory_xl setting.

Command-line overrides are `key=value` (values in YAML): `lengths=[4096,8192]`, `depths=0.5`, `tasks=passkey`,
`trials=1`, `settings=memory` or `settings=[full,memory]` (keep only these), `settings.memory.memory_top_k=64` or
`settings.k64={kind: memory, memory_layers: 16-24, combine: joint, memory_top_k: 64}` (change or add a setting).

Results: `<out>/results.json` (default `docs/results/long_context/`), written after every cell; one record per cell
with the answer, whether it is right and the seconds it took. A rerun skips the cells already there, so an
interrupted run continues and new lengths or settings add only their cells; a record counts for its setting while
the setting's parameters are unchanged (a changed `seed` or `modules` needs another `--out`). At the end `table.md`
(accuracy per setting and length, over depths and trials), printed, and `heatmap_<task>_<setting>.png` (length x
depth, accuracy as colour).
"""

from __future__ import annotations

import argparse
import copy
import difflib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import torch
import yaml
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from memorizing_hf import MemorizingForCausalLM
from memorizing_hf.cli import parse_layers

from . import sources
from .demo import definition_cuts, window_tail
from .evaluate import machine
from .passkey import found, passkey_prompt
from .train import ALLOWED, parse_value

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DEFAULTS: dict[str, Any] = {
    "tasks": ["passkey", "definition"],
    "lengths": [4096, 8192, 16384, 32768, 65536, 131072],
    "depths": [0.0, 0.25, 0.5, 0.75, 1.0],
    "trials": 2,
    "seed": 0,
    "window": 1024,
    "sinks": 4,
    "modules": ["typing", "inspect", "argparse", "subprocess", "threading", "dataclasses", "enum", "pathlib"],
    "settings": {
        "full": {"kind": "full"},
        "window": {"kind": "window"},
        "memory": {
            "kind": "memory",
            "memory_layers": "16-24",
            "combine": "joint",
            "memory_size": 131072,
            "memory_top_k": 32,
        },
    },
}
DEFAULT_OUT = "docs/results/long_context"
ANSWER_TOKENS = {"passkey": 12, "definition": 24}
DEFINITION_MATCH = 8  # leading answer tokens that must equal the real text
MIN_LENGTH = 128
MEMORY_KEYS = ALLOWED["memory"] - {"learning_rate"}  # MemorizingConfig's fields, as training recipes take them
SETTING_KEYS = {
    "full": {"kind"},
    "window": {"kind", "window", "sinks"},
    "memory": {"kind", "window", "memory_adapter"} | MEMORY_KEYS,
}
SKIPPED_BEYOND_POSITIONS = "beyond positions"


# --- the suite ---------------------------------------------------------------------------------------------------


def load_suite(path: str | Path, overrides: list[str] = ()) -> dict[str, Any]:
    """The suite at `path` over DEFAULTS with `key=value` overrides applied and every value checked; each setting
    resolved to the exact parameters it runs with. Anything wrong raises a one-line ValueError that names it."""
    suite = copy.deepcopy({**DEFAULTS, **(yaml.safe_load(Path(path).read_text()) or {})})
    keep = None
    for override in overrides:
        key, equals, value = override.partition("=")
        if not equals or not key:
            raise ValueError(f"override {override!r} is not of the form key=value (e.g. lengths=[4096,8192])")
        parsed = parse_value(value)
        if key == "settings" and not isinstance(parsed, dict):
            keep = [str(name) for name in (parsed if isinstance(parsed, list) else [parsed])]
            continue
        *parents, name = key.split(".")
        target = suite
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ValueError(f"override {override!r}: {part!r} does not hold named values")
        target[name] = parsed
    unknown = sorted(set(suite) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown suite key {unknown[0]!r}{_hint(unknown[0], DEFAULTS)}")
    for key in ("tasks", "lengths", "depths", "modules"):
        if not isinstance(suite[key], list):
            suite[key] = [suite[key]]
    bad_tasks = [task for task in suite["tasks"] if task not in ANSWER_TOKENS]
    if bad_tasks:
        raise ValueError(f"unknown task {bad_tasks[0]!r}; the tasks are {', '.join(ANSWER_TOKENS)}")
    if not all(_integer(n) and n >= MIN_LENGTH for n in suite["lengths"]):
        raise ValueError(f"lengths must be integers >= {MIN_LENGTH}, got {suite['lengths']!r}")
    if not all(isinstance(d, (int, float)) and not isinstance(d, bool) and 0 <= d <= 1 for d in suite["depths"]):
        raise ValueError(f"depths must be numbers in [0, 1], got {suite['depths']!r}")
    for key, least in (("trials", 1), ("window", 1), ("sinks", 0), ("seed", 0)):
        if not _integer(suite[key]) or suite[key] < least:
            raise ValueError(f"{key} must be an integer >= {least}, got {suite[key]!r}")
    if not isinstance(suite["settings"], dict) or not suite["settings"]:
        raise ValueError(f"settings must map names to settings, got {suite['settings']!r}")
    if keep is not None:
        missing = [name for name in keep if name not in suite["settings"]]
        if missing:
            raise ValueError(f"no setting {missing[0]!r}; the suite has {', '.join(suite['settings'])}")
        suite["settings"] = {name: suite["settings"][name] for name in keep}
    suite["settings"] = {name: resolve_setting(name, spec, suite) for name, spec in suite["settings"].items()}
    return suite


def resolve_setting(name: str, spec: Any, suite: dict[str, Any]) -> dict[str, Any]:
    """The parameters a setting runs with: its own, the suite's `window` and `sinks` where it uses them, memory
    layers as a list. A record counts for a setting only while these are unchanged."""
    if not isinstance(spec, dict) or spec.get("kind") not in SETTING_KEYS:
        kind = spec.get("kind") if isinstance(spec, dict) else spec
        raise ValueError(f"setting {name!r}: kind must be one of {', '.join(SETTING_KEYS)}, got {kind!r}")
    allowed = SETTING_KEYS[spec["kind"]]
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ValueError(f"setting {name!r} ({spec['kind']}): unknown key {unknown[0]!r}{_hint(unknown[0], allowed)}")
    if spec.get("xl_cache"):
        raise ValueError(
            f"setting {name!r}: xl_cache applies to reading segments one by one, not to generate's streaming window"
        )
    resolved = {key: suite[key] for key in ("window", "sinks") if key in allowed}
    resolved.update(spec)
    layers = resolved.get("memory_layers")
    if isinstance(layers, (str, int)):
        try:
            resolved["memory_layers"] = parse_layers(str(layers))
        except argparse.ArgumentTypeError as error:
            raise ValueError(f"setting {name!r}: {error}") from None
    for key, least in (("window", 1), ("sinks", 0)):
        if key in resolved and (not _integer(resolved[key]) or resolved[key] < least):
            raise ValueError(f"setting {name!r}: {key} must be an integer >= {least}, got {resolved[key]!r}")
    return resolved


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _hint(key: str, allowed: Any) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=2)
    return f" (did you mean {' or '.join(close)}?)" if close else f"; allowed: {', '.join(sorted(allowed))}"


# --- prompts -----------------------------------------------------------------------------------------------------


@dataclass
class Document:
    """A long real text, its tokens with their character spans, and where its documented top-level functions'
    `def name(` end (token indices just past them)."""

    text: str
    ids: list[int]
    offsets: list[tuple[int, int]]
    cuts: list[int]


@dataclass
class Definition:
    """A definition-recall prompt: token ids, the function's name, where its `def name(` ends in the prompt, the
    document's tokens after it (what a perfect recall writes), and the depth it sits at (share of the text read)."""

    ids: list[int]
    name: str
    cut: int
    truth: list[int]
    at: float


def stdlib_document(tokenizer, modules: list[str], tokens: int, trial: int = 0) -> Document:
    """CPython modules concatenated until at least `tokens` tokens: `modules` rotated by `trial` (another start per
    trial), then the other standard-library files of at least 20 kB in sorted order."""
    start = trial % len(modules) if modules else 0
    paths = [sources.stdlib_path(module) for module in modules[start:] + modules[:start]]
    paths += [path for path in sources.stdlib_files(min_bytes=20_000) if path not in paths]
    parts: list[str] = []
    for path in paths:
        parts.append(path.read_text(encoding="utf-8"))
        if sum(map(len, parts)) > 2 * tokens:  # code has ~3-4 characters per token: check only when likely
            if len(tokenizer("\n\n".join(parts), add_special_tokens=False, verbose=False)["input_ids"]) > tokens:
                break
    return make_document(tokenizer, "\n\n".join(parts), tokens)


def make_document(tokenizer, text: str, tokens: int) -> Document:
    """The first `tokens` tokens of `text` and the documented top-level functions among them."""
    encoding = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False, verbose=False)
    ids, offsets = encoding["input_ids"][:tokens], encoding["offset_mapping"][:tokens]
    return Document(text, ids, offsets, definition_cuts(text[: offsets[-1][1]], offsets, 1, len(ids)))


def definition_prompt(tokenizer, document: Document, length: int, depth: float) -> Definition | None:
    """A prompt of at most `length` tokens: the document's start, then the recall question about the documented
    top-level function (defined once in the prompt, its answer wholly inside) nearest `depth` of it; None if none."""
    new = ANSWER_TOKENS["definition"]
    body = min(length, len(document.ids))
    end = document.offsets[body - 1][1]
    counts: dict[str, int] = {}
    for match in re.finditer(r"^def (\w+)\(", document.text[:end], flags=re.MULTILINE):
        counts[match.group(1)] = counts.get(match.group(1), 0) + 1
    candidates = []
    for cut in document.cuts:
        if cut + new > body:
            break
        line = document.text.rfind("\n", 0, document.offsets[cut - 1][0]) + 1
        name = re.match(r"def (\w+)", document.text[line:]).group(1)
        if counts.get(name) != 1:
            continue
        first = next(i for i in range(cut - 1, -1, -1) if document.offsets[i][0] <= line)  # the token holding "def"
        lead = f"\n\n# Recall: the definition of {name} read earlier\n"
        question = tokenizer(lead, add_special_tokens=False)["input_ids"] + document.ids[first:cut]
        keep = min(body, length - len(question))
        if cut + new <= keep:  # the answer lies in the text read
            truth = document.ids[cut : cut + new]
            candidates.append(Definition(document.ids[:keep] + question, name, cut, truth, cut / keep))
    if not candidates:
        return None
    return min(candidates, key=lambda c: abs(c.at - depth))


def definition_score(answer: list[int], truth: list[int]) -> tuple[bool, float]:
    """Right when the answer's first DEFINITION_MATCH tokens are the real ones; and the share of `truth` matched
    position by position."""
    matched = sum(a == b for a, b in zip(answer, truth)) / len(truth)
    return answer[:DEFINITION_MATCH] == truth[:DEFINITION_MATCH], matched


# --- running ------------------------------------------------------------------------------------------------------


class Runner:
    """The base model, a memorizing wrapper per memory setting (sharing the base's weights), the documents of the
    definition task, and how each setting answers a prompt."""

    def __init__(self, suite: dict[str, Any], folder: str | Path | None = None) -> None:
        folder = folder or sources.smollm2_path()
        self.suite = suite
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.positions = getattr(self.base.config, "max_position_embeddings", None)
        self.models: dict[str, MemorizingForCausalLM] = {}
        self.documents: dict[int, Document] = {}

    def document(self, trial: int) -> Document:
        """The definition task's document of `trial`, long enough for every length of the suite (built once)."""
        if trial not in self.documents:
            tokens = max(self.suite["lengths"])
            self.documents[trial] = stdlib_document(self.tokenizer, self.suite["modules"], tokens, trial)
        return self.documents[trial]

    @torch.no_grad()
    def answer(self, setting: str, ids: list[int], new_tokens: int) -> list[int] | None:
        """The greedy answer's token ids, or None when the setting cannot read a prompt this long."""
        spec = self.suite["settings"][setting]
        options = {"max_new_tokens": new_tokens, "do_sample": False, "pad_token_id": self.tokenizer.eos_token_id}
        model = self.base
        if spec["kind"] == "full" and self.positions and len(ids) > self.positions:
            return None
        if spec["kind"] == "window":
            ids = window_tail(ids, spec["sinks"], spec["window"])
        if spec["kind"] == "memory":
            model = self._memorizing(setting)
            options.update(window=spec["window"], memory=model.new_memory(), update_memory=False)
        prompt = torch.tensor([ids], device=model.device)
        output = model.generate(prompt, attention_mask=torch.ones_like(prompt), **options)
        return output[0, prompt.shape[1] :].tolist()

    def _memorizing(self, setting: str) -> MemorizingForCausalLM:
        if setting not in self.models:
            spec = self.suite["settings"][setting]
            kwargs = {key: value for key, value in spec.items() if key in MEMORY_KEYS | {"memory_adapter"}}
            self.models[setting] = MemorizingForCausalLM.from_base_pretrained(self.base, **kwargs).eval()
        return self.models[setting]


def run_cell(runner: Runner, task: str, setting: str, length: int, depth: float, trial: int) -> dict[str, Any]:
    """One cell's record: the prompt's facts, the answer, whether it is right, the seconds it took."""
    tokenizer, suite = runner.tokenizer, runner.suite
    record: dict[str, Any] = {"task": task, "setting": setting, "length": length, "depth": depth, "trial": trial}
    record["spec"] = suite["settings"][setting]
    if task == "passkey":
        try:
            prompt = passkey_prompt(tokenizer, length, depth, seed=suite["seed"] + trial)
        except ValueError as error:  # a length too short for the header, key line and question
            return {**record, "skipped": str(error)}
        ids = prompt.ids
        record.update(key=prompt.key, distance=prompt.distance(), at=(prompt.key_start / len(ids)))
    else:
        definition = definition_prompt(tokenizer, runner.document(trial), length, depth)
        if definition is None:
            return {**record, "skipped": "no documented function defined once"}
        ids = definition.ids
        record.update(name=definition.name, distance=len(ids) - definition.cut, at=definition.at)
    record["tokens"] = len(ids)
    start = time.perf_counter()
    answer = runner.answer(setting, ids, ANSWER_TOKENS[task])
    if answer is None:
        return {**record, "skipped": SKIPPED_BEYOND_POSITIONS}
    record["answer"] = tokenizer.decode(answer)
    if task == "passkey":
        record["right"] = found(record["answer"], prompt.key)
    else:
        record["right"], record["matched"] = definition_score(answer, definition.truth)
        record["truth"] = tokenizer.decode(definition.truth)
    record["seconds"] = time.perf_counter() - start
    return record


def cell_key(record: dict[str, Any]) -> str:
    """What identifies a cell: task, setting, length, depth, trial, and the setting's parameters."""
    spec = json.dumps(record.get("spec"), sort_keys=True)  # records of older versions had none: never current
    return f"{record['task']}|{record['setting']}|{record['length']}|{float(record['depth'])}|{record['trial']}|{spec}"


def cells(suite: dict[str, Any]) -> list[dict[str, Any]]:
    """Every cell of the suite, lengths outermost so that short prompts are measured first."""
    return [
        {"task": task, "setting": setting, "length": length, "depth": depth, "trial": trial}
        for length in suite["lengths"]
        for task in suite["tasks"]
        for depth in suite["depths"]
        for trial in range(suite["trials"])
        for setting in suite["settings"]
    ]


def run(suite: dict[str, Any], folder: Path, runner: Runner | None = None) -> list[dict[str, Any]]:
    """Measure the cells of `suite` not yet in `folder/results.json`, writing it after each; all its records."""
    results = folder / "results.json"
    records = json.loads(results.read_text())["records"] if results.is_file() else []
    done = {cell_key(record) for record in records}
    todo = [cell for cell in cells(suite) if cell_key({**cell, "spec": suite["settings"][cell["setting"]]}) not in done]
    if not todo:
        return records
    runner = runner or Runner(suite)
    folder.mkdir(parents=True, exist_ok=True)
    for cell in tqdm(todo, desc="long-context cells", unit="cell"):
        record = run_cell(runner, **cell)
        records.append(record)
        verdict = record.get("skipped") or ("right" if record["right"] else "wrong")
        tqdm.write(
            f"{cell['task']} {cell['setting']} {cell['length']} depth {cell['depth']} trial {cell['trial']}: "
            f"{verdict} {record.get('answer', '')!r}"
        )
        results.write_text(json.dumps({"machine": machine(), "records": records}, indent=1))
    return records


# --- report ------------------------------------------------------------------------------------------------------


def current(suite: dict[str, Any], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of the suite's tasks, settings, lengths and depths, measured with the settings as they are now."""
    wanted = {cell_key({**cell, "spec": suite["settings"][cell["setting"]]}) for cell in cells(suite)}
    return [record for record in records if cell_key(record) in wanted]


def markdown_table(suite: dict[str, Any], records: list[dict[str, Any]]) -> str:
    """Per task: accuracy per setting (rows) and length (columns), over depths and trials, with the count of prompts
    right and scored (cells measured with fewer trials say so); definition cells also give the mean share of answer
    tokens matched. "skipped": every cell of it was skipped; empty: not measured."""
    records = current(suite, records)
    lengths = sorted(suite["lengths"])
    lines = []
    for task in suite["tasks"]:
        note = ""
        if task == "definition":
            note = f"; in brackets, after the count, the mean share of the {ANSWER_TOKENS[task]} tokens matched"
        lines += [f"**{task}**: accuracy over depths {suite['depths']} and up to {suite['trials']} trial(s){note}", ""]
        lines += ["| setting | " + " | ".join(_size(n) for n in lengths) + " |", "|---|" + "---:|" * len(lengths)]
        for setting in suite["settings"]:
            row = []
            for length in lengths:
                cell = [r for r in records if (r["task"], r["setting"], r["length"]) == (task, setting, length)]
                scored = [r for r in cell if "right" in r]
                if scored:
                    right = sum(r["right"] for r in scored)
                    text = f"{right / len(scored):.2f} ({right}/{len(scored)}"
                    if task == "definition":
                        text += f"; {sum(r['matched'] for r in scored) / len(scored):.0%}"
                    row.append(text + ")")
                else:
                    row.append("skipped" if cell else "")
            lines.append(f"| {setting} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def heatmap(suite: dict[str, Any], records: list[dict[str, Any]], task: str, setting: str, path: Path) -> bool:
    """The needle-in-a-haystack figure of one task and setting: depth (rows) x length (columns), accuracy as
    colour, grey where nothing was scored. False (and no file) when nothing was scored."""
    scored = [r for r in current(suite, records) if (r["task"], r["setting"]) == (task, setting) and "right" in r]
    if not scored:
        return False
    lengths, depths = sorted(suite["lengths"]), sorted(suite["depths"])
    grid = [[float("nan")] * len(lengths) for _ in depths]
    for i, depth in enumerate(depths):
        for j, length in enumerate(lengths):
            hits = [r["right"] for r in scored if r["length"] == length and float(r["depth"]) == float(depth)]
            if hits:
                grid[i][j] = sum(hits) / len(hits)
    figure, axis = plt.subplots(figsize=(1.1 * len(lengths) + 2.5, 0.5 * len(depths) + 1.8))
    colours = plt.get_cmap("RdYlGn").with_extremes(bad="lightgrey")
    image = axis.imshow(grid, cmap=colours, vmin=0, vmax=1, aspect="auto")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if value == value:  # not NaN
                axis.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
    axis.set_xticks(range(len(lengths)), [_size(n) for n in lengths])
    axis.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    axis.set_xlabel("prompt length (tokens)")
    axis.set_ylabel("depth (0: start, 1: end)")
    axis.set_title(f"{task}: {setting}")
    figure.colorbar(image, ax=axis, label="accuracy")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def report(suite: dict[str, Any], records: list[dict[str, Any]], folder: Path) -> str:
    """Write `table.md` and the heat maps of the suite's cells to `folder`; return the table."""
    folder.mkdir(parents=True, exist_ok=True)
    table = markdown_table(suite, records)
    (folder / "table.md").write_text(table)
    for task in suite["tasks"]:
        for setting in suite["settings"]:
            heatmap(suite, records, task, setting, folder / f"heatmap_{task}_{setting}.png")
    return table


def _size(tokens: int) -> str:
    return f"{tokens / 1024:g}K" if tokens >= 1024 else str(tokens)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("suite", help="the suite (YAML), e.g. configs/long_context.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. lengths=[4096,8192] settings=memory trials=1")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    parser.add_argument("--report-only", action="store_true", help="measure nothing: table and heat maps so far")
    args = parser.parse_intermixed_args(argv)
    try:
        suite = load_suite(args.suite, args.overrides)
    except (OSError, ValueError, yaml.YAMLError) as error:
        message = " ".join(str(error).split())  # YAML errors span several lines
        parser.exit(2, f"{parser.prog}: error: {message}\n")
    folder = Path(args.out)
    results = folder / "results.json"
    if args.report_only:
        records = json.loads(results.read_text())["records"] if results.is_file() else []
    else:
        records = run(suite, folder)
    table = report(suite, records, folder)
    print(table)
    print(f"results in {folder}")
    return records
