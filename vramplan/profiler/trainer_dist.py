"""Multi-GPU launches of the real Trainer, the way users write them: the `TrainingArguments` for
DDP (torchrun alone), FSDP2 (`fsdp=True` + `fsdp_config`, accelerate's fully_shard) and DeepSpeed
ZeRO (`deepspeed=` a config dict with HF's "auto" values), and what each rank records.

Setup keys: `gpus` (world size, launched by torchrun), `fsdp` (full_shard / shard_grad_op),
`zero` (1/2/3), `offload` (none / optimizer / params). Checkpointing under FSDP goes through
`fsdp_config["activation_checkpointing"]`, as transformers' docs advise (the Trainer flag adds a
redundant all-gather in backward).
"""

from __future__ import annotations

import os
from typing import Any


def engine(setup: dict[str, Any]) -> str:
    if setup.get("fsdp"):
        return "fsdp2"
    if setup.get("zero"):
        return "deepspeed"
    return "ddp" if int(setup.get("gpus", 1)) > 1 else "single"


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def launch_fields(setup: dict[str, Any]) -> dict[str, Any]:
    """What a record says of its launch: the engine, where the model was built (`load_place`), the
    world size and this process's rank (torchrun's environment; one process: 1 and 0)."""
    return {"engine": engine(setup), "load": load_place(setup), "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "rank": int(os.environ.get("RANK", "0"))}


def deepspeed_config(setup: dict[str, Any]) -> dict[str, Any]:
    """The ZeRO config of transformers' DeepSpeed docs (ds_config_zero2/3.json): "auto" values the
    Trainer fills in (reduce_bucket_size = hidden^2, stage3_prefetch_bucket_size = 0.9 hidden^2,
    stage3_param_persistence_threshold = 10 hidden), overlap_comm and contiguous gradients on.
    No `optimizer` block: the Trainer's own AdamW is handed to DeepSpeed, which needs
    `zero_force_ds_cpu_optimizer: false` to run it on the CPU partition when offloading."""
    stage, off = int(setup["zero"]), setup.get("offload", "none")
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
                            "reduce_bucket_size": "auto", "allgather_bucket_size": 2e8 if stage < 3 else None}
    if stage == 3:
        zero.update(stage3_prefetch_bucket_size="auto", stage3_param_persistence_threshold="auto",
                    stage3_max_live_parameters=1e9, stage3_max_reuse_distance=1e9,
                    stage3_gather_16bit_weights_on_model_save=True, sub_group_size=1e9)
    if off in ("optimizer", "params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if off == "params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    zero = {k: v for k, v in zero.items() if v is not None}
    return {"bf16": {"enabled": "auto"}, "zero_optimization": zero, "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
            "zero_force_ds_cpu_optimizer": False, "steps_per_print": 10**9, "wall_clock_breakdown": False}


def parallel_args(setup: dict[str, Any]) -> dict[str, Any]:
    """TrainingArguments overrides for the setup's engine (empty for one GPU and DDP: torchrun's
    environment alone makes the Trainer wrap the model in DistributedDataParallel)."""
    eng = engine(setup)
    if eng == "fsdp2":
        ckpt = bool(setup["grad_checkpointing"])
        return {"fsdp": True, "gradient_checkpointing": False, "gradient_checkpointing_kwargs": None,
                "fsdp_config": {"version": 2, "reshard_after_forward": setup["fsdp"] == "full_shard",
                                "cpu_offload": setup.get("offload") == "params", "activation_checkpointing": ckpt}}
    if eng == "deepspeed":
        return {"deepspeed": deepspeed_config(setup)}
    return {}


def init_process_group(setup: dict[str, Any]) -> None:
    """FSDP2 with CPU offload keeps sharded gradients on the host, and the Trainer's gradient
    clipping all-reduces their norm there: that needs a gloo backend for cpu beside nccl, which
    accelerate's default init (nccl only) lacks ("No backend type associated with device type
    cpu"). Users pass the same backend string; accelerate keeps a group that already exists."""
    if engine(setup) == "fsdp2" and setup.get("offload") == "params":
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("cpu:gloo,cuda:nccl")


def builds_under_zero3(setup: dict[str, Any]) -> bool:
    """ZeRO-3 partitions at construction (transformers enters deepspeed.zero.Init in from_config
    once TrainingArguments(deepspeed=...) exists), so no rank ever holds the whole model."""
    return engine(setup) == "deepspeed" and int(setup["zero"]) == 3


QUANTISED_DTYPES = ("int8", "nf4", "fp4")


def load_place(setup: dict[str, Any]) -> str:
    """Where each rank builds the model before its engine takes it, as users load it:

    - "zero-init": ZeRO-3 (`builds_under_zero3`), each partition placed by deepspeed.zero.Init;
    - "cpu": FSDP2 on dense weights. Users' from_pretrained lands on the host; the Trainer leaves an
      FSDP model where it is (transformers 5.17 trainer.py Trainer.__init__: place_model_on_device
      is False when is_fsdp_enabled) and accelerate 1.15's fsdp2_prepare_model upcasts trainable
      weights to fp32 there, then calls fully_shard unit by unit, bottom-up (decoder layers, the
      embedding/norm/lm_head tail, the root). Each call moves that unit's full states to the GPU
      (torch fsdp/_fully_shard/_fsdp_init.py _move_states_to_device) and keeps only this rank's
      shard (_fsdp_param.py FSDPParam._init_sharded_param; on the host again under CPU offload),
      so no GPU ever holds the whole model, only one unit's full weights at a time;
    - "cuda": everything else on this rank's GPU: one GPU, DDP and ZeRO-1/2 (the Trainer moves the
      model to args.device itself), and quantised bases under FSDP2 (bitsandbytes quantises on the
      way to a GPU, device_map; fsdp2_prepare_model skips its meta-device path for Params4bit).

    Records before this field (FSDP2 in data/measurements/h100x2_2026-11-25_dist.jsonl) built on
    "cuda" for every engine but ZeRO-3: `record_load_place`."""
    if builds_under_zero3(setup):
        return "zero-init"
    if engine(setup) == "fsdp2" and setup.get("dtype") not in QUANTISED_DTYPES:
        return "cpu"
    return "cuda"


def record_load_place(rec: dict[str, Any]) -> str:
    """A record's `load`, or for one written before it existed, where that profiler built: on the
    GPU, but under ZeRO-3."""
    if "load" in rec:
        return str(rec["load"])
    return "zero-init" if builds_under_zero3(rec.get("setup", {})) else "cuda"


def host_rss() -> int:
    """This rank's resident host memory now (pinned offload buffers included)."""
    import psutil

    return int(psutil.Process().memory_info().rss)
