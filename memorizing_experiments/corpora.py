"""Our corpora: the offline documents of `sources` by name, and train / held-out splits prepared once, saved to disk.

`CORPORA` names the offline corpora ("stdlib", "hol_light", "latex", "python_docs", "austen") and `load_documents`
reads one of them, or a folder or list of files (`memorizing_hf.data.load_documents`), as a `datasets.Dataset` with
columns "name" and "text".

`prepare_corpus(source)` reads every document of a source (a corpus name, a folder of text files, or a `datasets`
data set saved with `save_to_disk`, with a "text" column), splits the documents by name and saves a
`datasets.DatasetDict` with the splits "train" and "held_out" under `sources.cache_dir()/corpora/`, beside
`split.json`, which names the documents of each split. Later calls load it.

The split is deterministic and depends on nothing but each document's name (its path relative to the corpus's
folder, or its title): documents are ordered by the SHA-256 of their name and the first `HELD_OUT_FRACTION` are held
out. Long documents (at least `LONG_DOCUMENT_CHARS` characters, about 50K tokens of code) are split on their own, so
that the held-out side has long documents too, which is where memory size matters.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import datasets

from memorizing_hf import data

from . import sources

CORPORA: dict[str, Callable[[], list[Path] | dict[str, str]]] = {
    "stdlib": sources.stdlib_files,
    "hol_light": sources.hol_light_files,
    "latex": sources.latex_manual_files,
    "python_docs": sources.python_doc_files,
    "austen": sources.austen_novels,  # title -> text
}
HELD_OUT_FRACTION = 0.1
LONG_DOCUMENT_CHARS = 160_000
SPLITS = ("train", "held_out")
SPLIT_FILE = "split.json"


def load_documents(source: str | Path | Sequence[str | Path], pattern: str = "**/*") -> datasets.Dataset:
    """Documents with columns "name" (file path or title) and "text": a corpus of `CORPORA` (fetched and cached on
    first use), or a folder (its files matching `pattern`, sorted) or a list of files."""
    if isinstance(source, str) and source in CORPORA:
        found = CORPORA[source]()
        if isinstance(found, dict):
            return datasets.Dataset.from_dict({"name": list(found), "text": list(found.values())})
        return data.load_documents(found)
    if isinstance(source, (str, Path)) and not Path(source).expanduser().is_dir():
        raise FileNotFoundError(f"{str(source)!r} is neither a folder nor a corpus name ({', '.join(CORPORA)}).")
    return data.load_documents(source, pattern)


def held_out_names(names: list[str], lengths: list[int], fraction: float = HELD_OUT_FRACTION) -> list[str]:
    """The names to hold out: in each stratum (long documents, the rest), the `fraction` with the smallest hash of
    their name, rounded, and at least one when the stratum has two documents or more; sorted."""
    held_out = []
    for long in (True, False):
        stratum = [name for name, n in zip(names, lengths) if (n >= LONG_DOCUMENT_CHARS) == long]
        count = max(1, round(fraction * len(stratum))) if len(stratum) >= 2 else 0
        held_out += sorted(stratum, key=lambda name: hashlib.sha256(name.encode()).hexdigest())[:count]
    return sorted(held_out)


def corpus_dir(source: str | Path) -> Path:
    """Where the prepared corpus of `source` lives: `corpora/<name>` for a corpus name, `corpora/<folder>-<hash>`
    (a hash of the resolved path) for a folder or saved data set."""
    if isinstance(source, str) and source in CORPORA:
        return sources.cache_dir() / "corpora" / source
    path = Path(source).expanduser().resolve()
    return sources.cache_dir() / "corpora" / f"{path.name}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


def _read(source: str | Path) -> datasets.Dataset:
    """Documents of `source` with columns "name" (a path relative to the corpus's folder, or a title) and "text"."""
    if isinstance(source, str) and source in CORPORA:
        documents = load_documents(source)
        names = list(documents["name"])
        if all(os.path.isabs(name) for name in names):  # files: relative to their common folder
            root = os.path.commonpath(names) if len(names) > 1 else os.path.dirname(names[0])
            names = [os.path.relpath(name, root) for name in names]
    else:
        folder = Path(source).expanduser().resolve()
        if (folder / "dataset_info.json").is_file():  # a data set saved with `save_to_disk`
            documents = datasets.load_from_disk(str(folder))
            if "name" in documents.column_names:
                return documents.select_columns(["name", "text"])
            names = [f"document-{i:06d}" for i in range(len(documents))]
        else:
            documents = load_documents(folder)
            names = [os.path.relpath(name, folder) for name in documents["name"]]
    return documents.select_columns(["text"]).add_column("name", names).select_columns(["name", "text"])


def prepare_corpus(source: str | Path, refresh: bool = False) -> datasets.DatasetDict:
    """The prepared corpus of `source` (see the module docstring): built on the first call, then loaded."""
    final = corpus_dir(source)
    if final.is_dir() and not refresh:
        return datasets.load_from_disk(str(final))
    documents = _read(source)
    held_out = set(held_out_names(list(documents["name"]), [len(text) for text in documents["text"]]))
    is_held_out = [name in held_out for name in documents["name"]]
    corpus = datasets.DatasetDict(
        {
            "train": documents.select([i for i, out in enumerate(is_held_out) if not out]),
            "held_out": documents.select([i for i, out in enumerate(is_held_out) if out]),
        }
    )
    record = {
        "source": str(source),
        "rule": f"held out: in each stratum (>= {LONG_DOCUMENT_CHARS} characters, shorter), the {HELD_OUT_FRACTION} "
        "of documents with the smallest SHA-256 of their name (at least one of a stratum of two or more)",
        **{split: sorted(corpus[split]["name"]) for split in SPLITS},
    }
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".{final.name}-") as tmp:
        build = Path(tmp) / "corpus"
        corpus.save_to_disk(str(build))
        (build / SPLIT_FILE).write_text(json.dumps(record, indent=1))
        if refresh and final.is_dir():
            shutil.rmtree(final)
        try:
            build.rename(final)
        except OSError:  # another process prepared it first: the split is the same
            if not final.is_dir():
                raise
    return datasets.load_from_disk(str(final))


def load_split(source: str | Path, split: str) -> datasets.Dataset:
    """One split ("train" or "held_out") of the prepared corpus of `source`, prepared on first use."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}: choose one of {', '.join(SPLITS)}.")
    return prepare_corpus(source)[split]


def split_record(source: str | Path) -> dict:
    """The contents of the prepared corpus's `split.json` (source, rule, and the names of each split)."""
    prepare_corpus(source)
    return json.loads((corpus_dir(source) / SPLIT_FILE).read_text())
