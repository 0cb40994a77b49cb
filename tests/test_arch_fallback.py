"""A model_type vramplan does not describe degrades gracefully: transformers builds it on the meta
device, its inventory is exact, activations come from the nearest known layer type, and the
estimate says it is approximate. Without torch/transformers it stays a one-line error."""

from __future__ import annotations

import json
import sys

import pytest
from typer.testing import CliRunner

from vramplan.arch import DEFAULTS, arch_from_hf_config, build_spec
from vramplan.archs.meta import APPROX_SUFFIX
from vramplan.errors import VramplanError
from vramplan.estimator import estimate_setup
from vramplan.layout import layout
from vramplan.setup import make_setup

_S = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
          num_hidden_layers=2, max_position_embeddings=256)
# transformers 5.23 causal LMs vramplan has no description of: biases and LayerNorm with a GELU MLP
# (starcoder2), a parallel block with one norm and q/k norms (cohere), a fused query_key_value
# with multi-query attention (falcon), routed experts (olmoe).
UNKNOWN: dict[str, dict] = {
    "starcoder2": dict(_S, use_bias=True),
    "cohere": dict(_S, use_qk_norm=True),
    "falcon": dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=128),
    "olmoe": dict(_S, intermediate_size=32, num_experts=4, num_experts_per_tok=2),
}


def meta_model(model_type: str, cfg: dict):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.AutoConfig.for_model(model_type, **cfg)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(hf_cfg)


def test_the_unknown_types_are_unknown_to_vramplan():
    assert not set(UNKNOWN) & set(DEFAULTS)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(UNKNOWN))
def test_unknown_type_has_the_meta_models_exact_inventory_and_is_labelled_approximate(model_type):
    cfg = UNKNOWN[model_type]
    spec = build_spec(arch_from_hf_config({"model_type": model_type, **cfg}, "tiny"))
    hf = meta_model(model_type, cfg)
    assert {t.name: t.shape for t in spec.tensors} == {n: tuple(p.shape) for n, p in hf.named_parameters()}
    assert spec.params_total == sum(p.numel() for p in hf.parameters())
    assert spec.name == f"tiny{APPROX_SUFFIX}"
    assert model_type in spec.approximate and "exact" in spec.approximate
    assert sum(g.count for g in layout(spec).groups) == spec.arch.layers == 2


@pytest.mark.slow
def test_moe_layers_take_moe_activations_and_dense_ones_llama_activations():
    moe = build_spec(arch_from_hf_config({"model_type": "olmoe", **UNKNOWN["olmoe"]}, "m"))
    dense = build_spec(arch_from_hf_config({"model_type": "cohere", **UNKNOWN["cohere"]}, "d"))
    assert (moe.arch.family, moe.arch.n_experts, moe.arch.experts_per_token) == ("moe", 4, 2)
    assert dense.arch.family == "llama" and dense.arch.qk_norm
    assert dense.arch.norm_names == ("input_layernorm", "post_attention_layernorm")  # nearest known layer's


@pytest.mark.slow
def test_falcon_multi_query_attention_has_one_key_value_head():
    spec = build_spec(arch_from_hf_config({"model_type": "falcon", **UNKNOWN["falcon"]}, "f"))
    assert (spec.arch.heads, spec.arch.kv_heads, spec.arch.intermediate) == (4, 1, 256)  # ffn_hidden_size = 4h
    (qkv,) = [t for t in spec.tensors if t.name == "transformer.h.0.self_attention.query_key_value.weight"]
    assert qkv.shape == (spec.arch.q_dim + 2 * spec.arch.kv_dim, 64) and qkv.linear
    # FalconLinear subclasses nn.Linear, and transformers 5 replace_with_bnb_linear converts
    # `type(module) is nn.Linear` only: a 4-bit load leaves it in 16 bits
    assert not qkv.quantisable


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_unknown_type_estimates_and_the_estimate_says_approximate(method):
    spec = build_spec(arch_from_hf_config({"model_type": "starcoder2", **UNKNOWN["starcoder2"]}, "sc2"))
    opts = {"method": method, "seq_len": 128, "batch_size": 2, "lora_rank": 8}
    if method == "qlora":
        opts["dtype"] = "nf4"
    e = estimate_setup(spec, make_setup(spec, **opts))
    assert e.model.endswith(APPROX_SUFFIX) and e.params_total == spec.params_total
    assert e.breakdown["activations"] > 0 and e.peak_allocated_bytes > 0


@pytest.mark.slow
def test_cli_estimate_of_a_local_config_json_prints_approximate(tmp_path):
    from vramplan.cli import app

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "starcoder2", **UNKNOWN["starcoder2"]}))
    r = CliRunner().invoke(app, ["estimate", "--model", str(tmp_path), "--method", "lora", "--seq-len", "128", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["model"]["name"].endswith(APPROX_SUFFIX)
    assert d["model"]["params_total"] == sum(p.numel() for p in meta_model("starcoder2", UNKNOWN["starcoder2"]).parameters())


@pytest.mark.parametrize("blocked", ["torch", "transformers"])
def test_without_torch_or_transformers_an_unknown_type_is_a_one_line_error(monkeypatch, blocked):
    monkeypatch.setitem(sys.modules, blocked, None)  # `import torch` then raises ImportError
    with pytest.raises(VramplanError) as err:
        arch_from_hf_config({"model_type": "starcoder2", **UNKNOWN["starcoder2"]}, "sc2")
    msg = str(err.value)
    assert "\n" not in msg
    assert "model_type 'starcoder2' is not supported" in msg and "supported: deepseek_v3, gemma" in msg


def test_encoders_and_types_transformers_lacks_are_one_line_errors():
    pytest.importorskip("transformers")
    for mt, why in (("bert", "encoder"), ("no_such_type", "no causal LM")):
        with pytest.raises(VramplanError, match=rf"model_type '{mt}' is not supported \(.*{why}.*\); supported: ") as err:
            arch_from_hf_config({"model_type": mt}, "x")
        assert "\n" not in str(err.value)
