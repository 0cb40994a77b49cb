"""HF `TrainingArguments` keys (shared by the TRL and LLaMA-Factory readers) and the plain HF
format: TrainingArguments as JSON/YAML plus `model_name_or_path` (or `base_model`).

Key names and defaults: transformers 5.23 src/transformers/training_args.py."""

from __future__ import annotations

from vramplan.readers.common import Reading, galore_rank, map_optimizer, precision_dtype, weights_dtype
from vramplan.readers.engines import read_engine

# TrainingArguments.optim defaults to adamw_torch_fused on torch >= 2.8 (training_args.py,
# `default_optim`); vramplan's profiles run torch 2.11+, so the fused default applies.
HF_DEFAULT_OPTIM = "adamw_torch_fused"
# TrainingArguments.per_device_train_batch_size defaults to 8 (training_args.py).
HF_DEFAULT_BATCH = 8
# Sequence-length keys of HF example scripts and wrappers (run_clm.py `block_size`,
# `max_seq_length` of older TRL, `model_max_length` of tokenizer args); TrainingArguments has none.
HF_LENGTH_KEYS = ("max_length", "max_seq_length", "block_size", "model_max_length", "seq_len")


def read_training_args(r: Reading, *, ckpt_default: bool | None, weights: str = "bf16") -> None:
    """TrainingArguments keys common to every HF-Trainer-based tool: batch, accumulation,
    checkpointing, optimizer (and GaLore), mixed precision, Liger, and what is not modelled.
    `weights` is the dtype the model is loaded in (bf16, fp16 or fp32); `ckpt_default` None
    leaves checkpointing to the caller (a tool that sets it outside TrainingArguments). The caller
    reads `deepspeed` / `fsdp` afterwards (engines.read_engine: FSDP's own activation
    checkpointing can turn checkpointing on)."""
    r.set(batch_size=r.posint("per_device_train_batch_size", HF_DEFAULT_BATCH),
          grad_accum=r.posint("gradient_accumulation_steps", 1))
    # transformers 5.x: `activation_checkpointing` is the name, `gradient_checkpointing` its
    # deprecated alias, read only when the new name is unset (TrainingArguments.__post_init__).
    key = "activation_checkpointing" if r.has("activation_checkpointing") else "gradient_checkpointing"
    if ckpt_default is not None:
        r.set(grad_checkpointing=r.bool(key, ckpt_default))
    method, optimizer = map_optimizer(r, "optim", HF_DEFAULT_OPTIM)
    r.set(optimizer=optimizer)
    if method == "galore":
        r.set(method="galore", galore_rank=galore_rank(r))
    bf16, fp16 = bool(r.bool("bf16")), bool(r.bool("fp16"))
    precision, dtype = precision_dtype(weights, bf16=bf16, fp16=fp16)
    r.set(precision=precision, dtype=dtype)
    if r.bool("use_liger_kernel"):
        r.set(liger=True)
    for key in ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"):
        kw = r.data.get(key)
        if isinstance(kw, dict) and (kw.get("use_reentrant") or kw.get("every_n_layers")):
            r.ignored[key] = f"{kw!r}: vramplan models non-reentrant checkpointing of every layer"
    r.ignore("torch_compile", "compiled graphs free and fuse activations differently; not modelled")
    r.ignore("torch_empty_cache_steps", "emptying the cache lowers reserved, not allocated, memory; not modelled")
    r.ignore("auto_find_batch_size", "the Trainer halves the batch on OOM; the file's batch is estimated")
    r.ignore("optim_target_modules", "GaLore targets: vramplan projects every 2-D matrix")


def read_length(r: Reading, default: int | None) -> None:
    """The first sequence-length key present (HF_LENGTH_KEYS), else `default` if given."""
    for key in HF_LENGTH_KEYS:
        if r.has(key):
            r.set(seq_len=r.posint(key))
            return
    if default is not None:
        r.set(seq_len=r.posint(HF_LENGTH_KEYS[0], default))
    else:
        r.ignored["(sequence length)"] = "not in the file (TrainingArguments has none): vramplan's default applies; pass --seq-len"


def read_hf(r: Reading) -> str:
    """Plain TrainingArguments (+ model id). Returns the model. The Trainer leaves checkpointing
    off by default (training_args.py `activation_checkpointing` False)."""
    model_key = "model_name_or_path" if r.has("model_name_or_path") else "base_model"
    model = r.text(model_key)
    assert model is not None  # detect() found it
    weights = weights_dtype(r, "dtype" if r.has("dtype") else "torch_dtype", "bf16")
    read_training_args(r, ckpt_default=False, weights=weights)
    read_length(r, None)
    from vramplan.readers.trl import read_model_config

    read_model_config(r, model, weights=weights, trl=False)
    read_engine(r)
    r.set(trainer="hf")
    return model
