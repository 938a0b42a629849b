"""What `benchmarks/gpu_check.sh` measures on a CUDA machine: retrieval on the GPU, a bf16 memory, and SmolLM2-135M
reading into memory and generating from it. Without CUDA it runs the same code on CPU at small sizes (a dry run).

* retrieval: exact search (`ExactBackend`, the dense CUDA path) against faiss-gpu brute force (`FaissBackend("flat")`,
  only where faiss has GPU support) and the page backend (`PageBackend`, exact mode and budgets), on random keys at
  each size (speed) and on the real keys of `build/gpu_assets/real_keys_65536.safetensors` if present (recall@32);
  3 key/value heads x 64 dims, 1,536 queries per head, k=32, the queries' layout of `bench_retrieval_scale.py`.
* bf16 memory: `KNNMemory(dtype=bfloat16)` against fp32, written in 512-token segments and searched on the device:
  write and search times, and the share of the fp32 top-32 found.
* smollm2: `memorize` of a passkey document (filler, the key, filler) and `generate` of the answer, with exact and
  page retrieval; real weights if a checkpoint folder is found (`--weights`, `build/gpu_assets/SmolLM2-135M-Instruct`
  or `~/.cache/memorizing_hf/SmolLM2-135M-Instruct`), else the real configuration and tokenizer with random weights
  (`build/gpu_assets/smollm2-config`: the 538 MB of weights do not fit what a device call can carry).

    python benchmarks/bench_retrieval_gpu.py --out results.json [--prepare]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from memorizing_experiments.benchmarks import recall
from memorizing_hf import MemorizingForCausalLM
from memorizing_hf.memory import KNNMemory
from memorizing_hf.retrieval import ExactBackend
from memorizing_hf.retrieval_pages import PageBackend

ASSETS = Path(__file__).resolve().parents[1] / "build" / "gpu_assets"
K, HEADS, DIM, QUERIES, SEGMENT = 32, 3, 64, 1536, 512
CONFIG_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def timed(fn: Callable[[], object], device: torch.device, reps: int) -> tuple[float, object]:
    """Median seconds of `reps` calls after one warm-up, and the last result."""
    out, times = fn(), []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def backends() -> dict[str, object]:
    out: dict[str, object] = {"exact": ExactBackend()}
    try:
        import faiss

        from memorizing_hf.retrieval_faiss import FaissBackend

        if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            out["faiss_gpu_flat"] = FaissBackend("flat", use_gpu=True)
    except ImportError:
        pass
    for budget in (0.02, 0.05, None):
        out[f"pages_{budget or 'exact'}"] = PageBackend(budget=budget)
    return out


def retrieval(device: torch.device, sizes: list[int], reps: int) -> list[dict]:
    rows = []
    cases = [(f"random {n}", n, None) for n in sizes]
    if (ASSETS / "real_keys_65536.safetensors").is_file():
        cases.append(("real 65536", 65536, ASSETS / "real_keys_65536.safetensors"))
    for name, n, path in cases:
        if path is None:
            gen = torch.Generator().manual_seed(n)
            keys = torch.randn(1, HEADS, n, DIM, generator=gen)
            queries = torch.randn(1, HEADS, QUERIES, DIM, generator=gen)
        else:
            from safetensors.torch import load_file

            tensors = load_file(path)
            keys, queries = tensors["keys"][None].float(), tensors["queries"][None].float()
        keys, queries, lengths = keys.to(device), queries.to(device), torch.tensor([n], device=device)
        row = {"case": name, "entries": n, "methods": {}}
        ref = None
        for method, backend in backends().items():
            if hasattr(backend, "index_kind"):  # faiss: told about the entries, as the memory would
                backend.add(torch.zeros(n, dtype=torch.long), torch.arange(n), keys[0].transpose(0, 1))
            start = time.perf_counter()
            backend.search(queries[:, :, :1], keys, lengths, K)  # builds what the backend builds
            build = time.perf_counter() - start
            seconds, (scores, slots) = timed(functools.partial(backend.search, queries, keys, lengths, K), device, reps)
            ref = ref or (seconds, scores)
            row["methods"][method] = {
                "search_s": seconds,
                "build_s": build,
                "speedup_vs_exact": ref[0] / seconds,
                "recall": recall(slots, queries, keys, ref[1])["recall"],
            }
            print(
                f"  {name} {method}: {seconds * 1e3:.2f} ms, {ref[0] / seconds:.2f}x exact, "
                f"recall {row['methods'][method]['recall']:.4f}",
                flush=True,
            )
        rows.append(row)
    return rows


def bf16_memory(device: torch.device, entries: int, reps: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(1, HEADS, entries, DIM, generator=gen).to(device)
    queries = torch.randn(1, HEADS, QUERIES, DIM, generator=gen).to(device)
    out = {"entries": entries}
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        memory = KNNMemory(entries, HEADS, DIM, ExactBackend(), dtype=dtype)
        start = time.perf_counter()
        for s0 in range(0, entries, SEGMENT):
            segment = keys[:, :, s0 : s0 + SEGMENT]
            store = torch.ones(1, segment.shape[2], dtype=torch.bool, device=device)
            positions = torch.arange(s0, s0 + segment.shape[2], device=device)[None]
            memory.write(segment, segment, store, positions)
        if device.type == "cuda":
            torch.cuda.synchronize()
        write = time.perf_counter() - start
        seconds, (_, slots) = timed(functools.partial(memory.search, queries, K), device, reps)
        name = str(dtype).split(".")[1]
        results[name] = slots
        out[name] = {"write_s": write, "search_s": seconds, "stored_dtype": str(memory.keys.dtype)}
    same = (results["bfloat16"][..., :, None] == results["float32"][..., None, :]).any(-1)
    out["share_of_fp32_top32_found_by_bf16"] = float(same.float().mean())
    out["search_time_bf16_over_fp32"] = out["bfloat16"]["search_s"] / out["float32"]["search_s"]
    print(f"  bf16 memory: {out}", flush=True)
    return out


def smollm2(device: torch.device, weights: Path | None, filler_sentences: int) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = next((p for p in _weight_folders(weights) if (p / "model.safetensors").is_file()), None)
    if folder is not None:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        source = f"real weights ({folder})"
    else:
        folder = ASSETS / "smollm2-config"
        if not (folder / "config.json").is_file():
            return {"skipped": "no SmolLM2 weights and no build/gpu_assets/smollm2-config (run with --prepare)"}
        tokenizer = AutoTokenizer.from_pretrained(folder)
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
        source = "random weights, real configuration and tokenizer"
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    document = filler * filler_sentences + "The pass key is 71432. Remember it. 71432 is the pass key. "
    document += filler * filler_sentences
    question = "What is the pass key? The pass key is"
    out: dict = {"weights": source, "device": str(device), "runs": {}}
    for retrieval in ("exact", "pages"):
        model = MemorizingForCausalLM.from_base_pretrained(
            base, memory_layers=[-8], memory_size=65536, combine="joint", retrieval=retrieval
        ).to(device)
        start = time.perf_counter()
        model.memorize([document], tokenizer=tokenizer)
        if device.type == "cuda":
            torch.cuda.synchronize()
        read = time.perf_counter() - start
        prompt = tokenizer(question, return_tensors="pt").to(device)
        start = time.perf_counter()
        generated = model.generate(**prompt, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        if device.type == "cuda":
            torch.cuda.synchronize()
        answer = tokenizer.decode(generated[0, prompt["input_ids"].shape[1] :])
        entries = {layer: counts for layer, counts in model.memory.entries().items()}
        out["runs"][retrieval] = {
            "document_tokens": len(tokenizer(document)["input_ids"]),
            "memorize_s": read,
            "generate_s": time.perf_counter() - start,
            "answer": answer,
            "passkey_found": "71432" in answer,
            "memory_entries": entries,
        }
        print(f"  smollm2 {retrieval}: {out['runs'][retrieval]}", flush=True)
    return out


def _weight_folders(weights: Path | None) -> list[Path]:
    folders = [weights] if weights else []
    cache = os.environ.get("MEMORIZING_HF_CACHE")
    cache_root = Path(cache).expanduser() if cache else Path.home() / ".cache" / "memorizing_hf"
    return folders + [ASSETS / "SmolLM2-135M-Instruct", cache_root / "SmolLM2-135M-Instruct"]


def prepare() -> None:
    """Copy what the GPU run needs and a device call can carry (under 64 MiB) into build/gpu_assets: SmolLM2's
    configuration and tokenizer (not its weights) and 65,536 real keys with their queries in bf16."""
    from safetensors.torch import save_file

    from memorizing_experiments.real_keys import CHECKPOINTS, cache_file, real_keys
    from memorizing_experiments.sources import smollm2_path

    (ASSETS / "smollm2-config").mkdir(parents=True, exist_ok=True)
    for name in CONFIG_FILES:
        shutil.copy(smollm2_path() / name, ASSETS / "smollm2-config" / name)
    available = [n for n in CHECKPOINTS if cache_file(n).is_file() and n >= 65536]
    if available:
        tensors = real_keys(min(available))
        save_file(
            {
                "keys": tensors["keys"][:, :65536].bfloat16().contiguous(),
                "queries": tensors["queries.65536"].bfloat16().contiguous(),
            },
            ASSETS / "real_keys_65536.safetensors",
        )
    size = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    print(f"build/gpu_assets: {size / 2**20:.1f} MiB (carry it: run(..., carry=['build/gpu_assets']))")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/retrieval_gpu.json")
    parser.add_argument("--weights", type=Path, help="a SmolLM2-135M(-Instruct) checkpoint folder")
    parser.add_argument("--prepare", action="store_true", help="fill build/gpu_assets and exit")
    args = parser.parse_args()
    if args.prepare:
        prepare()
        return
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(1)
        print("no CUDA: dry run on CPU at small sizes", flush=True)
    info = {
        "device": torch.cuda.get_device_name() if cuda else "cpu (dry run)",
        "torch": torch.__version__,
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "load_average": os.getloadavg(),
    }
    sizes = [65536, 262144, 1048576] if cuda else [16384]
    results = {
        "retrieval": retrieval(device, sizes, reps=5 if cuda else 1),
        "bf16_memory": bf16_memory(device, 262144 if cuda else 8192, reps=5 if cuda else 1),
        "smollm2": smollm2(device, args.weights, filler_sentences=400 if cuda else 12),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"info": info, "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
