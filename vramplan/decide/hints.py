"""Advice computed from an estimate, for any tool to show: what gradient checkpointing would save."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from vramplan.arch import ModelSpec
from vramplan.estimator import Estimate, estimate_setup

# Activations above this share of the peak make checkpointing worth a line of advice.
HINT_ACTIVATIONS_SHARE = 0.4


@dataclass(frozen=True)
class CheckpointingHint:
    activations_share: float  # activations / peak allocated, without checkpointing
    device_total_bytes: int  # the device total with checkpointing on

    def to_dict(self) -> dict[str, Any]:
        return {"activations_share": round(self.activations_share, 4), "device_total_bytes": self.device_total_bytes}


def checkpointing_hint(spec: ModelSpec, est: Estimate) -> CheckpointingHint | None:
    """The device total with checkpointing, when activations dominate a setup without it (and the
    method can checkpoint); else None. `spec` is the model `est` was made from."""
    s = est.setup
    share = est.breakdown.get("activations", 0) / est.peak_allocated_bytes
    if s.grad_checkpointing or s.method == "prefix" or share <= HINT_ACTIVATIONS_SHARE:
        return None
    alt = estimate_setup(spec, replace(s, grad_checkpointing=True))
    return CheckpointingHint(share, alt.device_total_bytes)
