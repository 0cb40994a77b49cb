"""Model specs: exact per-tensor inventories, checked against transformers' own models."""

from __future__ import annotations

import json

import pytest

from vramplan.arch import arch_from_hf_config, build_spec
from vramplan.catalog import model_catalog, resolve_model
from vramplan.errors import VramplanError

CATALOGUE = sorted(model_catalog())


def test_catalogue_has_at_least_30_models_from_half_a_billion_to_405b():
    sizes = [resolve_model(n).params_total for n in CATALOGUE]
    assert len(CATALOGUE) >= 30
    assert min(sizes) < 0.6e9 and max(sizes) > 400e9


@pytest.mark.parametrize("name", CATALOGUE)
def test_every_tensor_matches_transformers_meta_model(name):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.AutoConfig.for_model(**model_catalog()[name].config)
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(cfg)
    theirs = {n: tuple(p.shape) for n, p in hf.named_parameters()}
    spec = resolve_model(name)
    ours = {t.name: t.shape for t in spec.tensors}
    assert ours == theirs
    assert spec.params_total == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize(("name", "published"), [
    ("llama-3.1-8b", 8_030_261_248), ("llama-3.1-70b", 70_553_706_496), ("mistral-7b-v0.1", 7_241_732_096),
    ("qwen2.5-7b", 7_615_616_512), ("qwen2.5-0.5b", 494_032_768), ("gpt2", 124_439_808),
    ("mixtral-8x7b", 46_702_792_704), ("gemma-2-9b", 9_241_705_984),
])
def test_param_counts_equal_published_model_cards(name, published):
    assert resolve_model(name).params_total == published


def test_per_kind_split_of_a_gqa_model_with_qkv_bias():
    split = resolve_model("qwen2.5-0.5b").params_by_kind()
    assert split["bias"] == 24 * (896 + 128 + 128)  # q, k, v biases; o_proj has none
    assert split["lm_head"] == 0  # tied
    assert split["embedding"] == 151936 * 896
    assert sum(split.values()) == 494_032_768


@pytest.mark.parametrize(("alias", "name"), [("70b", "llama-3.1-70b"), ("8b", "llama-3.1-8b"),
                                             ("llama-3.1-8b", "llama-3.1-8b"), ("mistral-7b", "mistral-7b"),
                                             ("Qwen/Qwen2.5-7B", "qwen2.5-7b"), ("LLAMA_3.1-8B", "llama-3.1-8b")])
def test_aliases_resolve_to_catalogue_entries(alias, name):
    assert resolve_model(alias).name == name


def test_unknown_model_error_suggests_close_names():
    with pytest.raises(VramplanError, match="did you mean.*llama-3.1-8b"):
        resolve_model("llama-3.1-8")


def test_local_config_json_file_and_directory(tmp_path):
    cfg = dict(model_catalog()["llama-3.2-1b"].config)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    by_file = resolve_model(str(tmp_path / "config.json"))
    by_dir = resolve_model(str(tmp_path))
    assert by_file.params_total == by_dir.params_total == 1_235_814_400


def test_malformed_config_json_is_a_one_line_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(VramplanError, match="malformed config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": -1}))
    with pytest.raises(VramplanError, match="hidden_size"):
        resolve_model(str(tmp_path))


def test_unsupported_model_type_names_the_supported_ones():
    with pytest.raises(VramplanError, match="model_type 'bert'.*supported"):
        arch_from_hf_config({"model_type": "bert"}, "x")


def test_hub_id_without_cache_is_a_clear_error():
    with pytest.raises(VramplanError, match="could not read config|not installed"):
        resolve_model("nobody-here/not-a-model-xyz")


def test_specs_are_hashable_and_built_once():
    a = resolve_model("8b")
    assert a is resolve_model("llama-3.1-8b")
    assert build_spec(a.arch).params_total == a.params_total


@pytest.mark.parametrize(("name", "window"), [
    ("mistral-7b-v0.1", 4096), ("mistral-7b", None), ("mistral-nemo-12b", None), ("mistral-small-24b", None),
    ("mistral-small-3.1-24b", None),
])
def test_mistral_sliding_window_follows_each_config_json(name, window):
    """MistralConfig defaults sliding_window to 4096 (v0.1); v0.3, Nemo and Small 3.x set it null."""
    arch = resolve_model(name).arch
    assert arch.sliding_window == window
    assert set(arch.layer_attention) == {"sliding" if window else "full"}
