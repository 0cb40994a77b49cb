"""bitsandbytes LLM.int8's outlier columns: what MatMul8bitLt keeps of its input beyond the input.

MatMul8bitLt.forward (bitsandbytes/autograd/_functions.py, 0.50) quantises its input A row-wise
and takes every column holding an element of magnitude >= `llm_int8_threshold` (6.0) out of the
int8 product: the `int8_mixed_scaled_mm` kernel (backends/default/ops.py) returns
`subA = A[:, outlier_cols].contiguous()`, in A's dtype, and forward stores it in `ctx.tensors`
with A itself. Like A (vramplan.ops.linear.int8_inputs), it is held by the graph, not saved for
backward, so gradient checkpointing does not remove it: every layer's subA stays until the graph
is freed.

How many columns are outliers depends on the weights. With the weights transformers initialises
(every Linear ~ N(0, initializer_range^2), RMSNorm weights at 1: how the profiler and the
reference runs build models) it follows from the init alone:
- the inputs of q/k/v, o, gate and up are normalised hidden states or averages of values, of unit
  scale: an element >= 6 is a 2e-9 event and those columns are negligible;
- down_proj's input act(gate) x up multiplies two projections of a unit-RMS vector, each
  ~ N(0, s^2) with s = initializer_range x sqrt(hidden): at hidden 4096, s = 1.28 and one element
  in 300 reaches 6, so with 2048 rows nearly every column holds one (measured: the 32 down_proj
  subA blocks of t5-l8b-lora-int8-ckpt-b2s1024 are 98.7-99.8% of the input; predicted 99.9%);
  at hidden 2048, s = 0.905 and about 10% of the columns do (probe-l1b-lora-int8-ckpt-b2s1024).
Pretrained weights concentrate outliers in a handful of feature dimensions (Dettmers et al. 2022,
LLM.int8(), section 4), so for them this is an upper bound; the estimate says so in its notes.
"""

from __future__ import annotations

import math
from functools import lru_cache

from vramplan.arch import ArchConfig
from vramplan.layout import Layout
from vramplan.setup import Setup
from vramplan.streams import micro_batch_tokens

# transformers BitsAndBytesConfig.llm_int8_threshold default
INT8_THRESHOLD = 6.0
# transformers PretrainedConfig.initializer_range default (every catalogue model uses it)
DEFAULT_INITIALIZER_RANGE = 0.02
_GRID = 2001  # quadrature points over +-10 standard deviations (the result is stable to 1e-6 here)


def _activation(name: str):  # noqa: ANN202 - a scalar function
    """The MLP activation as transformers' ACT2FN computes it on a scalar; silu for names it
    spells otherwise (swish)."""
    if name.startswith("gelu"):
        return lambda x: 0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0)))
    if name == "relu":
        return lambda x: max(x, 0.0)
    return lambda x: x / (1.0 + math.exp(-x)) if x > -700 else 0.0


def _q(z: float) -> float:
    """P(N(0,1) >= z)."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


@lru_cache(maxsize=256)
def element_outlier_probability(activation: str, std: float, gated: bool, threshold: float = INT8_THRESHOLD) -> float:
    """P(|act(g) x u| >= threshold) for g, u ~ N(0, std^2) independent (gated MLP), or
    P(|act(g)| >= threshold) (plain MLP): Simpson's rule over g."""
    act = _activation(activation)
    lo, hi = -10.0 * std, 10.0 * std
    h = (hi - lo) / (_GRID - 1)
    total = 0.0
    for i in range(_GRID):
        g = lo + i * h
        a = abs(act(g))
        if gated:
            p = 2.0 * _q(threshold / (a * std)) if a > 0 else 0.0
        else:
            p = 1.0 if a >= threshold else 0.0
        w = 1 if i in (0, _GRID - 1) else (4 if i % 2 else 2)
        total += w * p * math.exp(-0.5 * (g / std) ** 2)
    return total * h / 3.0 / (std * math.sqrt(2.0 * math.pi))


def down_proj_outlier_fraction(arch: ArchConfig, rows: int, width: int) -> float:
    """The expected share of down_proj's input columns holding an outlier among `rows` rows, with
    the weights transformers initialises (see the module doc); `width` is the MLP's input width
    (the hidden size)."""
    init = float((arch.hf_config or {}).get("initializer_range") or DEFAULT_INITIALIZER_RANGE)
    p = element_outlier_probability(arch.activation, init * math.sqrt(width), gated=arch.family != "gpt2")
    if p <= 0.0:
        return 0.0
    return -math.expm1(rows * math.log1p(-p))


def int8_outlier_bytes(arch: ArchConfig, *, tokens: int, intermediate: int, elem_bytes: int) -> int:
    """One layer's down_proj subA: tokens x (outlier share x intermediate) columns of `elem_bytes`."""
    cols = round(down_proj_outlier_fraction(arch, tokens, arch.hidden) * intermediate)
    return tokens * cols * elem_bytes


def int8_subA_bytes(arch: ArchConfig, lay: Layout, setup: Setup, elem_bytes: int) -> int:
    """Every layer's down-projection subA under LLM.int8 (`setup.dtype` int8): each quantised MLP
    output projection (down_proj, a shared expert's down_proj, GPT-2's c_proj) reads an
    activation product; `elem_bytes` is its input's dtype (the residual stream's)."""
    if setup.dtype != "int8":
        return 0
    tokens = micro_batch_tokens(setup)
    return sum(g.count * int8_outlier_bytes(arch, tokens=tokens, intermediate=lm.d_in, elem_bytes=elem_bytes)
               for g in lay.groups for lm in g.linears
               if lm.kind == "mlp" and lm.quantisable and lm.d_out == arch.hidden)


def int8_outlier_notes(arch: ArchConfig, lay: Layout, setup: Setup, elem_bytes: int) -> tuple[str, ...]:
    """What the subA figure assumes (randomly initialised weights), where it counts."""
    n = int8_subA_bytes(arch, lay, setup, elem_bytes)
    if n < 2**26:  # under 64 MiB: not worth a line
        return ()
    share = down_proj_outlier_fraction(arch, micro_batch_tokens(setup), arch.hidden)
    return (f"LLM.int8 keeps the outlier columns of every down_proj input through the step, {n / 2**30:.1f} GiB here: "
            f"{share:.0%} of them, as weights initialised N(0, initializer_range^2) make them; pretrained weights "
            f"have far fewer, so this part is an upper bound",)
