"""vramplan: GPU memory planner and VRAM estimator for fine-tuning LLMs.

Importing vramplan imports neither torch nor transformers.
"""

from __future__ import annotations

from vramplan.arch import ArchConfig, ModelSpec, TensorSpec
from vramplan.catalog import resolve_gpu, resolve_model
from vramplan.errors import VramplanError

__version__ = "0.1.0"

__all__ = ["ArchConfig", "ModelSpec", "TensorSpec", "VramplanError", "resolve_gpu", "resolve_model", "__version__"]
