"""ZeRO / FSDP / offload: model states checked against DeepSpeed's own estimator formulas
(deepspeed/runtime/zero/stage_1_and_2.py estimate_zero2_model_states_mem_needs and stage3.py
estimate_zero3_model_states_mem_needs, without their additional_buffer_factor), and invariants."""

from __future__ import annotations

import pytest

from vramplan.catalog import resolve_model
from vramplan.distributed import (
    estimate_distributed,
    fsdp_all_gather_pool_bytes,
    make_parallel,
    zero12_norm_copy_bytes,
    zero12_step_gradients,
    zero_model_states,
)
from vramplan.errors import VramplanError
from vramplan.layout import layout
from vramplan.setup import make_setup

PSI = 7_000_000_000


def _ds_zero2_gpu(psi, n, offload):
    return 2 * psi if offload else 4 * psi + int(16 * psi / n)


def _ds_zero3_gpu_no_offload(psi, n, largest):
    return 4 * largest + int(18 * psi / n)


@pytest.mark.parametrize("n", [1, 2, 8, 64])
def test_zero_model_states_match_deepspeeds_formulas(n):
    # stage 2, no offload: DeepSpeed counts 16-bit params + 16-bit grads + (fp32 grads + 12) / N;
    # vramplan's states between steps are params + grads/N + 12/N, and at the step the 16-bit
    # partition becomes the fp32 one: params + (4 + 12)/N — DeepSpeed's figure less 2*psi of grads
    ms = zero_model_states(trainable_params=PSI, frozen_bytes=0, world=n, stage=2, offload="none")
    assert ms["weights"] + 4 * PSI // n + ms["optimizer_states"] + 2 * PSI == pytest.approx(_ds_zero2_gpu(PSI, n, False), rel=1e-9)
    # stage 2 with optimizer offload: only the 16-bit parameters stay on the GPU
    off = zero_model_states(trainable_params=PSI, frozen_bytes=0, world=n, stage=2, offload="optimizer")
    assert off["weights"] == _ds_zero2_gpu(PSI, n, True) and off["optimizer_states"] == 0
    # stage 3, no offload: 2 + 12 + 4 (fp32 grads at the step) = DeepSpeed's 18 bytes per param / N
    ms3 = zero_model_states(trainable_params=PSI, frozen_bytes=0, world=n, stage=3, offload="none")
    assert ms3["weights"] + ms3["optimizer_states"] + 4 * PSI // n == pytest.approx(18 * PSI / n, abs=8)
    assert _ds_zero3_gpu_no_offload(PSI, n, 0) == int(18 * PSI / n)


@pytest.mark.parametrize("gpus", [1, 4, 8])
def test_offloaded_host_memory_is_deepspeeds_16_or_18_bytes_per_param(gpus):
    spec = resolve_model("llama-3.1-8b")
    s = make_setup(spec, method="full", optimizer="adamw-fused", grad_checkpointing=True)
    psi = spec.params_total
    z2 = estimate_distributed(spec, s, make_parallel(gpus=gpus, zero=2, offload="optimizer"))
    assert z2.cpu_bytes_per_node == pytest.approx(16 * psi, rel=1e-6)  # estimate_zero2: 16 (times 1.5 buffer)
    z3 = estimate_distributed(spec, s, make_parallel(gpus=gpus, zero=3, offload="params"))
    assert z3.cpu_bytes_per_node == pytest.approx(18 * psi, rel=1e-6)  # estimate_zero3 with zero_init: 18


def test_more_gpus_never_need_more_memory_per_gpu():
    spec = resolve_model("llama-3.1-8b")
    s = make_setup(spec, method="full", grad_checkpointing=True)
    for kw in ({"zero": 1}, {"zero": 2}, {"zero": 3}, {"fsdp": "full_shard"}, {"fsdp": "shard_grad_op"}):
        peaks = [estimate_distributed(spec, s, make_parallel(gpus=n, **kw)).per_gpu_peak_allocated_bytes for n in (1, 2, 4, 8)]
        assert peaks == sorted(peaks, reverse=True), kw


def test_full_finetune_of_70b_needs_sharding_over_many_gpus_or_offload():
    # 70.6B params x 18 bytes (bf16 params, fp32 master + Adam, fp32 grads) = 1.27 TB of states
    spec = resolve_model("70b")
    s = make_setup(spec, method="full", grad_checkpointing=True, optimizer="adamw-fused")
    cap = 80 * 2**30

    def total(**kw):
        return estimate_distributed(spec, s, make_parallel(**kw)).per_gpu_device_total_bytes

    assert total(gpus=8, zero=3) > cap
    assert total(gpus=8, nodes=4, zero=3) < cap
    off = estimate_distributed(spec, s, make_parallel(gpus=4, zero=3, offload="params"))
    assert off.per_gpu_device_total_bytes < cap and off.cpu_bytes_per_node > 1.2e12


def test_lora_under_zero_only_shards_trainable_states():
    spec = resolve_model("8b")
    s = make_setup(spec, method="lora", grad_checkpointing=True)
    z1 = estimate_distributed(spec, s, make_parallel(gpus=8, zero=1))
    z0 = estimate_distributed(spec, s, make_parallel(gpus=8, zero=0))
    saved = z0.per_gpu_peak_allocated_bytes - z1.per_gpu_peak_allocated_bytes
    assert 0 < saved < 1e9  # optimizer states of 42M adapter params; the frozen 16 GB base stays


@pytest.mark.parametrize(("kw", "msg"), [
    ({"zero": 4}, "zero stage must be one of"), ({"fsdp": "hybrid"}, "unknown fsdp mode"),
    ({"zero": 2, "offload": "params"}, "parameter offload needs"), ({"zero": 2, "fsdp": "full_shard"}, "not both"),
    ({"gpus": 0}, "gpus must be a positive integer"), ({"offload": "optimizer"}, "optimizer offload is DeepSpeed"),
])
def test_bad_parallel_options_are_clear_errors(kw, msg):
    with pytest.raises(VramplanError, match=msg):
        make_parallel(**kw)


def test_fp32_precision_counts_parameters_not_bytes():
    spec = resolve_model("llama-3.2-1b")
    pure = estimate_distributed(spec, make_setup(spec, method="full"), make_parallel(gpus=1, zero=3, offload="params"))
    fp32 = estimate_distributed(spec, make_setup(spec, method="full", precision="fp32"), make_parallel(gpus=1, zero=3, offload="params"))
    assert pure.cpu_bytes_per_node > 0 and fp32.cpu_parts["optimizer_states"] == pure.cpu_parts["optimizer_states"]


def _dist(model, method="full", **par):
    spec = resolve_model(model)
    setup = make_setup(spec, method=method, trainer="hf", batch_size=2, seq_len=1024, grad_checkpointing=True)
    return estimate_distributed(spec, setup, make_parallel(**par))


def test_ddp_buckets_hold_a_second_copy_of_every_trainable_gradient():
    d = _dist("llama-3.2-1b", gpus=2)
    assert d.gpu_parts["comm_buckets"] == d.single.terms["grads"]
    assert all(d.gpu_phases[p] >= d.single.phases[p] for p in ("forward", "backward"))


def test_zero3_keeps_its_16bit_gradient_partition_on_the_gpu_unless_the_optimizer_is_offloaded():
    on = _dist("llama-3.2-3b", gpus=2, zero=3)
    off = _dist("llama-3.2-3b", gpus=2, zero=3, offload="optimizer")
    psi = on.single.params_trainable
    assert on.gpu_parts["gradient_partitions"] == 2 * psi // 2
    assert "gradient_partitions" not in off.gpu_parts


def test_shard_grad_op_holds_every_unit_unsharded_in_backward_on_top_of_the_shards():
    full = _dist("llama-3.2-1b", gpus=2, fsdp="full_shard")
    sgo = _dist("llama-3.2-1b", gpus=2, fsdp="shard_grad_op")
    psi = full.single.params_trainable
    assert sgo.gpu_parts["weights"] == full.gpu_parts["weights"] == 4 * psi // 2
    assert sgo.gpu_parts["gathered_params"] == 2 * psi
    assert sgo.per_gpu_peak_allocated_bytes > full.per_gpu_peak_allocated_bytes


def test_fsdp_untied_trainable_lm_head_adds_its_unsharded_gradient_and_a_tied_one_does_not():
    untied = _dist("llama-3.1-8b", gpus=2, fsdp="full_shard")
    tied = _dist("llama-3.2-1b", gpus=2, fsdp="full_shard")
    lora = _dist("llama-3.1-8b", "lora", gpus=2, fsdp="full_shard")
    spec = resolve_model("llama-3.1-8b").arch
    assert untied.gpu_parts["unit_gradient"] == 2 * spec.vocab * spec.hidden
    assert "unit_gradient" not in tied.gpu_parts and "unit_gradient" not in lora.gpu_parts


def test_deepspeed_opens_more_nccl_communicators_than_torch():
    ddp = _dist("llama-3.2-1b", gpus=2).per_gpu_outside_allocator
    z2 = _dist("llama-3.2-1b", gpus=2, zero=2).per_gpu_outside_allocator
    z3 = _dist("llama-3.2-1b", gpus=2, zero=3).per_gpu_outside_allocator
    key = "nccl (communicator, kernels, channel buffers)"
    assert ddp[key] < z3[key] < z2[key]


def test_zero12_step_upcasts_a_flat_copy_while_the_16bit_partition_is_alive():
    p = 1_000_000
    # stage_1_and_2.py step(): flatten(averaged_gradients[i]).to(fp32) before `del flat_grad_partition`
    plain = zero12_step_gradients(partition_params=p, fp32_grads=4 * p, transient=0, groups_share_partition=False)
    assert plain == {"gradient_partitions": 2 * p, "gradients": 4 * p, "transients": 2 * p}
    # a foreach optimizer's whole-group transient outgrows that moment
    foreach = zero12_step_gradients(partition_params=p, fp32_grads=4 * p, transient=8 * p, groups_share_partition=False)
    assert foreach == {"gradient_partitions": 0, "gradients": 4 * p, "transients": 8 * p}
    # Trainer's no-decay group still views the flat partition through the decay group's step
    shared = zero12_step_gradients(partition_params=p, fp32_grads=4 * p, transient=8 * p, groups_share_partition=True)
    assert sum(shared.values()) == 2 * p + 4 * p + 8 * p


def test_zero2_trainer_run_peaks_at_the_optimizer_steps_upcast():
    # d4-z2-gran2b-hf-full-ckpt-b4s2048 (measured 28.38 GiB per GPU): a small activation peak
    spec = resolve_model("granite-3.3-2b")
    s = make_setup(spec, method="full", trainer="hf", optimizer="adamw-fused", batch_size=4, seq_len=2048,
                   grad_checkpointing=True)
    d = estimate_distributed(spec, s, make_parallel(gpus=2, zero=2))
    part = d.single.params_trainable // 2
    assert d.peak_phase == "optimizer_step"
    assert d.gpu_parts["gradient_partitions"] == d.gpu_parts["transients"] == 2 * part
    assert d.gpu_parts["gradients"] == 4 * part
    assert d.per_gpu_peak_allocated_bytes == pytest.approx(28.377 * 2**30, rel=0.005)


def test_fsdp_tied_full_finetune_ends_backward_with_its_vocab_gradients_unreduced():
    spec = resolve_model("qwen3-4b")
    s = make_setup(spec, method="full", trainer="hf", optimizer="adamw-fused", batch_size=2, seq_len=2048,
                   grad_checkpointing=True)
    d = estimate_distributed(spec, s, make_parallel(gpus=2, fsdp="full_shard"))
    vh, psi = spec.arch.vocab * spec.arch.hidden, d.single.params_trainable
    # every fp32 gradient shard but the tail's; lm_head's share, the embedding's, their sum (bf16);
    # layer 0's reduce-scatter input
    end = 4 * psi // 2 - 4 * vh // 2 + 3 * 2 * vh + 2 * layout(spec).params_per_layer
    assert d.peak_phase == "backward" and d.gpu_parts["activations"] == end
    # measured d4-fsdp-q3-4b-hf-full-ckpt-b2s2048: 32.49 GiB
    assert d.per_gpu_peak_allocated_bytes == pytest.approx(32.487 * 2**30, rel=0.01)
    # shard_grad_op has resharded every other unit by then, more than that moment adds
    sgo = estimate_distributed(spec, s, make_parallel(gpus=2, fsdp="shard_grad_op"))
    t = sgo.single.terms
    states = 4 * psi // 2 + 8 * psi // 2 + t["workspace"]  # fp32 shards of weights and Adam's two states
    assert sgo.gpu_phases["backward"] == states + 2 * psi + max(t["acts_bwd_loss"], 4 * psi // 2 + t["layer_live"])


def test_trl_peft_under_zero3_holds_every_frozen_layer_weight_gathered_by_the_first_layers_backward():
    # SFTTrainer forces reentrant checkpointing for PEFT under ZeRO-3 (trl#4951); the Trainer does not
    spec = resolve_model("llama-3.1-8b")
    kw = dict(method="lora", optimizer="adamw-fused", batch_size=2, seq_len=2048, grad_checkpointing=True)
    z3 = make_parallel(gpus=2, zero=3)
    trl = estimate_distributed(spec, make_setup(spec, trainer="trl", **kw), z3)
    hf = estimate_distributed(spec, make_setup(spec, trainer="hf", hold_outputs=False, **kw), z3)
    lay = layout(spec)
    # 16-bit, whole, every layer -- and the embedding, prefetched for its own backward
    assert trl.gpu_parts["gathered_params"] == 2 * lay.layer_params_total + 2 * lay.embed_params
    assert hf.gpu_parts["gathered_params"] < trl.gpu_parts["gathered_params"] / 4  # the largest unit twice, the prefetch
    assert any("reentrant" in n for n in trl.single.notes) and not any("reentrant" in n for n in hf.single.notes)
    # measured d4-z3-l8b-trl-lora-b2s2048: 23.22 GiB per GPU (the non-reentrant rule said 12.57)
    assert trl.per_gpu_peak_allocated_bytes == pytest.approx(23.22 * 2**30, rel=0.04)
    # ZeRO-2 gathers nothing, and without checkpointing there is no recompute
    assert "gathered_params" not in estimate_distributed(spec, make_setup(spec, trainer="trl", **kw),
                                                         make_parallel(gpus=2, zero=2)).gpu_parts
    nockpt = estimate_distributed(spec, make_setup(spec, trainer="trl", **{**kw, "grad_checkpointing": False}), z3)
    assert nockpt.gpu_parts["gathered_params"] == hf.gpu_parts["gathered_params"]


def test_fsdp_reduce_scatter_streams_cached_fp32_shards_count_at_the_loss_moment_of_a_tied_full_finetune_peaking_at_backwards_end():
    spec = resolve_model("qwen3-4b")
    s = make_setup(spec, method="full", trainer="hf", optimizer="adamw-fused", batch_size=2, seq_len=2048,
                   grad_checkpointing=True, hold_outputs=False)
    d = estimate_distributed(spec, s, make_parallel(gpus=2, fsdp="full_shard"))
    psi, t = d.single.params_trainable, d.single.terms
    # the peak allocated is the end of backward, with this step's gradient shards alive ...
    assert d.peak_phase == "backward" and d.gpu_parts["activations"] > t["acts_bwd_loss"]
    # ... but the reserved high-water mark is the next step's loss: the backward's sharded states,
    # gathered unit and workspaces, the default stream's loss-moment pools, and beside them the
    # previous step's fp32 gradient shards, freed by zero_grad, cached on the reduce-scatter stream
    # and the all-gather copy-in stream's tail and layer blocks
    loss = (sum(d.gpu_parts.values()) - d.gpu_parts["activations"] + max(t["acts_bwd_loss"], t["dynamic_pools"])
            + 4 * psi // 2 + fsdp_all_gather_pool_bytes(spec, make_parallel(gpus=2, fsdp="full_shard")))
    slack = d.single.peak_reserved_bytes - d.single.peak_allocated_bytes
    assert d.per_gpu_reserved_bytes == loss > d.per_gpu_peak_allocated_bytes + slack
    # measured d4-fsdp-q3-4b-hf-full-ckpt-b2s2048: 41.99 GiB reserved (the peak plus slack gave 39.65)
    assert d.per_gpu_reserved_bytes == pytest.approx(41.99 * 2**30, rel=0.01)
    # with parameter offload the shards live on the host: no cached reduce-scatter pool, the usual
    # rule beside the all-gather stream's pool
    off_par = make_parallel(gpus=2, fsdp="full_shard", offload="params")
    off = estimate_distributed(spec, s, off_par)
    assert off.per_gpu_reserved_bytes == (off.per_gpu_peak_allocated_bytes + off.single.peak_reserved_bytes
                                          - off.single.peak_allocated_bytes + fsdp_all_gather_pool_bytes(spec, off_par))


def test_zero3_linear_keeps_a_frozen_bases_inputs_in_every_layer_without_checkpointing():
    # zero.Init swaps F.linear for LinearFunctionForZeroStage3, which saves its input whatever trains
    from vramplan.activations import layer_tensors

    spec = resolve_model("qwen3-4b")
    s = make_setup(spec, trainer="trl", method="lora", batch_size=2, seq_len=1024, grad_checkpointing=False)
    lay = layout(spec)
    plain = {t.name for _, ts in layer_tensors(spec.arch, lay, s) for t in ts}
    z3 = {t.name for _, ts in layer_tensors(spec.arch, lay, s, zero3_linear=True) for t in ts}
    assert {"down_proj.input", "input_layernorm.output", "post_attention_layernorm.output"} <= z3 - plain
    full = make_setup(spec, trainer="trl", method="full", batch_size=2, seq_len=1024, grad_checkpointing=False)
    assert layer_tensors(spec.arch, lay, full) == layer_tensors(spec.arch, lay, full, zero3_linear=True)
    d = estimate_distributed(spec, s, make_parallel(gpus=2, zero=3))
    z2 = estimate_distributed(spec, s, make_parallel(gpus=2, zero=2))
    assert d.single.terms["acts_fwd_peak"] == z2.single.terms["acts_fwd_peak"]  # the single estimate is untouched
    # measured d5-z3-q3-4b-trl-lora-nockpt-b2s1024: 21.97 GiB per GPU (19.47 without these inputs)
    assert d.per_gpu_peak_allocated_bytes == pytest.approx(21.97 * 2**30, rel=0.03)


def test_zero3_gather_stream_pool_keeps_a_segment_per_vocabulary_weight_beside_the_held_layers():
    from vramplan.distributed import zero3_gather_pool_extra_bytes

    MiB, KiB = 2**20, 2**10
    untied, tied = layout(resolve_model("llama-3.1-8b")), layout(resolve_model("qwen3-4b"))
    # Llama-3.1-8B: two 8 MiB k/v projections per 20 MiB segment, 64 norms of 8 KiB in one 2 MiB
    # small segment, and the embedding and lm_head (1002 MiB) in segments of their own
    assert zero3_gather_pool_extra_bytes(untied) == 32 * (20 - 16) * MiB + (2 * MiB - 64 * 8 * KiB) + 2 * 1002 * MiB
    # Qwen3-4B: 47.5 MiB MLP weights in 48 MiB segments, the tied embedding (741.9 MiB) once
    extra = zero3_gather_pool_extra_bytes(tied)
    assert 108 * MiB // 2 + 742 * MiB - 2 * MiB < extra < 108 * MiB // 2 + 742 * MiB + 2 * MiB
    spec = resolve_model("llama-3.1-8b")
    s = make_setup(spec, trainer="trl", method="lora", batch_size=2, seq_len=2048)
    d = estimate_distributed(spec, s, make_parallel(gpus=2, zero=3))
    # measured d6-z3-l8b-trl-lora-b2s2048: 26.84 GiB reserved (16.18 of it on the all-gather stream)
    assert d.per_gpu_reserved_bytes == pytest.approx(26.84 * 2**30, rel=0.03)


def test_ddp_rebuilt_buckets_are_reused_by_gradients_small_enough_for_their_blocks():
    from vramplan.distributed import DDP_BUCKET_CAP_BYTES, ddp_rebuilt_bucket_bytes

    par, MiB = make_parallel(gpus=2), 2**20
    s = make_setup(resolve_model("qwen3-1.7b"), trainer="trl", method="full")
    kw = dict(buckets=3200 * MiB, layers=28, ckpt_input=32 * MiB)
    # 32 MiB kept inputs do not fit a 25 MiB bucket block; 24 MiB MLP gradients do
    assert ddp_rebuilt_bucket_bytes(s, par, **kw, grad_tensors=[26 * MiB] * 84) == 3200 * MiB
    assert ddp_rebuilt_bucket_bytes(s, par, **kw, grad_tensors=[24 * MiB] * 84) == 3200 * MiB - 84 * 24 * MiB
    assert ddp_rebuilt_bucket_bytes(s, par, **{**kw, "ckpt_input": 24 * MiB}, grad_tensors=[]) == 3200 * MiB - 28 * 24 * MiB
    assert 24 * MiB <= DDP_BUCKET_CAP_BYTES < 26 * MiB
    # measured d4-ddp-q3-17b-trl-full-b4s2048: 18.02 GiB reserved per GPU (22.21 estimated before)
    spec = resolve_model("qwen3-1.7b")
    d = estimate_distributed(spec, make_setup(spec, trainer="trl", method="full", batch_size=4, seq_len=2048), par)
    assert 18.02 * 2**30 <= d.per_gpu_reserved_bytes < 1.10 * 18.02 * 2**30


def test_fsdp2_all_gather_copy_in_pool_holds_the_tail_groups_and_a_layers_flat_outputs():
    # foreach_all_gather allocates each group's flat output on the copy-in stream, and forward keeps
    # it until the next copy-out: the tail (embedding, norm, head) and layer 0 meet there
    spec = resolve_model("gemma-3-4b")
    lay = layout(spec)
    par = make_parallel(gpus=4, fsdp="full_shard")
    pool = fsdp_all_gather_pool_bytes(spec, par)
    mib = 2**20
    # measured d7-fsdp-g3-4b-trl-lora-b4s2048: 1282 + 182 MiB segments on that stream
    assert pool == (1282 + 182) * mib
    assert pool == -(-2 * (lay.embed_params + lay.final_norm_params) // (2 * mib)) * 2 * mib + -(
        -2 * lay.params_per_layer // (2 * mib)) * 2 * mib
    # nothing to gather on one GPU or without sharding, and ZeRO has its own streams
    assert fsdp_all_gather_pool_bytes(spec, make_parallel(gpus=4, fsdp="no_shard")) == 0
    assert fsdp_all_gather_pool_bytes(spec, make_parallel(gpus=4, zero=3)) == 0
    s = make_setup(spec, trainer="trl", method="lora", optimizer="adamw-fused", batch_size=4, seq_len=2048)
    d = estimate_distributed(spec, s, par)
    # measured: 8.59 GiB reserved per GPU (the estimate without the pool said 7.56)
    assert d.per_gpu_reserved_bytes == pytest.approx(8.59 * 2**30, rel=0.06)
    assert d.per_gpu_reserved_bytes >= 8.59 * 2**30


def test_zero3_trainer_peft_reserves_a_block_per_vocabulary_fetch_that_no_host_sync_separates():
    from vramplan.distributed import zero3_vocab_fetches, zero3_vocab_pool_extra_bytes

    spec = resolve_model("qwen3-14b")
    kw = dict(method="lora", optimizer="adamw-fused", batch_size=2, seq_len=2048, grad_checkpointing=True)
    z3 = make_parallel(gpus=4, zero=3)
    hf, trl = make_setup(spec, trainer="hf", hold_outputs=False, **kw), make_setup(spec, trainer="trl", **kw)
    # embedding and head in forward, head and (its output needing a gradient) embedding in backward
    assert zero3_vocab_fetches(hf) == 4
    assert zero3_vocab_fetches(make_setup(spec, trainer="hf", **{**kw, "grad_checkpointing": False})) == 3
    # TRL reads its token metrics with .item() after the forward: two at most between syncs
    assert zero3_vocab_fetches(trl) == 2
    vocab = 2 * layout(spec).embed_params
    d = estimate_distributed(spec, hf, z3)
    extra = zero3_vocab_pool_extra_bytes(spec, hf, z3, gathered=d.gpu_parts["gathered_params"])
    assert extra == pytest.approx(4 * vocab - d.gpu_parts["gathered_params"], abs=8 * 2**20)
    # measured d7-z3-q3-14b-hf-lora-ckpt-b2s2048: 24.55 GiB reserved (the estimate without it said 22.11)
    assert d.per_gpu_reserved_bytes == pytest.approx(24.55 * 2**30, rel=0.03)
    # none with parameter offload, none for a full fine-tune, none where TRL syncs
    assert zero3_vocab_pool_extra_bytes(spec, hf, make_parallel(gpus=4, zero=3, offload="params"), gathered=0) == 0
    assert zero3_vocab_pool_extra_bytes(spec, make_setup(spec, trainer="hf", **{**kw, "method": "full"}), z3,
                                        gathered=0) == 0
    assert zero3_vocab_pool_extra_bytes(spec, trl, z3, gathered=2 * vocab) <= 2 * 2**20  # segment rounding


def test_zero3_fused_expert_blocks_add_a_flat_buffer_and_two_layers_copies_to_the_gather_pool():
    from vramplan.distributed import zero3_vocab_pool_extra_bytes

    spec = resolve_model("qwen1.5-moe-a2.7b")
    lay = layout(spec)
    s = make_setup(spec, trainer="hf", method="lora", optimizer="adamw-fused", batch_size=2, seq_len=2048,
                   grad_checkpointing=True, hold_outputs=False)
    z3 = make_parallel(gpus=4, zero=3)
    experts = 2 * lay.layer_expert_params
    assert experts == pytest.approx(990 * 2**20, rel=0.01)  # 60 experts x 3 x 1408 x 2048 in bf16
    dense = resolve_model("qwen3-1.7b")  # same 151936 x 2048 vocabulary, no experts
    sd = make_setup(dense, trainer="hf", method="lora", optimizer="adamw-fused", batch_size=2, seq_len=2048,
                    grad_checkpointing=True, hold_outputs=False)
    gap = (zero3_vocab_pool_extra_bytes(spec, s, z3, gathered=0)
           - zero3_vocab_pool_extra_bytes(dense, sd, z3, gathered=0))
    assert gap == pytest.approx(3 * experts, abs=6 * 2**20)
    # measured d7-z3-qmoe-hf-lora-ckpt-b2s2048: 20.26 GiB reserved; the bound keeps it over
    d = estimate_distributed(spec, s, z3)
    assert 20.26 * 2**30 <= d.per_gpu_reserved_bytes <= 1.08 * 20.26 * 2**30


def test_a_4bit_base_stays_whole_on_every_gpu_under_zero3_and_fsdp2_and_deepspeed_undoes_the_fp32_upcast():
    from vramplan.distributed import unsharded_quantised_bytes
    from vramplan.weights import base_weight_bytes

    spec = resolve_model("qwen3-8b")
    s = make_setup(spec, trainer="hf", method="qlora", optimizer="adamw-fused", batch_size=2, seq_len=2048,
                   grad_checkpointing=True, hold_outputs=False)
    assert s.kbit_prepare  # the Trainer preset prepares the base: fp32 embeddings, norms and head
    lay = layout(spec)
    q4 = base_weight_bytes(lay=lay, dtype="nf4", dense_bytes_per_param=2, double_quant=True, quantised=True)
    z3, fsdp = make_parallel(gpus=4, zero=3), make_parallel(gpus=4, fsdp="full_shard")
    assert unsharded_quantised_bytes(spec, s, z3) == unsharded_quantised_bytes(spec, s, fsdp) == q4.quantised_bytes
    # engines that replicate the base anyway, and bases that are not 4-bit, add nothing
    assert unsharded_quantised_bytes(spec, s, make_parallel(gpus=4, zero=2)) == 0
    assert unsharded_quantised_bytes(spec, s, make_parallel(gpus=4)) == 0
    lora = make_setup(spec, trainer="hf", method="lora", optimizer="adamw-fused", batch_size=2, seq_len=2048)
    assert unsharded_quantised_bytes(spec, lora, z3) == 0
    # a floating storage dtype (bnb_4bit_quant_storage=bf16, axolotl's and LLaMA-Factory's) is sharded
    bf16 = make_setup(spec, trainer="hf", method="qlora", optimizer="adamw-fused", batch_size=2, seq_len=2048,
                      grad_checkpointing=True, hold_outputs=False, quant_storage="bf16")
    assert unsharded_quantised_bytes(spec, bf16, z3) == unsharded_quantised_bytes(spec, bf16, fsdp) == 0
    sharded = estimate_distributed(spec, bf16, fsdp).gpu_parts["weights"]
    whole = estimate_distributed(spec, s, fsdp).gpu_parts["weights"]
    assert whole - sharded == pytest.approx(q4.quantised_bytes * 3 / 4, rel=0.01)
    d = estimate_distributed(spec, s, z3)
    # the 4-bit weights whole, a quarter of the rest in bf16 (DeepSpeed casts the kbit-prepared fp32 back)
    assert d.gpu_parts["weights"] == pytest.approx(q4.quantised_bytes + q4.dense_params * 2 / 4, rel=0.01)
    # measured d7-z3-q3-8b-hf-qlora-ckpt-b2s2048: steps start at 4.10 GiB per GPU (weights, adapters'
    # states, buffers); sharding the 4-bit weights too said 2.28
    fixed = sum(v for k, v in d.gpu_parts.items() if k not in ("gathered_params", "activations"))
    assert fixed == pytest.approx(4.10 * 2**30, rel=0.04)
    # and the estimate says so, naming what would shard them under FSDP2
    assert any("stay whole on every GPU" in n for n in d.single.notes)
    assert any("bnb_4bit_quant_storage" in n for n in estimate_distributed(spec, s, fsdp).single.notes)


def test_zero12_gradient_norm_copies_the_largest_slice_in_fp64_on_its_owning_rank():
    # stage_1_and_2.py get_grad_norm_direct: g.data.to(torch.double) per slice before the upcast
    p = 1_000_000
    norm = zero12_step_gradients(partition_params=p, fp32_grads=4 * p, transient=0, groups_share_partition=False,
                                 norm_copy=8 * p)
    assert norm == {"gradient_partitions": 2 * p, "gradients": 0, "transients": 8 * p}
    spec = resolve_model("gemma-3-12b")
    full = make_setup(spec, method="full", trainer="hf", optimizer="adamw-fused", batch_size=1, seq_len=2048,
                      grad_checkpointing=True)
    vocab_hidden = spec.arch.vocab * spec.arch.hidden
    assert zero12_norm_copy_bytes(spec, full, make_parallel(gpus=4, zero=2, offload="optimizer")) == 8 * vocab_hidden
    # a partition smaller than the tensor holds only its share of it
    assert zero12_norm_copy_bytes(spec, full, make_parallel(gpus=64, zero=1)) == 8 * (layout(spec).params_total // 64)
    # ZeRO-3's per-parameter partitions and LoRA's small adapters have no such slice
    assert zero12_norm_copy_bytes(spec, full, make_parallel(gpus=4, zero=3)) == 0
    lora = make_setup(spec, method="lora", trainer="hf", batch_size=1, seq_len=2048)
    assert zero12_norm_copy_bytes(spec, lora, make_parallel(gpus=4, zero=2)) == 0


def test_zero2_offload_ends_backward_with_the_embeddings_gradient_and_its_fp64_copy():
    # d9-z2off-g3-12b-hf-full-ckpt-b1s2048 rank 0 peaked at 33.29 GiB (ranks 1-3: 30.64)
    spec = resolve_model("gemma-3-12b")
    s = make_setup(spec, method="full", trainer="hf", optimizer="adamw-fused", batch_size=1, seq_len=2048,
                   grad_checkpointing=True)
    d = estimate_distributed(spec, s, make_parallel(gpus=4, zero=2, offload="optimizer"))
    vh = layout(spec).largest_tensor
    assert d.peak_phase == "backward"
    assert d.gpu_parts["gradients"] == 2 * vh and d.gpu_parts["transients"] == 8 * vh
    assert d.per_gpu_peak_allocated_bytes == pytest.approx(33.286 * 2**30, rel=0.01)


@pytest.mark.parametrize(("kw", "carried"), [
    ({}, "whole"),  # DDP: no_sync keeps param.grad whole
    ({"fsdp": "full_shard"}, "whole"),  # FSDP2: set_requires_gradient_sync(False) keeps unsharded grads
    ({"zero": 1}, "whole"),  # ZeRO-1 reduces only at the boundary
    ({"zero": 2}, "partition"),  # ZeRO-2 reduces into its persistent 16-bit partition
    ({"zero": 2, "offload": "optimizer"}, "none"),  # ... or into host memory
    ({"zero": 3}, "none"),  # ZeRO-3's partition buffer is alive anyway
])
def test_gradient_accumulation_carries_each_engines_gradient_storage_between_micro_batches(kw, carried):
    spec = resolve_model("llama-3.2-3b")
    one = make_setup(spec, method="full", trainer="hf", optimizer="adamw-fused", batch_size=2, seq_len=1024)
    two = make_setup(spec, method="full", trainer="hf", optimizer="adamw-fused", batch_size=2, seq_len=1024, grad_accum=2)
    par = make_parallel(gpus=4, **kw)
    psi = estimate_distributed(spec, one, par).single.params_trainable
    expect = {"whole": 2 * psi, "partition": 2 * psi // 4, "none": 0}[carried]
    a, b = estimate_distributed(spec, one, par), estimate_distributed(spec, two, par)
    assert b.gpu_phases["forward"] - a.gpu_phases["forward"] == pytest.approx(expect, abs=2**20)


def test_ddp_gradient_accumulation_peaks_a_whole_gradient_above_one_micro_batch():
    # d9-ddp-g2-2b-hf-full-ckpt-ga2-b4s2048: 52.85 GiB per GPU; without the carried gradients -9.3%
    spec = resolve_model("gemma-2-2b")
    s = make_setup(spec, method="full", trainer="hf", optimizer="adamw-fused", batch_size=4, seq_len=2048,
                   grad_checkpointing=True, grad_accum=2, hold_outputs=False)
    d = estimate_distributed(spec, s, make_parallel(gpus=4))
    assert d.per_gpu_peak_allocated_bytes == pytest.approx(56_745_009_664, rel=0.01)


def test_fsdp2_accumulation_reserves_the_carried_gradients_blocks_again():
    # d10-fsdp-l1b-hf-full-ga2-b2s1024: 16.05 GiB allocated, 19.96 GiB reserved per GPU
    spec = resolve_model("llama-3.2-1b")
    kw = dict(method="full", trainer="hf", optimizer="adamw-fused", batch_size=2, seq_len=1024, hold_outputs=False)
    par = make_parallel(gpus=2, fsdp="full_shard")
    one = estimate_distributed(spec, make_setup(spec, **kw), par)
    two = estimate_distributed(spec, make_setup(spec, grad_accum=2, **kw), par)
    carried = 2 * one.single.params_trainable
    assert two.per_gpu_peak_allocated_bytes - one.per_gpu_peak_allocated_bytes == pytest.approx(carried, rel=0.01)
    assert two.per_gpu_peak_allocated_bytes == pytest.approx(16.049 * 2**30, rel=0.01)
    assert two.per_gpu_reserved_bytes == pytest.approx(19.965 * 2**30, rel=0.01)
    # ZeRO-1 keeps them in flat buffers: no such blocks
    z1 = [estimate_distributed(spec, make_setup(spec, grad_accum=ga, **kw), make_parallel(gpus=2, zero=1)) for ga in (1, 2)]
    assert (z1[1].per_gpu_reserved_bytes - z1[1].per_gpu_peak_allocated_bytes
            == pytest.approx(z1[0].per_gpu_reserved_bytes - z1[0].per_gpu_peak_allocated_bytes, abs=2**27))


def test_zero2_offload_reserves_the_fp64_norm_copy_on_the_reduction_stream():
    # d11-z2off-l1b-hf-full-ga2-b2s2048 rank 0: a 2004 MiB segment on the reduction stream, 1.97 GiB
    # more reserved than ranks 1-3 at the same activation peak (18.58 GiB reserved)
    from vramplan.distributed import zero12_norm_copy_segment_bytes

    spec = resolve_model("llama-3.2-1b")
    s = make_setup(spec, method="full", trainer="hf", optimizer="adamw-fused", batch_size=2, seq_len=2048,
                   grad_accum=2, hold_outputs=False)
    par = make_parallel(gpus=4, zero=2, offload="optimizer")
    d = estimate_distributed(spec, s, par)
    assert d.gpu_parts.get("transients", 0) == 0  # the peak is the activations', not the copy's
    norm = zero12_norm_copy_bytes(spec, s, par)
    assert zero12_norm_copy_segment_bytes(par, norm_copy=norm, peak_parts=d.gpu_parts,
                                          largest_freed_block=norm) == 8 * spec.arch.vocab * spec.arch.hidden
    assert d.per_gpu_reserved_bytes == pytest.approx(18.58 * 2**30, rel=0.05)
    # without offload the norm runs on the default stream in step(), after backward freed its blocks
    on_gpu = make_parallel(gpus=4, zero=2)
    # ... and the loss's freed 2004 MiB fp32 logits block holds the 2004 MiB copy: no segment of its own
    from vramplan.reserved import freed_vocab_block

    assert zero12_norm_copy_segment_bytes(on_gpu, norm_copy=zero12_norm_copy_bytes(spec, s, on_gpu), peak_parts=d.gpu_parts,
                                          largest_freed_block=freed_vocab_block(spec.arch, s)) == 0


def test_zero3_holds_up_to_max_live_parameters_gathered_at_the_turn_to_backward():
    from vramplan.distributed import ZERO3_MAX_LIVE_PARAMS, zero3_live_gathered_bytes

    # Qwen2.5-1.5B: 1.54B parameters, more than stage3_max_live_parameters, whose cap binds
    q = _dist("qwen2.5-1.5b", gpus=4, zero=3)
    assert zero3_live_gathered_bytes(resolve_model("qwen2.5-1.5b")) == 2 * ZERO3_MAX_LIVE_PARAMS
    assert q.gpu_parts["gathered_params"] == 2 * ZERO3_MAX_LIVE_PARAMS
    # a model smaller than the cap is gathered whole
    small = resolve_model("smollm2-135m")
    assert zero3_live_gathered_bytes(small) == 2 * layout(small).params_total
    # ZeRO-1/2 gather nothing
    z2 = _dist("qwen2.5-1.5b", gpus=4, zero=2)
    assert z2.gpu_parts.get("gathered_params", 0) == 0


def test_zero1_fp64_norm_copy_larger_than_every_freed_block_takes_a_segment_of_its_own():
    # d11-z1-g3-1b-hf-full-b1s512 rank 0: a 250M-element slice of Gemma 3's embedding is 1908 MiB in
    # fp64, larger than its 954 MiB fp32 partitions and 576 MiB blocks; it reserves 1.95 GiB more
    # than ranks 2-3
    from vramplan.distributed import zero12_norm_copy_segment_bytes

    spec = resolve_model("gemma-3-1b")
    s = make_setup(spec, method="full", trainer="hf", optimizer="adamw-fused", batch_size=1, seq_len=512,
                   hold_outputs=False)
    par = make_parallel(gpus=4, zero=1)
    norm = zero12_norm_copy_bytes(spec, s, par)
    assert norm == 8 * (layout(spec).params_total // 4)
    assert zero12_norm_copy_segment_bytes(par, norm_copy=norm, peak_parts={}, largest_freed_block=norm // 2) == norm
    # a freed block that holds it (d10-z1-l1b: 2004 MiB copy, 2358 MiB fp32 partitions) adds none
    assert zero12_norm_copy_segment_bytes(par, norm_copy=norm, peak_parts={}, largest_freed_block=norm) == 0
    d = estimate_distributed(spec, s, par)
    assert d.per_gpu_reserved_bytes == pytest.approx(12.94 * 2**30, rel=0.05)


def test_zero2_state_carved_from_the_norm_copy_block_makes_later_copies_take_a_second_segment():
    # t15-z2-g3-1b-hf-full-b2s512 rank 0 (Gemma 3 1B, 4 ranks): the 954 MiB fp32 gradient partition
    # and exp_avg take the two 1024 MiB loss blocks the cuBLAS workspace left whole, exp_avg_sq is
    # carved from step 1's 1908 MiB copy segment, and step 2's copy takes a second one: 15892 MiB
    # reserved, 17993 MiB on the device
    from vramplan.distributed import first_step_vocab_blocks, zero12_copy_block_stranded_bytes

    spec = resolve_model("gemma-3-1b")
    s = make_setup(spec, method="full", trainer="hf", optimizer="adamw-fused", batch_size=2, seq_len=512,
                   hold_outputs=False)
    par = make_parallel(gpus=4, zero=2)
    flat = 4 * (layout(spec).params_total // 4)
    assert first_step_vocab_blocks(spec, s, flat_bytes=flat) == 2
    norm = zero12_norm_copy_bytes(spec, s, par)
    assert zero12_copy_block_stranded_bytes(spec, s, par, copy_segment=norm, flat_bytes=flat, states=2) == norm - flat
    # no copy segment, or flats larger than the loss blocks (d11-z1: gradient + state fill it): none
    assert zero12_copy_block_stranded_bytes(spec, s, par, copy_segment=0, flat_bytes=flat, states=2) == 0
    short = make_setup(spec, method="full", trainer="hf", optimizer="adamw-fused", batch_size=1, seq_len=512,
                       hold_outputs=False)
    assert zero12_copy_block_stranded_bytes(spec, short, make_parallel(gpus=4, zero=1), copy_segment=norm,
                                            flat_bytes=flat, states=2) == 0
    d = estimate_distributed(spec, s, par)
    assert 15892 * 2**20 > d.per_gpu_reserved_bytes > 0.95 * 15892 * 2**20
    assert d.per_gpu_device_total_bytes > 0.95 * 17993 * 2**20
    # Llama-3.2-1B's 501 MiB gradient leaves 3475 MiB of its 4008 MiB block, room for a 2357 MiB flat
    llama = resolve_model("llama-3.2-1b")
    ls = make_setup(llama, method="full", trainer="plain", batch_size=4, seq_len=2048, grad_checkpointing=True)
    assert first_step_vocab_blocks(llama, ls, flat_bytes=2357 * 2**20) == 3


def test_trainer_zero3_lora_saves_fp32_adapter_inputs_without_autocast():
    # d12-z3-l1b-hf-lora-b4s2048: the Trainer's ZeRO-3 adapters stay fp32 and DeepSpeed runs no
    # autocast, so each targeted input is saved as an fp32 dropout output (4 B), not a 16-bit cast
    from vramplan.distributed import zero3_fp32_adapters_without_autocast

    spec = resolve_model("llama-3.2-1b")
    par = make_parallel(gpus=4, zero=3)

    def dist(**kw):
        s = make_setup(spec, method="lora", batch_size=4, seq_len=2048, grad_checkpointing=False, **kw)
        return s, estimate_distributed(spec, s, par)

    hf, d_hf = dist(trainer="hf")
    assert zero3_fp32_adapters_without_autocast(hf)
    assert not zero3_fp32_adapters_without_autocast(make_setup(spec, method="lora", trainer="hf", dtype="nf4"))
    # every layer's seven targets: 6 hidden-wide inputs and down_proj's intermediate-wide one, 2 more bytes each
    lay = layout(spec)
    widths = sum(lm.d_in for lm in lay.linears if lm.module in hf.lora_targets)
    extra = 2 * widths * 4 * 2048 * lay.layers
    plain = estimate_distributed(spec, make_setup(spec, method="lora", trainer="hf", batch_size=4, seq_len=2048,
                                                  grad_checkpointing=False), make_parallel(gpus=4, zero=2))
    assert d_hf.gpu_parts["activations"] - plain.gpu_parts["activations"] >= extra
    assert d_hf.per_gpu_peak_allocated_bytes == pytest.approx(39.10 * 2**30, rel=0.02)
