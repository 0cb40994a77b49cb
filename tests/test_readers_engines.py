"""The multi-GPU engine of a training config (vramplan/readers/engines.py): DeepSpeed JSON (path or
dict), FSDP (`fsdp` in its transformers forms + `fsdp_config`), axolotl's and LLaMA-Factory's keys,
accelerate configs; and --train-config merging it under the --gpus/--zero/--fsdp/--offload flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vramplan.errors import VramplanError
from vramplan.readers import detect_format, read_mapping, read_train_config
from vramplan.readers.commandline import merge_parallel

DATA = Path(__file__).parent / "data" / "train_configs"
FLAGS = {"gpus": 1, "nodes": 1, "zero": 0, "fsdp": None, "offload": "none"}  # PARALLEL_DEFAULTS


def read(name: str):
    return read_train_config(DATA / name)


def hf(**keys):
    return read_mapping({"model_name_or_path": "1b", **keys}, "args.yaml")


# ---- DeepSpeed -----------------------------------------------------------------------------------
def test_trl_deepspeed_path_next_to_the_file_gives_its_zero_stage():
    c = read("trl_zero3.yaml")
    assert c.parallel == {"zero": 3, "offload": "none"} and c.engine == "DeepSpeed ZeRO-3"
    assert c.read["deepspeed"] == "ds_zero3.json" and c.read["deepspeed.zero_optimization.stage"] == 3
    assert c.to_dict()["parallel"] == {"zero": 3, "offload": "none"} and c.to_dict()["engine"] == "DeepSpeed ZeRO-3"


def test_axolotl_deepspeed_cpu_offload_of_optimizer_and_params_is_params_offload():
    c = read("axolotl_deepspeed.yaml")
    assert c.parallel == {"zero": 3, "offload": "params"} and c.engine == "DeepSpeed ZeRO-3, parameter offload"


def test_llamafactory_deepspeed_cpu_optimizer_is_optimizer_offload():
    c = read("llamafactory_zero2_offload.yaml")
    assert c.parallel == {"zero": 2, "offload": "optimizer"}
    assert c.options["grad_checkpointing"] is True  # LLaMA-Factory's own default, untouched by the engine


@pytest.mark.parametrize(("zero", "parallel"), [
    ({"stage": 1}, {"zero": 1, "offload": "none"}),
    ({"stage": "2"}, {"zero": 2, "offload": "none"}),
    ({}, {"zero": 0, "offload": "none"}),  # DeepSpeedZeroConfig.stage defaults to 0
    ({"stage": 2, "cpu_offload": True}, {"zero": 2, "offload": "optimizer"}),  # deprecated boolean
    ({"stage": 3, "cpu_offload_param": True, "cpu_offload": True}, {"zero": 3, "offload": "params"}),
    ({"stage": 3, "offload_optimizer": {"device": "none"}, "offload_param": {"device": "none"}}, {"zero": 3, "offload": "none"}),
    ({"stage": 3, "offload_optimizer": {"pin_memory": True}}, {"zero": 3, "offload": "none"}),  # no device: none
])
def test_inline_deepspeed_dict_forms(zero, parallel):
    assert hf(deepspeed={"zero_optimization": zero}).parallel == parallel


def test_deprecated_zero_optimization_true_is_stage_1():
    assert hf(deepspeed={"zero_optimization": True}).parallel == {"zero": 1, "offload": "none"}


def test_parameter_offload_below_stage_3_is_listed_as_ignored():
    c = hf(deepspeed={"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}})
    assert c.parallel == {"zero": 2, "offload": "none"} and "deepspeed.zero_optimization.offload_param" in c.ignored


def test_parameter_offload_without_optimizer_offload_is_estimated_as_both_and_said():
    c = hf(deepspeed={"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}})
    assert c.parallel == {"zero": 3, "offload": "params"} and "deepspeed.zero_optimization.offload_optimizer" in c.ignored


def test_no_deepspeed_no_fsdp_leaves_parallel_empty():
    c = read("trl_defaults.yaml")
    assert c.parallel == {} and c.engine is None and c.to_dict()["engine"] is None


# ---- relative paths ------------------------------------------------------------------------------
def _ds(path: Path, stage: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"zero_optimization": {"stage": stage}}))


def test_relative_deepspeed_path_resolves_next_to_the_config_before_the_current_directory(tmp_path, monkeypatch):
    cfg = tmp_path / "configs" / "sft.yaml"
    _ds(tmp_path / "configs" / "ds" / "z.json", 2)
    _ds(tmp_path / "ds" / "z.json", 3)
    cfg.write_text("model_name_or_path: 1b\ndataset_name: d\ndeepspeed: ds/z.json\n")
    monkeypatch.chdir(tmp_path)
    assert read_train_config(cfg).parallel["zero"] == 2


def test_relative_deepspeed_path_falls_back_to_the_current_directory(tmp_path, monkeypatch):
    # LLaMA-Factory's examples name examples/deepspeed/ds_z3_config.json from the repository root
    cfg = tmp_path / "examples" / "train_full" / "sft.yaml"
    cfg.parent.mkdir(parents=True)
    _ds(tmp_path / "examples" / "deepspeed" / "ds_z3_config.json", 3)
    cfg.write_text("model_name_or_path: 1b\nfinetuning_type: full\ndeepspeed: examples/deepspeed/ds_z3_config.json\n")
    monkeypatch.chdir(tmp_path)
    assert read_train_config(cfg).parallel == {"zero": 3, "offload": "none"}


def test_fsdp_config_path_resolves_next_to_the_config():
    c = read("hf_fsdp_config_file.json")
    assert c.parallel == {"fsdp": "shard_grad_op", "offload": "none"}  # fsdp_reshard_after_forward: false
    assert c.read["fsdp_config"] == "fsdp_shard_grad_op.json"


# ---- FSDP ----------------------------------------------------------------------------------------
def test_hf_fsdp_string_with_offload_and_fsdp_activation_checkpointing():
    c = read("hf_fsdp.yaml")
    assert c.parallel == {"fsdp": "full_shard", "offload": "params"}
    assert c.options["grad_checkpointing"] is True  # fsdp_config.activation_checkpointing, HF's default is off


@pytest.mark.parametrize(("fsdp", "config", "parallel"), [
    (True, None, {"fsdp": "full_shard", "offload": "none"}),  # transformers 5: fsdp=True is full_shard
    ("true", None, {"fsdp": "full_shard", "offload": "none"}),
    ("shard_grad_op", None, {"fsdp": "shard_grad_op", "offload": "none"}),
    ("full_shard auto_wrap", None, {"fsdp": "full_shard", "offload": "none"}),
    ("auto_wrap", None, {"fsdp": "full_shard", "offload": "none"}),
    (["full_shard", "offload", "auto_wrap"], None, {"fsdp": "full_shard", "offload": "params"}),
    ("no_shard", {"version": 1}, {"fsdp": "no_shard", "offload": "none"}),
    (True, {"reshard_after_forward": False}, {"fsdp": "shard_grad_op", "offload": "none"}),
    ("full_shard", {"fsdp_reshard_after_forward": False}, {"fsdp": "shard_grad_op", "offload": "none"}),  # fsdp_config wins
    (True, {"reshard_after_forward": "SHARD_GRAD_OP", "version": 1}, {"fsdp": "shard_grad_op", "offload": "none"}),
    (True, {"reshard_after_forward": 3}, {"fsdp": "no_shard", "offload": "none"}),  # ShardingStrategy.NO_SHARD
    (True, {"cpu_offload": True}, {"fsdp": "full_shard", "offload": "params"}),
    (True, {"fsdp_offload_params": True}, {"fsdp": "full_shard", "offload": "params"}),
    (True, {"offload_params": "true"}, {"fsdp": "full_shard", "offload": "params"}),
])
def test_hf_fsdp_forms(fsdp, config, parallel):
    keys = {"fsdp": fsdp} if config is None else {"fsdp": fsdp, "fsdp_config": config}
    assert hf(**keys).parallel == parallel


@pytest.mark.parametrize("off", [False, "", None, []])
def test_fsdp_off_is_no_engine(off):
    assert hf(fsdp=off).parallel == {}


def test_hf_fsdp_config_without_fsdp_is_ignored_and_said():
    c = hf(fsdp_config={"cpu_offload": True})
    assert c.parallel == {} and "fsdp_config" in c.ignored


def test_fsdp_activation_checkpointing_false_leaves_the_trainers_checkpointing():
    c = hf(fsdp=True, gradient_checkpointing=True, fsdp_config={"activation_checkpointing": False})
    assert c.options["grad_checkpointing"] is True


def test_axolotl_fsdp_config_alone_turns_fsdp2_on_with_offload_and_checkpointing():
    c = read("axolotl_fsdp2.yaml")
    assert c.parallel == {"fsdp": "full_shard", "offload": "params"}
    assert c.options["grad_checkpointing"] is True and c.read["fsdp_version"] == 2


def test_axolotl_legacy_fsdp_list_and_prefixed_config_keys():
    c = read("axolotl_fsdp1_legacy.yaml")
    assert c.parallel == {"fsdp": "shard_grad_op", "offload": "none"}
    assert c.options["grad_checkpointing"] is False and c.read["fsdp_config.fsdp_version"] == 1


# ---- accelerate ----------------------------------------------------------------------------------
def test_accelerate_config_is_its_own_format():
    assert detect_format({"compute_environment": "LOCAL_MACHINE", "distributed_type": "FSDP"}, "f") == "accelerate"


def test_accelerate_fsdp_config_gives_world_engine_and_checkpointing():
    c = read("accelerate_fsdp.yaml")
    assert (c.source, c.model) == ("accelerate", "")
    assert c.parallel == {"gpus": 4, "nodes": 1, "fsdp": "full_shard", "offload": "none"}
    assert c.options == {"grad_checkpointing": True}  # fsdp_activation_checkpointing; no method, no other option


def test_accelerate_deepspeed_keys_over_two_machines():
    c = read("accelerate_deepspeed.yaml")
    assert c.parallel == {"gpus": 8, "nodes": 2, "zero": 2, "offload": "optimizer"}  # 16 processes on 2 machines


def test_accelerate_deepspeed_config_file_resolves_next_to_it():
    c = read("accelerate_ds_file.yaml")
    assert c.parallel == {"gpus": 8, "nodes": 1, "zero": 3, "offload": "params"}


def test_accelerate_deepspeed_stage_defaults_to_2():
    c = read_mapping({"compute_environment": "LOCAL_MACHINE", "distributed_type": "DEEPSPEED", "num_processes": 2}, "a.yaml")
    assert c.parallel == {"gpus": 2, "nodes": 1, "zero": 2, "offload": "none"}
    assert "deepspeed_config.zero_stage" in c.defaulted


def test_accelerate_multi_gpu_is_plain_data_parallel():
    c = read_mapping({"compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_GPU", "num_processes": 4}, "a.yaml")
    assert c.parallel == {"gpus": 4, "nodes": 1} and c.engine == "DDP"


def test_accelerate_processes_must_split_evenly_over_machines():
    with pytest.raises(VramplanError, match=r"a\.yaml: key 'num_processes': 6 processes over 4 machines"):
        read_mapping({"compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_GPU", "num_processes": 6,
                      "num_machines": 4}, "a.yaml")


def test_accelerate_unmodelled_distributed_type_is_refused():
    with pytest.raises(VramplanError, match=r"key 'distributed_type': 'MEGATRON_LM' is not modelled; allowed: NO, MULTI_GPU"):
        read_mapping({"compute_environment": "LOCAL_MACHINE", "distributed_type": "MEGATRON_LM"}, "a.yaml")


# ---- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("keys", "match"), [
    ({"deepspeed": str(DATA / "ds_bad_stage.json")}, r"ds_bad_stage\.json: key 'zero_optimization\.stage': ZeRO stage 4 is not one of 0, 1, 2, 3"),
    ({"deepspeed": str(DATA / "ds_bad_auto_stage.json")}, r"ds_bad_auto_stage\.json: key 'zero_optimization\.stage': 'auto' is not allowed"),
    ({"deepspeed": str(DATA / "ds_bad_nvme.json")},
     r"ds_bad_nvme\.json: key 'zero_optimization\.offload_optimizer\.device': 'nvme': NVMe offload \(ZeRO-Infinity\) is not modelled"),
    ({"deepspeed": {"zero_optimization": {"stage": "auto"}}}, r"args\.yaml: key 'deepspeed\.zero_optimization\.stage': 'auto'"),
    ({"deepspeed": {"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}}}, "optimizer offload needs ZeRO stage 1, 2 or 3"),
    ({"deepspeed": "missing_ds.json"}, r"args\.yaml: key 'deepspeed': no DeepSpeed config at 'missing_ds\.json' \(looked next to"),
    ({"fsdp": True, "fsdp_config": "missing_fsdp.json"}, r"key 'fsdp_config': no FSDP config at 'missing_fsdp\.json'"),
    ({"fsdp": "hybrid_shard auto_wrap"}, r"key 'fsdp': 'hybrid_shard' \(sharded within a node, replicated across nodes\) is not modelled"),
    ({"fsdp": ["hybrid_shard_zero2"]}, "'hybrid_shard_zero2'.* is not modelled"),
    ({"fsdp": True, "fsdp_config": {"reshard_after_forward": "HYBRID_SHARD", "version": 1}},
     r"key 'fsdp_config\.reshard_after_forward': 'hybrid_shard'"),
    ({"fsdp": "full_shard fast"}, r"unknown FSDP option 'fast'; allowed: full_shard, shard_grad_op"),
    ({"fsdp": True, "fsdp_config": {"reshard_after_forward": "sometimes"}}, "expected true, false or a sharding strategy"),
    ({"fsdp": True, "deepspeed": {"zero_optimization": {"stage": 2}}}, "deepspeed and fsdp are both set"),
])
def test_engine_errors_are_one_line_naming_the_value(keys, match):
    with pytest.raises(VramplanError, match=match) as e:
        hf(**keys)
    assert "\n" not in str(e.value)


def test_accelerate_hybrid_shard_is_refused():
    with pytest.raises(VramplanError, match=r"key 'fsdp_config\.fsdp_sharding_strategy': 'hybrid_shard'.*not modelled"):
        read("accelerate_fsdp1_hybrid.yaml")


def test_accelerate_nvme_offload_is_refused():
    with pytest.raises(VramplanError, match=r"key 'deepspeed_config\.offload_param_device': 'nvme'"):
        read_mapping({"compute_environment": "LOCAL_MACHINE", "distributed_type": "DEEPSPEED",
                      "deepspeed_config": {"zero_stage": 3, "offload_param_device": "nvme"}}, "a.yaml")


# ---- merging under the command line --------------------------------------------------------------
def test_merge_a_flag_given_wins_else_the_file_else_the_default():
    par, over = merge_parallel({**FLAGS, "gpus": 4}, {"zero": 3, "offload": "optimizer"}, ["gpus"])
    assert par == {"gpus": 4, "nodes": 1, "zero": 3, "fsdp": None, "offload": "optimizer"} and over == []
    par, over = merge_parallel({**FLAGS, "zero": 2}, {"gpus": 8, "zero": 3, "offload": "optimizer"}, ["zero"])
    assert par == {"gpus": 8, "nodes": 1, "zero": 2, "fsdp": None, "offload": "optimizer"} and over == ["zero"]


def test_merge_a_default_value_not_given_does_not_beat_the_file():
    par, _ = merge_parallel(FLAGS, {"gpus": 8, "nodes": 2, "fsdp": "shard_grad_op", "offload": "none"}, [])
    assert par == {"gpus": 8, "nodes": 2, "zero": 0, "fsdp": "shard_grad_op", "offload": "none"}


def test_merge_an_engine_of_another_kind_on_the_command_line_replaces_the_files_engine():
    par, over = merge_parallel({**FLAGS, "fsdp": "full_shard"}, {"zero": 3, "offload": "optimizer"}, ["fsdp"])
    assert par == {**FLAGS, "fsdp": "full_shard"} and over == ["offload", "zero"]
    par, over = merge_parallel({**FLAGS, "zero": 2}, {"fsdp": "full_shard", "offload": "params"}, ["zero"])
    assert par == {**FLAGS, "zero": 2} and over == ["fsdp", "offload"]
    par, _ = merge_parallel(FLAGS, {"zero": 3, "offload": "optimizer"}, ["zero"])  # --zero 0: plain DDP
    assert par == FLAGS


# ---- the CLI -------------------------------------------------------------------------------------
def cli(*args: str):
    from typer.testing import CliRunner

    from vramplan.cli import app

    return CliRunner().invoke(app, list(args))


def test_cli_trl_deepspeed_zero3_on_2_gpus_equals_estimate_distributed():
    r = cli("estimate", "--train-config", str(DATA / "trl_zero3.yaml"), "--gpus", "2", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    from vramplan.catalog import resolve_model
    from vramplan.distributed import estimate_distributed, make_parallel
    from vramplan.setup import make_setup

    c = read("trl_zero3.yaml")
    spec = resolve_model(c.model)
    lib = estimate_distributed(spec, make_setup(spec, **c.options), make_parallel(gpus=2, zero=3)).to_dict()
    assert d["per_gpu"] == lib["per_gpu"] and d["cpu"] == lib["cpu"]
    assert (d["parallel"]["engine"], d["parallel"]["zero"], d["parallel"]["world_size"]) == ("deepspeed", 3, 2)
    assert d["train_config"]["parallel"] == {"zero": 3, "offload": "none"} and d["train_config"]["notes"] == []


def test_cli_file_engine_without_a_gpu_count_estimates_1_gpu_and_says_so():
    r = cli("estimate", "--train-config", str(DATA / "trl_zero3.yaml"))
    assert r.exit_code == 0, r.output
    assert "engine DeepSpeed ZeRO-3" in r.stdout
    assert "the file runs DeepSpeed ZeRO-3: per-GPU figures for 1 GPU; pass --gpus N" in r.stdout
    r = cli("estimate", "--train-config", str(DATA / "trl_zero3.yaml"), "--json")
    d = json.loads(r.stdout)
    assert d["parallel"]["world_size"] == 1 and d["parallel"]["zero"] == 3
    assert d["train_config"]["notes"] == ["the file runs DeepSpeed ZeRO-3: per-GPU figures for 1 GPU; pass --gpus N"]


def test_cli_zero_and_gpus_flags_beat_the_file():
    r = cli("estimate", "--train-config", str(DATA / "axolotl_deepspeed.yaml"), "--zero", "3", "--offload", "optimizer",
            "--gpus", "4", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert (d["parallel"]["zero"], d["parallel"]["offload"], d["parallel"]["world_size"]) == (3, "optimizer", 4)
    assert d["train_config"]["overridden"] == ["offload"]  # zero 3 is the file's too


def test_cli_fsdp_flag_replaces_a_deepspeed_files_engine():
    r = cli("estimate", "--train-config", str(DATA / "trl_zero3.yaml"), "--fsdp", "full_shard", "--gpus", "2", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert (d["parallel"]["engine"], d["parallel"]["zero"]) == ("fsdp", 0)
    assert d["train_config"]["overridden"] == ["offload", "zero"]


def test_cli_accelerate_config_gives_the_world_and_needs_model():
    r = cli("estimate", "--train-config", str(DATA / "accelerate_fsdp.yaml"))
    assert r.exit_code == 2
    assert r.output.strip().splitlines() == ["error: " + f"{DATA / 'accelerate_fsdp.yaml'}: an accelerate config names no model: pass --model"]
    r = cli("estimate", "--train-config", str(DATA / "accelerate_fsdp.yaml"), "--model", "1b", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert (d["parallel"]["fsdp"], d["parallel"]["world_size"], d["setup"]["grad_checkpointing"]) == ("full_shard", 4, True)


def test_cli_fit_takes_the_file_engine():
    r = cli("fit", "--train-config", str(DATA / "hf_fsdp.yaml"), "--gpus", "8", "--gpu", "H100", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert (d["parallel"]["fsdp"], d["parallel"]["offload"], d["parallel"]["world_size"]) == ("full_shard", "params", 8)


def test_cli_plan_lists_the_file_engine_as_ignored():
    r = cli("plan", "--train-config", str(DATA / "trl_zero3.yaml"), "--gpu", "L40S", "--limit", "1", "--json")
    assert r.exit_code == 0, r.output
    assert "DeepSpeed ZeRO-3" in json.loads(r.stdout)["train_config"]["ignored"]["(engine)"]


def _config_with(tmp_path: Path, line: str) -> str:
    p = tmp_path / "sft.yaml"
    p.write_text(f"model_name_or_path: 1b\ndataset_name: d\n{line}\n")
    return str(p)


@pytest.mark.parametrize(("line", "said"), [
    (f"deepspeed: {DATA / 'ds_bad_stage.json'}", "ZeRO stage 4 is not one of 0, 1, 2, 3"),
    (f"deepspeed: {DATA / 'ds_bad_auto_stage.json'}", "'auto' is not allowed for the ZeRO stage"),
    (f"deepspeed: {DATA / 'ds_bad_nvme.json'}", "'nvme': NVMe offload (ZeRO-Infinity) is not modelled; allowed: none, cpu"),
    ("fsdp: hybrid_shard auto_wrap", "'hybrid_shard' (sharded within a node, replicated across nodes) is not modelled"),
    ("deepspeed: nowhere/ds.json", "no DeepSpeed config at 'nowhere/ds.json'"),
])
def test_cli_engine_errors_are_one_line_exit_2(tmp_path, line, said):
    r = cli("estimate", "--train-config", _config_with(tmp_path, line), "--json")
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and said in lines[0] and "Traceback" not in r.output


def test_cli_flags_that_make_the_files_offload_invalid_name_the_file():
    r = cli("estimate", "--train-config", str(DATA / "axolotl_deepspeed.yaml"), "--zero", "2")
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "parameter offload needs --zero 3" in lines[0] and "axolotl_deepspeed.yaml sets offload=params" in lines[0]
