"""Cost of the kNN memory in training: one training step with the memory off and on, side by side in one run.

A training step is forward + backward + optimizer step (AdamW, lr 1e-4) on a batch of 2 rows x 512 tokens. Models:

* `tiny`: a 6-layer Llama-style decoder built from a config (d=512, 8 heads x 64, 8 key/value heads, SwiGLU 1376,
  vocabulary 20,000, random init), memory at layer index 3 (the 4th layer) with k=32.
* `smollm2`: SmolLM2-135M (30 layers, 9 query / 3 key-value heads x 64), memory at the default layer (21), k=32.
* `lucidrains`: lucidrains' memorizing-transformers-pytorch 0.4.1 at the equal configuration (dim 512, 6 layers,
  8 heads x 64, vocabulary 20,000, memory at layer 4 counted from 1, k=32), faiss HNSW + memmap, the same optimizer.

Backends of our models: `exact` (memorizing_hf.retrieval over an fp32 memory), `exact-bf16` (the same search over a
memory stored in bf16, `memory_dtype="bfloat16"`: exact for the stored bf16 keys), faiss `flat` and `ivf`, and
`nosearch` (fixed random slots: the memory's cost besides retrieval).

"Memory off" is the bare base model (ours) or the same architecture without a memorizing layer (lucidrains). "Memory
on" wraps the base (the same weights) with a memory of N entries per batch row, filled before timing with random
unit keys (the memory layer L2-normalises keys in gate mode); every timed step writes its 512 tokens per row, so the
ring buffer stays full. lucidrains resets its whole HNSW index once the capacity is exceeded (a defect), so its
capacity is N plus the tokens written while timing: its memory then also stays full, as in ours.

Every configuration of a model is timed once per round, rounds interleaved (noise from other processes spreads over
all of them alike), after `--warmup` rounds; reported: the median step time and its ratio to memory off.

    python benchmarks/bench_training.py [--models tiny lucidrains smollm2] [--sizes 8192 65536 262144]
        [--backends exact exact-bf16 ivf] [--reps 5] [--threads 1] [--out benchmarks/results/training.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from memorizing_experiments.benchmarks import write_results
from memorizing_hf import MemorizingForCausalLM
from memorizing_hf.retrieval import ExactBackend

BATCH, SEGMENT, TOP_K, VOCAB = 2, 512, 32, 20000
TINY_MEMORY_LAYER = 3  # 0-based: the 4th of 6 layers, lucidrains' memorizing_layers=(4,)
PREFILL_CHUNK = 16384
# IVF settings used for the approximate backend (see bench_retrieval_scale.py for their recall on real keys).
IVF_NPROBE = 32
IVF_TRAIN_POINTS_PER_LIST = 64
IVF_TRAIN_ITERATIONS = 10
# Backends whose memory stores keys and values in bf16 (the others store fp32): name -> MemorizingConfig.memory_dtype.
MEMORY_DTYPES = {"exact-bf16": "bfloat16"}


def ivf_nlist(n: int) -> int:
    """IVF lists for n entries: about 2 sqrt(n) (a power of two), so that faiss' 39 training keys per list fit."""
    return 1 << max(int(2 * n**0.5).bit_length() - 1, 4)


class NoSearchBackend:
    """Retrieval at no cost: returns the same random slots at every call (computed once per shape). A step with it
    costs everything memory adds except the search (the gather, memory attention forward and backward, writes)."""

    def __init__(self) -> None:
        self.cached: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def add(self, rows: torch.Tensor, slots: torch.Tensor, keys: torch.Tensor) -> None:
        """Nothing to index."""

    def reset(self, rows: torch.Tensor) -> None:
        """Nothing to forget."""

    def search(self, queries, keys, lengths, k):
        shape = (*queries.shape[:3], k)
        if shape not in self.cached:
            gen = torch.Generator().manual_seed(0)
            slots = torch.randint(0, int(lengths.min()), shape, generator=gen)
            self.cached[shape] = (torch.zeros(shape), slots)
        return self.cached[shape]


def make_backend(name: str, n: int):
    if name in ("exact", "exact-bf16"):
        return ExactBackend()
    if name == "nosearch":
        return NoSearchBackend()
    import faiss

    from memorizing_hf.retrieval_faiss import FaissBackend

    # faiss' OpenMP pool defaults to every core: its spinning workers would compete with torch on a busy machine.
    faiss.omp_set_num_threads(torch.get_num_threads())
    if name == "flat":
        return FaissBackend("flat")
    return FaissBackend(
        "ivf",
        nlist=ivf_nlist(n),
        nprobe=IVF_NPROBE,
        train_points_per_list=IVF_TRAIN_POINTS_PER_LIST,
        train_iterations=IVF_TRAIN_ITERATIONS,
    )


def backend_label(name: str, n: int) -> str:
    if name == "ivf":
        return f"faiss IVF (nlist {ivf_nlist(n)}, nprobe {IVF_NPROBE})"
    labels = {
        "exact": "exact (memorizing_hf.retrieval)",
        "exact-bf16": "exact (memorizing_hf.retrieval), bf16 memory",
        "flat": "faiss flat",
    }
    return labels.get(name, "no search (fixed random slots): the memory's cost besides retrieval")


# ---------------------------------------------------------------------------------------------------- our models
def tiny_base() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).train()


def smollm2_base() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from memorizing_experiments.sources import smollm2_path

    return AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32).train()


def prefill_ours(model: MemorizingForCausalLM, n: int, seed: int) -> None:
    """Fill every memory layer with n random unit keys (and random values) per row, in chunks."""
    gen = torch.Generator().manual_seed(seed)
    for memory in model.memory.layers.values():
        for start in range(0, n, PREFILL_CHUNK):
            width = min(PREFILL_CHUNK, n - start)
            shape = (BATCH, memory.num_heads, width, memory.head_dim)
            keys = F.normalize(torch.randn(shape, generator=gen), dim=-1)
            values = torch.randn(shape, generator=gen)
            store = torch.ones(BATCH, width, dtype=torch.bool)
            positions = torch.arange(start, start + width).expand(BATCH, -1)
            memory.write(keys, values, store, positions)
        memory.search(torch.randn(BATCH, memory.num_heads, 1, memory.head_dim, generator=gen), TOP_K)  # IVF: train
    model.memory.tokens_seen = torch.full((BATCH,), n)


def our_step(model, optimizer, ids) -> None:
    optimizer.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()


# ---------------------------------------------------------------------------------------------------- lucidrains
class Lucidrains:
    """lucidrains' MemorizingTransformer with (layers=(4,)) or without (layers=()) a memorizing layer."""

    def __init__(self, n: int | None, capacity: int, directory: str, seed: int) -> None:
        import faiss
        from memorizing_transformers_pytorch import MemorizingTransformer

        faiss.omp_set_num_threads(torch.get_num_threads())
        torch.manual_seed(0)
        self.model = MemorizingTransformer(
            num_tokens=VOCAB,
            dim=512,
            depth=6,
            heads=8,
            dim_head=64,
            memorizing_layers=(4,) if n else (),
            max_knn_memories=capacity,
            num_retrieved_memories=TOP_K,
            knn_memories_directory=directory,
        ).train()
        self.memories = self.model.create_knn_memories(batch_size=BATCH)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        gen = torch.Generator().manual_seed(seed)
        for memory in self.memories:
            for start in range(0, n or 0, PREFILL_CHUNK):
                width = min(PREFILL_CHUNK, n - start)
                keys = F.normalize(torch.randn(BATCH, width, 64, generator=gen), dim=-1)
                memory.add(torch.stack([keys, torch.randn(BATCH, width, 64, generator=gen)], dim=2))

    def entries(self) -> list[int]:
        return [int(knn.index.ntotal) for memory in self.memories for knn in memory.knns]

    def step(self, ids) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.model(ids, knn_memories=self.memories, labels=ids).backward()
        self.optimizer.step()


# ---------------------------------------------------------------------------------------------------- timing
def timed_rounds(steps: dict, warmup: int, reps: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(warmup + reps):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
        print(f"    round {round_ + 1}/{warmup + reps}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()
                                                                     if v), flush=True)
    return times


def build_ours(model_name: str, configs: list[tuple[str, int]]) -> tuple[dict, dict, Callable]:
    """Steps (name -> training step) of the bare base model ("off") and of one memorizing wrapper per
    (backend, size), their setup records, and a function that records the entries held after timing."""
    base = tiny_base() if model_name == "tiny" else smollm2_base()
    layers = [TINY_MEMORY_LAYER] if model_name == "tiny" else None
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, base.config.vocab_size, (BATCH, SEGMENT), generator=gen)
    wrappers: dict[str, MemorizingForCausalLM] = {}
    setup: dict[str, dict] = {}
    for backend, n in configs:
        name = f"{backend}@{n}"
        start = time.perf_counter()
        kwargs = {"memory_layers": layers} if layers else {}
        if backend in MEMORY_DTYPES:
            kwargs["memory_dtype"] = MEMORY_DTYPES[backend]
        model = MemorizingForCausalLM.from_base_pretrained(base, memory_size=n, memory_top_k=TOP_K, **kwargs)
        for memory in model.memory.layers.values():
            memory.backend = make_backend(backend, n)
        prefill_ours(model, n, seed=n)
        wrappers[name] = model
        setup[name] = {"n": n, "backend": backend_label(backend, n), "prefill_s": time.perf_counter() - start,
                       "memory_layers": list(model.memory.layers),
                       "memory_dtype": str(next(iter(model.memory.layers.values())).keys.dtype)}
        print(f"  {model_name}: {name} filled in {setup[name]['prefill_s']:.1f}s", flush=True)
    # One optimizer over the shared base and every wrapper's memory-layer parameters (gate, scale).
    params = {id(p): p for m in [base, *wrappers.values()] for p in m.parameters()}
    optimizer = torch.optim.AdamW(params.values(), lr=1e-4)
    steps = {"off": lambda: our_step(base, optimizer, ids)}
    steps |= {name: (lambda m=m: our_step(m, optimizer, ids)) for name, m in wrappers.items()}

    def after() -> None:
        for name, model in wrappers.items():
            setup[name]["entries_after"] = [int(x) for x in next(iter(model.memory.layers.values())).lengths]

    return steps, setup, after


def build_lucidrains(sizes: list[int], warmup: int, reps: int, directory: str) -> tuple[dict, dict, Callable]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH, SEGMENT), generator=gen)
    slack = (warmup + reps + 1) * SEGMENT
    models = {"off": Lucidrains(None, 1024, directory + "/off", 0)}
    setup: dict[str, dict] = {}
    for n in sizes:
        start = time.perf_counter()
        models[f"hnsw@{n}"] = Lucidrains(n, n + slack, directory + f"/{n}", seed=n)
        setup[f"hnsw@{n}"] = {"n": n, "backend": "faiss HNSW (M=15, efSearch 16) + numpy memmap",
                              "capacity": n + slack, "prefill_s": time.perf_counter() - start}
        print(f"  lucidrains: hnsw@{n} filled in {setup[f'hnsw@{n}']['prefill_s']:.1f}s", flush=True)
    steps = {name: (lambda m=model: m.step(ids)) for name, model in models.items()}

    def after() -> None:
        for name, model in models.items():
            if name != "off":
                setup[name]["entries_after"] = model.entries()
        for model in models.values():
            model.memories.cleanup()

    return steps, setup, after


def run_models(models: list[str], configs: dict[str, list[tuple[str, int]]], sizes: list[int], warmup: int,
               reps: int) -> dict[str, dict]:
    """Build every model's configurations, then time all of them in the same interleaved rounds."""
    steps, setups, afters = {}, {}, []
    with tempfile.TemporaryDirectory(prefix="lucidrains_knn_") as directory:
        for model in models:
            if model == "lucidrains":
                model_steps, setups[model], after = build_lucidrains(sizes, warmup, reps, directory)
            else:
                model_steps, setups[model], after = build_ours(model, configs[model])
            steps |= {f"{model}:{name}": step for name, step in model_steps.items()}
            afters.append(after)
        times = timed_rounds(steps, warmup, reps)
        for after in afters:
            after()
    results = {}
    for model in models:
        own = {name.split(":", 1)[1]: t for name, t in times.items() if name.split(":", 1)[0] == model}
        results[model] = summarise(own, setups[model])
    return results


def summarise(times: dict[str, list[float]], setup: dict[str, dict]) -> dict:
    off = statistics.median(times["off"])
    out = {"off": {"median_s": off, "times_s": times["off"]}}
    for name, t in times.items():
        if name == "off":
            continue
        median = statistics.median(t)
        out[name] = setup[name] | {
            "median_s": median,
            "times_s": t,
            "ratio": median / off,
            "added_s": median - off,
            # Paired per round: each round's on/off ratio, then the median (robust to slow rounds).
            "ratio_paired_median": statistics.median(a / b for a, b in zip(t, times["off"])),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "lucidrains", "smollm2"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 65536, 262144])
    parser.add_argument("--backends", nargs="+", default=["exact", "ivf"],
                        choices=["exact", "exact-bf16", "flat", "ivf", "nosearch"])
    parser.add_argument("--smollm2-configs", nargs="+", default=["exact@8192", "ivf@65536", "ivf@262144"],
                        help="backend@size pairs for SmolLM2 (its steps are ~8x longer); 'all': sizes x backends")
    parser.add_argument("--interleave", action="store_true",
                        help="time all models in the same rounds (default: one model after the other)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/training.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "batch": BATCH,
        "segment": SEGMENT,
        "top_k": TOP_K,
        "load_average_before": os.getloadavg(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    configs = {model: [(b, n) for n in args.sizes for b in args.backends] for model in args.models}
    if "smollm2" in configs and args.smollm2_configs != ["all"]:
        configs["smollm2"] = [(c.split("@")[0], int(c.split("@")[1])) for c in args.smollm2_configs]
    groups = [args.models] if args.interleave else [[model] for model in args.models]
    results: dict[str, dict] = {}
    for group in groups:
        print(f"{' + '.join(group)}:", flush=True)
        start = time.perf_counter()
        results |= run_models(group, configs, args.sizes, args.warmup, args.reps)
        for model in group:
            results[model]["load_average_after"] = os.getloadavg()
            results[model]["wall_s"] = time.perf_counter() - start
            results[model]["timed_with"] = group
            for name, row in results[model].items():
                if isinstance(row, dict) and "ratio" in row:
                    print(f"  {model} {name:>14}: {row['median_s']:.3f}s  x{row['ratio']:.2f}  "
                          f"(+{row['added_s']:.3f}s)  {row['backend']}")
                elif name == "off":
                    print(f"  {model} {name:>14}: {row['median_s']:.3f}s")
    if "tiny" in results and "lucidrains" in results:
        comparison = {}
        for name, row in results["tiny"].items():
            if isinstance(row, dict) and "added_s" in row:
                theirs = results["lucidrains"].get(f"hnsw@{row['n']}")
                if theirs:
                    comparison[name] = {"ours_added_s": row["added_s"], "lucidrains_added_s": theirs["added_s"],
                                        "lucidrains_over_ours": theirs["added_s"] / max(row["added_s"], 1e-9)}
        results["comparison"] = comparison
    info["load_average_after"] = os.getloadavg()
    write_results(args.out, info, results)


if __name__ == "__main__":
    main()
