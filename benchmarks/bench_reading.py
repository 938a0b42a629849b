"""Reading (prefill) throughput of SmolLM2-135M with a kNN memory of N entries, beside the base model in the same run.

What is timed: one call `model(segment, memory=..., update_memory=True, use_cache=False)` under `torch.no_grad()`
on a 512-token segment of real text (the CPython standard library, `typing.py` first), batch 1, fp32, logits of all
512 tokens, while every memory layer's memory holds N entries, for N in `--sizes`, memory layers `--layers` ("1": layer
21, the config default of 3/4 depth; "9": layers 16-24, the zero-shot demo's), `--combine` (joint, gate) and
`--backends` (exact; pages = `retrieval="pages"` with `page_budget=--page-budget`). Top-32 retrieval, no XL cache,
memory capacity max(N). Two baselines, plain `LlamaForCausalLM` (sdpa, no memory layers, a model of its own):

* window: the previous 512 tokens and the segment (1,024 tokens), logits of the segment's 512 (`logits_to_keep`):
  the cost of giving the segment the same local context by recomputing it, the no-memory alternative;
* bare: the segment alone.

Filling the memory. Reading 131K tokens through the model is far too slow on this CPU, so:

1. the first `--fill-tokens` (8,192) tokens of the text are read once, segment by segment (`update_memory=True`,
   exact retrieval), by each (layers, combine) setting into a memory of its own; that memory is cached under
   `~/.cache/memorizing_hf/bench_reading/` (`MemoryBank.save` / `load`; `--no-cache` to skip);
2. for every N and configuration, a memory of its own (its own backend) gets N - w entries per layer (w = the entries
   one segment writes, 511) through the public write path, `KNNMemory.write`: the storage is first allocated for
   N + 512 slots (at most the capacity) by loading an empty state (`MemoryBank.load_state_dict`, the layout of
   `state_dict()`), so that no timed call grows it (growth happens once per doubling while reading, an amortised cost
   left out here); then the real entries of step 1 are written oldest first, one segment's worth at a time, each
   after a search (`KNNMemory.search`), as reading does, so that the page backend trains its lists where reading
   would (its first search with 39 entries per list: about 5K entries, 128 lists, inside the 8K fill); then, as
   far as N needs, copies of those real entries (in order, over and over), each copy's numbers multiplied by
   (1 + `--noise` * randn) independently, so that no two entries are exact duplicates (ties change the exact
   search's cost); gate-mode keys are normalised again, as stored keys are;
3. the 512 tokens after the fill text are read into it (`update_memory=True`, the configuration's own backend): the
   memory now holds exactly N entries and is in the steady state of reading (the previous segment was just
   written). N = 0: an empty memory, nothing read before.

Then the next 512 tokens are the timed segment: fresh text, so retrieval queries are real. Every timed call starts
from the same memory: a `copy.deepcopy` of the state of step 3, made before the call, outside the timer (a deep copy
keeps the page backend's trained lists; `MemoryBank.copy()` rebuilds indexes, so the first search after it would
train the lists again inside the timer). The timed call writes its segment (`update_memory=True`), as reading does.
At N = capacity that write overwrites the oldest entries (a full FIFO memory). A page backend that holds fewer than
39 entries per list when it first searches searches exactly (at N = 1024, `--quick`).

Interleaving: one group per N; within a group every configuration and both baselines are timed once per round, in
an order rotated every round, for `--warmup` + `--reps` rounds. Reported: median seconds per segment, tokens/s, and
per-round ratios (configuration time / baseline time of the same round), their median. Peak memory is the group's
ready states plus one copy: ~11 GB at N = 131,072 with the defaults (1.8 GB per 9-layer state); split a run with
`--layers` / `--sizes` where that is too much.

    python benchmarks/bench_reading.py [--sizes 0 8192 32768 131072] [--layers 1 9] [--combine joint gate]
        [--backends exact pages] [--page-budget 0.05] [--reps 5] [--warmup 1] [--threads 1]
    python benchmarks/bench_reading.py --quick       # N in {0, 1024}, 1 layer, joint, exact, 2 reps, no warm-up
    python benchmarks/bench_reading.py --markdown benchmarks/results/reading.json
    python benchmarks/bench_reading.py --layers 9 --combine joint --backends exact --sizes 32768 --profile

`--profile`: after the timed rounds, one more call per configuration under cProfile, and the seconds of its parts
(`PROFILED`: the search's two passes, its dense re-search, the joint softmax, memory writes) with the call's total,
kept in the JSON (`profile_s`) and printed; profiled seconds run a little slower than timed ones.

Writes `benchmarks/results/reading.json` (`--quick`: `reading_quick.json`) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import gc
import hashlib
import inspect
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from memorizing_experiments.benchmarks import reading_markdown, write_results
from memorizing_experiments.sources import cache_dir, smollm2_path, stdlib_files, stdlib_path
from memorizing_hf import MemorizingForCausalLM, modeling_memorizing, retrieval
from memorizing_hf.memory import KNNMemory, MemoryBank

SEGMENT = 512  # tokens per segment read
TOP_K = 32
LAYER_PRESETS = {"1": [21], "9": list(range(16, 25))}
LAYER_LABELS = {"1": "1 (21)", "9": "9 (16-24)"}
RESULTS = Path(__file__).parent / "results"
PROFILED = {  # label -> the function whose cumulative time `--profile` reports
    "search": retrieval.exact_topk,
    "pass 1": retrieval._pass1_bound,
    "pass 2": retrieval.score_groups,
    "pass 2 top-k": retrieval.top_k_per_query,
    "dense re-search": retrieval.redo_dense,
    "joint softmax": modeling_memorizing.KNNAttention._joint,
    "memory writes": MemoryBank.write,
}


@dataclass
class Setting:
    """One timed configuration: a memorizing model (sharing the base weights) and its memory layers / mode / backend."""

    layers: str
    combine: str
    backend: str
    model: MemorizingForCausalLM

    @property
    def name(self) -> str:
        return f"{LAYER_LABELS[self.layers]} | {self.combine} | {self.backend}"


@dataclass
class Row:
    """The times of one configuration (or baseline) in one group, one per round."""

    label: dict[str, object]
    times_s: list[float] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------------ text
def text_tokens(tokenizer: transformers.PreTrainedTokenizerBase, count: int) -> tuple[torch.Tensor, list[str]]:
    """The first `count` token ids `[1, count]` of the standard library read as one text (`typing.py` first, then the
    other files in order), and the files used."""
    first = stdlib_path("typing")
    ids: list[int] = []
    used: list[str] = []
    for path in [first, *(p for p in stdlib_files() if p != first)]:
        ids += tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False, verbose=False).input_ids
        used.append(path.name)
        if len(ids) >= count:
            return torch.tensor([ids[:count]]), used
    raise RuntimeError(f"the standard library holds fewer than {count} tokens")


# ------------------------------------------------------------------------------------------------------ memory
@torch.no_grad()
def read(model: PreTrainedModel, ids: torch.Tensor, memory: MemoryBank | None = None, **kwargs: object) -> float:
    """Seconds of one forward call of `model` on `ids` (memorizing: reading into `memory`, written after reading)."""
    if memory is not None:
        kwargs.update(memory=memory, update_memory=True)
    start = time.perf_counter()
    model(ids, use_cache=False, **kwargs)
    return time.perf_counter() - start


def fill_memory(model: MemorizingForCausalLM, layers: str, fill: torch.Tensor, use_cache: bool) -> MemoryBank:
    """The memory after `model` (exact retrieval) read `fill` segment by segment (cached on disk: the same model,
    text, layers, combine and capacity give the same memory)."""
    memory = model.new_memory()
    combine = model.config.combine
    key = json.dumps(
        [model.config.text_config.name_or_path.rsplit("/", 1)[-1], layers, combine, model.config.memory_size,
         SEGMENT, hashlib.sha256(fill.numpy().tobytes()).hexdigest()]
    )  # fmt: skip
    path = cache_dir() / "bench_reading" / f"fill_{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
    if use_cache and path.is_file():
        memory.load(path)
        print(f"  fill {layers} layer(s), {combine}: loaded {path}", flush=True)
        return memory
    start = time.perf_counter()
    for t0 in range(0, fill.shape[1], SEGMENT):
        read(model, fill[:, t0 : t0 + SEGMENT], memory)
    print(
        f"  fill {layers} layer(s), {combine}: read {fill.shape[1]} tokens in {time.perf_counter() - start:.0f} s",
        flush=True,
    )
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + f".{os.getpid()}.tmp")
        memory.save(partial)
        partial.rename(path)
    return memory


def tiled(fill: KNNMemory, entries: int, noise: float, normalize: bool, seed: int) -> tuple[torch.Tensor, ...]:
    """Keys and values `[1, H, entries, D]`: the real entries of `fill` (oldest first), repeated as often as needed,
    every repeated copy's numbers multiplied by (1 + noise * randn); the copies' keys normalised again if `normalize`
    (gate mode stores unit keys)."""
    order = fill.in_order(0)
    index = order[torch.arange(entries) % len(order)]
    real = min(entries, len(order))
    generator = torch.Generator().manual_seed(seed)
    out = []
    for tensor in (fill.state_tensors()["keys"], fill.state_tensors()["values"]):
        x = tensor[:, :, index].clone()
        copies = x[:, :, real:]
        copies *= 1 + noise * torch.randn(copies.shape, generator=generator, dtype=x.dtype)
        out.append(x)
    if normalize:
        out[0][:, :, real:] = F.normalize(out[0][:, :, real:], dim=-1)
    return tuple(out)


def ready_memory(
    setting: Setting, fill: MemoryBank, n: int, previous: torch.Tensor, noise: float
) -> tuple[MemoryBank, int]:
    """The memory of `setting` right before the timed segment, holding `n` entries per layer (steps 2-3 of the module
    docstring), and the entries it holds."""
    memory = setting.model.new_memory()
    if n == 0:
        return memory, 0
    config = setting.model.config
    never = torch.tensor(config.never_store_token_ids, dtype=torch.long)
    per_segment = SEGMENT - config.sink_tokens - int(torch.isin(previous[0, config.sink_tokens :], never).sum())
    entries = n - per_segment  # then `previous` writes the rest
    slots = min(config.memory_size, n + SEGMENT)  # no timed call grows the storage
    # An empty memory with its storage allocated (the public state-dict layout): then every entry goes through
    # KNNMemory.write, as in reading, so that the retrieval backend sees the writes that reading makes.
    state = {"geometry": memory.state_dict()["geometry"], "tokens_seen": torch.tensor([entries])}
    for layer, store in memory.layers.items():
        state[f"layer.{layer}.keys"] = torch.zeros(1, store.num_heads, slots, store.head_dim)
        state[f"layer.{layer}.values"] = torch.zeros(1, store.num_heads, slots, store.head_dim)
        state[f"layer.{layer}.positions"] = torch.full((1, slots), -1, dtype=torch.long)
        state[f"layer.{layer}.written"] = torch.tensor([0])
    memory.load_state_dict(state)
    for layer, store in memory.layers.items():
        source = fill.layers[layer]
        keys, values = tiled(source, entries, noise, config.combine == "gate", seed=n * 1000 + layer)
        real = min(entries, int(source.lengths[0]))
        start = 0
        while start < entries:
            if start < real:  # the real entries segment by segment, each after a search, as reading does them:
                size = min(per_segment, real - start)  # the page backend trains its lists where reading would
                store.search(keys[:, :, start : start + 1], config.memory_top_k)
            else:
                size = min(16384, entries - start)
            stop = start + size
            store.write(keys[:, :, start:stop], values[:, :, start:stop], torch.ones(1, size, dtype=torch.bool),
                        torch.arange(start, stop).unsqueeze(0))  # fmt: skip
            start = stop
    read(setting.model, previous, memory)
    held = memory.entries()
    counts = {count for per_row in held.values() for count in per_row}
    if counts != {n}:
        raise RuntimeError(f"{setting.name}: the memory holds {held} entries per layer, not {n}")
    return memory, n


# ------------------------------------------------------------------------------------------------------ timing
def measure_group(
    n: int,
    settings: list[Setting],
    fills: dict[tuple[str, str], MemoryBank],
    base: PreTrainedModel,
    tokens: torch.Tensor,
    args: argparse.Namespace,
) -> dict:
    """Time every setting with `n` entries in memory and both baselines, interleaved round by round."""
    previous, segment = tokens[:, -2 * SEGMENT : -SEGMENT], tokens[:, -SEGMENT:]
    window = tokens[:, -2 * SEGMENT :]
    row_info: dict = {"n": n, "load_average_before": os.getloadavg()}
    calls: list[tuple[Row, Callable[[], float]]] = []
    base_label = {"layers": "none (base model)", "backend": "–", "n": n}
    bare = Row({**base_label, "combine": f"bare {SEGMENT}"})
    windowed = Row({**base_label, "combine": f"window {SEGMENT}+{SEGMENT}"})
    calls.append((bare, lambda: read(base, segment)))
    calls.append((windowed, lambda: read(base, window, logits_to_keep=SEGMENT)))
    for setting in settings:
        if n == 0 and setting.backend != settings[0].backend:
            continue  # nothing to search: every backend does the same
        start = time.perf_counter()
        memory, held = ready_memory(setting, fills[setting.layers, setting.combine], n, previous, args.noise)
        print(f"  N={n} {setting.name}: memory ready in {time.perf_counter() - start:.1f} s", flush=True)
        backend = setting.backend if n else "– (empty)"
        row = Row({"layers": LAYER_LABELS[setting.layers], "combine": setting.combine, "backend": backend, "n": n,
                   "entries_at_read": held})  # fmt: skip
        calls.append((row, _timed_copy(setting.model, segment, memory)))
    for round_ in range(args.warmup + args.reps):
        shift = round_ % len(calls)
        for row, call in calls[shift:] + calls[:shift]:
            seconds = call()
            if round_ >= args.warmup:
                row.times_s.append(seconds)
        print(f"  N={n} round {round_ + 1}/{args.warmup + args.reps}: load {os.getloadavg()[0]:.1f}", flush=True)
    row_info["load_average_after"] = os.getloadavg()
    row_info["rows"] = [_summary(row, bare, windowed) for row, _ in calls]
    if args.profile:
        for summary, (row, call) in zip(row_info["rows"], calls):
            if "entries_at_read" in row.label:
                summary["profile_s"] = _profiled(call)
                print(f"  N={n} {row.label['layers']} {row.label['combine']}: {summary['profile_s']}", flush=True)
    return row_info


def _profiled(call: Callable[[], float]) -> dict[str, float]:
    """Seconds of `call` (total) and of each of its `PROFILED` parts, from one run under cProfile."""
    profile = cProfile.Profile()
    total = profile.runcall(call)
    stats = profile.getstats()
    codes = {label: inspect.unwrap(function).__code__ for label, function in PROFILED.items()}  # under no_grad
    out = {"total": total}
    for label, code in codes.items():
        out[label] = sum(entry.totaltime for entry in stats if entry.code is code)
    return out


def _timed_copy(model: MemorizingForCausalLM, segment: torch.Tensor, memory: MemoryBank) -> Callable[[], float]:
    """A call that reads `segment` into a fresh deep copy of `memory` (copied and freed outside the timer)."""

    def call() -> float:
        own = copy.deepcopy(memory)
        gc.collect()
        seconds = read(model, segment, own)
        del own
        return seconds

    return call


def _summary(row: Row, bare: Row, windowed: Row) -> dict:
    median = statistics.median(row.times_s)
    return {
        **row.label,
        "times_s": row.times_s,
        "median_s": median,
        "tokens_per_s": SEGMENT / median,
        "x_window": statistics.median(t / w for t, w in zip(row.times_s, windowed.times_s)),
        "x_bare": statistics.median(t / b for t, b in zip(row.times_s, bare.times_s)),
    }


# ------------------------------------------------------------------------------------------------------ output
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[0, 8192, 32768, 131072])
    parser.add_argument("--layers", nargs="+", choices=sorted(LAYER_PRESETS), default=["1", "9"])
    parser.add_argument("--combine", nargs="+", choices=["joint", "gate"], default=["joint", "gate"])
    parser.add_argument("--backends", nargs="+", choices=["exact", "pages"], default=["exact", "pages"])
    parser.add_argument("--page-budget", type=float, default=0.05, help="share of lists a query visits (pages)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds per N")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--fill-tokens", type=int, default=8192, help="real text read into memory before tiling")
    parser.add_argument("--noise", type=float, default=1e-2, help="relative noise of tiled copies")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the cached fill memories")
    parser.add_argument("--quick", action="store_true", help="N in {0, 1024}, 1 layer, joint, exact, 2 reps")
    parser.add_argument("--profile", action="store_true", help="also profile one call per configuration by part")
    parser.add_argument("--out", help="results file (default benchmarks/results/reading.json, or reading_quick.json)")
    parser.add_argument("--markdown", help="print the table of an existing results file and exit")
    args = parser.parse_args(argv)
    if args.markdown:
        print(reading_markdown(json.loads(Path(args.markdown).read_text())))
        return
    if args.quick:
        args.sizes, args.layers, args.combine, args.backends = [0, 1024], ["1"], ["joint"], ["exact"]
        args.reps, args.warmup, args.fill_tokens = 2, 0, 1024
    if any(0 < n < SEGMENT for n in args.sizes):
        parser.error(f"sizes are 0 or at least {SEGMENT} (the memory reads one segment before the timed one)")
    if args.fill_tokens % SEGMENT or args.fill_tokens <= 0:
        parser.error(f"--fill-tokens must be a positive multiple of {SEGMENT}")
    out = Path(args.out) if args.out else RESULTS / ("reading_quick.json" if args.quick else "reading.json")
    sizes = sorted(set(args.sizes))
    torch.set_num_threads(args.threads)
    info = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "reps": args.reps,
        "warmup": args.warmup,
        "load_average_before": os.getloadavg(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }

    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokens, files = text_tokens(tokenizer, args.fill_tokens + 2 * SEGMENT)
    fill = tokens[:, : args.fill_tokens]
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # the baselines' own model
    shared = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # weights of every memorizing one
    capacity = max(sizes + [SEGMENT])

    def memorizing(layers: str, combine: str, backend: str) -> MemorizingForCausalLM:
        return MemorizingForCausalLM.from_base_pretrained(
            shared,
            memory_layers=LAYER_PRESETS[layers],
            combine=combine,
            memory_size=capacity,
            memory_top_k=TOP_K,
            retrieval=backend,
            page_budget=args.page_budget,
        ).eval()

    pairs = [(layers, combine) for layers in args.layers for combine in args.combine]
    settings = [Setting(*pair, backend, memorizing(*pair, backend)) for pair in pairs for backend in args.backends]
    info.update(
        segment=SEGMENT,
        model=f"{path.name} (fp32, sdpa), batch 1",
        text=f"CPython stdlib {', '.join(files)} ({sys.version.split()[0]}): tokens [0, {args.fill_tokens}) fill the "
        f"memory, [{args.fill_tokens}, {args.fill_tokens + SEGMENT}) are read right before the timed segment "
        f"[{args.fill_tokens + SEGMENT}, {args.fill_tokens + 2 * SEGMENT})",
        segment_tokens=SEGMENT,
        memory=f"capacity {capacity}, top-{TOP_K}, fp32, no XL cache, page budget {args.page_budget}",
        fill_tokens=args.fill_tokens,
        noise=args.noise,
        copy="copy.deepcopy of the ready memory before every timed call, outside the timer; the call writes",
    )
    print(f"{len(settings)} memorizing configurations, sizes {sizes}, {args.threads} thread(s)", flush=True)

    read(base, tokens[:, :SEGMENT])  # warms the plain path (the memorizing one is warmed by filling)
    fills = {pair: fill_memory(memorizing(*pair, "exact"), pair[0], fill, not args.no_cache) for pair in pairs}
    results = [measure_group(n, settings, fills, base, tokens, args) for n in sizes]
    info["load_average_after"] = os.getloadavg()
    write_results(out, info, results)
    print(reading_markdown({"info": info, "results": results}))


if __name__ == "__main__":
    main()
