"""What every operation returns: named tensors with their dtype, lifetime and size, and the one
context (shapes, dtypes, method) the operations of a decoder layer read.

A tensor's size is bytes per unit of the dimension it scales with (`per`): tokens, query rows
(batch x seq), score elements (batch x seq x span), or nothing (weight-shaped). Operations never
see the batch size or the sequence length; `Dims` supplies them, so one layer's tensors serve
every micro-batch shape of a setup."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from vramplan.arch import ArchConfig
from vramplan.layout import LayerGroup, Layout, LinearModule
from vramplan.setup import Setup
from vramplan.streams import AttnKernel, Dtypes, micro_batch_tokens

# Lifetimes of a tensor within one layer's training step.
SAVED = "saved"  # saved for backward: from its op's forward to its op's backward
# saved as SAVED, but only to compute the gradient of the layer's input: a frozen first layer
# under an adapter method (nothing before it trains) does not keep it
SAVED_FOR_INPUT_GRAD = "saved_for_input_grad"
RETAINED = "retained"  # held by the graph itself until the graph is freed, past backward
FORWARD = "forward"  # transient in forward (again in backward when checkpointing recomputes)
BACKWARD = "backward"  # transient in backward
TRANSIENT = (FORWARD, BACKWARD)

# What a tensor's size scales with (Saved.per).
TOKENS = "tokens"  # [tokens, width]
ROWS = "rows"  # [batch, heads, seq]: one value per query row and head
SCORES = "scores"  # [batch, heads, seq, span]: the attention matrix
SPAN = "span"  # keys/values over the attention span, per query token: tokens x (coef * span // seq)
FIXED = "fixed"  # weight-shaped: no batch or sequence dimension
PER = (TOKENS, ROWS, SCORES, SPAN, FIXED)


class Dims(NamedTuple):
    """The micro-batch dimensions a layer's tensors span (immutable)."""

    tokens: int  # tokens the layer sees (prompt tuning: with its virtual tokens)
    batch: int
    seq: int  # query length
    span: int  # key/value length (prefix tuning adds its virtual keys/values)


def dims_of(setup: Setup) -> Dims:
    virt = setup.prefix_tokens if setup.method in ("prefix", "prompt") else 0
    span = setup.seq_len + virt  # prefix adds keys/values; prompt tuning lengthens the sequence
    if setup.method == "prompt":
        return Dims(tokens=micro_batch_tokens(setup), batch=setup.batch_size, seq=span, span=span)
    return Dims(tokens=setup.batch_size * setup.seq_len, batch=setup.batch_size, seq=setup.seq_len, span=span)


def size_bytes(per: str, coef: int, d: Dims) -> int:
    """Bytes of `coef` bytes per unit of `per` at dimensions `d`."""
    if per == TOKENS:
        return coef * d.tokens
    if per == ROWS:
        return coef * d.batch * d.seq
    if per == SCORES:
        return coef * d.batch * d.seq * d.span
    if per == SPAN:
        return d.tokens * (coef * d.span // d.seq)
    return coef


class Saved(NamedTuple):
    """One tensor an operation keeps: `coef` bytes per unit of `per` (immutable; a NamedTuple
    because a layer builds dozens of them, benchmarks/speed.py)."""

    name: str  # module.tensor, as in the HF modeling code where it has a name
    per: str  # what its size scales with (PER)
    coef: int  # bytes per unit of `per`
    dtype: str  # "fp32" | "bf16" | "fp16" | "bool"
    lifetime: str = SAVED

    def nbytes(self, d: Dims) -> int:
        return size_bytes(self.per, self.coef, d)


@dataclass(frozen=True)
class OpContext:
    """One decoder layer as its operations see it: no batch size or sequence length (Dims)."""

    arch: ArchConfig
    setup: Setup
    dt: Dtypes
    kernel: AttnKernel
    linears: tuple[LinearModule, ...]  # the layer's Linear modules (GPT-2 has two c_proj)
    mods: dict[str, LinearModule]  # the same by name
    base: bool  # the base weights train (full, galore)
    base_saves_input: bool  # the base nn.Linear matmuls save their input (base trains, or ZeRO-3's Linear)
    lora: tuple[str, ...]  # LoRA-targeted modules
    normalised: int  # bytes per element of an RMSNorm's normalised output
    dtypes: dict[int, str]  # dtype name by bytes per element
    gpt2: bool  # GPT-2 family (LayerNorm, Conv1D c_attn/c_proj, GELU MLP, dropout)
    moe: bool  # this layer routes to experts
    group: LayerGroup  # the layer type (vramplan.layout)


def op_context(arch: ArchConfig, lay: Layout, setup: Setup, *, dt: Dtypes, kernel: AttnKernel,
               group: LayerGroup | None = None, zero3_linear: bool = False) -> OpContext:
    """One layer of `group` (default: the most numerous layer type, whose Linears lay.linears are).
    `zero3_linear`: DeepSpeed ZeRO-3 built the model under zero.Init, which replaces
    torch.nn.functional.linear with LinearFunctionForZeroStage3 (partition_parameters.py
    _enable_mem_efficient_linear; zero/linear.py setup_context saves input, weight and bias
    whatever needs a gradient), so a frozen nn.Linear keeps its input too; bitsandbytes' k-bit
    layers and GPT-2's Conv1D do not call F.linear."""
    gemma = arch.model_type.startswith("gemma")
    group = lay.representative if group is None else group
    base = setup.method in ("full", "galore")
    return OpContext(
        arch=arch, setup=setup, dt=dt, kernel=kernel, linears=group.linears, mods={lm.module: lm for lm in group.linears},
        base=base, base_saves_input=base or (zero3_linear and not setup.quantised and arch.family != "gpt2"),
        lora=setup.lora_targets if setup.method in ("lora", "qlora") else (),
        normalised=4 if (gemma or dt.norm_out == 4) else 2,  # GemmaRMSNorm multiplies in fp32
        dtypes={1: "bool", 2: "fp16" if setup.dtype == "fp16" else "bf16", 4: "fp32", 8: "int64"},
        gpt2=arch.family == "gpt2", moe=group.moe, group=group,
    )


def tok(c: OpContext, name: str, elem_bytes: int, width: int, lifetime: str = SAVED) -> Saved:
    """A [tokens, width] tensor of `elem_bytes` per element."""
    return _new(Saved, (name, TOKENS, elem_bytes * width, c.dtypes[elem_bytes], lifetime))


def sized(c: OpContext, name: str, per: str, elem_bytes: int, units: int, lifetime: str = SAVED) -> Saved:
    """A tensor of `units` elements of `elem_bytes` per unit of `per`."""
    return _new(Saved, (name, per, elem_bytes * units, c.dtypes[elem_bytes], lifetime))


# tuple.__new__ builds a Saved without NamedTuple's Python-level __new__ (half the cost)
_new = tuple.__new__
