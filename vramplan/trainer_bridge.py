"""The library entry for tools that hold the live training objects:

    est = vramplan.estimate_from_trainer(model.config, trainer.args, model.peft_config["default"])

`model_config` is a transformers PretrainedConfig or its dict, `training_args` a TrainingArguments
(or TRL SFTConfig) or its dict, `peft_config` a peft LoraConfig (prefix / prompt / IA3 too) or its
dict. Imports no torch: objects are read through their `to_dict()`.

Under several GPUs or an engine (DeepSpeed ZeRO, FSDP, plain DDP with world size > 1) the per-GPU
figures are `estimate_parallel_from_trainer`'s: the engine from `deepspeed` / `fsdp` + `fsdp_config`
(or accelerate's resolved DeepSpeed plugin, or `accelerate launch`'s FSDP environment), the world
size from the live arguments or torchrun's environment (`trainer_parallel`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from vramplan.arch import FAMILIES, ModelSpec, arch_from_hf_config, build_spec
from vramplan.errors import VramplanError
from vramplan.estimator import Estimate, estimate_setup
from vramplan.readers.common import DTYPE_NAMES, Reading, TrainConfig, engine_text, lora_targets, map_attn, quant_storage
from vramplan.readers.engines import ENGINE_KEYS, fsdp_from_config, read_engine
from vramplan.readers.hf import read_length, read_training_args
from vramplan.readers.trl import TRL_MAX_LENGTH
from vramplan.setup import Setup, make_setup

if TYPE_CHECKING:
    from vramplan.distributed import DistributedEstimate, Parallel

# TrainingArguments carry no sequence length: without seq_len= (or TRL's max_length) this is
# assumed, capped at the model's positions, and listed in `ignored`.
ASSUMED_SEQ_LEN = 2048
# peft PeftType values (peft 0.21 utils/peft_types.py) -> vramplan methods.
PEFT_METHODS = {"LORA": "lora", "PREFIX_TUNING": "prefix", "PROMPT_TUNING": "prompt", "IA3": "ia3"}


def as_dict(obj: Any, what: str) -> dict[str, Any]:
    """A config object's dict (PretrainedConfig / TrainingArguments / PeftConfig: to_dict())."""
    if isinstance(obj, Mapping):
        return dict(obj)
    to_dict = getattr(obj, "to_dict", None)
    if callable(to_dict):
        d = to_dict()
        if isinstance(d, Mapping):
            return dict(d)
    raise VramplanError(f"{what}: expected a dict or an object with to_dict(), got {type(obj).__name__}")


def is_trl_args(training_args: Any, args: Mapping[str, Any]) -> bool:
    """TRL's SFTConfig (by class, or by its keys max_length + dataset_text_field in a dict)."""
    if type(training_args).__module__.startswith("trl"):
        return True
    return "dataset_text_field" in args and "max_length" in args


def model_spec(cfg: Mapping[str, Any]) -> ModelSpec:
    """The ModelSpec of a live model's config (text_config for multimodal wrappers)."""
    c = dict(cfg)
    if c.get("model_type") not in FAMILIES and isinstance(c.get("text_config"), dict):
        c = dict(c["text_config"])
    name = str(cfg.get("_name_or_path") or cfg.get("name_or_path") or c.get("model_type") or "custom")
    return build_spec(arch_from_hf_config(c, name))


def config_dtype(cfg: Mapping[str, Any]) -> str:
    """The dtype the model's weights are in, from config.dtype (transformers 5 records the loaded
    dtype there); a config that names none built its model in fp32 (from_config's default)."""
    v = cfg.get("dtype") or cfg.get("torch_dtype")
    return DTYPE_NAMES.get(str(v), "fp32") if v is not None else "fp32"


def _quantisation(r: Reading, cfg: Mapping[str, Any]) -> str | None:
    """nf4 / fp4 / int8 from config.quantization_config (bitsandbytes), else None."""
    q = cfg.get("quantization_config")
    if not isinstance(q, Mapping):
        return None
    if q.get("quant_method", "bitsandbytes") != "bitsandbytes":
        raise VramplanError(f"model_config: key 'quantization_config': {q.get('quant_method')!r} is not modelled; "
                            "allowed: bitsandbytes 4/8-bit")
    r.read["quantization_config"] = {k: q.get(k) for k in ("load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type",
                                                            "bnb_4bit_use_double_quant", "bnb_4bit_quant_storage")}
    if q.get("load_in_4bit"):
        r.set(double_quant=bool(q.get("bnb_4bit_use_double_quant", False)),
              quant_storage=quant_storage(Reading(q, "quantization_config"), "bnb_4bit_quant_storage",
                                          q.get("bnb_4bit_quant_storage")))
        return str(q.get("bnb_4bit_quant_type") or "fp4")  # BitsAndBytesConfig default quant type is fp4
    return "int8" if q.get("load_in_8bit") else None


def _peft(r: Reading, peft: Mapping[str, Any], spec: ModelSpec, quant: str | None) -> None:
    p = Reading(peft, "peft_config")
    kind = p.text("peft_type", "LORA")
    assert kind is not None
    kind = kind.upper().rsplit(".", 1)[-1]
    if kind not in PEFT_METHODS:
        raise p.fail("peft_type", f"{kind!r} is not modelled; allowed: {', '.join(PEFT_METHODS)}")
    method = PEFT_METHODS[kind]
    if method == "lora":
        method = "qlora" if quant in ("nf4", "fp4") else "lora"
        r.set(lora_rank=p.posint("r", 8), lora_alpha=p.number("lora_alpha", 8), lora_dropout=p.number("lora_dropout", 0.0),
              lora_targets=lora_targets(p, "target_modules", spec.name, spec.arch.model_type))
        if p.bool("use_dora"):
            r.set(use_dora=True)
    elif method in ("prefix", "prompt"):
        r.set(prefix_tokens=p.posint("num_virtual_tokens"), prefix_projection=p.bool("prefix_projection") or None)
    elif quant is not None:
        raise p.fail("peft_type", f"{kind} on a quantised base is not modelled")
    r.set(method=method)
    r.read.update({f"peft_config.{k}": v for k, v in p.read.items()})
    r.defaulted.extend(f"peft_config.{k}" for k in p.defaulted)


def live_deepspeed_config(training_args: Any) -> Mapping[str, Any] | None:
    """The DeepSpeed config a live TrainingArguments resolved, or None (a dict, no DeepSpeed):
    accelerate's DeepSpeedPlugin, which TrainingArguments.__post_init__ builds from `deepspeed`
    (a JSON path loaded, or the dict) or, under `accelerate launch --use_deepspeed`, from
    accelerate's environment (transformers 5.23 training_args.py, step 12 of __post_init__;
    accelerate 1.15 utils/dataclasses.py DeepSpeedPlugin.__post_init__: deepspeed_config is its
    HfDeepSpeedConfig's dict, with zero_optimization.stage and the offload devices)."""
    if isinstance(training_args, Mapping):
        return None
    cfg = getattr(getattr(training_args, "deepspeed_plugin", None), "deepspeed_config", None)
    return cfg if isinstance(cfg, Mapping) else None


# What `accelerate launch` with an FSDP config exports (accelerate 1.15 utils/launch.py
# prepare_multi_gpu_env) and FullyShardedDataParallelPlugin.__post_init__ reads back when the
# Trainer passes no plugin, i.e. TrainingArguments without `fsdp` (utils/dataclasses.py).
ACCELERATE_FSDP_ENV = ("FSDP_VERSION", "FSDP_SHARDING_STRATEGY", "FSDP_RESHARD_AFTER_FORWARD", "FSDP_OFFLOAD_PARAMS",
                       "FSDP_ACTIVATION_CHECKPOINTING")


def accelerate_fsdp_env(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The FSDP settings of `accelerate launch`'s environment as an fsdp_config mapping (keys
    lower-cased: fsdp_version, fsdp_reshard_after_forward ...), or None unless ACCELERATE_USE_FSDP
    is true. The plugin's FSDP_VERSION defaults to 1, whose strategy is FSDP_SHARDING_STRATEGY;
    FSDP2 reads FSDP_RESHARD_AFTER_FORWARD instead; so only the one its version reads is kept."""
    if str(environ.get("ACCELERATE_USE_FSDP", "false")).strip().lower() != "true":
        return None
    cfg = {k.lower(): environ[k] for k in ACCELERATE_FSDP_ENV if k in environ}
    unread = "fsdp_sharding_strategy" if str(cfg.get("fsdp_version", "1")).strip() == "2" else "fsdp_reshard_after_forward"
    cfg.pop(unread, None)
    return cfg


def _read_live_engine(r: Reading, environ: Mapping[str, str]) -> None:
    """The engine of the arguments (`deepspeed`, `fsdp` / `fsdp_config`); where they name none,
    `accelerate launch`'s FSDP environment (read keys `env:fsdp_...`)."""
    read_engine(r)
    env = accelerate_fsdp_env(environ) if not r.parallel else None
    if env is not None:
        r.read["env:accelerate_use_fsdp"] = True
        fsdp_from_config(r, env, "env:", lambda k, msg: VramplanError(f"environment variable {k.upper()}: {msg}"))


def trainer_config(model_config: Any, training_args: Any, peft_config: Any = None, *,
                   environ: Mapping[str, str] | None = None, **overrides: Any) -> TrainConfig:
    """The vramplan options of a live (model config, training args, peft config); `overrides`
    (vramplan option names) win, e.g. kbit_prepare seen on the live model; `loaded_dtype`
    (bf16/fp16/fp32) is the dtype the dense weights were loaded in, when the config does not say.
    The engine the arguments run is read into `parallel` (see `trainer_parallel`); `environ`
    (default os.environ) is where `accelerate launch` leaves an FSDP config."""
    cfg = as_dict(model_config, "model_config")
    return _trainer_config(cfg, model_spec(cfg), training_args, peft_config, environ=environ, **overrides)


def trainer_setup(model_config: Any, training_args: Any, peft_config: Any = None, *,
                  environ: Mapping[str, str] | None = None, **overrides: Any) -> tuple[TrainConfig, ModelSpec, Setup]:
    """What a live run is, in vramplan's terms: the options read (trainer_config), the model's
    spec and the validated Setup they make; the one path of estimate_from_trainer,
    estimate_parallel_from_trainer and the Trainer callback's prediction."""
    cfg = as_dict(model_config, "model_config")
    spec = model_spec(cfg)
    tc = _trainer_config(cfg, spec, training_args, peft_config, environ=environ, **overrides)
    return tc, spec, make_setup(spec, **tc.options)


def _trainer_config(cfg: dict[str, Any], spec: ModelSpec, training_args: Any, peft_config: Any, *,
                    environ: Mapping[str, str] | None, **overrides: Any) -> TrainConfig:
    args = as_dict(training_args, "training_args")
    ds = live_deepspeed_config(training_args)
    if ds is not None:
        args["deepspeed"] = dict(ds)
    trl = is_trl_args(training_args, args)
    r = Reading(args, type(training_args).__name__ if not isinstance(training_args, Mapping) else "training_args")
    weights = overrides.pop("loaded_dtype", None) or config_dtype(cfg)
    # A live args object is already resolved (SFTConfig's checkpointing default True included);
    # for a dict, each tool's default applies.
    read_training_args(r, ckpt_default=trl, weights=weights)
    # after the checkpointing keys: FSDP's own activation checkpointing turns it on
    _read_live_engine(r, os.environ if environ is None else environ)
    if trl:
        if "max_length" in args and args["max_length"] is None:
            r.ignored["max_length"] = "None: no truncation, the data sets the length; pass seq_len="
        else:
            r.set(seq_len=r.posint("max_length", TRL_MAX_LENGTH))  # SFTConfig default (sft_config.py)
        if r.bool("activation_offloading"):
            r.set(activation_offload=True)
    elif "seq_len" not in overrides:
        read_length(r, None)
    attn = cfg.get("_attn_implementation") or cfg.get("attn_implementation")
    if attn:
        r.set(attn=map_attn(Reading({"attn_implementation": attn}, "model_config"), "attn_implementation"))
    quant = _quantisation(r, cfg)
    if quant is not None:
        r.set(dtype=quant, precision="pure")
    if peft_config is not None:
        _peft(r, as_dict(peft_config, "peft_config"), spec, quant)
    elif quant is not None:
        raise VramplanError("model_config: a quantised base trains only adapters: pass its peft_config")
    r.options.setdefault("method", "full")
    r.set(trainer="trl" if trl else "hf", **overrides)
    if "seq_len" not in r.options and "max_length" not in r.ignored:
        r.options["seq_len"] = min(ASSUMED_SEQ_LEN, spec.arch.max_positions)
        r.ignored["(sequence length)"] = (f"not in the training arguments: assumed {r.options['seq_len']} tokens "
                                          "(pass seq_len=)")
    return r.result("trl" if trl else "hf", spec.name)


def _whole(v: Any, least: int) -> int | None:
    """A process count or rank from a live attribute or an environment string, if it is a whole
    number >= `least`; else None."""
    if isinstance(v, str) and v.strip().isdigit():
        v = int(v.strip())
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= least else None


def _live(training_args: Any, name: str) -> Any:
    """A live TrainingArguments property (a dict's key); None where absent or unreadable
    (TrainingArguments.world_size calls requires_backends, ImportError without torch)."""
    if isinstance(training_args, Mapping):
        return training_args.get(name)
    try:
        return getattr(training_args, name, None)
    except ImportError:
        return None


def trainer_world(training_args: Any, environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(world size, nodes) of the run. The world size is TrainingArguments.world_size (accelerate's
    process count, transformers 5.23 training_args.py), else torchrun's WORLD_SIZE, else 1; the
    nodes are WORLD_SIZE / LOCAL_WORLD_SIZE (torchrun sets both, torch/distributed/run.py) where
    they divide the world size, else 1."""
    env = os.environ if environ is None else environ
    world = _whole(_live(training_args, "world_size"), 1) or _whole(env.get("WORLD_SIZE"), 1) or 1
    local = _whole(env.get("LOCAL_WORLD_SIZE"), 1)
    nodes = world // local if local and world % local == 0 else 1
    return world, nodes


def trainer_rank(training_args: Any, environ: Mapping[str, str] | None = None) -> int:
    """This process's global rank: TrainingArguments.process_index, else torchrun's RANK, else 0."""
    env = os.environ if environ is None else environ
    live = _whole(_live(training_args, "process_index"), 0)
    return live if live is not None else (_whole(env.get("RANK"), 0) or 0)


def trainer_parallel(tc: TrainConfig, training_args: Any, environ: Mapping[str, str] | None = None) -> Parallel | None:
    """The vramplan Parallel the run is: `tc`'s engine (trainer_config's `parallel`) over
    trainer_world's GPUs; None for one plain GPU, where the single-GPU estimate applies."""
    from vramplan.distributed import make_parallel, needs_parallel

    world, nodes = trainer_world(training_args, environ)
    opts = {k: v for k, v in tc.parallel.items() if k in ENGINE_KEYS}
    opts.update(gpus=world // nodes, nodes=nodes)
    if not needs_parallel(**opts):
        return None
    try:
        return make_parallel(**opts)
    except VramplanError as e:
        raise VramplanError(f"{tc.path}: {tc.engine or 'DDP'} on {world} GPU(s) is not modelled: {e}") from None


def parallel_words(par: Parallel) -> str:
    """The engine and world of `par` in words: "DeepSpeed ZeRO-3, optimizer offload, on 2 GPUs"."""
    words = engine_text({"zero": par.zero if par.engine == "deepspeed" else None, "fsdp": par.fsdp,
                         "offload": par.offload, "gpus": par.gpus_per_node})
    nodes = f" over {par.nodes} nodes" if par.nodes > 1 else ""
    return f"{words}, on {par.world} GPU{'s' if par.world > 1 else ''}{nodes}"


def estimate_from_trainer(model_config: Any, training_args: Any, peft_config: Any = None, **overrides: Any) -> Estimate:
    """Estimate the memory of the training step that (model_config, training_args, peft_config)
    describe on one GPU; `overrides` are vramplan options that win over what was read. Where the
    arguments run several GPUs or an engine, a note says so: the per-GPU figures are
    estimate_parallel_from_trainer's."""
    tc, spec, setup = trainer_setup(model_config, training_args, peft_config, **overrides)
    est = estimate_setup(spec, setup)
    par = trainer_parallel(tc, training_args)
    if par is None:
        return est
    return replace(est, notes=(*est.notes, f"the training arguments run {parallel_words(par)}: this is the single-GPU "
                                           "estimate; the per-GPU figures are estimate_parallel_from_trainer's"))


def estimate_parallel_from_trainer(model_config: Any, training_args: Any, peft_config: Any = None, *,
                                   environ: Mapping[str, str] | None = None, **overrides: Any) -> DistributedEstimate:
    """Per-GPU (and host) memory of the training step under the engine and world size the live
    arguments run (trainer_parallel); one plain GPU is estimate_parallel's gpus=1. `overrides` as
    for estimate_from_trainer; `environ` (default os.environ) is torchrun's and accelerate's."""
    from vramplan.distributed import estimate_distributed, make_parallel

    tc, spec, setup = trainer_setup(model_config, training_args, peft_config, environ=environ, **overrides)
    par = trainer_parallel(tc, training_args, environ) or make_parallel()
    return estimate_distributed(spec, setup, par)


def record_setup_fields(par: Parallel) -> dict[str, Any]:
    """The engine keys a distributed record's setup carries, as vramplan.profiler.trainer_dist's
    setups do (gpus = world size; zero, fsdp, offload where set), which
    vramplan.records.record_distributed re-estimates per GPU from."""
    out: dict[str, Any] = {"gpus": par.world}
    if par.engine == "deepspeed":
        out["zero"] = par.zero
    if par.fsdp:
        out["fsdp"] = par.fsdp
    if par.offload != "none":
        out["offload"] = par.offload
    return out


def record_launch_fields(par: Parallel, rank: int) -> dict[str, Any]:
    """What a record says of its launch, as vramplan.profiler.trainer_dist.launch_fields (engine,
    world_size, rank), from the live run rather than the environment."""
    from vramplan.profiler.trainer_dist import engine

    return {"engine": engine(record_setup_fields(par)), "world_size": par.world, "rank": rank}
