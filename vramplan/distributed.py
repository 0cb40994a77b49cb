"""Memory per GPU (and on the host) when a fine-tune is spread over GPUs: data parallel,
DeepSpeed ZeRO stages 1/2/3 with optimizer and parameter offload, PyTorch FSDP with CPU offload.

Model states follow each engine's behaviour, checked on real runs (data/measurements/*dist*):
- DeepSpeed ZeRO with bf16 (deepspeed/runtime/zero/stage_1_and_2.py, stage3.py; Rajbhandari et
  al. 2020, "ZeRO", section 5): 16-bit parameters and gradients in the model; the optimizer keeps
  an fp32 master copy and fp32 states (Adam: 4 + 8 bytes per trainable parameter). Stage 1
  partitions the optimizer over the N ranks, stage 2 also the gradients, stage 3 also the
  parameters, gathered a layer at a time (plus a prefetch bucket). At the step the 16-bit gradient
  partition becomes an fp32 copy (4 bytes/param/N) through a flattened 16-bit copy of it
  (zero12_step_gradients). ZeRO-Offload keeps master, states and fp32 gradients in pinned host
  memory and steps there; parameter offload (stage 3) keeps the 16-bit parameters on the host too.
- PyTorch FSDP (torch/distributed/fsdp) with MixedPrecision(bf16): fp32 sharded parameters and
  gradients, bf16 all-gathered units (a decoder layer; the tied embedding is a unit of its own),
  torch optimizer states in fp32. The sharded gradients of one step stay allocated until the next
  forward begins (FSDP frees flat-parameter grads lazily). full_shard ~ stage 3, shard_grad_op ~
  stage 2, no_shard ~ DDP; CPUOffload(offload_params=True) moves parameters, gradients and the step
  to the host.
Activations, logits and their transients per GPU are those of one micro-batch in bf16, from the
single-GPU model; only trainable parameters carry gradients and optimizer states.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from vramplan.activations import checkpoint_bytes, layer_saved_by_group
from vramplan.allocator import (
    HOPPER_CUBLAS_WORKSPACE_BYTES,
    first_step_flat_bytes,
    first_step_states_past_vocab_blocks,
    layer_tensor_bytes,
    nccl_bytes,
    packed_segment_bytes,
    param_tensor_bytes,
    side_stream_pool_bytes,
)
from vramplan.arch import ModelSpec
from vramplan.errors import VramplanError
from vramplan.estimator import Estimate, estimate_setup
from vramplan.layout import Layout, layout
from vramplan.methods import adapter_bytes
from vramplan.optimizers import OPTIMIZERS
from vramplan.reserved import freed_vocab_block
from vramplan.setup import Setup
from vramplan.streams import micro_batch_tokens, stream_dtypes
from vramplan.units import fmt_gib
from vramplan.weights import base_weight_bytes

FSDP_MODES = ("full_shard", "shard_grad_op", "no_shard")
OFFLOADS = ("none", "optimizer", "params")

# What each engine does with the setup's precision (shown in the JSON beside the setup).
ENGINE_PRECISION = {
    "ddp": "as the setup: pure keeps weights in the setup dtype, mixed keeps fp32 weights and autocasts",
    "deepspeed": "DeepSpeed bf16: 16-bit weights and gradients, fp32 master weights in the optimizer (pure and mixed alike)",
    "fsdp": "FSDP MixedPrecision(bf16): sharded fp32 weights, bf16 when gathered (pure and mixed alike)",
}


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

    @property
    def engine(self) -> str:
        return "fsdp" if self.fsdp else ("deepspeed" if self.zero else "ddp")

    def to_dict(self) -> dict[str, Any]:
        return {"engine": self.engine, "gpus_per_node": self.gpus_per_node, "nodes": self.nodes, "world_size": self.world,
                "zero": self.zero, "fsdp": self.fsdp, "offload": self.offload}


def needs_parallel(*, gpus: int = 1, nodes: int = 1, zero: int = 0, fsdp: str | None = None, offload: str = "none") -> bool:
    """Whether these options describe more than one plain GPU (else the single-GPU estimate applies)."""
    return not (gpus == 1 and nodes == 1 and not zero and not fsdp and offload == "none")


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
    if offload == "optimizer" and not zero:
        raise VramplanError("optimizer offload is DeepSpeed's (--zero 1/2/3); FSDP offloads with --offload params")
    return Parallel(gpus, nodes, zero, fsdp, offload)


@dataclass(frozen=True)
class DistributedEstimate:
    """Per-GPU memory and host memory of a sharded/offloaded run."""

    single: Estimate  # the micro-batch on one GPU (activations come from here)
    parallel: Parallel
    gpu_phases: dict[str, int]  # phase -> per-GPU peak allocated
    gpu_parts: dict[str, int]  # component -> bytes per GPU at the peak phase
    per_gpu_peak_allocated_bytes: int
    per_gpu_reserved_bytes: int
    per_gpu_device_total_bytes: int
    cpu_parts: dict[str, int]  # component -> bytes of host RAM per node
    cpu_bytes_per_node: int
    # where -> bytes per GPU outside the PyTorch allocator (CUDA context, NCCL buffers)
    per_gpu_outside_allocator: dict[str, int] = field(default_factory=dict)

    @property
    def peak_phase(self) -> str:
        return max(self.gpu_phases, key=lambda p: self.gpu_phases[p])

    def to_dict(self) -> dict[str, Any]:
        return {**self.single.to_dict(), "parallel": {**self.parallel.to_dict(), "precision": ENGINE_PRECISION[self.parallel.engine]},
                "per_gpu": {"peak_allocated_bytes": self.per_gpu_peak_allocated_bytes,
                            "peak_reserved_bytes": self.per_gpu_reserved_bytes,
                            "device_total_bytes": self.per_gpu_device_total_bytes,
                            "peak_phase": self.peak_phase, "phases": dict(self.gpu_phases), "breakdown": dict(self.gpu_parts),
                            "outside_allocator": dict(self.per_gpu_outside_allocator)},
                "cpu": {"bytes_per_node": self.cpu_bytes_per_node, "breakdown": dict(self.cpu_parts)}}


class Totals(NamedTuple):
    """A setup's estimated totals, per GPU under an engine."""

    peak_allocated: int
    peak_phase: str
    peak_reserved: int
    device_total: int


def per_gpu_totals(spec: ModelSpec, setup: Setup, par: Parallel | None) -> Totals:
    """`setup`'s totals on one GPU (`par` None: the single-GPU estimate), or per GPU under `par`."""
    if par is None:
        e = estimate_setup(spec, setup)
        return Totals(e.peak_allocated_bytes, e.peak_phase, e.peak_reserved_bytes, e.device_total_bytes)
    d = estimate_distributed(spec, setup, par)
    return Totals(d.per_gpu_peak_allocated_bytes, d.peak_phase, d.per_gpu_reserved_bytes, d.per_gpu_device_total_bytes)


def zero_model_states(*, trainable_params: int, frozen_bytes: int, world: int, stage: int, offload: str,
                      optimizer_state_bytes: int = 12) -> dict[str, int]:
    """DeepSpeed ZeRO model states per GPU between steps, in DeepSpeed's own accounting (the
    figures its estimate_zero2/3_model_states_mem_needs print, less their largest-layer term)."""
    psi = trainable_params
    out = {"weights": 2 * psi + frozen_bytes, "gradients": 2 * psi, "optimizer_states": optimizer_state_bytes * psi}
    if stage >= 1:
        out["optimizer_states"] //= world
    if stage >= 2:
        out["gradients"] //= world
    if stage >= 3:
        out["weights"] //= world
    if offload in ("optimizer", "params"):
        out["optimizer_states"] = 0
    if offload == "params":
        out["weights"] = 0
    return out


def unsharded_quantised_bytes(spec: ModelSpec, setup: Setup, par: Parallel) -> int:
    """A 4-bit base's quantised Linear weights (bitsandbytes Params4bit with their quantisation
    states) in uint8 storage, which every GPU holds whole under engines that shard the rest:
    - FSDP2: accelerate's fsdp2_prepare_model (1.15, utils/fsdp_utils.py) passes every frozen,
      non-floating Params4bit to fully_shard as `ignored_params` ("Default uint8 quant_storage
      cannot survive fully_shard's DTensor conversion"); a floating `quant_storage` (bf16, as
      axolotl and LlamaFactory load) is sharded like any weight;
    - ZeRO-3: transformers builds a quantised model outside deepspeed.zero.Init
      (modeling_utils.py: `is_deepspeed_zero3_enabled() and not is_quantized`), and the 4-bit
      weights stay whole: d7-z3-q3-8b-hf-qlora-ckpt-b2s2048 and d8-z3-olmo2-7b-hf-qlora-ckpt-b2s2048
      start each step at 4.10 and 3.68 GiB per GPU, the whole 4-bit weights (3.29, 3.06 GiB) plus a
      quarter of the bf16 rest and the adapters' states give 4.14 and 3.70 (sharding them all: 2.28
      and 1.82). A floating storage is taken as sharded there too (peft's ZeRO-3 QLoRA recipe sets
      bnb_4bit_quant_storage for that; not measured).
    DDP and ZeRO-1/2 replicate the whole base anyway (0 here)."""
    if not setup.quantised or setup.dtype not in ("nf4", "fp4") or setup.quant_storage != "uint8":
        return 0
    if not ((par.engine == "deepspeed" and par.zero == 3) or (par.engine == "fsdp" and par.fsdp != "no_shard")):
        return 0
    return base_weight_bytes(lay=layout(spec), dtype=setup.dtype, dense_bytes_per_param=2,
                             double_quant=setup.double_quant, quantised=True).quantised_bytes


def _unit_bytes(spec: ModelSpec) -> int:
    """Largest all-gathered unit in 16-bit: a decoder layer, or the (tied) embedding."""
    return 2 * max(layout(spec).params_per_layer, spec.arch.vocab * spec.arch.hidden)


@dataclass(frozen=True)
class _Micro:
    """What the sharded phases take from the single-GPU micro-batch estimate."""

    psi: int  # trainable parameters
    frozen: int  # bytes of the frozen base, as stored, that the engine shards (or replicates: DDP, ZeRO-1/2)
    t: dict[str, int]  # the single estimate's terms
    states: int  # optimizer states per trainable parameter
    foreach: bool  # the optimizer step keeps a whole-group transient
    unsharded: int = 0  # frozen bytes every GPU holds whole though the engine shards (unsharded_quantised_bytes)
    carried: int = 0  # gradients kept between micro-batches (accumulated_gradient_bytes)
    norm_copy: int = 0  # DeepSpeed ZeRO-1/2's fp64 copy of the largest gradient slice (zero12_norm_copy_bytes)


Phases = dict[str, dict[str, int]]


def _fsdp_phases(spec: ModelSpec, setup: Setup, par: Parallel, m: _Micro) -> tuple[Phases, dict[str, int]]:
    """FSDP: fp32 sharded parameters (accelerate upcasts trainable bf16 parameters to fp32 before
    fully_shard: accelerate/utils/fsdp_utils.py fsdp2_prepare_model), sharded fp32 gradients and
    optimizer states. full_shard (reshard_after_forward=True) holds one bf16 unit gathered at a
    time; shard_grad_op (FSDP2 reshard_after_forward=False) keeps every unit's bf16 all-gathered
    copy from its forward until its backward is done, on top of the sharded storage (measured:
    data/measurements/h100x2_2026-11-25_dist.jsonl, d2-fsdpgo-*: the step starts at the sharded
    figure of full_shard, and backward adds the whole model in bf16).
    A trainable untied lm_head's unsharded bf16 gradient exists at the loss backward, where the
    peak is, until it is reduce-scattered into the fp32 shard (torch/distributed/fsdp/_fully_shard/
    _fsdp_param_group.py post_backward; measured: d2-fsdp-l8b-full, +0.98 GiB = 128256 x 4096 x 2
    bytes). A tied one is held past the embedding's backward (fsdp_tied_end_bytes)."""
    t, n, psi = m.t, par.world, m.psi
    shard = n if par.fsdp != "no_shard" else 1
    w = (4 * psi + m.frozen) // shard + m.unsharded
    opt = 4 * m.states * psi // shard
    grads = 4 * psi // shard
    tr = 4 * psi // shard if m.foreach else 0
    gathered = 0
    if par.fsdp == "full_shard":
        gathered = _unit_bytes(spec)  # the unit being computed
    elif par.fsdp == "shard_grad_op":
        gathered = 2 * psi + m.frozen  # every unit unsharded in bf16 between its forward and backward
    cpu: dict[str, int] = {}
    if par.offload == "params":
        cpu.update(weights=w * par.gpus_per_node, optimizer_states=opt * par.gpus_per_node,
                   gradients=grads * par.gpus_per_node, step_transient=tr * par.gpus_per_node)
        w = opt = grads = tr = 0
    stale = grads  # last step's sharded grads, freed when the next forward starts
    hold, live = t["hold"], t["layer_live"]
    lay = layout(spec)
    full = setup.method in ("full", "galore")
    head_grad = 2 * lay.lm_head_params if full and par.fsdp != "no_shard" else 0
    bwd_end = grads + live + hold
    carried = m.carried
    if full and spec.arch.tied and par.fsdp != "no_shard":
        # at the end everything but the tail group is resharded: only its bf16 unit stays gathered
        tail = 2 * spec.arch.vocab * spec.arch.hidden
        bwd_end = max(bwd_end, fsdp_tied_end_bytes(spec, shard=shard, grads=grads, emb_grad=t["emb_grad"]) + hold
                      + tail - gathered)
    # a later micro-batch runs with every unit's unsharded gradient kept (accumulated_gradient_bytes);
    # the last one's backward ends with them reduced into the shards (bwd_end)
    bwd_acts = max(t["acts_bwd_loss"], t["acts_bwd_top"], bwd_end - carried, live + hold if carried else 0)
    gpu = {"forward": {"weights": w, "optimizer_states": opt, "accumulated_gradients": carried,
                       "activations": max(stale - carried, gathered + t["acts_fwd_peak"])},
           "backward": {"weights": w, "optimizer_states": opt, "gathered_params": gathered, "unit_gradient": head_grad,
                        "accumulated_gradients": carried, "activations": bwd_acts},
           "optimizer_step": {"weights": w, "optimizer_states": opt, "gradients": grads, "transients": tr,
                              "logits_and_loss": hold}}
    return gpu, cpu


def fsdp_tied_end_bytes(spec: ModelSpec, *, shard: int, grads: int, emb_grad: int) -> int:
    """Gradient bytes per GPU at the end of an FSDP2 backward that trains a tied embedding
    (full_shard and shard_grad_op), beside the sharded weights and states and the tail's bf16 unit.

    accelerate's fsdp2_prepare_model (1.15, accelerate/utils/fsdp_utils.py) shards the final norm,
    embed_tokens and lm_head as one tail group with reshard_after_forward=False; that group's
    post_backward runs only in the root's final callback, after the embedding's backward, because
    its first module, embed_tokens, takes input_ids, which need no gradient. So at the end of
    backward three things are alive that the sharded gradients do not count:
    - the tied weight's unsharded 16-bit gradients: lm_head's share, held since the loss backward,
      and what the embedding adds, by the single-GPU rule (estimator.tied_embedding_grad_bytes:
      the embedding's dense gradient and, behind transformers' head, their out-of-place sum);
    - layer 0's reduce-scatter input (one decoder layer's parameters in 16 bit): the comm
      context's ReduceScatterState holds the last group's input until the next group's
      post_backward waits on it (torch/distributed/fsdp/_fully_shard/_fsdp_param_group.py post_backward);
    while the tail's own fp32 gradient shard does not exist yet, and no layer's activations live.
    Measured: d4-fsdp-q3-4b-hf-full-ckpt-b2s2048 peaks at 32.49 GiB (Qwen3-4B, 2 ranks), 0.84 GiB
    above the sharded gradients plus one layer's backward, where this gives 0.75 GiB."""
    vh = spec.arch.vocab * spec.arch.hidden
    layer_rs_input = 2 * layout(spec).params_per_layer
    return max(0, grads - 4 * vh // shard) + 2 * vh + emb_grad + layer_rs_input


def _zero_phases(spec: ModelSpec, setup: Setup, par: Parallel, m: _Micro, ddp_mixed: bool,
                 held: int) -> tuple[Phases, dict[str, int]]:
    """DeepSpeed ZeRO 1/2/3 and plain DDP.

    DDP: torch's Reducer allocates one flat bucket per ~25 MB of gradients, and together the
    buckets hold every trainable gradient (torch/csrc/distributed/c10d/reducer.cpp,
    initialize_buckets: bucket.gradients = at::empty(total numel)); with Trainer's default
    gradient_as_bucket_view=False they are a second copy beside param.grad, alive from the first
    backward on (measured: d2-ddp-*-full, the step starts a whole gradient copy above one GPU).
    ZeRO-3 without optimizer offload keeps a flat buffer of this rank's gradient partitions in the
    16-bit dtype on the GPU for the whole run (deepspeed/runtime/zero/stage3.py,
    grad_partitions_flat_buffer; measured: d2-z3-l3b-full starts 3.08 GiB above its master, states
    and bf16 partition = 2 bytes x params / N). `held`: zero3_reentrant_held_bytes."""
    t, n, psi = m.t, par.world, m.psi
    stage = par.zero
    master = (4 + 4 * m.states) if par.engine == "deepspeed" else 2 * m.states
    ms = zero_model_states(trainable_params=psi, frozen_bytes=m.frozen, world=n, stage=stage, offload=par.offload,
                           optimizer_state_bytes=master)
    w, opt, g16 = ms["weights"] + m.unsharded, ms["optimizer_states"], ms["gradients"]
    part = n if stage >= 1 else 1
    fp32_grads = 4 * psi // part if par.engine == "deepspeed" else 0
    tr = (4 if par.engine == "deepspeed" else 2) * psi // part if m.foreach else 0
    if ddp_mixed:  # every rank holds the single-GPU mixed-precision states
        w, opt, g16, tr = t["weights"] + t["adapters"], t["opt_states"], t["grads"], t["opt_transient"]
    if par.engine == "ddp":
        buckets = g16 if n > 1 else 0  # no reducer on one process
    else:
        buckets = 4 * spec.arch.hidden ** 2 if stage else 0
    grad_partitions = g16 if stage == 3 and par.offload == "none" else 0
    gathered = 0
    if stage == 3:
        # the gathered unit, its 16-bit gradient before reduce-scatter, and the prefetch bucket
        gathered = 2 * _unit_bytes(spec) + int(0.9 * spec.arch.hidden ** 2) * 2
    if par.offload != "none" and stage in (1, 2):
        # with offload the contiguous gradient bucket is sized to hold the largest parameter's
        # gradient (measured: +0.74 GiB = the 3B model's tied embedding, in bf16)
        buckets = 2 * max(spec.arch.hidden ** 2, layout(spec).largest_tensor)
    cpu: dict[str, int] = {}
    if par.offload in ("optimizer", "params"):
        host = (master + 4) * psi // part  # fp32 master + states + fp32 gradient partition
        cpu.update(optimizer_states=host * par.gpus_per_node,
                   step_transient=(4 * psi // part if m.foreach else 0) * par.gpus_per_node)
        fp32_grads = tr = 0
    if par.offload == "params":
        cpu["weights"] = (2 * psi + m.frozen) // n * par.gpus_per_node
    hold, live = t["hold"], t["layer_live"]
    fixed = {"weights": w, "optimizer_states": opt, "comm_buckets": buckets, "gradient_partitions": grad_partitions}
    step_grads = {"gradients": fp32_grads if par.engine == "deepspeed" else g16, "transients": tr}
    norm_copy, carried = m.norm_copy, m.carried
    if par.engine == "deepspeed" and stage in (1, 2) and par.offload == "none":
        step_grads = zero12_step_gradients(partition_params=psi // n, fp32_grads=fp32_grads, transient=tr,
                                           groups_share_partition=setup.trainer in ("hf", "trl"), norm_copy=norm_copy)
    late_grads = 0 if grad_partitions else g16  # gradients that exist only from backward on
    # a later micro-batch's backward adds into the carried gradients in place (autograd's AccumulateGrad)
    bwd_grads = live + hold if carried else late_grads + live + hold
    # at the turn from forward to backward ZeRO-3 holds what its coordinator kept gathered
    turn = max(gathered, zero3_live_gathered_bytes(spec)) if stage == 3 else gathered
    at_turn = max(t["acts_bwd_loss"], t["acts_bwd_top"])
    g, a = (turn, at_turn) if turn + at_turn >= gathered + bwd_grads else (gathered, bwd_grads)
    backward = {**fixed, "gathered_params": g, "accumulated_gradients": carried, "activations": a}
    if norm_copy and par.offload != "none":
        # the boundary's reduce of the largest tensor, last of backward: its 16-bit gradient and
        # the fp64 copy of its slice (zero12_norm_copy_bytes), past every activation
        largest = 2 * layout(spec).largest_tensor
        if largest + norm_copy + hold > backward["activations"] + gathered + carried:
            backward = {**fixed, "accumulated_gradients": carried, "gradients": largest, "transients": norm_copy,
                        "logits_and_loss": hold}
    if held:
        # the first layer's backward, with the embedding prefetched for its own (zero3_embedding_prefetch_bytes)
        at_first = held + zero3_embedding_prefetch_bytes(spec)
        if sum(fixed.values()) + at_first + live > sum(backward.values()):
            backward = {**fixed, "gathered_params": at_first, "activations": live}
    gpu = {"forward": {**fixed, "gathered_params": turn, "accumulated_gradients": carried,
                       "activations": t["acts_fwd_peak"]},
           "backward": backward,
           # ZeRO-1/2 release their reduce buckets when backward ends (stage_1_and_2.py
           # _release_ipg_buffers); DDP's and ZeRO-3's (allocated at init, stage3.py) stay
           "optimizer_step": {**fixed, "comm_buckets": 0 if stage in (1, 2) else buckets, **step_grads,
                              "logits_and_loss": hold}}
    return gpu, cpu


def zero3_linear_terms(spec: ModelSpec, setup: Setup, t: dict[str, int]) -> dict[str, int]:
    """The single-GPU activation terms under ZeRO-3's Linear, which saves every nn.Linear's input
    whether its weight trains or not (vramplan.ops.op_context `zero3_linear`): a frozen base adds,
    per layer, the inputs no other operation keeps -- with LoRA the q/k/v and MLP inputs (the
    adapters save their dropout outputs) and down_proj's (o_proj's is the flash kernel's saved
    output already). Every layer's forward keeps them without checkpointing; with it, the one
    layer being recomputed. Measured: d5-z3-q3-4b-trl-lora-nockpt-b2s1024 peaked 2.49 GiB above the
    estimate without them, against 2.04 GiB of such inputs over its 36 layers (-11.4% -> -2.1%)."""
    lay = layout(spec)
    z3_saved = layer_saved_by_group(spec.arch, lay, setup, zero3_linear=True,
                                    engine_autocast=not zero3_fp32_adapters_without_autocast(setup))
    extra = [(n, z3 - plain) for (n, plain), (_, z3) in zip(layer_saved_by_group(spec.arch, lay, setup), z3_saved,
                                                             strict=True)]
    one = max(e for _, e in extra)
    if not one:
        return t
    if setup.grad_checkpointing:
        return {**t, "layer_live": t["layer_live"] + one, "acts_bwd_top": t["acts_bwd_top"] + one}
    every = sum(n * e for n, e in extra)
    return {**t, **{k: t[k] + every for k in ("acts_fwd_peak", "acts_bwd_loss", "acts_bwd_top")}}


def zero3_fp32_adapters_without_autocast(setup: Setup) -> bool:
    """The Trainer's LoRA under ZeRO-3 keeps fp32 adapters and runs them without autocast. peft
    builds them in fp32 (autocast_adapter_dtype) after zero.Init, and every record of it reports
    trainable dtypes float32 (TRL's, and ZeRO-1/2's, whose engine casts the module, report bfloat16);
    DeepSpeed's bf16 mode runs forward without torch.autocast, so each adapter saves its fp32
    dropout output where autocast would save a 16-bit cast (vramplan.ops.lora.adapter_input).
    Measured: d12-z3-l1b-hf-lora-b4s2048, 4.5 GiB above the estimate without it at 8192 tokens;
    its trace (t14-) holds 96 x 64 + 16 x 256 MiB fp32 dropout outputs at the peak. A 4-bit base
    is left out: its records (d7-z3-q3-8b, d8-z3-olmo2-7b) are within 4% without it."""
    return setup.trainer == "hf" and setup.method == "lora" and not setup.quantised and adapter_bytes(setup) == 4


def zero3_reentrant_held_bytes(spec: ModelSpec, setup: Setup, par: Parallel, *, frozen_bytes: int) -> int:
    """Frozen decoder-layer weights that stay gathered through backward under ZeRO-3 with reentrant
    checkpointing, as TRL runs PEFT there: SFTTrainer forces `use_reentrant=True` for a PEFT model
    under ZeRO-3 with checkpointing (trl/trainer/sft_trainer.py, trl#4951, the DeepSpeed#4332
    workaround). The recompute re-gathers each layer's parameters inside backward, and DeepSpeed
    0.19.8 (partitioned_param_coordinator.py release_sub_module, DeepSpeed#8148) leaves a frozen
    parameter gathered after a recompute for the ensuing backward to release -- which reentrant
    checkpointing's inner backward does not (DeepSpeed#8130 review: frozen parameters "remained
    AVAILABLE after the first backward ... only partitioned by the optimizer-step safety net").
    So by the first layer's backward every frozen layer weight is whole on every rank: 16-bit
    bytes of all decoder layers (the embeddings and head are not checkpointed). Measured:
    d4-z3-l8b-trl-lora-b2s2048 and d5-z3-q3-4b-trl-lora-b2s2048 peak 10.6 and 5.2 GiB above the
    non-reentrant estimate, against 11.0 and 5.3 GiB of frozen layer weights beyond one gathered
    unit; the Trainer's non-reentrant run of the same setup does not (d5-z3-q3-4b-hf-lora-ckpt)."""
    if not (par.engine == "deepspeed" and par.zero == 3 and setup.trainer == "trl" and setup.grad_checkpointing
            and setup.method not in ("full", "galore")):
        return 0
    lay = layout(spec)
    total = lay.layer_params_total + lay.embed_params + lay.lm_head_params + lay.final_norm_params
    return frozen_bytes * lay.layer_params_total // max(1, total)


# deepspeed/runtime/zero/config.py (0.19.8): stage3_max_live_parameters defaults to 1e9, and
# transformers' DeepSpeed docs (ds_config_zero3.json) set the same, as vramplan.profiler.trainer_dist does
ZERO3_MAX_LIVE_PARAMS = 10**9


def zero3_live_gathered_bytes(spec: ModelSpec) -> int:
    """16-bit parameters ZeRO-3 keeps gathered at the turn from forward to backward: up to
    stage3_max_live_parameters of them. Once the module trace is complete, release_sub_module
    keeps every parameter reused within stage3_max_reuse_distance (1e9) elements of the trace
    (partitioned_param_coordinator.py __params_to_release), and one the prefetcher has already
    queued for a later use (__most_recent_step_id_param_fetched_for); the prefetcher fills the
    gathered set up to max_live_parameters (fetch_sub_module: max_params_to_prefetch =
    max_n_available_params - n_available_params). So the last decoder layers of the forward and
    the lm_head, which backward takes first, stay gathered. Measured (allocation trace):
    d11-z3-q25-15b-hf-full-ga2-b2s2048 holds 1.009e9 elements gathered at its peak at the start
    of backward -- the tied embedding (233M), 16 layers' attention and 50 of their MLP matrices
    (1.88 GiB) -- where two units and the prefetch bucket count 0.87 GiB. Capped by the model
    itself: a smaller model is gathered whole."""
    return 2 * min(ZERO3_MAX_LIVE_PARAMS, layout(spec).params_total)


def zero3_embedding_prefetch_bytes(spec: ModelSpec) -> int:
    """The embedding's 16-bit weight, gathered during the first decoder layer's backward under
    ZeRO-3 with reentrant checkpointing (zero3_reentrant_held_bytes), beside the held layer
    weights: its output needs a gradient there (PEFT's enable_input_require_grads), so the
    embedding's backward follows in the recorded module trace, and the prefetcher
    (partitioned_param_coordinator.py fetch_sub_module) starts the next module's gather whenever
    its queued numel is under stage3_prefetch_bucket_size -- it checks before adding, so even a
    vocabulary-sized module goes. Measured: d7-z3-g3-12b-trl-lora-b2s2048 (1.88 GiB embedding)
    and d6-z3-l8b / d6-z3-q3-4b peak 1.69, 0.50 and 0.48 GiB above the held weights and one
    layer's backward."""
    return 2 * layout(spec).embed_params


def zero3_gather_pool_extra_bytes(lay: Layout) -> int:
    """What the all-gather stream's pool reserves beyond the frozen layer weights ZeRO-3 holds
    gathered under reentrant checkpointing (zero3_reentrant_held_bytes): each weight is its own
    request, so they pack into segments as vramplan.allocator.packed_segment_bytes says (two 8 MiB
    k/v projections to a 20 MiB segment), and every vocabulary-sized weight gathered in the step
    -- the embedding, and an untied lm_head -- keeps a segment of its own there, whose freed block
    the held layer weights carve when they run out of their own sizes. Read off the end-of-run
    segments per stream of d6-z3-l8b-trl-lora-b2s2048 (all-gather stream: 96 x 112 + 64 x 32 +
    32 x 20 MiB of layer weights, 3 x 1002 MiB vocabulary blocks) and d6-z3-q3-4b-trl-lora-b2s2048
    (108 x 48 + 90 x 20 MiB, one 742 MiB block for the tied embedding)."""
    hit = _GATHER_POOL_CACHE.get(id(lay))
    if hit is not None and hit[0] is lay:
        return hit[1]
    layers = layer_tensor_bytes(lay=lay, bytes_per_param=2) * lay.layers
    vocab = [2 * n for n in (lay.embed_params, lay.lm_head_params) if n]
    extra = packed_segment_bytes(tensor_bytes=layers) - sum(layers) + packed_segment_bytes(tensor_bytes=vocab)
    _GATHER_POOL_CACHE[id(lay)] = (lay, extra)
    return extra


# keyed by the layout's identity (as vramplan.layout caches layouts): packing every layer weight
# costs ~700 steps for a 70B model, more than the rest of a distributed estimate
_GATHER_POOL_CACHE: dict[int, tuple[Layout, int]] = {}


def zero3_vocab_fetches(setup: Setup) -> int:
    """Vocabulary-sized all-gathers in one ZeRO-3 step that no host synchronisation separates, so
    that each may need its own block (zero3_vocab_pool_extra_bytes): the embedding and lm_head in
    forward, lm_head again for its backward, and the embedding in backward where its output needs
    a gradient (a trainable embedding, or PEFT with checkpointing: the Trainer's
    enable_input_require_grads). TRL's compute_loss reads its token metrics with `.item()` after
    the forward (trl/trainer/sft_trainer.py 1.16), and the reference loop synchronises there too,
    so there at most two are unseparated; the Trainer (transformers 5.17) synchronises only after
    backward (its logging_nan_inf_filter check)."""
    if setup.trainer != "hf":
        return 2
    embedding_backward = setup.method in ("full", "galore") or setup.grad_checkpointing
    return 3 + int(embedding_backward)


def zero3_vocab_pool_extra_bytes(spec: ModelSpec, setup: Setup, par: Parallel, *, gathered: int) -> int:
    """Reserved on ZeRO-3's all-gather stream beyond what is gathered at the peak (`gathered`).
    A single-parameter module (the embedding, lm_head) is all-gathered straight into one
    vocabulary-sized block allocated on that stream (partition_parameters.py _all_gather_params),
    and free_param releases it with `record_stream(current_stream())`, so the block returns to the
    pool only once the default stream has run past its use. A fetch issued before then cuts a new
    block; with no host synchronisation between them, each of the step's vocabulary-sized fetches
    (zero3_vocab_fetches) can hold one, and the layers' gathers carve the freed ones. Measured
    (segments per stream at the end): d7-z3-q3-14b-hf-lora-ckpt-b2s2048 and
    d7-z3-q3-8b-hf-qlora-ckpt-b2s2048 (Trainer, untied heads) end with four vocabulary blocks and
    nothing else of size there; TRL's runs (d6-z3-q3-4b, d7-z3-l3b-trl-full, d7-z3-g3-12b) one.

    A module of several parameters -- a fused-expert MoE block (transformers 5's 3-D gate_up_proj
    and down_proj) -- is gathered into one flat buffer and then copied out per parameter
    (AllGatherCoalescedHandle.wait: torch.cat of each parameter's partitions), both on that
    stream, and the next layer's copies are cut while this layer's are pending: a flat buffer and
    two layers' copies, three blocks of the experts' size. Measured: d7-z3-qmoe-hf-lora-ckpt-b2s2048
    (Qwen1.5-MoE, 990 MiB of experts a layer) ends with a 1058 MiB flat block, 660 + 662 + 662 and
    330 MiB copies there, and two 594 MiB vocabulary blocks (the others carved from the experts'):
    this counts both in full, an upper bound (5.2 GiB against 4.5 GiB measured)."""
    if not (par.engine == "deepspeed" and par.zero == 3 and par.offload == "none"):
        return 0
    if setup.method in ("full", "galore"):
        # not seen where the vocabulary weights train: the full fine-tunes measured under the
        # Trainer (d2-z3-l3b-full, d4-z3-phi4mini) reserve no more than the estimate without it
        return 0
    lay = layout(spec)
    block = side_stream_pool_bytes(tensor_bytes=[2 * max(lay.embed_params, lay.lm_head_params)])
    experts = side_stream_pool_bytes(tensor_bytes=[2 * lay.layer_expert_params]) if lay.layer_expert_params else 0
    return max(0, zero3_vocab_fetches(setup) * block + 3 * experts - gathered)


def zero12_step_gradients(*, partition_params: int, fp32_grads: int, transient: int,
                          groups_share_partition: bool, norm_copy: int = 0) -> dict[str, int]:
    """Gradient bytes of ZeRO-1/2's optimizer step (no offload), by component, at its larger moment.

    Backward copies every gradient of this rank's partition into `grads_in_partition`, one flat
    16-bit tensor (stage_1_and_2.py 0.19.8 reduce_ipg_grads -> copy_grads_in_partition, at stage 1
    too with contiguous gradients, as both profilers configure), and `averaged_gradients[i]`
    keeps views of it after _release_ipg_buffers drops the attribute. step() then, per parameter
    group, flattens those views into a new 16-bit copy (`self.flatten(self.averaged_gradients[i])`),
    upcasts it to the fp32 gradient (`.to(...)`), and only then deletes the copy, frees the group's
    views (free_grad_in_param_list) and runs the optimizer (_optimizer_step). Two moments:
    - the upcast: flat partition + its copy + the fp32 gradient, 2 + 2 + 4 bytes a parameter;
    - group 0's optimizer step: the fp32 gradient and the optimizer's transient, and the flat
      partition too where another group still views it -- Trainer and TRL build a decay and a
      no-decay group (transformers trainer.py create_optimizer) over one flat partition, and the
      no-decay group's views are released only at its own turn.
    Before both, the gradient norm (scaled_global_norm -> get_grad_norm_direct) upcasts one slice
    of the flat partition at a time to fp64 (`norm_copy`, zero12_norm_copy_bytes).
    accelerate's DeepSpeed wrapper runs engine.step() inside backward (accelerate/utils/deepspeed.py),
    so a Trainer record's backward peak may be this moment. Measured: d4-z2-gran2b-hf-full-ckpt-b4s2048
    peaks at 28.38 GiB = bf16 weights 4.72 + fp32 master and Adam states 14.16 + 2.36 + 2.36 + 4.72
    (its 2.53B parameters over 2 ranks) + the cuBLAS workspaces."""
    g16 = 2 * partition_params
    held = g16 if groups_share_partition else 0
    moments = ({"gradient_partitions": g16, "gradients": fp32_grads, "transients": g16},  # ties go to the first
               {"gradient_partitions": held, "gradients": fp32_grads, "transients": transient},
               {"gradient_partitions": g16, "gradients": 0, "transients": norm_copy})
    return max(moments, key=lambda m: sum(m.values()))


def accumulated_gradient_bytes(setup: Setup, par: Parallel, *, single_accum: int, partition: int) -> int:
    """Gradient bytes each GPU keeps between the micro-batches of one optimizer step
    (grad_accum > 1), alive through the later micro-batches' forward and backward.

    `single_accum`: the single-GPU figure (the trainable parameters' .grad in their dtype);
    `partition`: this rank's 16-bit gradient partition under ZeRO-2.
    - DDP: transformers' Trainer runs the earlier micro-batches under accelerate's no_sync, so
      param.grad accumulates whole on every GPU and the reducer buckets wait (measured:
      d9-ddp-g2-2b-hf-full-ckpt-ga2-b4s2048 peaks at 52.85 GiB per GPU, 4.9 GiB above the estimate
      without this term: its whole bf16 gradient is 4.87 GiB);
    - FSDP2: accelerate's no_sync calls set_requires_gradient_sync(False), so each unit's unsharded
      gradient stays on the GPU in the parameter dtype (torch/distributed/fsdp/_fully_shard/
      _fsdp_param_group.py post_backward: `if not self.reduce_grads` keeps them; accelerate's bf16
      policy reduces in bf16, utils/dataclasses.py, so to_accumulated_grad_if_needed keeps
      .grad as is): every trainable parameter's gradient, unsharded;
    - ZeRO-1: DeepSpeed reduces only at the accumulation boundary (runtime/engine.py
      allreduce_gradients), so param.grad accumulates whole; ZeRO-2 reduces every micro-batch into
      this rank's 16-bit partition, which persists (stage_1_and_2.py copy_grads_in_partition);
      ZeRO-3's partition buffer is alive anyway, and with optimizer offload ZeRO-2/3 accumulate in
      host memory (async_accumulate_grad_in_cpu_via_gpu). The DeepSpeed and FSDP2 rules are read
      from the code; only DDP's is measured."""
    if setup.grad_accum < 2:
        return 0
    if par.engine in ("ddp", "fsdp") or par.zero == 1:
        return single_accum
    if par.zero == 2 and par.offload == "none":
        return partition
    return 0


def accumulated_gradient_reserved_bytes(par: Parallel, *, carried: int) -> int:
    """Blocks the carried gradients (accumulated_gradient_bytes) strand under DDP and FSDP2, where
    autograd creates them one parameter at a time in the first micro-batch's backward: they carve
    the blocks its activations are freeing, and the next micro-batch's forward, needing those
    activations' sizes again whole, reserves them anew -- at most the carried bytes. Measured:
    d10-fsdp-l1b-hf-full-ga2-b2s1024 reserves 2.33 GiB above the estimate without this term
    against 2.30 GiB carried (its default stream ends with 103 x 32, 53 x 16 and 31 x 20 MiB segments);
    d9-ddp-g2-2b-hf-full-ckpt-ga2-b4s2048, whose gradients can also carve the loss's freed 8000 MiB
    vocabulary blocks, 2.46 of its 4.87 GiB. ZeRO-1's whole gradients go to flat buffers (the
    d10-z1 run's six 2358 MiB segments) and strand nothing of the kind."""
    return carried if par.engine in ("ddp", "fsdp") else 0


def zero12_norm_copy_bytes(spec: ModelSpec, setup: Setup, par: Parallel) -> int:
    """The 64-bit copy DeepSpeed ZeRO-1/2 makes of one gradient slice to take its norm, on the
    rank whose partition holds the largest trainable tensor (the embedding or lm_head of a full
    fine-tune): get_norm_dtype() is torch.double wherever the card has fp64 (runtime/zero/utils.py
    0.19.8), and each parameter's slice is upcast whole (`g.data.to(get_norm_dtype())`:
    get_grad_norm_direct in step() without offload, set_norm_for_param_grad_in_gpu at the
    boundary's reduce with optimizer offload), 8 bytes an element. Partitions are flat cuts of
    each parameter group, so a tensor larger than a partition is split over ranks. Measured:
    d9-z2off-g3-12b-hf-full-ckpt-b1s2048 rank 0 (Gemma 3's 1.01B-element embedding in its
    partition) ends backward 2.65 GiB above ranks 1-3 and keeps a 7682 MiB segment on the
    reduction stream, the embedding's 8-byte copy."""
    if par.engine != "deepspeed" or par.zero not in (1, 2) or setup.method not in ("full", "galore"):
        return 0
    lay = layout(spec)
    return 8 * min(lay.largest_tensor, lay.params_total // par.world)


def zero12_norm_copy_segment_bytes(par: Parallel, *, norm_copy: int, peak_parts: dict[str, int],
                                   largest_freed_block: int) -> int:
    """The segment the fp64 norm copy of ZeRO-1/2 (`norm_copy`, zero12_norm_copy_bytes) adds to the
    reserved memory where its moment is not the step's peak (where it is, the peak counts it).

    - With optimizer offload: overlap_comm reduces under `self.reduction_stream` and
      copy_grads_in_partition takes the norm there (stage_1_and_2.py 0.19.8 reduce_ipg_grads), so
      the copy's block belongs to that stream's pool and stays cached beside the default stream's,
      whose blocks cannot serve it. Measured: d11-z2off-l1b-hf-full-ga2-b2s2048 rank 0 keeps a
      2004 MiB segment on that stream (Llama-3.2-1B's embedding, 8 bytes an element) and reserves
      1.97 GiB more than ranks 1-3 at the same activation peak; d7-z2off-olmo2-7b ranks 0 and 3
      (embedding and untied lm_head) each keep a 3136 MiB one and reserve 3.4 and 2.7 GiB more
      than ranks 1-2.
    - Without offload the copy is made on the default stream in step(), after backward freed its
      blocks: it takes a segment of its own only where it is larger than every one of them
      (`largest_freed_block`: the fp32 gradient partition the previous step freed, the loss's
      vocabulary block, an MLP activation). Measured: d11-z1-g3-1b-hf-full-b1s512 rank 0 (a
      250M-element slice of Gemma 3's embedding: 1908 MiB in fp64, against 954 MiB fp32
      partitions and 576 MiB blocks) reserves 1.95 GiB more than ranks 2-3; d10-z1-l1b's 2004 MiB
      copy fits its freed 2358 MiB partitions and adds no segment. An upper bound where the fp32
      partition is then carved from the copy's freed block: d11-z2-q3-17b rank 0 keeps a 2374 MiB
      copy segment in place of one of its 1642 MiB partition segments, 0.7 GiB more than ranks 1-3.
    The estimate is the owning rank's."""
    if not norm_copy or peak_parts.get("transients") == norm_copy:
        return 0
    if par.offload == "none" and norm_copy <= largest_freed_block:
        return 0
    return norm_copy


# deepspeed/runtime/zero/config.py (0.19.8): `sub_group_size` defaults to 1e9 elements (the Trainer
# config of vramplan.profiler.trainer_dist sets the same); stage3.py _create_fp16_sub_groups closes
# a sub-group of this rank's partition once it holds that many, and steps one sub-group at a time.
ZERO3_SUB_GROUP_PARAMS = 10**9


def zero_overlap_comm(*, stage: int, trainer: str) -> bool:
    """Whether ZeRO reduces gradients on its own stream: transformers' DeepSpeed config (the
    Trainer's, vramplan.profiler.trainer_dist) sets overlap_comm; DeepSpeed's default turns it on
    for stage 3 only (deepspeed/runtime/zero/config.py overlap_comm_valid), which is what the
    plain loop (vramplan.profiler.dist_worker, overlap_comm False) runs at stages 1 and 2."""
    return trainer in ("hf", "trl") or stage == 3


def zero_reserved_extra_bytes(spec: ModelSpec, setup: Setup, par: Parallel, *, trainable_params: int, states: int,
                              backward_bytes: int, peak_bytes: int) -> int:
    """Reserved memory of DeepSpeed ZeRO (no offload) beyond its peak allocated plus the
    micro-batch's allocator slack (vramplan.allocator), from two things DeepSpeed allocates:
    - ZeRO-1/2 with overlap_comm: reduce_ipg_grads runs copy_grads_in_partition under
      `with stream(self.reduction_stream)`, so `grads_in_partition` (this rank's 16-bit gradient
      partition, one flat tensor) is allocated on the reduction stream (stage_1_and_2.py, 0.19.8)
      and its segment lives in that stream's pool (allocator.side_stream_pool_bytes), freed after
      each step but never reusable by the default stream's tensors;
    - the fp32 gradient partition and the optimizer's states are flat tensors, one per parameter
      group (stage_1_and_2.py single_partition_of_fp32_groups; torch's Adam states are zeros_like
      that flat parameter) or per sub-group at stage 3, made in the first step's optimizer step
      (allocator.first_step_flat_bytes). The Trainer's no-decay group (norms, biases) is left out.
    The first step's high-water mark is its backward (the steady backward less the states) plus
    the new segments, so a segment-sized extra counts only where it passes the steady peak."""
    if par.engine != "deepspeed" or par.offload != "none":
        return 0
    part = trainable_params // par.world
    pool = 0
    if par.zero in (1, 2) and zero_overlap_comm(stage=par.zero, trainer=setup.trainer):
        pool = side_stream_pool_bytes(tensor_bytes=[2 * part])
    flat = 4 * (min(part, ZERO3_SUB_GROUP_PARAMS) if par.zero == 3 else part)
    # heads.hf_loss_head: logits.float(), the log_softmax output and its gradients, each
    # 4 B x tokens x vocab; TRL's and Liger's fused heads make no vocabulary-sized tensor
    vocab_block = freed_vocab_block(spec.arch, setup)
    act_block = largest_activation_block_bytes(spec, setup)
    first = first_step_flat_bytes(flat_bytes=flat, states=states, vocab_block_bytes=vocab_block,
                                  vocab_blocks=first_step_vocab_blocks(spec, setup, flat_bytes=flat),
                                  activation_block_bytes=act_block)
    if flat > vocab_block and first:  # own segments: the first step's backward plus the fp32 gradient
        first = max(0, backward_bytes + first - peak_bytes)
    return pool + first


# heads.hf_loss_head: transformers' loss frees three fp32 vocabulary-sized blocks before the layers'
# backward: logits.float(), the log_softmax output it saved, and that output's gradient
HF_LOSS_VOCAB_BLOCKS = 3


def first_step_vocab_blocks(spec: ModelSpec, setup: Setup, *, flat_bytes: int) -> int:
    """How many freed vocabulary-sized blocks (reserved.freed_vocab_block) can still take one of
    the first step's flat tensors of `flat_bytes` (allocator.first_step_flat_bytes): the loss's
    HF_LOSS_VOCAB_BLOCKS, less one where a full fine-tune's backward cuts the lm_head weight
    gradient (2 B x vocab x hidden, its first matmul's output) from one of them and the autograd
    thread's cuBLAS workspace, allocated in that same call, lands right behind it and stays for the
    run, leaving no free piece of the block that large. Traced: t15-z2-g3-1b-hf-full-b2s512
    (Gemma-3-1B, 1024 MiB blocks) keeps that 32 MiB workspace at offset 576 MiB of one of them from
    step 1's backward on, and its 954 MiB flats find two blocks; d2-z2-l1b-full-ckpt-b4s2048's
    2357 MiB flats still fit the 3475 MiB behind Llama-3.2-1B's 501 MiB gradient, and its two
    states strand two blocks. 0 with a fused head, which frees none."""
    block = freed_vocab_block(spec.arch, setup)
    if not block:
        return 0
    grad = 2 * spec.arch.vocab * spec.arch.hidden
    if setup.method not in ("full", "galore") or grad > block:
        return HF_LOSS_VOCAB_BLOCKS
    largest_piece = max(grad, block - grad - HOPPER_CUBLAS_WORKSPACE_BYTES)
    return HF_LOSS_VOCAB_BLOCKS - (largest_piece < flat_bytes)


def zero12_copy_block_stranded_bytes(spec: ModelSpec, setup: Setup, par: Parallel, *, copy_segment: int,
                                     flat_bytes: int, states: int) -> int:
    """What a state strands of the fp64 norm copy's own segment (`copy_segment`,
    zero12_norm_copy_segment_bytes, without offload). step() frees the copy before it makes the fp32
    gradient partition, and torch's Adam makes its states in its first step (`_init_group`), all
    flat tensors of `flat_bytes`: best fit gives them the freed vocabulary blocks first
    (first_step_vocab_blocks), and a state left over is carved from the copy's block, which it
    then holds for the run, so every later step's copy takes a fresh segment and the rest of this
    one is stranded. Traced: t15-z2-g3-1b-hf-full-b2s512 rank 0 (its partition a 250M-element
    slice of Gemma 3's embedding; 1908 MiB copy, 954 MiB flats, two free 1024 MiB loss blocks)
    puts exp_avg_sq in step 1's copy segment and takes a second 1908 MiB one in step 2: ranks 1-3
    keep one 954 MiB segment where it keeps two 1908 MiB ones. Where the flats outgrow the loss
    blocks, the gradient partition is cut from the copy's block first and a state beside it fills
    it (d11-z1-g3-1b-hf-full-b1s512 rank 0: 954 + 954 MiB in 1908), which the first step's own
    segment for the gradient stands for: 0 there."""
    if not (copy_segment and flat_bytes) or par.offload != "none" or flat_bytes > freed_vocab_block(spec.arch, setup):
        return 0
    vocab_blocks = first_step_vocab_blocks(spec, setup, flat_bytes=flat_bytes)
    carved = min(first_step_states_past_vocab_blocks(states=states, vocab_blocks=vocab_blocks),
                 copy_segment // flat_bytes)
    return copy_segment - carved * flat_bytes if carved else 0


def largest_activation_block_bytes(spec: ModelSpec, setup: Setup) -> int:
    """The largest activation block of a ZeRO step: an MLP projection's output, tokens x
    intermediate in bf16 (ZeRO runs the model in bf16, ENGINE_PRECISION)."""
    return 2 * micro_batch_tokens(setup) * max(spec.arch.intermediate, spec.arch.dense_intermediate)


def fsdp_reduce_scatter_pool_bytes(par: Parallel, trainable_params: int, *, grads_alive: bool) -> int:
    """FSDP2 allocates each unit's reduce-scatter output -- the fp32 gradient shard the optimizer
    then steps on -- on its reduce-scatter stream (torch/distributed/fsdp/_fully_shard/
    _fsdp_collectives.py foreach_reduce: `reduce_output` under `device_handle.stream(
    reduce_scatter_stream)`). Once zero_grad frees them the caching allocator keeps those blocks
    for that stream, so at a peak before this step's gradients exist (the loss) they are reserved
    and of no use to the default stream's tensors. Measured: d3-fsdp-l1b-full-ckpt-b4s2048 and
    d3-fsdpgo-l1b-full-ckpt-b4s2048 reserve 2.0 and 1.8 GiB beyond the one-GPU slack, their
    gradient shards being 2.3 GiB; LoRA's shards are a few MiB (d3-*-lora within 2.4%)."""
    if par.engine != "fsdp" or par.offload == "params" or grads_alive:
        return 0
    shard = par.world if par.fsdp != "no_shard" else 1
    return 4 * trainable_params // shard


def fsdp_all_gather_pool_bytes(spec: ModelSpec, par: Parallel) -> int:
    """FSDP2 all-gathers each group into one flat 16-bit output allocated on its all-gather
    copy-in stream (torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py foreach_all_gather:
    all_gather_copy_in under `device_handle.stream(all_gather_copy_in_stream)`), copies it out
    into the unsharded parameters on the default stream, and in forward keeps the result in the
    comm context's AllGatherState until the next group's copy-out (_fsdp_param_group.py
    wait_for_unshard). So at layer 0's forward all-gather the tail group's output (accelerate's
    group of embed_tokens, the final norm and lm_head: fsdp_tied_end_bytes) and a decoder layer's
    are alive together in that stream's pool, and both segments stay cached there for the whole
    run, of no use to the default stream (allocator.side_stream_pool_bytes). Measured:
    d7-fsdp-g3-4b-trl-lora-b4s2048 (Gemma-3-4B, tied, 4 ranks) ends with 1282 + 182 + 2 MiB on
    that stream -- the 1280 MiB embedding and a 180 MiB layer -- and
    d7-fsdpgo-gran2b-hf-full-ckpt-b4s2048 with 194 + 118 + 50 MiB."""
    if par.engine != "fsdp" or par.fsdp == "no_shard" or par.world < 2:
        return 0
    lay = layout(spec)
    tail = 2 * (lay.embed_params + lay.lm_head_params + lay.final_norm_params)
    return side_stream_pool_bytes(tensor_bytes=[tail]) + side_stream_pool_bytes(tensor_bytes=[2 * lay.params_per_layer])


def fsdp_loss_moment_reserved_bytes(par: Parallel, gpu: Phases, m: _Micro, *, grads_alive: bool, ag_pool: int) -> int:
    """Reserved at the loss moment of every step after the first, for FSDP2 (no parameter offload)
    whose peak allocated comes later, with the step's gradient shards alive (the end of backward
    or the optimizer step), where fsdp_reduce_scatter_pool_bytes adds nothing: the caching
    allocator keeps free blocks per stream (vramplan.allocator_sim), so at the loss the previous
    step's fp32 gradient shards, freed by zero_grad, stay cached in the reduce-scatter stream's
    pool (fsdp_reduce_scatter_pool_bytes) while the default stream holds the backward phase's
    sharded weights, states, gathered unit, unit gradient and workspaces, and the larger of the
    loss moment's activations and the blocks it keeps cached for them (the single-GPU dynamic
    pools without the gradient pool: reserved.dynamic_pool_bytes), and the all-gather copy-in
    stream's pool (`ag_pool`: fsdp_all_gather_pool_bytes). Measured:
    d4-fsdp-q3-4b-hf-full-ckpt-b2s2048 (Qwen3-4B, tied, peak at the end of backward) reaches its
    41.99 GiB high-water mark in step 2's loss backward, where this gives 41.67 GiB; 0 (the usual
    rule applies) where the peak itself has no gradients."""
    if par.engine != "fsdp" or par.offload == "params" or not grads_alive:
        return 0
    b, t = gpu["backward"], m.t
    default_stream = (b["weights"] + b["optimizer_states"] + b["gathered_params"] + b["unit_gradient"]
                      + b["cublas_workspace"] + max(t["acts_bwd_loss"], t["dynamic_pools"]))
    return default_stream + fsdp_reduce_scatter_pool_bytes(par, m.psi, grads_alive=False) + ag_pool


def ddp_rebuilt_bucket_bytes(setup: Setup, par: Parallel, *, buckets: int, layers: int, ckpt_input: int,
                             grad_tensors: list[int]) -> int:
    """DDP rebuilds its gradient buckets in the order gradients became ready, once, at the start of
    the second iteration (torch/nn/parallel/distributed.py _pre_forward -> reducer._rebuild_buckets,
    reducer.cpp rebuild_buckets / initialize_buckets) when it does not look for unused parameters;
    Trainer looks for them only without gradient checkpointing (trainer.py _wrap_model:
    find_unused_parameters = not model.is_gradient_checkpointing). The first buckets' blocks, freed
    then, serve only requests no larger than themselves: that forward's kept checkpoint inputs,
    where each fits a bucket, and then backward's gradients that fit (`grad_tensors`: each
    trainable tensor's gradient bytes), which take the blocks backward frees from those inputs --
    the larger of the two; the rest stays cached beside every later step. Measured:
    d2-ddp-q15b-full-ckpt-b4s2048 reserves 2.65 GiB more than one GPU's slack from the second step
    on, its buckets 2.87 GiB, its 28 kept inputs 0.66 GiB (its 26.25 MiB MLP gradients do not fit
    a 25 MiB bucket block); d4-ddp-q3-17b-trl-full-b4s2048 strands none of its 3.2 GiB, its 32 MiB
    kept inputs too large but 2.6 GiB of its gradients (24 MiB MLP weights) small enough."""
    if par.engine != "ddp" or par.world < 2 or not setup.grad_checkpointing or not buckets:
        return 0
    inputs = layers * ckpt_input if ckpt_input <= DDP_BUCKET_CAP_BYTES else 0
    grads = sum(g for g in grad_tensors if g <= DDP_BUCKET_CAP_BYTES)
    return max(0, buckets - max(inputs, grads))


def _grad_tensor_bytes(spec: ModelSpec, setup: Setup, t: dict[str, int]) -> list[int]:
    """Each trainable tensor's gradient bytes: every parameter tensor of a full fine-tune (in the
    gradients' dtype), else the adapters as one small group (LoRA's tensors are all far below a
    bucket)."""
    if setup.method not in ("full", "galore"):
        return [t["grads"]] if t["grads"] <= DDP_BUCKET_CAP_BYTES else []
    per_param = t["grads"] / max(1, sum(param_tensor_bytes(lay=layout(spec), bytes_per_param=1)))
    return param_tensor_bytes(lay=layout(spec), bytes_per_param=per_param)


# torch DistributedDataParallel bucket_cap_mb default (25 MB), the size of a bucket's block
DDP_BUCKET_CAP_BYTES = 25 * 1024 * 1024


def _grads_alive(gpu: Phases, peak_phase: str, m: _Micro) -> bool:
    """Whether the step's gradient shards exist at its peak: the optimizer step, or a backward
    peak at its end (the activations term is then the gradients' one)."""
    if peak_phase == "optimizer_step":
        return True
    t = m.t
    bwd = gpu["backward"]
    return peak_phase == "backward" and bwd.get("activations", 0) + bwd.get("accumulated_gradients", 0) > max(
        t["acts_bwd_loss"], t["acts_bwd_top"])


def _nccl_engine(par: Parallel) -> str:
    if par.engine != "deepspeed":
        return "torch"
    return "zero3" if par.zero == 3 else "zero12"


def _engine_notes(par: Parallel, m: _Micro, held: int) -> tuple[str, ...]:
    """What an estimate under `par` says of the engine's own memory: 4-bit weights it keeps whole
    (`m.unsharded`), TRL's reentrant hold under ZeRO-3 (`held`), FSDP2's unsynced accumulation."""
    notes = []
    if m.unsharded:
        why = ("accelerate's FSDP2 leaves uint8 Params4bit unsharded (--quant-storage bf16, bnb_4bit_quant_storage, "
               "shards them)" if par.engine == "fsdp" else
               "transformers builds a quantised model outside deepspeed.zero.Init and DeepSpeed keeps the 4-bit weights "
               "whole (measured with 0.19.8)")
        notes.append(f"the 4-bit weights ({fmt_gib(m.unsharded)}) stay whole on every GPU: {why}")
    if held:
        notes.append(
            f"TRL forces reentrant checkpointing for PEFT under ZeRO-3 (trl#4951), and DeepSpeed (measured with 0.19.8) "
            f"keeps every frozen layer weight gathered from its recompute to the optimizer step: {fmt_gib(held)} per "
            f"GPU; Trainer's non-reentrant checkpointing or ZeRO-2 avoid it")
    if m.carried and par.engine == "fsdp":
        notes.append(
            f"gradient accumulation under FSDP2: the earlier micro-batches run without gradient sync, so every GPU "
            f"keeps the whole unsharded gradient ({fmt_gib(m.carried)}) until the last one; sync_each_batch=True in "
            f"accelerate's GradientAccumulationPlugin reduce-scatters each micro-batch instead")
    return tuple(notes)


def estimate_distributed(spec: ModelSpec, setup: Setup, par: Parallel) -> DistributedEstimate:
    """Per-GPU and host memory of `setup` (per-GPU micro-batch) under `par`."""
    # ZeRO/FSDP run the model in bf16 without autocast (ENGINE_PRECISION): pure-bf16 activations.
    # Plain DDP wraps the single-GPU loop: a mixed setup keeps its fp32 states and autocast.
    ddp_mixed = par.engine == "ddp" and setup.precision == "mixed"
    compute = replace(setup, precision="pure") if setup.precision == "mixed" and not ddp_mixed else setup
    if par.engine == "deepspeed" and setup.quantised and setup.kbit_prepare:
        # DeepSpeed casts every floating parameter to bf16 when its engine starts (runtime/engine.py
        # _cast_module_mixed_precision), undoing prepare_model_for_kbit_training's fp32 upcast
        compute = replace(compute, kbit_prepare=False)
    single = replace(estimate_setup(spec, compute), setup=setup)
    t = single.terms
    if par.engine == "deepspeed" and par.zero == 3:
        t = zero3_linear_terms(spec, setup, t)  # every phase and the reserved moments below see these
    spec_opt = OPTIMIZERS[setup.optimizer]
    frozen = t["weights"] if setup.method not in ("full", "galore") else 0
    whole = unsharded_quantised_bytes(spec, setup, par)
    psi = single.params_trainable
    m = _Micro(psi=psi, frozen=frozen - whole, t=t, states=spec_opt.states, foreach=spec_opt.foreach, unsharded=whole,
               carried=accumulated_gradient_bytes(setup, par, single_accum=t["accum"], partition=2 * psi // par.world),
               norm_copy=zero12_norm_copy_bytes(spec, setup, par))
    held = zero3_reentrant_held_bytes(spec, setup, par, frozen_bytes=m.frozen)
    notes = _engine_notes(par, m, held)
    if notes:
        single = replace(single, notes=(*single.notes, *notes))
    gpu, cpu = _fsdp_phases(spec, setup, par, m) if par.engine == "fsdp" else _zero_phases(spec, setup, par, m, ddp_mixed, held)
    for parts in gpu.values():
        parts["cublas_workspace"] = t["workspace"]
    phases = {k: sum(v.values()) for k, v in gpu.items()}
    peak_phase = max(phases, key=lambda p: phases[p])
    peak = phases[peak_phase]
    # the micro-batch's allocator slack (vramplan.allocator: same logits/activation sizes per GPU)
    reserved = peak + single.peak_reserved_bytes - single.peak_allocated_bytes
    reserved += zero_reserved_extra_bytes(spec, setup, par, trainable_params=m.psi, states=m.states,
                                          backward_bytes=phases["backward"], peak_bytes=peak)
    grads_alive = _grads_alive(gpu, peak_phase, m)
    reserved += fsdp_reduce_scatter_pool_bytes(par, m.psi, grads_alive=grads_alive)
    ag_pool = fsdp_all_gather_pool_bytes(spec, par)
    reserved += ag_pool
    if peak_phase == "backward" and held:
        # the held weights sit in the all-gather stream's pool (partitioned_param_coordinator.py
        # gathers under __allgather_stream); the default stream keeps the blocks of its own larger
        # backward moments cached beside them (vramplan.allocator_sim: pools are per stream)
        reserved += max(t["acts_bwd_loss"], t["acts_bwd_top"]) - gpu["backward"]["activations"]
        # the prefetched embedding's block is one of the pool's vocabulary blocks, allocated at this peak
        reserved += max(0, zero3_gather_pool_extra_bytes(layout(spec)) - zero3_embedding_prefetch_bytes(spec))
    else:
        reserved += zero3_vocab_pool_extra_bytes(spec, setup, par, gathered=gpu[peak_phase].get("gathered_params", 0))
    reserved += ddp_rebuilt_bucket_bytes(setup, par, buckets=gpu["optimizer_step"].get("comm_buckets", 0),
                                         layers=layout(spec).layers,
                                         ckpt_input=checkpoint_bytes(spec.arch, setup, stream_dtypes(setup)),
                                         grad_tensors=_grad_tensor_bytes(spec, setup, t) if par.engine == "ddp" else [])
    reserved = max(reserved, fsdp_loss_moment_reserved_bytes(par, gpu, m, grads_alive=grads_alive, ag_pool=ag_pool))
    reserved += accumulated_gradient_reserved_bytes(par, carried=m.carried)
    fp32_partition = 4 * m.psi // par.world
    copy_segment = zero12_norm_copy_segment_bytes(
        par, norm_copy=m.norm_copy, peak_parts=gpu[peak_phase],
        # the fp32 gradient partition, the loss's vocabulary block, an MLP output
        largest_freed_block=max(fp32_partition, freed_vocab_block(spec.arch, setup),
                                largest_activation_block_bytes(spec, setup)))
    reserved += copy_segment + zero12_copy_block_stranded_bytes(spec, setup, par, copy_segment=copy_segment,
                                                                flat_bytes=fp32_partition, states=m.states)
    nccl = nccl_bytes(world_size=par.world, engine=_nccl_engine(par))
    outside = {**single.outside_allocator, "nccl (communicator, kernels, channel buffers)": nccl}
    total = reserved + sum(outside.values())
    parts = {k: v for k, v in gpu[peak_phase].items() if v}
    return DistributedEstimate(single, par, phases, parts, peak, reserved, total, {k: v for k, v in cpu.items() if v},
                               sum(cpu.values()), outside)
