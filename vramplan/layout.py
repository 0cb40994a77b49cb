"""A compact summary of a ModelSpec for fast arithmetic: the decoder is a sequence of layer
types (`groups`, each with its count), so the estimator works on one layer per type, never on
every tensor. The flat per-layer fields (`linears`, `layer_dense_other`, ...) describe the
representative group (the most numerous; for a homogeneous model, every layer)."""

from __future__ import annotations

from dataclasses import dataclass

from vramplan.arch import ModelSpec, TensorSpec


@dataclass(frozen=True)
class LinearModule:
    """One Linear-like module of a decoder layer (a weight, maybe a bias)."""

    module: str
    d_in: int
    d_out: int
    kind: str  # "attn" | "mlp" | "router"
    bias: bool
    quantisable: bool = True  # bitsandbytes replaces it (type(module) is nn.Linear)

    @property
    def numel(self) -> int:
        return self.d_in * self.d_out


@dataclass(frozen=True)
class ParamTarget:
    """A non-Linear parameter peft 0.21 adapts through `target_parameters` (ParamWrapper) when
    transformers 5 fused it: LoRA A is [rank_mult*r*experts, d_in] and B [d_out, rank_mult*r*experts]
    (peft/tuners/lora/layer.py ParamWrapper; fused gate_up gets rank 2r via rank_pattern,
    peft/utils/transformers_weight_conversion.py _convert_peft_config_moe)."""

    module: str  # "gate" (router weight), "experts.gate_up_proj", "experts.down_proj"
    d_in: int
    d_out: int
    experts: int  # 1 for a router
    rank_mult: int
    kind: str


@dataclass(frozen=True)
class LayerGroup:
    """`count` decoder layers with the same tensors and attention: one layer's figures."""

    count: int
    first: int  # index of its first layer
    last: int  # index of its last layer (its layers need not be adjacent)
    linears: tuple[LinearModule, ...]  # nn.Linear modules (peft "all-linear" candidates)
    param_targets: tuple[ParamTarget, ...]  # fused params peft targets under its MoE conversion
    params: int  # all parameters of one layer
    dense_other: int  # params that are not nn.Linear weights (norms, biases, experts, router params)
    biases: int
    expert_params: int  # fused 3-D expert tensors (+ their biases): never quantised
    router_params: int  # router weights that are not nn.Linear (MixtralTopKRouter, ...): never quantised
    attention: str  # "full" | "sliding" | "chunked"
    window: int | None  # sliding window or attention chunk (tokens); None for full attention
    rope: bool  # False: a NoPE layer
    moe: bool  # routed experts in this layer
    mla: bool  # DeepSeek multi-head latent attention
    sinks: bool  # gpt-oss attention sinks (no flash/SDPA kernel: eager or flex attention)
    qk_norm_width: int  # elements of the q_norm weight (0: none; head_dim or q_dim for OLMo2)
    norms: tuple[str, ...]  # hidden-width norms of the layer, in module order

    @property
    def linear_params(self) -> int:
        return sum(lm.numel for lm in self.linears)

    @property
    def quantisable_params(self) -> int:
        return sum(lm.numel for lm in self.linears if lm.quantisable)


@dataclass(frozen=True)
class Layout:
    layers: int
    linears: tuple[LinearModule, ...]  # representative layer's nn.Linear (or GPT-2 Conv1D) modules
    layer_dense_other: int  # per layer: params that are not Linear weights (norms, biases, fused experts)
    layer_biases: int  # per layer: bias elements
    layer_expert_params: int  # per layer: fused 3-D expert params (not nn.Linear in transformers 5)
    embed_params: int  # token (+ position) embeddings
    lm_head_params: int  # 0 when tied
    final_norm_params: int
    params_total: int
    largest_tensor: int  # numel of the largest single tensor (optimizer transients of per-tensor loops)
    tensor_count: int
    groups: tuple[LayerGroup, ...] = ()  # every decoder layer type, in order of first appearance

    @property
    def biases_total(self) -> int:
        return sum(g.biases * g.count for g in self.groups)

    @property
    def layer_params_total(self) -> int:
        return sum(g.params * g.count for g in self.groups)

    @property
    def representative(self) -> LayerGroup:
        """The layer type `linears` and the per-layer figures describe (representative_group)."""
        return representative_group(self.groups)

    @property
    def param_target_modules(self) -> frozenset[str]:
        """Every fused parameter peft can target through its MoE conversion ("gate", "experts.gate_up_proj", ...)."""
        return frozenset(pt.module for g in self.groups for pt in g.param_targets)

    @property
    def params_per_layer(self) -> int:
        """A decoder layer's parameters, averaged over the layer types."""
        return self.layer_params_total // max(1, self.layers)


# Keyed by identity: hashing a ModelSpec walks its whole tensor inventory, which would cost more
# than the estimate itself. The spec is kept in the value so its id cannot be reused.
_CACHE: dict[int, tuple[ModelSpec, Layout]] = {}


def layout(spec: ModelSpec) -> Layout:
    """Summarise `spec` (computed once per spec object)."""
    hit = _CACHE.get(id(spec))
    if hit is not None and hit[0] is spec:
        return hit[1]
    lay = _layout(spec)
    _CACHE[id(spec)] = (spec, lay)
    return lay


def _linears(spec: ModelSpec, ts: list[TensorSpec]) -> tuple[LinearModule, ...]:
    biases = {t.module for t in ts if t.kind == "bias"}
    out = []
    for t in ts:
        if t.linear:
            d_out, d_in = t.shape if spec.arch.family != "gpt2" else (t.shape[1], t.shape[0])  # Conv1D is [in, out]
            out.append(LinearModule(t.module, d_in, d_out, t.kind, t.module in biases, t.quantisable))
    return tuple(out)


def _param_targets(spec: ModelSpec, ts: list[TensorSpec]) -> tuple[ParamTarget, ...]:
    """peft 0.21 on transformers 5 maps "all-linear" (and v4 expert names) of the types in its
    conversion table onto the router weight and the fused expert parameters."""
    if not spec.arch.peft_moe_pattern:
        return ()
    out = []
    for t in ts:
        if t.kind == "router" and not t.linear and t.module == spec.arch.router_module:
            out.append(ParamTarget(t.module, t.shape[1], t.shape[0], 1, 1, "router"))
        elif t.module == "experts" and len(t.shape) == 3:
            leaf = t.name.rsplit(".", 1)[-1]
            out.append(ParamTarget(f"experts.{leaf}", t.shape[2], t.shape[1], t.shape[0],
                                   2 if leaf == "gate_up_proj" else 1, "mlp"))
    return tuple(out)


def _group(spec: ModelSpec, i: int, ts: list[TensorSpec], count: int, last: int) -> LayerGroup:
    a = spec.arch
    linears = _linears(spec, ts)
    params = sum(t.numel for t in ts)
    att = a.attention_of(i)
    qn = next((t.numel for t in ts if t.module == "q_norm"), 0)
    return LayerGroup(
        count=count, first=i, last=last, linears=linears, param_targets=_param_targets(spec, ts), params=params,
        dense_other=params - sum(lm.numel for lm in linears), biases=sum(t.numel for t in ts if t.kind == "bias"),
        expert_params=sum(t.numel for t in ts if t.module == "experts"), attention=att,
        router_params=sum(t.numel for t in ts if t.kind == "router" and not t.linear),
        window=a.sliding_window if att == "sliding" else (a.attention_chunk if att == "chunked" else None),
        rope=a.rope_of(i), moe=a.moe_of(i), mla=a.mla, sinks=a.attn_sinks, qk_norm_width=qn, norms=a.norm_names,
    )


def _groups(spec: ModelSpec) -> tuple[LayerGroup, ...]:
    by_layer: dict[int, list[TensorSpec]] = {}
    for t in spec.tensors:
        if t.layer is not None:
            by_layer.setdefault(t.layer, []).append(t)
    a = spec.arch
    keys: dict[tuple, list[int]] = {}
    for i, ts in by_layer.items():
        sig = tuple((t.name.split(f".{i}.", 1)[-1], t.shape) for t in ts)
        keys.setdefault((sig, a.attention_of(i), a.rope_of(i)), []).append(i)
    return tuple(_group(spec, idx[0], by_layer[idx[0]], len(idx), idx[-1]) for idx in keys.values())


def representative_group(groups: tuple[LayerGroup, ...]) -> LayerGroup:
    """The first of the most numerous layer types (max keeps the first of equals)."""
    return max(groups, key=lambda g: g.count)


def _layout(spec: ModelSpec) -> Layout:
    groups = _groups(spec)
    rep = representative_group(groups)
    glob = [t for t in spec.tensors if t.layer is None]
    return Layout(
        layers=spec.arch.layers,
        linears=rep.linears,
        layer_dense_other=rep.dense_other,
        layer_biases=rep.biases,
        layer_expert_params=rep.expert_params,
        embed_params=sum(t.numel for t in glob if t.kind == "embedding"),
        lm_head_params=sum(t.numel for t in glob if t.kind == "lm_head"),
        final_norm_params=sum(t.numel for t in glob if t.kind in ("norm", "bias")),
        params_total=spec.params_total,
        largest_tensor=max(t.numel for t in spec.tensors),
        tensor_count=len(spec.tensors),
        groups=groups,
    )
