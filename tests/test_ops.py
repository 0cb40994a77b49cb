"""Activations as saved tensors per operation (vramplan.ops): a layer's figures are the sums of
its operations' named tensors, each operation keeps what its source says, and the estimator's
phases are built from moments of the step."""

from __future__ import annotations

import pytest

from vramplan.activations import (
    SEQUENTIAL_OPS,
    layer_activations,
    layer_figures,
    layer_sizes,
    layer_tensors,
    stream_dtypes,
)
from vramplan.catalog import resolve_model
from vramplan.estimator import Moment, activation_terms, backward_peak, estimate_setup
from vramplan.layout import layout
from vramplan.ops import (
    BACKWARD,
    FIXED,
    FORWARD,
    LAYER_OPS,
    PER,
    RETAINED,
    SAVED,
    SAVED_FOR_INPUT_GRAD,
    SCORES,
    SPAN,
    TOKENS,
    dims_of,
)
from vramplan.setup import make_setup
from vramplan.streams import attention_kernel

GRID = [
    ("llama-3.2-1b", {"method": "lora"}),
    ("llama-3.2-1b", {"method": "lora", "trainer": "hf", "use_dora": True}),
    ("llama-3.2-1b", {"method": "qlora", "attn": "eager"}),
    ("llama-3.2-1b", {"method": "full", "precision": "mixed"}),
    ("gpt2", {"method": "full", "attn": "eager"}),
    ("gpt2", {"method": "lora", "lora_dropout": 0.0, "dtype": "fp32", "precision": "fp32"}),
    ("mixtral-8x7b", {"method": "full"}),
    ("qwen1.5-moe-a2.7b", {"method": "lora"}),
    ("qwen3-0.6b", {"method": "lora", "dtype": "int8"}),
    ("gemma-2-2b", {"method": "full"}),
    ("qwen2.5-0.5b", {"method": "prefix"}),
    ("qwen2.5-0.5b", {"method": "prompt"}),
    ("qwen2.5-0.5b", {"method": "ia3"}),
]


def _setup(model: str, **opts):
    spec = resolve_model(model)
    opts = {"trainer": "plain", "batch_size": 2, "seq_len": 1024, **opts}
    return spec, layout(spec), make_setup(spec, **opts)


def _ops(model: str, **opts) -> dict[str, tuple]:
    spec, lay, s = _setup(model, **opts)
    return dict(layer_tensors(spec.arch, lay, s))


@pytest.mark.parametrize(("model", "opts"), GRID, ids=lambda x: str(x))
def test_layer_figures_are_the_sums_of_its_operations_tensors(model, opts):
    spec, lay, s = _setup(model, **opts)
    ops = layer_tensors(spec.arch, lay, s)
    assert [name for name, _ in ops] == [name for name, _ in LAYER_OPS]
    layer, d = layer_activations(spec.arch, lay, s), dims_of(s)
    tensors = [t for _, ts in ops for t in ts]
    assert layer.saved == sum(t.nbytes(d) for t in tensors if t.lifetime in (SAVED, SAVED_FOR_INPUT_GRAD))
    assert layer.retained == sum(t.nbytes(d) for t in tensors if t.lifetime == RETAINED)
    # transients of different operations are not alive together, and an operation's backward runs
    # after the later sequential operations' saved tensors are freed
    seq = [name for name, _ in ops if name in SEQUENTIAL_OPS]

    def freed(name):
        if name not in SEQUENTIAL_OPS:
            return 0
        later = seq[seq.index(name) + 1:]
        return sum(t.nbytes(d) for n, ts in ops if n in later for t in ts if t.lifetime == SAVED)

    assert layer.transient == max([0] + [sum(t.nbytes(d) for t in ts if t.lifetime in (FORWARD, BACKWARD)) - freed(n)
                                         for n, ts in ops if any(t.lifetime in (FORWARD, BACKWARD) for t in ts)])
    assert layer == layer_figures(layer_sizes(ops), d)


@pytest.mark.parametrize(("model", "opts"), GRID, ids=lambda x: str(x))
def test_operations_never_see_the_batch_size_or_sequence_length(model, opts):
    """Their tensors are sizes per token / row / score element: one listing serves every
    micro-batch shape (layer_activations computes it once per setup without those two)."""
    shapes = [_ops(model, **{**opts, "batch_size": b, "seq_len": n}) for b, n in ((1, 256), (3, 1000))]
    assert shapes[0] == shapes[1]


@pytest.mark.parametrize(("model", "opts"), GRID, ids=lambda x: str(x))
def test_every_tensor_has_a_name_a_dtype_a_lifetime_and_bytes(model, opts):
    for _, tensors in _ops(model, **opts).items():
        for t in tensors:
            assert t.name and t.coef > 0 and t.per in PER, t
            assert t.dtype in ("fp32", "bf16", "fp16", "bool", "int64"), t
            assert t.lifetime in (SAVED, SAVED_FOR_INPUT_GRAD, RETAINED, FORWARD, BACKWARD), t


# Figures of the per-layer model before it was split into operations (one 145-line
# layer_activations, up to commit 21cad2e): (saved, transient, retained, first layer's saved), bytes.
PINNED = [
    ("llama-3.2-1b", {"method": "lora"}, (365166592, 100663296, 0, 348389376)),
    ("llama-3.2-1b", {"trainer": "hf", "method": "lora", "use_dora": True}, (595853312, 503316480, 0, 579076096)),
    ("gpt2", {"method": "full", "dtype": "fp32", "precision": "fp32", "attn": "eager", "batch_size": 4, "seq_len": 512},
     (292552704, 75497472, 0, 292552704)),
    ("mixtral-8x7b", {"method": "full", "batch_size": 1, "seq_len": 2048}, (713392128, 201326592, 0, 713392128)),
    ("qwen3-0.6b", {"method": "lora", "dtype": "int8", "seq_len": 512}, (169869312, 37748736, 29360128, 165675008)),
    ("gemma-2-2b", {"method": "full", "precision": "mixed", "batch_size": 1}, (187203584, 56623104, 0, 187203584)),
    ("qwen2.5-0.5b", {"method": "prefix", "batch_size": 3, "seq_len": 1000}, (137061000, 87552000, 0, 126309000)),
    ("llama-3.2-1b", {"method": "qlora", "batch_size": 1, "seq_len": 4096}, (3137339392, 5712642048, 0, 3103784960)),
]


@pytest.mark.parametrize(("model", "opts", "figures"), PINNED, ids=lambda x: str(x))
def test_layer_figures_stay_pinned(model, opts, figures):
    """Pinned from the single-function model (issue 12), then changed on purpose: a transient no
    longer meets the saved tensors of the operations after it (gpt2, int8, qlora rows), DoRA's
    forward transients count its identity matrix (dora row), and MoE layers are the experts'
    operations read off the m1-* traces (mixtral row: int64 router indices instead of fp32 logits,
    the up/gate/down backward moments instead of one)."""
    spec, lay, s = _setup(model, **opts)
    layer = layer_activations(spec.arch, lay, s)
    first = layer_activations(spec.arch, lay, s, first_layer=True)
    assert (layer.saved, layer.transient, layer.retained, first.saved) == figures


def test_frozen_first_layer_drops_only_the_input_norms_input_copy():
    spec, lay, s = _setup("llama-3.2-1b", method="lora")
    layer, first = layer_activations(spec.arch, lay, s), layer_activations(spec.arch, lay, s, first_layer=True)
    (norm_input,) = dict(layer_tensors(spec.arch, lay, s))["input_norm"]
    assert norm_input.lifetime == SAVED_FOR_INPUT_GRAD and (norm_input.dtype, norm_input.per) == ("fp32", TOKENS)
    assert layer.saved - first.saved == norm_input.nbytes(dims_of(s)) == 4 * spec.arch.hidden * s.tokens
    # full fine-tuning trains the embeddings and prompt tuning its virtual tokens: the first layer's
    # input needs its gradient there
    for opts in ({"method": "full"}, {"method": "prompt"}):
        spec, lay, s = _setup("llama-3.2-1b", **opts)
        assert layer_activations(spec.arch, lay, s, first_layer=True) == layer_activations(spec.arch, lay, s)


def test_checkpointing_keeps_only_each_layers_input():
    spec, lay, s = _setup("llama-3.2-1b", method="lora", grad_checkpointing=True)
    a = activation_terms(spec.arch, lay, s, stream_dtypes(s))
    assert a.ckpt_input == 2 * spec.arch.hidden * s.tokens  # one bf16 hidden state per token
    assert a.layers_saved == lay.layers * a.ckpt_input
    # ... while the layer being recomputed holds its own tensors in backward
    e = estimate_setup(spec, s)
    assert e.terms["layer_live"] == a.ckpt_input + a.layer.saved + a.layer.transient


def test_checkpointing_keeps_one_input_per_layer_whatever_the_trainer():
    for trainer in ("hf", "trl"):
        spec, lay, s = _setup("llama-3.2-1b", method="lora", trainer=trainer, grad_checkpointing=True)
        assert activation_terms(spec.arch, lay, s, stream_dtypes(s)).ckpt_input == 2 * spec.arch.hidden * s.tokens


def test_last_layer_backward_holds_every_kept_input_beside_the_recomputed_layer():
    spec, lay, s = _setup("qwen2.5-1.5b", method="lora", trainer="trl", grad_checkpointing=True)
    a = activation_terms(spec.arch, lay, s, stream_dtypes(s))
    e = estimate_setup(spec, s)
    assert e.terms["acts_bwd_top"] == a.layers_saved + a.last.saved + a.last.transient
    assert a.layers_saved == lay.layers * a.ckpt_input


def test_16bit_adapters_save_a_16bit_dropout_output_and_no_fp32_cast():
    names = {t.name: t for t in _ops("llama-3.2-1b", method="qlora", trainer="trl", kbit_prepare=False)["qkv_proj"]}
    assert names["q_proj.lora_dropout.output"].dtype == "bf16"
    assert not [t for t in _ops("llama-3.2-1b", method="qlora", trainer="trl", kbit_prepare=False)["lora_input_cast"]]


def test_trainer_autocast_runs_flash_on_a_kbit_prepared_fp32_base():
    spec, _, s = _setup("llama-3.2-1b", method="qlora", trainer="hf", grad_checkpointing=True)
    assert attention_kernel(spec.arch, s, stream_dtypes(s)).name == "flash"
    spec, _, s = _setup("llama-3.2-1b", method="qlora", trainer="plain", grad_checkpointing=True)
    assert attention_kernel(spec.arch, s, stream_dtypes(s)).name == "math"


def test_sdpa_flash_saves_output_and_logsumexp_not_the_score_matrix():
    names = {t.name for t in _ops("llama-3.2-1b", method="full")["attention"]}
    assert {"attn_output", "logsumexp", "query_states.rotated", "key_states+value_states"} <= names
    assert "attn_weights" not in names


def test_eager_attention_saves_fp32_scores_and_16bit_probabilities_of_seq_squared():
    spec, lay, s = _setup("llama-3.2-1b", method="full", attn="eager")
    att = {t.name: t for t in dict(layer_tensors(spec.arch, lay, s))["attention"]}
    scores = s.batch_size * spec.arch.heads * s.seq_len ** 2
    d = dims_of(s)
    assert att["attn_scores.softmax_fp32"].nbytes(d) == 4 * scores
    assert (att["attn_weights"].nbytes(d), att["attn_weights"].dtype, att["attn_weights"].per) == (2 * scores, "bf16", SCORES)


def test_math_kernel_backward_holds_three_fp32_score_buffers():
    spec, lay, s = _setup("llama-3.2-1b", method="qlora")  # fp32 streams with GQA: SDPA's math kernel
    att = dict(layer_tensors(spec.arch, lay, s))["attention"]
    scores = s.batch_size * spec.arch.heads * s.seq_len ** 2
    assert [t.nbytes(dims_of(s)) for t in att if t.lifetime == BACKWARD] == [4 * scores] * 3


def test_lora_dropout_saves_a_bool_mask_per_targeted_module():
    spec, lay, s = _setup("llama-3.2-1b", method="lora")
    tensors = [t for _, ts in layer_tensors(spec.arch, lay, s) for t in ts]
    masks = {t.name: t for t in tensors if t.name.endswith("lora_dropout.mask")}
    assert set(masks) == {f"{m}.lora_dropout.mask" for m in s.lora_targets}
    for lm in lay.linears:
        assert masks[f"{lm.module}.lora_dropout.mask"].nbytes(dims_of(s)) == lm.d_in * s.tokens
        assert masks[f"{lm.module}.lora_dropout.mask"].dtype == "bool"
    spec, lay, s = _setup("llama-3.2-1b", method="lora", lora_dropout=0.0)
    assert not any("dropout" in t.name for _, ts in layer_tensors(spec.arch, lay, s) for t in ts)


def test_int8_linear_inputs_are_retained_by_the_graph_not_saved():
    spec, lay, s = _setup("qwen3-0.6b", method="lora", dtype="int8")
    kept = dict(layer_tensors(spec.arch, lay, s))["int8_inputs"]
    assert {t.lifetime for t in kept} == {RETAINED}
    assert layer_activations(spec.arch, lay, s).retained == sum(t.nbytes(dims_of(s)) for t in kept)


def test_dora_saves_a_weight_shaped_cast_per_targeted_module():
    spec, lay, s = _setup("llama-3.2-1b", method="lora", trainer="hf", use_dora=True)
    casts = {t.name: t for t in dict(layer_tensors(spec.arch, lay, s))["dora"] if t.name.endswith("weight_cast")}
    assert {c.per for c in casts.values()} == {FIXED}  # per layer, whatever the micro-batch
    assert {n: c.nbytes(dims_of(s)) for n, c in casts.items()} == {f"{lm.module}.dora.weight_cast": 2 * lm.numel
                                                                  for lm in lay.linears}


def test_prefix_keys_and_values_span_the_virtual_tokens():
    spec, lay, s = _setup("qwen2.5-0.5b", method="prefix", batch_size=3, seq_len=1000)
    (kv,) = [t for t in dict(layer_tensors(spec.arch, lay, s))["attention"] if t.per == SPAN]
    d = dims_of(s)
    assert (d.seq, d.span) == (1000, 1000 + s.prefix_tokens)
    # per query token, rounded down as the model always has (pinned by the figures above)
    assert kv.nbytes(d) == d.tokens * (kv.coef * d.span // d.seq)


def test_moe_router_saves_fp32_probabilities_per_expert_and_int64_indices_per_routed_expert():
    spec, lay, s = _setup("mixtral-8x7b", method="full")
    mlp = {t.name: t for t in dict(layer_tensors(spec.arch, lay, s))["mlp"]}
    d, a = dims_of(s), spec.arch
    assert (mlp["router.probs"].nbytes(d), mlp["router.probs"].dtype) == (4 * a.n_experts * s.tokens, "fp32")
    assert (mlp["router.indices"].nbytes(d), mlp["router.indices"].dtype) == (8 * a.experts_per_token * s.tokens, "int64")


def _names(model, op, **opts):
    return {t.name: t for t in _ops(model, **opts)[op]}


def test_grouped_experts_save_a_matmuls_input_only_where_its_weight_has_a_gradient():
    full = _names("qwen3-30b-a3b", "experts_up", method="full")
    assert "experts.gate_up.input" in full and "experts.product" in _names("qwen3-30b-a3b", "experts_down", method="full")
    attn_only = _ops("qwen3-30b-a3b", method="lora", lora_targets="attention")
    assert not [t for t in attn_only["experts_up"] + attn_only["experts_down"] if t.lifetime == SAVED]
    # the gate's tensors and the routed output are saved whatever trains
    assert {"experts.gate_up.output", "experts.act"} <= set(_names("qwen3-30b-a3b", "experts_gate", method="lora",
                                                                   lora_targets="attention"))


def test_lora_on_fused_experts_saves_peft_merged_weight_and_its_gradient_per_parameter():
    spec, lay, s = _setup("qwen3-30b-a3b", method="lora")  # all-linear: router and both fused experts
    ops, a = dict(layer_tensors(spec.arch, lay, s)), spec.arch
    merged = {t.name: t for t in ops["experts_down"] if t.name.startswith("experts.down_proj.merged_weight")}
    numel = a.n_experts * a.hidden * a.moe_intermediate
    assert merged["experts.down_proj.merged_weight"].nbytes(dims_of(s)) == 2 * numel
    assert merged["experts.down_proj.merged_weight.grad"].lifetime == BACKWARD


def test_llama4_experts_run_every_token_through_every_expert():
    spec, _, s = _setup("llama-4-scout", method="lora")
    a, d = spec.arch, dims_of(s)
    gate = _names("llama-4-scout", "experts_gate", method="lora")
    assert gate["experts.gate_up.output"].nbytes(d) == 2 * a.n_experts * 2 * a.intermediate * s.tokens
    assert _names("llama-4-scout", "mlp", method="lora")["experts.repeated_input"].nbytes(d) == 2 * a.n_experts * a.hidden * s.tokens


def test_gpt_oss_runs_eager_attention_saving_only_its_16bit_probabilities():
    att = _names("gpt-oss-20b", "attention", method="lora")
    scores = [t for t in att.values() if t.per == SCORES and t.lifetime == SAVED]
    assert [(t.name, t.dtype) for t in scores] == [("attn_probs_with_sinks", "bf16")]


def test_a_dense_first_layer_of_an_moe_model_costs_a_dense_mlp():
    from vramplan.activations import stack_activations

    spec, lay, s = _setup("moonlight-16b-a3b", method="full")
    dense, moe = lay.groups[0], lay.groups[1]
    assert (dense.count, dense.moe, moe.moe) == (1, False, True)
    acts = {g.moe: layer_activations(spec.arch, lay, s, group=g) for g in lay.groups}
    assert acts[False].saved != acts[True].saved
    assert stack_activations(spec.arch, lay, s).saved == acts[False].saved + (spec.arch.layers - 1) * acts[True].saved


def test_backward_peak_is_the_first_largest_moment_counting_carried_gradients():
    at_loss = Moment(0, 100, 10, 5, carried=50)
    late = Moment(40, 60, 10, 6)
    assert backward_peak((at_loss, late)) is at_loss  # 165 > 116: carried gradients are on the card
    assert backward_peak((Moment(0, 1, 0, 0), Moment(1, 0, 0, 0))).activations == 1  # ties: the first


def test_breakdown_is_the_peak_moment_over_the_steady_states():
    e = estimate_setup(*_setup("llama-3.2-1b", method="full", grad_accum=4)[::2])
    assert sum(e.breakdown.values()) == e.peak_allocated_bytes == e.phases[e.peak_phase]
    steady = e.breakdown["weights"] + e.breakdown["adapters"] + e.breakdown["optimizer_states"] + e.breakdown["cublas_workspace"]
    assert e.phases["optimizer_step"] == steady + e.terms["grads"] + e.terms["hold"] + e.terms["opt_transient"]


def test_liger_norms_save_their_input_as_is_and_an_fp32_rstd_per_row():
    plain = {t.name for t in _ops("llama-3.2-1b", method="full")["input_norm"]}
    liger = {t.name: t for t in _ops("llama-3.2-1b", method="full", liger=True)["input_norm"]}
    assert "input_layernorm.input_fp32" in plain and "input_layernorm.normalised" in plain
    assert set(liger) == {"input_layernorm.input", "input_layernorm.rstd"}
    assert liger["input_layernorm.input"].dtype == "bf16" and liger["input_layernorm.rstd"].dtype == "fp32"


def test_liger_swiglu_saves_gate_and_up_only_and_writes_their_gradients_in_place():
    plain = {t.name for t in _ops("llama-3.2-1b", method="full")["mlp"]}
    liger = {t.name for t in _ops("llama-3.2-1b", method="full", liger=True)["mlp"]}
    assert "act_fn.output" in plain and "act_fn.output" not in liger
    assert {n for n in liger if n.endswith(".grad")} == {"mlp.product.grad"}


def test_trl_activation_offload_keeps_each_norms_fp32_copy_of_every_layer_on_the_card():
    from vramplan.activations import offload_kept_bytes

    spec, lay, s = _setup("tinyllama-1.1b", method="lora", trainer="trl", activation_offload=True,
                          grad_checkpointing=False)
    dup, working = offload_kept_bytes(spec.arch, lay, s)
    assert dup == 2 * 4 * spec.arch.hidden * s.tokens  # input_layernorm and post_attention_layernorm
    terms = activation_terms(spec.arch, lay, s, stream_dtypes(s))
    assert terms.layers_saved == lay.layers * dup + working
    assert terms.host > 0


def test_kbit_prepared_base_under_trainer_autocast_has_bf16_logits_and_autocast_adapters():
    _, _, hf = _setup("llama-3.2-1b", method="qlora", trainer="hf")
    _, _, plain = _setup("llama-3.2-1b", method="qlora", trainer="plain")
    assert stream_dtypes(hf).logits == 2 and stream_dtypes(hf).lora_autocast
    assert stream_dtypes(plain).logits == 4 and not stream_dtypes(plain).lora_autocast


def test_fp32_lm_head_of_a_kbit_prepared_base_saves_its_bf16_cast_under_trainer_autocast():
    from vramplan.activations import head_activations

    spec, _, hf = _setup("llama-3.2-1b", method="qlora", trainer="hf")
    _, _, plain = _setup("llama-3.2-1b", method="qlora", trainer="plain")
    a = spec.arch
    diff = head_activations(a, hf, stream_dtypes(hf)).saved - head_activations(a, plain, stream_dtypes(plain)).saved
    assert diff == 2 * a.vocab * a.hidden


def test_first_layer_backward_has_every_gradient_but_its_own_and_an_untied_embeddings():
    from vramplan.estimator import first_layer_grad_bytes, model_states

    for name, tied in (("olmo-2-1b", False), ("llama-3.2-1b", True)):
        spec, lay, s = _setup(name, method="full")
        tr = model_states(spec, lay, s).trainable
        per_layer = (lay.params_total - lay.embed_params - lay.lm_head_params - lay.final_norm_params) // lay.layers
        later = per_layer + (0 if tied else lay.embed_params)
        assert first_layer_grad_bytes(lay, tr) == tr.bytes - tr.bytes_per_param * later


def test_dora_forward_transient_holds_the_identity_of_the_widest_input_in_the_adapter_dtype():
    spec, lay, s = _setup("qwen3-4b", trainer="trl", method="lora", use_dora=True)
    ts = {t.name: t for t in dict(layer_tensors(spec.arch, lay, s))["dora"] if t.lifetime == FORWARD}
    inter = spec.arch.intermediate
    assert ts["down_proj.dora.x_eye"].coef == 4 * inter * inter  # fp32 adapters: torch.eye(d_in) in fp32
    assert ts["down_proj.dora.x_eye_cast"].coef == 2 * inter * inter  # lora_A under autocast casts it


def test_dora_on_an_unprepared_4bit_base_under_autocast_runs_fp32_streams():
    _, _, dora = _setup("llama-3.2-3b", trainer="trl", method="qlora", use_dora=True, kbit_prepare=False)
    _, _, lora = _setup("llama-3.2-3b", trainer="trl", method="qlora", kbit_prepare=False)
    assert (stream_dtypes(dora).residual, stream_dtypes(dora).linear_out, stream_dtypes(dora).logits) == (4, 4, 2)
    assert stream_dtypes(lora).residual == 2


def test_an_fp32_adapter_on_down_proj_adds_its_backward_moment_on_16bit_streams_only():
    ops = _ops("llama-3.1-8b", method="lora", trainer="trl", grad_checkpointing=True)
    names = {t.name for t in ops["down_proj_backward"]}
    assert {"layer_output.grad", "down_proj.lora_A.input_grad_fp32", "down_proj.lora_dropout.input_grad_fp32"} <= names
    assert all(t.lifetime == BACKWARD for t in ops["down_proj_backward"])
    assert not _ops("llama-3.1-8b", method="lora", lora_targets="attention")["down_proj_backward"]
    assert not _ops("llama-3.1-8b", method="qlora", trainer="hf")["down_proj_backward"]  # kbit-prepared: fp32 streams
    assert not _ops("llama-3.1-8b", method="qlora", trainer="trl", kbit_prepare=False)["down_proj_backward"]  # 16-bit adapters


def test_a_tied_embeddings_gradient_arrives_beside_one_buffer_behind_a_fused_head_two_behind_transformers():
    from vramplan.estimator import model_states, tied_embedding_grad_bytes

    def extra(**opts):
        spec, lay, s = _setup("llama-3.2-1b", method="full", **opts)
        return tied_embedding_grad_bytes(spec.arch, model_states(spec, lay, s).trainable, s)

    vh = 128256 * 2048 * 2  # llama-3.2-1b's tied embedding in bf16
    assert extra(trainer="hf") == 2 * vh and extra(trainer="plain") == 2 * vh
    assert extra(trainer="trl") == vh and extra(trainer="hf", liger=True) == vh
    spec, lay, s = _setup("llama-3.2-1b", method="lora")
    assert tied_embedding_grad_bytes(spec.arch, model_states(spec, lay, s).trainable, s) == 0


def test_a_4bit_base_dequantises_down_proj_for_its_input_gradient():
    from vramplan.activations import layer_tensors
    from vramplan.catalog import resolve_model
    from vramplan.layout import layout
    from vramplan.setup import make_setup

    spec = resolve_model("llama-3.1-70b")
    qlora = make_setup(spec, method="qlora", trainer="trl", grad_checkpointing=True, batch_size=1, seq_len=2048)
    ops = dict(layer_tensors(spec.arch, layout(spec), qlora))
    deq = [t for t in ops["dequant_backward"] if t.name == "down_proj.weight_dequantised"]
    assert len(deq) == 1 and deq[0].coef == 2 * 28672 * 8192  # bf16, the whole weight
    lora = make_setup(spec, method="lora", trainer="trl", grad_checkpointing=True, batch_size=1, seq_len=2048)
    assert dict(layer_tensors(spec.arch, layout(spec), lora))["dequant_backward"] == ()


def test_phi3_fused_qkv_output_stays_whole_while_the_kernel_keeps_its_values_view():
    from vramplan.activations import layer_tensors
    from vramplan.catalog import resolve_model
    from vramplan.layout import layout
    from vramplan.setup import make_setup

    def names(model: str) -> dict[str, object]:
        spec = resolve_model(model)
        s = make_setup(spec, method="lora", trainer="hf", batch_size=4, seq_len=2048)
        return {t.name: t for _, ts in layer_tensors(spec.arch, layout(spec), s) for t in ts}

    phi = names("phi-4-mini")
    assert "qkv_proj.output.held_by_values" in phi
    assert "qkv_proj.output.held_by_values" not in names("llama-3.2-1b")  # separate q/k/v projections
