"""TRL script YAML (`trl sft --config FILE`): ScriptArguments + SFTConfig + ModelConfig keys in one
flat mapping (trl/scripts/sft.py `make_parser`).

Key names and defaults, TRL at f2cd577 (2026-07): trl/trainer/sft_config.py, trl/trainer/base_config.py,
trl/trainer/model_config.py, trl/trainer/utils.py (get_peft_config, get_quantization_config)."""

from __future__ import annotations

from vramplan.readers.common import Reading, lora_targets, map_attn, quant_storage, weights_dtype
from vramplan.readers.engines import read_engine
from vramplan.readers.hf import read_training_args

# SFTConfig.max_length defaults to 1024 (sft_config.py); None means no truncation.
TRL_MAX_LENGTH = 1024
# Keys only TRL's parsers define: they mark a file as a TRL config.
TRL_KEYS = ("use_peft", "lora_r", "lora_target_modules", "load_in_4bit", "load_in_8bit", "use_bnb_nested_quant",
            "max_length", "packing", "padding_free", "dataset_name", "dataset_text_field", "completion_only_loss",
            "assistant_only_loss", "activation_offloading", "lora_task_type", "use_rslora", "loss_type")


def read_model_config(r: Reading, model: str, *, weights: str, trl: bool = True) -> None:
    """TRL ModelConfig's PEFT and quantisation keys. TRL loads a 4/8-bit base through
    get_quantization_config and wraps it with get_peft_config; it calls no
    prepare_model_for_kbit_training (sft_trainer.py), so the non-quantised weights stay in the
    load dtype: fp32 by default, which costs what peft's kbit upcast costs."""
    q4, q8 = r.bool("load_in_4bit"), r.bool("load_in_8bit")
    if q4 and q8:
        raise r.fail("load_in_8bit", "load_in_4bit and load_in_8bit are both true (TRL refuses this)")
    peft = r.bool("use_peft", False if trl else None)  # ModelConfig.use_peft defaults to False
    if (q4 or q8) and not peft:
        raise r.fail("load_in_4bit" if q4 else "load_in_8bit", "a quantised base needs use_peft: true (TRL: 'Works only with LoRA')")
    if not peft:
        return
    if r.options.get("method") == "galore":
        raise r.fail("use_peft", "use_peft and a GaLore optimizer cannot be combined")
    r.set(method="qlora" if q4 else "lora", lora_rank=r.posint("lora_r", 16), lora_alpha=r.number("lora_alpha", 32),
          lora_dropout=r.number("lora_dropout", 0.05), lora_targets=lora_targets(r, "lora_target_modules", model))
    if r.bool("use_dora"):
        r.set(use_dora=True)
    if q4 or q8:
        quant = r.text("bnb_4bit_quant_type", "nf4") if q4 else "int8"
        if quant not in ("nf4", "fp4", "int8"):
            raise r.fail("bnb_4bit_quant_type", f"expected nf4 or fp4, got {quant!r}")
        # use_bnb_nested_quant defaults to False (model_config.py) -> no double quantisation.
        r.set(dtype=quant, precision="pure", double_quant=bool(r.bool("use_bnb_nested_quant", False)) if q4 else None,
              kbit_prepare=weights == "fp32")
    r.ignore("lora_modules_to_save", "fully trained copies of these modules are not modelled")
    r.ignore("lora_target_parameters", "LoRA on raw parameters (MoE experts) is not modelled")
    if q4:
        r.set(quant_storage=quant_storage(r, "bnb_4bit_quant_storage", r.raw("bnb_4bit_quant_storage")))


def read_trl(r: Reading) -> str:
    """A TRL SFT config. Returns the model id. Defaults that differ from TrainingArguments
    (base_config.py): gradient_checkpointing True, bf16 True unless fp16."""
    model = r.text("model_name_or_path")
    if model is None:
        raise r.fail("model_name_or_path", "missing: a TRL config names its model here")
    # ModelConfig.dtype defaults to "float32" (model_config.py; sft_trainer.py: "If `dtype` is not
    # specified ... it defaults to float32"); "auto" takes the checkpoint's dtype, bf16 for current models.
    weights = weights_dtype(r, "dtype", "bf16") if r.has("dtype") else "fp32"
    r.read.setdefault("dtype", "float32")
    if not r.has("dtype"):
        r.defaulted.append("dtype")
    # bf16 defaults to `not fp16` (base_config.py __post_init__).
    if not r.has("bf16"):
        r.read["bf16"] = not bool(r.bool("fp16"))
        r.defaulted.append("bf16")
    data = dict(r.data)
    data.setdefault("bf16", r.read["bf16"])
    r.data = data
    read_training_args(r, ckpt_default=True, weights=weights)
    if "max_length" in r.data and r.data["max_length"] is None:
        r.read["max_length"] = None
        r.ignored["max_length"] = "None: no truncation, the data sets the length; the trl preset's 1024 applies, pass --seq-len"
    else:
        r.set(seq_len=r.posint("max_length", TRL_MAX_LENGTH))
    r.bool("packing")  # read for the record: packed rows are max_length long, what is estimated
    r.bool("padding_free")
    r.set(attn=map_attn(r, "attn_implementation"))
    read_model_config(r, model, weights=weights)
    if r.bool("activation_offloading"):
        r.set(activation_offload=True)
    loss = r.data.get("loss_type")
    if loss not in (None, "chunked_nll") and not r.options.get("liger"):
        # loss_type defaults to "chunked_nll" (sft_config.py __post_init__), which the trl preset models.
        r.ignored["loss_type"] = f"{loss!r}: the trl preset models the default chunked_nll loss (no full logits)"
    read_engine(r)
    r.set(trainer="trl")
    return model
