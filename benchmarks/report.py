"""Write docs/performance.md (tables, target checks, plots) from the JSON results under benchmarks/results/.

Every figure in the page is read from those JSON files; nothing is typed in by hand. Missing results are listed as
such.

    python benchmarks/report.py [--results benchmarks/results] [--out docs/performance.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from memorizing_experiments.benchmarks import (
    load_label,
    reading_markdown,
    retrieval_approx_markdown,
    size_label,
)

TARGET_RATIO = {8192: 1.10, 65536: 1.25, 262144: 1.4}


def load(folder: Path, name: str) -> dict | None:
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else None


RECALL: dict[tuple[int, int], float] = {}  # (entries, nprobe) -> IVF recall@32 on normalised real keys (gate mode)


def ivf_recall_note(row: dict) -> str:
    """For an IVF configuration: its recall@32 on real keys at the same size and nprobe, if measured."""
    if "IVF" not in row["backend"]:
        return ""
    nprobe = int(row["backend"].split("nprobe ")[1].rstrip(")"))
    recall = RECALL.get((row["n"], nprobe))
    return f"recall@32 {recall:.2f} on real keys" if recall is not None else "recall not measured"


def save_plot(fig, ax, path: Path, xlabel: str, ylabel: str, title: str | None = None, legend_size=None) -> None:
    """Label, lay out, write (110 dpi) and close a figure: the common end of every plot of this page."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=legend_size)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def training_section(data: dict, plots: Path, lines: list[str], png: str = "performance_training.png") -> None:
    info, results = data["info"], data["results"]
    lines += [
        f"Command: `{info['command']}` — {info['threads']} torch thread(s), batch {info['batch']} x {info['segment']}"
        f" tokens, k={info['top_k']}, started {info['started']}, load average (1/5/15 min) before "
        f"{load_label(info['load_average_before'])}, after {load_label(info['load_average_after'])}.",
        "",
    ]
    for model, rows in results.items():
        if model == "comparison" or not isinstance(rows, dict) or "off" not in rows:
            continue
        lines += [
            f"**{model}** (load after this model: {load_label(rows.get('load_average_after'))}; "
            f"wall {rows.get('wall_s', 0):.0f} s)",
            "",
            "| configuration | backend | median step s | ratio to off | paired ratio | added s | target | met |",
            "|---|---|---:|---:|---:|---:|---:|---|",
            f"| memory off | — | {rows['off']['median_s']:.3f} | 1.00 | 1.00 | 0 | | |",
        ]
        for name, row in rows.items():
            if not isinstance(row, dict) or "ratio" not in row:
                continue
            target = TARGET_RATIO.get(row["n"]) if model != "lucidrains" else None
            met = "" if target is None else ("yes" if row["ratio"] <= target else "no")
            note = ivf_recall_note(row)
            if met and note:
                recall = RECALL.get((row["n"], int(row["backend"].split("nprobe ")[1].rstrip(")"))))
                met = f"{met} in time; {note}" + (" (< 0.95: does not qualify)" if recall and recall < 0.95 else "")
            if "no search" in row["backend"]:
                met = "(reference: cost besides retrieval)"
            lines.append(
                f"| {name} | {row['backend']} | {row['median_s']:.3f} | {row['ratio']:.2f} | "
                f"{row['ratio_paired_median']:.2f} | {row['added_s']:.3f} | {target or ''} | {met} |"
            )
        lines.append("")
    comparison = results.get("comparison")
    if comparison:
        together = results.get("tiny", {}).get("timed_with") == ["tiny", "lucidrains"]
        how = "in the same interleaved rounds" if together else "same invocation, lucidrains' rounds after ours"
        lines += [
            f"**Against lucidrains** ({how}; added time = median step with memory − median step without; relative ="
            " added time / own step without memory):",
            "",
            "| ours | our added s | lucidrains added s | lucidrains / ours | relative: lucidrains / ours | "
            "target ≥3 met |",
            "|---|---:|---:|---:|---:|:-:|",
        ]
        off_ours, off_theirs = results["tiny"]["off"]["median_s"], results["lucidrains"]["off"]["median_s"]
        for name, row in comparison.items():
            if name.startswith("nosearch"):
                continue
            ratio = row["lucidrains_over_ours"]
            relative = (row["lucidrains_added_s"] / off_theirs) / max(row["ours_added_s"] / off_ours, 1e-9)
            met = "yes" if row["ours_added_s"] <= 0 or ratio >= 3 else "no"
            lines.append(
                f"| {name} | {row['ours_added_s']:.3f} | {row['lucidrains_added_s']:.3f} | {ratio:.2f} | "
                f"{relative:.2f} | {met} |"
            )
        lines.append("")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for model, rows in results.items():
        if model == "comparison" or not isinstance(rows, dict) or "off" not in rows:
            continue
        series: dict[str, list[tuple[int, float]]] = {}
        for name, row in rows.items():
            if isinstance(row, dict) and "ratio" in row:
                series.setdefault(name.split("@")[0], []).append((row["n"], row["ratio"]))
        for backend, points in series.items():
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{model} {backend}")
    ax.set_xscale("log", base=2)
    ax.axhline(1.0, color="grey", lw=0.5)
    save_plot(fig, ax, plots / png, "memory entries per row", "step time / step time without memory",
              "Training step cost of the kNN memory", legend_size=7)
    lines += [f"![training step ratio]({png})", ""]


def scale_section(data: dict, plots: Path, lines: list[str]) -> None:
    info = data["info"]
    mm = info["matmul_gflops"]
    lines += [
        f"Command: `{info['command']}` — {info['threads']} thread(s), faiss {info['faiss']}, keys: {info['keys']}; "
        f"started {info['started']}, load average before {load_label(info['load_average_before'])}, after "
        f"{load_label(info['load_average_after'])}. Sizes without real keys (not measured): "
        f"{', '.join(size_label(n) for n in info['skipped_sizes_no_real_keys']) or 'none'}.",
        "",
        f"Dense matmul 2048³ in the same run: fp32 {mm['float32']:.1f} GFLOP/s, bf16 {mm['bfloat16']:.1f} GFLOP/s "
        f"(after the run: fp32 {info['matmul_gflops_after']['float32']:.1f}, bf16 "
        f"{info['matmul_gflops_after']['bfloat16']:.1f}).",
        "",
        "| entries per (row, head) | exact s (3 heads) | exact GFLOP/s | of fp32 matmul | of bf16 matmul | "
        "plain matmul+topk s | storage B/token | vs raw K/V | load |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in data["results"]:
        ex, st = row["exact"], row["storage"]
        lines.append(
            f"| {size_label(row['n'])} | {ex['median_s']:.3f} | {ex['gflops']:.1f} | "
            f"{100 * ex['fraction_of_fp32_matmul']:.0f}% | {100 * ex['fraction_of_bf16_matmul']:.0f}% | "
            f"{row['plain_matmul_topk']['median_s']:.3f} | {st['bytes_per_token']:.0f} | {st['ratio_to_raw']:.3f} | "
            f"{load_label(row['load_average'])} |"
        )
    lines += [
        "",
        "recall@32: share of the returned entries whose exact score reaches the 32nd best (tied scores count as "
        "found: the standard library repeats itself, so many keys are exact duplicates); same ids: share of exact "
        "search's own ids returned (ties count as misses; '-' where a run did not record it).",
        "",
        "| entries | method | setting | search s | recall@32 | same ids | speed-up vs exact | insert cost | "
        "index B/token/head |",
        "|---:|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for row in data["results"]:
        n = size_label(row["n"])
        fl = row["faiss_flat"]
        lines.append(
            f"| {n} | exact (ours) | two-pass | {row['exact']['median_s']:.3f} | 1 (reference) | 1 | 1.00 | none | 0 |"
        )
        lines.append(
            f"| {n} | faiss flat | IndexIDMap(FlatIP) | {fl['median_s']:.3f} | {fl['recall']:.4f} | {same_ids(fl)} | "
            f"{row['exact']['median_s'] / fl['median_s']:.2f} | fill {fl['fill_us_per_entry']:.2f} µs/entry, "
            f"512-token overwrite {1e3 * fl['overwrite_512_s']:.1f} ms | {fl['index_bytes_per_token_per_head']:.0f} |"
        )
        ivf = row["faiss_ivf"]
        for nprobe, r in ivf["nprobe"].items():
            lines.append(
                f"| {n} | faiss IVF | nlist {ivf['nlist']}, nprobe {nprobe} | {r['median_s']:.4f} | "
                f"{r['recall']:.4f} | {same_ids(r)} | "
                f"{r['speedup_vs_exact']:.1f} | train+fill {ivf['train_and_fill_us_per_entry']:.1f} µs/entry, "
                f"overwrite {1e3 * ivf['overwrite_512_s']:.1f} ms | {ivf['index_bytes_per_token_per_head']:.0f} |"
            )
        for links, h in row["faiss_hnsw"].items():
            for ef, r in h["efSearch"].items():
                lines.append(
                    f"| {n} | faiss HNSW | M {links}, efSearch {ef} | {r['median_s']:.4f} | {r['recall']:.4f} | "
                    f"{same_ids(r)} | "
                    f"{r['speedup_vs_exact']:.1f} | build {h['build_us_per_entry']:.1f} µs/entry, no removal | "
                    f"{h['index_bytes_per_token_per_head']:.0f} |"
                )
    lines.append("")
    best = []
    for row in data["results"]:
        ok = [("IVF nprobe " + p, r) for p, r in row["faiss_ivf"]["nprobe"].items() if r["recall"] >= 0.95]
        ok += [(f"HNSW M {m} ef {e}", r) for m, h in row["faiss_hnsw"].items() for e, r in h["efSearch"].items()
               if r["recall"] >= 0.95]
        if ok:
            name, r = max(ok, key=lambda x: x[1]["speedup_vs_exact"])
            best.append(f"{size_label(row['n'])}: fastest setting with recall@32 ≥ 0.95 is {name} "
                        f"({r['speedup_vs_exact']:.1f}x exact, recall {r['recall']:.3f})")
        else:
            best.append(f"{size_label(row['n'])}: no measured setting reaches recall@32 ≥ 0.95")
    lines += [f"- {b}" for b in best] + [""]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in data["results"]:
        n = size_label(row["n"])
        ivf = row["faiss_ivf"]["nprobe"].values()
        ax.plot([r["median_s"] for r in ivf], [r["recall"] for r in ivf], marker="o", label=f"IVF {n}")
        for links, h in row["faiss_hnsw"].items():
            pts = h["efSearch"].values()
            ax.plot([r["median_s"] for r in pts], [r["recall"] for r in pts], marker="s", label=f"HNSW M{links} {n}")
        ax.plot([row["exact"]["median_s"]], [1.0], marker="*", ms=12, ls="", label=f"exact {n}")
    ax.set_xscale("log")
    ax.axhline(0.95, color="grey", lw=0.5)
    png = "performance_recall_normalized.png" if "normalised" in info["keys"] else "performance_recall.png"
    save_plot(fig, ax, plots / png, "search s (3 heads x 1536 queries)", "recall@32",
              "Recall against latency, real keys", legend_size=6)
    lines += [f"![recall against latency]({png})", ""]


def same_ids(result: dict) -> str:
    """The plain id overlap with exact search (ties count as misses), where the run recorded it."""
    return f"{result['recall_ids']:.4f}" if "recall_ids" in result else "-"


def rss_section(data: dict, plots: Path, lines: list[str]) -> None:
    fit, info = data["fit"], data["info"]
    lines += [
        f"Command: `{info['command']}` — one process per size, backend {info['backend']}, geometry {info['geometry']}, "
        f"started {info['started']}, load average {load_label(info['load_average'])}.",
        "",
        "| entries | RSS before memory MiB | after fill MiB | peak (fill + one search) MiB | storage MiB | search s |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["results"]:
        lines.append(
            f"| {size_label(r['n'])} | {r['rss_before_memory'] / 2**20:.1f} | {r['rss_after_fill'] / 2**20:.1f} | "
            f"{r['peak_rss'] / 2**20:.1f} | {r['storage_bytes'] / 2**20:.1f} | {r['search_s']:.2f} |"
        )
    lines += [
        "",
        f"Linear fit: peak RSS = {fit['constant_bytes'] / 2**20:.1f} MiB + {fit['bytes_per_token']:.0f} B x entries "
        f"(raw keys + values: {fit['raw_kv_bytes_per_token']} B per entry; largest residual "
        f"{fit['max_abs_residual_bytes'] / 2**20:.1f} MiB).",
        "",
    ]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["n"] for r in data["results"]]
    ax.plot(xs, [r["peak_rss"] / 2**20 for r in data["results"]], marker="o", label="peak RSS")
    ax.plot(xs, [r["rss_after_fill"] / 2**20 for r in data["results"]], marker="^", label="RSS after fill")
    ax.plot(xs, [(fit["constant_bytes"] + fit["bytes_per_token"] * x) / 2**20 for x in xs], ls="--", label="fit")
    save_plot(fig, ax, plots / "performance_rss.png", "memory entries (one row, 3 heads x 64)", "MiB")
    lines += ["![peak RSS](performance_rss.png)", ""]


def bound_section(folder: Path, lines: list[str]) -> None:
    """Brute-force flops of exact retrieval per training step, at the bf16 matmul rate measured in the retrieval run,
    against the time the targets allow (target - 1) x the measured step time without memory."""
    fraction = load(folder, "matmul_fraction.json")
    runs = [load(folder, name) for name in ("training_interleaved.json", "training_smollm2.json")]
    if fraction is None or not any(runs):
        return
    rate = max(row["bf16_gflops"] for row in fraction["results"]) * 1e9
    # queries per step = rows x query heads x tokens; head dim 64 for both models
    queries = {"tiny": 2 * 8 * 512, "smollm2": 2 * 9 * 512}
    lines += [
        "## Lower bound of exact retrieval per training step",
        "",
        f"Brute-force flops 2 x queries x N x 64 at the bf16 matmul rate of `matmul_fraction.json` "
        f"({rate / 1e9:.1f} GFLOP/s, 1 thread, load ~5), against the time a target allows: (target - 1) x the measured "
        "step time without memory (tiny: `training_interleaved.json`, load ~5; SmolLM2: `training_smollm2.json`, "
        "load ~8-10, so its allowance is inflated by the load).",
        "",
        "| model | entries | queries per step | bound s | allowed s | bound fits |",
        "|---|---:|---:|---:|---:|:-:|",
    ]
    for run in runs:
        if run is None:
            continue
        for model, rows in run["results"].items():
            if model not in queries or "off" not in rows:
                continue
            for n, target in TARGET_RATIO.items():
                bound = 2 * queries[model] * n * 64 / rate
                allowed = (target - 1) * rows["off"]["median_s"]
                lines.append(f"| {model} | {size_label(n)} | {queries[model]} | {bound:.2f} | {allowed:.2f} | "
                             f"{'yes' if bound <= allowed else 'no'} |")
    lines.append("")


def generation_section(data: dict | None, lines: list[str]) -> None:
    """Per-token generation latency against memory size (`bench_generation.py`, issue 4's target: <=1.2x at 65K)."""
    if data is None:
        return
    info = data["info"]
    sizes = " ".join(str(n) for n in sorted({row["memory_tokens"] for row in data["results"]} - {None}))
    lines += [
        "## Generation: per-token latency against memory size (SmolLM2-135M)",
        "",
        f"`benchmarks/bench_generation.py --sizes {sizes} --repeats {info['repeats']}`: greedy, batch 1, "
        f"{info['prompt_tokens']}-token prompt, {info['new_tokens']} new tokens, {info['memory']}, "
        f"{info['threads']} thread(s); ms / token: medians over all decoding steps; vs base: median over rounds of the "
        "ratio to the base model (no memory layers) run right before each setting; vs empty: the same setting with an "
        f"empty memory, same round. Load {load_label(info['load_average_before'])} before, "
        f"{load_label(info['load_average_after'])} after.",
        "",
        "| setting | entries in memory | ms / token | vs base | vs empty | target ≤1.2x at 65K |",
        "|---|---:|---:|---:|---:|:-:|",
    ]
    for row in data["results"]:
        n = row["memory_tokens"]
        empty = row.get("vs_empty")
        met = row["ratio"] <= 1.2 and (empty is None or empty <= 1.2)  # the issue: vs base and vs empty memory
        target = ("yes" if met else "no") if n == 65536 else ""
        size = "–" if n is None else size_label(n) if n else "0"
        lines.append(f"| {row['setting']} | {size} | {row['median_ms']:.1f} | {row['ratio']:.2f}x | "
                     f"{'' if empty is None else f'{empty:.2f}x'} | {target} |")
    lines.append("")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", default="benchmarks/results")
    parser.add_argument("--out", default="docs/performance.md")
    parser.add_argument("--notes", default="benchmarks/performance_notes.md",
                        help="hand-written analysis appended to the page (no figures in it)")
    args = parser.parse_args()
    folder, out = Path(args.results), Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Performance",
        "",
        "Generated by `make bench` (`benchmarks/report.py` from the JSON files in `benchmarks/results/`). The "
        "machine is shared: every comparison below was measured side by side in one run (interleaved rounds), "
        "and the load average at the time is given with each table.",
        "",
    ]
    sections = [
        ("Training step: memory off vs on", "training_tiny_lucidrains.json", training_section),
        ("Training step: SmolLM2-135M", "training_smollm2.json", training_section),
        ("Retrieval at scale on real keys (raw, as joint mode stores them), and the machine's limit",
         "retrieval_scale.json", scale_section),
        ("Retrieval at scale on real keys, L2-normalised (as gate mode, the default, stores them)",
         "retrieval_scale_normalized.json", scale_section),
        ("Training step: ours and lucidrains in the same rounds, and memory's cost besides retrieval",
         "training_interleaved.json", training_section),
        ("Training step: ours and lucidrains in the same rounds, an earlier run under a higher load",
         "training_interleaved_loaded.json", training_section),
        ("Peak memory against memory size", "memory_rss.json", rss_section),
    ]
    normalized = load(folder, "retrieval_scale_normalized.json")
    for row in normalized["results"] if normalized else []:
        for nprobe, r in row["faiss_ivf"]["nprobe"].items():
            RECALL[(row["n"], int(nprobe))] = r["recall"]
    for title, name, section in sections:
        lines += [f"## {title}", ""]
        data = load(folder, name)
        if data is None:
            lines += [f"Not measured (no `{folder / name}`).", ""]
            continue
        if section is training_section:
            section(data, out.parent, lines, png=f"performance_{Path(name).stem}.png")
        else:
            section(data, out.parent, lines)
    for title, name, render in (
        ("Reading throughput with a memory of N entries (SmolLM2-135M)", "reading.json", reading_markdown),
        ("Approximate retrieval that keeps recall: MIPS -> L2 faiss indexes and the page backend, on real keys",
         "retrieval_approx.json", retrieval_approx_markdown),
        ("Approximate retrieval at 256K and 1M entries (the same keys; no HNSW: its build takes minutes here)",
         "retrieval_approx_large.json", retrieval_approx_markdown),
    ):
        data = load(folder, name)
        lines += [f"## {title}", "", render(data) if data else f"Not measured (no `{folder / name}`).", ""]
    retrieval = load(folder, "retrieval.json")
    if retrieval:
        info = retrieval["info"]
        lines += [
            "## Exact retrieval micro-benchmark (random keys)",
            "",
            f"`benchmarks/bench_retrieval.py`: {info['threads']} thread(s), load average before "
            f"{load_label(info['load_average_before'])}; dense fp32 matmul {info['matmul_2048_gflops']:.1f} GFLOP/s.",
            "",
            "| entries | exact s | plain matmul+topk s | faiss flat s | exact GFLOP/s |",
            "|---:|---:|---:|---:|---:|",
        ]
        for row in retrieval["results"]:
            lines.append(
                f"| {size_label(row['n'])} | {row['exact']['median_s']:.3f} | {row['plain']['median_s']:.3f} | "
                f"{row['faiss']['median_s']:.3f} | {row['exact_gflops']:.1f} |"
            )
        lines.append("")
    fraction = load(folder, "matmul_fraction.json")
    if fraction:
        lines += [
            "## Exact retrieval as a fraction of dense matmul (same rounds)",
            "",
            f"Command: `{fraction['info']['command']}` — {fraction['info']['threads']} thread(s), started "
            f"{fraction['info']['started']}. Each round times a 2048³ matmul (fp32, bf16) and one exact search right "
            "after each other; fractions are medians of the per-round ratios. Exact GFLOP/s counts the brute-force "
            "flops (2 N M D per head), so it can exceed the fp32 rate (bf16 first pass, pruned fp32 second pass).",
            "",
            "| entries | keys | exact s | exact GFLOP/s | fp32 matmul GFLOP/s | bf16 matmul GFLOP/s | of fp32 | "
            "of bf16 | target ≥50% (of fp32) | load |",
            "|---:|---|---:|---:|---:|---:|---:|---:|:-:|---|",
        ]
        for row in fraction["results"]:
            lines.append(
                f"| {size_label(row['n'])} | {row['keys']} | {row['exact_s']:.2f} | {row['exact_gflops']:.1f} | "
                f"{row['fp32_gflops']:.1f} | {row['bf16_gflops']:.1f} | {100 * row['fraction_of_fp32']:.0f}% | "
                f"{100 * row['fraction_of_bf16']:.0f}% | {'yes' if row['fraction_of_fp32'] >= 0.5 else 'no'} | "
                f"{load_label(row['load_average'])} |"
            )
        lines.append("")
    generation_section(load(folder, "generation.json"), lines)
    bound_section(folder, lines)
    notes = Path(args.notes)
    if notes.is_file():
        lines += [notes.read_text()]
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
