"""Activations: the tensors autograd saves during forward, per decoder layer and for the
LM head / loss, and the transients of backward.

Each term names the tensor it counts. The facts behind them were read off allocator traces of real
runs (torch 2.11, transformers 5.17, peft 0.21; `vramplan profile --trace`), e.g. for a bf16
Llama layer: RMSNorm saves its fp32 input and bf16 normalised copy (modeling_llama.py
LlamaRMSNorm), SDPA-flash saves q, k, v, output and logsumexp, SiLU-gated MLPs save gate, act,
up and their product.
"""

from __future__ import annotations

from dataclasses import dataclass

from vramplan.arch import ArchConfig
from vramplan.heads import HeadActs, hf_loss_head, liger_flce_head, trl_fused_head
from vramplan.layout import Layout
from vramplan.setup import Setup

# GPT-2 configs default to dropout 0.1 on embeddings, residuals and attention
# (transformers GPT2Config resid_pdrop/embd_pdrop/attn_pdrop); Llama-style decoders use none.
GPT2_DROPOUT = 0.1


def micro_batch_tokens(setup: Setup) -> int:
    """Tokens in one micro-batch as the model sees them (prompt tuning prepends its virtual tokens)."""
    return setup.batch_size * (setup.seq_len + (setup.prefix_tokens if setup.method == "prompt" else 0))


@dataclass(frozen=True)
class Dtypes:
    """Bytes per element of the activation streams of a setup."""

    residual: int  # the residual stream between layers
    norm_out: int  # norm outputs
    linear_out: int  # Linear outputs inside attention and MLP
    logits: int  # lm_head output
    autocast: bool  # mixed precision: each Linear casts its input to 16-bit separately
    # Trainer's bf16=True autocasts over 16-bit weights: only the fp32 LoRA adapters cast
    # (lora_A saves a 16-bit cast of its input, lora_B returns 16-bit)
    lora_autocast: bool = False


def trainer_autocast(setup: Setup) -> bool:
    """transformers Trainer and TRL run forward under torch.autocast(bf16) when bf16=True, which
    both do for 16-bit setups (TrainingArguments.bf16; SFTConfig defaults it on)."""
    return setup.trainer in ("hf", "trl") and setup.precision != "fp32"


def stream_dtypes(setup: Setup) -> Dtypes:
    if setup.precision == "fp32":
        return Dtypes(4, 4, 4, 4, False)
    if setup.precision == "mixed":
        # fp32 weights under autocast: the embedding output, residual adds and norms stay fp32,
        # matmuls run and return 16-bit.
        return Dtypes(4, 4, 2, 2, True)
    if setup.quantised and setup.kbit_prepare:
        # prepare_model_for_kbit_training upcasts embeddings, norms and lm_head to fp32, so the
        # hidden states are fp32; bitsandbytes Linear4bit/8bitLt return their input's dtype.
        return Dtypes(4, 4, 4, 4, False)
    b = 2 if setup.dtype in ("bf16", "fp16") or setup.quantised else 4
    return Dtypes(b, b, b, b, False, lora_autocast=trainer_autocast(setup) and b == 2)


@dataclass(frozen=True)
class AttnKernel:
    name: str  # "flash" | "efficient" | "math" | "eager"
    repeat_kv: bool  # k/v expanded to every query head before the kernel
    mask_saved: bool  # a dense mask [b, 1, s, s_k] of the compute dtype saved per layer


def attention_kernel(arch: ArchConfig, setup: Setup, dt: Dtypes) -> AttnKernel:
    """Which kernel SDPA really runs. transformers passes enable_gqa only without a mask
    (integrations/sdpa_attention.py use_gqa_in_sdpa); torch's flash kernel needs 16-bit inputs and
    no mask, and its memory-efficient kernel does not take GQA, so fp32 + GQA falls to the math
    kernel (seen: QLoRA traces save b*h*s*s fp32 probabilities)."""
    masked = setup.method == "prefix"  # peft passes a prefix attention mask
    gqa = arch.kv_heads != arch.heads
    if setup.attn == "eager":
        return AttnKernel("eager", gqa, False)
    if masked:
        return AttnKernel("efficient", gqa, True)
    if dt.linear_out == 2:
        return AttnKernel("flash", False, False)
    return AttnKernel("math" if gqa else "efficient", gqa, False)


@dataclass(frozen=True)
class LayerActs:
    saved: int  # bytes one layer saves for backward
    transient: int  # extra bytes alive at the worst moment of one layer's backward
    retained: int = 0  # bytes held by the graph itself until it is freed (not by backward)


def _consumer_bytes(*, d_in: int, in_bytes: int, base_saves: bool, lora: bool, setup: Setup, dt: Dtypes,
                    shared_seen: list[bool]) -> int:
    """What one Linear saves of its input, per token.

    Trainable base weight: the input itself (counted once by the caller), or under autocast its
    own 16-bit cast. LoRA (peft lora/layer.py Linear.forward): x cast to the adapter dtype (fp32),
    then dropout (a bool mask and an fp32 output saved for lora_A), one copy per targeted module."""
    b = 0
    if base_saves and dt.autocast and in_bytes != 2:
        b += 2 * d_in
    if lora and (dt.autocast or dt.lora_autocast):
        # under autocast lora_A (an fp32 Linear) saves its own 16-bit cast of the dropout output;
        # dropout keeps only its mask (traced: probe-l1b-lora-mixed)
        return b + (3 if setup.lora_dropout > 0 else 2) * d_in
    if lora:
        if setup.lora_dropout > 0:
            b += 5 * d_in
        elif in_bytes != 4:
            b += 4 * d_in
        elif not shared_seen[0]:
            shared_seen[0] = True  # lora_A saves the fp32 input itself, shared by all targets
    return b


def dora_terms(lay: Layout, setup: Setup, dt: Dtypes) -> tuple[int, int, int]:
    """DoRA (peft tuners/lora/dora.py DoraLinearLayer.forward, with dropout in training): per
    targeted module `base_result = F.linear(x, weight.to(x.dtype))` recomputes the base output and
    `(mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * scaling` saves both
    outputs for the magnitude's gradient (per token: 2 x d_out in the compute dtype); F.linear saves
    its weight operand for the input gradient — the base weight cast to the compute dtype, a dense
    d_out x d_in copy per module (per layer, not per token). Forward transient: the fp32 weight
    copy, weight + scaling * lora_weight and the d_out x d_in lora_weight built from an identity.
    Traced: tr-l1b-hf-dora-b2s1024 (dora.py:163, 5 x 32 MiB per layer)."""
    ob = 2 if (dt.autocast or dt.lora_autocast or dt.linear_out == 2) else 4
    wb = 2 if (dt.autocast or dt.lora_autocast) else 4
    mods = [lm for lm in lay.linears if lm.module in setup.lora_targets]
    tok = sum(2 * ob * lm.d_out for lm in mods)
    w = sum(wb * lm.numel for lm in mods)
    tmp = max((3 * 4 * lm.numel for lm in mods), default=0)
    return tok, w, tmp


def lora_forward_transient(lay: Layout, setup: Setup, dt: Dtypes) -> int:
    """Per token: peft casts a targeted module's input to the fp32 adapter dtype and dropout writes
    a new fp32 tensor; both exist while lora_A runs (peft lora/layer.py Linear.forward;
    traced: tr-l1b-trl-lora-b2s1024, _cast_input_dtype + dropout, 64 MiB each on down_proj)."""
    if setup.method not in ("lora", "qlora") or setup.lora_dropout == 0 or not (dt.lora_autocast or dt.autocast):
        return 0
    widest = max((lm.d_in for lm in lay.linears if lm.module in setup.lora_targets), default=0)
    return 2 * 4 * widest + 2 * widest


def layer_activations(arch: ArchConfig, lay: Layout, setup: Setup, *, dt: Dtypes, kernel: AttnKernel,
                      first_layer: bool = False) -> LayerActs:
    """Bytes one decoder layer saves for backward (whole micro-batch), and its backward transient."""
    b, s = setup.batch_size, setup.seq_len
    T = b * s
    H, Iw = arch.hidden, arch.intermediate
    q, kv, heads = arch.q_dim, arch.kv_dim, arch.heads
    L = dt.linear_out
    base = setup.method in ("full", "galore")
    lora = setup.lora_targets if setup.method in ("lora", "qlora") else ()
    virt = setup.prefix_tokens if setup.method in ("prefix", "prompt") else 0
    s_k = s + virt  # attention span (prefix adds keys/values; prompt tuning lengthens the sequence)
    if setup.method == "prompt":
        T = micro_batch_tokens(setup)
        s = s_k
    adapters_only = not base
    in_grad = not (first_layer and adapters_only and setup.method not in ("prompt",))
    gpt2 = arch.family == "gpt2"
    mods = {lm.module: lm for lm in lay.linears}
    per_tok = 0

    def consumer(mod: str, d_in: int, in_bytes: int, seen: list[bool]) -> int:
        return _consumer_bytes(d_in=d_in, in_bytes=in_bytes, base_saves=base, lora=mod in lora, setup=setup, dt=dt,
                               shared_seen=seen)

    attn_in_mods = [m for m in mods if mods[m].kind == "attn" and m not in ("o_proj", "c_proj")]
    # ---- attention block input: norm ----------------------------------------------------------
    if gpt2:
        per_tok += dt.residual * H if in_grad else 0  # LayerNorm saves its input
    elif in_grad:
        per_tok += 4 * H  # RMSNorm: fp32 copy of the input (pow/mul save it)
    gemma = arch.model_type.startswith("gemma")
    normalised = 4 if (gemma or dt.norm_out == 4) else 2  # GemmaRMSNorm multiplies in fp32
    if base and not gpt2:
        per_tok += normalised * H  # normalised tensor saved by weight*x
    if arch.norms_per_layer == 4:  # Gemma2 post-attention and post-feedforward norms
        per_tok += 2 * (4 + (normalised if base else 0)) * H
    seen = [False]
    if base and not dt.autocast:
        per_tok += dt.norm_out * H  # norm output, saved once by the q/k/v (c_attn) Linears
        seen = [True]
    for m in attn_in_mods:
        per_tok += consumer(m, mods[m].d_in, dt.norm_out, seen)
    if seen[0] and not (base and not dt.autocast):
        per_tok += dt.norm_out * H
    if arch.qk_norm:
        # Qwen3 q_norm/k_norm: RMSNorm over each head saves the fp32 q and k (and the normalised
        # copies when its weight trains); rotary does not save its input
        per_tok += 4 * (q + kv) + ((2 if dt.norm_out == 2 else 4) * (q + kv) if base else 0)
    # ---- attention core -----------------------------------------------------------------------
    kv_w = q if kernel.repeat_kv else kv
    core_tok = L * q  # query after rotary
    core_tok += 2 * L * kv_w * s_k // s  # keys and values over the attention span
    if gpt2:
        core_tok = L * 3 * H  # c_attn output; q, k, v are views of it
    scores = b * heads * s * s_k  # elements of one layer's attention matrix
    attn_dropout = GPT2_DROPOUT if gpt2 else 0.0
    core = 0
    if kernel.name in ("flash", "efficient"):
        core_tok += L * q  # output (shared with o_proj's input)
        core += 4 * b * heads * s  # logsumexp
        if kernel.mask_saved:
            core += L * b * s * s_k
        out_shared = True
    elif kernel.name == "math":
        core += L * scores  # softmax probabilities
        out_shared = False
    else:  # eager: matmul, softmax (fp32 in Llama-style code, then cast), dropout, matmul
        core += (4 + L if not gpt2 else L) * scores
        if attn_dropout:
            core += (1 + L) * scores
        out_shared = False
    per_tok += core_tok
    # ---- o_proj / c_proj --------------------------------------------------------------------
    o_name = "c_proj" if gpt2 else "o_proj"
    if base and not out_shared:
        per_tok += L * q  # attention output made contiguous, saved by o_proj
    per_tok += consumer(o_name, q, L, [True])
    if gpt2:
        per_tok += 1 * H * 2 if attn_dropout else 0  # residual dropout masks (after attn and MLP)
    # ---- MLP ----------------------------------------------------------------------------------
    if gpt2:
        per_tok += dt.residual * H  # ln_2 input
        seen = [False]
        if base:
            per_tok += dt.norm_out * H
            seen = [True]
        per_tok += consumer("c_fc", H, dt.norm_out, seen)
        act = arch.activation
        per_tok += L * Iw  # c_fc output (GELU input)
        per_tok += (3 if act == "gelu_new" else 0) * L * Iw  # NewGELU's python tanh formula saves 3
        if base:
            per_tok += L * Iw  # GELU output saved by c_proj
        per_tok += consumer("c_proj", Iw, L, [True]) if "c_proj" in lora else 0
    elif arch.family == "moe":
        k = arch.experts_per_token
        ie = arch.moe_intermediate or Iw
        per_tok += 4 * H + (2 if base else 0) * H + (dt.norm_out * H if base else 0)
        per_tok += 8 * arch.n_experts  # router logits / softmax (fp32)
        per_tok += k * (2 * L * H + 4 * L * ie)  # per routed token: gathered input, gate/up/act/product
        if arch.shared_expert_intermediate:
            per_tok += 4 * L * arch.shared_expert_intermediate + L * H
    else:
        per_tok += 4 * H  # post-attention RMSNorm fp32 input
        if base:
            per_tok += normalised * H
        seen = [False]
        if base and not dt.autocast:
            per_tok += dt.norm_out * H
            seen = [True]
        for m in ("gate_proj", "up_proj", "gate_up_proj"):
            if m in mods:
                per_tok += consumer(m, H, dt.norm_out, seen)
        if seen[0] and not (base and not dt.autocast):
            per_tok += dt.norm_out * H
        per_tok += 3 * L * Iw  # gate output (act input), act output, up output (mul saves both)
        if base:
            per_tok += L * Iw  # product, saved by down_proj
        per_tok += consumer("down_proj", Iw, L, [True])
        if setup.method == "ia3":
            # peft IA3: result * ia3_l saves the k/v outputs; down's input is cast to the fp32
            # vector's dtype and saved by x * ia3_l (peft/tuners/ia3/layer.py)
            per_tok += L * 2 * kv + 4 * Iw
    dora_tok, dora_w, dora_tmp = dora_terms(lay, setup, dt) if (lora and setup.use_dora) else (0, 0, 0)
    saved = (per_tok + dora_tok) * T + core + dora_w
    retained = 0
    if setup.dtype == "int8":
        # bitsandbytes MatMul8bitLt.forward stores its input A in ctx.tensors (not
        # save_for_backward), so backward does not free it: it lives as long as the graph, through
        # the optimizer step, and checkpointing does not remove it. Distinct inputs per layer:
        # attention input (shared by q/k/v), o_proj input, MLP input (shared by gate/up), down's.
        retained = dt.residual * (H + q + H + Iw) * T if not gpt2 else dt.residual * (H + H + H + Iw) * T
    # Backward of one layer: the gradients of the widest intermediates (MLP) exist together while
    # its saved tensors are still alive; for eager/math the attention-score gradients too.
    width = (arch.moe_intermediate or Iw) * (arch.experts_per_token or 1)
    transient = max(3 * L * width * T, dora_tmp, lora_forward_transient(lay, setup, dt) * T)
    if kernel.name == "math":
        # softmax backward: gradient of the probabilities, of the scores and one more
        # score-sized buffer, all fp32, beside the saved probabilities (traced:
        # probe-l1b-qlora-ckpt-b1s4096, 3 x b*h*s*s*4 bytes at the peak)
        transient = max(transient, 3 * 4 * scores)
    elif kernel.name == "eager":
        # grad of the 16-bit probabilities, its fp32 copy and the fp32 softmax-backward output
        transient = max(transient, (L + 4 + 4) * scores)
    return LayerActs(saved=saved, transient=transient, retained=retained)


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
