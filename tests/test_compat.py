"""The compatibility module is the only place that touches transformers' private names or submodules, and the cache
argument works under both of its names (`past_key_values` before transformers 5.24, `cache` since)."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

import memorizing_hf
from memorizing_hf import _compat

from .conftest import tiny_memorizing

PACKAGE = Path(memorizing_hf.__file__).parent
# The transformers classes whose private names the package could reach: those it subclasses or holds.
TRANSFORMERS_CLASSES = (
    transformers.PreTrainedModel,
    transformers.PretrainedConfig,
    transformers.GenerationMixin,
    transformers.GenerationConfig,
    transformers.DynamicCache,
    transformers.Trainer,
    transformers.TrainingArguments,
    transformers.TrainerCallback,
    transformers.TrainerState,
)
PRIVATE = re.compile(r"^_[A-Za-z][A-Za-z0-9_]*$")


def transformers_private_names() -> set[str]:
    """Private attribute names of the transformers classes (not those they inherit from torch or Python)."""
    instances = (transformers.PretrainedConfig(), transformers.GenerationConfig())  # attributes set in __init__
    names = {name for owner in (*TRANSFORMERS_CLASSES, *instances) for name in dir(owner) if PRIVATE.match(name)}
    return names - set(dir(nn.Module)) - set(dir(object))


def private_identifiers(path: Path) -> set[str]:
    """Private names a module reaches or defines on objects: attributes, keyword arguments, methods, class attributes
    and identifier-like strings (as given to getattr), leaving out the keys of `PRIVATE_NAMES`, which only list them."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    listed = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "PRIVATE_NAMES" for t in node.targets):
            listed = {id(key) for key in node.value.keys}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            found.add(node.attr)
        elif isinstance(node, ast.keyword) and node.arg:
            found.add(node.arg)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in listed:
            found.add(node.value)
        elif isinstance(node, ast.ClassDef):
            for statement in node.body:
                if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    found.add(statement.name)
                elif isinstance(statement, ast.Assign):
                    found |= {target.id for target in statement.targets if isinstance(target, ast.Name)}
    return {name for name in found if PRIVATE.match(name)}


def transformers_imports(path: Path) -> list[str]:
    """`import transformers.x` / `from transformers.x import y` statements (submodules, not the public top level)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("transformers."):
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.startswith("transformers.")]
    return found


def test_only_the_compat_module_touches_private_transformers_names_or_submodules() -> None:
    private = transformers_private_names() | set(_compat.PRIVATE_NAMES)
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name == "_compat.py":
            continue
        assert not private_identifiers(path) & private, path.name
        assert not transformers_imports(path), path.name


def test_the_compat_module_lists_every_private_name_it_uses() -> None:
    used = private_identifiers(PACKAGE / "_compat.py")
    own = {name for name in used if hasattr(_compat, name)}  # its own helpers
    assert used - own == set(_compat.PRIVATE_NAMES)
    assert all(reason.strip() for reason in _compat.PRIVATE_NAMES.values())


def test_the_cache_argument_is_named_as_this_release_names_it() -> None:
    assert _compat.CACHE_ARGUMENT in inspect.signature(transformers.LlamaForCausalLM.forward).parameters


def test_forward_streams_with_the_cache_under_either_name(token_ids) -> None:
    ids = token_ids(batch=1, length=100)
    logits = []
    for name in ("cache", "past_key_values"):
        model = tiny_memorizing("llama", combine="joint", local_window=8)
        cache = model.new_cache(8)
        logits.append(model(ids, **{name: cache}).logits)
        assert cache.num_columns <= model.config.sink_tokens + 8 + cache.evict_every  # streamed: a bounded window
        assert not cache.overflow.is_empty()
    torch.testing.assert_close(logits[0], logits[1], atol=0, rtol=0)
    model = tiny_memorizing("llama")
    with pytest.raises(ValueError, match="Pass the cache once"):
        model(ids, cache=model.new_cache(8), past_key_values=model.new_cache(8))
