"""Activations as saved tensors per operation. Each operation of a decoder layer is a small
function of the layer's OpContext returning named tensors (Saved: size per token / query row /
score element / layer, dtype, lifetime); the layer is the table LAYER_OPS, and its figures
(vramplan.activations.layer_activations) are their sums at the micro-batch's Dims.

The facts behind the terms were read off allocator traces of real runs (torch 2.11, transformers
5.17, peft 0.21; `vramplan profile --trace`); each function names its source.
"""

from __future__ import annotations

from collections.abc import Callable

from vramplan.ops.attention import GPT2_DROPOUT, attention_core, o_proj_inputs, qkv_inputs, residual_dropout
from vramplan.ops.linear import int8_inputs
from vramplan.ops.lora import dora, lora_input_cast
from vramplan.ops.mlp import (
    dequant_backward,
    down_proj_backward,
    experts_down,
    experts_gate,
    experts_up,
    ia3,
    mlp,
    routing_weights,
    shared_experts,
)
from vramplan.ops.norm import input_norm, mlp_norm, qk_norm, sandwich_norms
from vramplan.ops.tensors import (
    BACKWARD,
    FIXED,
    FORWARD,
    PER,
    RETAINED,
    ROWS,
    SAVED,
    SAVED_FOR_INPUT_GRAD,
    SCORES,
    SPAN,
    TOKENS,
    TRANSIENT,
    Dims,
    OpContext,
    Saved,
    dims_of,
    op_context,
    size_bytes,
)

Op = Callable[[OpContext], tuple[Saved, ...]]

# One decoder layer, in forward order. An operation that does not apply to a setup returns ().
LAYER_OPS: tuple[tuple[str, Op], ...] = (
    ("input_norm", input_norm),
    ("qkv_proj", qkv_inputs),
    ("qk_norm", qk_norm),
    ("attention", attention_core),
    ("o_proj", o_proj_inputs),
    ("sandwich_norms", sandwich_norms),
    ("residual_dropout", residual_dropout),
    ("mlp_norm", mlp_norm),
    ("mlp", mlp),
    ("down_proj_backward", down_proj_backward),
    ("dequant_backward", dequant_backward),
    ("experts_up", experts_up),
    ("experts_gate", experts_gate),
    ("experts_down", experts_down),
    ("routing_weights", routing_weights),
    ("shared_experts", shared_experts),
    ("ia3", ia3),
    ("dora", dora),
    ("lora_input_cast", lora_input_cast),
    ("int8_inputs", int8_inputs),
)

__all__ = [
    "BACKWARD",
    "FIXED",
    "FORWARD",
    "GPT2_DROPOUT",
    "LAYER_OPS",
    "PER",
    "RETAINED",
    "ROWS",
    "SAVED",
    "SAVED_FOR_INPUT_GRAD",
    "SCORES",
    "SPAN",
    "TOKENS",
    "TRANSIENT",
    "Dims",
    "Op",
    "OpContext",
    "Saved",
    "dims_of",
    "op_context",
    "size_bytes",
]
