"""Multi-GPU runs through the transformers Trainer: the engine (DeepSpeed ZeRO, FSDP, DDP) and
world size read from the live TrainingArguments, estimate_parallel_from_trainer's per-GPU figures,
and MemoryPreflight's fit check, comparison and record per GPU (CPU only: fake live arguments,
a meta-device model)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

import vramplan
from vramplan.catalog import resolve_model
from vramplan.distributed import Parallel, estimate_distributed, make_parallel
from vramplan.errors import VramplanError
from vramplan.estimator import estimate_setup
from vramplan.records import compare, is_distributed, load_records, record_name, record_totals
from vramplan.setup import make_setup
from vramplan.trainer_bridge import (
    estimate_from_trainer,
    estimate_parallel_from_trainer,
    model_spec,
    trainer_config,
    trainer_parallel,
    trainer_rank,
    trainer_world,
)

SEQ = 512
MODEL = "llama-3.2-1b"
TRAIN_CONFIGS = Path(__file__).parent / "data" / "train_configs"
ZERO3 = {"zero_optimization": {"stage": 3, "overlap_comm": True}, "bf16": {"enabled": "auto"},
         "train_micro_batch_size_per_gpu": "auto"}
NO_ENV: dict[str, str] = {}


class LiveArgs:
    """A live TrainingArguments as the bridge reads it: to_dict() plus the properties world_size,
    process_index and deepspeed_plugin (transformers 5.23 training_args.py)."""

    def __init__(self, args: dict, *, world_size: int = 1, process_index: int = 0, deepspeed_plugin=None) -> None:
        self._args = dict(args)
        self.world_size = world_size
        self.process_index = process_index
        self.deepspeed_plugin = deepspeed_plugin

    def to_dict(self) -> dict:
        return dict(self._args)


def llama_config() -> dict:
    return {**resolve_model(MODEL).arch.hf_config, "dtype": "bfloat16"}


def base_args(**kw) -> dict:
    return {"per_device_train_batch_size": 2, "bf16": True, "optim": "adamw_torch", **kw}


def per_gpu(d) -> tuple[int, int, int, str]:
    return d.per_gpu_peak_allocated_bytes, d.per_gpu_reserved_bytes, d.per_gpu_device_total_bytes, d.peak_phase


# ---- the engine and world the live arguments run ---------------------------------------------------
def test_zero3_dict_on_two_gpus_predicts_what_estimate_distributed_does():
    cfg = llama_config()
    args = LiveArgs(base_args(deepspeed=ZERO3), world_size=2)
    d = estimate_parallel_from_trainer(cfg, args, seq_len=SEQ, environ=NO_ENV)
    assert d.parallel == make_parallel(gpus=2, zero=3)
    spec = model_spec(cfg)
    setup = make_setup(spec, **trainer_config(cfg, args, seq_len=SEQ, environ=NO_ENV).options)
    assert per_gpu(d) == per_gpu(estimate_distributed(spec, setup, make_parallel(gpus=2, zero=3)))
    # the same run through the public catalogue entry, its options written out
    ref = vramplan.estimate_parallel(MODEL, "full", gpus=2, zero=3, batch_size=2, seq_len=SEQ, precision="pure",
                                     dtype="bf16", optimizer="adamw", grad_checkpointing=False, trainer="hf")
    assert per_gpu(d) == per_gpu(ref)


def test_fsdp_full_shard_from_real_training_arguments_matches_estimate_distributed(tmp_path):
    transformers = pytest.importorskip("transformers")
    real = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], bf16=True,
                                          per_device_train_batch_size=2, optim="adamw_torch", fsdp="full_shard",
                                          fsdp_config={"activation_checkpointing": True})
    # __post_init__ turned the legacy string into fsdp=True + fsdp_config["reshard_after_forward"]
    assert real.fsdp is True and real.fsdp_config["reshard_after_forward"] is True
    cfg = llama_config()
    args = LiveArgs(real.to_dict(), world_size=2)
    tc = trainer_config(cfg, args, seq_len=SEQ, environ=NO_ENV)
    assert tc.parallel == {"fsdp": "full_shard", "offload": "none"} and tc.options["grad_checkpointing"] is True
    assert "fsdp" not in tc.ignored
    d = estimate_parallel_from_trainer(cfg, args, seq_len=SEQ, environ=NO_ENV)
    spec = model_spec(cfg)
    par = make_parallel(gpus=2, fsdp="full_shard")
    assert d.parallel == par
    assert per_gpu(d) == per_gpu(estimate_distributed(spec, make_setup(spec, **tc.options), par))
    # the real object's own world_size (1: no launcher here) wins over the environment's
    assert trainer_parallel(tc, real, {"WORLD_SIZE": "8"}) == make_parallel(gpus=1, fsdp="full_shard")


def test_one_plain_gpu_keeps_todays_single_gpu_estimate():
    cfg = llama_config()
    args = LiveArgs(base_args(gradient_checkpointing=True))
    tc = trainer_config(cfg, args, seq_len=SEQ, environ=NO_ENV)
    assert tc.parallel == {} and trainer_parallel(tc, args, NO_ENV) is None
    e = estimate_from_trainer(cfg, args, seq_len=SEQ)
    spec = model_spec(cfg)
    ref = estimate_setup(spec, make_setup(spec, method="full", batch_size=2, seq_len=SEQ, grad_accum=1, precision="pure",
                                          dtype="bf16", optimizer="adamw", grad_checkpointing=True, trainer="hf"))
    assert e == ref
    assert not any("estimate_parallel_from_trainer" in n for n in e.notes)


def test_world_size_falls_back_to_torchrun_environment_for_a_dict():
    env = {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "RANK": "3"}
    args = base_args()
    assert trainer_world(args, env) == (4, 2) and trainer_rank(args, env) == 3
    assert trainer_world(args, NO_ENV) == (1, 1) and trainer_rank(args, NO_ENV) == 0
    tc = trainer_config(llama_config(), args, seq_len=SEQ, environ=env)
    par = trainer_parallel(tc, args, env)
    assert par == Parallel(gpus_per_node=2, nodes=2) and par.engine == "ddp" and par.world == 4
    # live properties win over the environment
    live = LiveArgs(args, world_size=2, process_index=1)
    assert trainer_world(live, env) == (2, 1) and trainer_rank(live, env) == 1


def test_deepspeed_plugin_config_is_read_when_the_args_name_no_deepspeed():
    # `accelerate launch --use_deepspeed`: TrainingArguments builds the plugin from accelerate's environment
    plugin = SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"},
                                                                     "offload_param": {"device": "none"}}})
    args = LiveArgs(base_args(), world_size=2, deepspeed_plugin=plugin)
    tc = trainer_config(llama_config(), args, seq_len=SEQ, environ=NO_ENV)
    assert trainer_parallel(tc, args, NO_ENV) == make_parallel(gpus=2, zero=2, offload="optimizer")
    assert tc.read["deepspeed.zero_optimization.stage"] == 2


def test_deepspeed_json_path_is_read():
    args = LiveArgs(base_args(deepspeed=str(TRAIN_CONFIGS / "ds_zero3_offload.json")), world_size=2)
    tc = trainer_config(llama_config(), args, seq_len=SEQ, environ=NO_ENV)
    par = trainer_parallel(tc, args, NO_ENV)
    assert par is not None and (par.zero, par.offload, par.world) == (3, tc.parallel["offload"], 2)


@pytest.mark.parametrize(("env", "strategy"), [
    ({"FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "false", "FSDP_SHARDING_STRATEGY": "FULL_SHARD"}, "shard_grad_op"),
    ({"FSDP_VERSION": "1", "FSDP_RESHARD_AFTER_FORWARD": "true", "FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"}, "shard_grad_op"),
    ({"FSDP_RESHARD_AFTER_FORWARD": "false"}, "full_shard"),  # FSDP1 by default: FULL_SHARD
])
def test_accelerate_fsdp_environment_runs_fsdp_when_the_args_name_none(env, strategy):
    environ = {"ACCELERATE_USE_FSDP": "true", "FSDP_OFFLOAD_PARAMS": "false", "FSDP_ACTIVATION_CHECKPOINTING": "true",
               "WORLD_SIZE": "2", **env}
    args = base_args()
    tc = trainer_config(llama_config(), args, seq_len=SEQ, environ=environ)
    assert trainer_parallel(tc, args, environ) == make_parallel(gpus=2, fsdp=strategy)
    assert tc.options["grad_checkpointing"] is True and tc.read["env:accelerate_use_fsdp"] is True
    # the arguments' own engine wins over the environment
    ds = trainer_config(llama_config(), base_args(deepspeed=ZERO3), seq_len=SEQ, environ=environ)
    assert ds.parallel == {"zero": 3, "offload": "none"}


def test_unmodelled_engine_is_a_one_line_error_naming_the_arguments():
    args = LiveArgs(base_args(fsdp=True, fsdp_config={"reshard_after_forward": False, "cpu_offload": True}), world_size=2)
    with pytest.raises(VramplanError, match=r"^LiveArgs: FSDP shard_grad_op, parameter offload on 2 GPU\(s\) is not modelled"):
        estimate_parallel_from_trainer(llama_config(), args, seq_len=SEQ, environ=NO_ENV)


def test_estimate_from_trainer_notes_that_an_engine_has_per_gpu_figures_elsewhere():
    e = estimate_from_trainer(llama_config(), LiveArgs(base_args(deepspeed=ZERO3), world_size=2), seq_len=SEQ)
    assert any("DeepSpeed ZeRO-3, on 2 GPUs" in n and "estimate_parallel_from_trainer" in n for n in e.notes)


def test_one_plain_gpu_through_the_parallel_entry_is_estimate_parallel_on_one_gpu():
    d = estimate_parallel_from_trainer(llama_config(), base_args(), seq_len=SEQ, environ=NO_ENV)
    assert d.parallel == make_parallel()


# ---- MemoryPreflight ---------------------------------------------------------------------------------
def meta_llama(dtype: str = "bf16"):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(**{k: v for k, v in llama_config().items() if k != "model_type"})
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(cfg).to({"bf16": torch.bfloat16, "fp32": torch.float32}[dtype])


def preflight(**kw):
    from vramplan.integrations.transformers import MemoryPreflight

    return MemoryPreflight(seq_len=SEQ, **kw)


# ZeRO-3 over 8 GPUs shards fp32-loaded weights trained under bf16 autocast far below one GPU's
# figure; over 2 GPUs, bf16 weights, DeepSpeed's fp32 master and Adam states (12 bytes a
# parameter, halved) and NCCL's buffers come to more than one GPU's pure-bf16 step.
@pytest.mark.parametrize(("world", "loaded", "engine_lower"), [(8, "fp32", True), (2, "bf16", False)])
def test_callback_checks_the_per_gpu_device_total_under_an_engine(world, loaded, engine_lower):
    model = meta_llama(loaded)
    zero3 = LiveArgs(base_args(deepspeed=ZERO3), world_size=world)
    plain = LiveArgs(base_args())
    probe = preflight()
    single = probe.predict(model, plain)
    assert probe.distributed is None and probe.parallel is None and "parallel" not in probe.read
    d = estimate_parallel_from_trainer(model.config, zero3, seq_len=SEQ, loaded_dtype=loaded, environ=NO_ENV)
    assert (d.per_gpu_device_total_bytes < single.device_total_bytes) is engine_lower
    free = (d.per_gpu_device_total_bytes + single.device_total_bytes) // 2
    fits, fails = (zero3, plain) if engine_lower else (plain, zero3)
    cb = preflight(free_bytes=free)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        cb.on_train_begin(fits, None, None, model=model)
    with pytest.warns(ResourceWarning, match="will not fit"):
        preflight(free_bytes=free).on_train_begin(fails, None, None, model=model)
    cb.on_train_begin(zero3, None, None, model=model)
    assert cb.parallel == make_parallel(gpus=world, zero=3) and per_gpu(cb.distributed) == per_gpu(d)
    assert cb.estimate.setup == d.single.setup and cb.read["parallel"]["world_size"] == world


def test_callback_raises_naming_the_per_gpu_figures_and_the_engine():
    from vramplan.integrations.transformers import PreflightOOMError

    model = meta_llama()
    args = LiveArgs(base_args(deepspeed=ZERO3), world_size=2)
    d = estimate_parallel_from_trainer(model.config, args, seq_len=SEQ, loaded_dtype="bf16", environ=NO_ENV)
    cb = preflight(free_bytes=d.per_gpu_device_total_bytes - 1, raise_on_oom=True)
    with pytest.raises(PreflightOOMError, match=r"predicted per-GPU peak allocated .* under DeepSpeed ZeRO-3, on 2 GPUs "
                                                r"will not fit .* cheapest change that fits: \S"):
        cb.on_train_begin(args, None, None, model=model)


@pytest.mark.parametrize(("args", "engine"), [
    ({"deepspeed": ZERO3}, "deepspeed"),
    ({"fsdp": True, "fsdp_config": {"reshard_after_forward": False}}, "fsdp2"),
    ({}, "ddp"),
])
def test_callback_record_re_estimates_to_the_per_gpu_figures_it_predicted(tmp_path, monkeypatch, args, engine):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (60 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    model = meta_llama()
    out = tmp_path / "rec.jsonl"
    cb = preflight(free_bytes=80 * 2**30, record_path=out, measure_steps=1)
    cb.on_train_begin(LiveArgs(base_args(**args), world_size=2, process_index=1), None, None, model=model)
    d = cb.distributed
    assert d is not None
    g = 2**30
    cb._steps.append({"alloc_start": g, "peak_fwd": 5 * g, "peak_bwd": 9 * g, "peak": 10 * g, "alloc_end": g,
                      "reserved_peak": 11 * g})
    cb._finish()
    assert cb.comparison.predicted_bytes == d.per_gpu_peak_allocated_bytes
    (rec,) = load_records([out])
    assert (rec["engine"], rec["world_size"], rec["rank"]) == (engine, 2, 1)
    assert is_distributed(rec) and record_name(rec).endswith("@r1")
    assert rec["predicted_peak_allocated"] == d.per_gpu_peak_allocated_bytes
    assert tuple(record_totals(rec)) == (d.per_gpu_peak_allocated_bytes, d.peak_phase, d.per_gpu_reserved_bytes,
                                         d.per_gpu_device_total_bytes)
    (c,) = compare([rec])
    assert (c.estimated, c.measured) == (d.per_gpu_peak_allocated_bytes, 10 * g)
    json.dumps(rec)


def test_held_nccl_memory_is_nothing_without_a_process_group():
    pytest.importorskip("torch")
    from vramplan.integrations.transformers import held_nccl_bytes

    d = estimate_parallel_from_trainer(llama_config(), LiveArgs(base_args(deepspeed=ZERO3), world_size=2), seq_len=SEQ,
                                       environ=NO_ENV)
    assert held_nccl_bytes(d) == 0


def test_callback_warns_and_steps_aside_when_it_cannot_model_the_run():
    # a memory check must never stop a training run for its own limits
    model = meta_llama()
    args = LiveArgs(base_args(fsdp=True, fsdp_config={"reshard_after_forward": False, "cpu_offload": True}), world_size=2)
    cb = preflight(free_bytes=1, raise_on_oom=True)
    with pytest.warns(RuntimeWarning, match=r"no preflight estimate for this run: LiveArgs: FSDP shard_grad_op"):
        cb.on_train_begin(args, None, None, model=model)
    assert cb.estimate is None
    cb.on_step_end(args, None, None)
    cb.on_train_end(args, None, None)
    assert cb.comparison is None
