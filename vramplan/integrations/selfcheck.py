"""Measure MemoryPreflight's prediction on this card: three setups, each in its own process, each
a real transformers `Trainer` run of a catalogue model built from its config (random weights,
random tokens), with the callback appending its record. The multi-GPU cases (DIST_CASES) run
under torchrun on every visible GPU (or `--gpus N`), DDP or DeepSpeed ZeRO through the Trainer,
each rank checking and recording its own per-GPU figures.

    python -m vramplan.integrations.selfcheck [--gpus N] OUT.jsonl [CASE ...]

Needs CUDA, torch, transformers, accelerate and peft (and deepspeed for the ZeRO case)."""

from __future__ import annotations

import json
import os
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
# name -> (catalogue model, LoRA rank, batch, seq, checkpointing, ZeRO stage or 0 for DDP)
DIST_CASES: dict[str, tuple[str, int | None, int, int, bool, int]] = {
    "trainer-ddp-lora-1b-b4s1024": ("llama-3.2-1b", 16, 4, 1024, False, 0),
    "trainer-zero3-lora-ckpt-1b-b4s1024": ("llama-3.2-1b", 16, 4, 1024, True, 3),
}


def run_case(name: str, out: Path) -> None:
    """One case in this process: build, train 4 steps through Trainer + MemoryPreflight."""
    import torch
    import transformers

    from vramplan.catalog import resolve_model
    from vramplan.integrations.transformers import MemoryPreflight

    model_name, rank, batch, seq, ckpt, zero = (*CASES[name], 0) if name in CASES else DIST_CASES[name]
    hf = dict(resolve_model(model_name).arch.hf_config)
    cfg = transformers.AutoConfig.for_model(**hf)
    engine: dict[str, Any] = {}
    if zero:
        from vramplan.profiler.trainer_dist import deepspeed_config

        engine["deepspeed"] = deepspeed_config({"zero": zero})
    # before the model: with a ZeRO-3 config, from_config builds under deepspeed.zero.Init
    args = transformers.TrainingArguments(output_dir=f"/tmp/selfcheck-{name}", per_device_train_batch_size=batch,
                                          max_steps=4, bf16=True, gradient_checkpointing=ckpt, report_to=[],
                                          save_strategy="no", logging_strategy="no", disable_tqdm=True, **engine)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    if name in CASES:
        model = model.cuda()  # one GPU; under torchrun the Trainer or DeepSpeed places each rank's copy
    if rank is not None:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05,
                                                           target_modules="all-linear", task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, hf["vocab_size"], (batch * 4, seq), generator=g)
    data: list[dict[str, Any]] = [{"input_ids": x, "labels": x.clone()} for x in ids]
    cb = MemoryPreflight(seq_len=seq, measure_steps=3, record_path=out, name=name)
    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb]).train()
    c = cb.comparison
    assert c is not None
    print(json.dumps({"case": name, "rank": int(os.environ.get("RANK", "0")), "measured": c.measured_bytes,
                      "predicted": c.predicted_bytes, "error": round(c.error, 4)}), flush=True)


def case_command(name: str, out: Path, gpus: int) -> list[str]:
    """One case's process: itself, or torchrun with one process per GPU for a multi-GPU case."""
    one = ["-m", "vramplan.integrations.selfcheck", "--one", name, str(out)]
    if name in DIST_CASES:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", *one]
    return [sys.executable, *one]


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "--one":
        run_case(argv[1], Path(argv[2]))
        return 0
    gpus = 0
    if argv[:1] == ["--gpus"]:
        gpus, argv = int(argv[1]), argv[2:]
    out = Path(argv[0])
    names = argv[1:] or list(CASES)
    unknown = [n for n in names if n not in CASES and n not in DIST_CASES]
    if unknown:
        print(f"unknown case {unknown[0]!r}: allowed: {', '.join([*CASES, *DIST_CASES])}", file=sys.stderr)
        return 2
    if not gpus and any(n in DIST_CASES for n in names):
        import torch

        gpus = torch.cuda.device_count()
    rc = 0
    for name in names:
        p = subprocess.run(case_command(name, out, gpus), check=False)
        rc = rc or p.returncode
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
