"""One measured case through a real trainer, in its own process:
`python -m vramplan.profiler.trainer_worker SETUP_JSON`.

`trainer: hf` runs transformers' `Trainer`, `trainer: trl` runs TRL's `SFTTrainer`, each the way
their docs show: random-weight model from config.json (on the GPU; on the host under FSDP2, where
accelerate moves each rank's shards: trainer_dist.load_place), bf16 weights with `bf16=True`, LoRA through
peft (`get_peft_model` for hf, `peft_config=` for TRL), QLoRA loaded with
`from_pretrained(quantization_config=BitsAndBytesConfig(...))` from a checkpoint saved on local
disk, `prepare_model_for_kbit_training` for hf (peft's QLoRA recipe; TRL does not call it), Liger
through `use_liger_kernel`, DoRA through `LoraConfig(use_dora=True)`, checkpoint offload through
`gradient_checkpointing_enable(offload=True)` and TRL's `activation_offloading`.

A TrainerCallback resets the peak counter when each step begins and reads it after backward
(`on_pre_optimizer_step`), after the optimizer step (`on_optimizer_step`) and at the step's end, all
relative to the allocation before the model was built. Prints one JSON record on its last line.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from typing import Any

from vramplan.profiler.build import attn_implementation, lora_targets
from vramplan.profiler.trainer_dist import (
    QUANTISED_DTYPES,
    host_rss,
    init_process_group,
    launch_fields,
    load_place,
    local_rank,
    parallel_args,
)
from vramplan.profiler.worker import _managed_bytes, dump_events, recorded_case, segments_by_stream, summarise_trace

# Trainer's `optim` names for vramplan's optimizers (transformers training_args.py OptimizerNames).
HF_OPTIM = {"adamw": "adamw_torch", "adamw-fused": "adamw_torch_fused", "adamw-8bit": "adamw_bnb_8bit",
            "paged-adamw": "paged_adamw_32bit", "paged-adamw-8bit": "paged_adamw_8bit", "sgd": "sgd",
            "adafactor": "adafactor", "lion": "lion_32bit", "lion-8bit": "lion_8bit"}


def _tokenizer(vocab: int) -> Any:
    """An offline fast tokenizer with the model's vocabulary size (TRL needs a processing class;
    the data are pre-tokenised ids, so its vocabulary is never used to encode)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=f"t{vocab - 1}", eos_token=f"t{vocab - 2}",
                                   unk_token="t0")


def _random_rows(n: int, seq: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    # ids below vocab-2 so no row holds the pad or eos id (every position keeps its label)
    return torch.randint(0, vocab - 2, (n, seq), generator=g).tolist()


def _bnb_config(setup: dict[str, Any]) -> Any:
    import torch
    from transformers import BitsAndBytesConfig

    if setup["dtype"] == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    storage = {"uint8": torch.uint8, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=setup["dtype"],
                              bnb_4bit_use_double_quant=setup["double_quant"], bnb_4bit_compute_dtype=torch.bfloat16,
                              bnb_4bit_quant_storage=storage[setup.get("quant_storage", "uint8")])


def build_device(place: str, gpu: Any) -> Any:
    """The torch device `build_trainer_model` builds on for a `load_place`: None under ZeRO-3
    (deepspeed.zero.Init places each partition), the host for "cpu", else this rank's GPU."""
    import torch

    return {"zero-init": None, "cpu": torch.device("cpu")}.get(place, gpu)


def build_trainer_model(setup: dict[str, Any], device: Any, tmp: str) -> Any:
    """Dense bases are built from the config on `device` (`build_device`: the GPU, the host for
    FSDP2); quantised ones are saved to local disk first and loaded back onto the GPU with a
    BitsAndBytesConfig, as users load them."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from vramplan.profiler.build import weight_dtype

    cfg = AutoConfig.for_model(**setup["hf_config"])
    cfg.use_cache = False
    attn = attn_implementation(setup)
    if device is None:  # ZeRO-3: deepspeed.zero.Init places each partition itself
        return AutoModelForCausalLM.from_config(cfg, dtype=weight_dtype(setup), attn_implementation=attn)
    if setup["dtype"] not in QUANTISED_DTYPES:
        with device:
            return AutoModelForCausalLM.from_config(cfg, dtype=weight_dtype(setup), attn_implementation=attn)
    with device:
        src = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation=attn)
    src.save_pretrained(tmp)
    del src
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return AutoModelForCausalLM.from_pretrained(tmp, quantization_config=_bnb_config(setup), dtype=torch.bfloat16,
                                                attn_implementation=attn, device_map={"": device.index or 0})


def lora_config(setup: dict[str, Any]) -> Any:
    import peft

    return peft.LoraConfig(r=setup["lora_rank"], lora_alpha=setup["lora_alpha"], lora_dropout=setup["lora_dropout"],
                           task_type="CAUSAL_LM", **lora_targets(setup),
                           use_dora=bool(setup.get("use_dora")))


def _common_args(setup: dict[str, Any], out: str) -> dict[str, Any]:
    ckpt = setup["grad_checkpointing"]
    return dict(
        output_dir=out, per_device_train_batch_size=setup["batch_size"],
        gradient_accumulation_steps=setup.get("grad_accum", 1), max_steps=setup.get("steps", 3),
        learning_rate=1e-5, logging_steps=1, save_strategy="no", report_to=[], dataloader_num_workers=0,
        bf16=setup["precision"] != "fp32", optim=HF_OPTIM[setup["optimizer"]], gradient_checkpointing=ckpt,
        gradient_checkpointing_kwargs={"use_reentrant": False} if ckpt else None,
        use_liger_kernel=bool(setup.get("liger")), disable_tqdm=True, seed=0,
    ) | parallel_args(setup)


def make_args(setup: dict[str, Any], out: str) -> Any:
    """TrainingArguments (SFTConfig for TRL). Made before the model: under ZeRO-3 their existence
    is what makes from_config partition at construction."""
    if setup["trainer"] == "trl":
        from trl import SFTConfig

        return SFTConfig(max_length=setup["seq_len"], activation_offloading=bool(setup.get("activation_offload")),
                         **_common_args(setup, out))
    from transformers import TrainingArguments

    return TrainingArguments(**_common_args(setup, out))


def _offload_checkpoints(model: Any, setup: dict[str, Any]) -> None:
    """`gradient_checkpointing_enable(offload=True)`: checkpointed layer inputs in pinned host memory."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False}, offload=True)


def make_trainer(setup: dict[str, Any], model: Any, args: Any, callback: Any) -> Any:
    vocab = setup["hf_config"]["vocab_size"]
    b, s, accum, steps = setup["batch_size"], setup["seq_len"], setup.get("grad_accum", 1), setup.get("steps", 3)
    rows = _random_rows(b * accum * steps * int(setup.get("gpus", 1)), s, vocab)
    method = setup["method"]
    quantised = setup["dtype"] in QUANTISED_DTYPES
    if setup["trainer"] == "trl":
        import peft
        from datasets import Dataset
        from trl import SFTTrainer

        # SFTTrainer never prepares a k-bit model itself (vramplan.options kbit_prepare); a user who
        # calls prepare_model_for_kbit_training before handing the model over gets the fp32 upcast
        if quantised and setup.get("kbit_prepare", False):
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=setup["grad_checkpointing"],
                                                         gradient_checkpointing_kwargs={"use_reentrant": False})
        ds = Dataset.from_dict({"input_ids": rows})
        peft_cfg = lora_config(setup) if method in ("lora", "qlora") else None
        tr = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=_tokenizer(vocab),
                        peft_config=peft_cfg, callbacks=[callback])
    else:
        import peft
        from transformers import Trainer, default_data_collator

        if quantised and setup.get("kbit_prepare", True):
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=setup["grad_checkpointing"],
                                                         gradient_checkpointing_kwargs={"use_reentrant": False})
        if method in ("lora", "qlora"):
            model = peft.get_peft_model(model, lora_config(setup))
        ds = [{"input_ids": r, "labels": r} for r in rows]
        tr = Trainer(model=model, args=args, train_dataset=ds, data_collator=default_data_collator, callbacks=[callback])
    if setup.get("checkpoint_offload"):
        _offload_checkpoints(tr.model, setup)
    return tr


def _callback(base: int, steps_out: list[dict[str, Any]], trace_last: int | None) -> Any:
    import torch
    from transformers import TrainerCallback

    def rel(x: int) -> int:
        return x - base

    class Peaks(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.cur: dict[str, Any] = {"alloc_start": rel(torch.cuda.memory_allocated()), "t": time.time()}
            if trace_last is not None and state.global_step == trace_last:
                torch.empty(1001 * 512, dtype=torch.uint8, device="cuda")  # trace mark "start"

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            torch.cuda.synchronize()
            self.cur.update(alloc_after_bwd=rel(torch.cuda.memory_allocated()), peak_bwd=rel(torch.cuda.max_memory_allocated()))

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            torch.cuda.synchronize()
            st = self.cur
            st.update(alloc_end=rel(torch.cuda.memory_allocated()), peak=rel(torch.cuda.max_memory_allocated()),
                      reserved_peak=torch.cuda.max_memory_reserved(), step_s=round(time.time() - st.pop("t"), 4),
                      host_rss=host_rss())
            steps_out.append(st)

    return Peaks()


def _stage(name: str, t0: float) -> None:
    """A progress line on stderr: a case that runs past its budget keeps the tail of these in its
    timeout record (sweep.run_one), which says where it spent the time."""
    print(f"[vramplan r{local_rank()}] {name} at {time.time() - t0:.0f} s", file=sys.stderr, flush=True)


def run_case(setup: dict[str, Any], *, trace: bool = False) -> dict[str, Any]:
    import torch

    dev = torch.device("cuda", local_rank())
    torch.cuda.set_device(dev)
    torch.cuda.init()
    torch.manual_seed(0)
    torch.empty(1, device=dev)  # CUDA context
    base = torch.cuda.memory_allocated()
    free0, total = torch.cuda.mem_get_info()
    rss0 = host_rss()
    steps = int(setup.get("steps", 3))
    rec_steps: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        early = trace and bool(os.environ.get("VRAMPLAN_EVENTS_DIR"))  # the replay needs the segments loading made
        if early:
            torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
        init_process_group(setup)
        _stage("process group up", t0)
        args = make_args(setup, os.path.join(tmp, "out"))
        model = build_trainer_model(setup, build_device(load_place(setup), dev), os.path.join(tmp, "ckpt"))
        _stage("model built", t0)
        alloc_after_load = torch.cuda.memory_allocated() - base
        tr = make_trainer(setup, model, args, _callback(base, rec_steps, steps - 1 if trace else None))
        load_s = time.time() - t0
        _stage("trainer made", t0)
        if trace and not early:
            torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
        tr.train()
        _stage("trained", t0)
        snap = torch.cuda.memory._snapshot() if trace else None
        if trace:
            torch.cuda.memory._record_memory_history(enabled=None)
        model = tr.model
        trainable = [p for p in model.parameters() if p.requires_grad]
        free1, _ = torch.cuda.mem_get_info()
        rec: dict[str, Any] = {
            "status": "ok",
            "n_params_total": sum(p.numel() for p in model.parameters()),
            "n_trainable": sum(p.numel() for p in trainable),
            "trainable_dtypes": sorted({str(p.dtype) for p in trainable}),
            "alloc_after_load": alloc_after_load,
            "steps": rec_steps,
            "peak_allocated": max(x["peak"] for x in rec_steps),
            "peak_reserved": torch.cuda.max_memory_reserved(),
            "device_used_end": total - free1, "device_used_start": total - free0,
            "managed_bytes": _managed_bytes(tr.optimizer),
            "host_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "host_rss_start": rss0, "host_rss_peak": max(x["host_rss"] for x in rec_steps),
            "gpu_total": total, "load_s": round(load_s, 2),
            "optimizer_class": type(tr.optimizer.optimizer if hasattr(tr.optimizer, "optimizer") else tr.optimizer).__name__,
        }
        rec["segments_by_stream"] = segments_by_stream(torch.cuda.memory_snapshot(), dev.index)
        if snap is not None:  # this rank's device first: summarise_trace reads device_traces[0]
            snap["device_traces"] = [snap["device_traces"][dev.index]]
            rec["trace"] = summarise_trace(snap)
            # "-r0", not "@r0": the device tool brings back only plain file names
            dump_events(snap, str(setup.get("name", "case")) + (f"-r{local_rank()}" if int(setup.get("gpus", 1)) > 1 else ""))
    return rec


def main() -> None:
    import importlib.metadata as md

    setup = json.loads(sys.argv[1])
    trace = bool(setup.pop("trace", False))
    rec = recorded_case(setup, lambda: run_case(setup, trace=trace))
    rec.update(launch_fields(setup))  # on failures too, so every rank's record is named
    if rec["engine"] == "deepspeed":
        rec.setdefault("versions", {})["deepspeed"] = md.version("deepspeed")
    print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
