"""One sharded/offloaded case with a real engine, world size from the environment (torchrun-style
RANK/WORLD_SIZE/LOCAL_RANK; 1 when unset): `python -m vramplan.profiler.dist_worker SETUP_JSON`.

Engines: DeepSpeed ZeRO (`zero`: 1/2/3, `offload`: none/optimizer/params) through
deepspeed.initialize with bf16 and DeepSpeed's AdamW (CPU Adam when offloading), or PyTorch FSDP
(`fsdp`: full_shard/shard_grad_op/no_shard, `offload` params -> CPUOffload) with bf16 mixed
precision and one unit per decoder layer. Records per-rank peak allocated per phase and the
host's resident memory (psutil RSS of this process) — the CPU side of offloading.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
import traceback
from typing import Any


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _deepspeed(model: Any, setup: dict[str, Any]) -> Any:
    import deepspeed

    off = setup["offload"]
    zero: dict[str, Any] = {"stage": setup["zero"], "overlap_comm": False, "contiguous_gradients": True}
    h = setup["hf_config"].get("hidden_size", setup["hf_config"].get("n_embd"))
    zero["reduce_bucket_size"] = h * h  # HF Trainer "auto"
    if setup["zero"] == 3:
        zero.update(stage3_prefetch_bucket_size=int(0.9 * h * h), stage3_param_persistence_threshold=10 * h)
    if off in ("optimizer", "params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if off == "params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    cfg = {"train_micro_batch_size_per_gpu": setup["batch_size"], "gradient_accumulation_steps": 1,
           "bf16": {"enabled": True}, "zero_optimization": zero,
           # torch's AdamW (no JIT-built DeepSpeed kernels); on the CPU partition when offloading
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "torch_adam": True}},
           "zero_force_ds_cpu_optimizer": False, "steps_per_print": 10**9, "wall_clock_breakdown": False}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=cfg)
    return engine


def _fsdp(model: Any, setup: dict[str, Any]) -> tuple[Any, Any]:
    import functools

    import torch
    from torch.distributed.fsdp import CPUOffload, MixedPrecision, ShardingStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    layer_cls = {type(m) for n, m in model.named_modules() if n.endswith("layers.0") or n.endswith("h.0")}
    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=layer_cls)
    strategy = {"full_shard": ShardingStrategy.FULL_SHARD, "shard_grad_op": ShardingStrategy.SHARD_GRAD_OP,
                "no_shard": ShardingStrategy.NO_SHARD}[setup["fsdp"]]
    mp = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16, buffer_dtype=torch.bfloat16)
    wrapped = FSDP(model, auto_wrap_policy=policy, sharding_strategy=strategy, mixed_precision=mp,
                   cpu_offload=CPUOffload(offload_params=setup["offload"] == "params"),
                   device_id=torch.cuda.current_device(), use_orig_params=True)
    opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-5)
    return wrapped, opt


def run(setup: dict[str, Any], steps: int = 3) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dev = torch.device("cuda", local)
    torch.empty(1, device=dev)
    base = torch.cuda.memory_allocated()
    rss0 = _rss()
    cfg = AutoConfig.for_model(**setup["hf_config"])
    cfg.use_cache = False
    ds = bool(setup.get("zero"))
    if ds:
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl")
        # ZeRO-3 partitions at construction (zero.Init) so no rank ever holds the whole model
        ctx = deepspeed.zero.Init(config_dict_or_path={"zero_optimization": {"stage": 3}, "bf16": {"enabled": True},
                                                       "train_micro_batch_size_per_gpu": setup["batch_size"]}) \
            if setup["zero"] == 3 else torch.device("cpu")
        with ctx:
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
        if setup["grad_checkpointing"]:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        engine = _deepspeed(model, setup)
        fwd_model, opt = engine, None
    else:
        dist.init_process_group("nccl")
        with torch.device("cpu"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")
        if setup["grad_checkpointing"]:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        fwd_model, opt = _fsdp(model, setup)
    alloc_after_wrap = torch.cuda.memory_allocated() - base
    b, s, v = setup["batch_size"], setup["seq_len"], cfg.vocab_size
    steps_rec = []
    rss_peak = _rss()
    for _ in range(steps):
        ids = torch.randint(0, v, (b, s), device=dev)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        st: dict[str, Any] = {"alloc_start": torch.cuda.memory_allocated() - base}
        t = time.time()
        out = fwd_model(input_ids=ids, labels=ids)
        torch.cuda.synchronize()
        st["peak_fwd"] = torch.cuda.max_memory_allocated() - base
        if ds:
            engine.backward(out.loss)
        else:
            out.loss.backward()
        torch.cuda.synchronize()
        st["peak_bwd"] = torch.cuda.max_memory_allocated() - base
        if ds:
            engine.step()
        else:
            opt.step()
            opt.zero_grad(set_to_none=True)
        del out
        torch.cuda.synchronize()
        st["alloc_end"] = torch.cuda.memory_allocated() - base
        st["peak"] = torch.cuda.max_memory_allocated() - base
        st["step_s"] = round(time.time() - t, 3)
        rss_peak = max(rss_peak, _rss())
        steps_rec.append(st)
    free, total = torch.cuda.mem_get_info()
    return {"status": "ok", "alloc_after_wrap": alloc_after_wrap, "steps": steps_rec,
            "peak_allocated": max(x["peak"] for x in steps_rec), "peak_reserved": torch.cuda.max_memory_reserved(),
            "device_used_end": total - free, "rss_start": rss0, "rss_peak": rss_peak,
            "world_size": int(os.environ["WORLD_SIZE"]), "rank": int(os.environ["RANK"])}


def main() -> None:
    import torch

    from vramplan.profiler.worker import _versions

    setup = json.loads(sys.argv[1])
    steps = int(setup.pop("steps", 3))
    rec: dict[str, Any] = {"setup": setup, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                           "gpu": torch.cuda.get_device_name(0), "versions": _versions(), "engine": "deepspeed" if setup.get("zero") else "fsdp"}
    try:
        import importlib.metadata as md

        rec["versions"]["deepspeed"] = md.version("deepspeed") if setup.get("zero") else None
        rec.update(run(setup, steps))
    except torch.OutOfMemoryError as e:
        rec.update(status="oom", error=str(e).splitlines()[0][:300])
    except Exception as e:
        rec.update(status="error", error=f"{type(e).__name__}: {str(e)[:600]}", tb=traceback.format_exc()[-2500:])
    print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
