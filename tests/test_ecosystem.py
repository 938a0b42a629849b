"""Ordinary Hugging Face calls on a memorizing model, as a transformers / PEFT / accelerate user makes them.

Each test is one call a user tries (pipelines, sampling several sequences, assisted decoding, evaluation harnesses,
PEFT adapters, accelerate checkpoints, `AutoModel`, ...) and checks the right result against an independent reference:
the same call on a model copy that read the same documents, the base model, or the memory's contents.
"""

from __future__ import annotations

import logging

import pytest
import torch
import transformers

from memorizing_hf import MemorizingForCausalLM, MemorizingModel

from .conftest import VOCAB, read_positions, stored_positions, tiny_base, tiny_memorizing, tiny_tokenizer

ARCHITECTURES = ["llama", "qwen2", "gpt2", "gemma2"]
pytestmark = pytest.mark.usefixtures("one_thread")


def _ids(length: int, seed: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _reading(arch: str, seed: int = 0, **kwargs: object) -> MemorizingForCausalLM:
    """A tiny joint-mode model that has memorized one document of five windows."""
    kwargs = {"combine": "joint", "local_window": 16, "memory_size": 512, **kwargs}
    model = tiny_memorizing(arch, seed=seed, **kwargs)
    model.memorize([_ids(80, seed=100)[0].tolist()], progress=False)
    return model


def _snapshot(model: MemorizingForCausalLM) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.memory.state_dict().items() if name != "geometry"}


def _same_memory(model: MemorizingForCausalLM, snapshot: dict[str, torch.Tensor]) -> bool:
    now = {name: tensor for name, tensor in model.memory.state_dict().items() if name != "geometry"}
    return now.keys() == snapshot.keys() and all(torch.equal(now[n], snapshot[n]) for n in now)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_several_sampled_sequences_share_their_prompts_memory_row(arch: str) -> None:
    model = _reading(arch)
    before = _snapshot(model)
    torch.manual_seed(0)
    sequences = model.generate(_ids(6, seed=1), do_sample=True, num_return_sequences=3, max_new_tokens=5)
    assert sequences.shape == (3, 11)
    assert _same_memory(model, before)
    # each sequence equals sampling it alone from a model that read the same document, with the same random draws
    reference = _reading(arch)
    torch.manual_seed(0)
    alone = reference.generate(_ids(6, seed=1).expand(3, -1), do_sample=True, max_new_tokens=5)
    assert torch.equal(sequences, alone)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_pipeline_over_a_list_of_prompts_reads_the_memory_without_cross_talk(arch: str) -> None:
    model = _reading(arch)
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token, tokenizer.padding_side = tokenizer.eos_token, "left"
    before = _snapshot(model)
    generator = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)
    prompts = ["def f(x):", "class A:", "import os"]
    settings = {"max_new_tokens": 6, "do_sample": False, "return_full_text": False}
    one_by_one = [out[0]["generated_text"] for out in generator(prompts, **settings)]
    batched = [out[0]["generated_text"] for out in generator(prompts, batch_size=2, **settings)]
    assert _same_memory(model, before)  # no prompt wrote anything for the next one to read
    for prompt, text, in_batch in zip(prompts, one_by_one, batched):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        alone = _reading(arch).generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1] :]
        assert text == tokenizer.decode(alone, skip_special_tokens=True)
        assert in_batch == text


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_assisted_and_prompt_lookup_decoding_give_greedy_decoding_with_a_filled_memory(arch: str) -> None:
    """Drafted tokens are verified in one forward and the rejected ones cropped from the cache. (Exactly greedy while
    no eviction falls inside a verification step: the window moves in blocks of `evict_every` tokens.)"""
    model = _reading(arch, local_window=64)
    prompt = _ids(40, seed=2)
    settings = {"max_new_tokens": 12, "do_sample": False, "eos_token_id": 2}  # transformers 5.3 needs an eos id
    greedy = model.generate(prompt, **settings)
    assisted = model.generate(prompt, assistant_model=tiny_base(arch, seed=3), **settings)
    lookup = model.generate(prompt, prompt_lookup_num_tokens=3, **settings)
    assert torch.equal(assisted, greedy) and torch.equal(lookup, greedy)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_evaluation_harness_calls_of_any_batch_size_read_the_memory_and_change_nothing(arch: str) -> None:
    model = _reading(arch).eval()
    base = tiny_base(arch)
    before = _snapshot(model)
    for batch in (3, 1, 5):  # lm-eval style: independent requests, changing batch sizes
        ids = _ids(20, seed=batch, batch=batch)
        with torch.no_grad():
            logits = model(ids).logits
            # every row reads the one memorized document: as if it were alone (the same memory)
            for row in range(batch):
                alone = model(ids[row : row + 1]).logits
                torch.testing.assert_close(logits[row : row + 1], alone, atol=1e-5, rtol=1e-4)
            # ... and the memory is read: the rows differ from the base model's
            assert (logits - base(ids).logits).abs().amax() > 1e-2
    assert _same_memory(model, before)
    fresh = tiny_memorizing(arch)  # empty memory: exactly the base model
    with torch.no_grad():
        torch.testing.assert_close(fresh(_ids(20, 9, batch=4)).logits, base(_ids(20, 9, batch=4)).logits)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_plain_trainer_is_warned_and_never_writes_memory(arch: str, tmp_path, caplog) -> None:
    model = tiny_memorizing(arch).train()
    data = [{"input_ids": ids, "labels": ids} for ids in _ids(16, seed=4, batch=6)]
    args = transformers.TrainingArguments(tmp_path, max_steps=2, per_device_train_batch_size=2, report_to="none")
    if hasattr(logging.Logger.warning_once, "cache_clear"):  # transformers warns once per process
        logging.Logger.warning_once.cache_clear()
    with caplog.at_level("WARNING"):
        transformers.Trainer(model=model, args=args, train_dataset=data).train()
    assert "MemorizingTrainer" in caplog.text
    assert model.memory.is_empty()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_two_memories_used_alternately_give_the_outputs_of_two_model_copies(arch: str) -> None:
    model = tiny_memorizing(arch, combine="joint", local_window=16, memory_size=512)
    first, second = model.new_memory(), model.new_memory()
    documents = [_ids(70, seed=5)[0].tolist(), _ids(70, seed=6)[0].tolist()]
    model.memorize([documents[0]], memory=first, progress=False)
    model.memorize([documents[1]], memory=second, progress=False)
    prompt = _ids(10, seed=7)
    outputs = []
    for memory in (first, second, first):
        outputs.append(model.generate(prompt, memory=memory, max_new_tokens=8, do_sample=False, update_memory=True))
    copies = []
    for document in documents:
        copies.append(tiny_memorizing(arch, combine="joint", local_window=16, memory_size=512))
        copies[-1].memorize([document], progress=False)
    expected = [copies[d].generate(prompt, max_new_tokens=8, do_sample=False, update_memory=True) for d in (0, 1, 0)]
    for output, reference in zip(outputs, expected):
        assert torch.equal(output, reference)
    assert first.entries() == copies[0].memory.entries() and second.entries() == copies[1].memory.entries()
    assert model.memory.is_empty()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_set_attn_implementation_keeps_the_memory_attached(arch: str) -> None:
    model = _reading(arch)
    prompt = _ids(12, seed=8)
    chosen = model.config.local_attn_implementation  # Gemma2: eager (transformers refuses sdpa for it)
    with torch.no_grad():
        before = model(prompt).logits
        model.set_attn_implementation("eager")
        eager = model(prompt).logits
        model.set_attn_implementation(chosen)
        again = model(prompt).logits
    torch.testing.assert_close(eager, before, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(again, before, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="sdpa or eager"):
        model.set_attn_implementation("flash_attention_2")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_generate_without_the_cache_with_a_dynamic_cache_and_a_resent_history_store_each_token_once(arch: str) -> None:
    model = tiny_memorizing(arch, combine="joint", local_window=8, memory_size=512)
    prompt = _ids(30, seed=9)
    settings = {"max_new_tokens": 5, "do_sample": False}
    plain = model.generate(prompt, **settings)
    assert torch.equal(model.generate(prompt, use_cache=False, **settings), plain)
    assert torch.equal(model.generate(prompt, cache=transformers.DynamicCache(), **settings), plain)
    assert model.memory.is_empty()  # none of these calls asked to write
    # update_memory=True: what a plain call stores, every token once, whether or not the call asks for a cache
    assert torch.equal(model.generate(prompt, update_memory=True, **settings), plain)
    stored, written = stored_positions(model), _snapshot(model)
    assert stored == read_positions(model, plain[0])
    for options in ({"use_cache": False}, {"cache": transformers.DynamicCache()}):
        model.reset_memory()
        assert torch.equal(model.generate(prompt, update_memory=True, **options, **settings), plain)
        assert stored_positions(model) == stored and _same_memory(model, written)
    model.reset_memory()
    # a conversation continued with its cache, committed once at the end: the resent history is not read (or stored)
    # again, and the answer is that of reading the whole conversation at once
    cache = model.new_cache()
    first = model.generate(prompt, cache=cache, **settings)
    turn = torch.cat([first, _ids(6, seed=10)], dim=1)
    at_once = model.generate(turn, **settings)
    second = model.generate(turn, cache=cache, update_memory=True, **settings)
    assert torch.equal(second, at_once)
    assert stored_positions(model) == read_positions(model, second[0])  # every token once, the sink excepted


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_resent_history_without_its_cache_is_stored_again(arch: str) -> None:
    """`update_memory=True` writes everything the call read: a chat that resends its history without the cache stores
    the history once more per turn, its positions continuing the row's count, as the README says. (The way to store each
    token once, passing the cache back, is tested above.)"""
    model = tiny_memorizing(arch, combine="joint", local_window=8, memory_size=512)
    settings = {"max_new_tokens": 3, "do_sample": False, "update_memory": True}
    first = model.generate(_ids(14, seed=9), **settings)
    once = read_positions(model, first[0])
    assert stored_positions(model) == once
    turn = torch.cat([first, _ids(6, seed=10)], dim=1)
    second = model.generate(turn, **settings)
    again = [first.shape[1] - 1 + position for position in read_positions(model, second[0])]  # after the first read
    assert stored_positions(model) == sorted(once + again)
    layer = model.config.memory_layers[0]
    assert model.memory.entries() == {layer: [len(once) + len(read_positions(model, second[0]))]}
    if arch == "llama":  # counted by hand: 14 + 2 tokens fed, the sink not stored: 15; then 23 + 2 - 1 = 24 more
        assert (len(once), model.memory.entries()[layer]) == (15, [39])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_accelerate_checkpoints_include_the_memory(arch: str, tmp_path) -> None:
    from accelerate import Accelerator

    model = _reading(arch)
    accelerator = Accelerator(cpu=True)
    accelerator.register_for_checkpointing(model.memory)
    accelerator.save_state(tmp_path / "state")
    saved = _snapshot(model)
    model.reset_memory()
    accelerator.load_state(tmp_path / "state")
    assert _same_memory(model, saved)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_auto_model_loads_the_memorizing_decoder(arch: str, tmp_path) -> None:
    model = _reading(arch)
    model.save_pretrained(tmp_path, save_memory=True)
    decoder = transformers.AutoModel.from_pretrained(tmp_path, memory_file="memory.safetensors")
    assert isinstance(decoder, MemorizingModel) and not isinstance(decoder, MemorizingForCausalLM)
    ids = _ids(12, seed=11)
    with torch.no_grad():
        hidden = decoder(ids, output_hidden_states=True).last_hidden_state
        expected = model(ids, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(hidden, expected, atol=1e-5, rtol=1e-4)
        decoder.reset_memory()
        base = tiny_base(arch).get_decoder()
        torch.testing.assert_close(decoder(ids).last_hidden_state, base(ids).last_hidden_state)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_save_pretrained_names_a_filled_memory_it_does_not_save(arch: str, tmp_path, caplog) -> None:
    model = _reading(arch)
    with caplog.at_level("WARNING"):
        model.save_pretrained(tmp_path / "without")
    assert "save_memory=True" in caplog.text
    assert not (tmp_path / "without" / "memory.safetensors").exists()
    model.save_pretrained(tmp_path / "with", save_memory=True)
    assert (tmp_path / "with" / "memory.safetensors").is_file()
    assert "MemoryBank(rows=1" in repr(model.memory) and "combine='joint'" in repr(model.knn_attention["1"])


def test_a_base_model_with_peft_adapters_is_refused_at_conversion() -> None:
    peft = pytest.importorskip("peft")
    base = peft.get_peft_model(tiny_base("llama"), peft.LoraConfig(target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match="PEFT adapters"):
        MemorizingForCausalLM.from_base_pretrained(base.base_model.model, memory_layers=[1])
