"""A compact summary of a ModelSpec for fast arithmetic: decoder layers are homogeneous, so the
estimator works on one layer's Linear modules times the layer count, never on every tensor."""

from __future__ import annotations

from dataclasses import dataclass

from vramplan.arch import ModelSpec


@dataclass(frozen=True)
class LinearModule:
    """One Linear-like module of a decoder layer (a weight, maybe a bias)."""

    module: str
    d_in: int
    d_out: int
    kind: str  # "attn" | "mlp" | "router"
    bias: bool

    @property
    def numel(self) -> int:
        return self.d_in * self.d_out


@dataclass(frozen=True)
class Layout:
    layers: int
    linears: tuple[LinearModule, ...]  # one decoder layer's nn.Linear (or GPT-2 Conv1D) modules
    layer_dense_other: int  # per layer: params that are not Linear weights (norms, biases, fused experts)
    layer_biases: int  # per layer: bias elements
    layer_expert_params: int  # per layer: fused 3-D expert params (not nn.Linear in transformers 5)
    embed_params: int  # token (+ position) embeddings
    lm_head_params: int  # 0 when tied
    final_norm_params: int
    params_total: int
    largest_tensor: int  # numel of the largest single tensor (optimizer transients of per-tensor loops)
    tensor_count: int


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


def _layout(spec: ModelSpec) -> Layout:
    first = [t for t in spec.tensors if t.layer == 0]
    biases = {t.module for t in first if t.kind == "bias"}
    linears = []
    for t in first:
        if not t.linear:
            continue
        d_out, d_in = t.shape if spec.arch.family != "gpt2" else (t.shape[1], t.shape[0])  # Conv1D is [in, out]
        linears.append(LinearModule(t.module, d_in, d_out, t.kind, t.module in biases))
    lin_numel = sum(lm.numel for lm in linears)
    per_layer = sum(t.numel for t in first)
    experts = sum(t.numel for t in first if t.module == "experts")
    glob = [t for t in spec.tensors if t.layer is None]
    return Layout(
        layers=spec.arch.layers,
        linears=tuple(linears),
        layer_dense_other=per_layer - lin_numel,
        layer_biases=sum(t.numel for t in first if t.kind == "bias"),
        layer_expert_params=experts,
        embed_params=sum(t.numel for t in glob if t.kind == "embedding"),
        lm_head_params=sum(t.numel for t in glob if t.kind == "lm_head"),
        final_norm_params=sum(t.numel for t in glob if t.kind in ("norm", "bias")),
        params_total=spec.params_total,
        largest_tensor=max(t.numel for t in spec.tensors),
        tensor_count=len(spec.tensors),
    )
