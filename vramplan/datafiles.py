"""Where the bundled data files live, for a source checkout and an installed wheel alike."""

from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml


def data_dir() -> Path:
    """The data/ folder: packaged as `vramplan.data` in a wheel, the repo's data/ in a checkout."""
    try:
        return Path(str(resources.files("vramplan.data")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "data"


@cache
def load_yaml(name: str) -> Any:
    with (data_dir() / name).open(encoding="utf-8") as fh:
        return yaml.safe_load(fh)
