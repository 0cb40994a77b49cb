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


# libyaml's C loader parses the catalogues ~10x faster than the pure-Python one (the CLI must
# answer in well under 0.3 s); fall back when PyYAML was built without it.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@cache
def load_yaml(name: str) -> Any:
    with (data_dir() / name).open(encoding="utf-8") as fh:
        return yaml.load(fh, Loader=_Loader)  # noqa: S506 (a safe loader)
