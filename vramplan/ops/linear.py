"""What the Linear modules of a layer keep of their inputs: the input itself when the base
weight trains (one tensor, shared by every Linear reading it), a 16-bit cast per module under
autocast, the adapter branch's copies (vramplan.ops.lora), and bitsandbytes LLM.int8's inputs."""

from __future__ import annotations

from vramplan.ops.lora import adapter_input
from vramplan.ops.tensors import RETAINED, OpContext, Saved, tok
from vramplan.streams import trainer_autocast


def linear_inputs(c: OpContext, modules: tuple[tuple[str, int], ...], *, in_bytes: int, input_name: str, width: int,
                  saved_by_base: bool, shared_by_lora: bool) -> tuple[Saved, ...]:
    """Linears `modules` ((name, d_in) pairs) reading one input tensor `input_name` [tokens, width]
    of `in_bytes` per element. `saved_by_base`: the base matmuls save that tensor (counted once);
    `shared_by_lora`: lora_A saving the fp32 input itself counts it too (once, if not yet saved)."""
    out: list[Saved] = [tok(c, input_name, in_bytes, width)] if saved_by_base else []
    lora_shared = False
    for mod, d_in in modules:
        if c.base and c.dt.autocast and in_bytes != 2:
            out.append(tok(c, f"{mod}.input_cast", 2, d_in))  # autocast casts the input per Linear
        tensors, shared = adapter_input(c, mod, d_in, in_bytes)
        out += tensors
        lora_shared = lora_shared or shared
    if lora_shared and shared_by_lora and not saved_by_base:
        out.append(tok(c, input_name, in_bytes, width))
    return tuple(out)


def int8_inputs(c: OpContext) -> tuple[Saved, ...]:
    """bitsandbytes MatMul8bitLt.forward stores its input A in ctx.tensors (not
    save_for_backward), so backward does not free it: it lives as long as the graph, through the
    optimizer step, and checkpointing does not remove it. Distinct inputs per layer: attention
    input (shared by q/k/v), o_proj input, MLP input (shared by gate/up), down's. The attention
    output o_proj reads is 16-bit under Trainer's autocast (scaled_dot_product_attention is on
    its lower-precision list) whatever q/k/v are (traced: t5-l8b-lora-int8-ckpt-b2s1024, 32 bf16
    16 MiB sdpa outputs beside fp32 norm outputs); what MatMul8bitLt adds of its input (subA) is
    vramplan.int8_outliers'."""
    if c.setup.dtype != "int8":
        return ()
    a, r = c.arch, c.dt.residual
    o_in = a.hidden if c.gpt2 else a.q_dim
    o_bytes = 2 if trainer_autocast(c.setup) else r
    return (tok(c, "qkv_proj.input", r, a.hidden, RETAINED), tok(c, "o_proj.input", o_bytes, o_in, RETAINED),
            tok(c, "mlp.input", r, a.hidden, RETAINED), tok(c, "down_proj.input", r, a.intermediate, RETAINED))
