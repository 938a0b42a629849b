"""memorizing_experiments.train (training/train.py): its recipes, their validation, a tiny run, and two
processes under `accelerate launch`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from memorizing_experiments import evaluate, long_context, train
from memorizing_hf import MemorizingForCausalLM
from memorizing_hf.data import DocumentStreams, load_documents, tokenize_documents

from .test_data import rebuild

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def write_documents(folder: Path, count: int = 8, seed: int = 0) -> None:
    """Small Python-like files with names defined early and used later, so that memory has something to find."""
    generator = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for index in range(count):
        names = [f"value_{index}_{generator.integers(1000)}" for _ in range(generator.integers(3, 7))]
        lines = [f"{name} = {generator.integers(100)}\n" for name in names]
        lines += [
            f"def use_{j}(x):\n    return x + {names[j % len(names)]}\n" for j in range(generator.integers(4, 12))
        ]
        (folder / f"module_{index}.py").write_text("".join(lines))


def tiny_recipe(tmp_path: Path, **changes: dict) -> Path:
    """A tiny from-scratch recipe on the documents under tmp_path (written if missing); memory layer 2 of 4, with
    everything its stored keys and values depend on frozen (embeddings, layers 0-1, layer 2's key/value projections)."""
    if not (tmp_path / "documents").exists():
        write_documents(tmp_path / "documents")
    recipe = {
        "model": {
            "config": {
                "model_type": "llama",
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 4,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "max_position_embeddings": 256,
            },
            "tokenizer": "bytes",
            "trainable": [
                "knn_attention",
                r"layers\.2\.self_attn\.[qo]_proj",
                r"layers\.2\.(post_attention_layernorm|mlp)",
                r"layers\.3\.",
                r"model\.norm",
                "lm_head",
            ],
        },
        "memory": {"memory_layers": [2], "memory_size": 512, "memory_top_k": 8},
        "data": {"source": str(tmp_path / "documents"), "segment_length": 64},
        "training": {
            "output_dir": str(tmp_path / "run"),
            "max_steps": 6,
            "per_device_train_batch_size": 2,
            "learning_rate": 3e-3,
            "logging_steps": 1,
            "save_steps": 3,
            "use_cpu": True,
            "seed": 0,
            "disable_tqdm": True,
        },
    }
    for section, values in changes.items():
        recipe[section].update(values)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_every_shipped_recipe_is_valid() -> None:
    files = sorted((ROOT / "configs").glob("*.yaml"))
    suites = [path for path in files if "models" in yaml.safe_load(path.read_text())]  # training/evaluate.py's
    recall = [path for path in files if "tasks" in yaml.safe_load(path.read_text())]  # training/long_context.py's
    recipes = [path for path in files if path not in suites + recall]
    assert [path.name for path in recall] == ["long_context.yaml"]
    for path in recall:
        assert long_context.load_suite(path)["settings"]
    assert {path.name for path in recipes} >= {"tiny_smoke.yaml", "smollm2_stdlib.yaml"}
    assert {path.name for path in suites} == {"eval_table4.yaml", "eval_long_document.yaml", "eval_gate_zero_shot.yaml"}
    for path in recipes:
        config = train.load_config(path)
        assert config["training"]["output_dir"] and config["data"]["source"]
    for path in suites:
        suite = evaluate.load_suite(path)
        assert suite["output_dir"] and all(spec["settings"] for spec in suite["models"].values())
    for name, kind in [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), ("deepspeed_zero2", "DEEPSPEED")]:
        assert (
            yaml.safe_load((ROOT / "configs" / "accelerate" / f"{name}.yaml").read_text())["distributed_type"] == kind
        )


@pytest.mark.parametrize(
    ("recipe", "overrides", "message"),
    [
        (
            {"data": {"segment_len": 8}},
            [],
            r"unknown key data\.segment_len \(did you mean segment_length\b.*"
            r"allowed in data: documents_per_source, eval_documents, ",
        ),
        (
            {"training": {"max_step": 3}},
            [],
            r"training\.max_step \(did you mean max_steps\b.*fields of transformers\.TrainingArguments",
        ),
        ({"memory": {"memory_layer": [1]}}, [], r"memory\.memory_layer \(did you mean memory_layers\b"),
        ({"optimizer": {"lr": 1}}, [], r"unknown section 'optimizer'; the sections are model, memory, data, training"),
        ({}, ["training.max_step=3"], r"unknown key training\.max_step"),
        ({}, ["max_steps=3"], r"not of the form section\.key=value"),
    ],
)
def test_unknown_keys_are_named_with_the_allowed_ones(tmp_path, recipe: dict, overrides: list, message: str) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match=message):
        train.load_config(path, overrides)


def test_model_section_needs_one_of_pretrained_or_config(tmp_path) -> None:
    with pytest.raises(ValueError, match="exactly one of pretrained .* or config"):
        train.build_model(train.load_config(tiny_recipe(tmp_path), ["model.pretrained=smollm2"])["model"], {})
    with pytest.raises(ValueError, match=r"model\.trainable: \['nothing_matches'\] match no parameter"):
        train.build_model(
            train.load_config(tiny_recipe(tmp_path / "x"), ["model.trainable=[nothing_matches]"])["model"], {}
        )


def test_tiny_recipe_trains_holds_documents_out_and_resumes(tmp_path) -> None:
    recipe = tiny_recipe(
        tmp_path,
        data={"eval_documents": 2},
        training={"eval_strategy": "steps", "eval_steps": 6, "per_device_eval_batch_size": 1},
    )
    trainer = train.main([str(recipe)])
    run = tmp_path / "run"
    held_out = json.loads((run / "held_out_documents.json").read_text())
    assert len(held_out) == 2 and all(Path(name).parent == tmp_path / "documents" for name in held_out)
    assert trainer.train_dataset.num_documents == 6 and trainer.eval_dataset.num_documents == 2
    assert len(json.loads((run / "step_times.json").read_text())) == 6
    assert (run / "checkpoint-3" / "memory.safetensors").is_file()
    assert np.isfinite([entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]).all()

    resumed = train.main(
        [
            str(recipe),
            f"training.output_dir={tmp_path / 'resumed'}",
            f"training.resume_from_checkpoint={run / 'checkpoint-3'}",
        ]
    )
    for name, parameter in trainer.model.named_parameters():
        torch.testing.assert_close(dict(resumed.model.named_parameters())[name], parameter, msg=name)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_under_accelerate_launch(tmp_path) -> None:
    """Two CPU processes (gloo): parameters stay identical, each process reads its own documents without a break and
    its memory holds exactly the keys and values of those documents, and the loss falls."""
    write_documents(tmp_path / "documents")
    documents = tokenize_documents(load_documents(tmp_path / "documents"), train.load_tokenizer("bytes"))
    streams = DocumentStreams(documents, 64, 2, num_processes=2, shuffle=True, seed=0)
    steps = streams.steps_per_epoch  # one whole epoch
    recipe = tiny_recipe(tmp_path, training={"max_steps": steps, "save_steps": steps})
    launcher = Path(sys.executable).with_name("accelerate")
    # `--cpu` would start a single process (multi-CPU needs MPI); `--multi_gpu` starts torchrun, which uses gloo on CPU.
    command = [
        str(launcher),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--main_process_port",
        str(_free_port()),
        str(ROOT / "tests" / "accelerate_worker.py"),
        str(recipe),
    ]
    result = subprocess.run(
        command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-5000:]
    run = tmp_path / "run"
    processes = [torch.load(run / f"process_{index}.pt") for index in range(2)]
    assert [process["backend"] for process in processes] == ["gloo", "gloo"]

    for name, parameter in processes[0]["parameters"].items():
        assert torch.equal(parameter, processes[1]["parameters"][name]), name

    # Each process's rows: whole documents, continued step after step; together every document exactly once.
    read = [rebuild(process["batches"]) for process in processes]
    assert sorted(tuple(doc) for process in read for doc in process) == sorted(map(tuple, documents["input_ids"]))

    # Each process's memory is what its own batches wrote: rebuild it with the trained model (the stored keys and
    # values depend only on frozen parameters) from that process's batches.
    for index, process in enumerate(processes):
        reference = MemorizingForCausalLM.from_pretrained(run).eval()
        with torch.no_grad():
            for batch in process["batches"]:
                reference(**batch)
        reference.save_memory(tmp_path / "reference.st")
        expected = load_file(tmp_path / "reference.st")
        saved = load_file(run / f"checkpoint-{steps}" / f"memory_{index}.safetensors")
        assert saved.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(saved[name], expected[name], rtol=1e-5, atol=1e-5, msg=name)

    logged = [
        entry["loss"]
        for entry in json.loads((run / "trainer_state.json").read_text())["log_history"]
        if "loss" in entry
    ]
    assert len(logged) == steps and np.isfinite(logged).all()
    assert np.mean(logged[-3:]) < np.mean(logged[:3])


@pytest.mark.slow
def test_smollm2_recipe_runs_a_few_steps(tmp_path) -> None:
    trainer = train.main(
        [
            str(ROOT / "configs" / "smollm2_stdlib.yaml"),
            f"training.output_dir={tmp_path}",
            "training.max_steps=2",
            "training.eval_strategy='no'",
            "training.eval_on_start=false",
            "training.save_strategy='no'",
            "data.max_documents=60",
            "data.eval_documents=0",
        ]
    )
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses and np.isfinite(losses).all() and losses[0] < 4  # a pretrained model already predicts code


def test_overrides_keep_words_that_yaml_1_1_would_read_as_booleans() -> None:
    overrides = ["training.eval_strategy=no", "training.use_cpu=true", "data.shuffle=false", "training.max_steps=7"]
    config = train.load_config(ROOT / "configs" / "tiny_smoke.yaml", overrides)
    assert config["training"]["eval_strategy"] == "no"
    assert config["training"]["use_cpu"] is True and config["data"]["shuffle"] is False
    assert config["training"]["max_steps"] == 7
