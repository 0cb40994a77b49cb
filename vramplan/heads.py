"""The LM head and loss, one function per implementation: what each saves for backward, what it
holds as output, and its forward and backward transients (bytes, whole micro-batch).

- `hf_loss_head`: transformers' own head — (batch, seq, vocab) logits, then
  loss_utils.ForCausalLMLoss upcasts them to fp32 and calls cross_entropy (plain loop and Trainer).
- `trl_fused_head`: TRL 1.x SFTTrainer's `add_fused_lm_head` (trl/trainer/utils.py) and
  `ChunkedLogProbFunction` (trl/kernels/chunked_logprob.py): only labelled positions are projected,
  in tiles of 4096 tokens x 32768 vocabulary entries; no logits exist.
- `liger_flce_head`: Liger's fused linear cross-entropy (liger_kernel/ops/
  fused_linear_cross_entropy.py), applied by Trainer's `use_liger_kernel`: gradients of the hidden
  states (and of lm_head, when it trains) are computed during forward and kept for backward.
"""

from __future__ import annotations

from dataclasses import dataclass

from vramplan.arch import ArchConfig
from vramplan.setup import Setup
from vramplan.streams import trainer_autocast

# trl/kernels/chunked_logprob.py TOKEN_CHUNK_SIZE and trl/trainer/utils.py _CHUNKED_LOGPROB_CHUNK_SIZE
TRL_TOKEN_TILE = 4096
TRL_VOCAB_TILE = 32768
# ChunkedLogProbFunction.forward: running_max, sum_exp, x_sum_exp, sq_sum_exp, z_sum,
# max_before_target, target_logit — seven fp32 per-token statistics
TRL_STATS = 7
# liger_kernel/ops/fused_linear_cross_entropy.py _CHUNK_MEM_CONST (0.8.5)
LIGER_CHUNK_MEM_CONST = 1


@dataclass(frozen=True)
class HeadActs:
    """Final norm, lm_head, logits and loss."""

    saved: int  # saved for backward at the end of forward (final norm + loss inputs)
    logits: int  # the lm_head output (held by the model output)
    fwd_transient: int  # extra at the loss computation
    bwd_transient: int  # extra at the start of backward (the head's own backward buffers)


def fused_loss_head(setup: Setup) -> bool:
    """TRL's chunked LM head or Liger's fused linear cross-entropy: no vocabulary-sized logits."""
    return setup.trainer == "trl" or setup.liger


def _final_norm_saved(arch: ArchConfig, setup: Setup, *, tokens: int, residual_bytes: int, base: bool,
                      liger: bool) -> int:
    """The final norm: RMSNorm's fp32 input copy and, when its weight trains, the normalised
    16-bit tensor; Liger's RMSNorm saves its input in its own dtype and one fp32 rstd per row
    (liger_kernel/ops/rms_norm.py)."""
    H = arch.hidden
    if arch.family == "gpt2":
        return residual_bytes * H * tokens
    if liger:
        return (residual_bytes * H + 4) * tokens
    return (4 + (2 if base else 0)) * H * tokens


def hf_loss_head(arch: ArchConfig, setup: Setup, *, tokens: int, residual_bytes: int, norm_out_bytes: int,
                 logits_bytes: int, autocast: bool, base: bool) -> HeadActs:
    V, H, T = arch.vocab, arch.hidden, tokens
    saved = _final_norm_saved(arch, setup, tokens=T, residual_bytes=residual_bytes, base=base, liger=False)
    if base:
        saved += (2 if autocast else norm_out_bytes) * H * T  # lm_head input (trainable lm_head)
    if trainer_autocast(setup) and not base and setup.quantised and setup.kbit_prepare:
        # prepare_model_for_kbit_training upcasts the frozen lm_head (bitsandbytes leaves it
        # unquantised) to fp32; under Trainer's autocast F.linear runs on a bf16 copy of it and
        # saves that copy for its input gradient (traced: t3-phi4mini-hf-qlora-ckpt-b4s1024,
        # 1172.25 MiB alive at the peak = 200064 x 3072 x 2 B, allocated in linear.py forward)
        saved += 2 * V * H
    logits = logits_bytes * V * T
    # loss_utils.ForCausalLMLoss: logits.float(), then cross_entropy = log_softmax (saves its fp32
    # output) + nll_loss.
    saved += 4 * V * T
    fwd_transient = 4 * V * T if logits_bytes != 4 else 0
    if arch.final_logit_softcap:
        saved += logits_bytes * V * T  # tanh output saved (Gemma2 final_logit_softcapping)
        fwd_transient += logits_bytes * V * T
    # Backward of log_softmax: the incoming fp32 gradient (nll_loss backward) and the outgoing one
    # exist together with the saved output (seen as +8 B/(token*vocab) at the backward peak).
    return HeadActs(saved=saved, logits=logits, fwd_transient=fwd_transient, bwd_transient=8 * V * T)


def trl_fused_head(arch: ArchConfig, setup: Setup, *, tokens: int, residual_bytes: int, compute_bytes: int,
                   base: bool, liger_norm: bool) -> HeadActs:
    """N = batch x (seq - 1) labelled positions (every position of a pre-tokenised row is
    labelled; the last has no next token). Saved: the compacted hidden states `hidden[mask]`
    (N x H), log_z and entropy (fp32), the int64 targets. Forward: one [4096, 32768] tile and the
    seven fp32 statistics. Backward: grad_hidden accumulated in fp32 (N x H), grad_weight in fp32
    (V x H) when lm_head trains, the tile, then both cast back to their dtypes at return."""
    V, H = arch.vocab, arch.hidden
    n = setup.batch_size * (tokens // setup.batch_size - 1)
    tile = min(n, TRL_TOKEN_TILE) * min(V, TRL_VOCAB_TILE) * compute_bytes
    saved = _final_norm_saved(arch, setup, tokens=tokens, residual_bytes=residual_bytes, base=base, liger=liger_norm)
    saved += compute_bytes * n * H + (4 + 4 + 8) * n + tokens  # compacted hidden, log_z, entropy, targets, mask
    fwd = tile + TRL_STATS * 4 * n
    bwd = tile + (4 + compute_bytes) * n * H
    if base:
        bwd += (4 + compute_bytes) * V * H  # fp32 grad_weight and its cast to the weight dtype
    return HeadActs(saved=saved, logits=0, fwd_transient=fwd, bwd_transient=bwd)


def liger_flce_head(arch: ArchConfig, setup: Setup, *, tokens: int, residual_bytes: int, compute_bytes: int,
                    base: bool) -> HeadActs:
    """Liger fused linear cross-entropy over the shifted BT = batch x (seq - 1) positions: the
    chunk size is next_power_of_2(ceil(BT / ceil(V / (H * chunk_mem_const)))); forward holds one
    chunk of logits (and its softmax) and computes grad_input (BT x H) and grad_weight (V x H, when
    lm_head trains) which stay alive until backward hands them on."""
    V, H = arch.vocab, arch.hidden
    bt = setup.batch_size * (tokens // setup.batch_size - 1)
    inc = -(-V // (LIGER_CHUNK_MEM_CONST * H))
    chunk = min(1 << max(0, (-(-bt // inc) - 1).bit_length()), bt)
    saved = _final_norm_saved(arch, setup, tokens=tokens, residual_bytes=residual_bytes, base=base, liger=True)
    saved += compute_bytes * bt * H  # the shifted hidden states made contiguous (LigerForCausalLMLoss)
    saved += compute_bytes * bt * H + (compute_bytes * V * H if base else 0)  # grad_input, grad_weight
    fwd = 2 * chunk * V * compute_bytes + 4 * bt
    return HeadActs(saved=saved, logits=0, fwd_transient=fwd, bwd_transient=compute_bytes * tokens * H)
