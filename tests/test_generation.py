"""generate() and memorize() with persistent memory and a bounded local window."""

from __future__ import annotations

import pytest
import torch

from memorizing_hf.memory import KNNMemory

from .conftest import VOCAB, read_positions, stored_positions, tiny_base, tiny_memorizing


def _ids(length: int, seed: int, batch: int = 1, exclude: int | None = None) -> torch.Tensor:
    ids = torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
    if exclude is not None:
        ids[ids == exclude] = exclude + 1
    return ids


def test_with_empty_memory_and_a_short_prompt_greedy_output_is_the_base_models() -> None:
    prompt = _ids(20, seed=0)
    expected = tiny_base("llama").generate(prompt, max_new_tokens=12, do_sample=False)
    model = tiny_memorizing("llama", combine="joint", local_window=64)
    assert torch.equal(model.generate(prompt, max_new_tokens=12, do_sample=False), expected)


def test_batched_left_padded_prompts_match_each_prompt_alone() -> None:
    documents = [_ids(90, seed=1)[0].tolist(), _ids(70, seed=2)[0].tolist()]
    prompts = [_ids(12, seed=3)[0], _ids(7, seed=4)[0]]
    batch = torch.zeros(2, 12, dtype=torch.long)
    mask = torch.zeros(2, 12, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        batch[row, 12 - len(prompt) :], mask[row, 12 - len(prompt) :] = prompt, 1
    model = tiny_memorizing("llama", combine="joint", local_window=16, memory_size=512)
    model.memorize(documents, progress=False)
    together = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, update_memory=False)
    for row, prompt in enumerate(prompts):
        alone = tiny_memorizing("llama", combine="joint", local_window=16, memory_size=512)
        alone.memorize([documents[row]], progress=False)
        expected = alone.generate(prompt.unsqueeze(0), max_new_tokens=8, do_sample=False, update_memory=False)
        assert together[row, 12:].tolist() == expected[0, len(prompt) :].tolist()


def test_beam_search_rows_read_the_memory_of_their_own_prompt() -> None:
    documents = [_ids(60, seed=5)[0].tolist(), _ids(60, seed=6)[0].tolist()]
    prompts = _ids(10, seed=7, batch=2)
    model = tiny_memorizing("llama", combine="joint", local_window=16, memory_size=512)
    model.memorize(documents, progress=False)
    entries = model.memory.entries()
    together = model.generate(prompts, max_new_tokens=6, num_beams=3, do_sample=False, update_memory=False)
    assert model.memory.entries() == entries  # update_memory=False leaves the memory as it was
    for row in range(2):
        alone = tiny_memorizing("llama", combine="joint", local_window=16, memory_size=512)
        alone.memorize([documents[row]], progress=False)
        expected = alone.generate(prompts[row : row + 1], max_new_tokens=6, num_beams=3, do_sample=False)
        assert together[row].tolist() == expected[0].tolist()


@pytest.mark.parametrize("length", [8, 16, 19, 40, 104, 150, 237, 240])
def test_every_token_generate_reads_is_stored_exactly_once(length: int) -> None:
    """Prompt and output (but the sinks and the last output token, which generate never feeds back) end up in memory
    once each, for prompts of 1x to 30x the 8-token window, whole multiples or not (150 tokens: the 600-token prompt
    through a 32-token window that once lost positions 600 and 602), and a second call continues the positions."""
    window = 8
    model = tiny_memorizing("llama", combine="joint", local_window=window, memory_size=1024)
    prompt = _ids(length, seed=length)
    first = model.generate(prompt, max_new_tokens=6, do_sample=False, update_memory=True)
    assert stored_positions(model) == read_positions(model, first[0])
    second = model.generate(_ids(window + 3, seed=100 + length), max_new_tokens=3, do_sample=False, update_memory=True)
    read_before = len(first[0]) - 1
    expected = read_positions(model, first[0]) + [read_before + p for p in read_positions(model, second[0])]
    assert stored_positions(model) == sorted(expected)


def test_the_issue_case_stores_the_generated_positions_600_and_602() -> None:
    """A 600-token prompt through a 32-token window, 6 new tokens: 604 entries, the generated positions among them."""
    model = tiny_memorizing("llama", combine="joint", local_window=32, memory_size=1024)
    sequence = model.generate(_ids(600, seed=600), max_new_tokens=6, do_sample=False, update_memory=True)[0]
    assert stored_positions(model) == read_positions(model, sequence)
    assert {600, 602} <= set(stored_positions(model))


@pytest.mark.parametrize("commit_every_turn", [False, True])
def test_a_chat_continuing_its_cache_stores_each_token_once(commit_every_turn: bool) -> None:
    """Two turns through one cache: whether the first turn commits (update_memory=True) or only the last, every token
    of the conversation is stored once; a commit moves the window into memory, so nothing is read twice either."""
    model = tiny_memorizing("llama", combine="joint", local_window=8, memory_size=512)
    cache = model.new_cache()
    first = model.generate(
        _ids(14, seed=9), cache=cache, max_new_tokens=3, do_sample=False, update_memory=commit_every_turn
    )
    chat = torch.cat([first, _ids(6, seed=10)], dim=1)
    second = model.generate(chat, cache=cache, max_new_tokens=5, do_sample=False, update_memory=True)
    assert stored_positions(model) == read_positions(model, second[0])
    assert cache.overflow.entries() == model.new_memory().entries()  # committed: nothing left to read twice


def test_transformers_chunked_prefill_reads_the_prompt_window_by_window_too() -> None:
    """`prefill_chunk_size` (transformers' own chunked prefill) hands the prompt over in chunks; at the window size it
    gives exactly what our streaming forward gives, and every token is still stored once."""
    prompt = _ids(200, seed=11)
    outputs = []
    for chunks in ({}, {"prefill_chunk_size": 16}):
        model = tiny_memorizing("llama", combine="joint", local_window=16, memory_size=1024)
        outputs.append(model.generate(prompt, max_new_tokens=8, do_sample=False, update_memory=True, **chunks))
        assert stored_positions(model) == read_positions(model, outputs[-1][0])
    assert torch.equal(outputs[0], outputs[1])


def _record_retrievals(monkeypatch) -> list[torch.Tensor]:
    """Record the document positions of every entry any memory retrieves (the model's or a cache's)."""
    search, found = KNNMemory.search, []

    def recording(memory, queries, k):
        scores, slots = search(memory, queries, k)
        rows = torch.arange(slots.shape[0]).view(-1, 1, 1, 1).expand_as(slots)
        found.append(torch.where(slots >= 0, memory.positions[rows, slots.clamp(min=0)], -1))
        return scores, slots

    monkeypatch.setattr(KNNMemory, "search", recording)
    return found


def test_a_second_generate_call_retrieves_what_the_first_one_read(monkeypatch) -> None:
    model = tiny_memorizing("llama", combine="joint", local_window=64, memory_size=512)
    first = model.generate(_ids(30, seed=8), max_new_tokens=10, do_sample=False, update_memory=True)
    read = first.shape[1] - 1 - model.config.sink_tokens  # the last token is never fed back; sinks are not stored
    assert model.memory.entries() == {1: [read]}
    found = _record_retrievals(monkeypatch)
    model.generate(_ids(12, seed=9), max_new_tokens=4, do_sample=False)
    positions = torch.cat([f.flatten() for f in found])
    assert found and (positions >= 0).any()
    assert positions[positions >= 0].max() < first.shape[1]  # every retrieved entry comes from the first call


def test_a_prompt_twenty_windows_long_keeps_the_cache_bounded_and_finds_a_planted_token(monkeypatch) -> None:
    window, planted = 16, 2
    model = tiny_memorizing(
        "llama", memory_layers=[0], combine="gate", rotary_placement="none", local_window=window, memory_size=1024
    )
    attention = model.language_model.model.layers[0].self_attn
    with torch.no_grad():  # queries equal keys in layer 0: a token's own stored key is its best cosine match
        group = attention.q_proj.out_features // attention.k_proj.out_features
        heads = attention.k_proj.weight.view(-1, attention.head_dim, attention.k_proj.in_features)
        attention.q_proj.weight.copy_(heads.repeat_interleave(group, dim=0).reshape_as(attention.q_proj.weight))
    prompt = _ids(20 * window, seed=10, exclude=planted)
    prompt[0, 5] = prompt[0, -1] = planted
    key_lengths = []
    hook = attention.register_forward_hook(
        lambda module, args, kwargs, out: key_lengths.append(kwargs["attention_mask"].shape[-1]), with_kwargs=True
    )
    found = _record_retrievals(monkeypatch)
    model.generate(prompt, max_new_tokens=1, do_sample=False)
    hook.remove()
    assert model.memory.is_empty()  # the prompt was read through the cache's own memory; model.memory is untouched
    cache_bound = model.config.sink_tokens + window + model.new_cache(window).evict_every + window
    assert max(key_lengths) <= cache_bound < prompt.shape[1]
    last_query_top1 = found[-1][0, :, -1, 0]  # best entry for the last prompt token, every kv head
    assert (last_query_top1 == 5).all()


def test_memorize_takes_texts_with_a_tokenizer_and_explains_missing_pieces() -> None:
    class Bytes:
        def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
            return {"input_ids": [3 + b % (VOCAB - 3) for b in text.encode()]}

    model = tiny_memorizing("llama", local_window=8, memory_size=256)
    entries = model.memorize(["a" * 40, "bb" * 30], tokenizer=Bytes(), progress=False)
    assert entries == {1: [39, 59]}
    with pytest.raises(ValueError, match="no tokenizer"):
        model.memorize(["text"])
    with pytest.raises(ValueError, match="every document needs at least one token"):
        model.memorize([[5, 6], []])
    assert model.memory.entries() == {1: [39, 59]}
