"""vramplan's view of an architecture: hyperparameters (ArchConfig) and the per-tensor inventory
(ModelSpec) from which every count and byte figure derives.

The inventory mirrors the parameter names and shapes of transformers' own modelling code
(transformers 5.x `modeling_llama.py`, `modeling_qwen2.py`, `modeling_gemma2.py`,
`modeling_phi3.py`, `modeling_gpt2.py`, `modeling_mixtral.py`, `modeling_qwen2_moe.py`);
tests/test_arch.py checks every catalogue model against the model transformers builds on the
meta device.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

from vramplan.errors import VramplanError

Kind = Literal["embedding", "attn", "mlp", "norm", "lm_head", "router", "bias"]
KINDS: tuple[Kind, ...] = ("embedding", "attn", "mlp", "norm", "lm_head", "router", "bias")

# model_type -> family. "llama" covers every Llama-style decoder (RMSNorm, rotary, gated MLP).
FAMILIES: dict[str, str] = {
    "llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gemma": "llama",
    "gemma2": "llama", "phi3": "llama", "gpt2": "gpt2", "mixtral": "moe", "qwen2_moe": "moe",
}


@dataclass(frozen=True)
class TensorSpec:
    """One parameter tensor. `linear` marks weights of nn.Linear modules (what bitsandbytes
    quantises and LoRA targets); `module` is the HF module name LoRA's target list matches."""

    name: str
    shape: tuple[int, ...]
    kind: Kind
    layer: int | None = None
    module: str = ""
    linear: bool = False

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class ArchConfig:
    """Normalised hyperparameters of a decoder-only causal LM."""

    name: str
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    max_positions: int
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    norms_per_layer: int = 2
    fused_qkv: bool = False
    fused_gate_up: bool = False
    activation: str = "silu"
    n_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate: int = 0
    shared_expert_intermediate: int = 0
    final_logit_softcap: float | None = None
    scale_embeddings: bool = False
    hf_config: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def family(self) -> str:
        return FAMILIES[self.model_type]

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def _req(cfg: dict[str, Any], key: str, source: str) -> Any:
    if key not in cfg:
        raise VramplanError(f"config {source!r} lacks required key {key!r} for model_type {cfg.get('model_type')!r}")
    val = cfg[key]
    if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
        raise VramplanError(f"config {source!r}: {key}={val!r} must be a positive integer")
    return val


def arch_from_hf_config(cfg: dict[str, Any], name: str = "custom") -> ArchConfig:
    """Read an HF config.json dict (keys as transformers writes them) into an ArchConfig."""
    mt = cfg.get("model_type")
    if mt not in FAMILIES:
        raise VramplanError(
            f"config {name!r}: model_type {mt!r} is not supported; supported: {', '.join(sorted(FAMILIES))}"
        )
    if mt == "gpt2":
        hidden = _req(cfg, "n_embd", name)
        heads = _req(cfg, "n_head", name)
        if hidden % heads:
            raise VramplanError(f"config {name!r}: n_embd={hidden} is not divisible by n_head={heads}")
        return ArchConfig(
            name=name, model_type=mt, hidden=hidden, intermediate=cfg.get("n_inner") or 4 * hidden,
            layers=_req(cfg, "n_layer", name), heads=heads, kv_heads=heads, head_dim=hidden // heads,
            vocab=_req(cfg, "vocab_size", name), tied=cfg.get("tie_word_embeddings", True),
            max_positions=cfg.get("n_positions", 1024), qkv_bias=True, o_bias=True, mlp_bias=True,
            activation=cfg.get("activation_function", "gelu_new"), hf_config=dict(cfg),
        )
    hidden = _req(cfg, "hidden_size", name)
    heads = _req(cfg, "num_attention_heads", name)
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    if heads % kv_heads:
        raise VramplanError(f"config {name!r}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    # Defaults below are those of each transformers configuration class (5.x).
    default_tied = mt in ("gemma", "gemma2")
    bias = bool(cfg.get("attention_bias", False))
    return ArchConfig(
        name=name, model_type=mt, hidden=hidden, intermediate=_req(cfg, "intermediate_size", name),
        layers=_req(cfg, "num_hidden_layers", name), heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        vocab=_req(cfg, "vocab_size", name), tied=bool(cfg.get("tie_word_embeddings", default_tied)),
        max_positions=cfg.get("max_position_embeddings", 2048),
        qkv_bias=True if mt in ("qwen2", "qwen2_moe") else bias,  # Qwen2Attention: q/k/v bias=True, o_proj none
        o_bias=bias if mt not in ("qwen2", "qwen2_moe") else False,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        qk_norm=mt == "qwen3",
        norms_per_layer=4 if mt == "gemma2" else 2,  # Gemma2DecoderLayer: pre/post attn + pre/post ffw
        fused_qkv=mt == "phi3", fused_gate_up=mt == "phi3",
        activation=cfg.get("hidden_act") or cfg.get("hidden_activation") or ("gelu_pytorch_tanh" if mt.startswith("gemma") else "silu"),
        n_experts=cfg.get("num_local_experts", cfg.get("num_experts", 0)) if mt in ("mixtral", "qwen2_moe") else 0,
        experts_per_token=cfg.get("num_experts_per_tok", 2) if mt in ("mixtral", "qwen2_moe") else 0,
        moe_intermediate=cfg.get("moe_intermediate_size", 0) if mt == "qwen2_moe" else 0,
        shared_expert_intermediate=cfg.get("shared_expert_intermediate_size", 0) if mt == "qwen2_moe" else 0,
        final_logit_softcap=cfg.get("final_logit_softcapping", 30.0 if mt == "gemma2" else None),
        scale_embeddings=mt.startswith("gemma"),
        hf_config=dict(cfg),
    )


def _linear(prefix: str, module: str, d_out: int, d_in: int, kind: Kind, layer: int, bias: bool) -> list[TensorSpec]:
    full = f"{prefix}.{module}"
    short = module.rsplit(".", 1)[-1]
    out = [TensorSpec(f"{full}.weight", (d_out, d_in), kind, layer, short, linear=True)]
    if bias:
        out.append(TensorSpec(f"{full}.bias", (d_out,), "bias", layer, short))
    return out


def _llama_layer(a: ArchConfig, i: int) -> list[TensorSpec]:
    p = f"model.layers.{i}"
    t: list[TensorSpec] = []
    if a.fused_qkv:
        t += _linear(p, "self_attn.qkv_proj", a.q_dim + 2 * a.kv_dim, a.hidden, "attn", i, a.qkv_bias)
    else:
        t += _linear(p, "self_attn.q_proj", a.q_dim, a.hidden, "attn", i, a.qkv_bias)
        t += _linear(p, "self_attn.k_proj", a.kv_dim, a.hidden, "attn", i, a.qkv_bias)
        t += _linear(p, "self_attn.v_proj", a.kv_dim, a.hidden, "attn", i, a.qkv_bias)
    t += _linear(p, "self_attn.o_proj", a.hidden, a.q_dim, "attn", i, a.o_bias)
    if a.qk_norm:
        t += [TensorSpec(f"{p}.self_attn.{n}.weight", (a.head_dim,), "norm", i, n) for n in ("q_norm", "k_norm")]
    if a.family == "moe":
        t += _moe_block(a, p, i)
    elif a.fused_gate_up:
        t += _linear(p, "mlp.gate_up_proj", 2 * a.intermediate, a.hidden, "mlp", i, a.mlp_bias)
        t += _linear(p, "mlp.down_proj", a.hidden, a.intermediate, "mlp", i, a.mlp_bias)
    else:
        for m in ("gate_proj", "up_proj"):
            t += _linear(p, f"mlp.{m}", a.intermediate, a.hidden, "mlp", i, a.mlp_bias)
        t += _linear(p, "mlp.down_proj", a.hidden, a.intermediate, "mlp", i, a.mlp_bias)
    norms = ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"]
    t += [TensorSpec(f"{p}.{n}.weight", (a.hidden,), "norm", i, n) for n in norms[: a.norms_per_layer]]
    return t


def _moe_block(a: ArchConfig, p: str, i: int) -> list[TensorSpec]:
    """transformers 5 keeps each layer's experts as two fused 3-D parameters (not nn.Linear):
    gate_up_proj [E, 2I, H] and down_proj [E, H, I] (modeling_mixtral.py MixtralExperts)."""
    inter = a.moe_intermediate or a.intermediate
    t = _linear(p, "mlp.gate", a.n_experts, a.hidden, "router", i, False)
    t += [
        TensorSpec(f"{p}.mlp.experts.gate_up_proj", (a.n_experts, 2 * inter, a.hidden), "mlp", i, "experts"),
        TensorSpec(f"{p}.mlp.experts.down_proj", (a.n_experts, a.hidden, inter), "mlp", i, "experts"),
    ]
    if a.shared_expert_intermediate:
        s = a.shared_expert_intermediate
        for m in ("gate_proj", "up_proj"):
            t += _linear(p, f"mlp.shared_expert.{m}", s, a.hidden, "mlp", i, False)
        t += _linear(p, "mlp.shared_expert.down_proj", a.hidden, s, "mlp", i, False)
        t += _linear(p, "mlp.shared_expert_gate", 1, a.hidden, "router", i, False)
    return t


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
        t.append(TensorSpec(f"{p}.{mod}.weight", shape, kind, i, short, linear=True))  # type: ignore[arg-type]
        t.append(TensorSpec(f"{p}.{mod}.bias", (shape[1],), "bias", i, short))
    return t


@dataclass(frozen=True)
class ModelSpec:
    """An architecture and its per-tensor parameter inventory."""

    arch: ArchConfig
    tensors: tuple[TensorSpec, ...]

    @property
    def name(self) -> str:
        return self.arch.name

    @cached_property
    def params_total(self) -> int:
        return sum(t.numel for t in self.tensors)

    def params_by_kind(self) -> dict[str, int]:
        c: Counter[str] = Counter()
        for t in self.tensors:
            c[t.kind] += t.numel
        return {k: c.get(k, 0) for k in KINDS}

    def linear_modules(self) -> set[str]:
        """Short names of the nn.Linear modules in decoder layers (what LoRA can target)."""
        return {t.module for t in self.tensors if t.linear and t.layer is not None}


def build_spec(a: ArchConfig) -> ModelSpec:
    """The per-tensor inventory of an architecture, in transformers' own naming."""
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
            tensors += _llama_layer(a, i)
        tensors.append(TensorSpec("model.norm.weight", (a.hidden,), "norm", None, "norm"))
    if not a.tied:
        tensors.append(TensorSpec("lm_head.weight", (a.vocab, a.hidden), "lm_head", None, "lm_head", linear=True))
    return ModelSpec(arch=a, tensors=tuple(tensors))
