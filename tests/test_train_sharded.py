"""memorizing_experiments.train sharded over two CPU processes (gloo) by accelerate's configs/accelerate/fsdp.yaml
(FSDP2: parameters, gradients and optimizer states sharded) and deepspeed_zero2.yaml (DeepSpeed ZeRO-2: gradients and
optimizer states sharded; skipped without deepspeed): memory per process, full-state-dict checkpoints, exact
resumption.

accelerate enables FSDP and DeepSpeed only on accelerator devices; tests/accelerate_sharded_worker.py puts the plugin
back on CPU (its docstring says how and why). For each configuration one module-scoped pair of runs (an uninterrupted
one, and one resumed from its middle checkpoint) serves every test here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from memorizing_hf import MemorizingForCausalLM

from .test_train import ROOT, _free_port, tiny_recipe, write_documents

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # two launches: ~35 s on 2 busy cores

STEPS, SAVE = 4, 2


def launch(config: Path, recipe: Path, *overrides: str) -> None:
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        "--main_process_port",
        str(_free_port()),
        str(ROOT / "tests" / "accelerate_sharded_worker.py"),
        str(recipe),
        *overrides,
    ]
    result = subprocess.run(
        command,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-5000:]


@pytest.fixture(scope="module", params=["fsdp", "deepspeed_zero2"])
def runs(request, tmp_path_factory) -> Path:
    """`full/`: 4 steps, checkpoints at 2 and 4; `resumed/`: the same recipe resumed from full/checkpoint-2."""
    if request.param == "deepspeed_zero2":
        pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install deepspeed)")
    tmp_path = tmp_path_factory.mktemp(request.param)
    write_documents(tmp_path / "documents")
    # logging every step: MemorizingTrainer.log reads the gates, which FSDP2 shards (DTensor parameters)
    recipe = tiny_recipe(
        tmp_path,
        memory={"combine": "gate"},
        training={"max_steps": STEPS, "save_steps": SAVE, "logging_steps": 1, "output_dir": str(tmp_path / "full")},
    )
    config = yaml.safe_load((ROOT / "configs" / "accelerate" / f"{request.param}.yaml").read_text())
    config.update(num_processes=2, use_cpu=True)  # use_cpu: accelerate starts the CPU processes with gloo
    (tmp_path / "accelerate.yaml").write_text(yaml.safe_dump(config))
    launch(tmp_path / "accelerate.yaml", recipe)
    launch(
        tmp_path / "accelerate.yaml",
        recipe,
        f"training.output_dir={tmp_path / 'resumed'}",
        f"training.resume_from_checkpoint={tmp_path / 'full' / f'checkpoint-{SAVE}'}",
    )
    return tmp_path


def processes(run: Path) -> list[dict]:
    return [torch.load(run / f"process_{index}.pt") for index in range(2)]


def test_parameters_are_sharded_and_each_process_keeps_the_memory_of_its_own_rows(runs: Path) -> None:
    full = processes(runs / "full")
    fsdp = runs.name.startswith("fsdp")
    assert [process["distributed_type"] for process in full] == [
        f"DistributedType.{'FSDP' if fsdp else 'DEEPSPEED'}"
    ] * 2
    gate = "knn_attention.2.gate_bias"
    heads = full[0]["parameters"][gate].shape[0]
    for process in full:  # FSDP: every parameter sharded, the gate too (half of the heads on each process)
        assert all(process["sharded"].values()) == fsdp and any(process["sharded"].values()) == fsdp
        assert process["local_shapes"][gate] == (heads // 2 if fsdp else heads,)
        for name, parameter in process["parameters"].items():
            assert torch.equal(parameter, full[0]["parameters"][name]), name

    # Each process's memory holds exactly what its own batches wrote: rebuilt by a single-process copy of the trained
    # model (the stored keys and values depend only on frozen parameters) from that process's batches.
    memories = []
    for index, process in enumerate(full):
        reference = MemorizingForCausalLM.from_pretrained(runs / "full").eval()
        with torch.no_grad():
            for batch in process["batches"]:
                reference(**batch)
        assert reference.memory.entries() == process["entries"]
        assert all(entries > 0 for row in process["entries"].values() for entries in row)
        reference.save_memory(runs / f"reference_{index}.st")
        expected = load_file(runs / f"reference_{index}.st")
        saved = load_file(runs / "full" / f"checkpoint-{STEPS}" / f"memory_{index}.safetensors")
        assert saved.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(saved[name], expected[name], rtol=1e-5, atol=1e-5, msg=name)
        memories.append(saved)
    assert not torch.equal(full[0]["batches"][0]["input_ids"], full[1]["batches"][0]["input_ids"])
    keys = [name for name in memories[0] if "key" in name]
    assert keys and all(not torch.equal(memories[0][name], memories[1][name]) for name in keys)


def test_checkpoints_hold_the_full_state_dict_gates_included(runs: Path) -> None:
    trained = processes(runs / "full")[0]["parameters"]
    for folder in (runs / "full", runs / "full" / f"checkpoint-{STEPS}"):
        weights = load_file(folder / "model.safetensors")
        gate = weights["knn_attention.2.gate_bias"]
        assert gate.shape == trained["knn_attention.2.gate_bias"].shape  # gathered, not one process's shard
        assert not torch.equal(gate, torch.zeros_like(gate))  # trained away from gate_init
        model = MemorizingForCausalLM.from_pretrained(folder)  # a fresh single-process model
        model.load_state_dict(weights, strict=True)  # every key of the model, nothing else
        for name, parameter in model.named_parameters():
            torch.testing.assert_close(parameter, trained[name], rtol=0, atol=0, msg=name)


def test_resuming_from_a_checkpoint_continues_exactly(runs: Path) -> None:
    full, resumed = processes(runs / "full"), processes(runs / "resumed")
    for before, after in zip(full, resumed):
        assert [step for step, _ in before["losses"]] == list(range(1, STEPS + 1))
        assert [step for step, _ in after["losses"]] == list(range(SAVE + 1, STEPS + 1))
        np.testing.assert_allclose([loss for _, loss in after["losses"]], [loss for _, loss in before["losses"]][SAVE:])
        assert np.isfinite([loss for _, loss in before["losses"]]).all()
        for name, parameter in before["parameters"].items():
            torch.testing.assert_close(after["parameters"][name], parameter, rtol=0, atol=0, msg=name)
        assert after["entries"] == before["entries"]
    state = json.loads((runs / "resumed" / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS


def test_checkpoints_keep_the_remote_code(runs: Path) -> None:
    folder = runs / "full" / f"checkpoint-{STEPS}"
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "modeling_memorizing.MemorizingForCausalLM"
    assert (folder / "modeling_memorizing.py").is_file() and not list(folder.glob("_fsdp*.py"))
