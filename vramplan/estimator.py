"""The analytic memory model: components, phases and the three totals of one training step."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vramplan.activations import attention_kernel, checkpoint_bytes, head_activations, layer_activations, micro_batch_tokens, stream_dtypes
from vramplan.allocator import DEFAULT_CUDA_CONTEXT_BYTES, peak_reserved_bytes, same_shape_state_copies, step_pools
from vramplan.arch import ModelSpec
from vramplan.catalog import resolve_model
from vramplan.errors import VramplanError
from vramplan.layout import layout
from vramplan.methods import trainable
from vramplan.optimizers import optimizer_bytes
from vramplan.setup import Setup, make_setup
from vramplan.units import MiB
from vramplan.weights import DTYPE_BYTES, base_weight_bytes

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
    # the model's terms, for engines that rearrange model states (vramplan.distributed)
    terms: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    @property
    def outside_allocator_bytes(self) -> int:
        return sum(self.outside_allocator.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": {"name": self.model, "params_total": self.params_total, "params_trainable": self.params_trainable},
            "setup": self.setup.to_dict(),
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
    """The analytic model proper: pure arithmetic on a resolved model and setup."""
    arch = spec.arch
    lay = layout(spec)
    dt = stream_dtypes(setup)
    dense_b = 4 if setup.precision in ("fp32", "mixed") else DTYPE_BYTES.get(setup.dtype, 2)
    if setup.quantised:
        dense_b = 4 if setup.kbit_prepare else 2
    w = base_weight_bytes(lay=lay, dtype=setup.dtype, dense_bytes_per_param=dense_b,
                          double_quant=setup.double_quant, quantised=setup.quantised)
    tr = trainable(lay, arch, setup, dense_b)
    adapters = 0 if tr.base_trainable else tr.bytes
    weights = w.total + adapters
    grads = tr.bytes
    opt = optimizer_bytes(tr=tr, setup=setup)
    kernel = attention_kernel(arch, setup, dt)
    layer = layer_activations(arch, lay, setup, dt=dt, kernel=kernel)
    head = head_activations(arch, setup, dt)
    hold = head.logits if setup.hold_outputs else 0
    ws = CUBLAS_WORKSPACE_BYTES
    # under checkpointing each layer keeps only its input, and the one being recomputed its own
    ckpt_input = checkpoint_bytes(arch, setup, dt) if setup.grad_checkpointing else 0
    if setup.trainer == "trl" and setup.grad_checkpointing and setup.method not in ("full", "galore"):
        # SFTTrainer with a peft adapter and checkpointing holds a second 16-bit copy of every
        # layer's input (it calls model.enable_input_require_grads() on top of Trainer's own
        # checkpointing, trl/trainer/sft_trainer.py). Measured, not yet traced to its allocation
        # site: one extra batch x seq x hidden per layer on all 13 TRL adapter + checkpointing
        # records (tr-*-trl-lora/qlora/dora, h2-*-trl-*; 0.82-1.0 copies), none on full
        # fine-tunes or on Trainer runs.
        ckpt_input *= 2
    host_acts = 0
    if setup.grad_checkpointing:
        layers_saved = ckpt_input * lay.layers
    else:
        layer0 = layer_activations(arch, lay, setup, dt=dt, kernel=kernel, first_layer=True)
        layers_saved = layer.saved * (lay.layers - 1) + layer0.saved
    if setup.activation_offload:
        # TRL activation_offloading (trl/models/activation_offloading.py OffloadActivations): every
        # saved tensor of >= 1 KiB goes to pinned host memory as forward runs and comes back layer
        # by layer in backward on a side stream that prefetches the next layer's tensors while the
        # current layer's backward runs: two layers' tensors are on the card at a time.
        host_acts = layers_saved
        layers_saved = 2 * (ckpt_input if setup.grad_checkpointing else layer.saved)
    # Mixed precision: autocast casts each weight to 16-bit once per forward and the casts are
    # saved for backward (torch autocast weight cache) — 2 bytes per base parameter in Linears.
    autocast_cache = 2 * lay.layers * sum(lm.numel for lm in lay.linears) + 2 * lay.lm_head_params if dt.autocast else 0
    if dt.autocast and arch.tied:
        autocast_cache += 2 * lay.embed_params
    retained = layer.retained * lay.layers  # graph-held (int8), alive through the step
    acts = layers_saved + head.saved + autocast_cache + retained
    accum = grads if setup.grad_accum > 1 else 0  # grads persist across micro-batches
    steady = weights + opt.in_allocator + ws
    fwd_peak = acts + head.logits + head.fwd_transient
    # backward: at the loss (all activations + log-softmax buffers), or later, once gradients
    # have accumulated while one layer's activations (recomputed under checkpointing) are alive
    bwd_loss = acts + hold + head.bwd_transient
    layer_live = layer.saved + layer.transient
    # Tied embeddings: the lm_head's gradient becomes .grad first; the embedding's dense gradient
    # then arrives and is accumulated out of place, so two more V x H buffers exist at that moment
    # (measured: every tied full fine-tune peaks there when the step does not).
    emb_grad = 2 * arch.vocab * arch.hidden * tr.bytes_per_param if (tr.base_trainable and arch.tied) else 0
    bwd_late = grads + hold + retained + ckpt_input + layer_live
    bwd_end = grads + hold + retained + emb_grad
    bwd_peak = max(bwd_loss, bwd_late, bwd_end)
    step_peak = grads + hold + retained + opt.step_transient
    phases = {
        "load": weights,
        "forward": steady + accum + fwd_peak,
        "backward": steady + (accum if bwd_peak == bwd_loss else 0) + bwd_peak,
        "optimizer_step": steady + step_peak,
    }
    peak_phase = max(PHASES, key=lambda p: phases[p])
    peak = phases[peak_phase]
    parts: dict[str, int] = {
        "weights": w.total, "adapters": adapters, "optimizer_states": opt.in_allocator, "cublas_workspace": ws,
        "gradients": 0, "activations": 0, "logits_and_loss": 0, "transients": 0,
    }
    if peak_phase == "forward":
        parts.update(gradients=accum, activations=acts - head.saved,
                     logits_and_loss=head.saved + head.logits, transients=head.fwd_transient)
    elif peak_phase == "backward":
        if bwd_peak == bwd_loss:
            parts.update(gradients=accum, activations=acts - head.saved,
                         logits_and_loss=head.saved + hold, transients=head.bwd_transient)
        elif bwd_peak == bwd_late:
            parts.update(gradients=grads, activations=bwd_late - grads - hold - layer.transient,
                         logits_and_loss=hold, transients=layer.transient)
        else:
            parts.update(gradients=grads, activations=retained, logits_and_loss=hold, transients=emb_grad)
    elif peak_phase == "optimizer_step":
        parts.update(gradients=grads, activations=retained, logits_and_loss=hold, transients=opt.step_transient)
    else:
        parts = {"weights": w.total, "adapters": adapters}
    assert sum(parts.values()) == peak, (parts, peak)
    reserved = peak_reserved_bytes(peak_allocated_bytes=peak, pools=step_pools(
        lay=lay, weight_bytes_per_param=dense_b, linear_bytes_per_param=0.5 if setup.quantised else None,
        trainable_copies=(1 + same_shape_state_copies(optimizer=setup.optimizer)) if tr.base_trainable else 0,
        trainable_bytes_per_param=tr.bytes_per_param, persistent_bytes=steady + accum + retained,
        vocab_peak_bytes=head.saved + max(head.logits + head.fwd_transient, hold + head.bwd_transient),
        activation_peak_bytes=acts - head.saved - retained + (layer.saved if setup.grad_checkpointing else 0),
        param_shaped_peak_bytes=grads + max(opt.step_transient, emb_grad),
        split_vocab_bytes=0 if setup.grad_checkpointing else 4 * arch.vocab * micro_batch_tokens(setup)))
    outside = {"cuda_context": context_bytes}
    if host_acts:
        outside[HOST_ACTIVATIONS] = host_acts
    if opt.managed:
        outside["paged_optimizer_states (CUDA managed memory)"] = opt.managed
    return Estimate(
        model=spec.name, params_total=spec.params_total, params_trainable=tr.params, setup=setup,
        breakdown=parts, phases=phases, peak_phase=peak_phase, peak_allocated_bytes=peak,
        peak_reserved_bytes=reserved,
        device_total_bytes=reserved + sum(v for k, v in outside.items() if k != HOST_ACTIVATIONS),
        outside_allocator=outside,
        terms={"weights": w.total, "adapters": adapters, "grads": grads, "opt_states": opt.in_allocator,
               "opt_transient": opt.step_transient, "workspace": ws, "acts_fwd_peak": fwd_peak, "acts_bwd_loss": bwd_loss,
               "layer_live": layer_live + ckpt_input,
               "hold": hold, "retained": retained, "emb_grad": emb_grad, "accum": accum},
    )


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
