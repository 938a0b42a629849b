"""Hub-ready checkpoints: a folder (or Hub repo) that anyone loads with
`AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`, with its tokenizer, a model card and, if asked,
a memory file that loads by name (`memory_file="memory.safetensors"`).

`save_pretrained` already writes the weights, the config (with `auto_map`), the generation config and the modeling
code; `save_for_hub` adds the tokenizer, the memory file and the card, and `push_to_hub` uploads such a folder in one
commit. The card is rendered from a Jinja template in `model_cards/` with `huggingface_hub.ModelCard`, so its YAML
metadata (library_name, base_model, tags, datasets, license, ...) is what the Hub reads.

A results file (`memorizing-hf eval --output results.json`) adds an evaluation table to the card. Its format:
`{"dataset": str | null, "documents": [str], "segment_length": int, "tokens": int,
"results": [{"memory_size": int, "perplexity": float}, ...]}` (memory size 0: each segment alone).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard, ModelCardData

from .modeling_memorizing import MEMORY_FILE_NAME, MemorizingForCausalLM

MODEL_CARD_TEMPLATE = Path(__file__).parent / "model_cards" / "memorizing_causal_lm.md"
TAGS = ("memorizing-transformers", "knn-memory", "long-context", "custom_code")


def model_card(
    model: MemorizingForCausalLM,
    *,
    repo_id: str | None = None,
    model_name: str | None = None,
    base_model: str | None = None,
    datasets: Sequence[str] | None = None,
    license: str | None = None,
    language: str | Sequence[str] | None = None,
    results: Mapping[str, Any] | str | Path | None = None,
    memory_file: str | None = None,
    template: str | Path | None = None,
) -> ModelCard:
    """The model card of `model`: YAML metadata for the Hub, memory settings, an evaluation table when `results` (a
    results dict or JSON file, see the module docstring) is given, and a usage snippet.

    `repo_id` (the snippet's) and `base_model` default to the model's and the base decoder's `name_or_path` when
    those are Hub ids (not local folders); `model_name` (the title) to the repo's name. `memory_file` names a memory
    file shipped beside the weights (the snippet then loads it).
    """
    config = model.config
    text_config = config.text_config
    if base_model is None:
        base_model = _hub_id(text_config.name_or_path)
    base_type = text_config.model_type
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        base_model=base_model,
        tags=[*TAGS, base_type],
        datasets=list(datasets) if datasets else None,
        license=license,
        language=language,
    )
    repo_id = repo_id or _hub_id(model.name_or_path)
    model_name = model_name or (repo_id.split("/")[-1] if repo_id else f"memorizing-{base_type}")
    entries = model.memory.entries() if memory_file else {}
    return ModelCard.from_template(
        card_data,
        template_path=str(template or MODEL_CARD_TEMPLATE),
        model_name=model_name,
        repo_id=repo_id or f"your-name/{model_name}",
        base_model_type=base_type,
        num_layers=text_config.num_hidden_layers,
        memory_layers=", ".join(str(layer) for layer in config.memory_layers),
        memory_size=config.memory_size,
        memory_top_k=config.memory_top_k,
        combine=config.combine,
        rotary_placement=model.memory_geometry.rotary_placement,  # "absolute" without rotary
        local_window=config.local_window,
        sink_tokens=config.sink_tokens,
        retrieval=config.retrieval,
        memory_file=memory_file,
        memory_entries=", ".join(str(count) for count in next(iter(entries.values()), [])) or "0",
        evaluation=_evaluation(results) if results is not None else None,
    )


def save_for_hub(
    model: MemorizingForCausalLM,
    save_directory: str | Path,
    *,
    tokenizer: Any = None,
    save_memory: bool = False,
    **card_kwargs: Any,
) -> Path:
    """Write a complete Hub-ready folder: weights, config, modeling code and generation config (`save_pretrained`),
    the tokenizer files, `memory.safetensors` if `save_memory`, and `README.md` (see `model_card` for `card_kwargs`).
    Returns the folder."""
    folder = Path(save_directory)
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if save_memory:
        model.save_memory(folder / MEMORY_FILE_NAME)
    card_kwargs.setdefault("model_name", folder.resolve().name)
    card = model_card(model, memory_file=MEMORY_FILE_NAME if save_memory else None, **card_kwargs)
    card.save(folder / "README.md")
    return folder


def push_to_hub(
    model: MemorizingForCausalLM,
    repo_id: str,
    *,
    tokenizer: Any = None,
    save_memory: bool = False,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str = "Upload memorizing model",
    **card_kwargs: Any,
) -> Any:
    """Create the Hub repo `repo_id` if needed and upload a `save_for_hub` folder to it in one commit.

    Unlike `model.push_to_hub`, which uploads only what `save_pretrained` writes, the repo gets the tokenizer, the
    model card and (with `save_memory`) the memory file. Returns the `huggingface_hub` commit info.
    """
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    card_kwargs.setdefault("model_name", repo_id.split("/")[-1])
    with tempfile.TemporaryDirectory() as folder:
        save_for_hub(model, folder, tokenizer=tokenizer, save_memory=save_memory, repo_id=repo_id, **card_kwargs)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            revision=revision,
            create_pr=create_pr,
            commit_message=commit_message,
        )


def _hub_id(name_or_path: str | Path) -> str | None:
    """`name_or_path` if it looks like a Hub repo id (`owner/name`, not an existing local path), else None."""
    name = str(name_or_path or "")
    if not name or Path(name).exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        return None
    return name


def _evaluation(results: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    """The evaluation table of a results dict or JSON file: rows by memory size, with the change vs. no memory."""
    if not isinstance(results, Mapping):
        path = Path(results)
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"Cannot read the results file {path}: {error}") from error
    try:
        rows = sorted(results["results"], key=lambda row: row["memory_size"])
        perplexities = {row["memory_size"]: float(row["perplexity"]) for row in rows}
    except (KeyError, TypeError) as error:
        raise ValueError(
            "A results file needs 'results': [{'memory_size': int, 'perplexity': float}, ...] "
            "(as written by `memorizing-hf eval --output`)."
        ) from error
    baseline = perplexities.get(0)
    table = []
    for size, perplexity in perplexities.items():
        change = "–" if baseline is None or size == 0 else f"{100 * (perplexity / baseline - 1):+.1f}%"
        table.append({"memory_size": size, "perplexity": perplexity, "change": change})
    return {
        "dataset": results.get("dataset"),
        "documents": list(results.get("documents", [])),
        "segment_length": results.get("segment_length", "?"),
        "tokens": results.get("tokens", "?"),
        "rows": table,
    }
