"""Map shared/reference/h100_reference.jsonl cases onto vramplan setups (see its README)."""

from __future__ import annotations

from typing import Any

GPT2_TARGETS = ("c_attn", "c_proj", "c_fc")
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def reference_options(case: dict[str, Any], arch_config: dict[str, Any]) -> dict[str, Any]:
    """Keyword options for vramplan.estimate() that describe one reference case."""
    method = case["method"]
    opts: dict[str, Any] = {
        "method": method, "batch_size": case["batch"], "seq_len": case["seq"],
        "grad_checkpointing": bool(case.get("ckpt", False)), "attn": case.get("attn", "sdpa"),
        "optimizer": {"adamw8bit": "adamw-8bit"}.get(case.get("optim", "adamw"), case.get("optim", "adamw")),
    }
    if case.get("precision") == "fp32":
        opts.update(dtype="fp32", precision="fp32")
    else:
        opts.update(dtype="nf4" if method == "qlora" else "bf16", precision="pure")
    if method in ("lora", "qlora"):
        r = case["rank"]
        targets = GPT2_TARGETS if arch_config["model_type"] == "gpt2" else LLAMA_TARGETS
        opts.update(lora_rank=r, lora_alpha=2 * r, lora_dropout=0.05, lora_targets=",".join(targets))
    if method == "galore":
        opts.update(galore_rank=case["rank"])
    if method == "prefix":
        opts.update(prefix_tokens=case["virtual_tokens"])
    return opts
