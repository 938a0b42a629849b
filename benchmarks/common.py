"""What every benchmark script shares: writing its results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_results(path: str | Path, info: dict[str, Any], results: Any) -> None:
    """Write `{"info": ..., "results": ...}` as JSON to `path` (folders created) and say where."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"info": info, "results": results}, indent=2))
    print(f"wrote {out}")
