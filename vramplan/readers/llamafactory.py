"""LLaMA-Factory YAML (`llamafactory-cli train FILE`). Its trainers subclass the HF Trainer, so
the trainer preset is "hf"; TrainingArguments keys are read as for HF.

Key names and defaults, LLaMA-Factory at ff6d4d1 (2026-08): src/llamafactory/hparams/
finetuning_args.py, model_args.py, data_args.py, parser.py; src/llamafactory/model/adapter.py
(fp32 upcast of trainable parameters), model/model_utils/checkpointing.py (checkpointing)."""

from __future__ import annotations

from vramplan.readers.common import Reading
from vramplan.readers.engines import read_engine
from vramplan.readers.hf import read_training_args

LF_CUTOFF_LEN = 2048  # data_args.py cutoff_len
LF_LORA_RANK = 8  # finetuning_args.py lora_rank; lora_alpha defaults to 2 * rank (__post_init__)
LF_LORA_DROPOUT = 0.0
LF_GALORE_RANK = 16  # finetuning_args.py galore_rank
LF_KEYS = ("finetuning_type", "cutoff_len", "stage", "template", "lora_target", "quantization_bit", "lora_rank",
           "disable_gradient_checkpointing", "enable_liger_kernel", "flash_attn")
# model_args.py AttentionFunction: auto leaves transformers' default (sdpa).
LF_ATTN = {"auto": "sdpa", "sdpa": "sdpa", "disabled": "eager", "fa2": "flash", "fa3": "flash"}
LF_UNMODELLED = (("use_badam", "BAdam (block-wise updates) is not modelled"),
                 ("use_apollo", "APOLLO is not modelled"), ("use_adam_mini", "Adam-mini is not modelled"),
                 ("use_muon", "Muon is not modelled"), ("use_llama_pro", "LLaMA Pro (added blocks) is not modelled"),
                 ("additional_target", "fully trained extra modules are not modelled"),
                 ("upcast_layernorm", "fp32 norm weights are not modelled"),
                 ("upcast_lmhead_output", "fp32 lm_head output is not modelled"),
                 ("use_unsloth", "unsloth kernels are not modelled"))


def _method(r: Reading, ftype: str) -> None:
    bits = r.raw("quantization_bit")
    if bits is not None and bits not in (4, 8):
        raise r.fail("quantization_bit", f"{bits!r} is not modelled; allowed: 4, 8 (bitsandbytes)")
    if bits is not None:
        r.ignore("quantization_method", "only bitsandbytes quantisation is modelled", default="bnb")
    if ftype in ("full", "freeze"):
        if bits is not None:
            raise r.fail("quantization_bit", f"a quantised base cannot be trained with finetuning_type {ftype}")
        if ftype == "freeze":
            r.ignored["finetuning_type"] = "'freeze': estimated as full fine-tuning (an upper bound; freeze trains the last layers only)"
        if r.bool("use_galore"):
            r.set(method="galore", galore_rank=r.posint("galore_rank", LF_GALORE_RANK),
                  optimizer="adamw-8bit" if "8bit" in str(r.options.get("optimizer", "")) else "adamw")
        else:
            r.set(method="full")
        return
    if ftype != "lora":
        raise r.fail("finetuning_type", f"{ftype!r} is not modelled; allowed: lora, full, freeze")
    rank = r.posint("lora_rank", LF_LORA_RANK)
    target = r.text("lora_target", "all")
    r.set(method="qlora" if bits == 4 else "lora", lora_rank=rank, lora_alpha=r.number("lora_alpha", 2 * (rank or 8)),
          lora_dropout=r.number("lora_dropout", LF_LORA_DROPOUT), lora_targets="all-linear" if target == "all" else target)
    if r.bool("use_dora"):
        r.set(use_dora=True)
    if bits == 4:
        # quantization_type nf4 and double_quantization True by default (model_args.py).
        r.set(dtype=r.text("quantization_type", "nf4"), double_quant=r.bool("double_quantization", True))
    elif bits == 8:
        r.set(dtype="int8")
    if bits is not None:
        # LLaMA-Factory never calls peft's prepare_model_for_kbit_training: its own
        # prepare_model_for_training upcasts norms only with upcast_layernorm (checkpointing.py).
        r.set(kbit_prepare=False)


def read_llamafactory(r: Reading) -> str:
    model = r.text("model_name_or_path")
    if model is None:
        raise r.fail("model_name_or_path", "missing: a LLaMA-Factory config names its model here")
    bf16 = bool(r.bool("bf16")) or bool(r.bool("pure_bf16"))
    fp16 = bool(r.bool("fp16"))
    # parser.py: the model is loaded in compute_dtype (bf16 if bf16 or pure_bf16, fp16 if fp16).
    weights = "bf16" if bf16 else ("fp16" if fp16 else "fp32")
    read_training_args(r, ckpt_default=None, weights=weights)
    # checkpointing is on unless disable_gradient_checkpointing (model_args.py default False).
    r.set(grad_checkpointing=not r.bool("disable_gradient_checkpointing", False))
    if r.bool("use_unsloth_gc"):
        r.set(checkpoint_offload=True)  # unsloth's checkpointing offloads layer inputs to the host
    r.set(seq_len=r.posint("cutoff_len", LF_CUTOFF_LEN))
    ftype = r.text("finetuning_type", "lora")  # finetuning_args.py default "lora"
    assert ftype is not None
    _method(r, ftype)
    if r.options.get("dtype") in ("nf4", "fp4"):
        # model_utils/quantization.py: bnb_4bit_quant_storage=model_args.compute_dtype ("crucial for fsdp+qlora")
        r.set(quant_storage=weights)
    if r.options["method"] in ("full", "galore") and not r.bool("pure_bf16") and weights != "fp32":
        # adapter.py casts trainable parameters to fp32 unless pure_bf16: fp32 master weights
        # under bf16/fp16 autocast, vramplan's "mixed".
        r.set(precision="mixed")
    if r.bool("enable_liger_kernel"):
        r.set(liger=True)
    attn = r.text("flash_attn")
    if attn is not None:
        if attn not in LF_ATTN:
            raise r.fail("flash_attn", f"unknown {attn!r}; allowed: {', '.join(LF_ATTN)}")
        r.set(attn=LF_ATTN[attn])
    for key, why in LF_UNMODELLED:
        r.ignore(key, why)
    read_engine(r)  # TrainingArguments' deepspeed / fsdp (LLaMA-Factory's examples/deepspeed/*.json)
    r.set(trainer="hf")
    return model
