"""Training-config readers: each tool's keys and defaults (pinned to the tools' source, cited in
vramplan/readers/*), malformed files, unknown optimizers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import vramplan
from vramplan.errors import VramplanError
from vramplan.readers import HF_OPTIMIZERS, detect_format, estimate_options, read_mapping, read_train_config

DATA = Path(__file__).parent / "data" / "train_configs"


def read(name: str):
    return read_train_config(DATA / name)


def core(cfg) -> dict:
    keys = ("method", "batch_size", "seq_len", "grad_accum", "grad_checkpointing", "optimizer", "lora_rank", "trainer")
    return {k: cfg.options.get(k) for k in keys}


def test_trl_sft_lora_file_maps_every_key():
    c = read("trl_sft_lora.yaml")
    assert (c.source, c.model) == ("trl", "Qwen/Qwen2.5-1.5B")
    assert core(c) == {"method": "lora", "batch_size": 4, "seq_len": 2048, "grad_accum": 8, "grad_checkpointing": True,
                       "optimizer": "adamw", "lora_rank": 32, "trainer": "trl"}
    o = c.options
    assert (o["lora_alpha"], o["lora_dropout"], o["lora_targets"], o["liger"]) == (16.0, 0.1, "all-linear", True)
    assert (o["precision"], o["dtype"]) == ("pure", "bf16")  # dtype: bfloat16
    assert c.read["max_length"] == 2048 and c.read["optim"] == "adamw_torch"


def test_trl_defaults_checkpointing_on_length_1024_fp32_weights_under_bf16():
    c = read("trl_defaults.yaml")
    assert core(c) == {"method": "full", "batch_size": 8, "seq_len": 1024, "grad_accum": 1, "grad_checkpointing": True,
                       "optimizer": "adamw-fused", "lora_rank": None, "trainer": "trl"}
    # ModelConfig.dtype defaults to float32 and bf16 to True: fp32 master weights under autocast
    assert (c.options["precision"], c.options["dtype"]) == ("mixed", "bf16")
    assert {"max_length", "gradient_checkpointing", "dtype", "bf16", "per_device_train_batch_size"} <= set(c.defaulted)


def test_trl_qlora_uses_peft_default_targets_and_reads_its_zero2_deepspeed_config():
    c = read("trl_qlora.yaml")
    assert core(c) == {"method": "qlora", "batch_size": 2, "seq_len": 1024, "grad_accum": 4, "grad_checkpointing": True,
                       "optimizer": "paged-adamw-8bit", "lora_rank": 64, "trainer": "trl"}
    o = c.options
    assert o["lora_targets"] == "q_proj,v_proj"  # peft's default for llama when target_modules is unset
    assert (o["dtype"], o["double_quant"], o["use_dora"], o["activation_offload"]) == ("nf4", True, True, True)
    assert o["kbit_prepare"] is True  # TRL loads non-quantised weights in fp32 by default
    assert c.parallel == {"zero": 2, "offload": "none"} and "deepspeed" not in c.ignored  # ds_zero2.json, next to it


def test_axolotl_qlora_file():
    c = read("axolotl_qlora.yaml")
    assert (c.source, c.model) == ("axolotl", "meta-llama/Llama-3.1-8B")
    assert core(c) == {"method": "qlora", "batch_size": 2, "seq_len": 4096, "grad_accum": 4, "grad_checkpointing": True,
                       "optimizer": "paged-adamw-8bit", "lora_rank": 32, "trainer": "hf"}
    o = c.options
    assert (o["lora_targets"], o["attn"], o["liger"], o["dtype"], o["double_quant"]) == ("all-linear", "flash", True, "nf4", True)
    assert o["kbit_prepare"] is False  # axolotl casts norms and embeddings back to bf16 after the kbit upcast


def test_axolotl_defaults_sequence_len_512_micro_batch_1_no_checkpointing():
    c = read("axolotl_defaults.yaml")
    assert core(c) == {"method": "full", "batch_size": 1, "seq_len": 512, "grad_accum": 1, "grad_checkpointing": False,
                       "optimizer": "adamw-fused", "lora_rank": None, "trainer": "hf"}
    assert (c.options["precision"], c.options["dtype"]) == ("pure", "bf16")  # bf16: auto


def test_axolotl_8bit_lora_offloaded_checkpointing_and_unmodelled_keys():
    c = read("axolotl_lora8bit.yaml")
    o = c.options
    assert (o["method"], o["dtype"], o["lora_rank"], o["lora_alpha"], o["lora_dropout"]) == ("lora", "int8", 16, 8.0, 0.0)
    assert o["lora_targets"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert (o["grad_checkpointing"], o["checkpoint_offload"], o["use_dora"], o["optimizer"]) == (True, True, True, "adamw-8bit")
    assert "unfrozen_parameters" in c.ignored


def test_llamafactory_qlora_file():
    c = read("llamafactory_lora.yaml")
    assert (c.source, c.model) == ("llamafactory", "Qwen/Qwen2.5-7B")
    assert core(c) == {"method": "qlora", "batch_size": 1, "seq_len": 4096, "grad_accum": 8, "grad_checkpointing": True,
                       "optimizer": "adamw-fused", "lora_rank": 16, "trainer": "hf"}
    o = c.options
    assert (o["lora_alpha"], o["lora_targets"], o["liger"], o["attn"], o["kbit_prepare"]) == (32.0, "all-linear", True, "flash", False)


def test_llamafactory_defaults_lora_rank_8_cutoff_2048_checkpointing_on():
    c = read("llamafactory_defaults.yaml")
    assert core(c) == {"method": "lora", "batch_size": 8, "seq_len": 2048, "grad_accum": 1, "grad_checkpointing": True,
                       "optimizer": "adamw-fused", "lora_rank": 8, "trainer": "hf"}
    assert (c.options["lora_alpha"], c.options["lora_dropout"]) == (16.0, 0.0)


def test_llamafactory_full_upcasts_trainable_params_to_fp32():
    c = read("llamafactory_full.yaml")
    assert core(c) == {"method": "full", "batch_size": 2, "seq_len": 1024, "grad_accum": 1, "grad_checkpointing": False,
                       "optimizer": "adamw-8bit", "lora_rank": None, "trainer": "hf"}
    assert (c.options["precision"], c.options["dtype"]) == ("mixed", "bf16")
    assert "use_badam" in c.ignored


def test_hf_training_args_json_checkpointing_off_by_default():
    c = read("hf_training_args.json")
    assert (c.source, c.model) == ("hf", "meta-llama/Llama-3.2-1B")
    assert core(c) == {"method": "full", "batch_size": 4, "seq_len": 1024, "grad_accum": 2, "grad_checkpointing": False,
                       "optimizer": "adamw-fused", "lora_rank": None, "trainer": "hf"}
    assert "torch_compile" in c.ignored


def test_hf_yaml_galore_optimizer_is_the_galore_method_with_its_rank():
    c = read("hf_defaults.yaml")
    assert (c.source, c.model) == ("hf", "Qwen/Qwen2.5-0.5B")
    o = c.options
    assert (o["method"], o["optimizer"], o["galore_rank"], o["batch_size"], o["grad_checkpointing"]) == ("galore", "adamw-8bit", 64, 8, True)
    assert "(sequence length)" in c.ignored  # TrainingArguments has no length: said, not guessed silently
    assert "seq_len" not in o


# DeepSpeed / FSDP side files and accelerate configs (no model) are not training configs of their own.
NOT_TRAINING_CONFIGS = ("malformed", "bad_", "unknown_", "ds_", "fsdp_", "accelerate_")
SAMPLES = sorted(p.name for p in DATA.iterdir() if p.suffix in (".yaml", ".json") and not p.name.startswith(NOT_TRAINING_CONFIGS))


@pytest.mark.parametrize("name", SAMPLES)
def test_every_sample_file_estimates(name):
    c = read(name)
    ok, later = estimate_options(c.options)
    assert later == {}  # every option a reader emits is a vramplan option
    e = vramplan.estimate(c.model, **ok)
    assert e.peak_allocated_bytes > 0 and e.setup.trainer == c.options["trainer"]
    json.dumps(c.to_dict())
    if c.parallel:  # the file's engine estimates too, on 2 GPUs
        from vramplan.catalog import resolve_model
        from vramplan.distributed import estimate_distributed, make_parallel

        spec = resolve_model(c.model)
        d = estimate_distributed(spec, e.setup, make_parallel(**{**c.parallel, "gpus": 2}))
        assert d.per_gpu_peak_allocated_bytes > 0


def test_malformed_yaml_is_one_line_naming_the_file_and_position():
    with pytest.raises(VramplanError) as e:
        read("malformed.yaml")
    msg = str(e.value)
    assert "malformed.yaml" in msg and "line 3" in msg and "\n" not in msg


def test_bad_value_names_the_file_and_key():
    with pytest.raises(VramplanError, match=r"bad_batch\.yaml: key 'per_device_train_batch_size': expected a positive integer"):
        read("bad_batch.yaml")


def test_unknown_optimizer_is_an_error_listing_the_modelled_ones():
    with pytest.raises(VramplanError) as e:
        read("unknown_optim.yaml")
    msg = str(e.value)
    assert "'optim'" in msg and "schedule_free_adamw" in msg and "adamw_torch_fused" in msg and "paged_adamw_8bit" in msg


def test_every_mapped_hf_optimizer_is_a_vramplan_optimizer():
    from vramplan.options import OPTIMIZERS

    assert {opt for _, opt in HF_OPTIMIZERS.values()} <= set(OPTIMIZERS)


def test_a_file_without_a_model_key_is_refused(tmp_path):
    p = tmp_path / "args.yaml"
    p.write_text("per_device_train_batch_size: 2\n")
    with pytest.raises(VramplanError, match="args.yaml: key 'model_name_or_path': missing"):
        read_train_config(p)


def test_top_level_list_is_refused(tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(VramplanError, match="top level must be a mapping"):
        read_train_config(p)


def test_format_detection_by_tool_only_keys():
    assert detect_format({"model_name_or_path": "x", "finetuning_type": "lora"}, "f") == "llamafactory"
    assert detect_format({"base_model": "x", "sequence_len": 512}, "f") == "axolotl"
    assert detect_format({"model_name_or_path": "x", "use_peft": True}, "f") == "trl"
    assert detect_format({"model_name_or_path": "x", "max_length": 512}, "f") == "trl"
    assert detect_format({"model_name_or_path": "x", "max_length": 512}, "f", json_file=True) == "hf"
    assert detect_format({"base_model": "x", "per_device_train_batch_size": 2}, "f") == "hf"


def test_quantised_base_without_adapter_is_refused():
    with pytest.raises(VramplanError, match="key 'load_in_4bit': a quantised base needs use_peft"):
        read_mapping({"model_name_or_path": "1b", "dataset_name": "d", "load_in_4bit": True}, "t.yaml")
    with pytest.raises(VramplanError, match="key 'adapter'"):
        read_mapping({"base_model": "1b", "sequence_len": 512, "adapter": "llama-adapter"}, "a.yaml")
    with pytest.raises(VramplanError, match="key 'quantization_bit'"):
        read_mapping({"model_name_or_path": "1b", "finetuning_type": "lora", "quantization_bit": 2}, "l.yaml")


def test_llamafactory_freeze_is_estimated_as_full_and_listed():
    c = read_mapping({"model_name_or_path": "1b", "finetuning_type": "freeze", "bf16": True}, "l.yaml")
    assert c.options["method"] == "full" and "finetuning_type" in c.ignored


def test_activation_checkpointing_wins_over_its_deprecated_alias():
    c = read_mapping({"model_name_or_path": "1b", "activation_checkpointing": False, "gradient_checkpointing": True}, "h.yaml")
    assert c.options["grad_checkpointing"] is False


# ---- the CLI: --train-config ------------------------------------------------------------------
def cli(*args: str):
    from typer.testing import CliRunner

    from vramplan.cli import app

    return CliRunner().invoke(app, list(args))


def test_cli_estimate_train_config_json_shows_setup_and_what_was_read():
    r = cli("estimate", "--train-config", str(DATA / "axolotl_qlora.yaml"), "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    s = d["setup"]
    assert (s["method"], s["batch_size"], s["seq_len"], s["grad_accum"], s["grad_checkpointing"], s["optimizer"],
            s["lora_rank"], s["trainer"]) == ("qlora", 2, 4096, 4, True, "paged-adamw-8bit", 32, "hf")
    assert d["model"]["requested"] == "meta-llama/Llama-3.1-8B"
    tc = d["train_config"]
    assert tc["source"] == "axolotl" and tc["read"]["sequence_len"] == 4096 and tc["ignored"] == {}


def test_cli_options_override_the_file_and_are_listed():
    r = cli("estimate", "--train-config", str(DATA / "trl_qlora.yaml"), "-b", "1", "--model", "1b", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert (d["setup"]["batch_size"], d["model"]["name"], d["setup"]["trainer"]) == (1, "llama-3.2-1b", "trl")
    assert d["train_config"]["overridden"] == ["batch_size"] and d["train_config"]["parallel"] == {"zero": 2, "offload": "none"}


def test_cli_fit_and_plan_take_a_train_config():
    r = cli("fit", "--train-config", str(DATA / "llamafactory_lora.yaml"), "--gpu", "L40S", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["train_config"]["source"] == "llamafactory"
    r = cli("plan", "--train-config", str(DATA / "hf_training_args.json"), "--gpu", "L40S", "--limit", "1", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["request"]["grad_accum"] == 2


def test_cli_table_output_says_what_was_read_and_ignored():
    r = cli("estimate", "--train-config", str(DATA / "trl_qlora.yaml"))
    assert r.exit_code == 0, r.output
    assert "train config" in r.stdout and "(trl)" in r.stdout and "engine DeepSpeed ZeRO-2" in r.stdout
    r = cli("estimate", "--train-config", str(DATA / "hf_training_args.json"))
    assert r.exit_code == 0, r.output
    assert "(hf)" in r.stdout and "ignored torch_compile" in r.stdout


def test_cli_malformed_train_config_is_one_line_exit_2():
    r = cli("estimate", "--train-config", str(DATA / "malformed.yaml"))
    assert r.exit_code == 2
    assert "malformed.yaml: not valid YAML (line 3" in r.output and "Traceback" not in r.output


def test_4bit_storage_dtype_is_read_where_each_tool_sets_it():
    # TRL: bnb_4bit_quant_storage unset -> BitsAndBytesConfig's uint8
    assert read("trl_qlora.yaml").options["quant_storage"] == "uint8"
    # axolotl passes bf16 for every QLoRA load (loaders/model.py); LLaMA-Factory its compute dtype
    assert read("axolotl_qlora.yaml").options["quant_storage"] == "bf16"
    assert read("llamafactory_lora.yaml").options["quant_storage"] == "bf16"
    # a TRL config that names one, and one vramplan does not know
    base = {"model_name_or_path": "Qwen/Qwen2.5-1.5B", "use_peft": True, "load_in_4bit": True, "max_length": 1024}
    assert read_mapping({**base, "bnb_4bit_quant_storage": "bfloat16"}, "trl").options["quant_storage"] == "bf16"
    with pytest.raises(VramplanError, match=r"bnb_4bit_quant_storage.*'int4'.*allowed: uint8, bfloat16"):
        read_mapping({**base, "bnb_4bit_quant_storage": "int4"}, "trl")
    # not 4-bit: nothing to store
    assert "quant_storage" not in read("trl_sft_lora.yaml").options
