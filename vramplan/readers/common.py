"""What every train-config reader shares: the TrainConfig result, a typed key reader that fails
with one line naming the file and key, the HF optimizer-name map and the attention map.

No torch, no network: only the dict a YAML/JSON file (or a live TrainingArguments) gives."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vramplan.errors import VramplanError

FORMATS = ("trl", "axolotl", "llamafactory", "hf", "accelerate")


@dataclass(frozen=True)
class TrainConfig:
    """A training config file as vramplan reads it.

    `options` are vramplan option names (the keywords of `vramplan.estimate`); `read` maps each
    file key that decided an option to the value used; `defaulted` names the keys of `read` whose
    value is the tool's own default (absent from the file); `ignored` maps keys that change
    memory but are not modelled to why; `parallel` holds the multi-GPU engine the file names
    (vramplan.distributed.make_parallel's arguments: gpus, nodes, zero, fsdp, offload), only
    the ones it sets. `model` is "" for an accelerate config, which names none."""

    path: str
    source: str  # one of FORMATS
    model: str  # catalogue alias, local path or hub id, as written in the file
    options: dict[str, Any] = field(default_factory=dict)
    read: dict[str, Any] = field(default_factory=dict)
    defaulted: tuple[str, ...] = ()
    ignored: dict[str, str] = field(default_factory=dict)
    parallel: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return str(self.options.get("method", "full"))

    @property
    def engine(self) -> str | None:
        """The engine the file runs, in words ("DeepSpeed ZeRO-3, optimizer offload"); None when it names none."""
        return engine_text(self.parallel)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "source": self.source, "model": self.model, "options": dict(self.options),
                "read": dict(self.read), "defaulted": list(self.defaulted), "ignored": dict(self.ignored),
                "parallel": dict(self.parallel), "engine": self.engine}


def engine_text(parallel: Mapping[str, Any]) -> str | None:
    """A multi-GPU engine in words, from parallel options; None when they name no engine
    (no ZeRO stage, no FSDP, no offload, no GPU count)."""
    zero, fsdp, offload = parallel.get("zero"), parallel.get("fsdp"), parallel.get("offload", "none")
    if fsdp:
        name = f"FSDP {fsdp}"
    elif zero is not None:
        name = f"DeepSpeed ZeRO-{zero}"
    elif "gpus" in parallel or "nodes" in parallel:
        name = "DDP"
    else:
        return None
    return name + (f", {OFFLOAD_WORDS.get(offload, offload)} offload" if offload and offload != "none" else "")


OFFLOAD_WORDS = {"optimizer": "optimizer", "params": "parameter"}  # vramplan offload values, in words


def plain(v: Any) -> Any:
    """A value as JSON can hold it: enums by value, sets as sorted lists."""
    if hasattr(v, "value") and isinstance(v.value, str | int):
        return v.value
    if isinstance(v, set | frozenset):
        return sorted(v)
    return v


class Reading:
    """Builds one TrainConfig: typed reads of the file's keys, recording each one used."""

    def __init__(self, data: Mapping[str, Any], where: str, base: Path | None = None) -> None:
        self.data = data
        self.where = where  # the file path (or "TrainingArguments") named in errors
        self.base = base  # the file's directory: relative paths in it (a DeepSpeed JSON) are looked up here first
        self.options: dict[str, Any] = {}
        self.parallel: dict[str, Any] = {}
        self.read: dict[str, Any] = {}
        self.defaulted: list[str] = []
        self.ignored: dict[str, str] = {}

    def fail(self, key: str, msg: str) -> VramplanError:
        return VramplanError(f"{self.where}: key {key!r}: {msg}")

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def raw(self, key: str, default: Any = None) -> Any:
        """The file's value (None counts as absent), recorded in `read`; else `default`, recorded
        as a tool default when it is not None."""
        v = self.data.get(key)
        if v is None:
            if default is not None:
                self.read[key] = default
                self.defaulted.append(key)
            return default
        self.read[key] = plain(v)
        return v

    def bool(self, key: str, default: bool | None = None) -> bool | None:
        v = self.raw(key, default)
        if v is None or isinstance(v, bool):
            return v
        if isinstance(v, str) and v.strip().lower() in ("true", "false"):
            return v.strip().lower() == "true"
        raise self.fail(key, f"expected true or false, got {v!r}")

    def posint(self, key: str, default: int | None = None) -> int | None:
        v = self.raw(key, default)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise self.fail(key, f"expected a positive integer, got {v!r}")
        return v

    def number(self, key: str, default: float | None = None) -> float | None:
        v = self.raw(key, default)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise self.fail(key, f"expected a number, got {v!r}")
        return float(v)

    def text(self, key: str, default: str | None = None) -> str | None:
        v = self.raw(key, default)
        if v is None:
            return None
        if hasattr(v, "value") and isinstance(v.value, str):  # an enum (OptimizerNames, PeftType)
            v = v.value
        if not isinstance(v, str) or not v.strip():
            raise self.fail(key, f"expected a name, got {v!r}")
        return v.strip()

    def names(self, key: str) -> list[str] | str | None:
        """A module-name list: a list/set of names, a comma-separated string, or 'all-linear'."""
        v = self.raw(key)
        if v is None:
            return None
        if isinstance(v, str):
            return v.strip()
        if isinstance(v, list | tuple | set | frozenset) and all(isinstance(x, str) for x in v):
            return sorted(v) if isinstance(v, set | frozenset) else list(v)
        raise self.fail(key, f"expected a list of module names, got {v!r}")

    def ignore(self, key: str, why: str, default: Any = None) -> None:
        """List `key` as ignored when the file sets it to something other than off or `default`."""
        v = self.data.get(key)
        if v is None or v is False or v == default or (isinstance(v, list | dict | str) and not v):
            return
        self.ignored[key] = f"{v!r}: {why}"

    def set(self, **options: Any) -> None:
        self.options.update({k: v for k, v in options.items() if v is not None})

    def result(self, source: str, model: str) -> TrainConfig:
        return TrainConfig(path=self.where, source=source, model=model, options=dict(self.options), read=dict(self.read),
                           defaulted=tuple(dict.fromkeys(self.defaulted)), ignored=dict(self.ignored),
                           parallel=dict(self.parallel))


# HF `OptimizerNames` (transformers 5.23 training_args.py) -> (method it implies, vramplan optimizer).
# GaLore is an optimizer in HF (optim="galore_adamw" + optim_target_modules) and a method in
# vramplan. HF "sgd" is torch.optim.SGD without momentum unless optim_args set it.
HF_OPTIMIZERS: dict[str, tuple[str | None, str]] = {
    "adamw_torch": (None, "adamw"),
    "adamw_torch_fused": (None, "adamw-fused"),
    "adamw_bnb_8bit": (None, "adamw-8bit"),
    "adamw_8bit": (None, "adamw-8bit"),  # an alias of adamw_bnb_8bit in OptimizerNames
    "paged_adamw_32bit": (None, "paged-adamw"),
    "paged_adamw_8bit": (None, "paged-adamw-8bit"),
    "sgd": (None, "sgd"),
    "adafactor": (None, "adafactor"),
    "lion_32bit": (None, "lion"),
    "lion_8bit": (None, "lion-8bit"),
    "galore_adamw": ("galore", "adamw"),
    "galore_adamw_8bit": ("galore", "adamw-8bit"),
    "galore_adafactor": ("galore", "adafactor"),
}


def map_optimizer(r: Reading, key: str, default: str | None) -> tuple[str | None, str | None]:
    """(method implied or None, vramplan optimizer) for the HF optimizer name under `key`. An
    optimizer vramplan does not model is an error naming it and the ones it does."""
    name = r.text(key, default)
    if name is None:
        return None, None
    hit = HF_OPTIMIZERS.get(name.lower())
    if hit is None:
        raise r.fail(key, f"optimizer {name!r} is not modelled by vramplan; allowed: {', '.join(HF_OPTIMIZERS)}")
    return hit


def galore_rank(r: Reading, key: str = "optim_args") -> int | None:
    """GaLore's rank from HF `optim_args` ("rank=64,update_proj_gap=200"); transformers'
    trainer_optimizer.py defaults it to 128, as vramplan does."""
    v = r.data.get(key)
    if isinstance(v, dict):
        rank = v.get("rank")
    elif isinstance(v, str):
        parts = dict(p.split("=", 1) for p in v.replace(" ", "").split(",") if "=" in p)
        rank = parts.get("rank")
    else:
        return None
    if rank is None:
        return None
    r.read[key] = v
    try:
        return int(rank)
    except ValueError:
        raise r.fail(key, f"GaLore rank must be an integer, got {rank!r}") from None


# attn_implementation values (transformers) -> vramplan attn.
ATTN_IMPLS = {"sdpa": "sdpa", "flash_attention_2": "flash", "flash_attention_3": "flash", "eager": "eager",
              "kernels-community/flash-attn": "flash", "kernels-community/flash-attn3": "flash"}


def map_attn(r: Reading, key: str) -> str | None:
    name = r.text(key)
    if name is None:
        return None
    if name not in ATTN_IMPLS:
        raise r.fail(key, f"attention implementation {name!r} is not modelled; allowed: {', '.join(ATTN_IMPLS)}")
    return ATTN_IMPLS[name]


# peft's default LoRA targets when target_modules is unset
# (peft 0.21 utils/constants.py TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
PEFT_DEFAULT_TARGETS = {"gpt2": "c_attn"}
PEFT_DEFAULT_TARGETS_OTHER = "q_proj,v_proj"  # llama, mistral, qwen2/3, gemma/2, mixtral, qwen2_moe


def peft_default_targets(model_type: str | None) -> str:
    return PEFT_DEFAULT_TARGETS.get(model_type or "", PEFT_DEFAULT_TARGETS_OTHER)


def model_type_of(model: str) -> str | None:
    """The model_type of a catalogue alias or local config (a hub id goes through transformers,
    as `estimate` would); None when it cannot be resolved."""
    from vramplan.catalog import resolve_model

    try:
        return resolve_model(model).arch.model_type
    except VramplanError:
        return None


def lora_targets(r: Reading, key: str, model: str, model_type: str | None = None) -> str | list[str]:
    """LoRA targets under `key`; "all-linear"/"all" kept; unset -> peft's default for the model
    (its model_type, looked up from `model` when not given)."""
    names = r.names(key)
    if names is None or names == []:
        targets = peft_default_targets(model_type or model_type_of(model))
        r.read[key] = f"unset: peft default {targets}"
        r.defaulted.append(key)
        return targets
    if isinstance(names, str):
        return "all-linear" if names in ("all", "all-linear", "all_linear") else names
    return names


def precision_dtype(weights: str, *, bf16: bool, fp16: bool) -> tuple[str, str]:
    """(precision, dtype) from the dtype the weights are loaded in and the AMP flags: fp32
    weights under bf16/fp16 autocast are vramplan's 'mixed' (fp32 master weights)."""
    amp = "bf16" if bf16 else ("fp16" if fp16 else None)
    if weights == "fp32":
        return ("mixed", amp) if amp else ("fp32", "fp32")
    return "pure", weights


DTYPE_NAMES = {"bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16", "half": "fp16",
               "float32": "fp32", "fp32": "fp32", "float": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16",
               "torch.float32": "fp32"}


def quant_storage(r: Reading, key: str, value: Any) -> str:
    """vramplan's quant_storage for a bnb_4bit_quant_storage value (None: BitsAndBytesConfig's
    uint8); any other name is a one-line error naming what is allowed."""
    if value is None or str(value) in ("uint8", "torch.uint8"):
        return "uint8"
    if str(value) not in DTYPE_NAMES:
        raise r.fail(key, f"unknown 4-bit storage dtype {value!r}; allowed: uint8, bfloat16, float16, float32")
    return DTYPE_NAMES[str(value)]


def weights_dtype(r: Reading, key: str, default: str) -> str:
    """The load dtype under `key` ("auto" -> `default`, the config's dtype, bf16 for current models)."""
    name = r.text(key)
    if name is None or name == "auto":
        return default
    if name not in DTYPE_NAMES:
        raise r.fail(key, f"unknown dtype {name!r}; allowed: auto, {', '.join(sorted(set(DTYPE_NAMES) - {'half', 'float'}))}")
    return DTYPE_NAMES[name]
