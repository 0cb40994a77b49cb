"""The analytic memory model: components, phases and the three totals of one training step."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from vramplan.activations import (
    Dtypes,
    LayerActs,
    attention_kernel,
    checkpoint_bytes,
    head_activations,
    offload_kept_bytes,
    stack_activations,
    stream_dtypes,
)
from vramplan.allocator import DEFAULT_CUDA_CONTEXT_BYTES
from vramplan.arch import ArchConfig, ModelSpec
from vramplan.catalog import resolve_model
from vramplan.errors import VramplanError
from vramplan.heads import HeadActs, fused_loss_head
from vramplan.int8_outliers import int8_outlier_notes, int8_subA_bytes
from vramplan.layout import Layout, layout
from vramplan.methods import Trainable, trainable
from vramplan.optimizers import OptimizerBytes, optimizer_bytes
from vramplan.reserved import (
    dynamic_pool_bytes,
    layer_moment_stranded_bytes,
    oversize_step_transient_bytes,
    reserved_bytes,
    step_pools_of,
)
from vramplan.setup import Setup, make_setup
from vramplan.units import MiB
from vramplan.weights import DTYPE_BYTES, WeightBytes, base_weight_bytes

# cuBLAS workspaces come from PyTorch's caching allocator, one per (handle, stream): one for the
# forward thread and one for the autograd engine's thread, 32 MiB each on Hopper
# (aten/src/ATen/cuda/CublasHandlePool.cpp), plus 1 MiB seen beside them; read off traced runs
# (data/measurements: ~65 MiB alive after every step, on top of weights and optimizer states).
CUBLAS_WORKSPACE_BYTES = 65 * MiB
# CUDA context, kernels and library handles outside the allocator (vramplan.allocator; per card
# generation in data/gpu_specs.yaml): override with context_bytes=.
CUDA_CONTEXT_BYTES = DEFAULT_CUDA_CONTEXT_BYTES

# outside_allocator key of memory that lives on the host, not the card (not in the device total)
HOST_ACTIVATIONS = "offloaded activations (pinned host memory)"

PHASES = ("load", "forward", "backward", "optimizer_step")


@dataclass(frozen=True)
class Estimate:
    """One setup's memory. Bytes everywhere; components add up to the totals."""

    model: str
    params_total: int
    params_trainable: int
    setup: Setup
    breakdown: dict[str, int]  # component -> bytes at the peak phase (sums to peak_allocated)
    phases: dict[str, int]  # phase -> peak allocated bytes in that phase
    peak_phase: str
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    device_total_bytes: int
    outside_allocator: dict[str, int] = field(default_factory=dict)  # where -> bytes
    attention: str = ""  # the attention kernel the model runs (vramplan.streams.attention_kernel)
    notes: tuple[str, ...] = ()  # what the user should know about how the setup runs
    # the model's terms, for engines that rearrange model states (vramplan.distributed)
    terms: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    @property
    def outside_allocator_bytes(self) -> int:
        return sum(self.outside_allocator.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": {"name": self.model, "params_total": self.params_total, "params_trainable": self.params_trainable},
            "setup": self.setup.to_dict(),
            "attention_kernel": self.attention,
            "notes": list(self.notes),
            "peak_allocated_bytes": self.peak_allocated_bytes,
            "peak_reserved_bytes": self.peak_reserved_bytes,
            "device_total_bytes": self.device_total_bytes,
            "peak_phase": self.peak_phase,
            "breakdown": dict(self.breakdown),
            "phases": dict(self.phases),
            "outside_allocator_bytes": self.outside_allocator_bytes,
            "outside_allocator": dict(self.outside_allocator),
        }


def estimate_setup(spec: ModelSpec, setup: Setup, *, context_bytes: int = CUDA_CONTEXT_BYTES) -> Estimate:
    """The analytic model proper: pure arithmetic on a resolved model and setup. Model states and
    activations, then what is alive at each moment of the step (Moment), then the phases' peaks."""
    lay = layout(spec)
    dt = stream_dtypes(setup)
    st = model_states(spec, lay, setup)
    acts = activation_terms(spec.arch, lay, setup, dt)
    emb_grad = tied_embedding_grad_bytes(spec.arch, st.trainable, setup)
    fwd, bwd_candidates, step = step_moments(st, acts, emb_grad=emb_grad, top_grads=top_layer_grad_bytes(lay, st.trainable),
                                             first_grads=first_layer_grad_bytes(lay, st.trainable))
    bwd = backward_peak(bwd_candidates)
    steady = st.steady
    phases = {"load": st.weights, "forward": steady + fwd.total, "backward": steady + bwd.total,
              "optimizer_step": steady + step.total}
    peak_phase = max(PHASES, key=lambda p: phases[p])
    peak = phases[peak_phase]
    parts = breakdown(st, {"forward": fwd, "backward": bwd, "optimizer_step": step}.get(peak_phase))
    assert sum(parts.values()) == peak, (parts, peak)
    kernel = attention_kernel(spec.arch, setup, dt)
    oversize = oversize_step_transient_bytes(spec.arch, setup, st)
    pools = step_pools_of(spec.arch, lay, setup, st, acts, emb_grad=emb_grad, oversize=oversize)
    reserved = max(reserved_bytes(peak=peak, pools=pools, oversize=oversize),
                   steady + bwd_candidates[3].total + layer_moment_stranded_bytes(spec.arch, lay, setup, st, acts, dt,
                                                                                  kernel.name))
    outside = outside_allocator(st, acts, context_bytes=context_bytes)
    at_loss = bwd_candidates[0]
    top = bwd_candidates[3] if len(bwd_candidates) > 3 else None
    return Estimate(
        model=spec.name, params_total=spec.params_total, params_trainable=st.trainable.params, setup=setup,
        breakdown=parts, phases=phases, peak_phase=peak_phase, peak_allocated_bytes=peak,
        peak_reserved_bytes=reserved,
        device_total_bytes=reserved + sum(v for k, v in outside.items() if k != HOST_ACTIVATIONS),
        outside_allocator=outside, attention=kernel.name,
        notes=(*weight_notes(st, setup, spec.arch), *int8_outlier_notes(spec.arch, lay, setup, dt.residual)),
        terms={"weights": st.base.total, "adapters": st.adapters, "grads": st.grads, "opt_states": st.opt.in_allocator,
               "opt_transient": st.opt.step_transient, "workspace": CUBLAS_WORKSPACE_BYTES,
               "acts_fwd_peak": fwd.total - fwd.carried, "acts_bwd_loss": at_loss.total - at_loss.carried,
               "layer_live": acts.layer.saved + acts.layer.transient + acts.ckpt_input,
               "acts_bwd_top": top.total - top.gradients - top.carried if top else 0,
               "hold": acts.hold, "retained": acts.retained, "emb_grad": emb_grad, "accum": st.accum,
               "dynamic_pools": dynamic_pool_bytes(pools)},
    )


@dataclass(frozen=True)
class ModelStates:
    """Weights, trainable parameters, their gradients and optimizer states (bytes)."""

    base: WeightBytes  # the base model's weights
    adapters: int  # trainable adapter weights beside a frozen base
    trainable: Trainable
    opt: OptimizerBytes
    dense_bytes: int  # bytes per parameter of the dense (non-quantised) weights
    accum: int  # gradients kept across micro-batches (gradient accumulation)

    @property
    def weights(self) -> int:
        return self.base.total + self.adapters

    @property
    def grads(self) -> int:
        return self.trainable.bytes

    @property
    def steady(self) -> int:
        """Alive through the whole step: weights, optimizer states, cuBLAS workspaces."""
        return self.weights + self.opt.in_allocator + CUBLAS_WORKSPACE_BYTES


def weight_notes(st: ModelStates, setup: Setup, arch: ArchConfig) -> tuple[str, ...]:
    """What the weights' figure assumes where the user might expect otherwise: a config.json that
    ships a pre-quantised checkpoint (gpt-oss's mxfp4, DeepSeek-V3's fp8) is costed as the `dtype`
    asked for, i.e. dequantised on load; a 4/8-bit base that leaves Linear-like weights unquantised
    (fused MoE experts, custom routers, nn.Linear subclasses: transformers' bitsandbytes
    integration converts only `type(m) is nn.Linear`) says how many and what they cost, and what
    kbit preparation does to them."""
    notes = []
    qc = arch.hf_config.get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") not in (None, "bitsandbytes"):
        notes.append(f"the config ships a {qc['quant_method']}-quantised checkpoint; the weights are costed as {setup.dtype} "
                     f"(dequantised on load, e.g. Mxfp4Config(dequantize=True) for gpt-oss)")
    return (*notes, *_unquantised_notes(st, setup))


def _unquantised_notes(st: ModelStates, setup: Setup) -> tuple[str, ...]:
    n = st.base.unquantised_linear_params
    if not (setup.quantised and n):
        return ()
    b = st.dense_bytes
    note = (f"{n / 1e9:.2f}B parameters (fused MoE experts, routers) are not nn.Linear: bitsandbytes leaves them "
            f"unquantised, {n * b / 2**30:.1f} GiB in {'fp32' if b == 4 else '16-bit'}")
    if b == 4 and setup.kbit_prepare:
        note += (f" (prepare_model_for_kbit_training upcasts them); --no-kbit-prepare keeps them 16-bit, "
                 f"{n * 2 / 2**30:.1f} GiB")
    return (note,)


def dense_bytes_per_param(setup: Setup) -> int:
    """Bytes per dense weight: fp32 masters under mixed precision; on a quantised base, the
    non-Linear weights in fp32 when kbit-prepared, else 16-bit."""
    if setup.quantised:
        return 4 if setup.kbit_prepare else 2
    return 4 if setup.precision in ("fp32", "mixed") else DTYPE_BYTES.get(setup.dtype, 2)


def model_states(spec: ModelSpec, lay: Layout, setup: Setup) -> ModelStates:
    dense_b = dense_bytes_per_param(setup)
    w = base_weight_bytes(lay=lay, dtype=setup.dtype, dense_bytes_per_param=dense_b,
                          double_quant=setup.double_quant, quantised=setup.quantised)
    tr = trainable(lay, spec.arch, setup, dense_b)
    return ModelStates(base=w, adapters=0 if tr.base_trainable else tr.bytes, trainable=tr,
                       opt=optimizer_bytes(tr=tr, setup=setup), dense_bytes=dense_b,
                       accum=tr.bytes if setup.grad_accum > 1 else 0)


@dataclass(frozen=True)
class ActivationTerms:
    """The step's activations (bytes, whole micro-batch): layers, LM head, and their companions."""

    layer: LayerActs  # the first decoder layer: the last one backward runs
    last: LayerActs  # the last decoder layer: the first one backward runs (recomputed first under checkpointing)
    head: HeadActs
    hold: int  # the model output (logits) the loop holds through backward and step
    ckpt_input: int  # per layer under checkpointing: its kept input; else 0
    layers_saved: int  # all layers' saved tensors on the card
    host: int  # saved tensors offloaded to host memory
    autocast_cache: int  # autocast's 16-bit weight casts, saved for backward
    retained: int  # graph-held (int8), alive through the step

    @property
    def total(self) -> int:
        """Everything saved at the end of forward."""
        return self.layers_saved + self.head.saved + self.autocast_cache + self.retained


def activation_terms(arch: ArchConfig, lay: Layout, setup: Setup, dt: Dtypes) -> ActivationTerms:
    stack = stack_activations(arch, lay, setup)
    head = head_activations(arch, setup, dt)
    # under checkpointing each layer keeps only its input, and the one being recomputed its own
    ckpt_input = checkpoint_input_bytes(arch, setup, dt)
    layers_saved = ckpt_input * lay.layers if setup.grad_checkpointing else stack.saved
    host = 0
    if setup.activation_offload:
        # TRL activation_offloading (trl/models/activation_offloading.py OffloadActivations): every
        # saved tensor of >= 1 KiB goes to pinned host memory as forward runs and comes back in
        # backward on a side stream. Under checkpointing two layers' kept inputs are on the card at
        # a time; without it, the tensors saved twice in a row stay (offload_kept_bytes).
        host = layers_saved
        if setup.grad_checkpointing:
            layers_saved = 2 * ckpt_input
        else:
            dup, working = offload_kept_bytes(arch, lay, setup)
            layers_saved = dup * lay.layers + working
        host -= min(host, layers_saved)
    return ActivationTerms(layer=stack.first, last=stack.last, head=head, hold=head.logits if setup.hold_outputs else 0,
                           ckpt_input=ckpt_input, layers_saved=layers_saved, host=host,
                           autocast_cache=autocast_weight_cache_bytes(arch, lay, dt),
                           retained=stack.retained + int8_subA_bytes(arch, lay, setup, dt.residual))


def checkpoint_input_bytes(arch: ArchConfig, setup: Setup, dt: Dtypes) -> int:
    """What checkpointing keeps per layer (0 without it)."""
    if not setup.grad_checkpointing:
        return 0
    return checkpoint_bytes(arch, setup, dt)


def autocast_weight_cache_bytes(arch: ArchConfig, lay: Layout, dt: Dtypes) -> int:
    """Mixed precision: autocast casts each weight to 16-bit once per forward and the casts are
    saved for backward (torch autocast weight cache) — 2 bytes per base parameter in Linears."""
    if not dt.autocast:
        return 0
    cache = 2 * lay.layers * sum(lm.numel for lm in lay.linears) + 2 * lay.lm_head_params
    return cache + (2 * lay.embed_params if arch.tied else 0)


def tied_embedding_grad_bytes(arch: ArchConfig, tr: Trainable, setup: Setup) -> int:
    """Tied embeddings: the lm_head's gradient becomes .grad first; the embedding's dense gradient
    then arrives. Behind transformers' head it is accumulated out of place, so two more V x H
    buffers exist at that moment (measured: every tied full fine-tune of the plain loop peaks there
    when the step does not); behind TRL's and Liger's fused heads, whose kernels hand back a
    grad_weight of their own that .grad takes over, only the incoming one does (measured:
    tr-l1b-trl-full-b2s1024, tr-q15-trl-full-b2s1024, tr-l1b-hf-full-liger-b2s1024 end backward
    one V x H above their gradients, +0.5 GiB where the two-buffer rule gave +1.0)."""
    if not (tr.base_trainable and arch.tied):
        return 0
    buffers = 1 if fused_loss_head(setup) else 2
    return buffers * arch.vocab * arch.hidden * tr.bytes_per_param


class Moment(NamedTuple):
    """What is alive at one moment of the step beyond the steady model states, by component
    (immutable; a NamedTuple: five are built per estimate, benchmarks/speed.py)."""

    gradients: int
    activations: int
    logits_and_loss: int
    transients: int
    carried: int = 0  # gradients carried over from earlier micro-batches (before this step's own exist)

    @property
    def total(self) -> int:
        return self.gradients + self.activations + self.logits_and_loss + self.transients + self.carried


def first_layer_grad_bytes(lay: Layout, tr: Trainable) -> int:
    """Gradients that exist when the first decoder layer's backward begins: everything but that
    layer's own (produced during it) and, when the base trains, an untied embedding's (produced
    after it; a tied one's lm_head share exists from the loss on). Measured: h3-olmo2-1b-trl-full
    peaks there 520 MiB below all gradients = its 392 MiB embedding and one 128 MiB layer."""
    if not tr.base_trainable:
        return tr.bytes - tr.bytes // max(1, lay.layers)
    later = lay.params_per_layer + (lay.embed_params if lay.lm_head_params else 0)
    return tr.bytes - tr.bytes_per_param * later


def top_layer_grad_bytes(lay: Layout, tr: Trainable) -> int:
    """Gradients that exist while the last decoder layer runs its backward: that layer's and the
    head's (lm_head, final norm; a tied embedding's lm_head share) when the base trains, else one
    layer's share of the adapters'."""
    if not tr.base_trainable:
        return tr.bytes // max(1, lay.layers)
    head = lay.lm_head_params or lay.embed_params
    return tr.bytes_per_param * (lay.params_per_layer + head + lay.final_norm_params)


def step_moments(st: ModelStates, a: ActivationTerms, *, emb_grad: int, top_grads: int,
                 first_grads: int) -> tuple[Moment, tuple[Moment, ...], Moment]:
    """(forward at the loss, backward candidates, optimizer step). Backward peaks at the loss (all
    activations + log-softmax buffers), or later while one layer's activations (recomputed under
    checkpointing) are alive, or at its end (tied embeddings). Under checkpointing the layer moment
    is taken at both ends of backward, since what is alive there is linear in the layer index: at
    the last layer every layer's kept input is still on the card beside the recomputed layer
    (traced: t3-q3-17b-trl-lora, t4-q15-trl-qlora, t4-mis7b-hf-qlora: N - 1 kept inputs plus the
    embedding output at the peak), at the first all gradients exist but one kept input."""
    head, layer, grads = a.head, a.layer, st.grads
    layers = a.total - head.saved
    forward = Moment(0, layers, head.saved + head.logits, head.fwd_transient, carried=st.accum)
    at_loss = Moment(0, layers, head.saved + a.hold, head.bwd_transient, carried=st.accum)
    late = Moment(first_grads, a.retained + a.ckpt_input + layer.saved, a.hold, layer.transient)
    end = Moment(grads, a.retained, a.hold, emb_grad)
    step = Moment(grads, a.retained, a.hold, st.opt.step_transient)
    if not a.ckpt_input:
        # the last layer's backward, every layer's tensors still saved: above the loss moment where
        # a layer's backward outgrows the logits' (Llama 4's every-expert gradients, traced:
        # m2-l4mav-hf-lora-b1s1024, three E x tokens x I gradients beside the saved experts)
        top = Moment(top_grads, a.retained + a.layers_saved, a.hold, a.last.transient, carried=st.accum)
        return forward, (at_loss, late, end, top), step
    top = Moment(top_grads, a.retained + a.layers_saved + a.last.saved, a.hold, a.last.transient, carried=st.accum)
    return forward, (at_loss, late, end, top), step


def backward_peak(candidates: tuple[Moment, ...]) -> Moment:
    """The backward moment with the most bytes alive (gradients carried over from earlier
    micro-batches included: they are on the card at every moment); the first of equals."""
    return max(candidates, key=lambda m: m.total)


def breakdown(st: ModelStates, at: Moment | None) -> dict[str, int]:
    """Components at the peak moment (None: the load phase); they sum to the peak."""
    if at is None:
        return {"weights": st.base.total, "adapters": st.adapters}
    return {"weights": st.base.total, "adapters": st.adapters, "optimizer_states": st.opt.in_allocator,
            "cublas_workspace": CUBLAS_WORKSPACE_BYTES, "gradients": at.gradients + at.carried,
            "activations": at.activations, "logits_and_loss": at.logits_and_loss, "transients": at.transients}


def outside_allocator(st: ModelStates, a: ActivationTerms, *, context_bytes: int) -> dict[str, int]:
    """Memory the PyTorch allocator does not count, by where it lives."""
    outside = {"cuda_context": context_bytes}
    if a.host:
        outside[HOST_ACTIVATIONS] = a.host
    if st.opt.managed:
        outside["paged_optimizer_states (CUDA managed memory)"] = st.opt.managed
    return outside


def estimate(model: str | Path | ModelSpec, method: str | None = None, *, trust_remote_code: bool = False,
             **options: Any) -> Estimate:
    """Estimate the GPU memory of one fine-tuning step.

    `model` is a catalogue name or alias (`vramplan models`), a path to a config.json (file or
    directory), a hub id (needs transformers and a reachable hub or cache), or a ModelSpec.
    `options` are the rows of vramplan.options.OPTIONS (trainer, batch_size, seq_len, ...); an
    option left out takes the trainer preset (default trainer: hf), else its default.
    """
    spec = resolve_model(model, trust_remote_code=trust_remote_code)
    return estimate_setup(spec, make_setup(spec, **with_method(method, options)))


def with_method(method: str | None, options: dict[str, Any]) -> dict[str, Any]:
    """The options with the positional `method` folded in (refusing it twice)."""
    if method is None:
        return options
    if "method" in options:
        raise VramplanError(f"method given twice ({method!r} and {options['method']!r})")
    return {**options, "method": method}
