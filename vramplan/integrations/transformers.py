"""`MemoryPreflight`: a transformers `TrainerCallback` (Trainer, TRL's SFTTrainer and other
subclasses) that checks the run against vramplan before the first step and against the card
after a few steps.

    from vramplan.integrations.transformers import MemoryPreflight
    trainer = Trainer(model, args, train_dataset=ds, callbacks=[MemoryPreflight(raise_on_oom=True)])

At `on_train_begin` it estimates the step from the live model's config, the TrainingArguments
and the model's peft config, and warns (or raises PreflightOOMError) when the device total will
not fit the card's free memory, naming the cheapest change that fits (vramplan's planner). After
`measure_steps` optimizer steps it logs the measured `torch.cuda.max_memory_allocated()` against
the prediction and, with `record_path`, appends a record in the data/measurements format.

Under several GPUs or an engine (DeepSpeed ZeRO, FSDP, DDP with world size > 1: the engine read
from the TrainingArguments, the world size from them or torchrun's environment) each rank checks,
compares and records its own GPU's figures (vramplan.distributed, per GPU); its record carries the
engine, world size and rank, as the multi-GPU profiler's do, so vramplan.records re-estimates it
per GPU.

Only users who have transformers import this module; it imports torch and transformers."""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import platform
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from vramplan.allocator import nccl_bytes
from vramplan.distributed import DistributedEstimate, Parallel, estimate_distributed, per_gpu_totals
from vramplan.errors import VramplanError
from vramplan.estimator import Estimate, estimate_setup
from vramplan.setup import Setup, make_setup, profiler_setup
from vramplan.trainer_bridge import (
    as_dict,
    parallel_words,
    record_launch_fields,
    record_setup_fields,
    trainer_parallel,
    trainer_rank,
    trainer_setup,
)
from vramplan.units import fmt_gib

logger = logging.getLogger("vramplan")

TORCH_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class PreflightOOMError(VramplanError):
    """The predicted device total exceeds the card's free memory (raise_on_oom=True)."""


@dataclass(frozen=True)
class Comparison:
    """Measured against predicted peak allocated, for the setup the model really ran (per GPU
    under `parallel`)."""

    steps: int
    measured_bytes: int
    predicted_bytes: int
    reserved_bytes: int
    setup: Setup
    parallel: Parallel | None = None

    @property
    def error(self) -> float:
        return self.predicted_bytes / self.measured_bytes - 1 if self.measured_bytes else float("nan")


def live_overrides(model: Any) -> dict[str, Any]:
    """What the live model shows that its config may not: the dtype of its dense weights, and,
    on a quantised base, whether prepare_model_for_kbit_training upcast the embeddings to fp32."""
    out: dict[str, Any] = {}
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    dense = [p.dtype for n, p in model.named_parameters() if not p.requires_grad and p.dtype in TORCH_DTYPES]
    dense = dense or [p.dtype for p in model.parameters() if p.dtype in TORCH_DTYPES]
    if dense:
        out["loaded_dtype"] = TORCH_DTYPES[max(set(dense), key=dense.count)]
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        if emb is not None and getattr(emb, "weight", None) is not None:
            out["kbit_prepare"] = emb.weight.dtype == torch.float32
    return out


def active_peft_config(model: Any) -> Any:
    """The active adapter's config of a PeftModel (peft keeps them in model.peft_config by name)."""
    cfgs = getattr(model, "peft_config", None)
    if not isinstance(cfgs, dict) or not cfgs:
        return None
    name = getattr(model, "active_adapter", None)
    name = name[0] if isinstance(name, list | tuple) and name else name
    return cfgs.get(name) if isinstance(name, str) and name in cfgs else next(iter(cfgs.values()))


def free_capacity_bytes(est: Estimate, held_outside: int = 0) -> int | None:
    """Memory this process can still use on its card: free memory plus what its own allocator
    and CUDA context already hold (the model is loaded by on_train_begin), plus `held_outside`
    (bytes outside the allocator it already holds, NCCL's: held_nccl_bytes); None without CUDA."""
    if not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info()
    held = torch.cuda.memory_reserved() + est.outside_allocator.get("cuda_context", 0) + held_outside
    return int(free + held)


def held_nccl_bytes(d: DistributedEstimate) -> int:
    """NCCL memory this process already holds at on_train_begin, which the per-GPU device total
    counts: once the process group exists the engine's wrapping has used it (DDP and DeepSpeed
    broadcast rank 0's parameters at wrap time; accelerate's wait_for_everyone barriers), so NCCL's
    init and the default group's channel buffers are taken (vramplan.allocator.nccl_bytes, torch's
    group); DeepSpeed's own ZeRO groups allocate theirs at their first collective, in the step."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0
    line = sum(v for k, v in d.per_gpu_outside_allocator.items() if k.startswith("nccl"))
    return min(line, nccl_bytes(world_size=d.parallel.world, engine="torch"))


CHANGE_FIELDS = ("method", "dtype", "precision", "optimizer", "lora_rank", "grad_checkpointing", "batch_size", "seq_len",
                 "grad_accum")


def _changes(req: Setup, s: Setup) -> tuple[str, ...]:
    return tuple(f"{k}: {getattr(req, k)} -> {getattr(s, k)}" for k in CHANGE_FIELDS if getattr(req, k) != getattr(s, k))


def cheapest_fit(est: Estimate, spec: Any, capacity: int, par: Parallel | None = None) -> str:
    """The fewest changes that make the step fit `capacity` bytes, as text: first the planner's
    configurations (method, dtype, optimizer, rank, checkpointing) at the requested batch and
    length; failing those, the planner's search with the batch (and accumulation) moved. Under
    `par` the per-GPU device total is what must fit, and the batch fallback halves the
    micro-batch with checkpointing on (the planner's search is one GPU's)."""
    from vramplan.catalog import GPU
    from vramplan.decide.plan import plan, search_space

    req = est.setup
    fits: list[tuple[int, int, tuple[str, ...]]] = []
    for cfg in search_space(spec, req, methods=None, keep_method=False):
        try:
            s = make_setup(spec, **{k: getattr(cfg, k) for k in Setup.__dataclass_fields__ if k != "lora_targets"},
                           lora_targets=cfg.lora_targets or "all-linear")
            need = per_gpu_totals(spec, s, par).device_total
        except VramplanError:
            continue
        if need <= capacity:
            fits.append((len(_changes(req, s)), need, _changes(req, s)))
    if fits:
        _n, need, changes = min(fits)
        return f"{'; '.join(changes) or 'none'} ({fmt_gib(need)}{' per GPU' if par is not None else ''})"
    if par is not None:
        return _smaller_batch_fit(spec, req, capacity, par)
    card = GPU(name="this card (free)", aliases=(), vendor="nvidia", memory_bytes=capacity, usable_bytes=capacity,
               bandwidth_gbs=1.0, bf16_tflops=1.0, bf16=True, price_hour_usd=None, source="torch.cuda.mem_get_info")
    found = plan(spec, req, card, objective="fewest-changes", limit=1, headroom=0.0)
    if not found.candidates:
        return "none that vramplan searches fits this card"
    c = found.candidates[0]
    return f"{'; '.join(c.changes)} ({fmt_gib(c.estimate.device_total_bytes)})"


def _smaller_batch_fit(spec: Any, req: Setup, capacity: int, par: Parallel) -> str:
    """Under `par`: the largest halved micro-batch, with checkpointing on and the accumulation
    raised to keep the samples per step, whose per-GPU device total fits `capacity`."""
    b = req.batch_size
    while b > 1:
        b //= 2
        s = replace(req, batch_size=b, grad_accum=req.grad_accum * -(-req.batch_size // b), grad_checkpointing=True)
        need = per_gpu_totals(spec, s, par).device_total
        if need <= capacity:
            return f"{'; '.join(_changes(req, s))} ({fmt_gib(need)} per GPU)"
    return (f"none that vramplan searches fits this card under {parallel_words(par)}; more GPUs, a higher ZeRO "
            "stage / full_shard or offload lower the per-GPU memory")


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"torch": torch.__version__, "python": platform.python_version()}
    for pkg in ("transformers", "trl", "peft", "bitsandbytes", "accelerate", "liger-kernel", "deepspeed"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    if torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
    return out


def _shape_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int] | None:
    x = kwargs.get("input_ids")
    if x is None:
        x = kwargs.get("inputs_embeds")
    if x is None and args and hasattr(args[0], "shape"):
        x = args[0]
    return (int(x.shape[0]), int(x.shape[1])) if x is not None and len(x.shape) >= 2 else None


class MemoryPreflight(TrainerCallback):
    """Checks a Trainer's step against vramplan: a prediction before the first step, a measured
    comparison after `measure_steps` steps (CUDA only).

    raise_on_oom: raise PreflightOOMError instead of warning when the step will not fit.
    free_bytes: the memory to check against (default: this process's share of the card,
        torch.cuda.mem_get_info() free + what it already holds; no check without CUDA).
    measure_steps: optimizer steps after which measured and predicted peaks are compared.
    record_path: a JSONL file to append the measured record to (data/measurements format).
    seq_len, and any other vramplan option as a keyword: override what is read from the run.
    """

    def __init__(self, *, raise_on_oom: bool = False, free_bytes: int | None = None, measure_steps: int = 3,
                 record_path: str | Path | None = None, name: str | None = None, **options: Any) -> None:
        self.raise_on_oom = raise_on_oom
        self.free_bytes = free_bytes
        self.measure_steps = measure_steps
        self.record_path = Path(record_path) if record_path is not None else None
        self.name = name
        self.options = options
        self.estimate: Estimate | None = None
        self.parallel: Parallel | None = None  # the run's engine and world; None on one plain GPU
        self.distributed: DistributedEstimate | None = None  # the per-GPU estimate under `parallel`
        self.rank = 0
        self.spec: Any = None
        self.read: dict[str, Any] = {}
        self.comparison: Comparison | None = None
        self._steps: list[dict[str, Any]] = []
        self._shape: tuple[int, int] | None = None
        self._hooks: list[Any] = []
        self._peak_fwd = 0

    # ---- prediction ---------------------------------------------------------------------------
    def predict(self, model: Any, args: Any) -> Estimate:
        """The estimate of `model` trained with `args` (the peft config is the model's own), on
        one GPU; under several GPUs or an engine, `parallel` and the per-GPU `distributed` too."""
        opts = {**live_overrides(model), **self.options}
        tc, self.spec, setup = trainer_setup(as_dict(model.config, "model.config"), args, active_peft_config(model), **opts)
        if "(sequence length)" in tc.ignored:
            logger.warning("vramplan: %s; pass MemoryPreflight(seq_len=...)", tc.ignored["(sequence length)"])
        self.read = {"source": tc.source, "read": tc.read, "ignored": tc.ignored}
        self.parallel = trainer_parallel(tc, args)
        self.rank = trainer_rank(args)
        est = estimate_setup(self.spec, setup)
        self.distributed = None
        if self.parallel is not None:
            self.read["parallel"] = self.parallel.to_dict()
            self.distributed = estimate_distributed(self.spec, est.setup, self.parallel)
        return est

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is None:
            return
        try:
            est = self.estimate = self.predict(model, args)
        except VramplanError as e:  # a memory check must not stop a run vramplan cannot model
            warnings.warn(f"vramplan: no preflight estimate for this run: {e}", RuntimeWarning, stacklevel=2)
            return
        d = self.distributed
        if d is None:
            need = est.device_total_bytes
            capacity = self.free_bytes if self.free_bytes is not None else free_capacity_bytes(est)
            line = (f"vramplan: predicted peak allocated {fmt_gib(est.peak_allocated_bytes)}, device total "
                    f"{fmt_gib(need)} ({est.peak_phase})")
        else:
            need = d.per_gpu_device_total_bytes
            capacity = self.free_bytes if self.free_bytes is not None else free_capacity_bytes(est, held_nccl_bytes(d))
            line = (f"vramplan: predicted per-GPU peak allocated {fmt_gib(d.per_gpu_peak_allocated_bytes)}, device total "
                    f"{fmt_gib(need)} ({d.peak_phase}) under {parallel_words(d.parallel)}")
        if capacity is not None and need > capacity:
            msg = (f"{line} will not fit the {fmt_gib(capacity)} free on this card; cheapest change that fits: "
                   f"{cheapest_fit(est, self.spec, capacity, self.parallel)}")
            if self.raise_on_oom:
                raise PreflightOOMError(msg)
            warnings.warn(msg, ResourceWarning, stacklevel=2)
        else:
            logger.info("%s%s", line, f" of {fmt_gib(capacity)} free" if capacity is not None else "")
        self._hooks = [model.register_forward_pre_hook(self._see_inputs, with_kwargs=True),
                       model.register_forward_hook(self._after_forward)]
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    # ---- measurement ----------------------------------------------------------------------------
    def _see_inputs(self, _module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        shape = _shape_of(args, kwargs)
        if shape is not None and (self._shape is None or shape[0] * shape[1] > self._shape[0] * self._shape[1]):
            self._shape = shape

    def _after_forward(self, *_: Any) -> None:
        if torch.cuda.is_available():
            self._peak_fwd = max(self._peak_fwd, torch.cuda.max_memory_allocated())

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if torch.cuda.is_available() and self.comparison is None:
            torch.cuda.reset_peak_memory_stats()
            self._peak_fwd = 0
            self._alloc_start = torch.cuda.memory_allocated()

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if torch.cuda.is_available() and self.comparison is None:
            self._peak_bwd = torch.cuda.max_memory_allocated()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not torch.cuda.is_available() or self.comparison is not None or self.estimate is None:
            return
        peak = torch.cuda.max_memory_allocated()
        self._steps.append({"alloc_start": self._alloc_start, "peak_fwd": self._peak_fwd or peak,
                            "peak_bwd": getattr(self, "_peak_bwd", peak), "peak": peak,
                            "alloc_end": torch.cuda.memory_allocated(), "reserved_peak": torch.cuda.max_memory_reserved()})
        if len(self._steps) >= self.measure_steps:
            self._finish()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._steps and self.comparison is None:
            self._finish()
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _finish(self) -> None:
        assert self.estimate is not None
        setup = self.estimate.setup
        if self._shape is not None:  # the shapes the model really saw
            setup = replace(setup, batch_size=self._shape[0], seq_len=self._shape[1])
        par = self.parallel
        predicted = per_gpu_totals(self.spec, setup, par).peak_allocated
        measured = max(s["peak"] for s in self._steps)
        reserved = max(s["reserved_peak"] for s in self._steps)
        self.comparison = Comparison(len(self._steps), measured, predicted, reserved, setup, par)
        if par is None:
            logger.warning("vramplan: measured peak allocated %s after %d steps, predicted %s (%+.1f%%)",
                           fmt_gib(measured), len(self._steps), fmt_gib(predicted), 100 * self.comparison.error)
        else:
            logger.warning("vramplan: rank %d measured peak allocated %s after %d steps, predicted %s per GPU under %s "
                           "(%+.1f%%)", self.rank, fmt_gib(measured), len(self._steps), fmt_gib(predicted),
                           parallel_words(par), 100 * self.comparison.error)
        if self.record_path is not None:
            self.record_path.parent.mkdir(parents=True, exist_ok=True)
            append_line(self.record_path, json.dumps(self.record()) + "\n")

    def record(self) -> dict[str, Any]:
        """The measured run in the data/measurements record format (vramplan/records.py); under
        several GPUs or an engine, this rank's, with the engine keys in its setup and the launch
        fields (engine, world_size, rank) of vramplan.profiler.trainer_dist's records."""
        assert self.comparison is not None
        c = self.comparison
        free, total = torch.cuda.mem_get_info()
        name = self.name or default_record_name(self.spec.name, c.setup, c.parallel)
        setup = profiler_setup(self.spec, c.setup, name=name)
        if c.parallel is not None:
            setup.update(record_setup_fields(c.parallel))
        rec = {"setup": setup, "date": datetime.datetime.now(datetime.timezone.utc)
               .isoformat(timespec="seconds"), "gpu": torch.cuda.get_device_name(), "versions": _versions(),
               "status": "ok", "steps": self._steps, "peak_allocated": c.measured_bytes, "peak_reserved": c.reserved_bytes,
               "device_used_end": int(total - free), "gpu_total": int(total), "predicted_peak_allocated": c.predicted_bytes,
               "train_config": self.read, "concurrent": False,
               "source": "vramplan.integrations.transformers.MemoryPreflight inside the transformers Trainer"}
        if c.parallel is not None:
            rec.update(record_launch_fields(c.parallel, self.rank))
        return rec


# FSDP strategies in record names, as the profiler's (d2-fsdp-*, d2-fsdpgo-*)
FSDP_TAGS = {"full_shard": "fsdp", "shard_grad_op": "fsdpgo", "no_shard": "fsdpns"}


def default_record_name(model: str, setup: Setup, par: Parallel | None) -> str:
    """trainer-<model>-<method>-b<batch>s<length>; under an engine its tag and the world size
    after the model (trainer-<model>-z3x2-full-..., -fsdpx2-, -ddpx4-)."""
    tag = ""
    if par is not None:
        eng = f"z{par.zero}" if par.engine == "deepspeed" else FSDP_TAGS.get(par.fsdp or "", "ddp")
        tag = f"-{eng}{'-off' + par.offload if par.offload != 'none' else ''}x{par.world}"
    return f"trainer-{model}{tag}-{setup.method}-b{setup.batch_size}s{setup.seq_len}"


def append_line(path: Path, line: str) -> None:
    """Append `line` with one write() on an O_APPEND descriptor, so that the ranks of one launch
    appending to the same file do not interleave their records."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # open()'s mode
    try:
        data = line.encode("utf-8")
        while data:
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)
