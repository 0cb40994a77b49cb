"""Fit check: will a setup's device total fit each GPU, with how much headroom."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vramplan.catalog import GPU, gpu_catalog, resolve_gpu
from vramplan.estimator import Estimate

# Above this share of the card's memory a run is "tight": allocator fragmentation and library
# workspaces that vary between versions can push it over.
TIGHT_SHARE = 0.90


@dataclass(frozen=True)
class GpuFit:
    gpu: GPU
    verdict: str  # "fits" | "tight" | "does not fit"
    needed_bytes: int
    capacity_bytes: int
    limiting_phase: str

    @property
    def headroom_bytes(self) -> int:
        return self.capacity_bytes - self.needed_bytes

    @property
    def headroom_share(self) -> float:
        return self.headroom_bytes / self.capacity_bytes

    def to_dict(self) -> dict[str, Any]:
        return {"gpu": self.gpu.name, "verdict": self.verdict, "needed_bytes": self.needed_bytes,
                "capacity_bytes": self.capacity_bytes, "headroom_bytes": self.headroom_bytes,
                "headroom_share": round(self.headroom_share, 4), "limiting_phase": self.limiting_phase,
                "price_hour_usd": self.gpu.price_hour_usd}


def verdict(needed: int, capacity: int) -> str:
    if needed > capacity:
        return "does not fit"
    return "tight" if needed > TIGHT_SHARE * capacity else "fits"


def fit_gpu(est: Estimate, gpu: GPU) -> GpuFit:
    need = est.device_total_bytes
    return GpuFit(gpu, verdict(need, gpu.usable_bytes), need, gpu.usable_bytes, est.peak_phase)


@dataclass(frozen=True)
class FitResult:
    estimate: Estimate
    rows: tuple[GpuFit, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"estimate": self.estimate.to_dict(), "gpus": [r.to_dict() for r in self.rows]}


def fit(est: Estimate, gpus: list[str] | None = None) -> FitResult:
    """Check one estimate against the named GPUs (default: the whole catalogue), smallest first."""
    cards = [resolve_gpu(g) for g in gpus] if gpus else list(gpu_catalog().values())
    rows = sorted((fit_gpu(est, g) for g in cards), key=lambda r: (r.capacity_bytes, r.gpu.name))
    return FitResult(est, tuple(rows))
