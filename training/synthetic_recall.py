"""Synthetic recall: can a model use a definition it read far outside its local context?

    python training/synthetic_recall.py            # documents, two trainings, evaluation, table and plot (minutes)

The paper's models "use functions defined at test time": a name defined early is used correctly much later. This
is that, in its barest form. Each document (one character per token, read 64 at a time) opens with 16 definitions
`=Kv` (a key K, an upper-case letter, bound to a value v, a lower-case letter), then random filler (digits and
spaces) with queries `?Kv` at later places: after `?K` the model must name v. Only a model that reaches the
definition can beat chance (1/26): without memory, nothing before the current 64-token segment is visible.

Two tiny Llamas are trained from scratch on the same documents with `training/train.py` (configs/recall_memory.yaml
and the same recipe with `memory.memory_layers=[]`). Training documents ask each key several times, so a definition
or an earlier query may be near or far; held-out documents ask each key once, one query per segment, at distances
of 1 to 16 segments from its definition. The result is accuracy against distance, in units of the local context:
`<output>/recall.json`, `recall.md` and `recall.png`.
"""

from __future__ import annotations

import argparse
import json
import string
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib
import numpy as np
import torch

from memorizing_hf.evaluation import streaming_perplexity

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

KEYS, VALUES, FILLER = string.ascii_uppercase, string.ascii_lowercase, string.digits + " "
SEGMENT = 64  # local context: tokens per segment (configs/recall_memory.yaml)
SEGMENTS = 17  # per document: the definitions' segment and 16 more
DEFINITIONS = 16
BUCKETS = [(1, 2), (2, 4), (4, 8), (8, 12), (12, 17)]  # distance ranges, in segments


def document(rng: np.random.Generator, held_out: bool, filler: str = FILLER) -> tuple[str, list[tuple[int, int]]]:
    """One document and its queries as (position of the value to recall, position of the value's definition).

    Characters are tokens (byte-level tokenizer), so string positions are token positions. Definitions and queries
    fill slots of 3 characters at positions 1, 5, 9, ... of a segment: nothing starts at a segment's first position
    (that token is an attention sink, never stored in memory and never scored) and nothing crosses a segment.
    Held out: the 16 definitions open the document and key i is asked once, in segment i + 1. Training: key i is
    defined in a random slot of the first half, and 60% of the other slots ask a key defined before them, so the
    same key comes back at every distance, often within the segment (where local attention learns to look it up).
    """
    keys = rng.choice(list(KEYS), DEFINITIONS, replace=False)
    values = dict(zip(keys, rng.choice(list(VALUES), DEFINITIONS)))
    text = list(rng.choice(list(filler), SEGMENT * SEGMENTS))
    slots = [segment * SEGMENT + offset for segment in range(SEGMENTS) for offset in range(1, SEGMENT - 2, 4)]
    per_segment = len(slots) // SEGMENTS
    if held_out:
        defined_at = dict(zip(keys, slots[:DEFINITIONS]))
        asked = {segment * per_segment + int(rng.integers(per_segment)): keys[segment - 1] for segment in range(1, 17)}
    else:
        first_half = rng.choice(len(slots) // 2, DEFINITIONS, replace=False)
        defined_at = {key: slots[index] for key, index in zip(keys, first_half)}
        asked = {}
        for index, slot in enumerate(slots):
            known = [key for key, at in defined_at.items() if at < slot]
            if slot not in defined_at.values() and known and rng.random() < 0.6:
                asked[index] = known[rng.integers(len(known))]
    for key, at in defined_at.items():
        text[at : at + 3] = ["=", key, values[key]]
    queries = []
    for index, key in sorted(asked.items()):
        text[slots[index] : slots[index] + 3] = ["?", key, values[key]]
        queries.append((slots[index] + 2, defined_at[key] + 2))
    return "".join(text), queries


def write_documents(
    folder: Path, count: int, seed: int, held_out: bool, filler: str = FILLER
) -> list[list[tuple[int, int]]]:
    """`count` documents as text files in `folder`, and their queries (see `document`)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    queries = []
    for index in range(count):
        text, asked = document(rng, held_out, filler)
        (folder / f"recall_{index:05d}.txt").write_text(text)
        queries.append(asked)
    return queries


def accuracy(model: torch.nn.Module, folder: Path, queries: list[list[tuple[int, int]]], memory: bool) -> dict:
    """Top-1 accuracy of the recalled values, per distance bucket (segments between definition and query)."""
    tokenizer = train.load_tokenizer("bytes")
    hits: dict[int, list[bool]] = defaultdict(list)
    for path, asked in zip(sorted(folder.glob("*.txt")), queries):
        ids = torch.tensor(tokenizer(path.read_text(), add_special_tokens=False)["input_ids"])
        result = streaming_perplexity(model, ids, SEGMENT, "memory" if memory else "segment", progress=False)
        for position, definition in asked:
            hits[(position - definition) // SEGMENT].append(result.correct[position])
    return {
        f"{low}-{high - 1}": float(np.mean([hit for distance in range(low, high) for hit in hits[distance]]))
        for low, high in BUCKETS
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=str(Path(__file__).resolve().parents[1] / "configs/recall_memory.yaml"))
    parser.add_argument("--work", type=Path, default=Path("runs/recall"), help="documents and runs go here")
    parser.add_argument("--output", type=Path, default=Path("docs/results"), help="recall.json/.md/.png go here")
    parser.add_argument("--train-documents", type=int, default=2000)
    parser.add_argument("--eval-documents", type=int, default=200)
    parser.add_argument("--filler", default=FILLER, help="characters the filler is drawn from (default: digits, space)")
    parser.add_argument("--max-steps", type=int, help="training steps of each model (default: the recipe's)")
    args = parser.parse_args(argv)

    write_documents(args.work / "train", args.train_documents, seed=0, held_out=False, filler=args.filler)
    held_out = write_documents(args.work / "held_out", args.eval_documents, seed=1, held_out=True, filler=args.filler)
    steps = [] if args.max_steps is None else [f"training.max_steps={args.max_steps}"]
    results = {}
    for name, overrides in [("memory", []), ("no memory", ["memory.memory_layers=[]"])]:
        run = args.work / name.replace(" ", "_")
        trainer = train.main(
            [args.recipe, f"data.source={args.work / 'train'}", f"training.output_dir={run}", *steps, *overrides]
        )
        model = trainer.model.eval()
        results[name] = {
            "accuracy": accuracy(model, args.work / "held_out", held_out, memory=not overrides),
            "final_loss": trainer.state.log_history[-2].get("loss"),
            "train_seconds": trainer.state.log_history[-1]["train_runtime"],
        }
        print(name, results[name])
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
        lines.append(f"| {name} | " + " | ".join(f"{100 * result['accuracy'][b]:.1f}%" for b in buckets) + " |")
    (folder / "recall.md").write_text("\n".join(lines) + "\n")
    figure, axis = plt.subplots(figsize=(6, 4))
    for name, result in results.items():
        axis.plot(buckets, [result["accuracy"][b] for b in buckets], "o-", label=name)
    axis.axhline(1 / len(VALUES), linestyle="--", color="gray", label="chance")
    axis.set_xlabel(f"distance from the definition (segments of {SEGMENT} tokens)")
    axis.set_ylabel("recall accuracy (top-1)")
    axis.set_ylim(0, 1.02)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(folder / "recall.png", dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
