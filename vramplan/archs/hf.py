"""Read an HF config.json dict into an ArchConfig, driven by the keys the config holds.

Missing keys take the defaults of the model type's transformers configuration class
(transformers 5.23 `models/<type>/configuration_<type>.py`, dumped with
`AutoConfig.for_model(model_type).to_dict()`); the per-type TRAITS are the few structural facts a
config.json does not spell (module names, biases the modelling code hard-codes)."""

from __future__ import annotations

from typing import Any

from vramplan.archs.spec import ArchConfig
from vramplan.errors import VramplanError

_GEMMA_ACT = "gelu_pytorch_tanh"
# Defaults of each configuration class (transformers 5.23 configuration_<type>.py).
DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=2048, tie_word_embeddings=False),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                    tie_word_embeddings=False, sliding_window=4096),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=32768, tie_word_embeddings=False),
    "qwen3": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, head_dim=128, max_position_embeddings=32768, tie_word_embeddings=False),
    "gemma": dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                  num_attention_heads=16, head_dim=256, max_position_embeddings=8192, tie_word_embeddings=True,
                  hidden_act=_GEMMA_ACT),
    "gemma2": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
                   tie_word_embeddings=True, hidden_activation=_GEMMA_ACT, sliding_window=4096,
                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    "gemma3_text": dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131072,
                        tie_word_embeddings=True, hidden_activation=_GEMMA_ACT, sliding_window=4096,
                        sliding_window_pattern=6),
    "phi3": dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                 num_attention_heads=32, max_position_embeddings=4096, tie_word_embeddings=False),
    "gpt2": dict(vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024, tie_word_embeddings=True,
                 activation_function="gelu_new"),
    "mixtral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                    tie_word_embeddings=False, num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                      num_attention_heads=16, max_position_embeddings=32768, tie_word_embeddings=False,
                      moe_intermediate_size=1408, shared_expert_intermediate_size=5632, num_experts=60,
                      num_experts_per_tok=4, decoder_sparse_step=1),
    "qwen3_moe": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=24,
                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=32768,
                      tie_word_embeddings=False, moe_intermediate_size=768, num_experts=128,
                      num_experts_per_tok=8, decoder_sparse_step=1),
    "olmo2": dict(vocab_size=50304, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=2048, tie_word_embeddings=False),
    "smollm3": dict(vocab_size=128256, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                    num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=32768,
                    tie_word_embeddings=True, no_rope_layer_interval=4),
    "granite": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, max_position_embeddings=2048, tie_word_embeddings=False),
    "llama4_text": dict(vocab_size=202048, hidden_size=5120, intermediate_size=8192, intermediate_size_mlp=16384,
                        num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8, head_dim=128,
                        max_position_embeddings=131072, tie_word_embeddings=False, num_local_experts=16,
                        num_experts_per_tok=1, interleave_moe_layer_step=1, use_qk_norm=True,
                        no_rope_layer_interval=4, attention_chunk_size=8192),
    "gpt_oss": dict(vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=36,
                    num_attention_heads=64, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                    tie_word_embeddings=False, attention_bias=True, sliding_window=128, num_local_experts=128,
                    num_experts_per_tok=4),
    "deepseek_v3": dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, num_hidden_layers=61,
                        num_attention_heads=128, num_key_value_heads=128, max_position_embeddings=4096,
                        tie_word_embeddings=False, moe_intermediate_size=2048, n_routed_experts=256,
                        n_shared_experts=1, num_experts_per_tok=8, first_k_dense_replace=3, q_lora_rank=1536,
                        kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128),
}

_QK = dict(qk_norm=True)
_NORM4 = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
# Structure a config.json does not state, from each modeling_<type>.py (transformers 5.23):
# attention biases hard-coded (Qwen2Attention q/k/v bias=True), norm lists, MoE module names.
# peft_moe_pattern: peft 0.21 utils/transformers_weight_conversion.py maps these types'
# v4 expert/router targets onto v5 parameters (via transformers' _MODEL_TO_CONVERSION_PATTERN).
TRAITS: dict[str, dict[str, Any]] = {
    "llama": {}, "mistral": {}, "granite": {}, "smollm3": {},
    "qwen2": dict(qkv_bias=True, o_bias=False),
    "qwen3": _QK,
    "gemma": dict(scale_embeddings=True),
    "gemma2": dict(scale_embeddings=True, norm_names=_NORM4),
    "gemma3_text": dict(scale_embeddings=True, norm_names=_NORM4, qk_norm=True),
    "phi3": dict(fused_qkv=True, fused_gate_up=True),
    "olmo2": dict(qk_norm=True, qk_norm_full=True, norm_names=("post_attention_layernorm", "post_feedforward_layernorm")),
    "mixtral": dict(peft_moe_pattern="mixtral"),
    "qwen2_moe": dict(qkv_bias=True, o_bias=False, shared_expert_gate=True),
    "qwen3_moe": dict(qk_norm=True, peft_moe_pattern="qwen2_moe"),
    "llama4_text": dict(mlp_module="feed_forward", router_module="router", router_linear=True, experts_in_out=True,
                        experts_every_token=True),
    "gpt_oss": dict(router_module="router", router_bias=True, expert_bias=True, experts_in_out=True, attn_sinks=True,
                    router_topk_first=True, clamped_swiglu=True),
    "deepseek_v3": dict(shared_module="shared_experts", peft_moe_pattern="qwen2_moe", router_fp32=True),
}
FAMILIES: dict[str, str] = {mt: "gpt2" if mt == "gpt2" else ("moe" if mt in (
    "mixtral", "qwen2_moe", "qwen3_moe", "llama4_text", "gpt_oss", "deepseek_v3") else "llama") for mt in DEFAULTS}


def _posint(cfg: dict[str, Any], key: str, source: str) -> int:
    if key not in cfg or cfg[key] is None:
        raise VramplanError(f"config {source!r} lacks required key {key!r} for model_type {cfg.get('model_type')!r}")
    val = cfg[key]
    if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
        raise VramplanError(f"config {source!r}: {key}={val!r} must be a positive integer")
    return val


def _attention_types(cfg: dict[str, Any], mt: str, n: int, rope: tuple[bool, ...]) -> tuple[str, ...]:
    """Per-layer attention kind, from `layer_types` when given, else the config class's rule."""
    lt = cfg.get("layer_types")
    if lt:
        return tuple(str(t).removesuffix("_attention") for t in lt[:n])
    window = cfg.get("sliding_window")
    if mt in ("gemma2", "gpt_oss"):  # Gemma2Config/GptOssConfig: sliding if (i + 1) % 2
        return tuple("sliding" if (i + 1) % 2 else "full" for i in range(n))
    if mt == "gemma3_text":  # Gemma3TextConfig: sliding unless (i + 1) % sliding_window_pattern == 0
        pat = cfg.get("sliding_window_pattern", 6)
        return tuple("sliding" if (i + 1) % pat else "full" for i in range(n))
    if mt == "llama4_text":  # Llama4TextConfig: chunked attention on rope layers
        return tuple("chunked" if r else "full" for r in rope)
    if mt == "smollm3":  # SmolLM3Config: sliding only on NoPE layers with use_sliding_window
        return tuple("sliding" if cfg.get("use_sliding_window") and window and not r else "full" for r in rope)
    if mt in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):  # Qwen2Config: sliding from max_window_layers
        on = cfg.get("use_sliding_window") and window
        return tuple("sliding" if on and i >= cfg.get("max_window_layers", 28) else "full" for i in range(n))
    if mt in ("mistral", "mixtral", "phi3") and window:  # MistralAttention: sliding_window on every layer
        return ("sliding",) * n
    return ("full",) * n


def _rope_layers(cfg: dict[str, Any], n: int) -> tuple[bool, ...]:
    """`no_rope_layers` (1 = rope, 0 = NoPE); default one NoPE layer every `no_rope_layer_interval`
    (Llama4TextConfig, SmolLM3Config)."""
    nr = cfg.get("no_rope_layers")
    if nr:
        return tuple(bool(x) for x in nr[:n])
    k = cfg.get("no_rope_layer_interval")
    return tuple(bool((i + 1) % k) for i in range(n)) if k else ()


def _moe_layers(cfg: dict[str, Any], n: int, n_experts: int) -> tuple[bool, ...]:
    """Which layers route to experts: Llama 4 `moe_layers`/`interleave_moe_layer_step`, DeepSeek
    `first_k_dense_replace`, Qwen `mlp_only_layers`/`decoder_sparse_step`; else every layer."""
    if not n_experts:
        return ()
    if cfg.get("moe_layers") is not None or "interleave_moe_layer_step" in cfg:
        step = cfg.get("interleave_moe_layer_step", 1)
        ml = set(cfg["moe_layers"]) if cfg.get("moe_layers") is not None else set(range(step - 1, n, step))
        return tuple(i in ml for i in range(n))
    k = cfg.get("first_k_dense_replace", 0)
    only = set(cfg.get("mlp_only_layers") or ())
    step = cfg.get("decoder_sparse_step", 1) or 1
    return tuple(i >= k and i not in only and (i + 1) % step == 0 for i in range(n))


def _gpt2(cfg: dict[str, Any], name: str) -> ArchConfig:
    hidden = _posint(cfg, "n_embd", name)
    heads = _posint(cfg, "n_head", name)
    if hidden % heads:
        raise VramplanError(f"config {name!r}: n_embd={hidden} is not divisible by n_head={heads}")
    return ArchConfig(
        name=name, model_type="gpt2", hidden=hidden, intermediate=cfg.get("n_inner") or 4 * hidden,
        layers=_posint(cfg, "n_layer", name), heads=heads, kv_heads=heads, head_dim=hidden // heads,
        vocab=_posint(cfg, "vocab_size", name), tied=bool(cfg["tie_word_embeddings"]),
        max_positions=_posint(cfg, "n_positions", name), qkv_bias=True, o_bias=True, mlp_bias=True,
        activation=cfg["activation_function"], norm_names=("ln_1", "ln_2"), hf_config=dict(cfg),
    )


def _experts(cfg: dict[str, Any]) -> int:
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        if cfg.get(key):
            return int(cfg[key])
    return 0


def arch_from_hf_config(raw: dict[str, Any], name: str = "custom") -> ArchConfig:
    """Read an HF config.json dict (keys as transformers writes them) into an ArchConfig."""
    mt = raw.get("model_type")
    if mt not in DEFAULTS and isinstance(raw.get("text_config"), dict):
        # Multimodal wrappers (gemma3, llama4) keep the language model under text_config; an
        # absent text model_type is the wrapper's text config class (Gemma3Config -> gemma3_text).
        text = raw["text_config"]
        return arch_from_hf_config({"model_type": f"{mt}_text", **text}, name)
    if mt not in DEFAULTS:
        if not mt or not isinstance(mt, str):
            raise VramplanError(
                f"config {name!r}: model_type {mt!r} is not supported; supported: {', '.join(sorted(DEFAULTS))}"
            )
        from vramplan.archs.meta import meta_arch  # any other causal LM, via transformers' meta device

        return meta_arch(raw, name, DEFAULTS)
    cfg = {**DEFAULTS[mt], **{k: v for k, v in raw.items() if v is not None or k in ("sliding_window", "q_lora_rank")}}
    if mt == "gpt2":
        return _gpt2(cfg, name)
    t = TRAITS[mt]
    hidden = _posint(cfg, "hidden_size", name)
    heads = _posint(cfg, "num_attention_heads", name)
    layers = _posint(cfg, "num_hidden_layers", name)
    kv_heads = cfg.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise VramplanError(f"config {name!r}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    n_exp = _experts(cfg)
    rope = _rope_layers(cfg, layers)
    mla = dict(kv_lora_rank=cfg.get("kv_lora_rank") or 0, q_lora_rank=cfg.get("q_lora_rank") or 0,
               qk_nope_head_dim=cfg.get("qk_nope_head_dim") or 0, qk_rope_head_dim=cfg.get("qk_rope_head_dim") or 0,
               v_head_dim=cfg.get("v_head_dim") or 0)
    head_dim = mla["qk_nope_head_dim"] + mla["qk_rope_head_dim"] if mla["kv_lora_rank"] else (
        cfg.get("head_dim") or hidden // heads)
    if mla["kv_lora_rank"]:
        kv_heads = heads  # MLA expands keys/values to every head (DeepseekV3Attention)
    bias = bool(cfg.get("attention_bias", False))
    inter = _posint(cfg, "intermediate_size", name)
    shared = cfg.get("shared_expert_intermediate_size", 0) or (
        cfg.get("moe_intermediate_size", 0) * cfg.get("n_shared_experts", 0))
    if mt == "llama4_text":
        shared = inter  # Llama4TextMoe.shared_expert = Llama4TextMLP(config): intermediate_size
    norm_names = t.get("norm_names", ("input_layernorm", "post_attention_layernorm"))
    scal = {k: t[k] for k in ("fused_qkv", "fused_gate_up", "qk_norm", "qk_norm_full", "scale_embeddings", "mlp_module",
                              "router_module", "router_linear", "router_bias", "shared_module", "shared_expert_gate",
                              "expert_bias", "experts_in_out", "peft_moe_pattern", "attn_sinks", "experts_every_token",
                              "router_fp32", "router_topk_first", "clamped_swiglu") if k in t}
    return ArchConfig(
        name=name, model_type=mt, hidden=hidden, intermediate=inter, layers=layers, heads=heads, kv_heads=kv_heads,
        head_dim=head_dim, vocab=_posint(cfg, "vocab_size", name), tied=bool(cfg.get("tie_word_embeddings")),
        max_positions=_posint(cfg, "max_position_embeddings", name),
        qkv_bias=t.get("qkv_bias", bias), o_bias=t.get("o_bias", bias), mlp_bias=bool(cfg.get("mlp_bias", False)),
        norms_per_layer=len(norm_names), norm_names=norm_names,
        activation=cfg.get("hidden_act") or cfg.get("hidden_activation") or "silu",
        n_experts=n_exp, experts_per_token=cfg.get("num_experts_per_tok", 0) if n_exp else 0,
        moe_intermediate=cfg.get("moe_intermediate_size", 0) if n_exp else 0,
        shared_expert_intermediate=shared if n_exp else 0,
        final_logit_softcap=cfg.get("final_logit_softcapping"), attn_logit_softcap=cfg.get("attn_logit_softcapping"),
        layer_attention=_attention_types(cfg, mt, layers, rope), sliding_window=cfg.get("sliding_window"),
        attention_chunk=cfg.get("attention_chunk_size"), layer_rope=rope, layer_moe=_moe_layers(cfg, layers, n_exp),
        dense_intermediate=cfg.get("intermediate_size_mlp", 0) if n_exp else 0,
        qk_l2norm=bool(cfg.get("use_qk_norm")) and mt == "llama4_text",
        logits_scaling=float(cfg.get("logits_scaling", 1.0)), embedding_multiplier=float(cfg.get("embedding_multiplier", 1.0)),
        residual_multiplier=float(cfg.get("residual_multiplier", 1.0)), attention_multiplier=cfg.get("attention_multiplier"),
        **mla, **scal, hf_config=dict(raw),
    )
