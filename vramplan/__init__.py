"""vramplan: GPU memory planner and VRAM estimator for fine-tuning LLMs.

Importing vramplan imports neither torch nor transformers.
"""

from __future__ import annotations

from typing import Any

from vramplan.arch import ArchConfig, ModelSpec, TensorSpec
from vramplan.catalog import resolve_gpu, resolve_model
from vramplan.decide.fit import FitResult, GpuFit
from vramplan.decide.plan import Candidate, Plan
from vramplan.errors import VramplanError
from vramplan.estimator import Estimate, estimate, estimate_setup, with_method
from vramplan.options import OPTIONS, Option
from vramplan.setup import Setup, make_setup
from vramplan.trainer_bridge import estimate_from_trainer as estimate_from_trainer
from vramplan.trainer_bridge import estimate_parallel_from_trainer as estimate_parallel_from_trainer

__version__ = "0.1.0"


def fit(model: Any = None, method: str | None = None, *, gpus: str | list[str] | None = None, gpu_count: int = 1,
        nodes: int = 1, zero: int = 0, fsdp: str | None = None, offload: str = "none", trust_remote_code: bool = False,
        **options: Any) -> FitResult:
    """Estimate a setup (the options of estimate(), or an Estimate as `model`) and check it against
    `gpus` (a name or a list of names; default: the whole catalogue). With gpu_count/nodes/zero/fsdp/
    offload, the per-GPU device total under that engine is what is checked."""
    from vramplan.decide.fit import fit as _fit
    from vramplan.decide.fit import fit_parallel

    spec: ModelSpec | None = None
    if isinstance(model, Estimate):
        if options or method is not None:
            raise VramplanError("fit() of an Estimate takes no setup options; they are the estimate's")
        est = model
    else:
        spec = resolve_model(model, trust_remote_code=trust_remote_code)
        est = estimate_setup(spec, make_setup(spec, **with_method(method, options)))
    par = _parallel(gpu_count, nodes, zero, fsdp, offload)
    if par is not None:
        if spec is None:
            raise VramplanError("fit() over several GPUs needs the model, not an Estimate: pass the model and its options")
        return fit_parallel(spec, est, par, gpus)
    return _fit(est, gpus, spec=spec)


def _parallel(gpus: int, nodes: int, zero: int, fsdp: str | None, offload: str) -> Any:
    from vramplan.distributed import make_parallel, needs_parallel

    return make_parallel(gpus=gpus, nodes=nodes, zero=zero, fsdp=fsdp, offload=offload) \
        if needs_parallel(gpus=gpus, nodes=nodes, zero=zero, fsdp=fsdp, offload=offload) else None


def estimate_parallel(model: Any, method: str | None = None, *, gpus: int = 1, nodes: int = 1, zero: int = 0,
                      fsdp: str | None = None, offload: str = "none", trust_remote_code: bool = False,
                      **options: Any) -> Any:
    """Per-GPU and host memory under data parallel / DeepSpeed ZeRO / FSDP (see vramplan.distributed);
    `options` as for estimate()."""
    from vramplan.distributed import estimate_distributed, make_parallel

    par = make_parallel(gpus=gpus, nodes=nodes, zero=zero, fsdp=fsdp, offload=offload)
    spec = resolve_model(model, trust_remote_code=trust_remote_code)
    return estimate_distributed(spec, make_setup(spec, **with_method(method, options)), par)


def plan(model: Any, gpu: str, method: str | None = None, *, objective: str = "tokens", maximize: str = "tokens",
         limit: int = 10, trust_remote_code: bool = False, **options: Any) -> Plan:
    """Search setups of `model` that fit `gpu`, ranked by `objective` (see vramplan.decide.plan.plan);
    `options` as for estimate() describe the request. A `method` given keeps that method."""
    from vramplan.decide.plan import plan as _plan

    spec = resolve_model(model, trust_remote_code=trust_remote_code)
    keep = method is not None or "method" in options
    req = make_setup(spec, **with_method(method, options))
    return _plan(spec, req, resolve_gpu(gpu), objective=objective, maximize=maximize, keep_method=keep, limit=limit)


__all__ = [
    "OPTIONS",
    "ArchConfig",
    "Candidate",
    "Estimate",
    "FitResult",
    "GpuFit",
    "ModelSpec",
    "Option",
    "Plan",
    "Setup",
    "TensorSpec",
    "VramplanError",
    "__version__",
    "estimate",
    "estimate_parallel",
    "estimate_parallel_from_trainer",
    "estimate_setup",
    "fit",
    "make_setup",
    "plan",
    "resolve_gpu",
    "resolve_model",
]
