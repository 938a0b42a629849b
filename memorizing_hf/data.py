"""Long documents as parallel streams of segments, the way a memorizing model must read them.

A memorizing model learns to use its memory only if every batch row reads one document in order, segment after
segment, and its memory is cleared when a new document starts in that row (Wu et al. 2022, meliad). This file turns
documents into such batches:

1. `load_documents`: a folder or a list of text files -> a `datasets.Dataset` with columns "name" and "text" (the
   named corpora of our experiments are in `memorizing_experiments.corpora`).
2. `tokenize_documents`: `datasets.map(batched=True)` with a tokenizer -> column "input_ids" (a `Dataset` or a
   streaming `IterableDataset`).
3. `DocumentStreams`: an `IterableDataset` of segments laid out as `batch_size` parallel streams per process, with a
   `memory_reset` flag on the first segment of every document; `collate_segments` stacks them into batches with labels.

Layout. Each document is cut into segments of `segment_length` tokens; its ragged end is padded (attention mask 0,
label -100), never packed with the next document, so a segment belongs to one document and a row's reset flag is
exact. (When the ragged end would be a single token, which predicts nothing, the segment before it gives up one
token to it.) Documents are dealt to rows once, longest first to the least loaded row, so rows end at about the same
step; a row that runs out of documents reads padding-only segments until the epoch's last step. With `shuffle`, every
epoch visits each row's documents in a new order and permutes the rows, from `seed` and the epoch number. Every epoch
has the same number of steps, so the Trainer can resume exactly in any epoch.

Processes. The dataset lays out rows for all `num_processes` processes: step t yields process 0's `batch_size`
segments, then process 1's, and so on. `accelerate` (the Trainer, or `accelerator.prepare(DataLoader(...))`) hands
process p every p-th batch of `batch_size`, whether it dispatches batches from the main process or shards the
dataset, so each process reads its own disjoint rows with continuity kept. Memory is per process and per row: each
process's model remembers only the documents of its own rows.
"""

from __future__ import annotations

import gzip
import heapq
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import datasets
import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info


def read_text(path: str | Path) -> str:
    """The text of a file, gunzipped if its name ends in `.gz`; UTF-8, or Latin-1 where that fails."""
    path = Path(path)
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def load_documents(source: str | Path | Sequence[str | Path], pattern: str = "**/*") -> datasets.Dataset:
    """Documents with columns "name" (the file's path) and "text" (`read_text`): the files of a folder matching
    `pattern`, sorted, or a list of files."""
    if isinstance(source, (str, Path)):
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"No folder {str(source)!r} to read documents from.")
        source = sorted(path for path in folder.glob(pattern) if path.is_file())
    names = [str(path) for path in source]
    return datasets.Dataset.from_dict({"name": names, "text": [read_text(name) for name in names]})


def tokenize_documents(
    documents: datasets.Dataset | datasets.IterableDataset,
    tokenizer,
    text_column: str = "text",
    min_tokens: int = 0,
    max_tokens: int | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """Replace `text_column` by "input_ids" (the tokenizer's ids of the whole document, special tokens as the
    tokenizer adds them), cut to the first `max_tokens`; documents with fewer than `min_tokens` are dropped. A streaming
    `IterableDataset` is tokenized lazily, as it is read."""

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        ids = tokenizer(batch[text_column], verbose=False)["input_ids"]
        return {"input_ids": [x[:max_tokens] for x in ids] if max_tokens is not None else ids}

    progress = {"desc": "tokenizing"} if isinstance(documents, datasets.Dataset) else {}  # streams have no progress bar
    tokenized = documents.map(tokenize, batched=True, remove_columns=[text_column], **progress)
    if min_tokens > 0:
        tokenized = tokenized.filter(
            lambda ids: [len(x) >= min_tokens for x in ids], input_columns="input_ids", batched=True
        )
    return tokenized


class DocumentStreams(IterableDataset):
    """Segments of tokenized documents as `batch_size` parallel streams per process (see the module docstring).

    Each item is one segment: `input_ids` and `attention_mask` `[segment_length]`, and `memory_reset` (a bool
    scalar, True exactly on the first segment of a document; False on padding-only segments). Batch them with
    `collate_segments` and a batch size of exactly `batch_size` (the Trainer's `per_device_*_batch_size`).

    Args:
        documents: a `datasets.Dataset` or a streaming `datasets.IterableDataset` with "input_ids" (and optionally
            "name", used in error messages), or a sequence of token id sequences. Laying documents out in rows needs
            the length of every document, so a stream is read once, whole, here and its token ids are kept in memory
            (as they are for a `Dataset`): it must be finite.
        segment_length: tokens per segment (the model's local context).
        batch_size: parallel streams (batch rows) per process.
        num_processes: processes sharing the documents; defaults to `accelerate.PartialState().num_processes`.
        shuffle: visit documents in a new order every epoch (`set_epoch`, which the Trainer calls).
        seed: seed of the per-epoch order.
        pad_token_id: id written at padding positions (never attended to, never a label).
    """

    def __init__(
        self,
        documents: datasets.Dataset | datasets.IterableDataset | Sequence[Sequence[int]],
        segment_length: int,
        batch_size: int,
        num_processes: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
        pad_token_id: int = 0,
    ) -> None:
        if num_processes is None:
            from accelerate import PartialState

            num_processes = PartialState().num_processes
        for name, value, least in [("segment_length", segment_length, 2), ("batch_size", batch_size, 1)]:
            if not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}.")
        self.segment_length, self.batch_size, self.num_processes = segment_length, batch_size, num_processes
        self.shuffle, self.seed, self.pad_token_id = shuffle, seed, pad_token_id
        self.epoch = 0

        arrays, names = _token_arrays(documents)
        if not arrays:
            raise ValueError("The data set has no documents.")
        lengths = np.array([len(tokens) for tokens in arrays])
        for index in np.flatnonzero(lengths < 2):
            label = f"Document {index}" + (f" ({names[index]!r})" if names is not None else "")
            raise ValueError(
                f"{label} has {lengths[index]} token(s); every document needs at least 2 (each token is predicted "
                "from the ones before it). Drop short documents, e.g. tokenize_documents(..., min_tokens=2)."
            )
        rows = num_processes * batch_size
        if rows > len(arrays):
            raise ValueError(
                f"{rows} batch rows ({num_processes} process(es) x batch_size {batch_size}) but only {len(arrays)} "
                f"documents: each row streams whole documents, so use at most {len(arrays) // num_processes} rows "
                "per process, or more documents."
            )
        self._tokens = np.concatenate(arrays)
        self._offsets = np.concatenate(([0], np.cumsum(lengths)))
        self._segments = [_segment_bounds(int(n), segment_length) for n in lengths]
        self._rows = _deal(np.array([len(bounds) - 1 for bounds in self._segments]), rows)
        self.steps_per_epoch = max(sum(len(self._segments[d]) - 1 for d in row) for row in self._rows)

    @property
    def num_documents(self) -> int:
        """Documents read per epoch (over all processes)."""
        return len(self._segments)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose document order the next iteration yields (only matters with `shuffle`)."""
        self.epoch = epoch

    def __len__(self) -> int:
        """Segments per epoch over all processes (padding-only segments included)."""
        return self.steps_per_epoch * self.num_processes * self.batch_size

    def _row_documents(self, epoch: int) -> list[list[int]]:
        """The documents each row reads in `epoch`, in order; row `p * batch_size + b` is row b of process p."""
        if not self.shuffle:
            return [list(row) for row in self._rows]
        generator = np.random.default_rng([self.seed, epoch])
        order = generator.permutation(len(self._rows))
        return [[self._rows[r][i] for i in generator.permutation(len(self._rows[r]))] for r in order]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if get_worker_info() is not None:
            raise RuntimeError(
                "DocumentStreams must be read by a single DataLoader process, in order (set dataloader_num_workers=0"
                "); its segments are cheap slices of tokens kept in memory."
            )
        streams = [self._stream(documents) for documents in self._row_documents(self.epoch)]
        for _ in range(self.steps_per_epoch):
            for stream in streams:
                yield next(stream)

    def _stream(self, documents: list[int]) -> Iterator[dict[str, torch.Tensor]]:
        """One row: every segment of its documents, then padding-only segments forever."""
        for document in documents:
            bounds, offset = self._segments[document], self._offsets[document]
            for start, end in zip(bounds[:-1], bounds[1:]):
                yield self._item(self._tokens[offset + start : offset + end], reset=start == 0)
        while True:
            yield self._item(self._tokens[:0], reset=False)

    def _item(self, tokens: np.ndarray, reset: bool) -> dict[str, torch.Tensor]:
        input_ids = torch.full((self.segment_length,), self.pad_token_id, dtype=torch.long)
        input_ids[: len(tokens)] = torch.from_numpy(tokens)
        attention_mask = torch.zeros(self.segment_length, dtype=torch.long)
        attention_mask[: len(tokens)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "memory_reset": torch.tensor(reset)}


def _token_arrays(documents: Iterable) -> tuple[list[np.ndarray], list[str] | None]:
    """Every document's token ids (int64) and, where the documents have a "name", their names. Rows of a data set
    (or of a stream) must have "input_ids": documents that are still text are refused with the fix."""
    if isinstance(documents, datasets.Dataset):
        _check_tokenized(documents.column_names)
        names = list(documents["name"]) if "name" in documents.column_names else None
        rows = documents.with_format("numpy", columns=["input_ids"])
        return [np.asarray(row["input_ids"], dtype=np.int64).reshape(-1) for row in rows], names
    arrays, names = [], []
    for document in documents:
        if isinstance(document, Mapping):  # a row of an IterableDataset
            _check_tokenized(list(document))
            names.append(document.get("name"))
            document = document["input_ids"]
        arrays.append(np.asarray(document, dtype=np.int64).reshape(-1))
    return arrays, names if any(name is not None for name in names) else None


def _check_tokenized(columns: list[str]) -> None:
    if "input_ids" not in columns:
        raise ValueError(
            f'DocumentStreams reads token ids from an "input_ids" column; the documents have {columns}: tokenize '
            "them first, e.g. tokenize_documents(documents, tokenizer)."
        )


def _segment_bounds(length: int, segment_length: int) -> list[int]:
    """Start offsets of a document's segments, then its length; a one-token ragged end takes a token from the
    segment before it, so that every segment has something to predict."""
    bounds = list(range(0, length, segment_length)) + [length]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        bounds[-2] -= 1
    return bounds


def _deal(segments: np.ndarray, rows: int) -> list[list[int]]:
    """Documents per row: longest first, each to the row with the fewest segments so far (ties: lowest row); each row's
    documents in their original order."""
    heap = [(0, row) for row in range(rows)]
    dealt: list[list[int]] = [[] for _ in range(rows)]
    for document in sorted(range(len(segments)), key=lambda d: (-segments[d], d)):
        load, row = heapq.heappop(heap)
        dealt[row].append(document)
        heapq.heappush(heap, (load + int(segments[document]), row))
    return [sorted(documents) for documents in dealt]


def collate_segments(features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack segments into a batch: `input_ids`, `attention_mask`, `memory_reset` `[batch]` (bool) and `labels`
    (the input ids, -100 at padding; the model shifts them). All four are forward arguments of
    `MemorizingForCausalLM`, so the Trainer's `remove_unused_columns` keeps them."""
    batch = {key: torch.stack([feature[key] for feature in features]) for key in features[0]}
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch
