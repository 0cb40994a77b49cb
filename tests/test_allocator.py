"""Peak reserved and device totals: the caching allocator's rules, and every measured record
re-estimated within its signed band (data/reserved_baseline.json)."""

from __future__ import annotations

import json
import sys
from functools import cache
from pathlib import Path

import pytest

from vramplan.allocator import (
    LARGE_BUFFER_BYTES,
    NCCL_INIT_BYTES,
    SMALL_BUFFER_BYTES,
    StepPools,
    device_total_on,
    first_step_flat_bytes,
    first_step_states_past_vocab_blocks,
    nccl_bytes,
    packed_segment_bytes,
    peak_reserved_bytes,
    round_request_bytes,
    segment_bytes,
    side_stream_pool_bytes,
)
from vramplan.catalog import gpu_catalog, resolve_gpu
from vramplan.estimator import estimate
from vramplan.units import MiB

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import update_reserved_baseline as baseline  # noqa: E402

BASELINE = json.loads((ROOT / "data" / "reserved_baseline.json").read_text())["records"]
# Device totals still under-estimated by more than 5%, and why: int8 with checkpointing strands
# more than one layer's forward blocks (bitsandbytes dequantises each weight into a
# parameter-shaped temporary that activation blocks cannot hold); Adafactor's factored step
# allocates row/column temporaries of many sizes; FSDP parameter offload copies flat parameters
# host<->device through blocks the model does not describe; the rest are named below.


@cache
def _now() -> dict:
    return baseline.current()


KNOWN_UNDER = {
    # plain loop, Gemma 2 with checkpointing: in the second step the checkpointed layer inputs are
    # carved from the freed vocabulary blocks and one more fp32 vocabulary block is allocated in
    # backward (traced: t7-g9b-lora-ckpt-b1s2048, reserved grows 2000 MiB in step 2)
    "g9b-lora-ckpt-b1s2048", "t7-g9b-lora-ckpt-b1s2048",
    # single-GPU FSDP1 with parameter offload (plain loop)
    "l3b-fsdp-offparams-full-ckpt-b4s2048",
    # eager attention under checkpointing: the s x s score blocks come in two sizes (16-bit scores,
    # fp32 softmax) that cannot serve each other, and recompute and the next step strand more of
    # them: 2 x 512 + 6 x 1024 MiB of score-sized segments against a 4.4 GiB activation peak
    # (traced: t7-l1b-full-eager-ckpt-b2s2048)
    "l1b-full-eager-ckpt-b2s2048", "t7-l1b-full-eager-ckpt-b2s2048",
    # ZeRO-3 LoRA: the gathered frozen parameters live in the all-gather stream's pool
    # (partitioned_param_coordinator.py allocates them under __allgather_stream); how
    # its vocabulary-sized embedding/lm_head blocks fragment there is not modelled
    "d2-z3-q7b-lora-ckpt-b2s2048@r0", "d2-z3-q7b-lora-ckpt-b2s2048@r1"}


def test_request_rounding_follows_round_size():
    assert round_request_bytes(size_bytes=1) == 512
    assert round_request_bytes(size_bytes=513) == 1024


def test_segment_sizes_follow_get_allocation_size():
    assert segment_bytes(size_bytes=4096) == SMALL_BUFFER_BYTES  # small pool: 2 MiB segments
    assert segment_bytes(size_bytes=1 * MiB + 512) == LARGE_BUFFER_BYTES  # 1-10 MiB: 20 MiB segments
    assert segment_bytes(size_bytes=10 * MiB) == 10 * MiB  # own segment, 2 MiB multiple
    assert segment_bytes(size_bytes=11 * MiB) == 12 * MiB


def test_mid_sized_tensors_share_20_mib_segments():
    assert packed_segment_bytes(tensor_bytes=[8 * MiB, 8 * MiB, 2 * MiB, 2 * MiB]) == 20 * MiB
    assert packed_segment_bytes(tensor_bytes=[8 * MiB] * 3) == 40 * MiB
    assert packed_segment_bytes(tensor_bytes=[4096] * 3) == 2 * MiB


def test_reserved_never_below_allocated():
    pools = StepPools(persistent_bytes=0, vocab_peak_bytes=0, activation_peak_bytes=0, param_shaped_peak_bytes=0)
    assert peak_reserved_bytes(peak_allocated_bytes=10 * MiB, pools=pools) == 10 * MiB
    for kw in ({}, {"method": "lora"}, {"grad_checkpointing": True}):
        e = estimate("llama-3.2-1b", batch_size=2, seq_len=1024, **kw)
        assert e.peak_reserved_bytes >= e.peak_allocated_bytes


def test_gradients_that_cannot_reuse_activation_blocks_strand_beside_the_logits():
    pools = StepPools(persistent_bytes=100, vocab_peak_bytes=50, activation_peak_bytes=5, param_shaped_peak_bytes=40)
    assert peak_reserved_bytes(peak_allocated_bytes=150, pools=pools) == 190
    assert peak_reserved_bytes(peak_allocated_bytes=150, pools=pools, expandable_segments=True) == 150


def test_checkpointed_full_finetune_reserves_beyond_its_peak():
    # ref-l1b-full-bf16-ckpt-b2s1024 measured 16129196032 B reserved for 12956899328 B allocated
    e = estimate("llama-3.2-1b", "full", batch_size=2, seq_len=1024, grad_checkpointing=True)
    assert e.peak_reserved_bytes > 1.2 * e.peak_allocated_bytes


def test_side_stream_pool_is_its_own_segments():
    assert side_stream_pool_bytes(tensor_bytes=[1179 * MiB + 1]) == 1180 * MiB
    assert side_stream_pool_bytes(tensor_bytes=[]) == 0


def test_first_step_flat_states_strand_whole_vocab_blocks_or_add_a_segment():
    kw = {"states": 2, "vocab_block_bytes": 4008 * MiB, "vocab_blocks": 3, "activation_block_bytes": 128 * MiB}
    assert first_step_flat_bytes(flat_bytes=64 * MiB, **kw) == 0  # carved from an activation block
    assert first_step_flat_bytes(flat_bytes=2357 * MiB, **kw) == 2 * (4008 - 2357) * MiB
    assert first_step_flat_bytes(flat_bytes=6000 * MiB, **kw) == 6000 * MiB


def test_first_step_gradient_partition_takes_a_vocab_block_before_the_states():
    kw = {"flat_bytes": 954 * MiB, "states": 2, "vocab_block_bytes": 1024 * MiB, "activation_block_bytes": 14 * MiB}
    # two free loss blocks: the gradient partition takes one, one state strands the other
    assert first_step_flat_bytes(vocab_blocks=2, **kw) == (1024 - 954) * MiB
    assert first_step_flat_bytes(vocab_blocks=3, **kw) == 2 * (1024 - 954) * MiB
    assert first_step_states_past_vocab_blocks(states=2, vocab_blocks=2) == 1
    assert first_step_states_past_vocab_blocks(states=2, vocab_blocks=0) == 2


def test_zero12_reduction_stream_pool_needs_overlap_comm():
    from vramplan.distributed import zero_overlap_comm

    assert zero_overlap_comm(stage=2, trainer="hf")
    assert not zero_overlap_comm(stage=2, trainer="plain")  # DeepSpeed's default: stage 3 only
    assert zero_overlap_comm(stage=3, trainer="plain")


def test_nccl_is_outside_the_allocator_and_grows_with_peers():
    assert nccl_bytes(world_size=1) == NCCL_INIT_BYTES
    assert nccl_bytes(world_size=8) > nccl_bytes(world_size=1)


def test_every_gpu_has_a_sourced_cuda_context():
    for g in gpu_catalog().values():
        assert 256 * MiB <= g.cuda_context_bytes <= 2048 * MiB, g.name
    assert resolve_gpu("h100").cuda_context_bytes == 767 * MiB


def test_device_total_uses_the_cards_context():
    e = estimate("llama-3.2-1b", "lora", batch_size=1, seq_len=512)
    g = resolve_gpu("h100")
    assert device_total_on(e, g) == e.peak_reserved_bytes + e.outside_allocator_bytes


def test_baseline_and_records_match_one_to_one():
    assert set(BASELINE) == set(_now())


@pytest.mark.parametrize("key", sorted(BASELINE))
def test_record_within_its_band(key):
    now = _now()[key]
    for kind in ("reserved", "device"):
        if f"{kind}_band" in BASELINE[key]:
            lo, hi = BASELINE[key][f"{kind}_band"]
            assert lo <= now[f"{kind}_error"] <= hi, (key, kind, now[f"{kind}_error"], (lo, hi))


def test_bands_keep_their_sign():
    for key, entry in BASELINE.items():
        for kind in ("reserved", "device"):
            if f"{kind}_band" in entry:
                lo, hi = entry[f"{kind}_band"]
                err = entry[f"{kind}_error"]
                assert (lo >= -baseline.SIGN_SLACK) if err >= 0 else (hi <= baseline.SIGN_SLACK), key


def test_device_total_under_by_at_most_5_percent_except_known():
    under = {k.rsplit("@", 1)[0] for k, e in BASELINE.items() if e.get("device_error", 0) < -0.05}
    assert under <= KNOWN_UNDER, under - KNOWN_UNDER


def test_checkpointed_run_that_drops_its_logits_strands_the_16bit_logits_block():
    from vramplan.catalog import resolve_model
    from vramplan.estimator import activation_terms
    from vramplan.layout import layout
    from vramplan.reserved import split_vocab_bytes
    from vramplan.setup import make_setup
    from vramplan.streams import stream_dtypes

    spec = resolve_model("llama-3.2-1b")
    dropped = make_setup(spec, method="lora", trainer="hf", grad_checkpointing=True, hold_outputs=False)
    held = make_setup(spec, method="lora", trainer="hf", grad_checkpointing=True, hold_outputs=True)
    nockpt = make_setup(spec, method="lora", trainer="hf", grad_checkpointing=False)
    a = activation_terms(spec.arch, layout(spec), dropped, stream_dtypes(dropped))
    tokens = dropped.batch_size * dropped.seq_len
    assert split_vocab_bytes(spec.arch, dropped, a) == a.head.logits == 2 * spec.arch.vocab * tokens
    assert split_vocab_bytes(spec.arch, held, a) == 0
    assert split_vocab_bytes(spec.arch, nockpt, a) == 4 * spec.arch.vocab * tokens


def test_a_cards_device_total_swaps_in_its_generations_cublas_workspaces():
    from vramplan.allocator import CUBLAS_HANDLES, HOPPER_CUBLAS_WORKSPACE_BYTES, device_total_on
    from vramplan.catalog import gpu_catalog
    from vramplan.estimator import estimate

    e, cards = estimate("llama-3.2-1b", "lora"), gpu_catalog()
    assert device_total_on(e, cards["H100-SXM-80GB"]) == e.device_total_bytes  # measured there
    # torch's ":4096:2:16:8" default below compute capability 9.x: 8320 KiB per handle
    assert device_total_on(e, cards["A100-40GB"]) == e.device_total_bytes - CUBLAS_HANDLES * (
        HOPPER_CUBLAS_WORKSPACE_BYTES - 8320 * 1024)
    assert device_total_on(e, cards["MI300X"]) > e.device_total_bytes  # ROCm gfx94x: 128 MiB


def test_adafactor_copies_too_large_for_a_vocabulary_block_take_segments_of_their_own():
    from vramplan.catalog import resolve_model
    from vramplan.estimator import model_states
    from vramplan.layout import layout
    from vramplan.reserved import oversize_step_transient_bytes
    from vramplan.setup import make_setup

    l1b = resolve_model("llama-3.2-1b")  # fp32 copy of the 128256 x 2048 embedding: 1002 MiB
    tight = make_setup(l1b, method="full", trainer="hf", optimizer="adafactor", batch_size=2, seq_len=1024)
    roomy = make_setup(l1b, method="full", trainer="hf", optimizer="adafactor", batch_size=8, seq_len=1024)
    st = model_states(l1b, layout(l1b), tight)
    assert oversize_step_transient_bytes(l1b.arch, tight, st) == st.opt.step_transient == 3 * 4 * st.trainable.largest
    # 4 B x 8192 tokens x vocab = 4 GiB blocks: two copies fit beside the embedding's gradient
    assert oversize_step_transient_bytes(l1b.arch, roomy, model_states(l1b, layout(l1b), roomy)) == 0
    adamw = make_setup(l1b, method="full", trainer="hf", optimizer="adamw", batch_size=2, seq_len=1024)
    assert oversize_step_transient_bytes(l1b.arch, adamw, model_states(l1b, layout(l1b), adamw)) == 0
