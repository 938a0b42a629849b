"""Train a memory adapter: one memory bias per query head of joint mode, learned for recall from far back.

    python training/memory_adapter.py                                  # SmolLM2-135M, layers 16-24, ~1 hour
    python training/memory_adapter.py --steps 8 --out /tmp/adapter     # a smoke run
    python training/memory_adapter.py --layers 8-24 --memory-sharpness 2 --out runs/adapter_8_24   # another band

Why a bias per head: in the passkey misses, the key's entries were retrieved by the right heads but got too little
attention mass against the local window; one global `memory_score_bias` of +1 fixes 8K passkeys but raises
perplexity on every head (docs/results.md, section 4). Here each query head learns its own shift of retrieved
scores, and nothing else changes (81 numbers on 9 layers).

Each step is one example on a real document of the training split (CPython standard library, Austen), never one of
the modules the demo and the long-context suite report on (`HELD_OUT_MODULES`):

1. facts: two or three sentences "the <thing> of <name> is <number>" (templates unlike the passkey prompt's)
   planted at random depths, asked at the end;
2. copy (code only): the 64 tokens before a function's `def name(`, read >= 1,500 tokens earlier, then its next
   48 tokens (the demo's recall part asks the same after a 48-token lead-in).

The document is streamed through a local window (512 or 1024 tokens, as `generate` reads a prompt) without gradient;
then its last 256 tokens and the questions are read in one chunk with gradient. The loss is the cross-entropy of the
answers plus the language-model loss of those last document tokens, so that a bias cannot buy recall with
perplexity. The result is saved with `save_memory_adapter` (about 1 KB) and loaded by name:
`MemorizingForCausalLM.from_base_pretrained(base, memory_adapter=<folder>)`.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from memorizing_hf import MemorizingForCausalLM
from memorizing_hf.cli import parse_layers

from .corpora import load_split
from .long_context import DEFAULTS as SUITE
from .sources import smollm2_path

HELD_OUT_MODULES = set(SUITE["modules"])  # the demo reads typing; the suite's definitions start here
MEMORY = {"memory_layers": list(range(16, 25)), "combine": "joint", "memory_size": 65536, "memory_top_k": 32}
LM_TAIL = 256  # document tokens read with gradient before the questions
MIN_DISTANCE = 1500  # tokens between a copied definition and the end of the document
LEAD_IN, NEW_TOKENS = 64, 48  # tokens before `def name(`, and after it
TEMPLATES = (
    ("The {thing} of {name} is {value}.", "What is the {thing} of {name}? The {thing} of {name} is"),
    ("Note: {name} has {thing} {value}.", "Which {thing} does {name} have? {name} has {thing}"),
    ("Remember this: {name}'s {thing} = {value}", "Question: {name}'s {thing}? Answer: {name}'s {thing} ="),
)
THINGS = ("access code", "room number", "ticket number", "secret number", "serial number", "order number")
NAMES = (
    "Alice", "Bruno", "Chiara", "Dmitri", "Esther", "Farid", "Greta", "Hiroshi", "Ines", "Jonas", "Kemal", "Lena",
    "Marta", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Stefan", "Tariq", "Ursula", "Viktor", "Wanda", "Yusuf",
)  # fmt: skip


def training_documents(tokenizer, min_tokens: int) -> list[tuple[str, list[int], list[tuple[int, int]], str]]:
    """(name, token ids, offsets, text) of the training documents long enough for an example."""
    documents = []
    for source in ("stdlib", "austen"):
        split = load_split(source, "train")
        for name, text in zip(split["name"], split["text"]):
            if Path(name).stem in HELD_OUT_MODULES:
                continue
            encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            if len(encoding["input_ids"]) >= min_tokens:
                documents.append((name, encoding["input_ids"], encoding["offset_mapping"], text))
    return documents


def plant_facts(
    tokenizer, ids: list[int], rng: random.Random, keep: tuple[int, int] = (0, 0)
) -> tuple[list[int], list[tuple[list[int], list[int]]]]:
    """`ids` with facts planted at random depths (at least MIN_DISTANCE tokens before the end, never inside the span
    `keep`: one that falls there goes just before it), and (question, answer) token ids for each."""
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    facts = []
    for _ in range(rng.randint(2, 3)):
        statement, question = rng.choice(TEMPLATES)
        fields = {"thing": rng.choice(THINGS), "name": rng.choice(NAMES), "value": str(rng.randint(100, 99999))}
        at = rng.randint(0, len(ids) - MIN_DISTANCE)
        facts.append((keep[0] if keep[0] < at < keep[1] else at, statement.format(**fields), question, fields))
    planted, qa, last = [], [], 0
    for at, statement, question, fields in sorted(facts, key=lambda fact: fact[0]):
        planted += ids[last:at] + encode(f"\n{statement}\n")
        last = at
        qa.append((encode("\n\n" + question.format(**fields)), encode(" " + fields["value"] + ".")))
    rng.shuffle(qa)
    return planted + ids[last:], qa


def copy_question(ids: list[int], offsets, text: str, rng: random.Random) -> tuple[int, int] | None:
    """Where the lead-in and `def name(` of a function at least MIN_DISTANCE tokens before the end start, and where
    `def name(` ends (the question; the answer is the next NEW_TOKENS tokens)."""
    cuts = []
    for match in re.finditer(r"^\s*def \w+\(", text, flags=re.MULTILINE):
        cut = next((i for i, (_, end) in enumerate(offsets) if end >= match.end()), None)
        if cut is not None and LEAD_IN <= cut and cut + NEW_TOKENS <= len(ids) - MIN_DISTANCE:
            cuts.append(cut + 1)
    if not cuts:
        return None
    cut = rng.choice(cuts)
    return cut - LEAD_IN, cut


def example(tokenizer, document, length: int, rng: random.Random) -> tuple[list[int], list[int], list[int]]:
    """(document ids, chunk ids, chunk labels): the document up to its last LM_TAIL tokens, then those tokens and
    the questions with their answers; labels are -100 except on the answers and the tail."""
    _, ids, offsets, text = document
    start = rng.randint(0, len(ids) - length)
    ids, offsets = ids[start : start + length], offsets[start : start + length]
    first = offsets[0][0]
    copy = copy_question(ids, [(a - first, b - first) for a, b in offsets], text[first : offsets[-1][1]], rng)
    questions = [(ids[copy[0] : copy[1]], ids[copy[1] : copy[1] + NEW_TOKENS])] if copy else []
    ids, facts = plant_facts(tokenizer, ids, rng, keep=(copy[0], copy[1] + NEW_TOKENS) if copy else (0, 0))
    questions = questions + facts
    rng.shuffle(questions)
    chunk, labels = ids[-LM_TAIL:], ids[-LM_TAIL:]
    for question, answer in questions:
        chunk, labels = chunk + question + answer, labels + [-100] * len(question) + answer
    return ids[:-LM_TAIL], chunk, labels


def step_loss(model, prefix: list[int], chunk: list[int], labels: list[int], window: int) -> tuple[torch.Tensor, ...]:
    """Stream `prefix` through a fresh memory without gradient, then read `chunk` with it: (loss, answer loss,
    tail loss, answer tokens right)."""
    memory = model.new_memory()
    cache = model.new_cache(window, memory=memory)
    with torch.no_grad():
        model(torch.tensor([prefix]), cache=cache, update_memory=False, logits_to_keep=1)
    logits = model(torch.tensor([chunk]), cache=cache, update_memory=False).logits[0, :-1]
    targets = torch.tensor(labels[1:])
    tail, answers = targets.clone(), targets.clone()
    tail[LM_TAIL - 1 :] = -100
    answers[: LM_TAIL - 1] = -100
    answer_loss = F.cross_entropy(logits, answers, ignore_index=-100)
    tail_loss = F.cross_entropy(logits, tail, ignore_index=-100)
    right = ((logits.argmax(-1) == answers) & (answers >= 0)).sum()
    return answer_loss + tail_loss, answer_loss.detach(), tail_loss.detach(), right, (answers >= 0).sum()


def memory_settings(args: argparse.Namespace) -> dict:
    """The memory the adapter is trained for: `MEMORY` with the command line's band and sharpness (saved with it)."""
    return {**MEMORY, "memory_layers": args.layers, "memory_sharpness": args.memory_sharpness}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The training run's command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=parse_layers, default=MEMORY["memory_layers"], help="memory layers: 8-24")
    parser.add_argument("--memory-sharpness", type=float, default=1.0, help="joint mode's spread of retrieved scores")
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--min-tokens", type=int, default=2048, help="document length: at least")
    parser.add_argument("--max-tokens", type=int, default=6144, help="document length: at most")
    parser.add_argument("--out", type=Path, default=Path("runs/memory_adapter"))
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    base = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)
    model = MemorizingForCausalLM.from_base_pretrained(base, **memory_settings(args)).eval()  # eval: no dropout
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.endswith("memory_bias"))
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=args.lr)
    documents = training_documents(tokenizer, args.min_tokens)
    print(f"{len(documents)} training documents; {sum(p.numel() for p in trainable)} memory biases trained")

    args.out.mkdir(parents=True, exist_ok=True)
    log, started = [], time.perf_counter()
    for step in range(args.steps):
        document = rng.choice(documents)
        length = rng.randint(args.min_tokens, min(args.max_tokens, len(document[1])))
        prefix, chunk, labels = example(tokenizer, document, length, rng)
        window = rng.choice((512, 1024))
        loss, answer_loss, tail_loss, right, total = step_loss(model, prefix, chunk, labels, window)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        biases = torch.cat([p.detach() for p in trainable])
        log.append(
            {
                "step": step,
                "document": Path(document[0]).name,
                "tokens": len(prefix) + len(chunk),
                "window": window,
                "answer_loss": answer_loss.item(),
                "tail_loss": tail_loss.item(),
                "answers_right": f"{int(right)}/{int(total)}",
                "bias_mean": biases.mean().item(),
                "bias_max": biases.max().item(),
                "seconds": time.perf_counter() - started,
            }
        )
        print(json.dumps(log[-1]), flush=True)
        if (step + 1) % 20 == 0 or step + 1 == args.steps:
            model.save_memory_adapter(args.out)
            (args.out / "training_log.json").write_text(json.dumps(log, indent=1))
    print(f"done in {time.perf_counter() - started:.0f} s: {args.out}")


if __name__ == "__main__":
    main()
