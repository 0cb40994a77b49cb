"""Where the bundled data files live, for a source checkout and an installed wheel alike."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import yaml

# libyaml's C loader parses the catalogues ~10x faster than the pure-Python one (the CLI must
# answer in well under 0.3 s); fall back when PyYAML was built without it.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_HERE = Path(__file__).resolve().parent


@cache
def data_dir() -> Path:
    """The data/ folder: `vramplan/data` in an installed wheel (pyproject maps the repo's data/
    there), the repo's data/ in a source checkout or an editable install."""
    for cand in (_HERE / "data", _HERE.parent / "data"):
        if (cand / "models.yaml").is_file():
            return cand
    raise FileNotFoundError(f"vramplan data files not found beside {_HERE}")


@cache
def load_yaml(name: str) -> Any:
    with (data_dir() / name).open(encoding="utf-8") as fh:
        return yaml.load(fh, Loader=_Loader)
