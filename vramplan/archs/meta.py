"""Graceful degradation for a model_type vramplan does not describe.

transformers builds the model on the meta device (`AutoModelForCausalLM.from_config` under
`torch.device("meta")`: no weights, no download) and its parameters give the exact per-tensor
inventory, so weights, gradients and optimizer states stay exact. Activations come from the nearest
known layer type -- a Llama-like dense decoder layer, or vramplan's MoE layer where the layers hold
routed experts -- sized from the config, so the ArchConfig says it is approximate (`approximate`,
and the model name ends in APPROX_SUFFIX, which the estimate and the CLI print).

torch and transformers are imported here only, and only for such a type: the analytic model itself
never needs them."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import replace
from functools import lru_cache
from typing import Any

from vramplan.archs.hf import _attention_types, _rope_layers
from vramplan.archs.spec import ArchConfig, Kind, TensorSpec
from vramplan.errors import VramplanError

APPROX_SUFFIX = " (approximate)"
_ATTENTION_KINDS = ("full", "sliding", "chunked")  # what ArchConfig.layer_attention may hold


def meta_arch(raw: dict[str, Any], name: str, supported: Iterable[str]) -> ArchConfig:
    """The ArchConfig of a config.json dict whose model_type vramplan lacks, its inventory read off
    transformers' meta-device model; a one-line VramplanError where that cannot be done."""
    mt = raw.get("model_type")
    allowed = ", ".join(sorted(supported))
    try:
        import torch  # noqa: F401  (heavy and optional: only for types vramplan does not describe)
        import transformers
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        )
    except ImportError:
        raise VramplanError(f"config {name!r}: model_type {mt!r} is not supported; supported: {allowed} "
                            "(install torch and transformers for an approximate estimate of other types)") from None
    if mt in MODEL_FOR_MASKED_LM_MAPPING_NAMES or mt not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        why = ("an encoder model" if mt in MODEL_FOR_MASKED_LM_MAPPING_NAMES
               else f"transformers {transformers.__version__} has no causal LM of that type")
        raise VramplanError(f"config {name!r}: model_type {mt!r} is not supported ({why}); supported: {allowed}, "
                            "or any decoder-only causal LM transformers can build")
    try:
        arch = _meta_arch(json.dumps(raw, sort_keys=True, default=str))
    except ValueError as e:
        raise VramplanError(f"config {name!r}: model_type {mt!r}: {e}") from None
    return replace(arch, name=f"{name}{APPROX_SUFFIX}", hf_config=dict(raw))


def _int(cfg: Any, *keys: str) -> int:
    """The first of `keys` the HF config object holds as a positive int (its attribute_map
    applies: n_embd reads as hidden_size), else 0."""
    for k in keys:
        v = getattr(cfg, k, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return 0


@lru_cache(maxsize=32)
def _meta_arch(key: str) -> ArchConfig:
    """Build the model of the config dict `key` (JSON) on the meta device and describe it; cached, as
    records and tools re-read one config many times. Raises ValueError with a one-line reason."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, __version__
    from transformers.utils import logging as hf_logging

    raw = json.loads(key)
    mt = raw["model_type"]
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # config-validation chatter is not the user's problem here
    try:
        cfg = AutoConfig.for_model(mt, **{k: v for k, v in raw.items() if k != "model_type"})
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except Exception as e:  # transformers raises many kinds; keep the first line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"transformers could not build it on the meta device: {first}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    prefix, n = _decoder_layers(model, _int(cfg, "num_hidden_layers"))
    tensors = _inventory(model, prefix, _int(cfg, "num_local_experts", "num_experts", "n_routed_experts"))
    return _describe(cfg, mt, n, tensors, model, __version__)


def _decoder_layers(model: Any, n_config: int) -> tuple[str, int]:
    """Name and length of the decoder's layer list: the nn.ModuleList of num_hidden_layers blocks
    holding the most parameters (a vision tower's list, if any, holds fewer)."""
    from torch import nn

    best: tuple[int, str, int] | None = None
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and (not n_config or len(mod) == n_config):
            size = sum(p.numel() for p in mod.parameters())
            if best is None or size > best[0]:
                best = (size, mod_name, len(mod))
    if best is None:
        raise ValueError(f"no list of {n_config or 'decoder'} layers found in {type(model).__name__}")
    return best[1], best[2]


def _not_quantised(model: Any) -> list[str]:
    """Module patterns a bitsandbytes load keeps unquantised: transformers 5
    `HfQuantizer.get_modules_to_not_convert` (output embeddings, tied weights, the last module)
    plus the model's `_keep_in_fp32_modules`."""
    from transformers.quantizers.base import get_keys_to_not_convert

    return [*get_keys_to_not_convert(model), *(getattr(model, "_keep_in_fp32_modules", None) or ())]


def _kind(mod: Any, mod_name: str, leaf: str, linear: bool, *, emb_out: Any, tied: bool) -> Kind:
    """vramplan's tensor class of one parameter, from its module's type and path."""
    from torch import nn

    path = mod_name.lower().split(".")
    if emb_out is not None and mod is emb_out and not tied:
        return "lm_head" if leaf == "weight" else "bias"
    if isinstance(mod, nn.Embedding):
        return "embedding"
    if leaf == "bias" or leaf.endswith("_bias"):
        return "bias"
    if "router" in path[-1] or path[-1] == "gate":
        return "router"  # kept only where it scores the experts (_inventory)
    if not linear and ("norm" in type(mod).__name__.lower() or "norm" in path[-1]):
        return "norm"
    return "attn" if any("attn" in p or "attention" in p for p in path) else "mlp"


def _inventory(model: Any, prefix: str, n_experts: int) -> list[TensorSpec]:
    """Every parameter of the meta-device model (tied ones once, as named_parameters lists them),
    with its layer, kind, module short name and the Linear/quantisable flags of TensorSpec."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.quantizers_utils import should_convert_module

    modules = dict(model.named_modules())
    emb_in, emb_out = model.get_input_embeddings(), model.get_output_embeddings()
    tied = emb_out is None or emb_out.weight is emb_in.weight
    skip = _not_quantised(model)
    layer_re = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    out = []
    for pname, p in model.named_parameters():
        mod_name, _, leaf = pname.rpartition(".")
        mod = modules[mod_name]
        linear = isinstance(mod, (nn.Linear, Conv1D)) and leaf == "weight"
        kind = _kind(mod, mod_name, leaf, linear, emb_out=emb_out, tied=tied)
        if kind == "router" and not (n_experts and p.shape[0] == n_experts):
            kind = "mlp"  # a `gate` that does not score experts (a gated MLP's own gate)
        quantisable = (linear and (type(mod) is nn.Linear or isinstance(mod, Conv1D))
                       and kind != "lm_head" and should_convert_module(mod_name, skip))
        m = layer_re.match(pname)
        out.append(TensorSpec(pname, tuple(p.shape), kind, int(m.group(1)) if m else None,
                              mod_name.rsplit(".", 1)[-1], linear=linear, quantisable=quantisable))
    return out


def _in_attention(name: str) -> bool:
    """Whether a parameter's module sits inside an attention module (self_attn.q_norm.weight)."""
    return any("attn" in p or "attention" in p for p in name.lower().split(".")[:-2])


def _describe(cfg: Any, mt: str, n: int, tensors: list[TensorSpec], model: Any, version: str) -> ArchConfig:
    """The ArchConfig of the nearest known layer type, sized from the config; the inventory itself
    is exact and rides along."""
    d = cfg.to_dict()
    hidden = _int(cfg, "hidden_size") or model.get_input_embeddings().weight.shape[1]
    heads = _int(cfg, "num_attention_heads", "n_head", "num_heads")
    if not heads:
        raise ValueError("the config has no num_attention_heads: no attention layer type to take activations from")
    # multi_query: one key/value head (GPTBigCodeConfig; FalconConfig unless new_decoder_architecture)
    mqa = getattr(cfg, "multi_query", False) and not getattr(cfg, "new_decoder_architecture", False)
    kv = 1 if mqa else (_int(cfg, "num_key_value_heads", "num_kv_heads") or heads)
    kv = kv if heads % kv == 0 else heads
    max_pos = _int(cfg, "max_position_embeddings", "n_positions", "seq_length", "max_seq_len")
    if not max_pos:
        raise ValueError("the config has no max_position_embeddings")
    layer0 = [t for t in tensors if t.layer == 0]
    mlp_widths = [max(t.shape) for t in layer0 if t.linear and t.kind == "mlp"]
    inter = (_int(cfg, "intermediate_size", "ffn_hidden_size", "n_inner", "ffn_dim", "d_ff")
             or max(mlp_widths, default=hidden))  # else the widest MLP Linear of layer 0
    n_exp = _int(cfg, "num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
    top_k = _int(cfg, "num_experts_per_tok", "num_experts_per_token", "moe_top_k", "top_k")
    moe = tuple(any("expert" in t.name and t.kind != "router" for t in tensors if t.layer == i) for i in range(n))
    moe = moe if n_exp and top_k and any(moe) else ()
    moe_inter = _int(cfg, "moe_intermediate_size", "expert_intermediate_size") if moe else 0
    shared = (_int(cfg, "shared_expert_intermediate_size")
              or moe_inter * _int(cfg, "n_shared_experts", "num_shared_experts")) if moe else 0
    norms = tuple(t.module for t in layer0 if t.kind == "norm" and t.shape == (hidden,) and not _in_attention(t.name))
    if len(norms) not in (2, 4):  # the nearest known layer's two norms (a parallel block has one)
        norms = ArchConfig.norm_names
    qk = [t for t in layer0 if t.kind == "norm" and _in_attention(t.name) and t.module.startswith(("q_", "query"))]
    head_dim = _int(cfg, "head_dim") or hidden // heads
    rope = _rope_layers(d, n)
    window = _int(cfg, "sliding_window")
    chunk = _int(cfg, "attention_chunk_size")
    kinds = tuple(k if k in _ATTENTION_KINDS and (k != "sliding" or window) and (k != "chunked" or chunk) else "full"
                  for k in _attention_types(d, mt, n, rope))
    emb_out = model.get_output_embeddings()
    family = "MoE" if moe else "Llama-like dense"
    return ArchConfig(
        name="", model_type=mt, hidden=hidden, intermediate=inter, layers=n, heads=heads, kv_heads=kv,
        head_dim=head_dim, vocab=model.get_input_embeddings().weight.shape[0],
        tied=emb_out is None or emb_out.weight is model.get_input_embeddings().weight, max_positions=max_pos,
        qk_norm=bool(qk), qk_norm_full=bool(qk) and qk[0].shape[0] != head_dim,
        norms_per_layer=len(norms), norm_names=norms,
        activation=str(d.get("hidden_act") or d.get("hidden_activation") or d.get("activation_function") or "silu"),
        n_experts=n_exp if moe else 0, experts_per_token=top_k if moe else 0, moe_intermediate=moe_inter,
        shared_expert_intermediate=shared, final_logit_softcap=d.get("final_logit_softcapping"),
        attn_logit_softcap=d.get("attn_logit_softcapping"), layer_attention=kinds, sliding_window=window or None,
        attention_chunk=chunk or None, layer_rope=rope, layer_moe=moe,
        attn_sinks=any(t.name.endswith(".sinks") for t in layer0),
        approximate=(f"model_type {mt!r} is not one vramplan describes: weights, gradients and optimizer states "
                     f"are exact (transformers {version} meta-device inventory), activations are those of a "
                     f"{family} decoder layer of the config's sizes"),
        inventory=tuple(tensors),
    )
