"""Memory per GPU (and on the CPU) when a fine-tune is spread over many GPUs: data parallel,
DeepSpeed ZeRO stages 1/2/3 with optimizer and parameter offload, PyTorch FSDP.

Model states follow each engine's documented behaviour:
- DeepSpeed ZeRO (deepspeed/runtime/zero/stage_1_and_2.py, stage3.py; "ZeRO: Memory Optimizations
  Toward Training Trillion Parameter Models", Rajbhandari et al. 2020, section 5): 16-bit
  parameters and gradients, and an fp32 master copy plus the optimizer's fp32 states (Adam: 12 bytes
  per parameter) kept by the optimizer. Stage 1 partitions the optimizer states over the N ranks,
  stage 2 also the gradients, stage 3 also the parameters, which are gathered a layer at a time.
  ZeRO-Offload keeps the fp32 optimizer partition (and an fp32 gradient copy) in pinned CPU memory
  and steps there; ZeRO-Infinity-style parameter offload (stage 3) keeps the 16-bit parameters on the
  CPU too.
- PyTorch FSDP (torch/distributed/fsdp): full_shard shards parameters, gradients and optimizer
  states and all-gathers one wrapped unit (a decoder layer) at a time, prefetching the next;
  shard_grad_op keeps parameters gathered between forward and backward; no_shard is DDP. CPU offload
  moves sharded parameters, gradients and the optimizer step to the CPU.
Only trainable parameters carry gradients and optimizer states, so LoRA/QLoRA under ZeRO/FSDP
shard little but the frozen base (stage 3 / full_shard shard that too).
Activations, logits and transients per GPU are those of one micro-batch, from the single-GPU model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vramplan.arch import ModelSpec
from vramplan.errors import VramplanError
from vramplan.estimator import Estimate, estimate_setup
from vramplan.layout import layout
from vramplan.methods import trainable
from vramplan.optimizers import OPTIMIZERS
from vramplan.setup import Setup

FSDP_MODES = ("full_shard", "shard_grad_op", "no_shard")
OFFLOADS = ("none", "optimizer", "params")
# DDP gradient buckets: torch DistributedDataParallel bucket_cap_mb=25, two buckets in flight.
DDP_BUCKET_BYTES = 2 * 25 * 2**20
# HF Trainer / accelerate "auto" DeepSpeed values (transformers/integrations/deepspeed.py):
# reduce_bucket_size = hidden^2, stage3_prefetch_bucket_size = 0.9 * hidden^2 (elements).


@dataclass(frozen=True)
class Parallel:
    gpus_per_node: int = 1
    nodes: int = 1
    zero: int = 0
    fsdp: str | None = None
    offload: str = "none"

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes

    def to_dict(self) -> dict[str, Any]:
        return {"gpus_per_node": self.gpus_per_node, "nodes": self.nodes, "world_size": self.world, "zero": self.zero,
                "fsdp": self.fsdp, "offload": self.offload}


def make_parallel(*, gpus: int = 1, nodes: int = 1, zero: int = 0, fsdp: str | None = None, offload: str = "none") -> Parallel:
    for name, v in (("gpus", gpus), ("nodes", nodes)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise VramplanError(f"{name} must be a positive integer, got {v!r}")
    if zero not in (0, 1, 2, 3):
        raise VramplanError(f"zero stage must be one of 0, 1, 2, 3, got {zero!r}")
    if fsdp is not None and fsdp not in FSDP_MODES:
        raise VramplanError(f"unknown fsdp mode {fsdp!r}: allowed: {', '.join(FSDP_MODES)}")
    if fsdp and zero:
        raise VramplanError("choose DeepSpeed ZeRO (--zero) or FSDP (--fsdp), not both")
    if offload not in OFFLOADS:
        raise VramplanError(f"unknown offload {offload!r}: allowed: {', '.join(OFFLOADS)}")
    if offload == "params" and not (zero == 3 or fsdp == "full_shard"):
        raise VramplanError("parameter offload needs --zero 3 or --fsdp full_shard")
    if offload == "optimizer" and not (zero or fsdp):
        raise VramplanError("optimizer offload needs a ZeRO stage (--zero 1/2/3) or FSDP")
    return Parallel(gpus, nodes, zero, fsdp, offload)


@dataclass(frozen=True)
class DistributedEstimate:
    """Per-GPU memory and CPU memory of a sharded/offloaded run."""

    single: Estimate  # the same setup on one GPU without sharding (activations come from here)
    parallel: Parallel
    gpu_parts: dict[str, int]  # component -> bytes per GPU at the peak
    per_gpu_peak_allocated_bytes: int
    per_gpu_reserved_bytes: int
    per_gpu_device_total_bytes: int
    cpu_parts: dict[str, int]  # component -> bytes of host RAM per node
    cpu_bytes_per_node: int

    def to_dict(self) -> dict[str, Any]:
        return {**self.single.to_dict(), "parallel": self.parallel.to_dict(),
                "per_gpu": {"peak_allocated_bytes": self.per_gpu_peak_allocated_bytes,
                            "peak_reserved_bytes": self.per_gpu_reserved_bytes,
                            "device_total_bytes": self.per_gpu_device_total_bytes, "breakdown": dict(self.gpu_parts)},
                "cpu": {"bytes_per_node": self.cpu_bytes_per_node, "breakdown": dict(self.cpu_parts)}}


def zero_model_states(*, trainable_params: int, frozen_bytes: int, param_bytes: int, world: int, stage: int, offload: str,
                      optimizer_state_bytes: int = 12) -> dict[str, int]:
    """DeepSpeed ZeRO model states per GPU: 16-bit params (`param_bytes` per trainable param),
    16-bit grads, fp32 master + optimizer states (`optimizer_state_bytes` per trainable param)."""
    psi = trainable_params
    params = param_bytes * psi + frozen_bytes
    grads = 2 * psi
    opt = optimizer_state_bytes * psi
    out = {"weights": params if stage < 3 else params // world,
           "gradients": grads if stage < 2 else grads // world,
           "optimizer_states": opt if stage < 1 else opt // world}
    if offload in ("optimizer", "params"):
        out["optimizer_states"] = 0
        out["gradients"] = 0 if stage >= 2 else out["gradients"]  # partitioned grads are copied to pinned CPU memory
    if offload == "params":
        out["weights"] = 0
    return out


def estimate_distributed(spec: ModelSpec, setup: Setup, par: Parallel) -> DistributedEstimate:
    single = estimate_setup(spec, setup)
    lay = layout(spec)
    arch = spec.arch
    n = par.world
    dense_b = 4 if setup.precision in ("fp32", "mixed") else 2
    tr = trainable(lay, arch, setup, dense_b)
    frozen_w = single.breakdown.get("weights", 0) if not tr.base_trainable else 0
    if not tr.base_trainable:
        frozen_w = single.phases["load"] - tr.bytes
    spec_opt = OPTIMIZERS.get(setup.optimizer)
    states = spec_opt.states if spec_opt else 2
    unit = lay.params_total // max(lay.layers, 1)  # one decoder layer: the gather unit
    unit = max(unit, lay.embed_params if tr.base_trainable else 0)  # the embedding is gathered alone
    gpu: dict[str, int] = {}
    cpu: dict[str, int] = {}
    if par.fsdp:
        # FSDP keeps parameters in the dtype they were loaded in (pure: 16-bit, mixed: fp32) and
        # torch optimizer states in that dtype too; gradients are sharded in the same dtype.
        pb = dense_b if tr.base_trainable else tr.bytes_per_param
        sharded = par.fsdp == "full_shard"
        w_all = frozen_w + tr.params * pb
        gpu["weights"] = w_all // n if sharded else w_all
        gpu["gradients"] = tr.params * pb // n if par.fsdp != "no_shard" else tr.params * pb
        gpu["optimizer_states"] = states * tr.params * pb // (n if par.fsdp != "no_shard" else 1)
        if sharded:
            gpu["gathered_units"] = 2 * unit * 2  # current + prefetched layer, 16-bit compute copies
        if par.offload in ("optimizer", "params"):
            cpu["optimizer_states"] = gpu.pop("optimizer_states") * par.gpus_per_node
            cpu["gradients"] = gpu.pop("gradients") * par.gpus_per_node
            cpu["weights"] = gpu.pop("weights") * par.gpus_per_node
            gpu["gathered_units"] = 2 * unit * 2
    else:
        opt_bytes = 4 + 4 * states  # fp32 master + fp32 states (DeepSpeed's own optimizers)
        ms = zero_model_states(trainable_params=tr.params, frozen_bytes=frozen_w, param_bytes=2, world=n,
                               stage=par.zero, offload=par.offload, optimizer_state_bytes=opt_bytes)
        gpu.update(ms)
        h2 = arch.hidden * arch.hidden
        if par.zero >= 2 or (par.zero == 1):
            gpu["comm_buckets"] = 2 * h2 * 2  # reduce bucket (+ one in flight), 16-bit, hidden^2 elements
        elif n > 1:
            gpu["comm_buckets"] = DDP_BUCKET_BYTES
        if par.zero == 3:
            gpu["gathered_units"] = int(0.9 * h2) * 2 + unit * 2  # prefetch bucket + the live layer
        if par.offload in ("optimizer", "params"):
            # pinned host memory per rank: fp32 master, optimizer states and fp32 gradients of its partition
            per_rank = (opt_bytes + 4) * tr.params // (n if par.zero else 1)
            cpu["optimizer_states"] = per_rank * par.gpus_per_node
        if par.offload == "params":
            cpu["weights"] = (2 * tr.params + frozen_w) // n * par.gpus_per_node
    # activations, logits and transients: those of one micro-batch (the single-GPU model)
    act_keys = ("activations", "logits_and_loss", "transients", "cublas_workspace")
    acts = {k: single.breakdown.get(k, 0) for k in act_keys}
    if single.peak_phase == "optimizer_step":
        acts["transients"] = 0  # the engines' fused steps build no foreach temporaries
        acts["activations"] = 0
    gpu.update({k: v for k, v in acts.items() if v})
    gpu.update({"adapters": 0})
    gpu = {k: int(v) for k, v in gpu.items() if v}
    peak = sum(gpu.values())
    reserved = int(peak * (1 + 0.06)) + 64 * 2**20
    nccl = 0 if n == 1 else 512 * 2**20  # NCCL communicator buffers outside the allocator (order of magnitude)
    total = reserved + single.outside_allocator.get("cuda_context", 0) + nccl
    return DistributedEstimate(single, par, gpu, peak, reserved, total, cpu, sum(cpu.values()))
