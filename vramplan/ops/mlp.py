"""The MLP block after its norm, per family: SiLU/GELU-gated MLPs save gate, act, up and their
product (transformers modeling_llama.py LlamaMLP); GPT-2's MLP saves c_fc's output and NewGELU's
intermediates; MoE layers save the router's logits and, per routed token, the experts' tensors.
Backward holds the gradients of the widest intermediates."""

from __future__ import annotations

from vramplan.ops.linear import linear_inputs
from vramplan.ops.tensors import BACKWARD, OpContext, Saved, tok


def mlp(c: OpContext) -> tuple[Saved, ...]:
    block = gpt2_mlp(c) if c.gpt2 else moe_mlp(c) if c.moe else gated_mlp(c)
    return block + mlp_backward(c)


def gated_mlp(c: OpContext) -> tuple[Saved, ...]:
    a, L, Iw = c.arch, c.dt.linear_out, c.arch.intermediate
    norm = a.norm_names[2] if a.norms_per_layer == 4 else a.norm_names[1]
    mods = tuple((m, a.hidden) for m in ("gate_proj", "up_proj", "gate_up_proj") if m in c.mods)
    out = linear_inputs(c, mods, in_bytes=c.dt.norm_out, input_name=f"{norm}.output", width=a.hidden,
                        saved_by_base=c.base and not c.dt.autocast, shared_by_lora=True)
    # gate output (the act's input), act output, up output: the product saves both of its inputs.
    # Liger's SiLU/GELU-mul (liger_kernel/ops/swiglu.py LigerSiLUMulFunction, geglu.py) saves only
    # its two inputs and recomputes the activation in backward.
    act = () if c.setup.liger else (tok(c, "act_fn.output", L, Iw),)
    out += (tok(c, "gate_proj.output", L, Iw), *act, tok(c, "up_proj.output", L, Iw))
    return out + linear_inputs(c, (("down_proj", Iw),), in_bytes=L, input_name="down_proj.input", width=Iw,
                               saved_by_base=c.base, shared_by_lora=False)


def gpt2_mlp(c: OpContext) -> tuple[Saved, ...]:
    a, L, Iw = c.arch, c.dt.linear_out, c.arch.intermediate
    out = linear_inputs(c, (("c_fc", a.hidden),), in_bytes=c.dt.norm_out, input_name=f"{a.norm_names[1]}.output",
                        width=a.hidden, saved_by_base=c.base, shared_by_lora=False)
    out += (tok(c, "c_fc.output", L, Iw),)  # the GELU input
    if a.activation == "gelu_new":  # NewGELU's python tanh formula saves three more
        out += tuple(tok(c, f"act.new_gelu.{i}", L, Iw) for i in range(3))
    mods = (("c_proj", Iw),) if "c_proj" in c.lora else ()
    return out + linear_inputs(c, mods, in_bytes=L, input_name="mlp.c_proj.input", width=Iw, saved_by_base=c.base,
                               shared_by_lora=False)


def moe_mlp(c: OpContext) -> tuple[Saved, ...]:
    """Router logits and softmax (fp32, per expert); per routed token its gathered hidden states
    (two hidden-wide tensors) and the expert's gate/up/act/product; a shared expert's four
    intermediates and one hidden-wide tensor."""
    a, L, H = c.arch, c.dt.linear_out, c.arch.hidden
    k, ie = a.experts_per_token, a.moe_intermediate or a.intermediate
    out = [tok(c, "experts.input", c.dt.norm_out, H)] if c.base else []
    out += (tok(c, "router.logits", 4, a.n_experts), tok(c, "router.softmax", 4, a.n_experts))
    out.append(tok(c, "experts.gathered_states", L, k * 2 * H))
    out += (tok(c, f"experts.{n}", L, k * ie) for n in ("gate", "up", "act", "product"))
    if a.shared_expert_intermediate:
        out += (tok(c, f"shared_expert.{n}", L, a.shared_expert_intermediate) for n in ("gate", "up", "act", "product"))
        out.append(tok(c, "shared_expert.hidden", L, H))
    return tuple(out)


def mlp_backward(c: OpContext) -> tuple[Saved, ...]:
    """One layer's backward: the gradients of the widest intermediates (gate, up, act; all routed
    experts' at once) exist together while its saved tensors are still alive."""
    width = (c.arch.moe_intermediate or c.arch.intermediate) * (c.arch.experts_per_token or 1)
    if c.setup.liger and not c.moe and not c.gpt2:
        # swiglu_backward writes the gate and up gradients into the saved a and b in place: only
        # the incoming gradient of the product is new
        return (tok(c, "mlp.product.grad", c.dt.linear_out, width, BACKWARD),)
    return tuple(tok(c, f"mlp.{n}.grad", c.dt.linear_out, width, BACKWARD) for n in ("gate", "up", "act"))


def ia3(c: OpContext) -> tuple[Saved, ...]:
    """peft IA3: result * ia3_l saves the k/v outputs; down's input is cast to the fp32 vector's
    dtype and saved by x * ia3_l (peft/tuners/ia3/layer.py). Gated MLPs only."""
    if c.setup.method != "ia3" or c.gpt2 or c.moe:
        return ()
    L, kv = c.dt.linear_out, c.arch.kv_dim
    return (tok(c, "k_proj.output", L, kv), tok(c, "v_proj.output", L, kv), tok(c, "down_proj.input_fp32", 4, c.arch.intermediate))
