"""Perplexity of held-out long documents against memory size, in the form of the paper's Table 4.

    python training/evaluate.py configs/eval_table4.yaml                  # every model of the suite, then the report
    python training/evaluate.py configs/eval_table4.yaml --models zero_shot   # some models (e.g. one per process)
    python training/evaluate.py configs/eval_table4.yaml --report-only    # table and plot from the results so far

A suite (YAML) names the documents and the models, and for each model the settings to read the documents with:

    documents:  source (corpus names, folders or saved data sets), split (held_out), tokenizer, min_tokens,
                max_tokens, documents_per_source: as in training recipes (memorizing_experiments.train); names:
                {source: [document names]} to read exactly these documents of a source (in that order) instead of
                drawing them
    segment_length: 512
    output_dir: docs/results/table4
    models:
      NAME: {label, checkpoint (a run folder, a checkpoint or smollm2), memory (MemorizingConfig fields for a model
             that is not memorizing yet, e.g. zero-shot joint mode), settings: [{memory_size, xl_cache, window}]}

Every (model, setting, document) result is written to `<output_dir>/<model>.json` as soon as it is measured, so an
interrupted run continues where it stopped and models can run in parallel processes. The report is
`<output_dir>/results.json` (all results, per-corpus perplexities, documents, machine, wall times), `table.md` (one
row per model and setting, one column per corpus) and `perplexity_vs_memory.png`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import matplotlib
import torch
import transformers
import yaml
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM

from memorizing_hf import MemorizingForCausalLM
from memorizing_hf.evaluation import Setting, setting_perplexity

from . import sources
from .train import DEFAULTS, load_tokenized, load_tokenizer

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DOCUMENT_KEYS = ("source", "split", "pattern", "max_documents", "min_tokens", "max_tokens", "documents_per_source")
DOCUMENT_DEFAULTS = {
    **{key: DEFAULTS["data"][key] for key in DOCUMENT_KEYS},
    "split": "held_out",
    "tokenizer": "smollm2",
    "names": None,
}


def load_suite(path: str | Path) -> dict[str, Any]:
    """The suite at `path`, with defaults filled in and every setting checked."""
    suite = yaml.safe_load(Path(path).read_text())
    unknown = set(suite["documents"]) - set(DOCUMENT_DEFAULTS)
    if unknown:
        raise ValueError(f"{path}: unknown documents keys {sorted(unknown)}; allowed: {sorted(DOCUMENT_DEFAULTS)}.")
    suite["documents"] = {**DOCUMENT_DEFAULTS, **suite["documents"]}
    suite.setdefault("segment_length", 512)
    for name, spec in suite["models"].items():
        spec.setdefault("label", name)
        spec["settings"] = [Setting(**setting) for setting in spec["settings"]]
    return suite


def load_documents(spec: dict[str, Any], seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """Corpus -> its documents ({"name", "input_ids"}), chosen and cut as training recipes choose them."""
    tokenizer = load_tokenizer(spec["tokenizer"])
    sources_ = spec["source"] if isinstance(spec["source"], list) else [spec["source"]]
    chosen = spec.get("names") or {}
    documents = {}
    for source in sources_:
        wanted = chosen.get(str(source))
        if wanted is None:
            documents[str(source)] = list(load_tokenized(source, spec, tokenizer, seed))
            continue
        tokenized = {
            d["name"]: d for d in load_tokenized(source, {**spec, "documents_per_source": None}, tokenizer, seed)
        }
        missing = [name for name in wanted if name not in tokenized]
        if missing:
            raise ValueError(
                f"documents.names: {missing} are not documents of {source} (split {spec['split']}, "
                f"min_tokens {spec['min_tokens']})."
            )
        documents[str(source)] = [tokenized[name] for name in wanted]
    return documents


def load_model(spec: dict[str, Any]) -> MemorizingForCausalLM:
    """A memorizing checkpoint as it is, or any other causal LM made memorizing with `spec["memory"]` (default: joint
    mode, which has no parameters; a model evaluated only without memory never reads it)."""
    path = str(sources.smollm2_path()) if spec["checkpoint"] == "smollm2" else spec["checkpoint"]
    if AutoConfig.from_pretrained(path).model_type == "memorizing":
        return MemorizingForCausalLM.from_pretrained(path).eval()
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return MemorizingForCausalLM.from_base_pretrained(base, **spec.get("memory", {"combine": "joint"}))


def _key(setting: Setting, source: str, document: str) -> str:
    return f"{setting.memory_size}|{setting.xl_cache}|{setting.window}|{source}|{document}"


def run_model(
    name: str, spec: dict[str, Any], documents: dict[str, list[dict]], segment_length: int, out: Path
) -> None:
    """Measure every (setting, document) of one model not yet in `out`, writing `out` after each."""
    done = json.loads(out.read_text()) if out.is_file() else []
    measured = {_key(Setting(**entry["setting"]), entry["source"], entry["document"]) for entry in done}
    jobs = [
        (setting, source, document)
        for setting in spec["settings"]
        for source, docs in documents.items()
        for document in docs
        if _key(setting, source, document["name"]) not in measured
    ]
    if not jobs:
        return
    model = load_model(spec)
    for setting, source, document in tqdm(jobs, desc=name, unit="run"):
        label = setting.label(segment_length)
        start = time.perf_counter()
        result = setting_perplexity(
            model, torch.tensor(document["input_ids"]), setting, segment_length, progress=f"{label} {source}"
        )
        done.append(
            {
                "model": name,
                "setting": {"memory_size": setting.memory_size, "xl_cache": setting.xl_cache, "window": setting.window},
                "label": label,
                "source": source,
                "document": document["name"],
                "nll": result.nll,
                "tokens": result.tokens,
                "perplexity": result.perplexity,
                "segment_perplexities": result.segments,
                "seconds": time.perf_counter() - start,
            }
        )
        out.write_text(json.dumps(done, indent=1))


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [
        line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
    ]
    return {
        "cpu": names[0] if names else platform.processor(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def report(suite: dict[str, Any], documents: dict[str, list[dict]]) -> dict[str, Any]:
    """Per-corpus perplexity of every (model, setting) measured so far: results.json, table.md and the plot."""
    folder = Path(suite["output_dir"])
    segment_length = suite["segment_length"]
    entries = [
        entry
        for name in suite["models"]
        if (folder / f"{name}.json").is_file()
        for entry in json.loads((folder / f"{name}.json").read_text())
    ]
    corpora = list(documents)
    rows = []
    for name, spec in suite["models"].items():
        for setting in spec["settings"]:
            label = setting.label(segment_length)
            perplexity, seconds = {}, 0.0
            for source in corpora:
                found = [e for e in entries if e["model"] == name and e["label"] == label and e["source"] == source]
                seconds += sum(e["seconds"] for e in found)
                if found and len(found) == len(documents[source]):  # all of the corpus's documents
                    perplexity[source] = math.exp(sum(e["nll"] for e in found) / sum(e["tokens"] for e in found))
            rows.append(
                {
                    "model": name,
                    "label": spec["label"],
                    "setting": label,
                    "memory_size": setting.memory_size,
                    "xl_cache": setting.xl_cache,
                    "window": setting.window,
                    "perplexity": perplexity,
                    "seconds": seconds,
                }
            )
    summary = {
        "suite": suite["name"],
        "segment_length": segment_length,
        "documents": {
            source: [{"name": d["name"], "tokens": len(d["input_ids"])} for d in docs]
            for source, docs in documents.items()
        },
        "machine": machine(),
        "rows": rows,
        "results": entries,
    }
    (folder / "results.json").write_text(json.dumps(summary, indent=1))
    (folder / "table.md").write_text(markdown_table(rows, corpora))
    plot(rows, corpora, folder / "perplexity_vs_memory.png")
    return summary


def markdown_table(rows: list[dict], corpora: list[str]) -> str:
    """Table 4's form: one row per model and `local context / memory size / XL cache`, one column per corpus."""
    lines = [
        "| model | context / memory / XL | " + " | ".join(corpora) + " | minutes |",
        "|---|---|" + "---|" * len(corpora) + "---|",
    ]
    for row in rows:
        cells = [f"{row['perplexity'][c]:.3f}" if c in row["perplexity"] else "" for c in corpora]
        lines.append(f"| {row['label']} | {row['setting']} | " + " | ".join(cells) + f" | {row['seconds'] / 60:.0f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], corpora: list[str], path: Path) -> None:
    """Perplexity against memory size, one panel per corpus: a line per (model, XL cache); settings without memory
    size (a recomputed window) as horizontal lines."""
    sizes = sorted({row["memory_size"] for row in rows if row["window"] is None})
    position = {size: index for index, size in enumerate(sizes)}
    names = [_curve(row) for row in rows if row["window"] is None and row["perplexity"]]
    palette = plt.get_cmap("tab20").colors  # ten strong colours, then their light shades: 20 distinct lines
    palette = palette[::2] + palette[1::2]
    colors = {name: palette[index % 20] for index, name in enumerate(dict.fromkeys(names))}  # same in every panel
    columns = len(corpora)  # legend entries per line: one per panel's width
    legend_lines = -(-len(colors) // columns)
    height = 4 + 0.25 * legend_lines
    figure, axes = plt.subplots(1, len(corpora), figsize=(4.2 * len(corpora), height), squeeze=False)
    for axis, corpus in zip(axes[0], corpora):
        shown = [row for row in rows if corpus in row["perplexity"]]
        windows = [row for row in shown if row["window"] is not None]
        for index, row in enumerate(windows):  # labels alternate between the ends so that close lines stay legible
            right = index % 2 == 1
            axis.axhline(row["perplexity"][corpus], linestyle="--", linewidth=1, color="gray")
            axis.annotate(
                f"{row['label']}: {row['setting'].split(' /')[0]}",
                (len(sizes) - 1 if right else 0, row["perplexity"][corpus]),
                fontsize=7,
                color="gray",
                va="bottom",
                ha="right" if right else "left",
            )
        lines: dict[str, list[tuple[int, float]]] = {}
        for row in shown:
            if row["window"] is None:
                lines.setdefault(_curve(row), []).append((position[row["memory_size"]], row["perplexity"][corpus]))
        for curve, points in lines.items():
            x, y = zip(*sorted(points))
            axis.plot(x, y, "o-" if len(points) > 1 else "s", label=curve, color=colors[curve])
        axis.set_xticks(range(len(sizes)), [f"{s / 1024:g}K" if s >= 1024 else str(s) for s in sizes])
        axis.set_xlabel("memory size (tokens)")
        axis.set_title(corpus)
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("perplexity (held-out)")
    legend = {}
    for axis in axes[0]:
        for handle, label in zip(*axis.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    handles, labels = list(legend.values()), list(legend)
    figure.legend(handles, labels, loc="lower center", ncol=columns, fontsize=8)
    figure.tight_layout(rect=(0, (0.15 + 0.25 * legend_lines) / height, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _curve(row: dict) -> str:
    """The plot line a row belongs to: its model, with or without XL cache."""
    return row["label"] + (", XL cache" if row["xl_cache"] else "")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("suite", help="suite YAML (see the module docstring)")
    parser.add_argument("--models", nargs="+", help="only these models of the suite")
    parser.add_argument("--report-only", action="store_true", help="measure nothing; rebuild the report")
    args = parser.parse_args(argv)
    suite = load_suite(args.suite)
    suite["name"] = Path(args.suite).stem
    folder = Path(suite["output_dir"])
    folder.mkdir(parents=True, exist_ok=True)
    documents = load_documents(suite["documents"])
    for source, docs in documents.items():
        print(f"{source}: " + ", ".join(f"{d['name']} ({len(d['input_ids'])} tokens)" for d in docs))
    start = time.perf_counter()
    if not args.report_only:
        for name in args.models or list(suite["models"]):
            run_model(name, suite["models"][name], documents, suite["segment_length"], folder / f"{name}.json")
    summary = report(suite, documents)
    print((folder / "table.md").read_text())
    print(f"wall time {time.perf_counter() - start:.0f} s; results in {folder}")
    return summary


if __name__ == "__main__":
    main()
