"""Planner: search the setup space for setups that fit a GPU, ranked by a stated objective."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from vramplan.allocator import device_total_on
from vramplan.arch import ModelSpec
from vramplan.catalog import GPU
from vramplan.decide.fit import TIGHT_SHARE, fp16_setup
from vramplan.errors import VramplanError
from vramplan.estimator import Estimate, estimate_setup
from vramplan.setup import Setup, make_setup

OBJECTIVES = ("tokens", "memory", "fewest-changes")
MAXIMIZE = ("tokens", "seq-len", "batch-size")
MAX_BATCH = 4096
MAX_SEQ = 1 << 20


@dataclass(frozen=True)
class Candidate:
    setup: Setup
    estimate: Estimate
    changes: tuple[str, ...]  # what differs from the request
    device_total_bytes: int  # on the plan's card (allocator.device_total_on)

    @property
    def tokens(self) -> int:
        return self.setup.batch_size * self.setup.seq_len

    def to_dict(self) -> dict[str, Any]:
        e = self.estimate
        return {"setup": self.setup.to_dict(), "changes": list(self.changes), "tokens_per_micro_step": self.tokens,
                "peak_allocated_bytes": e.peak_allocated_bytes, "device_total_bytes": self.device_total_bytes,
                "peak_phase": e.peak_phase}


@dataclass(frozen=True)
class Plan:
    gpu: GPU
    request: Setup
    searched: int  # estimates evaluated
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


def search_space(spec: ModelSpec, req: Setup, *, methods: tuple[str, ...] | None, keep_method: bool,
                 bf16: bool = True) -> list[Setup]:
    """Every configuration the planner considers (method, base dtype, precision, optimizer, LoRA
    rank, checkpointing); batch size or sequence length is then maximised for each by bisection.
    On a card without bf16 (`bf16=False`), bf16 becomes fp16: mixed precision for full/GaLore."""
    space = _search_space(spec, req, methods=methods, keep_method=keep_method)
    return space if bf16 else list(dict.fromkeys(fp16_setup(s) if s.dtype == "bf16" else s for s in space))


def _search_space(spec: ModelSpec, req: Setup, *, methods: tuple[str, ...] | None, keep_method: bool) -> list[Setup]:
    meths = methods or ((req.method,) if keep_method else ("full", "lora", "qlora", "galore"))
    opts_by_method = {
        "full": ("adamw", "adamw-fused", "adamw-8bit", "paged-adamw-8bit", "adafactor"),
        "galore": ("adamw", "adamw-8bit"),
        "lora": ("adamw", "adamw-8bit", "paged-adamw-8bit"),
        "qlora": ("adamw", "adamw-8bit", "paged-adamw-8bit"),
    }
    dtypes_by_method = {"lora": ("bf16", "int8"), "qlora": ("nf4", "fp4")}
    ranks = tuple(sorted({req.lora_rank, 8, 16, 64}))
    out = []
    for m in meths:
        precisions = ("pure", "mixed") if m == "full" else ("pure",)
        for dt in dtypes_by_method.get(m, (req.dtype if req.dtype not in ("int8", "nf4", "fp4") else "bf16",)):
            for prec, opt in itertools.product(precisions, opts_by_method.get(m, ("adamw", "paged-adamw-8bit"))):
                for r, ck in itertools.product(ranks if m in ("lora", "qlora") else (req.lora_rank,), (False, True)):
                    if m == "prefix" and ck:
                        continue
                    out.append(replace(req, method=m, dtype=dt, precision=prec, optimizer=opt, lora_rank=r, grad_checkpointing=ck))
    return out


def _largest(fits: Callable[[int], Estimate | None], lo: int, hi: int, step: int) -> tuple[int, Estimate | None, int]:
    """The largest multiple of `step` in [lo, hi] for which fits() returns an estimate (memory is
    monotone in batch and sequence length), by bisection. Returns (value, estimate, evaluations)."""
    evals = 1
    best = fits(lo)
    if best is None:
        return 0, None, evals
    good, bad = lo, hi + step
    while bad - good > step:
        mid = (good + bad) // 2 // step * step
        if mid <= good:
            mid = good + step
        evals += 1
        e = fits(mid)
        if e is not None:
            good, best = mid, e
        else:
            bad = mid
    return good, best, evals


def plan(spec: ModelSpec, req: Setup, gpu: GPU, *, objective: str = "tokens", maximize: str = "tokens",
         methods: tuple[str, ...] | None = None, keep_method: bool = False, limit: int = 10,
         headroom: float = 1 - TIGHT_SHARE) -> Plan:
    """Ranked setups that fit `gpu` with `headroom` spare. For each configuration of the search
    space, the batch size (maximize 'tokens' / 'batch-size', sequence length as requested) or the
    sequence length (maximize 'seq-len', in steps of 64, batch as requested) is pushed to the
    largest that fits; gradient accumulation keeps the requested sequences per optimizer step.
    Objective 'tokens' (default): most tokens per micro-step, then no recomputation, then fewest
    changes; 'memory': least device memory; 'fewest-changes': closest to the request."""
    if objective not in OBJECTIVES:
        raise VramplanError(f"unknown objective {objective!r}: allowed: {', '.join(OBJECTIVES)}")
    if maximize not in MAXIMIZE:
        raise VramplanError(f"unknown quantity to maximize {maximize!r}: allowed: {', '.join(MAXIMIZE)}")
    cap = gpu.usable_bytes * (1 - headroom)
    step_seqs = req.batch_size * req.grad_accum
    configs = search_space(spec, req, methods=methods, keep_method=keep_method, bf16=gpu.bf16)
    fitting: list[Candidate] = []
    evaluations = 0
    for cfg in configs:
        try:
            base = make_setup(spec, **{k: getattr(cfg, k) for k in Setup.__dataclass_fields__ if k != "lora_targets"},
                              lora_targets=req.lora_targets or "all-linear")
        except VramplanError:
            continue

        def fits(n: int, base: Setup = base) -> Estimate | None:
            s = replace(base, seq_len=n) if maximize == "seq-len" else replace(base, batch_size=n, grad_accum=max(1, step_seqs // n))
            e = estimate_setup(spec, s)
            return e if device_total_on(e, gpu) <= cap else None

        if maximize == "seq-len":
            hi = MAX_SEQ if req.long_context and spec.arch.family != "gpt2" else spec.arch.max_positions
            _, e, k = _largest(fits, 64, hi, 64)
        else:
            _, e, k = _largest(fits, 1, MAX_BATCH, 1)
        evaluations += k
        if e is not None:
            fitting.append(Candidate(e.setup, e, _changes(req, e.setup), device_total_on(e, gpu)))
    if objective == "tokens":
        key = (lambda c: (-c.setup.seq_len, -c.tokens, c.setup.grad_checkpointing, len(c.changes))) if maximize == "seq-len" \
            else (lambda c: (-c.tokens, c.setup.grad_checkpointing, len(c.changes), c.device_total_bytes))
    elif objective == "memory":
        key = lambda c: (c.device_total_bytes, len(c.changes))
    else:
        key = lambda c: (len(c.changes), -c.tokens, c.device_total_bytes)
    fitting.sort(key=key)
    return Plan(gpu, req, evaluations, tuple(fitting[:limit]))
