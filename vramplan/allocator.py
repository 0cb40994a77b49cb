"""Peak reserved memory and device totals from the PyTorch CUDA caching allocator's behaviour.

The caching allocator (c10/cuda/CUDACachingAllocator.cpp; its size constants live in
c10/core/AllocatorConfig.h since torch 2.9) never hands freed memory back to CUDA on its own:
- every request is rounded up to a multiple of 512 B (`round_size`, kMinBlockSize);
- requests of at most 1 MiB come from the small pool, carved out of 2 MiB segments; larger ones
  from the large pool, out of 20 MiB segments when under 10 MiB, else from a segment of their own
  rounded up to 2 MiB (`get_allocation_size`: kSmallSize, kSmallBuffer, kLargeBuffer,
  kMinLargeAlloc, kRoundLarge);
- a free block serves any request no larger than itself (best fit, `get_free_block`) and is split,
  but segments are never merged with each other, so a freed block can never serve a larger
  request; it stays reserved (cached) until `empty_cache()`;
- `expandable_segments:True` maps pages into one growing segment per stream instead, so a larger
  request extends the segment and the stranded blocks below are mostly gone.

So peak reserved is the peak allocated plus what is cached but cannot be reused. Over a training
step the dynamic tensors come in three size classes that reuse each other's blocks only from large
to small: vocabulary-sized buffers (logits, their fp32 copy, log-softmax output and gradients,
b x s x V), activation tensors (b x s x hidden/intermediate), and parameter-shaped tensors
(gradients, optimizer-step temporaries). From the second step on, the first step's optimizer
states sit in blocks the logits once used, so the vocabulary buffers of every later step need
segments of their own, and parameter-shaped tensors can only reuse freed activation blocks:
    reserved = persistent + vocab peak + max(activation peak, parameter-shaped peak)
This is a lifetime argument on sizes the estimator knows, not a ratio; the records that pin it are
named in tests/test_allocator.py and data/reserved_baseline.json.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vramplan.optimizers import OPTIMIZERS
from vramplan.units import MiB

if TYPE_CHECKING:
    from vramplan.catalog import GPU
    from vramplan.estimator import Estimate
    from vramplan.layout import Layout

# c10/core/AllocatorConfig.h (torch 2.11; before 2.9 in c10/cuda/CUDACachingAllocator.cpp)
MIN_BLOCK_BYTES = 512  # kMinBlockSize: every request is rounded up to a multiple of this
SMALL_SIZE_BYTES = 1 * MiB  # kSmallSize: the largest "small" request
SMALL_BUFFER_BYTES = 2 * MiB  # kSmallBuffer: small requests are packed in 2 MiB segments
LARGE_BUFFER_BYTES = 20 * MiB  # kLargeBuffer: requests between 1 and 10 MiB share 20 MiB segments
MIN_LARGE_ALLOC_BYTES = 10 * MiB  # kMinLargeAlloc: from here a request gets its own segment
ROUND_LARGE_BYTES = 2 * MiB  # kRoundLarge: own segments are rounded up to 2 MiB


def round_request_bytes(*, size_bytes: int) -> int:
    """CUDACachingAllocator.cpp `round_size`: at least 512 B, a multiple of 512 B."""
    return max(MIN_BLOCK_BYTES, -(-size_bytes // MIN_BLOCK_BYTES) * MIN_BLOCK_BYTES)


def segment_bytes(*, size_bytes: int) -> int:
    """CUDACachingAllocator.cpp `get_allocation_size`: the cudaMalloc made for a request that no
    cached block can serve."""
    if size_bytes <= SMALL_SIZE_BYTES:
        return SMALL_BUFFER_BYTES
    if size_bytes < MIN_LARGE_ALLOC_BYTES:
        return LARGE_BUFFER_BYTES
    return -(-size_bytes // ROUND_LARGE_BYTES) * ROUND_LARGE_BYTES


def packed_segment_bytes(*, tensor_bytes: Iterable[int]) -> int:
    """Segments reserved for long-lived tensors allocated one after another into an empty pool:
    small ones packed into 2 MiB segments, 1-10 MiB ones into 20 MiB segments (first fit in
    allocation order), larger ones in segments of their own rounded to 2 MiB."""
    small = 0
    large = 0
    free_in_segments: list[int] = []  # room left in each 20 MiB segment
    for size in tensor_bytes:
        r = round_request_bytes(size_bytes=size)
        if r <= SMALL_SIZE_BYTES:
            small += r
        elif r < MIN_LARGE_ALLOC_BYTES:
            for i, room in enumerate(free_in_segments):
                if room >= r:
                    free_in_segments[i] -= r
                    break
            else:
                free_in_segments.append(LARGE_BUFFER_BYTES - r)
        else:
            large += segment_bytes(size_bytes=r)
    small_segments = -(-small // SMALL_BUFFER_BYTES) * SMALL_BUFFER_BYTES
    return small_segments + large + LARGE_BUFFER_BYTES * len(free_in_segments)


def rounding_bytes(*, tensor_bytes: list[int], copies: int = 1) -> int:
    """Reserved minus allocated for `copies` sets of long-lived tensors of these sizes (weights,
    then one set per gradient/optimizer state of the same shapes)."""
    if copies <= 0 or not tensor_bytes:
        return 0
    return copies * (packed_segment_bytes(tensor_bytes=tensor_bytes) - sum(tensor_bytes))


@dataclass(frozen=True)
class StepPools:
    """The bytes of one training step grouped by lifetime and size class (see the module doc)."""

    persistent_bytes: int  # weights, optimizer states, workspaces, accumulated gradients
    vocab_peak_bytes: int  # the most vocabulary-sized buffers alive at once (logits and loss)
    activation_peak_bytes: int  # the most activation tensors alive at once
    param_shaped_peak_bytes: int  # gradients plus the optimizer step's parameter-shaped temporaries
    rounding_bytes: int = 0  # segment rounding of the long-lived tensors (packed_segment_bytes)
    split_vocab_bytes: int = 0  # a freed vocabulary-sized block split by smaller requests (see peak_reserved_bytes)


def layer_tensor_bytes(*, lay: Layout, bytes_per_param: float, linear_bytes_per_param: float | None = None) -> list[int]:
    """One decoder layer's parameter tensors' bytes in allocation order; `linear_bytes_per_param`
    for quantised Linear weights (0.5 for 4-bit)."""
    lin_b = bytes_per_param if linear_bytes_per_param is None else linear_bytes_per_param
    n_other = 2 + sum(lm.bias for lm in lay.linears)  # two norms and the biases of a layer
    other = int(bytes_per_param * (lay.layer_dense_other - lay.layer_expert_params)) // max(1, n_other)
    layer = [int(lin_b * lm.numel) for lm in lay.linears] + [other] * n_other
    if lay.layer_expert_params:
        layer.append(int(bytes_per_param * lay.layer_expert_params))
    return layer


def param_tensor_bytes(*, lay: Layout, bytes_per_param: float, linear_bytes_per_param: float | None = None) -> list[int]:
    """Every parameter tensor's bytes in allocation order (layer by layer, then embeddings/head);
    `linear_bytes_per_param` for quantised Linear weights (0.5 for 4-bit)."""
    layer = layer_tensor_bytes(lay=lay, bytes_per_param=bytes_per_param, linear_bytes_per_param=linear_bytes_per_param)
    tail = [int(bytes_per_param * n) for n in (lay.embed_params, lay.lm_head_params, lay.final_norm_params) if n]
    return layer * lay.layers + tail


def same_shape_state_copies(*, optimizer: str) -> int:
    """Optimizer states kept as full parameter-shaped tensors in the parameter's dtype (torch
    optimizers: AdamW's exp_avg/exp_avg_sq); 8-bit and factored states have other sizes."""
    spec = OPTIMIZERS[optimizer]
    return spec.states if spec.state_bytes is None and not spec.paged else 0


# Keyed by the layout's identity (as vramplan.layout caches layouts): packing every parameter
# tensor costs ~1,000 steps for a 405B model, which would dominate an estimate.
_ROUNDING_CACHE: dict[tuple[int, float, float | None], tuple[Layout, int]] = {}


def param_rounding_bytes(*, lay: Layout, bytes_per_param: float, linear_bytes_per_param: float | None = None) -> int:
    """rounding_bytes of one copy of the parameter tensors, computed once per layout and dtype."""
    key = (id(lay), bytes_per_param, linear_bytes_per_param)
    hit = _ROUNDING_CACHE.get(key)
    if hit is not None and hit[0] is lay:
        return hit[1]
    val = rounding_bytes(tensor_bytes=param_tensor_bytes(lay=lay, bytes_per_param=bytes_per_param,
                                                         linear_bytes_per_param=linear_bytes_per_param))
    _ROUNDING_CACHE[key] = (lay, val)
    return val


def step_pools(*, lay: Layout, weight_bytes_per_param: float, linear_bytes_per_param: float | None,
               trainable_copies: int, trainable_bytes_per_param: float, persistent_bytes: int, vocab_peak_bytes: int,
               activation_peak_bytes: int, param_shaped_peak_bytes: int, split_vocab_bytes: int = 0) -> StepPools:
    """StepPools with the segment rounding of the weights and of `trainable_copies` parameter-shaped
    copies (gradients, optimizer states) of a fully trained model."""
    rounding = param_rounding_bytes(lay=lay, bytes_per_param=weight_bytes_per_param,
                                    linear_bytes_per_param=linear_bytes_per_param)
    if trainable_copies and trainable_bytes_per_param:
        rounding += trainable_copies * param_rounding_bytes(lay=lay, bytes_per_param=trainable_bytes_per_param)
    return StepPools(persistent_bytes=persistent_bytes, vocab_peak_bytes=vocab_peak_bytes,
                     activation_peak_bytes=activation_peak_bytes, param_shaped_peak_bytes=param_shaped_peak_bytes,
                     rounding_bytes=rounding, split_vocab_bytes=split_vocab_bytes)


def peak_reserved_bytes(*, peak_allocated_bytes: int, pools: StepPools, expandable_segments: bool = False) -> int:
    """Peak reserved (torch.cuda.max_memory_reserved) of a training loop, never below the peak
    allocated. With expandable segments the class stranding goes and only rounding stays."""
    slack = pools.rounding_bytes
    if expandable_segments:
        return peak_allocated_bytes + slack
    # Without checkpointing the backward's activation gradients are carved out of the block the
    # fp32 logits copy (4 B x tokens x vocab) left, so the next step's copy needs a segment of its
    # own: l1b-full-sgd-b2s1024 strands 1034 MiB = 1002 MiB (its 4TV) + 32 MiB, and the LoRA, prefix
    # and 8-bit runs of data/measurements strand one such block each. Parameter-shaped tensors
    # that do not fit in freed activation blocks strand the same way (l1b-full-adamw-b2s1024).
    dynamic = max(pools.activation_peak_bytes + pools.split_vocab_bytes, pools.param_shaped_peak_bytes)
    stranded = pools.persistent_bytes + pools.vocab_peak_bytes + dynamic
    return max(peak_allocated_bytes, stranded) + slack


# --------------------------------------------------------------------------------------------
# Side-stream pools and first-step flat tensors (DeepSpeed ZeRO)
# --------------------------------------------------------------------------------------------
def side_stream_pool_bytes(*, tensor_bytes: Iterable[int]) -> int:
    """Segments of tensors allocated while another CUDA stream is current. The caching allocator
    keeps free blocks per stream: `get_free_block` looks them up by (stream, size)
    (CUDACachingAllocator.cpp BlockComparatorSize orders by stream first), so a block first
    allocated on a side stream is only ever reused by requests made on that stream. Its segment
    is reserved beside the default stream's pool, whatever that pool holds at its peak."""
    return packed_segment_bytes(tensor_bytes=tensor_bytes)


def first_step_flat_bytes(*, flat_bytes: int, states: int, vocab_block_bytes: int, vocab_blocks: int,
                          activation_block_bytes: int) -> int:
    """Reserved beyond the steady peak plus the micro-batch's own slack when an optimizer keeps its
    states as a few flat tensors of `flat_bytes` each (DeepSpeed ZeRO: one fp32 partition per
    parameter group or sub-group) created in the first step's optimizer step, beside an fp32
    gradient partition of the same size, after the first backward freed its blocks:
    - one that fits a freed activation block (at most `activation_block_bytes`) is carved from it:
      nothing beyond the single-GPU rules;
    - one that fits only a freed vocabulary-sized block (the fp32 logits copy and its gradients,
      `vocab_block_bytes`) is carved from it by best fit; each of the `states` then strands the
      whole block, so every later step's vocabulary buffers take fresh segments: the states cost
      `vocab_block_bytes` each instead of their size (d2-z2-l1b-full-ckpt-b4s2048: reserved grows
      from step 1 to step 2 by 8016 MiB = 2 x 4008 MiB, its 4 B x tokens x vocab);
    - one larger than every freed block gets a segment of its own, and the first step's
      high-water mark is the backward's segments plus states plus the fp32 gradient partition,
      whose segment later steps' smaller buffers reuse: one `flat_bytes` beyond the steady peak
      (d2-z1-l1b-full-b4s1024: 2357 MiB partitions against 2004 MiB logits blocks; reserved
      reaches its final 26984 MiB in step 1, at 17617 MiB allocated).
    The fp32 gradient partition comes first and takes one of the `vocab_blocks` free ones; states
    beyond the rest go elsewhere (first_step_states_past_vocab_blocks)."""
    if flat_bytes <= activation_block_bytes:
        return 0
    if flat_bytes <= vocab_block_bytes:
        return (states - first_step_states_past_vocab_blocks(states=states, vocab_blocks=vocab_blocks)) \
            * (vocab_block_bytes - flat_bytes)
    return segment_bytes(size_bytes=flat_bytes)


def first_step_states_past_vocab_blocks(*, states: int, vocab_blocks: int) -> int:
    """How many of the first step's `states` flat tensors find no free vocabulary-sized block: the
    fp32 gradient partition, made before them, takes the first of the `vocab_blocks`."""
    return states - min(states, max(0, vocab_blocks - 1))


# --------------------------------------------------------------------------------------------
# Outside the allocator
# --------------------------------------------------------------------------------------------
# CUDA context, kernel images and library handles: device used minus peak reserved, 767 MiB in
# every sequential single-GPU run of data/measurements (H100 80GB HBM3, driver 580.159, torch
# 2.11+cu130; e.g. ref-q05-full-bf16-b4s512: 11832983552 - 11028922368 B). Per card generation
# in data/gpu_specs.yaml (`cuda_context`); this is the default for a card without a figure.
DEFAULT_CUDA_CONTEXT_BYTES = 767 * MiB

# NCCL's own kernels, communicator and proxy state once the process group exists, even on one
# rank: device used minus peak reserved minus the 767 MiB context in the world-size-1 runs of
# data/measurements/h100_2026-11-24_dist.jsonl (l3b-fsdp-full-ckpt-b4s2048: 1331 - 767 = 564 MiB;
# the DeepSpeed ones 566-646 MiB, which load DeepSpeed's extensions too).
NCCL_INIT_BYTES = 646 * MiB
# Once ranks talk, NCCL allocates each communicator's channel buffers (NCCL_BUFFSIZE per protocol
# and connection, through cuMem, outside PyTorch's allocator; NCCL user guide, "Environment
# Variables"). A ring gives every rank one send and one receive connection per channel whatever
# the world size, so this is taken per communicator, not per peer. Measured as device used minus
# peak reserved minus context minus NCCL_INIT_BYTES on 2 x H100 SXM over NVLink, world size 2
# (data/measurements/h100x2_2026-11-25_dist.jsonl, every rank of every run):
# - torch's one process group (DDP, FSDP2): 1615-1621 MiB outside the allocator -> 204 MiB;
# - DeepSpeed ZeRO-3, whose partitioned-parameter coordinator adds its own group: 1817-1859 -> 404;
# - DeepSpeed ZeRO-1/2 (reduce-scatter and all-gather groups beside the data-parallel one):
#   2107-2147 -> 694 MiB.
# Not measured: other interconnects (PCIe rings open fewer channels) and more than one node.
NCCL_COMMUNICATOR_BYTES = {"torch": 204 * MiB, "zero3": 404 * MiB, "zero12": 694 * MiB}


def nccl_bytes(*, world_size: int, engine: str = "torch") -> int:
    """Per-rank NCCL memory outside the PyTorch allocator once a process group is in use:
    `engine` is "torch" (DDP, FSDP), "zero12" or "zero3" (DeepSpeed's extra groups)."""
    if world_size <= 1:
        return NCCL_INIT_BYTES
    return NCCL_INIT_BYTES + NCCL_COMMUNICATOR_BYTES[engine]


def device_total_bytes(*, peak_reserved_bytes: int, outside_allocator: dict[str, int],
                       context_bytes: int | None = None) -> int:
    """What nvidia-smi shows at the peak: reserved + everything outside the allocator. With
    `context_bytes` (a card's `GPU.cuda_context_bytes`) the estimate's own `cuda_context` line is
    replaced by the card's."""
    outside = dict(outside_allocator)
    if context_bytes is not None:
        outside["cuda_context"] = context_bytes
    return peak_reserved_bytes + sum(outside.values())


# torch's default cuBLAS workspace per handle on compute capability 9.x (aten/src/ATen/cuda/
# CublasHandlePool.cpp parseChosenWorkspaceSize), the card the estimate's workspace line was measured on
HOPPER_CUBLAS_WORKSPACE_BYTES = 32 * MiB
# a training step holds two cuBLAS workspaces: the forward thread's and the autograd thread's
# (the estimate's 65 MiB line: 2 x 32 MiB on Hopper, estimator.CUBLAS_WORKSPACE_BYTES)
CUBLAS_HANDLES = 2


def device_total_on(estimate: Estimate, gpu: GPU) -> int:
    """Device total of `estimate` on card `gpu`: the estimate's reserved and outside-allocator lines
    with the card generation's CUDA context and cuBLAS workspaces (data/gpu_specs.yaml `cuda_context`)."""
    workspaces = CUBLAS_HANDLES * (gpu.cublas_workspace_bytes - HOPPER_CUBLAS_WORKSPACE_BYTES)
    context = gpu.cuda_context_bytes - estimate.outside_allocator.get("cuda_context", gpu.cuda_context_bytes)
    # from the estimate's own device total, so a per-GPU total put in its place (fit_parallel) holds
    return estimate.device_total_bytes + workspaces + context
