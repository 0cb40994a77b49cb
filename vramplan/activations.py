"""Activations: the tensors autograd saves during forward, per decoder layer and for the
LM head / loss, and the transients of backward.

A layer's figures are the sums of its operations' tensors (vramplan.ops.LAYER_OPS): bytes saved
for backward, bytes held by the graph past backward, and the largest one operation's transients.
The LM head and loss are vramplan.heads; the streams' dtypes and the attention kernel are
vramplan.streams.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from operator import attrgetter
from typing import Any, NamedTuple

from vramplan.arch import ArchConfig
from vramplan.heads import HeadActs, hf_loss_head, liger_flce_head, trl_fused_head
from vramplan.layout import LayerGroup, Layout
from vramplan.ops import (
    FIXED,
    LAYER_OPS,
    RETAINED,
    ROWS,
    SAVED,
    SAVED_FOR_INPUT_GRAD,
    SCORES,
    SPAN,
    TOKENS,
    TRANSIENT,
    Dims,
    Saved,
    dims_of,
    op_context,
    size_bytes,
)
from vramplan.setup import Setup
from vramplan.streams import AttnKernel, Dtypes, attention_kernel, micro_batch_tokens, stream_dtypes, trainer_autocast

__all__ = [
    "AttnKernel",
    "Coefs",
    "Dtypes",
    "LayerActs",
    "LayerSizes",
    "attention_kernel",
    "checkpoint_bytes",
    "first_layer_needs_input_grad",
    "head_activations",
    "layer_activations",
    "layer_figures",
    "layer_saved_by_group",
    "layer_sizes",
    "layer_tensors",
    "micro_batch_tokens",
    "stack_activations",
    "stream_dtypes",
    "trainer_autocast",
]

OpTensors = tuple[tuple[str, tuple[Saved, ...]], ...]  # (operation, its tensors), in forward order


@dataclass(frozen=True)
class LayerActs:
    saved: int  # bytes one layer saves for backward
    transient: int  # extra bytes alive at the worst moment of one layer's backward
    retained: int = 0  # bytes held by the graph itself until it is freed (not by backward)
    input_grad_only: int = 0  # part of `saved` kept only for the gradient of the layer's input


def layer_tensors(arch: ArchConfig, lay: Layout, setup: Setup, group: LayerGroup | None = None, *,
                  zero3_linear: bool = False, engine_autocast: bool = True) -> OpTensors:
    """Every operation of one decoder layer (of `group`; default the most numerous layer type)
    with the tensors it keeps; their bytes at the setup's micro-batch are `t.nbytes(dims_of(setup))`.
    `zero3_linear`: under DeepSpeed ZeRO-3's Linear (vramplan.ops.op_context); `engine_autocast`
    False: an engine that runs forward without torch.autocast (DeepSpeed's bf16 mode), so fp32
    adapters are not autocast (vramplan.ops.lora.adapter_input)."""
    dt = stream_dtypes(setup)
    if not engine_autocast:
        dt = replace(dt, lora_autocast=False)
    c = op_context(arch, lay, setup, dt=dt, kernel=attention_kernel(arch, setup, dt), group=group, zero3_linear=zero3_linear)
    return tuple([(name, op(c)) for name, op in LAYER_OPS])


class Coefs(NamedTuple):
    """A sum of tensor sizes: bytes per unit of each dimension (ops.PER); the SPAN terms stay
    apart because each rounds on its own."""

    tokens: int = 0
    rows: int = 0
    scores: int = 0
    fixed: int = 0
    span: tuple[int, ...] = ()

    def at(self, d: Dims) -> int:
        total = self.tokens * d.tokens + self.rows * d.batch * d.seq + self.scores * d.batch * d.seq * d.span + self.fixed
        for k in self.span:
            total += size_bytes(SPAN, k, d)
        return total


def coefs(tensors: Iterable[Saved]) -> Coefs:
    by = dict.fromkeys((TOKENS, ROWS, SCORES, FIXED), 0)
    span = []
    for t in tensors:
        if t.per == SPAN:
            span.append(t.coef)
        else:
            by[t.per] += t.coef
    return Coefs(by[TOKENS], by[ROWS], by[SCORES], by[FIXED], tuple(span))


@dataclass(frozen=True)
class LayerSizes:
    """One layer's figures per unit of each dimension: its tensors summed by lifetime."""

    saved: Coefs  # saved for backward (without the input-gradient-only part)
    input_grad: Coefs  # saved only for the gradient of the layer's input
    retained: Coefs  # held by the graph past backward
    # each operation's transients (never alive together), with what the operations after it in the
    # layer save: freed by the time its backward runs
    transients: tuple[tuple[Coefs, Coefs], ...]


# The operations of LAYER_OPS that run one after another through the layer; the rest (DoRA, the
# LoRA input cast, int8 inputs) are spread over every targeted module and never count as freed.
SEQUENTIAL_OPS = ("input_norm", "qkv_proj", "qk_norm", "attention", "o_proj", "sandwich_norms", "residual_dropout",
                  "mlp_norm", "mlp", "down_proj_backward", "experts_up", "experts_gate", "experts_down", "routing_weights", "shared_experts")


# The operations of LAYER_OPS that are RMSNorms (their fp32 input copy is saved by pow and by mul).
NORM_OPS = ("input_norm", "qk_norm", "sandwich_norms", "mlp_norm")


def layer_sizes(ops: OpTensors) -> LayerSizes:
    every = [t for _, tensors in ops for t in tensors]
    transients = []
    for i, (name, tensors) in enumerate(ops):
        if not any(t.lifetime in TRANSIENT for t in tensors):
            continue
        after = () if name not in SEQUENTIAL_OPS else \
            [t for later, ts in ops[i + 1:] if later in SEQUENTIAL_OPS for t in ts if t.lifetime == SAVED]
        transients.append((coefs(t for t in tensors if t.lifetime in TRANSIENT), coefs(after)))
    return LayerSizes(
        saved=coefs(t for t in every if t.lifetime == SAVED),
        input_grad=coefs(t for t in every if t.lifetime == SAVED_FOR_INPUT_GRAD),
        retained=coefs(t for t in every if t.lifetime == RETAINED),
        transients=tuple(transients))


def layer_figures(sizes: LayerSizes, d: Dims) -> LayerActs:
    """Saved and retained bytes are sums over the layer. Its transient is the most one operation's
    backward adds over what is still saved then: backward runs the layer in reverse, so the
    tensors saved by the operations after it are already freed (the attention kernel's s x s
    gradients never meet the MLP's saved intermediates); forward transients recur in backward
    when checkpointing recomputes the layer."""
    input_grad = sizes.input_grad.at(d)
    transient = 0
    for t, freed in sizes.transients:
        transient = max(transient, t.at(d) - freed.at(d))
    return LayerActs(saved=sizes.saved.at(d) + input_grad, transient=transient, retained=sizes.retained.at(d),
                     input_grad_only=input_grad)


def first_layer_needs_input_grad(setup: Setup) -> bool:
    """Something before the first layer trains: the embeddings (full, galore) or prompt tuning's
    virtual tokens. Otherwise the first layer keeps nothing for its input's gradient."""
    return setup.method in ("full", "galore", "prompt")


# Operations never see the batch size or the sequence length (ops.Dims), so a layer's sizes are
# computed once per arch, layout (identities, kept in the value as vramplan.layout caches layouts)
# and setup without those two; a planner's bisection over them reuses one. Cleared at _CACHE_MAX.
_SHAPELESS = attrgetter(*(f for f in Setup.__dataclass_fields__ if f not in ("batch_size", "seq_len")))
_CACHE_MAX = 4096
_CACHE: dict[tuple[int, int, tuple[Any, ...], bool, bool], tuple[ArchConfig, Layout, tuple[tuple[LayerGroup, LayerSizes], ...]]] = {}


def _stack_sizes(arch: ArchConfig, lay: Layout, setup: Setup, *, zero3_linear: bool = False,
                 engine_autocast: bool = True) -> tuple[tuple[LayerGroup, LayerSizes], ...]:
    """Each layer type's sizes, once per arch, layout and shape-free setup."""
    key = (id(arch), id(lay), _SHAPELESS(setup), zero3_linear, engine_autocast)
    hit = _CACHE.get(key)
    if hit is not None and hit[0] is arch and hit[1] is lay:
        return hit[2]
    sizes = tuple((g, layer_sizes(layer_tensors(arch, lay, setup, g, zero3_linear=zero3_linear,
                                                 engine_autocast=engine_autocast))) for g in lay.groups)
    if len(_CACHE) >= _CACHE_MAX:
        _CACHE.clear()
    _CACHE[key] = (arch, lay, sizes)
    return sizes


def layer_saved_by_group(arch: ArchConfig, lay: Layout, setup: Setup, *, zero3_linear: bool = False,
                         engine_autocast: bool = True) -> list[tuple[int, int]]:
    """(layers of the type, bytes one such layer saves for backward) for each layer type;
    `zero3_linear` and `engine_autocast` as layer_tensors."""
    d = dims_of(setup)
    return [(g.count, layer_figures(sz, d).saved)
            for g, sz in _stack_sizes(arch, lay, setup, zero3_linear=zero3_linear, engine_autocast=engine_autocast)]


def _as_first_layer(layer: LayerActs, setup: Setup) -> LayerActs:
    """The first layer keeps nothing for its input's gradient unless something before it trains."""
    if not layer.input_grad_only or first_layer_needs_input_grad(setup):
        return layer
    return LayerActs(saved=layer.saved - layer.input_grad_only, transient=layer.transient, retained=layer.retained)


def layer_activations(arch: ArchConfig, lay: Layout, setup: Setup, *, first_layer: bool = False,
                      group: LayerGroup | None = None) -> LayerActs:
    """Bytes one decoder layer (of `group`; default the most numerous layer type) saves for
    backward (whole micro-batch), and its backward transient."""
    group = lay.representative if group is None else group
    sizes = next(sz for g, sz in _stack_sizes(arch, lay, setup) if g is group)
    layer = layer_figures(sizes, dims_of(setup))
    return _as_first_layer(layer, setup) if first_layer else layer


class StackActs(NamedTuple):
    """The decoder stack's layers by type (vramplan.layout.LayerGroup): dense and MoE layers,
    sliding and full attention each save their own (immutable; a NamedTuple: one per estimate,
    benchmarks/speed.py)."""

    first: LayerActs  # the first layer (without what only its input's gradient needs, when nothing before it trains)
    last: LayerActs  # the last layer: the first one backward reaches
    saved: int  # every layer's saved tensors, the first as `first`
    retained: int  # every layer's graph-held tensors


def stack_activations(arch: ArchConfig, lay: Layout, setup: Setup) -> StackActs:
    d = dims_of(setup)
    acts = [(g, layer_figures(sz, d)) for g, sz in _stack_sizes(arch, lay, setup)]
    if len(acts) == 1:  # one layer type (most models): first and last are the same layer
        first_full = last = acts[0][1]
    else:
        first_full = min(acts, key=lambda ga: ga[0].first)[1]
        last = max(acts, key=lambda ga: ga[0].last)[1]
    first = _as_first_layer(first_full, setup)
    return StackActs(first=first, last=last, saved=sum(g.count * a.saved for g, a in acts) - first_full.saved + first.saved,
                     retained=sum(g.count * a.retained for g, a in acts))


def head_activations(arch: ArchConfig, setup: Setup, dt: Dtypes) -> HeadActs:
    """The loss path each trainer runs: TRL's fused chunked LM head, Liger's fused linear
    cross-entropy (Trainer with use_liger_kernel), else transformers' logits + cross-entropy."""
    T = micro_batch_tokens(setup)
    base = setup.method in ("full", "galore")
    compute = 2 if (dt.linear_out == 2 or dt.lora_autocast) else 4
    if setup.trainer == "trl":
        return trl_fused_head(arch, setup, tokens=T, residual_bytes=dt.residual, compute_bytes=compute, base=base,
                              liger_norm=setup.liger)
    if setup.liger:
        return liger_flce_head(arch, setup, tokens=T, residual_bytes=dt.residual, compute_bytes=compute, base=base)
    return hf_loss_head(arch, setup, tokens=T, residual_bytes=dt.residual, norm_out_bytes=dt.norm_out,
                        logits_bytes=dt.logits, autocast=dt.autocast, base=base)


def checkpoint_bytes(arch: ArchConfig, setup: Setup, dt: Dtypes) -> int:
    """Non-reentrant gradient checkpointing keeps each layer's input hidden states."""
    return dt.residual * arch.hidden * micro_batch_tokens(setup)


def offload_kept_bytes(arch: ArchConfig, lay: Layout, setup: Setup) -> tuple[int, int]:
    """TRL activation offloading without checkpointing (trl/models/activation_offloading.py
    OffloadActivations, 1.16): (bytes that stay on the card for every layer, the working set).

    pack_tensor copies each saved tensor of >= 1 KiB to pinned host memory, but a storage saved
    again while its first copy is still in flight (the last 5 saved tensors) is kept on the GPU
    as it is, until backward unpacks it. RMSNorm saves its fp32 input twice in a row (pow, then
    the mul by rsqrt), so every norm's fp32 copy of every layer stays. In backward, tensors come
    back per autograd node and the previous node's are freed once the current one has run: the
    largest such pair in a gated MLP is the product's inputs (act and up) and the activation's
    (gate)."""
    d = dims_of(setup)
    dup = sum(t.nbytes(d) for op, ts in layer_tensors(arch, lay, setup) if op in NORM_OPS
              for t in ts if t.name.endswith(".input_fp32"))
    working = 3 * stream_dtypes(setup).linear_out * arch.expert_intermediate * micro_batch_tokens(setup)
    return dup, working
