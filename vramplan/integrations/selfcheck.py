"""Measure MemoryPreflight's prediction on this card: three setups, each in its own process, each
a real transformers `Trainer` run of a catalogue model built from its config (random weights,
random tokens), with the callback appending its record.

    python -m vramplan.integrations.selfcheck OUT.jsonl [CASE ...]

Needs CUDA, torch, transformers, accelerate and peft."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

# name -> (catalogue model, peft LoRA rank or None, batch, seq, checkpointing)
CASES: dict[str, tuple[str, int | None, int, int, bool]] = {
    "trainer-full-qwen0.5b-b4s512": ("qwen2.5-0.5b", None, 4, 512, False),
    "trainer-lora-1b-b4s1024": ("llama-3.2-1b", 16, 4, 1024, False),
    "trainer-lora-ckpt-1b-b8s1024": ("llama-3.2-1b", 16, 8, 1024, True),
}


def run_case(name: str, out: Path) -> None:
    """One case in this process: build, train 4 steps through Trainer + MemoryPreflight."""
    import torch
    import transformers

    from vramplan.catalog import resolve_model
    from vramplan.integrations.transformers import MemoryPreflight

    model_name, rank, batch, seq, ckpt = CASES[name]
    hf = dict(resolve_model(model_name).arch.hf_config)
    cfg = transformers.AutoConfig.for_model(**hf)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).cuda()
    if rank is not None:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05,
                                                           target_modules="all-linear", task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, hf["vocab_size"], (batch * 4, seq), generator=g)
    data: list[dict[str, Any]] = [{"input_ids": x, "labels": x.clone()} for x in ids]
    args = transformers.TrainingArguments(output_dir=f"/tmp/selfcheck-{name}", per_device_train_batch_size=batch,
                                          max_steps=4, bf16=True, gradient_checkpointing=ckpt, report_to=[],
                                          save_strategy="no", logging_strategy="no", disable_tqdm=True)
    cb = MemoryPreflight(seq_len=seq, measure_steps=3, record_path=out, name=name)
    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb]).train()
    c = cb.comparison
    assert c is not None
    print(json.dumps({"case": name, "measured": c.measured_bytes, "predicted": c.predicted_bytes,
                      "error": round(c.error, 4)}), flush=True)


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "--one":
        run_case(argv[1], Path(argv[2]))
        return 0
    out = Path(argv[0])
    rc = 0
    for name in argv[1:] or list(CASES):
        p = subprocess.run([sys.executable, "-m", "vramplan.integrations.selfcheck", "--one", name, str(out)], check=False)
        rc = rc or p.returncode
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
