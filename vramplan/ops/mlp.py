"""The MLP block after its norm, per family: SiLU/GELU-gated MLPs save gate, act, up and their
product (transformers modeling_llama.py LlamaMLP); GPT-2's MLP saves c_fc's output and NewGELU's
intermediates; MoE layers save the router's logits and, per routed token, the experts' tensors.
Backward holds the gradients of the widest intermediates."""

from __future__ import annotations

from vramplan.methods import adapter_bytes
from vramplan.ops.linear import linear_inputs
from vramplan.ops.tensors import BACKWARD, FIXED, OpContext, Saved, sized, tok
from vramplan.streams import trainer_autocast


def mlp(c: OpContext) -> tuple[Saved, ...]:
    """A dense MLP with its backward, or a routed-experts layer's router (the experts follow as
    their own operations: experts_up, experts_gate, experts_down, routing_weights, shared_experts)."""
    if c.moe:
        return router(c)
    return (gpt2_mlp(c) if c.gpt2 else gated_mlp(c)) + mlp_backward(c)


def gated_mlp(c: OpContext) -> tuple[Saved, ...]:
    a, L, Iw = c.arch, c.dt.linear_out, _dense_width(c)
    norm = a.norm_names[2] if a.norms_per_layer == 4 else a.norm_names[1]
    mods = tuple((m, a.hidden) for m in ("gate_proj", "up_proj", "gate_up_proj") if m in c.mods)
    out = linear_inputs(c, mods, in_bytes=c.dt.norm_out, input_name=f"{norm}.output", width=a.hidden,
                        saved_by_base=c.base_saves_input and not c.dt.autocast, shared_by_lora=True)
    # gate output (the act's input), act output, up output: the product saves both of its inputs.
    # Liger's SiLU/GELU-mul (liger_kernel/ops/swiglu.py LigerSiLUMulFunction, geglu.py) saves only
    # its two inputs and recomputes the activation in backward.
    act = () if c.setup.liger else (tok(c, "act_fn.output", L, Iw),)
    out += (tok(c, "gate_proj.output", L, Iw), *act, tok(c, "up_proj.output", L, Iw))
    return out + linear_inputs(c, (("down_proj", Iw),), in_bytes=L, input_name="down_proj.input", width=Iw,
                               saved_by_base=c.base_saves_input, shared_by_lora=False)


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


def _trains(c: OpContext, param: str) -> bool:
    """The fused expert parameter `param` has a gradient: full fine-tuning or a LoRA target."""
    return c.base or f"experts.{param}" in c.lora


def router(c: OpContext) -> tuple[Saved, ...]:
    """The router's saved tensors per token: its input when its weight trains (the MLP norm's
    output; DeepSeek-V3 routes an fp32 copy), its fp32 probabilities (softmax, or DeepSeek-V3's and
    Llama 4's sigmoid) and the top-k indices (int64, for the gather's backward). gpt-oss takes the
    top-k of the raw logits and softmaxes only those (modeling_gpt_oss.py GptOssTopKRouter)."""
    a, H = c.arch, c.arch.hidden
    k, E = a.experts_per_token, a.n_experts
    trains = c.base or a.router_module in c.lora
    out = [tok(c, "router.indices", 8, k)]
    out.append(tok(c, "router.probs", 4, k if a.router_topk_first else E))
    if trains and a.router_fp32:
        # F.linear(hidden_states.type(torch.float32), ...): under the trainer's autocast F.linear
        # casts it back and saves a 16-bit copy (traced: m1-moon-hf-lora-b2s2048, 16 MiB a layer)
        out.append(tok(c, "router.input_cast", 2 if trainer_autocast(c.setup) else 4, H))
    shared_in = [(m, H) for m in ("gate_proj", "up_proj") if m in c.lora and a.shared_expert_intermediate]
    norm = a.norm_names[2] if a.norms_per_layer == 4 else a.norm_names[1]
    saved = (trains and not a.router_fp32) or (c.base and bool(a.shared_expert_intermediate))
    out += linear_inputs(c, tuple(shared_in), in_bytes=c.dt.norm_out, input_name=f"{norm}.output", width=H,
                         saved_by_base=saved, shared_by_lora=True)
    if a.experts_every_token:  # hidden_states.repeat(E, 1), saved by the multiply by the scores
        out.append(tok(c, "experts.repeated_input", c.dt.linear_out, E * H))
    return tuple(out)


# A routed-experts layer's operations in forward order (transformers 5.17 integrations/moe.py
# grouped_mm_experts_forward over the k routed rows of each token; Llama4TextMoe's torch.bmm over
# every expert, E rows per token). Backward runs them in reverse, so each one's gradients meet
# only the tensors saved by the operations before it. torch._grouped_mm and bmm save their input
# only for a weight that has a gradient. Traced: m1-q3moe-hf-lora-b2s2048, m1-gptoss-hf-lora-b1s2048,
# m1-l4scout-hf-lora-b1s2048, m1-moon-hf-lora-b2s2048 (per layer: moe.py:445/465, silu, the gate's
# product, peft's W'; no gathered states with gate_up frozen).
def experts_up(c: OpContext) -> tuple[Saved, ...]:
    """gate_up's input when gate_up trains (the gathered hidden states; Llama 4 the score-scaled
    repeat), peft's merged gate_up W'; backward: the gradients of its output [2I] and input [H],
    and W's full-size gradient."""
    if not c.moe:
        return ()
    L, H, rows = c.dt.linear_out, c.arch.hidden, c.arch.expert_rows
    out = [tok(c, "experts.gate_up.input", L, rows * H)] if _trains(c, "gate_up_proj") else []
    out += merged_expert_weights(c, "gate_up_proj")
    out += (tok(c, "experts.gate_up.output.grad", L, rows * 2 * c.arch.expert_intermediate, BACKWARD),
            tok(c, "experts.gate_up.input.grad", L, rows * H, BACKWARD))
    return tuple(out) + _merged_grad(c, "gate_up_proj")


def experts_gate(c: OpContext) -> tuple[Saved, ...]:
    """gate_up's output [2I] (SiLU's input and the product's other factor) and the activation [I];
    gpt-oss's clamped gate, sigmoid, glu and up + 1 instead (four [I], modeling_gpt_oss.py
    _apply_gate); backward: the gradients of the gate, the up half and the activation."""
    if not c.moe:
        return ()
    L, rows, inter = c.dt.linear_out, c.arch.expert_rows, c.arch.expert_intermediate
    out = [tok(c, "experts.gate_up.output", L, rows * 2 * inter)]
    names = ("gate_clamped", "sigmoid", "glu", "up_plus_one") if c.arch.clamped_swiglu else ("act",)
    out += (tok(c, f"experts.{n}", L, rows * inter) for n in names)
    out += (tok(c, f"experts.{n}.grad", L, rows * inter, BACKWARD) for n in ("gate", "up", "act"))
    return tuple(out)


def experts_down(c: OpContext) -> tuple[Saved, ...]:
    """down's input (the product) when down trains, peft's merged down W'; backward: the incoming
    gradient of its output and (grouped_mm) the masked_fill's copy of it, its input's gradient, W's
    gradient."""
    if not c.moe:
        return ()
    L, H, rows, inter = c.dt.linear_out, c.arch.hidden, c.arch.expert_rows, c.arch.expert_intermediate
    grouped = not c.arch.experts_every_token
    out = [tok(c, "experts.product", L, rows * inter)] if _trains(c, "down_proj") else []
    out += merged_expert_weights(c, "down_proj")
    out += (tok(c, "experts.down.output.grad", L, (2 if grouped else 1) * rows * H, BACKWARD),
            tok(c, "experts.down.input.grad", L, rows * inter, BACKWARD))
    return tuple(out) + _merged_grad(c, "down_proj")


def routing_weights(c: OpContext) -> tuple[Saved, ...]:
    """grouped_mm: the down projection's output [k x H], saved by the multiply by the routing
    weights (they have a gradient through the router). Llama 4 scales before the experts."""
    if not c.moe or c.arch.experts_every_token:
        return ()
    return (tok(c, "experts.down.output", c.dt.linear_out, c.arch.experts_per_token * c.arch.hidden),)


def merged_expert_weights(c: OpContext, param: str) -> tuple[Saved, ...]:
    """peft 0.21 ParamWrapper on a fused parameter: forward folds the adapter in with one
    torch.baddbmm(W, B, A) into a full-size W' (peft/tuners/lora/layer.py _LoraFactorsProxy), which
    the expert matmul saves for its input's gradient, plus the 16-bit casts of the two factors
    (traced: m1-q3moe-hf-lora-b2s2048, layer.py:2296 a [E, H, I] down_proj copy per layer)."""
    if not c.lora:
        return ()
    wb = 4 if (c.setup.precision in ("fp32", "mixed") or (c.setup.quantised and c.setup.kbit_prepare)) else 2
    out = []
    for pt in c.group.param_targets:
        if pt.module == f"experts.{param}" and pt.module in c.lora:
            r = c.setup.lora_rank * pt.rank_mult
            out.append(sized(c, f"{pt.module}.merged_weight", FIXED, wb, pt.experts * pt.d_in * pt.d_out))
            out.append(sized(c, f"{pt.module}.lora_factors_cast", FIXED, wb, pt.experts * r * (pt.d_in + pt.d_out)))
    return tuple(out)


def shared_experts(c: OpContext) -> tuple[Saved, ...]:
    """Shared experts: a gated MLP over every token (gate, act, up outputs; down's input where
    down trains), and Qwen2-MoE's sigmoid gate saving the shared output."""
    a, L, width = c.arch, c.dt.linear_out, c.arch.shared_expert_intermediate
    if not width:
        return ()
    out = [tok(c, f"shared_expert.{n}", L, width) for n in ("gate", "act", "up")]
    out += linear_inputs(c, (("down_proj", width),), in_bytes=L, input_name="shared_expert.down_proj.input",
                         width=width, saved_by_base=c.base_saves_input, shared_by_lora=False)
    if a.shared_expert_gate:
        out.append(tok(c, "shared_expert.output", L, a.hidden))
    return tuple(out)


def mlp_backward(c: OpContext) -> tuple[Saved, ...]:
    """A dense MLP's backward: the gradients of its widest intermediates (gate, up, act) exist
    together while its saved tensors are still alive."""
    L, width = c.dt.linear_out, _dense_width(c)
    if c.setup.liger and not c.gpt2:
        # swiglu_backward writes the gate and up gradients into the saved a and b in place: only
        # the incoming gradient of the product is new
        return (tok(c, "mlp.product.grad", L, width, BACKWARD),)
    return tuple(tok(c, f"mlp.{n}.grad", L, width, BACKWARD) for n in ("gate", "up", "act"))


def down_proj_backward(c: OpContext) -> tuple[Saved, ...]:
    """The first thing a dense layer's backward runs when down_proj has an fp32 adapter under
    autocast: beside every tensor the layer saved, the incoming gradient of the layer's output
    [H], the base's gradient of down's input [I], and the adapter branch's: lora_A's 16-bit input
    gradient made fp32 by the autocast cast's backward, dropout's fp32 gradient, and the 16-bit
    one peft's cast hands back [I each]. The forward's cast of that input (lora_input_cast) is the
    same branch without the first two. Measured: LoRA runs whose peak is the last layer's backward
    were under by about (2H + 2I) bytes per token without it (t3-q3-17b-trl-lora-b4s2048,
    tr-l8b-trl-lora-b4s1024, h2-mis7b-trl-lora-b2s2048: 10.1, 9.9, 9.9 bytes per token and hidden unit)."""
    if c.moe or c.gpt2 or "down_proj" not in c.lora or "down_proj" not in c.mods:
        return ()
    # 16-bit streams only: a kbit-prepared base's fp32 streams need no peft cast (and its runs,
    # t4-mis7b-hf-qlora-ckpt-b4s1024, are already over without this moment)
    if adapter_bytes(c.setup) != 4 or c.dt.linear_out != 2 or not (c.dt.lora_autocast or c.dt.autocast):
        return ()
    L, H, width = c.dt.linear_out, c.arch.hidden, c.mods["down_proj"].d_in
    drop = (tok(c, "down_proj.lora_dropout.input_grad_fp32", 4, width, BACKWARD),) if c.setup.lora_dropout > 0 else ()
    # DoRA recomputes the base output from the dropped-out fp32 input (peft tuners/lora/dora.py
    # DoraLinearLayer.forward): that path's input gradient comes back through the autocast cast
    # as a second fp32 tensor, and the two are summed into a third before dropout's backward
    # (TRL DoRA runs peaking at the last layer's backward: 4.7-8.0 bytes per token and
    # intermediate unit under without it, h4-l1b-trl-dora-b4s2048 8.0)
    dora = tuple(tok(c, f"down_proj.dora.{n}", 4, width, BACKWARD) for n in ("base_input_grad_fp32", "input_grad_sum"))
    return (tok(c, "layer_output.grad", L, H, BACKWARD), tok(c, "down_proj.input.grad", L, width, BACKWARD),
            tok(c, "down_proj.lora_A.input_grad_fp32", 4, width, BACKWARD), *drop,
            tok(c, "down_proj.lora.input_grad", 2, width, BACKWARD), *(dora if c.setup.use_dora else ()))


def _merged_grad(c: OpContext, param: str) -> tuple[Saved, ...]:
    """W's full-size gradient of a LoRA-targeted fused parameter, until baddbmm's backward
    reduces it to the factors."""
    return tuple(t._replace(name=f"{t.name}.grad", lifetime=BACKWARD) for t in merged_expert_weights(c, param)
                 if t.name.endswith("merged_weight"))


def _dense_width(c: OpContext) -> int:
    """A dense MLP's intermediate width, read off its Linears (DeepSeek-V3's dense first layers and
    Llama 4's interleaved dense layers are wider than the experts)."""
    for m, div in (("gate_proj", 1), ("gate_up_proj", 2), ("c_fc", 1)):
        if m in c.mods:
            return c.mods[m].d_out // div
    return c.arch.intermediate


def ia3(c: OpContext) -> tuple[Saved, ...]:
    """peft IA3: result * ia3_l saves the k/v outputs; down's input is cast to the fp32 vector's
    dtype and saved by x * ia3_l (peft/tuners/ia3/layer.py). Gated MLPs only."""
    if c.setup.method != "ia3" or c.gpt2 or c.moe:
        return ()
    L, kv = c.dt.linear_out, c.arch.kv_dim
    return (tok(c, "k_proj.output", L, kv), tok(c, "v_proj.output", L, kv), tok(c, "down_proj.input_fp32", 4, c.arch.intermediate))


def dequant_backward(c: OpContext) -> tuple[Saved, ...]:
    """A 4-bit base's Linear backward (bitsandbytes MatMul4Bit.backward, 0.50):
    `grad_A = grad_output @ dequantize_4bit(B)` builds the whole weight in 16 bits for the
    input's gradient; LLM.int8's (MatMul8bitLt.backward) copies CB to the input's dtype and
    scales it (`state.CB.to(ctx.dtype_A, copy=True).mul_(...)`). The largest is an MLP weight;
    down_proj's comes first, beside every tensor the layer saved, the incoming gradient of the
    layer's output and the gradient of down's input it produces (traced:
    t9-l70b-trl-qlora-b1s2048, a 448 MiB _dequant weight of 8192 x 28672 at the peak)."""
    if c.moe or c.gpt2 or c.setup.dtype not in ("nf4", "fp4", "int8") or "down_proj" not in c.mods:
        return ()
    down = c.mods["down_proj"]
    if not down.quantisable:
        return ()
    L, H = c.dt.linear_out, c.arch.hidden
    wb = c.dt.residual if c.setup.dtype == "int8" else 2
    return (sized(c, "down_proj.weight_dequantised", FIXED, wb, down.numel, BACKWARD),
            tok(c, "layer_output.grad", L, H, BACKWARD), tok(c, "down_proj.input.grad", L, down.d_in, BACKWARD))
