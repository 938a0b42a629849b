"""`make demo`: a real pretrained model reads a real long document with and without kNN memory.

SmolLM2-135M (fetched from PyPI and converted once, offline) is turned into a memorizing model in joint mode, with
memory on layers 16-24, and streams a long CPython standard-library module in 512-token segments. It prints the
perplexity of each segment given (A) the segment alone, (W) a recomputed 1024-token window, and (M) the segment
plus kNN memory of everything read before it; the same tokens are scored in every variant.

Run: `python -m memorizing_hf.demo [--module typing] [--tokens 12288] [--layers 16-24]`.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .evaluation import streaming_perplexity
from .modeling_memorizing import MemorizingForCausalLM
from .sources import smollm2_path, stdlib_path


def _layers(text: str) -> list[int]:
    """'16-24' -> [16, ..., 24]; '20' -> [20]; '3,7' -> [3, 7]."""
    layers: list[int] = []
    for part in text.split(","):
        start, _, end = part.partition("-")
        layers.extend(range(int(start), int(end or start) + 1))
    return layers


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", default="typing", help="CPython standard-library module to read")
    parser.add_argument("--tokens", type=int, default=12288, help="how many tokens of it to read")
    parser.add_argument("--segment", type=int, default=512, help="segment length (local context)")
    parser.add_argument("--layers", type=_layers, default=_layers("16-24"), help="memory layers, e.g. 16-24")
    parser.add_argument("--top-k", type=int, default=32)
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = MemorizingForCausalLM.from_base_pretrained(
        base, memory_layers=args.layers, combine="joint", memory_size=65536, memory_top_k=args.top_k
    )
    source = stdlib_path(args.module)
    ids = torch.tensor(tokenizer(source.read_text(encoding="utf-8"))["input_ids"][: args.tokens])
    print(f"SmolLM2-135M reads {source} ({ids.numel()} tokens) in {args.segment}-token segments;")
    print(f"memory: joint mode, layers {args.layers[0]}-{args.layers[-1]}, top-{args.top_k}, sinks never stored.\n")

    variants = [
        ("A  each segment alone", {"mode": "segment"}),
        (f"W  {2 * args.segment}-token window, recomputed", {"mode": "window", "window": 2 * args.segment}),
        ("M  segment + kNN memory", {"mode": "memory"}),
    ]
    results = {}
    for name, kwargs in variants:
        start = time.perf_counter()
        result = streaming_perplexity(model, ids, args.segment, progress=name.split("  ")[1], **kwargs)
        results[name] = (result, time.perf_counter() - start)

    baseline = results[variants[0][0]][0].perplexity
    print(f"\n{'variant':<36} {'perplexity':>10} {'vs A':>8} {'time':>8}")
    for name, (result, seconds) in results.items():
        change = 100 * (result.perplexity / baseline - 1)
        print(f"{name:<36} {result.perplexity:>10.3f} {change:>+7.1f}% {seconds:>7.1f}s")
    print(f"\n(scored tokens per variant: {results[variants[0][0]][0].tokens}; segment 0 is read but not scored)")


if __name__ == "__main__":
    main()
