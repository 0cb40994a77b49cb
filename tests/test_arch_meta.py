"""Every supported model_type against transformers' own model built on the meta device: exact
per-tensor names and shapes, on small configs that exercise each config-driven feature."""

from __future__ import annotations

import pytest

from vramplan.arch import DEFAULTS, arch_from_hf_config, build_spec

pytestmark = pytest.mark.slow

_S = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
# One small config per type, each turning on the keys that change the inventory.
SMALL: dict[str, dict] = {
    "llama": dict(_S, num_hidden_layers=2, attention_bias=True, mlp_bias=True),
    "mistral": dict(_S, num_hidden_layers=2, head_dim=32, sliding_window=None),
    "qwen2": dict(_S, num_hidden_layers=2, tie_word_embeddings=True),
    "qwen3": dict(_S, num_hidden_layers=2, head_dim=16),
    "gemma": dict(_S, num_hidden_layers=2, head_dim=16),
    "gemma2": dict(_S, num_hidden_layers=3, head_dim=16),
    "gemma3_text": dict(_S, num_hidden_layers=7, head_dim=16, sliding_window=16),
    "phi3": dict(_S, num_hidden_layers=2, pad_token_id=0),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64),
    "mixtral": dict(_S, num_hidden_layers=2, num_local_experts=4),
    "qwen2_moe": dict(_S, num_hidden_layers=4, num_experts=4, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, mlp_only_layers=[0], decoder_sparse_step=1),
    "qwen3_moe": dict(_S, num_hidden_layers=4, num_experts=4, moe_intermediate_size=32, head_dim=16,
                      decoder_sparse_step=2),
    "olmo2": dict(_S, num_hidden_layers=2),
    "smollm3": dict(_S, num_hidden_layers=4, pad_token_id=0),
    "granite": dict(_S, num_hidden_layers=2, embedding_multiplier=12.0, logits_scaling=8.0, tie_word_embeddings=True),
    "llama4_text": dict(_S, num_hidden_layers=4, num_local_experts=4, intermediate_size_mlp=80, head_dim=16,
                        interleave_moe_layer_step=2),
    "gpt_oss": dict(_S, num_hidden_layers=2, num_local_experts=4, head_dim=16),
    "deepseek_v3": dict(_S, num_hidden_layers=3, n_routed_experts=4, moe_intermediate_size=32, q_lora_rank=24,
                        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=2,
                        topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1, n_shared_experts=2),
    "deepseek_v3-no-q-lora": dict(_S, num_hidden_layers=2, n_routed_experts=4, moe_intermediate_size=32,
                                  q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                  v_head_dim=16, n_group=2, topk_group=1, num_experts_per_tok=2,
                                  first_k_dense_replace=1),
}


def meta_params(model_type: str, cfg: dict) -> dict[str, tuple[int, ...]]:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.AutoConfig.for_model(model_type, **cfg)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def test_every_supported_model_type_has_a_small_cross_check_config():
    assert {k.split("-")[0] for k in SMALL} == set(DEFAULTS)


@pytest.mark.parametrize("key", sorted(SMALL))
def test_small_config_inventory_equals_transformers_meta_model(key):
    mt = key.split("-")[0]
    cfg = SMALL[key]
    spec = build_spec(arch_from_hf_config({"model_type": mt, **cfg}, key))
    assert {t.name: t.shape for t in spec.tensors} == meta_params(mt, cfg)


@pytest.mark.parametrize("model_type", sorted(DEFAULTS))
def test_config_class_defaults_build_the_same_model_as_transformers(model_type):
    """A config.json holding only model_type and the layer count: every other value is the
    transformers config class's default (layers shrunk so the meta build stays fast)."""
    n = 4 if model_type != "gpt2" else None
    cfg = {"num_hidden_layers": n} if n else {"n_layer": 2}
    spec = build_spec(arch_from_hf_config({"model_type": model_type, **cfg}, model_type))
    assert {t.name: t.shape for t in spec.tensors} == meta_params(model_type, cfg)
