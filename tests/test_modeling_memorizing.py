"""MemorizingForCausalLM against independent references: the base model, and naive full attention over memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from memorizing_hf import MemorizingConfig, MemorizingForCausalLM, modeling_memorizing
from memorizing_hf.memory import KNNMemory

from .conftest import TINY_CONFIGS, tiny_base, tiny_memorizing


def _layer_inputs(model: MemorizingForCausalLM, layer: int, ids: torch.Tensor) -> torch.Tensor:
    """The hidden states entering the attention of `layer` for `ids` (layers below are not affected by memory)."""
    captured = {}
    attention = model.language_model.model.layers[layer].self_attn

    def hook(module, args, kwargs):
        captured["hidden"] = kwargs.get("hidden_states", args[0] if args else None)

    handle = attention.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(ids, update_memory=False)
    handle.remove()
    return captured["hidden"]


def _attention_output(model: MemorizingForCausalLM, layer: int, ids: torch.Tensor, grad: bool = False) -> torch.Tensor:
    """What the memory layer's attention hands to its output projection, `[B, T, H, D]` (computed under autograd
    if `grad`: memory scores then come from the gathered keys, else from the search)."""
    captured = {}
    attention = model.language_model.model.layers[layer].self_attn
    handle = attention.o_proj.register_forward_pre_hook(lambda module, args: captured.setdefault("out", args[0]))
    with torch.set_grad_enabled(grad):
        model(ids)
    handle.remove()
    batch, tokens, _ = captured["out"].shape
    return captured["out"].view(batch, tokens, attention.config.num_attention_heads, -1)


def _naive_reference(
    model: MemorizingForCausalLM, layer: int, first: torch.Tensor, second: torch.Tensor
) -> torch.Tensor:
    """Memory-layer output for `second` with all of `first` (but its sink token) in memory, written out in full:
    one softmax over every stored key (no top-k), keys stored unrotated, queries rotated to the local window."""
    attention = model.language_model.model.layers[layer].self_attn
    config = attention.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    rotary = model.language_model.model.rotary_emb
    batch, tokens = second.shape

    def project(hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        shape = (batch, tokens, -1, attention.head_dim)
        q = attention.q_proj(hidden).view(shape).transpose(1, 2)
        k = attention.k_proj(hidden).view(shape).transpose(1, 2)
        v = attention.v_proj(hidden).view(shape).transpose(1, 2)
        return q, k, v

    with torch.no_grad():
        _, k_mem, v_mem = project(_layer_inputs(model, layer, first))
        q, k, v = project(_layer_inputs(model, layer, second))
        k_mem, v_mem = k_mem[:, :, 1:], v_mem[:, :, 1:]  # the sink token is never stored
        positions = torch.arange(tokens).expand(batch, -1)
        cos, sin = rotary(q, positions)
        q_local, k_local = apply_rotary_pos_emb(q, k, cos, sin)
        cos_w, sin_w = rotary(q, torch.full((batch, tokens), tokens))  # every memory key sits at distance T
        q_mem, _ = apply_rotary_pos_emb(q, q, cos_w, sin_w)
        group = heads // kv_heads
        k_local, v_local = k_local.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        k_mem, v_mem = k_mem.repeat_interleave(group, 1), v_mem.repeat_interleave(group, 1)
        causal = torch.ones(tokens, tokens, dtype=torch.bool).tril()
        local_scores = (q_local @ k_local.transpose(2, 3) * attention.scaling).masked_fill(~causal, float("-inf"))
        knn = model.knn_attention[str(layer)]
        if model.config.combine == "joint":
            bias = model.config.memory_score_bias + knn.memory_bias.view(1, heads, 1, 1)
            memory_scores = q_mem @ k_mem.transpose(2, 3) * attention.scaling
            best = memory_scores.amax(-1, keepdim=True)  # top-1 is always retrieved: the best of all is the best found
            memory_scores = best + model.config.memory_sharpness * (memory_scores - best) + bias
            probs = torch.softmax(torch.cat([local_scores, memory_scores], -1), -1)
            out = probs[..., :tokens] @ v_local + probs[..., tokens:] @ v_mem
        else:
            local = torch.softmax(local_scores, -1) @ v_local
            scale = knn.memory_scale.view(1, heads, 1, 1)
            memory_scores = scale * F.normalize(q_mem, dim=-1) @ F.normalize(k_mem, dim=-1).transpose(2, 3)
            memory = torch.softmax(memory_scores, -1) @ v_mem
            gate = torch.sigmoid(knn.gate_bias).view(1, heads, 1, 1)
            out = gate * memory + (1 - gate) * local
    return out.transpose(1, 2)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("combine", ["gate", "joint"])
def test_exact_retrieval_equals_naive_full_attention_over_memory(
    combine: str, kv_heads: int, grad: bool, token_ids
) -> None:
    torch.manual_seed(0)
    config = TINY_CONFIGS["llama"]()
    config.num_key_value_heads = kv_heads
    base = transformers.AutoModelForCausalLM.from_config(config).eval()
    bias = 1.5 if kv_heads == 2 else 0.0  # joint mode's memory_score_bias (gate mode ignores it)
    sharpness = 2.5 if kv_heads != 1 else 1.0  # joint mode's memory_sharpness (gate mode ignores it)
    model = MemorizingForCausalLM.from_base_pretrained(
        base,
        memory_layers=[1],
        memory_size=64,
        memory_top_k=64,
        combine=combine,
        memory_score_bias=bias,
        memory_sharpness=sharpness,
    )
    if combine == "gate":  # distinct per-head parameters, so a head mix-up would show
        with torch.no_grad():
            model.knn_attention["1"].gate_bias.copy_(torch.tensor([-1.0, 0.5, 1.0, 2.0]))
            model.knn_attention["1"].memory_scale.copy_(torch.tensor([3.0, 5.0, 8.0, 12.0]))
    elif kv_heads == 1:  # a trained per-head memory bias
        with torch.no_grad():
            model.knn_attention["1"].memory_bias.copy_(torch.tensor([-2.0, 0.0, 1.0, 3.0]))
    first, second = token_ids(seed=1), token_ids(seed=2)
    expected = _naive_reference(model, 1, first, second)
    model(first, update_memory=True)
    actual = _attention_output(model, 1, second, grad)
    torch.testing.assert_close(actual.detach(), expected, atol=1e-5, rtol=1e-4)


def test_a_segment_never_retrieves_itself(token_ids) -> None:
    model = tiny_memorizing("llama", memory_size=256, memory_top_k=8)
    memory = model.memory.layers[1]
    seen = []
    search = memory.search

    def recording_search(queries, k):
        scores, slots = search(queries, k)
        valid = slots >= 0
        rows = torch.arange(slots.shape[0]).view(-1, 1, 1, 1).expand_as(slots)
        seen.append((memory.positions[rows[valid], slots[valid]], model.memory.tokens_seen.clone()))
        return scores, slots

    memory.search = recording_search
    for seed in range(4):
        model(token_ids(seed=seed), memory_reset=torch.full((2,), seed == 0))
    assert len(seen) == 3  # the first segment found the memory empty
    for positions, tokens_read_before in seen:
        assert (positions < tokens_read_before.min()).all()


def test_resetting_one_row_leaves_the_other_rows_intact(token_ids) -> None:
    first, second = token_ids(seed=1), token_ids(seed=2)
    model = tiny_memorizing("llama")
    model(first, update_memory=True)
    reset = model(second, memory_reset=torch.tensor([True, False])).logits
    fresh = tiny_memorizing("llama")
    fresh(first, update_memory=True)
    kept = fresh(second).logits
    alone = tiny_memorizing("llama")(second).logits
    torch.testing.assert_close(reset[1], kept[1])
    torch.testing.assert_close(reset[0], alone[0])
    assert model.memory.entries()[1] == [15, 30]


def test_read_only_calls_leave_memory_unchanged(token_ids) -> None:
    model = tiny_memorizing("llama")
    model(token_ids(seed=1), update_memory=True)
    before = {name: t.clone() for name, t in model.memory.layers[1].state_tensors().items()}
    read_only = model(token_ids(seed=2), update_memory=False).logits
    for name, tensor in model.memory.layers[1].state_tensors().items():
        assert torch.equal(tensor, before[name])
    torch.testing.assert_close(read_only, model(token_ids(seed=2)).logits)


def test_bad_batch_inputs_raise_and_leave_memory_unchanged(token_ids) -> None:
    model = tiny_memorizing("llama")
    model(token_ids(seed=1), update_memory=True)
    before = {name: t.clone() for name, t in model.memory.layers[1].state_tensors().items()}
    with pytest.raises(ValueError, match="holds entries for 2 batch rows but this batch has 3 rows"):
        model(token_ids(batch=3), update_memory=True)
    with pytest.raises(ValueError, match=r"memory_reset must be a bool tensor of shape \(2,\)"):
        model(token_ids(), memory_reset=torch.tensor([1, 0]))
    with pytest.raises(ValueError, match=r"memory_reset must be a bool tensor of shape \(2,\)"):
        model(token_ids(), memory_reset=torch.tensor([True]))
    for name, tensor in model.memory.layers[1].state_tensors().items():
        assert torch.equal(tensor, before[name])
    model(token_ids(batch=3), memory_reset=torch.ones(3, dtype=torch.bool))  # a new batch of documents is fine
    assert model.memory.entries()[1] == [15, 15, 15]


def test_padding_and_sinks_are_never_stored(token_ids) -> None:
    model = tiny_memorizing("llama", memory_size=64, sink_tokens=2)
    ids = token_ids()
    ids[0, 5] = model.config.text_config.bos_token_id
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    model(ids, attention_mask=mask, update_memory=True)
    memory = model.memory.layers[1]
    assert memory.lengths.tolist() == [16 - 2 - 1, 16 - 4 - 2 + 2]  # row 1: the two sinks were padding
    assert 5 not in memory.positions[0, :13].tolist()


@pytest.mark.parametrize("combine", ["gate", "joint"])
def test_gradient_checkpointing_gives_the_same_loss_gradients_and_memory(combine: str, token_ids) -> None:
    results = []
    for checkpointing in (False, True):
        model = tiny_memorizing("llama", combine=combine).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for seed in (1, 2):
            ids = token_ids(seed=seed)
            loss = model(ids, labels=ids, memory_reset=torch.full((2,), seed == 1)).loss
            loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads, model.memory.entries()))
    (loss_a, grads_a, entries_a), (loss_b, grads_b, entries_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5)
    assert entries_a == entries_b == {1: [30, 30]}


def test_memory_stats(token_ids) -> None:
    model = tiny_memorizing("llama", combine="gate")
    model(token_ids(seed=1), update_memory=True)
    stats = model(token_ids(seed=2), output_memory_stats=True, update_memory=True).memory_stats
    assert stats["entries"] == {1: [30, 30]}
    assert stats["gate"][1] == pytest.approx([0.5] * 4)
    joint = tiny_memorizing("llama", combine="joint")
    joint(token_ids(seed=1), update_memory=True)
    share = joint(token_ids(seed=2), output_memory_stats=True).memory_stats["memory_share"][1]
    assert len(share) == 4 and all(0 < s < 1 for s in share)


def test_bfloat16_model_runs(token_ids) -> None:
    model = tiny_memorizing("llama").to(torch.bfloat16)
    model(token_ids(seed=1), update_memory=True)
    out = model(token_ids(seed=2), labels=token_ids(seed=2))
    assert torch.isfinite(out.loss)
    assert model.memory.layers[1].keys.dtype == torch.bfloat16


def test_from_base_pretrained_reuses_the_weights(tmp_path) -> None:
    base = tiny_base("llama")
    model = MemorizingForCausalLM.from_base_pretrained(base, memory_layers=[-1])
    assert model.language_model is base
    base.save_pretrained(tmp_path)
    from_folder = MemorizingForCausalLM.from_base_pretrained(tmp_path, memory_layers=[-1])
    for (name, a), (_, b) in zip(base.state_dict().items(), from_folder.language_model.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(TypeError, match="already a memorizing model"):
        MemorizingForCausalLM.from_base_pretrained(model)


def test_from_base_pretrained_keeps_the_base_models_generation_config() -> None:
    base = tiny_base("llama")
    base.generation_config.eos_token_id = [2, 5]
    model = MemorizingForCausalLM.from_base_pretrained(base, memory_layers=[1])
    assert model.generation_config.eos_token_id == [2, 5]
    assert model.generation_config is not base.generation_config


def test_config_built_model_is_registered_with_auto_classes(token_ids) -> None:
    config = MemorizingConfig(text_config=TINY_CONFIGS["qwen2"](), memory_layers=[2], memory_size=32, memory_top_k=4)
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert isinstance(model, MemorizingForCausalLM)
    assert model.language_model.config._attn_implementation == "memorizing_sdpa"
    assert torch.isfinite(model(token_ids(), labels=token_ids()).loss)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_local_attention_follows_the_base_models_own_choice(attention: str, token_ids) -> None:
    base = transformers.AutoModelForCausalLM.from_config(TINY_CONFIGS["llama"](), attn_implementation=attention)
    model = MemorizingForCausalLM.from_base_pretrained(base, memory_layers=[1])
    assert model.config.local_attn_implementation == attention
    assert model.language_model.config._attn_implementation == f"memorizing_{attention}"
    other = "sdpa" if attention == "eager" else "eager"
    base = transformers.AutoModelForCausalLM.from_config(TINY_CONFIGS["llama"](), attn_implementation=attention)
    chosen = MemorizingForCausalLM.from_base_pretrained(base, memory_layers=[1], local_attn_implementation=other)
    assert chosen.language_model.config._attn_implementation == f"memorizing_{other}"


def test_save_and_load_round_trip_model_and_memory(tmp_path, token_ids) -> None:
    model = tiny_memorizing("gpt_neox", combine="gate")
    with torch.no_grad():
        model.knn_attention["1"].gate_bias.copy_(torch.tensor([-1.0, 0.0, 1.0, 2.0]))
    model(token_ids(seed=1), update_memory=True)
    model.save_pretrained(tmp_path)
    model.save_memory(tmp_path / "memory.safetensors")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, MemorizingForCausalLM)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    loaded.load_memory(tmp_path / "memory.safetensors")
    for name, tensor in model.memory.layers[1].state_tensors().items():
        assert torch.equal(tensor, loaded.memory.layers[1].state_tensors()[name]), name
    second = token_ids(seed=2)
    torch.testing.assert_close(loaded(second).logits, model(second).logits, atol=0, rtol=0)


def test_memory_file_of_another_model_is_refused(tmp_path, token_ids) -> None:
    other = tiny_memorizing("llama", memory_layers=[2])
    other(token_ids(seed=1), update_memory=True)
    other.save_memory(tmp_path / "memory.safetensors")
    model = tiny_memorizing("llama", memory_layers=[1])
    model(token_ids(seed=2), update_memory=True)
    before = {name: t.clone() for name, t in model.memory.layers[1].state_tensors().items()}
    with pytest.raises(ValueError, match=r"layers: file has \[2\], model has \[1\]"):
        model.load_memory(tmp_path / "memory.safetensors")
    for name, tensor in model.memory.layers[1].state_tensors().items():
        assert torch.equal(tensor, before[name])


def test_a_memory_file_loads_by_name_beside_the_weights(tmp_path, token_ids, monkeypatch) -> None:
    model = tiny_memorizing("llama")
    model(token_ids(seed=1), update_memory=True)
    model.save_pretrained(tmp_path / "checkpoint")
    model.save_memory(tmp_path / "checkpoint" / "memory.safetensors")
    monkeypatch.chdir(tmp_path)  # no memory.safetensors in the working directory
    loaded = MemorizingForCausalLM.from_pretrained(tmp_path / "checkpoint", memory_file="memory.safetensors")
    auto = transformers.AutoModelForCausalLM.from_pretrained("checkpoint", memory_file="memory.safetensors")
    for other in (loaded, auto):
        for name, tensor in model.memory.layers[1].state_tensors().items():
            assert torch.equal(tensor, other.memory.layers[1].state_tensors()[name]), name
    loaded.reset_memory()
    loaded.load_memory("memory.safetensors")  # later calls resolve the name the same way
    assert loaded.memory.entries() == model.memory.entries()
    (tmp_path / "memory.safetensors").write_bytes(b"not a memory file")  # a file here wins over the one beside
    with pytest.raises(ValueError, match="not a readable memory file"):
        loaded.load_memory("memory.safetensors")
    with pytest.raises(FileNotFoundError, match="'other.safetensors': not a file here, nor beside the weights in"):
        loaded.load_memory("other.safetensors")
    assert loaded.memory.entries() == model.memory.entries()


REMOTE_CODE_SCRIPT = """
import sys
sys.modules["memorizing_hf"] = None  # the package must not be importable: only the folder's own code may run
import torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
model.load_memory(sys.argv[1] + "/memory.safetensors")
ids = torch.load(sys.argv[2])
torch.save(model(ids).logits, sys.argv[3])
"""


def test_saved_folder_loads_with_trust_remote_code_without_the_package(tmp_path, token_ids) -> None:
    import subprocess
    import sys

    model = tiny_memorizing("qwen2")
    model(token_ids(seed=1), update_memory=True)
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    model.save_memory(folder / "memory.safetensors")
    for name in ("modeling_memorizing.py", "configuration_memorizing.py", "memory.py", "retrieval.py"):
        assert (folder / name).is_file(), name
    second = token_ids(seed=2)
    torch.save(second, tmp_path / "ids.pt")
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin"}
    subprocess.run(
        [sys.executable, "-c", REMOTE_CODE_SCRIPT, str(folder), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
        check=True,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), model(second).logits, atol=0, rtol=0)


@pytest.mark.parametrize("combine", ["gate", "joint"])
def test_faiss_flat_backend_gives_the_exact_backends_output(combine: str, token_ids) -> None:
    pytest.importorskip("faiss")
    outputs = []
    for retrieval in ("exact", "faiss"):
        model = tiny_memorizing("llama", combine=combine, retrieval=retrieval, memory_size=24)
        for seed in range(4):  # 4 x 15 entries per row: the ring buffer wraps
            logits = model(token_ids(seed=seed), memory_reset=torch.tensor([seed == 2, False])).logits
        outputs.append(logits)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)


def test_after_reset_memory_any_batch_size_may_follow(token_ids) -> None:
    model = tiny_memorizing("llama", xl_cache=True)
    model(token_ids(batch=2), update_memory=True)
    model.reset_memory()
    model(token_ids(batch=1), memory_reset=torch.tensor([True]))
    model(token_ids(batch=3, seed=2), memory_reset=torch.ones(3, dtype=torch.bool))
    assert model.memory.entries() == {1: [15, 15, 15]}


def test_memory_stats_are_a_real_output_field(token_ids) -> None:
    output = tiny_memorizing("gpt2")(token_ids(), output_memory_stats=True, update_memory=True)
    assert isinstance(output, transformers.modeling_outputs.CausalLMOutputWithCrossAttentions)
    rebuilt = type(output)(**dict(output))  # what DistributedDataParallel does with outputs
    assert rebuilt.memory_stats == output.memory_stats == {"entries": {1: [15, 15]}}


def test_several_memory_layers_each_read_only_what_earlier_segments_wrote(token_ids) -> None:
    """Layer 0 writing a segment must not make layer 2 of the same call search its still empty memory."""
    model = tiny_memorizing("llama", memory_layers=[0, 2], combine="joint")
    first, second = token_ids(seed=1), token_ids(seed=2)
    with torch.no_grad():
        alone = model(first).logits
        torch.testing.assert_close(model(first, memory_reset=torch.ones(2, dtype=torch.bool)).logits, alone)
        assert model.memory.entries() == {0: [15, 15], 2: [15, 15]}
        assert not torch.allclose(model(second).logits, tiny_base("llama")(second).logits, atol=1e-4)


@pytest.mark.parametrize("setting", [("memory_score_bias", 1.0), ("memory_sharpness", 3.0)])
def test_a_memory_setting_set_on_a_built_model_applies_at_once(setting: tuple[str, float], token_ids) -> None:
    first, second = token_ids(seed=1), token_ids(seed=2)
    built = tiny_memorizing("llama", combine="joint", **dict([setting])).eval()
    changed = tiny_memorizing("llama", combine="joint").eval()
    logits = {}
    for name, model in (("built", built), ("changed", changed)):
        model(first, update_memory=True)
        if name == "changed":
            before = model(second).logits
            setattr(model.config, *setting)
        logits[name] = model(second).logits
    torch.testing.assert_close(logits["changed"], logits["built"])
    assert not torch.allclose(before, logits["changed"])


def test_from_pretrained_can_return_its_loading_info(tmp_path, token_ids) -> None:
    tiny_memorizing("llama").save_pretrained(tmp_path)
    model, info = MemorizingForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(model, MemorizingForCausalLM) and not info["missing_keys"]
    model(token_ids(seed=1))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_joint_mode_fused_inference_equals_the_eager_softmax(arch: str, token_ids, monkeypatch) -> None:
    model = tiny_memorizing(arch, combine="joint", memory_score_bias=0.5, memory_sharpness=2.0).eval()
    with torch.no_grad():
        bias = model.knn_attention["1"].memory_bias
        bias.copy_(torch.linspace(-2.0, 3.0, bias.numel()))
    model(token_ids(seed=1), update_memory=True)
    ids = token_ids(seed=2)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # a left-padded row: its first queries see no local key, only memory
    calls = []
    fused = modeling_memorizing.attention_with_logsumexp
    monkeypatch.setattr(modeling_memorizing, "attention_with_logsumexp", lambda *a: calls.append(1) or fused(*a))
    with torch.no_grad():
        outputs = model(ids, attention_mask=mask, output_memory_stats=True)
    assert calls, "the fused path was not taken"
    monkeypatch.setattr(modeling_memorizing, "attention_with_logsumexp", lambda *args: None)
    with torch.no_grad():
        eager = model(ids, attention_mask=mask, output_memory_stats=True)
    torch.testing.assert_close(outputs.logits[mask.bool()], eager.logits[mask.bool()], atol=1e-4, rtol=1e-4)
    assert outputs.memory_stats["memory_share"][1] == pytest.approx(eager.memory_stats["memory_share"][1], abs=1e-5)


@pytest.mark.parametrize("grad", [False, True])
def test_joint_mode_read_a_tile_of_queries_at_a_time_equals_all_at_once(grad: bool, token_ids, monkeypatch) -> None:
    model = tiny_memorizing("llama", combine="joint", memory_score_bias=0.5)
    with torch.no_grad():
        model.knn_attention["1"].memory_bias.copy_(torch.tensor([-2.0, 0.0, 1.0, 3.0]))
    model(token_ids(seed=1), update_memory=True)
    entries = model.memory.entries()
    whole = _attention_output(model, 1, token_ids(seed=2), grad)
    stats = model(token_ids(seed=2), output_memory_stats=True).memory_stats["memory_share"][1]
    local_keys = token_ids(seed=2).shape[1]
    monkeypatch.setattr(modeling_memorizing, "JOINT_TILE_BYTES", 3 * 4 * 2 * 4 * local_keys)  # tiles of 3 queries
    monkeypatch.setattr(modeling_memorizing, "attention_with_logsumexp", lambda *args: None)  # the eager softmax
    tiled = _attention_output(model, 1, token_ids(seed=2), grad)
    assert model.memory.entries() == entries  # reading never wrote
    torch.testing.assert_close(tiled, whole)
    tiled_stats = model(token_ids(seed=2), output_memory_stats=True).memory_stats["memory_share"][1]
    assert tiled_stats == pytest.approx(stats)


@pytest.mark.parametrize("combine", ["joint", "gate"])
def test_memory_layers_share_one_values_buffer_in_inference_only(combine: str, token_ids, monkeypatch) -> None:
    """In inference every memory layer gathers its retrieved values into one buffer of the call (each layer uses them
    before the next retrieves): the output must equal that of a gather per layer; under autograd none is shared."""
    model = tiny_memorizing("llama", memory_layers=[0, 1, 2], combine=combine).eval()
    model(token_ids(seed=1), update_memory=True)
    ids = token_ids(seed=2)
    gather, seen = KNNMemory.gather, []

    def spy(self, slots, with_keys=True, scratch=None, share=True):  # noqa: ANN001, ANN202
        keys, values = gather(self, slots, with_keys, scratch if share else None)
        seen.append((scratch is not None, values.data_ptr()))
        return keys, values

    monkeypatch.setattr(KNNMemory, "gather", spy)
    with torch.no_grad():
        shared = model(ids).logits
    assert [used for used, _ in seen] == [True] * 3 and len({pointer for _, pointer in seen}) == 1
    monkeypatch.setattr(KNNMemory, "gather", lambda *args, **kwargs: spy(*args, **kwargs, share=False))
    seen.clear()
    with torch.no_grad():
        own = model(ids).logits
    assert len({pointer for _, pointer in seen}) == 3
    assert torch.equal(shared, own)
    monkeypatch.setattr(KNNMemory, "gather", spy)
    seen.clear()
    model(ids).logits.sum().backward()
    assert [used for used, _ in seen] == [False] * 3
