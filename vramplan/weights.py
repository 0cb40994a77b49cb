"""Bytes of the model's parameters on the device, by dtype and quantisation."""

from __future__ import annotations

from dataclasses import dataclass

from vramplan.layout import Layout

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}

# bitsandbytes 4-bit (NF4/FP4): two values per byte; one absmax per block of 64 values
# (bitsandbytes/nn/modules.py Params4bit blocksize=64). Without double quantisation absmax is fp32;
# with it, absmax is stored as uint8 plus one fp32 absmax per 256 of them and a 256-entry fp32 code
# (bitsandbytes/functional.py quantize_4bit, compress_statistics=True).
NF4_BLOCK = 64
DQ_BLOCK = 256
CODE_BYTES = 256 * 4
# LLM.int8 (bitsandbytes Int8Params): int8 weight plus one fp32 scale (SCB) per output row.
# Every allocation is rounded up to 512 bytes by PyTorch's CUDA caching allocator
# (c10/cuda/CUDACachingAllocator.cpp kMinBlockSize), which matters for the many small statistics.
ALLOC_ROUND = 512


def _round(nbytes: int) -> int:
    return -(-nbytes // ALLOC_ROUND) * ALLOC_ROUND


def quantised_linear_bytes(*, d_in: int, d_out: int, dtype: str, double_quant: bool) -> int:
    """Bytes of one quantised Linear weight with its statistics."""
    n = d_in * d_out
    if dtype == "int8":
        return _round(n) + _round(4 * d_out)
    blocks = -(-n // NF4_BLOCK)
    if not double_quant:
        return _round(n // 2) + _round(4 * blocks)
    return _round(n // 2) + _round(blocks) + _round(4 * -(-blocks // DQ_BLOCK)) + _round(CODE_BYTES)


@dataclass(frozen=True)
class WeightBytes:
    """Base model parameters on the device: quantised Linear weights, and everything else.
    `unquantised_linear_params` counts the Linear-like weights a 4/8-bit load leaves in 16 bits
    (fused 3-D MoE experts, custom routers, nn.Linear subclasses): part of `dense_params`."""

    quantised_bytes: int
    dense_bytes: int
    dense_params: int
    unquantised_linear_params: int = 0

    @property
    def total(self) -> int:
        return self.quantised_bytes + self.dense_bytes


def base_weight_bytes(*, lay: Layout, dtype: str, dense_bytes_per_param: int, double_quant: bool,
                      quantised: bool) -> WeightBytes:
    """Weights as loaded (and, for a quantised base, after peft's kbit preparation when
    `dense_bytes_per_param` is 4), summed over the layer groups. Only modules whose type is
    exactly nn.Linear (and GPT-2 Conv1D) are quantised (transformers 5 integrations/bitsandbytes.py
    replace_with_bnb_linear); embeddings, norms, biases, lm_head (quantizers/base.py
    get_keys_to_not_convert), fused MoE experts (nn.Parameter, not nn.Linear), custom routers and
    Linear subclasses (Llama4Router) keep a dense dtype (peft prepare_model_for_kbit_training upcasts
    every non-quantised fp16/bf16 parameter to fp32, peft/utils/other.py)."""
    if not quantised:
        return WeightBytes(0, lay.params_total * dense_bytes_per_param, lay.params_total)
    key = (id(lay), dtype, dense_bytes_per_param, double_quant)
    hit = _QUANTISED_CACHE.get(key)
    if hit is not None and hit[0] is lay:
        return hit[1]
    wb = _quantised_weight_bytes(lay, dtype, dense_bytes_per_param, double_quant)
    _QUANTISED_CACHE[key] = (lay, wb)
    return wb


# Keyed by the layout's identity (layouts are cached per model, vramplan.layout), as
# allocator.param_rounding_bytes: summing every quantised Linear per estimate would cost a fifth
# of a 405B QLoRA estimate (benchmarks/speed.py).
_QUANTISED_CACHE: dict[tuple[int, str, int, bool], tuple[Layout, WeightBytes]] = {}


def _quantised_weight_bytes(lay: Layout, dtype: str, dense_bytes_per_param: int, double_quant: bool) -> WeightBytes:
    q = qn = 0
    for g in lay.groups:
        q += g.count * sum(quantised_linear_bytes(d_in=lm.d_in, d_out=lm.d_out, dtype=dtype, double_quant=double_quant)
                           for lm in g.linears if lm.quantisable)
        qn += g.count * g.quantisable_params
    kept = sum(g.count * (g.linear_params - g.quantisable_params + g.expert_params + g.router_params)
               for g in lay.groups)
    dense = lay.params_total - qn
    return WeightBytes(q, dense * dense_bytes_per_param, dense, kept)
