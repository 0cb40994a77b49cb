"""The multi-GPU engine a training config runs: DeepSpeed (`deepspeed`: a JSON path or a dict),
PyTorch FSDP (`fsdp` + `fsdp_config`), and accelerate's own config file (`accelerate launch
--config_file`), read into vramplan's parallel options (the arguments of
vramplan.distributed.make_parallel: gpus, nodes, zero, fsdp, offload), kept in `Reading.parallel`.

Key names and defaults: DeepSpeed deepspeed/runtime/zero/config.py (DeepSpeedZeroConfig) and
offload_config.py (OffloadDeviceEnum); transformers 5.23 training_args.py (`_process_fsdp_args`,
`_apply_legacy_fsdp_to_config`) and trainer_utils.py (`FSDPOption`); accelerate 1.15
commands/config/cluster.py and utils/dataclasses.py (DeepSpeedPlugin, FullyShardedDataParallelPlugin);
axolotl at 067b021 core/builders/base.py (fsdp_config alone turns FSDP on)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from vramplan.errors import VramplanError
from vramplan.readers.common import Reading, plain

ZERO_STAGES = (0, 1, 2, 3)  # DeepSpeed ZeroStageEnum
# DeepSpeed OffloadDeviceEnum (offload_config.py); an offload block without `device` is "none".
OFFLOAD_DEVICES = ("none", "cpu", "nvme")
# transformers trainer_utils.py FSDPOption: the words of a legacy `fsdp` string or list.
FSDP_WORDS = ("full_shard", "shard_grad_op", "no_shard", "hybrid_shard", "hybrid_shard_zero2", "offload", "auto_wrap")
# accelerate utils/constants.py FSDP_SHARDING_STRATEGY; torch ShardingStrategy numbers them 1-5.
SHARDING = ("full_shard", "shard_grad_op", "no_shard", "hybrid_shard", "hybrid_shard_zero2")
MODELLED_SHARDING = ("full_shard", "shard_grad_op", "no_shard")
# accelerate DistributedType values this reads; the others (MEGATRON_LM, XLA, MULTI_CPU, NPU ...) are not modelled.
ACCELERATE_TYPES = ("NO", "MULTI_GPU", "DEEPSPEED", "FSDP")
# accelerate DeepSpeedPlugin: zero_stage defaults to 2 (ACCELERATE_DEEPSPEED_ZERO_STAGE), offload devices to "none".
ACCELERATE_ZERO_STAGE = 2
# The parallel options that name the engine (one choice: ZeRO or FSDP, and what it offloads);
# gpus / nodes are the world it runs on.
ENGINE_KEYS = ("zero", "fsdp", "offload")


def _as_bool(v: Any) -> bool | None:
    """A config flag: bools, and "true"/"false" strings as transformers' str_to_bool reads them; else None."""
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
        return v.strip().lower() in ("true", "yes", "1")
    return None


def find_file(r: Reading, key: str, value: str, what: str) -> Path:
    """The file a relative path in the config names: next to the config first, then in the current directory."""
    p = Path(value).expanduser()
    places = [p] if p.is_absolute() else [*([r.base / p] if r.base is not None else []), Path.cwd() / p]
    for c in places:
        if c.is_file():
            return c
    looked = "" if p.is_absolute() else " (looked next to the config, then in the current directory)"
    raise r.fail(key, f"no {what} at {value!r}{looked}")


def load_side_file(r: Reading, key: str, value: str, what: str) -> tuple[dict[str, Any], Path]:
    """The mapping in a file a config points to (a DeepSpeed JSON, an FSDP config): JSON by suffix, else YAML."""
    path = find_file(r, key, value, what)
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise r.fail(key, f"{what} {str(path)!r} is not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None
    except yaml.YAMLError as e:
        raise r.fail(key, f"{what} {str(path)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise r.fail(key, f"{what} {str(path)!r} must hold a mapping of keys to values, got {type(data).__name__}")
    return data, path


Fail = Callable[[str, str], VramplanError]


def _sub(r: Reading, key: str, value: Any, what: str) -> tuple[Reading, Fail]:
    """A Reading of a nested block (dict) or of the file it names (path), and how to fail on one
    of its keys: naming the side file and its own key, or this file and `key.<its key>`."""
    if isinstance(value, str):
        data, path = load_side_file(r, key, value, what)
        sub = Reading(data, str(path), path.parent)
        return sub, sub.fail
    if isinstance(value, Mapping):
        return Reading(value, r.where, r.base), lambda k, msg: r.fail(f"{key}.{k}", msg)
    raise r.fail(key, f"expected a path to a {what} or a mapping, got {value!r}")


# ---- DeepSpeed -----------------------------------------------------------------------------------
def _device(r: Reading, key: str, err: str, value: Any, fail: Fail) -> str:
    """An offload device (none / cpu), recorded under `key`; nvme is an error (not modelled)."""
    dev = str(plain(value) if value is not None else "none").strip().lower()
    r.read[key] = dev
    if dev == "nvme":
        raise fail(err, "'nvme': NVMe offload (ZeRO-Infinity) is not modelled; allowed: none, cpu")
    if dev not in OFFLOAD_DEVICES:
        raise fail(err, f"unknown offload device {dev!r}; allowed: none, cpu")
    return dev


def _stage(r: Reading, key: str, err: str, v: Any, fail: Fail) -> int:
    if isinstance(v, str) and v.strip().lower() == "auto":
        raise fail(err, "'auto' is not allowed for the ZeRO stage (transformers fills 'auto' only for batch sizes, "
                        "learning rates and bucket sizes); allowed: 0, 1, 2, 3")
    if isinstance(v, str) and v.strip().isdigit():
        v = int(v)
    if isinstance(v, bool) or v not in ZERO_STAGES:
        raise fail(err, f"ZeRO stage {v!r} is not one of 0, 1, 2, 3")
    r.read[key] = int(v)
    return int(v)


def _zero_parallel(r: Reading, stage: int, opt: str, par: str, keys: tuple[str, str], fail: Fail) -> None:
    """zero and offload from a ZeRO stage and its two offload devices (cpu / none). `keys`: the
    (optimizer, parameter) offload keys, as recorded and as named in errors."""
    offload = "none"
    if opt == "cpu":
        if stage == 0:
            raise fail(keys[0], "optimizer offload needs ZeRO stage 1, 2 or 3; the config sets stage 0")
        offload = "optimizer"
    if par == "cpu":
        if stage < 3:
            r.ignored[keys[1]] = f"'cpu' at stage {stage}: parameter offload is stage 3's only (DeepSpeed ignores it)"
        else:
            offload = "params"
            if opt != "cpu":
                r.ignored[keys[0]] = "none with parameter offload: estimated with the optimizer offloaded too (vramplan's params offload moves both)"
    r.parallel.update(zero=stage, offload=offload)


def read_deepspeed(r: Reading, key: str = "deepspeed") -> None:
    """`deepspeed`: a DeepSpeed config (path or dict) -> zero (its ZeRO stage) and offload.
    Optimizer offload to the CPU is vramplan's "optimizer"; parameter offload (stage 3 only)
    is "params", which keeps the optimizer on the host too."""
    value = r.raw(key)
    if value is None or value is False or value == "":
        return
    ds, fail = _sub(r, key, value, "DeepSpeed config")
    zero = ds.data.get("zero_optimization") or {}
    if isinstance(zero, bool):  # the deprecated `"zero_optimization": true` is stage 1 (read_zero_config_deprecated)
        zero = {"stage": 1 if zero else 0}
    if not isinstance(zero, Mapping):
        raise fail("zero_optimization", f"expected a mapping, got {zero!r}")
    z = "zero_optimization"
    # DeepSpeedZeroConfig.stage defaults to 0 (ZeRO off)
    stage = _stage(r, f"{key}.{z}.stage", f"{z}.stage", zero.get("stage", 0), fail)
    devices = []
    for block, old in (("offload_optimizer", "cpu_offload"), ("offload_param", "cpu_offload_param")):
        b = zero.get(block)
        if b is not None and not isinstance(b, Mapping):
            raise fail(f"{z}.{block}", f"expected a mapping with a 'device', got {b!r}")
        dev = _device(r, f"{key}.{z}.{block}.device", f"{z}.{block}.device", (b or {}).get("device"), fail) if b is not None else "none"
        if _as_bool(zero.get(old)):  # deprecated booleans (config.py): cpu_offload / cpu_offload_param -> device cpu
            r.read[f"{key}.{z}.{old}"] = True
            dev = "cpu"
        devices.append(dev)
    _zero_parallel(r, stage, devices[0], devices[1], (f"{key}.{z}.offload_optimizer", f"{key}.{z}.offload_param"), fail)


# ---- FSDP ----------------------------------------------------------------------------------------
def _strategy(v: Any) -> str | None:
    """A sharding strategy from reshard_after_forward / sharding_strategy: a bool (FSDP2: True
    full_shard, False shard_grad_op), a strategy name (FSDP1), or its ShardingStrategy number 1-5."""
    if isinstance(v, int) and not isinstance(v, bool):
        return SHARDING[v - 1] if 1 <= v <= len(SHARDING) else None
    if isinstance(v, str) and v.strip().isdigit():
        return _strategy(int(v.strip()))
    b = _as_bool(v)
    if b is not None:
        return "full_shard" if b else "shard_grad_op"
    if isinstance(v, str) and v.strip().lower() in SHARDING:
        return v.strip().lower()
    return None


def _hybrid(strategy: str) -> str:
    return (f"{strategy!r} (sharded within a node, replicated across nodes) is not modelled; "
            f"allowed: {', '.join(MODELLED_SHARDING)}")


def _fsdp_words(r: Reading, key: str, value: Any) -> tuple[str | None, bool]:
    """(strategy, offload) from a legacy `fsdp` string ("full_shard auto_wrap") or list of FSDPOption words."""
    words = value.split() if isinstance(value, str) else value
    if not isinstance(words, list | tuple) or not all(isinstance(w, str) for w in words):
        raise r.fail(key, f"expected true, a string of FSDP options or a list of them, got {value!r}")
    strategy, offload = None, False
    for w in (w.strip().lower() for w in words):
        if w not in FSDP_WORDS:
            raise r.fail(key, f"unknown FSDP option {w!r}; allowed: {', '.join(FSDP_WORDS)}")
        if w.startswith("hybrid_shard"):
            raise r.fail(key, _hybrid(w))
        if w in SHARDING:
            strategy = strategy or w  # transformers: the first strategy wins (setdefault)
        offload = offload or w == "offload"
    return strategy, offload


def fsdp_from_config(r: Reading, cfg: Mapping[str, Any], prefix: str, fail: Fail, *, strategy: str | None = None,
                     offload: bool = False) -> None:
    """fsdp / offload / grad_checkpointing from an FSDP config mapping (transformers' fsdp_config,
    accelerate's fsdp_config): `fsdp_`-prefixed keys read as unprefixed (training_args.py
    `_process_fsdp_args`). Its reshard_after_forward wins over `strategy` (the legacy fsdp
    words, applied with setdefault); keys are recorded under `prefix`."""
    names = {(k[5:] if k.startswith("fsdp_") else k): k for k in cfg}
    for k in ("reshard_after_forward", "sharding_strategy"):  # accelerate reads sharding_strategy (deprecated) first in FSDP1
        if k in names and cfg[names[k]] is not None:
            v = cfg[names[k]]
            s = _strategy(v)
            if s is None:
                raise fail(names[k], f"expected true, false or a sharding strategy ({', '.join(x.upper() for x in SHARDING)}), got {v!r}")
            if s.startswith("hybrid_shard"):
                raise fail(names[k], _hybrid(s))
            r.read[prefix + names[k]] = plain(v)
            strategy = s
            break
    for k in ("cpu_offload", "offload_params"):  # transformers' name; accelerate's and axolotl's
        if k in names and cfg[names[k]] is not None:
            b = _as_bool(cfg[names[k]])
            if b is None:
                raise fail(names[k], f"expected true or false, got {cfg[names[k]]!r}")
            r.read[prefix + names[k]] = b
            offload = offload or b
    if "version" in names:
        r.read[prefix + names["version"]] = plain(cfg[names["version"]])
    if "activation_checkpointing" in names and cfg[names["activation_checkpointing"]] is not None:
        b = _as_bool(cfg[names["activation_checkpointing"]])
        if b is None:
            raise fail(names["activation_checkpointing"], f"expected true or false, got {cfg[names['activation_checkpointing']]!r}")
        r.read[prefix + names["activation_checkpointing"]] = b
        if b:  # FSDP's own checkpointing of every wrapped layer (transformers' FSDP docs route checkpointing here)
            r.set(grad_checkpointing=True)
    # reshard_after_forward defaults to True (FSDP2) / FULL_SHARD (FSDP1): full_shard
    r.parallel.update(fsdp=strategy or "full_shard", offload="params" if offload else "none")


def read_fsdp(r: Reading, key: str = "fsdp", config_key: str = "fsdp_config", *, config_enables: bool = False) -> None:
    """`fsdp` (True, or the legacy string / list of FSDPOption words) and `fsdp_config` (dict or
    path) -> fsdp (the sharding strategy), offload "params", and grad_checkpointing when
    fsdp_config turns FSDP's activation checkpointing on. `config_enables`: a non-empty
    fsdp_config alone turns FSDP on (axolotl passes fsdp=True with it)."""
    value, cfg_value = r.data.get(key), r.data.get(config_key)
    flag = _as_bool(value)
    words = value is not None and flag is None and bool(value)  # a non-empty string or list
    if not (flag or words or (config_enables and cfg_value)):
        if cfg_value:
            r.ignored[config_key] = "set while fsdp is off: the Trainer reads it only under fsdp"
        return
    strategy, offload = None, False
    if value is not None:
        r.read[key] = plain(value)
    if words:
        strategy, offload = _fsdp_words(r, key, value)
    cfg: Mapping[str, Any] = {}
    fail: Fail = lambda k, msg: r.fail(f"{config_key}.{k}", msg)
    if cfg_value:
        sub, fail = _sub(r, config_key, cfg_value, "FSDP config")
        cfg = sub.data
        if isinstance(cfg_value, str):
            r.read[config_key] = cfg_value
    fsdp_from_config(r, cfg, f"{config_key}.", fail, strategy=strategy, offload=offload)


def read_engine(r: Reading, *, fsdp_config_enables: bool = False) -> None:
    """The engine keys of an HF-Trainer-based config: `deepspeed`, `fsdp` / `fsdp_config`. Both
    set is an error (the Trainer runs one)."""
    read_deepspeed(r)
    has_ds = "zero" in r.parallel
    read_fsdp(r, config_enables=fsdp_config_enables)
    if has_ds and r.parallel.get("fsdp"):
        raise r.fail("fsdp", "deepspeed and fsdp are both set: the Trainer runs one engine; keep one")


# ---- accelerate config ---------------------------------------------------------------------------
def is_accelerate(data: Mapping[str, Any]) -> bool:
    """An accelerate config (`accelerate config` writes both keys)."""
    return "distributed_type" in data and "compute_environment" in data


def _accelerate_deepspeed(r: Reading) -> None:
    ds = r.data.get("deepspeed_config") or {}
    if not isinstance(ds, Mapping):
        raise r.fail("deepspeed_config", f"expected a mapping, got {ds!r}")
    path = ds.get("deepspeed_config_file")
    if isinstance(path, str) and path.strip() and path.strip().lower() != "none":
        # the JSON file wins over the inline keys (accelerate's DeepSpeedPlugin takes hf_ds_config from it)
        key = "deepspeed_config.deepspeed_config_file"
        fwd = Reading({key: path}, r.where, r.base)
        fwd.read, fwd.ignored, fwd.parallel = r.read, r.ignored, r.parallel
        read_deepspeed(fwd, key)
        return
    k = "deepspeed_config."
    stage = _stage(r, k + "zero_stage", k + "zero_stage", ds.get("zero_stage", ACCELERATE_ZERO_STAGE), r.fail)
    if "zero_stage" not in ds:
        r.defaulted.append(k + "zero_stage")
    opt = _device(r, k + "offload_optimizer_device", k + "offload_optimizer_device", ds.get("offload_optimizer_device"), r.fail)
    par = _device(r, k + "offload_param_device", k + "offload_param_device", ds.get("offload_param_device"), r.fail)
    _zero_parallel(r, stage, opt, par, (k + "offload_optimizer_device", k + "offload_param_device"), r.fail)


def read_accelerate(r: Reading) -> str:
    """An accelerate config: its world (gpus = num_processes / num_machines, nodes = num_machines)
    and engine. It names no model: returns ""."""
    kind = (r.text("distributed_type") or "").upper()
    if kind not in ACCELERATE_TYPES:
        raise r.fail("distributed_type", f"{kind!r} is not modelled; allowed: {', '.join(ACCELERATE_TYPES)}")
    # cluster.py: num_machines and num_processes default to 1; num_processes counts every machine's processes.
    machines = r.posint("num_machines", 1) or 1
    procs = r.posint("num_processes", 1) or 1
    if kind == "NO":
        procs = machines = 1
    if procs % machines:
        raise r.fail("num_processes", f"{procs} processes over {machines} machines is not a whole number of GPUs per machine")
    r.parallel.update(gpus=procs // machines, nodes=machines)
    if kind == "DEEPSPEED":
        _accelerate_deepspeed(r)
    elif kind == "FSDP":
        cfg = r.data.get("fsdp_config") or {}
        if not isinstance(cfg, Mapping):
            raise r.fail("fsdp_config", f"expected a mapping, got {cfg!r}")
        fsdp_from_config(r, cfg, "fsdp_config.", lambda k, msg: r.fail(f"fsdp_config.{k}", msg))
    return ""
