"""Planner: search the setup space for setups that fit a GPU, ranked by a stated objective."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Any

from vramplan.arch import ModelSpec
from vramplan.catalog import GPU
from vramplan.errors import VramplanError
from vramplan.estimator import Estimate, estimate_setup
from vramplan.fit import TIGHT_SHARE
from vramplan.setup import Setup, make_setup

OBJECTIVES = ("tokens", "memory", "fewest-changes")
MAXIMIZE = ("tokens", "seq-len", "batch-size")
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
SEQS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


@dataclass(frozen=True)
class Candidate:
    setup: Setup
    estimate: Estimate
    changes: tuple[str, ...]  # what differs from the request

    @property
    def tokens(self) -> int:
        return self.setup.batch_size * self.setup.seq_len

    def to_dict(self) -> dict[str, Any]:
        e = self.estimate
        return {"setup": self.setup.to_dict(), "changes": list(self.changes), "tokens_per_micro_step": self.tokens,
                "peak_allocated_bytes": e.peak_allocated_bytes, "device_total_bytes": e.device_total_bytes,
                "peak_phase": e.peak_phase}


@dataclass(frozen=True)
class Plan:
    gpu: GPU
    request: Setup
    searched: int
    candidates: tuple[Candidate, ...]  # fitting setups, best first

    def to_dict(self) -> dict[str, Any]:
        return {"gpu": self.gpu.name, "searched": self.searched, "request": self.request.to_dict(),
                "fits": [c.to_dict() for c in self.candidates]}


def _changes(req: Setup, s: Setup) -> tuple[str, ...]:
    out = []
    for k in ("method", "dtype", "precision", "optimizer", "lora_rank", "grad_checkpointing", "batch_size", "seq_len",
              "grad_accum"):
        a, b = getattr(req, k), getattr(s, k)
        if a != b:
            out.append(f"{k}: {a} -> {b}")
    return tuple(out)


def search_space(spec: ModelSpec, req: Setup, *, methods: tuple[str, ...] | None, maximize: str,
                 keep_method: bool) -> list[Setup]:
    """Every setup the planner considers: methods, base dtypes, ranks, optimizers, checkpointing,
    batch and sequence sizes (gradient accumulation keeps the requested tokens per optimizer step)."""
    meths = methods or ((req.method,) if keep_method else ("full", "lora", "qlora", "galore"))
    opts_by_method = {
        "full": ("adamw", "adamw-fused", "adamw-8bit", "paged-adamw-8bit", "adafactor"),
        "galore": ("adamw", "adamw-8bit"),
        "lora": ("adamw", "adamw-8bit", "paged-adamw-8bit"),
        "qlora": ("adamw", "adamw-8bit", "paged-adamw-8bit"),
    }
    dtypes_by_method = {"lora": ("bf16", "int8"), "qlora": ("nf4", "fp4")}
    ranks = tuple(sorted({req.lora_rank, 8, 16, 64}))
    seqs = (req.seq_len,) if maximize in ("batch-size",) else tuple(sorted({*SEQS, req.seq_len}))
    if maximize == "tokens":
        seqs = (req.seq_len,)
    batches = (req.batch_size,) if maximize == "seq-len" else BATCHES
    step_tokens = req.batch_size * req.grad_accum
    out = []
    for m in meths:
        precisions = ("pure", "mixed") if m == "full" else ("pure",)
        for dt in dtypes_by_method.get(m, (req.dtype if req.dtype not in ("int8", "nf4", "fp4") else "bf16",)):
            for prec, opt in itertools.product(precisions, opts_by_method.get(m, ("adamw", "paged-adamw-8bit"))):
                for r, ck, b, s in itertools.product(ranks if m in ("lora", "qlora") else (req.lora_rank,),
                                                     (False, True), batches, seqs):
                    if m == "prefix" and ck:
                        continue
                    out.append(replace(req, method=m, dtype=dt, precision=prec, optimizer=opt, lora_rank=r,
                                       grad_checkpointing=ck, batch_size=b, seq_len=s,
                                       grad_accum=max(1, step_tokens // b)))
    return out


def plan(spec: ModelSpec, req: Setup, gpu: GPU, *, objective: str = "tokens", maximize: str = "tokens",
         methods: tuple[str, ...] | None = None, keep_method: bool = False, limit: int = 10,
         headroom: float = 1 - TIGHT_SHARE) -> Plan:
    """Ranked setups that fit `gpu` with `headroom` spare. Objective 'tokens' (default): the most
    tokens per micro-step, then no recomputation, then fewest changes; 'memory': the least device
    memory; 'fewest-changes': closest to the request. `maximize` picks what may grow."""
    if objective not in OBJECTIVES:
        raise VramplanError(f"unknown objective {objective!r}: allowed: {', '.join(OBJECTIVES)}")
    if maximize not in MAXIMIZE:
        raise VramplanError(f"unknown quantity to maximize {maximize!r}: allowed: {', '.join(MAXIMIZE)}")
    cap = gpu.usable_bytes * (1 - headroom)
    fitting = []
    space = search_space(spec, req, methods=methods, maximize=maximize, keep_method=keep_method)
    for s in space:
        try:
            s = make_setup(spec, **{k: getattr(s, k) for k in Setup.__dataclass_fields__ if k != "lora_targets"},
                           lora_targets=req.lora_targets or "all-linear")
        except VramplanError:
            continue
        e = estimate_setup(spec, s)
        if e.device_total_bytes <= cap:
            fitting.append(Candidate(s, e, _changes(req, s)))
    if objective == "tokens":
        key = (lambda c: (-c.setup.seq_len, -c.tokens, c.setup.grad_checkpointing, len(c.changes))) if maximize == "seq-len" \
            else (lambda c: (-c.tokens, c.setup.grad_checkpointing, len(c.changes), c.estimate.device_total_bytes))
    elif objective == "memory":
        key = lambda c: (c.estimate.device_total_bytes, len(c.changes))
    else:
        key = lambda c: (len(c.changes), -c.tokens, c.estimate.device_total_bytes)
    fitting.sort(key=key)
    # one best candidate per (method, dtype, optimizer, ckpt) so the list shows real alternatives
    seen, best = set(), []
    for c in fitting:
        k = (c.setup.method, c.setup.dtype, c.setup.precision, c.setup.optimizer, c.setup.grad_checkpointing)
        if k not in seen:
            seen.add(k)
            best.append(c)
    return Plan(gpu, req, len(space), tuple(best[:limit]))
