"""Heterogeneous layers, MoE LoRA targets (peft 0.21 on transformers 5) and what a 4-bit load
leaves in 16 bits."""

from __future__ import annotations

import pytest

from vramplan.arch import arch_from_hf_config, build_spec
from vramplan.catalog import resolve_model
from vramplan.layout import layout
from vramplan.setup import resolve_targets


# Hub safetensors totals (the model page's parameter count); Mistral Small 3.1's is its text model's
# (the mistral3 wrapper adds a 0.44B vision tower).
@pytest.mark.parametrize(("name", "published"), [
    ("granite-3.3-8b", 8_170_864_640), ("qwen3-30b-a3b", 30_532_122_624), ("gpt-oss-20b", 20_914_757_184),
    ("gpt-oss-120b", 116_829_156_672), ("gemma-3-1b", 999_885_952), ("phi-4", 14_659_507_200),
    ("phi-4-mini", 3_836_021_760), ("olmo-2-7b", 7_298_617_344), ("olmo-2-13b", 13_716_198_400),
    ("mistral-small-3.1-24b", 23_572_403_200),
])
def test_new_architectures_match_published_parameter_totals(name, published):
    assert resolve_model(name).params_total == published


@pytest.mark.parametrize(("name", "published", "extra_rows"), [
    # Qwen3-1.7B's safetensors store the tied lm_head a second time (hub total 2,031,739,904)
    ("qwen3-1.7b", 2_031_739_904, 151936),
    # keras-hub gemma3_presets.py text-only counts use a 262,144-row vocabulary; the HF text
    # config of the multimodal 4B/12B holds 262,208 rows (64 more)
    ("gemma-3-4b", 3_880_099_328, -64), ("gemma-3-12b", 11_765_788_416, -64),
])
def test_published_totals_that_count_embedding_rows_differently(name, published, extra_rows):
    spec = resolve_model(name)
    assert spec.params_total + extra_rows * spec.arch.hidden == published


@pytest.mark.parametrize("name", ["gemma-3-27b", "llama-4-maverick", "deepseek-v3", "gpt-oss-20b", "mixtral-8x7b", "gpt2"])
def test_layer_groups_sum_to_the_exact_parameter_total(name):
    spec = resolve_model(name)
    lay = layout(spec)
    assert sum(g.count for g in lay.groups) == spec.arch.layers
    glob = lay.embed_params + lay.lm_head_params + lay.final_norm_params
    assert lay.layer_params_total + glob == spec.params_total


def test_deepseek_v3_has_three_dense_layers_then_moe_with_mla():
    groups = layout(resolve_model("deepseek-v3")).groups
    assert [(g.count, g.moe, g.mla) for g in groups] == [(3, False, True), (58, True, True)]


def test_gemma3_alternates_five_sliding_layers_and_one_full():
    g = layout(resolve_model("gemma-3-27b")).groups
    assert [(x.attention, x.window, x.count, x.first) for x in g] == [("sliding", 1024, 52, 0), ("full", None, 10, 5)]
    assert g[0].norms == ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                          "post_feedforward_layernorm")
    assert g[0].qk_norm_width == 128


def test_llama4_nope_layers_use_full_attention_and_chunked_elsewhere():
    g = layout(resolve_model("llama-4-scout")).groups
    assert {(x.attention, x.rope, x.window) for x in g} == {("chunked", True, 8192), ("full", False, None)}


def test_gpt_oss_sinks_biases_and_sliding_window_are_exposed():
    g = layout(resolve_model("gpt-oss-20b")).groups
    assert all(x.sinks and x.moe for x in g)
    assert {x.attention: x.window for x in g} == {"sliding": 128, "full": None}


def test_olmo2_has_post_norms_only_and_full_width_qk_norms():
    spec = build_spec(arch_from_hf_config({"model_type": "olmo2", "num_hidden_layers": 2}, "olmo2"))
    g = layout(spec).groups[0]
    assert g.norms == ("post_attention_layernorm", "post_feedforward_layernorm")
    assert g.qk_norm_width == spec.arch.q_dim


def test_gemma3_wrapper_config_reads_its_text_config():
    a = arch_from_hf_config({"model_type": "gemma3", "text_config": {"hidden_size": 1152, "num_hidden_layers": 26}})
    assert (a.model_type, a.hidden, a.tied) == ("gemma3_text", 1152, True)


def test_mixtral_all_linear_targets_attention_router_and_fused_experts_like_peft():
    assert resolve_targets(resolve_model("mixtral-8x7b"), "all-linear") == (
        "experts.down_proj", "experts.gate_up_proj", "gate", "k_proj", "o_proj", "q_proj", "v_proj")


def test_deepseek_all_linear_skips_dense_and_shared_mlps_as_peft_does():
    t = resolve_targets(resolve_model("deepseek-v3"), "all-linear")
    assert "gate_proj" not in t and "down_proj" not in t and "experts.gate_up_proj" in t


def test_llama4_all_linear_leaves_out_the_tuple_returning_router_and_the_experts():
    t = resolve_targets(resolve_model("llama-4-scout"), "all-linear")
    assert "router" not in t and "gate_proj" in t and not any(x.startswith("experts") for x in t)


def test_llama4_router_as_an_explicit_lora_target_is_refused_naming_it():
    from vramplan.errors import VramplanError

    with pytest.raises(VramplanError, match="'router'.*cannot wrap"):
        resolve_targets(resolve_model("llama-4-scout"), "q_proj,router")


def test_expert_lora_defaults_to_no_dropout_and_refuses_a_given_one():
    from vramplan.errors import VramplanError
    from vramplan.setup import make_setup

    spec = resolve_model("qwen3-30b-a3b")
    assert make_setup(spec, method="lora").lora_dropout == 0.0
    assert make_setup(spec, method="lora", lora_targets="attention").lora_dropout == 0.05
    with pytest.raises(VramplanError, match="lora_dropout 0.1 .*ParamWrapper"):
        make_setup(spec, method="lora", lora_dropout=0.1)


def test_mixtral_qlora_default_rank_is_accepted_and_experts_stay_16_bit():
    from vramplan.estimator import estimate
    from vramplan.weights import base_weight_bytes

    est = estimate("mixtral-8x7b", "qlora")
    assert est.params_trainable > 0
    lay = layout(resolve_model("mixtral-8x7b"))
    w = base_weight_bytes(lay=lay, dtype="nf4", dense_bytes_per_param=2, double_quant=True, quantised=True)
    experts = 32 * 8 * 3 * 4096 * 14336
    router = 32 * 8 * 4096
    assert w.unquantised_linear_params == experts + router
    assert w.dense_params > experts


def test_llama4_router_is_linear_for_lora_but_not_quantised():
    spec = resolve_model("llama-4-scout")
    router = next(t for t in spec.tensors if t.name.endswith("feed_forward.router.weight"))
    assert router.linear and not router.quantisable
    assert not next(t for t in spec.tensors if t.name == "lm_head.weight").quantisable


_TINY = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
PEFT_CASES = {
    "mixtral": dict(_TINY, num_hidden_layers=2, num_local_experts=4),
    "qwen2_moe": dict(_TINY, num_hidden_layers=2, num_experts=4, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48),
    "qwen3_moe": dict(_TINY, num_hidden_layers=3, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16,
                      mlp_only_layers=[1]),
    "llama4_text": dict(_TINY, num_hidden_layers=2, num_local_experts=4, intermediate_size_mlp=80, head_dim=16,
                        interleave_moe_layer_step=2),
    "gpt_oss": dict(_TINY, num_hidden_layers=2, num_local_experts=4, head_dim=16),
    "deepseek_v3": dict(_TINY, num_hidden_layers=3, n_routed_experts=4, moe_intermediate_size=32, q_lora_rank=24,
                        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=2,
                        topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1),
}


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(PEFT_CASES))
def test_lora_all_linear_trainable_count_equals_peft_on_a_tiny_moe(model_type):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from vramplan.methods import lora_params
    from vramplan.profiler.build import lora_targets
    from vramplan.setup import make_setup, profiler_setup

    cfg = PEFT_CASES[model_type]
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(model_type, **cfg))
    spec = build_spec(arch_from_hf_config({"model_type": model_type, **cfg}, model_type))
    setup = make_setup(spec, method="lora", lora_rank=8, lora_targets="all-linear")
    # what the profiler hands peft for this setup ("all-linear" itself where peft can take it)
    targets = lora_targets(profiler_setup(spec, setup))
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=setup.lora_dropout, **targets))
    theirs = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert lora_params(layout(spec), setup)[0] == theirs
    ids = torch.randint(0, cfg["vocab_size"], (1, 8))
    pm(input_ids=ids, labels=ids).loss.backward()  # and peft can run it


@pytest.mark.slow
def test_peft_all_linear_on_llama4_fails_in_the_router_forward():
    """Why vramplan's all-linear leaves Llama 4's router out: peft wraps it and its forward breaks."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cfg = PEFT_CASES["llama4_text"]
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model("llama4_text", **cfg))
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=8, target_modules="all-linear"))
    ids = torch.randint(0, cfg["vocab_size"], (1, 8))
    with pytest.raises(AttributeError, match="tuple"):
        pm(input_ids=ids, labels=ids)


def test_qlora_on_fused_experts_says_they_stay_unquantised_and_what_kbit_prepare_makes_of_them():
    from vramplan.estimator import estimate

    prepared = estimate("mixtral-8x7b", "qlora")
    (note,) = prepared.notes
    assert "45.10B parameters" in note and "fp32" in note and "--no-kbit-prepare" in note
    (plain,) = estimate("mixtral-8x7b", "qlora", kbit_prepare=False).notes
    assert "16-bit" in plain and "upcasts" not in plain
    assert estimate("llama-3.1-8b", "qlora").notes == ()  # every Linear quantised: nothing to say


def test_fused_expert_lora_strands_the_down_pair_only_where_no_freed_logits_block_takes_gate_ups_gradient():
    from vramplan.estimator import model_states
    from vramplan.reserved import merged_weight_stranded_bytes
    from vramplan.setup import make_setup

    def stranded(model, **opts):
        spec = resolve_model(model)
        lay, s = layout(spec), make_setup(spec, method="lora", **opts)
        return merged_weight_stranded_bytes(spec.arch, lay, s, model_states(spec, lay, s))

    a = resolve_model("deepseek-v3").arch
    down = a.n_experts * a.hidden * a.moe_intermediate * 2  # bf16 W' of one layer's fused down_proj
    assert stranded("deepseek-v3") == 2 * down  # its 15 GiB gate_up gradient dwarfs the logits block
    assert stranded("qwen3-30b-a3b", batch_size=2) == 0  # 768 MiB gradient fits the 2.3 GiB fp32 logits block
    assert stranded("qwen3-30b-a3b", trainer="trl") > 0  # TRL's fused head frees no logits block
    assert stranded("deepseek-v3", lora_targets="attention") == 0


def test_a_config_shipping_a_prequantised_checkpoint_says_what_dtype_the_weights_are_costed_in(tmp_path):
    import json

    from vramplan.estimator import estimate

    cfg = {**resolve_model("gpt-oss-20b").arch.hf_config, "num_hidden_layers": 2,
           "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": ["lm_head"]}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    (note,) = estimate(str(path), "lora").notes
    assert "mxfp4" in note and "bf16" in note
    assert estimate("gpt-oss-20b", "lora").notes == ()


def test_the_fused_gate_up_gradient_takes_its_own_segment_only_where_nothing_freed_can_hold_it():
    from vramplan.reserved import fused_gate_up_stranded_bytes
    from vramplan.setup import make_setup
    from vramplan.streams import stream_dtypes

    def stranded(model, **opts):
        spec = resolve_model(model)
        s = make_setup(spec, method="lora", **opts)
        return fused_gate_up_stranded_bytes(spec.arch, layout(spec), s, stream_dtypes(s))

    a = resolve_model("llama-4-maverick").arch
    assert stranded("llama-4-maverick", seq_len=1024) == a.n_experts * 2 * a.intermediate * 1024 * 2  # every expert
    assert stranded("llama-4-maverick", seq_len=1024, grad_checkpointing=True) == 0  # the forward freed its size
    assert stranded("qwen3-30b-a3b", seq_len=2048) == 0  # 8 routed rows: the fp32 logits block holds it
    assert stranded("llama-3.1-8b") == 0  # dense


def test_the_profiler_hands_peft_what_a_user_would_and_lets_transformers_pick_the_attention():
    pytest.importorskip("torch")
    from vramplan.profiler.build import attn_implementation, lora_targets
    from vramplan.setup import make_setup, profiler_setup

    spec = resolve_model("qwen3-30b-a3b")
    assert lora_targets(profiler_setup(spec, make_setup(spec, method="lora"))) == {"target_modules": "all-linear"}
    explicit = lora_targets(profiler_setup(spec, make_setup(spec, method="lora", lora_targets="q_proj,experts.gate_up_proj")))
    assert explicit["target_modules"] == ["q_proj"] and explicit["target_parameters"] == ["gate_up_proj"]
    assert explicit["rank_pattern"] == {r".*\.gate_up_proj": 32}  # gate and up fused: rank 2r, as peft's conversion
    llama4 = resolve_model("llama-4-scout")
    assert lora_targets(profiler_setup(llama4, make_setup(llama4, method="lora")))["target_modules"] != "all-linear"
    assert attn_implementation({"attn": "sdpa"}) is None  # transformers' default: eager where a model has no SDPA
    assert attn_implementation({"attn": "eager"}) == "eager"
