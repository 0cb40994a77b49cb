"""vramplan: GPU memory planner and VRAM estimator for fine-tuning LLMs.

Importing vramplan imports neither torch nor transformers.
"""

from __future__ import annotations

from typing import Any

from vramplan.arch import ArchConfig, ModelSpec, TensorSpec
from vramplan.catalog import resolve_gpu, resolve_model
from vramplan.errors import VramplanError
from vramplan.estimator import Estimate, estimate, estimate_setup
from vramplan.fit import FitResult, GpuFit
from vramplan.plan import Candidate, Plan
from vramplan.setup import Setup, make_setup

__version__ = "0.1.0"


def fit(model: Any = None, method: str = "full", *, gpus: list[str] | None = None, **options: Any) -> FitResult:
    """Estimate a setup (same arguments as estimate(), or an Estimate as `model`) and check it
    against GPUs (default: the whole catalogue)."""
    from vramplan.fit import fit as _fit

    est = model if isinstance(model, Estimate) else estimate(model, method, **options)
    return _fit(est, gpus)


def estimate_parallel(model: Any, method: str = "full", *, gpus: int = 1, nodes: int = 1, zero: int = 0,
                      fsdp: str | None = None, offload: str = "none", **options: Any) -> Any:
    """Per-GPU and host memory under data parallel / DeepSpeed ZeRO / FSDP (see vramplan.distributed)."""
    from vramplan.distributed import estimate_distributed, make_parallel

    par = make_parallel(gpus=gpus, nodes=nodes, zero=zero, fsdp=fsdp, offload=offload)
    spec = resolve_model(model)
    return estimate_distributed(spec, make_setup(spec, method=method, **options), par)


def plan(model: Any, gpu: str, method: str | None = None, *, objective: str = "tokens", maximize: str = "tokens",
         limit: int = 10, **options: Any) -> Plan:
    """Search setups of `model` that fit `gpu`, ranked by `objective` (see vramplan.plan.plan)."""
    from vramplan.plan import plan as _plan

    spec = resolve_model(model)
    req = make_setup(spec, method=method or "full", **options)
    return _plan(spec, req, resolve_gpu(gpu), objective=objective, maximize=maximize, keep_method=method is not None,
                 limit=limit)


__all__ = ["ArchConfig", "Candidate", "Estimate", "FitResult", "GpuFit", "ModelSpec", "Plan", "Setup", "TensorSpec",
           "VramplanError", "__version__", "estimate", "estimate_parallel", "estimate_setup", "fit", "make_setup", "plan", "resolve_gpu",
           "resolve_model"]
