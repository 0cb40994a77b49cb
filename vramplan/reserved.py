"""Peak reserved memory of one training step from its tensors (vramplan.allocator's pools), and
the blocks that strand beside the last layer's backward only: each term names the allocator
behaviour behind it (best fit: a freed block serves only requests no larger than itself; a
block stays with the stream that allocated it) and the records that show it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vramplan.allocator import StepPools, peak_reserved_bytes, same_shape_state_copies, step_pools
from vramplan.arch import ArchConfig
from vramplan.heads import fused_loss_head
from vramplan.layout import Layout
from vramplan.optimizers import OPTIMIZERS
from vramplan.setup import Setup
from vramplan.streams import Dtypes, micro_batch_tokens

if TYPE_CHECKING:
    from vramplan.estimator import ActivationTerms, ModelStates


def layer_moment_stranded_bytes(arch: ArchConfig, lay: Layout, setup: Setup, st: ModelStates, a: ActivationTerms,
                                dt: Dtypes, kernel: str) -> int:
    """Cached blocks beside the last layer's backward that the step's general pools do not count."""
    merged = merged_weight_stranded_bytes(arch, lay, setup, st)
    # W'-sized requests cannot use the vocabulary blocks the loss freed either: those stay cached beside them
    vocab = _vocab_peak_bytes(a) if merged and freed_vocab_block(arch, setup) else 0
    return merged + vocab + sink_scores_stranded_bytes(arch, setup, dt, kernel) + fused_gate_up_stranded_bytes(arch, lay, setup, dt)


def _vocab_peak_bytes(a: ActivationTerms) -> int:
    """The most vocabulary-sized buffers alive at once: the logits and the loss's."""
    return a.head.saved + max(a.head.logits + a.head.fwd_transient, a.hold + a.head.bwd_transient)


def step_pools_of(arch: ArchConfig, lay: Layout, setup: Setup, st: ModelStates, a: ActivationTerms, *, emb_grad: int,
                  oversize: int) -> StepPools:
    """The step's tensors grouped by lifetime and size class (vramplan.allocator.StepPools), all
    on the default stream; `oversize` is oversize_step_transient_bytes, which takes segments of
    its own and so leaves the parameter-shaped pool."""
    tr, head, opt = st.trainable, a.head, st.opt
    return step_pools(
        lay=lay, weight_bytes_per_param=st.dense_bytes, linear_bytes_per_param=0.5 if setup.quantised else None,
        trainable_copies=(1 + same_shape_state_copies(optimizer=setup.optimizer)) if tr.base_trainable else 0,
        trainable_bytes_per_param=tr.bytes_per_param, persistent_bytes=st.steady + st.accum + a.retained,
        vocab_peak_bytes=_vocab_peak_bytes(a),
        activation_peak_bytes=a.total - head.saved - a.retained + (a.last.saved + a.last.transient if setup.grad_checkpointing else 0),
        param_shaped_peak_bytes=st.grads + max(0 if oversize else opt.step_transient, emb_grad),
        split_vocab_bytes=split_vocab_bytes(arch, setup, a))


def reserved_bytes(*, peak: int, pools: StepPools, oversize: int) -> int:
    """Peak reserved: the peak allocated plus the caching allocator's rounding and stranding
    (vramplan.allocator), from the step's pools (step_pools_of) and the oversize step transient's
    own segments (oversize_step_transient_bytes)."""
    return oversize + peak_reserved_bytes(peak_allocated_bytes=peak - oversize, pools=pools)


def dynamic_pool_bytes(pools: StepPools) -> int:
    """The default stream's blocks beyond the persistent tensors and the parameter-shaped pool
    (gradients, step transients): the vocabulary-sized buffers, the activations, the split
    vocabulary block and the segment rounding -- what that stream keeps cached at a moment before
    the step's gradients exist (the loss), whichever of them is alive."""
    return pools.vocab_peak_bytes + pools.activation_peak_bytes + pools.split_vocab_bytes + pools.rounding_bytes


def oversize_step_transient_bytes(arch: ArchConfig, setup: Setup, st: ModelStates) -> int:
    """transformers' Adafactor steps one tensor at a time over fp32 copies of it (the gradient and
    the weight upcast, the squared gradient, the factored update: optimization.py Adafactor.step),
    three of them alive at once (vramplan.optimizers). For the largest tensor such a copy, four bytes
    a parameter, is larger than any activation block, so only a freed vocabulary block (the loss's
    fp32 tensors, 4 B x tokens x vocab) can serve it -- and only where one still has room beside
    the gradients backward carved from it: the embedding's 16-bit gradient, too large for any
    activation block itself, lands in one. When a copy is more than half such a block, each takes
    a segment of its own beside every pool of the step. Measured: t5-l1b-full-adafactor-b2s1024
    allocates three new 1002 MiB segments in its first optimizer step (copies of the 1002 MiB
    embedding against 1002 MiB vocabulary blocks, two of them holding gradients);
    h4-smol17-hf-full-adafactor-b4s1024's 384 MiB copies fit its 768 MiB blocks and add none."""
    if not OPTIMIZERS[setup.optimizer].factored or setup.method == "galore" or st.trainable.bytes_per_param != 2:
        return 0
    copy = 4 * st.trainable.largest
    # no activation is wider than the MLP's intermediate, nor more than four bytes an element
    widest_activation = 4 * max(arch.intermediate, arch.hidden) * micro_batch_tokens(setup)
    if copy <= widest_activation or 2 * copy <= freed_vocab_block(arch, setup):
        return 0
    return st.opt.step_transient


def split_vocab_bytes(arch: ArchConfig, setup: Setup, a: ActivationTerms) -> int:
    """The vocabulary-sized block that smaller requests split once freed, so that the next step's
    copy needs a segment of its own. Without checkpointing the backward's activation gradients
    are carved out of the fp32 logits copy's block (4 B x tokens x vocab: l1b-full-sgd-b2s1024
    strands 1034 MiB, its 4TV + 32 MiB). With checkpointing the recompute's tensors are carved out
    of the smallest freed vocabulary block that fits (the allocator's best fit), the 16-bit logits'
    -- when the loop has let them go: a loop that holds the model output (hold_outputs) keeps that
    block alive through backward (Trainer/TRL runs: h3-g3-1b-hf-lora-ckpt-b4s2048 reserves 4.78 GiB
    over its peak, its 2TV of 4 GiB plus rounding; the plain-loop records, which hold, do not)."""
    if not setup.grad_checkpointing:
        return 4 * arch.vocab * micro_batch_tokens(setup)
    return 0 if setup.hold_outputs else a.head.logits


def merged_weight_stranded_bytes(arch: ArchConfig, lay: Layout, setup: Setup, st: ModelStates) -> int:
    """LoRA on both fused expert parameters (peft ParamWrapper): backward allocates down's W'
    gradient beside W' (its own segment), frees both, then allocates gate_up's W' gradient, twice
    down's size; the two freed down-sized segments cannot merge to serve it, so they stay cached
    beside the peak unless a freed vocabulary block (the fp32 logits, 4 x tokens x vocab) is large
    enough to take it. Measured: m2-dsv3-hf-lora-all-b1s2048 reserves 19.4 GiB over its peak, 2 x 7.5
    GiB of them the down W' pair; Qwen3-30B-A3B's 768 MiB gate_up gradient fits its 1.2 GiB logits
    block and strands nothing (m2-q3moe-hf-lora-all-b1s2048)."""
    targets = setup.lora_targets
    if "experts.down_proj" not in targets or "experts.gate_up_proj" not in targets or setup.method not in ("lora", "qlora"):
        return 0
    sizes = [{pt.module: pt.experts * pt.d_in * pt.d_out * st.dense_bytes for pt in g.param_targets} for g in lay.groups]
    pairs = [(d["experts.gate_up_proj"], d["experts.down_proj"]) for d in sizes
             if "experts.gate_up_proj" in d and "experts.down_proj" in d]
    if not pairs:
        return 0
    gate_up, down = max(pairs)
    return 2 * down if gate_up > freed_vocab_block(arch, setup) else 0


def freed_vocab_block(arch: ArchConfig, setup: Setup) -> int:
    """The largest block the loss frees before the layers' backward: transformers' head leaves
    the fp32 logits' (heads.hf_loss_head: 4 B x tokens x vocab); fused heads build no logits."""
    return 0 if fused_loss_head(setup) else 4 * arch.vocab * micro_batch_tokens(setup)


def fused_gate_up_stranded_bytes(arch: ArchConfig, lay: Layout, setup: Setup, dt: Dtypes) -> int:
    """Routed experts split one fused gate_up output into gate and up (`.chunk(2)`; gpt-oss
    strided slices); backward builds that output's gradient anew from the two halves' gradients,
    a block twice their size that none of their freed blocks can serve, so it takes a segment of
    its own unless a freed logits block is large enough -- or, under checkpointing, the block of
    the gate_up output itself, which the checkpointed forward freed in every layer and which has
    the gradient's size. Measured: m2-l4mav-hf-lora-b1s1024 reserves 4.56 GiB over its peak, its
    128 experts' 4 GiB gate_up gradient; Qwen3-MoE's 96 MiB one fits the logits block
    (m2-q3moe-hf-lora-all-b1s2048 +0.8%); the checkpointed runs strand nothing more (m2-l4mav-hf-lora-ckpt)."""
    if setup.grad_checkpointing or not any(g.moe for g in lay.groups):
        return 0
    grad = arch.expert_rows * 2 * arch.expert_intermediate * micro_batch_tokens(setup) * dt.linear_out
    return grad if grad > freed_vocab_block(arch, setup) else 0


def sink_scores_stranded_bytes(arch: ArchConfig, setup: Setup, dt: Dtypes, kernel: str) -> int:
    """gpt-oss eager attention (modeling_gpt_oss.py eager_attention_forward): the scaled scores and
    the masked scores are two b x h x s x s blocks; the sinks make every later score-sized tensor
    (the concatenation, the shifted logits, the probabilities and their gradients) one column
    wider, so those two blocks stay cached beside the backward. A loss that builds the logits
    (transformers' head) frees vocabulary blocks the wider tensors are carved from instead;
    TRL's and Liger's fused heads do not. Measured: m2-gptoss-trl-lora-b2s2048 and
    h4-gptoss-trl-qlora-b2s2048 reserve 1.5 and 2.2 GiB more than the rest of the model explains,
    with 1 GiB score blocks; the Trainer runs (m1-gptoss-*) do not."""
    if not arch.attn_sinks or kernel != "eager" or not fused_loss_head(setup):
        return 0
    return 2 * setup.batch_size * arch.heads * setup.seq_len * setup.seq_len * dt.linear_out
