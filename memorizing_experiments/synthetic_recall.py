"""Synthetic recall: can a model use a definition it read far outside its local context?

    OMP_NUM_THREADS=1 python training/synthetic_recall.py   # documents, two trainings, evaluation, table and plot

The paper's models "use functions defined at test time": a name defined early is used correctly much later. This
is that, in its barest form. Each document (words separated by spaces, one token each, read 64 at a time) opens with
16 definitions: tokens `K=v` that bind a key K (an upper-case letter) to a value v (a lower-case letter). Filler
(`.`) follows, with queries `?K K=v` at later places: after `?K` the model must name the binding `K=v`, i.e. the
value. Only a model that reaches the definition can beat chance (1/26): without memory, nothing before the current
64-token segment is visible.

Two tiny Llamas are trained from scratch on the same documents with `training/train.py` (configs/recall_memory.yaml
and the same recipe with `memory.memory_layers=[]`). Training documents ask 4 keys 3 times in every segment after
the first, so a key's previous mention is in an earlier segment (first ask) or in the same one (the others).
Held-out documents ask each key once, one query per segment, 1 to 16 segments after its definition; held-out
documents of the training layout give the same-segment case. The result is accuracy against distance, in units of
the local context: `<output>/recall.json`, `recall.md` and `recall.png`.
"""

from __future__ import annotations

import argparse
import json
import string
import time
from collections import defaultdict
from pathlib import Path

import matplotlib
import numpy as np
import tokenizers
import torch
from transformers import PreTrainedTokenizerFast

from memorizing_hf.evaluation import streaming_perplexity

from . import train

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

KEYS, VALUES = string.ascii_uppercase, string.ascii_lowercase
FILLER = "."
SPECIAL = {"pad_token": "[PAD]", "unk_token": "[UNK]", "bos_token": "[BOS]", "eos_token": "[EOS]"}
SEGMENT = 64  # local context: tokens per segment (configs/recall_memory.yaml)
SEGMENTS = 17  # per document: the definitions' segment and 16 more
DEFINITIONS = 16  # one per slot of the first segment
SLOTS = SEGMENT // 4  # slots of 4 tokens per segment: ". . K=v ." (a definition), ". ?K K=v ." (a query), or filler
ACTIVE, REPEATS = 4, 3  # training: keys asked per segment, and how often each
BUCKETS = [(0, 1), (1, 2), (2, 4), (4, 8), (8, 12), (12, 17)]  # distance ranges, in segments (0: the same segment)


def binding(key: str, value: str) -> str:
    """The token that binds `key` to `value`: a definition, and the answer to a query of `key`."""
    return f"{key}={value}"


def write_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (tokens separated by spaces) of the documents' vocabulary, saved to `folder`.

    A binding `K=v` is one token, so a query `?K` can find it in one attention step (its key names K, its value
    carries v): the task measures whether the model reaches the definition, not whether a tiny model trained for
    minutes forms an induction circuit (with one token per character it did not; docs/results.md, section 3).
    """
    words = [*SPECIAL.values(), FILLER, *(f"?{key}" for key in KEYS), *(binding(k, v) for k in KEYS for v in VALUES)]
    vocabulary = {word: index for index, word in enumerate(words)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocabulary, unk_token=SPECIAL["unk_token"]))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL)
    tokenizer.save_pretrained(folder)
    return tokenizer


def document(rng: np.random.Generator, held_out: bool) -> tuple[list[str], list[tuple[int, int]]]:
    """One document's tokens and its queries as (position of the binding to recall, position of the key's previous
    binding).

    Definitions and queries fill slots of 4 tokens, the binding always third: nothing sits at a segment's first
    position (an attention sink, never stored in memory and never scored) and nothing crosses a segment. The 16
    definitions fill the first segment. Held out: key i is asked once, in segment i + 1. Training: every later
    segment asks 4 of the keys 3 times each, so the first ask of a key in a segment needs an earlier segment (memory)
    and the two others can be answered within the segment (where local attention learns the same lookup).
    """
    keys = rng.choice(list(KEYS), DEFINITIONS, replace=False)
    values = dict(zip(keys, rng.choice(list(VALUES), DEFINITIONS)))
    tokens = [FILLER] * (SEGMENT * SEGMENTS)
    previous: dict[str, int] = {}  # key -> position of its latest binding
    queries = []

    def put(at: int, key: str, query: bool) -> None:
        tokens[at + 2] = binding(key, values[key])
        if query:
            tokens[at + 1] = f"?{key}"
            queries.append((at + 2, previous[key]))
        previous[key] = at + 2

    for slot, key in enumerate(keys):
        put(4 * slot, key, query=False)
    for segment in range(1, SEGMENTS):
        if held_out:
            asked = {int(rng.integers(SLOTS)): keys[segment - 1]}
        else:
            chosen = list(rng.choice(keys, ACTIVE, replace=False)) * REPEATS
            asked = dict(zip(sorted(rng.choice(SLOTS, len(chosen), replace=False)), rng.permutation(chosen)))
        for slot, key in sorted(asked.items()):
            put(segment * SEGMENT + 4 * slot, key, query=True)
    return tokens, queries


def write_documents(folder: Path, count: int, seed: int, held_out: bool) -> list[list[tuple[int, int]]]:
    """`count` documents as text files in `folder` (tokens separated by spaces), and their queries (see
    `document`)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    queries = []
    for index in range(count):
        tokens, asked = document(rng, held_out)
        (folder / f"recall_{index:05d}.txt").write_text(" ".join(tokens))
        queries.append(asked)
    return queries


def accuracy(
    model: torch.nn.Module, tokenizer, folder: Path, queries: list[list[tuple[int, int]]], memory: bool
) -> dict:
    """Top-1 accuracy of the recalled bindings and number of queries, per distance bucket (in segments: the query's
    segment minus that of the key's previous binding)."""
    hits: dict[int, list[bool]] = defaultdict(list)
    for path, asked in zip(sorted(folder.glob("*.txt")), queries):
        ids = torch.tensor(tokenizer(path.read_text(), add_special_tokens=False)["input_ids"])
        result = streaming_perplexity(model, ids, SEGMENT, "memory" if memory else "segment", progress=False)
        for position, previous in asked:
            hits[position // SEGMENT - previous // SEGMENT].append(result.correct[position])
    buckets = {f"{low}-{high - 1}": [hit for d in range(low, high) for hit in hits[d]] for low, high in BUCKETS}
    return {name: {"accuracy": float(np.mean(h)), "queries": len(h)} for name, h in buckets.items() if h}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=str(Path(__file__).resolve().parents[1] / "configs/recall_memory.yaml"))
    parser.add_argument("--work", type=Path, default=Path("runs/recall"), help="documents and runs go here")
    parser.add_argument("--output", type=Path, default=Path("docs/results"), help="recall.json/.md/.png go here")
    parser.add_argument("--train-documents", type=int, default=2000)
    parser.add_argument("--eval-documents", type=int, default=200)
    parser.add_argument("--max-steps", type=int, help="training steps of each model (default: the recipe's)")
    args = parser.parse_args(argv)

    tokenizer = write_tokenizer(args.work / "tokenizer")
    write_documents(args.work / "train", args.train_documents, seed=0, held_out=False)
    held_out = write_documents(args.work / "held_out", args.eval_documents, seed=1, held_out=True)
    # the same-segment bucket: held-out documents laid out like the training ones (keys asked again within a segment)
    local = write_documents(args.work / "held_out_local", args.eval_documents // 4, seed=2, held_out=False)
    steps = [] if args.max_steps is None else [f"training.max_steps={args.max_steps}"]
    results = {}
    for name, overrides in [("memory", []), ("no memory", ["memory.memory_layers=[]"])]:
        run = args.work / name.replace(" ", "_")
        started = time.time()
        trainer = train.main(
            [
                args.recipe,
                f"model.tokenizer={args.work / 'tokenizer'}",
                f"data.source={args.work / 'train'}",
                f"training.output_dir={run}",
                *steps,
                *overrides,
            ]
        )
        model = trainer.model.eval()
        history = trainer.state.log_history
        record = {
            "final_loss": next((entry["loss"] for entry in reversed(history) if "loss" in entry), None),
            "mean_loss": history[-1]["train_loss"],
            "train_seconds": history[-1]["train_runtime"],
        }
        # the memory model is also read with its memory switched off: what it recalls without memory is the control
        readings = [(name, True), ("memory, switched off", False)] if not overrides else [(name, False)]
        for label, memory in readings:
            far = accuracy(model, tokenizer, args.work / "held_out", held_out, memory)
            near = accuracy(model, tokenizer, args.work / "held_out_local", local, memory)
            results[label] = {"accuracy": {"0-0": near["0-0"], **far}, **record}
            print(label, results[label], flush=True)
        results[name]["total_seconds"] = time.time() - started
    report(results, args.output)
    return results


def report(results: dict, folder: Path) -> None:
    """recall.json, recall.md (accuracy per distance bucket) and recall.png."""
    folder.mkdir(parents=True, exist_ok=True)
    record = {"segment_length": SEGMENT, "chance": 1 / len(VALUES), "buckets_in_segments": BUCKETS, **results}
    (folder / "recall.json").write_text(json.dumps(record, indent=1))
    buckets = list(next(iter(results.values()))["accuracy"])
    lines = ["| model | " + " | ".join(f"{b} x {SEGMENT} tokens" for b in buckets) + " |"]
    lines.append("|---|" + "---|" * len(buckets))
    for name, result in results.items():
        lines.append(
            f"| {name} | " + " | ".join(f"{100 * result['accuracy'][b]['accuracy']:.1f}%" for b in buckets) + " |"
        )
    (folder / "recall.md").write_text("\n".join(lines) + "\n")
    figure, axis = plt.subplots(figsize=(6, 4))
    for name, result in results.items():
        axis.plot(buckets, [result["accuracy"][b]["accuracy"] for b in buckets], "o-", label=name)
    axis.axhline(1 / len(VALUES), linestyle="--", color="gray", label="chance")
    axis.set_xlabel(f"distance from the key's previous binding (segments of {SEGMENT} tokens)")
    axis.set_ylabel("recall accuracy (top-1)")
    axis.set_ylim(0, 1.02)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(folder / "recall.png", dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
