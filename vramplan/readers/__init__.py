"""Read a user's own training config into vramplan options: a TRL script YAML (`trl sft
--config`), an axolotl YAML, a LLaMA-Factory YAML, or HF `TrainingArguments` as JSON/YAML with
`model_name_or_path` / `base_model`; the multi-GPU engine it runs (`deepspeed`, `fsdp`,
`fsdp_config`) into `parallel`. An accelerate config (`accelerate launch --config_file`) gives
the world size and engine only (no model).

    cfg = read_train_config("sft.yaml")
    est = vramplan.estimate(cfg.model, **estimate_options(cfg.options)[0])

Each tool's own defaults apply where the file is silent (TRL: checkpointing on, max_length 1024;
LLaMA-Factory: checkpointing on, cutoff_len 2048; axolotl: sequence_len 512; HF: checkpointing
off); keys that change memory but are not modelled are listed in `ignored`. No torch, no network
(except resolving a hub id's model type for peft's default LoRA targets, as `estimate` would)."""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from vramplan.errors import VramplanError
from vramplan.readers.axolotl import AXOLOTL_KEYS, read_axolotl
from vramplan.readers.common import FORMATS, HF_OPTIMIZERS, Reading, TrainConfig
from vramplan.readers.engines import is_accelerate, read_accelerate
from vramplan.readers.hf import read_hf
from vramplan.readers.llamafactory import LF_KEYS, read_llamafactory
from vramplan.readers.trl import TRL_KEYS, read_trl

READERS = {"trl": read_trl, "axolotl": read_axolotl, "llamafactory": read_llamafactory, "hf": read_hf,
           "accelerate": read_accelerate}
# TRL keys that plain HF files (run_clm-style JSON) may also carry: they mark TRL only in YAML.
_WEAK_TRL = ("max_length", "dataset_name")


def detect_format(data: Mapping[str, Any], where: str, *, json_file: bool = False) -> str:
    """Which tool a config mapping belongs to, by the keys only that tool defines."""
    if is_accelerate(data):
        return "accelerate"
    if any(k in data for k in LF_KEYS):
        return "llamafactory"
    if "base_model" in data and any(k in data for k in AXOLOTL_KEYS[1:]):
        return "axolotl"
    if "model_name_or_path" in data:
        strong = [k for k in TRL_KEYS if k not in _WEAK_TRL]
        if any(k in data for k in strong) or (not json_file and any(k in data for k in _WEAK_TRL)):
            return "trl"
    if "model_name_or_path" in data or "base_model" in data:
        return "hf"
    raise VramplanError(f"{where}: key 'model_name_or_path': missing (nor 'base_model'): cannot tell which model "
                        f"this training config trains (formats read: {', '.join(FORMATS)}; an accelerate config has "
                        "distributed_type and compute_environment)")


def load_mapping(path: str | Path) -> dict[str, Any]:
    """The file's top-level mapping (YAML or JSON); a malformed file is one line naming it."""
    p = Path(path)
    if not p.is_file():
        raise VramplanError(f"no training config at {str(p)!r}")
    text = p.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise VramplanError(f"{p}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise VramplanError(f"{p}: not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise VramplanError(f"{p}: the top level must be a mapping of keys to values, got {type(data).__name__}")
    return data


def read_mapping(data: Mapping[str, Any], where: str, fmt: str | None = None, *, json_file: bool = False,
                 base: Path | None = None) -> TrainConfig:
    """A TrainConfig from an already-loaded mapping (`fmt` forces the format). Relative paths in
    it (a DeepSpeed JSON, an FSDP config) are looked up in `base`, then the current directory."""
    fmt = fmt or detect_format(data, where, json_file=json_file)
    if fmt not in READERS:
        raise VramplanError(f"unknown training-config format {fmt!r}: allowed: {', '.join(FORMATS)}")
    r = Reading(data, where, base)
    model = READERS[fmt](r)
    if fmt != "accelerate":  # an accelerate config says nothing of the method
        r.options.setdefault("method", "full")  # no adapter, no GaLore: every weight is trained
    return r.result(fmt, model)


def read_train_config(path: str | Path, fmt: str | None = None) -> TrainConfig:
    """Read a TRL / axolotl / LLaMA-Factory / HF training config file (or an accelerate config)
    into vramplan options; paths inside it resolve next to it first."""
    return read_mapping(load_mapping(path), str(path), fmt, json_file=Path(path).suffix.lower() == ".json",
                        base=Path(path).parent)


def accepted_options() -> set[str] | None:
    """The option names `vramplan.estimate` takes now (None: any). Options a reader emits that
    this vramplan does not take yet (trainer presets, Liger, DoRA, offload) are reported, not passed."""
    from vramplan.estimator import estimate

    params = inspect.signature(estimate).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return {n for n in params if n not in ("model", "method")} | {"method"}
    try:
        from vramplan.options import NAMES
    except ImportError:
        return None
    return set(NAMES)


def estimate_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(options `vramplan.estimate` accepts, options it does not take yet)."""
    ok = accepted_options()
    if ok is None:
        return dict(options), {}
    return {k: v for k, v in options.items() if k in ok}, {k: v for k, v in options.items() if k not in ok}


__all__ = ["FORMATS", "HF_OPTIMIZERS", "TrainConfig", "accepted_options", "detect_format", "estimate_options",
           "load_mapping", "read_mapping", "read_train_config"]
