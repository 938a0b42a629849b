"""Where the time goes when `generate(window=...)` reads a long prompt into a fresh memory (SmolLM2-135M, joint mode,
the packaged memory adapter's layers 16-24).

Reads one prompt through `generate(max_new_tokens=1)` and splits the wall time of the call into exact retrieval (and
within it the dense re-search of the queries that pass 1 could not bound), the joint local+memory softmax, memory
writes, and the rest (the model's own layers). Two prompts: the passkey prompt (repeated filler: many near-equal keys)
and real code (the first tokens of `typing.py`), of `--tokens` tokens each, once per value of `--candidates` (the
retrieval's `CANDIDATES`: candidates a query collects in pass 2, in multiples of k, before they are cut to its best k)
and of `--joint` (the joint softmax by torch's fused attention kernel, as inference on CPU runs it, or eagerly).

    python benchmarks/profile_prompt_reading.py [--tokens 8192] [--window 1024] [--threads 2] [--candidates 4 16]
        [--joint fused eager]

Prints a table and writes JSON (default `benchmarks/results/prompt_reading_profile.json`).
"""

from __future__ import annotations

import argparse
import collections
import functools
import itertools
import os
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from memorizing_experiments.benchmarks import write_results
from memorizing_experiments.passkey import passkey_prompt
from memorizing_experiments.sources import smollm2_path, stdlib_path
from memorizing_hf import MemorizingForCausalLM, memory, modeling_memorizing, retrieval

PARTS = {  # label -> (owner, attribute): what is timed, outermost first
    "retrieval": (modeling_memorizing.KNNAttention, "_retrieve"),
    "dense re-search": (retrieval, "redo_dense"),
    "joint softmax": (modeling_memorizing.KNNAttention, "_joint"),
    "memory writes": (memory.MemoryBank, "write"),
}


def instrument(seconds: collections.Counter, counts: collections.Counter) -> None:
    """Wrap every timed part so that its wall time adds to `seconds` (and re-searched queries to `counts`)."""
    for label, (owner, name) in PARTS.items():
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args, _original=original, _label=label, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                seconds[_label] += time.perf_counter() - start

        setattr(owner, name, timed)
    redo = retrieval.redo_dense

    @functools.wraps(redo)
    def counting(q, keys, row_len, n, lo, k, redo_mask, *args, **kwargs):
        counts["queries"] += redo_mask.numel()
        counts["re-searched"] += int(redo_mask.sum())
        return redo(q, keys, row_len, n, lo, k, redo_mask, *args, **kwargs)

    retrieval.redo_dense = counting


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--candidates", type=int, nargs="+", default=[retrieval.CANDIDATES])
    parser.add_argument("--joint", nargs="+", choices=["fused", "eager"], default=["fused"])
    parser.add_argument("--out", default="benchmarks/results/prompt_reading_profile.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    base = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32).eval()
    model = MemorizingForCausalLM.from_base_pretrained(base, memory_adapter="smollm2-135m-recall", memory_size=65536)
    prompts = {
        "passkey (repeated filler)": passkey_prompt(tokenizer, args.tokens, 0.1, seed=args.tokens).ids,
        "typing.py (real code)": tokenizer(stdlib_path("typing").read_text())["input_ids"][: args.tokens],
    }
    seconds, counts = collections.Counter(), collections.Counter()
    instrument(seconds, counts)
    rows, load_before = [], os.getloadavg()
    fused = modeling_memorizing.attention_with_logsumexp
    for (name, ids), candidates, joint in itertools.product(prompts.items(), args.candidates, args.joint):
        retrieval.CANDIDATES = candidates
        modeling_memorizing.attention_with_logsumexp = fused if joint == "fused" else lambda *args: None
        seconds.clear(), counts.clear()
        ids = torch.tensor([ids])
        start = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), window=args.window, memory=model.new_memory(),
                       max_new_tokens=1, do_sample=False, pad_token_id=tokenizer.eos_token_id)  # fmt: skip
        total = time.perf_counter() - start
        parts = {label: seconds[label] for label in PARTS}
        measured = parts["retrieval"] + parts["joint softmax"] + parts["memory writes"]
        rows.append({
            "prompt": name, "candidates": candidates, "joint": joint, "tokens": ids.shape[1], "total_s": total,
            "parts_s": parts, "rest_s": total - measured, "re_searched_queries": counts["re-searched"],
            "queries": counts["queries"],
        })  # fmt: skip
    labels = " ".join(f"{label:>22}" for label in PARTS)
    print(f"\n{'prompt':<28} {'cand.':>5} {'joint':>5} {'total':>7} {labels} {'rest':>7} re-searched")
    for row in rows:
        parts = " ".join(f"{row['parts_s'][label]:>21.1f}s" for label in PARTS)
        share = row["re_searched_queries"] / max(row["queries"], 1)
        head = f"{row['prompt']:<28} {row['candidates']:>5} {row['joint']:>5} {row['total_s']:>6.1f}s"
        print(f"{head} {parts} {row['rest_s']:>6.1f}s {share:>10.0%}")
    info = {
        "threads": args.threads, "window": args.window, "torch": torch.__version__,
        "transformers": transformers.__version__, "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }  # fmt: skip
    write_results(args.out, info, rows)


if __name__ == "__main__":
    main()
