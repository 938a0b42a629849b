"""Tests of memorizing_hf.sources: fast ones for the pure parts, slow ones that fetch real weights and documents."""

from __future__ import annotations

import gzip
import importlib.util
import math
import struct
import sysconfig
from pathlib import Path

import pytest

from memorizing_hf import sources
from memorizing_hf.sources import (
    austen_novels,
    cache_dir,
    debian_package,
    hol_light_files,
    latex_manual_files,
    python_doc_files,
    read_text,
    smollm2_path,
    stdlib_files,
    stdlib_path,
)


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


def test_read_text_plain_gzip_and_latin1(tmp_path: Path) -> None:
    text = "\\section{Théorème}\nα + β = γ\n"
    (tmp_path / "a.tex").write_text(text, encoding="utf-8")
    (tmp_path / "a.tex.gz").write_bytes(gzip.compress(text.encode("utf-8")))
    (tmp_path / "l.tex").write_bytes("Théorème\n".encode("latin-1"))
    assert read_text(tmp_path / "a.tex") == text
    assert read_text(tmp_path / "a.tex.gz") == text
    assert read_text(tmp_path / "l.tex") == "Théorème\n"


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
    with pytest.raises(ImportError, match=r"memorizing-hf\[demo\]"):
        smollm2_path()


def test_cached_entries_are_reused(tmp_cache: Path) -> None:
    (tmp_cache / sources.SMOLLM2_DIR).mkdir(parents=True)
    (tmp_cache / "debian" / "some-package").mkdir(parents=True)
    assert smollm2_path() == tmp_cache / sources.SMOLLM2_DIR
    assert debian_package("some-package") == tmp_cache / "debian" / "some-package"


def test_debian_package_without_apt_is_a_clear_error(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources.shutil, "which", lambda tool: None)
    with pytest.raises(RuntimeError, match="apt-get"):
        debian_package("hol-light")


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
