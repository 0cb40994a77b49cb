"""The attention block after its norm: q/k/v inputs, rotary, the attention kernel, o_proj, and
GPT-2's dropouts. Kernels (vramplan.streams.attention_kernel): SDPA flash / memory-efficient save
q, k, v, the output and the logsumexp; the math kernel saves the probabilities; eager attention
saves the scores and probabilities (and GPT-2's dropout mask and output)."""

from __future__ import annotations

from vramplan.ops.linear import linear_inputs
from vramplan.ops.tensors import BACKWARD, ROWS, SCORES, SPAN, OpContext, Saved, sized, tok

# GPT-2 configs default to dropout 0.1 on embeddings, residuals and attention
# (transformers GPT2Config resid_pdrop/embd_pdrop/attn_pdrop); Llama-style decoders use none.
GPT2_DROPOUT = 0.1


def qkv_inputs(c: OpContext) -> tuple[Saved, ...]:
    """q/k/v (GPT-2 c_attn, Phi-3 qkv_proj) read the norm output: saved once when the base weights
    train, plus what each adapter keeps."""
    mods = tuple((m, lm.d_in) for m, lm in c.mods.items() if lm.kind == "attn" and m not in ("o_proj", "c_proj"))
    return linear_inputs(c, mods, in_bytes=c.dt.norm_out, input_name=f"{c.arch.norm_names[0]}.output", width=c.arch.hidden,
                         saved_by_base=c.base_saves_input and not c.dt.autocast, shared_by_lora=True)


def attention_core(c: OpContext) -> tuple[Saved, ...]:
    """The query after rotary, keys and values over the attention span (expanded to every query
    head where the kernel repeats them), and what the kernel saves; backward transients of the
    math and eager kernels."""
    a, L, heads = c.arch, c.dt.linear_out, c.arch.heads
    if c.gpt2:
        out = [tok(c, "c_attn.output", L, 3 * a.hidden)]  # q, k, v are views of it
    elif a.mla:
        # DeepseekV3Attention.expand_kv: keys are a new [heads x (nope + rope)] tensor; values are a
        # view of kv_b_proj's output, whose whole [heads x (nope + v)] storage the kernel keeps
        # (traced: m1-moon-hf-lora-b2s2048, expand_kv and kv_b_proj outputs per layer)
        out = [tok(c, "query_states.cat", L, a.q_dim),
               sized(c, "key_states+kv_b_proj.output", SPAN, L, a.q_dim + heads * (a.qk_nope_head_dim + a.v_head_dim))]
    else:
        kv_w = a.q_dim if c.kernel.repeat_kv else a.kv_dim
        out = [tok(c, "query_states.rotated", L, a.q_dim), sized(c, "key_states+value_states", SPAN, L, 2 * kv_w)]
        if "qkv_proj" in c.mods and not c.kernel.repeat_kv:
            # Phi-3's fused qkv_proj (modeling_phi3.py Phi3Attention.forward): the values the kernel
            # saves are a view of its [q | k | v] output, so that whole storage stays beside the
            # rotated q and k (new tensors); its q and k parts come on top of the values
            # (t12-phi4mini-hf-lora-b4s2048, without checkpointing: 32 layers x 4096 x 2 bytes a token)
            out.append(tok(c, "qkv_proj.output.held_by_values", L, a.q_dim + a.kv_dim))
    kernel = c.kernel.name
    if kernel in ("flash", "efficient"):
        out += (tok(c, "attn_output", L, _out_width(c)), sized(c, "logsumexp", ROWS, 4, heads))
        if c.kernel.mask_saved:
            out.append(sized(c, "attention_mask", SCORES, L, 1))  # [b, 1, s, s_k]
    elif kernel == "math":
        out.append(sized(c, "attn_weights", SCORES, L, heads))
        # softmax backward: gradient of the probabilities, of the scores and one more score-sized
        # buffer, all fp32, beside the saved probabilities (traced: probe-l1b-qlora-ckpt-b1s4096,
        # 3 x b*h*s*s*4 bytes at the peak)
        out += (sized(c, f"attn_weights.{n}", SCORES, 4, heads, BACKWARD) for n in ("grad", "scores_grad", "softmax_buffer"))
    elif c.arch.attn_sinks:
        # gpt-oss eager_attention_forward (modeling_gpt_oss.py): the sinks are concatenated to the
        # scores and the softmax runs in the scores' dtype, so the probabilities are the only
        # score-sized tensor saved (traced: m1-gptoss-hf-lora-b1s2048, 64 x 2048 x 2049 bf16 per
        # layer); backward: their gradient, the slice's zero-padded copy, the softmax's output
        out.append(sized(c, "attn_probs_with_sinks", SCORES, L, heads))
        out += (sized(c, f"attn_probs.{n}", SCORES, L, heads, BACKWARD) for n in ("grad", "grad_padded", "scores_grad"))
    else:  # eager: matmul, softmax (fp32 in Llama-style code, then cast), dropout, matmul
        if not c.gpt2:
            out.append(sized(c, "attn_scores.softmax_fp32", SCORES, 4, heads))
        out.append(sized(c, "attn_weights", SCORES, L, heads))
        if c.gpt2 and GPT2_DROPOUT:
            out += (sized(c, "attn_dropout.mask", SCORES, 1, heads), sized(c, "attn_dropout.output", SCORES, L, heads))
        # grad of the 16-bit probabilities, its fp32 copy and the fp32 softmax-backward output
        out += (sized(c, "attn_weights.grad", SCORES, L, heads, BACKWARD),
                sized(c, "attn_weights.grad_fp32", SCORES, 4, heads, BACKWARD),
                sized(c, "attn_scores.grad", SCORES, 4, heads, BACKWARD))
    return tuple(out)


def o_proj_inputs(c: OpContext) -> tuple[Saved, ...]:
    """o_proj (GPT-2 c_proj) reads the attention output; flash/efficient kernels already save it,
    other kernels leave a contiguous copy for a trainable o_proj."""
    name = "c_proj" if c.gpt2 else "o_proj"
    shared = c.kernel.name in ("flash", "efficient")
    return linear_inputs(c, ((name, _out_width(c)),), in_bytes=c.dt.linear_out, input_name=f"{name}.input",
                         width=_out_width(c), saved_by_base=c.base_saves_input and not shared, shared_by_lora=False)


def _out_width(c: OpContext) -> int:
    """The attention output's width: heads x v_head_dim under MLA, else the query width."""
    return c.arch.heads * c.arch.v_head_dim if c.arch.mla else c.arch.q_dim


def residual_dropout(c: OpContext) -> tuple[Saved, ...]:
    """GPT-2's residual dropout masks, after attention and after the MLP."""
    if not (c.gpt2 and GPT2_DROPOUT):
        return ()
    return (tok(c, "attn.resid_dropout.mask", 1, c.arch.hidden), tok(c, "mlp.dropout.mask", 1, c.arch.hidden))
