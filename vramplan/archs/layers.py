"""The per-tensor inventory of an ArchConfig, in transformers' own parameter names and shapes
(transformers 5.23 modeling_<type>.py); tests/test_arch*.py check it against the model
transformers builds on the meta device."""

from __future__ import annotations

from vramplan.archs.spec import ArchConfig, Kind, ModelSpec, TensorSpec


def _linear(prefix: str, module: str, d_out: int, d_in: int, kind: Kind, layer: int, bias: bool,
            quantisable: bool = True) -> list[TensorSpec]:
    full = f"{prefix}.{module}"
    short = module.rsplit(".", 1)[-1]
    out = [TensorSpec(f"{full}.weight", (d_out, d_in), kind, layer, short, linear=True, quantisable=quantisable)]
    if bias:
        out.append(TensorSpec(f"{full}.bias", (d_out,), "bias", layer, short))
    return out


def _norm(name: str, width: int, layer: int | None) -> TensorSpec:
    return TensorSpec(f"{name}.weight", (width,), "norm", layer, name.rsplit(".", 1)[-1])


def _mla(a: ArchConfig, p: str, i: int) -> list[TensorSpec]:
    """DeepseekV3Attention: low-rank query (q_a_proj, q_a_layernorm, q_b_proj; a plain q_proj when
    q_lora_rank is None), joint compressed key/value plus the shared rope key (kv_a_proj_with_mqa),
    kv_a_layernorm, kv_b_proj to per-head nope keys and values, o_proj from heads x v_head_dim."""
    h, n, bias = a.hidden, a.heads, a.o_bias
    qk = a.qk_nope_head_dim + a.qk_rope_head_dim
    if a.q_lora_rank:
        t = _linear(p, "self_attn.q_a_proj", a.q_lora_rank, h, "attn", i, bias)
        t.append(_norm(f"{p}.self_attn.q_a_layernorm", a.q_lora_rank, i))
        t += _linear(p, "self_attn.q_b_proj", n * qk, a.q_lora_rank, "attn", i, False)
    else:
        t = _linear(p, "self_attn.q_proj", n * qk, h, "attn", i, False)
    t += _linear(p, "self_attn.kv_a_proj_with_mqa", a.kv_lora_rank + a.qk_rope_head_dim, h, "attn", i, bias)
    t.append(_norm(f"{p}.self_attn.kv_a_layernorm", a.kv_lora_rank, i))
    t += _linear(p, "self_attn.kv_b_proj", n * (a.qk_nope_head_dim + a.v_head_dim), a.kv_lora_rank, "attn", i, False)
    t += _linear(p, "self_attn.o_proj", h, n * a.v_head_dim, "attn", i, bias)
    return t


def _attention(a: ArchConfig, p: str, i: int) -> list[TensorSpec]:
    if a.mla:
        return _mla(a, p, i)
    t: list[TensorSpec] = []
    if a.fused_qkv:
        t += _linear(p, "self_attn.qkv_proj", a.q_dim + 2 * a.kv_dim, a.hidden, "attn", i, a.qkv_bias)
    else:
        t += _linear(p, "self_attn.q_proj", a.q_dim, a.hidden, "attn", i, a.qkv_bias)
        t += _linear(p, "self_attn.k_proj", a.kv_dim, a.hidden, "attn", i, a.qkv_bias)
        t += _linear(p, "self_attn.v_proj", a.kv_dim, a.hidden, "attn", i, a.qkv_bias)
    t += _linear(p, "self_attn.o_proj", a.hidden, a.q_dim, "attn", i, a.o_bias)
    if a.qk_norm:
        qw, kw = (a.q_dim, a.kv_dim) if a.qk_norm_full else (a.head_dim, a.head_dim)
        t += [_norm(f"{p}.self_attn.q_norm", qw, i), _norm(f"{p}.self_attn.k_norm", kw, i)]
    if a.attn_sinks:  # GptOssAttention.sinks: one learned logit per head
        t.append(TensorSpec(f"{p}.self_attn.sinks", (a.heads,), "attn", i, "sinks"))
    return t


def _dense_mlp(a: ArchConfig, p: str, i: int, width: int, bias: bool) -> list[TensorSpec]:
    if a.fused_gate_up:
        return (_linear(p, "mlp.gate_up_proj", 2 * width, a.hidden, "mlp", i, bias)
                + _linear(p, "mlp.down_proj", a.hidden, width, "mlp", i, bias))
    t: list[TensorSpec] = []
    for m in ("gate_proj", "up_proj"):
        t += _linear(p, m, width, a.hidden, "mlp", i, bias)
    return t + _linear(p, "down_proj", a.hidden, width, "mlp", i, bias)


def _moe(a: ArchConfig, p: str, i: int) -> list[TensorSpec]:
    """Routed experts as two fused 3-D parameters per layer (not nn.Linear in transformers 5):
    [E, 2I, H] and [E, H, I] (MixtralExperts), or [E, H, 2I] and [E, I, H] (Llama4TextExperts,
    GptOssExperts, which also carry per-expert biases); a router; optional shared experts."""
    e, h, inter = a.n_experts, a.hidden, a.moe_intermediate or a.intermediate
    m = f"{p}.{a.mlp_module}"
    r = f"{m}.{a.router_module}"
    t = [TensorSpec(f"{r}.weight", (e, h), "router", i, a.router_module, linear=a.router_linear)]
    if a.router_bias:
        t.append(TensorSpec(f"{r}.bias", (e,), "bias", i, a.router_module))
    gu, dn = ((e, h, 2 * inter), (e, inter, h)) if a.experts_in_out else ((e, 2 * inter, h), (e, h, inter))
    t += [TensorSpec(f"{m}.experts.gate_up_proj", gu, "mlp", i, "experts"),
          TensorSpec(f"{m}.experts.down_proj", dn, "mlp", i, "experts")]
    if a.expert_bias:
        t += [TensorSpec(f"{m}.experts.gate_up_proj_bias", (e, 2 * inter), "bias", i, "experts"),
              TensorSpec(f"{m}.experts.down_proj_bias", (e, h), "bias", i, "experts")]
    if a.shared_expert_intermediate:
        t += _dense_mlp(a, f"{m}.{a.shared_module}", i, a.shared_expert_intermediate, False)
    if a.shared_expert_gate:
        t += _linear(m, "shared_expert_gate", 1, h, "router", i, False)
    return t


def _layer(a: ArchConfig, i: int) -> list[TensorSpec]:
    p = f"model.layers.{i}"
    t = _attention(a, p, i)
    if a.moe_of(i):
        t += _moe(a, p, i)
    elif a.fused_gate_up:
        t += _dense_mlp(a, p, i, a.intermediate, a.mlp_bias)
    else:
        t += _dense_mlp(a, f"{p}.{a.mlp_module}", i, a.dense_intermediate or a.intermediate, a.mlp_bias)
    return t + [_norm(f"{p}.{n}", a.hidden, i) for n in a.norm_names]


def _gpt2_layer(a: ArchConfig, i: int) -> list[TensorSpec]:
    """GPT-2's Conv1D stores weights as [in, out]; they are Linear-like for LoRA and bnb."""
    p = f"transformer.h.{i}"
    h, f = a.hidden, a.intermediate
    t: list[TensorSpec] = []
    for ln in ("ln_1", "ln_2"):
        t += [TensorSpec(f"{p}.{ln}.weight", (h,), "norm", i, ln), TensorSpec(f"{p}.{ln}.bias", (h,), "bias", i, ln)]
    for mod, shape, kind in (("attn.c_attn", (h, 3 * h), "attn"), ("attn.c_proj", (h, h), "attn"),
                             ("mlp.c_fc", (h, f), "mlp"), ("mlp.c_proj", (f, h), "mlp")):
        short = mod.rsplit(".", 1)[-1]
        t.append(TensorSpec(f"{p}.{mod}.weight", shape, kind, i, short, linear=True, quantisable=True))  # type: ignore[arg-type]
        t.append(TensorSpec(f"{p}.{mod}.bias", (shape[1],), "bias", i, short))
    return t


def build_spec(a: ArchConfig) -> ModelSpec:
    """The per-tensor inventory of an architecture, in transformers' own naming."""
    if a.inventory:  # read off transformers' meta-device model (vramplan.archs.meta)
        return ModelSpec(arch=a, tensors=a.inventory)
    if a.family == "gpt2":
        tensors = [TensorSpec("transformer.wte.weight", (a.vocab, a.hidden), "embedding", None, "wte"),
                   TensorSpec("transformer.wpe.weight", (a.max_positions, a.hidden), "embedding", None, "wpe")]
        for i in range(a.layers):
            tensors += _gpt2_layer(a, i)
        tensors += [TensorSpec("transformer.ln_f.weight", (a.hidden,), "norm", None, "ln_f"),
                    TensorSpec("transformer.ln_f.bias", (a.hidden,), "bias", None, "ln_f")]
    else:
        tensors = [TensorSpec("model.embed_tokens.weight", (a.vocab, a.hidden), "embedding", None, "embed_tokens")]
        for i in range(a.layers):
            tensors += _layer(a, i)
        tensors.append(TensorSpec("model.norm.weight", (a.hidden,), "norm", None, "norm"))
    if not a.tied:  # lm_head: nn.Linear, but bitsandbytes never quantises the output embeddings
        tensors.append(TensorSpec("lm_head.weight", (a.vocab, a.hidden), "lm_head", None, "lm_head", linear=True))
    return ModelSpec(arch=a, tensors=tuple(tensors))
