"""The layer's norms. RMSNorm (transformers modeling_llama.py LlamaRMSNorm) upcasts its input to
fp32 and saves it (pow/mul), and, when its weight trains, the normalised tensor (weight * x);
GemmaRMSNorm multiplies in fp32. GPT-2's LayerNorm saves its input. Under Liger
(Trainer's use_liger_kernel swaps every RMSNorm module for LigerRMSNorm) each norm saves its input
as it is and one fp32 rstd per row instead."""

from __future__ import annotations

from vramplan.ops.tensors import SAVED, SAVED_FOR_INPUT_GRAD, OpContext, Saved, tok


def liger_norm(c: OpContext, name: str, x_bytes: int, width: int, rows_per_token: int = 1,
               lifetime: str = SAVED) -> tuple[Saved, ...]:
    """LigerRMSNormFunction.forward (liger_kernel/ops/rms_norm.py, 0.8.5): save_for_backward(X, W,
    RSTD) with X the input itself in its own dtype and RSTD fp32 per row (llama and gemma casting
    modes); backward rebuilds dW from them, so no normalised copy is kept."""
    return (tok(c, f"{name}.input", x_bytes, width, lifetime), tok(c, f"{name}.rstd", 4, rows_per_token, lifetime))


def input_norm(c: OpContext) -> tuple[Saved, ...]:
    """The attention block's norm (input_layernorm / ln_1). Its input copy serves the gradient of
    the layer's input only (a frozen first layer does not keep it)."""
    H, name = c.arch.hidden, c.arch.norm_names[0]
    if c.setup.liger and not c.gpt2:
        return liger_norm(c, name, c.dt.residual, H, lifetime=SAVED_FOR_INPUT_GRAD)
    if c.gpt2:
        out = [tok(c, f"{name}.input", c.dt.residual, H, SAVED_FOR_INPUT_GRAD)]
    else:
        out = [tok(c, f"{name}.input_fp32", 4, H, SAVED_FOR_INPUT_GRAD)]
    if c.base and not c.gpt2:
        out.append(tok(c, f"{name}.normalised", c.normalised, H))
    return tuple(out)


def sandwich_norms(c: OpContext) -> tuple[Saved, ...]:
    """Gemma2/3 post-attention and post-feedforward norms."""
    if c.arch.norms_per_layer != 4:
        return ()
    H, names = c.arch.hidden, c.arch.norm_names
    out = []
    for name in (names[1], names[3]):
        if c.setup.liger:
            out += liger_norm(c, name, c.dt.linear_out, H)
            continue
        out.append(tok(c, f"{name}.input_fp32", 4, H))
        if c.base:
            out.append(tok(c, f"{name}.normalised", c.normalised, H))
    return tuple(out)


def qk_norm(c: OpContext) -> tuple[Saved, ...]:
    """Qwen3 q_norm/k_norm: RMSNorm over each head saves the fp32 q and k (and the normalised
    copies when its weight trains); rotary does not save its input."""
    if not c.arch.qk_norm:
        return ()
    out = []
    for name, width, heads in (("q_norm", c.arch.q_dim, c.arch.heads), ("k_norm", c.arch.kv_dim, c.arch.kv_heads)):
        if c.setup.liger:
            out += liger_norm(c, name, c.dt.linear_out, width, rows_per_token=heads)
            continue
        out.append(tok(c, f"{name}.input_fp32", 4, width))
        if c.base:
            out.append(tok(c, f"{name}.normalised", c.dt.norm_out, width))
    return tuple(out)


def mlp_norm(c: OpContext) -> tuple[Saved, ...]:
    """The MLP block's norm (post_attention_layernorm; Gemma2/3 pre_feedforward_layernorm; ln_2)."""
    H, names = c.arch.hidden, c.arch.norm_names
    if c.gpt2:
        return (tok(c, f"{names[1]}.input", c.dt.residual, H),)
    name = names[2] if c.arch.norms_per_layer == 4 else names[1]
    if c.setup.liger:
        return liger_norm(c, name, c.dt.residual, H)
    out = [tok(c, f"{name}.input_fp32", 4, H)]
    if c.base:
        out.append(tok(c, f"{name}.normalised", c.normalised, H))
    return tuple(out)
