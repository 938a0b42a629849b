"""The library apart from the experiments: importing `memorizing_hf` needs no experiment module and none of the
experiments' dependencies (pyyaml, gguf, matplotlib)."""

from __future__ import annotations

import subprocess
import sys

LIBRARY = [
    "memorizing_hf",
    "memorizing_hf.cli",
    "memorizing_hf.data",
    "memorizing_hf.callbacks",
    "memorizing_hf.hub",
    "memorizing_hf.evaluation",
]

# `sys.modules[name] = None` makes importing `name` fail. pyyaml cannot be blocked that way: huggingface_hub, which
# transformers needs, imports it itself; so any `import yaml` made by a module of memorizing_hf fails instead.
PROGRAM = f"""
import builtins, importlib, sys

for name in ("memorizing_experiments", "gguf", "matplotlib"):
    sys.modules[name] = None
real_import = builtins.__import__

def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
    importer = (globals or {{}}).get("__name__") or ""
    if name.partition(".")[0] == "yaml" and importer.partition(".")[0] == "memorizing_hf":
        raise ImportError(f"{{importer}} imports yaml")
    return real_import(name, globals, locals, fromlist, level)

builtins.__import__ = guarded_import
for module in {LIBRARY!r}:
    importlib.import_module(module)
print(sorted(name for name, module in sys.modules.items() if name.startswith("memorizing_experiments") and module))
"""


def test_the_library_imports_without_the_experiments_and_their_dependencies() -> None:
    result = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"
