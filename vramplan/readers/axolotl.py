"""axolotl YAML. axolotl trains through an HF Trainer subclass, so the trainer preset is "hf".

Key names and defaults, axolotl at 067b021 (2026-07): src/axolotl/utils/schemas/config.py,
training.py, peft.py, model.py; src/axolotl/loaders/model.py (quantisation, kbit preparation);
src/axolotl/loaders/adapter.py (LoRA targets); src/axolotl/integrations/liger/args.py."""

from __future__ import annotations

from vramplan.readers.common import ATTN_IMPLS, Reading, lora_targets, map_optimizer, quant_storage
from vramplan.readers.engines import read_engine

# Schema defaults (schemas/config.py, training.py, peft.py).
AXOLOTL_SEQUENCE_LEN = 512
AXOLOTL_MICRO_BATCH = 1
AXOLOTL_OPTIMIZER = "adamw_torch_fused"
AXOLOTL_LORA_DROPOUT = 0.0
# lora_r / lora_alpha have no axolotl default: peft's LoraConfig takes r=8, lora_alpha=8 (peft 0.21).
PEFT_R, PEFT_ALPHA = 8, 8
AXOLOTL_KEYS = ("base_model", "sequence_len", "micro_batch_size", "adapter", "lora_target_linear", "num_epochs",
                "sample_packing", "datasets", "val_set_size")
LIGER_FLAGS = ("liger_rope", "liger_rms_norm", "liger_swiglu", "liger_glu_activation", "liger_layer_norm",
               "liger_cross_entropy", "liger_fused_linear_cross_entropy")


def _precision(r: Reading) -> None:
    """axolotl loads the model in cfg.torch_dtype: bf16 when bf16 (default "auto": bf16 on
    Ampere+), else fp16, else fp32 (utils/config/__init__.py), and AMP runs over those weights."""
    bf16 = r.raw("bf16", "auto")
    if r.bool("bfloat16") or bf16 in (True, "auto", "full"):
        r.set(precision="pure", dtype="bf16")
    elif r.bool("fp16") or r.bool("float16"):
        r.set(precision="pure", dtype="fp16")
    elif bf16 is False:
        r.set(precision="fp32", dtype="fp32")
    else:
        raise r.fail("bf16", f"expected true, false or auto, got {bf16!r}")


def _attention(r: Reading) -> None:
    if r.has("attn_implementation"):
        name = r.text("attn_implementation")
        if name in ATTN_IMPLS:
            r.set(attn=ATTN_IMPLS[name])
        else:
            r.ignored["attn_implementation"] = f"{name!r}: not modelled, estimated as sdpa"
        return
    for key, attn in (("flash_attention", "flash"), ("sdp_attention", "sdpa"), ("eager_attention", "eager")):
        if r.bool(key):
            r.set(attn=attn)
            return
    r.ignore("xformers_attention", "xformers attention is not modelled, estimated as sdpa")
    r.ignore("flex_attention", "flex attention is not modelled, estimated as sdpa")


def _adapter(r: Reading, model: str) -> None:
    adapter = r.text("adapter")
    q4, q8 = r.bool("load_in_4bit"), r.bool("load_in_8bit")
    if adapter is None:
        if q4 or q8:
            raise r.fail("load_in_4bit" if q4 else "load_in_8bit", "a quantised base needs adapter: lora or qlora")
        return
    if adapter not in ("lora", "qlora"):
        raise r.fail("adapter", f"adapter {adapter!r} is not modelled; allowed: lora, qlora")
    four_bit = adapter == "qlora" or bool(q4)
    targets = "all-linear" if r.bool("lora_target_linear") else lora_targets(r, "lora_target_modules", model)
    r.set(method="qlora" if four_bit else "lora", lora_rank=r.posint("lora_r", PEFT_R),
          lora_alpha=r.number("lora_alpha", PEFT_ALPHA), lora_dropout=r.number("lora_dropout", AXOLOTL_LORA_DROPOUT),
          lora_targets=targets)
    if r.bool("peft_use_dora"):
        r.set(use_dora=True)
    if four_bit:
        # bnb_4bit_use_double_quant True, quant type nf4 (loaders/model.py qlora branch);
        # bnb_config_kwargs overrides them.
        kw = r.data.get("bnb_config_kwargs") or {}
        # ... and bnb_4bit_quant_storage bf16 (fp32 for jamba and qwen2_moe off DeepSpeed/FSDP,
        # where nothing shards the weights, so the same memory)
        r.set(dtype=kw.get("bnb_4bit_quant_type", "nf4"), double_quant=bool(kw.get("bnb_4bit_use_double_quant", True)),
              quant_storage=quant_storage(r, "bnb_config_kwargs.bnb_4bit_quant_storage",
                                          kw.get("bnb_4bit_quant_storage", "bfloat16")))
    elif q8:
        r.set(dtype="int8")
    if four_bit or q8:
        # prepare_model_for_kbit_training upcasts to fp32 (loaders/model.py
        # _prepare_model_for_quantization), but for LoRA/QLoRA axolotl then converts norms and
        # embedding modules back to the training dtype (model.py `should_convert`, "for flash-attn
        # compatibility"): the fp32 upcast does not survive, so no kbit_prepare.
        r.set(kbit_prepare=False)
    r.ignore("lora_modules_to_save", "fully trained copies of these modules are not modelled")
    r.ignore("lora_target_parameters", "LoRA on raw parameters (MoE experts) is not modelled")
    r.ignore("peft_layers_to_transform", "LoRA on a subset of layers is not modelled (all layers estimated)")


def _liger(r: Reading) -> None:
    plugins = r.data.get("plugins") or []
    if not isinstance(plugins, list):
        raise r.fail("plugins", f"expected a list of plugin classes, got {plugins!r}")
    if any("liger" in str(p).lower() for p in plugins):
        r.read["plugins"] = plugins
        on = [k for k in LIGER_FLAGS if r.bool(k)]
        if on:
            r.set(liger=True)
    if any("cut_cross_entropy" in str(p).lower() for p in plugins) or r.data.get("cut_cross_entropy"):
        r.ignored["cut_cross_entropy"] = "Cut Cross-Entropy (no full logits) is not modelled; logits are estimated"


def read_axolotl(r: Reading) -> str:
    model = r.text("base_model")
    if model is None:
        raise r.fail("base_model", "missing: an axolotl config names its model here")
    r.set(batch_size=r.posint("micro_batch_size", AXOLOTL_MICRO_BATCH),
          grad_accum=r.posint("gradient_accumulation_steps", 1), seq_len=r.posint("sequence_len", AXOLOTL_SEQUENCE_LEN))
    ckpt = r.raw("gradient_checkpointing", False)  # schemas/config.py: default False
    if ckpt in ("offload", "offload_disk"):
        r.set(grad_checkpointing=True, checkpoint_offload=True)
    elif isinstance(ckpt, bool):
        r.set(grad_checkpointing=ckpt)
    else:
        raise r.fail("gradient_checkpointing", f"expected true, false, offload or offload_disk, got {ckpt!r}")
    if r.data.get("activation_offloading"):
        r.read["activation_offloading"] = r.data["activation_offloading"]
        r.set(activation_offload=True)
    method, optimizer = map_optimizer(r, "optimizer", AXOLOTL_OPTIMIZER)
    r.set(optimizer=optimizer, method=method)
    _precision(r)
    _attention(r)
    _adapter(r, model)
    _liger(r)
    # axolotl hands deepspeed / fsdp / fsdp_config to TrainingArguments, with fsdp=True when only
    # fsdp_config is set (core/builders/base.py); its top-level fsdp_version is recorded.
    read_engine(r, fsdp_config_enables=True)
    if "fsdp" in r.parallel and r.has("fsdp_version"):
        r.raw("fsdp_version")
    for key, why in (("torch_compile", "compiled graphs are not modelled"),
                     ("unfrozen_parameters", "training a subset of parameters is not modelled (all estimated)"),
                     ("relora", "ReLoRA is not modelled"),
                     ("tiled_mlp", "tiled MLP is not modelled"),
                     ("sequence_parallel_degree", "sequence parallelism is not modelled"),
                     ("context_parallel_size", "context parallelism is not modelled")):
        r.ignore(key, why, default=1 if key.endswith(("_degree", "_size")) else None)
    r.set(trainer="hf")
    return model
