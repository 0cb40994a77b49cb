"""The activation streams of a setup: bytes per element of each stream (residual, norm outputs,
Linear outputs, logits), the tokens one micro-batch carries, and which attention kernel runs.
Every per-operation term (vramplan.ops) reads its dtypes from here."""

from __future__ import annotations

from dataclasses import dataclass

from vramplan.arch import ArchConfig
from vramplan.setup import Setup


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
        # hidden states are fp32; bitsandbytes Linear4bit/8bitLt return their input's dtype. Under
        # Trainer's autocast the (unquantised) lm_head is an ordinary Linear: bf16 logits.
        # The fp32 adapters then run under autocast too: lora_A saves a bf16 cast of its input
        # (traced: t4-mis7b-hf-qlora-ckpt-b4s1024, 16-bit hidden-wide casts and no fp32 dropout
        # outputs of the hidden-wide targets at the peak).
        auto = trainer_autocast(setup)
        return Dtypes(4, 4, 4, 2 if auto else 4, False, lora_autocast=auto)
    if setup.quantised and setup.use_dora and trainer_autocast(setup):
        # DoRA on an unprepared 4-bit base under autocast: its fp32 magnitude makes each targeted
        # module's DoRA output fp32, and peft's bnb Linear4bit.forward adds it to the base output
        # without casting back (tuners/lora/bnb.py; the plain Linear casts to the base dtype), so
        # the module outputs, the residual stream and the norms run in fp32 from the first layer
        # on; the lm_head stays an ordinary Linear under autocast (bf16 logits).
        return Dtypes(4, 4, 4, 2, False, lora_autocast=True)
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
    if setup.attn == "eager" or arch.attn_sinks:
        # gpt-oss: no SDPA (GptOssPreTrainedModel._supports_sdpa = False); transformers' default
        # attention falls back to eager (modeling_utils.py get_correct_attn_implementation)
        return AttnKernel("eager", gqa, False)
    if masked:
        return AttnKernel("efficient", gqa, True)
    if dt.linear_out == 2 or trainer_autocast(setup):
        # Trainer/TRL forward runs under torch.autocast(bf16), whose lower-precision op list holds
        # scaled_dot_product_attention: fp32 q/k/v (a kbit-prepared QLoRA base) reach the kernel
        # as bf16, so flash runs (traced: t4-mis7b-hf-qlora-ckpt-b4s1024, a bf16 b x s x hidden
        # output per layer, no s x s probabilities)
        return AttnKernel("flash", False, False)
    return AttnKernel("math" if gqa else "efficient", gqa, False)
