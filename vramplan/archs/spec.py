"""The dataclasses of an architecture: hyperparameters (ArchConfig), one parameter tensor
(TensorSpec) and the full inventory (ModelSpec)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

Kind = Literal["embedding", "attn", "mlp", "norm", "lm_head", "router", "bias"]
KINDS: tuple[Kind, ...] = ("embedding", "attn", "mlp", "norm", "lm_head", "router", "bias")


@dataclass(frozen=True)
class TensorSpec:
    """One parameter tensor. `linear` marks weights of nn.Linear modules (or subclasses, or GPT-2
    Conv1D): what peft's "all-linear" selects. `quantisable` marks those bitsandbytes replaces:
    transformers 5 `replace_with_bnb_linear` converts `type(module) is nn.Linear` (and Conv1D)
    only, and skips the output embeddings (integrations/bitsandbytes.py, quantizers/base.py
    get_keys_to_not_convert); fused 3-D experts, custom routers, Linear subclasses (Llama4Router)
    and lm_head stay in 16 bits. `module` is the HF module's short name that LoRA targets match."""

    name: str
    shape: tuple[int, ...]
    kind: Kind
    layer: int | None = None
    module: str = ""
    linear: bool = False
    quantisable: bool = False

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class ArchConfig:
    """Normalised hyperparameters of a decoder-only causal LM.

    Per-layer tuples (`layer_attention`, `layer_rope`, `layer_moe`) have one entry per decoder
    layer. For MLA (DeepSeek-V3) `head_dim` is the query/key head width (qk_nope + qk_rope), so
    `q_dim`/`kv_dim` are the widths of the expanded per-head queries and keys."""

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
    qk_norm: bool = False  # q_norm/k_norm parameters (per head, or full width with qk_norm_full)
    norms_per_layer: int = 2  # hidden-width norms per layer
    fused_qkv: bool = False
    fused_gate_up: bool = False
    activation: str = "silu"
    n_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate: int = 0  # routed experts' width; 0: `intermediate`
    shared_expert_intermediate: int = 0
    final_logit_softcap: float | None = None
    scale_embeddings: bool = False
    # --- per-layer structure -----------------------------------------------------------------
    layer_attention: tuple[str, ...] = ()  # "full" | "sliding" | "chunked" per layer; () = all full
    sliding_window: int | None = None  # window of "sliding" layers
    attention_chunk: int | None = None  # chunk of "chunked" layers (Llama 4)
    layer_rope: tuple[bool, ...] = ()  # False: a no-rope (NoPE) layer; () = all rope
    layer_moe: tuple[bool, ...] = ()  # True: routed experts in this layer; () = none
    dense_intermediate: int = 0  # MLP width of the dense layers of a mixed model; 0: `intermediate`
    norm_names: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    qk_norm_full: bool = False  # OLMo2: q_norm over q_dim and k_norm over kv_dim (not per head)
    qk_l2norm: bool = False  # Llama 4: parameter-free L2 norm of q/k on rope layers
    # --- MLA (DeepSeek-V2/V3) -------------------------------------------------------------------
    q_lora_rank: int = 0  # 0: plain q_proj
    kv_lora_rank: int = 0  # > 0: MLA attention
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # --- MoE module layout ---------------------------------------------------------------------
    mlp_module: str = "mlp"  # "feed_forward" in Llama 4
    router_module: str = "gate"  # "router" in Llama 4 and gpt-oss
    router_linear: bool = False  # router is an nn.Linear subclass (Llama4Router)
    router_bias: bool = False
    shared_module: str = "shared_expert"  # "shared_experts" in DeepSeek-V3
    shared_expert_gate: bool = False  # Qwen2-MoE's sigmoid gate Linear(hidden, 1)
    expert_bias: bool = False  # gpt-oss gate_up_proj_bias/down_proj_bias
    experts_in_out: bool = False  # experts stored [E, in, out] (Llama 4, gpt-oss) not [E, out, in]
    peft_moe_pattern: str | None = None  # peft's v4->v5 MoE target conversion ("mixtral", "qwen2_moe")
    # --- MoE computation (what the forward saves; vramplan.ops.mlp) ----------------------------
    experts_every_token: bool = False  # every token through every expert by bmm (Llama4TextMoe), not k routed rows
    router_fp32: bool = False  # router F.linear on an fp32 copy of its input (DeepseekV3TopkRouter)
    router_topk_first: bool = False  # top-k of the raw logits, softmax over those k only (GptOssTopKRouter)
    clamped_swiglu: bool = False  # gate.clamp, sigmoid(alpha * gate), (up + 1) * glu (GptOssExperts._apply_gate)
    # --- attention / logits extras ------------------------------------------------------------
    attn_sinks: bool = False  # gpt-oss per-head `sinks` logits (eager/flex kernels only)
    attn_logit_softcap: float | None = None
    logits_scaling: float = 1.0  # Granite: logits / logits_scaling
    embedding_multiplier: float = 1.0  # Granite: embeddings * embedding_multiplier
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None
    # --- a model_type vramplan does not describe (vramplan.archs.meta) --------------------------
    approximate: str = ""  # why the estimate is approximate; "" for every supported type
    # the exact inventory read off transformers' meta-device model; () = derive it (layers.build_spec)
    inventory: tuple[TensorSpec, ...] = field(default=(), compare=False, hash=False, repr=False)
    hf_config: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def family(self) -> str:
        """"gpt2", "moe" (any layer with routed experts) or "llama" (every other decoder)."""
        if self.model_type == "gpt2":
            return "gpt2"
        return "moe" if any(self.layer_moe) else "llama"

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def expert_rows(self) -> int:
        """Expert rows each token runs through: every expert (experts_every_token), else the k routed."""
        return self.n_experts if self.experts_every_token else self.experts_per_token

    @property
    def expert_intermediate(self) -> int:
        """One expert's intermediate width (the dense width where the config gives no MoE one)."""
        return self.moe_intermediate or self.intermediate

    def attention_of(self, i: int) -> str:
        return self.layer_attention[i] if self.layer_attention else "full"

    def rope_of(self, i: int) -> bool:
        return self.layer_rope[i] if self.layer_rope else True

    def moe_of(self, i: int) -> bool:
        return self.layer_moe[i] if self.layer_moe else False


@dataclass(frozen=True)
class ModelSpec:
    """An architecture and its per-tensor parameter inventory."""

    arch: ArchConfig
    tensors: tuple[TensorSpec, ...]

    @property
    def name(self) -> str:
        return self.arch.name

    @property
    def approximate(self) -> str:
        """Why estimates of this model are approximate ("" when vramplan describes its type)."""
        return self.arch.approximate

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

    def unquantised_params(self) -> int:
        """Parameters a bitsandbytes 4/8-bit load keeps in 16 bits (everything not quantisable)."""
        return sum(t.numel for t in self.tensors if not t.quantisable)
