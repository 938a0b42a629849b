"""`make demo`: a real pretrained model reads a real long document, then uses what it read.

SmolLM2-135M (fetched from PyPI and converted once, offline) is turned into a memorizing model in joint mode (the
retrieved keys join the local softmax), with memory on layers 16-24 and the packaged memory adapter (one learned
weight of retrieved entries per head, trained on other documents: training/memory_adapter.py; the base weights are
untouched) and the retrieved entries' scores spread around each query's best by `--memory-sharpness` (2, chosen on
other modules), and reads a long CPython standard-library module in 512-token segments.

1. Perplexity of each segment given (A) the segment alone, (W) a recomputed 1024-token window, and (M) what the
   paper's model sees: the segment, the previous one (XL cache) and kNN memory of everything read before; the same
   tokens are scored in every variant, so M - W is what memory adds to the same local context.
2. Recall: with the whole module memorized, the model is shown the lines that lead into functions defined
   thousands of tokens earlier, in a local window that holds nothing else, and guesses their signatures and
   docstrings token by token (each guess given the real text before it), with that memory and with empty memory.
   Then `generate()` writes `--continued` of them on its own (greedy), compared with the module's real text, beside
   the same call with the passage just read in its window (the ceiling).
3. Passkey: a 5-digit key hidden early in `--passkey-tokens` of filler, asked for at the end. `generate()` streams the
   prompt through a 1024-token window into a fresh memory and answers; the base model, given the last 1024 tokens
   (what fits its window), answers too.

Run: `python -m memorizing_experiments.demo [--module typing] [--tokens 12288] [--memory-adapter none]
[--memory-sharpness 1] [--continued N] [--passkey-tokens N]`.
"""

from __future__ import annotations

import argparse
import difflib
import re
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from memorizing_hf import MemorizingForCausalLM
from memorizing_hf.cli import parse_layers
from memorizing_hf.evaluation import streaming_perplexity

from .passkey import found, passkey_prompt
from .sources import smollm2_path, stdlib_path

LEAD_IN = 48  # prompt tokens: the lines just before the definition
NEW_TOKENS = 48  # tokens of each definition to guess or generate
RECALLED = 8  # functions whose definitions part 2 checks
ADAPTER = "smollm2-135m-recall"  # memorizing_hf/adapters/: trained by training/memory_adapter.py


def perplexities(model: MemorizingForCausalLM, ids: torch.Tensor, segment: int) -> None:
    """Print the A / W / M perplexities (part 1). Leaves the whole document in memory (M runs last)."""
    variants = [
        ("A  each segment alone", {"mode": "segment"}),
        (f"W  {2 * segment}-token window, recomputed", {"mode": "window", "window": 2 * segment}),
        ("M  XL cache + kNN memory", {"mode": "memory", "memory": model.memory}),
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


def definition_cuts(text: str, offsets: list[tuple[int, int]], first_token: int, last_token: int) -> list[int]:
    """Token indices just past `def name(` of the top-level functions with a docstring between the two indices."""
    cuts = []
    for match in re.finditer(r'^def \w+\(.*\n(?:.*\n)?\s+"""', text, flags=re.MULTILINE):
        parenthesis = text.index("(", match.start())
        cut = next(i for i, (_, end) in enumerate(offsets) if end > parenthesis) + 1
        if first_token <= cut <= last_token:
            cuts.append(cut)
    return cuts


@torch.no_grad()
def guessed(model: MemorizingForCausalLM, ids: torch.Tensor, cut: int, window: int, twice: bool = False) -> int:
    """How many of the NEW_TOKENS tokens after `cut` the model predicts, each given the real text before it.

    The lead-in and the definition are read in one fresh local window (memory is read, never written): whatever
    the model knows of the definition beyond that window comes from memory. `twice`: the window holds the passage
    twice and the second copy is scored (the ceiling: the definition as if it were still in the local context).
    """
    span = ids[cut - LEAD_IN : cut + NEW_TOKENS]
    tokens = (torch.cat([span, span]) if twice else span)[None]
    cache = model.new_cache(window)
    logits = model(tokens, cache=cache, update_memory=False, logits_to_keep=0).logits
    return int((logits[0, -NEW_TOKENS - 1 : -1].argmax(-1) == tokens[0, -NEW_TOKENS:]).sum())


def greedy(model: MemorizingForCausalLM, prompt: torch.Tensor, settings: dict) -> torch.Tensor:
    """The greedy continuation of `prompt [T]`."""
    prompt = prompt[None]
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), **settings)[0, prompt.shape[1] :]


def matched(generated: torch.Tensor, truth: torch.Tensor) -> tuple[int, int]:
    """Tokens of `generated` equal to the real text: at the same position, and in order (the matching blocks of an
    alignment, so that one dropped or added token does not count every later token as wrong)."""
    n = min(len(generated), len(truth))
    blocks = difflib.SequenceMatcher(None, generated.tolist(), truth.tolist(), autojunk=False).get_matching_blocks()
    return int((generated[:n] == truth[:n]).sum()), sum(block.size for block in blocks)


def recall(
    model: MemorizingForCausalLM, tokenizer, ids: torch.Tensor, cuts: list[int], window: int, continued: int
) -> None:
    """Part 2: the definitions' tokens guessed with the document in memory and without; greedy continuations of the
    first `continued` of them."""
    settings = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "window": window, "update_memory": False}
    settings["pad_token_id"] = tokenizer.eos_token_id
    columns = ("memory", "empty", "in window")
    guesses = {}
    generated = {column: [] for column in columns}
    start_time = time.perf_counter()
    for column in columns:
        if column == "empty":
            model.reset_memory()
        guesses[column] = [guessed(model, ids, cut, window, twice=column == "in window") for cut in cuts]
        for cut in cuts[:continued]:  # in window: the lead-in and the definition read just before, memory empty
            before = ids[cut - LEAD_IN : cut + NEW_TOKENS] if column == "in window" else ids[:0]
            generated[column].append(greedy(model, torch.cat([before, ids[cut - LEAD_IN : cut]]), settings))
    seconds = time.perf_counter() - start_time
    print(f"\nRecall: {len(cuts)} functions defined early in the module. Each is given its {LEAD_IN}-token lead-in")
    print(f"and its first {NEW_TOKENS} tokens (signature, docstring) in a fresh {window}-token window; we count the")
    print("tokens the model guesses right, each from the real text before it. Its earlier reading of them lies outside")
    print("the window: with memory it can retrieve it, with empty memory it cannot. 'in window' is the ceiling: the")
    print("same passage read twice in one window (no memory), the second copy scored.")
    print(f"\n{'function':<28} {'read before end':>16}" + "".join(f"{column:>11}" for column in columns))
    names = [tokenizer.decode(ids[cut - 8 : cut]).rsplit("def ", 1)[-1].strip() for cut in cuts]
    for index, (name, cut) in enumerate(zip(names, cuts)):
        scores = "".join(f"{guesses[column][index]:>8}/{NEW_TOKENS}" for column in columns)
        print(f"{name:<28} {ids.numel() - cut:>9} tokens{scores}")
    total = len(cuts) * NEW_TOKENS
    print(f"{'all':<28} {'':>16}" + "".join(f"{sum(guesses[column]):>7}/{total}" for column in columns))

    print(f"\nGreedy continuations (no real text given) of {continued} of them, against the module's real text:")
    print("tokens equal at the same position / in order (one token dropped shifts every later position).")
    print(f"\n{'function':<28}" + "".join(f"{column:>13}" for column in columns))
    for index, cut in enumerate(cuts[:continued]):
        truth = ids[cut : cut + NEW_TOKENS]
        counts = [matched(generated[column][index], truth) for column in columns]
        print(f"{names[index]:<28}" + "".join(f"{same:>6} / {in_order:>3}" for same, in_order in counts))
    print(f"(recall and continuations: {seconds:.0f}s)")
    first = cuts[0]
    print(f"\nThe first one. The prompt ends: {tokenizer.decode(ids[first - 16 : first])!r}")
    print(f"\n--- the module's real text ---\n{tokenizer.decode(ids[first : first + NEW_TOKENS])}")
    labels = {
        "memory": "with the module in kNN memory",
        "empty": "same call, memory empty",
        "in window": "memory empty, the passage read just before in the window (the ceiling)",
    }
    for column, label in labels.items():
        same, in_order = matched(generated[column][0], ids[first : first + NEW_TOKENS])
        print(f"\n--- {label}: {same}/{NEW_TOKENS} tokens equal, {in_order}/{NEW_TOKENS} in order ---")
        print(tokenizer.decode(generated[column][0]))


def window_tail(ids: list[int], sinks: int, window: int) -> list[int]:
    """What local attention alone sees of a prompt: its first `sinks` tokens (attention sinks) and its last `window`."""
    return ids[:sinks] + ids[-window:] if len(ids) > sinks + window else ids


def passkey(model: MemorizingForCausalLM, base, tokenizer, length: int, depth: float, window: int) -> None:
    """Part 3: the passkey, answered with a fresh memory and by the base model on its last `window` tokens."""
    prompt = passkey_prompt(tokenizer, length, depth, seed=length)
    ids = torch.tensor([prompt.ids])
    settings = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": tokenizer.eos_token_id}
    print(f"\nPasskey: key {prompt.key} hidden {prompt.distance()} tokens before the end of {ids.shape[1]} tokens")
    start_time = time.perf_counter()
    mask = torch.ones_like(ids)
    answer = model.generate(ids, attention_mask=mask, window=window, memory=model.new_memory(), **settings)
    memory_answer, memory_seconds = tokenizer.decode(answer[0, ids.shape[1] :]), time.perf_counter() - start_time
    tail = torch.tensor([window_tail(prompt.ids, 1, window - 1)])  # a sink and the window's last tokens
    answer = base.generate(tail, attention_mask=torch.ones_like(tail), **settings)
    window_answer = tokenizer.decode(answer[0, tail.shape[1] :])
    answers = ((f"with memory ({memory_seconds:.0f}s)", memory_answer), (f"{window}-token window", window_answer))
    for label, text in answers:
        verdict = "right" if found(text, prompt.key) else "wrong"
        print(f"  {label:<28} {text.strip()!r:<40} {verdict}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", default="typing", help="CPython standard-library module to read")
    parser.add_argument("--tokens", type=int, default=12288, help="how many tokens of it to read")
    parser.add_argument("--segment", type=int, default=512, help="segment length (local context)")
    parser.add_argument("--memory-adapter", default=ADAPTER, help="a packaged name or a folder; none: zero-shot")
    parser.add_argument("--layers", type=parse_layers, help="memory layers (default: the adapter's, or 16-24)")
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--memory-score-bias", type=float, default=0.0, help="joint mode's bias on retrieved scores")
    parser.add_argument(
        "--memory-sharpness", type=float, default=2.0, help="joint mode's spread of retrieved scores (1: off)"
    )
    parser.add_argument("--continued", type=int, default=1, help="definitions continued greedily (of 8)")
    parser.add_argument("--passkey-tokens", type=int, default=32768, help="passkey prompt length (0: no passkey)")
    parser.add_argument("--passkey-depth", type=float, default=0.1, help="where the key is hidden (0: start, 1: end)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    adapter = None if args.memory_adapter == "none" else args.memory_adapter
    layers = args.layers or (None if adapter else parse_layers("16-24"))
    model = MemorizingForCausalLM.from_base_pretrained(
        base,
        memory_adapter=adapter,
        combine="joint",
        memory_size=65536,
        memory_top_k=args.top_k,
        memory_score_bias=args.memory_score_bias,
        memory_sharpness=args.memory_sharpness,
        xl_cache=True,  # the paper's local context: the previous segment's keys and values, then the segment's own
        **({"memory_layers": layers} if layers else {}),
    )
    source = stdlib_path(args.module)
    text = source.read_text(encoding="utf-8")
    encoding = tokenizer(text, return_offsets_mapping=True)
    ids = torch.tensor(encoding["input_ids"][: args.tokens])
    layers = model.config.memory_layers
    print(f"SmolLM2-135M reads {source} ({ids.numel()} tokens) in {args.segment}-token segments;")
    print(
        f"memory: joint mode, layers {layers[0]}-{layers[-1]}, top-{args.top_k}, sharpness {args.memory_sharpness:g}, "
        "sinks never stored,"
    )
    print(
        f"memory adapter {adapter!r} (per-head weights of retrieved entries, trained on other documents)"
        if adapter
        else "no memory adapter (zero-shot)"
    )

    perplexities(model, ids, args.segment)
    cuts = definition_cuts(text, encoding["offset_mapping"], LEAD_IN, ids.numel() // 2)[:RECALLED]
    if not cuts:
        print(f"\n(no top-level function with a docstring in the first half of {source.name}: recall skipped)")
        return
    recall(model, tokenizer, ids, cuts, window=args.segment, continued=max(args.continued, 1))
    if args.passkey_tokens:
        passkey(model, base, tokenizer, args.passkey_tokens, args.passkey_depth, window=2 * args.segment)


if __name__ == "__main__":
    main()
