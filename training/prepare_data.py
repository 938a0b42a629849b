"""Prepare corpora once: documents split train / held-out by file, saved with `datasets` in the cache.

    python training/prepare_data.py                                  # the five offline corpora
    python training/prepare_data.py hol_light ./my_texts --output docs/results/splits.json

Each source is a corpus name (stdlib, hol_light, austen, latex, python_docs), a folder of text files or a `datasets`
data set saved to disk; `memorizing_experiments.corpora` says how the split is made and where it is stored.
`--output` writes the held-out documents of every source (with the size of each split) to a JSON file, to cite
beside results.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from memorizing_experiments.corpora import CORPORA, SPLITS, corpus_dir, prepare_corpus, split_record


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="*", default=list(CORPORA), help="corpus names, folders or saved data sets")
    parser.add_argument("--refresh", action="store_true", help="rebuild even if prepared before")
    parser.add_argument("--output", type=Path, help="write the held-out documents of every source here (JSON)")
    args = parser.parse_args(argv)

    summary = {}
    for source in args.sources:
        corpus = prepare_corpus(source, refresh=args.refresh)
        sizes = {split: (len(corpus[split]), sum(map(len, corpus[split]["text"]))) for split in SPLITS}
        print(
            f"{source}: "
            + ", ".join(
                f"{split} {count} documents ({chars / 1e6:.1f}M characters)" for split, (count, chars) in sizes.items()
            )
            + f" -> {corpus_dir(source)}"
        )
        record = split_record(source)
        summary[source] = {
            "rule": record["rule"],
            "documents": {split: count for split, (count, _) in sizes.items()},
            "characters": {split: chars for split, (_, chars) in sizes.items()},
            "held_out": record["held_out"],
        }
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
