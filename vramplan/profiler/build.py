"""Build a model from its config with random weights on the current device, apply a method, and
make its optimizer — with the real libraries (transformers, peft, bitsandbytes, galore-torch).

Follows shared/reference/README.md: dense bases are built directly on the GPU; 4/8-bit bases are
built on the meta device and quantised layer by layer, so a 70B QLoRA run needs only its final
footprint.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def compute_dtype(setup: dict[str, Any]) -> torch.dtype:
    """The dtype activations run in."""
    if setup["precision"] == "fp32":
        return torch.float32
    if setup["dtype"] in TORCH_DTYPES and setup["precision"] == "pure":
        return TORCH_DTYPES[setup["dtype"]]
    return torch.float16 if setup.get("compute_dtype") == "fp16" else torch.bfloat16


def weight_dtype(setup: dict[str, Any]) -> torch.dtype:
    """The dtype of the dense (non-quantised) weights as loaded."""
    if setup["precision"] in ("fp32", "mixed"):
        return torch.float32
    return TORCH_DTYPES.get(setup["dtype"], torch.bfloat16)


def _hf_config(setup: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(**setup["hf_config"])
    cfg.use_cache = False
    return cfg


def _quantised_linear(child: nn.Linear, setup: dict[str, Any], device: torch.device) -> nn.Module:
    import bitsandbytes as bnb

    w = torch.empty(child.out_features, child.in_features, dtype=torch.bfloat16, device=device).normal_(0, 0.02)
    bias = child.bias is not None
    if setup["dtype"] == "int8":
        # Int8Params quantises only when moved from the CPU (bitsandbytes 0.50 nn/modules.py)
        new = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=False, has_fp16_weights=False,
                                  threshold=6.0, device="meta")
        new.weight = bnb.nn.Int8Params(w.to(torch.float16).cpu(), requires_grad=False, has_fp16_weights=False)
    else:
        new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=torch.bfloat16,
                                compress_statistics=setup["double_quant"], quant_type=setup["dtype"], device="meta")
        new.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=setup["double_quant"],
                                       quant_type=setup["dtype"])
    del w
    new = new.to(device)  # quantises here; the bf16 source is freed at once
    if bias:
        new.bias = nn.Parameter(torch.zeros(child.out_features, dtype=torch.bfloat16, device=device), requires_grad=False)
    return new


def _materialise(model: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """Give every parameter still on the meta device real random storage on `device`."""
    for mod in model.modules():
        for pname, p in list(mod.named_parameters(recurse=False)):
            if p.is_meta:
                t = torch.empty(p.shape, dtype=dtype, device=device)
                if p.dim() == 1:
                    t.fill_(1.0)
                else:
                    t.normal_(0, 0.02)
                setattr(mod, pname, nn.Parameter(t, requires_grad=p.requires_grad))


def attn_implementation(setup: dict[str, Any]) -> str | None:
    """What from_config gets: "sdpa" is transformers' default (None), which falls back to eager
    for a model without SDPA (gpt-oss), as vramplan.streams.attention_kernel does; "flash" is
    SDPA's flash kernel (the image has no flash-attn package); "eager" as given."""
    return None if setup["attn"] in ("sdpa", "flash") else setup["attn"]


def build_model(setup: dict[str, Any], device: torch.device) -> nn.Module:
    from transformers import AutoModelForCausalLM

    cfg = _hf_config(setup)
    attn = attn_implementation(setup)
    if setup["dtype"] not in ("int8", "nf4", "fp4"):
        with device:
            return AutoModelForCausalLM.from_config(cfg, dtype=weight_dtype(setup), attn_implementation=attn)
    from accelerate import init_empty_weights

    with device, init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation=attn)
    for parent in list(model.modules()):
        for cname, child in list(parent.named_children()):
            # transformers 5 integrations/bitsandbytes.py replace_with_bnb_linear converts only
            # `type(module) is nn.Linear`: subclasses such as Llama4Router stay 16-bit
            if type(child) is nn.Linear and child is not model.get_output_embeddings():
                setattr(parent, cname, _quantised_linear(child, setup, device))
    _materialise(model, torch.bfloat16, device)
    model.tie_weights()
    flag = "is_loaded_in_4bit" if setup["dtype"] in ("nf4", "fp4") else "is_loaded_in_8bit"
    for attr in (flag, "is_quantized"):
        with contextlib.suppress(AttributeError):
            setattr(model, attr, True)
    return model


def lora_targets(setup: dict[str, Any]) -> dict[str, Any]:
    """LoraConfig target arguments: "all-linear" where the setup resolved to it (peft 0.21 then maps
    the router and fused experts onto `target_parameters` itself, utils/transformers_weight_conversion.py);
    otherwise Linear names as target_modules, and the router weight / fused expert parameters as the
    target_parameters that conversion would give, fused gate_up at rank and alpha x2."""
    if setup.get("lora_all_linear"):
        return {"target_modules": "all-linear"}
    params = set(setup.get("lora_target_parameters", ()))
    out: dict[str, Any] = {"target_modules": [t for t in setup["lora_targets_resolved"] if t not in params]}
    if params:
        out["target_parameters"] = sorted(p.split(".", 1)[1] if p.startswith("experts.") else f"{p}.weight" for p in params)
        if "experts.gate_up_proj" in params:
            out["rank_pattern"] = {r".*\.gate_up_proj": 2 * setup["lora_rank"]}
            out["alpha_pattern"] = {r".*\.gate_up_proj": 2 * setup["lora_alpha"]}
    return out


def apply_method(model: nn.Module, setup: dict[str, Any]) -> nn.Module:
    import peft

    method = setup["method"]
    quantised = setup["dtype"] in ("int8", "nf4", "fp4")
    if quantised and setup["kbit_prepare"]:
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=setup["grad_checkpointing"],
                                                     gradient_checkpointing_kwargs={"use_reentrant": False})
    elif setup["grad_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method in ("lora", "qlora"):
        cfg = peft.LoraConfig(r=setup["lora_rank"], lora_alpha=setup["lora_alpha"], lora_dropout=setup["lora_dropout"],
                              task_type="CAUSAL_LM", **lora_targets(setup))
        model = peft.get_peft_model(model, cfg)
    elif method == "prefix":
        cfg = peft.PrefixTuningConfig(num_virtual_tokens=setup["prefix_tokens"], task_type="CAUSAL_LM",
                                      prefix_projection=setup.get("prefix_projection", False))
        model = peft.get_peft_model(model, cfg)
    elif method == "prompt":
        cfg = peft.PromptTuningConfig(num_virtual_tokens=setup["prefix_tokens"], task_type="CAUSAL_LM")
        model = peft.get_peft_model(model, cfg)
    elif method == "ia3":
        model = peft.get_peft_model(model, peft.IA3Config(task_type="CAUSAL_LM"))
    elif method == "bitfit":
        for n, p in model.named_parameters():
            p.requires_grad_(n.endswith(".bias"))
    return model


def _galore_groups(model: nn.Module, setup: dict[str, Any]) -> list[dict[str, Any]]:
    """GaLore on every 2-D attention/MLP weight (shared/reference/README.md); the rest plain."""
    galore, plain = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_target = p.dim() == 2 and any(k in n for k in ("self_attn", "attn.", "mlp"))
        (galore if is_target else plain).append(p)
    return [{"params": plain},
            {"params": galore, "rank": setup["galore_rank"], "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}]


def make_optimizer(model: nn.Module, setup: dict[str, Any]) -> torch.optim.Optimizer:
    opt = setup["optimizer"]
    lr = 1e-5
    if setup["method"] == "galore":
        import galore_torch

        cls = {"adamw": galore_torch.GaLoreAdamW, "adamw-8bit": galore_torch.GaLoreAdamW8bit,
               "adafactor": galore_torch.GaLoreAdafactor}[opt]
        kw: dict[str, Any] = {"lr": lr}
        if opt == "adafactor":
            kw.update(relative_step=False, scale_parameter=False, warmup_init=False)
        return cls(_galore_groups(model, setup), **kw)
    params = [p for p in model.parameters() if p.requires_grad]
    if opt == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    if opt == "adamw-fused":
        return torch.optim.AdamW(params, lr=lr, fused=True)
    if opt == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if opt == "sgd-momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if opt == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, relative_step=False, scale_parameter=False, warmup_init=False)
    import bitsandbytes as bnb

    cls = {"adamw-8bit": bnb.optim.AdamW8bit, "paged-adamw": bnb.optim.PagedAdamW,
           "paged-adamw-8bit": bnb.optim.PagedAdamW8bit, "lion": bnb.optim.Lion, "lion-8bit": bnb.optim.Lion8bit}[opt]
    return cls(params, lr=lr)
