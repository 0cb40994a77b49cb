"""vramplan's view of an architecture: hyperparameters (ArchConfig) and the per-tensor inventory
(ModelSpec) from which every count and byte figure derives.

The implementation lives in `vramplan.archs` (spec: dataclasses; hf: config.json -> ArchConfig;
layers: the inventory, mirroring transformers 5.x modeling_<type>.py; meta: any other causal LM,
its inventory read off transformers' meta-device model, its activations approximate);
tests/test_arch*.py check every supported type against the model transformers builds on the meta
device.
"""

from __future__ import annotations

from vramplan.archs.hf import DEFAULTS, FAMILIES, TRAITS, arch_from_hf_config
from vramplan.archs.layers import build_spec
from vramplan.archs.spec import KINDS, ArchConfig, Kind, ModelSpec, TensorSpec

__all__ = ["DEFAULTS", "FAMILIES", "KINDS", "TRAITS", "ArchConfig", "Kind", "ModelSpec", "TensorSpec",
           "arch_from_hf_config", "build_spec"]
