"""The library entry for tools that hold the live training objects:

    est = vramplan.estimate_from_trainer(model.config, trainer.args, model.peft_config["default"])

`model_config` is a transformers PretrainedConfig or its dict, `training_args` a TrainingArguments
(or TRL SFTConfig) or its dict, `peft_config` a peft LoraConfig (prefix / prompt / IA3 too) or its
dict. Imports no torch: objects are read through their `to_dict()`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vramplan.arch import FAMILIES, ModelSpec, arch_from_hf_config, build_spec
from vramplan.errors import VramplanError
from vramplan.estimator import Estimate, estimate_setup
from vramplan.readers.common import DTYPE_NAMES, Reading, TrainConfig, lora_targets, map_attn
from vramplan.readers.hf import read_length, read_training_args
from vramplan.readers.trl import TRL_MAX_LENGTH
from vramplan.setup import make_setup

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
                                                            "bnb_4bit_use_double_quant")}
    if q.get("load_in_4bit"):
        r.set(double_quant=bool(q.get("bnb_4bit_use_double_quant", False)))
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


def trainer_config(model_config: Any, training_args: Any, peft_config: Any = None, **overrides: Any) -> TrainConfig:
    """The vramplan options of a live (model config, training args, peft config); `overrides`
    (vramplan option names) win, e.g. kbit_prepare seen on the live model; `loaded_dtype`
    (bf16/fp16/fp32) is the dtype the dense weights were loaded in, when the config does not say."""
    cfg = as_dict(model_config, "model_config")
    args = as_dict(training_args, "training_args")
    trl = is_trl_args(training_args, args)
    r = Reading(args, type(training_args).__name__ if not isinstance(training_args, Mapping) else "training_args")
    spec = model_spec(cfg)
    weights = overrides.pop("loaded_dtype", None) or config_dtype(cfg)
    # A live args object is already resolved (SFTConfig's checkpointing default True included);
    # for a dict, each tool's default applies.
    read_training_args(r, ckpt_default=trl, weights=weights)
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


def estimate_from_trainer(model_config: Any, training_args: Any, peft_config: Any = None, **overrides: Any) -> Estimate:
    """Estimate the memory of the training step that (model_config, training_args, peft_config)
    describe; `overrides` are vramplan options that win over what was read."""
    cfg = as_dict(model_config, "model_config")
    tc = trainer_config(cfg, training_args, peft_config, **overrides)
    spec = model_spec(cfg)
    return estimate_setup(spec, make_setup(spec, **tc.options))
