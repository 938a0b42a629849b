"""Per-token generation latency of SmolLM2-135M with 0, 8K, 65K and 262K tokens in kNN memory, vs. the base model.

Greedy decoding, batch 1, fp32, a 64-token prompt and 64 new tokens (inside the local window, so the figure is the
steady cost of one decoding step: the local attention plus retrieval from memory in every memory layer). The memory
is filled by writing random keys and values straight into every memory layer's store (reading 262K tokens would take
an hour here); exact retrieval does the same work whatever the keys are. The base model (plain `LlamaForCausalLM`,
sdpa, no memory layers) runs right before every memory setting and size, and each measurement is compared with that
run ("vs base": the median over rounds of the two runs' ratio of median step times), so a drift of the machine's load
hits both sides of a ratio alike; "vs empty" compares each size with the same setting's empty memory in the same round
(the issue's target). ms / token are medians over all decoding steps of all rounds. Two
memory settings: one layer at 3/4 depth (the paper's choice, the config default) and layers 16-24 (the zero-shot
demo's).

    python benchmarks/bench_generation.py [--sizes 0 8192 65536 262144] [--repeats 5] [--threads 1] [--out ...]

Prints a table and writes JSON (default `benchmarks/results/generation.json`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

from memorizing_experiments.sources import smollm2_path, stdlib_path
from memorizing_hf import MemorizingForCausalLM, retrieval

SETTINGS = {"1 layer (21)": [21], "9 layers (16-24)": list(range(16, 25))}
PROMPT_TOKENS, NEW_TOKENS = 64, 64


class StepClock(LogitsProcessor):
    """Records the time of every decoding step (generate calls it once per new token)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.stamps.append(time.perf_counter())
        return scores


def step_times(model: torch.nn.Module, prompt: torch.Tensor, **kwargs: object) -> list[float]:
    """Seconds per new token after the first (the first step includes reading the prompt)."""
    clock = StepClock()
    model.generate(
        prompt,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        logits_processor=LogitsProcessorList([clock]),
        **kwargs,
    )
    return [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]


@torch.no_grad()
def fill_memory(model: MemorizingForCausalLM, entries: int, chunk: int = 8192) -> None:
    """Add random entries to every memory layer until each holds `entries` (row 0)."""
    generator = torch.Generator().manual_seed(entries)
    for memory in model.memory.layers.values():
        held = int(memory.lengths[0]) if memory.num_rows else 0
        while held < entries:
            count = min(chunk, entries - held)
            keys = torch.randn(1, memory.num_heads, count, memory.head_dim, generator=generator)
            values = torch.randn(1, memory.num_heads, count, memory.head_dim, generator=generator)
            memory.write(keys, values, torch.ones(1, count, dtype=torch.bool), torch.arange(count).unsqueeze(0))
            held += count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[0, 8192, 65536, 262144])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids OpenMP contention)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "generation.json"))
    parser.add_argument(
        "--keys-major", choices=["auto", "yes", "no"], default="auto", help="decoding matmul order (auto: timed)"
    )
    args = parser.parse_args(argv)
    retrieval.KEYS_MAJOR = {"auto": None, "yes": True, "no": False}[args.keys_major]
    sizes = sorted(args.sizes)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = stdlib_path("typing").read_text(encoding="utf-8")
    prompt = tokenizer(text, return_tensors="pt").input_ids[:, :PROMPT_TOKENS]
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    models = {
        name: MemorizingForCausalLM.from_base_pretrained(
            AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(),
            memory_layers=layers,
            memory_size=max(max(sizes), 32),
            combine="joint",
        )
        for name, layers in SETTINGS.items()
    }
    info = {
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "load_average_before": list(os.getloadavg()),
        "prompt_tokens": PROMPT_TOKENS,
        "new_tokens": NEW_TOKENS,
        "repeats": args.repeats,
        "memory": "random keys/values, fp32, exact retrieval, top-32, joint",
        "keys_major": args.keys_major,
        "keys_major_is_faster": retrieval.keys_major_is_faster(),
    }

    times: dict[str, list[float]] = {"base": []}
    vs_base: dict[str, list[float]] = {}  # per round: median step / median step of the base run right before it
    vs_empty: dict[str, list[float]] = {}  # per round: median step / the same setting's median with empty memory
    for round_ in range(args.repeats + 1):  # round 0 warms up
        for name, model in models.items():
            model.reset_memory()
            empty = None
            for size in sizes:
                fill_memory(model, size)
                kept_base = step_times(base, prompt)  # right before each measurement: drifts hit both alike
                kept = step_times(model, prompt, update_memory=False)
                empty = statistics.median(kept) if size == 0 else empty
                if round_:
                    key = f"{name} / {size}"
                    times["base"] += kept_base
                    times.setdefault(key, []).extend(kept)
                    vs_base.setdefault(key, []).append(statistics.median(kept) / statistics.median(kept_base))
                    if empty is not None:
                        vs_empty.setdefault(key, []).append(statistics.median(kept) / empty)
        print(f"round {round_}/{args.repeats} done", file=sys.stderr, flush=True)
    info["load_average_after"] = list(os.getloadavg())

    rows = [{"setting": "base model, no memory layers", "memory_tokens": None,
             "median_ms": 1000 * statistics.median(times["base"]), "ratio": 1.0, "vs_empty": None}]  # fmt: skip
    for name in models:
        for size in sizes:
            key = f"{name} / {size}"
            rows.append({
                "setting": name, "memory_tokens": size, "median_ms": 1000 * statistics.median(times[key]),
                "ratio": statistics.median(vs_base[key]),
                "vs_empty": statistics.median(vs_empty[key]) if key in vs_empty else None,
            })  # fmt: skip
    print(f"\n{'setting':<30} {'memory':>8} {'ms/token':>9} {'vs base':>8} {'vs empty':>9}")
    for row in rows:
        memory = "–" if row["memory_tokens"] is None else f"{row['memory_tokens']:,}"
        empty = "" if row["vs_empty"] is None else f"{row['vs_empty']:.2f}x"
        print(f"{row['setting']:<30} {memory:>8} {row['median_ms']:>9.1f} {row['ratio']:>7.2f}x {empty:>9}")
    print(f"\nload average before/after: {info['load_average_before']} / {info['load_average_after']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"info": info, "results": rows, "step_times_s": times}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
