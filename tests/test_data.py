"""Document streams against the documents themselves: rebuilt from the batches, every document comes back exactly."""

from __future__ import annotations

import gzip
from collections import Counter

import datasets
import numpy as np
import pytest
import torch
from accelerate.data_loader import IterableDatasetShard
from torch.utils.data import DataLoader
from transformers import ByT5Tokenizer, Trainer, TrainingArguments

from memorizing_hf.data import DocumentStreams, collate_segments, load_documents, read_text, tokenize_documents

from .conftest import tiny_memorizing

SEGMENT = 8
# Shorter than a segment, exactly one, one token over (a one-token ragged end), several with a ragged end, long.
LENGTHS = [3, 8, 9, 17, 25, 2, 40, 12, 5, 33, 16, 7]


def documents(lengths: list[int] = LENGTHS, seed: int = 0) -> list[list[int]]:
    generator = np.random.default_rng(seed)
    return [generator.integers(3, 90, size=n).tolist() for n in lengths]


def process_batches(streams: DocumentStreams, process: int, mode: str) -> list[dict[str, torch.Tensor]]:
    """The batches one process gets from accelerate: by sharding the data set (each process iterates it and keeps its
    own part) or by dispatching (the main process reads every batch and process p gets every p-th one)."""
    size, count = streams.batch_size, streams.num_processes
    if mode == "shard":
        shard = IterableDatasetShard(streams, batch_size=size, num_processes=count, process_index=process)
        return list(DataLoader(shard, batch_size=size, collate_fn=collate_segments))
    return list(DataLoader(streams, batch_size=size, collate_fn=collate_segments))[process::count]


def rebuild(batches: list[dict[str, torch.Tensor]]) -> list[list[int]]:
    """Documents read by the rows of `batches`, in the order they start: a row's document begins where its reset flag
    is set and continues, without padding, until the next flag. Padding-only segments may only end a row."""
    started: list[tuple[int, int, list[int]]] = []
    current: dict[int, list[int]] = {}
    finished: set[int] = set()
    for step, batch in enumerate(batches):
        assert torch.equal(batch["labels"], batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100))
        for row, (ids, mask, reset) in enumerate(
            zip(batch["input_ids"], batch["attention_mask"], batch["memory_reset"])
        ):
            real = ids[mask.bool()].tolist()
            assert mask.tolist() == sorted(mask.tolist(), reverse=True), "padding only at the end of a segment"
            if not real:
                assert not reset
                finished.add(row)
                continue
            assert row not in finished, "a row read a document after padding-only segments"
            assert len(real) >= 2, "every segment predicts at least one token"
            if reset:
                current[row] = list(real)
                started.append((step, row, current[row]))
            else:
                current[row].extend(real)
    return [tokens for _, _, tokens in sorted(started, key=lambda item: item[:2])]


@pytest.mark.parametrize("mode", ["shard", "dispatch"])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("num_processes", [1, 2])
def test_batches_rebuild_every_document_exactly_once(num_processes: int, shuffle: bool, mode: str) -> None:
    docs = documents()
    streams = DocumentStreams(docs, SEGMENT, batch_size=2, num_processes=num_processes, shuffle=shuffle, seed=3)
    per_process = [process_batches(streams, process, mode) for process in range(num_processes)]
    assert all(len(batches) == streams.steps_per_epoch for batches in per_process)
    rebuilt = [rebuild(batches) for batches in per_process]
    everything = [tuple(doc) for process in rebuilt for doc in process]
    assert Counter(everything) == Counter(tuple(doc) for doc in docs)
    if not shuffle and num_processes == 1:
        # each row reads its documents in their original order
        for row in range(streams.batch_size):
            row_docs = rebuild(
                [{key: value[row : row + 1] for key, value in batch.items()} for batch in per_process[0]]
            )
            assert [docs.index(doc) for doc in row_docs] == sorted(docs.index(doc) for doc in row_docs)


def test_rows_end_together_and_the_length_counts_every_segment() -> None:
    streams = DocumentStreams(documents(), SEGMENT, batch_size=3)
    segments = sum(-(-n // SEGMENT) for n in LENGTHS)
    longest = max(-(-n // SEGMENT) for n in LENGTHS)
    assert max(longest, -(-segments // 3)) <= streams.steps_per_epoch <= -(-segments // 3) + longest
    assert len(list(streams)) == len(streams) == 3 * streams.steps_per_epoch


def test_order_is_fixed_by_the_seed_and_shuffled_per_epoch() -> None:
    def epoch_batches(streams: DocumentStreams, epoch: int) -> list[torch.Tensor]:
        streams.set_epoch(epoch)
        return [batch["input_ids"] for batch in DataLoader(streams, batch_size=2, collate_fn=collate_segments)]

    def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
        return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))

    docs = documents(lengths=[9, 17, 25, 40, 12, 33, 16, 20, 30, 11])
    first, second = (DocumentStreams(docs, SEGMENT, batch_size=2, shuffle=True, seed=7) for _ in range(2))
    assert same(epoch_batches(first, 0), epoch_batches(second, 0))
    assert not same(epoch_batches(first, 0), epoch_batches(first, 1))
    assert len(epoch_batches(first, 1)) == len(epoch_batches(first, 0)) == first.steps_per_epoch
    other_seed = DocumentStreams(docs, SEGMENT, batch_size=2, shuffle=True, seed=8)
    assert not same(epoch_batches(first, 0), epoch_batches(other_seed, 0))
    fixed = DocumentStreams(docs, SEGMENT, batch_size=2, shuffle=False)
    assert same(epoch_batches(fixed, 0), epoch_batches(fixed, 5))


def test_load_and_tokenize_documents_from_a_folder(tmp_path) -> None:
    texts = {"a.txt": "first document\n" * 3, "b/c.txt": "second", "d.txt.gz": "zipped text", "e.txt": ""}
    for name, text in texts.items():
        path = tmp_path / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
    loaded = load_documents(tmp_path)
    assert loaded["name"] == [str(tmp_path / name) for name in sorted(texts)]
    assert loaded["text"] == [texts[name] for name in sorted(texts)]
    assert load_documents([tmp_path / "b/c.txt"])["text"] == ["second"]

    tokenizer = ByT5Tokenizer(extra_ids=0)
    tokenized = tokenize_documents(loaded, tokenizer, min_tokens=8, max_tokens=10)
    expected = [tokenizer(texts[name]).input_ids[:10] for name in sorted(texts)]
    assert list(tokenized["input_ids"]) == [ids for ids in expected if len(ids) >= 8]
    assert tokenized.column_names == ["name", "input_ids"]
    from_dataset = DocumentStreams(tokenized, SEGMENT, batch_size=2)
    from_lists = DocumentStreams([ids for ids in expected if len(ids) >= 8], SEGMENT, batch_size=2)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(from_dataset, from_lists))


@pytest.mark.parametrize(
    ("docs", "kwargs", "message"),
    [
        ([], {}, "has no documents"),
        ([[5, 6], [], [7, 8]], {}, "Document 1 has 0 token"),
        ([[5, 6], [9]], {}, "Document 1 has 1 token"),
        ([[5, 6], [7, 8], [9, 10]], {"batch_size": 2, "num_processes": 2}, "4 batch rows .* only 3 documents"),
        ([[5, 6]], {"segment_length": 1}, "segment_length must be an integer >= 2"),
        ([[5, 6]], {"batch_size": 0}, "batch_size must be an integer >= 1"),
    ],
)
def test_bad_inputs_are_refused_with_clear_errors(docs: list, kwargs: dict, message: str) -> None:
    arguments = {"segment_length": SEGMENT, "batch_size": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        DocumentStreams(docs, **arguments)


def test_an_empty_document_is_named_in_the_error(tmp_path) -> None:
    tokenized = datasets.Dataset.from_dict({"name": ["full.txt", "empty.txt"], "input_ids": [[5, 6, 7], []]})
    with pytest.raises(ValueError, match=r"Document 1 \('empty\.txt'\) has 0 token.*min_tokens"):
        DocumentStreams(tokenized, SEGMENT, batch_size=1)
    with pytest.raises(FileNotFoundError, match="No folder '.*missing' to read documents from"):
        load_documents(tmp_path / "missing")


def test_read_text_plain_gzip_and_latin1(tmp_path) -> None:
    text = "\\section{Théorème}\nα + β = γ\n"
    (tmp_path / "a.tex").write_text(text, encoding="utf-8")
    (tmp_path / "a.tex.gz").write_bytes(gzip.compress(text.encode("utf-8")))
    (tmp_path / "l.tex").write_bytes("Théorème\n".encode("latin-1"))
    assert read_text(tmp_path / "a.tex") == text
    assert read_text(tmp_path / "a.tex.gz") == text
    assert read_text(tmp_path / "l.tex") == "Théorème\n"


def _batches(streams: DocumentStreams) -> list[dict[str, torch.Tensor]]:
    return list(DataLoader(streams, batch_size=streams.batch_size, collate_fn=collate_segments))


def test_streaming_datasets_are_read_whole_and_laid_out_like_a_dataset() -> None:
    """`Dataset.to_iterable_dataset()` (a streaming data set): the same batches as the data set itself, whether it
    arrives tokenized or is tokenized lazily by `tokenize_documents`."""
    docs = documents()
    names = [f"doc_{index}.txt" for index in range(len(docs))]
    tokenized = datasets.Dataset.from_dict({"name": names, "input_ids": docs})
    expected = _batches(DocumentStreams(tokenized, SEGMENT, batch_size=2, shuffle=True, seed=1))
    streamed = DocumentStreams(tokenized.to_iterable_dataset(), SEGMENT, batch_size=2, shuffle=True, seed=1)
    assert streamed.num_documents == len(docs)
    got = _batches(streamed)
    assert len(got) == len(expected)
    assert all(torch.equal(a[key], b[key]) for a, b in zip(got, expected) for key in a)

    tokenizer = ByT5Tokenizer(extra_ids=0)
    texts = datasets.Dataset.from_dict({"name": ["a", "b", "c"], "text": ["first text", "second, longer text", "x"]})
    lazily = tokenize_documents(texts.to_iterable_dataset(), tokenizer, min_tokens=4)
    in_memory = tokenize_documents(texts, tokenizer, min_tokens=4)
    assert isinstance(lazily, datasets.IterableDataset)
    from_stream, from_dataset = (DocumentStreams(d, SEGMENT, batch_size=1) for d in (lazily, in_memory))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(from_stream, from_dataset))

    short = datasets.Dataset.from_dict({"name": ["full.txt", "one.txt"], "input_ids": [[5, 6, 7], [8]]})
    with pytest.raises(ValueError, match=r"Document 1 \('one\.txt'\) has 1 token"):
        DocumentStreams(short.to_iterable_dataset(), SEGMENT, batch_size=1)


@pytest.mark.parametrize("streaming", [False, True])
def test_documents_that_are_still_text_are_refused_with_the_fix(streaming: bool) -> None:
    texts = datasets.Dataset.from_dict({"name": ["a"], "text": ["not tokenized"]})
    with pytest.raises(ValueError, match=r"\"input_ids\" column; the documents have \['name', 'text'\]: tokenize"):
        DocumentStreams(texts.to_iterable_dataset() if streaming else texts, SEGMENT, batch_size=1)


def test_dataloader_workers_are_refused() -> None:
    streams = DocumentStreams(documents(), SEGMENT, batch_size=2)
    with pytest.raises(RuntimeError, match="dataloader_num_workers=0"):
        next(iter(DataLoader(streams, batch_size=2, num_workers=1, collate_fn=collate_segments)))


class _WithExtraColumn(torch.utils.data.IterableDataset):
    """Streams whose items carry a column the model does not take, as a user's data might."""

    def __init__(self, streams: DocumentStreams) -> None:
        self.streams = streams

    def __iter__(self):
        for item in self.streams:
            yield {**item, "document_name": "x"}


def test_memory_reset_survives_remove_unused_columns(tmp_path) -> None:
    streams = DocumentStreams(documents(), SEGMENT, batch_size=2)
    args = TrainingArguments(
        tmp_path, per_device_train_batch_size=2, max_steps=1, use_cpu=True, report_to="none", remove_unused_columns=True
    )
    trainer = Trainer(
        model=tiny_memorizing(), args=args, train_dataset=_WithExtraColumn(streams), data_collator=collate_segments
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "memory_reset"}
    expected = next(iter(DataLoader(streams, batch_size=2, collate_fn=collate_segments)))
    assert batch["memory_reset"].dtype == torch.bool
    assert all(torch.equal(batch[key], expected[key]) for key in expected)
