"""Fit check: will a setup's device total fit each GPU, with how much headroom."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from vramplan.allocator import device_total_on
from vramplan.arch import ModelSpec
from vramplan.catalog import GPU, gpu_catalog, resolve_gpu
from vramplan.errors import VramplanError
from vramplan.estimator import Estimate
from vramplan.setup import Setup
from vramplan.units import fmt_gib

# Above this share of the card's memory a run is "tight": allocator fragmentation and library
# workspaces that vary between versions can push it over.
TIGHT_SHARE = 0.90


@dataclass(frozen=True)
class GpuFit:
    gpu: GPU
    verdict: str  # "fits" | "tight" | "fits with paging" | "does not fit", + " in fp16" on cards without bf16
    needed_bytes: int
    capacity_bytes: int
    limiting_phase: str
    notes: tuple[str, ...] = ()
    paging_host_bytes: int = 0  # paged optimizer states that live in host memory on this card

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
                "price_hour_usd": self.gpu.price_hour_usd, "notes": list(self.notes),
                "paging_host_bytes": self.paging_host_bytes}


def verdict(needed: int, capacity: int) -> str:
    if needed > capacity:
        return "does not fit"
    return "tight" if needed > TIGHT_SHARE * capacity else "fits"


def paged_bytes(est: Estimate) -> int:
    """Optimizer states in CUDA managed memory: they page to the host when the card is full."""
    return sum(v for k, v in est.outside_allocator.items() if k.startswith("paged"))


def uses_bf16(setup: Setup) -> bool:
    return setup.dtype == "bf16" or setup.quantised  # bitsandbytes computes in bf16 by default


def fp16_setup(setup: Setup) -> Setup:
    """The setup on a card without bf16: fp16 mixed precision (fp32 masters) for methods that train
    the base, an fp16 base for adapters; a quantised base only computes in fp16 (same memory)."""
    if setup.quantised:
        return setup
    if setup.method in ("full", "galore"):
        return replace(setup, dtype="fp16", precision="mixed")
    return replace(setup, dtype="fp16")


def _memory_fit(est: Estimate, gpu: GPU) -> GpuFit:
    need, cap = device_total_on(est, gpu), gpu.usable_bytes
    v = verdict(need, cap)
    paged = paged_bytes(est)
    if v == "does not fit" and paged and need - paged <= cap:
        host = need - cap
        return GpuFit(gpu, "fits with paging", need, cap, est.peak_phase,
                      (f"paged optimizer states page {fmt_gib(host)} out to host memory",), host)
    return GpuFit(gpu, v, need, cap, est.peak_phase)


def fit_gpu(est: Estimate, gpu: GPU, spec: ModelSpec | None = None) -> GpuFit:
    """The verdict for one card. On a card without bf16 a bf16 setup is judged in fp16 (needs
    `spec` to re-estimate; without it the verdict is "no bf16")."""
    if gpu.bf16 or not uses_bf16(est.setup):
        return _memory_fit(est, gpu)
    alt = fp16_setup(est.setup)
    if alt == est.setup:
        r = _memory_fit(est, gpu)
        return replace(r, notes=(*r.notes, f"no bf16 on {gpu.name}: compute in fp16 (bnb_4bit_compute_dtype=float16)"))
    if spec is None:
        return GpuFit(gpu, "no bf16", device_total_on(est, gpu), gpu.usable_bytes, est.peak_phase,
                      (f"{gpu.name} has no bf16; estimate with dtype fp16",))
    from vramplan.estimator import estimate_setup

    r = _memory_fit(estimate_setup(spec, alt), gpu)
    how = "fp16 mixed precision" if alt.precision == "mixed" else "an fp16 base"
    judged = r.verdict if r.verdict == "does not fit" else f"{r.verdict} in fp16"
    return replace(r, verdict=judged, notes=(*r.notes, f"no bf16 on {gpu.name}: needs {how}"))


@dataclass(frozen=True)
class FitResult:
    estimate: Estimate
    rows: tuple[GpuFit, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"estimate": self.estimate.to_dict(), "gpus": [r.to_dict() for r in self.rows]}


def _cards(gpus: str | list[str] | tuple[str, ...] | None) -> list[GPU]:
    """GPUs by name: one name or a list of names (a string is one name, never its characters)."""
    if isinstance(gpus, str):
        gpus = [gpus]
    return [resolve_gpu(g) for g in gpus] if gpus else list(gpu_catalog().values())


def fit(est: Estimate, gpus: str | list[str] | None = None, *, spec: ModelSpec | None = None) -> FitResult:
    """Check one estimate against the named GPUs (default: the whole catalogue), smallest first.
    `spec` (the estimate's model) lets cards without bf16 be judged in fp16."""
    cards = _cards(gpus)
    rows = sorted((fit_gpu(est, g, spec) for g in cards), key=lambda r: (r.capacity_bytes, r.gpu.name))
    return FitResult(est, tuple(rows))


@dataclass(frozen=True)
class RunOption:
    """A way to run a setup: `count` x `gpu` with an engine, and what it costs per hour."""

    gpu: GPU
    count: int
    engine: str  # "single GPU", "DDP", "ZeRO-1", "ZeRO-2", "ZeRO-3"
    per_gpu_bytes: int
    cost_hour_usd: float

    def to_dict(self) -> dict[str, Any]:
        return {"gpu": self.gpu.name, "count": self.count, "engine": self.engine, "per_gpu_device_total_bytes": self.per_gpu_bytes,
                "cost_hour_usd": round(self.cost_hour_usd, 2)}


# Any count on one node of 8; whole nodes beyond (24 A100s is an answer, not only 16 or 32).
COUNTS = (1, 2, 3, 4, 5, 6, 7, 8, 16, 24, 32, 40, 48, 56, 64)


def cheapest(spec: Any, setup: Any, *, gpus: list[str] | None = None, counts: tuple[int, ...] = COUNTS,
             limit: int = 10) -> list[RunOption]:
    """For each priced GPU, the fewest cards that hold the setup (one card; else data parallel with
    the lowest ZeRO stage that fits, 8 cards per node), ranked by hourly price."""
    from vramplan.distributed import estimate_distributed, make_parallel
    from vramplan.estimator import estimate_setup

    bad = [n for n in counts if isinstance(n, bool) or not isinstance(n, int) or n < 1 or (n > 8 and n % 8)]
    if bad:
        raise VramplanError(f"card counts {bad} cannot be laid out; allowed: 1..8 on one node, or whole nodes of 8 (16, 24, ...)")
    one = estimate_setup(spec, setup)
    cards = _cards(gpus) if gpus else [g for g in gpu_catalog().values() if g.price_hour_usd]
    out = []
    for g in cards:
        cap = g.usable_bytes * TIGHT_SHARE
        single = device_total_on(one, g)
        for n in counts:
            found = None
            if n == 1 and single <= cap:
                found = ("single GPU", single)
            elif n > 1:
                for stage in (0, 1, 2, 3):
                    par = make_parallel(gpus=min(n, 8), nodes=max(1, n // 8), zero=stage)
                    need = estimate_distributed(spec, setup, par).per_gpu_device_total_bytes
                    if need <= cap:
                        found = ("DDP" if stage == 0 else f"ZeRO-{stage}", need)
                        break
            if found:
                out.append(RunOption(g, n, found[0], found[1], n * (g.price_hour_usd or float("nan"))))
                break
    out.sort(key=lambda o: (o.cost_hour_usd if o.cost_hour_usd == o.cost_hour_usd else float("inf"), o.count))
    return out[:limit]


def fit_parallel(spec: Any, est: Estimate, par: Any, gpus: str | list[str] | None = None) -> FitResult:
    """Fit verdicts for the per-GPU device total of `est`'s setup under `par` (vramplan.distributed)."""
    from vramplan.distributed import estimate_distributed

    d = estimate_distributed(spec, est.setup, par)
    per_gpu = replace(est, device_total_bytes=d.per_gpu_device_total_bytes, peak_phase=d.peak_phase)
    return fit(per_gpu, gpus, spec=spec)
